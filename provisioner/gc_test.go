package provisioner_test

import (
	"context"
	"errors"
	"os"
	"slices"
	"sync"
	"testing"
	"time"

	"k8s.io/mount-utils"

	"github.com/oneagent-csi/oneagent-csi/api"
	"github.com/oneagent-csi/oneagent-csi/provisioner"
	"github.com/oneagent-csi/oneagent-csi/storage"
	"github.com/oneagent-csi/oneagent-csi/test/faketenant"
)

var gcVersions = []string{"1.301.0.20250101-000000", "1.303.0.20250201-000000", "1.305.0.20250301-000000", "1.307.0.20250401-000000"}

// clock is a settable clock for the provisioner.
type clock struct {
	mu  sync.Mutex
	now time.Time
}

func (c *clock) Now() time.Time      { c.mu.Lock(); defer c.mu.Unlock(); return c.now }
func (c *clock) add(d time.Duration) { c.mu.Lock(); c.now = c.now.Add(d); c.mu.Unlock() }

// gcFixture has one fake tenant offering gcVersions, every version installed
// through Prepare, a clock, and a mount table the test controls.
type gcFixture struct {
	*fixture
	clock  *clock
	mounts []mount.MountInfo
	ids    map[string]string // version → artifact id
}

func newGCFixture(t *testing.T, tenants func(base provisioner.Tenant) []provisioner.Tenant, gc provisioner.GCOptions) *gcFixture {
	t.Helper()
	g := &gcFixture{clock: &clock{now: time.Date(2026, 11, 1, 0, 0, 0, 0, time.UTC)}, ids: map[string]string{}}
	srv, tenant := startTenant(t, faketenant.Options{Versions: gcVersions})
	layout, err := storage.NewLayout(t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	idx, _, err := storage.Open(storage.ReconcileOptions{Layout: layout})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = idx.Close() })
	ts := []provisioner.Tenant{tenant}
	if tenants != nil {
		ts = tenants(tenant)
	}
	gc.MountInfo = func() ([]mount.MountInfo, error) { return slices.Clone(g.mounts), nil }
	p, err := provisioner.New(provisioner.Options{Layout: layout, Index: idx, Tenants: ts, Client: fastRetries, Now: g.clock.Now, GC: gc})
	if err != nil {
		t.Fatal(err)
	}
	g.fixture = &fixture{srv: srv, prov: p, idx: idx, layout: layout}
	for i, v := range gcVersions {
		prep, err := p.Prepare(context.Background(), ts[0].Name, v)
		if err != nil {
			t.Fatal(err)
		}
		g.ids[v] = prep.Artifact.ID
		// Oldest version least recently used.
		if err := idx.TouchArtifact(prep.Artifact.ID, g.clock.Now().Add(time.Duration(i)*time.Hour)); err != nil {
			t.Fatal(err)
		}
	}
	for _, tn := range ts {
		if _, err := p.Prepare(context.Background(), tn.Name, ""); err != nil { // resolves each tenant's current version
			t.Fatal(err)
		}
	}
	g.clock.add(time.Hour) // the leases of these Prepares have expired
	return g
}

func (g *gcFixture) present(t *testing.T) []string {
	t.Helper()
	var out []string
	for _, v := range gcVersions {
		id := g.ids[v]
		_, ierr := g.idx.GetArtifact(id)
		_, serr := os.Stat(g.layout.Abs(g.layout.Artifact(id)))
		if (ierr == nil) != (serr == nil) {
			t.Fatalf("%s: index and disk disagree: %v / %v", v, ierr, serr)
		}
		if ierr == nil {
			out = append(out, v)
		}
	}
	return out
}

func deletedReasons(rep provisioner.GCReport, kind string) map[string]string {
	out := map[string]string{}
	for _, d := range rep.Deleted {
		if d.Kind == kind {
			out[d.Detail] = d.Reason
		}
	}
	return out
}

func TestGCKeepsCurrentAndPreviousVersions(t *testing.T) {
	g := newGCFixture(t, nil, provisioner.GCOptions{})
	dry, err := g.prov.GC(context.Background(), true)
	if err != nil {
		t.Fatal(err)
	}
	if got := g.present(t); len(got) != 4 {
		t.Fatalf("dry run deleted something: %v", got)
	}
	rep, err := g.prov.GC(context.Background(), false)
	if err != nil {
		t.Fatal(err)
	}
	if want := gcVersions[2:]; !slices.Equal(g.present(t), want) {
		t.Fatalf("kept %v, want %v (current and one previous)", g.present(t), want)
	}
	reasons := deletedReasons(rep, "artifact")
	if len(reasons) != 2 || reasons[gcVersions[0]] != provisioner.ReasonSuperseded || reasons[gcVersions[1]] != provisioner.ReasonSuperseded {
		t.Fatalf("deletions = %+v", rep.Deleted)
	}
	if !slices.EqualFunc(dry.Deleted, rep.Deleted, func(a, b provisioner.GCDeletion) bool { return a.ID == b.ID }) {
		t.Errorf("dry run reported %+v, the pass deleted %+v", dry.Deleted, rep.Deleted)
	}
	layers, _ := g.idx.ListLayers()
	for _, l := range layers {
		if l.ArtifactID == g.ids[gcVersions[0]] || l.ArtifactID == g.ids[gcVersions[1]] {
			t.Errorf("layer %s of a deleted artifact kept", l.Rev)
		}
	}
	entries, _ := os.ReadDir(g.layout.Abs(g.layout.Tmp()))
	if len(entries) != 0 {
		t.Errorf("tmp/ not clean after GC: %v", entries)
	}
	// Nothing more to do.
	again, err := g.prov.GC(context.Background(), false)
	if err != nil || len(again.Deleted) != 0 {
		t.Fatalf("second pass: %+v, %v", again, err)
	}
}

func TestGCBudgetLeastRecentlyUsedFirst(t *testing.T) {
	// Two tenants on the same tenant server: prod pinned to the 3rd version,
	// staging on latest (the 4th). Policy keeps v2..v4; the budget of two
	// artifacts must then drop the least recently used that is not current:
	// v2 (prod's previous).
	twoTenants := func(base provisioner.Tenant) []provisioner.Tenant {
		prod, staging := base, base
		prod.Version = gcVersions[2]
		staging.Name = "staging"
		return []provisioner.Tenant{prod, staging}
	}
	probe := newGCFixture(t, twoTenants, provisioner.GCOptions{KeepPrevious: -1})
	a, err := probe.idx.GetArtifact(probe.ids[gcVersions[3]])
	if err != nil {
		t.Fatal(err)
	}
	budget := 2*a.Size + a.Size/2

	t.Run("lru", func(t *testing.T) {
		g := newGCFixture(t, twoTenants, provisioner.GCOptions{MaxBytes: budget})
		rep, err := g.prov.GC(context.Background(), false)
		if err != nil {
			t.Fatal(err)
		}
		if want := gcVersions[2:]; !slices.Equal(g.present(t), want) {
			t.Fatalf("kept %v, want %v", g.present(t), want)
		}
		if r := deletedReasons(rep, "artifact"); r[gcVersions[1]] != provisioner.ReasonBudget || r[gcVersions[0]] != provisioner.ReasonSuperseded {
			t.Fatalf("deletions = %+v", rep.Deleted)
		}
		if rep.OverrunBytes != 0 || rep.CacheBytes > budget {
			t.Errorf("report = %+v", rep)
		}
	})
	t.Run("in use survives and the overrun is reported", func(t *testing.T) {
		g := newGCFixture(t, twoTenants, provisioner.GCOptions{MaxBytes: budget})
		// A pod still uses the oldest version.
		if err := g.idx.PutVolume(storage.Volume{ID: "vol-old", TargetPath: "/var/lib/kubelet/pods/x/volumes/kubernetes.io~csi/oneagent/mount",
			Mode: api.ModeApp, State: storage.VolumePublished, Tenant: "prod", ArtifactID: g.ids[gcVersions[0]],
			FirstAttempt: g.clock.Now(), PublishedAt: g.clock.Now()}); err != nil {
			t.Fatal(err)
		}
		g.mounts = []mount.MountInfo{{MountPoint: "/var/lib/kubelet/pods/x/volumes/kubernetes.io~csi/oneagent/mount", FsType: "tmpfs"}}
		rep, err := g.prov.GC(context.Background(), false)
		if err != nil {
			t.Fatal(err)
		}
		want := []string{gcVersions[0], gcVersions[2], gcVersions[3]}
		if !slices.Equal(g.present(t), want) {
			t.Fatalf("kept %v, want %v", g.present(t), want)
		}
		if rep.OverrunBytes <= 0 || !slices.Contains(rep.InUse, g.ids[gcVersions[0]]) {
			t.Errorf("report = %+v, want an overrun and the old version in use", rep)
		}
	})
}

func TestGCNeverDeletesWhatMountsUse(t *testing.T) {
	g := newGCFixture(t, nil, provisioner.GCOptions{KeepPrevious: -1})
	l := g.layout
	layers, _ := g.idx.ListLayers()
	var oldLayer storage.TenantLayer
	for _, lay := range layers {
		if lay.ArtifactID == g.ids[gcVersions[0]] {
			oldLayer = lay
		}
	}
	// No records: only the mount table says v1 (overlay lowerdir) and v2
	// (bind source) are in use.
	g.mounts = []mount.MountInfo{
		{ID: 1, Major: 8, Minor: 1, Root: "/", MountPoint: "/", FsType: "ext4"},
		{ID: 2, MountPoint: "/var/lib/kubelet/pods/a/volumes/kubernetes.io~csi/oneagent/mount", FsType: "overlay",
			SuperOptions: []string{"ro", "lowerdir=" + l.Abs(l.TenantLayer(oldLayer.Tenant, oldLayer.Rev)) + ":" + l.Abs(l.Artifact(g.ids[gcVersions[0]]))}},
		{ID: 3, Major: 8, Minor: 1, Root: l.Abs(l.Artifact(g.ids[gcVersions[1]])), MountPoint: "/var/lib/kubelet/pods/b/volumes/kubernetes.io~csi/oneagent/mount", FsType: "ext4"},
	}
	if _, err := g.prov.GC(context.Background(), false); err != nil {
		t.Fatal(err)
	}
	if want := []string{gcVersions[0], gcVersions[1], gcVersions[3]}; !slices.Equal(g.present(t), want) {
		t.Fatalf("kept %v, want %v", g.present(t), want)
	}
	if _, err := g.idx.GetLayer(oldLayer.Tenant, oldLayer.Rev); err != nil {
		t.Errorf("layer used as a lowerdir was deleted: %v", err)
	}
	g.mounts = g.mounts[:1]
	if _, err := g.prov.GC(context.Background(), false); err != nil {
		t.Fatal(err)
	}
	if want := []string{gcVersions[3]}; !slices.Equal(g.present(t), want) {
		t.Fatalf("after the mounts went: kept %v, want %v", g.present(t), want)
	}
}

func TestGCLeaseProtectsFreshPrepare(t *testing.T) {
	g := newGCFixture(t, nil, provisioner.GCOptions{KeepPrevious: -1})
	// A publish is about to mount v1: Prepare hands it out.
	if _, err := g.prov.Prepare(context.Background(), "prod", gcVersions[0]); err != nil {
		t.Fatal(err)
	}
	if _, err := g.prov.GC(context.Background(), false); err != nil {
		t.Fatal(err)
	}
	if !slices.Contains(g.present(t), gcVersions[0]) {
		t.Fatal("artifact handed out by Prepare a moment ago was deleted")
	}
	g.clock.add(time.Hour)
	if _, err := g.prov.GC(context.Background(), false); err != nil {
		t.Fatal(err)
	}
	if slices.Contains(g.present(t), gcVersions[0]) {
		t.Fatal("lease never expires")
	}
}

func TestGCSweepsOrphanRecords(t *testing.T) {
	g := newGCFixture(t, nil, provisioner.GCOptions{OrphanGrace: 10 * time.Minute})
	now := g.clock.Now()
	vols := []storage.Volume{
		{ID: "lost", TargetPath: "/pods/lost/mount", State: storage.VolumePublished, FirstAttempt: now.Add(-time.Hour), PublishedAt: now.Add(-time.Hour)},
		{ID: "young", TargetPath: "/pods/young/mount", State: storage.VolumePublished, FirstAttempt: now, PublishedAt: now.Add(-time.Minute)},
		{ID: "mounted", TargetPath: "/pods/mounted/mount", State: storage.VolumePublished, FirstAttempt: now.Add(-time.Hour), PublishedAt: now.Add(-time.Hour)},
		{ID: "retrying", TargetPath: "/pods/retrying/mount", State: storage.VolumePending, FirstAttempt: now.Add(-time.Hour)},
		{ID: "abandoned", TargetPath: "/pods/abandoned/mount", State: storage.VolumePending, FirstAttempt: now.Add(-48 * time.Hour)},
		// Its record names a target that is gone, but its writable layer is
		// the upper dir of an overlay mounted elsewhere.
		{ID: "moved", TargetPath: "/pods/moved/mount", State: storage.VolumePublished, Writable: true, FirstAttempt: now.Add(-time.Hour), PublishedAt: now.Add(-time.Hour)},
	}
	for _, v := range vols {
		v.Mode = api.ModeApp
		if err := g.idx.PutVolume(v); err != nil {
			t.Fatal(err)
		}
	}
	for _, id := range []string{"lost", "moved"} {
		if err := os.MkdirAll(g.layout.Abs(g.layout.VolumeUpper(id)), 0o755); err != nil {
			t.Fatal(err)
		}
	}
	// Per-volume dirs: one no record refers to (old), one a live overlay
	// uses as its upper dir (no record either), one too young to sweep.
	for _, d := range []string{"stray", "in-use", "young"} {
		if err := os.MkdirAll(g.layout.Abs(g.layout.VolumeUpper(d)), 0o755); err != nil {
			t.Fatal(err)
		}
		if d != "young" {
			old := now.Add(-time.Hour)
			if err := os.Chtimes(g.layout.Abs(g.layout.Volume(d)), old, old); err != nil {
				t.Fatal(err)
			}
		}
	}
	g.mounts = []mount.MountInfo{{MountPoint: "/pods/mounted/mount", FsType: "overlay"},
		{MountPoint: "/pods/writable/mount", FsType: "overlay", SuperOptions: []string{"upperdir=" + g.layout.Abs(g.layout.VolumeUpper("in-use"))}},
		{MountPoint: "/pods/elsewhere/mount", FsType: "overlay", SuperOptions: []string{"upperdir=" + g.layout.Abs(g.layout.VolumeUpper("moved"))}}}
	rep, err := g.prov.GC(context.Background(), false)
	if err != nil {
		t.Fatal(err)
	}
	var swept []string
	for _, d := range rep.Deleted {
		if d.Kind == "volume" {
			swept = append(swept, d.ID)
		}
	}
	slices.Sort(swept)
	if want := []string{"abandoned", "lost", "moved"}; !slices.Equal(swept, want) {
		t.Fatalf("swept %v, want %v", swept, want)
	}
	for _, id := range []string{"lost", "abandoned"} {
		if _, err := g.idx.GetVolume(id); !errors.Is(err, storage.ErrNotFound) {
			t.Errorf("%s: record still there: %v", id, err)
		}
	}
	if _, err := os.Stat(g.layout.Abs(g.layout.Volume("lost"))); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("volume dir of the lost volume kept: %v", err)
	}
	for dir, want := range map[string]bool{"stray": false, "in-use": true, "young": true, "moved": true} {
		_, err := os.Stat(g.layout.Abs(g.layout.Volume(dir)))
		if (err == nil) != want {
			t.Errorf("per-volume dir %s: present = %v, want %v", dir, err == nil, want)
		}
	}
}

func TestCompareVersions(t *testing.T) {
	tests := []struct {
		a, b string
		want int
	}{
		{"1.309.66.20250301-101500", "1.311.72.20250410-123003", -1},
		{"1.311.72.20250410-123003", "1.311.72.20250410-123003", 0},
		{"1.99.0", "1.100.0", -1},
		{"1.300.0.20250101-000000", "1.300.0", 1},
	}
	for _, tc := range tests {
		if got := provisioner.CompareVersions(tc.a, tc.b); (got > 0) != (tc.want > 0) || (got < 0) != (tc.want < 0) {
			t.Errorf("CompareVersions(%s, %s) = %d, want sign of %d", tc.a, tc.b, got, tc.want)
		}
	}
}
