package provisioner

import (
	"fmt"
	"os"

	"github.com/spf13/afero"
	"golang.org/x/sys/unix"

	"github.com/oneagent-csi/oneagent-csi/internal/diskio"
)

// syncFilesystem flushes the whole filesystem that holds path (syncfs):
// one call makes every file and dir of an extracted tree durable, where an
// fsync per file would cost a journal commit each for ~15,000 files. On an
// in-memory filesystem it does nothing.
func syncFilesystem(fsys afero.Fs, path string) error {
	return withOSFile(fsys, path, "syncfs", func(f *os.File) error { return unix.Syncfs(int(f.Fd())) })
}

// syncDir makes a rename into dir durable.
func syncDir(fsys afero.Fs, dir string) error {
	return withOSFile(fsys, dir, "fsync", (*os.File).Sync)
}

// withOSFile opens path and runs call on the OS file behind it; on an
// in-memory filesystem there is none and it does nothing.
func withOSFile(fsys afero.Fs, path, op string, call func(*os.File) error) error {
	f, err := fsys.Open(path)
	if err != nil {
		return err
	}
	defer f.Close()
	if osf := diskio.OSFile(f); osf != nil {
		if err := call(osf); err != nil {
			return fmt.Errorf("%s %s: %w", op, path, err)
		}
	}
	return nil
}
