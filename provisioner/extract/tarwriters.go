package extract

import (
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"os"
	"sync"

	"github.com/oneagent-csi/oneagent-csi/internal/diskio"
)

// A tar stream is one sequence, so files are read from it one after the
// other; but writing a file (create, write, hash, start writeback) need not
// wait for the previous one. Small files are read into a buffer and
// written by a few writers while the stream goes on; anything that could
// touch a file still being written (a hard link to it, a whiteout, a
// replacement, the end of the layer) waits for the writers first.
const (
	// tarBufferedMax is the largest file handed to a writer; larger ones
	// are written from the stream directly.
	tarBufferedMax = 256 << 10
	// tarWriters write files in parallel. More gain nothing: the single
	// decompressing goroutine feeds them.
	tarWriters = 4
)

// tarFile is one file for a writer: its data read whole, and its node,
// whose checksum the writer fills in.
type tarFile struct {
	dst, name string
	perm      os.FileMode
	data      []byte
	node      *node
}

// fileWriters writes tarFiles in parallel.
type fileWriters struct {
	l       *Layers
	jobs    chan tarFile
	buffers chan []byte
	pending sync.WaitGroup
	workers sync.WaitGroup

	mu  sync.Mutex
	err error // the first writer error
}

func newFileWriters(l *Layers) *fileWriters {
	w := &fileWriters{l: l, jobs: make(chan tarFile), buffers: make(chan []byte, tarWriters+1)}
	for range tarWriters + 1 {
		w.buffers <- nil
	}
	for range tarWriters {
		w.workers.Add(1)
		go func() {
			defer w.workers.Done()
			for f := range w.jobs {
				if err := w.write(f); err != nil {
					w.mu.Lock()
					if w.err == nil {
						w.err = err
					}
					w.mu.Unlock()
				}
				w.buffers <- f.data[:0]
				w.pending.Done()
			}
		}()
	}
	return w
}

// buffer returns a buffer of n bytes (n <= tarBufferedMax), waiting for a
// writer to give one back.
func (w *fileWriters) buffer(n int64) []byte {
	b := <-w.buffers
	if cap(b) < tarBufferedMax {
		b = make([]byte, 0, tarBufferedMax)
	}
	return b[:n]
}

// submit hands f to a writer.
func (w *fileWriters) submit(f tarFile) {
	w.pending.Add(1)
	w.jobs <- f
}

// failed returns the first writer error so far.
func (w *fileWriters) failed() error {
	w.mu.Lock()
	defer w.mu.Unlock()
	return w.err
}

// wait returns once every file submitted is written, with the first
// writer error.
func (w *fileWriters) wait() error {
	w.pending.Wait()
	w.mu.Lock()
	defer w.mu.Unlock()
	return w.err
}

// close waits for the writers and stops them.
func (w *fileWriters) close() error {
	err := w.wait()
	close(w.jobs)
	w.workers.Wait()
	return err
}

func (w *fileWriters) write(f tarFile) error {
	file, err := w.l.fsys.OpenFile(f.dst, os.O_WRONLY|os.O_CREATE|os.O_EXCL, f.perm)
	if err != nil {
		return fmt.Errorf("extract %s: %w", f.name, err)
	}
	wb := diskio.NewWriteBehind(file, w.l.chunk)
	_, err = wb.Write(f.data)
	if cerr := w.l.closer.Add(wb); err == nil {
		err = cerr
	}
	if err != nil {
		return fmt.Errorf("extract %s: %w", f.name, err)
	}
	if err := w.l.fsys.Chmod(f.dst, f.perm); err != nil { // umask-independent
		return err
	}
	sum := sha256.Sum256(f.data)
	f.node.sum = hex.EncodeToString(sum[:])
	return nil
}
