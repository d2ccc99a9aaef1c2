package bench

import (
	"fmt"
	"os"
	"path/filepath"
	"testing"
)

// shared holds what the benchmarks prepare once per process (the generated
// module ZIP, its tar.gz, crane): `go test -bench` runs every benchmark
// once with b.N=1 before the measured run, and the setup of a 1 GiB module
// takes minutes. $ONEAGENT_CSI_BENCH_CACHE keeps it between runs instead.
var shared string

func TestMain(m *testing.M) {
	shared = os.Getenv("ONEAGENT_CSI_BENCH_CACHE")
	keep := shared != ""
	if !keep {
		var err error
		if shared, err = os.MkdirTemp("", "oneagent-csi-bench-"); err != nil {
			fmt.Fprintln(os.Stderr, err)
			os.Exit(1)
		}
	}
	code := m.Run()
	if !keep {
		_ = os.RemoveAll(shared)
	}
	os.Exit(code)
}

// sharedDir returns a dir below shared, created on first use.
func sharedDir(b *testing.B, name string) string {
	b.Helper()
	dir := filepath.Join(shared, name)
	if err := os.MkdirAll(dir, 0o755); err != nil {
		b.Fatal(err)
	}
	return dir
}
