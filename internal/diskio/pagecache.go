// Package diskio keeps what installs write to disk from piling up in the
// page cache (write-behind, bounded close queue, dropping read ranges): a
// DaemonSet's memory limit counts dirty page cache too.
package diskio

import (
	"errors"
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
// writeback started and stays open in the queue; once the queue holds more
// than limit bytes, the oldest files (long written by then) are waited
// for, dropped from the page cache and closed.
type CloseQueue struct {
	// Limit is the bytes of finished files left to writeback before the
	// oldest are waited for and closed.
	Limit int64

	mu      sync.Mutex
	pending []*WriteBehind
	bytes   int64
}

// Add takes over closing w. The error is that of closing some earlier file
// (any error fails the whole extraction, so which file it was matters
// less than stopping early).
func (q *CloseQueue) Add(w *WriteBehind) error {
	if w.fd < 0 {
		return w.Close()
	}
	w.startFinal()
	q.mu.Lock()
	q.pending = append(q.pending, w)
	q.bytes += w.written - w.flushed
	var ready []*WriteBehind
	for q.bytes > q.Limit && len(q.pending) > 0 {
		old := q.pending[0]
		q.pending[0] = nil
		q.pending = q.pending[1:]
		q.bytes -= old.written - old.flushed
		ready = append(ready, old)
	}
	q.mu.Unlock()
	// Wait outside the lock so that other workers keep going.
	var errs []error
	for _, old := range ready {
		errs = append(errs, old.Close())
	}
	return errors.Join(errs...)
}

// Drain closes every file still in the queue.
func (q *CloseQueue) Drain() error {
	q.mu.Lock()
	pending := q.pending
	q.pending, q.bytes = nil, 0
	q.mu.Unlock()
	var errs []error
	for _, w := range pending {
		errs = append(errs, w.Close())
	}
	return errors.Join(errs...)
}

// DropCache drops a range of a file that was read and is not needed again
// (the ZIP while it is extracted) from the page cache. It does nothing for
// in-memory files.
func DropCache(f afero.File, off, n int64) {
	if osf := OSFile(f); osf != nil && n > 0 {
		_ = unix.Fadvise(int(osf.Fd()), off, n, unix.FADV_DONTNEED)
	}
}
