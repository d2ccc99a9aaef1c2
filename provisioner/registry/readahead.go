package registry

import (
	"io"
	"sync"
)

// Read-ahead of a decompressed layer: one goroutine decompresses while the
// tree writes the files of what it decompressed before, as `crane export |
// tar -x` runs in two processes. A tar stream is sequential; this is the
// parallelism it has.
const (
	readAheadChunk  = 128 << 10
	readAheadChunks = 4
)

type chunk struct {
	buf []byte
	err error
}

// readAhead reads r in a goroutine, at most readAheadChunks chunks ahead
// of its reader, and returns r's bytes and then r's error as they came.
// Close stops the goroutine and waits for it: r is not read once Close
// returns.
type readAhead struct {
	chunks  chan chunk
	free    chan []byte
	stop    chan struct{}
	done    sync.WaitGroup
	stopped sync.Once

	cur []byte // the chunk being read, and how far
	off int
	err error
}

func newReadAhead(r io.Reader) *readAhead {
	ra := &readAhead{chunks: make(chan chunk, readAheadChunks), free: make(chan []byte, readAheadChunks+1), stop: make(chan struct{})}
	for range readAheadChunks + 1 {
		ra.free <- make([]byte, readAheadChunk)
	}
	ra.done.Add(1)
	go func() {
		defer ra.done.Done()
		defer close(ra.chunks)
		for {
			var buf []byte
			select {
			case buf = <-ra.free:
			case <-ra.stop:
				return
			}
			n, err := fill(r, buf)
			select {
			case ra.chunks <- chunk{buf[:n], err}:
			case <-ra.stop:
				return
			}
			if err != nil {
				return
			}
		}
	}()
	return ra
}

// fill reads into buf until it is full or r fails (io.EOF included).
func fill(r io.Reader, buf []byte) (int, error) {
	n := 0
	for n < len(buf) {
		m, err := r.Read(buf[n:])
		n += m
		if err != nil {
			return n, err
		}
	}
	return n, nil
}

func (ra *readAhead) Read(p []byte) (int, error) {
	for ra.off == len(ra.cur) {
		if ra.cur != nil {
			ra.free <- ra.cur[:cap(ra.cur)]
			ra.cur = nil
		}
		if ra.err != nil {
			return 0, ra.err
		}
		c, ok := <-ra.chunks
		if !ok {
			return 0, io.ErrClosedPipe // read after Close
		}
		ra.cur, ra.off, ra.err = c.buf, 0, c.err
	}
	n := copy(p, ra.cur[ra.off:])
	ra.off += n
	return n, nil
}

// Close stops reading ahead and waits until the goroutine no longer reads.
func (ra *readAhead) Close() {
	ra.stopped.Do(func() { close(ra.stop) })
	ra.done.Wait()
}
