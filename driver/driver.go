// Package driver serves the CSI Identity and Node services, mounts code
// modules into pods and registers itself with kubelet. It never downloads:
// it asks the provisioner.
package driver

import (
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"time"

	"github.com/container-storage-interface/spec/lib/go/csi"
	"github.com/kubernetes-csi/csi-lib-utils/protosanitizer"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/spf13/afero"
	"golang.org/x/net/netutil"
	"google.golang.org/grpc"
	"k8s.io/klog/v2"
	"k8s.io/mount-utils"

	"github.com/oneagent-csi/oneagent-csi/api"
	"github.com/oneagent-csi/oneagent-csi/provisioner"
	"github.com/oneagent-csi/oneagent-csi/storage"
)

// Provisioner is what the driver needs from the provisioner package.
type Provisioner interface {
	// Prepare makes the artifact and tenant layer of tenant's version (pin
	// overrides) present; it returns an error wrapping
	// provisioner.ErrInProgress when ctx ends during a download.
	Prepare(ctx context.Context, tenant, pin string) (provisioner.Prepared, error)
	// EnsureHostDir creates the tenant's host-mode dir; it is not an error
	// when it exists.
	EnsureHostDir(tenant string) (string, error)
	// DefaultTenant is the tenant of volumes that name none, or "".
	DefaultTenant() string
	// TenantConfig is the configuration (and policy) of a tenant; false
	// when it is not configured.
	TenantConfig(name string) (provisioner.Tenant, bool)
}

// HostAllowRule admits host-mode volumes of pods in Namespace running as
// ServiceAccount ("*" or empty ServiceAccount matches any).
type HostAllowRule struct {
	Namespace      string `json:"namespace"`
	ServiceAccount string `json:"serviceAccount,omitempty"`
}

// Options configure a Driver. Zero fields take the documented defaults.
type Options struct {
	// DriverName registered with kubelet. Default api.DefaultDriverName.
	DriverName string
	// NodeID returned by NodeGetInfo (the Kubernetes node name). Required.
	NodeID string
	// Version reported by GetPluginInfo. Default "dev".
	Version string
	// Layout of the data dir. Required.
	Layout storage.Layout
	// Fs is rooted at the data dir. Default: afero.NewBasePathFs(OsFs, Layout.Root()).
	Fs afero.Fs
	// Index is the open bbolt index. Required.
	Index *storage.Index
	// Provisioner provides artifacts. Required.
	Provisioner Provisioner
	// Mounter mounts and unmounts. Default NewSyscallMounter with MountAPI,
	// staging binds in the data dir's tmp/.
	Mounter mount.Interface
	// MountAPI selects the kernel calls of the default Mounter. Default
	// MountAPIAuto.
	MountAPI MountAPI
	// KubeletDir is kubelet's root dir; publish and unpublish accept only
	// target paths below it in the shape kubelet uses for CSI volumes.
	// Default /var/lib/kubelet.
	KubeletDir string
	// HostAllow lists who may use host mode. Default: nobody.
	HostAllow []HostAllowRule
	// PublishWait bounds how long one NodePublishVolume waits for a download
	// before returning Unavailable so that kubelet retries. Default 20s.
	PublishWait time.Duration
	// Now is the clock. Default time.Now.
	Now func() time.Time
	// Registerer receives the driver's metrics. Default: none.
	Registerer prometheus.Registerer
	// AfterUnpublish is called after a volume was unpublished, e.g. to ask
	// for a cache GC pass now that a reference is gone. It must not block.
	// Default: none.
	AfterUnpublish func()
}

// DefaultKubeletDir is kubelet's default root dir.
const DefaultKubeletDir = "/var/lib/kubelet"

// Driver implements the CSI Identity and Node services.
type Driver struct {
	csi.UnimplementedIdentityServer
	csi.UnimplementedNodeServer

	opts    Options
	locks   targetLocks
	waiters chan struct{}
	metrics *metrics
}

// New validates the options and builds a Driver.
func New(opts Options) (*Driver, error) {
	if opts.DriverName == "" {
		opts.DriverName = api.DefaultDriverName
	}
	if opts.Version == "" {
		opts.Version = "dev"
	}
	if opts.Fs == nil {
		opts.Fs = afero.NewBasePathFs(afero.NewOsFs(), opts.Layout.Root())
	}
	if opts.Mounter == nil {
		opts.Mounter = NewSyscallMounter(SyscallMounterOptions{API: opts.MountAPI, StagingDir: opts.Layout.Abs(opts.Layout.Tmp())})
	}
	if opts.KubeletDir == "" {
		opts.KubeletDir = DefaultKubeletDir
	}
	if !filepath.IsAbs(opts.KubeletDir) {
		return nil, fmt.Errorf("driver: KubeletDir %q must be an absolute path", opts.KubeletDir)
	}
	opts.KubeletDir = filepath.Clean(opts.KubeletDir)
	if opts.PublishWait == 0 {
		opts.PublishWait = 20 * time.Second
	}
	if opts.Now == nil {
		opts.Now = time.Now
	}
	switch {
	case opts.NodeID == "":
		return nil, errors.New("driver: NodeID is required")
	case opts.Index == nil:
		return nil, errors.New("driver: Index is required")
	case opts.Provisioner == nil:
		return nil, errors.New("driver: Provisioner is required")
	case opts.Layout.Root() == "":
		return nil, errors.New("driver: Layout is required")
	}
	return &Driver{opts: opts, waiters: make(chan struct{}, maxDownloadWaiters),
		metrics: newMetrics(opts.Registerer)}, nil
}

// Name is the registered driver name.
func (d *Driver) Name() string { return d.opts.DriverName }

// Ready reports why the driver cannot serve, or nil: the index must answer
// and the data dir must be writable.
func (d *Driver) Ready() error {
	if err := d.opts.Index.Ping(); err != nil {
		return fmt.Errorf("index: %w", err)
	}
	f, err := afero.TempFile(d.opts.Fs, d.opts.Layout.Tmp(), "probe-")
	if err != nil {
		return fmt.Errorf("data dir not writable: %w", err)
	}
	name := f.Name()
	_ = f.Close()
	if err := d.opts.Fs.Remove(name); err != nil {
		return fmt.Errorf("data dir not writable: %w", err)
	}
	return nil
}

// Listen opens a unix socket at path, replacing a stale socket file.
func Listen(path string) (net.Listener, error) {
	if err := os.MkdirAll(filepath.Dir(path), 0o750); err != nil {
		return nil, err
	}
	if err := os.Remove(path); err != nil && !errors.Is(err, os.ErrNotExist) {
		return nil, fmt.Errorf("remove stale socket %s: %w", path, err)
	}
	l, err := net.Listen("unix", path)
	if err != nil {
		return nil, err
	}
	if err := os.Chmod(path, 0o600); err != nil {
		_ = l.Close()
		return nil, err
	}
	return l, nil
}

// connBufferSize is the read and write buffer of one CSI connection. CSI
// messages are a few hundred bytes and kubelet opens a connection per call,
// so gRPC's default 32 KiB buffers each way cost 32 MiB in a burst of 500
// publishes for nothing.
const connBufferSize = 4 << 10

// MaxConnections is how many CSI connections are served at once; more wait
// in the socket's backlog (kubelet opens one per call). Serving a burst of
// 500 publishes all at once cost ~30 MiB of goroutine stacks and transport
// state for no gain in speed (a warm publish takes a few milliseconds); 32 at
// a time keeps the process near 46 MiB with GOMAXPROCS=64 at the same burst
// time (BENCHMARKS.md). Publishes that would wait for a download are bounded
// separately (maxDownloadWaiters), so they cannot hold every slot.
const MaxConnections = 32

// LimitConnections returns l serving at most MaxConnections at once.
func LimitConnections(l net.Listener) net.Listener { return netutil.LimitListener(l, MaxConnections) }

// NewGRPCServer returns a gRPC server with the driver's Identity and Node
// services and request logging (secrets stripped).
func (d *Driver) NewGRPCServer() *grpc.Server {
	s := grpc.NewServer(grpc.UnaryInterceptor(logInterceptor),
		grpc.ReadBufferSize(connBufferSize), grpc.WriteBufferSize(connBufferSize))
	csi.RegisterIdentityServer(s, d)
	csi.RegisterNodeServer(s, d)
	return s
}

func logInterceptor(ctx context.Context, req any, info *grpc.UnaryServerInfo, handler grpc.UnaryHandler) (any, error) {
	log := klog.FromContext(ctx).WithValues("method", info.FullMethod)
	ctx = klog.NewContext(ctx, log)
	log.V(5).Info("request", "body", protosanitizer.StripSecrets(req))
	resp, err := handler(ctx, req)
	if err != nil {
		log.V(2).Info("failed", "err", err)
	}
	return resp, err
}
