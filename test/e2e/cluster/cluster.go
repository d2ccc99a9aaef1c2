// Package cluster runs a one-node Kubernetes cluster on this machine for the
// e2e tests: etcd, kube-apiserver, containerd (Debian's) and a real kubelet,
// all on loopback, all state below one directory. There is no scheduler,
// controller-manager or CNI: pods set nodeName and hostNetwork. The recipe
// and its pitfalls are in shared/notes/real-node.md.
//
// A networked cluster (Options.Networked) is a node as a user has one:
// kube-scheduler, kube-controller-manager, kube-proxy and pod networking
// from the CNI reference plugins, kubelet's root dir at /var/lib/kubelet;
// the deploy manifests run there unchanged.
package cluster

import (
	"context"
	"crypto/tls"
	"crypto/x509/pkix"
	"errors"
	"fmt"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"time"

	"golang.org/x/sys/unix"
	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/rest"
)

// NodeName resolves to 127.0.0.1, so the API server's calls to the kubelet
// (logs, exec) stay on loopback.
const NodeName = "localhost"

const token = "e2e-admin-token"

// Options configure Start.
type Options struct {
	// K8sBin holds kube-apiserver, etcd and kubelet (scripts/build-k8s.sh).
	K8sBin string
	// OneAgentCSI is the oneagent-csi binary, for the init image when Image
	// is empty.
	OneAgentCSI string
	// Image is the OCI tarball `make image` writes; it is imported and
	// tagged InitImage. Empty: InitImage is built from OneAgentCSI.
	Image string
	// Dir holds all state; it is removed by Stop.
	Dir string
	// Networked adds kube-scheduler, kube-controller-manager, kube-proxy and
	// a pod network (CNI bridge, host-local, loopback, portmap) on
	// NetworkedNodeIP, where the API server listens; kubelet's root dir is
	// KubeletRootDir. One networked cluster runs at a time.
	Networked bool
	// SharedDirs are host dirs made shared mounts before kubelet starts, as
	// every path is on a systemd host (a hostPath with Bidirectional
	// propagation needs it). Networked clusters only.
	SharedDirs []string
}

// Cluster is a running one-node cluster.
type Cluster struct {
	Options
	Dir        string
	Kubeconfig string
	Client     kubernetes.Interface
	Config     *rest.Config
	// KubeletRoot is kubelet's --root-dir: pods' volumes live below it.
	KubeletRoot string
	// ContainerdSocket is the CRI socket.
	ContainerdSocket string
	// NodeIP is where the API server listens and pods reach the node
	// (127.0.0.1 unless Networked).
	NodeIP string
	// CAFile is the cluster CA (kubelet client certificates; a networked
	// cluster's API server certificate too).
	CAFile         string
	procs          []*proc
	lock           *os.File
	bridge         bool
	kubeProxy      bool
	sharedDirs     []string
	kubelet        *proc
	createdOutside []string
}

func freePort() (int, error) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return 0, err
	}
	defer l.Close()
	return l.Addr().(*net.TCPAddr).Port, nil
}

// Start brings the cluster up; on error it stops what it started.
func Start(ctx context.Context, o Options) (c *Cluster, err error) {
	c = &Cluster{Options: o, Dir: o.Dir}
	// One cluster at a time on a machine: kubelet and containerd use fixed
	// host paths (/var/lib/kubelet, /run/containerd), which a second
	// cluster's Stop would remove under the first. Test packages that start
	// clusters in parallel wait here.
	if c.lock, err = os.OpenFile(filepath.Join(os.TempDir(), "oneagent-csi-e2e-cluster.lock"), os.O_CREATE|os.O_RDWR, 0o600); err != nil {
		return nil, err
	}
	if err := unix.Flock(int(c.lock.Fd()), unix.LOCK_EX); err != nil {
		c.lock.Close()
		return nil, fmt.Errorf("lock: %w", err)
	}
	defer func() {
		if err != nil {
			err = fmt.Errorf("%w%s", err, c.logTails())
			c.Stop()
		}
	}()
	for _, d := range []string{"logs", "pki", "etcd", "kubelet", "containerd", "pod-logs", "images", "cni/bin", "cni/conf"} {
		if err := os.MkdirAll(filepath.Join(c.Dir, d), 0o755); err != nil {
			return c, err
		}
	}
	c.KubeletRoot, c.NodeIP = filepath.Join(c.Dir, "kubelet"), "127.0.0.1"
	if o.Networked {
		if err := checkNetworkedTools(); err != nil {
			return c, err
		}
		c.KubeletRoot, c.NodeIP = KubeletRootDir, NetworkedNodeIP
	}
	// Paths kubelet and containerd create outside their configured dirs
	// (hard-coded); removed by Stop when this run created them.
	for _, p := range []string{"/var/lib/kubelet", "/var/lib/kubelet/device-plugins", "/var/log/containers", "/run/containerd"} {
		if _, err := os.Stat(p); errors.Is(err, os.ErrNotExist) {
			c.createdOutside = append(c.createdOutside, p)
		}
	}
	pki := filepath.Join(c.Dir, "pki")
	authority, err := newCA("oneagent-csi-e2e-ca")
	if err != nil {
		return c, err
	}
	caFile := filepath.Join(pki, "ca.crt")
	if err := os.WriteFile(caFile, authority.pem, 0o644); err != nil {
		return c, err
	}
	c.CAFile = caFile
	clientCrt, clientKey, err := authority.issue(pki, "kubelet-client", pkix.Name{CommonName: "kube-apiserver-kubelet-client", Organization: []string{"system:masters"}}, nil, 2)
	if err != nil {
		return c, err
	}
	saKey, saPub, err := writeKeyPair(pki)
	if err != nil {
		return c, err
	}
	tokens := filepath.Join(pki, "tokens.csv")
	if err := os.WriteFile(tokens, []byte(token+",admin,admin-uid,system:masters\n"), 0o600); err != nil {
		return c, err
	}
	ports := map[string]int{}
	for _, n := range []string{"etcd", "etcd-peer", "etcd-metrics", "apiserver", "kubelet", "kubelet-healthz"} {
		if ports[n], err = freePort(); err != nil {
			return c, err
		}
	}
	etcdURL := fmt.Sprintf("http://127.0.0.1:%d", ports["etcd"])
	peerURL := fmt.Sprintf("http://127.0.0.1:%d", ports["etcd-peer"])
	if _, err := c.startProc("etcd", filepath.Join(o.K8sBin, "etcd"), []string{
		"--data-dir", filepath.Join(c.Dir, "etcd"), "--listen-client-urls", etcdURL, "--advertise-client-urls", etcdURL,
		"--listen-peer-urls", peerURL, "--initial-advertise-peer-urls", peerURL, "--initial-cluster", "default=" + peerURL,
		"--listen-metrics-urls", fmt.Sprintf("http://127.0.0.1:%d", ports["etcd-metrics"]),
	}); err != nil {
		return c, err
	}
	apiserverArgs := []string{
		"--etcd-servers", etcdURL, "--bind-address", c.NodeIP, "--advertise-address", c.NodeIP,
		"--secure-port", strconv.Itoa(ports["apiserver"]), "--cert-dir", filepath.Join(pki, "apiserver"),
		"--service-account-issuer", "https://kubernetes.default.svc", "--service-account-key-file", saPub,
		"--service-account-signing-key-file", saKey, "--token-auth-file", tokens, "--authorization-mode", "RBAC",
		"--service-cluster-ip-range", serviceSubnet, "--allow-privileged=true", "--kubelet-preferred-address-types", "Hostname",
		"--kubelet-client-certificate", clientCrt, "--kubelet-client-key", clientKey,
	}
	if o.Networked {
		if err := c.setupPodNetwork(); err != nil {
			return c, err
		}
		// Pods verify the API server with the cluster CA (kube-root-ca.crt)
		// at the kubernetes Service's address; webhooks are called at their
		// Service's endpoints (there is no kube-proxy in the API server's
		// path to a cluster IP it picks).
		crt, key, err := authority.issue(pki, "apiserver", pkix.Name{CommonName: "kube-apiserver"},
			[]net.IP{net.ParseIP(c.NodeIP), net.ParseIP(apiServiceIP), net.ParseIP("127.0.0.1")}, 3)
		if err != nil {
			return c, err
		}
		apiserverArgs = append(apiserverArgs, "--tls-cert-file", crt, "--tls-private-key-file", key, "--enable-aggregator-routing=true")
	} else {
		apiserverArgs = append(apiserverArgs, "--endpoint-reconciler-type", "none")
	}
	if _, err := c.startProc("kube-apiserver", filepath.Join(o.K8sBin, "kube-apiserver"), apiserverArgs); err != nil {
		return c, err
	}
	host := fmt.Sprintf("https://%s:%d", c.NodeIP, ports["apiserver"])
	c.Config = &rest.Config{Host: host, BearerToken: token, TLSClientConfig: rest.TLSClientConfig{Insecure: true}, QPS: 100, Burst: 200}
	if c.Client, err = kubernetes.NewForConfig(c.Config); err != nil {
		return c, err
	}
	if err := Poll(ctx, 60*time.Second, "kube-apiserver ready", func() bool { return c.apiserverReady(ctx) }); err != nil {
		return c, err
	}
	c.Kubeconfig = filepath.Join(c.Dir, "kubeconfig")
	kubeconfig := fmt.Sprintf(`apiVersion: v1
kind: Config
clusters: [{name: e2e, cluster: {server: %q, insecure-skip-tls-verify: true}}]
users: [{name: admin, user: {token: %q}}]
contexts: [{name: e2e, context: {cluster: e2e, user: admin}}]
current-context: e2e
`, host, token)
	if err := os.WriteFile(c.Kubeconfig, []byte(kubeconfig), 0o600); err != nil {
		return c, err
	}

	if o.Networked {
		if err := c.startControlPlaneControllers(caFile, saKey); err != nil {
			return c, err
		}
		if err := c.makeShared(o.SharedDirs); err != nil {
			return c, err
		}
	}
	if err := c.startContainerd(ctx); err != nil {
		return c, err
	}
	if err := c.importImages(); err != nil {
		return c, err
	}
	if err := c.startKubelet(ctx, caFile, ports["kubelet"], ports["kubelet-healthz"]); err != nil {
		return c, err
	}
	if o.Networked {
		if err := c.startKubeProxy(ctx); err != nil {
			return c, err
		}
		if err := c.waitNodeReady(ctx); err != nil {
			return c, err
		}
	}
	return c, c.EnsureNamespace(ctx, "default", nil)
}

func (c *Cluster) apiserverReady(ctx context.Context) bool {
	tr := &http.Transport{TLSClientConfig: &tls.Config{InsecureSkipVerify: true}} //nolint:gosec // a throwaway local apiserver with a self-signed certificate
	defer tr.CloseIdleConnections()
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, c.Config.Host+"/readyz", nil)
	if err != nil {
		return false
	}
	req.Header.Set("Authorization", "Bearer "+token)
	resp, err := (&http.Client{Transport: tr, Timeout: 2 * time.Second}).Do(req)
	if err != nil {
		return false
	}
	resp.Body.Close()
	return resp.StatusCode == http.StatusOK
}

func (c *Cluster) startContainerd(ctx context.Context) error {
	d := filepath.Join(c.Dir, "containerd")
	c.ContainerdSocket = filepath.Join(d, "containerd.sock")
	config := fmt.Sprintf(`version = 2
root = %[1]q
state = %[2]q
[grpc]
  address = %[3]q
[ttrpc]
  address = %[4]q
[plugins."io.containerd.internal.v1.opt"]
  path = %[5]q
[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = %[6]q
  stream_server_address = "127.0.0.1"
  stream_server_port = "0"
  enable_selinux = false
  # root here lacks CAP_SYS_RESOURCE: runc cannot lower oom_score_adj
  restrict_oom_score_adj = true
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = %[7]q
    conf_dir = %[8]q
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        SystemdCgroup = false
        Root = %[9]q
`, filepath.Join(d, "root"), filepath.Join(d, "state"), c.ContainerdSocket, c.ContainerdSocket+".ttrpc", filepath.Join(d, "opt"),
		PauseImage, c.cniBinDir(), filepath.Join(c.Dir, "cni/conf"), filepath.Join(d, "runc"))
	cfg := filepath.Join(d, "config.toml")
	if err := os.WriteFile(cfg, []byte(config), 0o644); err != nil {
		return err
	}
	if _, err := c.startProc("containerd", "/usr/bin/containerd", []string{"--config", cfg}); err != nil {
		return err
	}
	return Poll(ctx, 20*time.Second, "containerd socket", func() bool {
		st, err := os.Stat(c.ContainerdSocket)
		return err == nil && st.Mode()&os.ModeSocket != 0
	})
}

// ctr runs containerd's CLI against the cluster's containerd.
func (c *Cluster) ctr(args ...string) ([]byte, error) {
	out, err := exec.Command("ctr", append([]string{"-a", c.ContainerdSocket, "-n", "k8s.io"}, args...)...).CombinedOutput()
	if err != nil {
		return out, fmt.Errorf("ctr %s: %w\n%s", strings.Join(args, " "), err, out)
	}
	return out, nil
}

func (c *Cluster) importImages() error {
	img := filepath.Join(c.Dir, "images")
	pause := filepath.Join(img, "pause-rootfs")
	if err := os.MkdirAll(pause, 0o755); err != nil {
		return err
	}
	build := exec.Command("go", "build", "-o", filepath.Join(pause, "pause"), "./pause")
	build.Env = append(os.Environ(), "CGO_ENABLED=0")
	build.Dir = moduleDir()
	if out, err := build.CombinedOutput(); err != nil {
		return fmt.Errorf("build pause: %w\n%s", err, out)
	}
	app := filepath.Join(img, "app-rootfs")
	if err := appRootfs(app); err != nil {
		return err
	}
	images := []struct {
		ref, rootfs string
		entry       []string
	}{
		{PauseImage, pause, []string{"/pause"}},
		{AppImage, app, []string{"/bin/sh"}},
	}
	if c.Image != "" {
		if err := c.importOCITarball(c.Image, InitImage); err != nil {
			return err
		}
	} else {
		initRoot := filepath.Join(img, "init-rootfs")
		if err := os.MkdirAll(initRoot, 0o755); err != nil {
			return err
		}
		// Where the Dockerfile and make image put it.
		if err := os.MkdirAll(filepath.Join(initRoot, "usr/local/bin"), 0o755); err != nil {
			return err
		}
		if err := copyFile(c.OneAgentCSI, filepath.Join(initRoot, "usr/local/bin/oneagent-csi"), 0o755); err != nil {
			return err
		}
		images = append(images, struct {
			ref, rootfs string
			entry       []string
		}{InitImage, initRoot, []string{"/usr/local/bin/oneagent-csi"}})
	}
	for _, im := range images {
		tarball := filepath.Join(img, strings.NewReplacer("/", "_", ":", "_").Replace(im.ref)+".tar")
		if err := writeDockerArchive(im.ref, im.rootfs, tarball, im.entry); err != nil {
			return fmt.Errorf("image %s: %w", im.ref, err)
		}
		if _, err := c.ctr("images", "import", tarball); err != nil {
			return err
		}
	}
	return nil
}

func (c *Cluster) startKubelet(ctx context.Context, caFile string, port, healthz int) error {
	config := fmt.Sprintf(`apiVersion: kubelet.config.k8s.io/v1beta1
kind: KubeletConfiguration
address: 127.0.0.1
port: %d
readOnlyPort: 0
healthzBindAddress: 127.0.0.1
healthzPort: %d
failCgroupV1: false
failSwapOn: false
cgroupDriver: cgroupfs
cgroupsPerQOS: false
enforceNodeAllocatable: []
containerRuntimeEndpoint: unix://%[3]s
imageServiceEndpoint: unix://%[3]s
podLogsDir: %q
authentication:
  anonymous: {enabled: false}
  webhook: {enabled: false}
  x509: {clientCAFile: %q}
authorization:
  mode: AlwaysAllow
imageGCHighThresholdPercent: 100
imageGCLowThresholdPercent: 99
evictionHard: {memory.available: "100Mi", nodefs.available: "1%%", imagefs.available: "1%%"}
serializeImagePulls: false
`, port, healthz, c.ContainerdSocket, filepath.Join(c.Dir, "pod-logs"), caFile)
	cfg := filepath.Join(c.Dir, "kubelet-config.yaml")
	if err := os.WriteFile(cfg, []byte(config), 0o644); err != nil {
		return err
	}
	args := []string{"--config", cfg, "--kubeconfig", c.Kubeconfig,
		"--root-dir", c.KubeletRoot, "--cert-dir", filepath.Join(c.KubeletRoot, "pki"), "--hostname-override", NodeName, "--v=2"}
	if c.Networked {
		args = append(args, "--node-ip", c.NodeIP) // kubelet refuses a loopback node IP
	}
	p, err := c.startProc("kubelet", filepath.Join(c.K8sBin, "kubelet"), args)
	if err != nil {
		return err
	}
	c.kubelet = p
	return Poll(ctx, 60*time.Second, "node registered", func() bool {
		_, err := c.Client.CoreV1().Nodes().Get(ctx, NodeName, metav1.GetOptions{})
		return err == nil
	})
}

// EnsureNamespace creates a namespace with labels (and its default
// ServiceAccount: there is no controller-manager); it is not an error when
// it exists.
func (c *Cluster) EnsureNamespace(ctx context.Context, name string, labels map[string]string) error {
	ns := &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: name, Labels: labels}}
	if _, err := c.Client.CoreV1().Namespaces().Create(ctx, ns, metav1.CreateOptions{}); err != nil && !apierrors.IsAlreadyExists(err) {
		return err
	}
	sa := &corev1.ServiceAccount{ObjectMeta: metav1.ObjectMeta{Name: "default", Namespace: name}}
	if _, err := c.Client.CoreV1().ServiceAccounts(name).Create(ctx, sa, metav1.CreateOptions{}); err != nil && !apierrors.IsAlreadyExists(err) {
		return err
	}
	return nil
}

// Stop stops the kubelet, removes leftover containers, stops the other
// processes in reverse order, ends leftover shims, unmounts everything
// below Dir and removes Dir and the paths outside it that the run created.
// Callers delete their pods first, while the kubelet and their CSI driver
// still run, so that volumes are unpublished the normal way.
func (c *Cluster) Stop() {
	if c.kubelet != nil {
		c.kubelet.stop(10 * time.Second)
	}
	if c.ContainerdSocket != "" {
		if out, err := c.ctr("tasks", "ls", "-q"); err == nil {
			for _, id := range strings.Fields(string(out)) {
				_, _ = c.ctr("tasks", "kill", "-s", "SIGKILL", id)
				_, _ = c.ctr("tasks", "rm", "-f", id)
			}
		}
		if out, err := c.ctr("containers", "ls", "-q"); err == nil {
			for _, id := range strings.Fields(string(out)) {
				_, _ = c.ctr("containers", "rm", id)
			}
		}
	}
	for i := len(c.procs) - 1; i >= 0; i-- {
		c.procs[i].stop(10 * time.Second)
	}
	c.killShims()
	c.stopNetworking()
	unmountBelow(c.Dir)
	if c.KubeletRoot == KubeletRootDir {
		unmountBelow(KubeletRootDir)
	}
	_ = os.RemoveAll(c.Dir)
	for _, p := range c.createdOutside {
		if p == "/run/containerd" {
			if _, err := os.Stat("/run/containerd/containerd.sock"); err == nil {
				continue // a system containerd uses it
			}
		}
		_ = os.RemoveAll(p)
	}
	if c.lock != nil {
		_ = c.lock.Close() // releases the flock
		c.lock = nil
	}
}

// killShims ends containerd-shim processes of this cluster's containerd.
func (c *Cluster) killShims() {
	if c.ContainerdSocket == "" {
		return
	}
	entries, _ := os.ReadDir("/proc")
	for _, e := range entries {
		pid, err := strconv.Atoi(e.Name())
		if err != nil {
			continue
		}
		cmdline, err := os.ReadFile(filepath.Join("/proc", e.Name(), "cmdline"))
		if err != nil {
			continue
		}
		args := strings.Split(string(cmdline), "\x00")
		if len(args) > 0 && strings.Contains(args[0], "containerd-shim") && strings.Contains(string(cmdline), c.ContainerdSocket) {
			_ = unix.Kill(pid, unix.SIGKILL)
		}
	}
}

// unmountBelow unmounts every mount point below dir, deepest first, until
// none is left (mounts may be stacked).
func unmountBelow(dir string) {
	for range 10 {
		data, err := os.ReadFile("/proc/self/mountinfo")
		if err != nil {
			return
		}
		var points []string
		for _, line := range strings.Split(string(data), "\n") {
			f := strings.Fields(line)
			if len(f) > 4 && (f[4] == dir || strings.HasPrefix(f[4], dir+"/")) {
				points = append(points, f[4])
			}
		}
		if len(points) == 0 {
			return
		}
		sort.Slice(points, func(i, j int) bool { return len(points[i]) > len(points[j]) })
		for _, p := range points {
			_ = unix.Unmount(p, unix.MNT_DETACH)
		}
	}
}

func (c *Cluster) logTails() string {
	var b strings.Builder
	for _, p := range c.procs {
		fmt.Fprintf(&b, "\n--- %s log (end) ---\n%s", p.name, p.tail())
	}
	return b.String()
}

// LogTails returns the end of every process's log, for failing tests.
func (c *Cluster) LogTails() string { return c.logTails() }

// Poll calls cond every 100 ms until it holds, ctx ends or timeout passes.
func Poll(ctx context.Context, timeout time.Duration, what string, cond func() bool) error {
	deadline := time.Now().Add(timeout)
	for !cond() {
		if time.Now().After(deadline) {
			return fmt.Errorf("timed out after %v waiting for %s", timeout, what)
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(100 * time.Millisecond):
		}
	}
	return nil
}

// moduleDir is the e2e module's directory (tests run in their package dir,
// one level below).
func moduleDir() string {
	wd, _ := os.Getwd()
	for d := wd; d != "/"; d = filepath.Dir(d) {
		if b, err := os.ReadFile(filepath.Join(d, "go.mod")); err == nil && strings.Contains(string(b), "module github.com/oneagent-csi/oneagent-csi/test/e2e\n") {
			return d
		}
	}
	return wd
}

func (c *Cluster) cniBinDir() string {
	if c.Networked {
		return cniBinDir
	}
	return filepath.Join(c.Dir, "cni/bin")
}

// FreePort returns a free TCP port on 127.0.0.1.
func FreePort() (int, error) { return freePort() }

// TagImage gives an imported image a second name, as a new release of the
// same image would have.
func (c *Cluster) TagImage(src, dst string) error {
	_, err := c.ctr("images", "tag", "--force", src, dst)
	return err
}
