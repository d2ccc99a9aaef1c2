package e2e

import (
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/oneagent-csi/oneagent-csi/api"
	"github.com/oneagent-csi/oneagent-csi/injector"
	"github.com/oneagent-csi/oneagent-csi/test/e2e/cluster"
)

// TestDemo is `make demo`: it deploys a sample app into a labelled
// namespace of the e2e cluster and shows what happened. It runs only with
// E2E_DEMO=1; the cluster, fake tenant, node plugin and injector are the
// e2e ones, and everything is cleaned up as after the tests.
func TestDemo(t *testing.T) {
	if os.Getenv("E2E_DEMO") != "1" {
		t.Skip("set E2E_DEMO=1 (make demo)")
	}
	ctx := setup(t)
	say := func(format string, a ...any) { fmt.Printf("\n==> "+format+"\n", a...) }
	if err := env.c.EnsureNamespace(ctx, "demo", map[string]string{api.InjectLabel: "true"}); err != nil {
		t.Fatal(err)
	}
	if err := env.c.EnsureNamespace(ctx, "demo-plain", nil); err != nil {
		t.Fatal(err)
	}
	say("a sample app pod goes to namespace demo (labelled %s=true); the API server calls the injector", api.InjectLabel)
	plain, err := env.c.Client.CoreV1().Pods("demo-plain").Create(ctx, appPod("demo-plain", nil), metav1.CreateOptions{DryRun: []string{metav1.DryRunAll}})
	if err != nil {
		t.Fatal(err)
	}
	created, err := env.c.Client.CoreV1().Pods("demo").Create(ctx, appPod("demo", nil), metav1.CreateOptions{})
	if err != nil {
		t.Fatal(err)
	}
	// What the injector changed: the patch from the same pod, defaulted but
	// not injected, to the stored one (identity fields aligned).
	before := plain.DeepCopy()
	before.ObjectMeta, before.Status = *created.ObjectMeta.DeepCopy(), *created.Status.DeepCopy()
	for k := range created.Annotations {
		if strings.HasPrefix(k, "oneagent.dynatrace.com/") {
			delete(before.Annotations, k)
		}
	}
	patch, err := injector.CreatePatch(before, created)
	if err != nil {
		t.Fatal(err)
	}
	var ops []any
	_ = json.Unmarshal(patch, &ops)
	pretty, _ := json.MarshalIndent(ops, "", "  ")
	say("what the injector added to pod %s/%s (JSON patch):\n%s", created.Namespace, created.Name, pretty)

	pod := waitRunning(ctx, t, "demo", created.Name)
	say("the pod runs; kubelet called NodePublishVolume")
	target := filepath.Join(env.c.KubeletRoot, "pods", string(pod.UID), "volumes", "kubernetes.io~csi", api.AgentVolumeName, "mount")
	data, _ := os.ReadFile("/proc/self/mountinfo")
	for _, line := range strings.Split(string(data), "\n") {
		if strings.Contains(line, " "+target+" ") {
			say("the mount on the node:\n%s", line)
		}
	}
	entries, _ := os.ReadDir(filepath.Join(target, "agent"))
	var names []string
	for _, e := range entries {
		names = append(names, e.Name())
	}
	say("agent files at the target: agent/{%s}", strings.Join(names, ","))
	slice := filepath.Join(env.c.KubeletRoot, "pods", string(pod.UID), "volumes", "kubernetes.io~empty-dir", api.ConfigVolumeName, "shop")
	if err := cluster.Poll(ctx, 30*time.Second, "markers", func() bool {
		b, _ := os.ReadFile(filepath.Join(slice, "loaded"))
		return strings.Contains(string(b), "argv0=sleep")
	}); err == nil {
		b, _ := os.ReadFile(filepath.Join(slice, "loaded"))
		say("processes in the app container that loaded liboneagentproc.so (LD_PRELOAD from the CSI mount):\n%s", b)
	}
	out, err := exec.Command(env.bin, "cache", "ls", "--admin-socket", env.adminSock).CombinedOutput()
	if err != nil {
		t.Fatalf("cache ls: %v\n%s", err, out)
	}
	say("oneagent-csi cache ls:\n%s", out)
	deletePod(ctx, t, "demo", pod.Name)
	say("pod deleted: NodeUnpublishVolume unmounted %s; cleaning up the cluster", target)
}
