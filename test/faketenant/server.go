// Package faketenant is an HTTPS server that answers the Dynatrace tenant
// routes oneagent-csi uses (DESIGN §2) with synthetic, deterministic code
// modules, and can be told to misbehave (5xx, 429, stalls, truncated or
// corrupted bodies, refused tokens). It runs in tests as a library and as the
// fake-tenant command for demos.
package faketenant

import (
	"context"
	"crypto/sha256"
	"crypto/tls"
	"encoding/hex"
	"encoding/json"
	"encoding/pem"
	"fmt"
	"io"
	"maps"
	"net"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"slices"
	"sort"
	"strconv"
	"strings"
	"sync"
	"time"
)

// Route names used for faults and counters.
const (
	RouteMetainfo   = "metainfo"
	RouteVersions   = "versions"
	RouteDownload   = "download"
	RouteConfig     = "processmoduleconfig"
	RouteConnection = "connectioninfo"
	// RouteDownloadRange is a download asking for a byte range (the end of
	// the ZIP, its central directory): counted and faulted apart from
	// whole downloads.
	RouteDownloadRange = "download-range"
)

// FaultKind is a way to misbehave.
type FaultKind string

const (
	// FaultStatus answers with Fault.Status (default 503).
	FaultStatus FaultKind = "status"
	// FaultTooManyRequests answers 429 with Retry-After: Fault.RetryAfter seconds.
	FaultTooManyRequests FaultKind = "429"
	// FaultStall sends nothing until the client gives up or Fault.Stall passes.
	FaultStall FaultKind = "stall"
	// FaultTruncate sends half the body of a download, then closes.
	FaultTruncate FaultKind = "truncate"
	// FaultCorrupt flips bytes in the middle of a download (length unchanged).
	FaultCorrupt FaultKind = "corrupt"
	// FaultCorruptEnd flips bytes at the end of a download (its central
	// directory), length unchanged: another archive than the range
	// requests saw.
	FaultCorruptEnd FaultKind = "corrupt-end"
	// FaultOtherArchive answers a download with the ZIP of Fault.Version
	// instead, without a Content-Length: another archive than the range
	// requests saw, as from a tenant that builds its archives per request.
	FaultOtherArchive FaultKind = "other-archive"
	// FaultSlow sends a download at Fault.Rate bytes per second.
	FaultSlow FaultKind = "slow"
	// FaultStallBody sends the headers and half the body of a download, then
	// nothing until the client gives up or Fault.Stall passes (default an
	// hour), then breaks the connection.
	FaultStallBody FaultKind = "stall-body"
)

// Fault makes the next Count requests to Route (all routes when empty)
// misbehave; Count 0 means until cleared.
type Fault struct {
	Kind       FaultKind
	Route      string
	Count      int
	Status     int
	RetryAfter int
	Stall      time.Duration
	Rate       int64
	Version    string
}

// Options configure a Server.
type Options struct {
	// Token is the API token accepted. Default "fake-paas-token".
	Token string
	// Versions offered, oldest first; the last is "latest". Default two versions.
	Versions []string
	// ModuleSize is the approximate ZIP size. Default 256 KiB.
	ModuleSize int64
	// VersionSizes overrides ModuleSize for some versions.
	VersionSizes map[string]int64
	// ExtraFiles are added to every module (e.g. a real liboneagentproc.so).
	ExtraFiles map[string][]byte
	// CacheDir keeps generated modules between runs (keyed by spec). Default: a
	// temporary dir removed by Close.
	CacheDir string
	// Addr to listen on. Default 127.0.0.1:0.
	Addr string
	// Certificate is served instead of httptest's (which names only
	// 127.0.0.1, ::1 and example.com): for an Addr clients reach by another
	// name. Clients then trust its issuer, not CAPEM.
	Certificate *tls.Certificate
	// Latency is added to every answer.
	Latency time.Duration
	// NoRange ignores Range headers and answers every download with the
	// whole ZIP (200), like a tenant behind a proxy that strips them.
	NoRange bool
	// HTTP2 offers HTTP/2 in the TLS handshake, as real tenants do. Off by
	// default: the faults that break a connection need HTTP/1.1.
	HTTP2 bool
}

// DefaultVersions are offered when Options.Versions is empty.
var DefaultVersions = []string{"1.309.66.20250301-101500", "1.311.72.20250410-123003"}

// Server is a running fake tenant.
type Server struct {
	// URL is the API base to configure as apiURL (https://127.0.0.1:port/api).
	URL string

	srv      *httptest.Server
	opts     Options
	ownCache bool

	mu          sync.Mutex
	token       string
	versions    []string
	revision    int64
	faults      []Fault
	requests    map[string]int
	protocols   map[string]int // requests by protocol ("HTTP/1.1", "HTTP/2.0")
	downloads   map[string]int
	generateMux sync.Mutex
	files       map[string]string // version -> a ZIP served as it is
	modules     map[string]string
}

// Start starts a fake tenant over HTTPS on loopback.
func Start(opts Options) (*Server, error) {
	if opts.Token == "" {
		opts.Token = "fake-paas-token"
	}
	if len(opts.Versions) == 0 {
		opts.Versions = DefaultVersions
	}
	if opts.ModuleSize == 0 {
		opts.ModuleSize = 256 << 10
	}
	s := &Server{opts: opts, token: opts.Token, versions: append([]string(nil), opts.Versions...), revision: 1,
		requests: map[string]int{}, protocols: map[string]int{}, downloads: map[string]int{}, modules: map[string]string{}}
	if opts.CacheDir == "" {
		dir, err := os.MkdirTemp("", "faketenant-")
		if err != nil {
			return nil, err
		}
		s.opts.CacheDir, s.ownCache = dir, true
	} else if err := os.MkdirAll(opts.CacheDir, 0o755); err != nil {
		return nil, err
	}
	s.srv = httptest.NewUnstartedServer(http.HandlerFunc(s.serve))
	if opts.Addr != "" {
		l, err := net.Listen("tcp", opts.Addr)
		if err != nil {
			return nil, err
		}
		_ = s.srv.Listener.Close()
		s.srv.Listener = l
	}
	if opts.Certificate != nil {
		s.srv.TLS = &tls.Config{Certificates: []tls.Certificate{*opts.Certificate}, MinVersion: tls.VersionTLS12}
	}
	s.srv.EnableHTTP2 = opts.HTTP2
	s.srv.StartTLS()
	s.URL = s.srv.URL + "/api"
	return s, nil
}

// Close stops the server and removes its own cache dir.
func (s *Server) Close() {
	s.srv.CloseClientConnections()
	s.srv.Close()
	if s.ownCache {
		_ = os.RemoveAll(s.opts.CacheDir)
	}
}

// CAPEM is the PEM of the certificate clients must trust.
func (s *Server) CAPEM() []byte {
	return pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: s.srv.Certificate().Raw})
}

// WriteCA writes CAPEM to path.
func (s *Server) WriteCA(path string) error { return os.WriteFile(path, s.CAPEM(), 0o644) }

// Token is the accepted token.
func (s *Server) Token() string { s.mu.Lock(); defer s.mu.Unlock(); return s.token }

// SetToken changes the accepted token (simulates rotation or revocation).
func (s *Server) SetToken(t string) { s.mu.Lock(); s.token = t; s.mu.Unlock() }

// Latest is the version metainfo answers.
func (s *Server) Latest() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.versions[len(s.versions)-1]
}

// AddVersion offers v as the new latest version.
func (s *Server) AddVersion(v string) { s.mu.Lock(); s.versions = append(s.versions, v); s.mu.Unlock() }

// SetRevision changes the processmoduleconfig revision.
func (s *Server) SetRevision(r int64) { s.mu.Lock(); s.revision = r; s.mu.Unlock() }

// SetFaults replaces the active faults; none clears them.
func (s *Server) SetFaults(f ...Fault) { s.mu.Lock(); s.faults = f; s.mu.Unlock() }

// Requests returns how many requests reached route.
func (s *Server) Requests(route string) int {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.requests[route]
}

// Protocols returns how many requests came over each protocol version
// ("HTTP/1.1", "HTTP/2.0").
func (s *Server) Protocols() map[string]int {
	s.mu.Lock()
	defer s.mu.Unlock()
	return maps.Clone(s.protocols)
}

// Downloads returns how many complete module downloads of version were served.
func (s *Server) Downloads(version string) int {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.downloads[version]
}

// ProcessModuleConfig is what the tenant answers on processmoduleconfig.
func (s *Server) ProcessModuleConfig() map[string]any {
	s.mu.Lock()
	rev := s.revision
	s.mu.Unlock()
	return map[string]any{"revision": rev, "properties": []map[string]string{
		{"section": "general", "key": "tenant", "value": "fake-tenant-uuid"},
		{"section": "general", "key": "tenantToken", "value": "fake-tenant-token-" + strconv.FormatInt(rev, 10)},
		{"section": "general", "key": "serverAddress", "value": "{" + s.srv.URL + "/communication}"},
	}}
}

// ServeModuleFile serves the file at path as version's ZIP (for hostile or
// hand-made archives).
func (s *Server) ServeModuleFile(version, path string) {
	s.generateMux.Lock()
	defer s.generateMux.Unlock()
	if s.files == nil {
		s.files = map[string]string{}
	}
	s.files[version] = path
}

// ModulePath generates (once) and returns the file of a version's ZIP.
func (s *Server) ModulePath(version string) (string, error) {
	s.generateMux.Lock()
	if p, ok := s.files[version]; ok {
		s.generateMux.Unlock()
		return p, nil
	}
	s.generateMux.Unlock()
	spec := ModuleSpec{Version: version, Size: s.opts.ModuleSize, ExtraFiles: s.opts.ExtraFiles}
	if size, ok := s.opts.VersionSizes[version]; ok {
		spec.Size = size
	}
	key := specKey(spec)
	s.generateMux.Lock()
	defer s.generateMux.Unlock()
	if p, ok := s.modules[key]; ok {
		return p, nil
	}
	p := filepath.Join(s.opts.CacheDir, key+".zip")
	if _, err := os.Stat(p); err != nil {
		tmp := p + ".tmp"
		f, err := os.Create(tmp)
		if err != nil {
			return "", err
		}
		if err := WriteModule(f, spec); err != nil {
			_ = f.Close()
			_ = os.Remove(tmp)
			return "", err
		}
		if err := f.Close(); err != nil {
			return "", err
		}
		if err := os.Rename(tmp, p); err != nil {
			return "", err
		}
	}
	s.modules[key] = p
	return p, nil
}

func specKey(spec ModuleSpec) string {
	h := sha256.New()
	fmt.Fprintf(h, "v2|%s|%d|", spec.Version, spec.Size)
	names := make([]string, 0, len(spec.ExtraFiles))
	for n := range spec.ExtraFiles {
		names = append(names, n)
	}
	sort.Strings(names)
	for _, n := range names {
		fmt.Fprintf(h, "%s|%x|", n, sha256.Sum256(spec.ExtraFiles[n]))
	}
	return spec.Version + "-" + strconv.FormatInt(spec.Size, 10) + "-" + hex.EncodeToString(h.Sum(nil))[:12]
}

func routeOf(path string) (string, string) {
	p := strings.TrimPrefix(path, "/api/v1/deployment/installer/agent")
	switch {
	case p == "/unix/paas/latest/metainfo":
		return RouteMetainfo, ""
	case p == "/versions/unix/paas":
		return RouteVersions, ""
	case strings.HasPrefix(p, "/unix/paas/version/"):
		return RouteDownload, strings.TrimPrefix(p, "/unix/paas/version/")
	case p == "/processmoduleconfig":
		return RouteConfig, ""
	case p == "/connectioninfo":
		return RouteConnection, ""
	}
	return "", ""
}

// takeFault returns the fault that applies to this request, consuming one
// use of it.
func (s *Server) takeFault(route string) *Fault {
	s.mu.Lock()
	defer s.mu.Unlock()
	for i := range s.faults {
		f := &s.faults[i]
		if f.Route != "" && f.Route != route {
			continue
		}
		out := *f
		if f.Count > 0 {
			f.Count--
			if f.Count == 0 {
				s.faults = append(s.faults[:i], s.faults[i+1:]...)
			}
		}
		return &out
	}
	return nil
}

func (s *Server) serve(w http.ResponseWriter, r *http.Request) {
	route, arg := routeOf(r.URL.Path)
	if route == RouteDownload && r.Header.Get("Range") != "" && !s.opts.NoRange {
		route = RouteDownloadRange
	}
	if route == "" || r.Method != http.MethodGet {
		http.Error(w, `{"error":{"code":404,"message":"not found"}}`, http.StatusNotFound)
		return
	}
	s.mu.Lock()
	s.requests[route]++
	s.protocols[r.Proto]++
	token := s.token
	versions := append([]string(nil), s.versions...)
	s.mu.Unlock()
	if s.opts.Latency > 0 {
		time.Sleep(s.opts.Latency)
	}
	if r.Header.Get("Authorization") != "Api-Token "+token {
		http.Error(w, `{"error":{"code":401,"message":"Token Authentication failed"}}`, http.StatusUnauthorized)
		return
	}
	fault := s.takeFault(route)
	if fault != nil {
		switch fault.Kind {
		case FaultStatus:
			code := fault.Status
			if code == 0 {
				code = http.StatusServiceUnavailable
			}
			http.Error(w, `{"error":{"code":`+strconv.Itoa(code)+`,"message":"injected fault"}}`, code)
			return
		case FaultTooManyRequests:
			w.Header().Set("Retry-After", strconv.Itoa(fault.RetryAfter))
			http.Error(w, `{"error":{"code":429,"message":"rate limited"}}`, http.StatusTooManyRequests)
			return
		case FaultStall:
			d := fault.Stall
			if d == 0 {
				d = time.Hour
			}
			t := time.NewTimer(d)
			defer t.Stop()
			select {
			case <-r.Context().Done():
			case <-t.C:
			}
			http.Error(w, "stalled", http.StatusGatewayTimeout)
			return
		}
	}
	switch route {
	case RouteMetainfo:
		writeJSON(w, map[string]string{"latestAgentVersion": versions[len(versions)-1]})
	case RouteVersions:
		writeJSON(w, map[string][]string{"availableVersions": versions})
	case RouteConfig:
		writeJSON(w, s.ProcessModuleConfig())
	case RouteConnection:
		writeJSON(w, map[string]any{"tenantUUID": "fake-tenant-uuid", "tenantToken": "fake-tenant-token",
			"communicationEndpoints": []string{s.srv.URL + "/communication"}})
	case RouteDownload:
		s.serveDownload(w, r, arg, versions, fault)
	case RouteDownloadRange:
		s.serveRange(w, r, arg, versions)
	}
}

// openModule opens version's ZIP, or answers 500 and returns false.
func (s *Server) openModule(w http.ResponseWriter, version string) (*os.File, bool) {
	p, err := s.ModulePath(version)
	if err == nil {
		var f *os.File
		if f, err = os.Open(p); err == nil {
			return f, true
		}
	}
	http.Error(w, err.Error(), http.StatusInternalServerError)
	return nil, false
}

// serveRange answers a range of a version's ZIP (http.ServeContent's
// handling of Range, If-Range and 416).
func (s *Server) serveRange(w http.ResponseWriter, r *http.Request, version string, versions []string) {
	if !slices.Contains(versions, version) {
		http.Error(w, `{"error":{"code":404,"message":"version not found"}}`, http.StatusNotFound)
		return
	}
	f, ok := s.openModule(w, version)
	if !ok {
		return
	}
	defer f.Close()
	w.Header().Set("Content-Type", "application/zip")
	http.ServeContent(w, r, "", time.Time{}, f)
}

func (s *Server) serveDownload(w http.ResponseWriter, r *http.Request, version string, versions []string, fault *Fault) {
	if !slices.Contains(versions, version) {
		http.Error(w, `{"error":{"code":404,"message":"version not found"}}`, http.StatusNotFound)
		return
	}
	if fault != nil && fault.Kind == FaultOtherArchive {
		version = fault.Version
	}
	f, ok := s.openModule(w, version)
	if !ok {
		return
	}
	defer f.Close()
	st, _ := f.Stat()
	size := st.Size()
	w.Header().Set("Content-Type", "application/zip")
	if fault == nil || fault.Kind != FaultOtherArchive {
		// An archive built per request has no length up front.
		w.Header().Set("Content-Length", strconv.FormatInt(size, 10))
	}
	w.WriteHeader(http.StatusOK)
	var body io.Reader = f
	if fault != nil && fault.Kind == FaultTruncate {
		body = io.LimitReader(f, size/2)
	}
	if fault != nil && fault.Kind == FaultCorrupt {
		body = &corruptReader{r: f, at: size / 2}
	}
	if fault != nil && fault.Kind == FaultCorruptEnd {
		body = &corruptReader{r: f, at: max(size-40, 0)}
	}
	if fault != nil && fault.Kind == FaultSlow {
		body = &slowReader{r: body, rate: max(fault.Rate, 1024), ctx: r.Context()}
	}
	if fault != nil && fault.Kind == FaultStallBody {
		d := fault.Stall
		if d == 0 {
			d = time.Hour
		}
		body = io.MultiReader(io.LimitReader(f, size/2), &stallReader{w: w, ctx: r.Context(), d: d})
	}
	n, err := io.Copy(w, body)
	if err == nil && n == size {
		s.mu.Lock()
		s.downloads[version]++
		s.mu.Unlock()
	}
	if n < size {
		// Make the short body visible to the client as a broken connection.
		if hj, ok := w.(http.Hijacker); ok {
			if c, _, err := hj.Hijack(); err == nil {
				_ = c.Close()
			}
		}
	}
}

type corruptReader struct {
	r   io.Reader
	off int64
	at  int64
}

func (c *corruptReader) Read(p []byte) (int, error) {
	n, err := c.r.Read(p)
	for i := 0; i < n; i++ {
		if pos := c.off + int64(i); pos >= c.at && pos < c.at+64 {
			p[i] ^= 0xA5
		}
	}
	c.off += int64(n)
	return n, err
}

func writeJSON(w http.ResponseWriter, v any) {
	w.Header().Set("Content-Type", "application/json")
	_ = json.NewEncoder(w).Encode(v)
}

// slowReader paces reads to rate bytes per second.
type slowReader struct {
	r     io.Reader
	rate  int64
	ctx   interface{ Done() <-chan struct{} }
	start time.Time
	sent  int64
}

// Read keeps the bytes sent at most rate per second since the first read,
// whatever buffer size the caller uses.
func (s *slowReader) Read(p []byte) (int, error) {
	if s.start.IsZero() {
		s.start = time.Now()
	}
	p = p[:min(int64(len(p)), max(s.rate/10, 1))]
	due := s.start.Add(time.Duration(float64(s.sent+int64(len(p))) / float64(s.rate) * float64(time.Second)))
	if wait := time.Until(due); wait > 0 {
		t := time.NewTimer(wait)
		defer t.Stop()
		select {
		case <-s.ctx.Done():
			return 0, io.ErrUnexpectedEOF
		case <-t.C:
		}
	}
	n, err := s.r.Read(p)
	s.sent += int64(n)
	return n, err
}

// stallReader flushes what was written, then blocks until ctx ends or d
// passes, then reports the end of the data.
type stallReader struct {
	w   http.ResponseWriter
	ctx context.Context
	d   time.Duration
}

func (s *stallReader) Read([]byte) (int, error) {
	if f, ok := s.w.(http.Flusher); ok {
		f.Flush()
	}
	t := time.NewTimer(s.d)
	defer t.Stop()
	select {
	case <-s.ctx.Done():
	case <-t.C:
	}
	return 0, io.EOF
}
