package main

import (
	"crypto/tls"
	"fmt"
	"net"
	"os"
	"os/signal"
	"syscall"
	"time"

	"github.com/spf13/cobra"
	"golang.org/x/sync/errgroup"
	"k8s.io/klog/v2"

	"github.com/oneagent-csi/oneagent-csi/mirror"
)

func newMirrorCommand() *cobra.Command {
	var (
		o               mirror.Options
		listen          string
		tlsCert, tlsKey string
	)
	cmd := &cobra.Command{
		Use:   "mirror",
		Short: "Pull-through cache of one registry for code-module images, one upstream fetch per blob",
		Long: `Serve the pull side of the registry API for the images of one upstream registry, caching
manifests and blobs in --dir. However many nodes ask for a blob at once, it is fetched from the
upstream once and every request streams from the copy being written. List it in the tenants'
mirrors (http://<service>:<port> inside the cluster, or host:port with --tls-cert/--tls-key).`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			m, err := mirror.New(o)
			if err != nil {
				return err
			}
			l, err := net.Listen("tcp", listen)
			if err != nil {
				return fmt.Errorf("--listen %s: %w", listen, err)
			}
			if tlsCert != "" || tlsKey != "" {
				pair, err := tls.LoadX509KeyPair(tlsCert, tlsKey)
				if err != nil {
					return fmt.Errorf("--tls-cert/--tls-key: %w", err)
				}
				l = tls.NewListener(l, &tls.Config{Certificates: []tls.Certificate{pair}, MinVersion: tls.VersionTLS12})
			}
			ctx, stop := signal.NotifyContext(cmd.Context(), os.Interrupt, syscall.SIGTERM)
			defer stop()
			klog.InfoS("mirror serving", "listen", l.Addr().String(), "upstream", o.Upstream, "dir", o.Dir)
			g, gctx := errgroup.WithContext(ctx)
			serveHTTP(g, gctx, l, m.Handler(), "mirror")
			return g.Wait()
		},
	}
	f := cmd.Flags()
	f.StringVar(&o.Upstream, "upstream", "", "the registry cached, host[:port] (TLS); required")
	f.StringVar(&o.Dir, "dir", "/var/cache/oneagent-csi-mirror", "where manifests and blobs are cached")
	f.StringVar(&o.PullSecretFile, "pull-secret-file", "", "a .dockerconfigjson with the upstream's credentials, read on every upstream request")
	f.StringVar(&o.CAFile, "ca-file", "", "PEM bundle trusted for the upstream besides the system roots")
	f.DurationVar(&o.TagTTL, "tag-ttl", time.Minute, "how long a tag's answer is reused before the upstream is asked again (the last answer is served while it cannot be asked)")
	f.StringVar(&listen, "listen", ":5000", "address to serve on")
	f.StringVar(&tlsCert, "tls-cert", "", "serve TLS with this certificate (PEM); empty: plain HTTP, for use inside the cluster")
	f.StringVar(&tlsKey, "tls-key", "", "key of --tls-cert")
	_ = cmd.MarkFlagRequired("upstream")
	return cmd
}
