package provisioner

import (
	"context"
	"time"

	"k8s.io/klog/v2"
)

// Prefetch installs every tenant's configured version (and its config layer)
// now and then every interval (default LatestTTL), so that a new "latest" is
// usually cached before a pod asks for it. It returns when ctx ends. Errors
// are logged, never fatal: publishes fetch on demand anyway.
func (p *Provisioner) Prefetch(ctx context.Context, interval time.Duration) {
	if interval <= 0 {
		interval = p.opts.LatestTTL
	}
	t := time.NewTicker(interval)
	defer t.Stop()
	for {
		p.PrefetchOnce(ctx)
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
	}
}

// PrefetchOnce installs every tenant's configured version once.
func (p *Provisioner) PrefetchOnce(ctx context.Context) {
	for _, name := range p.TenantNames() {
		log := klog.FromContext(ctx).WithValues("tenant", name)
		pctx, cancel := context.WithTimeout(ctx, p.opts.DownloadTimeout)
		prep, err := p.Prepare(klog.NewContext(pctx, log), name, "")
		cancel()
		if err != nil {
			log.Error(err, "prefetch failed")
			continue
		}
		log.V(2).Info("prefetched", "version", prep.Version, "artifact", prep.Artifact.ID, "rev", prep.Layer.Rev)
	}
}
