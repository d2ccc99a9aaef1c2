package harness

import (
	"context"
	"os"
	"os/exec"
	"path/filepath"
	"syscall"
	"testing"
	"time"

	"github.com/container-storage-interface/spec/lib/go/csi"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	"sigs.k8s.io/yaml"

	"github.com/oneagent-csi/oneagent-csi/provisioner"
	"github.com/oneagent-csi/oneagent-csi/test/faketenant"
)

// ProcessEnv is a fake tenant, a data dir and a config file for running the
// real node binary (Binary) as a separate process.
type ProcessEnv struct {
	t           testing.TB
	Tenant      *faketenant.Server
	DataDir     string
	Targets     string // a dir for publish targets, unmounted at cleanup
	Config      string // path of the node config file
	Socket      string // CSI socket
	AdminSocket string
}

// NewProcessEnv writes a node config for a new data dir; extra entries are
// merged into the config (e.g. "cache").
func NewProcessEnv(t testing.TB, opts faketenant.Options, prefetch bool, extra ...map[string]any) *ProcessEnv {
	t.Helper()
	return NewProcessEnvWithTenant(t, opts, prefetch, nil, extra...)
}

// NewProcessEnvWithTenant is NewProcessEnv with the tenant's config edited
// (its policy, for example) before the config file is written.
func NewProcessEnvWithTenant(t testing.TB, opts faketenant.Options, prefetch bool, edit func(*provisioner.Tenant), extra ...map[string]any) *ProcessEnv {
	t.Helper()
	srv, tenant := StartTenant(t, opts)
	if edit != nil {
		edit(&tenant)
	}
	e := NewProcessEnvFor(t, tenant, prefetch, extra...)
	e.Tenant = srv
	return e
}

// NewProcessEnvFor writes a node config for a new data dir that serves
// tenant (which may take its code modules from an image) and starts no
// fake tenant; extra entries are merged into the config.
func NewProcessEnvFor(t testing.TB, tenant provisioner.Tenant, prefetch bool, extra ...map[string]any) *ProcessEnv {
	t.Helper()
	e := &ProcessEnv{t: t, DataDir: t.TempDir(), Targets: t.TempDir()}
	t.Cleanup(func() { UnmountAllBelow(t, e.Targets) })
	sockets := t.TempDir()
	e.Socket, e.AdminSocket = filepath.Join(sockets, "csi.sock"), filepath.Join(sockets, "admin.sock")
	cfg := map[string]any{
		"nodeID": "process-node", "dataDir": e.DataDir, "csiSocket": e.Socket, "adminSocket": e.AdminSocket,
		"httpAddr": "127.0.0.1:0", "prefetch": prefetch, "kubeletDir": e.Targets, "publishWait": "30s",
		"client":  map[string]any{"attempts": 3, "backoffBase": "10ms", "backoffMax": "100ms"},
		"tenants": []any{tenant},
	}
	for _, x := range extra {
		for k, v := range x {
			cfg[k] = v
		}
	}
	data, err := yaml.Marshal(cfg)
	if err != nil {
		t.Fatal(err)
	}
	e.Config = filepath.Join(t.TempDir(), "config.yaml")
	if err := os.WriteFile(e.Config, data, 0o600); err != nil {
		t.Fatal(err)
	}
	return e
}

// NodeProcess is a running `oneagent-csi node`.
type NodeProcess struct {
	Cmd  *exec.Cmd
	Node csi.NodeClient
	Log  string
}

// Start runs the node process and waits until CSI Probe says ready.
func (e *ProcessEnv) Start() *NodeProcess {
	e.t.Helper()
	return e.StartWith()
}

// StartWithEnv runs the node process with extra environment variables,
// under an optional wrapper command (see StartWith).
func (e *ProcessEnv) StartWithEnv(env []string, wrapper ...string) *NodeProcess {
	e.t.Helper()
	return e.start(env, wrapper...)
}

// StartWith runs the node process under a wrapper command (for example
// "unshare -m --propagation unchanged" for a mount namespace of its own, as
// the DaemonSet container has) and waits until CSI Probe says ready.
func (e *ProcessEnv) StartWith(wrapper ...string) *NodeProcess {
	e.t.Helper()
	return e.start(nil, wrapper...)
}

func (e *ProcessEnv) start(env []string, wrapper ...string) *NodeProcess {
	t := e.t
	t.Helper()
	p := &NodeProcess{Log: filepath.Join(t.TempDir(), "node.log")}
	logf, err := os.Create(p.Log)
	if err != nil {
		t.Fatal(err)
	}
	argv := append(append(append([]string(nil), wrapper...), Binary(t)), "node", "--config", e.Config, "-v", "2")
	p.Cmd = exec.Command(argv[0], argv[1:]...)
	if env != nil {
		p.Cmd.Env = append(os.Environ(), env...)
	}
	p.Cmd.Stdout, p.Cmd.Stderr = logf, logf
	if err := p.Cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if p.Cmd.ProcessState == nil {
			_ = p.Cmd.Process.Kill()
			_ = p.Cmd.Wait()
		}
		_ = logf.Close()
		if t.Failed() {
			b, _ := os.ReadFile(p.Log)
			t.Logf("node log:\n%s", b)
		}
	})
	conn, err := grpc.NewClient("unix://"+e.Socket, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = conn.Close() })
	p.Node = csi.NewNodeClient(conn)
	id := csi.NewIdentityClient(conn)
	Eventually(t, 30*time.Second, "node to be ready", func() bool {
		ctx, cancel := context.WithTimeout(context.Background(), time.Second)
		defer cancel()
		r, err := id.Probe(ctx, &csi.ProbeRequest{})
		return err == nil && r.GetReady().GetValue()
	})
	return p
}

// Kill sends SIGKILL and reaps the process.
func (p *NodeProcess) Kill(t testing.TB) {
	t.Helper()
	if err := p.Cmd.Process.Signal(syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	_ = p.Cmd.Wait()
}

// Stop sends SIGTERM and expects a clean exit.
func (p *NodeProcess) Stop(t testing.TB) {
	t.Helper()
	if err := p.Cmd.Process.Signal(syscall.SIGTERM); err != nil {
		t.Fatal(err)
	}
	if err := p.Cmd.Wait(); err != nil {
		t.Fatalf("node did not stop cleanly: %v", err)
	}
}
