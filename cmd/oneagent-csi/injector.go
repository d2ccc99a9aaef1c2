package main

import (
	"context"
	"crypto/tls"
	"fmt"
	"net"
	"os"
	"os/signal"
	"syscall"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"github.com/spf13/cobra"
	"golang.org/x/sync/errgroup"
	"k8s.io/client-go/rest"
	"k8s.io/client-go/tools/clientcmd"
	"k8s.io/klog/v2"

	"github.com/oneagent-csi/oneagent-csi/injector"
	"github.com/oneagent-csi/oneagent-csi/injector/selftls"
)

// Certificate modes of the injector.
const (
	certModeSelf  = "self"
	certModeFiles = "files"
)

type injectorFlags struct {
	configPath, addr, httpAddr string
	certMode                   string
	certFile, keyFile          string
	certInterval               time.Duration
	kubeconfig                 string
	self                       selftls.Options
}

func newInjectorCommand() *cobra.Command {
	var fl injectorFlags
	cmd := &cobra.Command{
		Use:   "injector",
		Short: "Run the mutating admission webhook that wires pods for the agent (Deployment container)",
		Long: `Run the HTTPS mutating admission webhook. It serves ` + injector.PathNamespaceOptIn + ` (for namespaces labelled
oneagent.dynatrace.com/inject=true) and ` + injector.PathPodOptIn + ` (pods opted in by annotation) and never denies a pod.

--cert-mode=self (the default) provisions its own TLS: a CA and a serving certificate in the Secret --cert-secret of
its namespace, shared by all replicas, and the caBundle of the MutatingWebhookConfiguration --webhook-config kept
current, rotated before expiry without a failed admission. It needs get/update on exactly that Secret and that
webhook configuration (deploy/kubernetes/injector-rbac.yaml). --cert-mode=files serves --cert-file/--key-file (for
example from cert-manager) and needs no Kubernetes API access; the files are re-read when they change.`,
		Args: cobra.NoArgs,
		RunE: func(_ *cobra.Command, _ []string) error {
			cfg, err := injector.LoadConfig(fl.configPath)
			if err != nil {
				return err
			}
			cfg.Version = version
			ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM, syscall.SIGINT)
			defer stop()
			return runInjector(ctx, &cfg, &fl)
		},
	}
	f := cmd.Flags()
	f.StringVar(&fl.configPath, "config", "/etc/oneagent-csi/injector.yaml", "injector config file (YAML, see README)")
	f.StringVar(&fl.addr, "addr", ":8443", "HTTPS address of the webhook")
	f.StringVar(&fl.httpAddr, "http-addr", ":8080", "plain HTTP address of /healthz, /readyz and /metrics")
	f.StringVar(&fl.certMode, "cert-mode", certModeSelf, "where the serving certificate comes from: self (provisioned in a Secret, caBundle kept current) or files (--cert-file/--key-file)")
	f.StringVar(&fl.certFile, "cert-file", "/etc/oneagent-csi/tls/tls.crt", "files mode: TLS certificate (PEM) of the webhook; reloaded when it changes")
	f.StringVar(&fl.keyFile, "key-file", "/etc/oneagent-csi/tls/tls.key", "files mode: TLS private key (PEM) of the webhook")
	f.DurationVar(&fl.certInterval, "cert-check-interval", 10*time.Second, "how often the certificate is checked: files re-read (files mode) or Secret and webhook synced (self mode)")
	f.StringVar(&fl.kubeconfig, "kubeconfig", "", "self mode: kubeconfig file; default the in-cluster service account")
	f.StringVar(&fl.self.SecretName, "cert-secret", "oneagent-csi-injector-certs", "self mode: the Secret (in the injector's namespace) holding the CA bundle and serving certificate")
	f.StringVar(&fl.self.WebhookName, "webhook-config", "oneagent-csi-injector", "self mode: the MutatingWebhookConfiguration whose caBundle is kept current")
	f.StringVar(&fl.self.ServiceName, "service", "oneagent-csi-injector", "self mode: the webhook's Service; the certificate names <service>.<namespace>.svc[.cluster.local]")
	f.StringSliceVar(&fl.self.Hosts, "cert-hosts", nil, "self mode: DNS names and IPs the certificate names instead of the Service's (a webhook registered by URL)")
	f.DurationVar(&fl.self.Validity, "cert-validity", 90*24*time.Hour, "self mode: validity of a generated CA and certificate")
	f.DurationVar(&fl.self.RenewBefore, "cert-renew-before", 0, "self mode: rotate this long before expiry; default a third of --cert-validity")
	f.DurationVar(&fl.self.Settle, "cert-settle", time.Minute, "self mode: how long the webhook must trust a new CA before replicas serve the new certificate")
	return cmd
}

// certSource builds the certificate source of the chosen mode; run is its
// background loop (nil for files).
func certSource(fl *injectorFlags, cfg *injector.Config) (src interface {
	injector.CertSource
	TLSConfig() *tls.Config
}, run func(context.Context), err error) {
	switch fl.certMode {
	case certModeFiles:
		r, err := injector.NewCertReloader(fl.certFile, fl.keyFile, fl.certInterval)
		if err != nil {
			return nil, nil, fmt.Errorf("--cert-file/--key-file: %w", err)
		}
		return r, nil, nil
	case certModeSelf:
		rc, err := restConfig(fl.kubeconfig)
		if err != nil {
			return nil, nil, err
		}
		client, err := selftls.NewClient(rc)
		if err != nil {
			return nil, nil, err
		}
		opts := fl.self
		opts.Client, opts.Namespace, opts.Interval = client, cfg.OwnNamespace, fl.certInterval
		p, err := selftls.New(opts)
		if err != nil {
			return nil, nil, fmt.Errorf("--cert-mode=self: %w", err)
		}
		return p, p.Run, nil
	default:
		return nil, nil, fmt.Errorf("--cert-mode %q: want %s or %s", fl.certMode, certModeSelf, certModeFiles)
	}
}

func restConfig(kubeconfig string) (*rest.Config, error) {
	if kubeconfig == "" {
		kubeconfig = os.Getenv("KUBECONFIG")
	}
	if kubeconfig != "" {
		rc, err := clientcmd.BuildConfigFromFlags("", kubeconfig)
		if err != nil {
			return nil, fmt.Errorf("--kubeconfig %s: %w", kubeconfig, err)
		}
		return rc, nil
	}
	rc, err := rest.InClusterConfig()
	if err != nil {
		return nil, fmt.Errorf("in-cluster config (set --kubeconfig outside a pod): %w", err)
	}
	return rc, nil
}

func runInjector(ctx context.Context, cfg *injector.Config, fl *injectorFlags) error {
	certs, certLoop, err := certSource(fl, cfg)
	if err != nil {
		return err
	}
	reg := prometheus.NewRegistry()
	reg.MustRegister(collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))
	srv, err := injector.NewServer(injector.ServerOptions{Config: cfg, Certs: certs, Registerer: reg, Gatherer: reg})
	if err != nil {
		return err
	}
	ln, err := net.Listen("tcp", fl.addr)
	if err != nil {
		return fmt.Errorf("--addr: %w", err)
	}
	httpLn, err := net.Listen("tcp", fl.httpAddr)
	if err != nil {
		_ = ln.Close()
		return fmt.Errorf("--http-addr: %w", err)
	}
	g, gctx := errgroup.WithContext(ctx)
	if certLoop != nil {
		g.Go(func() error { certLoop(gctx); return nil })
	}
	serveHTTP(g, gctx, tls.NewListener(ln, certs.TLSConfig()), srv.Handler(), "webhook")
	serveHTTP(g, gctx, httpLn, srv.HealthHandler(), "http")
	klog.InfoS("injector serving", "addr", ln.Addr().String(), "httpAddr", httpLn.Addr().String(), "certMode", fl.certMode,
		"defaultTenant", cfg.DefaultTenant, "ignoredNamespaces", cfg.IgnoredNamespaces)
	err = g.Wait()
	klog.InfoS("injector stopped", "err", err)
	return err
}
