package troubleshoot

import (
	"crypto/x509"
	"encoding/pem"
	"errors"
	"fmt"
	"slices"
	"sort"
	"strings"
	"time"

	corev1 "k8s.io/api/core/v1"
	storagev1 "k8s.io/api/storage/v1"
)

// Cluster checks the parts every injected pod needs, at now.
func Cluster(s Snapshot, now time.Time) []Result {
	s.Install.defaults()
	var rs []Result
	rs = append(rs, checkCSIDriver(s)...)
	rs = append(rs, checkDaemonSet(s)...)
	rs = append(rs, checkRegistration(s)...)
	rs = append(rs, checkWebhook(s, now)...)
	rs = append(rs, checkTenants(s)...)
	return rs
}

// checkTenants reports the tenant checks the drivers ran: one result per
// tenant and node, naming the first failing step.
func checkTenants(s Snapshot) []Result {
	nodes := make([]string, 0, len(s.TenantChecks))
	for n := range s.TenantChecks {
		nodes = append(nodes, n)
	}
	sort.Strings(nodes)
	var rs []Result
	for _, node := range nodes {
		for _, c := range s.TenantChecks[node] {
			subject := c.Tenant + " from " + node
			failed := false
			for _, st := range c.Steps {
				if st.OK {
					continue
				}
				fix := map[string]string{
					"dns":     "the node's DNS must resolve the tenant host (or set tenants[].proxy)",
					"api":     "a refused token: a PaaS token with InstallerDownload in the tokens Secret; TLS: tenants[].caFile; unreachable: NetworkPolicy egress, proxy, firewall",
					"version": "pin a version the tenant offers, or use latest",
				}[st.Name]
				rs = append(rs, fail("tenant", subject, st.Name+": "+st.Detail, fix))
				failed = true
				break
			}
			if !failed {
				var parts []string
				for _, st := range c.Steps {
					parts = append(parts, st.Detail)
				}
				rs = append(rs, ok("tenant", subject, strings.Join(parts, "; ")))
			}
		}
	}
	return rs
}

func checkCSIDriver(s Snapshot) []Result {
	const check = "csidriver"
	d := s.CSIDriver
	if d == nil {
		return []Result{fail(check, s.Install.DriverName, "the CSIDriver does not exist: kubelet does not call the driver and every injected pod stays in ContainerCreating",
			"reapply the install (kubectl apply -k deploy/kubernetes, or helm upgrade)")}
	}
	var wrong []string
	if d.Spec.AttachRequired == nil || *d.Spec.AttachRequired {
		wrong = append(wrong, "attachRequired must be false")
	}
	if d.Spec.PodInfoOnMount == nil || !*d.Spec.PodInfoOnMount {
		wrong = append(wrong, "podInfoOnMount must be true")
	}
	if !slices.Contains(d.Spec.VolumeLifecycleModes, storagev1.VolumeLifecycleEphemeral) {
		wrong = append(wrong, "volumeLifecycleModes must include Ephemeral")
	}
	if len(wrong) > 0 {
		return []Result{fail(check, d.Name, "the CSIDriver is not as installed: "+strings.Join(wrong, ", "),
			"delete it and reapply the install (its spec is immutable)")}
	}
	return []Result{ok(check, d.Name, "present, ephemeral inline volumes with pod info")}
}

// linuxNodes are the nodes the DaemonSet's nodeSelector admits.
func linuxNodes(s Snapshot) []corev1.Node {
	var out []corev1.Node
	for _, n := range s.Nodes {
		match := true
		if s.DaemonSet != nil {
			for k, v := range s.DaemonSet.Spec.Template.Spec.NodeSelector {
				if n.Labels[k] != v {
					match = false
				}
			}
		}
		if match {
			out = append(out, n)
		}
	}
	return out
}

// readyDriverNodes are the nodes with a ready driver pod.
func readyDriverNodes(s Snapshot) map[string]bool {
	out := map[string]bool{}
	for _, p := range s.DriverPods {
		if p.DeletionTimestamp != nil {
			continue
		}
		for _, c := range p.Status.Conditions {
			if c.Type == corev1.PodReady && c.Status == corev1.ConditionTrue {
				out[p.Spec.NodeName] = true
			}
		}
	}
	return out
}

func checkDaemonSet(s Snapshot) []Result {
	const check = "daemonset"
	subject := s.Install.Namespace + "/" + s.Install.DaemonSet
	if s.DaemonSet == nil {
		return []Result{fail(check, subject, "the node driver's DaemonSet does not exist", "reapply the install")}
	}
	ready := readyDriverNodes(s)
	var missing []string
	nodes := linuxNodes(s)
	for _, n := range nodes {
		if !ready[n.Name] {
			missing = append(missing, n.Name)
		}
	}
	sort.Strings(missing)
	if len(missing) > 0 {
		return []Result{fail(check, subject, fmt.Sprintf("no ready driver pod on %d of %d nodes: %s; injected pods there stay in ContainerCreating",
			len(missing), len(nodes), short(missing)),
			fmt.Sprintf("kubectl -n %s describe daemonset %s; then the pod's events and log on those nodes", s.Install.Namespace, s.Install.DaemonSet))}
	}
	return []Result{ok(check, subject, fmt.Sprintf("a ready driver pod on each of the %d nodes", len(nodes)))}
}

func checkRegistration(s Snapshot) []Result {
	const check = "registration"
	ready := readyDriverNodes(s)
	registered := map[string]bool{}
	for _, cn := range s.CSINodes {
		for _, d := range cn.Spec.Drivers {
			if d.Name == s.Install.DriverName {
				registered[cn.Name] = true
			}
		}
	}
	var missing []string
	for node := range ready {
		if !registered[node] {
			missing = append(missing, node)
		}
	}
	sort.Strings(missing)
	if len(missing) > 0 {
		return []Result{fail(check, s.Install.DriverName, fmt.Sprintf("kubelet has not registered the driver on %s although its pod is ready "+
			"(pods there fail with \"driver name %s not found in the list of registered CSI drivers\")", short(missing), s.Install.DriverName),
			"the driver's kubeletDir and registration paths must be kubelet's --root-dir (node.kubeletDir in the chart); see the driver pod's log")}
	}
	return []Result{ok(check, s.Install.DriverName, fmt.Sprintf("registered with kubelet on %d nodes", len(registered)))}
}

func checkWebhook(s Snapshot, now time.Time) []Result {
	const check = "webhook"
	w := s.Webhook
	if w == nil {
		return []Result{fail(check, s.Install.Webhook, "the MutatingWebhookConfiguration does not exist: no pod is injected", "reapply the install")}
	}
	var rs []Result
	services := map[string]bool{}
	for _, h := range w.Webhooks {
		if h.ClientConfig.Service == nil {
			rs = append(rs, warn(check, h.Name, "called by URL, not through a Service; the endpoint check is skipped", ""))
			continue
		}
		services[h.ClientConfig.Service.Namespace+"/"+h.ClientConfig.Service.Name] = true
		if len(h.ClientConfig.CABundle) == 0 {
			rs = append(rs, fail(check, h.Name, "no caBundle: the API server cannot call the webhook, so pods start without the agent (failurePolicy Ignore)",
				"the injector fills it in self mode (check its log and RBAC); with cert-manager, check its CA injector"))
			continue
		}
		rs = append(rs, checkServingCert(s, h.Name, h.ClientConfig.CABundle, h.ClientConfig.Service.Name, h.ClientConfig.Service.Namespace, now))
	}
	names := make([]string, 0, len(services))
	for k := range services {
		names = append(names, k)
	}
	sort.Strings(names)
	for _, svc := range names {
		readyEndpoints := 0
		for _, sl := range s.ServiceEndpoints[svc] {
			for _, e := range sl.Endpoints {
				if e.Conditions.Ready == nil || *e.Conditions.Ready {
					readyEndpoints += len(e.Addresses)
				}
			}
		}
		if readyEndpoints == 0 {
			rs = append(rs, fail("webhook-endpoints", svc, "the webhook's Service has no ready endpoint: every pod created now starts without the agent (failurePolicy Ignore)",
				"kubectl -n "+strings.Split(svc, "/")[0]+" get pods -l app.kubernetes.io/name=oneagent-csi-injector; its readiness says why"))
		} else {
			rs = append(rs, ok("webhook-endpoints", svc, fmt.Sprintf("%d ready endpoints", readyEndpoints)))
		}
	}
	return rs
}

// checkServingCert verifies the certificate the injector serves against a
// webhook entry's caBundle for the Service's DNS name, as the API server
// does: the chains its pods presented in a TLS handshake, or, when no pod
// could be reached, the chain in its Secret (what it loads and serves).
func checkServingCert(s Snapshot, entry string, bundle []byte, svc, ns string, now time.Time) Result {
	const check = "webhook-certificate"
	host := svc + "." + ns + ".svc"
	var reached []ServedCert
	var unreachable []string
	for _, sc := range s.ServedCerts[ns+"/"+svc] {
		if sc.Err == "" {
			reached = append(reached, sc)
		} else {
			unreachable = append(unreachable, sc.Pod+": "+sc.Err)
		}
	}
	if len(reached) > 0 {
		var bad []string
		var expires time.Time
		for _, sc := range reached {
			leaf, err := verifyChain(sc.Chain, bundle, host, now)
			if err != nil {
				bad = append(bad, fmt.Sprintf("%s: %v", sc.Pod, err))
				continue
			}
			if expires.IsZero() || leaf.NotAfter.Before(expires) {
				expires = leaf.NotAfter
			}
		}
		if len(bad) > 0 {
			return fail(check, entry, fmt.Sprintf("the caBundle does not verify the certificate served for %s by %s; the API server's calls fail and pods start without the agent",
				host, strings.Join(bad, "; ")),
				"self mode: the injector repairs the bundle within a minute when it runs (check its log); otherwise reapply cert-manager's inject-ca-from")
		}
		if left := expires.Sub(now); left < 7*24*time.Hour {
			return warn(check, entry, fmt.Sprintf("verified, but it expires in %s", left.Round(time.Hour)), "check that rotation runs (the injector's log, or cert-manager)")
		}
		if len(unreachable) > 0 {
			return warn(check, entry, fmt.Sprintf("the caBundle verifies what %d injector pods serve, but %s could not be reached", len(reached), strings.Join(unreachable, "; ")),
				"kubectl -n "+ns+" describe pod for the unreachable ones")
		}
		return ok(check, entry, fmt.Sprintf("the caBundle verifies the certificate every injector pod (%d) serves for %s in a TLS handshake (valid until %s)",
			len(reached), host, expires.UTC().Format(time.DateOnly)))
	}
	// No pod reached (no port-forward rights, no ready pod): the Secret.
	via := ""
	if len(unreachable) > 0 {
		via = " (no handshake: " + strings.Join(unreachable, "; ") + ")"
	}
	if len(s.ServingCert) == 0 {
		if e, bad := s.Errors["serving-certificate"]; bad {
			return warn(check, entry, "cannot read the injector's certificate: "+e+via, "run with credentials that may port-forward to the injector or read Secrets in "+s.Install.Namespace)
		}
		return fail(check, entry, "the injector has no certificate (Secrets "+strings.Join(s.Install.CertSecrets, ", ")+" hold none)"+via,
			"self mode: the injector's log and RBAC; cert-manager: kubectl describe certificate")
	}
	leaf, err := verifyChain(s.ServingCert, bundle, host, now)
	switch {
	case errors.Is(err, errNoChain):
		return fail(check, entry, "the injector's certificate in Secret "+s.ServingCertSecret+" does not parse", "delete the Secret's data; the injector (or cert-manager) makes a new one")
	case err != nil:
		return fail(check, entry, fmt.Sprintf("the caBundle does not verify the certificate in Secret %s for %s: %v; the API server's calls fail and pods start without the agent", s.ServingCertSecret, host, err),
			"self mode: the injector repairs the bundle within a minute when it runs (check its log); otherwise reapply cert-manager's inject-ca-from")
	}
	if left := leaf.NotAfter.Sub(now); left < 7*24*time.Hour {
		return warn(check, entry, fmt.Sprintf("verified, but it expires in %s", left.Round(time.Hour)), "check that rotation runs (the injector's log, or cert-manager)")
	}
	return ok(check, entry, fmt.Sprintf("the caBundle verifies the certificate in Secret %s for %s (valid until %s)%s",
		s.ServingCertSecret, host, leaf.NotAfter.UTC().Format(time.DateOnly), via))
}

// errNoChain is a PEM chain without a certificate that parses.
var errNoChain = errors.New("no certificate in the chain")

// verifyChain verifies a PEM chain (leaf first) for host against the
// roots in bundle and returns the leaf.
func verifyChain(pemChain, bundle []byte, host string, now time.Time) (*x509.Certificate, error) {
	var chain []*x509.Certificate
	rest := pemChain
	for {
		var b *pem.Block
		b, rest = pem.Decode(rest)
		if b == nil {
			break
		}
		if c, err := x509.ParseCertificate(b.Bytes); err == nil {
			chain = append(chain, c)
		}
	}
	if len(chain) == 0 {
		return nil, errNoChain
	}
	roots := x509.NewCertPool()
	if !roots.AppendCertsFromPEM(bundle) {
		return nil, errors.New("the caBundle holds no PEM certificate")
	}
	inter := x509.NewCertPool()
	for _, c := range chain[1:] {
		inter.AddCert(c)
	}
	if _, err := chain[0].Verify(x509.VerifyOptions{DNSName: host, Roots: roots, Intermediates: inter, CurrentTime: now}); err != nil {
		return nil, err
	}
	return chain[0], nil
}

func short(names []string) string {
	if len(names) > 5 {
		return strings.Join(names[:5], ", ") + fmt.Sprintf(" and %d more", len(names)-5)
	}
	return strings.Join(names, ", ")
}
