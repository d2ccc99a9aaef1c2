// Package harness starts the real node driver in-process (fake tenant,
// storage, provisioner, driver, gRPC on a unix socket) for tests.
package harness

import (
	"context"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/container-storage-interface/spec/lib/go/csi"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	"k8s.io/mount-utils"

	"github.com/oneagent-csi/oneagent-csi/driver"
	"github.com/oneagent-csi/oneagent-csi/provisioner"
	"github.com/oneagent-csi/oneagent-csi/storage"
	"github.com/oneagent-csi/oneagent-csi/test/faketenant"
)

// Node is a running in-process node driver.
type Node struct {
	Tenant     *faketenant.Server
	TenantConf provisioner.Tenant
	Layout     storage.Layout
	Index      *storage.Index
	Prov       *provisioner.Provisioner
	Driver     *driver.Driver
	Socket     string
	Conn       *grpc.ClientConn
	Node       csi.NodeClient
	Identity   csi.IdentityClient
	// TargetRoot is the kubelet dir the driver accepts targets in (outside
	// the data dir); Target builds paths in it.
	TargetRoot string
}

// Config tweaks a Node.
type Config struct {
	Tenant      faketenant.Options
	Provisioner func(*provisioner.Options)
	Driver      func(*driver.Options)
	// Mounter replaces the real syscall mounter.
	Mounter mount.Interface
	// MountAPI selects the real mounter's kernel calls (default auto).
	MountAPI driver.MountAPI
}

// RequireRoot skips tests that need mount privileges when not root; CI runs
// them as root.
func RequireRoot(t testing.TB) {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Skip("needs root for real mounts")
	}
}

// FastClient keeps tenant retries short in tests.
var FastClient = provisioner.ClientOptions{Attempts: 3, BackoffBase: time.Millisecond, BackoffMax: 20 * time.Millisecond, RequestTimeout: 10 * time.Second}

// StartTenant starts a fake tenant and writes its token and CA files.
func StartTenant(t testing.TB, opts faketenant.Options) (*faketenant.Server, provisioner.Tenant) {
	t.Helper()
	srv, err := faketenant.Start(opts)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(srv.Close)
	dir := t.TempDir()
	tenant := provisioner.Tenant{Name: "prod", APIURL: srv.URL, TokenFile: filepath.Join(dir, "token"), CAFile: filepath.Join(dir, "ca.pem")}
	if err := os.WriteFile(tenant.TokenFile, []byte(srv.Token()), 0o600); err != nil {
		t.Fatal(err)
	}
	if err := srv.WriteCA(tenant.CAFile); err != nil {
		t.Fatal(err)
	}
	return srv, tenant
}

// Start starts a node driver with a fresh data dir.
func Start(t testing.TB, cfg Config) *Node {
	t.Helper()
	n := &Node{}
	n.Tenant, n.TenantConf = StartTenant(t, cfg.Tenant)
	var err error
	n.Layout, err = storage.NewLayout(t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	n.TargetRoot = t.TempDir()
	t.Cleanup(func() { UnmountAllBelow(t, n.TargetRoot) })
	n.Index, _, err = storage.Open(storage.ReconcileOptions{Layout: n.Layout})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { n.Index.Close() })
	popts := provisioner.Options{Layout: n.Layout, Index: n.Index, Tenants: []provisioner.Tenant{n.TenantConf}, Client: FastClient}
	if cfg.Provisioner != nil {
		cfg.Provisioner(&popts)
	}
	n.Prov, err = provisioner.New(popts)
	if err != nil {
		t.Fatal(err)
	}
	dopts := driver.Options{NodeID: "test-node", Layout: n.Layout, Index: n.Index, Provisioner: n.Prov, Mounter: cfg.Mounter,
		MountAPI: cfg.MountAPI, KubeletDir: n.TargetRoot}
	if cfg.Driver != nil {
		cfg.Driver(&dopts)
	}
	n.Driver, err = driver.New(dopts)
	if err != nil {
		t.Fatal(err)
	}
	n.Socket = filepath.Join(t.TempDir(), "csi.sock")
	l, err := driver.Listen(n.Socket)
	if err != nil {
		t.Fatal(err)
	}
	srv := n.Driver.NewGRPCServer()
	go func() { _ = srv.Serve(l) }()
	t.Cleanup(srv.Stop)
	n.Conn, err = grpc.NewClient("unix://"+n.Socket, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { n.Conn.Close() })
	n.Node, n.Identity = csi.NewNodeClient(n.Conn), csi.NewIdentityClient(n.Conn)
	return n
}

// Target is the path kubelet would publish the volume "oneagent" of the pod
// with uid "uid-<id>" at, below the kubelet dir root.
func Target(root, id string) string {
	return filepath.Join(root, "pods", "uid-"+id, "volumes", "kubernetes.io~csi", "oneagent", "mount")
}

// MountCapability is the capability kubelet sends for inline volumes.
func MountCapability() *csi.VolumeCapability {
	return &csi.VolumeCapability{
		AccessType: &csi.VolumeCapability_Mount{Mount: &csi.VolumeCapability_MountVolume{}},
		AccessMode: &csi.VolumeCapability_AccessMode{Mode: csi.VolumeCapability_AccessMode_SINGLE_NODE_WRITER},
	}
}

// PublishRequest builds a kubelet-like request for an inline volume.
func PublishRequest(volumeID, target string, attrs map[string]string) *csi.NodePublishVolumeRequest {
	ctx := map[string]string{
		"csi.storage.k8s.io/ephemeral":           "true",
		"csi.storage.k8s.io/pod.name":            "app-" + volumeID,
		"csi.storage.k8s.io/pod.namespace":       "default",
		"csi.storage.k8s.io/pod.uid":             "uid-" + volumeID,
		"csi.storage.k8s.io/serviceAccount.name": "default",
	}
	for k, v := range attrs {
		ctx[k] = v
	}
	return &csi.NodePublishVolumeRequest{VolumeId: volumeID, TargetPath: target, VolumeCapability: MountCapability(),
		Readonly: true, VolumeContext: ctx}
}

// UnmountAllBelow unmounts every mount under dir (deepest first); used in
// cleanups so that a failed test leaves no mounts behind.
func UnmountAllBelow(t testing.TB, dir string) {
	t.Helper()
	mis, err := mount.ParseMountInfo("/proc/self/mountinfo")
	if err != nil {
		return
	}
	var targets []string
	for _, m := range mis {
		if strings.HasPrefix(m.MountPoint, dir+"/") || m.MountPoint == dir {
			targets = append(targets, m.MountPoint)
		}
	}
	for i := len(targets) - 1; i >= 0; i-- {
		if err := exec.Command("umount", "-l", targets[i]).Run(); err != nil {
			t.Logf("cleanup: umount %s: %v", targets[i], err)
		}
	}
}

// Eventually polls cond every 10ms until it is true or timeout passes.
func Eventually(t testing.TB, timeout time.Duration, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(timeout)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out after %v waiting for %s", timeout, what)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// Ctx returns a context that ends with the test.
func Ctx(t testing.TB) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	t.Cleanup(cancel)
	return ctx
}

// DirNames lists the names in dir (sorted, as os.ReadDir returns them).
func DirNames(t testing.TB, dir string) []string {
	t.Helper()
	entries, err := os.ReadDir(dir)
	if err != nil {
		t.Fatal(err)
	}
	var names []string
	for _, e := range entries {
		names = append(names, e.Name())
	}
	return names
}
