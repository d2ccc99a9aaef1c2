// Package manifests checks the deploy/ manifests: every document decodes
// strictly into its Kubernetes type, and the settings the design promises
// (webhook policies, Istio labels, least privilege) are there.
package manifests

import (
	"fmt"
	"k8s.io/apimachinery/pkg/util/intstr"
	"net/url"
	"os"
	"path/filepath"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"testing"

	admissionregistrationv1 "k8s.io/api/admissionregistration/v1"
	appsv1 "k8s.io/api/apps/v1"
	corev1 "k8s.io/api/core/v1"
	networkingv1 "k8s.io/api/networking/v1"
	policyv1 "k8s.io/api/policy/v1"
	rbacv1 "k8s.io/api/rbac/v1"
	storagev1 "k8s.io/api/storage/v1"
	"sigs.k8s.io/yaml"

	"github.com/oneagent-csi/oneagent-csi/api"
	"github.com/oneagent-csi/oneagent-csi/injector"
)

type objects struct {
	deployments map[string]*appsv1.Deployment
	daemonSets  map[string]*appsv1.DaemonSet
	webhooks    []*admissionregistrationv1.MutatingWebhookConfiguration
	configMaps  map[string]*corev1.ConfigMap
	namespaces  map[string]*corev1.Namespace
	pdbs        []*policyv1.PodDisruptionBudget
	drivers     []*storagev1.CSIDriver
	policies    map[string]*networkingv1.NetworkPolicy
	certManager map[string]map[string]any // kind/name -> object
	roles       map[string]*rbacv1.Role
	roleBinds   map[string]*rbacv1.RoleBinding
	cRoles      map[string]*rbacv1.ClusterRole
	cRoleBinds  map[string]*rbacv1.ClusterRoleBinding
	secrets     map[string]*corev1.Secret
}

func load(t *testing.T) objects {
	t.Helper()
	o := objects{deployments: map[string]*appsv1.Deployment{}, daemonSets: map[string]*appsv1.DaemonSet{},
		configMaps: map[string]*corev1.ConfigMap{}, namespaces: map[string]*corev1.Namespace{},
		policies: map[string]*networkingv1.NetworkPolicy{}, certManager: map[string]map[string]any{},
		roles: map[string]*rbacv1.Role{}, roleBinds: map[string]*rbacv1.RoleBinding{}, cRoles: map[string]*rbacv1.ClusterRole{},
		cRoleBinds: map[string]*rbacv1.ClusterRoleBinding{}, secrets: map[string]*corev1.Secret{}}
	files, err := filepath.Glob("../../deploy/kubernetes/*.yaml")
	if err != nil || len(files) == 0 {
		t.Fatalf("no manifests: %v", err)
	}
	// cert-manager's objects, from its component.
	files = append(files, "../../deploy/components/cert-manager/certificate.yaml")
	for _, file := range files {
		data, err := os.ReadFile(file)
		if err != nil {
			t.Fatal(err)
		}
		for i, doc := range strings.Split(string(data), "\n---\n") {
			var meta struct{ APIVersion, Kind string }
			if err := yaml.Unmarshal([]byte(doc), &meta); err != nil {
				t.Fatalf("%s doc %d: %v", file, i, err)
			}
			var into any
			switch meta.Kind {
			case "Deployment":
				d := &appsv1.Deployment{}
				o.deployments[name(file)] = d
				into = d
			case "DaemonSet":
				d := &appsv1.DaemonSet{}
				o.daemonSets[name(file)] = d
				into = d
			case "MutatingWebhookConfiguration":
				w := &admissionregistrationv1.MutatingWebhookConfiguration{}
				o.webhooks = append(o.webhooks, w)
				into = w
			case "ConfigMap":
				c := &corev1.ConfigMap{}
				into = c
				defer func() { o.configMaps[c.Name] = c }()
			case "Namespace":
				n := &corev1.Namespace{}
				into = n
				defer func() { o.namespaces[n.Name] = n }()
			case "PodDisruptionBudget":
				p := &policyv1.PodDisruptionBudget{}
				o.pdbs = append(o.pdbs, p)
				into = p
			case "CSIDriver":
				d := &storagev1.CSIDriver{}
				o.drivers = append(o.drivers, d)
				into = d
			case "Service":
				into = &corev1.Service{}
			case "ServiceAccount":
				into = &corev1.ServiceAccount{}
			case "Secret":
				sec := &corev1.Secret{}
				into = sec
				defer func() { o.secrets[sec.Name] = sec }()
			case "Role":
				r := &rbacv1.Role{}
				into = r
				defer func() { o.roles[r.Name] = r }()
			case "RoleBinding":
				r := &rbacv1.RoleBinding{}
				into = r
				defer func() { o.roleBinds[r.Name] = r }()
			case "ClusterRole":
				r := &rbacv1.ClusterRole{}
				into = r
				defer func() { o.cRoles[r.Name] = r }()
			case "ClusterRoleBinding":
				r := &rbacv1.ClusterRoleBinding{}
				into = r
				defer func() { o.cRoleBinds[r.Name] = r }()
			case "NetworkPolicy":
				np := &networkingv1.NetworkPolicy{}
				into = np
				defer func() { o.policies[np.Name] = np }()
			case "Kustomization":
				continue // checked in TestKustomization
			case "Issuer", "Certificate":
				// cert-manager's types: not a dependency of ours, read generically.
				var obj map[string]any
				if err := yaml.Unmarshal([]byte(doc), &obj); err != nil {
					t.Fatalf("%s doc %d: %v", file, i, err)
				}
				md, _ := obj["metadata"].(map[string]any)
				o.certManager[meta.Kind+"/"+fmt.Sprint(md["name"])] = obj
				continue
			case "PrometheusRule":
				continue // the Prometheus Operator's type
			default:
				t.Fatalf("%s doc %d: kind %q not checked by this test", file, i, meta.Kind)
			}
			if err := yaml.UnmarshalStrict([]byte(doc), into); err != nil {
				t.Fatalf("%s doc %d (%s): %v", file, i, meta.Kind, err)
			}
		}
	}
	return o
}

// egressPorts lists the ports a NetworkPolicy's egress rules allow.
func egressPorts(np *networkingv1.NetworkPolicy) map[int]bool {
	out := map[int]bool{}
	if np == nil {
		return out
	}
	for _, r := range np.Spec.Egress {
		for _, p := range r.Ports {
			if p.Port != nil {
				out[p.Port.IntValue()] = true
			}
		}
	}
	return out
}

// urlPort is the port a URL connects to (its explicit port, else 443 for
// https and 80 for http).
func urlPort(t *testing.T, raw string) int {
	t.Helper()
	u, err := url.Parse(raw)
	if err != nil {
		t.Fatal(err)
	}
	if p := u.Port(); p != "" {
		n, err := strconv.Atoi(p)
		if err != nil {
			t.Fatal(err)
		}
		return n
	}
	if u.Scheme == "http" {
		return 80
	}
	return 443
}

func name(file string) string { return strings.TrimSuffix(filepath.Base(file), ".yaml") }

func TestManifests(t *testing.T) {
	o := load(t)

	t.Run("csidriver", func(t *testing.T) {
		if len(o.drivers) != 1 || o.drivers[0].Name != api.DefaultDriverName || o.drivers[0].Spec.PodInfoOnMount == nil || !*o.drivers[0].Spec.PodInfoOnMount {
			t.Fatalf("CSIDriver = %+v", o.drivers)
		}
	})

	t.Run("webhook", func(t *testing.T) {
		if len(o.webhooks) != 1 || len(o.webhooks[0].Webhooks) != 2 {
			t.Fatalf("want one configuration with two entries, got %+v", o.webhooks)
		}
		paths := map[string]bool{}
		for _, w := range o.webhooks[0].Webhooks {
			if w.FailurePolicy == nil || *w.FailurePolicy != admissionregistrationv1.Ignore {
				t.Errorf("%s: failurePolicy must be Ignore", w.Name)
			}
			if w.SideEffects == nil || *w.SideEffects != admissionregistrationv1.SideEffectClassNone {
				t.Errorf("%s: sideEffects must be None", w.Name)
			}
			if w.TimeoutSeconds == nil || *w.TimeoutSeconds > 10 {
				t.Errorf("%s: timeoutSeconds must be set and at most 10", w.Name)
			}
			if w.ReinvocationPolicy == nil || *w.ReinvocationPolicy != admissionregistrationv1.IfNeededReinvocationPolicy {
				t.Errorf("%s: reinvocationPolicy must be IfNeeded", w.Name)
			}
			excluded := false
			for _, e := range w.NamespaceSelector.MatchExpressions {
				if e.Key == "kubernetes.io/metadata.name" && e.Operator == "NotIn" {
					excluded = true
					for _, ns := range append(slices.Clone(injector.DefaultIgnoredNamespaces), "oneagent-csi") {
						if !slices.Contains(e.Values, ns) {
							t.Errorf("%s: namespace %s not excluded", w.Name, ns)
						}
					}
				}
			}
			if !excluded {
				t.Errorf("%s: no namespaceSelector excluding the ignored namespaces", w.Name)
			}
			if w.ClientConfig.Service == nil || w.ClientConfig.Service.Path == nil {
				t.Fatalf("%s: no service path", w.Name)
			}
			paths[*w.ClientConfig.Service.Path] = true
		}
		if !paths[injector.PathNamespaceOptIn] || !paths[injector.PathPodOptIn] {
			t.Errorf("webhook paths = %v", paths)
		}
	})

	t.Run("injector deployment", func(t *testing.T) {
		d := o.deployments["injector-deployment"]
		if d == nil {
			t.Fatal("no injector Deployment")
		}
		if d.Spec.Replicas == nil || *d.Spec.Replicas != 2 {
			t.Errorf("replicas = %v, want 2", d.Spec.Replicas)
		}
		ps := d.Spec.Template.Spec
		if ps.SecurityContext == nil || ps.SecurityContext.RunAsNonRoot == nil || !*ps.SecurityContext.RunAsNonRoot {
			t.Errorf("injector pods must run as non-root")
		}
		if ps.AutomountServiceAccountToken == nil || !*ps.AutomountServiceAccountToken {
			t.Errorf("injector pods need their token to manage their own certificate (--cert-mode=self)")
		}
		for _, c := range ps.Containers {
			sc := c.SecurityContext
			if sc == nil || sc.ReadOnlyRootFilesystem == nil || !*sc.ReadOnlyRootFilesystem || sc.AllowPrivilegeEscalation == nil || *sc.AllowPrivilegeEscalation {
				t.Errorf("%s: want read-only root fs and no privilege escalation", c.Name)
			}
		}
		if len(o.pdbs) != 1 {
			t.Errorf("want a PodDisruptionBudget for the injector")
		}
	})

	t.Run("istio labels", func(t *testing.T) {
		for name, tmpl := range map[string]corev1.PodTemplateSpec{
			"injector": o.deployments["injector-deployment"].Spec.Template,
			"node":     o.daemonSets["node-daemonset"].Spec.Template,
		} {
			if tmpl.Labels["sidecar.istio.io/inject"] != "false" || tmpl.Labels["istio.io/dataplane-mode"] != "none" {
				t.Errorf("%s pod template labels = %v", name, tmpl.Labels)
			}
		}
		ns := o.namespaces["oneagent-csi"]
		if ns == nil || ns.Labels["istio-injection"] != "disabled" {
			t.Errorf("namespace = %+v", ns)
		}
	})

	t.Run("node DaemonSet runs on Linux nodes only", func(t *testing.T) {
		// The injector skips pods that cannot run on Linux nodes; the
		// DaemonSet must not land on nodes where it cannot mount either.
		if got := o.daemonSets["node-daemonset"].Spec.Template.Spec.NodeSelector["kubernetes.io/os"]; got != "linux" {
			t.Errorf("node DaemonSet nodeSelector kubernetes.io/os = %q, want linux", got)
		}
	})

	t.Run("CSIDriver honours SELinux labels", func(t *testing.T) {
		if len(o.drivers) != 1 || o.drivers[0].Spec.SELinuxMount == nil || !*o.drivers[0].Spec.SELinuxMount {
			t.Errorf("CSIDriver seLinuxMount must be true (kubelet then passes the pod's context= option)")
		}
	})

	t.Run("node DaemonSet rolls over a fleet", func(t *testing.T) {
		ru := o.daemonSets["node-daemonset"].Spec.UpdateStrategy.RollingUpdate
		if ru == nil || ru.MaxUnavailable == nil || ru.MaxUnavailable.Type != intstr.String || !strings.HasSuffix(ru.MaxUnavailable.StrVal, "%") {
			t.Errorf("maxUnavailable = %v, want a percentage (500 nodes one at a time take hours)", ru)
		}
	})

	t.Run("node egress allows every tenant's port", func(t *testing.T) {
		cfg := o.configMaps["oneagent-csi-node"]
		if cfg == nil {
			t.Fatal("no node ConfigMap")
		}
		var node struct {
			Tenants []struct{ APIURL, Proxy string } `json:"tenants"`
		}
		if err := yaml.Unmarshal([]byte(cfg.Data["config.yaml"]), &node); err != nil {
			t.Fatal(err)
		}
		allowed := egressPorts(o.policies["oneagent-csi-node"])
		for _, tn := range node.Tenants {
			for _, raw := range []string{tn.APIURL, tn.Proxy} {
				if raw == "" {
					continue
				}
				if port := urlPort(t, raw); !allowed[port] {
					t.Errorf("the node NetworkPolicy does not allow egress to port %d of %s (allowed: %v)", port, raw, allowed)
				}
			}
		}
		if !allowed[53] {
			t.Error("the node NetworkPolicy does not allow DNS")
		}
	})

	t.Run("egress ports component adds the ActiveGate and proxy ports", func(t *testing.T) {
		data, err := os.ReadFile("../../deploy/components/tenant-egress-ports/kustomization.yaml")
		if err != nil {
			t.Fatal(err)
		}
		var comp struct {
			Kind    string
			Patches []struct {
				Target struct{ Kind, Name string }
				Patch  string
			}
		}
		if err := yaml.Unmarshal(data, &comp); err != nil || comp.Kind != "Component" || len(comp.Patches) != 1 {
			t.Fatalf("component = %+v, %v", comp, err)
		}
		if tg := comp.Patches[0].Target; tg.Kind != "NetworkPolicy" || o.policies[tg.Name] == nil {
			t.Fatalf("the component patches %s/%s, which the base does not have", tg.Kind, tg.Name)
		}
		var ops []struct {
			Op, Path string
			Value    networkingv1.NetworkPolicyEgressRule
		}
		if err := yaml.Unmarshal([]byte(comp.Patches[0].Patch), &ops); err != nil || len(ops) != 1 {
			t.Fatalf("patch: %v", err)
		}
		got := map[int]bool{}
		for _, p := range ops[0].Value.Ports {
			got[p.Port.IntValue()] = true
		}
		if ops[0].Path != "/spec/egress/-" || !got[9999] || !got[3128] {
			t.Errorf("the component's patch %+v does not add ports 9999 and 3128 to the egress rules", ops[0])
		}
	})

	t.Run("self-provisioned TLS has exactly the rights it needs", func(t *testing.T) {
		args := map[string]string{}
		for _, a := range o.deployments["injector-deployment"].Spec.Template.Spec.Containers[0].Args {
			if k, v, ok := strings.Cut(a, "="); ok {
				args[k] = v
			}
		}
		secret, hook := args["--cert-secret"], args["--webhook-config"]
		if args["--cert-mode"] != "self" || secret == "" || hook == "" {
			t.Fatalf("injector args %v: want --cert-mode=self, --cert-secret and --webhook-config", args)
		}
		if o.secrets[secret] == nil || len(o.secrets[secret].Data) != 0 {
			t.Errorf("the base must ship the Secret %s empty (apply then never resets what the injector wrote)", secret)
		}
		if len(o.webhooks) != 1 || o.webhooks[0].Name != hook {
			t.Errorf("--webhook-config=%s names no webhook configuration of the base", hook)
		}
		for _, w := range o.webhooks[0].Webhooks {
			if len(w.ClientConfig.CABundle) != 0 {
				t.Errorf("%s: a caBundle in the manifest would be reset by every apply", w.Name)
			}
		}
		role, crole := o.roles["oneagent-csi-injector"], o.cRoles["oneagent-csi-injector"]
		if role == nil || crole == nil {
			t.Fatal("no Role or ClusterRole oneagent-csi-injector")
		}
		for _, r := range role.Rules {
			named := slices.Equal(r.ResourceNames, []string{secret})
			if !slices.Equal(r.Resources, []string{"secrets"}) || (!named && !slices.Equal(r.Verbs, []string{"create"})) {
				t.Errorf("Role rule %+v: only get/update on Secret %s, and create (not limitable by name)", r, secret)
			}
			if named && !slices.Equal(r.Verbs, []string{"get", "update"}) {
				t.Errorf("Role rule %+v: verbs want [get update]", r)
			}
		}
		for _, r := range crole.Rules {
			if !slices.Equal(r.Resources, []string{"mutatingwebhookconfigurations"}) || !slices.Equal(r.ResourceNames, []string{hook}) || !slices.Equal(r.Verbs, []string{"get", "update"}) {
				t.Errorf("ClusterRole rule %+v: only get/update on MutatingWebhookConfiguration %s", r, hook)
			}
		}
		for _, subjects := range [][]rbacv1.Subject{o.roleBinds["oneagent-csi-injector"].Subjects, o.cRoleBinds["oneagent-csi-injector"].Subjects} {
			if len(subjects) != 1 || subjects[0].Name != "oneagent-csi-injector" || subjects[0].Kind != "ServiceAccount" {
				t.Errorf("binding subjects %+v: want only the injector's ServiceAccount", subjects)
			}
		}
		if p := egressPorts(o.policies["oneagent-csi-injector"]); !p[443] || !p[6443] || len(p) != 2 {
			t.Errorf("injector egress ports %v: want the API server's 443 and 6443 only", p)
		}
	})

	t.Run("cert-manager chain keeps the caBundle across leaf rotations", func(t *testing.T) {
		leaf := o.certManager["Certificate/oneagent-csi-injector"]
		comp, err := os.ReadFile("../../deploy/components/cert-manager/kustomization.yaml")
		if err != nil {
			t.Fatal(err)
		}
		if leaf == nil || !strings.Contains(string(comp), "cert-manager.io/inject-ca-from: oneagent-csi/oneagent-csi-injector") {
			t.Fatal("the component must fill the webhook's caBundle from the injector's Certificate")
		}
		issuerName := leaf["spec"].(map[string]any)["issuerRef"].(map[string]any)["name"]
		issuer := o.certManager[fmt.Sprint("Issuer/", issuerName)]
		if issuer == nil {
			t.Fatalf("the leaf's issuer %v is not in the manifests", issuerName)
		}
		ca, ok := issuer["spec"].(map[string]any)["ca"].(map[string]any)
		if !ok {
			t.Fatalf("the leaf's issuer %v is not a CA issuer: a self-signed leaf puts itself in the caBundle, which then changes at every rotation", issuerName)
		}
		var caCert map[string]any
		for _, obj := range o.certManager {
			if spec, _ := obj["spec"].(map[string]any); obj["kind"] == "Certificate" && spec["secretName"] == ca["secretName"] {
				caCert = spec
			}
		}
		if caCert == nil || caCert["isCA"] != true {
			t.Fatalf("no CA Certificate writes the CA issuer's secret %v", ca["secretName"])
		}
	})

	t.Run("injector config loads", func(t *testing.T) {
		cm := o.configMaps["oneagent-csi-injector"]
		if cm == nil {
			t.Fatal("no injector ConfigMap")
		}
		path := filepath.Join(t.TempDir(), "injector.yaml")
		if err := os.WriteFile(path, []byte(cm.Data["injector.yaml"]), 0o600); err != nil {
			t.Fatal(err)
		}
		if _, err := injector.LoadConfig(path); err != nil {
			t.Fatal(err)
		}
	})
}

// TestPrometheusRuleUsesRealMetrics checks that every metric an alert uses
// is one the code defines.
func TestPrometheusRuleUsesRealMetrics(t *testing.T) {
	data, err := os.ReadFile("../../deploy/kubernetes/prometheusrule.yaml")
	if err != nil {
		t.Fatal(err)
	}
	var rule struct {
		Spec struct {
			Groups []struct {
				Rules []struct {
					Alert string `json:"alert"`
					Expr  string `json:"expr"`
				} `json:"rules"`
			} `json:"groups"`
		} `json:"spec"`
	}
	if err := yaml.Unmarshal(data, &rule); err != nil {
		t.Fatal(err)
	}
	defined := map[string]bool{}
	nameRE := regexp.MustCompile(`oneagent_csi_[a-z_]+`)
	for _, dir := range []string{"../../driver", "../../provisioner", "../../injector"} {
		files, _ := filepath.Glob(filepath.Join(dir, "*.go"))
		for _, f := range files {
			src, err := os.ReadFile(f)
			if err != nil {
				t.Fatal(err)
			}
			for _, n := range nameRE.FindAllString(string(src), -1) {
				defined[n] = true
			}
		}
	}
	alerts := 0
	for _, g := range rule.Spec.Groups {
		for _, r := range g.Rules {
			alerts++
			names := nameRE.FindAllString(r.Expr, -1)
			if len(names) == 0 {
				t.Errorf("%s: expression %q uses no oneagent_csi metric", r.Alert, r.Expr)
			}
			for _, n := range names {
				if !defined[n] {
					t.Errorf("%s: metric %s is not defined in the code", r.Alert, n)
				}
			}
		}
	}
	if alerts < 3 {
		t.Errorf("%d alerts, want fail-open, download failures and disk budget", alerts)
	}
}

// TestKustomization checks that the base lists every manifest but the
// optional ones that need CRDs.
func TestKustomization(t *testing.T) {
	data, err := os.ReadFile("../../deploy/kubernetes/kustomization.yaml")
	if err != nil {
		t.Fatal(err)
	}
	var k struct {
		Resources []string `json:"resources"`
	}
	if err := yaml.Unmarshal(data, &k); err != nil {
		t.Fatal(err)
	}
	files, _ := filepath.Glob("../../deploy/kubernetes/*.yaml")
	optional := map[string]bool{"kustomization.yaml": true, "prometheusrule.yaml": true}
	for _, f := range files {
		name := filepath.Base(f)
		if !optional[name] && !slices.Contains(k.Resources, name) {
			t.Errorf("%s is not in kustomization.yaml", name)
		}
	}
	for _, r := range k.Resources {
		if _, err := os.Stat(filepath.Join("../../deploy/kubernetes", r)); err != nil {
			t.Errorf("kustomization.yaml lists %s: %v", r, err)
		}
	}
}

// The code-modules mirror component: its Deployment runs `oneagent-csi
// mirror` from the driver's image with the flags the command has, its
// Service and NetworkPolicy select its pods, and its patch lets the node
// driver reach it.
func TestMirrorComponent(t *testing.T) {
	data, err := os.ReadFile("../../deploy/components/codemodules-mirror/mirror.yaml")
	if err != nil {
		t.Fatal(err)
	}
	var dep appsv1.Deployment
	var svc corev1.Service
	var pol networkingv1.NetworkPolicy
	var sec corev1.Secret
	for i, doc := range strings.Split(string(data), "\n---\n") {
		var meta struct{ Kind string }
		if err := yaml.Unmarshal([]byte(doc), &meta); err != nil {
			t.Fatalf("doc %d: %v", i, err)
		}
		into := map[string]any{"Deployment": &dep, "Service": &svc, "NetworkPolicy": &pol, "Secret": &sec}[meta.Kind]
		if into == nil {
			t.Fatalf("doc %d: unexpected kind %q", i, meta.Kind)
		}
		if err := yaml.UnmarshalStrict([]byte(doc), into); err != nil {
			t.Fatalf("doc %d (%s): %v", i, meta.Kind, err)
		}
	}
	o := load(t)
	node := o.daemonSets["node-daemonset"]
	c := dep.Spec.Template.Spec.Containers[0]
	if node == nil || c.Image != node.Spec.Template.Spec.Containers[0].Image {
		t.Errorf("mirror image %q, want the driver's", c.Image)
	}
	flags := map[string]bool{"--upstream": true, "--pull-secret-file": true, "--dir": true, "--listen": true, "--ca-file": true, "--tag-ttl": true}
	if len(c.Args) == 0 || c.Args[0] != "mirror" {
		t.Fatalf("args %v, want the mirror command", c.Args)
	}
	for _, a := range c.Args[1:] {
		if f, _, _ := strings.Cut(a, "="); !flags[f] {
			t.Errorf("arg %q is not a flag of oneagent-csi mirror", a)
		}
	}
	labels := dep.Spec.Template.Labels
	for what, sel := range map[string]map[string]string{"Service": svc.Spec.Selector, "NetworkPolicy": pol.Spec.PodSelector.MatchLabels} {
		for k, v := range sel {
			if labels[k] != v {
				t.Errorf("%s selects %s=%s, the pods have %v", what, k, v, labels)
			}
		}
	}
	if sc := c.SecurityContext; sc == nil || sc.ReadOnlyRootFilesystem == nil || !*sc.ReadOnlyRootFilesystem ||
		dep.Spec.Template.Spec.SecurityContext.RunAsNonRoot == nil || !*dep.Spec.Template.Spec.SecurityContext.RunAsNonRoot {
		t.Error("the mirror must run as non-root with a read-only root filesystem")
	}
	if sec.Type != corev1.SecretTypeDockerConfigJson {
		t.Errorf("pull secret type %s", sec.Type)
	}
	comp, err := os.ReadFile("../../deploy/components/codemodules-mirror/kustomization.yaml")
	if err != nil {
		t.Fatal(err)
	}
	var k struct {
		Kind      string
		Resources []string
		Patches   []struct {
			Target struct{ Kind, Name string }
			Patch  string
		}
	}
	if err := yaml.Unmarshal(comp, &k); err != nil || k.Kind != "Component" || len(k.Patches) != 1 || !slices.Equal(k.Resources, []string{"mirror.yaml"}) {
		t.Fatalf("component = %+v, %v", k, err)
	}
	if tg := k.Patches[0].Target; tg.Kind != "NetworkPolicy" || o.policies[tg.Name] == nil {
		t.Fatalf("the component patches %s/%s, which the base does not have", tg.Kind, tg.Name)
	}
	var ops []struct {
		Op, Path string
		Value    networkingv1.NetworkPolicyEgressRule
	}
	if err := yaml.UnmarshalStrict([]byte(k.Patches[0].Patch), &ops); err != nil || len(ops) != 1 || len(ops[0].Value.To) != 1 {
		t.Fatalf("patch: %+v, %v", ops, err)
	}
	for kk, v := range ops[0].Value.To[0].PodSelector.MatchLabels {
		if labels[kk] != v {
			t.Errorf("the node egress rule selects %s=%s, the mirror pods have %v", kk, v, labels)
		}
	}
	if p := ops[0].Value.Ports; len(p) != 1 || p[0].Port.IntValue() != 5000 {
		t.Errorf("the node egress rule allows %v, want 5000", p)
	}
}
