package driver

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/container-storage-interface/spec/lib/go/csi"
	"github.com/prometheus/client_golang/prometheus/testutil"
	"github.com/spf13/afero"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"k8s.io/mount-utils"

	"github.com/oneagent-csi/oneagent-csi/api"
	"github.com/oneagent-csi/oneagent-csi/provisioner"
	"github.com/oneagent-csi/oneagent-csi/storage"
)

// fakeProvisioner answers Prepare from fields; unit tests only.
type fakeProvisioner struct {
	mu      sync.Mutex
	err     error
	calls   int
	tenants []string
	// download makes Prepare wait like a running download: until ctx ends,
	// then ErrInProgress.
	download bool
	waiting  int
	// policy replaces the tenant's config (and policy).
	policy *provisioner.Tenant
}

func (f *fakeProvisioner) Prepare(ctx context.Context, tenant, pin string) (provisioner.Prepared, error) {
	f.mu.Lock()
	if f.download {
		f.waiting++
		f.mu.Unlock()
		<-ctx.Done()
		f.mu.Lock()
		f.waiting--
		f.mu.Unlock()
		return provisioner.Prepared{}, provisioner.ErrInProgress
	}
	defer f.mu.Unlock()
	f.calls++
	if f.err != nil {
		return provisioner.Prepared{}, f.err
	}
	return provisioner.Prepared{Tenant: tenant, Version: "1.2.3",
		Artifact: storage.Artifact{ID: strings.Repeat("a", 64)}, Layer: storage.TenantLayer{Tenant: tenant, Rev: "r1-x"},
		ArtifactDir: "artifacts/" + strings.Repeat("a", 64) + "/tree", LayerDir: "tenants/" + tenant + "/r1-x/tree"}, nil
}

func (f *fakeProvisioner) TenantConfig(name string) (provisioner.Tenant, bool) {
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.policy != nil && f.policy.Name == name {
		return *f.policy, true
	}
	return provisioner.Tenant{Name: name}, slices.Contains(f.tenants, name)
}

func (f *fakeProvisioner) EnsureHostDir(tenant string) (string, error) { return "host/" + tenant, nil }

func (f *fakeProvisioner) DefaultTenant() string {
	if len(f.tenants) == 1 {
		return f.tenants[0]
	}
	return ""
}

type unitFixture struct {
	d       *Driver
	mounter *mount.FakeMounter
	prov    *fakeProvisioner
	fs      afero.Fs
	idx     *storage.Index
	now     time.Time
	targets string
}

func newUnit(t *testing.T) *unitFixture {
	t.Helper()
	layout, err := storage.NewLayout("/var/lib/oneagent-csi")
	if err != nil {
		t.Fatal(err)
	}
	idx, err := storage.OpenIndex(filepath.Join(t.TempDir(), "index.db"), time.Second, false)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { idx.Close() })
	f := &unitFixture{mounter: mount.NewFakeMounter(nil), prov: &fakeProvisioner{tenants: []string{"prod"}},
		fs: afero.NewMemMapFs(), idx: idx, now: time.Unix(1_800_000_000, 0), targets: t.TempDir()}
	_ = f.fs.MkdirAll(layout.Tmp(), 0o755)
	f.d, err = New(Options{NodeID: "n1", Layout: layout, Fs: f.fs, Index: idx, Provisioner: f.prov, Mounter: f.mounter,
		KubeletDir: f.targets, Now: func() time.Time { return f.now }})
	if err != nil {
		t.Fatal(err)
	}
	return f
}

// target is a kubelet-shaped target path below the fixture's kubelet dir.
func (f *unitFixture) target(name string) string {
	return filepath.Join(f.targets, "pods", "uid-"+name, "volumes", "kubernetes.io~csi", "oneagent", "mount")
}

func request(id, target string, attrs map[string]string) *csi.NodePublishVolumeRequest {
	vc := map[string]string{"csi.storage.k8s.io/pod.name": "p", "csi.storage.k8s.io/pod.namespace": "ns"}
	for k, v := range attrs {
		vc[k] = v
	}
	return &csi.NodePublishVolumeRequest{VolumeId: id, TargetPath: target, Readonly: true, VolumeContext: vc,
		VolumeCapability: &csi.VolumeCapability{AccessType: &csi.VolumeCapability_Mount{Mount: &csi.VolumeCapability_MountVolume{}}}}
}

func TestPublishValidation(t *testing.T) {
	f := newUnit(t)
	target := f.target("t")
	tests := []struct {
		name  string
		req   *csi.NodePublishVolumeRequest
		field string
	}{
		{"no volume id", &csi.NodePublishVolumeRequest{}, "volume_id"},
		{"no target", &csi.NodePublishVolumeRequest{VolumeId: "v"}, "target_path"},
		{"no capability", &csi.NodePublishVolumeRequest{VolumeId: "v", TargetPath: target}, "volume_capability"},
		{"relative target", request("v", "rel/path", nil), "target_path"},
		{"target in data dir", request("v", "/var/lib/oneagent-csi/artifacts/x", nil), "target_path"},
		{"target outside kubelet dir", request("v", "/etc/passwd", nil), "target_path"},
		{"target not in kubelet's shape", request("v", filepath.Join(f.targets, "pods/u/volumes/kubernetes.io~csi/x/mount/deeper"), nil), "target_path"},
		{"target is the volume dir", request("v", filepath.Join(f.targets, "pods/u/volumes/kubernetes.io~csi/x"), nil), "target_path"},
		{"target climbs out", request("v", filepath.Join(f.targets, "pods/u/volumes/kubernetes.io~csi/x/mount")+"/../../../../../../etc", nil), "target_path"},
		{"target in another plugin's dir", request("v", filepath.Join(f.targets, "pods/u/volumes/kubernetes.io~empty-dir/x/mount"), nil), "target_path"},
		{"host with version", request("v", target, map[string]string{"mode": "host", "version": "1.2.3"}), "version"},
		{"host with bad retryTimeout", request("v", target, map[string]string{"mode": "host", "retryTimeout": "soon"}), "retryTimeout"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			_, err := f.d.NodePublishVolume(context.Background(), tc.req)
			if status.Code(err) != codes.InvalidArgument || !strings.Contains(err.Error(), tc.field) {
				t.Fatalf("err = %v, want InvalidArgument naming %s", err, tc.field)
			}
		})
	}
	if f.prov.calls != 0 || len(f.mounter.GetLog()) != 0 {
		t.Errorf("invalid requests reached the provisioner (%d) or the mounter (%v)", f.prov.calls, f.mounter.GetLog())
	}
}

func TestPublishMountsReadOnlyOverlay(t *testing.T) {
	f := newUnit(t)
	target := f.target("mount")
	if _, err := f.d.NodePublishVolume(context.Background(), request("v1", target, nil)); err != nil {
		t.Fatal(err)
	}
	mps, _ := f.mounter.List()
	if len(mps) != 1 || mps[0].Type != "overlay" || mps[0].Path != target {
		t.Fatalf("mounts = %+v", mps)
	}
	opts := strings.Join(mps[0].Opts, ",")
	want := "lowerdir=/var/lib/oneagent-csi/tenants/prod/r1-x/tree:/var/lib/oneagent-csi/artifacts/" + strings.Repeat("a", 64) + "/tree"
	if !strings.Contains(opts, want) || !strings.Contains(opts, "ro") {
		t.Fatalf("options %q, want %q and ro", opts, want)
	}
	rec, err := f.idx.GetVolume("v1")
	if err != nil || rec.State != storage.VolumePublished || rec.PodNamespace != "ns" {
		t.Fatalf("record %+v, %v", rec, err)
	}
}

// kubelet passes the pod's SELinux label as a context= mount flag when the
// CSIDriver has seLinuxMount: true; it reaches the overlay's options, and no
// other flag does. (These machines have no SELinux, so a real mount with
// context= would fail with EINVAL: the FakeMounter shows the options.)
func TestPublishPassesTheSELinuxContext(t *testing.T) {
	f := newUnit(t)
	target := f.target("se")
	req := request("v-se", target, nil)
	const ctxFlag = `context="system_u:object_r:container_file_t:s0:c12,c34"`
	req.VolumeCapability.GetMount().MountFlags = []string{ctxFlag, "exec", "suid"}
	if _, err := f.d.NodePublishVolume(context.Background(), req); err != nil {
		t.Fatal(err)
	}
	mps, _ := f.mounter.List()
	if len(mps) != 1 {
		t.Fatalf("mounts = %+v", mps)
	}
	opts := mps[0].Opts
	if !slices.Contains(opts, ctxFlag) || slices.Contains(opts, "exec") || slices.Contains(opts, "suid") || !slices.Contains(opts, "nosuid") {
		t.Fatalf("overlay options %v: want the context and only our own options", opts)
	}
}

func TestPublishWritableCreatesUpperAndWork(t *testing.T) {
	f := newUnit(t)
	target := f.target("w")
	f.prov.policy = &provisioner.Tenant{Name: "prod", AllowWritable: true, WritableSize: "16Mi"}
	req := request("v-w", target, map[string]string{"writable": "true"})
	req.Readonly = false
	if _, err := f.d.NodePublishVolume(context.Background(), req); err != nil {
		t.Fatal(err)
	}
	for _, dir := range []string{"volumes/v-w/upper", "volumes/v-w/work"} {
		if ok, _ := afero.DirExists(f.fs, dir); !ok {
			t.Errorf("%s not created", dir)
		}
	}
	mps, _ := f.mounter.List()
	if len(mps) != 2 || mps[0].Type != "tmpfs" || mps[0].Path != "/var/lib/oneagent-csi/volumes/v-w" ||
		!slices.Contains(mps[0].Opts, "size=16777216") {
		t.Fatalf("mounts = %+v; want the writable layer as a 16 MiB tmpfs, then the overlay", mps)
	}
	if opts := strings.Join(mps[1].Opts, ","); mps[1].Type != "overlay" || !strings.Contains(opts, "upperdir=") || strings.Contains(","+opts+",", ",ro,") {
		t.Fatalf("writable overlay options %q", opts)
	}
	if _, err := f.d.NodeUnpublishVolume(context.Background(), &csi.NodeUnpublishVolumeRequest{VolumeId: "v-w", TargetPath: target}); err != nil {
		t.Fatal(err)
	}
	if mps, _ := f.mounter.List(); len(mps) != 0 {
		t.Errorf("mounts left after unpublish: %+v", mps)
	}
	if ok, _ := afero.DirExists(f.fs, "volumes/v-w"); ok {
		t.Error("per-volume dir left after unpublish")
	}
}

func TestPublishFailsOpenAfterRetryTimeout(t *testing.T) {
	f := newUnit(t)
	f.prov.err = provisioner.ErrInProgress
	target := f.target("fo")
	req := request("v-fo", target, map[string]string{"retryTimeout": "1m"})
	_, err := f.d.NodePublishVolume(context.Background(), req)
	if status.Code(err) != codes.Unavailable {
		t.Fatalf("first attempt: %v, want Unavailable", err)
	}
	f.now = f.now.Add(59 * time.Second)
	if _, err := f.d.NodePublishVolume(context.Background(), req); status.Code(err) != codes.Unavailable {
		t.Fatalf("before retryTimeout: %v, want Unavailable", err)
	}
	f.now = f.now.Add(2 * time.Second)
	if _, err := f.d.NodePublishVolume(context.Background(), req); err != nil {
		t.Fatalf("after retryTimeout: %v, want fail-open success", err)
	}
	mps, _ := f.mounter.List()
	if len(mps) != 1 || mps[0].Device != "/var/lib/oneagent-csi/empty" {
		t.Fatalf("fail-open mount = %+v, want the empty dir", mps)
	}
	rec, _ := f.idx.GetVolume("v-fo")
	if rec.State != storage.VolumeFailedOpen || !strings.Contains(rec.Reason, "download in progress") {
		t.Fatalf("record %+v", rec)
	}
}

func TestPublishErrorCodes(t *testing.T) {
	tests := []struct {
		err  error
		code codes.Code
	}{
		{provisioner.ErrInProgress, codes.Unavailable},
		{provisioner.ErrUnavailable, codes.Unavailable},
		{provisioner.ErrBadArchive, codes.Unavailable},
		{provisioner.ErrUnauthorized, codes.FailedPrecondition},
		{errors.New("disk on fire"), codes.Internal},
	}
	for _, tc := range tests {
		t.Run(tc.err.Error(), func(t *testing.T) {
			f := newUnit(t)
			f.prov.err = tc.err
			_, err := f.d.NodePublishVolume(context.Background(), request("v", f.target("x"), nil))
			if status.Code(err) != tc.code {
				t.Fatalf("err = %v, want %s", err, tc.code)
			}
		})
	}
}

// Errors no retry can fix fail open at the first attempt, with the reason
// in the record and the metric label.
func TestPublishFailsOpenAtOnceOnFinalErrors(t *testing.T) {
	tests := []struct {
		name   string
		err    error
		attrs  map[string]string
		rw     bool
		reason string
	}{
		{"unknown tenant", fmt.Errorf("tenant %q is not configured: %w", "prdo", provisioner.ErrUnknownTenant), nil, false, FailOpenUnknownTenant},
		{"version not on tenant", fmt.Errorf("GET version/1.2.3: HTTP 404: %w", provisioner.ErrNotFound), nil, false, FailOpenVersionNotFound},
		{"bad mode", nil, map[string]string{"mode": "x"}, false, FailOpenInvalidAttributes},
		{"bad version", nil, map[string]string{"version": "newest"}, false, FailOpenInvalidAttributes},
		{"bad retryTimeout", nil, map[string]string{"retryTimeout": "soon"}, false, FailOpenInvalidAttributes},
		{"bad tenant name", nil, map[string]string{"dynakube": "Prod_1"}, false, FailOpenInvalidAttributes},
		{"writable and read-only", nil, map[string]string{"writable": "true"}, false, FailOpenInvalidAttributes},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			f := newUnit(t)
			f.prov.err = tc.err
			req := request("v", f.target("x"), tc.attrs)
			if _, err := f.d.NodePublishVolume(context.Background(), req); err != nil {
				t.Fatalf("first attempt: %v, want fail-open success", err)
			}
			mps, _ := f.mounter.List()
			if len(mps) != 1 || mps[0].Device != "/var/lib/oneagent-csi/empty" {
				t.Fatalf("mounts = %+v, want the empty dir", mps)
			}
			rec, err := f.idx.GetVolume("v")
			if err != nil || rec.State != storage.VolumeFailedOpen || !strings.Contains(rec.Reason, tc.reason) {
				t.Fatalf("record %+v, %v: want failedOpen with reason %s", rec, err, tc.reason)
			}
			if n := testutil.ToFloat64(f.d.metrics.failOpen.WithLabelValues(tc.reason)); n != 1 {
				t.Fatalf("fail_open_total{reason=%q} = %v, want 1", tc.reason, n)
			}
		})
	}
}

// failingMounter fails every mount of one filesystem type.
type failingMounter struct {
	*mount.FakeMounter
	fstype string
	err    error
}

func (m *failingMounter) Mount(source, target, fstype string, options []string) error {
	if fstype == m.fstype {
		return m.err
	}
	return m.FakeMounter.Mount(source, target, fstype, options)
}

// A failed mount (EINVAL, ENOSPC on the upper dir) is retried, recorded from
// the first attempt, and fails open once retryTimeout has passed.
func TestPublishFailsOpenWhenTheMountKeepsFailing(t *testing.T) {
	f := newUnit(t)
	failing := &failingMounter{FakeMounter: f.mounter, fstype: "overlay", err: errors.New("mount overlay: no space left on device")}
	f.d.opts.Mounter = failing
	req := request("v-m", f.target("m"), map[string]string{"retryTimeout": "1m"})
	if _, err := f.d.NodePublishVolume(context.Background(), req); err == nil || !strings.Contains(err.Error(), "no space") {
		t.Fatalf("first attempt: %v, want the mount error", err)
	}
	rec, err := f.idx.GetVolume("v-m")
	if err != nil || rec.State != storage.VolumePending || !rec.FirstAttempt.Equal(f.now) {
		t.Fatalf("first attempt not recorded: %+v, %v", rec, err)
	}
	f.now = f.now.Add(61 * time.Second)
	if _, err := f.d.NodePublishVolume(context.Background(), req); err != nil {
		t.Fatalf("after retryTimeout: %v, want fail-open", err)
	}
	if rec, _ := f.idx.GetVolume("v-m"); rec.State != storage.VolumeFailedOpen {
		t.Fatalf("record %+v, want failedOpen", rec)
	}
	if n := testutil.ToFloat64(f.d.metrics.failOpen.WithLabelValues(FailOpenRetryTimeout)); n != 1 {
		t.Fatalf("fail_open_total{reason=retry_timeout} = %v, want 1", n)
	}
}

// Only a bounded number of publishes wait for a download; the next ones
// return Unavailable at once, so waiting publishes never hold every CSI
// connection other volumes need.
func TestDownloadWaitersAreBounded(t *testing.T) {
	f := newUnit(t)
	f.d.opts.PublishWait = time.Minute
	f.prov.download = true
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	done := make(chan error, maxDownloadWaiters)
	for i := range maxDownloadWaiters {
		go func() {
			_, err := f.d.NodePublishVolume(ctx, request(fmt.Sprintf("w%d", i), f.target(fmt.Sprintf("w%d", i)), nil))
			done <- err
		}()
	}
	deadline := time.Now().Add(10 * time.Second)
	for {
		f.prov.mu.Lock()
		n := f.prov.waiting
		f.prov.mu.Unlock()
		if n == maxDownloadWaiters {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("%d publishes waiting, want %d", n, maxDownloadWaiters)
		}
		time.Sleep(time.Millisecond)
	}
	start := time.Now()
	_, err := f.d.NodePublishVolume(context.Background(), request("late", f.target("late"), nil))
	if status.Code(err) != codes.Unavailable {
		t.Fatalf("publish beyond the waiters: %v, want Unavailable", err)
	}
	if took := time.Since(start); took > 30*time.Second {
		t.Fatalf("publish beyond the waiters took %v, want about %v, not PublishWait", took, busyWait)
	}
	cancel()
	for range maxDownloadWaiters {
		if err := <-done; status.Code(err) != codes.Canceled && status.Code(err) != codes.Unavailable {
			t.Errorf("a waiting publish ended with %v", err)
		}
	}
}

func TestHostModeNeedsAllowList(t *testing.T) {
	f := newUnit(t)
	target := f.target("h")
	req := request("v-h", target, map[string]string{"mode": "host"})
	if _, err := f.d.NodePublishVolume(context.Background(), req); status.Code(err) != codes.PermissionDenied {
		t.Fatalf("err = %v, want PermissionDenied", err)
	}
	f.d.opts.HostAllow = []HostAllowRule{{Namespace: "ns"}}
	if _, err := f.d.NodePublishVolume(context.Background(), req); err != nil {
		t.Fatal(err)
	}
	mps, _ := f.mounter.List()
	if len(mps) != 1 || mps[0].Device != "/var/lib/oneagent-csi/host/prod" || !strings.Contains(strings.Join(mps[0].Opts, ","), "ro") {
		t.Fatalf("host mount = %+v", mps)
	}
}

func TestUnpublishIsIdempotentAndNeedsNoRecord(t *testing.T) {
	f := newUnit(t)
	target := f.target("u")
	if err := os.MkdirAll(target, 0o750); err != nil {
		t.Fatal(err)
	}
	// A mount the index knows nothing about (record lost).
	if err := f.mounter.Mount("overlay", target, "overlay", []string{"ro"}); err != nil {
		t.Fatal(err)
	}
	for i := range 2 {
		if _, err := f.d.NodeUnpublishVolume(context.Background(), &csi.NodeUnpublishVolumeRequest{VolumeId: "lost", TargetPath: target}); err != nil {
			t.Fatalf("unpublish #%d: %v", i+1, err)
		}
	}
	if mps, _ := f.mounter.List(); len(mps) != 0 {
		t.Fatalf("still mounted: %+v", mps)
	}
	if _, err := os.Stat(target); !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("target left behind: %v", err)
	}
	for _, tc := range []struct {
		req *csi.NodeUnpublishVolumeRequest
	}{
		{&csi.NodeUnpublishVolumeRequest{TargetPath: target}},
		{&csi.NodeUnpublishVolumeRequest{VolumeId: "v"}},
	} {
		if _, err := f.d.NodeUnpublishVolume(context.Background(), tc.req); status.Code(err) != codes.InvalidArgument {
			t.Errorf("%+v: %v, want InvalidArgument", tc.req, err)
		}
	}
}

func TestUnpublishFailureIsReported(t *testing.T) {
	f := newUnit(t)
	target := f.target("busy")
	if err := os.MkdirAll(target, 0o750); err != nil {
		t.Fatal(err)
	}
	if err := f.mounter.Mount("overlay", target, "overlay", nil); err != nil {
		t.Fatal(err)
	}
	f.mounter.UnmountFunc = func(string) error { return errors.New("device busy") }
	_, err := f.d.NodeUnpublishVolume(context.Background(), &csi.NodeUnpublishVolumeRequest{VolumeId: "v", TargetPath: target})
	if status.Code(err) != codes.Internal || !strings.Contains(err.Error(), "busy") {
		t.Fatalf("err = %v, want Internal with the cause", err)
	}
}

func TestProbeAndReady(t *testing.T) {
	f := newUnit(t)
	r, err := f.d.Probe(context.Background(), &csi.ProbeRequest{})
	if err != nil || !r.GetReady().GetValue() {
		t.Fatalf("probe = %v, %v", r, err)
	}
	f.d.opts.Fs = afero.NewReadOnlyFs(f.fs)
	if err := f.d.Ready(); err == nil {
		t.Fatal("ready with a read-only data dir")
	}
	f.d.opts.Fs = f.fs
	f.idx.Close()
	if err := f.d.Ready(); err == nil {
		t.Fatal("ready with a closed index")
	}
}

func TestPublishServesContainerConfiguration(t *testing.T) {
	tests := []struct {
		name     string
		attrs    map[string]string
		provErr  error
		failOpen bool
		lowerTop string
	}{
		{"served with the agent", nil, nil, false, "/var/lib/oneagent-csi/volumes/v-c/containers:"},
		{"failed open at once", nil, fmt.Errorf("tenant %q is not configured: %w", "prod", provisioner.ErrUnknownTenant), true,
			"/var/lib/oneagent-csi/volumes/v-c/containers:/var/lib/oneagent-csi/empty"},
		{"failed open on a bad attribute", map[string]string{"retryTimeout": "soon"}, nil, true, "/var/lib/oneagent-csi/volumes/v-c/containers:/var/lib/oneagent-csi/empty"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			f := newUnit(t)
			f.prov.err = tc.provErr
			target := f.target("c")
			attrs := map[string]string{"containers": "shop=nginx:1.27,cart=cart:2", "csi.storage.k8s.io/pod.uid": "uid-c"}
			for k, v := range tc.attrs {
				attrs[k] = v
			}
			if _, err := f.d.NodePublishVolume(context.Background(), request("v-c", target, attrs)); err != nil {
				t.Fatal(err)
			}
			mps, _ := f.mounter.List()
			if len(mps) != 2 || mps[0].Type != "tmpfs" || mps[0].Path != "/var/lib/oneagent-csi/volumes/v-c" ||
				!slices.Contains(mps[0].Opts, "size=1048576") || !slices.Contains(mps[0].Opts, "noexec") {
				t.Fatalf("mounts = %+v; want the volume's layers as a 1 MiB tmpfs, then the overlay", mps)
			}
			opts := strings.Join(mps[1].Opts, ",")
			if mps[1].Type != "overlay" || !strings.Contains(opts, "lowerdir="+tc.lowerTop) || !strings.Contains(","+opts+",", ",ro,") {
				t.Fatalf("overlay options %q, want lowerdir starting %s, read-only", opts, tc.lowerTop)
			}
			conf, err := afero.ReadFile(f.fs, "volumes/v-c/containers/"+api.ContainerConfRelativePath("cart"))
			want := "[container]\ncontainerName cart\nimageName cart:2\nk8s_fullpodname p\nk8s_poduid uid-c\n" +
				"k8s_containername cart\nk8s_namespace ns\nk8s_node_name n1\n"
			if err != nil || string(conf) != want {
				t.Fatalf("container.conf of cart: %v\n%s", err, conf)
			}
			if ok, _ := afero.Exists(f.fs, "volumes/v-c/containers/"+api.ContainerConfRelativePath("shop")); !ok {
				t.Fatal("no container.conf for shop")
			}
			rec, _ := f.idx.GetVolume("v-c")
			if got := rec.State == storage.VolumeFailedOpen; got != tc.failOpen {
				t.Fatalf("record state %s, want failed open %v", rec.State, tc.failOpen)
			}
			if _, err := f.d.NodeUnpublishVolume(context.Background(), &csi.NodeUnpublishVolumeRequest{VolumeId: "v-c", TargetPath: target}); err != nil {
				t.Fatal(err)
			}
			if mps, _ := f.mounter.List(); len(mps) != 0 {
				t.Errorf("mounts left after unpublish: %+v", mps)
			}
			if ok, _ := afero.DirExists(f.fs, "volumes/v-c"); ok {
				t.Error("per-volume dir left after unpublish")
			}
		})
	}
}

func TestPublishWithoutContainersHasNoVolumeLayer(t *testing.T) {
	f := newUnit(t)
	if _, err := f.d.NodePublishVolume(context.Background(), request("v-n", f.target("n"), nil)); err != nil {
		t.Fatal(err)
	}
	mps, _ := f.mounter.List()
	if len(mps) != 1 || mps[0].Type != "overlay" {
		t.Fatalf("mounts = %+v, want the overlay alone", mps)
	}
	if ok, _ := afero.DirExists(f.fs, "volumes/v-n"); ok {
		t.Error("per-volume dir created for a volume without own layers")
	}
}
