package extract

import (
	"archive/tar"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path"
	"path/filepath"
	"sort"
	"strings"
	"sync/atomic"

	"github.com/spf13/afero"

	"github.com/oneagent-csi/oneagent-csi/internal/diskio"
	"github.com/oneagent-csi/oneagent-csi/storage"
)

// OCI whiteout markers (image-spec layer.md): ".wh.<name>" deletes name
// from the layers below; ".wh..wh..opq" empties its directory of what the
// layers below put there.
const (
	whiteoutPrefix = ".wh."
	opaqueWhiteout = ".wh..wh..opq"
)

// node is one path of the tree being built, by its path relative to the
// tree's root.
type node struct {
	kind  string // file | dir | symlink
	link  string // symlink target
	mode  uint32
	size  int64
	sum   string
	layer int // the layer that wrote it
}

// Layers builds the tree below one directory of an image (the code
// module's root, e.g. opt/dynatrace/oneagent) from its layers, applied in
// order as the OCI image spec says: later entries replace earlier ones,
// whiteouts delete what the layers below put there. Every entry goes
// through the same rules as a ZIP entry (rules.go) while it streams in, so
// a layer never has to be stored whole. Entries outside the root are read
// past and not written. The caller decompresses and verifies each layer's
// digest; it removes destDir when anything fails.
type Layers struct {
	fsys    afero.Fs
	destDir string
	root    string // slash-separated, cleaned, no leading slash
	limits  Limits
	closer  *diskio.CloseQueue
	chunk   int64

	layer   int
	tree    *tree
	entries int
	total   atomic.Int64 // bytes written into the tree
	sawRoot bool
	buf     []byte
}

// NewLayers prepares destDir (which must not exist) for the tree found at
// root in the image's file system.
func NewLayers(fsys afero.Fs, destDir, root string, opts Options) (*Layers, error) {
	limits := opts.Limits
	limits.Defaults()
	pageCache := opts.PageCache
	if pageCache <= 0 {
		pageCache = diskio.DefaultPageCache
	}
	root = strings.Trim(path.Clean("/"+root), "/")
	if err := fsys.Mkdir(destDir, 0o755); err != nil {
		return nil, err
	}
	return &Layers{fsys: fsys, destDir: destDir, root: root, limits: limits,
		closer: &diskio.CloseQueue{Limit: pageCache}, chunk: diskio.WriteBehindChunk(pageCache),
		tree: newTree(), buf: make([]byte, workerCopyBuffer)}, nil
}

// Apply reads one uncompressed layer (a tar stream) to its end and applies
// it. compressedSize is the layer's size as stored (its descriptor's size),
// for the expansion ratio limit; 0 skips that check.
func (l *Layers) Apply(ctx context.Context, r io.Reader, compressedSize int64) error {
	l.layer++
	var read int64
	counted := &ratioReader{r: r, n: &read, limit: -1}
	if compressedSize > 0 {
		// Small layers (a whiteout, a few headers) are mostly zero padding
		// and legitimately compress very well.
		counted.limit = max(int64(l.limits.MaxRatio*float64(compressedSize)), ratioCheckMin)
	}
	tr := tar.NewReader(counted)
	seen := map[string]bool{} // paths this layer wrote, for duplicates and opaque dirs
	for {
		if err := ctx.Err(); err != nil {
			return err
		}
		h, err := tr.Next()
		if errors.Is(err, io.EOF) {
			break
		}
		if err != nil {
			return l.streamError(err, "layer %d", l.layer)
		}
		if l.entries++; l.entries > l.limits.MaxEntries {
			return badArchive("image layers hold more than %d entries", l.limits.MaxEntries)
		}
		if err := l.entry(tr, h, seen); err != nil {
			return err
		}
	}
	// Read to the end: the caller's digest covers the whole stream.
	if _, err := io.CopyBuffer(io.Discard, counted, l.buf); err != nil {
		return l.streamError(err, "layer %d", l.layer)
	}
	return nil
}

// streamError keeps a refusal from the ratio reader as it is and makes a
// malformed stream a bad archive; errors reading the source stay what they
// are (network, disk).
func (l *Layers) streamError(err error, format string, a ...any) error {
	var pathErr *fs.PathError
	switch {
	case errors.Is(err, ErrBadArchive), errors.As(err, &pathErr):
		return err
	case errors.Is(err, tar.ErrHeader), errors.Is(err, tar.ErrFieldTooLong), errors.Is(err, io.ErrUnexpectedEOF):
		return badArchive("%s: %v", fmt.Sprintf(format, a...), err)
	}
	return fmt.Errorf("%s: %w", fmt.Sprintf(format, a...), err)
}

// entry applies one tar entry.
func (l *Layers) entry(tr *tar.Reader, h *tar.Header, seen map[string]bool) error {
	raw := strings.TrimPrefix(h.Name, "./")
	if raw == "" || raw == "." || raw == "/" {
		return nil // the image's root itself
	}
	name, err := cleanEntryName(raw)
	if err != nil {
		return err
	}
	dir, base := path.Split(name)
	dir = strings.TrimSuffix(dir, "/")
	if base == opaqueWhiteout || strings.HasPrefix(base, whiteoutPrefix) {
		if h.Typeflag != tar.TypeReg { // the reader reports old-style regular files as TypeReg
			return badArchive("whiteout %s is not a regular file", name)
		}
		target := path.Join(dir, strings.TrimPrefix(base, whiteoutPrefix))
		if base == opaqueWhiteout {
			target = dir
		}
		return l.whiteout(target, base == opaqueWhiteout, seen)
	}
	rel, inside := l.relative(name)
	if !inside {
		return nil // outside the module's root (or one of its parents): read past
	}
	if rel == "" {
		if h.Typeflag != tar.TypeDir {
			return badArchive("image path %s is a %s, not a directory", l.root, typeName(h.Typeflag))
		}
		l.sawRoot = true
		return nil
	}
	if len(name) > maxNameLength {
		return badArchive("entry name %q is longer than %d bytes", shortName(name), maxNameLength)
	}
	if rel == storageManifestName || rel == storageLayerInfoName {
		return badArchive("entry %q uses a name reserved for oneagent-csi", name)
	}
	if isSparse(h) {
		// archive/tar expands a sparse file's holes as it is read, past
		// the expansion-ratio count: 240 bytes of layer could write
		// gigabytes. No code module needs holes.
		return badArchive("entry %s is a sparse file (%d bytes, mostly holes); sparse files are refused", name, h.Size)
	}
	l.sawRoot = true
	if seen[rel] {
		return badArchive("entry %s appears twice in layer %d", name, l.layer)
	}
	seen[rel] = true
	if err := l.checkParents(rel, name); err != nil {
		return err
	}
	switch h.Typeflag {
	case tar.TypeDir:
		if n := l.tree.get(rel); n != nil && n.kind == "dir" {
			n.layer = l.layer
			return nil
		}
		if err := l.remove(rel); err != nil {
			return err
		}
		if err := l.fsys.MkdirAll(l.path(rel), 0o755); err != nil {
			return err
		}
		l.tree.set(rel, &node{kind: "dir", mode: 0o755, layer: l.layer})
		return nil
	case tar.TypeSymlink:
		target := h.Linkname
		if target == "" || len(target) > 4096 || path.IsAbs(target) || strings.Contains(target, "\\") || strings.ContainsRune(target, 0) {
			return badArchive("symlink %s -> %s points outside the artifact", name, shortName(target))
		}
		hops := 0
		if _, ok := resolveInTree(l.tree.links, splitPath(path.Dir(rel)), target, &hops); !ok {
			return badArchive("symlink %s -> %s points outside the artifact (through the image's other links)", name, shortName(target))
		}
		if err := l.replace(rel); err != nil {
			return err
		}
		if err := symlink(l.fsys, target, l.path(rel)); err != nil {
			return fmt.Errorf("extract %s: %w", name, err)
		}
		l.tree.set(rel, &node{kind: "symlink", link: target, layer: l.layer})
		return nil
	case tar.TypeLink:
		return l.hardLink(rel, name, h.Linkname)
	case tar.TypeReg:
		return l.file(tr, h, rel, name)
	}
	return badArchive("entry %s has unsupported type %s (devices, pipes and sockets are refused)", name, typeName(h.Typeflag))
}

// isSparse tells a sparse entry: the old GNU type, or a PAX header with
// GNU.sparse.* records (formats 0.0, 0.1 and 1.0).
func isSparse(h *tar.Header) bool {
	if h.Typeflag == tar.TypeGNUSparse {
		return true
	}
	for k := range h.PAXRecords {
		if strings.HasPrefix(k, "GNU.sparse.") {
			return true
		}
	}
	return false
}

// relative maps an image path to its place in the tree: "" for the root,
// false for paths outside it.
func (l *Layers) relative(name string) (string, bool) {
	if name == l.root {
		return "", true
	}
	rel, ok := strings.CutPrefix(name, l.root+"/")
	return rel, ok
}

// checkParents refuses an entry below a symlink or a file of the tree and
// creates missing parent directories.
func (l *Layers) checkParents(rel, name string) error {
	for dir := path.Dir(rel); dir != "."; dir = path.Dir(dir) {
		switch n := l.tree.get(dir); {
		case n == nil:
		case n.kind == "symlink":
			return badArchive("entry %s lies below symlink %s", name, dir)
		case n.kind == "file":
			return badArchive("entry %s lies below file %s", name, dir)
		}
	}
	var missing []string
	for dir := path.Dir(rel); dir != "." && l.tree.get(dir) == nil; dir = path.Dir(dir) {
		missing = append(missing, dir)
	}
	if len(missing) == 0 {
		return nil
	}
	if err := l.fsys.MkdirAll(l.path(missing[0]), 0o755); err != nil {
		return err
	}
	for _, dir := range missing {
		l.tree.set(dir, &node{kind: "dir", mode: 0o755, layer: l.layer})
	}
	return nil
}

// file writes one regular file, replacing what the layers below had there.
func (l *Layers) file(tr *tar.Reader, h *tar.Header, rel, name string) error {
	if h.Size > l.limits.MaxBytes || l.total.Load()+h.Size > l.limits.MaxBytes {
		return badArchive("entry %s (%d bytes) takes the tree past the limit of %d bytes", name, h.Size, l.limits.MaxBytes)
	}
	if err := l.replace(rel); err != nil {
		return err
	}
	perm := normalMode(h.Mode)
	dst := l.path(rel)
	f, err := l.fsys.OpenFile(dst, os.O_WRONLY|os.O_CREATE|os.O_EXCL, perm)
	if err != nil {
		return fmt.Errorf("extract %s: %w", name, err)
	}
	w := diskio.NewWriteBehind(f, l.chunk)
	sha := sha256.New()
	n, err := io.CopyBuffer(io.MultiWriter(w, sha), countingReader{tr, &l.total, l.limits.MaxBytes}, l.buf)
	cerr := l.closer.Add(w)
	switch {
	case err != nil:
		return l.streamError(err, "entry %s", name)
	case cerr != nil:
		return fmt.Errorf("extract %s: %w", name, cerr)
	case n != h.Size:
		return badArchive("entry %s has %d bytes, header says %d", name, n, h.Size)
	}
	if err := l.fsys.Chmod(dst, perm); err != nil { // umask-independent
		return err
	}
	l.tree.set(rel, &node{kind: "file", mode: uint32(perm), size: n, sum: hex.EncodeToString(sha.Sum(nil)), layer: l.layer})
	return nil
}

// hardLink makes rel the same file as target, which must be a regular file
// already in the tree (a tar hard link names an earlier entry).
func (l *Layers) hardLink(rel, name, linkname string) error {
	targetName, err := cleanEntryName(strings.TrimPrefix(linkname, "./"))
	if err != nil {
		return badArchive("hard link %s -> %s: %v", name, shortName(linkname), err)
	}
	target, inside := l.relative(targetName)
	src := l.tree.get(target)
	if !inside || target == "" || src == nil || src.kind != "file" {
		return badArchive("hard link %s -> %s does not name a file extracted before it inside the artifact", name, shortName(linkname))
	}
	if target == rel {
		return nil
	}
	if err := l.replace(rel); err != nil {
		return err
	}
	if err := hardLink(l.fsys, l.path(target), l.path(rel)); err != nil {
		return fmt.Errorf("extract %s: %w", name, err)
	}
	cp := *src
	cp.layer = l.layer
	l.tree.set(rel, &cp)
	return nil
}

// whiteout deletes target (or, opaque, everything in it) as far as lower
// layers put it there. A whiteout of the module's root or one of its
// parents deletes the whole tree.
func (l *Layers) whiteout(target string, opaque bool, seen map[string]bool) error {
	rel, inside := l.relative(target)
	if !inside {
		if target != "." && !strings.HasPrefix(l.root+"/", target+"/") {
			return nil // elsewhere in the image
		}
		rel = "" // the root or a parent of it
		opaque = true
	}
	if rel != "" {
		if err := l.checkParentsExist(rel, target); err != nil {
			return err
		}
	}
	if !opaque {
		if n := l.tree.get(rel); n != nil && n.layer < l.layer {
			return l.remove(rel)
		}
		return nil
	}
	// Opaque: what lower layers put below rel goes; this layer's entries
	// stay, whichever order the tar has them in.
	var doomed []string
	l.tree.each(rel, func(p string, n *node) {
		if n.layer < l.layer && !seen[p] {
			doomed = append(doomed, p)
		}
	})
	sort.Strings(doomed) // parents first: removing one takes its children
	for _, p := range doomed {
		if l.tree.get(p) != nil {
			if err := l.remove(p); err != nil {
				return err
			}
		}
	}
	return nil
}

// checkParentsExist refuses a whiteout whose parents are not directories
// of the tree: deleting through a symlink would reach outside it.
func (l *Layers) checkParentsExist(rel, name string) error {
	for dir := path.Dir(rel); dir != "."; dir = path.Dir(dir) {
		if n := l.tree.get(dir); n != nil && n.kind != "dir" {
			return badArchive("whiteout %s lies below %s %s", name, n.kind, dir)
		}
	}
	return nil
}

// replace clears rel for a new entry unless it is a directory a directory
// replaces.
func (l *Layers) replace(rel string) error {
	if l.tree.get(rel) == nil {
		return nil
	}
	return l.remove(rel)
}

// remove deletes rel and everything below it from disk and the tree.
func (l *Layers) remove(rel string) error {
	if l.tree.get(rel) == nil {
		return nil
	}
	if err := l.fsys.RemoveAll(l.path(rel)); err != nil {
		return fmt.Errorf("remove %s: %w", rel, err)
	}
	l.tree.removeSubtree(rel)
	return nil
}

func (l *Layers) path(rel string) string {
	return filepath.Join(l.destDir, filepath.FromSlash(rel))
}

// Finish checks the tree as a whole (it exists; every link, followed the
// way the kernel follows it, stays inside) and returns its manifest
// entries.
func (l *Layers) Finish() (Result, error) {
	var out Result
	l.closer.Drain()
	if !l.sawRoot || l.tree.len() == 0 {
		return out, badArchive("the image has nothing at %s (set imagePath to where the code module is)", l.root)
	}
	links := l.tree.links
	for name, target := range links {
		hops := 0
		if _, ok := resolveInTree(links, splitPath(path.Dir(name)), target, &hops); !ok {
			return out, badArchive("symlink %s -> %s points outside the artifact (through the image's other links)", name, shortName(target))
		}
	}
	paths := make([]string, 0, l.tree.len())
	for p := range l.tree.nodes {
		paths = append(paths, p)
	}
	sort.Strings(paths)
	for _, p := range paths {
		n := l.tree.get(p)
		switch n.kind {
		case "dir":
			out.Entries = append(out.Entries, storage.ManifestEntry{Path: p, Type: "dir", Mode: n.mode})
		case "symlink":
			out.Entries = append(out.Entries, storage.ManifestEntry{Path: p, Type: "symlink", Link: n.link})
		case "file":
			out.Entries = append(out.Entries, storage.ManifestEntry{Path: p, Type: "file", Mode: n.mode, Size: n.size, SHA256: n.sum})
			out.Files++
			out.Size += n.size
		}
	}
	return out, nil
}

// normalMode is the mode a file gets whatever the archive says: readable by
// all, executable by all when any execute bit is set, never setuid, setgid,
// sticky or writable by others.
func normalMode(mode int64) os.FileMode {
	if mode&0o111 != 0 {
		return 0o755
	}
	return 0o644
}

func typeName(t byte) string {
	switch t {
	case tar.TypeChar:
		return "character device"
	case tar.TypeBlock:
		return "block device"
	case tar.TypeFifo:
		return "fifo"
	case tar.TypeDir:
		return "directory"
	case tar.TypeSymlink:
		return "symlink"
	case tar.TypeLink:
		return "hard link"
	case tar.TypeReg:
		return "file"
	}
	return fmt.Sprintf("tar type %q", t)
}

// ratioReader counts the bytes of an uncompressed layer and fails once
// they exceed limit (the ratio limit times the compressed size); a
// negative limit checks nothing.
type ratioReader struct {
	r     io.Reader
	n     *int64
	limit int64
}

func (c *ratioReader) Read(p []byte) (int, error) {
	n, err := c.r.Read(p)
	*c.n += int64(n)
	if c.limit >= 0 && *c.n > c.limit {
		return n, badArchive("layer expands to more than %d bytes, past the ratio limit", c.limit)
	}
	return n, err
}
