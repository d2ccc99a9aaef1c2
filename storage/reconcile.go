package storage

import (
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"sort"
	"strings"
	"time"

	"github.com/spf13/afero"
	bolt "go.etcd.io/bbolt"
	"golang.org/x/sys/unix"
	"k8s.io/klog/v2"
	"k8s.io/mount-utils"

	"github.com/oneagent-csi/oneagent-csi/api"
)

// ReconcileOptions configures Open.
type ReconcileOptions struct {
	// Layout of the data dir. Required.
	Layout Layout
	// Fs is rooted at the data dir. Default: afero.NewBasePathFs(OsFs, Layout.Root()).
	Fs afero.Fs
	// MountInfo returns the mount table. Default: parse /proc/self/mountinfo.
	MountInfo func() ([]mount.MountInfo, error)
	// Now is the clock. Default time.Now.
	Now func() time.Time
	// LockTimeout bounds the wait for the data dir's lock (held by another
	// node process) and for index.db's file lock. Default 5s.
	LockTimeout time.Duration
	// Unmount detaches a mount that a crash left in tmp/ (a staging bind)
	// before tmp/ is wiped. Default: umount2(MNT_DETACH|UMOUNT_NOFOLLOW).
	Unmount func(target string) error
}

// ReconcileReport says what start-up reconcile found and changed.
type ReconcileReport struct {
	TmpEntriesRemoved   int
	IndexRebuilt        bool
	ArtifactsKept       int
	ArtifactsAdded      int
	ArtifactsDropped    []string
	PartialRemoved      []string
	LayersAdded         int
	LayersDropped       int
	VolumesAdopted      int
	VolumesDropped      int
	VolumeDirsRemoved   int
	MountsFound         int
	Duration            time.Duration
	CorruptIndexMovedTo string
}

func (o *ReconcileOptions) defaults() {
	if o.Fs == nil {
		o.Fs = afero.NewBasePathFs(afero.NewOsFs(), o.Layout.Root())
	}
	if o.MountInfo == nil {
		o.MountInfo = func() ([]mount.MountInfo, error) { return mount.ParseMountInfo("/proc/self/mountinfo") }
	}
	if o.Now == nil {
		o.Now = time.Now
	}
	if o.LockTimeout == 0 {
		o.LockTimeout = 5 * time.Second
	}
	if o.Unmount == nil {
		o.Unmount = func(target string) error { return unix.Unmount(target, unix.MNT_DETACH|unix.UMOUNT_NOFOLLOW) }
	}
}

// Open locks the data dir (ErrDataDirInUse when another process holds it),
// prepares it and returns its index, reconciled with disk and mountinfo:
// mounts left in tmp/ are detached and tmp/ is wiped, partial artifacts and layers are removed, records
// without files are dropped, files without records are indexed, mounts of our
// artifacts or host dirs that have no record are adopted, and records of
// published volumes that are no longer mounted are dropped. A corrupt index
// is moved aside and rebuilt from disk and mountinfo alone.
func Open(opts ReconcileOptions) (*Index, ReconcileReport, error) {
	opts.defaults()
	start := opts.Now()
	var rep ReconcileReport
	l := opts.Layout
	if err := os.MkdirAll(l.Root(), 0o755); err != nil {
		return nil, rep, fmt.Errorf("create data dir: %w", err)
	}
	lock, err := lockDataDir(l.Root(), opts.LockTimeout)
	if err != nil {
		return nil, rep, err
	}
	idx, err := openLocked(opts, &rep)
	if err != nil {
		lock.release()
		return nil, rep, err
	}
	idx.lock = lock
	rep.Duration = opts.Now().Sub(start)
	return idx, rep, nil
}

// openLocked is Open once the data dir lock is held.
func openLocked(opts ReconcileOptions, rep *ReconcileReport) (*Index, error) {
	l, fs := opts.Layout, opts.Fs
	for _, d := range l.TopLevelDirs() {
		if err := fs.MkdirAll(d, 0o755); err != nil {
			return nil, fmt.Errorf("create %s: %w", l.Abs(d), err)
		}
	}
	if err := detachBelow(l.Abs(l.Tmp()), opts.MountInfo, opts.Unmount); err != nil {
		return nil, err
	}
	n, err := wipeDir(fs, l.Tmp())
	rep.TmpEntriesRemoved = n
	if err != nil {
		return nil, err
	}

	idxPath := l.Abs(l.IndexFile())
	idx, err := OpenIndex(idxPath, opts.LockTimeout, false)
	if errors.Is(err, ErrIndexCorrupt) {
		moved := fmt.Sprintf("%s.corrupt-%d", idxPath, opts.Now().Unix())
		klog.ErrorS(err, "index is corrupt, moving it aside and rebuilding from disk and mountinfo", "movedTo", moved)
		if rerr := os.Rename(idxPath, moved); rerr != nil {
			return nil, fmt.Errorf("move corrupt index aside: %w", rerr)
		}
		rep.IndexRebuilt, rep.CorruptIndexMovedTo = true, moved
		idx, err = OpenIndex(idxPath, opts.LockTimeout, false)
	}
	if err != nil {
		return nil, err
	}
	if err := reconcile(idx, &opts, rep); err != nil {
		_ = idx.Close()
		return nil, fmt.Errorf("reconcile data dir %s: %w", l.Root(), err)
	}
	return idx, nil
}

// detachBelow detaches every mount below dir, deepest first: wiping a dir
// through a bind mount would delete the bind's source.
func detachBelow(dir string, mountInfo func() ([]mount.MountInfo, error), unmount func(string) error) error {
	mis, err := mountInfo()
	if err != nil {
		return fmt.Errorf("read mountinfo: %w", err)
	}
	var below []string
	for _, m := range mis {
		if strings.HasPrefix(m.MountPoint, dir+"/") {
			below = append(below, m.MountPoint)
		}
	}
	sort.Sort(sort.Reverse(sort.StringSlice(below)))
	for _, target := range below {
		klog.InfoS("detaching a staging mount left in tmp/", "target", target)
		if err := unmount(target); err != nil {
			return fmt.Errorf("detach %s before wiping tmp/: %w", target, err)
		}
	}
	return nil
}

func wipeDir(fs afero.Fs, dir string) (int, error) {
	entries, err := afero.ReadDir(fs, dir)
	if err != nil {
		return 0, fmt.Errorf("read %s: %w", dir, err)
	}
	for _, e := range entries {
		if err := fs.RemoveAll(filepath.Join(dir, e.Name())); err != nil {
			return 0, fmt.Errorf("wipe %s: %w", dir, err)
		}
	}
	return len(entries), nil
}

// ourMount is a mount in mountinfo that serves something from the data dir.
type ourMount struct {
	target     string
	mode       api.Mode
	artifactID string
	tenant     string
	layerRev   string
	upperDir   string
	failedOpen bool
	// volumeDir is the name of the volumes/ dir whose layers (upper dir,
	// containers' configuration) the mount uses, if any.
	volumeDir string
}

func reconcile(idx *Index, o *ReconcileOptions, rep *ReconcileReport) error {
	l, fs := o.Layout, o.Fs
	now := o.Now()

	// Artifacts: disk is the truth.
	onDisk := map[string]ManifestHeader{}
	entries, err := afero.ReadDir(fs, l.ArtifactsDir())
	if err != nil {
		return err
	}
	for _, e := range entries {
		id := e.Name()
		h, herr := ReadManifestHeader(fs, l.ArtifactManifest(id))
		if !e.IsDir() || !ValidArtifactID(id) || herr != nil || h.ArtifactID != id {
			klog.InfoS("removing partial or foreign artifact", "artifact", id, "err", herr)
			if err := fs.RemoveAll(l.Artifact(id)); err != nil {
				return err
			}
			rep.PartialRemoved = append(rep.PartialRemoved, id)
			continue
		}
		onDisk[id] = h
	}
	layersOnDisk := map[string]TenantLayer{}
	tenants, err := afero.ReadDir(fs, l.TenantsDir())
	if err != nil {
		return err
	}
	for _, t := range tenants {
		revs, err := afero.ReadDir(fs, filepath.Join(l.TenantsDir(), t.Name()))
		if err != nil {
			continue
		}
		for _, r := range revs {
			lay, lerr := ReadLayerInfo(fs, l, t.Name(), r.Name())
			if lerr != nil {
				klog.InfoS("removing partial tenant layer", "tenant", t.Name(), "rev", r.Name(), "err", lerr)
				if err := fs.RemoveAll(l.TenantLayer(t.Name(), r.Name())); err != nil {
					return err
				}
				rep.PartialRemoved = append(rep.PartialRemoved, l.TenantLayer(t.Name(), r.Name()))
				continue
			}
			layersOnDisk[layerKey(lay.Tenant, lay.Rev)] = lay
		}
	}

	mounts, err := o.MountInfo()
	if err != nil {
		return fmt.Errorf("read mountinfo: %w", err)
	}
	found := findOurMounts(l, mounts)
	rep.MountsFound = len(found)

	return idx.db.Update(func(tx *bolt.Tx) error {
		arts := tx.Bucket(bucketArtifacts)
		var stale []string
		if err := arts.ForEach(func(k, _ []byte) error {
			if _, ok := onDisk[string(k)]; !ok {
				stale = append(stale, string(k))
			}
			return nil
		}); err != nil {
			return err
		}
		for _, id := range stale {
			if err := deleteArtifactTx(tx, id); err != nil {
				return err
			}
			rep.ArtifactsDropped = append(rep.ArtifactsDropped, id)
		}
		for id, h := range onDisk {
			if arts.Get([]byte(id)) != nil {
				rep.ArtifactsKept++
				continue
			}
			a := Artifact{ID: id, Version: h.Version, Flavor: h.Flavor, Arch: h.Arch, ZipSize: h.ZipSize, Size: h.Size,
				Files: h.Files, State: ArtifactReady, InstalledAt: h.InstalledAt, LastUsed: now, Image: h.Image}
			if err := put(tx, bucketArtifacts, id, a); err != nil {
				return err
			}
			key := ArtifactKey{Version: h.Version, Flavor: h.Flavor, Arch: h.Arch}
			if err := tx.Bucket(bucketArtifactKeys).Put([]byte(key.String()), []byte(id)); err != nil {
				return err
			}
			rep.ArtifactsAdded++
		}

		layers := tx.Bucket(bucketLayers)
		var staleLayers []string
		if err := layers.ForEach(func(k, _ []byte) error {
			if _, ok := layersOnDisk[string(k)]; !ok {
				staleLayers = append(staleLayers, string(k))
			}
			return nil
		}); err != nil {
			return err
		}
		for _, k := range staleLayers {
			if err := layers.Delete([]byte(k)); err != nil {
				return err
			}
			rep.LayersDropped++
		}
		for k, lay := range layersOnDisk {
			if layers.Get([]byte(k)) == nil {
				if err := put(tx, bucketLayers, k, lay); err != nil {
					return err
				}
				rep.LayersAdded++
			}
		}

		// Volumes: mountinfo is the truth about what is published.
		vols := tx.Bucket(bucketVolumes)
		var drop []Volume
		if err := vols.ForEach(func(k, data []byte) error {
			var v Volume
			if err := jsonUnmarshal(data, &v); err != nil {
				drop = append(drop, Volume{ID: string(k)})
				return nil
			}
			if v.State == VolumePending {
				return nil
			}
			if _, mounted := found[v.TargetPath]; !mounted {
				drop = append(drop, v)
			}
			return nil
		}); err != nil {
			return err
		}
		for _, v := range drop {
			klog.V(2).InfoS("dropping record of a volume that is no longer mounted", "volumeID", v.ID, "target", v.TargetPath)
			if err := deleteVolume(tx, v.ID, ""); err != nil {
				return err
			}
			rep.VolumesDropped++
		}
		targets := tx.Bucket(bucketTargets)
		inUse := map[string]bool{}
		for target, m := range found {
			if m.volumeDir != "" {
				inUse[m.volumeDir] = true
			}
			if id := targets.Get([]byte(target)); id != nil && vols.Get(id) != nil {
				continue
			}
			v := Volume{
				ID: adoptedVolumeID(target), TargetPath: target, Mode: m.mode, State: VolumePublished,
				Tenant: m.tenant, ArtifactID: m.artifactID, LayerRev: m.layerRev, Writable: m.upperDir != "",
				ReadOnly: m.upperDir == "", FirstAttempt: now, PublishedAt: now, Adopted: true,
			}
			if m.failedOpen {
				v.State = VolumeFailedOpen
			}
			klog.V(2).InfoS("adopting mount found in mountinfo", "target", target, "mode", m.mode, "artifact", m.artifactID)
			if err := putVolume(tx, v); err != nil {
				return err
			}
			rep.VolumesAdopted++
		}
		// Volume dirs that no mount uses and no record refers to.
		dirs, err := afero.ReadDir(fs, l.VolumesDir())
		if err != nil {
			return err
		}
		referenced := map[string]bool{}
		if err := vols.ForEach(func(_, data []byte) error {
			var v Volume
			if jsonUnmarshal(data, &v) == nil {
				referenced[VolumeDirName(v.ID)] = true
			}
			return nil
		}); err != nil {
			return err
		}
		for _, d := range dirs {
			if referenced[d.Name()] || inUse[d.Name()] {
				continue
			}
			// A volume's layers are a tmpfs on the dir: detach it first.
			_ = o.Unmount(filepath.Join(l.Abs(l.VolumesDir()), d.Name()))
			if err := fs.RemoveAll(filepath.Join(l.VolumesDir(), d.Name())); err != nil {
				return err
			}
			rep.VolumeDirsRemoved++
		}
		return nil
	})
}

func deleteArtifactTx(tx *bolt.Tx, id string) error {
	keys := tx.Bucket(bucketArtifactKeys)
	var stale [][]byte
	_ = keys.ForEach(func(k, v []byte) error {
		if string(v) == id {
			stale = append(stale, append([]byte(nil), k...))
		}
		return nil
	})
	for _, k := range stale {
		if err := keys.Delete(k); err != nil {
			return err
		}
	}
	return tx.Bucket(bucketArtifacts).Delete([]byte(id))
}

func adoptedVolumeID(target string) string {
	sum := sha256.Sum256([]byte(target))
	return "adopted-" + hex.EncodeToString(sum[:12])
}

// findOurMounts returns, by mount point, every mount that serves an artifact,
// a tenant layer, the empty fail-open dir or a host dir of this data dir.
func findOurMounts(l Layout, mounts []mount.MountInfo) map[string]ourMount {
	out := map[string]ourMount{}
	artPrefix := l.Abs(l.ArtifactsDir()) + "/"
	layerPrefix := l.Abs(l.TenantsDir()) + "/"
	volumePrefix := l.Abs(l.VolumesDir()) + "/"
	root := l.Root()
	// Bind mounts show the source as a path inside its filesystem (Root), so
	// find where the data dir lives inside its own filesystem.
	dataMount, rootInFs := dataDirMount(l, mounts)
	for _, m := range mounts {
		if m.MountPoint == root || strings.HasPrefix(m.MountPoint, root+"/") {
			continue // mounts inside the data dir are not volumes
		}
		if m.FsType == "overlay" {
			var lower, upper string
			for _, o := range m.SuperOptions {
				if v, ok := strings.CutPrefix(o, "lowerdir="); ok {
					lower = v
				}
				if v, ok := strings.CutPrefix(o, "upperdir="); ok {
					upper = v
				}
			}
			if lower == "" {
				continue
			}
			var om ourMount
			for _, dir := range append(strings.Split(lower, ":"), upper) {
				if rest, ok := strings.CutPrefix(dir, volumePrefix); ok {
					om.volumeDir = strings.SplitN(rest, "/", 2)[0]
				}
				if rest, ok := strings.CutPrefix(dir, artPrefix); ok {
					om.artifactID = strings.SplitN(rest, "/", 2)[0]
				}
				if rest, ok := strings.CutPrefix(dir, layerPrefix); ok {
					parts := strings.SplitN(rest, "/", 3)
					if len(parts) >= 2 {
						om.tenant, om.layerRev = parts[0], parts[1]
					}
				}
				if dir == l.Abs(l.Empty()) {
					om.failedOpen = true
				}
			}
			if om.artifactID == "" && !om.failedOpen {
				continue
			}
			om.target, om.mode, om.upperDir = m.MountPoint, api.ModeApp, upper
			out[m.MountPoint] = om
			continue
		}
		if dataMount == nil || m.Major != dataMount.Major || m.Minor != dataMount.Minor {
			continue
		}
		if rest, ok := strings.CutPrefix(m.Root, filepath.Join(rootInFs, l.HostDir())+"/"); ok && !strings.Contains(rest, "/") {
			out[m.MountPoint] = ourMount{target: m.MountPoint, mode: api.ModeHost, tenant: rest}
		} else if m.Root == filepath.Join(rootInFs, l.Empty()) {
			out[m.MountPoint] = ourMount{target: m.MountPoint, mode: api.ModeApp, failedOpen: true}
		}
	}
	return out
}
