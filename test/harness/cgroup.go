package harness

import (
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
)

// MemoryCgroup is a memory cgroup made for a test or benchmark, v1 or v2.
type MemoryCgroup struct {
	dir, procs string
	v2         bool
}

// NewMemoryCgroup makes a memory cgroup limited to limit bytes (no swap).
func NewMemoryCgroup(limit int64) (*MemoryCgroup, error) {
	name := fmt.Sprintf("oneagent-csi-test-%d-%d", os.Getpid(), limit>>20)
	cg := &MemoryCgroup{}
	if _, err := os.Stat("/sys/fs/cgroup/cgroup.controllers"); err == nil {
		cg.v2, cg.dir = true, filepath.Join("/sys/fs/cgroup", name)
	} else {
		cg.dir = filepath.Join("/sys/fs/cgroup/memory", name)
	}
	if err := os.Mkdir(cg.dir, 0o755); err != nil {
		return nil, err
	}
	cg.procs = filepath.Join(cg.dir, "cgroup.procs")
	file, value := "memory.limit_in_bytes", strconv.FormatInt(limit, 10)
	if cg.v2 {
		file = "memory.max"
	}
	if err := os.WriteFile(filepath.Join(cg.dir, file), []byte(value), 0o644); err != nil {
		cg.Remove()
		return nil, err
	}
	if cg.v2 {
		_ = os.WriteFile(filepath.Join(cg.dir, "memory.swap.max"), []byte("0"), 0o644)
	}
	return cg, nil
}

// Wrapper is a command prefix that runs a command inside the cgroup: a shell
// joins it, then execs the command, so nothing runs outside the limit.
func (c *MemoryCgroup) Wrapper() []string {
	return []string{"sh", "-c", `echo $$ > "$0" && exec "$@"`, c.procs}
}

// Command runs argv inside the cgroup.
func (c *MemoryCgroup) Command(argv ...string) *exec.Cmd {
	w := append(c.Wrapper(), argv...)
	return exec.Command(w[0], w[1:]...)
}

// ResetPeak starts a new peak measurement (v1 only; v2's memory.peak counts
// from the cgroup's creation).
func (c *MemoryCgroup) ResetPeak() {
	if !c.v2 {
		_ = os.WriteFile(filepath.Join(c.dir, "memory.max_usage_in_bytes"), []byte("0"), 0o644)
	}
}

// Peak is the cgroup's peak memory use (heap and page cache).
func (c *MemoryCgroup) Peak() int64 {
	file := "memory.max_usage_in_bytes"
	if c.v2 {
		file = "memory.peak"
	}
	data, err := os.ReadFile(filepath.Join(c.dir, file))
	if err != nil {
		return 0
	}
	n, _ := strconv.ParseInt(strings.TrimSpace(string(data)), 10, 64)
	return n
}

// Remove deletes the cgroup (it must be empty).
func (c *MemoryCgroup) Remove() { _ = os.Remove(c.dir) }
