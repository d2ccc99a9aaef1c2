// Package readahead decouples the stages of a sequential stream (receive,
// decompress, write) so that each runs in its own goroutine, a bounded
// number of chunks ahead of the next.
package readahead

import (
	"io"
	"sync"
)

type chunk struct {
	buf []byte
	err error
}

// Reader reads its source in a goroutine, at most a number of chunks ahead
// of its reader, and returns r's bytes and then r's error as they came.
// Close stops the goroutine and waits for it: r is not read once Close
// returns.
type Reader struct {
	chunks  chan chunk
	free    chan []byte
	stop    chan struct{}
	done    sync.WaitGroup
	stopped sync.Once

	cur []byte // the chunk being read, and how far
	off int
	err error
}

// New starts reading r into chunks of chunkSize bytes, at most ahead
// chunks ahead of the reader (and one more being filled): the memory it
// holds is (ahead+1) × chunkSize.
func New(r io.Reader, chunkSize, ahead int) *Reader {
	ra := &Reader{chunks: make(chan chunk, ahead), free: make(chan []byte, ahead+1), stop: make(chan struct{})}
	for range ahead + 1 {
		ra.free <- make([]byte, chunkSize)
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

func (ra *Reader) Read(p []byte) (int, error) {
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
func (ra *Reader) Close() {
	ra.stopped.Do(func() { close(ra.stop) })
	ra.done.Wait()
}
