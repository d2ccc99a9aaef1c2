package cluster

import (
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"strings"
)

// KubectlCmd is kubectl (built with the cluster's binaries) against the
// cluster, with a cache dir of its own.
func (c *Cluster) KubectlCmd(args ...string) *exec.Cmd {
	cmd := exec.Command(filepath.Join(c.K8sBin, "kubectl"), append([]string{"--kubeconfig", c.Kubeconfig}, args...)...)
	cmd.Env = append(os.Environ(), "KUBECACHEDIR="+filepath.Join(c.Dir, "kubectl-cache"))
	return cmd
}

// ContainerPID finds the host pid of a container's first process from its
// status's container id.
func (c *Cluster) ContainerPID(containerID string) (string, error) {
	id := strings.TrimPrefix(containerID, "containerd://")
	out, err := exec.Command("ctr", "-a", c.ContainerdSocket, "-n", "k8s.io", "tasks", "ls").Output()
	if err != nil {
		return "", fmt.Errorf("ctr tasks ls: %w", err)
	}
	for _, line := range strings.Split(string(out), "\n") {
		if f := strings.Fields(line); len(f) >= 2 && f[0] == id {
			return f[1], nil
		}
	}
	return "", fmt.Errorf("no task for container %q in\n%s", id, out)
}

// MountOptions returns the per-mount options of target from the host's
// mountinfo, and whether it is mounted.
func MountOptions(target string) (string, bool) {
	data, _ := os.ReadFile("/proc/self/mountinfo")
	for _, line := range strings.Split(string(data), "\n") {
		if f := strings.Fields(line); len(f) > 5 && f[4] == target {
			return f[5], true
		}
	}
	return "", false
}

// MountsBelow lists the host's mount points at or below dir.
func MountsBelow(dir string) []string {
	data, _ := os.ReadFile("/proc/self/mountinfo")
	var out []string
	for _, line := range strings.Split(string(data), "\n") {
		if f := strings.Fields(line); len(f) > 4 && (f[4] == dir || strings.HasPrefix(f[4], dir+"/")) {
			out = append(out, f[4])
		}
	}
	sort.Strings(out)
	return out
}
