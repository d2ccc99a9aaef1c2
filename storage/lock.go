package storage

import (
	"errors"
	"fmt"
	"os"
	"time"

	"golang.org/x/sys/unix"
)

// ErrDataDirInUse: another process holds the data dir.
var ErrDataDirInUse = errors.New("data dir is in use by another oneagent-csi node process")

// dirLock is an exclusive flock on the data dir itself (no lock file to
// leave behind). It is taken before anything in the data dir is touched, so
// a second node process on the same data dir refuses to start instead of
// wiping the first one's staging files; the kernel drops it when the holder
// exits, also on SIGKILL.
type dirLock struct{ f *os.File }

// lockDataDir takes the lock, polling until timeout while a previous process
// (a terminating pod during a rolling update) still holds it.
func lockDataDir(dir string, timeout time.Duration) (*dirLock, error) {
	f, err := os.Open(dir)
	if err != nil {
		return nil, fmt.Errorf("open data dir: %w", err)
	}
	deadline := time.Now().Add(timeout)
	for {
		err := unix.Flock(int(f.Fd()), unix.LOCK_EX|unix.LOCK_NB)
		if err == nil {
			return &dirLock{f: f}, nil
		}
		if !errors.Is(err, unix.EWOULDBLOCK) {
			_ = f.Close()
			return nil, fmt.Errorf("lock data dir %s: %w", dir, err)
		}
		if time.Now().After(deadline) {
			_ = f.Close()
			return nil, fmt.Errorf("%s: %w (waited %v); run one node process per data dir", dir, ErrDataDirInUse, timeout)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

func (l *dirLock) release() {
	if l != nil && l.f != nil {
		_ = l.f.Close()
	}
}
