// Package nodeprocess checks how the real node process sets itself up on a
// node: its memory limits inside a container's memory cgroup.
package nodeprocess

import (
	"os"
	"regexp"
	"testing"

	"github.com/oneagent-csi/oneagent-csi/test/faketenant"
	"github.com/oneagent-csi/oneagent-csi/test/harness"
)

var memoryLine = regexp.MustCompile(`"memory" cgroupLimit=(\d+) .*goMemLimit=(\d+) gcPercent=(\d+) extractMemory=(\d+) extractWorkers=(\d+) pageCache=(\d+)`)

// Inside a 64 MiB memory cgroup (cgroup v1 on this machine, v2 elsewhere)
// the node sets the Go memory limit to 7/8 of it unless GOMEMLIMIT is set,
// collects garbage at 25% growth unless GOGC is set, and sizes extraction
// and page cache from the limit, whatever GOMAXPROCS says.
func TestMemoryLimitsFollowTheCgroup(t *testing.T) {
	harness.RequireRoot(t)
	cg, err := harness.NewMemoryCgroup(64 << 20)
	if err != nil {
		t.Skipf("no memory cgroup: %v", err)
	}
	t.Cleanup(cg.Remove)
	tests := []struct {
		name string
		env  []string
		want []string // cgroupLimit, goMemLimit, gcPercent, extractMemory, extractWorkers, pageCache
	}{
		{"from the cgroup", []string{"GOMAXPROCS=64"}, []string{"67108864", "58720256", "25", "4194304", "6", "4194304"}},
		{"GOMEMLIMIT and GOGC win", []string{"GOMAXPROCS=64", "GOMEMLIMIT=100MiB", "GOGC=80"}, []string{"67108864", "104857600", "80", "4194304", "6", "4194304"}},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			e := harness.NewProcessEnv(t, faketenant.Options{}, false)
			p := e.StartWithEnv(tc.env, cg.Wrapper()...)
			p.Stop(t)
			log, err := os.ReadFile(p.Log)
			if err != nil {
				t.Fatal(err)
			}
			m := memoryLine.FindStringSubmatch(string(log))
			if m == nil {
				t.Fatalf("no memory line in the node log:\n%s", log)
			}
			for i, want := range tc.want {
				if m[i+1] != want {
					t.Errorf("memory line %q: field %d = %s, want %s", m[0], i, m[i+1], want)
				}
			}
		})
	}
}
