package storage

import (
	"errors"

	bolt "go.etcd.io/bbolt"
)

// maxGroup caps how many writes share one commit.
const maxGroup = 512

type commitRequest struct {
	fn   func(*bolt.Tx) error
	done chan error
}

// errIndexClosed is returned by writes after Close.
var errIndexClosed = errors.New("index closed")

// group runs fn in a write transaction shared with whatever other writes are
// waiting: a lone write commits at once (no batching delay, unlike
// bolt.DB.Batch), while a burst of writes arriving during a commit's fsync
// shares the next commit. fn may run more than once and must be idempotent.
func (x *Index) group(fn func(*bolt.Tx) error) error {
	if x.commits == nil {
		return x.db.Update(fn) // read-only or not started: plain transaction
	}
	req := commitRequest{fn: fn, done: make(chan error, 1)}
	select {
	case x.commits <- req:
	case <-x.stopped:
		return errIndexClosed
	}
	return <-req.done
}

func (x *Index) startGroupCommit() {
	x.commits = make(chan commitRequest)
	x.stop = make(chan struct{})
	x.stopped = make(chan struct{})
	go x.commitLoop()
}

func (x *Index) stopGroupCommit() {
	if x.stop == nil {
		return
	}
	close(x.stop)
	<-x.stopped
}

func (x *Index) commitLoop() {
	defer close(x.stopped)
	batch := make([]commitRequest, 0, maxGroup)
	for {
		select {
		case <-x.stop:
			return
		case req := <-x.commits:
			batch = append(batch[:0], req)
		}
	drain:
		for len(batch) < maxGroup {
			select {
			case req := <-x.commits:
				batch = append(batch, req)
			default:
				break drain
			}
		}
		err := x.db.Update(func(tx *bolt.Tx) error {
			for _, r := range batch {
				if err := r.fn(tx); err != nil {
					return err
				}
			}
			return nil
		})
		if err == nil {
			for _, r := range batch {
				r.done <- nil
			}
			continue
		}
		// One write failed and rolled the group back: run each on its own so
		// that only the failing one reports an error.
		for _, r := range batch {
			r.done <- x.db.Update(r.fn)
		}
	}
}
