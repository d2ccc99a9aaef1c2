package storage

import (
	"time"

	"github.com/oneagent-csi/oneagent-csi/api"
)

// ArtifactState is the lifecycle state of an artifact record.
type ArtifactState string

const (
	// ArtifactReady means the artifact is fully installed and may be mounted.
	ArtifactReady ArtifactState = "ready"
)

// Artifact describes an installed code module.
type Artifact struct {
	ID          string        `json:"id"`
	Version     string        `json:"version"`
	Flavor      string        `json:"flavor"`
	Arch        string        `json:"arch"`
	ZipSize     int64         `json:"zipSize"`
	Size        int64         `json:"size"`
	Files       int           `json:"files"`
	State       ArtifactState `json:"state"`
	InstalledAt time.Time     `json:"installedAt"`
	LastUsed    time.Time     `json:"lastUsed"`
	// Image is the repository an image artifact was pulled from; its
	// Version is the manifest digest. Empty for ZIP artifacts.
	Image string `json:"image,omitempty"`
}

// ArtifactKey identifies what a tenant asks for; several keys may map to one
// artifact id because the ZIP is tenant-independent.
type ArtifactKey struct {
	Version string
	Flavor  string
	Arch    string
}

func (k ArtifactKey) String() string { return k.Version + "|" + k.Flavor + "|" + k.Arch }

// TenantLayer describes an installed per-tenant config layer.
type TenantLayer struct {
	Tenant     string    `json:"tenant"`
	Rev        string    `json:"rev"`
	ArtifactID string    `json:"artifactID"`
	Revision   int64     `json:"revision"`
	CreatedAt  time.Time `json:"createdAt"`
}

// VolumeState is where a volume is in its publish lifecycle.
type VolumeState string

const (
	// VolumePending: publish was attempted but nothing is mounted yet; the
	// record keeps the first-attempt time that the fail-open timer counts from.
	VolumePending VolumeState = "pending"
	// VolumePublished: the agent is mounted at the target.
	VolumePublished VolumeState = "published"
	// VolumeFailedOpen: an empty read-only dir is mounted at the target.
	VolumeFailedOpen VolumeState = "failedOpen"
)

// Volume is the record of one published (or being published) volume.
type Volume struct {
	ID         string      `json:"id"`
	TargetPath string      `json:"targetPath"`
	Mode       api.Mode    `json:"mode"`
	State      VolumeState `json:"state"`
	Tenant     string      `json:"tenant,omitempty"`
	Version    string      `json:"version,omitempty"`
	// Pinned is set when the volume's version attribute pins a version.
	Pinned         bool      `json:"pinned,omitempty"`
	ArtifactID     string    `json:"artifactID,omitempty"`
	LayerRev       string    `json:"layerRev,omitempty"`
	Writable       bool      `json:"writable,omitempty"`
	ReadOnly       bool      `json:"readOnly"`
	PodName        string    `json:"podName,omitempty"`
	PodNamespace   string    `json:"podNamespace,omitempty"`
	PodUID         string    `json:"podUID,omitempty"`
	ServiceAccount string    `json:"serviceAccount,omitempty"`
	FirstAttempt   time.Time `json:"firstAttempt"`
	PublishedAt    time.Time `json:"publishedAt,omitzero"`
	Reason         string    `json:"reason,omitempty"`
	// Adopted is set for records rebuilt from mountinfo, whose pod details are
	// unknown.
	Adopted bool `json:"adopted,omitempty"`
}

// Resolution is the last version a tenant's "latest" resolved to.
type Resolution struct {
	Tenant     string    `json:"tenant"`
	Version    string    `json:"version"`
	ResolvedAt time.Time `json:"resolvedAt"`
}
