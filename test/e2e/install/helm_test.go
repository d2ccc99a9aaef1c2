package install

import (
	"bytes"
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"reflect"
	"strings"
	"testing"

	"sigs.k8s.io/yaml"

	"github.com/oneagent-csi/oneagent-csi/api"
	"github.com/oneagent-csi/oneagent-csi/test/e2e/cluster"
)

const chart = "../../../deploy/helm/oneagent-csi"

// helmCmd runs the helm built with the cluster binaries, with its state in
// the test's temporary dir.
func helmCmd(t *testing.T, args ...string) *exec.Cmd {
	t.Helper()
	home := filepath.Join(env.work, "helm")
	cmd := exec.Command(filepath.Join(env.k8sBin, "helm"), args...)
	cmd.Env = append(os.Environ(), "HELM_CACHE_HOME="+home+"/cache", "HELM_CONFIG_HOME="+home+"/config",
		"HELM_DATA_HOME="+home+"/data")
	if env.c != nil {
		cmd.Env = append(cmd.Env, "KUBECONFIG="+env.c.Kubeconfig)
	}
	return cmd
}

func helm(t *testing.T, args ...string) string {
	t.Helper()
	var stdout, stderr bytes.Buffer
	cmd := helmCmd(t, args...)
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	if err := cmd.Run(); err != nil {
		t.Fatalf("helm %s: %v\n%s%s", strings.Join(args, " "), err, stdout.String(), stderr.String())
	}
	return stdout.String()
}

func TestHelmLint(t *testing.T) {
	setup(t)
	out := helm(t, "lint", "--strict", chart)
	if !strings.Contains(out, "1 chart(s) linted, 0 chart(s) failed") {
		t.Fatalf("helm lint:\n%s", out)
	}
}

// TestHelmTemplateMatchesKustomize: the chart with its defaults renders the
// objects of the kustomize base (and with certMode cert-manager those of
// the base with the cert-manager component), compared as data (YAML files in
// ConfigMaps parsed too); the differences are by design: no Namespace
// unless namespace.create (Helm installs into an existing namespace), and
// checksum annotations that roll pods when their config changes.
func TestHelmTemplateMatchesKustomize(t *testing.T) {
	setup(t)
	for _, tc := range []struct {
		name      string
		kustomize string
		args      []string
		drop      []string
	}{
		{"defaults", "../../../deploy/kubernetes", nil, []string{"Namespace//oneagent-csi"}},
		{"namespace.create", "../../../deploy/kubernetes", []string{"--set", "namespace.create=true"}, nil},
		{"cert-manager", "../testdata/cert-manager-overlay", []string{"--set", "injector.certMode=cert-manager"}, []string{"Namespace//oneagent-csi"}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			want := map[string]any{}
			for k, v := range objects(t, kubectl(t, "kustomize", tc.kustomize)) {
				want[k] = v
			}
			for _, k := range tc.drop {
				delete(want, k)
			}
			got := objects(t, helm(t, append([]string{"template", "oneagent-csi", chart, "--namespace", "oneagent-csi"}, tc.args...)...))
			for k, v := range want {
				g, ok := got[k]
				if !ok {
					t.Errorf("helm does not render %s", k)
					continue
				}
				if !reflect.DeepEqual(g, v) {
					gj, _ := json.MarshalIndent(g, "", "  ")
					wj, _ := json.MarshalIndent(v, "", "  ")
					t.Errorf("%s differs:\nhelm:\n%s\nkustomize:\n%s", k, gj, wj)
				}
			}
			for k := range got {
				if _, ok := want[k]; !ok {
					t.Errorf("helm renders %s, which the base does not have", k)
				}
			}
		})
	}
}

// objects parses a multi-document YAML stream into kind/namespace/name →
// object, normalised for a comparison as data: YAML files held in a
// ConfigMap are parsed, checksum/ annotations go.
func objects(t *testing.T, stream string) map[string]any {
	t.Helper()
	out := map[string]any{}
	for _, doc := range strings.Split(stream, "\n---") {
		var o map[string]any
		if err := yaml.Unmarshal([]byte(doc), &o); err != nil {
			t.Fatalf("%v in\n%s", err, doc)
		}
		if o == nil {
			continue
		}
		meta, _ := o["metadata"].(map[string]any)
		ns, _ := meta["namespace"].(string)
		key := fmt.Sprintf("%s/%s/%s", o["kind"], ns, meta["name"])
		if o["kind"] == "ConfigMap" {
			data, _ := o["data"].(map[string]any)
			for k, v := range data {
				if strings.HasSuffix(k, ".yaml") {
					var parsed any
					if err := yaml.Unmarshal([]byte(v.(string)), &parsed); err != nil {
						t.Fatalf("%s %s: %v", key, k, err)
					}
					data[k] = parsed
				}
			}
		}
		if spec, ok := o["spec"].(map[string]any); ok {
			if tmpl, ok := spec["template"].(map[string]any); ok {
				if tm, ok := tmpl["metadata"].(map[string]any); ok {
					if ann, ok := tm["annotations"].(map[string]any); ok {
						for k := range ann {
							if strings.HasPrefix(k, "checksum/") {
								delete(ann, k)
							}
						}
						if len(ann) == 0 {
							delete(tm, "annotations")
						}
					}
				}
			}
		}
		out[key] = o
	}
	return out
}

// TestHelmSchemaNamesTheBadValue: a wrong value fails at install time with
// the field named, before anything reaches the cluster.
func TestHelmSchemaNamesTheBadValue(t *testing.T) {
	setup(t)
	for _, tc := range []struct {
		set  []string
		want string
	}{
		{[]string{"--set", "injector.certMode=vault"}, "/injector/certMode"},
		{[]string{"--set-json", `tenants=[{"name":"Prod_1","apiURL":"https://t.example/api"}]`}, "/tenants/0/name"},
		{[]string{"--set-json", `tenants=[{"name":"prod","apiURL":"http://t.example/api"}]`}, "/tenants/0/apiURL"},
		{[]string{"--set-json", `tenants=[{"name":"prod","apiURL":"https://t.example/api","version":"1.2"}]`}, "/tenants/0/version"},
		{[]string{"--set-json", `tenants=[{"name":"prod","apiURL":"https://t.example/api","tokenFile":"/x"}]`}, "tokenFile"},
		{[]string{"--set-json", "tenants=[]"}, "/tenants"},
		{[]string{"--set", "node.config.mountAPI=new"}, "/node/config/mountAPI"},
		{[]string{"--set", "node.config.cache.maxBytes=lots"}, "/node/config/cache/maxBytes"},
		{[]string{"--set", "injector.timeoutSeconds=60"}, "/injector/timeoutSeconds"},
		{[]string{"--set", "node.resources.limits.memory=64MB"}, "/node/resources/limits/memory"},
		{[]string{"--set", "nodes.replicas=2"}, "nodes"},
		{[]string{"--set", "injector.config.initImage=x"}, "/injector/config/initImage"},
		{[]string{"--set", "image.pullPolicy=Sometimes"}, "/image/pullPolicy"},
		{[]string{"--set-json", `tenants=[{"name":"air","image":"Not A Ref"}]`}, "/tenants/0/image"},
		{[]string{"--set-json", `tenants=[{"name":"air","image":"r.example.com/c:1","mirrors":["https://m/path"]}]`}, "/tenants/0/mirrors/0"},
	} {
		t.Run(strings.Join(tc.set, " "), func(t *testing.T) {
			var stderr bytes.Buffer
			cmd := helmCmd(t, append([]string{"template", "oneagent-csi", chart, "--namespace", "oneagent-csi"}, tc.set...)...)
			cmd.Stderr = &stderr
			if err := cmd.Run(); err == nil {
				t.Fatal("helm template accepted it")
			}
			if !strings.Contains(stderr.String(), tc.want) {
				t.Fatalf("the error does not name %s:\n%s", tc.want, stderr.String())
			}
		})
	}
}

// TestHelmInstall installs the chart into the cluster (one command, the
// tenant and image as values), runs the same app and meshed app with the
// agent as the kustomize install, and uninstalls.
func TestHelmInstall(t *testing.T) {
	ctx := setup(t)
	tenants, err := json.Marshal([]map[string]any{{"name": "prod", "apiURL": env.tenant.URL, "token": env.tenant.Token(),
		"caPEM": string(env.tenantCA)}})
	if err != nil {
		t.Fatal(err)
	}
	i := strings.LastIndex(cluster.InitImage, ":")
	repo, tag := cluster.InitImage[:i], cluster.InitImage[i+1:]
	out := helm(t, "install", "oneagent-csi", chart, "--namespace", namespace, "--create-namespace", "--wait", "--timeout", "5m",
		"--set", "image.repository="+repo, "--set", "image.tag="+tag, "--set-json", "tenants="+string(tenants))
	if !strings.Contains(out, "rollout status daemonset/oneagent-csi-node") {
		t.Errorf("NOTES do not say what to do next:\n%s", out)
	}
	waitInstalled(ctx, t)

	apps := "helm-apps"
	kubectl(t, "create", "namespace", apps)
	kubectl(t, "label", "namespace", apps, api.InjectLabel+"=true")
	applyObjects(t, appDeployment("shop", apps), istioRootCert(apps), meshedDeployment(t, apps))
	checkAgentLoaded(ctx, t, runningPod(ctx, t, apps, "shop"), "shop")
	checkAgentLoaded(ctx, t, runningPod(ctx, t, apps, "myapp"), "myapp")

	kubectl(t, "delete", "namespace", apps, "--timeout=120s")
	helm(t, "uninstall", "oneagent-csi", "--namespace", namespace, "--wait", "--timeout", "3m")
	// Helm created the namespace and leaves it; the rest must be gone.
	kubectl(t, "delete", "namespace", namespace, "--timeout=120s")
	checkUninstalled(ctx, t)
}
