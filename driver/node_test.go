package driver

import (
	"context"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/container-storage-interface/spec/lib/go/csi"
	"github.com/spf13/afero"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"k8s.io/mount-utils"

	"github.com/oneagent-csi/oneagent-csi/provisioner"
	"github.com/oneagent-csi/oneagent-csi/storage"
)

// fakeProvisioner answers Prepare from fields; unit tests only.
type fakeProvisioner struct {
	mu      sync.Mutex
	err     error
	calls   int
	tenants []string
}

func (f *fakeProvisioner) Prepare(_ context.Context, tenant, pin string) (provisioner.Prepared, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.calls++
	if f.err != nil {
		return provisioner.Prepared{}, f.err
	}
	return provisioner.Prepared{Tenant: tenant, Version: "1.2.3",
		Artifact: storage.Artifact{ID: strings.Repeat("a", 64)}, Layer: storage.TenantLayer{Tenant: tenant, Rev: "r1-x"}}, nil
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
		Now: func() time.Time { return f.now }})
	if err != nil {
		t.Fatal(err)
	}
	return f
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
	target := filepath.Join(f.targets, "t")
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
		{"bad mode", request("v", target, map[string]string{"mode": "x"}), "mode"},
		{"writable and read-only", request("v", target, map[string]string{"writable": "true"}), "writable"},
		{"host with version", request("v", target, map[string]string{"mode": "host", "version": "1.2.3"}), "version"},
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
	target := filepath.Join(f.targets, "mount")
	if _, err := f.d.NodePublishVolume(context.Background(), request("v1", target, nil)); err != nil {
		t.Fatal(err)
	}
	mps, _ := f.mounter.List()
	if len(mps) != 1 || mps[0].Type != "overlay" || mps[0].Path != target {
		t.Fatalf("mounts = %+v", mps)
	}
	opts := strings.Join(mps[0].Opts, ",")
	want := "lowerdir=/var/lib/oneagent-csi/tenants/prod/r1-x:/var/lib/oneagent-csi/artifacts/" + strings.Repeat("a", 64)
	if !strings.Contains(opts, want) || !strings.Contains(opts, "ro") {
		t.Fatalf("options %q, want %q and ro", opts, want)
	}
	rec, err := f.idx.GetVolume("v1")
	if err != nil || rec.State != storage.VolumePublished || rec.PodNamespace != "ns" {
		t.Fatalf("record %+v, %v", rec, err)
	}
}

func TestPublishWritableCreatesUpperAndWork(t *testing.T) {
	f := newUnit(t)
	target := filepath.Join(f.targets, "w")
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
	if opts := strings.Join(mps[0].Opts, ","); !strings.Contains(opts, "upperdir=") || strings.Contains(","+opts+",", ",ro,") {
		t.Fatalf("writable overlay options %q", opts)
	}
	if _, err := f.d.NodeUnpublishVolume(context.Background(), &csi.NodeUnpublishVolumeRequest{VolumeId: "v-w", TargetPath: target}); err != nil {
		t.Fatal(err)
	}
	if ok, _ := afero.DirExists(f.fs, "volumes/v-w"); ok {
		t.Error("per-volume dir left after unpublish")
	}
}

func TestPublishFailsOpenAfterRetryTimeout(t *testing.T) {
	f := newUnit(t)
	f.prov.err = provisioner.ErrInProgress
	target := filepath.Join(f.targets, "fo")
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
		{provisioner.ErrNotFound, codes.FailedPrecondition},
		{provisioner.ErrUnknownTenant, codes.InvalidArgument},
		{errors.New("disk on fire"), codes.Internal},
	}
	for _, tc := range tests {
		t.Run(tc.err.Error(), func(t *testing.T) {
			f := newUnit(t)
			f.prov.err = tc.err
			_, err := f.d.NodePublishVolume(context.Background(), request("v", filepath.Join(f.targets, "x"), nil))
			if status.Code(err) != tc.code {
				t.Fatalf("err = %v, want %s", err, tc.code)
			}
		})
	}
}

func TestHostModeNeedsAllowList(t *testing.T) {
	f := newUnit(t)
	target := filepath.Join(f.targets, "h")
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
	target := filepath.Join(f.targets, "u")
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
	target := filepath.Join(f.targets, "busy")
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
