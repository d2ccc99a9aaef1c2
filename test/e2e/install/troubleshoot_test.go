package install

import (
	"context"
	"encoding/json"
	"errors"
	"os/exec"
	"strings"
	"testing"
	"time"

	"github.com/oneagent-csi/oneagent-csi/api"
	"github.com/oneagent-csi/oneagent-csi/test/e2e/cluster"
	"github.com/oneagent-csi/oneagent-csi/troubleshoot"
)

// runTroubleshoot runs `oneagent-csi troubleshoot -o json` with the
// user's kubeconfig and returns its results and exit code.
func runTroubleshoot(t *testing.T, args ...string) ([]troubleshoot.Result, int) {
	t.Helper()
	cmd := exec.Command(env.bin, append([]string{"troubleshoot", "--kubeconfig", env.c.Kubeconfig, "-o", "json"}, args...)...)
	var stderr strings.Builder
	cmd.Stderr = &stderr
	out, err := cmd.Output()
	code := 0
	var exit *exec.ExitError
	if errors.As(err, &exit) {
		code = exit.ExitCode()
	} else if err != nil {
		t.Fatal(err)
	}
	var rs []troubleshoot.Result
	if err := json.Unmarshal(out, &rs); err != nil {
		t.Fatalf("troubleshoot output: %v\n%s\n%s", err, out, stderr.String())
	}
	return rs, code
}

// expect polls troubleshoot until check has status (the cluster settles
// after each provocation) and the exit code matches.
func expect(ctx context.Context, t *testing.T, check string, want troubleshoot.Status, args ...string) troubleshoot.Result {
	t.Helper()
	var rs []troubleshoot.Result
	var code int
	var hit troubleshoot.Result
	err := cluster.Poll(ctx, 90*time.Second, check+" "+string(want), func() bool {
		rs, code = runTroubleshoot(t, args...)
		for _, r := range rs {
			if r.Check == check && r.Status == want {
				hit = r
				wantCode := 0
				if troubleshoot.Failed(rs) {
					wantCode = 1
				}
				return code == wantCode
			}
		}
		return false
	})
	if err != nil {
		b, _ := json.MarshalIndent(rs, "", "  ")
		t.Fatalf("%v (exit %d):\n%s", err, code, b)
	}
	if want != troubleshoot.OK && hit.Fix == "" {
		t.Errorf("%s: no fix: %+v", check, hit)
	}
	return hit
}

// TestTroubleshoot installs, checks that troubleshoot finds nothing wrong,
// then provokes each failure it knows on the real cluster and checks that
// it is found (exit code 1, the check and a fix).
func TestTroubleshoot(t *testing.T) {
	ctx := setup(t)
	layer := tenantLayer(t, "../testdata/install-overlay")
	kubectl(t, "apply", "-k", layer)
	t.Cleanup(func() {
		kubectl(t, "delete", "namespace", "ts-apps", "ts-late", "istio-system", "--ignore-not-found", "--timeout=120s")
		// A provocation that failed half way may have left a broken
		// DaemonSet: delete -k removes it all the same.
		kubectl(t, "delete", "-k", layer, "--ignore-not-found", "--timeout=180s")
		checkUninstalled(context.Background(), t)
	})
	waitInstalled(ctx, t)
	apps := "ts-apps"
	kubectl(t, "create", "namespace", apps)
	kubectl(t, "label", "namespace", apps, api.InjectLabel+"=true")
	applyObjects(t, appDeployment("shop", apps))
	runningPod(ctx, t, apps, "shop")

	rs, code := runTroubleshoot(t, "--namespace", apps)
	for _, r := range rs {
		if r.Status != troubleshoot.OK {
			t.Errorf("on a healthy install: %+v", r)
		}
	}
	if code != 0 {
		t.Fatalf("exit %d on a healthy install", code)
	}
	for _, c := range []string{"csidriver", "daemonset", "registration", "webhook-certificate", "webhook-endpoints", "namespace", "pod-injected", "pod-volume", "tenant"} {
		found := false
		for _, r := range rs {
			found = found || r.Check == c
			// The certificate is the one the injector pods present in a
			// handshake through port-forward, not only the Secret's.
			if r.Check == "webhook-certificate" && !strings.Contains(r.Message, "in a TLS handshake") {
				t.Errorf("webhook certificate not checked by handshake: %+v", r)
			}
		}
		if !found {
			t.Errorf("no %s check in %+v", c, rs)
		}
	}
	// The text form says the same.
	text, err := exec.Command(env.bin, "troubleshoot", "--kubeconfig", env.c.Kubeconfig).Output()
	if err != nil || !strings.Contains(string(text), "ok       csidriver csi.oneagent.dynatrace.com") {
		t.Errorf("text output (%v):\n%s", err, text)
	}

	t.Run("pod created before the label", func(t *testing.T) {
		kubectl(t, "create", "namespace", "ts-late")
		applyObjects(t, appDeployment("late", "ts-late"))
		runningPod(ctx, t, "ts-late", "late")
		kubectl(t, "label", "namespace", "ts-late", api.InjectLabel+"=true")
		expect(ctx, t, "pod-injected", troubleshoot.Failure, "--namespace", "ts-late")
	})
	t.Run("volume failed open", func(t *testing.T) {
		// A tenant the node does not know: the driver fails open at once and
		// records why; troubleshoot reads it from the node's driver.
		d := appDeployment("lost", apps)
		tmpl := d["spec"].(map[string]any)["template"].(map[string]any)["metadata"].(map[string]any)
		tmpl["annotations"] = map[string]any{api.TenantAnnotation: "nope"}
		applyObjects(t, d)
		runningPod(ctx, t, apps, "lost")
		r := expect(ctx, t, "pod-volume", troubleshoot.Failure, "--namespace", apps)
		if !strings.Contains(r.Message, "nope") {
			t.Errorf("the failure does not give the driver's reason: %+v", r)
		}
		kubectl(t, "-n", apps, "delete", "deployment", "lost", "--wait")
	})
	t.Run("container.conf missing: the driver predates containerConfig driver", func(t *testing.T) {
		// What a node still on an older driver does to a pod injected with
		// containerConfig: driver: its volume holds no container.conf for
		// the container, and kubelet cannot create the subPath in the
		// read-only volume. Written by hand in a namespace the webhook never
		// sees, as the injector would write it, with a containers attribute
		// that names another container.
		const ns, name = "kube-public", "oldconf"
		d := appDeployment(name, ns)
		tmpl := d["spec"].(map[string]any)["template"].(map[string]any)
		tmpl["metadata"].(map[string]any)["annotations"] = map[string]any{api.InjectedAnnotation: "true"}
		spec := tmpl["spec"].(map[string]any)
		spec["volumes"] = []any{map[string]any{"name": api.AgentVolumeName, "csi": map[string]any{
			"driver": api.DefaultDriverName, "readOnly": true,
			"volumeAttributes": map[string]any{api.AttrContainers: "other=" + cluster.AppImage},
		}}}
		c := spec["containers"].([]any)[0].(map[string]any)
		c["volumeMounts"] = []any{map[string]any{"name": api.AgentVolumeName, "mountPath": api.ContainerConfMountPath,
			"subPath": api.ContainerConfRelativePath(name), "readOnly": true}}
		applyObjects(t, d)
		defer kubectl(t, "-n", ns, "delete", "deployment", name, "--wait")
		r := expect(ctx, t, "pod-container-config", troubleshoot.Failure, "--namespace", ns)
		if !strings.Contains(r.Message, "container "+name+" ") || !strings.Contains(r.Message, "predates") {
			t.Errorf("the failure does not name the container and the cause: %+v", r)
		}
	})
	t.Run("tenant refuses the token", func(t *testing.T) {
		// Asked from the node, with the driver's own client and token.
		good := env.tenant.Token()
		env.tenant.SetToken("rotated-elsewhere")
		r := expect(ctx, t, "tenant", troubleshoot.Failure, "--namespace", apps)
		env.tenant.SetToken(good)
		if !strings.HasPrefix(r.Message, "api: ") || !strings.Contains(r.Subject, cluster.NodeName) {
			t.Errorf("%+v", r)
		}
		expect(ctx, t, "tenant", troubleshoot.OK, "--namespace", apps)
	})
	t.Run("Envoy metrics not annotated", func(t *testing.T) {
		// A meshed pod injected while envoyMetrics was off, then the setting
		// turned on.
		applyObjects(t, istioRootCert(apps), meshedDeployment(t, apps))
		runningPod(ctx, t, apps, "myapp")
		cfg := kubectl(t, "-n", namespace, "get", "configmap", "oneagent-csi-injector", "-o", "jsonpath={.data.injector\\.yaml}")
		on := strings.Replace(cfg, "envoyMetrics: false", "envoyMetrics: true", 1)
		if on == cfg {
			t.Fatalf("no envoyMetrics in the injector config:\n%s", cfg)
		}
		patchInjectorConfig(t, on)
		expect(ctx, t, "istio-envoy-metrics", troubleshoot.Warning, "--namespace", apps)
		patchInjectorConfig(t, cfg)
		kubectl(t, "-n", apps, "delete", "deployment", "myapp", "--wait")
	})
	t.Run("egress blocked by a NetworkPolicy", func(t *testing.T) {
		np := map[string]any{"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
			"metadata": map[string]any{"name": "dns-only", "namespace": apps},
			"spec": map[string]any{"podSelector": map[string]any{}, "policyTypes": []any{"Egress"},
				"egress": []any{map[string]any{"ports": []any{map[string]any{"port": 53, "protocol": "UDP"}}}}}}
		applyObjects(t, np)
		r := expect(ctx, t, "pod-egress", troubleshoot.Warning, "--namespace", apps)
		if !strings.Contains(r.Message, "dns-only") {
			t.Errorf("the warning does not name the policy: %+v", r)
		}
		kubectl(t, "-n", apps, "delete", "networkpolicy", "dns-only")
	})
	t.Run("Istio REGISTRY_ONLY without ServiceEntries", func(t *testing.T) {
		kubectl(t, "create", "namespace", "istio-system")
		mesh := map[string]any{"apiVersion": "v1", "kind": "ConfigMap", "metadata": map[string]any{"name": "istio", "namespace": "istio-system"},
			"data": map[string]any{"mesh": "outboundTrafficPolicy:\n  mode: REGISTRY_ONLY\n"}}
		applyObjects(t, mesh)
		r := expect(ctx, t, "istio-egress", troubleshoot.Failure)
		if !strings.Contains(r.Message, cluster.NetworkedNodeIP) {
			t.Errorf("the failure does not name the tenant host: %+v", r)
		}
		kubectl(t, "delete", "namespace", "istio-system", "--timeout=120s")
	})
	t.Run("driver not registered with kubelet", func(t *testing.T) {
		// The anchor's recurring report: a driver that runs but that kubelet
		// cannot reach at the socket path it announces.
		cfg := kubectl(t, "-n", namespace, "get", "configmap", "oneagent-csi-node", "-o", "jsonpath={.data.config\\.yaml}")
		wrong := strings.Replace(cfg, "/var/lib/kubelet/plugins/"+api.DefaultDriverName+"/csi.sock", "/var/lib/kubelet/plugins/elsewhere/csi.sock", 1)
		if wrong == cfg {
			t.Fatalf("no kubeletSocket in the config:\n%s", cfg)
		}
		setNodeConfig(t, wrong)
		expect(ctx, t, "registration", troubleshoot.Failure)
		setNodeConfig(t, cfg)
		expect(ctx, t, "registration", troubleshoot.OK)
	})
	t.Run("no driver pod ready", func(t *testing.T) {
		kubectl(t, "-n", namespace, "set", "image", "daemonset/oneagent-csi-node", "node=docker.io/local/does-not-exist:1")
		r := expect(ctx, t, "daemonset", troubleshoot.Failure)
		if !strings.Contains(r.Message, cluster.NodeName) {
			t.Errorf("the failure does not name the node: %+v", r)
		}
		kubectl(t, "-n", namespace, "set", "image", "daemonset/oneagent-csi-node", "node="+cluster.InitImage)
		kubectl(t, "-n", namespace, "rollout", "status", "daemonset/oneagent-csi-node", "--timeout=180s")
		expect(ctx, t, "daemonset", troubleshoot.OK)
	})
	t.Run("webhook without endpoints and with a wrong caBundle", func(t *testing.T) {
		kubectl(t, "-n", namespace, "scale", "deployment/oneagent-csi-injector", "--replicas=0")
		expect(ctx, t, "webhook-endpoints", troubleshoot.Failure)
		other, _, _, err := cluster.ServingCert(t.TempDir(), "other")
		if err != nil {
			t.Fatal(err)
		}
		patch, _ := json.Marshal([]map[string]any{{"op": "replace", "path": "/webhooks/0/clientConfig/caBundle", "value": other}})
		kubectl(t, "patch", "mutatingwebhookconfiguration", "oneagent-csi-injector", "--type=json", "-p", string(patch))
		r := expect(ctx, t, "webhook-certificate", troubleshoot.Failure)
		if !strings.Contains(r.Message, "does not verify") {
			t.Errorf("%+v", r)
		}
		// The injector repairs the bundle when it runs again.
		kubectl(t, "-n", namespace, "scale", "deployment/oneagent-csi-injector", "--replicas=2")
		// With endpoints ready again, the certificate is the one the pods
		// present in a handshake (before, only the Secret can be read).
		expect(ctx, t, "webhook-endpoints", troubleshoot.OK)
		if r := expect(ctx, t, "webhook-certificate", troubleshoot.OK); !strings.Contains(r.Message, "in a TLS handshake") {
			t.Errorf("webhook certificate not checked by handshake: %+v", r)
		}
	})
	// The apps go while the driver can still unpublish their volumes.
	kubectl(t, "delete", "namespace", apps, "--timeout=120s")
	t.Run("CSIDriver deleted", func(t *testing.T) {
		kubectl(t, "delete", "csidriver", api.DefaultDriverName)
		expect(ctx, t, "csidriver", troubleshoot.Failure)
	})
}

func patchInjectorConfig(t *testing.T, config string) {
	t.Helper()
	b, _ := json.Marshal(map[string]any{"data": map[string]any{"injector.yaml": config}})
	kubectl(t, "-n", namespace, "patch", "configmap", "oneagent-csi-injector", "--type=merge", "-p", string(b))
}

// setNodeConfig replaces the node config and restarts the driver pods.
func setNodeConfig(t *testing.T, config string) {
	t.Helper()
	b, _ := json.Marshal(map[string]any{"data": map[string]any{"config.yaml": config}})
	kubectl(t, "-n", namespace, "patch", "configmap", "oneagent-csi-node", "--type=merge", "-p", string(b))
	kubectl(t, "-n", namespace, "rollout", "restart", "daemonset/oneagent-csi-node")
	kubectl(t, "-n", namespace, "rollout", "status", "daemonset/oneagent-csi-node", "--timeout=180s")
}
