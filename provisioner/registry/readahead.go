package registry

import (
	"io"
	"sync"
)

// Read-ahead between the stages of a layer's install: one goroutine
// receives (TLS, digests) while another decompresses what arrived before,
// and that one runs ahead of the tree writing the files, as `crane export |
// tar -x` runs in two processes. A tar stream is sequential; pipelining its
// stages is the parallelism it has.
//
// Sizes: the decompressed stage holds more (a tree write can stall on the
// disk for a while); the received stage only smooths TLS records into
// what gunzip reads. Both count in the node's RSS (README, Memory).
const (
	readAheadChunk  = 128 << 10
	readAheadChunks = 4

	receivedChunk  = 64 << 10
	receivedChunks = 3
)

type chunk struct {
	buf []byte
	err error
}

// readAhead reads r in a goroutine, at most a number of chunks ahead of
// its reader, and returns r's bytes and then r's error as they came.
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

// newReadAhead starts reading r into chunks of chunkSize bytes, at most
// ahead chunks ahead (and one more being filled).
func newReadAhead(r io.Reader, chunkSize, ahead int) *readAhead {
	ra := &readAhead{chunks: make(chan chunk, ahead), free: make(chan []byte, ahead+1), stop: make(chan struct{})}
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
