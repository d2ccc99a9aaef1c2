// Package restart kills the real node process (SIGKILL) during a download and
// while volumes are published, restarts it and checks that nothing partial is
// served, published volumes keep serving and unpublish still works.
package restart

import (
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/container-storage-interface/spec/lib/go/csi"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	"sigs.k8s.io/yaml"

	"github.com/oneagent-csi/oneagent-csi/storage"
	"github.com/oneagent-csi/oneagent-csi/test/faketenant"
	"github.com/oneagent-csi/oneagent-csi/test/harness"
)

type nodeProc struct {
	cmd    *exec.Cmd
	socket string
	conn   *grpc.ClientConn
	node   csi.NodeClient
	log    string
}

type env struct {
	t       *testing.T
	tenant  *faketenant.Server
	dataDir string
	targets string
	config  string
	socket  string
}

func newEnv(t *testing.T, opts faketenant.Options, prefetch bool) *env {
	srv, tenant := harness.StartTenant(t, opts)
	e := &env{t: t, tenant: srv, dataDir: t.TempDir(), targets: t.TempDir()}
	t.Cleanup(func() { harness.UnmountAllBelow(t, e.targets) })
	e.socket = filepath.Join(t.TempDir(), "csi.sock")
	cfg := map[string]any{
		"nodeID": "restart-node", "dataDir": e.dataDir, "csiSocket": e.socket, "httpAddr": "127.0.0.1:0",
		"prefetch": prefetch, "publishWait": "30s",
		"client":  map[string]any{"attempts": 3, "backoffBase": "10ms", "backoffMax": "100ms"},
		"tenants": []any{tenant},
	}
	data, err := yaml.Marshal(cfg)
	if err != nil {
		t.Fatal(err)
	}
	e.config = filepath.Join(t.TempDir(), "config.yaml")
	if err := os.WriteFile(e.config, data, 0o600); err != nil {
		t.Fatal(err)
	}
	return e
}

func (e *env) start() *nodeProc {
	t := e.t
	t.Helper()
	p := &nodeProc{socket: e.socket, log: filepath.Join(t.TempDir(), "node.log")}
	logf, err := os.Create(p.log)
	if err != nil {
		t.Fatal(err)
	}
	p.cmd = exec.Command(harness.Binary(t), "node", "--config", e.config, "-v", "2")
	p.cmd.Stdout, p.cmd.Stderr = logf, logf
	if err := p.cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if p.cmd.ProcessState == nil {
			_ = p.cmd.Process.Kill()
			_ = p.cmd.Wait()
		}
		logf.Close()
		if t.Failed() {
			b, _ := os.ReadFile(p.log)
			t.Logf("node log:\n%s", b)
		}
	})
	p.conn, err = grpc.NewClient("unix://"+p.socket, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { p.conn.Close() })
	p.node = csi.NewNodeClient(p.conn)
	id := csi.NewIdentityClient(p.conn)
	harness.Eventually(t, 30*time.Second, "node to be ready", func() bool {
		ctx, cancel := context.WithTimeout(context.Background(), time.Second)
		defer cancel()
		r, err := id.Probe(ctx, &csi.ProbeRequest{})
		return err == nil && r.GetReady().GetValue()
	})
	return p
}

func (p *nodeProc) kill(t *testing.T) {
	t.Helper()
	if err := p.cmd.Process.Signal(syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	_ = p.cmd.Wait()
}

func (p *nodeProc) stop(t *testing.T) {
	t.Helper()
	if err := p.cmd.Process.Signal(syscall.SIGTERM); err != nil {
		t.Fatal(err)
	}
	if err := p.cmd.Wait(); err != nil {
		t.Fatalf("node did not stop cleanly: %v", err)
	}
}

func dirEntries(t *testing.T, dir string) []string {
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

// checkComplete verifies that every entry of the artifact's manifest is
// visible at target with its size: nothing partial is served.
func checkComplete(t *testing.T, dataDir, target string) {
	t.Helper()
	layout, _ := storage.NewLayout(dataDir)
	ids := dirEntries(t, layout.Abs(layout.ArtifactsDir()))
	if len(ids) != 1 {
		t.Fatalf("artifacts = %v, want exactly one", ids)
	}
	_, entries, err := storage.ReadManifest(harnessFs(dataDir), layout.ArtifactManifest(ids[0]))
	if err != nil {
		t.Fatal(err)
	}
	for _, e := range entries {
		st, err := os.Lstat(filepath.Join(target, e.Path))
		if err != nil {
			t.Fatalf("served artifact lacks %s: %v", e.Path, err)
		}
		// The tenant layer overrides ruxitagentproc.conf on purpose.
		if e.Type == "file" && st.Size() != e.Size && e.Path != "agent/conf/ruxitagentproc.conf" {
			t.Fatalf("served %s has %d bytes, manifest says %d", e.Path, st.Size(), e.Size)
		}
	}
}

func TestKillDuringDownload(t *testing.T) {
	harness.RequireRoot(t)
	e := newEnv(t, faketenant.Options{ModuleSize: 2 << 20}, true)
	e.tenant.SetFaults(faketenant.Fault{Kind: faketenant.FaultSlow, Route: faketenant.RouteDownload, Rate: 256 << 10})
	p := e.start()
	tmp := filepath.Join(e.dataDir, "tmp")
	harness.Eventually(t, 30*time.Second, "a partial download in tmp/", func() bool {
		for _, n := range dirEntries(t, tmp) {
			if st, err := os.Stat(filepath.Join(tmp, n)); err == nil && strings.HasSuffix(n, ".zip") && st.Size() > 0 {
				return true
			}
		}
		return false
	})
	p.kill(t)
	if got := dirEntries(t, filepath.Join(e.dataDir, "artifacts")); len(got) != 0 {
		t.Fatalf("an artifact was installed from an interrupted download: %v", got)
	}
	e.tenant.SetFaults()
	// Restart without prefetch so that tmp/ can be inspected after reconcile.
	e2 := *e
	cfg, _ := os.ReadFile(e.config)
	e2.config = filepath.Join(t.TempDir(), "config.yaml")
	if err := os.WriteFile(e2.config, []byte(strings.Replace(string(cfg), "prefetch: true", "prefetch: false", 1)), 0o600); err != nil {
		t.Fatal(err)
	}
	p2 := e2.start()
	if got := dirEntries(t, tmp); len(got) != 0 {
		t.Fatalf("tmp/ not wiped at start-up: %v", got)
	}
	target := filepath.Join(e.targets, "v1/mount")
	ctx := harness.Ctx(t)
	if _, err := p2.node.NodePublishVolume(ctx, harness.PublishRequest("v1", target, nil)); err != nil {
		t.Fatal(err)
	}
	checkComplete(t, e.dataDir, target)
	if _, err := p2.node.NodeUnpublishVolume(ctx, &csi.NodeUnpublishVolumeRequest{VolumeId: "v1", TargetPath: target}); err != nil {
		t.Fatal(err)
	}
}

func TestKillWhilePublished(t *testing.T) {
	harness.RequireRoot(t)
	e := newEnv(t, faketenant.Options{}, false)
	p := e.start()
	ctx := harness.Ctx(t)
	var targets []string
	for i := range 5 {
		id := fmt.Sprintf("vol-%d", i)
		target := filepath.Join(e.targets, id, "mount")
		if _, err := p.node.NodePublishVolume(ctx, harness.PublishRequest(id, target, nil)); err != nil {
			t.Fatal(err)
		}
		targets = append(targets, target)
	}
	p.kill(t)
	for _, target := range targets {
		if _, err := os.Stat(filepath.Join(target, "agent/lib64/liboneagentproc.so")); err != nil {
			t.Fatalf("volume stopped serving when the node process died: %v", err)
		}
	}
	// Lose the index too: the restart must rebuild it from disk and mountinfo.
	if err := os.Remove(filepath.Join(e.dataDir, "index.db")); err != nil {
		t.Fatal(err)
	}
	p2 := e.start()
	for _, target := range targets {
		checkComplete(t, e.dataDir, target)
	}
	for i, target := range targets {
		_, err := p2.node.NodeUnpublishVolume(ctx, &csi.NodeUnpublishVolumeRequest{VolumeId: fmt.Sprintf("vol-%d", i), TargetPath: target})
		if err != nil {
			t.Fatal(err)
		}
		if _, err := os.Stat(target); !errors.Is(err, os.ErrNotExist) {
			t.Fatalf("target %s left after unpublish: %v", target, err)
		}
	}
	p2.stop(t)
	layout, _ := storage.NewLayout(e.dataDir)
	idx, err := storage.OpenIndex(layout.Abs(layout.IndexFile()), time.Second, true)
	if err != nil {
		t.Fatal(err)
	}
	defer idx.Close()
	vols, err := idx.ListVolumes()
	if err != nil || len(vols) != 0 {
		t.Fatalf("index still has volumes after unpublishing all: %+v, %v", vols, err)
	}
	arts, _ := idx.ListArtifacts()
	if len(arts) != 1 {
		t.Fatalf("rebuilt index has %d artifacts, want 1", len(arts))
	}
}
