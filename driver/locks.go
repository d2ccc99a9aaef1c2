package driver

import "sync"

// targetLocks serialises operations per target path without a driver-wide
// lock: a second operation on a busy target fails fast (kubelet retries)
// instead of queueing behind a download.
type targetLocks struct {
	m sync.Map
}

// tryLock returns an unlock function, or false when target is busy.
func (l *targetLocks) tryLock(target string) (func(), bool) {
	if _, busy := l.m.LoadOrStore(target, struct{}{}); busy {
		return nil, false
	}
	return func() { l.m.Delete(target) }, true
}
