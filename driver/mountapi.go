package driver

import (
	"errors"
	"fmt"

	"golang.org/x/sys/unix"
)

// MountAPI selects how the driver makes read-only bind mounts and finds
// mount points. The zero value is MountAPIAuto.
type MountAPI string

const (
	// MountAPIAuto uses the newest API the running kernel offers, detected once
	// at start-up.
	MountAPIAuto MountAPI = "auto"
	// MountAPILegacy forces the calls every supported kernel (4.18 on) has:
	// mount(2) only, and mount points found in /proc/self/mountinfo.
	MountAPILegacy MountAPI = "legacy"
)

// ParseMountAPI checks a configured value; "" means auto.
func ParseMountAPI(s string) (MountAPI, error) {
	switch MountAPI(s) {
	case "", MountAPIAuto:
		return MountAPIAuto, nil
	case MountAPILegacy:
		return MountAPILegacy, nil
	}
	return "", fmt.Errorf("%q: must be auto or legacy", s)
}

// KernelMountFeatures is what the kernel offers for mounting, as probed by
// DetectKernelMountFeatures.
type KernelMountFeatures struct {
	// MountFD is the new mount API (open_tree, mount_setattr, move_mount;
	// Linux 5.12): a bind mount is made read-only before it is attached.
	MountFD bool
	// StatxMountRoot is statx's STATX_ATTR_MOUNT_ROOT (Linux 5.8): a mount
	// point is recognised without reading the mount table, also a bind
	// mount from the same filesystem.
	StatxMountRoot bool
}

// DetectKernelMountFeatures probes the running kernel with harmless calls:
// invalid arguments give EBADF or EINVAL where a call exists and ENOSYS
// where it does not (or where a seccomp profile hides it).
func DetectKernelMountFeatures() KernelMountFeatures {
	var f KernelMountFeatures
	_, err := unix.OpenTree(-1, "", 0)
	openTree := !errors.Is(err, unix.ENOSYS)
	err = unix.MountSetattr(-1, "", 0, &unix.MountAttr{})
	setattr := !errors.Is(err, unix.ENOSYS)
	err = unix.MoveMount(-1, "", -1, "", 0)
	move := !errors.Is(err, unix.ENOSYS)
	f.MountFD = openTree && setattr && move
	var stx unix.Statx_t
	if unix.Statx(unix.AT_FDCWD, "/", unix.AT_SYMLINK_NOFOLLOW|unix.AT_STATX_DONT_SYNC, 0, &stx) == nil {
		f.StatxMountRoot = stx.Attributes_mask&unix.STATX_ATTR_MOUNT_ROOT != 0
	}
	return f
}

// String describes the features for the start-up log.
func (f KernelMountFeatures) String() string {
	return fmt.Sprintf("open_tree/mount_setattr/move_mount=%t statx mount root=%t", f.MountFD, f.StatxMountRoot)
}
