package driver

import (
	"errors"
	"fmt"
	"path"
	"slices"

	"k8s.io/apimachinery/pkg/api/resource"

	"github.com/oneagent-csi/oneagent-csi/api"
	"github.com/oneagent-csi/oneagent-csi/provisioner"
)

// errRefusedByPolicy: the tenant's policy does not let this pod use what the
// volume asks for. App volumes fail open at once; host volumes get
// PermissionDenied.
var errRefusedByPolicy = errors.New("refused by the tenant's policy")

// policyRequest is what a volume asks of a tenant.
type policyRequest struct {
	namespace string
	pin       string // version attribute; "" or "latest" is no pin
	writable  bool
	// pinnedInUse are the distinct versions of the tenant pinned by other
	// volumes on this node now.
	pinnedInUse []string
}

// checkTenantPolicy decides whether a volume may use tenant t. It is a pure
// function of the tenant's config and the request.
func checkTenantPolicy(t provisioner.Tenant, r policyRequest) error {
	if len(t.Namespaces) > 0 && !slices.ContainsFunc(t.Namespaces, func(pattern string) bool {
		ok, err := path.Match(pattern, r.namespace)
		return err == nil && ok
	}) {
		return fmt.Errorf("namespace %q may not use tenant %q (its namespaces: %v): %w", r.namespace, t.Name, t.Namespaces, errRefusedByPolicy)
	}
	if r.writable && !t.AllowWritable {
		return fmt.Errorf("tenant %q does not allow writable volumes (allowWritable): %w", t.Name, errRefusedByPolicy)
	}
	if r.pin == "" || r.pin == "latest" {
		return nil
	}
	switch {
	case len(t.VersionPins) == 0 || slices.Contains(t.VersionPins, "any"):
	case slices.Contains(t.VersionPins, "none"):
		return fmt.Errorf("tenant %q allows no version pins (%s %q): %w", t.Name, api.AttrVersion, r.pin, errRefusedByPolicy)
	case !slices.Contains(t.VersionPins, r.pin):
		return fmt.Errorf("tenant %q does not allow pinning version %q (allowed: %v): %w", t.Name, r.pin, t.VersionPins, errRefusedByPolicy)
	}
	if t.MaxPinnedVersions > 0 && !slices.Contains(r.pinnedInUse, r.pin) && len(r.pinnedInUse) >= t.MaxPinnedVersions {
		return fmt.Errorf("tenant %q has %d pinned versions in use on this node %v, its maxPinnedVersions: %w",
			t.Name, len(r.pinnedInUse), r.pinnedInUse, errRefusedByPolicy)
	}
	return nil
}

// ValidateTenantPolicy checks a tenant's policy fields; errors name the field.
func ValidateTenantPolicy(t provisioner.Tenant) error {
	for _, p := range t.Namespaces {
		if _, err := path.Match(p, ""); err != nil {
			return fmt.Errorf("namespaces: %q is not a valid glob", p)
		}
	}
	for _, v := range t.VersionPins {
		if (v == "any" || v == "none") && len(t.VersionPins) > 1 {
			return fmt.Errorf("versionPins: %q must stand alone", v)
		}
		if v != "any" && v != "none" && !api.ValidVersion(v) {
			return fmt.Errorf("versionPins: %q is not any, none or a version like 1.311.72.20250410-123003", v)
		}
	}
	if t.MaxPinnedVersions < 0 {
		return fmt.Errorf("maxPinnedVersions: %d must not be negative", t.MaxPinnedVersions)
	}
	if _, err := writableSize(t); err != nil {
		return err
	}
	return nil
}

// DefaultWritableSize caps a writable volume's upper layer when the tenant
// sets no writableSize.
const DefaultWritableSize = 64 << 20

// writableSize is the tenant's cap of a writable volume's upper layer.
func writableSize(t provisioner.Tenant) (int64, error) {
	if t.WritableSize == "" {
		return DefaultWritableSize, nil
	}
	q, err := resource.ParseQuantity(t.WritableSize)
	if err != nil || q.Value() < 1<<20 {
		return 0, fmt.Errorf("writableSize: %q must be a size of at least 1Mi, such as 64Mi", t.WritableSize)
	}
	return q.Value(), nil
}
