package provisioner

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/url"
	"slices"
	"sort"
	"time"

	"github.com/oneagent-csi/oneagent-csi/provisioner/registry"
)

// CheckStep is one call of a tenant check.
type CheckStep struct {
	// Name: dns, api (TLS, token, reachability), version; image (the
	// registries answer for the tenant's image with the credentials).
	Name string `json:"name"`
	OK   bool   `json:"ok"`
	// Detail says what was found or what failed.
	Detail string `json:"detail"`
}

// TenantCheck is what a node sees of one tenant, making the calls the
// driver makes: its host resolves, the API answers over TLS with the CAs
// configured and accepts the token, and the configured version exists.
type TenantCheck struct {
	Tenant  string `json:"tenant"`
	APIURL  string `json:"apiURL"`
	Version string `json:"version"`
	// Image is the tenant's image, when it has one.
	Image string      `json:"image,omitempty"`
	Steps []CheckStep `json:"steps"`
}

// OK reports whether every step passed.
func (c TenantCheck) OK() bool {
	for _, s := range c.Steps {
		if !s.OK {
			return false
		}
	}
	return true
}

// CheckTenants checks every configured tenant (or only name), each within
// timeout. It bypasses the caches: it asks the tenant now.
func (p *Provisioner) CheckTenants(ctx context.Context, name string, timeout time.Duration) ([]TenantCheck, error) {
	var names []string
	for n := range p.clients {
		if name == "" || n == name {
			names = append(names, n)
		}
	}
	if len(names) == 0 {
		return nil, fmt.Errorf("tenant %q is not configured: %w", name, ErrUnknownTenant)
	}
	sort.Strings(names)
	out := make([]TenantCheck, 0, len(names))
	for _, n := range names {
		cctx, cancel := context.WithTimeout(ctx, timeout)
		out = append(out, p.checkTenant(cctx, p.clients[n]))
		cancel()
	}
	return out, nil
}

func (p *Provisioner) checkTenant(ctx context.Context, c *Client) TenantCheck {
	t := c.Tenant()
	version := t.Version
	if version == "" {
		version = "latest"
	}
	chk := TenantCheck{Tenant: t.Name, APIURL: t.APIURL, Version: version, Image: t.Image}
	add := func(name string, err error, okDetail string) bool {
		if err != nil {
			chk.Steps = append(chk.Steps, CheckStep{Name: name, Detail: err.Error()})
			return false
		}
		chk.Steps = append(chk.Steps, CheckStep{Name: name, OK: true, Detail: okDetail})
		return true
	}
	if puller := p.images[t.Name]; puller != nil {
		// Mirrors first, as a pull does; the resolution is not cached.
		r, err := puller.Resolve(ctx, "")
		if errors.Is(err, registry.ErrUnauthorized) {
			err = fmt.Errorf("%w: check pullSecretFile (the registry's .dockerconfigjson)", err)
		}
		if !add("image", err, fmt.Sprintf("%s is %s for this node's platform (answered by %s)", puller.Image(), r.Digest, r.Host)) || !c.HasAPI() {
			return chk
		}
	}
	u, err := url.Parse(t.APIURL)
	if err != nil {
		add("dns", err, "")
		return chk
	}
	// Through a proxy the proxy resolves the tenant's name.
	if t.Proxy == "" {
		addrs, err := net.DefaultResolver.LookupHost(ctx, u.Hostname())
		if !add("dns", err, fmt.Sprintf("%s resolves to %v", u.Hostname(), addrs)) {
			return chk
		}
	}
	versions, err := c.Versions(ctx)
	if errors.Is(err, ErrUnauthorized) {
		err = fmt.Errorf("%w: check the PaaS token in the tokens Secret (scope InstallerDownload)", err)
	}
	if !add("api", err, fmt.Sprintf("TLS and token accepted, %d versions offered", len(versions))) {
		return chk
	}
	if version == "latest" {
		latest, err := c.LatestVersion(ctx)
		add("version", err, "latest is "+latest)
	} else if slices.Contains(versions, version) {
		add("version", nil, version+" is offered")
	} else {
		add("version", fmt.Errorf("%s is not among the %d versions the tenant offers: %w", version, len(versions), ErrNotFound), "")
	}
	return chk
}
