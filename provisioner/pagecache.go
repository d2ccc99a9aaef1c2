package provisioner

import (
	"io"
	"os"

	"github.com/spf13/afero"
	"golang.org/x/sys/unix"
)

// writeBehindChunk is how much a file may have dirty in the page cache before
// writeback of it is started and the written range dropped from the cache.
// A DaemonSet's memory limit counts dirty page cache too; without this a
// large extraction can fill a small cgroup with dirty pages and stall.
const writeBehindChunk = 4 << 20

// writeBehind writes to f and, when f is backed by an OS file, pushes every
// finished chunk to disk and drops it from the page cache, so the cache a
// download or extraction holds stays at about two chunks per file.
type writeBehind struct {
	f       afero.File
	fd      int
	written int64
	flushed int64
}

func newWriteBehind(f afero.File) *writeBehind {
	w := &writeBehind{f: f, fd: -1}
	if osf := osFile(f); osf != nil {
		w.fd = int(osf.Fd())
	}
	return w
}

// osFile returns the *os.File behind an afero file, or nil for in-memory files.
func osFile(f afero.File) *os.File {
	switch v := f.(type) {
	case *os.File:
		return v
	case *afero.BasePathFile:
		return osFile(v.File)
	}
	return nil
}

func (w *writeBehind) Write(p []byte) (int, error) {
	n, err := w.f.Write(p)
	w.written += int64(n)
	if w.fd >= 0 && w.written-w.flushed >= writeBehindChunk {
		w.flush(false)
	}
	return n, err
}

// ReadFrom keeps io.Copy from bypassing Write through os.File's ReadFrom.
func (w *writeBehind) ReadFrom(r io.Reader) (int64, error) {
	buf := make([]byte, 64<<10)
	return io.CopyBuffer(struct{ io.Writer }{w}, r, buf)
}

// flush starts writeback of what was written since the last flush and drops
// the previous chunk (now written) from the page cache. With final it waits
// for everything and drops it all.
func (w *writeBehind) flush(final bool) {
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
func (w *writeBehind) Close() error {
	w.flush(true)
	return w.f.Close()
}
