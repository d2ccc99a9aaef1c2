package driver

import (
	"context"
	"errors"
	"fmt"

	"github.com/spf13/afero"
	"k8s.io/mount-utils"

	"github.com/oneagent-csi/oneagent-csi/provisioner"
	"github.com/oneagent-csi/oneagent-csi/storage"
)

// ErrOffline is returned for operations that need the running node process.
var ErrOffline = errors.New("needs the running node process (not available with --offline)")

// Inspector answers the `oneagent-csi cache` queries from an index, the
// data dir and the mount table. The node process serves it on its admin
// socket; `cache --offline` uses it directly on a read-only index.
type Inspector struct {
	// Index is the open index (read-only is enough but for GC).
	Index *storage.Index
	// Layout of the data dir.
	Layout storage.Layout
	// Fs is rooted at the data dir. Default: a read-only BasePathFs.
	Fs afero.Fs
	// MountInfo reads the mount table. Default: /proc/self/mountinfo.
	MountInfo func() ([]mount.MountInfo, error)
	// GC runs a cache GC pass; nil offline.
	GC func(ctx context.Context, dryRun bool) (provisioner.GCReport, error)
	// CheckTenants asks the tenants now, as the driver does (all, or the
	// named one); nil offline.
	CheckTenants func(ctx context.Context, tenant string) ([]provisioner.TenantCheck, error)
}

func (in *Inspector) fs() afero.Fs {
	if in.Fs != nil {
		return in.Fs
	}
	return afero.NewReadOnlyFs(afero.NewBasePathFs(afero.NewOsFs(), in.Layout.Root()))
}

func (in *Inspector) refs() (storage.MountRefs, error) {
	read := in.MountInfo
	if read == nil {
		read = func() ([]mount.MountInfo, error) { return mount.ParseMountInfo("/proc/self/mountinfo") }
	}
	mounts, err := read()
	if err != nil {
		return storage.MountRefs{}, fmt.Errorf("read mountinfo: %w", err)
	}
	return storage.FindMountRefs(in.Layout, mounts), nil
}

// Artifacts lists the cached artifacts.
func (in *Inspector) Artifacts(context.Context) ([]storage.ArtifactInfo, error) {
	refs, err := in.refs()
	if err != nil {
		return nil, err
	}
	return storage.ListArtifactInfo(in.Index, refs)
}

// Show details the artifacts matching key (id prefix or version).
func (in *Inspector) Show(ctx context.Context, key string) ([]storage.ArtifactDetail, error) {
	infos, err := in.Artifacts(ctx)
	if err != nil {
		return nil, err
	}
	matches := storage.FindArtifact(infos, key)
	if len(matches) == 0 {
		return nil, fmt.Errorf("no artifact with id prefix or version %q: %w", key, storage.ErrNotFound)
	}
	out := make([]storage.ArtifactDetail, 0, len(matches))
	for _, a := range matches {
		d, err := storage.DetailOf(in.Index, a)
		if err != nil {
			return nil, err
		}
		out = append(out, d)
	}
	return out, nil
}

// Volumes lists the volume records.
func (in *Inspector) Volumes(context.Context) ([]storage.Volume, error) {
	return in.Index.ListVolumes()
}

// Du adds up the data dir.
func (in *Inspector) Du(context.Context) (storage.DiskUsage, error) {
	return storage.Du(in.fs(), in.Layout)
}

// Verify re-hashes the artifacts matching key, or all when key is empty.
func (in *Inspector) Verify(ctx context.Context, key string) ([]storage.VerifyResult, error) {
	infos, err := in.Artifacts(ctx)
	if err != nil {
		return nil, err
	}
	if key != "" {
		if infos = storage.FindArtifact(infos, key); len(infos) == 0 {
			return nil, fmt.Errorf("no artifact with id prefix or version %q: %w", key, storage.ErrNotFound)
		}
	}
	out := make([]storage.VerifyResult, 0, len(infos))
	for _, a := range infos {
		if err := ctx.Err(); err != nil {
			return nil, err
		}
		r, err := storage.Verify(in.fs(), in.Layout, a.ID)
		if err != nil {
			r = storage.VerifyResult{ID: a.ID, Version: a.Version, Problems: []string{err.Error()}}
		}
		out = append(out, r)
	}
	return out, nil
}

// RunGC runs (or with dryRun plans) a GC pass in the node process.
// TenantCheck runs CheckTenants.
func (in *Inspector) TenantCheck(ctx context.Context, tenant string) ([]provisioner.TenantCheck, error) {
	if in.CheckTenants == nil {
		return nil, fmt.Errorf("tenant check: %w", ErrOffline)
	}
	return in.CheckTenants(ctx, tenant)
}

func (in *Inspector) RunGC(ctx context.Context, dryRun bool) (provisioner.GCReport, error) {
	if in.GC == nil {
		return provisioner.GCReport{}, fmt.Errorf("gc: %w", ErrOffline)
	}
	return in.GC(ctx, dryRun)
}
