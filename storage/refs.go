package storage

import (
	"path/filepath"
	"strings"

	"k8s.io/mount-utils"
)

// MountRefs says which artifacts and tenant layers mounts use, anywhere on
// the machine (kubelet's pods dir included), by lowerdir of an overlay or by
// source of a bind mount.
type MountRefs struct {
	// Artifacts counts mounts per artifact id.
	Artifacts map[string]int
	// Layers counts mounts per tenant layer, keyed "tenant/rev".
	Layers map[string]int
	// Targets are the mount points that serve something of this data dir.
	Targets map[string]bool
	// VolumeDirs are the per-volume dirs (names under volumes/) that an
	// overlay uses as its upper dir or as a lower layer (the containers'
	// configuration).
	VolumeDirs map[string]bool
}

// LayerRef is the MountRefs.Layers key of a tenant layer.
func LayerRef(tenant, rev string) string { return layerKey(tenant, rev) }

// FindMountRefs scans a mount table for uses of the data dir's artifacts and
// tenant layers.
func FindMountRefs(l Layout, mounts []mount.MountInfo) MountRefs {
	refs := MountRefs{Artifacts: map[string]int{}, Layers: map[string]int{}, Targets: map[string]bool{}, VolumeDirs: map[string]bool{}}
	volPrefix := l.Abs(l.VolumesDir()) + "/"
	artPrefix := l.Abs(l.ArtifactsDir()) + "/"
	layerPrefix := l.Abs(l.TenantsDir()) + "/"
	note := func(path, target string, artPrefix, layerPrefix string) {
		if rest, ok := strings.CutPrefix(path, artPrefix); ok {
			refs.Artifacts[strings.SplitN(rest, "/", 2)[0]]++
			refs.Targets[target] = true
		}
		if rest, ok := strings.CutPrefix(path, layerPrefix); ok {
			if parts := strings.SplitN(rest, "/", 3); len(parts) >= 2 {
				refs.Layers[layerKey(parts[0], parts[1])]++
				refs.Targets[target] = true
			}
		}
	}
	dataMount, rootInFs := dataDirMount(l, mounts)
	for _, m := range mounts {
		if m.FsType == "overlay" {
			for _, o := range m.SuperOptions {
				if lower, ok := strings.CutPrefix(o, "lowerdir="); ok {
					for _, dir := range strings.Split(lower, ":") {
						note(dir, m.MountPoint, artPrefix, layerPrefix)
						if rest, ok := strings.CutPrefix(dir, volPrefix); ok {
							refs.VolumeDirs[strings.SplitN(rest, "/", 2)[0]] = true
						}
					}
				}
				if upper, ok := strings.CutPrefix(o, "upperdir="); ok {
					if rest, ok := strings.CutPrefix(upper, volPrefix); ok {
						refs.VolumeDirs[strings.SplitN(rest, "/", 2)[0]] = true
					}
				}
			}
			continue
		}
		// A bind mount shows its source as a path inside the filesystem
		// (Root) of the device that holds the data dir.
		if dataMount != nil && m.Major == dataMount.Major && m.Minor == dataMount.Minor && m.MountPoint != dataMount.MountPoint {
			note(m.Root, m.MountPoint, filepath.Join(rootInFs, l.ArtifactsDir())+"/", filepath.Join(rootInFs, l.TenantsDir())+"/")
		}
	}
	return refs
}

// dataDirMount finds the mount that holds the data dir and where the data
// dir lies inside that filesystem.
func dataDirMount(l Layout, mounts []mount.MountInfo) (*mount.MountInfo, string) {
	root := l.Root()
	var dataMount *mount.MountInfo
	for i := range mounts {
		m := &mounts[i]
		if (root == m.MountPoint || strings.HasPrefix(root, strings.TrimSuffix(m.MountPoint, "/")+"/")) &&
			(dataMount == nil || len(m.MountPoint) >= len(dataMount.MountPoint)) {
			dataMount = m
		}
	}
	if dataMount == nil {
		return nil, ""
	}
	rel := strings.TrimPrefix(root, strings.TrimSuffix(dataMount.MountPoint, "/"))
	return dataMount, filepath.Join(dataMount.Root, rel)
}
