// Package integration tests the node driver with real overlay and bind
// mounts (as root) against the fake tenant.
package integration

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/container-storage-interface/spec/lib/go/csi"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"k8s.io/mount-utils"

	"github.com/oneagent-csi/oneagent-csi/api"
	"github.com/oneagent-csi/oneagent-csi/driver"
	"github.com/oneagent-csi/oneagent-csi/provisioner"
	"github.com/oneagent-csi/oneagent-csi/storage"
	"github.com/oneagent-csi/oneagent-csi/test/faketenant"
	"github.com/oneagent-csi/oneagent-csi/test/harness"
)

func mountOf(t *testing.T, target string) (mount.MountInfo, bool) {
	t.Helper()
	mis, err := mount.ParseMountInfo("/proc/self/mountinfo")
	if err != nil {
		t.Fatal(err)
	}
	for _, m := range mis {
		if m.MountPoint == target {
			return m, true
		}
	}
	return mount.MountInfo{}, false
}

func hasOption(opts []string, o string) bool {
	for _, x := range opts {
		if x == o {
			return true
		}
	}
	return false
}

func TestPublishServesAgentReadOnly(t *testing.T) {
	harness.RequireRoot(t)
	n := harness.Start(t, harness.Config{})
	ctx := harness.Ctx(t)
	target := harness.Target(n.TargetRoot, "1")
	if err := os.MkdirAll(filepath.Dir(target), 0o750); err != nil {
		t.Fatal(err)
	}
	if _, err := n.Node.NodePublishVolume(ctx, harness.PublishRequest("vol-1", target, nil)); err != nil {
		t.Fatal(err)
	}
	lib := filepath.Join(target, "agent/lib64/liboneagentproc.so")
	if _, err := os.Stat(lib); err != nil {
		t.Fatalf("agent library not visible at the target: %v", err)
	}
	// The driver's own record files stay out of what pods see.
	for _, name := range harness.DirNames(t, target) {
		if strings.HasPrefix(name, ".oneagent-csi") || name == "tree" {
			t.Errorf("the pod's mount shows the driver's %s", name)
		}
	}
	conf, err := os.ReadFile(filepath.Join(target, "agent/conf/ruxitagentproc.conf"))
	if err != nil || !strings.Contains(string(conf), "tenantToken fake-tenant-token-1") {
		t.Fatalf("tenant config not merged into the served conf: %v\n%s", err, conf)
	}
	for _, p := range []string{filepath.Join(target, "new-file"), lib} {
		f, err := os.OpenFile(p, os.O_WRONLY|os.O_CREATE, 0o644)
		if err == nil {
			f.Close()
			t.Fatalf("write to %s succeeded on a read-only volume", p)
		}
		if !errors.Is(err, syscall.EROFS) {
			t.Errorf("write to %s: %v, want EROFS", p, err)
		}
	}
	m, ok := mountOf(t, target)
	if !ok || m.FsType != "overlay" || !hasOption(m.MountOptions, "ro") {
		t.Fatalf("mount at target = %+v, want a read-only overlay", m)
	}
	// Idempotent: the same request again is OK and stacks nothing.
	if _, err := n.Node.NodePublishVolume(ctx, harness.PublishRequest("vol-1", target, nil)); err != nil {
		t.Fatal(err)
	}
	rec, err := n.Index.GetVolume("vol-1")
	if err != nil || rec.State != storage.VolumePublished || rec.PodName != "app-vol-1" || rec.ArtifactID == "" {
		t.Fatalf("volume record = %+v, %v", rec, err)
	}

	if _, err := n.Node.NodeUnpublishVolume(ctx, &csi.NodeUnpublishVolumeRequest{VolumeId: "vol-1", TargetPath: target}); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(target); !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("target still exists after unpublish: %v", err)
	}
	if _, ok := mountOf(t, target); ok {
		t.Fatal("target still mounted after unpublish")
	}
	if _, err := n.Index.GetVolume("vol-1"); !errors.Is(err, storage.ErrNotFound) {
		t.Fatalf("record not dropped: %v", err)
	}
	// Unpublish again: idempotent.
	if _, err := n.Node.NodeUnpublishVolume(ctx, &csi.NodeUnpublishVolumeRequest{VolumeId: "vol-1", TargetPath: target}); err != nil {
		t.Fatal(err)
	}
}

// A writable volume's writes land in its own upper layer, capped at the
// tenant's writableSize (a tmpfs: writes beyond it fail with ENOSPC), and
// unpublish leaves no mount and no dir.
func TestWritableOverlay(t *testing.T) {
	harness.RequireRoot(t)
	n := harness.Start(t, harness.Config{Provisioner: func(o *provisioner.Options) {
		o.Tenants[0].AllowWritable, o.Tenants[0].WritableSize = true, "2Mi"
	}})
	ctx := harness.Ctx(t)
	target := harness.Target(n.TargetRoot, "w")
	req := harness.PublishRequest("vol-w", target, map[string]string{"writable": "true"})
	req.Readonly = false
	if _, err := n.Node.NodePublishVolume(ctx, req); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(target, "agent/scratch"), []byte("x"), 0o644); err != nil {
		t.Fatalf("write to writable overlay: %v", err)
	}
	upper := n.Layout.Abs(n.Layout.VolumeUpper("vol-w"))
	if _, err := os.Stat(filepath.Join(upper, "agent/scratch")); err != nil {
		t.Fatalf("write did not land in the per-volume upper dir: %v", err)
	}
	err := os.WriteFile(filepath.Join(target, "agent/big"), make([]byte, 4<<20), 0o644)
	if !errors.Is(err, syscall.ENOSPC) {
		t.Fatalf("writing 4 MiB into a 2 MiB writable layer: %v, want ENOSPC", err)
	}
	layer := n.Layout.Abs(n.Layout.Volume("vol-w"))
	if m, ok := mountOf(t, layer); !ok || m.FsType != "tmpfs" {
		t.Fatalf("the writable layer is not a size-limited tmpfs: %+v", m)
	}
	if _, err := n.Node.NodeUnpublishVolume(ctx, &csi.NodeUnpublishVolumeRequest{VolumeId: "vol-w", TargetPath: target}); err != nil {
		t.Fatal(err)
	}
	if _, ok := mountOf(t, layer); ok {
		t.Fatal("the writable layer is still mounted after unpublish")
	}
	if _, err := os.Stat(layer); !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("per-volume dir left behind: %v", err)
	}
}

func TestHostModeAllowList(t *testing.T) {
	harness.RequireRoot(t)
	n := harness.Start(t, harness.Config{Driver: func(o *driver.Options) {
		o.HostAllow = []driver.HostAllowRule{{Namespace: "dynatrace", ServiceAccount: "oneagent"}}
	}})
	ctx := harness.Ctx(t)
	target := harness.Target(n.TargetRoot, "host")
	req := harness.PublishRequest("vol-h", target, map[string]string{"mode": "host"})
	_, err := n.Node.NodePublishVolume(ctx, req)
	if status.Code(err) != codes.PermissionDenied {
		t.Fatalf("host mode from namespace default: %v, want PermissionDenied", err)
	}
	if _, serr := os.Stat(target); !errors.Is(serr, os.ErrNotExist) {
		t.Errorf("a refused publish left the target behind")
	}
	req.VolumeContext["csi.storage.k8s.io/pod.namespace"] = "dynatrace"
	req.VolumeContext["csi.storage.k8s.io/serviceAccount.name"] = "oneagent"
	if _, err := n.Node.NodePublishVolume(ctx, req); err != nil {
		t.Fatal(err)
	}
	m, ok := mountOf(t, target)
	if !ok || !hasOption(m.MountOptions, "ro") {
		t.Fatalf("host mount = %+v, want read-only bind", m)
	}
	if err := os.WriteFile(filepath.Join(target, "x"), nil, 0o644); !errors.Is(err, syscall.EROFS) {
		t.Fatalf("write to read-only host volume: %v, want EROFS", err)
	}
	if _, err := n.Node.NodeUnpublishVolume(ctx, &csi.NodeUnpublishVolumeRequest{VolumeId: "vol-h", TargetPath: target}); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(target); !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("target left behind: %v", err)
	}
}

// allowWritable lets the test tenant's volumes be writable (off by default).
func allowWritable(o *provisioner.Options) { o.Tenants[0].AllowWritable = true }

// failedOpenEmpty checks that target is an empty read-only dir and the
// record says failedOpen with a reason containing want.
func failedOpenEmpty(t *testing.T, n *harness.Node, volumeID, target, want string) {
	t.Helper()
	entries, err := os.ReadDir(target)
	if err != nil || len(entries) != 0 {
		t.Fatalf("fail-open target = %v, %v; want an empty dir", entries, err)
	}
	if err := os.WriteFile(filepath.Join(target, "x"), nil, 0o644); !errors.Is(err, syscall.EROFS) {
		t.Fatalf("fail-open dir is writable: %v", err)
	}
	rec, err := n.Index.GetVolume(volumeID)
	if err != nil || rec.State != storage.VolumeFailedOpen || !strings.Contains(rec.Reason, want) {
		t.Fatalf("record = %+v, %v; want failedOpen with a reason containing %q", rec, err, want)
	}
}

// Invalid attributes in app mode fail open at the first attempt (no retry
// can fix them), naming the field in the record; host mode refuses them.
func TestInvalidAttributesFailOpenAtOnce(t *testing.T) {
	harness.RequireRoot(t)
	n := harness.Start(t, harness.Config{})
	ctx := harness.Ctx(t)
	tests := []struct {
		attrs map[string]string
		field string
	}{
		{map[string]string{"mode": "sidecar"}, "mode"},
		{map[string]string{"dynakube": "Not_A_Label"}, "dynakube"},
		{map[string]string{"tenant": "a", "dynakube": "b"}, "tenant"},
		{map[string]string{"version": "newest"}, "version"},
		{map[string]string{"retryTimeout": "soon"}, "retryTimeout"},
		{map[string]string{"writable": "yes"}, "writable"},
		// An annotation typo, or injector and node configs out of step.
		{map[string]string{"dynakube": "prdo"}, "prdo"},
	}
	for i, tc := range tests {
		t.Run(tc.field, func(t *testing.T) {
			id := fmt.Sprintf("vol-bad-%d", i)
			target := harness.Target(n.TargetRoot, id)
			if _, err := n.Node.NodePublishVolume(ctx, harness.PublishRequest(id, target, tc.attrs)); err != nil {
				t.Fatalf("first attempt: %v, want fail-open", err)
			}
			failedOpenEmpty(t, n, id, target, tc.field)
			if _, err := n.Node.NodeUnpublishVolume(ctx, &csi.NodeUnpublishVolumeRequest{VolumeId: id, TargetPath: target}); err != nil {
				t.Fatal(err)
			}
		})
	}
	target := harness.Target(n.TargetRoot, "host-bad")
	_, err := n.Node.NodePublishVolume(ctx, harness.PublishRequest("vol-hb", target, map[string]string{"mode": "host", "writable": "yes"}))
	if status.Code(err) != codes.InvalidArgument || !strings.Contains(err.Error(), "writable") {
		t.Fatalf("host mode with an invalid attribute: %v, want InvalidArgument naming writable", err)
	}
	req := harness.PublishRequest("vol-bad", target, nil)
	req.VolumeCapability = &csi.VolumeCapability{AccessType: &csi.VolumeCapability_Block{Block: &csi.VolumeCapability_BlockVolume{}}}
	if _, err := n.Node.NodePublishVolume(ctx, req); status.Code(err) != codes.InvalidArgument || !strings.Contains(err.Error(), "block") {
		t.Fatalf("block capability: %v", err)
	}
	if _, serr := os.Stat(target); !errors.Is(serr, os.ErrNotExist) {
		t.Errorf("a refused request left the target behind")
	}
}

// A failing overlay mount (here ENOSPC creating the writable layer) is retried
// like any other error and fails open after retryTimeout.
func TestFailingMountFailsOpenAfterRetryTimeout(t *testing.T) {
	harness.RequireRoot(t)
	n := harness.Start(t, harness.Config{Provisioner: allowWritable})
	ctx := harness.Ctx(t)
	// No room for the volume's own dir.
	volumes := n.Layout.Abs(n.Layout.VolumesDir())
	if err := syscall.Mount("tmpfs", volumes, "tmpfs", 0, "nr_inodes=1,size=64k"); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = syscall.Unmount(volumes, syscall.MNT_DETACH) })
	target := harness.Target(n.TargetRoot, "nospc")
	req := harness.PublishRequest("vol-nospc", target, map[string]string{"writable": "true", "retryTimeout": "1s"})
	req.Readonly = false
	_, err := n.Node.NodePublishVolume(ctx, req)
	if err == nil || !strings.Contains(err.Error(), "no space left") {
		t.Fatalf("first attempt: %v, want the ENOSPC error (kubelet retries)", err)
	}
	rec, err := n.Index.GetVolume("vol-nospc")
	if err != nil || rec.State != storage.VolumePending || rec.FirstAttempt.IsZero() {
		t.Fatalf("first attempt not recorded: %+v, %v", rec, err)
	}
	harness.Eventually(t, 10*time.Second, "fail-open", func() bool {
		_, err := n.Node.NodePublishVolume(ctx, req)
		return err == nil
	})
	failedOpenEmpty(t, n, "vol-nospc", target, "no space left")
	if _, err := n.Node.NodeUnpublishVolume(ctx, &csi.NodeUnpublishVolumeRequest{VolumeId: "vol-nospc", TargetPath: target}); err != nil {
		t.Fatal(err)
	}
}

func TestConcurrentPublishesOfUncachedVersionDownloadOnce(t *testing.T) {
	harness.RequireRoot(t)
	n := harness.Start(t, harness.Config{Tenant: faketenant.Options{ModuleSize: 4 << 20}})
	ctx := harness.Ctx(t)
	const count = 200
	var wg sync.WaitGroup
	errs := make(chan error, count)
	for i := range count {
		wg.Add(1)
		go func() {
			defer wg.Done()
			id := "vol-c-" + strconv.Itoa(i)
			target := harness.Target(n.TargetRoot, id)
			// Retry non-final codes as kubelet does.
			for {
				_, err := n.Node.NodePublishVolume(ctx, harness.PublishRequest(id, target, nil))
				if c := status.Code(err); c == codes.Unavailable || c == codes.Aborted {
					time.Sleep(20 * time.Millisecond)
					continue
				}
				errs <- err
				return
			}
		}()
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		if err != nil {
			t.Fatal(err)
		}
	}
	if d := n.Tenant.Requests(faketenant.RouteDownload); d != 1 {
		t.Fatalf("%d downloads for %d concurrent publishes, want 1", d, count)
	}
	vols, _ := n.Index.ListVolumes()
	if len(vols) != count {
		t.Fatalf("%d volume records, want %d", len(vols), count)
	}
}

func TestTenantDownFailsOpenAfterRetryTimeout(t *testing.T) {
	harness.RequireRoot(t)
	n := harness.Start(t, harness.Config{Driver: func(o *driver.Options) { o.PublishWait = 200 * time.Millisecond }})
	ctx := harness.Ctx(t)
	n.Tenant.SetFaults(faketenant.Fault{Kind: faketenant.FaultStatus})
	target := harness.Target(n.TargetRoot, "fo")
	req := harness.PublishRequest("vol-fo", target, map[string]string{"retryTimeout": "1s"})
	_, err := n.Node.NodePublishVolume(ctx, req)
	if c := status.Code(err); c != codes.Unavailable {
		t.Fatalf("first attempt with the tenant down: %v, want Unavailable (kubelet retries)", err)
	}
	if _, serr := os.Stat(target); !errors.Is(serr, os.ErrNotExist) {
		t.Errorf("a failed attempt left the target behind")
	}
	rec, err := n.Index.GetVolume("vol-fo")
	if err != nil || rec.State != storage.VolumePending {
		t.Fatalf("pending record = %+v, %v", rec, err)
	}
	harness.Eventually(t, 10*time.Second, "fail-open", func() bool {
		_, err := n.Node.NodePublishVolume(ctx, req)
		return err == nil
	})
	entries, err := os.ReadDir(target)
	if err != nil || len(entries) != 0 {
		t.Fatalf("fail-open target = %v, %v; want an empty dir", entries, err)
	}
	if err := os.WriteFile(filepath.Join(target, "x"), nil, 0o644); !errors.Is(err, syscall.EROFS) {
		t.Fatalf("fail-open dir is writable: %v", err)
	}
	rec, _ = n.Index.GetVolume("vol-fo")
	if rec.State != storage.VolumeFailedOpen || !strings.Contains(rec.Reason, "503") {
		t.Fatalf("record = %+v, want failedOpen with the reason", rec)
	}
	if _, err := n.Node.NodeUnpublishVolume(ctx, &csi.NodeUnpublishVolumeRequest{VolumeId: "vol-fo", TargetPath: target}); err != nil {
		t.Fatal(err)
	}
}

// A version the tenant does not have fails open at once; a refused token
// may be fixed by rotating the Secret, so it is retried (FailedPrecondition)
// until retryTimeout.
func TestPermanentTenantErrors(t *testing.T) {
	harness.RequireRoot(t)
	n := harness.Start(t, harness.Config{})
	ctx := harness.Ctx(t)
	target := harness.Target(n.TargetRoot, "perm")
	if _, err := n.Node.NodePublishVolume(ctx, harness.PublishRequest("vol-p", target, map[string]string{"version": "1.1.1.20200101-000000"})); err != nil {
		t.Fatalf("unknown version: %v, want fail-open at once", err)
	}
	failedOpenEmpty(t, n, "vol-p", target, "404")
	if _, err := n.Node.NodeUnpublishVolume(ctx, &csi.NodeUnpublishVolumeRequest{VolumeId: "vol-p", TargetPath: target}); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(n.TenantConf.TokenFile, []byte("wrong"), 0o600); err != nil {
		t.Fatal(err)
	}
	_, err := n.Node.NodePublishVolume(ctx, harness.PublishRequest("vol-p2", target, map[string]string{"version": faketenant.DefaultVersions[0]}))
	if status.Code(err) != codes.FailedPrecondition || !strings.Contains(err.Error(), "401") || !strings.Contains(err.Error(), `"prod"`) {
		t.Fatalf("wrong token: %v, want FailedPrecondition naming the tenant and 401", err)
	}
}

func TestRetriesThenSuccess(t *testing.T) {
	harness.RequireRoot(t)
	n := harness.Start(t, harness.Config{})
	ctx := harness.Ctx(t)
	n.Tenant.SetFaults(faketenant.Fault{Kind: faketenant.FaultStatus, Count: 2})
	target := harness.Target(n.TargetRoot, "retry")
	if _, err := n.Node.NodePublishVolume(ctx, harness.PublishRequest("vol-r", target, nil)); err != nil {
		t.Fatalf("publish after two 503s: %v", err)
	}
	if _, err := os.Stat(filepath.Join(target, "agent/lib64/liboneagentproc.so")); err != nil {
		t.Fatal(err)
	}
}

func TestBusyTargetIsAborted(t *testing.T) {
	harness.RequireRoot(t)
	n := harness.Start(t, harness.Config{
		Tenant: faketenant.Options{},
		Driver: func(o *driver.Options) { o.PublishWait = 2 * time.Second },
	})
	ctx := harness.Ctx(t)
	n.Tenant.SetFaults(faketenant.Fault{Kind: faketenant.FaultStall, Route: faketenant.RouteDownload, Stall: 3 * time.Second, Count: 1})
	target := harness.Target(n.TargetRoot, "busy")
	first := make(chan error, 1)
	go func() {
		_, err := n.Node.NodePublishVolume(ctx, harness.PublishRequest("vol-b", target, nil))
		first <- err
	}()
	// Wait until the first call is inside the download, then collide.
	harness.Eventually(t, 5*time.Second, "download to start", func() bool { return n.Tenant.Requests(faketenant.RouteDownload) > 0 })
	_, err := n.Node.NodePublishVolume(ctx, harness.PublishRequest("vol-b", target, nil))
	if status.Code(err) != codes.Aborted {
		t.Fatalf("second publish on a busy target: %v, want Aborted", err)
	}
	// Other volumes are not blocked by the running download's lock.
	other := harness.Target(n.TargetRoot, "other")
	_, err = n.Node.NodeUnpublishVolume(ctx, &csi.NodeUnpublishVolumeRequest{VolumeId: "x", TargetPath: other})
	if err != nil {
		t.Fatalf("unpublish of another target blocked: %v", err)
	}
	if err := <-first; status.Code(err) != codes.Unavailable {
		t.Fatalf("first publish: %v, want Unavailable while the download runs", err)
	}
}

// A symlink at the target is never followed: publish refuses it, and
// unpublish removes the link without touching the mount it points at.
func TestSymlinkTargetIsNeverFollowed(t *testing.T) {
	harness.RequireRoot(t)
	n := harness.Start(t, harness.Config{})
	ctx := harness.Ctx(t)
	elsewhere := t.TempDir()
	if err := syscall.Mount("tmpfs", elsewhere, "tmpfs", 0, "size=64k"); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = syscall.Unmount(elsewhere, syscall.MNT_DETACH) })
	target := harness.Target(n.TargetRoot, "link")
	if err := os.MkdirAll(filepath.Dir(target), 0o750); err != nil {
		t.Fatal(err)
	}
	if err := os.Symlink(elsewhere, target); err != nil {
		t.Fatal(err)
	}
	_, err := n.Node.NodePublishVolume(ctx, harness.PublishRequest("vol-link", target, nil))
	if status.Code(err) != codes.InvalidArgument || !strings.Contains(err.Error(), "symlink") {
		t.Fatalf("publish at a symlink: %v, want InvalidArgument naming the symlink", err)
	}
	if _, err := n.Node.NodeUnpublishVolume(ctx, &csi.NodeUnpublishVolumeRequest{VolumeId: "vol-link", TargetPath: target}); err != nil {
		t.Fatalf("unpublish of a symlink: %v", err)
	}
	if _, ok := mountOf(t, elsewhere); !ok {
		t.Fatal("unpublish followed the symlink and unmounted what it points at")
	}
	if _, err := os.Lstat(target); !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("the symlink is still there: %v", err)
	}
}

// A volume that lists its pod's containers serves each one's container.conf
// at api.ContainerConfRelativePath, whether it serves the agent or fails open
// (the app containers' subPath mounts of the file must always find it), from
// a tmpfs of its own that unpublish removes.
func TestContainerConfigurationIsServedWithTheVolume(t *testing.T) {
	harness.RequireRoot(t)
	n := harness.Start(t, harness.Config{})
	ctx := harness.Ctx(t)
	tests := []struct {
		name  string
		attrs map[string]string
		agent bool
	}{
		{"with the agent", nil, true},
		{"failed open", map[string]string{"dynakube": "prdo"}, false},
	}
	for i, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			id := fmt.Sprintf("vol-conf-%d", i)
			target := harness.Target(n.TargetRoot, id)
			attrs := map[string]string{api.AttrContainers: "shop=registry.example.com/shop:1.0,cart=cart:2"}
			for k, v := range tc.attrs {
				attrs[k] = v
			}
			if _, err := n.Node.NodePublishVolume(ctx, harness.PublishRequest(id, target, attrs)); err != nil {
				t.Fatal(err)
			}
			conf, err := os.ReadFile(filepath.Join(target, api.ContainerConfRelativePath("shop")))
			want := "[container]\ncontainerName shop\nimageName registry.example.com/shop:1.0\nk8s_fullpodname app-" + id +
				"\nk8s_poduid uid-" + id + "\nk8s_containername shop\nk8s_namespace default\nk8s_node_name test-node\n"
			if err != nil || string(conf) != want {
				t.Fatalf("container.conf of shop at the target: %v\n%s", err, conf)
			}
			if _, err := os.Stat(filepath.Join(target, api.ContainerConfRelativePath("cart"))); err != nil {
				t.Fatal(err)
			}
			_, err = os.Stat(filepath.Join(target, api.AgentLibraryRelativePath))
			if got := err == nil; got != tc.agent {
				t.Fatalf("agent library at the target: %v, want present=%v", err, tc.agent)
			}
			for _, p := range []string{filepath.Join(target, api.ContainerConfRelativePath("shop")), filepath.Join(target, "x")} {
				if err := os.WriteFile(p, nil, 0o644); !errors.Is(err, syscall.EROFS) {
					t.Fatalf("write %s: %v, want EROFS", p, err)
				}
			}
			layer := n.Layout.Abs(n.Layout.Volume(id))
			if m, ok := mountOf(t, layer); !ok || m.FsType != "tmpfs" {
				t.Fatalf("the volume's layers are not on a tmpfs: %+v", m)
			}
			if _, err := n.Node.NodeUnpublishVolume(ctx, &csi.NodeUnpublishVolumeRequest{VolumeId: id, TargetPath: target}); err != nil {
				t.Fatal(err)
			}
			if _, ok := mountOf(t, layer); ok {
				t.Fatal("the volume's tmpfs is still mounted after unpublish")
			}
			if _, err := os.Stat(layer); !errors.Is(err, os.ErrNotExist) {
				t.Fatalf("per-volume dir left behind: %v", err)
			}
		})
	}
}
