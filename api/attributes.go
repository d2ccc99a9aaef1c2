package api

import (
	"fmt"
	"regexp"
	"strconv"
	"time"
)

// VolumeAttributes is the validated form of a publish request's volume context.
type VolumeAttributes struct {
	Mode         Mode
	Tenant       string
	Version      string
	RetryTimeout time.Duration
	Writable     bool
	// Containers are the app containers whose container.conf the driver
	// writes into the volume (AttrContainers); empty when an init
	// container writes it.
	Containers []Container

	PodName        string
	PodNamespace   string
	PodUID         string
	ServiceAccount string
}

// FieldError names the volume attribute that is invalid.
type FieldError struct {
	Field  string
	Value  string
	Reason string
}

func (e *FieldError) Error() string {
	return fmt.Sprintf("volume_context[%q]=%q: %s", e.Field, e.Value, e.Reason)
}

var (
	dns1035      = regexp.MustCompile(`^[a-z]([-a-z0-9]*[a-z0-9])?$`)
	versionShape = regexp.MustCompile(`^[0-9]+\.[0-9]+\.[0-9]+(\.[0-9]{8}-[0-9]{6})?$`)
)

// ValidTenantName reports whether name is a DNS-1035 label of at most 63
// characters, the shape tenant names must have (they become directory names).
func ValidTenantName(name string) bool {
	return len(name) <= 63 && dns1035.MatchString(name)
}

// ValidVersion reports whether v looks like a OneAgent version
// (1.311.72 or 1.311.72.20250410-123003). "latest" is not a valid pin.
func ValidVersion(v string) bool {
	return len(v) <= 64 && versionShape.MatchString(v)
}

// ParseVolumeAttributes validates a volume context. Unknown keys are ignored so
// that pods written by newer injectors still mount. The first invalid attribute
// is returned as a *FieldError.
func ParseVolumeAttributes(ctx map[string]string) (VolumeAttributes, error) {
	a := VolumeAttributes{
		Mode:           ModeApp,
		RetryTimeout:   DefaultRetryTimeout,
		PodName:        ctx[PodNameKey],
		PodNamespace:   ctx[PodNamespaceKey],
		PodUID:         ctx[PodUIDKey],
		ServiceAccount: ctx[ServiceAccountKey],
	}
	// Parsed first and kept even when another attribute is invalid: a
	// volume that fails open still serves the containers' configuration,
	// which their subPath mounts need to exist.
	var containersErr error
	a.Containers, containersErr = ParseContainers(ctx[AttrContainers])
	if m, ok := ctx[AttrMode]; ok && m != "" {
		switch Mode(m) {
		case ModeApp, ModeHost:
			a.Mode = Mode(m)
		default:
			return a, &FieldError{AttrMode, m, `must be "app" or "host"`}
		}
	}
	dk, hasDK := ctx[AttrDynakube]
	tn, hasTN := ctx[AttrTenant]
	switch {
	case hasDK && hasTN && dk != tn:
		return a, &FieldError{AttrTenant, tn, fmt.Sprintf("conflicts with %s=%q", AttrDynakube, dk)}
	case hasDK:
		a.Tenant = dk
	case hasTN:
		a.Tenant = tn
	}
	if a.Tenant != "" && !ValidTenantName(a.Tenant) {
		field := AttrDynakube
		if !hasDK {
			field = AttrTenant
		}
		return a, &FieldError{field, a.Tenant, "must be a DNS-1035 label (lowercase letters, digits, '-', at most 63 characters)"}
	}
	if v, ok := ctx[AttrVersion]; ok && v != "" {
		if v != "latest" && !ValidVersion(v) {
			return a, &FieldError{AttrVersion, v, "must be \"latest\" or a version like 1.311.72.20250410-123003"}
		}
		if a.Mode == ModeHost {
			return a, &FieldError{AttrVersion, v, "is not allowed with mode \"host\""}
		}
		a.Version = v
	}
	if v, ok := ctx[AttrRetryTimeout]; ok && v != "" {
		d, err := time.ParseDuration(v)
		if err != nil {
			return a, &FieldError{AttrRetryTimeout, v, "must be a Go duration such as 10m"}
		}
		if d < 0 {
			return a, &FieldError{AttrRetryTimeout, v, "must not be negative"}
		}
		a.RetryTimeout = d
	}
	if v, ok := ctx[AttrWritable]; ok && v != "" {
		b, err := strconv.ParseBool(v)
		if err != nil {
			return a, &FieldError{AttrWritable, v, `must be "true" or "false"`}
		}
		if b && a.Mode == ModeHost {
			return a, &FieldError{AttrWritable, v, "is not allowed with mode \"host\""}
		}
		a.Writable = b
	}
	if containersErr != nil {
		return a, containersErr
	}
	if len(a.Containers) > 0 && a.Mode == ModeHost {
		return a, &FieldError{AttrContainers, shorten(ctx[AttrContainers]), "is not allowed with mode \"host\""}
	}
	return a, nil
}
