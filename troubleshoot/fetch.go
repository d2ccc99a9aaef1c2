package troubleshoot

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"strings"

	admissionregistrationv1 "k8s.io/api/admissionregistration/v1"
	appsv1 "k8s.io/api/apps/v1"
	corev1 "k8s.io/api/core/v1"
	discoveryv1 "k8s.io/api/discovery/v1"
	networkingv1 "k8s.io/api/networking/v1"
	storagev1 "k8s.io/api/storage/v1"
	"k8s.io/client-go/rest"
	"k8s.io/utils/ptr"
	"sigs.k8s.io/yaml"

	"github.com/oneagent-csi/oneagent-csi/api"
	"github.com/oneagent-csi/oneagent-csi/provisioner"
	"github.com/oneagent-csi/oneagent-csi/storage"
)

// Scope says what Fetch reads beyond the cluster parts.
type Scope struct {
	// Namespace whose pods are checked; empty: none.
	Namespace string
	// Pod limits the namespace checks to one pod.
	Pod string
}

// errNotFound marks a 404 from the API server.
var errNotFound = errors.New("not found")

// reader GETs API paths as JSON with the user's credentials. It uses no
// typed clientset, which would link every API group into the binary.
type reader struct {
	host   string
	client *http.Client
}

func (r reader) get(ctx context.Context, path string, into any) error {
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, strings.TrimSuffix(r.host, "/")+path, nil)
	if err != nil {
		return err
	}
	req.Header.Set("Accept", "application/json")
	resp, err := r.client.Do(req)
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(io.LimitReader(resp.Body, 64<<20))
	if err != nil {
		return err
	}
	switch {
	case resp.StatusCode == http.StatusNotFound:
		return errNotFound
	case resp.StatusCode != http.StatusOK:
		var st struct {
			Message string `json:"message"`
		}
		_ = json.Unmarshal(body, &st)
		return fmt.Errorf("GET %s: %s: %s", path, resp.Status, st.Message)
	}
	return json.Unmarshal(body, into)
}

// Fetch reads what the checks need. An object that does not exist stays
// nil; what cannot be read (forbidden, say) is recorded in Errors and its
// check reports that instead of guessing. The error is for the API server
// not answering at all.
func Fetch(ctx context.Context, cfg *rest.Config, inst Install, scope Scope) (Snapshot, error) {
	inst.defaults()
	hc, err := rest.HTTPClientFor(cfg)
	if err != nil {
		return Snapshot{}, fmt.Errorf("kubernetes client: %w", err)
	}
	r := reader{host: cfg.Host, client: hc}
	s := Snapshot{Install: inst, Errors: map[string]string{}, ServiceEndpoints: map[string][]discoveryv1.EndpointSlice{},
		ServedCerts: map[string][]ServedCert{}}
	// The first read tells whether the API server answers at all.
	var nodes corev1.NodeList
	if err := r.get(ctx, "/api/v1/nodes", &nodes); err != nil {
		if !strings.Contains(err.Error(), "Forbidden") {
			return s, fmt.Errorf("reading nodes: %w", err)
		}
		s.Errors["nodes"] = err.Error()
	}
	s.Nodes = nodes.Items
	note := func(what string, err error) bool {
		if err == nil {
			return true
		}
		if !errors.Is(err, errNotFound) {
			s.Errors[what] = err.Error()
		}
		return false
	}
	var d storagev1.CSIDriver
	if note("csidriver", r.get(ctx, "/apis/storage.k8s.io/v1/csidrivers/"+inst.DriverName, &d)) {
		s.CSIDriver = &d
	}
	var ds appsv1.DaemonSet
	if note("daemonset", r.get(ctx, fmt.Sprintf("/apis/apps/v1/namespaces/%s/daemonsets/%s", inst.Namespace, inst.DaemonSet), &ds)) {
		s.DaemonSet = &ds
		var pods corev1.PodList
		sel := labelSelector(ds.Spec.Selector.MatchLabels)
		if note("driver-pods", r.get(ctx, fmt.Sprintf("/api/v1/namespaces/%s/pods?labelSelector=%s", inst.Namespace, url.QueryEscape(sel)), &pods)) {
			s.DriverPods = pods.Items
		}
	}
	var csiNodes storagev1.CSINodeList
	if note("csinodes", r.get(ctx, "/apis/storage.k8s.io/v1/csinodes", &csiNodes)) {
		s.CSINodes = csiNodes.Items
	}
	var w admissionregistrationv1.MutatingWebhookConfiguration
	if note("webhook", r.get(ctx, "/apis/admissionregistration.k8s.io/v1/mutatingwebhookconfigurations/"+inst.Webhook, &w)) {
		s.Webhook = &w
		for _, h := range w.Webhooks {
			svc := h.ClientConfig.Service
			if svc == nil {
				continue
			}
			key := svc.Namespace + "/" + svc.Name
			if _, done := s.ServiceEndpoints[key]; done {
				continue
			}
			var slices discoveryv1.EndpointSliceList
			if note("endpoints", r.get(ctx, fmt.Sprintf("/apis/discovery.k8s.io/v1/namespaces/%s/endpointslices?labelSelector=%s",
				svc.Namespace, url.QueryEscape("kubernetes.io/service-name="+svc.Name)), &slices)) {
				s.ServiceEndpoints[key] = slices.Items
				s.ServedCerts[key] = servedCerts(ctx, cfg, r, svc.Namespace, svc.Name, ptr.Deref(svc.Port, 443), slices.Items)
			}
		}
	}
	for _, name := range inst.CertSecrets {
		var sec corev1.Secret
		err := r.get(ctx, fmt.Sprintf("/api/v1/namespaces/%s/secrets/%s", inst.Namespace, name), &sec)
		if err == nil && len(sec.Data["tls.crt"]) > 0 {
			s.ServingCert, s.ServingCertSecret = sec.Data["tls.crt"], name
			break
		}
		if err != nil && !errors.Is(err, errNotFound) {
			s.Errors["serving-certificate"] = err.Error()
		}
	}
	var cm corev1.ConfigMap
	if note("node-config", r.get(ctx, fmt.Sprintf("/api/v1/namespaces/%s/configmaps/%s", inst.Namespace, inst.NodeConfig), &cm)) {
		s.TenantHosts = tenantHosts(cm.Data["config.yaml"])
	}
	var icm corev1.ConfigMap
	if note("injector-config", r.get(ctx, fmt.Sprintf("/api/v1/namespaces/%s/configmaps/%s", inst.Namespace, inst.InjectorConfig), &icm)) {
		var ic struct {
			EnvoyMetrics bool `json:"envoyMetrics"`
		}
		_ = yaml.Unmarshal([]byte(icm.Data["injector.yaml"]), &ic)
		s.EnvoyMetrics = ic.EnvoyMetrics
	}
	var mesh corev1.ConfigMap
	if note("istio-mesh", r.get(ctx, "/api/v1/namespaces/istio-system/configmaps/istio", &mesh)) {
		m := mesh.Data["mesh"]
		s.MeshConfig = &m
		var entries struct {
			Items []struct {
				Spec struct {
					Hosts []string `json:"hosts"`
				} `json:"spec"`
			} `json:"items"`
		}
		if note("serviceentries", r.get(ctx, "/apis/networking.istio.io/v1/serviceentries", &entries)) {
			s.ServiceEntryHosts = []string{}
			for _, e := range entries.Items {
				s.ServiceEntryHosts = append(s.ServiceEntryHosts, e.Spec.Hosts...)
			}
		}
	}
	s.TenantChecks = map[string][]provisioner.TenantCheck{}
	if scope.Namespace == "" {
		s.fetchTenantChecks(ctx, cfg, nil)
		return s, nil
	}
	var ns corev1.Namespace
	if err := r.get(ctx, "/api/v1/namespaces/"+scope.Namespace, &ns); err != nil {
		return s, fmt.Errorf("namespace %s: %w", scope.Namespace, err)
	}
	s.Namespace = &ns
	if scope.Pod != "" {
		var p corev1.Pod
		if err := r.get(ctx, fmt.Sprintf("/api/v1/namespaces/%s/pods/%s", scope.Namespace, scope.Pod), &p); err != nil {
			return s, fmt.Errorf("pod %s/%s: %w", scope.Namespace, scope.Pod, err)
		}
		s.Pods = []corev1.Pod{p}
	} else {
		var pods corev1.PodList
		if note("pods", r.get(ctx, fmt.Sprintf("/api/v1/namespaces/%s/pods", scope.Namespace), &pods)) {
			s.Pods = pods.Items
		}
	}
	var events corev1.EventList
	if note("events", r.get(ctx, fmt.Sprintf("/api/v1/namespaces/%s/events?fieldSelector=%s", scope.Namespace, url.QueryEscape("reason=FailedMount")), &events)) {
		s.Events = events.Items
	}
	s.NodeVolumes = map[string][]storage.Volume{}
	for _, p := range s.Pods {
		node := p.Spec.NodeName
		if _, asked := s.NodeVolumes[node]; asked || node == "" || p.Annotations[api.InjectedAnnotation] != "true" {
			continue
		}
		if _, failed := s.Errors["volumes on "+node]; failed {
			continue
		}
		driver := ""
		for _, d := range s.DriverPods {
			if d.Spec.NodeName == node && d.Status.Phase == corev1.PodRunning && d.DeletionTimestamp == nil {
				driver = d.Name
			}
		}
		if driver == "" {
			continue // the daemonset check reports the node
		}
		vols, err := nodeVolumes(ctx, cfg, inst.Namespace, driver)
		if err != nil {
			s.Errors["volumes on "+node] = err.Error()
			continue
		}
		s.NodeVolumes[node] = vols
	}
	podNodes := map[string]bool{}
	for _, p := range s.Pods {
		if p.Spec.NodeName != "" {
			podNodes[p.Spec.NodeName] = true
		}
	}
	s.fetchTenantChecks(ctx, cfg, podNodes)
	var nps networkingv1.NetworkPolicyList
	if note("networkpolicies", r.get(ctx, fmt.Sprintf("/apis/networking.k8s.io/v1/namespaces/%s/networkpolicies", scope.Namespace), &nps)) {
		s.NetworkPolicies = nps.Items
	}
	return s, nil
}

func labelSelector(m map[string]string) string {
	var parts []string
	for k, v := range m {
		parts = append(parts, k+"="+v)
	}
	return strings.Join(parts, ",")
}

// tenantHosts are the hosts of the apiURLs in a node config file.
func tenantHosts(config string) []string {
	var cfg struct {
		Tenants []struct {
			APIURL string `json:"apiURL"`
		} `json:"tenants"`
	}
	if yaml.Unmarshal([]byte(config), &cfg) != nil {
		return nil
	}
	var out []string
	for _, t := range cfg.Tenants {
		if u, err := url.Parse(t.APIURL); err == nil && u.Hostname() != "" {
			out = append(out, u.Hostname())
		}
	}
	return out
}

// fetchTenantChecks runs the tenant check in the driver pod of each node in
// nodes, or of the first node with a running driver when nodes is empty:
// a fleet's nodes see the tenant alike unless their network differs, and
// asking all of them would cost the tenant a call per node.
func (s *Snapshot) fetchTenantChecks(ctx context.Context, cfg *rest.Config, nodes map[string]bool) {
	for _, d := range s.DriverPods {
		node := d.Spec.NodeName
		if d.Status.Phase != corev1.PodRunning || d.DeletionTimestamp != nil || (len(nodes) > 0 && !nodes[node]) {
			continue
		}
		if _, done := s.TenantChecks[node]; done {
			continue
		}
		checks, err := nodeTenantChecks(ctx, cfg, s.Install.Namespace, d.Name)
		if err != nil {
			s.Errors["tenant check on "+node] = err.Error()
		} else {
			s.TenantChecks[node] = checks
		}
		if len(nodes) == 0 {
			return
		}
	}
}

// maxHandshakes bounds the injector pods handshaken with per Service.
const maxHandshakes = 5

// servedCerts handshakes with the ready pods behind Service ns/name on the
// pod port its port servicePort maps to.
func servedCerts(ctx context.Context, cfg *rest.Config, r reader, ns, name string, servicePort int32, slices []discoveryv1.EndpointSlice) []ServedCert {
	var svc corev1.Service
	if err := r.get(ctx, fmt.Sprintf("/api/v1/namespaces/%s/services/%s", ns, name), &svc); err != nil {
		return nil
	}
	portName, found := "", false
	for _, p := range svc.Spec.Ports {
		if p.Port == servicePort {
			portName, found = p.Name, true
		}
	}
	if !found {
		return nil
	}
	host := name + "." + ns + ".svc"
	var out []ServedCert
	for _, sl := range slices {
		var podPort int32
		for _, p := range sl.Ports {
			if ptr.Deref(p.Name, "") == portName && p.Port != nil {
				podPort = *p.Port
			}
		}
		if podPort == 0 {
			continue
		}
		for _, e := range sl.Endpoints {
			if !ptr.Deref(e.Conditions.Ready, true) || e.TargetRef == nil || e.TargetRef.Kind != "Pod" || len(out) == maxHandshakes {
				continue
			}
			sc := ServedCert{Pod: e.TargetRef.Namespace + "/" + e.TargetRef.Name}
			chain, err := servedChain(ctx, cfg, e.TargetRef.Namespace, e.TargetRef.Name, podPort, host)
			if err != nil {
				sc.Err = err.Error()
			} else {
				sc.Chain = chain
			}
			out = append(out, sc)
		}
	}
	return out
}
