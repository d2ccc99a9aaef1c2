package main

import (
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"time"

	"sigs.k8s.io/yaml"

	"k8s.io/apimachinery/pkg/api/resource"

	"github.com/oneagent-csi/oneagent-csi/api"
	"github.com/oneagent-csi/oneagent-csi/driver"
	"github.com/oneagent-csi/oneagent-csi/provisioner"
	"github.com/oneagent-csi/oneagent-csi/provisioner/extract"
)

// Duration is a time.Duration written as a Go duration string ("5m").
type Duration struct{ time.Duration }

// UnmarshalJSON accepts "5m"-style strings.
func (d *Duration) UnmarshalJSON(b []byte) error {
	var s string
	if err := json.Unmarshal(b, &s); err != nil {
		return fmt.Errorf("must be a duration string such as \"5m\"")
	}
	v, err := time.ParseDuration(s)
	if err != nil {
		return fmt.Errorf("%q is not a duration such as \"5m\"", s)
	}
	d.Duration = v
	return nil
}

// MarshalJSON writes the duration as a string.
func (d Duration) MarshalJSON() ([]byte, error) { return json.Marshal(d.String()) }

// NodeConfig is the node config file (a mounted ConfigMap). Every field is
// documented in README.md.
type NodeConfig struct {
	DriverName       string                 `json:"driverName,omitempty"`
	NodeID           string                 `json:"nodeID,omitempty"`
	DataDir          string                 `json:"dataDir,omitempty"`
	CSISocket        string                 `json:"csiSocket,omitempty"`
	KubeletSocket    string                 `json:"kubeletSocket,omitempty"`
	RegistrationDir  string                 `json:"registrationDir,omitempty"`
	HTTPAddr         string                 `json:"httpAddr,omitempty"`
	PublishWait      Duration               `json:"publishWait,omitzero"`
	DownloadTimeout  Duration               `json:"downloadTimeout,omitzero"`
	LatestTTL        Duration               `json:"latestTTL,omitzero"`
	PrefetchInterval Duration               `json:"prefetchInterval,omitzero"`
	Prefetch         *bool                  `json:"prefetch,omitempty"`
	ExtractWorkers   int                    `json:"extractWorkers,omitempty"`
	ExtractMemory    Bytes                  `json:"extractMemory,omitempty"`
	Limits           extract.Limits         `json:"limits,omitzero"`
	Client           ClientConfig           `json:"client,omitzero"`
	HostAllow        []driver.HostAllowRule `json:"hostAllow,omitempty"`
	Cache            CacheConfig            `json:"cache,omitzero"`
	AdminSocket      string                 `json:"adminSocket,omitempty"`
	MountAPI         string                 `json:"mountAPI,omitempty"`
	KubeletDir       string                 `json:"kubeletDir,omitempty"`
	Tenants          []provisioner.Tenant   `json:"tenants"`
}

// Bytes is a size written as a Kubernetes quantity ("20Gi") or a number.
type Bytes int64

// UnmarshalJSON reads a quantity; the error names the field.
func (b *Bytes) UnmarshalJSON(data []byte) error {
	var s string
	if err := json.Unmarshal(data, &s); err != nil {
		s = string(data) // a bare number
	}
	q, err := resource.ParseQuantity(s)
	if err != nil {
		return fmt.Errorf("maxBytes: %q is not a size such as 20Gi or 21474836480", s)
	}
	*b = Bytes(q.Value())
	return nil
}

// CacheConfig bounds what the node keeps (see README, "Cache").
type CacheConfig struct {
	// KeepPrevious versions per tenant besides the current one. Default 1.
	KeepPrevious int `json:"keepPrevious,omitempty"`
	// MaxBytes is the artifacts' disk budget, e.g. "20Gi". Default: none.
	MaxBytes Bytes `json:"maxBytes,omitempty"`
	// GCInterval between passes. Default 10m.
	GCInterval Duration `json:"gcInterval,omitzero"`
	// OrphanGrace before the record of a volume whose target is no longer
	// mounted is removed. Default 10m.
	OrphanGrace Duration `json:"orphanGrace,omitzero"`
}

// ClientConfig tunes tenant requests.
type ClientConfig struct {
	RequestTimeout Duration `json:"requestTimeout,omitzero"`
	ConnectTimeout Duration `json:"connectTimeout,omitzero"`
	Attempts       int      `json:"attempts,omitempty"`
	BackoffBase    Duration `json:"backoffBase,omitzero"`
	BackoffMax     Duration `json:"backoffMax,omitzero"`
	IdleTimeout    Duration `json:"idleTimeout,omitzero"`
}

// Defaults of the node config.
const (
	defaultDataDir         = "/var/lib/oneagent-csi"
	defaultCSISocket       = "/csi/csi.sock"
	defaultRegistrationDir = "/var/lib/kubelet/plugins_registry"
	defaultHTTPAddr        = ":9809"
	defaultAdminSocket     = "/csi/admin.sock"
)

// LoadNodeConfig reads path (empty: defaults only). Unknown fields are errors.
func LoadNodeConfig(path string) (NodeConfig, error) {
	var c NodeConfig
	if path != "" {
		data, err := os.ReadFile(path)
		if err != nil {
			return c, fmt.Errorf("read config: %w", err)
		}
		if err := yaml.UnmarshalStrict(data, &c); err != nil {
			return c, fmt.Errorf("config %s: %w", path, err)
		}
	}
	return c, nil
}

// applyDefaults fills unset fields.
func (c *NodeConfig) applyDefaults() {
	if c.DriverName == "" {
		c.DriverName = api.DefaultDriverName
	}
	if c.NodeID == "" {
		c.NodeID = os.Getenv("NODE_NAME")
	}
	if c.NodeID == "" {
		c.NodeID, _ = os.Hostname()
	}
	if c.DataDir == "" {
		c.DataDir = defaultDataDir
	}
	if c.CSISocket == "" {
		c.CSISocket = defaultCSISocket
	}
	if c.KubeletSocket == "" {
		c.KubeletSocket = c.CSISocket
	}
	if c.HTTPAddr == "" {
		c.HTTPAddr = defaultHTTPAddr
	}
	if c.AdminSocket == "" {
		c.AdminSocket = defaultAdminSocket
	}
	if c.MountAPI == "" {
		c.MountAPI = string(driver.MountAPIAuto)
	}
	if c.KubeletDir == "" {
		c.KubeletDir = driver.DefaultKubeletDir
	}
	if c.Prefetch == nil {
		t := true
		c.Prefetch = &t
	}
}

// validate names the first bad field.
func (c *NodeConfig) validate() error {
	switch {
	case len(c.DriverName) > 63 || c.DriverName == "":
		return fmt.Errorf("driverName %q: must be 1 to 63 characters", c.DriverName)
	case c.NodeID == "":
		return fmt.Errorf("nodeID: must be set (or NODE_NAME)")
	case !filepath.IsAbs(c.DataDir):
		return fmt.Errorf("dataDir %q: must be an absolute path", c.DataDir)
	case !filepath.IsAbs(c.CSISocket):
		return fmt.Errorf("csiSocket %q: must be an absolute path", c.CSISocket)
	case c.AdminSocket != "-" && !filepath.IsAbs(c.AdminSocket):
		return fmt.Errorf("adminSocket %q: must be an absolute path (or \"-\" for none)", c.AdminSocket)
	case c.ExtractWorkers < 0:
		return fmt.Errorf("extractWorkers %d: must not be negative", c.ExtractWorkers)
	case c.ExtractMemory < 0:
		return fmt.Errorf("extractMemory %d: must not be negative", c.ExtractMemory)
	case c.Cache.MaxBytes < 0:
		return fmt.Errorf("cache.maxBytes %d: must not be negative", c.Cache.MaxBytes)
	case c.Cache.GCInterval.Duration < 0, c.Cache.OrphanGrace.Duration < 0:
		return fmt.Errorf("cache.gcInterval, cache.orphanGrace: must not be negative")
	case !filepath.IsAbs(c.KubeletSocket):
		return fmt.Errorf("kubeletSocket %q: must be an absolute path", c.KubeletSocket)
	case c.RegistrationDir != "" && !filepath.IsAbs(c.RegistrationDir):
		return fmt.Errorf("registrationDir %q: must be an absolute path", c.RegistrationDir)
	case c.PublishWait.Duration < 0, c.DownloadTimeout.Duration < 0, c.LatestTTL.Duration < 0, c.PrefetchInterval.Duration < 0:
		return fmt.Errorf("publishWait, downloadTimeout, latestTTL, prefetchInterval: must not be negative")
	case !filepath.IsAbs(c.KubeletDir):
		return fmt.Errorf("kubeletDir %q: must be an absolute path", c.KubeletDir)
	case len(c.Tenants) == 0:
		return fmt.Errorf("tenants: at least one tenant must be configured")
	}
	if _, err := driver.ParseMountAPI(c.MountAPI); err != nil {
		return fmt.Errorf("mountAPI %w", err)
	}
	for i, r := range c.HostAllow {
		if r.Namespace == "" {
			return fmt.Errorf("hostAllow[%d].namespace: must be set", i)
		}
	}
	for i, t := range c.Tenants {
		if !api.ValidTenantName(t.Name) {
			return fmt.Errorf("tenants[%d].name %q: must be a DNS-1035 label", i, t.Name)
		}
		if t.APIURL == "" && t.Image == "" {
			return fmt.Errorf("tenants[%d].apiURL: must be set (or image, for code modules from a registry)", i)
		}
		if t.APIURL != "" && t.TokenFile == "" {
			return fmt.Errorf("tenants[%d].tokenFile: must be set with apiURL", i)
		}
		if err := driver.ValidateTenantPolicy(t); err != nil {
			return fmt.Errorf("tenants[%d].%w", i, err)
		}
	}
	return nil
}
