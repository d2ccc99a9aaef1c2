// Package restart kills the real node process (SIGKILL) during a download and
// while volumes are published, restarts it and checks that nothing partial is
// served, published volumes keep serving and unpublish still works.
package restart

import (
	"errors"
	"fmt"
	"io/fs"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/container-storage-interface/spec/lib/go/csi"

	"github.com/oneagent-csi/oneagent-csi/storage"
	"github.com/oneagent-csi/oneagent-csi/test/faketenant"
	"github.com/oneagent-csi/oneagent-csi/test/harness"
)

// checkComplete verifies that every entry of the artifact's manifest is
// visible at target with its size: nothing partial is served.
func checkComplete(t *testing.T, dataDir, target string) {
	t.Helper()
	layout, _ := storage.NewLayout(dataDir)
	ids := harness.DirNames(t, layout.Abs(layout.ArtifactsDir()))
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
	e := harness.NewProcessEnv(t, faketenant.Options{ModuleSize: 2 << 20}, true)
	e.Tenant.SetFaults(faketenant.Fault{Kind: faketenant.FaultSlow, Route: faketenant.RouteDownload, Rate: 256 << 10})
	p := e.Start()
	tmp := filepath.Join(e.DataDir, "tmp")
	harness.Eventually(t, 30*time.Second, "a partial install in tmp/", func() bool {
		// The ZIP streams: the stage holds the files extracted so far.
		files := 0
		_ = filepath.WalkDir(tmp, func(_ string, d fs.DirEntry, err error) error {
			if err == nil && d.Type().IsRegular() {
				files++
			}
			return nil
		})
		return files > 0
	})
	p.Kill(t)
	if got := harness.DirNames(t, filepath.Join(e.DataDir, "artifacts")); len(got) != 0 {
		t.Fatalf("an artifact was installed from an interrupted download: %v", got)
	}
	e.Tenant.SetFaults()
	// Restart without prefetch so that tmp/ can be inspected after reconcile.
	e2 := *e
	cfg, _ := os.ReadFile(e.Config)
	e2.Config = filepath.Join(t.TempDir(), "config.yaml")
	if err := os.WriteFile(e2.Config, []byte(strings.Replace(string(cfg), "prefetch: true", "prefetch: false", 1)), 0o600); err != nil {
		t.Fatal(err)
	}
	p2 := e2.Start()
	if got := harness.DirNames(t, tmp); len(got) != 0 {
		t.Fatalf("tmp/ not wiped at start-up: %v", got)
	}
	target := harness.Target(e.Targets, "v1")
	ctx := harness.Ctx(t)
	if _, err := p2.Node.NodePublishVolume(ctx, harness.PublishRequest("v1", target, nil)); err != nil {
		t.Fatal(err)
	}
	checkComplete(t, e.DataDir, target)
	if _, err := p2.Node.NodeUnpublishVolume(ctx, &csi.NodeUnpublishVolumeRequest{VolumeId: "v1", TargetPath: target}); err != nil {
		t.Fatal(err)
	}
}

func TestKillWhilePublished(t *testing.T) {
	harness.RequireRoot(t)
	e := harness.NewProcessEnv(t, faketenant.Options{}, false)
	p := e.Start()
	ctx := harness.Ctx(t)
	var targets []string
	for i := range 5 {
		id := fmt.Sprintf("vol-%d", i)
		target := harness.Target(e.Targets, id)
		if _, err := p.Node.NodePublishVolume(ctx, harness.PublishRequest(id, target, nil)); err != nil {
			t.Fatal(err)
		}
		targets = append(targets, target)
	}
	p.Kill(t)
	for _, target := range targets {
		if _, err := os.Stat(filepath.Join(target, "agent/lib64/liboneagentproc.so")); err != nil {
			t.Fatalf("volume stopped serving when the node process died: %v", err)
		}
	}
	// Lose the index too: the restart must rebuild it from disk and mountinfo.
	if err := os.Remove(filepath.Join(e.DataDir, "index.db")); err != nil {
		t.Fatal(err)
	}
	p2 := e.Start()
	for _, target := range targets {
		checkComplete(t, e.DataDir, target)
	}
	for i, target := range targets {
		_, err := p2.Node.NodeUnpublishVolume(ctx, &csi.NodeUnpublishVolumeRequest{VolumeId: fmt.Sprintf("vol-%d", i), TargetPath: target})
		if err != nil {
			t.Fatal(err)
		}
		if _, err := os.Stat(target); !errors.Is(err, os.ErrNotExist) {
			t.Fatalf("target %s left after unpublish: %v", target, err)
		}
	}
	p2.Stop(t)
	layout, _ := storage.NewLayout(e.DataDir)
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

// A second node process on the same data dir refuses to start with a clear
// message and leaves the first one's running install untouched.
func TestSecondProcessOnTheSameDataDirRefuses(t *testing.T) {
	harness.RequireRoot(t)
	e := harness.NewProcessEnv(t, faketenant.Options{ModuleSize: 2 << 20}, true)
	e.Tenant.SetFaults(faketenant.Fault{Kind: faketenant.FaultSlow, Route: faketenant.RouteDownload, Rate: 128 << 10}) // 16 s: longer than the second process waits for the lock
	p := e.Start()
	tmp := filepath.Join(e.DataDir, "tmp")
	harness.Eventually(t, 30*time.Second, "the first process's download in tmp/", func() bool {
		return len(harness.DirNames(t, tmp)) > 0
	})
	staged := harness.DirNames(t, tmp)

	// Same data dir, its own sockets: only the data dir collides.
	e2 := *e
	sockets := t.TempDir()
	cfg, _ := os.ReadFile(e.Config)
	cfg2 := strings.NewReplacer(e.Socket, filepath.Join(sockets, "csi.sock"), e.AdminSocket, filepath.Join(sockets, "admin.sock")).Replace(string(cfg))
	e2.Config = filepath.Join(t.TempDir(), "config.yaml")
	if err := os.WriteFile(e2.Config, []byte(cfg2), 0o600); err != nil {
		t.Fatal(err)
	}
	out, err := exec.Command(harness.Binary(t), "node", "--config", e2.Config).CombinedOutput()
	if err == nil || !strings.Contains(string(out), "in use by another oneagent-csi node process") || !strings.Contains(string(out), e.DataDir) {
		t.Fatalf("second process: %v\n%s\nwant a refusal naming the data dir", err, out)
	}
	for _, name := range staged {
		if _, err := os.Stat(filepath.Join(tmp, name)); err != nil {
			t.Fatalf("the refused process touched the first one's staging file %s: %v", name, err)
		}
	}
	e.Tenant.SetFaults()
	target := harness.Target(e.Targets, "v1")
	ctx := harness.Ctx(t)
	harness.Eventually(t, 60*time.Second, "the first process's install", func() bool {
		_, err := p.Node.NodePublishVolume(ctx, harness.PublishRequest("v1", target, nil))
		return err == nil
	})
	checkComplete(t, e.DataDir, target)
}
