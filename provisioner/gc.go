package provisioner

import (
	"context"
	"errors"
	"fmt"
	"io/fs"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/spf13/afero"
	"golang.org/x/sys/unix"
	"k8s.io/klog/v2"
	"k8s.io/mount-utils"

	"github.com/oneagent-csi/oneagent-csi/storage"
)

// GCOptions bound what the cache keeps. Zero fields take the defaults.
type GCOptions struct {
	// KeepPrevious is how many versions before a tenant's current one are
	// kept. Default 1; negative keeps none.
	KeepPrevious int `json:"keepPrevious,omitempty"`
	// MaxBytes is the disk budget of artifacts; least recently used ones not
	// in use are deleted to meet it. Default 0: no budget.
	MaxBytes int64 `json:"maxBytes,omitempty"`
	// Interval between periodic passes. Default 10m.
	Interval time.Duration `json:"-"`
	// OrphanGrace is how long a published volume's record survives its
	// target no longer being mounted (a lost unpublish). Default 10m.
	// Records of volumes that never got mounted (pending) are swept after
	// 24h: until then kubelet may still be retrying them.
	OrphanGrace time.Duration `json:"-"`
	// MountInfo reads the mount table. Default: /proc/self/mountinfo.
	MountInfo func() ([]mount.MountInfo, error) `json:"-"`
}

func (o *GCOptions) defaults() {
	if o.KeepPrevious == 0 {
		o.KeepPrevious = 1
	}
	if o.KeepPrevious < 0 {
		o.KeepPrevious = 0
	}
	if o.Interval == 0 {
		o.Interval = 10 * time.Minute
	}
	if o.OrphanGrace == 0 {
		o.OrphanGrace = 10 * time.Minute
	}
	if o.MountInfo == nil {
		o.MountInfo = func() ([]mount.MountInfo, error) { return mount.ParseMountInfo("/proc/self/mountinfo") }
	}
}

// pendingGrace is how long a record of a volume that never got mounted is
// kept: kubelet retries a publish for as long as the pod exists, and the
// record holds the first attempt that the fail-open timeout counts from.
const pendingGrace = 24 * time.Hour

// leaseTTL is how long an artifact handed out by Prepare is protected from
// GC before its volume record (written right after the mount) takes over.
const leaseTTL = 5 * time.Minute

// GC deletion reasons.
const (
	ReasonSuperseded   = "superseded"    // not current and not among the kept previous versions
	ReasonBudget       = "budget"        // least recently used, to meet cache.maxBytes
	ReasonStaleLayer   = "stale-layer"   // an older layer revision, or its artifact is gone
	ReasonOrphanRecord = "orphan-record" // the volume's target is no longer mounted
)

// GCDeletion is one thing GC deleted (or would delete in a dry run).
type GCDeletion struct {
	Kind   string `json:"kind"` // artifact | layer | volume | volume-dir
	ID     string `json:"id"`
	Detail string `json:"detail,omitempty"` // version, tenant, target
	Bytes  int64  `json:"bytes"`
	Reason string `json:"reason"`
}

// GCReport is the result of one pass.
type GCReport struct {
	DryRun     bool         `json:"dryRun"`
	Deleted    []GCDeletion `json:"deleted"`
	FreedBytes int64        `json:"freedBytes"`
	// CacheBytes is what artifacts take after the pass.
	CacheBytes int64 `json:"cacheBytes"`
	// OverrunBytes is how far the cache stays over MaxBytes because what is
	// left is in use or current.
	OverrunBytes int64 `json:"overrunBytes"`
	// InUse lists the artifacts that mounts or records use.
	InUse []string `json:"inUse"`
}

type gcState struct {
	mu sync.Mutex // serialises passes
	// leaseMu guards leases and is held while a deletion is re-checked and
	// the artifact taken out, so that Prepare cannot hand out what is
	// being deleted.
	leaseMu sync.Mutex
	leases  map[string]time.Time
	poke    chan struct{}
}

// lease protects ids (artifact ids and layer refs) from GC for leaseTTL.
func (p *Provisioner) lease(ids ...string) {
	p.gc.leaseMu.Lock()
	defer p.gc.leaseMu.Unlock()
	until := p.opts.Now().Add(leaseTTL)
	for _, id := range ids {
		p.gc.leases[id] = until
	}
}

func (p *Provisioner) leased(id string, now time.Time) bool {
	until, ok := p.gc.leases[id]
	if ok && now.After(until) {
		delete(p.gc.leases, id)
		return false
	}
	return ok
}

// RequestGC asks for a pass soon (after an unpublish dropped a reference);
// it never blocks.
func (p *Provisioner) RequestGC() {
	select {
	case p.gc.poke <- struct{}{}:
	default:
	}
}

// RunGC runs a pass every Interval and after RequestGC, until ctx ends.
func (p *Provisioner) RunGC(ctx context.Context) {
	t := time.NewTicker(p.opts.GC.Interval)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		case <-p.gc.poke:
		}
		if _, err := p.GC(ctx, false); err != nil {
			klog.FromContext(ctx).Error(err, "cache gc failed")
		}
	}
}

// GC deletes what the policy (keep the current and KeepPrevious earlier
// versions per tenant, stay within MaxBytes, least recently used first) no
// longer needs, and sweeps records of volumes whose target is gone. Nothing
// that a volume record, a mount (overlay lowerdir or bind source, anywhere
// on the machine) or a fresh Prepare uses is ever deleted. Just before a
// batch of deletions the mount table is read again and the leases checked,
// under the lock Prepare takes its leases with; new volume records only come
// from publishes, which hold such a lease, so the records read at the start
// of the pass stay valid. With dryRun nothing changes.
func (p *Provisioner) GC(ctx context.Context, dryRun bool) (GCReport, error) {
	p.gc.mu.Lock()
	defer p.gc.mu.Unlock()
	log := klog.FromContext(ctx).WithName("gc")
	rep := GCReport{DryRun: dryRun, Deleted: []GCDeletion{}, InUse: []string{}}
	idx, now := p.opts.Index, p.opts.Now()

	arts, err := idx.ListArtifacts()
	if err != nil {
		return rep, err
	}
	layers, err := idx.ListLayers()
	if err != nil {
		return rep, err
	}
	vols, err := idx.ListVolumes()
	if err != nil {
		return rep, err
	}
	mounts, err := p.mountRefs()
	if err != nil {
		return rep, err
	}
	// Orphan records first: they may be the last reference to an artifact.
	if vols, err = p.sweepRecords(ctx, &rep, vols, mounts.mounted, mounts.volumeDirs, now, dryRun); err != nil {
		return rep, err
	}
	if err := p.sweepVolumeDirs(ctx, &rep, vols, mounts.volumeDirs, now, dryRun); err != nil {
		return rep, err
	}
	inUse := recordRefs(vols)
	for id, n := range mounts.artifacts {
		inUse.artifacts[id] += n
	}
	for ref, n := range mounts.layers {
		inUse.layers[ref] += n
	}

	keep := p.keptArtifacts(arts, layers)
	var total int64
	for _, a := range arts {
		total += a.Size
		if inUse.artifacts[a.ID] > 0 {
			rep.InUse = append(rep.InUse, a.ID)
		}
	}
	deleted := map[string]bool{}
	deleteArtifacts := func(cands []storage.Artifact, reason string) error {
		items := make([]gcItem, len(cands))
		for i, a := range cands {
			items[i] = gcItem{artifact: a}
		}
		done, err := p.deleteBatch(ctx, items, reason, dryRun)
		for _, it := range done {
			a := it.artifact
			deleted[a.ID] = true
			total -= a.Size
			rep.FreedBytes += a.Size
			rep.Deleted = append(rep.Deleted, GCDeletion{Kind: "artifact", ID: a.ID, Detail: a.Version, Bytes: a.Size, Reason: reason})
		}
		return err
	}
	var superseded []storage.Artifact
	for _, a := range arts {
		if keep[a.ID] == "" && inUse.artifacts[a.ID] == 0 {
			superseded = append(superseded, a)
		}
	}
	if err := deleteArtifacts(superseded, ReasonSuperseded); err != nil {
		return rep, err
	}
	if max := p.opts.GC.MaxBytes; max > 0 && total > max {
		lru := slices.Clone(arts)
		slices.SortFunc(lru, func(a, b storage.Artifact) int { return a.LastUsed.Compare(b.LastUsed) })
		var over []storage.Artifact
		planned := total
		for _, a := range lru {
			if planned <= max {
				break
			}
			if deleted[a.ID] || inUse.artifacts[a.ID] > 0 || keep[a.ID] == "current" {
				continue
			}
			over = append(over, a)
			planned -= a.Size
		}
		if err := deleteArtifacts(over, ReasonBudget); err != nil {
			return rep, err
		}
		if total > max {
			rep.OverrunBytes = total - max
			log.Info("cache stays over its budget: what is left is in use or current", "cacheBytes", total, "maxBytes", max, "overrunBytes", rep.OverrunBytes)
		}
	}
	rep.CacheBytes = total

	// Layers: keep the newest revision per tenant and artifact, and any in use.
	newest := map[string]storage.TenantLayer{}
	for _, lay := range layers {
		k := lay.Tenant + "/" + lay.ArtifactID
		if cur, ok := newest[k]; !ok || lay.Revision > cur.Revision || (lay.Revision == cur.Revision && lay.CreatedAt.After(cur.CreatedAt)) {
			newest[k] = lay
		}
	}
	var stale []gcItem
	for _, lay := range layers {
		alive := !deleted[lay.ArtifactID] && artifactExists(arts, lay.ArtifactID) &&
			(keep[lay.ArtifactID] != "" || inUse.artifacts[lay.ArtifactID] > 0)
		if inUse.layers[storage.LayerRef(lay.Tenant, lay.Rev)] > 0 || (alive && newest[lay.Tenant+"/"+lay.ArtifactID].Rev == lay.Rev) {
			continue
		}
		stale = append(stale, gcItem{layer: lay, isLayer: true})
	}
	done, err := p.deleteBatch(ctx, stale, ReasonStaleLayer, dryRun)
	for _, it := range done {
		rep.Deleted = append(rep.Deleted, GCDeletion{Kind: "layer", ID: storage.LayerRef(it.layer.Tenant, it.layer.Rev), Detail: it.layer.ArtifactID, Reason: ReasonStaleLayer})
	}
	p.metrics.observeGC(rep)
	return rep, err
}

func artifactExists(arts []storage.Artifact, id string) bool {
	return slices.ContainsFunc(arts, func(a storage.Artifact) bool { return a.ID == id })
}

type references struct {
	artifacts  map[string]int
	layers     map[string]int
	mounted    map[string]bool // every mount point on the machine
	volumeDirs map[string]bool // per-volume dirs used as overlay upper dirs
}

// mountRefs reads the mount table.
func (p *Provisioner) mountRefs() (references, error) {
	mounts, err := p.opts.GC.MountInfo()
	if err != nil {
		return references{}, fmt.Errorf("read mountinfo: %w", err)
	}
	refs := storage.FindMountRefs(p.opts.Layout, mounts)
	out := references{artifacts: refs.Artifacts, layers: refs.Layers, mounted: make(map[string]bool, len(mounts)), volumeDirs: refs.VolumeDirs}
	for _, m := range mounts {
		out.mounted[m.MountPoint] = true
	}
	return out, nil
}

// recordRefs counts uses by volume records.
func recordRefs(vols []storage.Volume) references {
	out := references{artifacts: map[string]int{}, layers: map[string]int{}}
	for _, v := range vols {
		if v.ArtifactID != "" {
			out.artifacts[v.ArtifactID]++
		}
		if v.LayerRev != "" {
			out.layers[storage.LayerRef(v.Tenant, v.LayerRev)]++
		}
	}
	return out
}

// gcItem is an artifact or a tenant layer to delete.
type gcItem struct {
	artifact storage.Artifact
	layer    storage.TenantLayer
	isLayer  bool
}

// deleteBatch re-checks the items against a fresh mount table and the
// leases, under the lease lock, takes each one still unused out of the
// index and moves its tree into tmp/ (one rename; a crash leaves tmp/ to the
// next start-up's wipe); then it removes the trees. It returns what it
// deleted (with dryRun: what it would delete).
func (p *Provisioner) deleteBatch(ctx context.Context, items []gcItem, reason string, dryRun bool) ([]gcItem, error) {
	if len(items) == 0 {
		return nil, nil
	}
	log := klog.FromContext(ctx).WithName("gc")
	l, fsys, idx := p.opts.Layout, p.opts.Fs, p.opts.Index
	var done []gcItem
	var trash []string
	p.gc.leaseMu.Lock()
	mounts, err := p.mountRefs()
	if err != nil {
		p.gc.leaseMu.Unlock()
		return nil, err
	}
	now := p.opts.Now()
	for _, it := range items {
		key, inUse := it.artifact.ID, mounts.artifacts[it.artifact.ID] > 0
		if it.isLayer {
			key = storage.LayerRef(it.layer.Tenant, it.layer.Rev)
			inUse = mounts.layers[key] > 0
		}
		if inUse || p.leased(key, now) {
			continue
		}
		if dryRun {
			done = append(done, it)
			continue
		}
		dir, to := l.Artifact(it.artifact.ID), l.TmpEntry(randomName("gc-"))
		if it.isLayer {
			dir = l.TenantLayer(it.layer.Tenant, it.layer.Rev)
			err = idx.DeleteLayer(it.layer.Tenant, it.layer.Rev)
		} else {
			err = idx.DeleteArtifact(it.artifact.ID)
		}
		if err == nil {
			if err = fsys.Rename(dir, to); errors.Is(err, fs.ErrNotExist) {
				err, to = nil, ""
			}
		}
		if err != nil {
			err = fmt.Errorf("delete %s: %w", key, err)
			break
		}
		done = append(done, it)
		if to != "" {
			trash = append(trash, to)
		}
	}
	p.gc.leaseMu.Unlock()
	for _, t := range trash {
		_ = fsys.RemoveAll(t)
	}
	if !dryRun {
		for _, it := range done {
			if it.isLayer {
				log.Info("deleted tenant layer", "tenant", it.layer.Tenant, "rev", it.layer.Rev, "artifact", it.layer.ArtifactID, "reason", reason)
			} else {
				log.Info("deleted code module", "artifact", it.artifact.ID, "version", it.artifact.Version, "bytes", it.artifact.Size, "reason", reason)
			}
		}
	}
	return done, err
}

// keptArtifacts maps the artifacts the version policy keeps to why:
// "current" (a tenant's configured or last resolved version) or "previous".
func (p *Provisioner) keptArtifacts(arts []storage.Artifact, layers []storage.TenantLayer) map[string]string {
	keep := map[string]string{}
	byID := map[string]storage.Artifact{}
	for _, a := range arts {
		byID[a.ID] = a
	}
	for _, name := range p.TenantNames() {
		current := p.currentVersion(name)
		// The tenant's versions: those it has layers for, plus the current.
		versions := map[string][]string{}
		for _, lay := range layers {
			if a, ok := byID[lay.ArtifactID]; ok && lay.Tenant == name {
				versions[a.Version] = append(versions[a.Version], a.ID)
			}
		}
		for _, a := range arts {
			if a.Version == current {
				versions[a.Version] = append(versions[a.Version], a.ID)
			}
		}
		ordered := make([]string, 0, len(versions))
		for v := range versions {
			ordered = append(ordered, v)
		}
		// An image tenant's versions are digests: newest installed first.
		isImage := p.images[name] != nil
		installed := func(v string) time.Time {
			var t time.Time
			for _, id := range versions[v] {
				if byID[id].InstalledAt.After(t) {
					t = byID[id].InstalledAt
				}
			}
			return t
		}
		slices.SortFunc(ordered, func(a, b string) int {
			if isImage {
				return installed(b).Compare(installed(a))
			}
			return -CompareVersions(a, b)
		})
		previous := 0
		for _, v := range ordered {
			why := ""
			switch {
			case v == current:
				why = "current"
			case !isImage && current != "" && CompareVersions(v, current) > 0:
				why = "" // newer than current (a pin went back): not kept by policy
			case previous < p.opts.GC.KeepPrevious:
				previous++
				why = "previous"
			}
			if why == "" {
				continue
			}
			for _, id := range versions[v] {
				if keep[id] != "current" {
					keep[id] = why
				}
			}
		}
	}
	return keep
}

// currentVersion is a tenant's pinned version, or its last resolved latest.
func (p *Provisioner) currentVersion(tenant string) string {
	c, err := p.client(tenant)
	if err != nil {
		return ""
	}
	if v := c.Tenant().Version; v != "latest" {
		return v
	}
	if v, _, ok := p.latest.peek(tenant); ok {
		return v
	}
	if r, err := p.opts.Index.GetResolution(tenant); err == nil {
		return r.Version
	}
	return ""
}

// sweepRecords removes records (and per-volume dirs) of volumes whose target
// is no longer mounted: published ones after OrphanGrace, pending ones after
// pendingGrace. A per-volume dir that a mounted overlay still uses as its
// upper dir or lower layer (wherever it is mounted) is kept. It returns the records that
// remain.
func (p *Provisioner) sweepRecords(ctx context.Context, rep *GCReport, vols []storage.Volume, mounted, upperInUse map[string]bool, now time.Time, dryRun bool) ([]storage.Volume, error) {
	kept := vols[:0:0]
	for _, v := range vols {
		since, grace := v.PublishedAt, p.opts.GC.OrphanGrace
		if v.State == storage.VolumePending || since.IsZero() {
			since, grace = v.FirstAttempt, pendingGrace
		}
		if mounted[v.TargetPath] || now.Sub(since) < grace {
			kept = append(kept, v)
			continue
		}
		if !dryRun {
			if err := p.opts.Index.DeleteVolume(v.ID, v.TargetPath); err != nil {
				return nil, err
			}
			if !upperInUse[storage.VolumeDirName(v.ID)] {
				if err := p.removeVolumeDir(storage.VolumeDirName(v.ID)); err != nil {
					// The record is gone; sweepVolumeDirs tries the dir again.
					klog.FromContext(ctx).Error(err, "removing the writable layer of a swept volume", "volumeID", v.ID)
				}
			}
			klog.FromContext(ctx).Info("removed record of a volume that is no longer mounted", "volumeID", v.ID,
				"target", v.TargetPath, "pod", klog.KRef(v.PodNamespace, v.PodName), "state", v.State, "reason", ReasonOrphanRecord)
		}
		rep.Deleted = append(rep.Deleted, GCDeletion{Kind: "volume", ID: v.ID, Detail: v.TargetPath, Reason: ReasonOrphanRecord})
	}
	return kept, nil
}

// sweepVolumeDirs removes per-volume dirs (writable layers, containers'
// configuration) that no record
// refers to and no overlay uses, once they are older than OrphanGrace.
func (p *Provisioner) sweepVolumeDirs(ctx context.Context, rep *GCReport, vols []storage.Volume, used map[string]bool, now time.Time, dryRun bool) error {
	l, fsys := p.opts.Layout, p.opts.Fs
	entries, err := afero.ReadDir(fsys, l.VolumesDir())
	if err != nil {
		if errors.Is(err, fs.ErrNotExist) {
			return nil
		}
		return err
	}
	referenced := make(map[string]bool, len(vols))
	for _, v := range vols {
		referenced[storage.VolumeDirName(v.ID)] = true
	}
	for _, e := range entries {
		name := e.Name()
		if referenced[name] || used[name] || now.Sub(e.ModTime()) < p.opts.GC.OrphanGrace {
			continue
		}
		if !dryRun {
			if err := p.removeVolumeDir(name); err != nil {
				return err
			}
			klog.FromContext(ctx).Info("removed a per-volume dir no record or mount uses", "dir", name, "reason", ReasonOrphanRecord)
		}
		rep.Deleted = append(rep.Deleted, GCDeletion{Kind: "volume-dir", ID: name, Reason: ReasonOrphanRecord})
	}
	return nil
}

// removeVolumeDir detaches a volume's writable layer (a tmpfs mounted on
// its dir) and removes the dir.
func (p *Provisioner) removeVolumeDir(name string) error {
	dir := filepath.Join(p.opts.Layout.VolumesDir(), name)
	_ = unix.Unmount(p.opts.Layout.Abs(dir), unix.MNT_DETACH|unix.UMOUNT_NOFOLLOW)
	return p.opts.Fs.RemoveAll(dir)
}

// CompareVersions orders code module versions such as
// 1.311.72.20250410-123003 numerically, part by part.
func CompareVersions(a, b string) int {
	split := func(s string) []string {
		return strings.FieldsFunc(s, func(r rune) bool { return r == '.' || r == '-' })
	}
	pa, pb := split(a), split(b)
	for i := 0; i < len(pa) && i < len(pb); i++ {
		na, ea := strconv.ParseUint(pa[i], 10, 64)
		nb, eb := strconv.ParseUint(pb[i], 10, 64)
		switch {
		case ea == nil && eb == nil && na != nb:
			if na < nb {
				return -1
			}
			return 1
		case (ea != nil || eb != nil) && pa[i] != pb[i]:
			return strings.Compare(pa[i], pb[i])
		}
	}
	return len(pa) - len(pb)
}
