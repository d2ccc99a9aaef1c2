package bench

import (
	"bufio"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"
	"sigs.k8s.io/yaml"

	"github.com/oneagent-csi/oneagent-csi/test/faketenant"
	"github.com/oneagent-csi/oneagent-csi/test/harness"
)

// installResult is one cold install by the real node process.
type installResult struct {
	download, extract, install time.Duration
	// peakRSS is VmHWM of the node process once the install is done.
	peakRSS int64
	// cgroupPeak is the memory cgroup's peak usage (heap and page cache),
	// when the run had one.
	cgroupPeak int64
}

// moduleSize is 1 GiB unless ONEAGENT_CSI_BENCH_MODULE_SIZE (bytes) says
// otherwise, e.g. for a quick try of the benchmark itself.
func moduleSize(b *testing.B) int64 {
	if s := os.Getenv("ONEAGENT_CSI_BENCH_MODULE_SIZE"); s != "" {
		n, err := strconv.ParseInt(s, 10, 64)
		if err != nil {
			b.Fatalf("ONEAGENT_CSI_BENCH_MODULE_SIZE: %v", err)
		}
		return n
	}
	return 1 << 30
}

// BenchmarkColdInstall installs a synthetic 1 GiB code module from the fake
// tenant on loopback with the real node process (prefetch at start-up),
// four ways in every iteration:
//
//   - baseline: `unzip -q` of the same ZIP into a dir on the same disk;
//   - the node process without a memory limit;
//   - the node process inside a 64 MiB and inside a 32 MiB memory cgroup
//     (heap and page cache both count, as for a DaemonSet's memory limit).
//
// Every node process runs with GOMAXPROCS=64, as on a 64-core node (the
// worker pool must follow the memory budget, not the core count). The disk
// is synced before each step so that no step pays for the previous one's
// dirty pages.
func BenchmarkColdInstall(b *testing.B) {
	harness.RequireRoot(b)
	if _, err := exec.LookPath("unzip"); err != nil {
		b.Skip("unzip not installed")
	}
	cg, err := harness.NewMemoryCgroup(64 << 20)
	if err != nil {
		b.Skipf("no memory cgroup: %v", err)
	}
	defer cg.Remove()
	cg32, err := harness.NewMemoryCgroup(32 << 20)
	if err != nil {
		b.Skipf("no memory cgroup: %v", err)
	}
	defer cg32.Remove()

	srv, tenant := harness.StartTenant(b, faketenant.Options{ModuleSize: moduleSize(b), CacheDir: b.TempDir()})
	// Generate the ZIP before anything is timed.
	zipPath, err := srv.ModulePath(srv.Latest())
	if err != nil {
		b.Fatal(err)
	}
	work := b.TempDir()

	var unzipT time.Duration
	var free, limited, limited32 installResult
	b.ResetTimer()
	for i := 0; i < b.N; i++ {
		dir := filepath.Join(work, "unzip")
		unix.Sync()
		start := time.Now()
		if out, err := exec.Command("unzip", "-q", "-d", dir, zipPath).CombinedOutput(); err != nil {
			b.Fatalf("unzip: %v\n%s", err, out)
		}
		unzipT += time.Since(start)
		removeAll(b, dir)

		r := coldInstall(b, tenant, work, nil)
		free.add(r)
		r = coldInstall(b, tenant, work, cg)
		limited.add(r)
		r = coldInstall(b, tenant, work, cg32)
		limited32.add(r)
	}
	b.StopTimer()
	n := float64(b.N)
	b.ReportMetric(unzipT.Seconds()/n, "s-unzip")
	b.ReportMetric(free.download.Seconds()/n, "s-download")
	b.ReportMetric(free.extract.Seconds()/n, "s-extract")
	b.ReportMetric(free.extract.Seconds()/unzipT.Seconds(), "extract/unzip")
	b.ReportMetric(float64(free.peakRSS)/n/(1<<20), "MiB-peak-rss")
	b.ReportMetric(free.install.Seconds()/n, "s-install")
	b.ReportMetric(limited.install.Seconds()/n, "s-install-64MiB")
	b.ReportMetric(limited.install.Seconds()/free.install.Seconds(), "64MiB/free")
	b.ReportMetric(float64(limited.cgroupPeak)/n/(1<<20), "MiB-cgroup-peak")
	b.ReportMetric(float64(limited.peakRSS)/n/(1<<20), "MiB-peak-rss-64MiB")
	b.ReportMetric(limited32.install.Seconds()/n, "s-install-32MiB")
	b.ReportMetric(limited32.install.Seconds()/free.install.Seconds(), "32MiB/free")
	b.ReportMetric(float64(limited32.peakRSS)/n/(1<<20), "MiB-peak-rss-32MiB")
}

func (r *installResult) add(o installResult) {
	r.download += o.download
	r.extract += o.extract
	r.install += o.install
	r.peakRSS += o.peakRSS
	r.cgroupPeak += o.cgroupPeak
}

// installedLine is the provisioner's log line when an install is done.
var installedLine = regexp.MustCompile(`"installed code module".* download="([^"]+)" extract="([^"]+)"`)

// coldInstall starts the node process with an empty data dir and prefetch
// on, waits for the "installed code module" log line, reads the timings and
// the peak RSS, and stops the process.
func coldInstall(b *testing.B, tenant any, work string, cg *harness.MemoryCgroup) installResult {
	b.Helper()
	dataDir := filepath.Join(work, "data")
	defer removeAll(b, dataDir)
	cfg := map[string]any{
		"nodeID": "bench-node", "dataDir": dataDir, "csiSocket": filepath.Join(work, "csi.sock"),
		"httpAddr": "127.0.0.1:0", "prefetch": true, "downloadTimeout": "30m",
		"tenants": []any{tenant},
	}
	data, err := yaml.Marshal(cfg)
	if err != nil {
		b.Fatal(err)
	}
	config := filepath.Join(work, "config.yaml")
	if err := os.WriteFile(config, data, 0o600); err != nil {
		b.Fatal(err)
	}
	logPath := filepath.Join(work, "node.log")
	logf, err := os.Create(logPath)
	if err != nil {
		b.Fatal(err)
	}
	defer logf.Close()

	args := []string{harness.Binary(b), "node", "--config", config}
	var cmd *exec.Cmd
	if cg != nil {
		// The shell joins the cgroup, then execs the node: nothing runs
		// outside the limit.
		cmd = cg.Command(args...)
		cg.ResetPeak()
	} else {
		cmd = exec.Command(args[0], args[1:]...)
	}
	cmd.Stdout, cmd.Stderr = logf, logf
	cmd.Env = append(os.Environ(), "GOMAXPROCS=64")
	unix.Sync()
	start := time.Now()
	if err := cmd.Start(); err != nil {
		b.Fatal(err)
	}
	exited := make(chan error, 1)
	go func() { exited <- cmd.Wait() }()
	defer func() {
		_ = cmd.Process.Signal(syscall.SIGTERM)
		if err := <-exited; err != nil {
			b.Logf("node exit: %v", err)
		}
	}()

	var m []string
	deadline := time.Now().Add(30 * time.Minute)
	for m == nil {
		select {
		case err := <-exited:
			exited <- err
			log, _ := os.ReadFile(logPath)
			b.Fatalf("node exited during the install: %v\n%s", err, tail(log, 4096))
		case <-time.After(50 * time.Millisecond):
		}
		if time.Now().After(deadline) {
			b.Fatal("install did not finish within 30 minutes")
		}
		m = findLine(b, logPath)
	}
	r := installResult{install: time.Since(start)}
	if r.download, err = time.ParseDuration(m[1]); err != nil {
		b.Fatal(err)
	}
	if r.extract, err = time.ParseDuration(m[2]); err != nil {
		b.Fatal(err)
	}
	r.peakRSS = vmHWM(b, cmd.Process.Pid)
	if cg != nil {
		r.cgroupPeak = cg.Peak()
	}
	b.Logf("install: download %v, extract %v, total %v, peak RSS %d MiB, cgroup peak %d MiB",
		r.download, r.extract, r.install.Round(time.Millisecond), r.peakRSS>>20, r.cgroupPeak>>20)
	return r
}

func findLine(b *testing.B, path string) []string {
	f, err := os.Open(path)
	if err != nil {
		b.Fatal(err)
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	sc.Buffer(make([]byte, 64<<10), 1<<20)
	for sc.Scan() {
		if m := installedLine.FindStringSubmatch(sc.Text()); m != nil {
			return m
		}
	}
	return nil
}

func vmHWM(b *testing.B, pid int) int64 { return procStatus(b, pid, "VmHWM:") << 10 }

// procStatus reads a number (kB values in kB) from /proc/<pid>/status.
func procStatus(b *testing.B, pid int, field string) int64 {
	data, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		b.Fatal(err)
	}
	for line := range strings.SplitSeq(string(data), "\n") {
		if v, ok := strings.CutPrefix(line, field); ok {
			n, err := strconv.ParseInt(strings.TrimSuffix(strings.TrimSpace(v), " kB"), 10, 64)
			if err != nil {
				b.Fatal(err)
			}
			return n
		}
	}
	b.Fatalf("no %s in /proc/<pid>/status", field)
	return 0
}

func removeAll(b *testing.B, dir string) {
	if err := os.RemoveAll(dir); err != nil {
		b.Fatal(err)
	}
}

func tail(b []byte, n int) []byte {
	if len(b) > n {
		return b[len(b)-n:]
	}
	return b
}
