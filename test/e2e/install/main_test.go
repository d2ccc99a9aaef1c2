// Package install runs the install a user runs, on a networked one-node
// cluster (kube-scheduler, kube-controller-manager, kube-proxy, CNI): the
// deploy manifests applied with kubectl as README says, the DaemonSet and
// the injector as pods, apps as Deployments, then an image update and the
// uninstall. Run as root: `make e2e`.
package install

import (
	"context"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/oneagent-csi/oneagent-csi/api"
	"github.com/oneagent-csi/oneagent-csi/test/e2e/cluster"
	"github.com/oneagent-csi/oneagent-csi/test/faketenant"
)

// env is the cluster and tenant the tests share; they run one after the
// other and each leaves the cluster as it found it.
var env struct {
	c          *cluster.Cluster
	tenant     *faketenant.Server
	tenantCA   []byte
	k8sBin     string
	bin        string
	work       string
	skipReason string
}

// dataDir and pluginDir are the host paths the deploy manifests use.
const (
	dataDir   = "/var/lib/oneagent-csi"
	pluginDir = cluster.KubeletRootDir + "/plugins/" + api.DefaultDriverName
)

func TestMain(m *testing.M) { os.Exit(run(m)) }

func run(m *testing.M) int {
	if os.Geteuid() != 0 {
		env.skipReason = "needs root (mounts, containerd, kubelet, iptables)"
		return m.Run()
	}
	ctx := context.Background()
	fail := func(err error) int {
		fmt.Fprintln(os.Stderr, "install e2e setup:", err)
		return 1
	}
	env.k8sBin = os.Getenv("E2E_K8S_BIN")
	if env.k8sBin == "" {
		out, err := exec.Command("../scripts/build-k8s.sh").Output()
		if err != nil {
			return fail(fmt.Errorf("build-k8s.sh: %w", err))
		}
		env.k8sBin = strings.TrimSpace(string(out))
	}
	work, err := os.MkdirTemp("", "oneagent-csi-install-")
	if err != nil {
		return fail(err)
	}
	env.work = work
	defer os.RemoveAll(work)
	bin := os.Getenv("ONEAGENT_CSI_BIN")
	if bin == "" {
		bin = filepath.Join(work, "oneagent-csi")
		b := exec.Command("go", "build", "-o", bin, "github.com/oneagent-csi/oneagent-csi/cmd/oneagent-csi")
		b.Env = append(os.Environ(), "CGO_ENABLED=0")
		if out, err := b.CombinedOutput(); err != nil {
			return fail(fmt.Errorf("build oneagent-csi: %w\n%s", err, out))
		}
	}
	so := filepath.Join(work, "liboneagentproc.so")
	if out, err := exec.Command("gcc", "-shared", "-fPIC", "-O2", "-Wall", "-o", so, "../agentso/liboneagentproc.c").CombinedOutput(); err != nil {
		return fail(fmt.Errorf("gcc: %w\n%s", err, out))
	}
	env.bin = bin
	soBytes, err := os.ReadFile(so)
	if err != nil {
		return fail(err)
	}

	c, err := cluster.Start(ctx, cluster.Options{K8sBin: env.k8sBin, OneAgentCSI: bin, Image: os.Getenv("ONEAGENT_CSI_IMAGE"), Dir: filepath.Join(work, "cluster"),
		Networked: true, SharedDirs: []string{dataDir}})
	if err != nil {
		return fail(err)
	}
	env.c = c
	code := 1
	// Checked once this run holds the machine (cluster.Start waits for
	// any other cluster to stop).
	for _, p := range []string{dataDir, pluginDir} {
		if entries, _ := os.ReadDir(p); len(entries) > 0 {
			c.Stop()
			return fail(fmt.Errorf("%s is not empty: this test installs on a node without oneagent-csi (remove it first)", p))
		}
	}
	defer func() {
		if code != 0 {
			fmt.Fprintln(os.Stderr, c.LogTails())
		}
		c.Stop()
	}()

	// The tenant listens on the node's address, which pods reach over the
	// bridge, with a certificate for that address.
	caPEM, crt, key, err := cluster.ServingCert(work, "tenant", net.ParseIP(c.NodeIP))
	if err != nil {
		return fail(err)
	}
	pair, err := tlsPair(crt, key)
	if err != nil {
		return fail(err)
	}
	env.tenantCA = caPEM
	env.tenant, err = faketenant.Start(faketenant.Options{Addr: c.NodeIP + ":0", Certificate: pair,
		CacheDir: filepath.Join(work, "modules"), ExtraFiles: map[string][]byte{api.AgentLibraryRelativePath: soBytes}})
	if err != nil {
		return fail(err)
	}
	defer env.tenant.Close()
	code = m.Run()
	return code
}

func setup(t *testing.T) context.Context {
	t.Helper()
	if env.skipReason != "" {
		t.Skip(env.skipReason)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Minute)
	t.Cleanup(cancel)
	return ctx
}
