package integration

import (
	"context"
	"io"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/container-storage-interface/spec/lib/go/csi"
	"github.com/prometheus/client_golang/prometheus"
	dto "github.com/prometheus/client_model/go"
	"github.com/prometheus/common/expfmt"
	"github.com/prometheus/common/model"

	"github.com/oneagent-csi/oneagent-csi/driver"
	"github.com/oneagent-csi/oneagent-csi/provisioner"
	"github.com/oneagent-csi/oneagent-csi/test/harness"
)

// scrape GETs /metrics and parses the text format.
func scrape(t *testing.T, url string) map[string]*dto.MetricFamily {
	t.Helper()
	resp, err := http.Get(url + "/metrics")
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		t.Fatalf("/metrics: %s", resp.Status)
	}
	parser := expfmt.NewTextParser(model.UTF8Validation)
	families, err := parser.TextToMetricFamilies(resp.Body)
	if err != nil {
		t.Fatalf("/metrics is not valid text format: %v", err)
	}
	return families
}

// sample returns the value of the series of family whose labels include
// want (counter value, or the sample count of a histogram).
func sample(t *testing.T, families map[string]*dto.MetricFamily, family string, want map[string]string) float64 {
	t.Helper()
	f, ok := families[family]
	if !ok {
		t.Fatalf("metric %s not exported", family)
	}
	for _, m := range f.GetMetric() {
		labels := map[string]string{}
		for _, l := range m.GetLabel() {
			labels[l.GetName()] = l.GetValue()
		}
		match := true
		for k, v := range want {
			match = match && labels[k] == v
		}
		if !match {
			continue
		}
		switch {
		case m.GetCounter() != nil:
			return m.GetCounter().GetValue()
		case m.GetHistogram() != nil:
			return float64(m.GetHistogram().GetSampleCount())
		case m.GetGauge() != nil:
			return m.GetGauge().GetValue()
		}
	}
	return 0
}

func get(t *testing.T, url string) (int, string) {
	t.Helper()
	resp, err := http.Get(url)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	body, _ := io.ReadAll(resp.Body)
	return resp.StatusCode, string(body)
}

func TestHealthAndMetricsEndpoints(t *testing.T) {
	harness.RequireRoot(t)
	reg := prometheus.NewRegistry()
	n := harness.Start(t, harness.Config{
		Provisioner: func(o *provisioner.Options) { o.Registerer = reg },
		Driver:      func(o *driver.Options) { o.Registerer = reg },
	})
	reg.MustRegister(driver.NewCacheCollector(n.Index))
	srv := httptest.NewServer(n.Driver.HTTPHandler(reg))
	t.Cleanup(srv.Close)

	for _, path := range []string{"/healthz", "/readyz"} {
		if code, body := get(t, srv.URL+path); code != http.StatusOK {
			t.Fatalf("%s = %d %s, want 200", path, code, body)
		}
	}

	ctx := harness.Ctx(t)
	target := harness.Target(n.TargetRoot, "m")
	if _, err := n.Node.NodePublishVolume(ctx, harness.PublishRequest("vol-m", target, nil)); err != nil {
		t.Fatal(err)
	}
	badTarget := harness.Target(n.TargetRoot, "bad")
	if _, err := n.Node.NodePublishVolume(ctx, harness.PublishRequest("vol-bad", badTarget, map[string]string{"mode": "sideways"})); err != nil {
		t.Fatalf("publish with a bad mode: %v, want fail-open", err)
	}
	if _, err := n.Node.NodeUnpublishVolume(ctx, &csi.NodeUnpublishVolumeRequest{VolumeId: "vol-bad", TargetPath: badTarget}); err != nil {
		t.Fatal(err)
	}
	if _, err := n.Node.NodePublishVolume(ctx, harness.PublishRequest("vol-hb", badTarget, map[string]string{"mode": "host", "writable": "maybe"})); err == nil {
		t.Fatal("host-mode publish with a bad attribute succeeded")
	}
	m := scrape(t, srv.URL)
	if got := sample(t, m, "oneagent_csi_volumes", map[string]string{"mode": "app", "state": "published"}); got != 1 {
		t.Errorf("published app volumes while mounted = %v, want 1", got)
	}
	if got := sample(t, m, "oneagent_csi_cache_artifacts", map[string]string{"state": "ready"}); got != 1 {
		t.Errorf("ready artifacts = %v, want 1", got)
	}
	if got := sample(t, m, "oneagent_csi_cache_bytes", nil); got <= 0 {
		t.Errorf("cache bytes = %v, want the artifact's size", got)
	}
	if _, err := n.Node.NodeUnpublishVolume(ctx, &csi.NodeUnpublishVolumeRequest{VolumeId: "vol-m", TargetPath: target}); err != nil {
		t.Fatal(err)
	}
	rep, err := n.Prov.GC(ctx, false)
	if err != nil {
		t.Fatal(err)
	}

	m = scrape(t, srv.URL)
	if got := sample(t, m, "oneagent_csi_volumes", map[string]string{"mode": "app", "state": "published"}); got != 0 {
		t.Errorf("published app volumes after unpublish = %v, want 0", got)
	}
	if got := sample(t, m, "oneagent_csi_cache_budget_overrun_bytes", nil); got != float64(rep.OverrunBytes) {
		t.Errorf("budget overrun = %v, want %d", got, rep.OverrunBytes)
	}
	checks := []struct {
		family string
		labels map[string]string
		want   float64
	}{
		{"oneagent_csi_operation_duration_seconds", map[string]string{"operation": "publish", "mode": "app", "code": "OK"}, 2},
		{"oneagent_csi_operation_duration_seconds", map[string]string{"operation": "publish", "code": "InvalidArgument"}, 1},
		{"oneagent_csi_operation_duration_seconds", map[string]string{"operation": "unpublish", "code": "OK"}, 2},
		{"oneagent_csi_operations_in_flight", map[string]string{"operation": "publish"}, 0},
		{"oneagent_csi_downloads_total", map[string]string{"result": "ok"}, 1},
		{"oneagent_csi_install_duration_seconds", nil, 1},
		{"oneagent_csi_fail_open_total", map[string]string{"reason": "invalid_attributes"}, 1},
	}
	for _, c := range checks {
		if got := sample(t, m, c.family, c.labels); got != c.want {
			t.Errorf("%s%v = %v, want %v", c.family, c.labels, got, c.want)
		}
	}
	if got := sample(t, m, "oneagent_csi_download_bytes_total", nil); got <= 0 {
		t.Errorf("oneagent_csi_download_bytes_total = %v, want the ZIP's size", got)
	}

	// Not ready once the index is closed: kubelet must not send work.
	if err := n.Index.Close(); err != nil {
		t.Fatal(err)
	}
	if code, body := get(t, srv.URL+"/readyz"); code != http.StatusServiceUnavailable || !strings.Contains(body, "not ready") {
		t.Fatalf("/readyz with the index closed = %d %q, want 503", code, body)
	}
	if code, _ := get(t, srv.URL+"/healthz"); code != http.StatusOK {
		t.Fatalf("/healthz = %d, want 200 (the process still answers)", code)
	}
}

// TestPrefetchFollowsLatest moves the tenant's latest version while the
// prefetch loop runs: the new version is installed without any pod asking,
// and the next publish is served from the cache.
func TestPrefetchFollowsLatest(t *testing.T) {
	harness.RequireRoot(t)
	n := harness.Start(t, harness.Config{Provisioner: func(o *provisioner.Options) { o.LatestTTL = 20 * time.Millisecond }})
	ctx, cancel := context.WithCancel(harness.Ctx(t))
	done := make(chan struct{})
	go func() { defer close(done); n.Prov.Prefetch(ctx, 20*time.Millisecond) }()
	t.Cleanup(func() { cancel(); <-done })

	first := n.Tenant.Latest()
	harness.Eventually(t, 30*time.Second, "first version prefetched", func() bool { return n.Tenant.Downloads(first) == 1 })

	const next = "1.313.40.20250601-080000"
	n.Tenant.AddVersion(next)
	harness.Eventually(t, 30*time.Second, "new latest prefetched", func() bool {
		a, err := n.Index.ListArtifacts()
		if err != nil {
			return false
		}
		for _, x := range a {
			if x.Version == next {
				return true
			}
		}
		return false
	})

	target := harness.Target(n.TargetRoot, "p")
	if _, err := n.Node.NodePublishVolume(ctx, harness.PublishRequest("vol-p", target, nil)); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		_, _ = n.Node.NodeUnpublishVolume(context.Background(), &csi.NodeUnpublishVolumeRequest{VolumeId: "vol-p", TargetPath: target})
	})
	got, err := os.ReadFile(filepath.Join(target, "agent/installer.version"))
	if err != nil || strings.TrimSpace(string(got)) != next {
		t.Fatalf("served version = %q, %v; want %s", got, err, next)
	}
	if d := n.Tenant.Downloads(next); d != 1 {
		t.Errorf("%d downloads of %s, want 1 (the prefetch; the publish must use the cache)", d, next)
	}
	if d := n.Tenant.Downloads(first); d != 1 {
		t.Errorf("%d downloads of %s, want 1", d, first)
	}
}
