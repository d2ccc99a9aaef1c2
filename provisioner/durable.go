package provisioner

import (
	"fmt"

	"github.com/spf13/afero"
	"golang.org/x/sys/unix"
)

// syncFilesystem flushes the whole filesystem that holds path (syncfs):
// one call makes every file and dir of an extracted tree durable, where an
// fsync per file would cost a journal commit each for ~15,000 files. On an
// in-memory filesystem it does nothing.
func syncFilesystem(fsys afero.Fs, path string) error {
	f, err := fsys.Open(path)
	if err != nil {
		return err
	}
	defer f.Close()
	if osf := osFile(f); osf != nil {
		if err := unix.Syncfs(int(osf.Fd())); err != nil {
			return fmt.Errorf("syncfs %s: %w", path, err)
		}
	}
	return nil
}

// syncDir makes a rename into dir durable.
func syncDir(fsys afero.Fs, dir string) error {
	f, err := fsys.Open(dir)
	if err != nil {
		return err
	}
	defer f.Close()
	if osf := osFile(f); osf != nil {
		if err := osf.Sync(); err != nil {
			return fmt.Errorf("fsync %s: %w", dir, err)
		}
	}
	return nil
}
