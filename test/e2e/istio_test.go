package e2e

import (
	"encoding/json"
	"os"
	"path/filepath"
	"reflect"
	"strings"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"sigs.k8s.io/yaml"

	"github.com/oneagent-csi/oneagent-csi/api"
	"github.com/oneagent-csi/oneagent-csi/test/e2e/cluster"
)

var istioNames = map[string]bool{"istio-proxy": true, "istio-init": true, "istio-validation": true, "enable-core-dump": true}

// meshedPod turns an Istio fixture (Istio's own injector output) into a pod
// this cluster can run: every image becomes the local app image, Istio's
// commands become harmless ones (istio-init must never run here: on a
// hostNetwork pod its iptables rules would rewrite the machine's
// networking), probes and hooks go; names, order and restartPolicy stay.
func meshedPod(t *testing.T, fixture, namespace string) *corev1.Pod {
	t.Helper()
	data, err := os.ReadFile(filepath.Join("..", "..", "injector", "testdata", "istio", fixture))
	if err != nil {
		t.Fatal(err)
	}
	var pod corev1.Pod
	if err := yaml.Unmarshal([]byte(strings.Split(string(data), "\n---")[0]), &pod); err != nil {
		t.Fatal(err)
	}
	pod.Namespace, pod.Name, pod.GenerateName = namespace, "", "myapp-"
	pod.Status = corev1.PodStatus{}
	pod.Spec.NodeName, pod.Spec.HostNetwork = cluster.NodeName, true
	grace := int64(2)
	pod.Spec.TerminationGracePeriodSeconds = &grace
	fix := func(c *corev1.Container, command string) {
		c.Image, c.ImagePullPolicy = cluster.AppImage, corev1.PullNever
		c.Command, c.Args = []string{"/bin/sh", "-c", command}, nil
		c.LivenessProbe, c.ReadinessProbe, c.StartupProbe, c.Lifecycle = nil, nil, nil, nil
	}
	for i := range pod.Spec.InitContainers {
		c := &pod.Spec.InitContainers[i]
		if c.RestartPolicy != nil && *c.RestartPolicy == corev1.ContainerRestartPolicyAlways {
			fix(c, "exec sleep 3600") // native sidecar: must keep running
		} else {
			fix(c, "exit 0")
		}
	}
	for i := range pod.Spec.Containers {
		c := &pod.Spec.Containers[i]
		if istioNames[c.Name] {
			fix(c, "exec sleep 3600")
		} else {
			fix(c, "echo app-ran; exec sleep 3600")
		}
	}
	return &pod
}

// istioPartsJSON returns Istio's containers and volumes as JSON.
func istioPartsJSON(t *testing.T, p *corev1.Pod) map[string]string {
	out := map[string]string{}
	for _, c := range p.Spec.InitContainers {
		if istioNames[c.Name] {
			b, _ := json.Marshal(c)
			out["init/"+c.Name] = string(b)
		}
	}
	for _, c := range p.Spec.Containers {
		if istioNames[c.Name] {
			b, _ := json.Marshal(c)
			out["container/"+c.Name] = string(b)
		}
	}
	for _, v := range p.Spec.Volumes {
		if v.Name != api.AgentVolumeName && v.Name != api.ConfigVolumeName {
			b, _ := json.Marshal(v)
			out["volume/"+v.Name] = string(b)
		}
	}
	return out
}

// TestIstioMeshedPods creates pods as Istio's injector left them (classic
// sidecar and native sidecar) in a labelled namespace: the real API server
// calls our webhook, our parts are added, Istio's are unchanged, our init
// container sits where shared/notes/istio.md says, and the pod runs with
// the agent.
func TestIstioMeshedPods(t *testing.T) {
	ctx := setup(t)
	for _, tc := range []struct {
		fixture string
		inits   []string
	}{
		{"a-classic-sidecar.yaml", []string{api.InitContainerName, "istio-init"}},
		{"b-native-sidecar.yaml", []string{"istio-init", "istio-proxy", api.InitContainerName}},
	} {
		t.Run(tc.fixture, func(t *testing.T) {
			ns := "mesh-" + strings.SplitN(tc.fixture, "-", 2)[0]
			if err := env.c.EnsureNamespace(ctx, ns, map[string]string{api.InjectLabel: "true"}); err != nil {
				t.Fatal(err)
			}
			// What Istio's volumes refer to (no controllers create them here).
			for _, cm := range []string{"kube-root-ca.crt", "istio-ca-root-cert"} {
				_, err := env.c.Client.CoreV1().ConfigMaps(ns).Create(ctx, &corev1.ConfigMap{ObjectMeta: metav1.ObjectMeta{Name: cm},
					Data: map[string]string{"ca.crt": "e2e", "root-cert.pem": "e2e"}}, metav1.CreateOptions{})
				if err != nil && !apierrors.IsAlreadyExists(err) {
					t.Fatal(err)
				}
			}
			input := meshedPod(t, tc.fixture, ns)
			// The same pod, defaulted by the API server but not injected, to
			// compare Istio's parts with.
			plainNS := ns + "-plain"
			if err := env.c.EnsureNamespace(ctx, plainNS, nil); err != nil {
				t.Fatal(err)
			}
			plainIn := input.DeepCopy()
			plainIn.Namespace = plainNS
			plain, err := env.c.Client.CoreV1().Pods(plainNS).Create(ctx, plainIn, metav1.CreateOptions{DryRun: []string{metav1.DryRunAll}})
			if err != nil {
				t.Fatal(err)
			}
			created, err := env.c.Client.CoreV1().Pods(ns).Create(ctx, input, metav1.CreateOptions{})
			if err != nil {
				t.Fatal(err)
			}
			if created.Annotations[api.InjectedAnnotation] != "true" {
				t.Fatalf("not injected: %v", created.Annotations)
			}
			var inits []string
			for _, c := range created.Spec.InitContainers {
				inits = append(inits, c.Name)
			}
			if !reflect.DeepEqual(inits, tc.inits) {
				t.Fatalf("init containers %v, want %v", inits, tc.inits)
			}
			want, got := istioPartsJSON(t, plain), istioPartsJSON(t, created)
			for k, v := range want {
				if got[k] != v {
					t.Errorf("Istio's %s changed:\nwant %s\ngot  %s", k, v, got[k])
				}
			}
			if len(got) != len(want) {
				t.Errorf("Istio's parts: %d, want %d", len(got), len(want))
			}
			pod := waitRunning(ctx, t, ns, created.Name)
			slice := filepath.Join(env.c.KubeletRoot, "pods", string(pod.UID), "volumes", "kubernetes.io~empty-dir", api.ConfigVolumeName, "myapp")
			if err := cluster.Poll(ctx, 30*time.Second, "markers", func() bool {
				b, _ := os.ReadFile(filepath.Join(slice, "loaded"))
				return strings.Contains(string(b), "argv0=sleep")
			}); err != nil {
				t.Fatal(err)
			}
			deletePod(ctx, t, ns, pod.Name)
		})
	}
}
