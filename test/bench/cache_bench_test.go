package bench

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"net/http"
	"net/http/httptest"
	"sync"
	"testing"
	"time"

	"github.com/oneagent-csi/oneagent-csi/api"
	"github.com/oneagent-csi/oneagent-csi/driver"
	"github.com/oneagent-csi/oneagent-csi/provisioner"
	"github.com/oneagent-csi/oneagent-csi/storage"
	"github.com/oneagent-csi/oneagent-csi/test/faketenant"
	"github.com/oneagent-csi/oneagent-csi/test/harness"
)

const (
	cacheArtifacts = 200
	cacheVolumes   = 10000
)

// BenchmarkCacheLsAndGC measures `cache ls` (the admin API's artifact list,
// JSON included) and one GC pass over 200 artifacts and 10,000 volume
// records. Every artifact is used by some volume, so the pass evaluates
// everything and deletes nothing (the steady state). The baseline in the
// same run reads every volume record, which both need.
func BenchmarkCacheLsAndGC(b *testing.B) {
	_, tenant := harness.StartTenant(b, faketenant.Options{})
	l, err := storage.NewLayout(b.TempDir())
	if err != nil {
		b.Fatal(err)
	}
	idx, _, err := storage.Open(storage.ReconcileOptions{Layout: l})
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() { _ = idx.Close() })
	now := time.Now()
	ids := make([]string, cacheArtifacts)
	for i := range ids {
		sum := sha256.Sum256(fmt.Appendf(nil, "artifact-%d", i))
		ids[i] = hex.EncodeToString(sum[:])
		v := fmt.Sprintf("1.%d.0.20250101-000000", 100+i)
		if err := idx.PutArtifact(storage.Artifact{ID: ids[i], Version: v, Flavor: "default", Arch: "x86", Size: 300 << 20,
			Files: 15000, State: storage.ArtifactReady, InstalledAt: now, LastUsed: now.Add(time.Duration(i) * time.Minute)},
			storage.ArtifactKey{Version: v, Flavor: "default", Arch: "x86"}); err != nil {
			b.Fatal(err)
		}
		if err := idx.PutLayer(storage.TenantLayer{Tenant: "prod", Rev: fmt.Sprintf("r1-%016x", i), ArtifactID: ids[i], Revision: 1, CreatedAt: now}); err != nil {
			b.Fatal(err)
		}
	}
	var wg sync.WaitGroup
	sem := make(chan struct{}, 64)
	for i := range cacheVolumes {
		wg.Add(1)
		sem <- struct{}{}
		go func() {
			defer func() { <-sem; wg.Done() }()
			art := i % cacheArtifacts
			if err := idx.PutVolume(storage.Volume{ID: fmt.Sprintf("csi-%064d", i), TargetPath: fmt.Sprintf("/var/lib/kubelet/pods/%08d/volumes/kubernetes.io~csi/oneagent/mount", i),
				Mode: api.ModeApp, State: storage.VolumePublished, Tenant: "prod", ArtifactID: ids[art], LayerRev: fmt.Sprintf("r1-%016x", art),
				PodName: fmt.Sprintf("app-%d", i), PodNamespace: "shop", FirstAttempt: now, PublishedAt: now}); err != nil {
				b.Error(err)
			}
		}()
	}
	wg.Wait()
	prov, err := provisioner.New(provisioner.Options{Layout: l, Index: idx, Tenants: []provisioner.Tenant{tenant}, GC: provisioner.GCOptions{KeepPrevious: 1}})
	if err != nil {
		b.Fatal(err)
	}
	admin := driver.AdminHandler(&driver.Inspector{Index: idx, Layout: l, GC: prov.GC})

	b.Run("baseline=list-volumes", func(b *testing.B) {
		for b.Loop() {
			if v, err := idx.ListVolumes(); err != nil || len(v) != cacheVolumes {
				b.Fatal(len(v), err)
			}
		}
	})
	b.Run("cache-ls", func(b *testing.B) {
		for b.Loop() {
			rec := httptest.NewRecorder()
			admin.ServeHTTP(rec, httptest.NewRequest(http.MethodGet, driver.AdminArtifacts, nil))
			if rec.Code != http.StatusOK {
				b.Fatal(rec.Code, rec.Body.String())
			}
		}
	})
	b.Run("gc-pass", func(b *testing.B) {
		for b.Loop() {
			rep, err := prov.GC(context.Background(), false)
			if err != nil || len(rep.Deleted) != 0 {
				b.Fatalf("%+v, %v", rep.Deleted, err)
			}
		}
	})
}
