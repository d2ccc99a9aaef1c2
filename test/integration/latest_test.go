package integration

import (
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/container-storage-interface/spec/lib/go/csi"

	"github.com/oneagent-csi/oneagent-csi/provisioner"
	"github.com/oneagent-csi/oneagent-csi/test/faketenant"
	"github.com/oneagent-csi/oneagent-csi/test/harness"
)

// The tenant moves latest to a slow 200 MiB module: publishes during its
// download are served the installed version at once, and get the new one
// once it is installed.
func TestMovingLatestNeverStallsPods(t *testing.T) {
	harness.RequireRoot(t)
	const next = "1.313.40.20250601-080000"
	n := harness.Start(t, harness.Config{
		Tenant:      faketenant.Options{VersionSizes: map[string]int64{next: 200 << 20}},
		Provisioner: func(o *provisioner.Options) { o.LatestTTL = 50 * time.Millisecond },
	})
	ctx := harness.Ctx(t)
	old := n.Tenant.Latest()
	servedVersion := func(target string) string {
		b, err := os.ReadFile(filepath.Join(target, "agent/installer.version"))
		if err != nil {
			t.Fatal(err)
		}
		return strings.TrimSpace(string(b))
	}
	unpublish := func(id, target string) {
		if _, err := n.Node.NodeUnpublishVolume(ctx, &csi.NodeUnpublishVolumeRequest{VolumeId: id, TargetPath: target}); err != nil {
			t.Fatal(err)
		}
	}
	first := harness.Target(n.TargetRoot, "first")
	if _, err := n.Node.NodePublishVolume(ctx, harness.PublishRequest("first", first, nil)); err != nil {
		t.Fatal(err)
	}
	unpublish("first", first)

	n.Tenant.AddVersion(next)
	n.Tenant.SetFaults(faketenant.Fault{Kind: faketenant.FaultSlow, Route: faketenant.RouteDownload, Rate: 40 << 20})
	// Publishes notice the moved latest and start its install.
	harness.Eventually(t, 30*time.Second, "the new latest's download to start", func() bool {
		target := harness.Target(n.TargetRoot, "probe")
		if _, err := n.Node.NodePublishVolume(ctx, harness.PublishRequest("probe", target, nil)); err != nil {
			t.Fatalf("publish while latest moves: %v", err)
		}
		if v := servedVersion(target); v != old {
			t.Fatalf("served %s before the new latest was installed, want %s", v, old)
		}
		unpublish("probe", target)
		// The first install took a range request (its central directory)
		// and a download; the new latest's starts with a range request.
		return n.Tenant.Requests(faketenant.RouteDownloadRange) >= 2
	})

	const pods = 50
	var wg sync.WaitGroup
	took := make([]time.Duration, pods)
	errs := make([]error, pods)
	for i := range pods {
		wg.Add(1)
		go func() {
			defer wg.Done()
			id := "burst-" + string(rune('a'+i/26)) + string(rune('a'+i%26))
			start := time.Now()
			_, errs[i] = n.Node.NodePublishVolume(ctx, harness.PublishRequest(id, harness.Target(n.TargetRoot, id), nil))
			took[i] = time.Since(start)
		}()
	}
	wg.Wait()
	if n.Tenant.Downloads(next) != 0 {
		t.Fatal("the download finished during the burst; make it slower so the test shows what it claims")
	}
	var slowest time.Duration
	for i := range pods {
		id := "burst-" + string(rune('a'+i/26)) + string(rune('a'+i%26))
		if errs[i] != nil {
			t.Fatalf("publish %d during the download: %v", i, errs[i])
		}
		if v := servedVersion(harness.Target(n.TargetRoot, id)); v != old {
			t.Fatalf("publish %d served %s during the download, want the installed %s", i, v, old)
		}
		slowest = max(slowest, took[i])
	}
	t.Logf("slowest of %d publishes during the download: %v", pods, slowest)
	if limit := raceSlowdown * 100 * time.Millisecond; slowest > limit {
		t.Errorf("a publish during the download took %v, want at most %v (100ms without the race detector)", slowest, limit)
	}

	n.Tenant.SetFaults()
	harness.Eventually(t, 2*time.Minute, "the new latest installed", func() bool { return n.Tenant.Downloads(next) == 1 })
	after := harness.Target(n.TargetRoot, "after")
	harness.Eventually(t, 30*time.Second, "publishes to get the new latest", func() bool {
		if _, err := n.Node.NodePublishVolume(ctx, harness.PublishRequest("after", after, nil)); err != nil {
			t.Fatal(err)
		}
		v := servedVersion(after)
		unpublish("after", after)
		return v == next
	})
}
