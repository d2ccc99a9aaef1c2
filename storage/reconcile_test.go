package storage

import (
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/spf13/afero"
	"k8s.io/mount-utils"

	"github.com/oneagent-csi/oneagent-csi/api"
)

const (
	idA = "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa"
	idB = "bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb"
)

func writeArtifact(t *testing.T, fs afero.Fs, l Layout, id string) {
	t.Helper()
	if err := fs.MkdirAll(filepath.Join(l.Artifact(id), "agent/lib64"), 0o755); err != nil {
		t.Fatal(err)
	}
	f, err := fs.Create(l.ArtifactManifest(id))
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if err := WriteManifest(f, ManifestHeader{Schema: 1, ArtifactID: id, Version: "1.2.3", Flavor: "default", Arch: "x86"}, nil); err != nil {
		t.Fatal(err)
	}
}

func TestReconcile(t *testing.T) {
	root := t.TempDir()
	l, _ := NewLayout(root)
	fs := afero.NewBasePathFs(afero.NewOsFs(), root)
	writeArtifact(t, fs, l, idA)
	// Partial: an artifact dir without manifest (interrupted rename source can't
	// exist, but a crash of an older version could leave this).
	_ = fs.MkdirAll(l.Artifact(idB), 0o755)
	_ = fs.MkdirAll(l.TmpEntry("install-123.d/agent"), 0o755)
	_ = afero.WriteFile(fs, l.TmpEntry("install-123.zip"), []byte("partial"), 0o600)
	_ = fs.MkdirAll(l.VolumeUpper("orphan"), 0o755)
	_ = fs.MkdirAll(filepath.Join(l.TenantsDir(), "prod", "r1-partial", "agent"), 0o755)

	// A record of a published volume that is gone from mountinfo, and a pending one.
	idx, err := OpenIndex(l.Abs(l.IndexFile()), time.Second, false)
	if err != nil {
		t.Fatal(err)
	}
	_ = idx.PutVolume(Volume{ID: "gone", TargetPath: "/pods/gone/mount", State: VolumePublished})
	_ = idx.PutVolume(Volume{ID: "pending", TargetPath: "/pods/pending/mount", State: VolumePending})
	_ = idx.PutVolume(Volume{ID: "known", TargetPath: "/pods/known/mount", State: VolumePublished, ArtifactID: idA})
	idx.Close()

	mounts := []mount.MountInfo{
		{MountPoint: "/", Root: "/", Major: 8, Minor: 1, FsType: "ext4"},
		{MountPoint: "/pods/known/mount", FsType: "overlay", SuperOptions: []string{"ro", "lowerdir=" + l.Abs("tenants/prod/r1-x") + ":" + l.Abs(l.Artifact(idA))}},
		{MountPoint: "/pods/lost/mount", FsType: "overlay", SuperOptions: []string{"ro", "lowerdir=" + l.Abs("tenants/prod/r1-x") + ":" + l.Abs(l.Artifact(idA))}},
		{MountPoint: "/pods/host/mount", FsType: "ext4", Major: 8, Minor: 1, Root: filepath.Join(root, "host/prod")},
		{MountPoint: "/pods/failed/mount", FsType: "ext4", Major: 8, Minor: 1, Root: filepath.Join(root, "empty")},
		{MountPoint: "/pods/foreign/mount", FsType: "overlay", SuperOptions: []string{"lowerdir=/somewhere/else"}},
	}
	idx, rep, err := Open(ReconcileOptions{Layout: l, Fs: fs, MountInfo: func() ([]mount.MountInfo, error) { return mounts, nil }})
	if err != nil {
		t.Fatal(err)
	}
	defer idx.Close()
	if rep.TmpEntriesRemoved != 2 || rep.ArtifactsAdded != 1 || rep.VolumesAdopted != 3 || rep.VolumesDropped != 1 || rep.VolumeDirsRemoved != 1 {
		t.Errorf("report %+v", rep)
	}
	if len(rep.PartialRemoved) != 2 {
		t.Errorf("partial removed = %v, want the manifest-less artifact and the record-less layer", rep.PartialRemoved)
	}
	if ok, _ := afero.DirExists(fs, l.Artifact(idB)); ok {
		t.Error("partial artifact kept")
	}
	if entries, _ := afero.ReadDir(fs, l.Tmp()); len(entries) != 0 {
		t.Errorf("tmp/ not wiped: %v", entries)
	}
	if a, err := idx.LookupArtifact(ArtifactKey{Version: "1.2.3", Flavor: "default", Arch: "x86"}); err != nil || a.ID != idA {
		t.Errorf("artifact not indexed from disk: %+v, %v", a, err)
	}
	lost, err := idx.VolumeByTarget("/pods/lost/mount")
	if err != nil || !lost.Adopted || lost.ArtifactID != idA || lost.Tenant != "prod" || lost.LayerRev != "r1-x" {
		t.Errorf("lost overlay not adopted: %+v, %v", lost, err)
	}
	host, err := idx.VolumeByTarget("/pods/host/mount")
	if err != nil || host.Mode != api.ModeHost || host.Tenant != "prod" {
		t.Errorf("host bind not adopted: %+v, %v", host, err)
	}
	failed, err := idx.VolumeByTarget("/pods/failed/mount")
	if err != nil || failed.State != VolumeFailedOpen {
		t.Errorf("fail-open bind not adopted: %+v, %v", failed, err)
	}
	if _, err := idx.VolumeByTarget("/pods/foreign/mount"); err == nil {
		t.Error("a foreign overlay was adopted")
	}
	if _, err := idx.GetVolume("gone"); err == nil {
		t.Error("record of an unmounted published volume kept")
	}
	if _, err := idx.GetVolume("pending"); err != nil {
		t.Error("pending record dropped: its first-attempt time is needed for fail-open")
	}
}

func TestReconcileRebuildsCorruptIndex(t *testing.T) {
	root := t.TempDir()
	l, _ := NewLayout(root)
	fs := afero.NewBasePathFs(afero.NewOsFs(), root)
	writeArtifact(t, fs, l, idA)
	if err := os.WriteFile(l.Abs(l.IndexFile()), []byte(strings.Repeat("garbage!", 1024)), 0o600); err != nil {
		t.Fatal(err)
	}
	idx, rep, err := Open(ReconcileOptions{Layout: l, Fs: fs, MountInfo: func() ([]mount.MountInfo, error) { return nil, nil }})
	if err != nil {
		t.Fatal(err)
	}
	defer idx.Close()
	if !rep.IndexRebuilt || rep.CorruptIndexMovedTo == "" {
		t.Fatalf("report %+v", rep)
	}
	if _, err := os.Stat(rep.CorruptIndexMovedTo); err != nil {
		t.Errorf("corrupt index not kept aside: %v", err)
	}
	if arts, _ := idx.ListArtifacts(); len(arts) != 1 {
		t.Errorf("rebuilt index has %d artifacts, want 1", len(arts))
	}
}

func TestLayoutVolumeDirNames(t *testing.T) {
	l, _ := NewLayout("/data")
	for _, id := range []string{"../../etc", "a/b", "", ".hidden", strings.Repeat("x", 300)} {
		dir := l.Volume(id)
		if filepath.Dir(dir) != "volumes" || strings.Contains(filepath.Base(dir), "/") {
			t.Errorf("volume id %q maps to %q, outside volumes/", id, dir)
		}
	}
	if got := l.Volume("csi-abc123"); got != "volumes/csi-abc123" {
		t.Errorf("safe id mapped to %q", got)
	}
	if _, err := NewLayout("relative"); err == nil {
		t.Error("relative data dir accepted")
	}
}

// A second Open of a data dir in use is refused before it touches anything:
// the first holder's staging files in tmp/ survive.
func TestOpenRefusesADataDirInUse(t *testing.T) {
	root := t.TempDir()
	l, _ := NewLayout(root)
	noMounts := func() ([]mount.MountInfo, error) { return nil, nil }
	first, _, err := Open(ReconcileOptions{Layout: l, MountInfo: noMounts})
	if err != nil {
		t.Fatal(err)
	}
	staging := l.Abs(l.TmpEntry("install-running.zip"))
	if err := os.WriteFile(staging, []byte("half a download"), 0o600); err != nil {
		t.Fatal(err)
	}
	_, _, err = Open(ReconcileOptions{Layout: l, MountInfo: noMounts, LockTimeout: 100 * time.Millisecond})
	if !errors.Is(err, ErrDataDirInUse) || !strings.Contains(err.Error(), root) {
		t.Fatalf("second Open: %v, want ErrDataDirInUse naming the data dir", err)
	}
	if _, err := os.Stat(staging); err != nil {
		t.Fatalf("the refused Open touched tmp/: %v", err)
	}
	if err := first.Close(); err != nil {
		t.Fatal(err)
	}
	second, rep, err := Open(ReconcileOptions{Layout: l, MountInfo: noMounts})
	if err != nil {
		t.Fatalf("Open after the first holder closed: %v", err)
	}
	defer second.Close()
	if rep.TmpEntriesRemoved != 1 {
		t.Errorf("tmp entries removed = %d, want 1", rep.TmpEntriesRemoved)
	}
}

// Mounts a crash left in tmp/ are detached (deepest first) before tmp/ is wiped.
func TestOpenDetachesMountsInTmpBeforeWiping(t *testing.T) {
	root := t.TempDir()
	l, _ := NewLayout(root)
	tmp := l.Abs(l.Tmp())
	mounts := []mount.MountInfo{
		{MountPoint: filepath.Join(tmp, "bind-1")},
		{MountPoint: filepath.Join(tmp, "bind-1", "inner")},
		{MountPoint: "/elsewhere"},
		{MountPoint: tmp + "-sibling/x"},
	}
	var detached []string
	idx, _, err := Open(ReconcileOptions{Layout: l, MountInfo: func() ([]mount.MountInfo, error) { return mounts, nil },
		Unmount: func(target string) error { detached = append(detached, target); return nil }})
	if err != nil {
		t.Fatal(err)
	}
	defer idx.Close()
	want := []string{filepath.Join(tmp, "bind-1", "inner"), filepath.Join(tmp, "bind-1")}
	if strings.Join(detached, ",") != strings.Join(want, ",") {
		t.Fatalf("detached %v, want %v", detached, want)
	}
}

// A volume whose record is lost still uses its own layers (the containers'
// configuration, an upper dir): reconcile adopts the mount and keeps them.
func TestReconcileKeepsTheLayersOfMountedVolumes(t *testing.T) {
	root := t.TempDir()
	l, _ := NewLayout(root)
	fs := afero.NewBasePathFs(afero.NewOsFs(), root)
	writeArtifact(t, fs, l, idA)
	for _, id := range []string{"served", "failed", "orphan"} {
		file := filepath.Join(l.VolumeContainers(id), api.ContainerConfRelativePath("shop"))
		if err := fs.MkdirAll(filepath.Dir(file), 0o755); err != nil {
			t.Fatal(err)
		}
		if err := afero.WriteFile(fs, file, []byte("[container]\n"), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	mounts := []mount.MountInfo{
		{MountPoint: "/", Root: "/", Major: 8, Minor: 1, FsType: "ext4"},
		{MountPoint: "/pods/served/mount", FsType: "overlay", SuperOptions: []string{"ro",
			"lowerdir=" + l.Abs(l.VolumeContainers("served")) + ":" + l.Abs("tenants/prod/r1-x") + ":" + l.Abs(l.Artifact(idA))}},
		{MountPoint: "/pods/failed/mount", FsType: "overlay", SuperOptions: []string{"ro",
			"lowerdir=" + l.Abs(l.VolumeContainers("failed")) + ":" + l.Abs(l.Empty())}},
	}
	idx, rep, err := Open(ReconcileOptions{Layout: l, Fs: fs, MountInfo: func() ([]mount.MountInfo, error) { return mounts, nil }})
	if err != nil {
		t.Fatal(err)
	}
	defer idx.Close()
	if rep.VolumesAdopted != 2 || rep.VolumeDirsRemoved != 1 {
		t.Errorf("report %+v, want 2 adopted and the orphan's dir removed", rep)
	}
	for id, want := range map[string]bool{"served": true, "failed": true, "orphan": false} {
		if ok, _ := afero.DirExists(fs, l.VolumeContainers(id)); ok != want {
			t.Errorf("layers of %s kept = %v, want %v", id, ok, want)
		}
	}
	failed, err := idx.VolumeByTarget("/pods/failed/mount")
	if err != nil || failed.State != VolumeFailedOpen {
		t.Errorf("fail-open overlay not adopted as failed open: %+v, %v", failed, err)
	}
}
