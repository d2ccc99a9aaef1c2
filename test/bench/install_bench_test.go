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
	"sync/atomic"
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
	// download and extract are the two steps of an install that
	// downloads the ZIP first (a tenant that ignores range requests).
	download, extract time.Duration
	// took is the install as the node logs it: from the first request to
	// the artifact's commit.
	took time.Duration
	// peakRSS is VmHWM of the node process once the install is done.
	peakRSS int64
	// cgroupPeak is the memory cgroup's peak usage (heap and page cache),
	// when the run had one.
	cgroupPeak int64
	// diskPeak and diskFinal are the bytes the data dir's filesystem used
	// above its use before the start: at most during the install, and once
	// it was done.
	diskPeak, diskFinal int64
	// cpu is what the whole machine spent (busyCPU) from the node's start
	// to the install's end: the node, a registry or tenant serving it,
	// and the kernel's writeback.
	cpu float64
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
// tenant on loopback with the real node process (prefetch at start-up;
// the ZIP streams, see BenchmarkInstallWhileDownloading), three ways in
// every iteration: without a memory limit, and inside a 64 MiB and a 32
// MiB memory cgroup (heap and page cache both count, as for a DaemonSet's
// memory limit).
//
// Every node process runs with GOMAXPROCS=64, as on a 64-core node (the
// worker pool must follow the memory budget, not the core count). The disk
// is synced before each step so that no step pays for the previous one's
// dirty pages.
func BenchmarkColdInstall(b *testing.B) {
	harness.RequireRoot(b)
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

	srv, tenant := harness.StartTenant(b, faketenant.Options{ModuleSize: moduleSize(b), CacheDir: sharedDir(b, "modules"), HTTP2: true})
	// Generate the ZIP before anything is timed.
	if _, err := srv.ModulePath(srv.Latest()); err != nil {
		b.Fatal(err)
	}
	work := b.TempDir()

	var free, limited, limited32 installResult
	b.ResetTimer()
	for i := 0; i < b.N; i++ {
		free.add(coldInstall(b, tenant, work, nil))
		limited.add(coldInstall(b, tenant, work, cg))
		limited32.add(coldInstall(b, tenant, work, cg32))
	}
	b.StopTimer()
	n := float64(b.N)
	b.ReportMetric(float64(free.peakRSS)/n/(1<<20), "MiB-peak-rss")
	b.ReportMetric(free.took.Seconds()/n, "s-install")
	b.ReportMetric(limited.took.Seconds()/n, "s-install-64MiB")
	b.ReportMetric(limited.took.Seconds()/free.took.Seconds(), "64MiB/free")
	b.ReportMetric(float64(limited.cgroupPeak)/n/(1<<20), "MiB-cgroup-peak")
	b.ReportMetric(float64(limited.peakRSS)/n/(1<<20), "MiB-peak-rss-64MiB")
	b.ReportMetric(limited32.took.Seconds()/n, "s-install-32MiB")
	b.ReportMetric(limited32.took.Seconds()/free.took.Seconds(), "32MiB/free")
	b.ReportMetric(float64(limited32.peakRSS)/n/(1<<20), "MiB-peak-rss-32MiB")
}

func (r *installResult) add(o installResult) {
	r.download += o.download
	r.extract += o.extract
	r.took += o.took
	r.peakRSS += o.peakRSS
	r.cgroupPeak += o.cgroupPeak
	r.diskPeak += o.diskPeak
	r.diskFinal += o.diskFinal
	r.cpu += o.cpu
}

// busyCPU is the CPU time in seconds all cores of the machine have spent
// not idle since boot (/proc/stat: user, nice, system, irq, softirq,
// steal). Differences of it time the CPU of a step including other
// processes and the kernel's threads working for it.
func busyCPU(b *testing.B) float64 {
	b.Helper()
	data, err := os.ReadFile("/proc/stat")
	if err != nil {
		b.Fatal(err)
	}
	line, _, _ := strings.Cut(string(data), "\n")
	fields := strings.Fields(line)
	if len(fields) < 9 || fields[0] != "cpu" {
		b.Fatalf("/proc/stat starts with %q", line)
	}
	var ticks float64
	for i, f := range fields[1:9] {
		if i == 3 || i == 4 { // idle, iowait
			continue
		}
		v, err := strconv.ParseFloat(f, 64)
		if err != nil {
			b.Fatalf("/proc/stat: %v", err)
		}
		ticks += v
	}
	return ticks / clockTicks
}

// clockTicks is USER_HZ, the unit of /proc/stat: 100 on every Linux
// architecture this runs on.
const clockTicks = 100

// installedLine is the provisioner's log line when an install is done (from
// a ZIP or an image); durationField its timings.
var (
	installedLine = regexp.MustCompile(`"installed code module(?: from image)?"`)
	durationField = regexp.MustCompile(`\b(download|extract|install|took)="([^"]+)"`)
)

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
	procs := "64"
	if p := os.Getenv("ONEAGENT_CSI_BENCH_GOMAXPROCS"); p != "" {
		procs = p // e.g. the machine's own core count, to compare
	}
	cmd.Env = append(os.Environ(), "GOMAXPROCS="+procs)
	unix.Sync()
	disk := startDiskSampler(b, dataDir)
	cpu := busyCPU(b)
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

	var line string
	deadline := time.Now().Add(30 * time.Minute)
	for line == "" {
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
		line = findLine(b, logPath)
	}
	var r installResult
	r.cpu = busyCPU(b) - cpu
	r.diskPeak, r.diskFinal = disk.stop()
	if dir := os.Getenv("ONEAGENT_CSI_BENCH_LOG_DIR"); dir != "" {
		// Keep the node's log (e.g. with GODEBUG=gctrace=1 in the environment).
		logCount++
		if data, err := os.ReadFile(logPath); err == nil {
			_ = os.WriteFile(filepath.Join(dir, fmt.Sprintf("node-%03d.log", logCount)), data, 0o644)
		}
	}
	for _, f := range durationField.FindAllStringSubmatch(line, -1) {
		d, err := time.ParseDuration(f[2])
		if err != nil {
			b.Fatalf("%s=%q: %v", f[1], f[2], err)
		}
		switch f[1] {
		case "download":
			r.download = d
		case "extract":
			r.extract = d
		default:
			r.took = d
		}
	}
	if r.took == 0 {
		r.took = r.download + r.extract
	}
	r.peakRSS = vmHWM(b, cmd.Process.Pid)
	if cg != nil {
		r.cgroupPeak = cg.Peak()
	}
	b.Logf("install: %v (download %v, extract %v, %.1f CPU-s), peak RSS %d MiB (now: anon %d MiB, file %d MiB), cgroup peak %d MiB, disk peak %d MiB, final %d MiB",
		r.took, r.download, r.extract, r.cpu, r.peakRSS>>20, procStatus(b, cmd.Process.Pid, "RssAnon:")>>10, procStatus(b, cmd.Process.Pid, "RssFile:")>>10,
		r.cgroupPeak>>20, r.diskPeak>>20, r.diskFinal>>20)
	return r
}

// logCount numbers the node logs kept in $ONEAGENT_CSI_BENCH_LOG_DIR.
var logCount int

// diskSampler polls the used bytes of a filesystem.
type diskSampler struct {
	base    int64
	peak    atomic.Int64
	stopped chan struct{}
	done    chan struct{}
	dir     string
}

// startDiskSampler records the use of dir's filesystem (dir's parent when
// dir does not exist yet) and polls it every 5 ms.
func startDiskSampler(b *testing.B, dir string) *diskSampler {
	b.Helper()
	d := &diskSampler{dir: filepath.Dir(dir), stopped: make(chan struct{}), done: make(chan struct{})}
	d.base = d.used(b)
	go func() {
		defer close(d.done)
		t := time.NewTicker(5 * time.Millisecond)
		defer t.Stop()
		for {
			var st unix.Statfs_t
			if unix.Statfs(d.dir, &st) == nil {
				if u := int64(st.Blocks-st.Bfree) * st.Bsize; u > d.peak.Load() {
					d.peak.Store(u)
				}
			}
			select {
			case <-d.stopped:
				return
			case <-t.C:
			}
		}
	}()
	return d
}

func (d *diskSampler) used(b *testing.B) int64 {
	var st unix.Statfs_t
	if err := unix.Statfs(d.dir, &st); err != nil {
		b.Fatal(err)
	}
	return int64(st.Blocks-st.Bfree) * st.Bsize
}

// stop returns the peak and the current use above the use at the start.
func (d *diskSampler) stop() (peak, final int64) {
	close(d.stopped)
	<-d.done
	var st unix.Statfs_t
	_ = unix.Statfs(d.dir, &st)
	final = int64(st.Blocks-st.Bfree)*st.Bsize - d.base
	return max(d.peak.Load()-d.base, final), final
}

func findLine(b *testing.B, path string) string {
	f, err := os.Open(path)
	if err != nil {
		b.Fatal(err)
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	sc.Buffer(make([]byte, 64<<10), 1<<20)
	for sc.Scan() {
		if installedLine.MatchString(sc.Text()) {
			return sc.Text()
		}
	}
	return ""
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
