// Package provisioner makes code-module artifacts and tenant config layers
// present and valid on the node: tenant client, version resolution, download,
// checksum, safe extraction, atomic install, singleflight per artifact and
// background prefetch.
package provisioner

import (
	"errors"
	"fmt"

	"github.com/oneagent-csi/oneagent-csi/provisioner/extract"
)

// Sentinel errors; the driver maps them to gRPC codes in one place.
var (
	// ErrUnknownTenant: the volume names a tenant that is not configured.
	ErrUnknownTenant = errors.New("unknown tenant")
	// ErrInProgress: the artifact is still being downloaded; try again.
	ErrInProgress = errors.New("download in progress")
	// ErrUnauthorized: the tenant refused the token (401 or 403). Not retried.
	ErrUnauthorized = errors.New("tenant refused the token")
	// ErrNotFound: the tenant does not have what was asked for (404). Not retried.
	ErrNotFound = errors.New("not found on tenant")
	// ErrUnavailable: the tenant could not be reached or kept failing (5xx, 429,
	// network errors) after every retry.
	ErrUnavailable = errors.New("tenant unavailable")
	// ErrBadArchive: the downloaded archive is corrupt, truncated or unsafe
	// (the extract package's sentinel, so callers need not import it).
	ErrBadArchive = extract.ErrBadArchive
)

// APIError is an error answer from a tenant.
type APIError struct {
	Tenant string
	Route  string
	Status int
	Body   string
	kind   error
}

func (e *APIError) Error() string {
	msg := fmt.Sprintf("tenant %q: GET %s: HTTP %d", e.Tenant, e.Route, e.Status)
	if e.Body != "" {
		msg += ": " + e.Body
	}
	return msg
}

// Unwrap lets errors.Is match the sentinel that classifies the status.
func (e *APIError) Unwrap() error { return e.kind }
