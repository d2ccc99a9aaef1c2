package driver

import (
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"strings"

	"golang.org/x/sys/unix"
	"k8s.io/mount-utils"
)

// SyscallMounter mounts and unmounts with system calls instead of exec'ing
// mount(8), which costs milliseconds per call and needs util-linux in the
// image. It works on every kernel from 4.18 on and picks the mount API at
// construction (see MountAPI).
//
// Every mount it makes is read-only (when asked) in the same step that
// attaches it, so every copy that propagates to another mount namespace is
// read-only too; a bind followed by remount,ro would leave the propagated
// copies writable (DESIGN §3). Overlays get MS_RDONLY in the mount call. Binds
// are cloned with open_tree, given their flags with mount_setattr and attached
// with move_mount where the kernel has them (5.12+); on older kernels (or
// MountAPILegacy) the source is first bound at a private staging point inside
// StagingDir, remounted with the flags there, and that mount is bound to the
// target: a bind copies the flags of the mount it clones.
type SyscallMounter struct {
	mount.Interface
	opts     SyscallMounterOptions
	features KernelMountFeatures
	mountFD  bool
	statx    bool
}

// SyscallMounterOptions configure a SyscallMounter.
type SyscallMounterOptions struct {
	// API forces the legacy calls; default MountAPIAuto.
	API MountAPI
	// StagingDir is an absolute dir on which binds are staged on the legacy
	// path (the data dir's tmp/; start-up reconcile unmounts what a crash left
	// there). Required for bind mounts on the legacy path.
	StagingDir string
	// MountInfoPath is the mount table read where statx cannot tell a mount
	// point. Default /proc/self/mountinfo.
	MountInfoPath string
}

// NewSyscallMounter returns the production mounter.
func NewSyscallMounter(opts SyscallMounterOptions) *SyscallMounter {
	if opts.API == "" {
		opts.API = MountAPIAuto
	}
	if opts.MountInfoPath == "" {
		opts.MountInfoPath = "/proc/self/mountinfo"
	}
	m := &SyscallMounter{Interface: mount.New(""), opts: opts, features: DetectKernelMountFeatures()}
	if opts.API == MountAPIAuto {
		m.mountFD, m.statx = m.features.MountFD, m.features.StatxMountRoot
	}
	return m
}

// Describe says which calls the mounter uses, for the start-up log.
func (m *SyscallMounter) Describe() (bindAPI, mountPointCheck string) {
	bindAPI, mountPointCheck = "mount(2) with a read-only staging bind", "/proc/self/mountinfo"
	if m.mountFD {
		bindAPI = "open_tree + mount_setattr + move_mount"
	}
	if m.statx {
		mountPointCheck = "statx mount root"
	}
	return bindAPI, mountPointCheck
}

// Features is what the running kernel offers.
func (m *SyscallMounter) Features() KernelMountFeatures { return m.features }

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
		if m.mountFD {
			return bindMountFD(source, target, flags)
		}
		return m.bindMountStaged(source, target, flags)
	}
	if err := unix.Mount(source, target, fstype, flags, strings.Join(data, ",")); err != nil {
		return fmt.Errorf("mount %s %s at %s (%v): %w", fstype, source, target, options, err)
	}
	return nil
}

// bindMountFD clones source, sets the flags on the detached clone and only
// then attaches it at target.
func bindMountFD(source, target string, flags uintptr) error {
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

// bindMountStaged binds source at a fresh dir in StagingDir, remounts that
// with the flags (ro, nosuid, nodev, noexec), binds the staged mount to target
// (the clone carries the flags from its first moment) and detaches the
// staging mount again. Only the staging mount is ever writable, and it lives
// in the data dir's tmp/, which no pod and no kubelet path sees.
func (m *SyscallMounter) bindMountStaged(source, target string, flags uintptr) error {
	extra := flags &^ unix.MS_BIND
	if extra == 0 {
		if err := unix.Mount(source, target, "", unix.MS_BIND, ""); err != nil {
			return fmt.Errorf("bind %s at %s: %w", source, target, err)
		}
		return nil
	}
	if m.opts.StagingDir == "" {
		return fmt.Errorf("bind %s at %s: the legacy mount path needs a staging dir", source, target)
	}
	stage, err := os.MkdirTemp(m.opts.StagingDir, "bind-")
	if err != nil {
		return fmt.Errorf("bind %s: staging dir: %w", source, err)
	}
	defer os.Remove(stage)
	if err := unix.Mount(source, stage, "", unix.MS_BIND, ""); err != nil {
		return fmt.Errorf("bind %s at staging %s: %w", source, stage, err)
	}
	defer func() { _ = unix.Unmount(stage, unix.MNT_DETACH|unix.UMOUNT_NOFOLLOW) }()
	if err := unix.Mount("", stage, "", unix.MS_REMOUNT|unix.MS_BIND|extra, ""); err != nil {
		return fmt.Errorf("bind %s: remount staging %s with flags %#x: %w", source, stage, extra, err)
	}
	if err := unix.Mount(stage, target, "", unix.MS_BIND, ""); err != nil {
		return fmt.Errorf("bind %s at %s: %w", source, target, err)
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

// Unmount implements mount.Interface. It never follows a symlink at target,
// and it is not an error when target is not a mount point or does not exist.
// A corrupted mount point (ENOTCONN, ESTALE) is detached.
func (m *SyscallMounter) Unmount(target string) error {
	err := unix.Unmount(target, unix.UMOUNT_NOFOLLOW)
	if mount.IsCorruptedMnt(err) {
		err = unix.Unmount(target, unix.UMOUNT_NOFOLLOW|unix.MNT_DETACH)
	}
	if err == nil || errors.Is(err, unix.EINVAL) || errors.Is(err, os.ErrNotExist) {
		return nil
	}
	return fmt.Errorf("unmount %s: %w", target, err)
}

// IsLikelyNotMountPoint implements mount.Interface without its weakness:
// mount-utils compares device numbers where statx cannot tell a mount root
// (kernels before 5.8), and a bind mount from the same filesystem then looks
// like a plain dir. This answer is exact: statx's mount-root attribute where
// the kernel has it, else the mount table. A symlink at file is never
// followed (and never a mount point); a corrupted mount point counts as
// mounted so that it gets unmounted. A missing file gives true and an error
// wrapping fs.ErrNotExist, like mount-utils.
func (m *SyscallMounter) IsLikelyNotMountPoint(file string) (bool, error) {
	if m.statx {
		var stx unix.Statx_t
		err := unix.Statx(unix.AT_FDCWD, file, unix.AT_SYMLINK_NOFOLLOW|unix.AT_NO_AUTOMOUNT|unix.AT_STATX_DONT_SYNC, 0, &stx)
		switch {
		case mount.IsCorruptedMnt(err):
			return false, nil
		case errors.Is(err, unix.ENOENT):
			return true, &fs.PathError{Op: "statx", Path: file, Err: fs.ErrNotExist}
		case err == nil && stx.Attributes_mask&unix.STATX_ATTR_MOUNT_ROOT != 0:
			return stx.Attributes&unix.STATX_ATTR_MOUNT_ROOT == 0, nil
		}
	}
	if _, err := os.Lstat(file); err != nil {
		if mount.IsCorruptedMnt(err) {
			return false, nil
		}
		return true, err
	}
	mounted, err := isMountPointInTable(m.opts.MountInfoPath, file)
	return !mounted, err
}

// IsMountPoint implements mount.Interface.
func (m *SyscallMounter) IsMountPoint(file string) (bool, error) {
	notMnt, err := m.IsLikelyNotMountPoint(file)
	return !notMnt, err
}

// isMountPointInTable reports whether path is a mount point in the mount
// table at mountInfoPath.
func isMountPointInTable(mountInfoPath, path string) (bool, error) {
	mis, err := mount.ParseMountInfo(mountInfoPath)
	if err != nil {
		return false, fmt.Errorf("read mount table: %w", err)
	}
	path = filepath.Clean(path)
	for _, mi := range mis {
		if mi.MountPoint == path {
			return true, nil
		}
	}
	return false, nil
}

// CanSafelySkipMountPointCheck implements mount.Interface: Unmount tolerates
// targets that are not mount points.
func (m *SyscallMounter) CanSafelySkipMountPointCheck() bool { return true }
