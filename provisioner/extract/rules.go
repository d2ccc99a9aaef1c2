package extract

import (
	"fmt"
	"path"
	"strings"

	"github.com/oneagent-csi/oneagent-csi/storage"
)

// Name limits, checked before anything is written: the kernel refuses
// longer names with ENAMETOOLONG deep inside extraction.
const (
	maxNameComponent = 255  // bytes of one path component (NAME_MAX)
	maxNameLength    = 2048 // bytes of an entry's path, leaving room for the data dir below PATH_MAX
	maxLinkHops      = 40   // symlinks followed while resolving one link, as the kernel's ELOOP limit
)

// splitPath splits a cleaned relative path into components ("." is none).
func splitPath(p string) []string {
	if p == "." || p == "" {
		return nil
	}
	return strings.Split(p, "/")
}

// resolveInTree follows rel from the dir at components dir, resolving every
// component that is one of the archive's links, and returns where it ends;
// false when it climbs above the tree's root or loops.
func resolveInTree(links map[string]string, dir []string, rel string, hops *int) ([]string, bool) {
	cur := append([]string(nil), dir...)
	for _, c := range strings.Split(rel, "/") {
		switch c {
		case "", ".":
			continue
		case "..":
			if len(cur) == 0 {
				return nil, false
			}
			cur = cur[:len(cur)-1]
			continue
		}
		cur = append(cur, c)
		target, isLink := links[strings.Join(cur, "/")]
		if !isLink {
			continue
		}
		if *hops++; *hops > maxLinkHops {
			return nil, false
		}
		var ok bool
		if cur, ok = resolveInTree(links, cur[:len(cur)-1], target, hops); !ok {
			return nil, false
		}
	}
	return cur, true
}

// shortName keeps names in error messages short: a hostile archive can make
// them kilobytes long.
func shortName(name string) string {
	const keep = 80
	if len(name) <= keep {
		return name
	}
	return fmt.Sprintf("%s...(%d bytes)", name[:keep], len(name))
}

// cleanEntryName returns the entry's path relative to the artifact root, or
// an error when it is absolute, climbs out, or is too long.
func cleanEntryName(name string) (string, error) {
	if len(name) > maxNameLength {
		return "", badArchive("entry name %q is longer than %d bytes", shortName(name), maxNameLength)
	}
	if strings.ContainsRune(name, 0) || strings.Contains(name, "\\") {
		return "", badArchive("entry name %q has a NUL or backslash", shortName(name))
	}
	if path.IsAbs(name) || (len(name) >= 2 && name[1] == ':') {
		return "", badArchive("entry %q has an absolute path", shortName(name))
	}
	for _, part := range strings.Split(name, "/") {
		if part == ".." {
			return "", badArchive("entry %q climbs out with ..", shortName(name))
		}
		if len(part) > maxNameComponent {
			return "", badArchive("entry %q has a path component longer than %d bytes", shortName(name), maxNameComponent)
		}
	}
	clean := path.Clean(name)
	if clean == "." {
		return "", nil
	}
	if clean == storageManifestName || clean == storageLayerInfoName {
		return "", badArchive("entry %q uses a name reserved for oneagent-csi", name)
	}
	return clean, nil
}

var (
	storageManifestName  = storage.Layout{}.ManifestName()
	storageLayerInfoName = storage.Layout{}.LayerInfoName()
)
