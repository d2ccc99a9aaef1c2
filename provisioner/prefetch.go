package provisioner

import (
	"context"
	"math/rand/v2"
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
	for {
		p.PrefetchOnce(ctx)
		// A random phase per pass (0.5 to 1.5 intervals): nodes started
		// together drift apart, so a fleet checks and downloads a new latest
		// spread over the interval, not at once.
		t := time.NewTimer(prefetchDelay(interval))
		select {
		case <-ctx.Done():
			t.Stop()
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
		prep, err := p.prepare(klog.NewContext(pctx, log), name, "", true)
		cancel()
		if err != nil {
			log.Error(err, "prefetch failed")
			continue
		}
		log.V(2).Info("prefetched", "version", prep.Version, "artifact", prep.Artifact.ID, "rev", prep.Layer.Rev)
	}
}

// prefetchDelay is a random duration in [interval/2, 3*interval/2).
func prefetchDelay(interval time.Duration) time.Duration {
	return interval/2 + time.Duration(rand.Int64N(int64(interval)))
}
