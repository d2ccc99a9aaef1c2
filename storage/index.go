package storage

import (
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"strconv"
	"sync"
	"time"

	bolt "go.etcd.io/bbolt"
	bolterrors "go.etcd.io/bbolt/errors"
)

// SchemaVersion is the index schema this build writes. Buckets carry the
// version in their name so a future schema can be migrated side by side.
const SchemaVersion = 1

var (
	bucketMeta         = []byte("meta")
	bucketArtifacts    = []byte("artifacts.v1")
	bucketArtifactKeys = []byte("artifactKeys.v1")
	bucketVolumes      = []byte("volumes.v1")
	bucketTargets      = []byte("targets.v1")
	bucketLayers       = []byte("layers.v1")
	bucketResolutions  = []byte("resolutions.v1")
	keySchema          = []byte("schema")

	allBuckets = [][]byte{bucketMeta, bucketArtifacts, bucketArtifactKeys, bucketVolumes, bucketTargets, bucketLayers, bucketResolutions}
)

// Index is the bbolt index of artifacts, tenant layers, version resolutions
// and volume records. Disk and mountinfo are the truth; the index records what
// cannot be recomputed cheaply and can be rebuilt by Reconcile.
//
// Every method is safe for concurrent use. Values returned are copies that
// outlive the transaction. Put methods overwrite; Delete methods are
// idempotent: it is not an error when the record does not exist. Get methods
// return ErrNotFound when it does not.
type Index struct {
	db      *bolt.DB
	commits chan commitRequest
	stop    chan struct{}
	stopped chan struct{}

	closeOnce sync.Once
	closeErr  error
	// lock is the data dir lock taken by Open; released by Close.
	lock *dirLock
}

// OpenIndex opens or creates the index at path. It waits at most timeout for
// the file lock (another process holding it) and returns an error wrapping
// ErrIndexCorrupt when the file exists but is not a usable index.
func OpenIndex(path string, timeout time.Duration, readOnly bool) (*Index, error) {
	db, err := bolt.Open(path, 0o600, &bolt.Options{Timeout: timeout, ReadOnly: readOnly})
	if err != nil {
		if errors.Is(err, bolterrors.ErrTimeout) {
			return nil, fmt.Errorf("open index %s: locked by another process: %w", path, err)
		}
		if errors.Is(err, os.ErrNotExist) || errors.Is(err, os.ErrPermission) {
			return nil, fmt.Errorf("open index %s: %w", path, err)
		}
		return nil, fmt.Errorf("open index %s: %w: %w", path, ErrIndexCorrupt, err)
	}
	idx := &Index{db: db}
	if readOnly {
		if err := idx.checkSchema(); err != nil {
			_ = db.Close()
			return nil, err
		}
		return idx, nil
	}
	if err := idx.migrate(); err != nil {
		_ = db.Close()
		return nil, err
	}
	idx.startGroupCommit()
	return idx, nil
}

func (x *Index) checkSchema() error {
	return x.db.View(func(tx *bolt.Tx) error {
		b := tx.Bucket(bucketMeta)
		if b == nil {
			return fmt.Errorf("index has no meta bucket: %w", ErrIndexCorrupt)
		}
		v, err := strconv.Atoi(string(b.Get(keySchema)))
		if err != nil || v > SchemaVersion {
			return fmt.Errorf("index schema %q not supported by this build (want <= %d): %w", b.Get(keySchema), SchemaVersion, ErrIndexCorrupt)
		}
		return nil
	})
}

// migrate creates missing buckets and records the schema version. It is
// idempotent; a schema newer than this build is refused.
func (x *Index) migrate() (err error) {
	defer func() {
		// bbolt panics on some kinds of page corruption; treat that as corrupt.
		if r := recover(); r != nil {
			err = fmt.Errorf("migrate index: %v: %w", r, ErrIndexCorrupt)
		}
	}()
	return x.db.Update(func(tx *bolt.Tx) error {
		for _, name := range allBuckets {
			if _, err := tx.CreateBucketIfNotExists(name); err != nil {
				return fmt.Errorf("create bucket %s: %w: %w", name, ErrIndexCorrupt, err)
			}
		}
		meta := tx.Bucket(bucketMeta)
		if cur := meta.Get(keySchema); cur != nil {
			v, err := strconv.Atoi(string(cur))
			if err != nil {
				return fmt.Errorf("schema key %q: %w", cur, ErrIndexCorrupt)
			}
			if v > SchemaVersion {
				return fmt.Errorf("index schema %d is newer than this build (%d): %w", v, SchemaVersion, ErrIndexCorrupt)
			}
		}
		return meta.Put(keySchema, []byte(strconv.Itoa(SchemaVersion)))
	})
}

// Close closes the index. It is safe to call on a nil index and more than once.
func (x *Index) Close() error {
	if x == nil || x.db == nil {
		return nil
	}
	x.closeOnce.Do(func() {
		x.stopGroupCommit()
		x.closeErr = x.db.Close()
		x.lock.release()
	})
	return x.closeErr
}

// Path is the file of the index.
func (x *Index) Path() string { return x.db.Path() }

// Ping checks that the index is open and answers a read.
func (x *Index) Ping() error {
	return x.db.View(func(tx *bolt.Tx) error {
		if tx.Bucket(bucketMeta) == nil {
			return fmt.Errorf("meta bucket missing: %w", ErrIndexCorrupt)
		}
		return nil
	})
}

func put(tx *bolt.Tx, bucket []byte, key string, v any) error {
	data, err := json.Marshal(v)
	if err != nil {
		return fmt.Errorf("encode %s/%s: %w", bucket, key, err)
	}
	return tx.Bucket(bucket).Put([]byte(key), data)
}

// get decodes a value; json.Unmarshal copies, so nothing refers to mmap'd
// memory after the transaction.
func get(tx *bolt.Tx, bucket []byte, key string, v any) error {
	data := tx.Bucket(bucket).Get([]byte(key))
	if data == nil {
		return fmt.Errorf("%s %q: %w", bucket, key, ErrNotFound)
	}
	if err := json.Unmarshal(data, v); err != nil {
		return fmt.Errorf("decode %s/%s: %w", bucket, key, err)
	}
	return nil
}

func list[T any](x *Index, bucket []byte) ([]T, error) {
	var out []T
	err := x.db.View(func(tx *bolt.Tx) error {
		return tx.Bucket(bucket).ForEach(func(k, data []byte) error {
			var v T
			if err := json.Unmarshal(data, &v); err != nil {
				return fmt.Errorf("decode %s/%s: %w", bucket, k, err)
			}
			out = append(out, v)
			return nil
		})
	})
	return out, err
}

// PutArtifact records an installed artifact and maps key to it.
func (x *Index) PutArtifact(a Artifact, key ArtifactKey) error {
	return x.db.Update(func(tx *bolt.Tx) error {
		if err := put(tx, bucketArtifacts, a.ID, a); err != nil {
			return err
		}
		return tx.Bucket(bucketArtifactKeys).Put([]byte(key.String()), []byte(a.ID))
	})
}

// GetArtifact returns the artifact record with id.
func (x *Index) GetArtifact(id string) (Artifact, error) {
	var a Artifact
	err := x.db.View(func(tx *bolt.Tx) error { return get(tx, bucketArtifacts, id, &a) })
	return a, err
}

// LookupArtifact returns the artifact that key maps to.
func (x *Index) LookupArtifact(key ArtifactKey) (Artifact, error) {
	var a Artifact
	err := x.db.View(func(tx *bolt.Tx) error {
		id := tx.Bucket(bucketArtifactKeys).Get([]byte(key.String()))
		if id == nil {
			return fmt.Errorf("artifact for %s: %w", key, ErrNotFound)
		}
		return get(tx, bucketArtifacts, string(id), &a)
	})
	return a, err
}

// ListArtifacts returns every artifact record.
func (x *Index) ListArtifacts() ([]Artifact, error) { return list[Artifact](x, bucketArtifacts) }

// TouchArtifact sets the last-used time of an artifact; it is not an error
// when the artifact is unknown.
func (x *Index) TouchArtifact(id string, at time.Time) error {
	return x.group(func(tx *bolt.Tx) error {
		var a Artifact
		if err := get(tx, bucketArtifacts, id, &a); err != nil {
			if errors.Is(err, ErrNotFound) {
				return nil
			}
			return err
		}
		if !at.After(a.LastUsed) {
			return nil
		}
		a.LastUsed = at
		return put(tx, bucketArtifacts, id, a)
	})
}

// DeleteArtifact removes an artifact record and every key mapping to it.
func (x *Index) DeleteArtifact(id string) error {
	return x.db.Update(func(tx *bolt.Tx) error { return deleteArtifactTx(tx, id) })
}

func layerKey(tenant, rev string) string { return tenant + "/" + rev }

// PutLayer records a tenant config layer.
func (x *Index) PutLayer(l TenantLayer) error {
	return x.db.Update(func(tx *bolt.Tx) error { return put(tx, bucketLayers, layerKey(l.Tenant, l.Rev), l) })
}

// GetLayer returns the record of a tenant layer.
func (x *Index) GetLayer(tenant, rev string) (TenantLayer, error) {
	var l TenantLayer
	err := x.db.View(func(tx *bolt.Tx) error { return get(tx, bucketLayers, layerKey(tenant, rev), &l) })
	return l, err
}

// ListLayers returns every tenant layer record.
func (x *Index) ListLayers() ([]TenantLayer, error) { return list[TenantLayer](x, bucketLayers) }

// DeleteLayer removes a tenant layer record.
func (x *Index) DeleteLayer(tenant, rev string) error {
	return x.db.Update(func(tx *bolt.Tx) error { return tx.Bucket(bucketLayers).Delete([]byte(layerKey(tenant, rev))) })
}

// PutResolution records what "latest" resolved to for a tenant.
func (x *Index) PutResolution(r Resolution) error {
	return x.group(func(tx *bolt.Tx) error { return put(tx, bucketResolutions, r.Tenant, r) })
}

// GetResolution returns the last resolution of "latest" for tenant.
func (x *Index) GetResolution(tenant string) (Resolution, error) {
	var r Resolution
	err := x.db.View(func(tx *bolt.Tx) error { return get(tx, bucketResolutions, tenant, &r) })
	return r, err
}

// PutVolume records a volume, replacing any record with the same id, and
// indexes it by target path. Concurrent calls are batched into one commit.
func (x *Index) PutVolume(v Volume) error {
	return x.group(func(tx *bolt.Tx) error { return putVolume(tx, v) })
}

func putVolume(tx *bolt.Tx, v Volume) error {
	if err := put(tx, bucketVolumes, v.ID, v); err != nil {
		return err
	}
	if v.TargetPath != "" {
		return tx.Bucket(bucketTargets).Put([]byte(v.TargetPath), []byte(v.ID))
	}
	return nil
}

// GetVolume returns the record of a volume.
func (x *Index) GetVolume(id string) (Volume, error) {
	var v Volume
	err := x.db.View(func(tx *bolt.Tx) error { return get(tx, bucketVolumes, id, &v) })
	return v, err
}

// ListVolumes returns every volume record.
func (x *Index) ListVolumes() ([]Volume, error) { return list[Volume](x, bucketVolumes) }

// DeleteVolume removes the record of volume id and any record published at
// targetPath (an adopted record has another id). Either may be empty.
func (x *Index) DeleteVolume(id, targetPath string) error {
	return x.group(func(tx *bolt.Tx) error { return deleteVolume(tx, id, targetPath) })
}

func deleteVolume(tx *bolt.Tx, id, targetPath string) error {
	vols, targets := tx.Bucket(bucketVolumes), tx.Bucket(bucketTargets)
	if targetPath != "" {
		if other := targets.Get([]byte(targetPath)); other != nil {
			if err := vols.Delete(append([]byte(nil), other...)); err != nil {
				return err
			}
			if err := targets.Delete([]byte(targetPath)); err != nil {
				return err
			}
		}
	}
	if id == "" {
		return nil
	}
	if data := vols.Get([]byte(id)); data != nil {
		var v Volume
		if err := json.Unmarshal(data, &v); err == nil && v.TargetPath != "" {
			if cur := targets.Get([]byte(v.TargetPath)); string(cur) == id {
				if err := targets.Delete([]byte(v.TargetPath)); err != nil {
					return err
				}
			}
		}
	}
	return vols.Delete([]byte(id))
}

// VolumeByTarget returns the record published at targetPath.
func (x *Index) VolumeByTarget(targetPath string) (Volume, error) {
	var v Volume
	err := x.db.View(func(tx *bolt.Tx) error {
		id := tx.Bucket(bucketTargets).Get([]byte(targetPath))
		if id == nil {
			return fmt.Errorf("volume at %q: %w", targetPath, ErrNotFound)
		}
		return get(tx, bucketVolumes, string(id), &v)
	})
	return v, err
}
