package mirror_test

import (
	"bytes"
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/google/go-containerregistry/pkg/name"
	"github.com/google/go-containerregistry/pkg/v1/remote"
	"github.com/google/go-containerregistry/pkg/v1/static"
	"github.com/google/go-containerregistry/pkg/v1/types"

	"github.com/oneagent-csi/oneagent-csi/mirror"
	"github.com/oneagent-csi/oneagent-csi/test/ocitest"
)

// upstream is go-containerregistry's registry whose blob downloads are
// counted and can be slowed (so that requests overlap) or broken off.
type upstream struct {
	host      string
	blobGets  atomic.Int64
	slow      atomic.Bool
	breakOff  atomic.Bool
	down      atomic.Bool
	unblocked chan struct{}
}

func startUpstream(t *testing.T) *upstream {
	u := &upstream{unblocked: make(chan struct{})}
	u.host = ocitest.Serve(t, func(next http.Handler) http.Handler {
		return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			if u.down.Load() {
				w.WriteHeader(http.StatusServiceUnavailable)
				return
			}
			if r.Method == http.MethodGet && strings.Contains(r.URL.Path, "/blobs/") {
				u.blobGets.Add(1)
				if u.slow.Load() {
					<-u.unblocked
				}
				if u.breakOff.Load() {
					rec := httptest.NewRecorder()
					next.ServeHTTP(rec, r)
					w.Header().Set("Content-Length", fmt.Sprint(rec.Body.Len()))
					w.WriteHeader(rec.Code)
					_, _ = w.Write(rec.Body.Bytes()[:rec.Body.Len()/2])
					panic(http.ErrAbortHandler)
				}
			}
			next.ServeHTTP(w, r)
		})
	})
	return u
}

func startMirror(t *testing.T, up *upstream, ttl time.Duration) string {
	t.Helper()
	m, err := mirror.New(mirror.Options{Upstream: up.host, Dir: t.TempDir(), TagTTL: ttl, Transport: http.DefaultTransport})
	if err != nil {
		t.Fatal(err)
	}
	s := httptest.NewServer(m.Handler())
	t.Cleanup(s.Close)
	return s.URL
}

func get(t *testing.T, url string) (int, []byte, http.Header) {
	t.Helper()
	resp, err := http.Get(url)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	if err != nil {
		return resp.StatusCode, nil, resp.Header
	}
	return resp.StatusCode, b, resp.Header
}

func TestConcurrentFirstRequestsFetchABlobOnce(t *testing.T) {
	up := startUpstream(t)
	_, layer, data := bigLayerImageAndPush(t, up)
	url := startMirror(t, up, time.Minute)
	up.slow.Store(true)
	const clients = 20
	var wg sync.WaitGroup
	sums := make([]string, clients)
	for i := range clients {
		wg.Go(func() {
			_, body, _ := get(t, url+"/v2/"+ocitest.Repo+"/blobs/"+layer)
			s := sha256.Sum256(body)
			sums[i] = hex.EncodeToString(s[:])
		})
	}
	// Every client is waiting on the one upstream fetch: let it go.
	deadline := time.Now().Add(10 * time.Second)
	for up.blobGets.Load() == 0 && time.Now().Before(deadline) {
		time.Sleep(5 * time.Millisecond)
	}
	close(up.unblocked)
	wg.Wait()
	want := sha256.Sum256(data)
	for i, s := range sums {
		if s != hex.EncodeToString(want[:]) {
			t.Errorf("client %d got a different body", i)
		}
	}
	if n := up.blobGets.Load(); n != 1 {
		t.Fatalf("upstream served the blob %d times, want once", n)
	}
	// Later requests come from the cache, ranges too.
	req, _ := http.NewRequest(http.MethodGet, url+"/v2/"+ocitest.Repo+"/blobs/"+layer, nil)
	req.Header.Set("Range", "bytes=0-3")
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	b, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	if resp.StatusCode != http.StatusPartialContent || string(b) != "code" || up.blobGets.Load() != 1 {
		t.Errorf("range from the cache: %d %q, upstream GETs %d", resp.StatusCode, b, up.blobGets.Load())
	}
}

func bigLayerImageAndPush(t *testing.T, up *upstream) (string, string, []byte) {
	t.Helper()
	data := bytes.Repeat([]byte("code module bytes "), 200_000)
	l := static.NewLayer(data, types.OCIUncompressedLayer)
	digest := ocitest.Push(t, up.host, "1.311.72", ocitest.Image(t, l))
	d, _ := l.Digest()
	return digest, d.String(), data
}

func TestManifestsByTagAndDigest(t *testing.T) {
	up := startUpstream(t)
	digest, _, _ := bigLayerImageAndPush(t, up)
	url := startMirror(t, up, time.Hour)
	for _, ref := range []string{"1.311.72", digest} {
		code, body, h := get(t, url+"/v2/"+ocitest.Repo+"/manifests/"+ref)
		sum := sha256.Sum256(body)
		if code != http.StatusOK || "sha256:"+hex.EncodeToString(sum[:]) != digest || h.Get("Docker-Content-Digest") != digest ||
			h.Get("Content-Type") != string(types.OCIManifestSchema1) {
			t.Errorf("%s: %d %s %v", ref, code, h.Get("Docker-Content-Digest"), h)
		}
	}
	// A client (go-containerregistry, as the node uses) pulls through it.
	ref, _ := name.NewTag(strings.TrimPrefix(url, "http://")+"/"+ocitest.Repo+":1.311.72", name.Insecure)
	img, err := remote.Image(ref)
	if err != nil {
		t.Fatal(err)
	}
	if d, _ := img.Digest(); d.String() != digest {
		t.Errorf("pulled %s, want %s", d, digest)
	}
	if code, _, _ := get(t, url+"/v2/"+ocitest.Repo+"/manifests/no-such-tag"); code != http.StatusNotFound {
		t.Errorf("missing tag: %d, want 404", code)
	}
}

func TestBadRequests(t *testing.T) {
	up := startUpstream(t)
	url := startMirror(t, up, time.Minute)
	for path, want := range map[string]int{
		"/v2/" + ocitest.Repo + "/blobs/sha256:../../etc/passwd": http.StatusNotFound, // not a route at all
		"/v2/" + ocitest.Repo + "/blobs/sha256:abc":              http.StatusBadRequest,
		"/v2/" + ocitest.Repo + "/manifests/..":                  http.StatusBadRequest,
		"/v2/UPPER/blobs/sha256:" + strings.Repeat("0", 64):      http.StatusBadRequest,
		"/v2/" + ocitest.Repo + "/tags/list":                     http.StatusNotFound,
	} {
		if code, _, _ := get(t, url+path); code != want {
			t.Errorf("%s: %d, want %d", path, code, want)
		}
	}
	resp, err := http.Post(url+"/v2/"+ocitest.Repo+"/blobs/uploads/", "application/octet-stream", nil)
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusMethodNotAllowed {
		t.Errorf("push: %d, want 405", resp.StatusCode)
	}
}

func TestUpstreamBreakingOffIsNotCached(t *testing.T) {
	up := startUpstream(t)
	_, layer, data := bigLayerImageAndPush(t, up)
	url := startMirror(t, up, time.Minute)
	up.breakOff.Store(true)
	resp, err := http.Get(url + "/v2/" + ocitest.Repo + "/blobs/" + layer)
	if err == nil {
		b, rerr := io.ReadAll(resp.Body)
		resp.Body.Close()
		if rerr == nil && len(b) == len(data) {
			t.Fatal("a broken upstream transfer was served whole")
		}
	}
	// The next request fetches again and gets it all.
	up.breakOff.Store(false)
	code, body, _ := get(t, url+"/v2/"+ocitest.Repo+"/blobs/"+layer)
	if code != http.StatusOK || !bytes.Equal(body, data) {
		t.Fatalf("after the upstream recovered: %d, %d bytes", code, len(body))
	}
}

func TestTagsServeTheLastAnswerWhenUpstreamIsGone(t *testing.T) {
	up := startUpstream(t)
	digest, _, _ := bigLayerImageAndPush(t, up)
	url := startMirror(t, up, time.Nanosecond) // every tag request asks upstream
	if code, _, _ := get(t, url+"/v2/"+ocitest.Repo+"/manifests/1.311.72"); code != http.StatusOK {
		t.Fatal(code)
	}
	up.down.Store(true)
	code, _, h := get(t, url+"/v2/"+ocitest.Repo+"/manifests/1.311.72")
	if code != http.StatusOK || h.Get("Docker-Content-Digest") != digest {
		t.Fatalf("upstream down: %d %s, want the last answer %s", code, h.Get("Docker-Content-Digest"), digest)
	}
	if code, _, _ := get(t, url+"/v2/"+ocitest.Repo+"/manifests/never-asked"); code != http.StatusBadGateway {
		t.Errorf("unknown tag with upstream down: %d, want 502", code)
	}
}
