package storage

import (
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"time"

	"github.com/spf13/afero"
)

// ArtifactInfo is an artifact as `oneagent-csi cache ls` shows it.
type ArtifactInfo struct {
	ID          string    `json:"id"`
	Version     string    `json:"version"`
	Flavor      string    `json:"flavor"`
	Arch        string    `json:"arch"`
	Tenants     []string  `json:"tenants"`
	Size        int64     `json:"size"`
	Files       int       `json:"files"`
	Refs        int       `json:"refs"`   // volume records that use it
	Mounts      int       `json:"mounts"` // mounts that use it (mount table)
	State       string    `json:"state"`
	InstalledAt time.Time `json:"installedAt"`
	LastUsed    time.Time `json:"lastUsed"`
	// Image is the repository of an image artifact (Version is then its
	// manifest digest).
	Image string `json:"image,omitempty"`
}

// ArtifactDetail is `cache show`: the artifact, its tenant layers and the
// volumes that use it.
type ArtifactDetail struct {
	ArtifactInfo `json:",inline"`
	Layers       []TenantLayer `json:"layers"`
	Volumes      []Volume      `json:"volumes"`
}

// ListArtifactInfo joins artifacts with their tenant layers, volume records
// and mounts, newest version first.
func ListArtifactInfo(idx *Index, refs MountRefs) ([]ArtifactInfo, error) {
	arts, err := idx.ListArtifacts()
	if err != nil {
		return nil, err
	}
	layers, err := idx.ListLayers()
	if err != nil {
		return nil, err
	}
	vols, err := idx.ListVolumes()
	if err != nil {
		return nil, err
	}
	tenants := map[string][]string{}
	for _, l := range layers {
		if !slices.Contains(tenants[l.ArtifactID], l.Tenant) {
			tenants[l.ArtifactID] = append(tenants[l.ArtifactID], l.Tenant)
		}
	}
	uses := map[string]int{}
	for _, v := range vols {
		if v.ArtifactID != "" {
			uses[v.ArtifactID]++
		}
	}
	out := make([]ArtifactInfo, 0, len(arts))
	for _, a := range arts {
		ts := tenants[a.ID]
		slices.Sort(ts)
		if ts == nil {
			ts = []string{}
		}
		out = append(out, ArtifactInfo{ID: a.ID, Version: a.Version, Flavor: a.Flavor, Arch: a.Arch, Tenants: ts, Size: a.Size,
			Files: a.Files, Refs: uses[a.ID], Mounts: refs.Artifacts[a.ID], State: string(a.State), InstalledAt: a.InstalledAt, LastUsed: a.LastUsed, Image: a.Image})
	}
	slices.SortFunc(out, func(a, b ArtifactInfo) int {
		if c := strings.Compare(b.Version, a.Version); c != 0 {
			return c
		}
		return strings.Compare(a.ID, b.ID)
	})
	return out, nil
}

// FindArtifact returns the artifacts whose id starts with key (at least 4
// characters) or whose version is key.
func FindArtifact(infos []ArtifactInfo, key string) []ArtifactInfo {
	var out []ArtifactInfo
	for _, a := range infos {
		if a.Version == key || (len(key) >= 4 && strings.HasPrefix(a.ID, key)) {
			out = append(out, a)
		}
	}
	return out
}

// DetailOf adds layers and volumes to an artifact.
func DetailOf(idx *Index, a ArtifactInfo) (ArtifactDetail, error) {
	d := ArtifactDetail{ArtifactInfo: a, Layers: []TenantLayer{}, Volumes: []Volume{}}
	layers, err := idx.ListLayers()
	if err != nil {
		return d, err
	}
	for _, l := range layers {
		if l.ArtifactID == a.ID {
			d.Layers = append(d.Layers, l)
		}
	}
	vols, err := idx.ListVolumes()
	if err != nil {
		return d, err
	}
	for _, v := range vols {
		if v.ArtifactID == a.ID {
			d.Volumes = append(d.Volumes, v)
		}
	}
	return d, nil
}

// DiskUsage is `cache du`: bytes on disk by part of the data dir.
type DiskUsage struct {
	Artifacts map[string]int64 `json:"artifacts"`
	Layers    map[string]int64 `json:"layers"` // by "tenant/rev"
	Host      int64            `json:"host"`
	Volumes   int64            `json:"volumes"`
	Tmp       int64            `json:"tmp"`
	Index     int64            `json:"index"`
	Total     int64            `json:"total"`
}

// Du walks the data dir and adds up file sizes.
func Du(fsys afero.Fs, l Layout) (DiskUsage, error) {
	du := DiskUsage{Artifacts: map[string]int64{}, Layers: map[string]int64{}}
	size := func(dir string) (int64, error) {
		var n int64
		err := afero.Walk(fsys, dir, func(_ string, info fs.FileInfo, err error) error {
			if err != nil {
				if errors.Is(err, fs.ErrNotExist) {
					return nil
				}
				return err
			}
			if info.Mode().IsRegular() {
				n += info.Size()
			}
			return nil
		})
		return n, err
	}
	entries, err := afero.ReadDir(fsys, l.ArtifactsDir())
	if err != nil && !errors.Is(err, fs.ErrNotExist) {
		return du, err
	}
	for _, e := range entries {
		n, err := size(l.Artifact(e.Name()))
		if err != nil {
			return du, err
		}
		du.Artifacts[e.Name()] = n
		du.Total += n
	}
	tenants, _ := afero.ReadDir(fsys, l.TenantsDir())
	for _, t := range tenants {
		revs, _ := afero.ReadDir(fsys, filepath.Join(l.TenantsDir(), t.Name()))
		for _, r := range revs {
			n, err := size(l.TenantLayer(t.Name(), r.Name()))
			if err != nil {
				return du, err
			}
			du.Layers[layerKey(t.Name(), r.Name())] = n
			du.Total += n
		}
	}
	for _, part := range []struct {
		dir string
		dst *int64
	}{{l.HostDir(), &du.Host}, {l.VolumesDir(), &du.Volumes}, {l.Tmp(), &du.Tmp}, {l.IndexFile(), &du.Index}} {
		n, err := size(part.dir)
		if err != nil {
			return du, err
		}
		*part.dst = n
		du.Total += n
	}
	return du, nil
}

// VerifyResult is `cache verify` of one artifact.
type VerifyResult struct {
	ID       string   `json:"id"`
	Version  string   `json:"version"`
	Files    int      `json:"files"`
	Problems []string `json:"problems"`
}

// OK reports whether the artifact matches its manifest.
func (r VerifyResult) OK() bool { return len(r.Problems) == 0 }

// Verify re-hashes every file of an artifact against its manifest and checks
// directories, symlinks and modes; it reports files that differ, are
// missing, or are not in the manifest.
func Verify(fsys afero.Fs, l Layout, id string) (VerifyResult, error) {
	res := VerifyResult{ID: id, Problems: []string{}}
	h, entries, err := ReadManifest(fsys, l.ArtifactManifest(id))
	if err != nil {
		return res, fmt.Errorf("artifact %s: read manifest: %w", id, err)
	}
	res.Version = h.Version
	root := ServedArtifact(fsys, l, id)
	seen := map[string]bool{}
	buf := make([]byte, 256<<10)
	for _, e := range entries {
		seen[e.Path] = true
		p := filepath.Join(root, filepath.FromSlash(e.Path))
		info, err := lstat(fsys, p)
		if err != nil {
			res.Problems = append(res.Problems, fmt.Sprintf("%s: missing", e.Path))
			continue
		}
		switch e.Type {
		case "dir":
			if !info.IsDir() {
				res.Problems = append(res.Problems, fmt.Sprintf("%s: not a directory", e.Path))
			}
		case "symlink":
			if info.Mode()&fs.ModeSymlink == 0 {
				res.Problems = append(res.Problems, fmt.Sprintf("%s: not a symlink", e.Path))
			} else if target, err := readlink(fsys, p); err != nil || target != e.Link {
				res.Problems = append(res.Problems, fmt.Sprintf("%s: points to %q, manifest says %q", e.Path, target, e.Link))
			}
		case "file":
			res.Files++
			if !info.Mode().IsRegular() {
				res.Problems = append(res.Problems, fmt.Sprintf("%s: not a regular file", e.Path))
				continue
			}
			if info.Mode().Perm() != fs.FileMode(e.Mode).Perm() {
				res.Problems = append(res.Problems, fmt.Sprintf("%s: mode %o, manifest says %o", e.Path, info.Mode().Perm(), e.Mode))
			}
			sum, n, err := hashFile(fsys, p, buf)
			switch {
			case err != nil:
				res.Problems = append(res.Problems, fmt.Sprintf("%s: %v", e.Path, err))
			case n != e.Size:
				res.Problems = append(res.Problems, fmt.Sprintf("%s: %d bytes, manifest says %d", e.Path, n, e.Size))
			case sum != e.SHA256:
				res.Problems = append(res.Problems, fmt.Sprintf("%s: sha256 %s, manifest says %s", e.Path, sum, e.SHA256))
			}
		}
	}
	// Anything added that the manifest does not list.
	// Directories are left out: the manifest lists those the ZIP lists, and
	// extraction creates the parents of every file.
	err = afero.Walk(fsys, root, func(path string, info fs.FileInfo, err error) error {
		if err != nil {
			return err
		}
		if info.IsDir() {
			return nil
		}
		rel, _ := filepath.Rel(root, path)
		rel = filepath.ToSlash(rel)
		if rel != "." && rel != manifestName && !seen[rel] {
			res.Problems = append(res.Problems, fmt.Sprintf("%s: not in the manifest", rel))
		}
		return nil
	})
	return res, err
}

func hashFile(fsys afero.Fs, path string, buf []byte) (string, int64, error) {
	f, err := fsys.Open(path)
	if err != nil {
		return "", 0, err
	}
	defer f.Close()
	h := sha256.New()
	n, err := io.CopyBuffer(h, f, buf)
	return hex.EncodeToString(h.Sum(nil)), n, err
}

func lstat(fsys afero.Fs, path string) (fs.FileInfo, error) {
	if l, ok := fsys.(afero.Lstater); ok {
		info, _, err := l.LstatIfPossible(path)
		return info, err
	}
	return fsys.Stat(path)
}

func readlink(fsys afero.Fs, path string) (string, error) {
	if r, ok := fsys.(afero.LinkReader); ok {
		return r.ReadlinkIfPossible(path)
	}
	return "", &os.PathError{Op: "readlink", Path: path, Err: errors.ErrUnsupported}
}
