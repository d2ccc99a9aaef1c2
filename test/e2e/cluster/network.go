package cluster

import (
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"time"

	"golang.org/x/sys/unix"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
)

// A networked cluster's pod network: one bridge on the host whose address
// is the node's address (NodeIP), pods on the rest of the subnet. The
// subnet is private to this machine: nothing outside it routes there.
const (
	bridgeName = "oacsi-e2e0"
	// NetworkedNodeIP is the node's address in a networked cluster: the
	// bridge's address, reachable from pods and from the host.
	NetworkedNodeIP = "10.244.0.1"
	podSubnet       = "10.244.0.0/24"
	serviceSubnet   = "10.0.0.0/24"
	// apiServiceIP is the first address of serviceSubnet: the kubernetes
	// Service, which in-cluster clients call.
	apiServiceIP = "10.0.0.1"
	// KubeletRootDir is kubelet's --root-dir in a networked cluster: the path
	// the deploy manifests mount.
	KubeletRootDir = "/var/lib/kubelet"
	// cniBinDir is where Debian's containernetworking-plugins installs the
	// reference plugins.
	cniBinDir = "/usr/lib/cni"
)

// networkedTools are the commands a networked cluster needs beyond the
// others, with the Debian package that has each.
var networkedTools = map[string]string{
	cniBinDir + "/bridge": "containernetworking-plugins", cniBinDir + "/host-local": "containernetworking-plugins",
	cniBinDir + "/loopback": "containernetworking-plugins", cniBinDir + "/portmap": "containernetworking-plugins",
	"iptables": "iptables", "ip": "iproute2",
}

func checkNetworkedTools() error {
	var missing []string
	for tool, pkg := range networkedTools {
		if strings.HasPrefix(tool, "/") {
			if _, err := os.Stat(tool); err != nil {
				missing = append(missing, tool+" (apt-get install "+pkg+")")
			}
		} else if _, err := exec.LookPath(tool); err != nil {
			missing = append(missing, tool+" (apt-get install "+pkg+")")
		}
	}
	if len(missing) > 0 {
		return fmt.Errorf("a networked cluster needs %s", strings.Join(missing, ", "))
	}
	return nil
}

// setupPodNetwork creates the bridge with the node's address and writes the
// CNI configuration containerd reads. The bridge plugin adopts the bridge
// (same name, same gateway address), so NodeIP exists before the first pod.
func (c *Cluster) setupPodNetwork() error {
	if out, err := exec.Command("ip", "link", "show", bridgeName).CombinedOutput(); err == nil {
		return fmt.Errorf("bridge %s exists: another networked cluster runs, or one was not stopped (ip link del %s)", bridgeName, bridgeName)
	} else if !strings.Contains(string(out), "does not exist") {
		return fmt.Errorf("ip link show %s: %w: %s", bridgeName, err, out)
	}
	for _, args := range [][]string{
		{"link", "add", bridgeName, "type", "bridge"},
		{"addr", "add", NetworkedNodeIP + "/24", "dev", bridgeName},
		{"link", "set", bridgeName, "up"},
	} {
		if out, err := exec.Command("ip", args...).CombinedOutput(); err != nil {
			return fmt.Errorf("ip %s: %w: %s", strings.Join(args, " "), err, out)
		}
	}
	c.bridge = true
	conf := fmt.Sprintf(`{
  "cniVersion": "1.0.0",
  "name": "oneagent-csi-e2e",
  "plugins": [
    {"type": "bridge", "bridge": %q, "isGateway": true, "ipMasq": false, "hairpinMode": true,
     "ipam": {"type": "host-local", "ranges": [[{"subnet": %q, "gateway": %q}]], "routes": [{"dst": "0.0.0.0/0"}],
              "dataDir": %q}},
    {"type": "portmap", "capabilities": {"portMappings": true}}
  ]
}
`, bridgeName, podSubnet, NetworkedNodeIP, filepath.Join(c.Dir, "cni", "ipam"))
	return os.WriteFile(filepath.Join(c.Dir, "cni", "conf", "10-oneagent-csi-e2e.conflist"), []byte(conf), 0o644)
}

// makeShared bind-mounts each dir onto itself as a shared mount, as every
// path is on a systemd host: a hostPath below it may then use Bidirectional
// mount propagation. Stop unmounts them.
func (c *Cluster) makeShared(dirs []string) error {
	for _, d := range dirs {
		if _, err := os.Stat(d); errors.Is(err, os.ErrNotExist) {
			c.createdOutside = append(c.createdOutside, d)
		}
		if err := os.MkdirAll(d, 0o755); err != nil {
			return err
		}
		if err := unix.Mount(d, d, "", unix.MS_BIND, ""); err != nil {
			return fmt.Errorf("bind %s: %w", d, err)
		}
		c.sharedDirs = append(c.sharedDirs, d)
		if err := unix.Mount("", d, "", unix.MS_SHARED, ""); err != nil {
			return fmt.Errorf("make %s shared: %w", d, err)
		}
	}
	return nil
}

// startControlPlaneControllers starts kube-controller-manager (Deployments,
// DaemonSets, ServiceAccounts, EndpointSlices, the kube-root-ca.crt
// ConfigMaps) and kube-scheduler, both with the admin kubeconfig.
func (c *Cluster) startControlPlaneControllers(caFile, saKey string) error {
	if _, err := c.startProc("kube-controller-manager", filepath.Join(c.K8sBin, "kube-controller-manager"), []string{
		"--kubeconfig", c.Kubeconfig, "--leader-elect=false", "--bind-address", "127.0.0.1", "--secure-port", "0",
		"--root-ca-file", caFile, "--service-account-private-key-file", saKey, "--use-service-account-credentials=false",
		"--cluster-cidr", podSubnet, "--service-cluster-ip-range", serviceSubnet, "--allocate-node-cidrs=false",
		// Quick reactions keep the test short; the defaults suit real fleets.
		"--concurrent-deployment-syncs", "5", "--node-monitor-grace-period", "40s",
	}); err != nil {
		return err
	}
	port, err := freePort()
	if err != nil {
		return err
	}
	_, err = c.startProc("kube-scheduler", filepath.Join(c.K8sBin, "kube-scheduler"), []string{
		"--kubeconfig", c.Kubeconfig, "--leader-elect=false", "--bind-address", "127.0.0.1", "--secure-port", strconv.Itoa(port),
		"--authentication-skip-lookup=true",
	})
	return err
}

// startKubeProxy runs kube-proxy in iptables mode, so that pods reach
// Services (the API server's among them) by their cluster IP.
func (c *Cluster) startKubeProxy(ctx context.Context) error {
	healthz, err := freePort()
	if err != nil {
		return err
	}
	metrics, err := freePort()
	if err != nil {
		return err
	}
	if _, err := c.startProc("kube-proxy", filepath.Join(c.K8sBin, "kube-proxy"), []string{
		"--kubeconfig", c.Kubeconfig, "--hostname-override", NodeName, "--proxy-mode", "iptables",
		"--cluster-cidr", podSubnet, "--healthz-bind-address", fmt.Sprintf("127.0.0.1:%d", healthz),
		"--metrics-bind-address", fmt.Sprintf("127.0.0.1:%d", metrics),
		// Leave the machine's sysctls alone: no conntrack sizes, no
		// route_localnet for node ports on 127.0.0.1.
		"--iptables-localhost-nodeports=false", "--conntrack-max-per-core", "0", "--conntrack-tcp-timeout-established", "0", "--conntrack-tcp-timeout-close-wait", "0",
	}); err != nil {
		return err
	}
	c.kubeProxy = true
	// Ready once the kubernetes Service is programmed: a connection to its
	// cluster IP from the host reaches the API server.
	return Poll(ctx, 60*time.Second, "kube-proxy to program the kubernetes Service", func() bool {
		conn, err := net.DialTimeout("tcp", apiServiceIP+":443", time.Second)
		if err != nil {
			return false
		}
		_ = conn.Close()
		return true
	})
}

// waitNodeReady waits for the node to be Ready: kubelet has read the CNI
// configuration, and the node lifecycle controller lifts its not-ready
// taint, so the scheduler places pods there.
func (c *Cluster) waitNodeReady(ctx context.Context) error {
	return Poll(ctx, 90*time.Second, "node Ready", func() bool {
		n, err := c.Client.CoreV1().Nodes().Get(ctx, NodeName, metav1.GetOptions{})
		if err != nil {
			return false
		}
		for _, cond := range n.Status.Conditions {
			if cond.Type == corev1.NodeReady {
				return cond.Status == corev1.ConditionTrue
			}
		}
		return false
	})
}

// stopNetworking removes what a networked cluster set up on the host:
// kube-proxy's rules, the bridge, the shared mounts.
func (c *Cluster) stopNetworking() {
	if c.kubeProxy {
		_ = exec.Command(filepath.Join(c.K8sBin, "kube-proxy"), "--cleanup").Run()
	}
	if c.Networked {
		removeKubeChains()
	}
	if c.bridge {
		_ = exec.Command("ip", "link", "del", bridgeName).Run()
	}
	for i := len(c.sharedDirs) - 1; i >= 0; i-- {
		unmountBelow(c.sharedDirs[i])
	}
}

// removeKubeChains removes the iptables chains kubelet and kube-proxy leave
// behind after `kube-proxy --cleanup` (KUBE-FIREWALL, the kubelet's
// canaries): the jumps to them from the built-in chains, then the chains.
func removeKubeChains() {
	for _, table := range []string{"filter", "nat", "mangle"} {
		out, err := exec.Command("iptables", "-t", table, "-S").Output()
		if err != nil {
			continue
		}
		var chains []string
		for _, line := range strings.Split(string(out), "\n") {
			f := strings.Fields(line)
			switch {
			case len(f) == 2 && f[0] == "-N" && strings.HasPrefix(f[1], "KUBE-"):
				chains = append(chains, f[1])
			case len(f) > 3 && f[0] == "-A" && !strings.HasPrefix(f[1], "KUBE-") && strings.Contains(line, " -j KUBE-"):
				_ = exec.Command("iptables", append([]string{"-t", table, "-D"}, f[1:]...)...).Run()
			}
		}
		for _, ch := range chains {
			_ = exec.Command("iptables", "-t", table, "-F", ch).Run()
		}
		for _, ch := range chains {
			_ = exec.Command("iptables", "-t", table, "-X", ch).Run()
		}
	}
}
