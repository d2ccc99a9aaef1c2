// Package idleread notices a source that goes silent: a read that waits
// too long without a byte. Only the wait inside a Read counts, so a reader
// that takes its time between reads (a busy disk holding a download back)
// never looks like a stalled sender.
package idleread

import (
	"io"
	"time"
)

// Reader passes reads to its source and calls onIdle, from a timer's
// goroutine, when one Read waits longer than idle. onIdle must make that
// Read return (typically by cancelling the request's context); Reader
// itself does not interrupt it. Not safe for concurrent Reads.
type Reader struct {
	r     io.Reader
	idle  time.Duration
	timer *time.Timer
}

// New returns a Reader of r with idle timeout idle.
func New(r io.Reader, idle time.Duration, onIdle func()) *Reader {
	t := time.AfterFunc(idle, onIdle)
	t.Stop()
	return &Reader{r: r, idle: idle, timer: t}
}

func (r *Reader) Read(p []byte) (int, error) {
	r.timer.Reset(r.idle)
	n, err := r.r.Read(p)
	r.timer.Stop()
	return n, err
}

// Stop makes sure onIdle is not called for a Read that is still waiting.
func (r *Reader) Stop() { r.timer.Stop() }
