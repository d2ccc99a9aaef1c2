package injector

import (
	"encoding/json"
	"fmt"
	"os"
	"slices"
	"time"

	corev1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/api/resource"
	"k8s.io/apimachinery/pkg/util/validation"
	"sigs.k8s.io/yaml"

	"github.com/oneagent-csi/oneagent-csi/api"
)

// FailurePolicy says what an injected pod does when the agent cannot be
// provided (the driver failed open).
type FailurePolicy string

const (
	// FailureSilent starts the app without the agent (the default).
	FailureSilent FailurePolicy = "silent"
	// FailureFail makes the init container exit non-zero, so the pod does not
	// start without the agent.
	FailureFail FailurePolicy = "fail"
)

// FailurePolicyAnnotation lets a pod choose its own failure policy.
const FailurePolicyAnnotation = "oneagent.dynatrace.com/failure-policy"

// ContainerConfig says who writes the app containers' container.conf.
type ContainerConfig string

const (
	// ContainerConfigInit: the init container dynatrace-oneagent-init
	// writes it into the oneagent-config emptyDir (the default, DESIGN §5).
	ContainerConfigInit ContainerConfig = "init"
	// ContainerConfigDriver: the CSI driver writes it into the agent volume
	// (the containers are listed in the volume attribute "containers") and
	// every app container mounts its own by subPath. The pod has no init
	// container of ours, so it starts faster; it needs every node's driver
	// to be of a version that serves the file (README, "Container
	// configuration from the driver"). Pods whose failure policy is fail,
	// with more than api.MaxContainers app containers, or with an image
	// reference the attribute cannot carry, get the init container.
	ContainerConfigDriver ContainerConfig = "driver"
)

// ContainerConfigAnnotation lets a pod choose who writes its containers'
// container.conf.
const ContainerConfigAnnotation = "oneagent.dynatrace.com/container-config"

// Config is the injector's configuration file (YAML). Every field has a
// default; an empty file is a valid configuration.
type Config struct {
	// DefaultTenant is the tenant of pods without the tenant annotation.
	// Required for injection: without it, such pods are not injected (the
	// reason says so).
	DefaultTenant string `json:"defaultTenant,omitempty"`
	// DefaultVersion pins a code module version for pods without the version
	// annotation. Default: empty, the tenant's configured version.
	DefaultVersion string `json:"defaultVersion,omitempty"`
	// DriverName is the CSI driver of the agent volume. Default
	// csi.oneagent.dynatrace.com.
	DriverName string `json:"driverName,omitempty"`
	// RetryTimeout is the volume's retryTimeout attribute: how long the
	// driver retries before it fails open. Default 10m.
	RetryTimeout Duration `json:"retryTimeout,omitzero"`
	// InitImage is the image of the init container (the same oneagent-csi
	// image). Required.
	InitImage string `json:"initImage,omitempty"`
	// InitImagePullPolicy of the init container. Default IfNotPresent.
	InitImagePullPolicy corev1.PullPolicy `json:"initImagePullPolicy,omitempty"`
	// InstallPath is where app containers see the agent. Default
	// /opt/dynatrace/oneagent-paas.
	InstallPath string `json:"installPath,omitempty"`
	// InitResources of the init container. Default requests 10m CPU / 16Mi,
	// limits 100m CPU / 64Mi.
	InitResources *corev1.ResourceRequirements `json:"initResources,omitempty"`
	// InitUser is the uid and gid the init container runs as when the pod
	// does not set its own non-root user. Default 1001 (never Istio's 1337).
	InitUser int64 `json:"-"`
	// InitUserInherit leaves the init container's uid and gid to the pod or
	// the platform (OpenShift's restricted-v2 assigns one from the
	// namespace's range and rejects a fixed one outside it). Set by
	// `initUser: inherit`.
	InitUserInherit bool `json:"-"`
	// RawInitUser is the file's initUser: a uid, or "inherit".
	RawInitUser json.RawMessage `json:"initUser,omitempty"`
	// ConfigSizeLimit is the sizeLimit of the oneagent-config emptyDir.
	// Default 64Mi.
	ConfigSizeLimit *resource.Quantity `json:"configSizeLimit,omitempty"`
	// IgnoredNamespaces are never injected. Default kube-system,
	// kube-public, kube-node-lease, istio-system and OwnNamespace.
	IgnoredNamespaces []string `json:"ignoredNamespaces,omitempty"`
	// OwnNamespace is the namespace the driver and injector run in; it is
	// always ignored. Default: $POD_NAMESPACE, else "oneagent-csi".
	OwnNamespace string `json:"ownNamespace,omitempty"`
	// FailurePolicy when the agent is missing in a pod: silent or fail.
	// Default silent. Pods may override it with the annotation
	// oneagent.dynatrace.com/failure-policy.
	FailurePolicy FailurePolicy `json:"failurePolicy,omitempty"`
	// ContainerConfig says who writes the app containers' container.conf:
	// init (the init container) or driver (the CSI driver, no init
	// container). Default init. Pods may override it with the annotation
	// oneagent.dynatrace.com/container-config.
	ContainerConfig ContainerConfig `json:"containerConfig,omitempty"`
	// EnvoyMetrics, when true, points Dynatrace's Prometheus scraping of
	// meshed pods at Istio's merged metrics endpoint. Default false.
	EnvoyMetrics bool `json:"envoyMetrics,omitempty"`
	// ClusterID goes into DT_DEPLOYMENT_METADATA. Default empty.
	ClusterID string `json:"clusterID,omitempty"`
	// NoDriverNodeLabel is a node label, key or key=value, that marks nodes
	// where the driver does not run; pods whose node selector or required
	// node affinity admits only such nodes are not injected. Default empty.
	NoDriverNodeLabel string `json:"noDriverNodeLabel,omitempty"`
	// Version of oneagent-csi, for DT_DEPLOYMENT_METADATA. Set by the
	// binary, not the file.
	Version string `json:"-"`
}

// Duration is a time.Duration written as a Go duration string in YAML.
type Duration struct{ time.Duration }

// UnmarshalJSON reads "10m"-style durations.
func (d *Duration) UnmarshalJSON(b []byte) error {
	var s string
	if err := yaml.Unmarshal(b, &s); err != nil {
		return fmt.Errorf("duration must be a string like \"10m\": %w", err)
	}
	v, err := time.ParseDuration(s)
	if err != nil {
		return err
	}
	d.Duration = v
	return nil
}

// MarshalJSON writes the duration as a string.
func (d Duration) MarshalJSON() ([]byte, error) { return []byte(`"` + d.String() + `"`), nil }

// DefaultIgnoredNamespaces are never injected (the driver's own namespace is
// added to them).
var DefaultIgnoredNamespaces = []string{"kube-system", "kube-public", "kube-node-lease", "istio-system"}

// LoadConfig reads, defaults and validates the file at path.
func LoadConfig(path string) (Config, error) {
	var c Config
	data, err := os.ReadFile(path)
	if err != nil {
		return c, fmt.Errorf("read injector config: %w", err)
	}
	if err := yaml.UnmarshalStrict(data, &c); err != nil {
		return c, fmt.Errorf("injector config %s: %w", path, err)
	}
	if err := c.Complete(); err != nil {
		return c, fmt.Errorf("injector config %s: %w", path, err)
	}
	return c, nil
}

// Complete fills in defaults and validates; errors name the field.
func (c *Config) Complete() error {
	if c.DriverName == "" {
		c.DriverName = api.DefaultDriverName
	}
	if c.RetryTimeout.Duration == 0 {
		c.RetryTimeout.Duration = api.DefaultRetryTimeout
	}
	if c.InitImagePullPolicy == "" {
		c.InitImagePullPolicy = corev1.PullIfNotPresent
	}
	if c.InstallPath == "" {
		c.InstallPath = api.AgentMountPath
	}
	if c.InitResources == nil {
		c.InitResources = &corev1.ResourceRequirements{
			Requests: corev1.ResourceList{corev1.ResourceCPU: resource.MustParse("10m"), corev1.ResourceMemory: resource.MustParse("16Mi")},
			Limits:   corev1.ResourceList{corev1.ResourceCPU: resource.MustParse("100m"), corev1.ResourceMemory: resource.MustParse("64Mi")},
		}
	}
	if len(c.RawInitUser) > 0 && c.InitUser == 0 && !c.InitUserInherit {
		var word string
		if err := json.Unmarshal(c.RawInitUser, &word); err == nil {
			if word != "inherit" {
				return fmt.Errorf("initUser: %q must be a uid or \"inherit\"", word)
			}
			c.InitUserInherit = true
		} else if err := json.Unmarshal(c.RawInitUser, &c.InitUser); err != nil {
			return fmt.Errorf("initUser: %s must be a uid or \"inherit\"", c.RawInitUser)
		}
	}
	if c.InitUser == 0 && !c.InitUserInherit {
		c.InitUser = 1001
	}
	if c.ConfigSizeLimit == nil {
		q := resource.MustParse("64Mi")
		c.ConfigSizeLimit = &q
	}
	if c.OwnNamespace == "" {
		c.OwnNamespace = os.Getenv("POD_NAMESPACE")
	}
	if c.OwnNamespace == "" {
		c.OwnNamespace = "oneagent-csi"
	}
	if c.IgnoredNamespaces == nil {
		c.IgnoredNamespaces = slices.Clone(DefaultIgnoredNamespaces)
	}
	if !slices.Contains(c.IgnoredNamespaces, c.OwnNamespace) {
		c.IgnoredNamespaces = append(c.IgnoredNamespaces, c.OwnNamespace)
	}
	if c.FailurePolicy == "" {
		c.FailurePolicy = FailureSilent
	}
	if c.ContainerConfig == "" {
		c.ContainerConfig = ContainerConfigInit
	}
	switch {
	case c.InitImage == "":
		return fmt.Errorf("initImage: required (the oneagent-csi image the init container runs)")
	case c.DefaultTenant != "" && !api.ValidTenantName(c.DefaultTenant):
		return fmt.Errorf("defaultTenant: %q is not a valid tenant name", c.DefaultTenant)
	case c.DefaultVersion != "" && !api.ValidVersion(c.DefaultVersion):
		return fmt.Errorf("defaultVersion: %q is not a valid version", c.DefaultVersion)
	case c.RetryTimeout.Duration < 0:
		return fmt.Errorf("retryTimeout: must not be negative")
	case c.InitImagePullPolicy != corev1.PullAlways && c.InitImagePullPolicy != corev1.PullIfNotPresent && c.InitImagePullPolicy != corev1.PullNever:
		return fmt.Errorf("initImagePullPolicy: %q is not Always, IfNotPresent or Never", c.InitImagePullPolicy)
	case len(c.InstallPath) < 2 || c.InstallPath[0] != '/':
		return fmt.Errorf("installPath: %q must be an absolute path", c.InstallPath)
	case c.InitUser < 0 || c.InitUser == 1337:
		return fmt.Errorf("initUser: %d is not allowed (non-negative, and never Istio's proxy uid 1337)", c.InitUser)
	case c.FailurePolicy != FailureSilent && c.FailurePolicy != FailureFail:
		return fmt.Errorf("failurePolicy: %q is not silent or fail", c.FailurePolicy)
	case c.ContainerConfig != ContainerConfigInit && c.ContainerConfig != ContainerConfigDriver:
		return fmt.Errorf("containerConfig: %q is not init or driver", c.ContainerConfig)
	}
	for _, ns := range c.IgnoredNamespaces {
		if errs := validation.IsDNS1123Label(ns); len(errs) > 0 {
			return fmt.Errorf("ignoredNamespaces: %q: %s", ns, errs[0])
		}
	}
	return nil
}
