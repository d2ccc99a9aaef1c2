package provisioner

import (
	"context"
	"errors"
	"fmt"
	"io"
	"path/filepath"
	"strings"
	"time"

	"k8s.io/klog/v2"

	"github.com/oneagent-csi/oneagent-csi/provisioner/extract"
	"github.com/oneagent-csi/oneagent-csi/provisioner/registry"
	"github.com/oneagent-csi/oneagent-csi/storage"
)

// DefaultImagePath is where Dynatrace's code-modules images keep the
// module.
const DefaultImagePath = "opt/dynatrace/oneagent"

// imageFlavor is the flavor of image artifacts' keys: an image is one
// build, its digest says everything.
const imageFlavor = "image"

// imageArch maps the tenant API's arch names to OCI platform ones.
func imageArch(arch string) string {
	switch arch {
	case "x86", "amd64":
		return "amd64"
	case "arm", "arm64":
		return "arm64"
	}
	return arch
}

// newPuller builds the registry source of an image tenant.
// The tenant clients' request and idle timeouts apply to the registry as
// they apply to the tenant API.
func newPuller(t Tenant, arch string, client ClientOptions, limits extract.Limits) (*registry.Puller, error) {
	return registry.New(registry.Source{Image: t.Image, PullSecretFile: t.PullSecretFile, CAFile: t.CAFile,
		Proxy: t.Proxy, Mirrors: t.Mirrors, Arch: imageArch(arch),
		RequestTimeout: client.RequestTimeout, IdleTimeout: client.IdleTimeout, Limits: limits})
}

// imageCacheKey is where the resolution of a tag is kept: the tenant's own
// configured reference under the tenant's name (like latest), a pinned tag
// beside it.
func imageCacheKey(tenant, pin string) string {
	if pin == "" {
		return tenant
	}
	return tenant + ":" + pin
}

// resolveImage returns the manifest digest the tenant's image (or the
// pinned tag of its repository) stands for on this node's platform, with
// the TTL and stale-while-revalidate rules of latest.
func (p *Provisioner) resolveImage(ctx context.Context, c *Client, pin string) (string, error) {
	tenant := c.Tenant().Name
	if pin == "latest" {
		pin = ""
	}
	key := imageCacheKey(tenant, pin)
	puller := p.images[tenant]
	if _, _, ok := p.latest.peek(key); !ok && pin == "" {
		if r, ierr := p.opts.Index.GetResolution(tenant); ierr == nil && strings.HasPrefix(r.Version, "sha256:") {
			p.latest.seed(key, r.Version, time.Time{})
		}
	}
	d, stale, err := p.latest.get(ctx, key, 2*time.Minute, func(ctx context.Context) (string, error) {
		r, err := puller.Resolve(ctx, pin)
		if err != nil {
			return "", imageError(err)
		}
		if prev, _, _ := p.latest.peek(key); prev != r.Digest {
			klog.FromContext(ctx).Info("image resolved", "tenant", tenant, "image", puller.Image(), "tag", pin, "digest", r.Digest, "previous", prev, "registry", r.Host)
			if pin == "" && prev != "" {
				p.previousImage.Store(tenant, prev)
			}
			if pin == "" {
				if err := p.opts.Index.PutResolution(storage.Resolution{Tenant: tenant, Version: r.Digest, ResolvedAt: p.opts.Now()}); err != nil {
					klog.FromContext(ctx).Error(err, "recording image resolution", "tenant", tenant)
				}
			}
		}
		return r.Digest, nil
	})
	if err != nil {
		return "", fmt.Errorf("tenant %q: resolving image %s: %w", tenant, puller.Image(), err)
	}
	if stale {
		klog.FromContext(ctx).V(2).Info("serving the last known image digest while it is refreshed", "tenant", tenant, "digest", d)
	}
	return d, nil
}

// installedOrPreviousImage is installedOrNewest for an image tenant whose
// tag moved: when the digest it now stands for is not installed but the
// one it stood for before is, that one is served while the new one installs
// in the background (one install per node), so no volume waits for a
// download while the module it had is on disk.
func (p *Provisioner) installedOrPreviousImage(ctx context.Context, c *Client, digest string) string {
	key := p.artifactKey(c, digest)
	if _, err := p.cached(key); err == nil {
		return digest
	}
	tenant := c.Tenant().Name
	v, ok := p.previousImage.Load(tenant)
	if !ok {
		return digest // nothing to serve meanwhile: wait for it
	}
	prev := v.(string)
	if _, err := p.cached(p.artifactKey(c, prev)); err != nil {
		return digest
	}
	if p.refused.check(tenant, key, p.opts.Now()) != nil {
		return prev // the new image was refused: keep serving the old one
	}
	if _, running := p.background.LoadOrStore(key.String(), struct{}{}); !running {
		log := klog.FromContext(ctx).WithValues("tenant", tenant, "image", p.images[tenant].Image(), "digest", digest)
		log.Info("the image's tag moved: installing it in the background, volumes get the installed image meanwhile", "serving", prev)
		go func() {
			defer p.background.Delete(key.String())
			ictx, cancel := context.WithTimeout(klog.NewContext(context.Background(), log), p.opts.DownloadTimeout)
			defer cancel()
			if _, err := p.EnsureArtifact(ictx, tenant, digest); err != nil {
				log.Error(err, "background install of the moved tag failed; volumes keep the installed image", "serving", prev)
			}
		}()
	}
	return prev
}

// imageError maps the registry package's sentinels to the provisioner's,
// which the driver turns into gRPC codes.
func imageError(err error) error {
	switch {
	case errors.Is(err, registry.ErrUnauthorized):
		return fmt.Errorf("%w: %w", ErrUnauthorized, err)
	case errors.Is(err, registry.ErrNotFound):
		return fmt.Errorf("%w: %w", ErrNotFound, err)
	case errors.Is(err, registry.ErrUnavailable):
		return fmt.Errorf("%w: %w", ErrUnavailable, err)
	}
	return err
}

// installImageOnce pulls the image with digest key.Version, builds the
// module's tree from its layers while they stream in (into tmp/, a fresh
// stage per registry tried) and commits it as artifact <digest hex>.
func (p *Provisioner) installImageOnce(ctx context.Context, c *Client, key storage.ArtifactKey) (storage.Artifact, error) {
	l, fs := p.opts.Layout, p.opts.Fs
	log := klog.FromContext(ctx)
	t := c.Tenant()
	puller := p.images[t.Name]
	id := strings.TrimPrefix(key.Version, "sha256:")
	if h, err := storage.ReadManifestHeader(fs, l.ArtifactManifest(id)); err == nil && h.ArtifactID == id {
		// Installed already (another tenant uses the same image).
		a := storage.Artifact{ID: id, Version: key.Version, Flavor: key.Flavor, Arch: key.Arch, ZipSize: h.ZipSize,
			Size: h.Size, Files: h.Files, State: storage.ArtifactReady, InstalledAt: h.InstalledAt, LastUsed: p.opts.Now(), Image: h.Image}
		return a, p.opts.Index.PutArtifact(a, key)
	}
	imagePath := t.ImagePath
	if imagePath == "" {
		imagePath = DefaultImagePath
	}
	var stages []string
	defer func() {
		for _, s := range stages {
			_ = fs.RemoveAll(s)
		}
	}()
	var layers *extract.Layers
	var pulled countingTree
	start := p.opts.Now()
	host, err := puller.Pull(ctx, key.Version, func() (registry.Tree, error) {
		for _, s := range stages {
			_ = fs.RemoveAll(s) // the previous registry's partial tree
		}
		stage := l.TmpEntry(randomName("image-"))
		stages = append(stages, stage)
		if err := fs.Mkdir(stage, 0o755); err != nil {
			return nil, err
		}
		var err error
		layers, err = extract.NewLayers(fs, filepath.Join(stage, l.TreeName()), imagePath,
			extract.Options{Limits: p.opts.Limits, PageCache: p.opts.PageCache})
		pulled = countingTree{tree: layers}
		return &pulled, err
	})
	var ex extract.Result
	if err == nil {
		ex, err = layers.Finish()
	}
	if err != nil {
		err = fmt.Errorf("tenant %q image %s@%s: %w", t.Name, puller.Image(), key.Version, imageError(err))
		p.metrics.imagePulls.WithLabelValues(failureCause(err)).Inc()
		if errors.Is(err, ErrBadArchive) {
			// The digest names the content: pulling it again brings the
			// same refusal, so it waits like a refused ZIP.
			until := p.refused.remember(t.Name, key, id, err, p.opts.Now(), p.opts.RefusalBackoff)
			log.Error(err, "image refused; it is not pulled again before", "until", until.Format(time.RFC3339))
		}
		return storage.Artifact{}, err
	}
	p.metrics.imagePulls.WithLabelValues("ok").Inc()
	p.metrics.downloadBytes.Add(float64(pulled.bytes))
	now := p.opts.Now()
	a := storage.Artifact{ID: id, Version: key.Version, Flavor: key.Flavor, Arch: key.Arch, ZipSize: pulled.bytes,
		Size: ex.Size, Files: ex.Files, State: storage.ArtifactReady, InstalledAt: now, LastUsed: now, Image: puller.Repository()}
	if err := p.commitArtifact(stages[len(stages)-1], a, key, ex.Entries); err != nil {
		return storage.Artifact{}, err
	}
	log.Info("installed code module from image", "artifact", id, "image", puller.Image(), "digest", key.Version, "registry", host,
		"layerBytes", pulled.bytes, "files", ex.Files, "bytes", ex.Size, "took", now.Sub(start).Round(time.Millisecond))
	return a, nil
}

// countingTree counts the compressed bytes of the layers it applies.
type countingTree struct {
	tree  registry.Tree
	bytes int64
}

func (c *countingTree) Apply(ctx context.Context, layer io.Reader, compressedSize int64) error {
	c.bytes += compressedSize
	return c.tree.Apply(ctx, layer, compressedSize)
}
