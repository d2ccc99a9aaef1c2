// Package api holds the contract shared by the node driver and the injector:
// the driver name, volume-attribute keys, annotation keys, defaults and the
// validation of volume attributes. It imports neither gRPC nor Kubernetes so
// that every part of oneagent-csi can depend on it.
package api

import "time"

// DefaultDriverName is the CSI driver name registered with kubelet and used in
// the CSIDriver object and in injected pods.
const DefaultDriverName = "csi.oneagent.dynatrace.com"

// Volume attribute keys (volumeAttributes of the inline CSI volume).
const (
	// AttrMode selects app (overlay of the code module) or host (bind of the
	// tenant's host storage). Default app.
	AttrMode = "mode"
	// AttrDynakube names the tenant; kept for compatibility with pods injected
	// by the Dynatrace operator.
	AttrDynakube = "dynakube"
	// AttrTenant is an alias of AttrDynakube.
	AttrTenant = "tenant"
	// AttrVersion pins a code module version; empty means the tenant's
	// configured version.
	AttrVersion = "version"
	// AttrRetryTimeout is a Go duration after which a publish that still cannot
	// provide the agent fails open with an empty read-only directory.
	AttrRetryTimeout = "retryTimeout"
	// AttrWritable set to "true" adds a per-volume writable upper layer.
	AttrWritable = "writable"
)

// Keys kubelet adds to the volume context because the CSIDriver object sets
// podInfoOnMount: true.
const (
	PodNameKey        = "csi.storage.k8s.io/pod.name"
	PodNamespaceKey   = "csi.storage.k8s.io/pod.namespace"
	PodUIDKey         = "csi.storage.k8s.io/pod.uid"
	ServiceAccountKey = "csi.storage.k8s.io/serviceAccount.name"
	EphemeralKey      = "csi.storage.k8s.io/ephemeral"
)

// Mode is the kind of volume a pod asks for.
type Mode string

const (
	// ModeApp serves the code module read-only as an overlay.
	ModeApp Mode = "app"
	// ModeHost bind-mounts the tenant's host-agent storage.
	ModeHost Mode = "host"
)

// DefaultRetryTimeout is how long publishes of one volume are retried before
// the volume fails open.
const DefaultRetryTimeout = 10 * time.Minute

// Annotation and label keys of the injection contract (DESIGN §5).
const (
	InjectLabel              = "oneagent.dynatrace.com/inject"
	InjectAnnotation         = "oneagent.dynatrace.com/inject"
	LegacyInjectAnnotation   = "dynatrace.com/inject"
	ContainerInjectPrefix    = "container.inject.dynatrace.com/"
	TenantAnnotation         = "oneagent.dynatrace.com/tenant"
	VersionAnnotation        = "oneagent.dynatrace.com/version"
	InjectedAnnotation       = "oneagent.dynatrace.com/injected"
	ReasonAnnotation         = "oneagent.dynatrace.com/reason"
	AgentVolumeName          = "oneagent"
	ConfigVolumeName         = "oneagent-config"
	InitContainerName        = "dynatrace-oneagent-init"
	AgentMountPath           = "/opt/dynatrace/oneagent-paas"
	ConfigMountPath          = "/var/lib/dynatrace/oneagent"
	AgentLibraryRelativePath = "agent/lib64/liboneagentproc.so"
)
