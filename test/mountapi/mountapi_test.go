// Package mountapi runs every mount kind of the real node process through
// both mount paths (the kernel's new mount API and the legacy mount(2) path)
// and on an emulated old kernel, from a mount namespace of its own as in the
// DaemonSet, and checks the result from the host's side of the propagation.
package mountapi

import (
	"errors"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"

	"github.com/container-storage-interface/spec/lib/go/csi"
	"golang.org/x/sys/unix"
	"k8s.io/mount-utils"

	"github.com/oneagent-csi/oneagent-csi/provisioner"
	"github.com/oneagent-csi/oneagent-csi/test/faketenant"
	"github.com/oneagent-csi/oneagent-csi/test/harness"
)

// volume is one mount kind.
type volume struct {
	name     string
	attrs    map[string]string
	readOnly bool
	fstype   string // as the host sees it
	probe    string // a path below the target that must exist ("" for an empty dir)
}

var kinds = []volume{
	{name: "app-ro", readOnly: true, fstype: "overlay", probe: "agent/lib64/liboneagentproc.so"},
	{name: "app-rw", attrs: map[string]string{"writable": "true"}, fstype: "overlay", probe: "agent/lib64/liboneagentproc.so"},
	{name: "host-ro", attrs: map[string]string{"mode": "host"}, readOnly: true},
	{name: "host-rw", attrs: map[string]string{"mode": "host"}},
	// An invalid attribute fails open at once: an empty read-only dir.
	{name: "failopen", attrs: map[string]string{"version": "newest"}, readOnly: true},
	// The containers' configuration is one more lower layer, also when the
	// volume fails open.
	{name: "app-conf", attrs: map[string]string{"containers": "shop=shop:1"}, readOnly: true, fstype: "overlay",
		probe: ".containers/shop/container.conf"},
	{name: "failopen-conf", attrs: map[string]string{"containers": "shop=shop:1", "version": "newest"}, readOnly: true,
		fstype: "overlay", probe: ".containers/shop/container.conf"},
}

// mountsAt returns the mounts at target in this (the host's) mount namespace.
func mountsAt(t *testing.T, target string) []mount.MountInfo {
	t.Helper()
	mis, err := mount.ParseMountInfo("/proc/self/mountinfo")
	if err != nil {
		t.Fatal(err)
	}
	var out []mount.MountInfo
	for _, m := range mis {
		if m.MountPoint == target {
			out = append(out, m)
		}
	}
	return out
}

func has(opts []string, o string) bool {
	for _, x := range opts {
		if x == o {
			return true
		}
	}
	return false
}

// sharedDir makes dir a shared mount, as kubelet's root dir is, so that what
// the node process mounts below it in its own namespace propagates here.
func sharedDir(t *testing.T, dir string) {
	t.Helper()
	if err := unix.Mount(dir, dir, "", unix.MS_BIND, ""); err != nil {
		t.Fatal(err)
	}
	if err := unix.Mount("", dir, "", unix.MS_SHARED, ""); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		harness.UnmountAllBelow(t, dir)
		_ = unix.Unmount(dir, unix.MNT_DETACH)
	})
}

func TestEveryMountKindOnEveryPath(t *testing.T) {
	harness.RequireRoot(t)
	variants := []struct {
		name     string
		mountAPI string
		oldKern  bool
		wantLog  string
	}{
		{"auto", "auto", false, "open_tree + mount_setattr + move_mount"},
		{"legacy", "legacy", false, "mount(2) with a read-only staging bind"},
		// A 4.18-5.7 kernel: auto must find the legacy path by itself, and
		// mount points without statx's mount-root attribute.
		{"old kernel", "auto", true, "mount(2) with a read-only staging bind"},
	}
	for _, v := range variants {
		t.Run(v.name, func(t *testing.T) {
			e := harness.NewProcessEnvWithTenant(t, faketenant.Options{}, false, func(t *provisioner.Tenant) { t.AllowWritable = true }, map[string]any{
				"mountAPI":  v.mountAPI,
				"hostAllow": []any{map[string]any{"namespace": "default"}},
			})
			sharedDir(t, e.Targets)
			wrapper := []string{"unshare", "-m", "--propagation", "unchanged"}
			if v.oldKern {
				wrapper = append(wrapper, harness.TestCommand(t, "oldkernel"), "--")
			}
			p := e.StartWith(wrapper...)
			ctx := harness.Ctx(t)
			for _, k := range kinds {
				target := harness.Target(e.Targets, k.name)
				req := harness.PublishRequest(k.name, target, k.attrs)
				req.Readonly = k.readOnly
				// Twice: the second publish must see the mount and stack nothing.
				for i := range 2 {
					if _, err := p.Node.NodePublishVolume(ctx, req); err != nil {
						t.Fatalf("%s: publish #%d: %v", k.name, i+1, err)
					}
				}
				checkServed(t, k, target)
			}
			for _, k := range kinds {
				target := harness.Target(e.Targets, k.name)
				for i := range 2 {
					if _, err := p.Node.NodeUnpublishVolume(ctx, &csi.NodeUnpublishVolumeRequest{VolumeId: k.name, TargetPath: target}); err != nil {
						t.Fatalf("%s: unpublish #%d: %v", k.name, i+1, err)
					}
				}
				if ms := mountsAt(t, target); len(ms) != 0 {
					t.Errorf("%s: still mounted after unpublish: %+v", k.name, ms)
				}
				if _, err := os.Lstat(target); !errors.Is(err, os.ErrNotExist) {
					t.Errorf("%s: target left after unpublish: %v", k.name, err)
				}
			}
			if left := harness.DirNames(t, filepath.Join(e.DataDir, "tmp")); len(left) != 0 {
				t.Errorf("staging left in tmp/: %v", left)
			}
			p.Stop(t)
			log, _ := os.ReadFile(p.Log)
			if !strings.Contains(string(log), v.wantLog) {
				t.Errorf("the start-up log does not name the mount path %q", v.wantLog)
			}
		})
	}
}

// checkServed checks one published volume from the host's side.
func checkServed(t *testing.T, k volume, target string) {
	t.Helper()
	ms := mountsAt(t, target)
	if len(ms) != 1 {
		t.Fatalf("%s: %d mounts at the target seen from the host, want 1: %+v", k.name, len(ms), ms)
	}
	m := ms[0]
	if k.fstype != "" && m.FsType != k.fstype {
		t.Errorf("%s: fstype %s, want %s", k.name, m.FsType, k.fstype)
	}
	for _, o := range []string{"nosuid", "nodev"} {
		if !has(m.MountOptions, o) {
			t.Errorf("%s: mount options %v lack %s", k.name, m.MountOptions, o)
		}
	}
	if got := has(m.MountOptions, "ro"); got != k.readOnly {
		t.Errorf("%s: read-only on the host side = %t, want %t (options %v)", k.name, got, k.readOnly, m.MountOptions)
	}
	if k.probe != "" {
		if _, err := os.Stat(filepath.Join(target, k.probe)); err != nil {
			t.Errorf("%s: %v", k.name, err)
		}
	} else if k.name == "failopen" {
		if names := harness.DirNames(t, target); len(names) != 0 {
			t.Errorf("failed-open volume is not empty: %v", names)
		}
	}
	err := os.WriteFile(filepath.Join(target, "probe-write"), []byte("x"), 0o644)
	switch {
	case k.readOnly && !errors.Is(err, syscall.EROFS):
		t.Errorf("%s: write from the host side: %v, want EROFS", k.name, err)
	case !k.readOnly && err != nil:
		t.Errorf("%s: write to a writable volume: %v", k.name, err)
	}
	_ = os.Remove(filepath.Join(target, "probe-write"))
}
