package integration

import (
	"context"
	"os"
	"path/filepath"
	"sync"
	"testing"
	"time"

	"github.com/container-storage-interface/spec/lib/go/csi"
	"golang.org/x/sys/unix"

	"github.com/oneagent-csi/oneagent-csi/api"
	"github.com/oneagent-csi/oneagent-csi/provisioner"
	"github.com/oneagent-csi/oneagent-csi/test/faketenant"
	"github.com/oneagent-csi/oneagent-csi/test/harness"
)

// TestGCKeepsWhatRealMountsUse: an artifact served by a real overlay whose
// volume record was lost, and one bind-mounted elsewhere, both survive GC;
// once unmounted they go.
func TestGCKeepsWhatRealMountsUse(t *testing.T) {
	harness.RequireRoot(t)
	versions := []string{"1.301.0.20250101-000000", "1.303.0.20250201-000000", "1.305.0.20250301-000000"}
	var mu sync.Mutex
	now := time.Now()
	clock := func() time.Time { mu.Lock(); defer mu.Unlock(); return now }
	n := harness.Start(t, harness.Config{
		Tenant: faketenant.Options{Versions: versions},
		Provisioner: func(o *provisioner.Options) {
			o.Now = clock
			o.GC = provisioner.GCOptions{KeepPrevious: -1}
		},
	})
	ctx := harness.Ctx(t)

	// v1 through a real overlay, then its record is lost.
	overlay := harness.Target(n.TargetRoot, "overlay")
	if _, err := n.Node.NodePublishVolume(ctx, harness.PublishRequest("vol-1", overlay, map[string]string{api.AttrVersion: versions[0]})); err != nil {
		t.Fatal(err)
	}
	rec, err := n.Index.GetVolume("vol-1")
	if err != nil {
		t.Fatal(err)
	}
	if err := n.Index.DeleteVolume("vol-1", overlay); err != nil {
		t.Fatal(err)
	}
	// v2 bind-mounted somewhere else, without any record.
	prep2, err := n.Prov.Prepare(ctx, "prod", versions[1])
	if err != nil {
		t.Fatal(err)
	}
	bind := harness.Target(n.TargetRoot, "bind")
	if err := os.MkdirAll(bind, 0o755); err != nil {
		t.Fatal(err)
	}
	if err := unix.Mount(n.Layout.Abs(n.Layout.Artifact(prep2.Artifact.ID)), bind, "", unix.MS_BIND, ""); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = unix.Unmount(bind, unix.MNT_DETACH) })
	// v3 is current.
	if _, err := n.Prov.Prepare(ctx, "prod", ""); err != nil {
		t.Fatal(err)
	}
	mu.Lock()
	now = now.Add(time.Hour) // past the leases of these Prepares
	mu.Unlock()

	present := func(id string) bool {
		_, err := os.Stat(n.Layout.Abs(n.Layout.Artifact(id)))
		return err == nil
	}
	rep, err := n.Prov.GC(context.Background(), false)
	if err != nil {
		t.Fatal(err)
	}
	if !present(rec.ArtifactID) || !present(prep2.Artifact.ID) {
		t.Fatalf("GC deleted an artifact a real mount uses: %+v", rep.Deleted)
	}
	if _, err := os.Stat(filepath.Join(overlay, "agent/lib64/liboneagentproc.so")); err != nil {
		t.Fatalf("the overlay stopped serving: %v", err)
	}
	if _, err := n.Index.GetLayer("prod", rec.LayerRev); err != nil {
		t.Errorf("the tenant layer under the overlay was deleted: %v", err)
	}

	// Unmount both: now they go.
	if _, err := n.Node.NodeUnpublishVolume(ctx, &csi.NodeUnpublishVolumeRequest{VolumeId: "vol-1", TargetPath: overlay}); err != nil {
		t.Fatal(err)
	}
	if err := unix.Unmount(bind, 0); err != nil {
		t.Fatal(err)
	}
	if _, err := n.Prov.GC(context.Background(), false); err != nil {
		t.Fatal(err)
	}
	if present(rec.ArtifactID) || present(prep2.Artifact.ID) {
		t.Fatal("unused artifacts kept after their mounts went")
	}
}
