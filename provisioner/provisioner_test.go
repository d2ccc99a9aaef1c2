package provisioner_test

import (
	"context"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/testutil"

	"github.com/oneagent-csi/oneagent-csi/provisioner"
	"github.com/oneagent-csi/oneagent-csi/storage"
	"github.com/oneagent-csi/oneagent-csi/test/faketenant"
	"github.com/oneagent-csi/oneagent-csi/test/harness"
)

type fixture struct {
	srv    *faketenant.Server
	prov   *provisioner.Provisioner
	idx    *storage.Index
	layout storage.Layout
}

func newFixture(t *testing.T, mutate func(*provisioner.Options)) *fixture {
	t.Helper()
	return newFixtureWith(t, faketenant.Options{}, mutate)
}

func newFixtureWith(t *testing.T, tenantOpts faketenant.Options, mutate func(*provisioner.Options)) *fixture {
	t.Helper()
	srv, tenant := startTenant(t, tenantOpts)
	layout, err := storage.NewLayout(t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	idx, _, err := storage.Open(storage.ReconcileOptions{Layout: layout})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { idx.Close() })
	opts := provisioner.Options{Layout: layout, Index: idx, Tenants: []provisioner.Tenant{tenant}, Client: fastRetries}
	if mutate != nil {
		mutate(&opts)
	}
	p, err := provisioner.New(opts)
	if err != nil {
		t.Fatal(err)
	}
	return &fixture{srv: srv, prov: p, idx: idx, layout: layout}
}

func tmpEntries(t *testing.T, l storage.Layout) []string {
	t.Helper()
	return harness.DirNames(t, l.Abs(l.Tmp()))
}

func TestPrepareInstallsArtifactAndLayer(t *testing.T) {
	f := newFixture(t, nil)
	prep, err := f.prov.Prepare(context.Background(), "prod", "")
	if err != nil {
		t.Fatal(err)
	}
	if prep.Version != f.srv.Latest() || !storage.ValidArtifactID(prep.Artifact.ID) {
		t.Fatalf("prepared %+v", prep)
	}
	lib := filepath.Join(f.layout.Abs(f.layout.ArtifactTree(prep.Artifact.ID)), "agent/lib64/liboneagentproc.so")
	if _, err := os.Stat(lib); err != nil {
		t.Fatal(err)
	}
	conf, err := os.ReadFile(filepath.Join(f.layout.Abs(f.layout.LayerTree("prod", prep.Layer.Rev)), "agent/conf/ruxitagentproc.conf"))
	if err != nil {
		t.Fatal(err)
	}
	for _, want := range []string{"tenant fake-tenant-uuid", "tenantToken fake-tenant-token-1", "loglevel info"} {
		if !strings.Contains(string(conf), want) {
			t.Errorf("tenant layer conf lacks %q:\n%s", want, conf)
		}
	}
	h, entries, err := storage.ReadManifest(afs(f.layout), f.layout.ArtifactManifest(prep.Artifact.ID))
	if err != nil || h.Version != prep.Version || len(entries) == 0 {
		t.Fatalf("manifest %+v (%d entries): %v", h, len(entries), err)
	}
	if got := tmpEntries(t, f.layout); len(got) != 0 {
		t.Errorf("tmp/ not clean: %v", got)
	}
	// A second Prepare is served from the cache.
	if _, err := f.prov.Prepare(context.Background(), "prod", ""); err != nil {
		t.Fatal(err)
	}
	if n := f.srv.Downloads(prep.Version); n != 1 {
		t.Errorf("downloads = %d, want 1", n)
	}
	// A new processmoduleconfig revision gives a new, separate layer. After
	// a restart the existing layer serves at once while the config is
	// fetched in the background; the next publishes get the new layer.
	f.srv.SetRevision(2)
	p2 := newProvisionerSameDir(t, f)
	first, err := p2.Prepare(context.Background(), "prod", "")
	if err != nil || first.Layer.Rev != prep.Layer.Rev {
		t.Fatalf("first Prepare after restart: layer %s, %v; want the existing %s at once", first.Layer.Rev, err, prep.Layer.Rev)
	}
	var prep2 provisioner.Prepared
	harness.Eventually(t, 10*time.Second, "the layer of revision 2", func() bool {
		prep2, err = p2.Prepare(context.Background(), "prod", "")
		return err == nil && prep2.Layer.Rev != prep.Layer.Rev
	})
	if prep2.Artifact.ID != prep.Artifact.ID {
		t.Errorf("revision 2 gave artifact %s, want %s", prep2.Artifact.ID, prep.Artifact.ID)
	}
}

func newProvisionerSameDir(t *testing.T, f *fixture) *provisioner.Provisioner {
	t.Helper()
	tenant := provisioner.Tenant{Name: "prod", APIURL: f.srv.URL}
	dir := t.TempDir()
	tenant.TokenFile = filepath.Join(dir, "token")
	tenant.CAFile = filepath.Join(dir, "ca")
	if err := os.WriteFile(tenant.TokenFile, []byte(f.srv.Token()), 0o600); err != nil {
		t.Fatal(err)
	}
	if err := f.srv.WriteCA(tenant.CAFile); err != nil {
		t.Fatal(err)
	}
	p, err := provisioner.New(provisioner.Options{Layout: f.layout, Index: f.idx, Tenants: []provisioner.Tenant{tenant}, Client: fastRetries})
	if err != nil {
		t.Fatal(err)
	}
	return p
}

func TestConcurrentCallersShareOneDownload(t *testing.T) {
	f := newFixture(t, nil)
	version := f.srv.Latest()
	var wg sync.WaitGroup
	errs := make(chan error, 200)
	ids := make(chan string, 200)
	for range 200 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			a, err := f.prov.EnsureArtifact(context.Background(), "prod", version)
			errs <- err
			ids <- a.ID
		}()
	}
	wg.Wait()
	close(errs)
	close(ids)
	for err := range errs {
		if err != nil {
			t.Fatal(err)
		}
	}
	first := ""
	for id := range ids {
		if first == "" {
			first = id
		}
		if id != first {
			t.Fatalf("callers got different artifacts %s and %s", first, id)
		}
	}
	if n := f.srv.Requests(faketenant.RouteDownload); n != 1 {
		t.Fatalf("download requests = %d, want 1", n)
	}
}

func TestInstallRetriesBrokenDownloads(t *testing.T) {
	for _, kind := range []faketenant.FaultKind{faketenant.FaultTruncate, faketenant.FaultStatus} {
		t.Run(string(kind), func(t *testing.T) {
			f := newFixture(t, nil)
			f.srv.SetFaults(faketenant.Fault{Kind: kind, Route: faketenant.RouteDownload, Count: 1})
			a, err := f.prov.EnsureArtifact(context.Background(), "prod", f.srv.Latest())
			if err != nil {
				t.Fatal(err)
			}
			if n := f.srv.Requests(faketenant.RouteDownload); n != 2 {
				t.Errorf("download requests = %d, want 2", n)
			}
			if _, err := storage.ReadManifestHeader(afs(f.layout), f.layout.ArtifactManifest(a.ID)); err != nil {
				t.Error(err)
			}
			if got := tmpEntries(t, f.layout); len(got) != 0 {
				t.Errorf("tmp/ not clean: %v", got)
			}
		})
	}
}

// A refused archive is remembered: later calls do not download it again
// until the backoff passes, it counts once as bad_archive, the same bytes
// downloaded again are refused as before (not counted again), and good bytes
// (with the same central directory) are installed; streamed or downloaded
// first.
func TestRefusedArchiveIsRemembered(t *testing.T) {
	for _, tc := range []struct {
		name string
		// noRange: the tenant ignores range requests (download, then extract).
		noRange bool
	}{
		{"streamed", false},
		{"downloaded", true},
	} {
		t.Run(tc.name, func(t *testing.T) { testRefusedArchiveIsRemembered(t, tc.noRange) })
	}
}

func testRefusedArchiveIsRemembered(t *testing.T, noRange bool) {
	reg := prometheus.NewRegistry()
	now := time.Unix(1_800_000_000, 0)
	var mu sync.Mutex
	clock := func() time.Time { mu.Lock(); defer mu.Unlock(); return now }
	advance := func(d time.Duration) { mu.Lock(); now = now.Add(d); mu.Unlock() }
	f := newFixtureWith(t, faketenant.Options{NoRange: noRange}, func(o *provisioner.Options) { o.Registerer = reg; o.Now = clock })
	f.srv.SetFaults(faketenant.Fault{Kind: faketenant.FaultCorrupt, Route: faketenant.RouteDownload})
	version := f.srv.Latest()
	badArchives := func() float64 {
		return testutil.ToFloat64(counterVec(t, reg, "oneagent_csi_downloads_total").WithLabelValues("bad_archive"))
	}
	for i := range 5 {
		if _, err := f.prov.EnsureArtifact(context.Background(), "prod", version); !errors.Is(err, provisioner.ErrBadArchive) {
			t.Fatalf("call %d: %v, want a bad archive", i, err)
		}
	}
	if n := f.srv.Requests(faketenant.RouteDownload); n != 1 {
		t.Fatalf("%d downloads for 5 calls, want 1 (the refusal is remembered)", n)
	}
	if got := badArchives(); got != 1 {
		t.Fatalf("bad_archive counted %v times, want 1", got)
	}
	// After the backoff the same bytes come again: refused without
	// extraction, not counted again, backoff doubled.
	advance(61 * time.Second)
	if _, err := f.prov.EnsureArtifact(context.Background(), "prod", version); !errors.Is(err, provisioner.ErrBadArchive) {
		t.Fatalf("after the backoff: %v, want the same refusal", err)
	}
	if n, got := f.srv.Requests(faketenant.RouteDownload), badArchives(); n != 2 || got != 1 {
		t.Fatalf("downloads %d (want 2), bad_archive %v (want 1)", n, got)
	}
	advance(61 * time.Second)
	if _, err := f.prov.EnsureArtifact(context.Background(), "prod", version); !errors.Is(err, provisioner.ErrBadArchive) {
		t.Fatalf("inside the doubled backoff: %v, want the refusal", err)
	}
	if n := f.srv.Requests(faketenant.RouteDownload); n != 2 {
		t.Fatalf("downloaded inside the doubled backoff: %d requests", n)
	}
	// The tenant fixes its archive.
	f.srv.SetFaults()
	advance(2 * time.Minute)
	if _, err := f.prov.EnsureArtifact(context.Background(), "prod", version); err != nil {
		t.Fatalf("good archive after the backoff: %v", err)
	}
	if got := tmpEntries(t, f.layout); len(got) != 0 {
		t.Errorf("tmp/ not clean: %v", got)
	}
}

// metricValue is the value of the sample of name whose labels include the
// given name, value pairs (0 when there is none).
func metricValue(t *testing.T, reg *prometheus.Registry, name string, labels ...string) float64 {
	t.Helper()
	mfs, err := reg.Gather()
	if err != nil {
		t.Fatal(err)
	}
	for _, mf := range mfs {
		if mf.GetName() != name {
			continue
		}
	samples:
		for _, m := range mf.GetMetric() {
			have := map[string]string{}
			for _, l := range m.GetLabel() {
				have[l.GetName()] = l.GetValue()
			}
			for i := 0; i+1 < len(labels); i += 2 {
				if have[labels[i]] != labels[i+1] {
					continue samples
				}
			}
			return m.GetCounter().GetValue() + m.GetGauge().GetValue()
		}
	}
	return 0
}

func counterVec(t *testing.T, reg *prometheus.Registry, name string) *prometheus.CounterVec {
	t.Helper()
	mfs, err := reg.Gather()
	if err != nil {
		t.Fatal(err)
	}
	for _, mf := range mfs {
		if mf.GetName() == name {
			// Re-registering returns the existing collector.
			c := prometheus.NewCounterVec(prometheus.CounterOpts{Name: name, Help: mf.GetHelp()}, []string{"result"})
			if err := reg.Register(c); err != nil {
				var are prometheus.AlreadyRegisteredError
				if errors.As(err, &are) {
					return are.ExistingCollector.(*prometheus.CounterVec)
				}
				t.Fatal(err)
			}
			return c
		}
	}
	t.Fatalf("no metric %s", name)
	return nil
}

func TestPermanentErrorsSurface(t *testing.T) {
	f := newFixture(t, nil)
	_, err := f.prov.EnsureArtifact(context.Background(), "prod", "1.1.1.20200101-000000")
	if !errors.Is(err, provisioner.ErrNotFound) || !strings.Contains(err.Error(), `"prod"`) {
		t.Fatalf("unknown version: err = %v", err)
	}
	if n := f.srv.Requests(faketenant.RouteDownload) + f.srv.Requests(faketenant.RouteDownloadRange); n != 1 {
		t.Errorf("a 404 was retried: %d requests", n)
	}
	f.srv.SetToken("other")
	_, err = f.prov.EnsureArtifact(context.Background(), "prod", f.srv.Latest())
	if !errors.Is(err, provisioner.ErrUnauthorized) {
		t.Fatalf("wrong token: err = %v", err)
	}
	_, err = f.prov.EnsureArtifact(context.Background(), "nope", f.srv.Latest())
	if !errors.Is(err, provisioner.ErrUnknownTenant) {
		t.Fatalf("unknown tenant: err = %v", err)
	}
	entries, _ := os.ReadDir(f.layout.Abs(f.layout.ArtifactsDir()))
	if len(entries) != 0 || len(tmpEntries(t, f.layout)) != 0 {
		t.Errorf("failed installs left files behind: artifacts %v tmp %v", entries, tmpEntries(t, f.layout))
	}
}

func TestCallerDeadlineReturnsInProgress(t *testing.T) {
	f := newFixture(t, nil)
	f.srv.SetFaults(faketenant.Fault{Kind: faketenant.FaultStall, Route: faketenant.RouteDownload, Stall: 500 * time.Millisecond, Count: 1})
	ctx, cancel := context.WithTimeout(context.Background(), 50*time.Millisecond)
	defer cancel()
	_, err := f.prov.EnsureArtifact(ctx, "prod", f.srv.Latest())
	if !errors.Is(err, provisioner.ErrInProgress) {
		t.Fatalf("err = %v, want in progress", err)
	}
	// The download goes on without the caller and finishes.
	deadline := time.Now().Add(20 * time.Second)
	for {
		if _, err := f.prov.Cached("prod", f.srv.Latest()); err == nil {
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("the detached download never finished")
		}
		time.Sleep(20 * time.Millisecond)
	}
}

func TestLatestIsResolvedOncePerTTL(t *testing.T) {
	f := newFixture(t, func(o *provisioner.Options) { o.LatestTTL = time.Hour })
	var wg sync.WaitGroup
	for range 50 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			if _, err := f.prov.ResolveVersion(context.Background(), "prod", ""); err != nil {
				t.Error(err)
			}
		}()
	}
	wg.Wait()
	if n := f.srv.Requests(faketenant.RouteMetainfo); n != 1 {
		t.Fatalf("metainfo requests = %d, want 1", n)
	}
	if v, _ := f.prov.ResolveVersion(context.Background(), "prod", "1.2.3"); v != "1.2.3" {
		t.Errorf("a pin resolved to %q", v)
	}
}

func TestLatestFallsBackToRecordedResolution(t *testing.T) {
	f := newFixture(t, func(o *provisioner.Options) { o.LatestTTL = time.Nanosecond })
	v, err := f.prov.ResolveVersion(context.Background(), "prod", "")
	if err != nil {
		t.Fatal(err)
	}
	f.srv.SetFaults(faketenant.Fault{Kind: faketenant.FaultStatus})
	// A new provisioner (as after a restart) only has the index.
	p2 := newProvisionerSameDir(t, f)
	got, err := p2.ResolveVersion(context.Background(), "prod", "")
	if err != nil || got != v {
		t.Fatalf("with the tenant down: %q, %v; want %q from the index", got, err, v)
	}
}
