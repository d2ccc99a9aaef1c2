package provisioner_test

import (
	"context"
	"crypto/x509"
	"errors"
	"io"
	"net/http"
	"os"
	"strings"
	"testing"
	"time"

	"github.com/oneagent-csi/oneagent-csi/provisioner"
	"github.com/oneagent-csi/oneagent-csi/test/faketenant"
	"github.com/oneagent-csi/oneagent-csi/test/harness"
)

// fastRetries keeps retry tests quick while still exercising backoff.
var fastRetries = provisioner.ClientOptions{Attempts: 4, BackoffBase: time.Millisecond, BackoffMax: 20 * time.Millisecond, RequestTimeout: 5 * time.Second}

func startTenant(t *testing.T, opts faketenant.Options) (*faketenant.Server, provisioner.Tenant) {
	return harness.StartTenant(t, opts)
}

func TestClientRoutes(t *testing.T) {
	srv, tenant := startTenant(t, faketenant.Options{})
	c, err := provisioner.NewClient(tenant, fastRetries)
	if err != nil {
		t.Fatal(err)
	}
	ctx := context.Background()
	v, err := c.LatestVersion(ctx)
	if err != nil || v != srv.Latest() {
		t.Fatalf("LatestVersion = %q, %v; want %q", v, err, srv.Latest())
	}
	vs, err := c.Versions(ctx)
	if err != nil || len(vs) != len(faketenant.DefaultVersions) {
		t.Fatalf("Versions = %v, %v", vs, err)
	}
	pmc, err := c.ProcessModuleConfig(ctx)
	if err != nil || pmc.Revision != 1 || len(pmc.Properties) == 0 {
		t.Fatalf("ProcessModuleConfig = %+v, %v", pmc, err)
	}
	ci, err := c.ConnectionInfo(ctx)
	if err != nil || len(ci.CommunicationEndpoints) == 0 {
		t.Fatalf("ConnectionInfo = %+v, %v", ci, err)
	}
	body, n, err := c.OpenAgentZip(ctx, v, "default", "x86")
	if err != nil || n <= 0 {
		t.Fatalf("OpenAgentZip = %d, %v", n, err)
	}
	body.Close()
}

func TestClientRetriesAndErrors(t *testing.T) {
	tests := []struct {
		name      string
		faults    []faketenant.Fault
		wantErr   error
		wantCalls int
	}{
		{"503 twice then ok", []faketenant.Fault{{Kind: faketenant.FaultStatus, Count: 2}}, nil, 3},
		{"500 then ok", []faketenant.Fault{{Kind: faketenant.FaultStatus, Status: 500, Count: 1}}, nil, 2},
		{"429 with Retry-After 0 then ok", []faketenant.Fault{{Kind: faketenant.FaultTooManyRequests, Count: 2}}, nil, 3},
		{"503 forever gives up", []faketenant.Fault{{Kind: faketenant.FaultStatus}}, provisioner.ErrUnavailable, 4},
		{"404 is not retried", []faketenant.Fault{{Kind: faketenant.FaultStatus, Status: 404}}, provisioner.ErrNotFound, 1},
		{"403 is not retried", []faketenant.Fault{{Kind: faketenant.FaultStatus, Status: 403}}, provisioner.ErrUnauthorized, 1},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			srv, tenant := startTenant(t, faketenant.Options{})
			c, err := provisioner.NewClient(tenant, fastRetries)
			if err != nil {
				t.Fatal(err)
			}
			srv.SetFaults(tc.faults...)
			_, err = c.LatestVersion(context.Background())
			if !errors.Is(err, tc.wantErr) || (tc.wantErr == nil) != (err == nil) {
				t.Fatalf("err = %v, want %v", err, tc.wantErr)
			}
			if err != nil && !strings.Contains(err.Error(), `tenant "prod"`) {
				t.Errorf("error %q does not name the tenant", err)
			}
			if got := srv.Requests(faketenant.RouteMetainfo); got != tc.wantCalls {
				t.Errorf("requests = %d, want %d", got, tc.wantCalls)
			}
		})
	}
}

func TestClientHonoursRetryAfter(t *testing.T) {
	srv, tenant := startTenant(t, faketenant.Options{})
	opts := fastRetries
	opts.BackoffMax = 5 * time.Second
	c, err := provisioner.NewClient(tenant, opts)
	if err != nil {
		t.Fatal(err)
	}
	srv.SetFaults(faketenant.Fault{Kind: faketenant.FaultTooManyRequests, RetryAfter: 1, Count: 1})
	start := time.Now()
	if _, err := c.LatestVersion(context.Background()); err != nil {
		t.Fatal(err)
	}
	if waited := time.Since(start); waited < time.Second {
		t.Fatalf("retried after %v, before the 1s Retry-After", waited)
	}
}

func TestClientTokenRotationWithoutRestart(t *testing.T) {
	srv, tenant := startTenant(t, faketenant.Options{})
	c, err := provisioner.NewClient(tenant, fastRetries)
	if err != nil {
		t.Fatal(err)
	}
	srv.SetToken("rotated")
	_, err = c.LatestVersion(context.Background())
	if !errors.Is(err, provisioner.ErrUnauthorized) || !strings.Contains(err.Error(), "401") {
		t.Fatalf("with the old token: err = %v, want 401 unauthorized", err)
	}
	if err := os.WriteFile(tenant.TokenFile, []byte("rotated"), 0o600); err != nil {
		t.Fatal(err)
	}
	if _, err := c.LatestVersion(context.Background()); err != nil {
		t.Fatalf("after rotating the token file: %v", err)
	}
}

func TestClientStallTimesOut(t *testing.T) {
	srv, tenant := startTenant(t, faketenant.Options{})
	opts := fastRetries
	opts.RequestTimeout = 100 * time.Millisecond
	opts.Attempts = 2
	c, err := provisioner.NewClient(tenant, opts)
	if err != nil {
		t.Fatal(err)
	}
	srv.SetFaults(faketenant.Fault{Kind: faketenant.FaultStall})
	_, err = c.LatestVersion(context.Background())
	if !errors.Is(err, provisioner.ErrUnavailable) {
		t.Fatalf("err = %v, want unavailable after stalls", err)
	}
}

func TestClientRequiresTrustedCA(t *testing.T) {
	_, tenant := startTenant(t, faketenant.Options{})
	tenant.CAFile = ""
	c, err := provisioner.NewClient(tenant, provisioner.ClientOptions{Attempts: 1})
	if err != nil {
		t.Fatal(err)
	}
	_, err = c.LatestVersion(context.Background())
	var uae x509.UnknownAuthorityError
	if err == nil || (!errors.As(err, &uae) && !strings.Contains(err.Error(), "certificate")) {
		t.Fatalf("err = %v, want a certificate error", err)
	}
}

func TestNewClientValidation(t *testing.T) {
	tests := []struct {
		name   string
		tenant provisioner.Tenant
		want   string
	}{
		{"relative URL", provisioner.Tenant{Name: "a", APIURL: "abc/api", TokenFile: "/x"}, "apiURL"},
		{"no token file", provisioner.Tenant{Name: "a", APIURL: "https://x/api"}, "tokenFile"},
		{"missing CA", provisioner.Tenant{Name: "a", APIURL: "https://x/api", TokenFile: "/x", CAFile: "/nonexistent"}, "caFile"},
		{"bad proxy", provisioner.Tenant{Name: "a", APIURL: "https://x/api", TokenFile: "/x", Proxy: "::"}, "proxy"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			_, err := provisioner.NewClient(tc.tenant, provisioner.ClientOptions{})
			if err == nil || !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("err = %v, want mention of %s", err, tc.want)
			}
		})
	}
}

func TestProxyIsUsed(t *testing.T) {
	hits := make(chan string, 4)
	proxy := &http.Server{Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		hits <- r.Method + " " + r.Host
		http.Error(w, "no", http.StatusBadGateway)
	})}
	l, err := netListen()
	if err != nil {
		t.Fatal(err)
	}
	go func() { _ = proxy.Serve(l) }()
	t.Cleanup(func() { _ = proxy.Close() })
	_, tenant := startTenant(t, faketenant.Options{})
	tenant.Proxy = "http://" + l.Addr().String()
	c, err := provisioner.NewClient(tenant, provisioner.ClientOptions{Attempts: 1})
	if err != nil {
		t.Fatal(err)
	}
	_, _ = c.LatestVersion(context.Background())
	select {
	case h := <-hits:
		if !strings.HasPrefix(h, "CONNECT ") {
			t.Fatalf("proxy saw %q, want CONNECT", h)
		}
	default:
		t.Fatal("the proxy was not used")
	}
}

// The idle timeout is the tenant's silence while the node waits for bytes,
// not the time the node takes between reads (its disk holding the stream
// back): a slow consumer is not a stalled download.
func TestDownloadIdleCountsOnlyTheTenantsSilence(t *testing.T) {
	const idle = 100 * time.Millisecond
	srv, tenant := startTenant(t, faketenant.Options{ModuleSize: 8 << 20})
	opts := fastRetries
	opts.IdleTimeout = idle
	c, err := provisioner.NewClient(tenant, opts)
	if err != nil {
		t.Fatal(err)
	}
	body, size, err := c.OpenAgentZip(context.Background(), srv.Latest(), "default", "x86")
	if err != nil {
		t.Fatal(err)
	}
	defer body.Close()
	if _, err := io.CopyN(io.Discard, body, 64<<10); err != nil {
		t.Fatal(err)
	}
	time.Sleep(5 * idle) // a slow disk, not synchronisation
	n, err := io.Copy(io.Discard, body)
	if err != nil || 64<<10+n != size {
		t.Fatalf("read %d more bytes of %d after a pause: %v; want the rest of the download", n, size, err)
	}
}

// TestClientSpeaksHTTP1 talks to a tenant that offers HTTP/2, as real
// tenants do: over HTTP/2 a ZIP read slower than it arrives would be
// buffered in the node's heap (up to the stream's 4 MiB window), so every
// request, the download included, must come over HTTP/1.1.
func TestClientSpeaksHTTP1(t *testing.T) {
	srv, tenant := startTenant(t, faketenant.Options{HTTP2: true})
	c, err := provisioner.NewClient(tenant, fastRetries)
	if err != nil {
		t.Fatal(err)
	}
	ctx := context.Background()
	v, err := c.LatestVersion(ctx)
	if err != nil {
		t.Fatal(err)
	}
	body, _, err := c.OpenAgentZip(ctx, v, "default", "x86")
	if err != nil {
		t.Fatal(err)
	}
	_, err = io.Copy(io.Discard, body)
	body.Close()
	if err != nil {
		t.Fatal(err)
	}
	got := srv.Protocols()
	if len(got) != 1 || got["HTTP/1.1"] != 2 {
		t.Fatalf("requests by protocol = %v, want 2 over HTTP/1.1 only", got)
	}
}
