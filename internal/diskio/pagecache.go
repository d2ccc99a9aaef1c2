// Package diskio keeps what installs write to disk from piling up in the
// page cache (write-behind, bounded close queue, dropping read ranges): a
// DaemonSet's memory limit counts dirty page cache too.
package diskio

import (
	"io"
	"os"
	"sync"

	"github.com/spf13/afero"
	"golang.org/x/sys/unix"
)

// DefaultPageCache is the page cache an install may hold dirty or under
// writeback where no memory limit says less (see Options.PageCache).
const DefaultPageCache = 8 << 20

// WriteBehindChunk is how much a file may have dirty in the page cache before
// writeback of it is started and the written range dropped from the cache:
// a quarter of the page cache budget, at least 256 KiB. A DaemonSet's memory
// limit counts dirty page cache too; without this a large extraction can
// fill a small cgroup with dirty pages and stall.
func WriteBehindChunk(pageCache int64) int64 { return max(pageCache/4, 256<<10) }

// WriteBehind writes to f and, when f is backed by an OS file, pushes every
// finished chunk to disk and drops it from the page cache, so the cache a
// download or extraction holds stays at about two chunks per file.
type WriteBehind struct {
	f       afero.File
	fd      int
	chunk   int64
	written int64
	flushed int64
}

func NewWriteBehind(f afero.File, chunk int64) *WriteBehind {
	w := &WriteBehind{f: f, fd: -1, chunk: chunk}
	if osf := OSFile(f); osf != nil {
		w.fd = int(osf.Fd())
	}
	return w
}

// OSFile returns the *os.File behind an afero file, or nil for in-memory files.
func OSFile(f afero.File) *os.File {
	switch v := f.(type) {
	case *os.File:
		return v
	case *afero.BasePathFile:
		return OSFile(v.File)
	}
	return nil
}

func (w *WriteBehind) Write(p []byte) (int, error) {
	n, err := w.f.Write(p)
	w.written += int64(n)
	if w.fd >= 0 && w.written-w.flushed >= w.chunk {
		w.flush(false)
	}
	return n, err
}

// ReadFrom keeps io.Copy from bypassing Write through os.File's ReadFrom.
func (w *WriteBehind) ReadFrom(r io.Reader) (int64, error) {
	buf := make([]byte, 64<<10)
	return io.CopyBuffer(struct{ io.Writer }{w}, r, buf)
}

// flush starts writeback of what was written since the last flush and drops
// the previous chunk (now written) from the page cache. With final it waits
// for everything and drops it all.
func (w *WriteBehind) flush(final bool) {
	if w.fd < 0 {
		return
	}
	if final {
		_ = unix.SyncFileRange(w.fd, 0, 0, unix.SYNC_FILE_RANGE_WAIT_BEFORE|unix.SYNC_FILE_RANGE_WRITE|unix.SYNC_FILE_RANGE_WAIT_AFTER)
		_ = unix.Fadvise(w.fd, 0, 0, unix.FADV_DONTNEED)
		w.flushed = w.written
		return
	}
	_ = unix.SyncFileRange(w.fd, w.flushed, w.written-w.flushed, unix.SYNC_FILE_RANGE_WRITE)
	if w.flushed > 0 {
		// The previous chunk has had a whole chunk's time to reach the disk.
		_ = unix.SyncFileRange(w.fd, 0, w.flushed, unix.SYNC_FILE_RANGE_WAIT_BEFORE|unix.SYNC_FILE_RANGE_WRITE|unix.SYNC_FILE_RANGE_WAIT_AFTER)
		_ = unix.Fadvise(w.fd, 0, w.flushed, unix.FADV_DONTNEED)
	}
	w.flushed = w.written
}

// Close flushes and closes the file.
func (w *WriteBehind) Close() error {
	w.flush(true)
	return w.f.Close()
}

// startFinal starts writeback of what is not yet flushed without waiting
// for it.
func (w *WriteBehind) startFinal() {
	if w.fd >= 0 && w.written > w.flushed {
		_ = unix.SyncFileRange(w.fd, w.flushed, 0, unix.SYNC_FILE_RANGE_WRITE)
	}
}

// CloseQueue bounds the page cache held by many small files written in a
// row (an extraction writes ~15,000 files of ~200 KiB). Waiting for each
// file's writeback when it is closed would make every worker wait for the
// disk once per file; never waiting would let dirty pages pile up until a
// small memory cgroup stalls in reclaim. Instead a finished file has its
// writeback started and is closed at once (no descriptor outlives the
// writing of its file, so an archive of a million tiny files cannot hold a
// million descriptors); the queue keeps only its path and its unwritten
// bytes. Once those pass limit, the oldest files (long written by then) are
// opened again read-only for a moment, waited for and dropped from the
// page cache.
type CloseQueue struct {
	// Limit is the bytes of finished files left to writeback before the
	// oldest are waited for and dropped.
	Limit int64

	mu      sync.Mutex
	pending []pendingFile
	bytes   int64
}

// pendingFile is a closed file whose writeback was started.
type pendingFile struct {
	path  string
	bytes int64
}

// Add closes w after starting its writeback and remembers it for the
// bound. The error is that of closing w (any error fails the whole
// extraction).
func (q *CloseQueue) Add(w *WriteBehind) error {
	if w.fd < 0 {
		return w.Close()
	}
	w.startFinal()
	name, unflushed := OSFile(w.f).Name(), w.written-w.flushed
	if err := w.f.Close(); err != nil {
		return err
	}
	q.mu.Lock()
	q.pending = append(q.pending, pendingFile{path: name, bytes: unflushed})
	q.bytes += unflushed
	var ready []pendingFile
	for q.bytes > q.Limit && len(q.pending) > 0 {
		ready = append(ready, q.pending[0])
		q.bytes -= q.pending[0].bytes
		q.pending = q.pending[1:]
	}
	if len(q.pending) == 0 {
		q.pending = nil // let the backing array go
	}
	q.mu.Unlock()
	// Wait outside the lock so that other workers keep going.
	for _, p := range ready {
		settle(p.path)
	}
	return nil
}

// Drain waits for the writeback of every file still in the queue and drops
// them from the page cache. It holds no descriptors, so a failed
// extraction that never drains leaks nothing.
func (q *CloseQueue) Drain() {
	q.mu.Lock()
	pending := q.pending
	q.pending, q.bytes = nil, 0
	q.mu.Unlock()
	for _, p := range pending {
		settle(p.path)
	}
}

// settle waits for a closed file's writeback and drops its pages. A file a
// later entry removed or replaced is skipped: its pages went with it, and
// durability is the caller's (one syncfs for the whole tree).
func settle(path string) {
	fd, err := unix.Open(path, unix.O_RDONLY|unix.O_NOFOLLOW|unix.O_CLOEXEC|unix.O_NONBLOCK, 0)
	if err != nil {
		return
	}
	_ = unix.SyncFileRange(fd, 0, 0, unix.SYNC_FILE_RANGE_WAIT_BEFORE|unix.SYNC_FILE_RANGE_WRITE|unix.SYNC_FILE_RANGE_WAIT_AFTER)
	_ = unix.Fadvise(fd, 0, 0, unix.FADV_DONTNEED)
	_ = unix.Close(fd)
}

// DropCache drops a range of a file that was read and is not needed again
// (the ZIP while it is extracted) from the page cache. It does nothing for
// in-memory files.
func DropCache(f afero.File, off, n int64) {
	if osf := OSFile(f); osf != nil && n > 0 {
		_ = unix.Fadvise(int(osf.Fd()), off, n, unix.FADV_DONTNEED)
	}
}
