package main

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/http"
	"os"
	"os/signal"
	"runtime"
	"runtime/debug"
	"syscall"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"github.com/spf13/cobra"
	"golang.org/x/sync/errgroup"
	"google.golang.org/grpc"
	"k8s.io/klog/v2"

	"github.com/oneagent-csi/oneagent-csi/driver"
	"github.com/oneagent-csi/oneagent-csi/internal/diskio"
	"github.com/oneagent-csi/oneagent-csi/internal/memlimit"
	"github.com/oneagent-csi/oneagent-csi/provisioner"
	"github.com/oneagent-csi/oneagent-csi/provisioner/extract"
	"github.com/oneagent-csi/oneagent-csi/storage"
)

func newNodeCommand() *cobra.Command {
	var configPath string
	overrides := NodeConfig{}
	cmd := &cobra.Command{
		Use:   "node",
		Short: "Run the CSI node driver (DaemonSet container)",
		Long: `Run the CSI node driver: download code modules from the configured tenants once per node,
cache them in the data dir and mount them read-only into pods. Flags override the config file.`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			cfg, err := LoadNodeConfig(configPath)
			if err != nil {
				return err
			}
			mergeFlags(cmd, &cfg, overrides)
			cfg.applyDefaults()
			if err := cfg.validate(); err != nil {
				return fmt.Errorf("config: %w", err)
			}
			ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM, syscall.SIGINT)
			defer stop()
			return runNode(ctx, cfg)
		},
	}
	f := cmd.Flags()
	f.StringVar(&configPath, "config", "", "node config file (YAML, see README); flags override it")
	f.StringVar(&overrides.NodeID, "node-id", "", "Kubernetes node name (default $NODE_NAME, then the hostname)")
	f.StringVar(&overrides.DataDir, "data-dir", "", "data dir for artifacts, tenant layers and index.db (default "+defaultDataDir+")")
	f.StringVar(&overrides.CSISocket, "csi-socket", "", "unix socket the CSI gRPC service listens on (default "+defaultCSISocket+")")
	f.StringVar(&overrides.KubeletSocket, "kubelet-socket", "", "the CSI socket path as kubelet sees it (default: --csi-socket)")
	f.StringVar(&overrides.RegistrationDir, "registration-dir", "", "kubelet plugin registration dir; empty disables registration (config default "+defaultRegistrationDir+" in the DaemonSet)")
	f.StringVar(&overrides.HTTPAddr, "http-addr", "", "address of /healthz, /readyz and /metrics (default "+defaultHTTPAddr+")")
	f.StringVar(&overrides.DriverName, "driver-name", "", "CSI driver name (default csi.oneagent.dynatrace.com)")
	return cmd
}

func mergeFlags(cmd *cobra.Command, cfg *NodeConfig, o NodeConfig) {
	set := func(name string, dst *string, v string) {
		if cmd.Flags().Changed(name) {
			*dst = v
		}
	}
	set("node-id", &cfg.NodeID, o.NodeID)
	set("data-dir", &cfg.DataDir, o.DataDir)
	set("csi-socket", &cfg.CSISocket, o.CSISocket)
	set("kubelet-socket", &cfg.KubeletSocket, o.KubeletSocket)
	set("registration-dir", &cfg.RegistrationDir, o.RegistrationDir)
	set("http-addr", &cfg.HTTPAddr, o.HTTPAddr)
	set("driver-name", &cfg.DriverName, o.DriverName)
}

func runNode(ctx context.Context, cfg NodeConfig) error {
	log := klog.FromContext(ctx)
	extractMemory, pageCache := applyMemoryLimit(log, int64(cfg.ExtractMemory), cfg.ExtractWorkers)
	layout, err := storage.NewLayout(cfg.DataDir)
	if err != nil {
		return err
	}
	idx, rep, err := storage.Open(storage.ReconcileOptions{Layout: layout})
	if err != nil {
		return err
	}
	defer idx.Close()
	log.Info("reconciled data dir", "dataDir", cfg.DataDir, "tmpRemoved", rep.TmpEntriesRemoved,
		"indexRebuilt", rep.IndexRebuilt, "artifacts", rep.ArtifactsKept+rep.ArtifactsAdded, "partialRemoved", len(rep.PartialRemoved),
		"mounts", rep.MountsFound, "adopted", rep.VolumesAdopted, "dropped", rep.VolumesDropped, "took", rep.Duration)

	reg := prometheus.NewRegistry()
	reg.MustRegister(collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))
	prov, err := provisioner.New(provisioner.Options{
		Layout: layout, Index: idx, Tenants: cfg.Tenants, DownloadTimeout: cfg.DownloadTimeout.Duration,
		LatestTTL: cfg.LatestTTL.Duration, Limits: cfg.Limits, ExtractWorkers: cfg.ExtractWorkers, ExtractMemory: extractMemory, PageCache: pageCache, Registerer: reg,
		GC: provisioner.GCOptions{KeepPrevious: cfg.Cache.KeepPrevious, MaxBytes: int64(cfg.Cache.MaxBytes),
			Interval: cfg.Cache.GCInterval.Duration, OrphanGrace: cfg.Cache.OrphanGrace.Duration},
		Client: provisioner.ClientOptions{RequestTimeout: cfg.Client.RequestTimeout.Duration, ConnectTimeout: cfg.Client.ConnectTimeout.Duration,
			Attempts: cfg.Client.Attempts, BackoffBase: cfg.Client.BackoffBase.Duration, BackoffMax: cfg.Client.BackoffMax.Duration,
			IdleTimeout: cfg.Client.IdleTimeout.Duration},
	})
	if err != nil {
		return fmt.Errorf("config: %w", err)
	}
	mountAPI, err := driver.ParseMountAPI(cfg.MountAPI)
	if err != nil {
		return fmt.Errorf("config: mountAPI %w", err)
	}
	mounter := driver.NewSyscallMounter(driver.SyscallMounterOptions{API: mountAPI, StagingDir: layout.Abs(layout.Tmp())})
	bindAPI, mountPointCheck := mounter.Describe()
	log.Info("mount API", "mountAPI", mountAPI, "kernel", mounter.Features().String(), "binds", bindAPI, "mountPoints", mountPointCheck)
	drv, err := driver.New(driver.Options{
		DriverName: cfg.DriverName, NodeID: cfg.NodeID, Version: version, Layout: layout, Index: idx,
		Mounter: mounter, KubeletDir: cfg.KubeletDir,
		Provisioner: prov, HostAllow: cfg.HostAllow, PublishWait: cfg.PublishWait.Duration, Registerer: reg,
		AfterUnpublish: prov.RequestGC,
	})
	if err != nil {
		return err
	}

	g, gctx := errgroup.WithContext(ctx)
	csiListener, err := driver.Listen(cfg.CSISocket)
	if err != nil {
		return fmt.Errorf("csiSocket: %w", err)
	}
	csiServer := drv.NewGRPCServer()
	serveGRPC(g, gctx, csiServer, driver.LimitConnections(csiListener), "csi")
	log.Info("serving CSI", "driver", cfg.DriverName, "socket", cfg.CSISocket, "node", cfg.NodeID)

	if cfg.RegistrationDir != "" {
		regServer, err := drv.NewRegistrationServer(cfg.KubeletSocket)
		if err != nil {
			return err
		}
		regPath := driver.RegistrationSocket(cfg.RegistrationDir, cfg.DriverName)
		regListener, err := driver.Listen(regPath)
		if err != nil {
			return fmt.Errorf("registrationDir: %w", err)
		}
		serveGRPC(g, gctx, regServer, regListener, "registration")
		defer os.Remove(regPath)
		log.Info("serving kubelet plugin registration", "socket", regPath)
	}

	httpLn, err := net.Listen("tcp", cfg.HTTPAddr)
	if err != nil {
		return fmt.Errorf("httpAddr: %w", err)
	}
	serveHTTP(g, gctx, httpLn, drv.HTTPHandler(reg), "http")
	log.Info("serving health and metrics", "addr", httpLn.Addr().String())

	if cfg.AdminSocket != "-" {
		adminLn, err := driver.Listen(cfg.AdminSocket)
		if err != nil {
			return fmt.Errorf("adminSocket: %w", err)
		}
		inspector := &driver.Inspector{Index: idx, Layout: layout, GC: prov.GC,
			CheckTenants: func(ctx context.Context, tenant string) ([]provisioner.TenantCheck, error) {
				return prov.CheckTenants(ctx, tenant, 20*time.Second)
			}}
		serveHTTP(g, gctx, adminLn, driver.AdminHandler(inspector), "admin")
		log.Info("serving the cache admin API", "socket", cfg.AdminSocket)
	}
	reg.MustRegister(driver.NewCacheCollector(idx))
	g.Go(func() error {
		prov.RunGC(gctx)
		return nil
	})

	if *cfg.Prefetch {
		g.Go(func() error {
			prov.Prefetch(gctx, cfg.PrefetchInterval.Duration)
			return nil
		})
	}
	err = g.Wait()
	log.Info("stopped", "err", err)
	return err
}

// applyMemoryLimit sets the Go runtime's soft memory limit from the
// container's cgroup limit (unless GOMEMLIMIT is set) and returns the
// extraction memory (the configured one, else at most a sixteenth of the
// limit, 8 MiB without one) and the page cache an install may keep dirty (a
// sixteenth of the limit, 8 MiB without one).
func applyMemoryLimit(log klog.Logger, configured int64, workers int) (int64, int64) {
	limit, from, err := memlimit.FromCgroup(memlimit.Options{})
	if err != nil {
		log.Error(err, "reading the cgroup memory limit", "file", from)
	}
	if limit > 0 && os.Getenv("GOMEMLIMIT") == "" {
		debug.SetMemoryLimit(memlimit.GoLimit(limit))
	}
	if os.Getenv("GOGC") == "" {
		// Collecting at 1.25x the live heap instead of 2x keeps an
		// install's peak RSS below 48 MiB for a few more collections.
		debug.SetGCPercent(memlimit.GCPercent)
	}
	extractMem, pageCache := configured, int64(diskio.DefaultPageCache)
	if extractMem == 0 {
		extractMem = 8 << 20
		if limit > 0 {
			extractMem = min(extractMem, limit/16)
		}
	}
	if limit > 0 {
		pageCache = min(pageCache, limit/16)
	}
	if workers == 0 {
		workers = extract.WorkersFor(extractMem)
	}
	log.Info("memory", "cgroupLimit", limit, "from", from, "goMemLimit", debug.SetMemoryLimit(-1), "gcPercent", gcPercent(),
		"extractMemory", extractMem, "extractWorkers", workers, "pageCache", pageCache, "gomaxprocs", runtime.GOMAXPROCS(0))
	return extractMem, pageCache
}

// gcPercent reads the garbage collector's target percentage.
func gcPercent() int {
	p := debug.SetGCPercent(100)
	debug.SetGCPercent(p)
	return p
}

// serveHTTP serves h on l until ctx ends, then shuts down gracefully
// (at most 5 s). l may be a TLS listener.
func serveHTTP(g *errgroup.Group, ctx context.Context, l net.Listener, h http.Handler, name string) {
	srv := &http.Server{Handler: h, ReadHeaderTimeout: 10 * time.Second}
	g.Go(func() error {
		if err := srv.Serve(l); !errors.Is(err, http.ErrServerClosed) {
			return fmt.Errorf("%s server: %w", name, err)
		}
		return nil
	})
	g.Go(func() error {
		<-ctx.Done()
		sctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		return srv.Shutdown(sctx)
	})
}

func serveGRPC(g *errgroup.Group, ctx context.Context, s *grpc.Server, l net.Listener, name string) {
	g.Go(func() error {
		if err := s.Serve(l); err != nil {
			return fmt.Errorf("%s server: %w", name, err)
		}
		return nil
	})
	g.Go(func() error {
		<-ctx.Done()
		done := make(chan struct{})
		go func() { s.GracefulStop(); close(done) }()
		select {
		case <-done:
		case <-time.After(5 * time.Second):
			s.Stop()
		}
		return nil
	})
}
