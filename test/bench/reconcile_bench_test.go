package bench

import (
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/spf13/afero"
	"k8s.io/mount-utils"

	"github.com/oneagent-csi/oneagent-csi/api"
	"github.com/oneagent-csi/oneagent-csi/storage"
)

const (
	reconcileVolumes   = 10000
	reconcileArtifacts = 50
)

// reconcileFixture is a data dir with 50 installed artifacts, one tenant
// layer, an index holding 10,000 published app-mode volumes, and a
// mountinfo file listing this machine's mounts plus the 10,000 overlays.
// The overlays are not really mounted (10,000 mounts would change the
// machine under the other benchmarks); the file goes through the real
// mountinfo parser.
type reconcileFixture struct {
	layout    storage.Layout
	mountinfo string
}

func newReconcileFixture(b *testing.B) reconcileFixture {
	b.Helper()
	root := b.TempDir()
	l, err := storage.NewLayout(root)
	if err != nil {
		b.Fatal(err)
	}
	fs := afero.NewBasePathFs(afero.NewOsFs(), root)
	now := time.Now()
	ids := make([]string, reconcileArtifacts)
	for i := range ids {
		sum := sha256.Sum256(fmt.Appendf(nil, "artifact-%d", i))
		ids[i] = hex.EncodeToString(sum[:])
		version := fmt.Sprintf("1.%d.0.20250101-000000", 300+i)
		if err := fs.MkdirAll(filepath.Join(l.Artifact(ids[i]), "agent", "lib64"), 0o755); err != nil {
			b.Fatal(err)
		}
		f, err := fs.Create(l.ArtifactManifest(ids[i]))
		if err != nil {
			b.Fatal(err)
		}
		// A real manifest has ~15,000 entries; reconcile reads only the header.
		entries := make([]storage.ManifestEntry, 15000)
		for j := range entries {
			entries[j] = storage.ManifestEntry{Path: fmt.Sprintf("agent/bin/any/lib%05d.so", j), Type: "file", Mode: 0o755, Size: 180000, SHA256: ids[i]}
		}
		err = storage.WriteManifest(f, storage.ManifestHeader{Schema: 1, ArtifactID: ids[i], Version: version, Flavor: "default",
			Arch: "x86", ZipSize: 1 << 30, Size: 2700 << 20, Files: len(entries), InstalledAt: now}, entries)
		if cerr := f.Close(); err == nil {
			err = cerr
		}
		if err != nil {
			b.Fatal(err)
		}
	}
	const tenant, rev = "prod", "r1-0123456789abcdef"
	if err := fs.MkdirAll(l.TenantLayer(tenant, rev), 0o755); err != nil {
		b.Fatal(err)
	}
	info, _ := json.Marshal(storage.TenantLayer{Tenant: tenant, Rev: rev, ArtifactID: ids[0], Revision: 1, CreatedAt: now})
	if err := afero.WriteFile(fs, l.LayerInfoPath(tenant, rev), info, 0o644); err != nil {
		b.Fatal(err)
	}

	// The index, built through storage.Open so that the artifacts are recorded.
	idx, _, err := storage.Open(storage.ReconcileOptions{Layout: l, Fs: fs})
	if err != nil {
		b.Fatal(err)
	}
	real, err := os.ReadFile("/proc/self/mountinfo")
	if err != nil {
		b.Fatal(err)
	}
	var mi strings.Builder
	mi.Write(real)
	var wg sync.WaitGroup
	errs := make(chan error, reconcileVolumes)
	sem := make(chan struct{}, 64)
	for i := range reconcileVolumes {
		target := fmt.Sprintf("/var/lib/kubelet/pods/%08d-0000-4000-8000-000000000000/volumes/kubernetes.io~csi/oneagent/mount", i)
		art := ids[i%len(ids)]
		fmt.Fprintf(&mi, "%d 30 0:%d / %s ro,nodev,nosuid,relatime shared:%d - overlay overlay ro,lowerdir=%s:%s,redirect_dir=nofollow,uuid=null\n",
			100000+i, 1000+i, target, 5000+i, l.Abs(l.TenantLayer(tenant, rev)), l.Abs(l.Artifact(art)))
		wg.Add(1)
		sem <- struct{}{}
		go func() {
			defer func() { <-sem; wg.Done() }()
			errs <- idx.PutVolume(storage.Volume{ID: fmt.Sprintf("csi-%064d", i), TargetPath: target, Mode: api.ModeApp,
				State: storage.VolumePublished, Tenant: tenant, ArtifactID: art, LayerRev: rev, ReadOnly: true,
				PodName: fmt.Sprintf("app-%d", i), PodNamespace: "shop", PodUID: fmt.Sprintf("%08d", i),
				FirstAttempt: now, PublishedAt: now})
		}()
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		if err != nil {
			b.Fatal(err)
		}
	}
	if err := idx.Close(); err != nil {
		b.Fatal(err)
	}
	path := filepath.Join(b.TempDir(), "mountinfo")
	if err := os.WriteFile(path, []byte(mi.String()), 0o644); err != nil {
		b.Fatal(err)
	}
	return reconcileFixture{layout: l, mountinfo: path}
}

func (f reconcileFixture) open(b *testing.B) storage.ReconcileReport {
	idx, rep, err := storage.Open(storage.ReconcileOptions{Layout: f.layout,
		MountInfo: func() ([]mount.MountInfo, error) { return mount.ParseMountInfo(f.mountinfo) }})
	if err != nil {
		b.Fatal(err)
	}
	if err := idx.Close(); err != nil {
		b.Fatal(err)
	}
	return rep
}

// BenchmarkStartupReconcile measures storage.Open at node start-up with
// 10,000 published volumes and 50 artifacts: with the index intact, and with
// index.db deleted (rebuilt from the artifacts on disk and mountinfo). The
// baseline in the same run opens the intact index and reads every volume
// record, the least any start-up can do.
func BenchmarkStartupReconcile(b *testing.B) {
	f := newReconcileFixture(b)
	b.Run("baseline=open-and-list", func(b *testing.B) {
		for i := 0; i < b.N; i++ {
			idx, err := storage.OpenIndex(f.layout.Abs(f.layout.IndexFile()), 5*time.Second, false)
			if err != nil {
				b.Fatal(err)
			}
			vols, err := idx.ListVolumes()
			if err != nil || len(vols) != reconcileVolumes {
				b.Fatalf("list volumes: %d, %v", len(vols), err)
			}
			if err := idx.Close(); err != nil {
				b.Fatal(err)
			}
		}
	})
	b.Run("index=intact", func(b *testing.B) {
		for i := 0; i < b.N; i++ {
			rep := f.open(b)
			if rep.MountsFound != reconcileVolumes || rep.VolumesDropped != 0 || rep.ArtifactsKept != reconcileArtifacts {
				b.Fatalf("unexpected reconcile: %+v", rep)
			}
		}
	})
	b.Run("index=deleted", func(b *testing.B) {
		for i := 0; i < b.N; i++ {
			b.StopTimer()
			if err := os.Remove(f.layout.Abs(f.layout.IndexFile())); err != nil {
				b.Fatal(err)
			}
			b.StartTimer()
			rep := f.open(b)
			if rep.VolumesAdopted != reconcileVolumes || rep.ArtifactsAdded != reconcileArtifacts {
				b.Fatalf("unexpected rebuild: %+v", rep)
			}
		}
	})
}
