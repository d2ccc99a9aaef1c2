package install

import (
	"context"
	"crypto/tls"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"sigs.k8s.io/yaml"

	"github.com/oneagent-csi/oneagent-csi/api"
	"github.com/oneagent-csi/oneagent-csi/test/e2e/cluster"
)

func tlsPair(certFile, keyFile string) (*tls.Certificate, error) {
	pair, err := tls.LoadX509KeyPair(certFile, keyFile)
	return &pair, err
}

// kubectl runs the kubectl built with the cluster, as a user would.
func kubectl(t *testing.T, args ...string) string {
	t.Helper()
	out, err := env.c.KubectlCmd(args...).CombinedOutput()
	if err != nil {
		t.Fatalf("kubectl %s: %v\n%s", strings.Join(args, " "), err, out)
	}
	return string(out)
}

// tenantLayer writes a kustomization into a new dir that puts the fake
// tenant into base (a dir relative to this package): the node
// ConfigMap's tenant (apiURL, caFile; every other key as the base has it)
// and the token Secret with the token and the tenant's CA. It returns the
// dir, for `kubectl apply -k`.
func tenantLayer(t *testing.T, base string) string {
	t.Helper()
	raw, err := os.ReadFile("../../../deploy/kubernetes/node-config.yaml")
	if err != nil {
		t.Fatal(err)
	}
	var cm corev1.ConfigMap
	if err := yaml.Unmarshal([]byte(strings.Split(string(raw), "\n---")[0]), &cm); err != nil {
		t.Fatal(err)
	}
	var cfg map[string]any
	if err := yaml.Unmarshal([]byte(cm.Data["config.yaml"]), &cfg); err != nil {
		t.Fatal(err)
	}
	tenant := cfg["tenants"].([]any)[0].(map[string]any)
	tenant["apiURL"] = env.tenant.URL
	tenant["caFile"] = "/etc/oneagent-csi/tokens/ca.pem"
	b, err := yaml.Marshal(cfg)
	if err != nil {
		t.Fatal(err)
	}
	patch, err := yaml.Marshal(map[string]any{
		"apiVersion": "v1", "kind": "ConfigMap",
		"metadata": map[string]any{"name": cm.Name, "namespace": cm.Namespace},
		"data":     map[string]any{"config.yaml": string(b)},
	})
	if err != nil {
		t.Fatal(err)
	}
	secret, err := yaml.Marshal(map[string]any{
		"apiVersion": "v1", "kind": "Secret",
		"metadata":   map[string]any{"name": "oneagent-csi-tokens", "namespace": cm.Namespace},
		"stringData": map[string]any{"prod": env.tenant.Token(), "ca.pem": string(env.tenantCA)},
	})
	if err != nil {
		t.Fatal(err)
	}
	dir := t.TempDir()
	abs, err := filepath.Abs(base)
	if err != nil {
		t.Fatal(err)
	}
	// kustomize takes relative paths only.
	rel, err := filepath.Rel(dir, abs)
	if err != nil {
		t.Fatal(err)
	}
	k := "apiVersion: kustomize.config.k8s.io/v1beta1\nkind: Kustomization\nresources:\n  - " + rel +
		"\npatches:\n  - path: node-config.yaml\n  - path: tokens.yaml\n"
	for name, data := range map[string][]byte{"kustomization.yaml": []byte(k), "node-config.yaml": patch, "tokens.yaml": secret} {
		if err := os.WriteFile(filepath.Join(dir, name), data, 0o644); err != nil {
			t.Fatal(err)
		}
	}
	return dir
}

// appDeployment is a Deployment of the local app image whose process
// reports what it sees and sleeps.
func appDeployment(name, namespace string) map[string]any {
	script := `echo app-ran; exec sleep 3600`
	return map[string]any{
		"apiVersion": "apps/v1", "kind": "Deployment",
		"metadata": map[string]any{"name": name, "namespace": namespace},
		"spec": map[string]any{
			"replicas": 1,
			"selector": map[string]any{"matchLabels": map[string]any{"app": name}},
			"template": map[string]any{
				"metadata": map[string]any{"labels": map[string]any{"app": name}},
				"spec": map[string]any{
					"terminationGracePeriodSeconds": 2,
					"containers": []any{map[string]any{"name": name, "image": cluster.AppImage, "imagePullPolicy": "Never",
						"command": []any{"/bin/sh", "-c", script}}},
				},
			},
		},
	}
}

// meshedDeployment is Istio's own injector output for a Deployment
// (injector/testdata/istio) made runnable here: every image becomes the
// local app image, Istio's commands harmless ones (istio-init must not
// rewrite this machine's iptables), probes and hooks go; names, order and
// restartPolicy stay.
func meshedDeployment(t *testing.T, namespace string) map[string]any {
	t.Helper()
	raw, err := os.ReadFile("../../../injector/testdata/istio/a-classic-sidecar-deployment.yaml")
	if err != nil {
		t.Fatal(err)
	}
	var d map[string]any
	if err := yaml.Unmarshal(raw, &d); err != nil {
		t.Fatal(err)
	}
	d["metadata"].(map[string]any)["namespace"] = namespace
	delete(d, "status")
	spec := d["spec"].(map[string]any)["template"].(map[string]any)["spec"].(map[string]any)
	spec["terminationGracePeriodSeconds"] = 2
	fix := func(list string, command func(c map[string]any) string) {
		cs, _ := spec[list].([]any)
		for _, c := range cs {
			c := c.(map[string]any)
			c["image"], c["imagePullPolicy"] = cluster.AppImage, "Never"
			c["command"], c["args"] = []any{"/bin/sh", "-c", command(c)}, nil
			for _, k := range []string{"livenessProbe", "readinessProbe", "startupProbe", "lifecycle"} {
				delete(c, k)
			}
		}
	}
	fix("initContainers", func(c map[string]any) string {
		if c["restartPolicy"] == "Always" {
			return "exec sleep 3600"
		}
		return "exit 0"
	})
	fix("containers", func(c map[string]any) string {
		if strings.HasPrefix(c["name"].(string), "istio-") {
			return "exec sleep 3600"
		}
		return "echo app-ran; exec sleep 3600"
	})
	return d
}

// istioRootCert is the ConfigMap istiod publishes in every namespace of
// the mesh; Istio's sidecar mounts it (there is no istiod here).
func istioRootCert(namespace string) map[string]any {
	return map[string]any{"apiVersion": "v1", "kind": "ConfigMap",
		"metadata": map[string]any{"name": "istio-ca-root-cert", "namespace": namespace},
		"data":     map[string]any{"root-cert.pem": string(env.tenantCA)}}
}

// applyObjects applies objects with kubectl (server-side defaults, as a
// user's `kubectl apply -f` gets).
func applyObjects(t *testing.T, objs ...map[string]any) {
	t.Helper()
	var docs []string
	for _, o := range objs {
		b, err := yaml.Marshal(o)
		if err != nil {
			t.Fatal(err)
		}
		docs = append(docs, string(b))
	}
	f := filepath.Join(t.TempDir(), "objects.yaml")
	if err := os.WriteFile(f, []byte(strings.Join(docs, "---\n")), 0o644); err != nil {
		t.Fatal(err)
	}
	kubectl(t, "apply", "-f", f)
}

// runningPod waits for the one Running pod labelled app=name and returns it.
func runningPod(ctx context.Context, t *testing.T, namespace, app string) *corev1.Pod {
	t.Helper()
	var pod *corev1.Pod
	if err := cluster.Poll(ctx, 180*time.Second, "a running pod of "+app, func() bool {
		list, err := env.c.Client.CoreV1().Pods(namespace).List(ctx, metav1.ListOptions{LabelSelector: "app=" + app})
		if err != nil || len(list.Items) != 1 {
			return false
		}
		pod = &list.Items[0]
		return pod.Status.Phase == corev1.PodRunning && pod.DeletionTimestamp == nil
	}); err != nil {
		t.Fatalf("%v\n%s", err, kubectl(t, "get", "events", "-A", "--sort-by=.lastTimestamp"))
	}
	return pod
}

// agentTarget is the host path of the pod's agent volume.
func agentTarget(pod *corev1.Pod) string {
	return filepath.Join(env.c.KubeletRoot, "pods", string(pod.UID), "volumes", "kubernetes.io~csi", api.AgentVolumeName, "mount")
}

// checkAgentLoaded checks that the pod was injected and that its container
// app's processes loaded the agent from the CSI volume: the marker the
// library writes into the container's config slice, the mapping in the
// container's pid 1, the volume read-only.
func checkAgentLoaded(ctx context.Context, t *testing.T, pod *corev1.Pod, container string) {
	t.Helper()
	if pod.Annotations[api.InjectedAnnotation] != "true" {
		t.Fatalf("pod %s not injected: annotations %v", pod.Name, pod.Annotations)
	}
	marker := filepath.Join(env.c.KubeletRoot, "pods", string(pod.UID), "volumes", "kubernetes.io~empty-dir", api.ConfigVolumeName, container, "loaded")
	var markers []byte
	if err := cluster.Poll(ctx, 60*time.Second, "the agent's marker in "+pod.Name, func() bool {
		markers, _ = os.ReadFile(marker)
		return strings.Contains(string(markers), "argv0=sleep")
	}); err != nil {
		t.Fatalf("%v: markers %q", err, markers)
	}
	var id string
	for _, cs := range pod.Status.ContainerStatuses {
		if cs.Name == container {
			id = cs.ContainerID
		}
	}
	pid := containerPID(t, id)
	maps, err := os.ReadFile(filepath.Join("/proc", pid, "maps"))
	if err != nil || !strings.Contains(string(maps), "/opt/dynatrace/oneagent-paas/"+api.AgentLibraryRelativePath) {
		t.Fatalf("liboneagentproc.so not mapped in %s's pid 1: %v", pod.Name, err)
	}
	if opts, ok := mountOptions(agentTarget(pod)); !ok || !strings.HasPrefix(opts, "ro") {
		t.Fatalf("%s: agent volume options %q (mounted: %v), want read-only", pod.Name, opts, ok)
	}
}

// containerPID finds the host pid of a container's first process.
func containerPID(t *testing.T, containerID string) string {
	t.Helper()
	pid, err := env.c.ContainerPID(containerID)
	if err != nil {
		t.Fatal(err)
	}
	return pid
}

var (
	mountOptions = cluster.MountOptions
	mountsBelow  = cluster.MountsBelow
)
