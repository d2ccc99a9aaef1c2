package bench

import (
	"archive/zip"
	"context"
	"fmt"
	"os"
	"path/filepath"
	"sync"
	"testing"
	"time"

	"github.com/container-storage-interface/spec/lib/go/csi"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"

	"github.com/oneagent-csi/oneagent-csi/test/faketenant"
	"github.com/oneagent-csi/oneagent-csi/test/harness"
)

// BenchmarkPublishBurstMemory sends 500 publishes at once to the real node
// process, each on a connection of its own as kubelet does, then 500
// unpublishes the same way, and reports the process's peak RSS (VmHWM). The
// baseline in the same run is the process's peak RSS after start-up and one
// warm publish. GOMAXPROCS=64, as on a large node.
func BenchmarkPublishBurstMemory(b *testing.B) {
	harness.RequireRoot(b)
	const volumes = 500
	procs := os.Getenv("ONEAGENT_CSI_BENCH_GOMAXPROCS")
	if procs == "" {
		procs = "64"
	}
	var idleMax, peakMax, threadsMax int64
	var took time.Duration
	for i := 0; i < b.N; i++ {
		e := harness.NewProcessEnv(b, faketenant.Options{}, false)
		p := e.StartWithEnv([]string{"GOMAXPROCS=" + procs})
		ctx := context.Background()
		warm := harness.Target(e.Targets, "warm")
		if _, err := p.Node.NodePublishVolume(ctx, harness.PublishRequest("warm", warm, nil)); err != nil {
			b.Fatal(err)
		}
		idle := vmHWM(b, p.Cmd.Process.Pid)
		call := func(i int, unpublish bool) error {
			conn, err := grpc.NewClient("unix://"+e.Socket, grpc.WithTransportCredentials(insecure.NewCredentials()))
			if err != nil {
				return err
			}
			defer conn.Close()
			node := csi.NewNodeClient(conn)
			id := fmt.Sprintf("burst-%d", i)
			target := harness.Target(e.Targets, id)
			if unpublish {
				_, err = node.NodeUnpublishVolume(ctx, &csi.NodeUnpublishVolumeRequest{VolumeId: id, TargetPath: target})
			} else {
				_, err = node.NodePublishVolume(ctx, harness.PublishRequest(id, target, nil))
			}
			return err
		}
		start := time.Now()
		for _, unpublish := range []bool{false, true} {
			var wg sync.WaitGroup
			errs := make(chan error, volumes)
			for i := range volumes {
				wg.Add(1)
				go func() {
					defer wg.Done()
					if err := call(i, unpublish); err != nil {
						errs <- err
					}
				}()
			}
			wg.Wait()
			close(errs)
			for err := range errs {
				b.Fatalf("burst call: %v", err)
			}
		}
		took += time.Since(start)
		peakMax = max(peakMax, vmHWM(b, p.Cmd.Process.Pid))
		idleMax = max(idleMax, idle)
		threadsMax = max(threadsMax, procStatus(b, p.Cmd.Process.Pid, "Threads:"))
		p.Stop(b)
	}
	// The worst iteration: a limit must hold every time.
	b.ReportMetric(float64(idleMax)/(1<<20), "MiB-rss-idle-max")
	b.ReportMetric(float64(peakMax)/(1<<20), "MiB-rss-peak-burst-max")
	b.ReportMetric(float64(peakMax)/float64(idleMax), "burst/idle")
	b.ReportMetric(took.Seconds()/float64(b.N), "s-burst")
	b.ReportMetric(float64(threadsMax), "threads-max")
}

// BenchmarkEntryLimitRefusalMemory serves a 200,000-entry archive (limit
// 100,000) to the real node process and reports its peak RSS while it
// refuses it. Baseline in the same run: the peak RSS of the same process
// installing the default small module.
func BenchmarkEntryLimitRefusalMemory(b *testing.B) {
	harness.RequireRoot(b)
	dir := b.TempDir()
	huge := filepath.Join(dir, "huge.zip")
	f, err := os.Create(huge)
	if err != nil {
		b.Fatal(err)
	}
	zw := zip.NewWriter(f)
	for i := range 200_000 {
		if _, err := zw.CreateHeader(&zip.FileHeader{Name: fmt.Sprintf("agent/lib/file-%06d", i), Method: zip.Store}); err != nil {
			b.Fatal(err)
		}
	}
	if err := zw.Close(); err != nil {
		b.Fatal(err)
	}
	if err := f.Close(); err != nil {
		b.Fatal(err)
	}
	var refusal, small int64
	for i := 0; i < b.N; i++ {
		for _, bad := range []bool{false, true} {
			e := harness.NewProcessEnv(b, faketenant.Options{}, false)
			if bad {
				e.Tenant.ServeModuleFile(e.Tenant.Latest(), huge)
			}
			p := e.StartWithEnv([]string{"GOMAXPROCS=64"})
			target := harness.Target(e.Targets, "v")
			_, err := p.Node.NodePublishVolume(context.Background(), harness.PublishRequest("v", target, nil))
			switch {
			case bad && err != nil:
				refusal = max(refusal, vmHWM(b, p.Cmd.Process.Pid))
			case !bad && err == nil:
				small = max(small, vmHWM(b, p.Cmd.Process.Pid))
			default:
				b.Fatalf("publish (bad archive %t): %v", bad, err)
			}
			p.Stop(b)
		}
	}
	b.ReportMetric(float64(refusal)/(1<<20), "MiB-rss-peak-refusal-max")
	b.ReportMetric(float64(small)/(1<<20), "MiB-rss-peak-small-install-max")
	b.ReportMetric(float64(refusal)/float64(small), "refusal/small")
}
