package storage

import (
	"errors"
	"os"
	"path/filepath"
	"strconv"
	"sync"
	"testing"
	"time"
)

func openTestIndex(t *testing.T) *Index {
	t.Helper()
	idx, err := OpenIndex(filepath.Join(t.TempDir(), "index.db"), time.Second, false)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { idx.Close() })
	return idx
}

func TestIndexIdempotentOperations(t *testing.T) {
	idx := openTestIndex(t)
	if err := idx.DeleteVolume("missing", "/nowhere"); err != nil {
		t.Fatalf("deleting a missing volume: %v", err)
	}
	if err := idx.DeleteArtifact("missing"); err != nil {
		t.Fatalf("deleting a missing artifact: %v", err)
	}
	if err := idx.TouchArtifact("missing", time.Now()); err != nil {
		t.Fatalf("touching a missing artifact: %v", err)
	}
	if _, err := idx.GetVolume("missing"); !errors.Is(err, ErrNotFound) {
		t.Fatalf("GetVolume missing: %v", err)
	}
	a := Artifact{ID: "id1", Version: "1.2.3", State: ArtifactReady}
	key := ArtifactKey{Version: "1.2.3", Flavor: "default", Arch: "x86"}
	for range 2 {
		if err := idx.PutArtifact(a, key); err != nil {
			t.Fatal(err)
		}
	}
	got, err := idx.LookupArtifact(key)
	if err != nil || got.ID != "id1" {
		t.Fatalf("LookupArtifact = %+v, %v", got, err)
	}
	if err := idx.DeleteArtifact("id1"); err != nil {
		t.Fatal(err)
	}
	if _, err := idx.LookupArtifact(key); !errors.Is(err, ErrNotFound) {
		t.Fatalf("key survived artifact deletion: %v", err)
	}
}

func TestIndexVolumesByTarget(t *testing.T) {
	idx := openTestIndex(t)
	v := Volume{ID: "v1", TargetPath: "/t/1", State: VolumePublished}
	if err := idx.PutVolume(v); err != nil {
		t.Fatal(err)
	}
	got, err := idx.VolumeByTarget("/t/1")
	if err != nil || got.ID != "v1" {
		t.Fatalf("VolumeByTarget = %+v, %v", got, err)
	}
	// Deleting by target alone removes an adopted record with another id.
	if err := idx.DeleteVolume("other-id", "/t/1"); err != nil {
		t.Fatal(err)
	}
	if _, err := idx.GetVolume("v1"); !errors.Is(err, ErrNotFound) {
		t.Fatalf("record survived delete by target: %v", err)
	}
}

func TestIndexConcurrentWritesGroupCommit(t *testing.T) {
	idx := openTestIndex(t)
	var wg sync.WaitGroup
	for i := range 300 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			if err := idx.PutVolume(Volume{ID: "v" + strconv.Itoa(i), TargetPath: "/t/" + strconv.Itoa(i)}); err != nil {
				t.Error(err)
			}
		}()
	}
	wg.Wait()
	vols, err := idx.ListVolumes()
	if err != nil || len(vols) != 300 {
		t.Fatalf("%d volumes, %v", len(vols), err)
	}
}

func TestValuesOutliveTransactions(t *testing.T) {
	idx := openTestIndex(t)
	if err := idx.PutVolume(Volume{ID: "v", TargetPath: "/t", PodName: "pod"}); err != nil {
		t.Fatal(err)
	}
	v, _ := idx.GetVolume("v")
	// Overwrite heavily so that mmap'd pages get reused; the copy must not change.
	for i := range 100 {
		_ = idx.PutVolume(Volume{ID: "v", TargetPath: "/t", PodName: "other" + strconv.Itoa(i)})
	}
	if v.PodName != "pod" {
		t.Fatalf("value changed after its transaction: %q", v.PodName)
	}
}

func TestOpenIndexRefusesCorruptAndNewerSchema(t *testing.T) {
	dir := t.TempDir()
	bad := filepath.Join(dir, "bad.db")
	if err := os.WriteFile(bad, []byte("this is not a bbolt file, not at all, really not"), 0o600); err != nil {
		t.Fatal(err)
	}
	if _, err := OpenIndex(bad, time.Second, false); !errors.Is(err, ErrIndexCorrupt) {
		t.Fatalf("garbage file: %v, want ErrIndexCorrupt", err)
	}
	path := filepath.Join(dir, "index.db")
	idx, err := OpenIndex(path, time.Second, false)
	if err != nil {
		t.Fatal(err)
	}
	if err := idx.db.Update(func(tx *boltTx) error { return tx.Bucket(bucketMeta).Put(keySchema, []byte("99")) }); err != nil {
		t.Fatal(err)
	}
	idx.Close()
	if _, err := OpenIndex(path, time.Second, false); !errors.Is(err, ErrIndexCorrupt) {
		t.Fatalf("newer schema: %v, want refusal", err)
	}
}

func TestOpenIndexLockTimeout(t *testing.T) {
	path := filepath.Join(t.TempDir(), "index.db")
	idx, err := OpenIndex(path, time.Second, false)
	if err != nil {
		t.Fatal(err)
	}
	defer idx.Close()
	_, err = OpenIndex(path, 50*time.Millisecond, true)
	if err == nil {
		t.Fatal("a second open of a locked index succeeded")
	}
}
