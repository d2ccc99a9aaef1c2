// Package initcontainer is what the init container of an injected pod runs
// (`oneagent-csi init`): it needs no network; it checks that the CSI volume
// holds the agent and writes each app container's container.conf into that
// container's slice of the oneagent-config volume.
package initcontainer

import (
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strings"

	"k8s.io/apimachinery/pkg/util/validation"

	"github.com/oneagent-csi/oneagent-csi/api"
)

// ErrAgentMissing means the CSI volume does not hold the agent (the driver
// failed open) and the failure policy is fail.
var ErrAgentMissing = errors.New("agent missing")

// Container is an app container of the pod.
type Container = api.Container

// Options of one run. Pod fields come from the downward API.
type Options struct {
	// InstallPath is where the CSI volume is mounted. Default
	// /opt/dynatrace/oneagent-paas.
	InstallPath string
	// ConfigDir is where the oneagent-config volume is mounted. Default
	// /mnt/config.
	ConfigDir string
	// FailurePolicy is silent (start without the agent) or fail. Default
	// silent.
	FailurePolicy string
	// Containers to write configuration for. At least one.
	Containers []Container
	// PodName, PodUID, Namespace and NodeName describe the pod.
	PodName, PodUID, Namespace, NodeName string
	// Out receives the messages for `kubectl logs`. Default os.Stdout.
	Out io.Writer
}

// ParseContainer reads "name=image".
func ParseContainer(s string) (Container, error) {
	name, image, ok := strings.Cut(s, "=")
	if !ok || name == "" || image == "" {
		return Container{}, fmt.Errorf("--container %q: want name=image", s)
	}
	if errs := validation.IsDNS1123Label(name); len(errs) > 0 {
		return Container{}, fmt.Errorf("--container %q: name: %s", s, errs[0])
	}
	if !api.ValidImage(image) {
		return Container{}, fmt.Errorf("--container %q: image must not contain spaces, control characters, ',' or '='", s)
	}
	return Container{Name: name, Image: image}, nil
}

// Run checks the agent and writes the configuration. It returns
// ErrAgentMissing (wrapped) only when the agent is missing and the policy
// is fail; a silent miss is reported on Out and returns nil.
func Run(o Options) error {
	if o.InstallPath == "" {
		o.InstallPath = api.AgentMountPath
	}
	if o.ConfigDir == "" {
		o.ConfigDir = "/mnt/config"
	}
	if o.FailurePolicy == "" {
		o.FailurePolicy = "silent"
	}
	if o.Out == nil {
		o.Out = os.Stdout
	}
	switch {
	case o.FailurePolicy != "silent" && o.FailurePolicy != "fail":
		return fmt.Errorf("--failure-policy %q: want silent or fail", o.FailurePolicy)
	case len(o.Containers) == 0:
		return errors.New("--container: at least one app container is required")
	}
	for _, c := range o.Containers {
		if errs := validation.IsDNS1123Label(c.Name); len(errs) > 0 {
			return fmt.Errorf("container %q: %s", c.Name, errs[0])
		}
	}

	lib := filepath.Join(o.InstallPath, api.AgentLibraryRelativePath)
	present := true
	if st, err := os.Stat(lib); err != nil || !st.Mode().IsRegular() {
		present = false
		fmt.Fprintf(o.Out, "oneagent-csi: the OneAgent code module is not in %s (%s is missing): "+
			"the CSI driver could not provide it in time and served an empty volume.\n", o.InstallPath, api.AgentLibraryRelativePath)
		if o.FailurePolicy == "fail" {
			fmt.Fprintln(o.Out, "oneagent-csi: failure policy is fail: the pod will not start without the agent.")
			return fmt.Errorf("%w: %s not found", ErrAgentMissing, lib)
		}
		fmt.Fprintln(o.Out, "oneagent-csi: failure policy is silent: the application starts without the agent.")
	}
	for _, c := range o.Containers {
		if err := writeContainerConf(o, c); err != nil {
			return err
		}
	}
	if present {
		fmt.Fprintf(o.Out, "oneagent-csi: agent present in %s; configured containers: %s\n", o.InstallPath, names(o.Containers))
	}
	return nil
}

func names(cs []Container) string {
	out := make([]string, len(cs))
	for i, c := range cs {
		out[i] = c.Name
	}
	return strings.Join(out, ", ")
}

// writeContainerConf writes <config-dir>/<container>/agent/config/container.conf
// atomically. The container's slice is world-writable (like the emptyDir
// itself) because the app may run as any user and the agent writes there.
func writeContainerConf(o Options, c Container) error {
	slice := filepath.Join(o.ConfigDir, c.Name)
	dir := filepath.Join(slice, "agent", "config")
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return fmt.Errorf("container %s: %w", c.Name, err)
	}
	for _, d := range []string{slice, filepath.Join(slice, "agent"), dir} {
		if err := os.Chmod(d, 0o777); err != nil { // umask-independent
			return fmt.Errorf("container %s: %w", c.Name, err)
		}
	}
	conf := api.ContainerConf(c, api.PodInfo{Name: o.PodName, UID: o.PodUID, Namespace: o.Namespace, NodeName: o.NodeName})
	final := filepath.Join(dir, "container.conf")
	tmp, err := os.CreateTemp(dir, ".container.conf-")
	if err != nil {
		return fmt.Errorf("container %s: %w", c.Name, err)
	}
	_, werr := tmp.Write(conf)
	cerr := tmp.Close()
	if err := errors.Join(werr, cerr, os.Chmod(tmp.Name(), 0o644)); err != nil {
		_ = os.Remove(tmp.Name())
		return fmt.Errorf("container %s: write container.conf: %w", c.Name, err)
	}
	if err := os.Rename(tmp.Name(), final); err != nil {
		_ = os.Remove(tmp.Name())
		return fmt.Errorf("container %s: %w", c.Name, err)
	}
	return nil
}
