// Package storage owns everything under the data dir: the Layout (the only
// code that builds paths), the bbolt Index and the start-up reconcile.
package storage

import (
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"path/filepath"
	"regexp"

	"github.com/spf13/afero"
)

// Directory names below the data dir (DESIGN §3).
const (
	indexFile            = "index.db"
	artifactsDir         = "artifacts"
	tenantsDir           = "tenants"
	hostDir              = "host"
	volumesDir           = "volumes"
	tmpDir               = "tmp"
	emptyDir             = "empty"
	manifestName         = ".oneagent-csi-manifest"
	treeName             = "tree"
	volumeUpperName      = "upper"
	volumeWorkName       = "work"
	volumeContainersName = "containers"
)

var (
	artifactIDPattern = regexp.MustCompile(`^[0-9a-f]{64}$`)
	safeNamePattern   = regexp.MustCompile(`^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$`)
)

// Layout maps names to paths under the data dir. Relative paths are for the
// afero filesystem rooted at the data dir; Abs gives the host path that mount
// calls need. It is a value type and safe for concurrent use.
type Layout struct {
	root string
}

// NewLayout returns the layout of the data dir root, which must be absolute.
func NewLayout(root string) (Layout, error) {
	if !filepath.IsAbs(root) {
		return Layout{}, fmt.Errorf("data dir %q must be an absolute path", root)
	}
	return Layout{root: filepath.Clean(root)}, nil
}

// Root is the absolute data dir.
func (l Layout) Root() string { return l.root }

// Abs turns a path relative to the data dir into a host path.
func (l Layout) Abs(rel string) string { return filepath.Join(l.root, rel) }

// IndexFile is the bbolt index.
func (l Layout) IndexFile() string { return indexFile }

// ArtifactsDir holds one directory per installed code module.
func (l Layout) ArtifactsDir() string { return artifactsDir }

// Artifact is the directory of an installed code module.
func (l Layout) Artifact(id string) string { return filepath.Join(artifactsDir, id) }

// ArtifactTree is the served code module inside the artifact dir: the
// manifest sits beside it, so one rename installs both and no pod sees the
// manifest.
func (l Layout) ArtifactTree(id string) string { return filepath.Join(artifactsDir, id, treeName) }

// TreeName is the name of the served tree inside an artifact or tenant layer
// dir.
func (l Layout) TreeName() string { return treeName }

// ArtifactManifest is the per-artifact manifest inside the artifact dir. It
// lives inside so that one rename installs tree and manifest together.
func (l Layout) ArtifactManifest(id string) string {
	return filepath.Join(artifactsDir, id, manifestName)
}

// ManifestName is the file name of the manifest in an artifact tree.
func (l Layout) ManifestName() string { return manifestName }

// TenantsDir holds the per-tenant config layers.
func (l Layout) TenantsDir() string { return tenantsDir }

// TenantLayer is the immutable config layer of a tenant at one revision.
func (l Layout) TenantLayer(tenant, rev string) string {
	return filepath.Join(tenantsDir, tenant, rev)
}

// LayerTree is the served part of a tenant layer; its record file sits
// beside it.
func (l Layout) LayerTree(tenant, rev string) string {
	return filepath.Join(tenantsDir, tenant, rev, treeName)
}

// Host is the host-mode storage of a tenant (bind source).
func (l Layout) Host(tenant string) string { return filepath.Join(hostDir, tenant) }

// HostDir holds the host-mode storage of every tenant.
func (l Layout) HostDir() string { return hostDir }

// VolumesDir holds per-volume layers (writable upper dirs, container
// configuration), each on a tmpfs of its own.
func (l Layout) VolumesDir() string { return volumesDir }

// Volume is the directory of a volume's own layers: a writable volume's
// upper and work dirs, and the containers' configuration.
func (l Layout) Volume(volumeID string) string {
	return filepath.Join(volumesDir, VolumeDirName(volumeID))
}

// VolumeUpper is the overlay upperdir of a writable volume.
func (l Layout) VolumeUpper(volumeID string) string {
	return filepath.Join(l.Volume(volumeID), volumeUpperName)
}

// VolumeContainers is the overlay lowerdir that holds the container.conf
// files the driver writes for a volume's containers (api.AttrContainers).
func (l Layout) VolumeContainers(volumeID string) string {
	return filepath.Join(l.Volume(volumeID), volumeContainersName)
}

// VolumeWork is the overlay workdir of a writable volume.
func (l Layout) VolumeWork(volumeID string) string {
	return filepath.Join(l.Volume(volumeID), volumeWorkName)
}

// Tmp is the staging dir, wiped at start-up.
func (l Layout) Tmp() string { return tmpDir }

// TmpEntry is a staging file or dir.
func (l Layout) TmpEntry(name string) string { return filepath.Join(tmpDir, name) }

// Empty is the empty directory served read-only when a volume fails open.
func (l Layout) Empty() string { return emptyDir }

// TopLevelDirs are created at start-up.
func (l Layout) TopLevelDirs() []string {
	return []string{artifactsDir, tenantsDir, hostDir, volumesDir, tmpDir, emptyDir}
}

// ValidArtifactID reports whether id has the shape of an artifact id (the
// lowercase hex SHA-256 of the code module ZIP).
func ValidArtifactID(id string) bool { return artifactIDPattern.MatchString(id) }

// ValidLayerRevision reports whether rev can be a tenant layer directory name.
func ValidLayerRevision(rev string) bool { return safeNamePattern.MatchString(rev) }

// VolumeDirName maps a CSI volume id to a directory name. Ids that are safe
// file names are used as they are (easier to debug); any other id is hashed so
// that no id can escape volumes/.
func VolumeDirName(volumeID string) string {
	if safeNamePattern.MatchString(volumeID) && volumeID != "." && volumeID != ".." {
		return volumeID
	}
	sum := sha256.Sum256([]byte(volumeID))
	return "h-" + hex.EncodeToString(sum[:16])
}

// ServedArtifact is the dir an artifact's overlays use as lowerdir: its
// tree/, or the artifact dir itself for an artifact installed by a build
// before tree/ existed (manifest at the root; GC replaces those in time).
func ServedArtifact(fsys afero.Fs, l Layout, id string) string {
	if fi, err := fsys.Stat(l.ArtifactTree(id)); err == nil && fi.IsDir() {
		return l.ArtifactTree(id)
	}
	return l.Artifact(id)
}

// ServedLayer is the dir a tenant layer's overlays use as lowerdir (see
// ServedArtifact).
func ServedLayer(fsys afero.Fs, l Layout, tenant, rev string) string {
	if fi, err := fsys.Stat(l.LayerTree(tenant, rev)); err == nil && fi.IsDir() {
		return l.LayerTree(tenant, rev)
	}
	return l.TenantLayer(tenant, rev)
}
