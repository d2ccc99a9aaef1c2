package troubleshoot

import (
	"slices"
	"strings"

	corev1 "k8s.io/api/core/v1"
	"sigs.k8s.io/yaml"

	"github.com/oneagent-csi/oneagent-csi/api"
	"github.com/oneagent-csi/oneagent-csi/injector"
)

// Istio checks the mesh: with outboundTrafficPolicy REGISTRY_ONLY every
// tenant host needs a ServiceEntry (else the driver cannot download and
// meshed agents cannot report), and meshed pods keep our init container
// where the injector puts it (shared/notes/istio.md).
func Istio(s Snapshot) []Result {
	s.Install.defaults()
	var rs []Result
	if s.MeshConfig != nil {
		var mesh struct {
			OutboundTrafficPolicy struct {
				Mode string `json:"mode"`
			} `json:"outboundTrafficPolicy"`
		}
		if err := yaml.Unmarshal([]byte(*s.MeshConfig), &mesh); err != nil {
			rs = append(rs, warn("istio-egress", "istio-system/istio", "Istio's mesh config does not parse: "+err.Error(), ""))
		} else if mesh.OutboundTrafficPolicy.Mode == "REGISTRY_ONLY" {
			var missing []string
			for _, h := range s.TenantHosts {
				if !hostCovered(h, s.ServiceEntryHosts) {
					missing = append(missing, h)
				}
			}
			if len(missing) > 0 {
				rs = append(rs, fail("istio-egress", "outboundTrafficPolicy REGISTRY_ONLY", "no ServiceEntry for the tenant hosts "+strings.Join(missing, ", ")+
					": meshed agents cannot report and a meshed driver cannot download",
					"kubectl apply -k deploy/istio, and oneagent-csi istio egress --tenant <name> | kubectl apply -f -"))
			} else {
				rs = append(rs, ok("istio-egress", "outboundTrafficPolicy REGISTRY_ONLY", "every tenant host has a ServiceEntry"))
			}
		}
	}
	for _, p := range s.Pods {
		if r, found := checkPlacement(p); found {
			rs = append(rs, r)
		}
		if r, found := checkEnvoyMetrics(s, p); found {
			rs = append(rs, r)
		}
	}
	return rs
}

// checkEnvoyMetrics: with envoyMetrics on, a meshed, injected pod carries
// the metrics.dynatrace.com annotations that point Dynatrace's scraping at
// Envoy.
func checkEnvoyMetrics(s Snapshot, p corev1.Pod) (Result, bool) {
	if !s.EnvoyMetrics || p.Annotations[api.InjectedAnnotation] != "true" || !meshed(p) {
		return Result{}, false
	}
	subject := p.Namespace + "/" + p.Name
	if p.Annotations[injector.MetricsScrapeAnnotation] == "" {
		return warn("istio-envoy-metrics", subject, "envoyMetrics is on but the pod has no "+injector.MetricsScrapeAnnotation+" annotation: Envoy's metrics are not scraped",
			"recreate the pod (it was injected before envoyMetrics was turned on)"), true
	}
	return ok("istio-envoy-metrics", subject, "Envoy's metrics are annotated for scraping"), true
}

// meshed reports whether Istio's proxy is in the pod.
func meshed(p corev1.Pod) bool {
	for _, list := range [][]corev1.Container{p.Spec.InitContainers, p.Spec.Containers} {
		for _, c := range list {
			if c.Name == "istio-proxy" {
				return true
			}
		}
	}
	return false
}

// hostCovered reports whether a ServiceEntry host (exact or *.suffix)
// covers host.
func hostCovered(host string, entries []string) bool {
	for _, e := range entries {
		if e == host || (strings.HasPrefix(e, "*.") && strings.HasSuffix(host, e[1:])) {
			return true
		}
	}
	return false
}

// checkPlacement checks a meshed, injected pod's init-container order: with
// native sidecars ours runs after istio-proxy; in classic mode before
// istio-init (and enable-core-dump).
func checkPlacement(p corev1.Pod) (Result, bool) {
	names := make([]string, len(p.Spec.InitContainers))
	for i, c := range p.Spec.InitContainers {
		names[i] = c.Name
	}
	ours := slices.Index(names, api.InitContainerName)
	proxy, istioInit := slices.Index(names, "istio-proxy"), slices.Index(names, "istio-init")
	if ours < 0 || (proxy < 0 && istioInit < 0) {
		return Result{}, false
	}
	subject := p.Namespace + "/" + p.Name
	fix := "recreate the pod so both injectors run again; if it recurs, report the pod's init containers"
	switch {
	case proxy >= 0 && ours < proxy:
		return fail("istio-placement", subject, "our init container runs before the native istio-proxy sidecar ("+strings.Join(names, ", ")+")", fix), true
	case proxy < 0 && istioInit >= 0 && ours > istioInit:
		return fail("istio-placement", subject, "our init container runs after istio-init's redirect ("+strings.Join(names, ", ")+")", fix), true
	}
	return ok("istio-placement", subject, "init containers in the order the mesh needs ("+strings.Join(names, ", ")+")"), true
}
