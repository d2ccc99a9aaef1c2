package main

import (
	"context"
	"crypto/tls"
	"fmt"
	"net"
	"os/signal"
	"syscall"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"github.com/spf13/cobra"
	"golang.org/x/sync/errgroup"
	"k8s.io/klog/v2"

	"github.com/oneagent-csi/oneagent-csi/injector"
)

func newInjectorCommand() *cobra.Command {
	var (
		configPath, certFile, keyFile, addr, httpAddr string
		certInterval                                  time.Duration
	)
	cmd := &cobra.Command{
		Use:   "injector",
		Short: "Run the mutating admission webhook that wires pods for the agent (Deployment container)",
		Long: `Run the HTTPS mutating admission webhook. It serves ` + injector.PathNamespaceOptIn + ` (for namespaces labelled
oneagent.dynatrace.com/inject=true) and ` + injector.PathPodOptIn + ` (pods opted in by annotation), never denies a pod,
and needs no Kubernetes API access. The certificate files are re-read when they change.`,
		Args: cobra.NoArgs,
		RunE: func(_ *cobra.Command, _ []string) error {
			cfg, err := injector.LoadConfig(configPath)
			if err != nil {
				return err
			}
			cfg.Version = version
			certs, err := injector.NewCertReloader(certFile, keyFile, certInterval)
			if err != nil {
				return fmt.Errorf("--cert-file/--key-file: %w", err)
			}
			ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM, syscall.SIGINT)
			defer stop()
			return runInjector(ctx, &cfg, certs, addr, httpAddr)
		},
	}
	f := cmd.Flags()
	f.StringVar(&configPath, "config", "/etc/oneagent-csi/injector.yaml", "injector config file (YAML, see README)")
	f.StringVar(&certFile, "cert-file", "/etc/oneagent-csi/tls/tls.crt", "TLS certificate (PEM) of the webhook; reloaded when it changes")
	f.StringVar(&keyFile, "key-file", "/etc/oneagent-csi/tls/tls.key", "TLS private key (PEM) of the webhook")
	f.DurationVar(&certInterval, "cert-check-interval", 10*time.Second, "how often the certificate files are checked for rotation")
	f.StringVar(&addr, "addr", ":8443", "HTTPS address of the webhook")
	f.StringVar(&httpAddr, "http-addr", ":8080", "plain HTTP address of /healthz, /readyz and /metrics")
	return cmd
}

func runInjector(ctx context.Context, cfg *injector.Config, certs *injector.CertReloader, addr, httpAddr string) error {
	reg := prometheus.NewRegistry()
	reg.MustRegister(collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))
	srv, err := injector.NewServer(injector.ServerOptions{Config: cfg, Certs: certs, Registerer: reg, Gatherer: reg})
	if err != nil {
		return err
	}
	ln, err := net.Listen("tcp", addr)
	if err != nil {
		return fmt.Errorf("--addr: %w", err)
	}
	httpLn, err := net.Listen("tcp", httpAddr)
	if err != nil {
		_ = ln.Close()
		return fmt.Errorf("--http-addr: %w", err)
	}
	g, gctx := errgroup.WithContext(ctx)
	serveHTTP(g, gctx, tls.NewListener(ln, certs.TLSConfig()), srv.Handler(), "webhook")
	serveHTTP(g, gctx, httpLn, srv.HealthHandler(), "http")
	klog.InfoS("injector serving", "addr", ln.Addr().String(), "httpAddr", httpLn.Addr().String(),
		"defaultTenant", cfg.DefaultTenant, "ignoredNamespaces", cfg.IgnoredNamespaces)
	err = g.Wait()
	klog.InfoS("injector stopped", "err", err)
	return err
}
