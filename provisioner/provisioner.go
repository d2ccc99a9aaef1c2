package provisioner

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"runtime"
	"sort"
	"sync"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/spf13/afero"
	"golang.org/x/sync/singleflight"
	"k8s.io/klog/v2"

	"github.com/oneagent-csi/oneagent-csi/api"
	"github.com/oneagent-csi/oneagent-csi/internal/diskio"
	"github.com/oneagent-csi/oneagent-csi/provisioner/extract"
	"github.com/oneagent-csi/oneagent-csi/provisioner/registry"
	"github.com/oneagent-csi/oneagent-csi/storage"
)

// Options configure a Provisioner. Zero fields take the documented defaults.
type Options struct {
	// Layout of the data dir. Required.
	Layout storage.Layout
	// Index is the open bbolt index. Required.
	Index *storage.Index
	// Fs is rooted at the data dir. Default: afero.NewBasePathFs(OsFs, Layout.Root()),
	// so nothing can be written outside the data dir.
	Fs afero.Fs
	// Tenants are the configured tenants. Names must be unique DNS-1035 labels.
	Tenants []Tenant
	// Client tunes the tenant clients (timeouts, retries).
	Client ClientOptions
	// Arch is the code module architecture asked for. Default: x86 on amd64,
	// arm on arm64, else GOARCH.
	Arch string
	// DownloadTimeout bounds one whole install (download + extraction) on its
	// own context, detached from the callers that wait for it. Default 30m.
	DownloadTimeout time.Duration
	// DownloadAttempts is how often an install is tried when the body breaks
	// off, is truncated or corrupt. Default 3.
	DownloadAttempts int
	// LatestTTL is how long a resolution of "latest" is reused, so that a burst
	// of pods costs one metainfo call. Default 5m.
	LatestTTL time.Duration
	// ConfigTTL is how long a tenant's processmoduleconfig is reused. Default 5m.
	ConfigTTL time.Duration
	// RefusalBackoff is how long a version whose archive was refused (unsafe,
	// corrupt) is not downloaded again; it doubles per refusal of the same
	// archive, up to an hour. Default 1m.
	RefusalBackoff time.Duration
	// RefreshBackoff is the first wait before a failed background refresh of
	// latest or the processmoduleconfig is tried again; it doubles up to the
	// TTL. Default 10s.
	RefreshBackoff time.Duration
	// Limits bound extraction (see Limits for defaults).
	Limits extract.Limits
	// ExtractWorkers is the number of files extracted in parallel. Default:
	// as many as ExtractMemory holds, at least 1 and at most GOMAXPROCS.
	ExtractWorkers int
	// ExtractMemory is the memory the extraction workers' buffers may take
	// (each worker holds about extract.WorkerMemory); it sizes the worker pool
	// where ExtractWorkers is not set, so a 64-core node does not take 64
	// workers' buffers. Default 8 MiB.
	ExtractMemory int64
	// PageCache bounds the written data an install keeps dirty or under
	// writeback in the page cache, which a container's memory limit counts
	// too. Default diskio.DefaultPageCache (8 MiB).
	PageCache int64
	// Now is the clock. Default time.Now.
	Now func() time.Time
	// Registerer receives the provisioner's metrics. Default: none.
	Registerer prometheus.Registerer
	// GC bounds the cache (see GCOptions for defaults).
	GC GCOptions
}

func (o *Options) defaults() {
	if o.Fs == nil {
		o.Fs = afero.NewBasePathFs(afero.NewOsFs(), o.Layout.Root())
	}
	if o.Arch == "" {
		o.Arch = DefaultArch()
	}
	if o.DownloadTimeout == 0 {
		o.DownloadTimeout = 30 * time.Minute
	}
	if o.DownloadAttempts == 0 {
		o.DownloadAttempts = 3
	}
	if o.LatestTTL == 0 {
		o.LatestTTL = 5 * time.Minute
	}
	if o.ConfigTTL == 0 {
		o.ConfigTTL = 5 * time.Minute
	}
	if o.RefusalBackoff == 0 {
		o.RefusalBackoff = time.Minute
	}
	if o.RefreshBackoff == 0 {
		o.RefreshBackoff = 10 * time.Second
	}
	if o.Now == nil {
		o.Now = time.Now
	}
	if o.ExtractMemory == 0 {
		o.ExtractMemory = 8 << 20
	}
	if o.PageCache == 0 {
		o.PageCache = diskio.DefaultPageCache
	}
	if o.ExtractWorkers == 0 {
		o.ExtractWorkers = extract.WorkersFor(o.ExtractMemory)
	}
	if o.Limits.MaxDirectoryBytes == 0 {
		// A ZIP's directory is held and parsed inside the extraction's
		// memory budget.
		o.Limits.MaxDirectoryBytes = max(o.ExtractMemory/2, 1<<20)
	}
	o.Limits.Defaults()
	o.GC.defaults()
}

// DefaultArch maps GOARCH to the tenant API's arch parameter.
func DefaultArch() string {
	switch runtime.GOARCH {
	case "amd64":
		return "x86"
	case "arm64":
		return "arm"
	case "ppc64le":
		return "ppcle"
	}
	return runtime.GOARCH
}

// Provisioner makes artifacts and tenant layers present. Safe for concurrent use.
type Provisioner struct {
	opts    Options
	clients map[string]*Client
	group   singleflight.Group
	metrics *metrics

	latest  *staleCache[string]
	configs *staleCache[ProcessModuleConfig]
	refused refusals
	// images are the registry sources of tenants with an image.
	images map[string]*registry.Puller
	// previousImage holds, per image tenant, the digest its tag stood for
	// before the last change (served while the new one installs).
	previousImage sync.Map
	// background holds the artifact keys installing in the background.
	background sync.Map
	// downloadFirst holds the tenants whose ZIPs changed between the range
	// request and the download: their ZIPs are downloaded whole from then on.
	downloadFirst sync.Map

	gc gcState
}

// New validates the options and builds a Provisioner.
func New(opts Options) (*Provisioner, error) {
	opts.defaults()
	if opts.Index == nil {
		return nil, errors.New("provisioner: Index is required")
	}
	p := &Provisioner{opts: opts, clients: map[string]*Client{}, images: map[string]*registry.Puller{},
		latest:  newStaleCache[string](opts.LatestTTL, opts.RefreshBackoff, opts.Now),
		configs: newStaleCache[ProcessModuleConfig](opts.ConfigTTL, opts.RefreshBackoff, opts.Now),
		metrics: newMetrics(opts.Registerer),
		gc:      gcState{leases: map[string]time.Time{}, poke: make(chan struct{}, 1)}}
	p.latest.refreshed = func(result string) { p.metrics.refreshes.WithLabelValues("latest", result).Inc() }
	p.configs.refreshed = func(result string) { p.metrics.refreshes.WithLabelValues("config", result).Inc() }
	for i, t := range opts.Tenants {
		if !api.ValidTenantName(t.Name) {
			return nil, fmt.Errorf("tenants[%d].name %q: must be a DNS-1035 label", i, t.Name)
		}
		if _, dup := p.clients[t.Name]; dup {
			return nil, fmt.Errorf("tenants[%d].name %q: duplicate", i, t.Name)
		}
		if t.Version == "" {
			t.Version = "latest"
		}
		if t.Version != "latest" && !api.ValidVersion(t.Version) {
			return nil, fmt.Errorf("tenants[%d].version %q: must be latest or a version like 1.311.72.20250410-123003", i, t.Version)
		}
		switch t.Flavor {
		case "":
			t.Flavor = "default"
		case "default", "multidistro", "musl":
		default:
			return nil, fmt.Errorf("tenants[%d].flavor %q: must be default, multidistro or musl", i, t.Flavor)
		}
		if t.APIURL == "" && t.Image == "" {
			return nil, fmt.Errorf("tenants[%d] %q: apiURL or image: at least one must be set", i, t.Name)
		}
		if t.Image != "" {
			if t.Version != "latest" {
				return nil, fmt.Errorf("tenants[%d].version %q: an image tenant follows its image's tag; put the version in image", i, t.Version)
			}
			puller, err := newPuller(t, opts.Arch, opts.Client, opts.Limits)
			if err != nil {
				return nil, fmt.Errorf("tenants[%d] %q: %w", i, t.Name, err)
			}
			p.images[t.Name] = puller
		}
		c, err := NewClient(t, opts.Client)
		if err != nil {
			return nil, fmt.Errorf("tenants[%d]: %w", i, err)
		}
		p.clients[t.Name] = c
	}
	return p, nil
}

// TenantNames lists the configured tenants, sorted.
func (p *Provisioner) TenantNames() []string {
	names := make([]string, 0, len(p.clients))
	for n := range p.clients {
		names = append(names, n)
	}
	sort.Strings(names)
	return names
}

// DefaultTenant is the tenant a volume without a tenant attribute gets: the
// only configured tenant, or "" when there are several.
func (p *Provisioner) DefaultTenant() string {
	if len(p.clients) == 1 {
		for n := range p.clients {
			return n
		}
	}
	return ""
}

// TenantConfig returns a configured tenant's settings and policy.
func (p *Provisioner) TenantConfig(name string) (Tenant, bool) {
	c, ok := p.clients[name]
	if !ok {
		return Tenant{}, false
	}
	return c.Tenant(), true
}

func (p *Provisioner) client(tenant string) (*Client, error) {
	c, ok := p.clients[tenant]
	if !ok {
		return nil, fmt.Errorf("tenant %q is not configured: %w", tenant, ErrUnknownTenant)
	}
	return c, nil
}

// Prepared is what an app volume mounts.
type Prepared struct {
	Tenant   string
	Version  string
	Artifact storage.Artifact
	Layer    storage.TenantLayer
	// ArtifactDir and LayerDir are the served dirs (relative to the data
	// dir) that the overlay stacks: the layer over the artifact.
	ArtifactDir, LayerDir string
}

// Prepare resolves the version for tenant (pin overrides the tenant's
// configured version), makes the artifact and the tenant layer present and
// returns them. It waits for a running download only until ctx ends and then
// returns an error wrapping ErrInProgress; the download goes on.
//
// A volume that follows the tenant's latest never waits for a new latest
// while an older version is installed: it gets the newest installed version
// not newer than latest, and latest is installed in the background; volumes
// get latest once its install completes.
func (p *Provisioner) Prepare(ctx context.Context, tenant, pin string) (Prepared, error) {
	return p.prepare(ctx, tenant, pin, false)
}

func (p *Provisioner) prepare(ctx context.Context, tenant, pin string, waitForLatest bool) (Prepared, error) {
	out := Prepared{Tenant: tenant}
	v, err := p.ResolveVersion(ctx, tenant, pin)
	if err != nil {
		return out, err
	}
	if c, _ := p.client(tenant); !waitForLatest && (pin == "" || pin == "latest") && c.Tenant().Version == "latest" {
		if p.images[tenant] != nil {
			v = p.installedOrPreviousImage(ctx, c, v)
		} else {
			v = p.installedOrNewest(ctx, c, v)
		}
	}
	out.Version = v
	// GC may delete the artifact between the index lookup and the lease
	// (the lease is what keeps it from then on): look again once.
	for attempt := 0; ; attempt++ {
		if out.Artifact, err = p.EnsureArtifact(ctx, tenant, v); err != nil {
			return out, err
		}
		if out.Layer, err = p.EnsureLayer(ctx, tenant, out.Artifact); err != nil {
			return out, err
		}
		p.lease(out.Artifact.ID, storage.LayerRef(tenant, out.Layer.Rev))
		_, aerr := p.opts.Index.GetArtifact(out.Artifact.ID)
		_, lerr := p.opts.Index.GetLayer(tenant, out.Layer.Rev)
		if (aerr == nil && lerr == nil) || attempt == 1 {
			break
		}
	}
	out.ArtifactDir = storage.ServedArtifact(p.opts.Fs, p.opts.Layout, out.Artifact.ID)
	out.LayerDir = storage.ServedLayer(p.opts.Fs, p.opts.Layout, tenant, out.Layer.Rev)
	return out, nil
}

// ResolveVersion returns pin if it is a version, the tenant's pinned version,
// or the tenant's latest version. A resolution of latest is reused for
// LatestTTL; after that the last known one (in memory, else from the index)
// is returned at once while one background request refreshes it
// (stale-while-revalidate, with backoff after failures), so a slow or
// unreachable tenant costs a publish nothing once latest was known. Only a
// tenant never resolved on this node is waited for.
func (p *Provisioner) ResolveVersion(ctx context.Context, tenant, pin string) (string, error) {
	c, err := p.client(tenant)
	if err != nil {
		return "", err
	}
	if p.images[tenant] != nil {
		return p.resolveImage(ctx, c, pin)
	}
	if pin != "" && pin != "latest" {
		return pin, nil
	}
	if v := c.Tenant().Version; v != "latest" {
		return v, nil
	}
	if _, _, ok := p.latest.peek(tenant); !ok {
		if r, ierr := p.opts.Index.GetResolution(tenant); ierr == nil {
			// Known from before a restart: serve it, refresh at once.
			p.latest.seed(tenant, r.Version, time.Time{})
		}
	}
	v, stale, err := p.latest.get(ctx, tenant, 2*time.Minute, func(ctx context.Context) (string, error) {
		return p.fetchLatest(ctx, c)
	})
	if err != nil {
		return "", fmt.Errorf("tenant %q: resolving latest version: %w", tenant, err)
	}
	if stale {
		klog.FromContext(ctx).V(2).Info("serving the last known latest version while it is refreshed", "tenant", tenant, "version", v)
	}
	return v, nil
}

// fetchLatest asks the tenant for its latest version and records a change.
func (p *Provisioner) fetchLatest(ctx context.Context, c *Client) (string, error) {
	tenant := c.Tenant().Name
	v, err := c.LatestVersion(ctx)
	if err != nil {
		return "", err
	}
	if !api.ValidVersion(v) {
		return "", fmt.Errorf("tenant %q: latest version %q is not a version", tenant, v)
	}
	if prev, _, _ := p.latest.peek(tenant); prev != v {
		klog.FromContext(ctx).Info("latest version resolved", "tenant", tenant, "version", v, "previous", prev)
		if err := p.opts.Index.PutResolution(storage.Resolution{Tenant: tenant, Version: v, ResolvedAt: p.opts.Now()}); err != nil {
			klog.FromContext(ctx).Error(err, "recording latest version", "tenant", tenant)
		}
	}
	return v, nil
}

// installedOrNewest returns latest when it is installed; otherwise, when an
// older version of the tenant's flavor is installed, it starts installing
// latest in the background and returns the newest installed version.
func (p *Provisioner) installedOrNewest(ctx context.Context, c *Client, latest string) string {
	key := p.artifactKey(c, latest)
	if _, err := p.cached(key); err == nil {
		return latest
	}
	arts, err := p.opts.Index.ListArtifacts()
	if err != nil {
		return latest
	}
	var best storage.Artifact
	for _, a := range arts {
		if a.State != storage.ArtifactReady || a.Flavor != key.Flavor || a.Arch != key.Arch || CompareVersions(a.Version, latest) >= 0 {
			continue
		}
		if best.ID == "" || CompareVersions(a.Version, best.Version) > 0 {
			if _, err := p.cached(p.artifactKey(c, a.Version)); err == nil {
				best = a
			}
		}
	}
	if best.ID == "" {
		return latest // nothing to serve meanwhile: wait for it
	}
	tenant := c.Tenant().Name
	if p.refused.check(tenant, key, p.opts.Now()) != nil {
		// latest's archive was refused: serve the installed version without
		// starting (and logging) an install that would fail at once.
		return best.Version
	}
	if _, running := p.background.LoadOrStore(key.String(), struct{}{}); !running {
		log := klog.FromContext(ctx).WithValues("tenant", tenant, "version", latest)
		log.Info("new latest version: installing it in the background, volumes get the installed version meanwhile", "serving", best.Version)
		go func() {
			defer p.background.Delete(key.String())
			ictx, cancel := context.WithTimeout(klog.NewContext(context.Background(), log), p.opts.DownloadTimeout)
			defer cancel()
			if _, err := p.EnsureArtifact(ictx, tenant, latest); err != nil {
				log.Error(err, "background install of the latest version failed; volumes keep the installed version", "serving", best.Version)
			}
		}()
	}
	return best.Version
}

// artifactKey is what a tenant's version maps to on disk.
func (p *Provisioner) artifactKey(c *Client, version string) storage.ArtifactKey {
	if c.Tenant().Image != "" {
		return storage.ArtifactKey{Version: version, Flavor: imageFlavor, Arch: p.opts.Arch}
	}
	return storage.ArtifactKey{Version: version, Flavor: c.Tenant().Flavor, Arch: p.opts.Arch}
}

// Cached returns the installed artifact for tenant's version, or an error
// wrapping storage.ErrNotFound.
func (p *Provisioner) Cached(tenant, version string) (storage.Artifact, error) {
	c, err := p.client(tenant)
	if err != nil {
		return storage.Artifact{}, err
	}
	return p.cached(p.artifactKey(c, version))
}

func (p *Provisioner) cached(key storage.ArtifactKey) (storage.Artifact, error) {
	a, err := p.opts.Index.LookupArtifact(key)
	if err != nil {
		return a, err
	}
	if _, err := p.opts.Fs.Stat(p.opts.Layout.ArtifactManifest(a.ID)); err != nil {
		return a, fmt.Errorf("artifact %s is indexed but missing on disk: %w", a.ID, storage.ErrNotFound)
	}
	return a, nil
}

// EnsureArtifact returns the installed artifact of tenant's version,
// downloading it first if needed. However many callers ask at once, one
// download runs, on its own context bounded by DownloadTimeout; a caller
// whose ctx ends first gets an error wrapping ErrInProgress.
func (p *Provisioner) EnsureArtifact(ctx context.Context, tenant, version string) (storage.Artifact, error) {
	c, err := p.client(tenant)
	if err != nil {
		return storage.Artifact{}, err
	}
	key := p.artifactKey(c, version)
	if err := p.refused.check(tenant, key, p.opts.Now()); err != nil {
		return storage.Artifact{}, err
	}
	if a, err := p.cached(key); err == nil {
		// Last-used needs minute precision (for GC); skipping the write keeps
		// the publish hot path free of an index commit.
		if now := p.opts.Now(); now.Sub(a.LastUsed) > time.Minute {
			_ = p.opts.Index.TouchArtifact(a.ID, now)
		}
		return a, nil
	}
	ch := p.group.DoChan("artifact/"+key.String(), func() (any, error) {
		// Check again: a download that just finished is not waited for twice.
		if a, err := p.cached(key); err == nil {
			return a, nil
		}
		ictx, cancel := context.WithTimeout(context.WithoutCancel(ctx), p.opts.DownloadTimeout)
		defer cancel()
		ictx = klog.NewContext(ictx, klog.FromContext(ctx).WithValues("tenant", tenant, "version", version))
		return p.install(ictx, c, key)
	})
	select {
	case res := <-ch:
		if res.Err != nil {
			return storage.Artifact{}, res.Err
		}
		return res.Val.(storage.Artifact), nil
	case <-ctx.Done():
		return storage.Artifact{}, fmt.Errorf("tenant %q version %s: %w", tenant, version, ErrInProgress)
	}
}

func (p *Provisioner) install(ctx context.Context, c *Client, key storage.ArtifactKey) (storage.Artifact, error) {
	log := klog.FromContext(ctx)
	start := p.opts.Now()
	var lastErr error
	for attempt := 1; attempt <= p.opts.DownloadAttempts; attempt++ {
		var a storage.Artifact
		var err error
		if key.Flavor == imageFlavor {
			a, err = p.installImageOnce(ctx, c, key)
		} else {
			a, err = p.installOnce(ctx, c, key)
		}
		if err == nil {
			p.metrics.downloads.WithLabelValues("ok").Inc()
			p.metrics.downloadSeconds.Observe(p.opts.Now().Sub(start).Seconds())
			return a, nil
		}
		lastErr = err
		var again *refusedAgain
		if !errors.As(err, &again) {
			p.metrics.downloads.WithLabelValues(failureCause(err)).Inc()
		}
		// A refused archive comes back the same on a retry: it is
		// remembered instead (see refusals).
		if IsPermanent(err) || errors.Is(err, ErrBadArchive) || ctx.Err() != nil || attempt == p.opts.DownloadAttempts {
			break
		}
		wait := Backoff(c.opts.BackoffBase, c.opts.BackoffMax, attempt)
		log.Info("install failed, retrying", "attempt", attempt, "wait", wait, "err", err)
		select {
		case <-ctx.Done():
		case <-time.After(wait):
		}
	}
	log.Error(lastErr, "install failed")
	return storage.Artifact{}, lastErr
}

func failureCause(err error) string {
	switch {
	case errors.Is(err, ErrUnauthorized):
		return "unauthorized"
	case errors.Is(err, ErrNotFound):
		return "not_found"
	case errors.Is(err, ErrBadArchive):
		return "bad_archive"
	case errors.Is(err, context.DeadlineExceeded), errors.Is(err, context.Canceled):
		return "timeout"
	case errors.Is(err, ErrUnavailable):
		return "unavailable"
	}
	return "other"
}

func randomName(prefix string) string {
	var b [8]byte
	_, _ = rand.Read(b[:])
	return prefix + hex.EncodeToString(b[:])
}

// EnsureHostDir creates the host-mode storage of tenant and returns its
// path relative to the data dir. It is not an error when it exists.
func (p *Provisioner) EnsureHostDir(tenant string) (string, error) {
	if _, err := p.client(tenant); err != nil {
		return "", err
	}
	dir := p.opts.Layout.Host(tenant)
	return dir, p.opts.Fs.MkdirAll(dir, 0o755)
}
