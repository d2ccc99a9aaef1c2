package api

import (
	"fmt"
	"regexp"
	"strings"
)

// Container configuration served by the driver (injector containerConfig:
// driver). Instead of an init container writing container.conf into the
// oneagent-config emptyDir, the injector lists the app containers in the
// AttrContainers volume attribute, the driver writes one container.conf per
// container into the volume at ContainerConfRelativePath, and every app
// container mounts its own file by subPath at ContainerConfMountPath.
const (
	// AttrContainers lists the app containers of the pod as
	// "name=image,name=image" (at most MaxContainers).
	AttrContainers = "containers"
	// ContainerConfDir is the directory of the volume that holds one
	// directory per listed container.
	ContainerConfDir = ".containers"
	// ContainerConfMountPath is where an app container sees its
	// container.conf: inside its oneagent-config slice, where the init
	// container would have written it.
	ContainerConfMountPath = ConfigMountPath + "/agent/config/container.conf"
	// MaxContainers bounds AttrContainers.
	MaxContainers = 64
	// maxImageLength bounds one image reference.
	maxImageLength = 1024
)

// ContainerConfRelativePath is the subPath, inside the agent volume, of the
// container.conf of the container named name.
func ContainerConfRelativePath(name string) string {
	return ContainerConfDir + "/" + name + "/container.conf"
}

// Container is an app container of a pod.
type Container struct {
	Name  string
	Image string
}

// PodInfo describes the pod a container.conf is written for.
type PodInfo struct {
	Name, UID, Namespace, NodeName string
}

var dns1123Label = regexp.MustCompile(`^[a-z0-9]([-a-z0-9]*[a-z0-9])?$`)

// ValidContainerName reports whether name is a DNS-1123 label, the shape
// Kubernetes gives container names.
func ValidContainerName(name string) bool {
	return len(name) <= 63 && dns1123Label.MatchString(name)
}

// ValidImage reports whether image can be written into container.conf and
// into AttrContainers: not empty, bounded, and without whitespace, control
// characters, ',' or '='.
func ValidImage(image string) bool {
	if image == "" || len(image) > maxImageLength {
		return false
	}
	return !strings.ContainsFunc(image, func(r rune) bool {
		return r <= ' ' || r == 0x7f || r == ',' || r == '='
	})
}

// FormatContainers writes the AttrContainers value.
func FormatContainers(cs []Container) string {
	parts := make([]string, len(cs))
	for i, c := range cs {
		parts[i] = c.Name + "=" + c.Image
	}
	return strings.Join(parts, ",")
}

// ParseContainers reads an AttrContainers value. It returns the entries
// that are valid even when it also returns an error for one that is not,
// so that a volume can still serve the containers it can name.
func ParseContainers(s string) ([]Container, error) {
	if s == "" {
		return nil, nil
	}
	var out []Container
	var firstErr error
	seen := map[string]bool{}
	for i, part := range strings.Split(s, ",") {
		name, image, ok := strings.Cut(part, "=")
		var why string
		switch {
		case i >= MaxContainers:
			why = fmt.Sprintf("more than %d containers", MaxContainers)
		case !ok:
			why = fmt.Sprintf("entry %d: want name=image", i+1)
		case !ValidContainerName(name):
			why = fmt.Sprintf("entry %d: container name %q is not a DNS-1123 label", i+1, name)
		case !ValidImage(image):
			why = fmt.Sprintf("entry %d (%s): image must be 1 to %d characters without spaces, ',' or '='", i+1, name, maxImageLength)
		case seen[name]:
			why = fmt.Sprintf("entry %d: container %s is listed twice", i+1, name)
		}
		if why != "" {
			if firstErr == nil {
				firstErr = &FieldError{AttrContainers, shorten(s), why}
			}
			if i >= MaxContainers {
				break
			}
			continue
		}
		seen[name] = true
		out = append(out, Container{Name: name, Image: image})
	}
	return out, firstErr
}

func shorten(s string) string {
	if len(s) > 128 {
		return s[:128] + "..."
	}
	return s
}

// ContainerConf renders the container.conf the agent reads for container c
// of pod p (the same bytes whether the init container or the driver writes
// it).
func ContainerConf(c Container, p PodInfo) []byte {
	var b strings.Builder
	b.WriteString("[container]\n")
	for _, kv := range [][2]string{
		{"containerName", c.Name},
		{"imageName", c.Image},
		{"k8s_fullpodname", p.Name},
		{"k8s_poduid", p.UID},
		{"k8s_containername", c.Name},
		{"k8s_namespace", p.Namespace},
		{"k8s_node_name", p.NodeName},
	} {
		// One line per key: a value never spans lines.
		fmt.Fprintf(&b, "%s %s\n", kv[0], strings.Map(func(r rune) rune {
			if r == '\n' || r == '\r' {
				return ' '
			}
			return r
		}, kv[1]))
	}
	return []byte(b.String())
}
