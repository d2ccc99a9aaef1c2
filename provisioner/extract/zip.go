package extract

import (
	"archive/zip"
	"bufio"
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"hash"
	"hash/crc32"
	"io"
	"io/fs"
	"os"
	"path"
	"path/filepath"
	"sort"
	"strings"
	"sync/atomic"

	"github.com/klauspost/compress/flate"
	"github.com/spf13/afero"
	"golang.org/x/sync/errgroup"

	"github.com/oneagent-csi/oneagent-csi/internal/diskio"
	"github.com/oneagent-csi/oneagent-csi/storage"
)

type plannedEntry struct {
	f *zip.File
	// order is the entry's place in the central directory, which is the
	// order of the data in the file: files are extracted in this order so
	// that the ZIP is read front to back.
	order int
	name  string // cleaned, slash-separated, relative
	kind  string // file | dir | symlink
	link  string
	// offset is where the entry's local header starts (streaming only).
	offset int64
	hdr    entryHeader
}

// entryHeader is what extraction needs of an entry's central directory
// record: a streamed extraction keeps this and drops the directory.
type entryHeader struct {
	rawName      string
	method       uint16
	crc          uint32
	csize, usize uint64
	exec         bool
}

func headerOf(f *zip.File) entryHeader {
	return entryHeader{rawName: f.Name, method: f.Method, crc: f.CRC32, csize: f.CompressedSize64, usize: f.UncompressedSize64,
		exec: f.Mode()&0o111 != 0}
}

// Zip unpacks the ZIP at zipPath into destDir (both on fsys, destDir must
// not exist yet) and returns the manifest entries. Every entry is checked
// before anything is written: no absolute paths, no "..", no device files or
// pipes, symlinks must stay inside the tree and no entry may pass through a
// symlink; limits are enforced on declared and on actual sizes. Files are
// extracted by workers in parallel. On error the caller removes destDir.
func Zip(ctx context.Context, fsys afero.Fs, zipPath, destDir string, opts Options) (Result, error) {
	limits, workers := opts.Limits, opts.Workers
	limits.Defaults()
	if workers <= 0 {
		workers = WorkersFor(8 << 20)
	}
	pageCache := opts.PageCache
	if pageCache <= 0 {
		pageCache = diskio.DefaultPageCache
	}
	var out Result
	zf, err := fsys.Open(zipPath)
	if err != nil {
		return out, err
	}
	defer zf.Close()
	st, err := zf.Stat()
	if err != nil {
		return out, err
	}
	dir, err := readZipDirectory(zf, st.Size())
	if err != nil {
		return out, err
	}
	if err := checkZipDirectory(dir, limits); err != nil {
		return out, err
	}
	zr, err := zip.NewReader(zf, st.Size())
	if err != nil {
		return out, badArchive("%v", err)
	}
	plan, err := planEntries(zr.File, st.Size(), limits)
	if err != nil {
		return out, err
	}
	for i := range plan {
		if plan[i].kind == "symlink" {
			if plan[i].link, err = readLink(plan[i].f); err != nil {
				return out, err
			}
		}
	}
	if err := checkLinks(plan); err != nil {
		return out, err
	}
	entries := make([]storage.ManifestEntry, len(plan))
	files, err := makeDirs(fsys, destDir, plan, entries)
	if err != nil {
		return out, err
	}
	sort.Slice(files, func(a, b int) bool { return plan[files[a]].order < plan[files[b]].order })

	var total atomic.Int64
	var done atomic.Int64
	g, gctx := errgroup.WithContext(ctx)
	work := make(chan int)
	g.Go(func() error {
		defer close(work)
		for _, i := range files {
			select {
			case work <- i:
			case <-gctx.Done():
				return gctx.Err()
			}
		}
		return nil
	})
	stopProgress := logExtractProgress(ctx, &done, len(files))
	closer := &diskio.CloseQueue{Limit: pageCache}
	for range workers {
		g.Go(func() error {
			x := newFileExtractor(fsys, destDir, &total, limits.MaxBytes, closer, diskio.WriteBehindChunk(pageCache))
			for i := range work {
				p := plan[i]
				raw, err := p.f.OpenRaw()
				if err != nil {
					return badArchive("entry %s: %v", p.name, err)
				}
				e, err := x.extract(gctx, p, raw)
				if err != nil {
					return err
				}
				if off, err := p.f.DataOffset(); err == nil {
					diskio.DropCache(zf, off, int64(p.f.CompressedSize64))
				}
				entries[i] = e
				done.Add(1)
			}
			return nil
		})
	}
	err = g.Wait()
	stopProgress()
	closer.Drain()
	if err != nil {
		return out, err
	}
	if err := makeSymlinks(fsys, destDir, plan, entries); err != nil {
		return out, err
	}
	out.Entries, out.Size, out.Files = entries, total.Load(), len(files)
	return out, nil
}

// makeDirs creates destDir, the plan's directories and the parents of its
// files, fills in the directories' manifest entries and returns the indexes
// of the files in plan.
func makeDirs(fsys afero.Fs, destDir string, plan []plannedEntry, entries []storage.ManifestEntry) ([]int, error) {
	if err := fsys.Mkdir(destDir, 0o755); err != nil {
		return nil, err
	}
	var files []int
	for i, p := range plan {
		switch p.kind {
		case "dir":
			if err := fsys.MkdirAll(filepath.Join(destDir, filepath.FromSlash(p.name)), 0o755); err != nil {
				return nil, err
			}
			entries[i] = storage.ManifestEntry{Path: p.name, Type: "dir", Mode: 0o755}
		case "file":
			if err := fsys.MkdirAll(filepath.Join(destDir, filepath.FromSlash(path.Dir(p.name))), 0o755); err != nil {
				return nil, err
			}
			files = append(files, i)
		}
	}
	return files, nil
}

// makeSymlinks creates the plan's links, after every file: no file is
// ever written through one.
func makeSymlinks(fsys afero.Fs, destDir string, plan []plannedEntry, entries []storage.ManifestEntry) error {
	for i, p := range plan {
		if p.kind != "symlink" {
			continue
		}
		dst := filepath.Join(destDir, filepath.FromSlash(p.name))
		if err := fsys.MkdirAll(filepath.Dir(dst), 0o755); err != nil {
			return err
		}
		if err := symlink(fsys, p.link, dst); err != nil {
			return fmt.Errorf("extract %s: %w", p.name, err)
		}
		entries[i] = storage.ManifestEntry{Path: p.name, Type: "symlink", Link: p.link}
	}
	return nil
}

// planEntries validates every entry as the central directory declares it
// and returns the entries to create, sorted by path. Link targets are part
// of an entry's data: the caller reads them and checks them with
// checkLinks before any link is created.
func planEntries(zfiles []*zip.File, zipSize int64, limits Limits) ([]plannedEntry, error) {
	if len(zfiles) > limits.MaxEntries {
		return nil, badArchive("%d entries exceed the limit of %d", len(zfiles), limits.MaxEntries)
	}
	var declared uint64
	plan := make([]plannedEntry, 0, len(zfiles))
	seen := make(map[string]string, len(zfiles))
	for order, f := range zfiles {
		name, err := cleanEntryName(f.Name)
		if err != nil {
			return nil, err
		}
		mode := f.Mode()
		if name == "" {
			if mode.IsDir() {
				continue // the archive root itself
			}
			return nil, badArchive("entry %q is not a directory but names the archive root", shortName(f.Name))
		}
		p := plannedEntry{f: f, name: name, order: order, hdr: headerOf(f)}
		switch {
		case mode.IsDir():
			p.kind = "dir"
		case mode&fs.ModeSymlink != 0:
			p.kind = "symlink"
			if f.UncompressedSize64 > maxLinkTarget || f.CompressedSize64 > maxLinkTarget+64 {
				return nil, badArchive("symlink %s target is %d bytes", name, f.UncompressedSize64)
			}
		case mode.IsRegular():
			p.kind = "file"
			if f.Method != zip.Store && f.Method != zip.Deflate {
				return nil, badArchive("entry %s uses compression method %d (only store and deflate are supported)", name, f.Method)
			}
			declared += f.UncompressedSize64
			if f.UncompressedSize64 > ratioCheckMin && float64(f.UncompressedSize64) > limits.MaxRatio*float64(max(f.CompressedSize64, 1)) {
				return nil, badArchive("entry %s expands %d -> %d bytes, more than the ratio limit %.0f", name, f.CompressedSize64, f.UncompressedSize64, limits.MaxRatio)
			}
		default:
			return nil, badArchive("entry %s has unsupported type %s (devices, pipes and sockets are refused)", name, mode.Type())
		}
		if prev, dup := seen[name]; dup && (prev != "dir" || p.kind != "dir") {
			return nil, badArchive("entry %s appears twice", name)
		}
		seen[name] = p.kind
		plan = append(plan, p)
	}
	if declared > uint64(limits.MaxBytes) {
		return nil, badArchive("declared size %d exceeds the limit of %d bytes", declared, limits.MaxBytes)
	}
	if zipSize > 0 && float64(declared) > limits.MaxRatio*float64(zipSize) {
		return nil, badArchive("archive expands %d -> %d bytes, more than the ratio limit %.0f", zipSize, declared, limits.MaxRatio)
	}
	// No entry may be written through a symlink, and nothing may be both a
	// file and a directory.
	for _, p := range plan {
		for dir := path.Dir(p.name); dir != "."; dir = path.Dir(dir) {
			switch seen[dir] {
			case "symlink":
				return nil, badArchive("entry %s lies below symlink %s", p.name, dir)
			case "file":
				return nil, badArchive("entry %s lies below file %s", p.name, dir)
			}
		}
	}
	sort.Slice(plan, func(i, j int) bool { return plan[i].name < plan[j].name })
	return plan, nil
}

// checkLinks checks the targets of the plan's links: relative, and inside
// the tree when followed the way the kernel follows them: through the other
// links of the archive, component by component (l -> . then esc -> l/..
// leaves the tree, though "l/.." cleans to ".").
func checkLinks(plan []plannedEntry) error {
	links := map[string]string{}
	for _, p := range plan {
		if p.kind != "symlink" {
			continue
		}
		if p.link == "" || path.IsAbs(p.link) || strings.Contains(p.link, "\\") || strings.ContainsRune(p.link, 0) {
			return badArchive("symlink %s -> %s points outside the artifact", p.name, shortName(p.link))
		}
		links[p.name] = p.link
	}
	for name, target := range links {
		hops := 0
		if _, ok := resolveInTree(links, splitPath(path.Dir(name)), target, &hops); !ok {
			return badArchive("symlink %s -> %s points outside the artifact (through the archive's other links)", name, shortName(target))
		}
	}
	return nil
}

// maxLinkTarget is the longest link target accepted (PATH_MAX).
const maxLinkTarget = 4096

func readLink(f *zip.File) (string, error) {
	r, err := f.Open()
	if err != nil {
		return "", badArchive("symlink %s: %v", f.Name, err)
	}
	defer r.Close()
	return readLinkTarget(f.Name, r)
}

// readLinkTarget reads a link's target from its (decompressed) data.
func readLinkTarget(name string, r io.Reader) (string, error) {
	b, err := io.ReadAll(io.LimitReader(r, maxLinkTarget+1))
	if err != nil {
		return "", badArchive("symlink %s: %v", shortName(name), err)
	}
	if len(b) == 0 || len(b) > maxLinkTarget {
		return "", badArchive("symlink %s has an empty or too long target", shortName(name))
	}
	return string(b), nil
}

// Buffer sizes of one extraction worker.
const (
	workerReadBuffer  = 256 << 10
	workerWriteBuffer = 256 << 10
	workerCopyBuffer  = 64 << 10
	// WorkerMemory is what one extraction worker holds: its buffers and
	// its inflater's window and tables.
	WorkerMemory = workerReadBuffer + workerWriteBuffer + workerCopyBuffer + 64<<10
)

// fileExtractor extracts one file at a time and keeps its buffers and
// decompressor between files: a code module has ~15,000 of them.
type fileExtractor struct {
	fsys     afero.Fs
	destDir  string
	total    *atomic.Int64
	maxBytes int64
	closer   *diskio.CloseQueue
	chunk    int64 // write-behind chunk

	in       *bufio.Reader // compressed bytes not in memory, read in large blocks
	inflate  io.ReadCloser
	out      *bufio.Writer // decompressed bytes, written in large blocks
	sha      hash.Hash
	crc      hash.Hash32
	copyBuf  []byte
	sum      []byte
	checksum io.Writer
}

func newFileExtractor(fsys afero.Fs, destDir string, total *atomic.Int64, maxBytes int64, closer *diskio.CloseQueue, chunk int64) *fileExtractor {
	x := &fileExtractor{fsys: fsys, destDir: destDir, total: total, maxBytes: maxBytes, closer: closer, chunk: chunk,
		out: bufio.NewWriterSize(nil, workerWriteBuffer),
		sha: sha256.New(), crc: crc32.NewIEEE(), copyBuf: make([]byte, workerCopyBuffer)}
	x.checksum = io.MultiWriter(x.sha, x.crc)
	return x
}

// extract writes one regular file, checking its size and CRC-32 against the
// central directory, and returns its manifest entry.
func (x *fileExtractor) extract(ctx context.Context, p plannedEntry, raw io.Reader) (storage.ManifestEntry, error) {
	if err := ctx.Err(); err != nil {
		return storage.ManifestEntry{}, err
	}
	perm := os.FileMode(0o644)
	if p.hdr.exec {
		perm = 0o755
	}
	// Compressed bytes already in memory are read as they are; others
	// through a large buffer (allocated on first use).
	in, inMemory := raw.(*bytes.Reader)
	var compressed flate.Reader = in
	if !inMemory {
		if x.in == nil {
			x.in = bufio.NewReaderSize(nil, workerReadBuffer)
		}
		x.in.Reset(raw)
		compressed = x.in
	}
	var src io.Reader = compressed
	if p.hdr.method == zip.Deflate {
		if x.inflate == nil {
			x.inflate = flate.NewReader(compressed)
		} else if err := x.inflate.(flate.Resetter).Reset(compressed, nil); err != nil {
			return storage.ManifestEntry{}, badArchive("entry %s: %v", p.name, err)
		}
		src = x.inflate
	}
	dst := filepath.Join(x.destDir, filepath.FromSlash(p.name))
	f, err := x.fsys.OpenFile(dst, os.O_WRONLY|os.O_CREATE|os.O_EXCL, perm)
	if err != nil {
		return storage.ManifestEntry{}, fmt.Errorf("extract %s: %w", p.name, err)
	}
	w := diskio.NewWriteBehind(f, x.chunk)
	x.out.Reset(w)
	x.sha.Reset()
	x.crc.Reset()
	// Read at most one byte more than declared: a lying header is caught
	// without writing an unbounded stream.
	limited := io.LimitReader(src, int64(p.hdr.usize)+1)
	n, err := io.CopyBuffer(io.MultiWriter(x.out, x.checksum), countingReader{limited, x.total, x.maxBytes}, x.copyBuf)
	if err == nil {
		err = x.out.Flush()
	}
	x.out.Reset(nil)
	cerr := x.closer.Add(w)
	var pathErr *fs.PathError
	var srcErr *sourceError
	switch {
	case errors.Is(err, ErrBadArchive), errors.As(err, &srcErr):
		return storage.ManifestEntry{}, err
	case errors.As(err, &pathErr):
		// Writing the file or reading the ZIP from disk failed: not the
		// archive's fault.
		return storage.ManifestEntry{}, fmt.Errorf("extract %s: %w", p.name, err)
	case err != nil:
		return storage.ManifestEntry{}, badArchive("entry %s: %v", p.name, err)
	case cerr != nil:
		return storage.ManifestEntry{}, fmt.Errorf("extract %s: %w", p.name, cerr)
	case uint64(n) != p.hdr.usize:
		return storage.ManifestEntry{}, badArchive("entry %s has %d bytes, header says %d", p.name, n, p.hdr.usize)
	case x.crc.Sum32() != p.hdr.crc:
		return storage.ManifestEntry{}, badArchive("entry %s: checksum error (CRC-32 %08x, central directory says %08x)", p.name, x.crc.Sum32(), p.hdr.crc)
	}
	if err := x.fsys.Chmod(dst, perm); err != nil { // umask-independent
		return storage.ManifestEntry{}, err
	}
	x.sum = x.sha.Sum(x.sum[:0])
	return storage.ManifestEntry{Path: p.name, Type: "file", Mode: uint32(perm), Size: n, SHA256: hex.EncodeToString(x.sum)}, nil
}
