// Package mirror is a pull-through cache of one upstream registry for
// code-module images (`oneagent-csi mirror`), run once per cluster and
// listed in the tenants' mirrors. Unlike distribution's proxy mode, it
// coalesces concurrent first requests: however many nodes ask for a blob
// at once, it is fetched from upstream once, and every request streams
// from the copy being written. It serves the pull side of the registry API
// only (GET and HEAD of /v2/, manifests and blobs).
package mirror

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"os"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/google/go-containerregistry/pkg/name"
	"github.com/google/go-containerregistry/pkg/v1/remote"
	"github.com/google/go-containerregistry/pkg/v1/remote/transport"
	"k8s.io/klog/v2"

	"github.com/oneagent-csi/oneagent-csi/provisioner/registry"
)

// Options of a Mirror.
type Options struct {
	// Upstream is the registry cached: host[:port] (TLS). Required.
	Upstream string
	// Dir holds the cached blobs and manifests. Required.
	Dir string
	// PullSecretFile is a dockerconfigjson with the upstream's
	// credentials, re-read on every upstream request. Empty: anonymous.
	PullSecretFile string
	// CAFile is a PEM bundle trusted for the upstream besides the system
	// roots.
	CAFile string
	// TagTTL is how long a tag's answer is reused before upstream is asked
	// again; when upstream cannot be asked, the last answer is served.
	// Default 1m.
	TagTTL time.Duration
	// FetchTimeout bounds one upstream blob fetch. Default 30m.
	FetchTimeout time.Duration
	// Transport to upstream. Default: built from CAFile.
	Transport http.RoundTripper
	// Now is the clock. Default time.Now.
	Now func() time.Time
}

// Mirror serves the registry pull API from its cache, filling it from
// upstream.
type Mirror struct {
	o   Options
	reg name.Registry

	mu       sync.Mutex
	inflight map[string]*fetch
	tags     map[string]tagEntry
}

type tagEntry struct {
	digest string
	at     time.Time
}

// New validates o and prepares the cache dir.
func New(o Options) (*Mirror, error) {
	reg, err := name.NewRegistry(strings.TrimPrefix(o.Upstream, "https://"), name.StrictValidation)
	if err != nil || o.Upstream == "" {
		return nil, fmt.Errorf("upstream %q: not a registry host[:port]", o.Upstream)
	}
	if o.Dir == "" {
		return nil, errors.New("dir: required")
	}
	if o.TagTTL == 0 {
		o.TagTTL = time.Minute
	}
	if o.FetchTimeout == 0 {
		o.FetchTimeout = 30 * time.Minute
	}
	if o.Now == nil {
		o.Now = time.Now
	}
	if o.Transport == nil {
		t, err := registry.Transport(o.CAFile, "")
		if err != nil {
			return nil, err
		}
		o.Transport = t
	}
	for _, d := range []string{"blobs", "manifests", "tmp"} {
		if err := os.MkdirAll(filepath.Join(o.Dir, d), 0o755); err != nil {
			return nil, err
		}
	}
	// Partial fetches of a previous run are not resumed.
	entries, _ := os.ReadDir(filepath.Join(o.Dir, "tmp"))
	for _, e := range entries {
		_ = os.RemoveAll(filepath.Join(o.Dir, "tmp", e.Name()))
	}
	return &Mirror{o: o, reg: reg, inflight: map[string]*fetch{}, tags: map[string]tagEntry{}}, nil
}

var (
	routeRe  = regexp.MustCompile(`^/v2/(.+)/(manifests|blobs)/([^/]+)$`)
	digestRe = regexp.MustCompile(`^sha256:[a-f0-9]{64}$`)
	tagRe    = regexp.MustCompile(`^[A-Za-z0-9_][A-Za-z0-9._-]{0,127}$`)
)

// ServeHTTP implements the pull side of the distribution API.
func (m *Mirror) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	w.Header().Set("Docker-Distribution-API-Version", "registry/2.0")
	if r.Method != http.MethodGet && r.Method != http.MethodHead {
		apiError(w, http.StatusMethodNotAllowed, "UNSUPPORTED", "this mirror only serves pulls")
		return
	}
	if r.URL.Path == "/v2/" || r.URL.Path == "/v2" {
		_, _ = w.Write([]byte("{}"))
		return
	}
	match := routeRe.FindStringSubmatch(r.URL.Path)
	if match == nil {
		apiError(w, http.StatusNotFound, "UNSUPPORTED", "not a manifest or blob path")
		return
	}
	repo, kind, ref := match[1], match[2], match[3]
	if _, err := name.NewRepository(m.reg.RegistryStr()+"/"+repo, name.StrictValidation); err != nil {
		apiError(w, http.StatusBadRequest, "NAME_INVALID", err.Error())
		return
	}
	if kind == "blobs" {
		if !digestRe.MatchString(ref) {
			apiError(w, http.StatusBadRequest, "DIGEST_INVALID", "want sha256:<64 hex>")
			return
		}
		m.serveBlob(w, r, repo, ref)
		return
	}
	if !digestRe.MatchString(ref) && !tagRe.MatchString(ref) {
		apiError(w, http.StatusBadRequest, "TAG_INVALID", "not a tag or sha256 digest")
		return
	}
	m.serveManifest(w, r, repo, ref)
}

func apiError(w http.ResponseWriter, status int, code, msg string) {
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(status)
	_ = json.NewEncoder(w).Encode(map[string]any{"errors": []map[string]string{{"code": code, "message": msg}}})
}

// upstreamError answers a failed upstream call with its status when it
// has one (404, 401), else 502.
func upstreamError(w http.ResponseWriter, err error) {
	var te *transport.Error
	if errors.As(err, &te) && te.StatusCode >= 400 && te.StatusCode < 500 {
		code := "UNKNOWN"
		if len(te.Errors) > 0 {
			code = string(te.Errors[0].Code)
		}
		apiError(w, te.StatusCode, code, "upstream: "+err.Error())
		return
	}
	apiError(w, http.StatusBadGateway, "UNAVAILABLE", "upstream: "+err.Error())
}

func (m *Mirror) options(ctx context.Context) ([]remote.Option, error) {
	keys, err := registry.ReadKeychain(m.o.PullSecretFile)
	if err != nil {
		return nil, err
	}
	// One attempt: the node's puller retries, and a tag is answered from
	// the last answer at once when upstream fails.
	return []remote.Option{remote.WithContext(ctx), remote.WithTransport(m.o.Transport), remote.WithAuthFromKeychain(keys),
		remote.WithRetryBackoff(remote.Backoff{Steps: 1})}, nil
}

// manifestFiles are the cached manifest and its media type.
func (m *Mirror) manifestFiles(digest string) (string, string) {
	p := filepath.Join(m.o.Dir, "manifests", strings.TrimPrefix(digest, "sha256:"))
	return p, p + ".type"
}

func (m *Mirror) serveManifest(w http.ResponseWriter, r *http.Request, repo, ref string) {
	digest := ref
	if !digestRe.MatchString(ref) {
		key := repo + ":" + ref
		m.mu.Lock()
		e, known := m.tags[key]
		m.mu.Unlock()
		if !known || m.o.Now().Sub(e.at) > m.o.TagTTL {
			d, err := m.fetchManifest(r.Context(), repo, ref)
			switch {
			case err == nil:
				e = tagEntry{digest: d, at: m.o.Now()}
				m.mu.Lock()
				m.tags[key] = e
				m.mu.Unlock()
			case known:
				klog.FromContext(r.Context()).Info("upstream did not answer for a tag, serving the last answer", "repo", repo, "tag", ref, "digest", e.digest, "err", err.Error())
			default:
				upstreamError(w, err)
				return
			}
		}
		digest = e.digest
	}
	path, typePath := m.manifestFiles(digest)
	body, err := os.ReadFile(path)
	if errors.Is(err, os.ErrNotExist) {
		if _, err = m.fetchManifest(r.Context(), repo, digest); err != nil {
			upstreamError(w, err)
			return
		}
		body, err = os.ReadFile(path)
	}
	if err != nil {
		apiError(w, http.StatusInternalServerError, "UNKNOWN", err.Error())
		return
	}
	mt, _ := os.ReadFile(typePath)
	w.Header().Set("Content-Type", string(mt))
	w.Header().Set("Docker-Content-Digest", digest)
	w.Header().Set("Content-Length", strconv.Itoa(len(body)))
	if r.Method == http.MethodGet {
		_, _ = w.Write(body)
	}
}

// fetchManifest gets repo:ref from upstream, stores it by digest and
// returns the digest.
func (m *Mirror) fetchManifest(ctx context.Context, repo, ref string) (string, error) {
	sep := ":"
	if digestRe.MatchString(ref) {
		sep = "@"
	}
	r, err := name.ParseReference(m.reg.RegistryStr()+"/"+repo+sep+ref, name.StrictValidation)
	if err != nil {
		return "", err
	}
	opts, err := m.options(ctx)
	if err != nil {
		return "", err
	}
	desc, err := remote.Get(r, opts...)
	if err != nil {
		return "", err
	}
	digest := desc.Digest.String()
	if sep == "@" && digest != ref {
		return "", fmt.Errorf("upstream answered %s for %s", digest, ref)
	}
	path, typePath := m.manifestFiles(digest)
	if err := writeAtomic(filepath.Join(m.o.Dir, "tmp"), typePath, []byte(desc.MediaType)); err != nil {
		return "", err
	}
	if err := writeAtomic(filepath.Join(m.o.Dir, "tmp"), path, desc.Manifest); err != nil {
		return "", err
	}
	return digest, nil
}

func writeAtomic(tmpDir, path string, data []byte) error {
	f, err := os.CreateTemp(tmpDir, "write-")
	if err != nil {
		return err
	}
	if _, err := f.Write(data); err != nil {
		_ = f.Close()
		_ = os.Remove(f.Name())
		return err
	}
	if err := f.Close(); err != nil {
		_ = os.Remove(f.Name())
		return err
	}
	return os.Rename(f.Name(), path)
}

// Handler is the mirror with a request log line per request.
func (m *Mirror) Handler() http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		start := time.Now()
		rec := &statusRecorder{ResponseWriter: w, status: http.StatusOK}
		m.ServeHTTP(rec, r)
		klog.V(2).InfoS("request", "method", r.Method, "path", r.URL.Path, "status", rec.status, "bytes", rec.bytes, "took", time.Since(start).Round(time.Millisecond))
	})
}

type statusRecorder struct {
	http.ResponseWriter
	status int
	bytes  int64
}

func (s *statusRecorder) WriteHeader(code int) { s.status = code; s.ResponseWriter.WriteHeader(code) }
func (s *statusRecorder) Write(b []byte) (int, error) {
	n, err := s.ResponseWriter.Write(b)
	s.bytes += int64(n)
	return n, err
}

var _ io.Writer = (*statusRecorder)(nil)
