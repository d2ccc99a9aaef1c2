package troubleshoot

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"math/big"
	"strings"
	"testing"
	"time"

	admissionregistrationv1 "k8s.io/api/admissionregistration/v1"
	appsv1 "k8s.io/api/apps/v1"
	corev1 "k8s.io/api/core/v1"
	discoveryv1 "k8s.io/api/discovery/v1"
	networkingv1 "k8s.io/api/networking/v1"
	storagev1 "k8s.io/api/storage/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/util/intstr"
	"k8s.io/utils/ptr"

	"github.com/oneagent-csi/oneagent-csi/api"
	"github.com/oneagent-csi/oneagent-csi/provisioner"
	"github.com/oneagent-csi/oneagent-csi/storage"
)

var now = time.Date(2026, 12, 1, 12, 0, 0, 0, time.UTC)

// pki returns a CA PEM and a leaf chain PEM for dns, signed by it.
func pki(t *testing.T, dns string) (caPEM, leafPEM []byte) {
	t.Helper()
	key, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	ca := &x509.Certificate{SerialNumber: big.NewInt(1), Subject: pkix.Name{CommonName: "ca"}, IsCA: true, BasicConstraintsValid: true,
		KeyUsage: x509.KeyUsageCertSign, NotBefore: now.Add(-time.Hour), NotAfter: now.Add(90 * 24 * time.Hour)}
	caDER, err := x509.CreateCertificate(rand.Reader, ca, ca, &key.PublicKey, key)
	if err != nil {
		t.Fatal(err)
	}
	caCert, _ := x509.ParseCertificate(caDER)
	leafKey, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	leaf := &x509.Certificate{SerialNumber: big.NewInt(2), DNSNames: []string{dns}, NotBefore: now.Add(-time.Hour), NotAfter: now.Add(60 * 24 * time.Hour),
		ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth}, KeyUsage: x509.KeyUsageDigitalSignature}
	leafDER, err := x509.CreateCertificate(rand.Reader, leaf, caCert, &leafKey.PublicKey, key)
	if err != nil {
		t.Fatal(err)
	}
	return pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: caDER}), pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: leafDER})
}

// healthy is a one-node installation where every cluster check passes.
func healthy(t *testing.T) Snapshot {
	caPEM, leaf := pki(t, "oneagent-csi-injector.oneagent-csi.svc")
	node := corev1.Node{ObjectMeta: metav1.ObjectMeta{Name: "n1", Labels: map[string]string{"kubernetes.io/os": "linux"}}}
	driverPod := corev1.Pod{Spec: corev1.PodSpec{NodeName: "n1"},
		Status: corev1.PodStatus{Conditions: []corev1.PodCondition{{Type: corev1.PodReady, Status: corev1.ConditionTrue}}}}
	entry := func(name string) admissionregistrationv1.MutatingWebhook {
		return admissionregistrationv1.MutatingWebhook{Name: name, ClientConfig: admissionregistrationv1.WebhookClientConfig{CABundle: caPEM,
			Service: &admissionregistrationv1.ServiceReference{Namespace: "oneagent-csi", Name: "oneagent-csi-injector"}},
			NamespaceSelector: &metav1.LabelSelector{MatchExpressions: []metav1.LabelSelectorRequirement{
				{Key: "kubernetes.io/metadata.name", Operator: metav1.LabelSelectorOpNotIn, Values: []string{"kube-system", "oneagent-csi"}}}}}
	}
	return Snapshot{
		CSIDriver: &storagev1.CSIDriver{ObjectMeta: metav1.ObjectMeta{Name: "csi.oneagent.dynatrace.com"}, Spec: storagev1.CSIDriverSpec{
			AttachRequired: ptr.To(false), PodInfoOnMount: ptr.To(true), VolumeLifecycleModes: []storagev1.VolumeLifecycleMode{storagev1.VolumeLifecycleEphemeral}}},
		DaemonSet:  &appsv1.DaemonSet{Spec: appsv1.DaemonSetSpec{Template: corev1.PodTemplateSpec{Spec: corev1.PodSpec{NodeSelector: map[string]string{"kubernetes.io/os": "linux"}}}}},
		DriverPods: []corev1.Pod{driverPod},
		Nodes:      []corev1.Node{node, {ObjectMeta: metav1.ObjectMeta{Name: "win", Labels: map[string]string{"kubernetes.io/os": "windows"}}}},
		CSINodes:   []storagev1.CSINode{{ObjectMeta: metav1.ObjectMeta{Name: "n1"}, Spec: storagev1.CSINodeSpec{Drivers: []storagev1.CSINodeDriver{{Name: "csi.oneagent.dynatrace.com"}}}}},
		Webhook: &admissionregistrationv1.MutatingWebhookConfiguration{Webhooks: []admissionregistrationv1.MutatingWebhook{
			entry("namespace.injector.oneagent-csi.dynatrace.com"), entry("pod.injector.oneagent-csi.dynatrace.com")}},
		ServiceEndpoints: map[string][]discoveryv1.EndpointSlice{"oneagent-csi/oneagent-csi-injector": {{Endpoints: []discoveryv1.Endpoint{
			{Addresses: []string{"10.0.0.5"}, Conditions: discoveryv1.EndpointConditions{Ready: ptr.To(true)}}}}}},
		ServingCert: leaf, ServingCertSecret: "oneagent-csi-injector-certs",
		ServedCerts: map[string][]ServedCert{"oneagent-csi/oneagent-csi-injector": {
			{Pod: "oneagent-csi/injector-a", Chain: leaf}, {Pod: "oneagent-csi/injector-b", Chain: leaf}}},
		TenantHosts: []string{"abc.live.dynatrace.com"},
		TenantChecks: map[string][]provisioner.TenantCheck{"n1": {{Tenant: "prod", Steps: []provisioner.CheckStep{
			{Name: "dns", OK: true}, {Name: "api", OK: true}, {Name: "version", OK: true}}}}},
	}
}

// statuses maps check/subject to status, for the table's expectations.
func statuses(rs []Result) map[string]Status {
	out := map[string]Status{}
	for _, r := range rs {
		key := r.Check
		if prev, dup := out[key]; !dup || prev == OK {
			out[key] = r.Status
		}
	}
	return out
}

func TestClusterChecks(t *testing.T) {
	for _, tc := range []struct {
		name   string
		break_ func(t *testing.T, s *Snapshot)
		check  string
		want   Status
		msg    string
	}{
		{"healthy", func(*testing.T, *Snapshot) {}, "", OK, ""},
		{"no CSIDriver", func(_ *testing.T, s *Snapshot) { s.CSIDriver = nil }, "csidriver", Failure, "does not exist"},
		{"CSIDriver without pod info", func(_ *testing.T, s *Snapshot) { s.CSIDriver.Spec.PodInfoOnMount = ptr.To(false) }, "csidriver", Failure, "podInfoOnMount must be true"},
		{"driver pod not ready", func(_ *testing.T, s *Snapshot) { s.DriverPods[0].Status.Conditions = nil }, "daemonset", Failure, "no ready driver pod on 1 of 1 nodes: n1"},
		{"no DaemonSet", func(_ *testing.T, s *Snapshot) { s.DaemonSet = nil }, "daemonset", Failure, "does not exist"},
		{"not registered", func(_ *testing.T, s *Snapshot) { s.CSINodes = nil }, "registration", Failure, "not found in the list of registered CSI drivers"},
		{"no webhook", func(_ *testing.T, s *Snapshot) { s.Webhook = nil }, "webhook", Failure, "does not exist"},
		{"empty caBundle", func(_ *testing.T, s *Snapshot) { s.Webhook.Webhooks[0].ClientConfig.CABundle = nil }, "webhook", Failure, "no caBundle"},
		{"caBundle of another CA", func(t *testing.T, s *Snapshot) {
			other, _ := pki(t, "x")
			s.Webhook.Webhooks[1].ClientConfig.CABundle = other
		}, "webhook-certificate", Failure, "does not verify"},
		{"certificate for another name", func(t *testing.T, s *Snapshot) {
			ca, leaf := pki(t, "elsewhere.svc")
			s.ServingCert = leaf
			for _, sc := range s.ServedCerts {
				for i := range sc {
					sc[i].Chain = leaf
				}
			}
			for i := range s.Webhook.Webhooks {
				s.Webhook.Webhooks[i].ClientConfig.CABundle = ca
			}
		}, "webhook-certificate", Failure, "oneagent-csi-injector.oneagent-csi.svc"},
		{"every replica handshaken", func(*testing.T, *Snapshot) {}, "webhook-certificate", OK, "every injector pod (2) serves for oneagent-csi-injector.oneagent-csi.svc in a TLS handshake"},
		{"a replica serves a certificate of another CA", func(t *testing.T, s *Snapshot) {
			_, leaf := pki(t, "oneagent-csi-injector.oneagent-csi.svc")
			s.ServedCerts["oneagent-csi/oneagent-csi-injector"][1].Chain = leaf
		}, "webhook-certificate", Failure, "by oneagent-csi/injector-b: x509"},
		{"a replica unreachable", func(_ *testing.T, s *Snapshot) {
			s.ServedCerts["oneagent-csi/oneagent-csi-injector"][1] = ServedCert{Pod: "oneagent-csi/injector-b", Err: "connection refused"}
		}, "webhook-certificate", Warning, "oneagent-csi/injector-b: connection refused could not be reached"},
		{"no port-forward rights: the Secret's certificate", func(_ *testing.T, s *Snapshot) {
			s.ServedCerts = map[string][]ServedCert{"oneagent-csi/oneagent-csi-injector": {{Pod: "oneagent-csi/injector-a", Err: "pods/portforward forbidden"}}}
		}, "webhook-certificate", OK, "in Secret oneagent-csi-injector-certs"},
		{"Secret's certificate of another CA", func(t *testing.T, s *Snapshot) {
			_, leaf := pki(t, "oneagent-csi-injector.oneagent-csi.svc")
			s.ServedCerts, s.ServingCert = nil, leaf
		}, "webhook-certificate", Failure, "in Secret oneagent-csi-injector-certs"},
		{"no certificate", func(_ *testing.T, s *Snapshot) { s.ServingCert, s.ServedCerts = nil, nil }, "webhook-certificate", Failure, "has no certificate"},
		{"certificate unreadable", func(_ *testing.T, s *Snapshot) {
			s.ServingCert, s.ServedCerts = nil, nil
			s.Errors = map[string]string{"serving-certificate": "403 Forbidden"}
		}, "webhook-certificate", Warning, "cannot read"},
		{"token refused from a node", func(_ *testing.T, s *Snapshot) {
			s.TenantChecks["n1"][0].Steps[1] = provisioner.CheckStep{Name: "api", Detail: "tenant refused the token"}
			s.TenantChecks["n1"][0].Steps = s.TenantChecks["n1"][0].Steps[:2]
		}, "tenant", Failure, "api: tenant refused the token"},
		{"no ready endpoint", func(_ *testing.T, s *Snapshot) {
			s.ServiceEndpoints["oneagent-csi/oneagent-csi-injector"][0].Endpoints[0].Conditions.Ready = ptr.To(false)
		}, "webhook-endpoints", Failure, "no ready endpoint"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			s := healthy(t)
			tc.break_(t, &s)
			rs := Cluster(s, now)
			got := statuses(rs)
			if tc.check == "" {
				for _, r := range rs {
					if r.Status != OK {
						t.Errorf("%+v", r)
					}
				}
				if Failed(rs) {
					t.Error("Failed on a healthy install")
				}
				return
			}
			if got[tc.check] != tc.want {
				t.Fatalf("%s = %s, want %s: %+v", tc.check, got[tc.check], tc.want, rs)
			}
			for _, r := range rs {
				if r.Check == tc.check && r.Status == tc.want {
					if !strings.Contains(r.Message, tc.msg) || (r.Status != OK && r.Fix == "") {
						t.Errorf("message %q (fix %q), want it to say %q and a fix", r.Message, r.Fix, tc.msg)
					}
				}
			}
		})
	}
}

func TestNamespaceAndIstioChecks(t *testing.T) {
	pod := func(name string, ann map[string]string, inits ...string) corev1.Pod {
		p := corev1.Pod{ObjectMeta: metav1.ObjectMeta{Name: name, Namespace: "shop", Annotations: ann, Labels: map[string]string{"app": "shop"}}}
		for _, n := range inits {
			p.Spec.InitContainers = append(p.Spec.InitContainers, corev1.Container{Name: n})
		}
		return p
	}
	injected := map[string]string{api.InjectedAnnotation: "true"}
	denyEgress := networkingv1.NetworkPolicy{ObjectMeta: metav1.ObjectMeta{Name: "deny"}, Spec: networkingv1.NetworkPolicySpec{
		PolicyTypes: []networkingv1.PolicyType{networkingv1.PolicyTypeEgress},
		Egress:      []networkingv1.NetworkPolicyEgressRule{{Ports: []networkingv1.NetworkPolicyPort{{Port: ptr.To(intstr.FromInt32(53))}}}}}}
	allow443 := networkingv1.NetworkPolicy{ObjectMeta: metav1.ObjectMeta{Name: "tenant"}, Spec: networkingv1.NetworkPolicySpec{
		PolicyTypes: []networkingv1.PolicyType{networkingv1.PolicyTypeEgress},
		Egress:      []networkingv1.NetworkPolicyEgressRule{{Ports: []networkingv1.NetworkPolicyPort{{Port: ptr.To(intstr.FromInt32(443))}}}}}}
	registryOnly := "outboundTrafficPolicy:\n  mode: REGISTRY_ONLY\n"
	for _, tc := range []struct {
		name  string
		edit  func(s *Snapshot)
		check string
		want  Status
	}{
		{"opted in, injected", func(s *Snapshot) { s.Pods = []corev1.Pod{pod("a", injected)} }, "pod-injected", OK},
		{"not labelled", func(s *Snapshot) { s.Namespace.Labels = nil }, "namespace", Warning},
		{"ignored namespace", func(s *Snapshot) { s.Namespace.Name = "kube-system" }, "namespace", Failure},
		{"never seen", func(s *Snapshot) { s.Pods = []corev1.Pod{pod("a", nil)} }, "pod-injected", Failure},
		{"not injected with a reason", func(s *Snapshot) {
			s.Pods = []corev1.Pod{pod("a", map[string]string{api.InjectedAnnotation: "false", api.ReasonAnnotation: "windows pod"})}
		}, "pod-injected", Warning},
		{"failed mount", func(s *Snapshot) {
			s.Pods = []corev1.Pod{pod("a", injected)}
			s.Events = []corev1.Event{{InvolvedObject: corev1.ObjectReference{Kind: "Pod", Name: "a"}, Reason: "FailedMount",
				Message: `MountVolume.SetUp failed for volume "oneagent": driver name csi.oneagent.dynatrace.com not found`}}
		}, "pod-mount", Failure},
		{"egress denied", func(s *Snapshot) {
			s.Pods = []corev1.Pod{pod("a", injected)}
			s.NetworkPolicies = []networkingv1.NetworkPolicy{denyEgress}
		}, "pod-egress", Warning},
		{"egress denied but 443 allowed by another policy", func(s *Snapshot) {
			s.Pods = []corev1.Pod{pod("a", injected)}
			s.NetworkPolicies = []networkingv1.NetworkPolicy{denyEgress, allow443}
		}, "pod-egress", ""},
		{"volume published", func(s *Snapshot) {
			p := pod("a", injected)
			p.UID, p.Spec.NodeName = "uid-a", "n1"
			s.Pods = []corev1.Pod{p}
			s.NodeVolumes = map[string][]storage.Volume{"n1": {{PodUID: "uid-a", State: storage.VolumePublished, Tenant: "prod"}}}
		}, "pod-volume", OK},
		{"volume failed open", func(s *Snapshot) {
			p := pod("a", injected)
			p.UID, p.Spec.NodeName = "uid-a", "n1"
			s.Pods = []corev1.Pod{p}
			s.NodeVolumes = map[string][]storage.Volume{"n1": {{PodUID: "uid-a", State: storage.VolumeFailedOpen, Reason: "unknown tenant"}}}
		}, "pod-volume", Failure},
		{"volume pending", func(s *Snapshot) {
			p := pod("a", injected)
			p.UID, p.Spec.NodeName = "uid-a", "n1"
			s.Pods = []corev1.Pod{p}
			s.NodeVolumes = map[string][]storage.Volume{"n1": {{PodUID: "uid-a", State: storage.VolumePending}}}
		}, "pod-volume", Warning},
		{"container config from the driver", func(s *Snapshot) {
			p := pod("a", injected)
			p.Spec.Volumes = []corev1.Volume{{Name: api.AgentVolumeName, VolumeSource: corev1.VolumeSource{CSI: &corev1.CSIVolumeSource{
				VolumeAttributes: map[string]string{api.AttrContainers: "app=app:1"}}}}}
			s.Pods = []corev1.Pod{p}
		}, "pod-container-config", OK},
		{"container config from a driver too old", func(s *Snapshot) {
			p := pod("a", injected)
			p.Spec.NodeName = "n1"
			p.Spec.Volumes = []corev1.Volume{{Name: api.AgentVolumeName, VolumeSource: corev1.VolumeSource{CSI: &corev1.CSIVolumeSource{
				VolumeAttributes: map[string]string{api.AttrContainers: "app=app:1"}}}}}
			p.Status.ContainerStatuses = []corev1.ContainerStatus{{Name: "app", State: corev1.ContainerState{Waiting: &corev1.ContainerStateWaiting{
				Reason: "CreateContainerConfigError", Message: `failed to create subPath directory for volumeMount "oneagent" of container "app"`}}}}
			s.Pods = []corev1.Pod{p}
		}, "pod-container-config", Failure},
		{"container config by the init container", func(s *Snapshot) { s.Pods = []corev1.Pod{pod("a", injected)} }, "pod-container-config", ""},
		{"envoy metrics missing", func(s *Snapshot) {
			p := pod("a", injected)
			p.Spec.Containers = []corev1.Container{{Name: "app"}, {Name: "istio-proxy"}}
			s.Pods, s.EnvoyMetrics = []corev1.Pod{p}, true
		}, "istio-envoy-metrics", Warning},
		{"envoy metrics annotated", func(s *Snapshot) {
			p := pod("a", map[string]string{api.InjectedAnnotation: "true", "metrics.dynatrace.com/scrape": "true"})
			p.Spec.Containers = []corev1.Container{{Name: "app"}, {Name: "istio-proxy"}}
			s.Pods, s.EnvoyMetrics = []corev1.Pod{p}, true
		}, "istio-envoy-metrics", OK},
		{"registry only without entries", func(s *Snapshot) { s.MeshConfig, s.ServiceEntryHosts = &registryOnly, []string{} }, "istio-egress", Failure},
		{"registry only with a wildcard entry", func(s *Snapshot) {
			s.MeshConfig, s.ServiceEntryHosts = &registryOnly, []string{"*.live.dynatrace.com"}
		}, "istio-egress", OK},
		{"native sidecar, ours after the proxy", func(s *Snapshot) {
			s.Pods = []corev1.Pod{pod("a", injected, "istio-validation", "istio-proxy", api.InitContainerName)}
		}, "istio-placement", OK},
		{"native sidecar, ours before the proxy", func(s *Snapshot) {
			s.Pods = []corev1.Pod{pod("a", injected, api.InitContainerName, "istio-proxy")}
		}, "istio-placement", Failure},
		{"classic, ours after istio-init", func(s *Snapshot) {
			s.Pods = []corev1.Pod{pod("a", injected, "istio-init", api.InitContainerName)}
		}, "istio-placement", Failure},
	} {
		t.Run(tc.name, func(t *testing.T) {
			s := healthy(t)
			s.Namespace = &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: "shop", Labels: map[string]string{api.InjectLabel: "true"}}}
			tc.edit(&s)
			got := statuses(append(Namespace(s), Istio(s)...))
			if got[tc.check] != tc.want {
				t.Fatalf("%s = %q, want %q (%v)", tc.check, got[tc.check], tc.want, got)
			}
		})
	}
}
