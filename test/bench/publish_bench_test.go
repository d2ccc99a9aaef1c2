// Package bench measures the node driver with real mounts. Run with
// `make bench` (as root); results and the command are in BENCHMARKS.md.
package bench

import (
	"context"
	"fmt"
	"sort"
	"sync"
	"testing"
	"time"

	"github.com/container-storage-interface/spec/lib/go/csi"
	"google.golang.org/grpc/status"
	"k8s.io/mount-utils"

	"github.com/oneagent-csi/oneagent-csi/test/harness"
)

// burst publishes n volumes at once (as kubelet does when many pods start),
// then unpublishes them at once, and reports wall times, per-request
// percentiles and errors by code.
func burst(b *testing.B, n *harness.Node, count int, round int) (mountAll, unmountAll time.Duration, p50, p99 time.Duration, errs map[string]int) {
	ctx := context.Background()
	errs = map[string]int{}
	var mu sync.Mutex
	lat := make([]time.Duration, count)
	targets := make([]string, count)
	for i := range targets {
		targets[i] = harness.Target(n.TargetRoot, fmt.Sprintf("r%d-%d", round, i))
	}
	run := func(op func(i int) error) time.Duration {
		var wg sync.WaitGroup
		start := time.Now()
		for i := range count {
			wg.Add(1)
			go func() {
				defer wg.Done()
				t0 := time.Now()
				err := op(i)
				lat[i] = time.Since(t0)
				if err != nil {
					mu.Lock()
					errs[status.Code(err).String()]++
					mu.Unlock()
				}
			}()
		}
		wg.Wait()
		return time.Since(start)
	}
	mountAll = run(func(i int) error {
		_, err := n.Node.NodePublishVolume(ctx, harness.PublishRequest(fmt.Sprintf("vol-%d-%d", round, i), targets[i], nil))
		return err
	})
	sorted := append([]time.Duration(nil), lat...)
	sort.Slice(sorted, func(i, j int) bool { return sorted[i] < sorted[j] })
	p50, p99 = sorted[len(sorted)/2], sorted[min(len(sorted)-1, len(sorted)*99/100)]
	unmountAll = run(func(i int) error {
		_, err := n.Node.NodeUnpublishVolume(ctx, &csi.NodeUnpublishVolumeRequest{VolumeId: fmt.Sprintf("vol-%d-%d", round, i), TargetPath: targets[i]})
		return err
	})
	return
}

func benchmarkBurst(b *testing.B, mounter mount.Interface) {
	harness.RequireRoot(b)
	for _, count := range []int{1, 20, 50, 200, 500} {
		b.Run(fmt.Sprintf("volumes=%d", count), func(b *testing.B) {
			n := harness.Start(b, harness.Config{Mounter: mounter})
			// Warm: the artifact is cached before the measured bursts.
			if _, err := n.Prov.Prepare(context.Background(), "prod", ""); err != nil {
				b.Fatal(err)
			}
			var mAll, uAll, p50s, p99s time.Duration
			errors := 0
			b.ResetTimer()
			for i := 0; i < b.N; i++ {
				m, u, p50, p99, errs := burst(b, n, count, i)
				mAll, uAll, p50s, p99s = mAll+m, uAll+u, p50s+p50, p99s+p99
				for code, c := range errs {
					b.Logf("errors %s: %d", code, c)
					errors += c
				}
			}
			N := float64(b.N)
			b.ReportMetric(float64(mAll.Microseconds())/N/1000, "ms-mount-all")
			b.ReportMetric(float64(uAll.Microseconds())/N/1000, "ms-unmount-all")
			b.ReportMetric(float64(p50s.Microseconds())/N/1000, "ms-publish-p50")
			b.ReportMetric(float64(p99s.Microseconds())/N/1000, "ms-publish-p99")
			b.ReportMetric(float64(errors)/N, "errors")
		})
	}
}

// BenchmarkPublishBurst is this driver: syscall mounts, statx checks.
func BenchmarkPublishBurst(b *testing.B) { benchmarkBurst(b, nil) }

// BenchmarkPublishBurstExecMount is the baseline in the same run: the same
// driver with k8s.io/mount-utils' exec'ing mounter (mount(8)/umount(8)), the
// way other OneAgent CSI drivers mount.
func BenchmarkPublishBurstExecMount(b *testing.B) { benchmarkBurst(b, mount.New("")) }
