package provisioner

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"net"
	"net/http"
	"net/url"
	"os"
	"strconv"
	"strings"
	"time"

	"k8s.io/klog/v2"

	"github.com/oneagent-csi/oneagent-csi/internal/idleread"
)

// Tenant routes of the Dynatrace Environment API v1 (DESIGN §2), relative to apiURL.
const (
	RouteLatestMetainfo      = "/v1/deployment/installer/agent/unix/paas/latest/metainfo"
	RouteVersions            = "/v1/deployment/installer/agent/versions/unix/paas"
	RouteVersionPrefix       = "/v1/deployment/installer/agent/unix/paas/version/"
	RouteProcessModuleConfig = "/v1/deployment/installer/agent/processmoduleconfig"
	RouteConnectionInfo      = "/v1/deployment/installer/agent/connectioninfo"
)

// Tenant is the configuration of one tenant (DESIGN §2).
type Tenant struct {
	// Name is a DNS-1035 label; volumes select the tenant by it.
	Name string `json:"name"`
	// APIURL is the tenant's API base, e.g. https://abc12345.live.dynatrace.com/api.
	// Optional when Image is set: the tenant layer (processmoduleconfig)
	// then comes from the module's own configuration.
	APIURL string `json:"apiURL,omitempty"`
	// TokenFile holds the PaaS / InstallerDownload token; read on every request
	// so that a rotated Secret is picked up without a restart.
	TokenFile string `json:"tokenFile"`
	// Version is "latest" (default) or a pinned version.
	Version string `json:"version,omitempty"`
	// Flavor is default (the default), multidistro or musl.
	Flavor string `json:"flavor,omitempty"`
	// CAFile is an optional PEM bundle trusted in addition to the system roots.
	CAFile string `json:"caFile,omitempty"`
	// Proxy is an optional HTTPS proxy URL; empty uses HTTPS_PROXY/NO_PROXY.
	Proxy string `json:"proxy,omitempty"`

	// Image, when set, is where code modules come from instead of the
	// deployment API's ZIP: an OCI reference with a tag or a digest, e.g.
	// registry.example.com/dynatrace/dynatrace-codemodules:1.311.72. Its
	// tag is resolved to a manifest digest like latest (TTL, then
	// stale-while-revalidate); a volume's version pin is another tag.
	Image string `json:"image,omitempty"`
	// PullSecretFile is a kubernetes.io/dockerconfigjson Secret's file for
	// the image's registry and mirrors; re-read on every pull. Empty:
	// anonymous pulls. CAFile and Proxy apply to registries too.
	PullSecretFile string `json:"pullSecretFile,omitempty"`
	// Mirrors are registry hosts (host[:port]) tried in order before the
	// image's own, with the same repository path (a pull-through cache).
	Mirrors []string `json:"mirrors,omitempty"`
	// ImagePath is the code module's directory inside the image. Default
	// opt/dynatrace/oneagent (Dynatrace's code-modules images).
	ImagePath string `json:"imagePath,omitempty"`

	// Namespaces may use this tenant: names and globs such as "team-a-*"
	// (path.Match syntax, no labels). Empty: every namespace, so a
	// single-tenant install works as it is.
	Namespaces []string `json:"namespaces,omitempty"`
	// VersionPins says which versions a volume may pin with its version
	// attribute: ["any"] (the default when empty), ["none"], or a list of
	// versions. "latest" is always allowed (it is no pin).
	VersionPins []string `json:"versionPins,omitempty"`
	// MaxPinnedVersions is the most distinct pinned versions of this tenant
	// in use on a node at once (each up to limits.maxBytes on disk, and
	// exempt from the cache budget while in use). Default 0: no limit.
	MaxPinnedVersions int `json:"maxPinnedVersions,omitempty"`
	// AllowWritable lets volumes of this tenant ask for writable: "true".
	// Default false: refused.
	AllowWritable bool `json:"allowWritable,omitempty"`
	// WritableSize caps a writable volume's upper layer (a quantity such as
	// "64Mi"): it is a tmpfs of this size, so writes beyond it fail with
	// ENOSPC, and its pages count against the writing pod's memory, which
	// kubelet accounts, instead of filling the node's disk. Default 64Mi.
	WritableSize string `json:"writableSize,omitempty"`
}

// ClientOptions tune a tenant client.
type ClientOptions struct {
	// HTTPClient replaces the client built from the tenant's CA and proxy
	// settings. Default: built from the tenant config.
	HTTPClient *http.Client
	// RequestTimeout bounds each metadata request (not downloads, whose
	// bound is the caller's context). Default 30s.
	RequestTimeout time.Duration
	// ConnectTimeout bounds dialling and the TLS handshake. Default 10s.
	ConnectTimeout time.Duration
	// Attempts is how many times a request is tried on 5xx, 429 and network
	// errors. Default 5.
	Attempts int
	// BackoffBase is the first retry delay, doubled each retry with full
	// jitter. Default 500ms.
	BackoffBase time.Duration
	// BackoffMax caps a retry delay, including a server's Retry-After. Default 30s.
	BackoffMax time.Duration
	// UserAgent is sent with every request. Default "oneagent-csi".
	UserAgent string
	// IdleTimeout aborts a download whose read waits this long without a
	// byte (the install retries it), so a stalled tenant cannot hold
	// publishes until DownloadTimeout. Time the consumer spends between
	// reads does not count. Default 60s.
	IdleTimeout time.Duration
}

func (o *ClientOptions) defaults() {
	if o.RequestTimeout == 0 {
		o.RequestTimeout = 30 * time.Second
	}
	if o.ConnectTimeout == 0 {
		o.ConnectTimeout = 10 * time.Second
	}
	if o.Attempts == 0 {
		o.Attempts = 5
	}
	if o.BackoffBase == 0 {
		o.BackoffBase = 500 * time.Millisecond
	}
	if o.BackoffMax == 0 {
		o.BackoffMax = 30 * time.Second
	}
	if o.UserAgent == "" {
		o.UserAgent = "oneagent-csi"
	}
	if o.IdleTimeout == 0 {
		o.IdleTimeout = 60 * time.Second
	}
}

// Client talks to one tenant. It is safe for concurrent use.
type Client struct {
	tenant Tenant
	base   *url.URL
	http   *http.Client
	opts   ClientOptions
}

// HasAPI says whether the tenant has a deployment API (apiURL).
func (c *Client) HasAPI() bool { return c.base != nil }

// NewClient validates the tenant config and builds its client.
func NewClient(t Tenant, opts ClientOptions) (*Client, error) {
	opts.defaults()
	if t.APIURL == "" && t.Image != "" {
		return &Client{tenant: t, opts: opts}, nil // code modules from the image, no API
	}
	u, err := url.Parse(t.APIURL)
	if err != nil || u.Host == "" || (u.Scheme != "https" && u.Scheme != "http") {
		return nil, fmt.Errorf("tenant %q: apiURL %q: must be an absolute http(s) URL", t.Name, t.APIURL)
	}
	if t.TokenFile == "" {
		return nil, fmt.Errorf("tenant %q: tokenFile: must be set", t.Name)
	}
	hc := opts.HTTPClient
	if hc == nil {
		hc, err = newHTTPClient(t, opts)
		if err != nil {
			return nil, err
		}
	}
	u.Path = strings.TrimSuffix(u.Path, "/")
	return &Client{tenant: t, base: u, http: hc, opts: opts}, nil
}

func newHTTPClient(t Tenant, opts ClientOptions) (*http.Client, error) {
	tr := http.DefaultTransport.(*http.Transport).Clone()
	// HTTP/1.1 only, as for registries (registry.Transport): a ZIP read
	// slower than the tenant sends it waits in the socket buffer, not in
	// the process's heap as HTTP/2's flow-control window would have it.
	tr.Protocols = new(http.Protocols)
	tr.Protocols.SetHTTP1(true)
	tr.DialContext = (&net.Dialer{Timeout: opts.ConnectTimeout, KeepAlive: 30 * time.Second}).DialContext
	tr.TLSHandshakeTimeout = opts.ConnectTimeout
	tr.ResponseHeaderTimeout = opts.RequestTimeout
	tr.TLSClientConfig = &tls.Config{MinVersion: tls.VersionTLS12}
	if t.CAFile != "" {
		pem, err := os.ReadFile(t.CAFile)
		if err != nil {
			return nil, fmt.Errorf("tenant %q: caFile: %w", t.Name, err)
		}
		pool, err := x509.SystemCertPool()
		if err != nil || pool == nil {
			pool = x509.NewCertPool()
		}
		if !pool.AppendCertsFromPEM(pem) {
			return nil, fmt.Errorf("tenant %q: caFile %s: no PEM certificate found", t.Name, t.CAFile)
		}
		tr.TLSClientConfig.RootCAs = pool
	}
	if t.Proxy != "" {
		p, err := url.Parse(t.Proxy)
		if err != nil || p.Host == "" {
			return nil, fmt.Errorf("tenant %q: proxy %q: must be an absolute URL", t.Name, t.Proxy)
		}
		tr.Proxy = http.ProxyURL(p)
	}
	return &http.Client{Transport: tr}, nil
}

// Tenant returns the tenant's configuration.
func (c *Client) Tenant() Tenant { return c.tenant }

func (c *Client) token() (string, error) {
	b, err := os.ReadFile(c.tenant.TokenFile)
	if err != nil {
		return "", fmt.Errorf("tenant %q: read token file: %w", c.tenant.Name, err)
	}
	tok := strings.TrimSpace(string(b))
	if tok == "" {
		return "", fmt.Errorf("tenant %q: token file %s is empty", c.tenant.Name, c.tenant.TokenFile)
	}
	return tok, nil
}

// do sends GET route and returns a 200 response, retrying 5xx, 429 and
// network errors with exponential backoff and full jitter (honouring
// Retry-After); 401, 403, 404 and other 4xx are returned at once.
func (c *Client) do(ctx context.Context, route string, query url.Values) (*http.Response, error) {
	return c.doRange(ctx, route, query, "")
}

// doRange is do with a Range header (none when byteRange is empty): a 206
// answer is returned like a 200, and 416 as errRangeRefused.
func (c *Client) doRange(ctx context.Context, route string, query url.Values, byteRange string) (*http.Response, error) {
	if c.base == nil {
		return nil, fmt.Errorf("tenant %q: GET %s: %w: the tenant has no apiURL (code modules come from its image)", c.tenant.Name, route, ErrNotFound)
	}
	u := *c.base
	u.Path += route
	u.RawQuery = query.Encode()
	var lastErr error
	for attempt := 1; ; attempt++ {
		tok, err := c.token()
		if err != nil {
			return nil, err
		}
		req, err := http.NewRequestWithContext(ctx, http.MethodGet, u.String(), nil)
		if err != nil {
			return nil, fmt.Errorf("tenant %q: %w", c.tenant.Name, err)
		}
		req.Header.Set("Authorization", "Api-Token "+tok)
		req.Header.Set("User-Agent", c.opts.UserAgent)
		if byteRange != "" {
			req.Header.Set("Range", byteRange)
		}
		resp, err := c.http.Do(req)
		var wait time.Duration
		switch {
		case err != nil:
			if ctx.Err() != nil {
				return nil, fmt.Errorf("tenant %q: GET %s: %w: %w", c.tenant.Name, route, ErrUnavailable, ctx.Err())
			}
			//nolint:errorlint // the cause is text only: callers classify by ErrUnavailable, not by net or context errors
			lastErr = fmt.Errorf("tenant %q: GET %s: %w: %v", c.tenant.Name, route, ErrUnavailable, err)
		case resp.StatusCode == http.StatusOK, resp.StatusCode == http.StatusPartialContent && byteRange != "":
			return resp, nil
		case resp.StatusCode == http.StatusRequestedRangeNotSatisfiable && byteRange != "":
			_ = resp.Body.Close()
			return nil, fmt.Errorf("tenant %q: GET %s: %w", c.tenant.Name, route, errRangeRefused)
		default:
			apiErr := &APIError{Tenant: c.tenant.Name, Route: route, Status: resp.StatusCode, Body: readSnippet(resp.Body)}
			_ = resp.Body.Close()
			switch {
			case resp.StatusCode == http.StatusUnauthorized || resp.StatusCode == http.StatusForbidden:
				apiErr.kind = ErrUnauthorized
				return nil, apiErr
			case resp.StatusCode == http.StatusNotFound:
				apiErr.kind = ErrNotFound
				return nil, apiErr
			case resp.StatusCode == http.StatusTooManyRequests || resp.StatusCode >= 500:
				apiErr.kind = ErrUnavailable
				lastErr = apiErr
				wait = retryAfter(resp.Header.Get("Retry-After"))
			default:
				apiErr.kind = ErrNotFound
				return nil, apiErr
			}
		}
		if attempt >= c.opts.Attempts {
			return nil, fmt.Errorf("giving up after %d attempts: %w", attempt, lastErr)
		}
		if wait == 0 {
			wait = Backoff(c.opts.BackoffBase, c.opts.BackoffMax, attempt)
		}
		wait = min(wait, c.opts.BackoffMax)
		klog.FromContext(ctx).V(2).Info("retrying tenant request", "tenant", c.tenant.Name, "route", route,
			"attempt", attempt, "wait", wait, "err", lastErr)
		t := time.NewTimer(wait)
		select {
		case <-ctx.Done():
			t.Stop()
			//nolint:errorlint // the last tenant error classifies the failure, not the context
			return nil, fmt.Errorf("%w (while waiting to retry: %v)", lastErr, ctx.Err())
		case <-t.C:
		}
	}
}

// Backoff returns the delay before retry number attempt (1-based):
// a random duration in [0, min(max, base*2^(attempt-1))] ("full jitter").
func Backoff(base, maxDelay time.Duration, attempt int) time.Duration {
	d := base
	for i := 1; i < attempt && d < maxDelay; i++ {
		d *= 2
	}
	d = min(d, maxDelay)
	return time.Duration(rand.Int64N(int64(d) + 1))
}

func retryAfter(v string) time.Duration {
	if v == "" {
		return 0
	}
	if s, err := strconv.Atoi(strings.TrimSpace(v)); err == nil && s >= 0 {
		return time.Duration(s) * time.Second
	}
	if t, err := http.ParseTime(v); err == nil {
		if d := time.Until(t); d > 0 {
			return d
		}
	}
	return 0
}

func readSnippet(r io.Reader) string {
	b, _ := io.ReadAll(io.LimitReader(r, 512))
	return strings.TrimSpace(string(b))
}

func (c *Client) getJSON(ctx context.Context, route string, out any) error {
	ctx, cancel := context.WithTimeout(ctx, (c.opts.RequestTimeout+c.opts.BackoffMax)*time.Duration(c.opts.Attempts))
	defer cancel()
	resp, err := c.do(ctx, route, nil)
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	if err := json.NewDecoder(io.LimitReader(resp.Body, 8<<20)).Decode(out); err != nil {
		return fmt.Errorf("tenant %q: GET %s: decode answer: %w", c.tenant.Name, route, err)
	}
	return nil
}

// LatestVersion asks the tenant for the newest code module version.
func (c *Client) LatestVersion(ctx context.Context) (string, error) {
	var r struct {
		LatestAgentVersion string `json:"latestAgentVersion"`
	}
	if err := c.getJSON(ctx, RouteLatestMetainfo, &r); err != nil {
		return "", err
	}
	if r.LatestAgentVersion == "" {
		return "", fmt.Errorf("tenant %q: GET %s: answer has no latestAgentVersion", c.tenant.Name, RouteLatestMetainfo)
	}
	return r.LatestAgentVersion, nil
}

// Versions lists the code module versions the tenant offers.
func (c *Client) Versions(ctx context.Context) ([]string, error) {
	var r struct {
		AvailableVersions []string `json:"availableVersions"`
	}
	if err := c.getJSON(ctx, RouteVersions, &r); err != nil {
		return nil, err
	}
	return r.AvailableVersions, nil
}

// Property is one setting of the tenant's process module config.
type Property struct {
	Section string `json:"section"`
	Key     string `json:"key"`
	Value   string `json:"value"`
}

// ProcessModuleConfig is the tenant's connection settings for code modules.
type ProcessModuleConfig struct {
	Revision   int64      `json:"revision"`
	Properties []Property `json:"properties"`
}

// ProcessModuleConfig fetches the tenant's process module config.
func (c *Client) ProcessModuleConfig(ctx context.Context) (ProcessModuleConfig, error) {
	var r ProcessModuleConfig
	err := c.getJSON(ctx, RouteProcessModuleConfig, &r)
	return r, err
}

// ConnectionInfo is the tenant's identity and communication endpoints.
type ConnectionInfo struct {
	TenantUUID             string   `json:"tenantUUID"`
	TenantToken            string   `json:"tenantToken"`
	CommunicationEndpoints []string `json:"communicationEndpoints"`
}

// ConnectionInfo fetches the tenant's connection info.
func (c *Client) ConnectionInfo(ctx context.Context) (ConnectionInfo, error) {
	var r ConnectionInfo
	err := c.getJSON(ctx, RouteConnectionInfo, &r)
	return r, err
}

// OpenAgentZip starts the download of a code module ZIP and returns its body
// and length (-1 when unknown). Only reaching a 200 answer is retried; the
// caller retries a body that breaks off. A body that delivers no bytes for
// IdleTimeout fails with an error wrapping ErrUnavailable.
func (c *Client) OpenAgentZip(ctx context.Context, version, flavor, arch string) (io.ReadCloser, int64, error) {
	part, err := c.OpenAgentZipRange(ctx, version, flavor, arch, "")
	return part.Body, part.Size, err
}

// ZipPart is an answer to a code module download.
type ZipPart struct {
	// Body is the answer's body; the caller closes it.
	Body io.ReadCloser
	// Partial is true when the tenant answered the range asked for (206);
	// false when it sent the whole archive (200).
	Partial bool
	// Start is the archive offset of Body's first byte (0 unless Partial).
	Start int64
	// Length is Body's length, -1 when unknown.
	Length int64
	// Size is the whole archive's size, -1 when unknown.
	Size int64
}

// errRangeRefused: the tenant answered 416 to a range request.
var errRangeRefused = errors.New("range not satisfiable")

// OpenAgentZipRange starts the download of a code module ZIP, of the byte
// range byteRange (an HTTP Range value, e.g. "bytes=-131072"; the whole
// archive when empty). A tenant may ignore the range and send the whole
// archive: ZipPart.Partial says which. Retries and the idle timeout are
// OpenAgentZip's.
func (c *Client) OpenAgentZipRange(ctx context.Context, version, flavor, arch, byteRange string) (ZipPart, error) {
	ctx, cancel := context.WithCancelCause(ctx)
	q := url.Values{}
	q.Set("flavor", flavor)
	q.Set("arch", arch)
	q.Set("bitness", "64")
	q.Set("include", "all")
	q.Set("skipMetadata", "true")
	resp, err := c.doRange(ctx, RouteVersionPrefix+url.PathEscape(version), q, byteRange) //nolint:bodyclose // the caller closes it through idleBody
	if err != nil {
		cancel(nil)
		return ZipPart{}, err
	}
	part := ZipPart{Body: newIdleBody(ctx, cancel, resp.Body, c.opts.IdleTimeout, c.tenant.Name), Length: resp.ContentLength, Size: resp.ContentLength}
	if resp.StatusCode == http.StatusPartialContent {
		part.Partial = true
		var last int64
		if _, err := fmt.Sscanf(resp.Header.Get("Content-Range"), "bytes %d-%d/%d", &part.Start, &last, &part.Size); err != nil ||
			part.Start < 0 || last < part.Start || last >= part.Size {
			_ = part.Body.Close()
			return ZipPart{}, fmt.Errorf("tenant %q version %s: partial answer with Content-Range %q: %w",
				c.tenant.Name, version, resp.Header.Get("Content-Range"), errRangeRefused)
		}
		part.Length = last - part.Start + 1
	}
	return part, nil
}

// errIdle is the cause of a download aborted for silence.
var errIdle = errors.New("no bytes received")

// idleBody cancels the request when a read waits for idle without a byte
// (idleread: a consumer that takes its time between reads is not the
// tenant's silence).
type idleBody struct {
	ctx    context.Context
	cancel context.CancelCauseFunc
	body   io.ReadCloser
	idle   time.Duration
	reads  *idleread.Reader
	tenant string
}

func newIdleBody(ctx context.Context, cancel context.CancelCauseFunc, body io.ReadCloser, idle time.Duration, tenant string) *idleBody {
	return &idleBody{ctx: ctx, cancel: cancel, body: body, idle: idle, tenant: tenant,
		reads: idleread.New(body, idle, func() { cancel(errIdle) })}
}

func (b *idleBody) Read(p []byte) (int, error) {
	n, err := b.reads.Read(p)
	if err != nil && errors.Is(context.Cause(b.ctx), errIdle) {
		//nolint:errorlint // the transport's error is text only; ErrUnavailable classifies
		return n, fmt.Errorf("tenant %q: download stalled, %v for %v: %w", b.tenant, errIdle, b.idle, ErrUnavailable)
	}
	return n, err
}

func (b *idleBody) Close() error {
	b.reads.Stop()
	err := b.body.Close()
	b.cancel(nil)
	return err
}

// IsPermanent reports whether err will not go away by retrying soon.
func IsPermanent(err error) bool {
	return errors.Is(err, ErrUnauthorized) || errors.Is(err, ErrNotFound) || errors.Is(err, ErrUnknownTenant)
}
