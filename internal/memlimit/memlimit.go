// Package memlimit reads the memory limit of the process's cgroup (v1 or
// v2) so that the Go runtime's soft memory limit and memory-hungry work can
// be sized to the container's limit instead of the node's size.
package memlimit

import (
	"bufio"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"strconv"
	"strings"
)

// unlimited is what cgroup v1 reports for "no limit" (and anything above
// it means the same).
const unlimited = 1 << 62

// Options tell where the cgroup files are. Zero fields take the defaults.
type Options struct {
	// ProcCgroup is the process's cgroup list. Default /proc/self/cgroup.
	ProcCgroup string
	// Root is the cgroup filesystem root. Default /sys/fs/cgroup.
	Root string
}

// FromCgroup returns the memory limit of the process's cgroup in bytes, 0
// when there is none, and where it was read.
func FromCgroup(opts Options) (int64, string, error) {
	if opts.ProcCgroup == "" {
		opts.ProcCgroup = "/proc/self/cgroup"
	}
	if opts.Root == "" {
		opts.Root = "/sys/fs/cgroup"
	}
	f, err := os.Open(opts.ProcCgroup)
	if err != nil {
		return 0, "", err
	}
	defer f.Close()
	var candidates []string
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		// hierarchy-ID:controller-list:cgroup-path
		parts := strings.SplitN(sc.Text(), ":", 3)
		if len(parts) != 3 {
			continue
		}
		switch {
		case parts[0] == "0" && parts[1] == "":
			candidates = append(candidates, filepath.Join(opts.Root, parts[2], "memory.max"),
				filepath.Join(opts.Root, "unified", parts[2], "memory.max"))
		case hasController(parts[1], "memory"):
			candidates = append(candidates, filepath.Join(opts.Root, "memory", parts[2], "memory.limit_in_bytes"))
		}
	}
	if err := sc.Err(); err != nil {
		return 0, "", err
	}
	// v1's memory controller first: on hybrid hosts the v2 tree has none.
	for i := len(candidates) - 1; i >= 0; i-- {
		limit, err := readLimit(candidates[i])
		if errors.Is(err, fs.ErrNotExist) {
			// Inside a cgroup namespace the path may be "/" while the
			// files are at the root; try that too.
			continue
		}
		if err != nil {
			return 0, candidates[i], err
		}
		if limit > 0 {
			return limit, candidates[i], nil
		}
	}
	return 0, "", nil
}

func hasController(list, name string) bool {
	for _, c := range strings.Split(list, ",") {
		if c == name {
			return true
		}
	}
	return false
}

// readLimit reads a limit file: a number, or "max" (v2) for none.
func readLimit(path string) (int64, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return 0, err
	}
	s := strings.TrimSpace(string(b))
	if s == "max" {
		return 0, nil
	}
	n, err := strconv.ParseInt(s, 10, 64)
	if err != nil {
		return 0, fmt.Errorf("%s: %q is not a limit", path, s)
	}
	if n <= 0 || n >= unlimited {
		return 0, nil
	}
	return n, nil
}

// GoLimit is the soft memory limit for the Go runtime in a container limited
// to limit bytes: seven eighths. The rest is left to what the cgroup counts
// besides the Go runtime: the binary's pages and the page cache, both
// reclaimable, of which the installs keep only a bounded part dirty. Less
// leaves too little above the node's own live heap and runtime overhead:
// at 32 MiB, a limit of 70% made the garbage collector run without pause
// and the 1 GiB install took 1.3 times as long; at 7/8 it takes as long as
// without a limit (BENCHMARKS.md).
func GoLimit(limit int64) int64 {
	return limit / 8 * 7
}

// GCPercent is the node's garbage collection target (GOGC) unless the
// environment sets one: the heap may grow to 1.25x its live size, not 2x.
// The node's live heap is mostly long-lived buffers and plans, and it
// allocates little per file: at 25 an install of the 1 GiB module ran a
// dozen collections, took the same time, and peaked at 46 MiB RSS instead
// of 60 (BENCHMARKS.md, cold install).
const GCPercent = 25
