package provisioner_test

import (
	"context"
	"errors"
	"sync"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/oneagent-csi/oneagent-csi/provisioner"
	"github.com/oneagent-csi/oneagent-csi/test/faketenant"
	"github.com/oneagent-csi/oneagent-csi/test/harness"
)

// fakeClock is a clock tests move by hand.
type fakeClock struct {
	mu  sync.Mutex
	now time.Time
}

func (c *fakeClock) Now() time.Time      { c.mu.Lock(); defer c.mu.Unlock(); return c.now }
func (c *fakeClock) Add(d time.Duration) { c.mu.Lock(); c.now = c.now.Add(d); c.mu.Unlock() }

// prepareQuickly calls Prepare with a generous deadline and fails when it
// waited for the tenant: a blackholed tenant answers nothing, so a publish
// that asks it waits until its deadline.
func prepareQuickly(t *testing.T, p *provisioner.Provisioner, pin string) provisioner.Prepared {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	start := time.Now()
	prep, err := p.Prepare(ctx, "prod", pin)
	if err != nil {
		t.Fatalf("Prepare with the tenant blackholed: %v", err)
	}
	if waited := time.Since(start); waited > 2*time.Second {
		t.Fatalf("Prepare waited %v for a blackholed tenant, want the cached module at once", waited)
	}
	return prep
}

// With the module cached, a blackholed tenant costs a publish nothing once
// latestTTL and the config TTL have passed: the last resolution and config
// are served at once and refreshed in the background, with backoff.
func TestBlackholedTenantServesTheCacheAtOnce(t *testing.T) {
	clock := &fakeClock{now: time.Unix(1_800_000_000, 0)}
	f := newFixture(t, func(o *provisioner.Options) {
		o.Now = clock.Now
		o.LatestTTL, o.ConfigTTL, o.RefreshBackoff = time.Minute, time.Minute, 30*time.Second
	})
	first, err := f.prov.Prepare(context.Background(), "prod", "")
	if err != nil {
		t.Fatal(err)
	}
	pinned, err := f.prov.Prepare(context.Background(), "prod", faketenant.DefaultVersions[0])
	if err != nil {
		t.Fatal(err)
	}
	f.srv.SetFaults(faketenant.Fault{Kind: faketenant.FaultStall}) // accept, never answer
	clock.Add(2 * time.Minute)
	metainfo, config := f.srv.Requests(faketenant.RouteMetainfo), f.srv.Requests(faketenant.RouteConfig)
	for range 20 {
		if prep := prepareQuickly(t, f.prov, ""); prep.Artifact.ID != first.Artifact.ID || prep.Layer.Rev != first.Layer.Rev {
			t.Fatalf("served %+v, want the cached %+v", prep, first)
		}
		if prep := prepareQuickly(t, f.prov, faketenant.DefaultVersions[0]); prep.Layer.Rev != pinned.Layer.Rev {
			t.Fatalf("pinned: served layer %s, want the cached %s", prep.Layer.Rev, pinned.Layer.Rev)
		}
	}
	// One background refresh each, however many publishes.
	harness.Eventually(t, 5*time.Second, "background refreshes", func() bool {
		return f.srv.Requests(faketenant.RouteMetainfo) > metainfo && f.srv.Requests(faketenant.RouteConfig) > config
	})
	if m, c := f.srv.Requests(faketenant.RouteMetainfo)-metainfo, f.srv.Requests(faketenant.RouteConfig)-config; m != 1 || c != 1 {
		t.Fatalf("20 publishes sent %d metainfo and %d config requests to the sick tenant, want 1 each", m, c)
	}
}

// After a failed refresh the next one waits for the backoff.
func TestFailedRefreshBacksOff(t *testing.T) {
	clock := &fakeClock{now: time.Unix(1_800_000_000, 0)}
	reg := prometheus.NewRegistry()
	f := newFixture(t, func(o *provisioner.Options) {
		o.Now = clock.Now
		o.Registerer = reg
		o.LatestTTL, o.RefreshBackoff = time.Minute, time.Minute
		o.Client.Attempts = 1
	})
	if _, err := f.prov.ResolveVersion(context.Background(), "prod", ""); err != nil {
		t.Fatal(err)
	}
	f.srv.SetFaults(faketenant.Fault{Kind: faketenant.FaultStatus, Route: faketenant.RouteMetainfo})
	clock.Add(2 * time.Minute)
	before := f.srv.Requests(faketenant.RouteMetainfo)
	if _, err := f.prov.ResolveVersion(context.Background(), "prod", ""); err != nil {
		t.Fatal(err)
	}
	// The failure must be recorded (its backoff set) before the clock moves
	// on: a refresh still running when the clock passes the backoff would
	// start its backoff from the later time.
	harness.Eventually(t, 5*time.Second, "the failed refresh to be recorded", func() bool {
		return metricValue(t, reg, "oneagent_csi_tenant_refreshes_total", "kind", "latest", "result", "failed") == 1
	})
	if n := f.srv.Requests(faketenant.RouteMetainfo); n != before+1 {
		t.Fatalf("%d metainfo requests for one refresh", n-before)
	}
	// Ask again inside the backoff.
	for range 10 {
		if _, err := f.prov.ResolveVersion(context.Background(), "prod", ""); err != nil {
			t.Fatal(err)
		}
	}
	if n := f.srv.Requests(faketenant.RouteMetainfo) - before; n != 1 {
		t.Fatalf("%d refreshes inside the backoff, want 1", n)
	}
	// After the backoff (at most its full length) the next refresh runs.
	clock.Add(time.Minute + time.Second)
	f.srv.SetFaults()
	if _, err := f.prov.ResolveVersion(context.Background(), "prod", ""); err != nil {
		t.Fatal(err)
	}
	harness.Eventually(t, 5*time.Second, "a refresh after the backoff", func() bool {
		return f.srv.Requests(faketenant.RouteMetainfo) == before+2
	})
}

// A download that stops sending is aborted after client.idleTimeout and
// retried, instead of holding every publish until downloadTimeout.
func TestStalledDownloadIsAbortedAndRetried(t *testing.T) {
	f := newFixture(t, func(o *provisioner.Options) { o.Client.IdleTimeout = 300 * time.Millisecond })
	f.srv.SetFaults(faketenant.Fault{Kind: faketenant.FaultStallBody, Route: faketenant.RouteDownload, Count: 1})
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	if _, err := f.prov.EnsureArtifact(ctx, "prod", f.srv.Latest()); err != nil {
		t.Fatalf("install after a stalled download: %v", err)
	}
	if n := f.srv.Requests(faketenant.RouteDownload); n != 2 {
		t.Fatalf("download requests = %d, want 2 (the stalled one, then the retry)", n)
	}
	if got := tmpEntries(t, f.layout); len(got) != 0 {
		t.Errorf("tmp/ not clean: %v", got)
	}
}

// A caller whose deadline ends while the first request to a tenant is still
// out gets an error that kubelet retries (ErrUnavailable), not its own
// deadline, and the request goes on.
func TestWaitingForAFirstAnswerIsRetriable(t *testing.T) {
	f := newFixture(t, nil)
	f.srv.SetFaults(faketenant.Fault{Kind: faketenant.FaultStall, Route: faketenant.RouteMetainfo, Stall: 2 * time.Second, Count: 1})
	ctx, cancel := context.WithTimeout(context.Background(), 50*time.Millisecond)
	defer cancel()
	_, err := f.prov.ResolveVersion(ctx, "prod", "")
	if !errors.Is(err, provisioner.ErrUnavailable) {
		t.Fatalf("err = %v, want ErrUnavailable", err)
	}
	harness.Eventually(t, 10*time.Second, "the request to go on and answer", func() bool {
		v, err := f.prov.ResolveVersion(context.Background(), "prod", "")
		return err == nil && v == f.srv.Latest()
	})
}
