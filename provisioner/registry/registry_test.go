package registry_test

import (
	"bytes"
	"context"
	"crypto/rand"
	"encoding/base64"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/google/go-containerregistry/pkg/authn"
	"github.com/google/go-containerregistry/pkg/name"
	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/empty"
	"github.com/google/go-containerregistry/pkg/v1/mutate"
	"github.com/google/go-containerregistry/pkg/v1/remote"
	"github.com/google/go-containerregistry/pkg/v1/static"
	"github.com/google/go-containerregistry/pkg/v1/types"
	"github.com/spf13/afero"

	"github.com/oneagent-csi/oneagent-csi/provisioner/extract"
	"github.com/oneagent-csi/oneagent-csi/provisioner/registry"
	"github.com/oneagent-csi/oneagent-csi/test/ocitest"
)

const repo = ocitest.Repo

var (
	module = ocitest.Module
	image  = ocitest.Image
	push   = ocitest.Push
)

func serve(t *testing.T, wrap func(http.Handler) http.Handler) string { return ocitest.Serve(t, wrap) }

// tree is a Tree that builds into a fresh directory per start.
type tree struct {
	fsys   afero.Fs
	starts int
	last   *extract.Layers
}

func (tr *tree) start() (registry.Tree, error) {
	tr.starts++
	l, err := extract.NewLayers(tr.fsys, fmt.Sprintf("out%d", tr.starts), "opt/dynatrace/oneagent", extract.Options{})
	tr.last = l
	return l, err
}

func newPuller(t *testing.T, src registry.Source) *registry.Puller {
	t.Helper()
	if src.Arch == "" {
		src.Arch = "amd64"
	}
	p, err := registry.New(src)
	if err != nil {
		t.Fatal(err)
	}
	return p
}

func TestPullAppliesLayersInOrder(t *testing.T) {
	host := serve(t, nil)
	want := push(t, host, "1.311.72", module(t, "1.311.72"))
	p := newPuller(t, registry.Source{Image: host + "/" + repo + ":1.311.72"})
	ctx := context.Background()
	r, err := p.Resolve(ctx, "")
	if err != nil {
		t.Fatal(err)
	}
	if r.Digest != want || r.Host != host {
		t.Fatalf("resolved %+v, want %s from %s", r, want, host)
	}
	tr := &tree{fsys: afero.NewMemMapFs()}
	if _, err := p.Pull(ctx, r.Digest, tr.start); err != nil {
		t.Fatal(err)
	}
	res, err := tr.last.Finish()
	if err != nil {
		t.Fatal(err)
	}
	var paths []string
	for _, e := range res.Entries {
		paths = append(paths, e.Type+" "+e.Path)
	}
	got := strings.Join(paths, ", ")
	if got != "dir agent, dir agent/conf, file agent/conf/ruxitagentproc.conf, dir agent/lib64, file agent/lib64/liboneagentproc.so, file manifest.json" {
		t.Errorf("tree = %s", got)
	}
	if b, _ := afero.ReadFile(tr.fsys, "out1/agent/lib64/liboneagentproc.so"); string(b) != "elf 1.311.72" {
		t.Errorf("library = %q, want the upper layer's", b)
	}
}

func TestResolvePicksThePlatform(t *testing.T) {
	host := serve(t, nil)
	amd, arm := module(t, "amd"), module(t, "arm")
	idx := mutate.AppendManifests(empty.Index,
		mutate.IndexAddendum{Add: amd, Descriptor: v1.Descriptor{Platform: &v1.Platform{OS: "linux", Architecture: "amd64"}}},
		mutate.IndexAddendum{Add: arm, Descriptor: v1.Descriptor{Platform: &v1.Platform{OS: "linux", Architecture: "arm64"}}})
	ref, _ := name.NewTag(host+"/"+repo+":multi", name.Insecure)
	if err := remote.WriteIndex(ref, idx); err != nil {
		t.Fatal(err)
	}
	amdOnly := mutate.AppendManifests(empty.Index,
		mutate.IndexAddendum{Add: amd, Descriptor: v1.Descriptor{Platform: &v1.Platform{OS: "linux", Architecture: "amd64"}}})
	ref, _ = name.NewTag(host+"/"+repo+":amd-only", name.Insecure)
	if err := remote.WriteIndex(ref, amdOnly); err != nil {
		t.Fatal(err)
	}
	for arch, img := range map[string]v1.Image{"amd64": amd, "arm64": arm} {
		p := newPuller(t, registry.Source{Image: host + "/" + repo + ":multi", Arch: arch})
		r, err := p.Resolve(context.Background(), "")
		want, _ := img.Digest()
		if err != nil || r.Digest != want.String() {
			t.Errorf("%s: resolved %+v, %v; want %s", arch, r, err, want)
		}
	}
	p := newPuller(t, registry.Source{Image: host + "/" + repo + ":amd-only", Arch: "arm64"})
	if _, err := p.Resolve(context.Background(), ""); !errors.Is(err, registry.ErrNotFound) || !strings.Contains(err.Error(), "linux/arm64") {
		t.Errorf("wrong-platform-only index: %v, want not found naming linux/arm64", err)
	}
	// A version pin is a tag of the same repository.
	p = newPuller(t, registry.Source{Image: host + "/" + repo + ":multi"})
	if _, err := p.Resolve(context.Background(), "no-such-tag"); !errors.Is(err, registry.ErrNotFound) {
		t.Errorf("missing tag: %v, want not found", err)
	}
}

// rewritingBlobs serves every blob through change while on is set;
// change returns the body to send and the Content-Length to announce
// (-1: none, the body is sent chunked).
func rewritingBlobs(on *atomic.Bool, change func(body []byte) ([]byte, int)) func(http.Handler) http.Handler {
	return func(next http.Handler) http.Handler {
		return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			if !on.Load() || r.Method != http.MethodGet || !strings.Contains(r.URL.Path, "/blobs/sha256:") {
				next.ServeHTTP(w, r)
				return
			}
			rec := httptest.NewRecorder()
			next.ServeHTTP(rec, r)
			for k, v := range rec.Header() {
				w.Header()[k] = v
			}
			body, length := rec.Body.Bytes(), rec.Body.Len()
			if rec.Code == http.StatusOK {
				body, length = change(body)
			}
			w.Header().Del("Content-Length")
			if length >= 0 {
				w.Header().Set("Content-Length", fmt.Sprint(length))
			}
			w.WriteHeader(rec.Code)
			if length < 0 {
				w.(http.Flusher).Flush() // headers out without a length: chunked
			}
			_, _ = w.Write(body) // short of length: the server drops the connection
		})
	}
}

// corrupting flips a byte in the middle of every blob.
func corrupting(on *atomic.Bool) func(http.Handler) http.Handler {
	return rewritingBlobs(on, func(body []byte) ([]byte, int) {
		if len(body) > 0 {
			body[len(body)/2] ^= 0xff
		}
		return body, len(body)
	})
}

func TestCorruptedBlob(t *testing.T) {
	var broken atomic.Bool
	mirror := serve(t, corrupting(&broken))
	origin := serve(t, nil)
	img := module(t, "1")
	digest := push(t, mirror, "1", img)
	push(t, origin, "1", img)
	broken.Store(true)

	t.Run("a mirror's damaged copy: the next registry serves", func(t *testing.T) {
		p := newPuller(t, registry.Source{Image: origin + "/" + repo + ":1", Mirrors: []string{mirror}})
		tr := &tree{fsys: afero.NewMemMapFs()}
		host, err := p.Pull(context.Background(), digest, tr.start)
		if err != nil || host != origin || tr.starts != 2 {
			t.Fatalf("pull from %s after %d starts: %v; want the origin after the mirror", host, tr.starts, err)
		}
	})
	t.Run("the only copy damaged: bad archive", func(t *testing.T) {
		p := newPuller(t, registry.Source{Image: mirror + "/" + repo + ":1"})
		_, err := p.Pull(context.Background(), digest, (&tree{fsys: afero.NewMemMapFs()}).start)
		if !errors.Is(err, extract.ErrBadArchive) || !strings.Contains(err.Error(), "does not match its digest") {
			t.Fatalf("err = %v, want a bad archive saying the digest does not match", err)
		}
	})
}

// A blob whose transfer breaks is not a damaged image: the pull is
// unavailable (the next registry, or a later try), not refused as a bad
// archive. A registry that announces a length other than the manifest's
// is passed over the same way; bytes beyond the manifest's size are not
// part of the layer.
func TestBlobTransferBreaksOrOverruns(t *testing.T) {
	cases := []struct {
		name    string
		change  func(body []byte) ([]byte, int)
		want    error // nil: the pull succeeds
		wantMsg string
	}{
		{"connection dropped half-way", func(body []byte) ([]byte, int) { return body[:len(body)/2], len(body) },
			registry.ErrUnavailable, "unexpected EOF"},
		{"a longer Content-Length than the manifest's size", func(body []byte) ([]byte, int) {
			return append(body, 0), len(body) + 1
		}, registry.ErrUnavailable, "Content-Length"},
		{"chunked, a byte beyond the manifest's size", func(body []byte) ([]byte, int) {
			return append(body, 0), -1
		}, nil, ""},
		{"chunked, a byte short", func(body []byte) ([]byte, int) {
			return body[:len(body)-1], -1
		}, extract.ErrBadArchive, "does not match its digest"},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			var on atomic.Bool
			host := serve(t, rewritingBlobs(&on, tc.change))
			digest := push(t, host, "1", module(t, "1"))
			on.Store(true)
			p := newPuller(t, registry.Source{Image: host + "/" + repo + ":1"})
			tr := &tree{fsys: afero.NewMemMapFs()}
			_, err := p.Pull(context.Background(), digest, tr.start)
			if tc.want == nil {
				if err != nil {
					t.Fatal(err)
				}
				if b, _ := afero.ReadFile(tr.fsys, "out1/agent/lib64/liboneagentproc.so"); string(b) != "elf 1" {
					t.Fatalf("library = %q", b)
				}
				return
			}
			if !errors.Is(err, tc.want) || !strings.Contains(err.Error(), tc.wantMsg) {
				t.Fatalf("err = %v, want %v mentioning %q", err, tc.want, tc.wantMsg)
			}
			if errors.Is(tc.want, registry.ErrUnavailable) && errors.Is(err, extract.ErrBadArchive) {
				t.Fatalf("err = %v: a broken transfer must not read as a bad archive", err)
			}
		})
	}
}

func TestUnsupportedLayerMediaType(t *testing.T) {
	host := serve(t, nil)
	digest := push(t, host, "odd", image(t, static.NewLayer([]byte("BZh91AY&SY"), "application/vnd.example.layer.tar+bzip2")))
	p := newPuller(t, registry.Source{Image: host + "/" + repo + ":odd"})
	tr := &tree{fsys: afero.NewMemMapFs()}
	_, err := p.Pull(context.Background(), digest, tr.start)
	if !errors.Is(err, extract.ErrBadArchive) || !strings.Contains(err.Error(), "bzip2") || tr.starts != 0 {
		t.Fatalf("err = %v after %d starts, want a bad archive naming the media type before any tree", err, tr.starts)
	}
}

// basicAuth requires user:pass.
func basicAuth(user, pass string) func(http.Handler) http.Handler {
	return func(next http.Handler) http.Handler {
		return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			if u, p, ok := r.BasicAuth(); !ok || u != user || p != pass {
				w.Header().Set("WWW-Authenticate", `Basic realm="test"`)
				w.WriteHeader(http.StatusUnauthorized)
				return
			}
			next.ServeHTTP(w, r)
		})
	}
}

func writeDockerConfig(t *testing.T, path, host, user, pass string) {
	t.Helper()
	auth := base64.StdEncoding.EncodeToString([]byte(user + ":" + pass))
	if err := os.WriteFile(path, fmt.Appendf(nil, `{"auths":{%q:{"auth":%q}}}`, host, auth), 0o600); err != nil {
		t.Fatal(err)
	}
}

func TestCredentialsFromThePullSecret(t *testing.T) {
	open := serve(t, nil)
	guarded := serve(t, basicAuth("puller", "s3cret"))
	img := module(t, "1")
	push(t, open, "1", img)
	// Push through the same handler with credentials.
	ref, _ := name.NewTag(guarded+"/"+repo+":1", name.Insecure)
	if err := remote.Write(ref, img, remote.WithAuth(&authn.Basic{Username: "puller", Password: "s3cret"})); err != nil {
		t.Fatal(err)
	}
	secret := filepath.Join(t.TempDir(), ".dockerconfigjson")
	writeDockerConfig(t, secret, guarded, "puller", "wrong")
	p := newPuller(t, registry.Source{Image: guarded + "/" + repo + ":1", PullSecretFile: secret})
	if _, err := p.Resolve(context.Background(), ""); !errors.Is(err, registry.ErrUnauthorized) {
		t.Fatalf("wrong password: %v, want unauthorized", err)
	}
	// The Secret is rotated: the next pull reads it again.
	writeDockerConfig(t, secret, guarded, "puller", "s3cret")
	r, err := p.Resolve(context.Background(), "")
	if err != nil {
		t.Fatal(err)
	}
	if _, err := p.Pull(context.Background(), r.Digest, (&tree{fsys: afero.NewMemMapFs()}).start); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(secret, []byte("{not json"), 0o600); err != nil {
		t.Fatal(err)
	}
	if _, err := p.Resolve(context.Background(), ""); err == nil || !strings.Contains(err.Error(), "pullSecretFile") {
		t.Errorf("broken secret: %v, want an error naming pullSecretFile", err)
	}
}

func TestMirrorsInOrder(t *testing.T) {
	origin := serve(t, nil)
	var mirrorHits atomic.Int64
	mirror := serve(t, func(next http.Handler) http.Handler {
		return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) { mirrorHits.Add(1); next.ServeHTTP(w, r) })
	})
	empty := serve(t, nil)
	img := module(t, "1")
	digest := push(t, origin, "1", img)
	push(t, mirror, "1", img)
	down := closedPort(t)

	p := newPuller(t, registry.Source{Image: origin + "/" + repo + ":1", Mirrors: []string{down, empty, mirror}})
	r, err := p.Resolve(context.Background(), "")
	if err != nil || r.Host != mirror || r.Digest != digest {
		t.Fatalf("resolved %+v, %v; want %s from the first mirror that has it", r, err, digest)
	}
	host, err := p.Pull(context.Background(), digest, (&tree{fsys: afero.NewMemMapFs()}).start)
	if err != nil || host != mirror || mirrorHits.Load() == 0 {
		t.Fatalf("pulled from %s: %v", host, err)
	}
	// A plain-HTTP mirror inside the cluster.
	p = newPuller(t, registry.Source{Image: down + "/" + repo + ":1", Mirrors: []string{"http://" + mirror}})
	if r, err := p.Resolve(context.Background(), ""); err != nil || r.Host != mirror {
		t.Errorf("http:// mirror: %+v, %v", r, err)
	}
	// A mirror without the image while the origin is down: unavailable
	// (retried), not "not found" (which would fail volumes open at once).
	p = newPuller(t, registry.Source{Image: down + "/" + repo + ":1", Mirrors: []string{empty}})
	if _, err := p.Resolve(context.Background(), ""); !errors.Is(err, registry.ErrUnavailable) {
		t.Errorf("err = %v, want unavailable", err)
	}
}

func closedPort(t *testing.T) string {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := l.Addr().String()
	_ = l.Close()
	return addr
}

func TestSourceValidation(t *testing.T) {
	for _, tc := range []struct {
		src  registry.Source
		want string
	}{
		{registry.Source{Image: "UPPER/case:1", Arch: "amd64"}, `image "UPPER/case:1"`},
		{registry.Source{Image: "r.example.com/a:1", Arch: "amd64", Mirrors: []string{"m.example.com/path"}}, "mirrors"},
		{registry.Source{Image: "r.example.com/a:1", Arch: "amd64", Mirrors: []string{"http://"}}, "mirrors"},
		{registry.Source{Image: "r.example.com/a:1", Arch: "amd64", CAFile: "/nonexistent"}, "caFile"},
		{registry.Source{Image: "r.example.com/a:1", Arch: "amd64", Proxy: "::"}, "proxy"},
		{registry.Source{Image: "r.example.com/a:1"}, "arch"},
	} {
		if _, err := registry.New(tc.src); err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("%+v: %v, want an error naming %s", tc.src, err, tc.want)
		}
	}
}

// stalling answers requests matching what normally until stall is set;
// then it sends the response headers and half of the body (or, headers
// false, nothing at all) and waits without a byte more until the client
// gives up or the test ends.
func stalling(t *testing.T, stall *atomic.Bool, what string, headers bool) func(http.Handler) http.Handler {
	release := make(chan struct{})
	t.Cleanup(func() { close(release) }) // before the server's own Close
	return func(next http.Handler) http.Handler {
		return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			if !stall.Load() || r.Method != http.MethodGet || !strings.Contains(r.URL.Path, what) {
				next.ServeHTTP(w, r)
				return
			}
			if headers {
				rec := httptest.NewRecorder()
				next.ServeHTTP(rec, r)
				for k, v := range rec.Header() {
					w.Header()[k] = v
				}
				w.WriteHeader(rec.Code)
				_, _ = w.Write(rec.Body.Bytes()[:rec.Body.Len()/2])
				w.(http.Flusher).Flush()
			}
			select {
			case <-r.Context().Done():
			case <-release:
			}
		})
	}
}

// A registry that stops sending is passed over after the idle or request
// timeout, not waited for until the install's deadline: a mirror that
// stalls costs the fleet that timeout, then the next registry serves.
func TestStalledRegistry(t *testing.T) {
	const timeout = 200 * time.Millisecond
	cases := []struct {
		name    string
		what    string // the requests that stall
		headers bool   // headers and half the body sent first
		resolve bool   // the stall is seen by Resolve (else Pull)
		wantMsg string
	}{
		{"a layer stops half-way", "/blobs/", true, false, "download stalled"},
		{"a blob request gets no answer", "/blobs/", false, false, "timeout awaiting response headers"},
		{"a manifest request gets no answer", "/manifests/", false, false, "manifest took longer"},
		{"a manifest body stops half-way", "/manifests/", true, false, "manifest took longer"},
		{"resolving: no answer", "/manifests/", false, true, "no answer within"},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			var stall atomic.Bool
			mirror := serve(t, stalling(t, &stall, tc.what, tc.headers))
			origin := serve(t, nil)
			img := module(t, "1")
			digest := push(t, mirror, "1", img)
			push(t, origin, "1", img)
			stall.Store(true)
			src := registry.Source{Image: origin + "/" + repo + ":1", RequestTimeout: timeout, IdleTimeout: timeout}
			ctx, cancel := context.WithTimeout(context.Background(), time.Minute) // far beyond the timeouts
			defer cancel()

			alone := src
			alone.Image = mirror + "/" + repo + ":1"
			var err error
			if tc.resolve {
				_, err = newPuller(t, alone).Resolve(ctx, "")
			} else {
				_, err = newPuller(t, alone).Pull(ctx, digest, (&tree{fsys: afero.NewMemMapFs()}).start)
			}
			if !errors.Is(err, registry.ErrUnavailable) || !strings.Contains(err.Error(), tc.wantMsg) || ctx.Err() != nil {
				t.Fatalf("the stalling registry alone: %v; want unavailable mentioning %q, long before the deadline", err, tc.wantMsg)
			}

			src.Mirrors = []string{"http://" + mirror}
			p := newPuller(t, src)
			if tc.resolve {
				r, err := p.Resolve(ctx, "")
				if err != nil || r.Host != origin {
					t.Fatalf("resolved %+v, %v; want the origin after the stalled mirror", r, err)
				}
				return
			}
			tr := &tree{fsys: afero.NewMemMapFs()}
			host, err := p.Pull(ctx, digest, tr.start)
			if err != nil || host != origin {
				t.Fatalf("pull from %s: %v; want the origin after the stalled mirror", host, err)
			}
		})
	}
}

// slowTree takes its time once the first MiB of the layer is read, as a
// node's busy disk does: the stream then waits for the tree, which is not
// the registry's silence.
type slowTree struct {
	registry.Tree
	pause time.Duration
}

func (s slowTree) Apply(ctx context.Context, layer io.Reader, size int64) error {
	return s.Tree.Apply(ctx, &slowReader{r: layer, pause: s.pause}, size)
}

type slowReader struct {
	r      io.Reader
	pause  time.Duration
	n      int64
	paused bool
}

func (s *slowReader) Read(p []byte) (int, error) {
	if !s.paused && s.n > 1<<20 {
		time.Sleep(s.pause) // a slow disk, not synchronisation
		s.paused = true
	}
	n, err := s.r.Read(p)
	s.n += int64(n)
	return n, err
}

func TestSlowTreeIsNotAStall(t *testing.T) {
	const idle = 100 * time.Millisecond
	host := serve(t, nil)
	big := make([]byte, 8<<20)
	if _, err := rand.Read(big); err != nil {
		t.Fatal(err)
	}
	digest := push(t, host, "big", image(t, static.NewLayer(ocitest.Tar(t, map[string]string{
		"opt/dynatrace/oneagent/agent/lib64/liboneagentproc.so": string(big),
	}), types.OCIUncompressedLayer)))
	p := newPuller(t, registry.Source{Image: host + "/" + repo + ":big", IdleTimeout: idle})
	tr := &tree{fsys: afero.NewMemMapFs()}
	if _, err := p.Pull(context.Background(), digest, func() (registry.Tree, error) {
		inner, err := tr.start()
		return slowTree{Tree: inner, pause: 5 * idle}, err
	}); err != nil {
		t.Fatalf("a tree slower than the idle timeout: %v", err)
	}
	if b, _ := afero.ReadFile(tr.fsys, "out1/agent/lib64/liboneagentproc.so"); !bytes.Equal(b, big) {
		t.Fatalf("library: %d bytes, want the 8 MiB written", len(b))
	}
}

// TestPullSpeaksHTTP1 pulls from a registry that offers HTTP/2, as most do:
// over HTTP/2 a layer read slower than it arrives would be buffered in the
// node's heap (up to the stream's 4 MiB window), so every request of a
// pull, the blobs included, must come over HTTP/1.1.
func TestPullSpeaksHTTP1(t *testing.T) {
	var mu sync.Mutex
	protocols := map[string]int{}
	recording := func(next http.Handler) http.Handler {
		return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			mu.Lock()
			protocols[r.Proto]++
			mu.Unlock()
			next.ServeHTTP(w, r)
		})
	}
	host, caFile, pushTransport := ocitest.ServeTLS(t, recording)
	push(t, host, "1.311.72", module(t, "1.311.72"), remote.WithTransport(pushTransport))
	mu.Lock()
	clear(protocols) // the push is not the node's
	mu.Unlock()

	p := newPuller(t, registry.Source{Image: host + "/" + repo + ":1.311.72", CAFile: caFile})
	ctx := context.Background()
	r, err := p.Resolve(ctx, "")
	if err != nil {
		t.Fatal(err)
	}
	tr := &tree{fsys: afero.NewMemMapFs()}
	if _, err := p.Pull(ctx, r.Digest, tr.start); err != nil {
		t.Fatal(err)
	}
	mu.Lock()
	defer mu.Unlock()
	if len(protocols) != 1 || protocols["HTTP/1.1"] == 0 {
		t.Fatalf("requests by protocol = %v, want HTTP/1.1 only", protocols)
	}
}
