package driver

import (
	"errors"
	"fmt"
	"os"
	"strings"

	"golang.org/x/sys/unix"
	"k8s.io/mount-utils"
)

// SyscallMounter mounts and unmounts with system calls instead of exec'ing
// mount(8), which costs milliseconds per call and needs util-linux in the
// image. Listing and mount-point checks come from k8s.io/mount-utils (statx
// based, no mountinfo scan).
//
// A read-only bind ("bind" + "ro") is made read-only before it is attached
// (open_tree + mount_setattr + move_mount), so it is read-only in every mount
// namespace it propagates to; bind followed by remount,ro would leave the
// propagated copies writable (DESIGN §3).
type SyscallMounter struct {
	mount.Interface
}

// NewSyscallMounter returns the production mounter.
func NewSyscallMounter() *SyscallMounter {
	return &SyscallMounter{Interface: mount.New("")}
}

var flagOptions = map[string]uintptr{
	"ro":     unix.MS_RDONLY,
	"rw":     0,
	"bind":   unix.MS_BIND,
	"nosuid": unix.MS_NOSUID,
	"nodev":  unix.MS_NODEV,
	"noexec": unix.MS_NOEXEC,
}

// Mount implements mount.Interface.
func (m *SyscallMounter) Mount(source, target, fstype string, options []string) error {
	var flags uintptr
	var data []string
	for _, o := range options {
		if f, ok := flagOptions[o]; ok {
			flags |= f
			continue
		}
		data = append(data, o)
	}
	if flags&unix.MS_BIND != 0 {
		if len(data) > 0 {
			return fmt.Errorf("mount %s: bind mounts take no data options, got %v", target, data)
		}
		return bindMount(source, target, flags)
	}
	if err := unix.Mount(source, target, fstype, flags, strings.Join(data, ",")); err != nil {
		return fmt.Errorf("mount %s %s at %s (%v): %w", fstype, source, target, options, err)
	}
	return nil
}

func bindMount(source, target string, flags uintptr) error {
	fd, err := unix.OpenTree(unix.AT_FDCWD, source, unix.OPEN_TREE_CLONE|unix.OPEN_TREE_CLOEXEC)
	if err != nil {
		return fmt.Errorf("bind %s: open_tree: %w", source, err)
	}
	defer unix.Close(fd)
	var attr unix.MountAttr
	if flags&unix.MS_RDONLY != 0 {
		attr.Attr_set |= unix.MOUNT_ATTR_RDONLY
	}
	if flags&unix.MS_NOSUID != 0 {
		attr.Attr_set |= unix.MOUNT_ATTR_NOSUID
	}
	if flags&unix.MS_NODEV != 0 {
		attr.Attr_set |= unix.MOUNT_ATTR_NODEV
	}
	if flags&unix.MS_NOEXEC != 0 {
		attr.Attr_set |= unix.MOUNT_ATTR_NOEXEC
	}
	if attr.Attr_set != 0 {
		if err := unix.MountSetattr(fd, "", unix.AT_EMPTY_PATH, &attr); err != nil {
			return fmt.Errorf("bind %s: mount_setattr: %w", source, err)
		}
	}
	if err := unix.MoveMount(fd, "", unix.AT_FDCWD, target, unix.MOVE_MOUNT_F_EMPTY_PATH); err != nil {
		return fmt.Errorf("bind %s at %s: move_mount: %w", source, target, err)
	}
	return nil
}

// MountSensitive implements mount.Interface; this driver has no sensitive options.
func (m *SyscallMounter) MountSensitive(source, target, fstype string, options, sensitive []string) error {
	return m.Mount(source, target, fstype, append(append([]string(nil), options...), sensitive...))
}

// MountSensitiveWithoutSystemd implements mount.Interface.
func (m *SyscallMounter) MountSensitiveWithoutSystemd(source, target, fstype string, options, sensitive []string) error {
	return m.MountSensitive(source, target, fstype, options, sensitive)
}

// MountSensitiveWithoutSystemdWithMountFlags implements mount.Interface.
func (m *SyscallMounter) MountSensitiveWithoutSystemdWithMountFlags(source, target, fstype string, options, sensitive, _ []string) error {
	return m.MountSensitive(source, target, fstype, options, sensitive)
}

// Unmount implements mount.Interface. It is not an error when target is not
// a mount point or does not exist.
func (m *SyscallMounter) Unmount(target string) error {
	err := unix.Unmount(target, 0)
	if err == nil || errors.Is(err, unix.EINVAL) || errors.Is(err, os.ErrNotExist) {
		return nil
	}
	return fmt.Errorf("unmount %s: %w", target, err)
}

// CanSafelySkipMountPointCheck implements mount.Interface: Unmount tolerates
// targets that are not mount points.
func (m *SyscallMounter) CanSafelySkipMountPointCheck() bool { return true }
