package provisioner

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"time"

	"github.com/spf13/afero"
	"k8s.io/klog/v2"

	"github.com/oneagent-csi/oneagent-csi/storage"
)

// ruxitConfPath is the file of a code module the tenant layer overrides.
const ruxitConfPath = "agent/conf/ruxitagentproc.conf"

// processModuleConfig returns the tenant's processmoduleconfig, fresh for
// ConfigTTL and then stale-while-revalidate (see staleCache).
func (p *Provisioner) processModuleConfig(ctx context.Context, c *Client) (ProcessModuleConfig, error) {
	pmc, _, err := p.configs.get(ctx, c.Tenant().Name, 2*time.Minute, c.ProcessModuleConfig)
	if err != nil {
		return pmc, fmt.Errorf("tenant %q: processmoduleconfig: %w", c.Tenant().Name, err)
	}
	return pmc, nil
}

// layerRev names a layer by the tenant's config revision and a digest of
// everything that goes into it, so a layer dir never changes once written.
func layerRev(pmc ProcessModuleConfig, artifactID string) string {
	props := append([]Property(nil), pmc.Properties...)
	sort.SliceStable(props, func(i, j int) bool {
		if props[i].Section != props[j].Section {
			return props[i].Section < props[j].Section
		}
		return props[i].Key < props[j].Key
	})
	h := sha256.New()
	h.Write([]byte(artifactID))
	_ = json.NewEncoder(h).Encode(props)
	return "r" + strconv.FormatInt(pmc.Revision, 10) + "-" + hex.EncodeToString(h.Sum(nil))[:16]
}

// EnsureLayer returns the tenant's config layer for artifact: the artifact's
// ruxitagentproc.conf merged with the tenant's processmoduleconfig, written
// once to tenants/<tenant>/<rev>/. When the tenant cannot be asked and no
// config is cached, the newest existing layer for this artifact is used.
func (p *Provisioner) EnsureLayer(ctx context.Context, tenant string, a storage.Artifact) (storage.TenantLayer, error) {
	c, err := p.client(tenant)
	if err != nil {
		return storage.TenantLayer{}, err
	}
	if !c.HasAPI() {
		// An image without a tenant API: the module's own configuration.
		return p.layerFor(tenant, a, ProcessModuleConfig{})
	}
	if _, _, known := p.configs.peek(tenant); !known {
		// Nothing asked since start-up: a layer from before serves at once
		// while the config is fetched in the background.
		if lay, ok := p.newestLayer(tenant, a.ID); ok {
			p.configs.kick(ctx, tenant, 2*time.Minute, c.ProcessModuleConfig)
			return lay, nil
		}
	}
	pmc, err := p.processModuleConfig(ctx, c)
	if err != nil {
		if lay, ok := p.newestLayer(tenant, a.ID); ok {
			klog.FromContext(ctx).Info("using the newest existing tenant layer, tenant did not answer", "tenant", tenant, "rev", lay.Rev, "err", err)
			return lay, nil
		}
		return storage.TenantLayer{}, err
	}
	return p.layerFor(tenant, a, pmc)
}

// layerFor returns the layer of artifact a with pmc, writing it once.
func (p *Provisioner) layerFor(tenant string, a storage.Artifact, pmc ProcessModuleConfig) (storage.TenantLayer, error) {
	rev := layerRev(pmc, a.ID)
	if lay, err := p.opts.Index.GetLayer(tenant, rev); err == nil {
		if _, serr := p.opts.Fs.Stat(p.opts.Layout.LayerInfoPath(tenant, rev)); serr == nil {
			return lay, nil
		}
	}
	v, err, _ := p.group.Do("layer/"+tenant+"/"+rev, func() (any, error) {
		return p.writeLayer(tenant, rev, a, pmc)
	})
	if err != nil {
		return storage.TenantLayer{}, err
	}
	return v.(storage.TenantLayer), nil
}

func (p *Provisioner) newestLayer(tenant, artifactID string) (storage.TenantLayer, bool) {
	layers, err := p.opts.Index.ListLayers()
	if err != nil {
		return storage.TenantLayer{}, false
	}
	var best storage.TenantLayer
	found := false
	for _, l := range layers {
		if l.Tenant == tenant && l.ArtifactID == artifactID && (!found || l.CreatedAt.After(best.CreatedAt)) {
			best, found = l, true
		}
	}
	return best, found
}

func (p *Provisioner) writeLayer(tenant, rev string, a storage.Artifact, pmc ProcessModuleConfig) (storage.TenantLayer, error) {
	l, fs := p.opts.Layout, p.opts.Fs
	lay := storage.TenantLayer{Tenant: tenant, Rev: rev, ArtifactID: a.ID, Revision: pmc.Revision, CreatedAt: p.opts.Now()}
	if existing, err := storage.ReadLayerInfo(fs, l, tenant, rev); err == nil {
		return existing, p.opts.Index.PutLayer(existing)
	}
	base, err := readFileNoFollow(fs, storage.ServedArtifact(fs, l, a.ID), ruxitConfPath)
	if err != nil && !errors.Is(err, os.ErrNotExist) {
		return lay, fmt.Errorf("read %s of artifact %s: %w", ruxitConfPath, a.ID, err)
	}
	merged := MergeRuxitAgentProcConf(base, pmc.Properties)
	stage := l.TmpEntry(randomName("layer-"))
	defer func() { _ = fs.RemoveAll(stage) }()
	tree := filepath.Join(stage, l.TreeName())
	if err := fs.MkdirAll(filepath.Join(tree, filepath.Dir(ruxitConfPath)), 0o755); err != nil {
		return lay, err
	}
	if err := writeFileSync(fs, filepath.Join(tree, ruxitConfPath), merged, 0o644); err != nil {
		return lay, err
	}
	info, err := json.Marshal(lay)
	if err != nil {
		return lay, err
	}
	if err := writeFileSync(fs, filepath.Join(stage, l.LayerInfoName()), info, 0o644); err != nil {
		return lay, err
	}
	if err := fs.MkdirAll(filepath.Dir(l.TenantLayer(tenant, rev)), 0o755); err != nil {
		return lay, err
	}
	if err := syncFilesystem(fs, stage); err != nil {
		return lay, err
	}
	if err := fs.Rename(stage, l.TenantLayer(tenant, rev)); err != nil {
		if existing, rerr := storage.ReadLayerInfo(fs, l, tenant, rev); rerr == nil {
			return existing, p.opts.Index.PutLayer(existing)
		}
		return lay, fmt.Errorf("install tenant layer %s/%s: %w", tenant, rev, err)
	}
	if err := syncDir(fs, filepath.Dir(l.TenantLayer(tenant, rev))); err != nil {
		return lay, err
	}
	return lay, p.opts.Index.PutLayer(lay)
}

func writeFileSync(fs afero.Fs, path string, data []byte, perm os.FileMode) error {
	f, err := fs.OpenFile(path, os.O_WRONLY|os.O_CREATE|os.O_EXCL, perm)
	if err != nil {
		return err
	}
	if _, err := f.Write(data); err != nil {
		_ = f.Close()
		return err
	}
	if err := f.Sync(); err != nil {
		_ = f.Close()
		return err
	}
	return f.Close()
}

// readFileNoFollow reads root/rel without following a symlink anywhere
// below root: an archive's links are checked to stay inside the artifact,
// but the tenant layer must not depend on that check to keep host files out
// of every pod's config.
func readFileNoFollow(fsys afero.Fs, root, rel string) ([]byte, error) {
	lst, ok := fsys.(afero.Lstater)
	if !ok {
		return nil, fmt.Errorf("filesystem %s cannot tell symlinks", fsys.Name())
	}
	p := root
	for _, part := range strings.Split(filepath.ToSlash(rel), "/") {
		p = filepath.Join(p, part)
		fi, _, err := lst.LstatIfPossible(p)
		if err != nil {
			return nil, err
		}
		if fi.Mode()&os.ModeSymlink != 0 {
			return nil, fmt.Errorf("%s is a symlink: refusing to read through it", p)
		}
	}
	return afero.ReadFile(fsys, p)
}
