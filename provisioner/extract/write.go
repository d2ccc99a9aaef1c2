package extract

import (
	"context"
	"fmt"
	"io"
	"os"
	"sync/atomic"
	"time"

	"github.com/spf13/afero"
	"k8s.io/klog/v2"
)

// logExtractProgress logs how far an extraction is every 5 seconds until
// the returned function is called.
func logExtractProgress(ctx context.Context, done *atomic.Int64, total int) func() {
	stop := make(chan struct{})
	finished := make(chan struct{})
	go func() {
		defer close(finished)
		t := time.NewTicker(5 * time.Second)
		defer t.Stop()
		for {
			select {
			case <-stop:
				return
			case <-t.C:
				n := done.Load()
				klog.FromContext(ctx).Info("extracting", "files", n, "total", total, "percent", fmt.Sprintf("%.0f", 100*float64(n)/float64(max(total, 1))))
			}
		}
	}()
	return func() { close(stop); <-finished }
}

// countingReader adds what it reads to a shared total and fails once the
// total passes the limit.
type countingReader struct {
	r     io.Reader
	total *atomic.Int64
	limit int64
}

func (c countingReader) Read(p []byte) (int, error) {
	n, err := c.r.Read(p)
	if c.total.Add(int64(n)) > c.limit {
		return n, badArchive("extracted size exceeds the limit of %d bytes", c.limit)
	}
	return n, err
}

// symlink creates newname pointing at the relative target. BasePathFs would
// turn the target into an absolute host path, which means nothing inside a
// pod, so the link is made at the jailed real path with the target unchanged
// (the target was checked to stay inside the artifact).
func symlink(fsys afero.Fs, target, newname string) error {
	if b, ok := fsys.(*afero.BasePathFs); ok {
		real, err := b.RealPath(newname)
		if err != nil {
			return err
		}
		return os.Symlink(target, real)
	}
	if l, ok := fsys.(afero.Linker); ok {
		return l.SymlinkIfPossible(target, newname)
	}
	return fmt.Errorf("filesystem %s cannot create symlinks", fsys.Name())
}

// hardLink makes newname another name of the file oldname. On a file
// system without links (in memory) it copies the file.
func hardLink(fsys afero.Fs, oldname, newname string) error {
	switch b := fsys.(type) {
	case *afero.BasePathFs:
		oldReal, err := b.RealPath(oldname)
		if err != nil {
			return err
		}
		newReal, err := b.RealPath(newname)
		if err != nil {
			return err
		}
		return os.Link(oldReal, newReal)
	case *afero.OsFs:
		return os.Link(oldname, newname)
	}
	src, err := fsys.Open(oldname)
	if err != nil {
		return err
	}
	defer src.Close()
	st, err := src.Stat()
	if err != nil {
		return err
	}
	dst, err := fsys.OpenFile(newname, os.O_WRONLY|os.O_CREATE|os.O_EXCL, st.Mode().Perm())
	if err != nil {
		return err
	}
	if _, err := io.Copy(dst, src); err != nil {
		dst.Close()
		return err
	}
	return dst.Close()
}
