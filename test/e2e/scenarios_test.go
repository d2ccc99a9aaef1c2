package e2e

import (
	"context"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/oneagent-csi/oneagent-csi/api"
	"github.com/oneagent-csi/oneagent-csi/storage"
	"github.com/oneagent-csi/oneagent-csi/test/e2e/cluster"
)

func setup(t *testing.T) context.Context {
	t.Helper()
	if env.skipReason != "" {
		t.Skip(env.skipReason)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	t.Cleanup(cancel)
	return ctx
}

func waitRunning(ctx context.Context, t *testing.T, ns, name string) *corev1.Pod {
	t.Helper()
	var pod *corev1.Pod
	err := cluster.Poll(ctx, 120*time.Second, "pod "+name+" running", func() bool {
		p, err := env.c.Client.CoreV1().Pods(ns).Get(ctx, name, metav1.GetOptions{})
		if err != nil {
			return false
		}
		pod = p
		return p.Status.Phase == corev1.PodRunning
	})
	if err != nil {
		events, _ := env.c.Client.CoreV1().Events(ns).List(ctx, metav1.ListOptions{})
		var msgs []string
		for _, e := range events.Items {
			msgs = append(msgs, e.Reason+": "+e.Message)
		}
		t.Fatalf("%v; status %+v\nevents:\n%s", err, pod.Status, strings.Join(msgs, "\n"))
	}
	return pod
}

func deletePod(ctx context.Context, t *testing.T, ns, name string) {
	t.Helper()
	if err := env.c.Client.CoreV1().Pods(ns).Delete(ctx, name, metav1.DeleteOptions{}); err != nil {
		t.Fatal(err)
	}
	if err := cluster.Poll(ctx, 60*time.Second, "pod "+name+" gone", func() bool {
		_, err := env.c.Client.CoreV1().Pods(ns).Get(ctx, name, metav1.GetOptions{})
		return apierrors.IsNotFound(err)
	}); err != nil {
		t.Fatal(err)
	}
}

// TestInjectedPodRunsWithTheAgent is the main path: a pod in a labelled
// namespace is mutated by the real API server's call to the injector, the
// kubelet publishes the volume through the node driver, the app's
// processes load liboneagentproc.so from the CSI mount, and deleting the
// pod unpublishes it.
func TestInjectedPodRunsWithTheAgent(t *testing.T) {
	ctx := setup(t)
	if err := env.c.EnsureNamespace(ctx, "shop", map[string]string{api.InjectLabel: "true"}); err != nil {
		t.Fatal(err)
	}
	created, err := env.c.Client.CoreV1().Pods("shop").Create(ctx, appPod("shop", nil), metav1.CreateOptions{})
	if err != nil {
		t.Fatal(err)
	}
	if created.Annotations[api.InjectedAnnotation] != "true" {
		t.Fatalf("pod not injected: annotations %v", created.Annotations)
	}
	if len(created.Spec.InitContainers) != 1 || created.Spec.InitContainers[0].Name != api.InitContainerName {
		t.Fatalf("init containers = %+v", created.Spec.InitContainers)
	}
	pod := waitRunning(ctx, t, "shop", created.Name)
	uid := string(pod.UID)
	target := filepath.Join(env.c.KubeletRoot, "pods", uid, "volumes", "kubernetes.io~csi", api.AgentVolumeName, "mount")

	// Host side: agent files and tenant config at the target, read-only.
	if _, err := os.Stat(filepath.Join(target, api.AgentLibraryRelativePath)); err != nil {
		t.Fatalf("agent library not at the target: %v", err)
	}
	conf, err := os.ReadFile(filepath.Join(target, "agent/conf/ruxitagentproc.conf"))
	if err != nil || !strings.Contains(string(conf), "tenantToken ") {
		t.Fatalf("tenant config not served: %v\n%s", err, conf)
	}
	opts, ok := mountOptions(target)
	if !ok || !strings.HasPrefix(opts, "ro") {
		t.Fatalf("target mount options %q (mounted: %v), want read-only on the host", opts, ok)
	}
	if err := os.WriteFile(filepath.Join(target, "x"), nil, 0o644); err == nil {
		t.Fatal("wrote into the agent volume from the host")
	}

	// The app's processes loaded the library from the CSI mount: markers
	// in the container's config slice, and the mapping in its pid 1.
	slice := filepath.Join(env.c.KubeletRoot, "pods", uid, "volumes", "kubernetes.io~empty-dir", api.ConfigVolumeName, "shop")
	var markers []byte
	if err := cluster.Poll(ctx, 30*time.Second, "markers", func() bool {
		markers, _ = os.ReadFile(filepath.Join(slice, "loaded"))
		return strings.Contains(string(markers), "argv0=sleep")
	}); err != nil {
		t.Fatalf("%v: markers %q", err, markers)
	}
	if !strings.Contains(string(markers), "argv0=/bin/sh") {
		t.Errorf("the shell did not load the library: %q", markers)
	}
	if _, err := os.Stat(filepath.Join(slice, "agent/config/container.conf")); err != nil {
		t.Errorf("init container did not write container.conf: %v", err)
	}
	var appID string
	for _, cs := range pod.Status.ContainerStatuses {
		if cs.Name == "shop" {
			appID = cs.ContainerID
		}
	}
	maps, err := os.ReadFile(filepath.Join("/proc", containerPID(t, appID), "maps"))
	if err != nil || !strings.Contains(string(maps), "/opt/dynatrace/oneagent-paas/agent/lib64/liboneagentproc.so") {
		t.Fatalf("liboneagentproc.so not mapped in the app's pid 1: %v", err)
	}
	var vols []storage.Volume
	cacheJSON(t, &vols, "volumes")
	if len(vols) != 1 || vols[0].TargetPath != target || vols[0].PodName != pod.Name || vols[0].PodNamespace != "shop" {
		t.Fatalf("volume records = %+v", vols)
	}

	deletePod(ctx, t, "shop", pod.Name)
	if _, mounted := mountOptions(target); mounted {
		t.Fatal("target still mounted after the pod was deleted")
	}
	if _, err := os.Stat(target); !os.IsNotExist(err) {
		t.Fatalf("target left behind: %v", err)
	}
	cacheJSON(t, &vols, "volumes")
	if len(vols) != 0 {
		t.Fatalf("volume records after delete = %+v", vols)
	}
}

// TestNotInjected: opted-out pods and ignored namespaces are left alone.
func TestNotInjected(t *testing.T) {
	ctx := setup(t)
	if err := env.c.EnsureNamespace(ctx, "optout", map[string]string{api.InjectLabel: "true"}); err != nil {
		t.Fatal(err)
	}
	if err := env.c.EnsureNamespace(ctx, "kube-system", nil); err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct {
		name, ns    string
		annotations map[string]string
		wantReason  bool
	}{
		{"opt-out annotation", "optout", map[string]string{api.InjectAnnotation: "false"}, true},
		{"ignored namespace", "kube-system", map[string]string{api.InjectAnnotation: "true"}, false},
		{"plain namespace, no annotation", "default", nil, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			p, err := env.c.Client.CoreV1().Pods(tc.ns).Create(ctx, appPod(tc.ns, tc.annotations), metav1.CreateOptions{DryRun: []string{metav1.DryRunAll}})
			if err != nil {
				t.Fatal(err)
			}
			if len(p.Spec.InitContainers) != 0 || len(p.Spec.Volumes) != 0 || len(p.Spec.Containers[0].Env) != 0 {
				t.Fatalf("pod was wired: %+v", p.Spec)
			}
			if got := p.Annotations[api.InjectedAnnotation]; tc.wantReason && (got != "false" || p.Annotations[api.ReasonAnnotation] == "") {
				t.Errorf("annotations = %v, want injected false with a reason", p.Annotations)
			} else if !tc.wantReason && got != "" {
				t.Errorf("annotations = %v, want none of ours", p.Annotations)
			}
		})
	}
}

// TestNodeRestartKeepsRunningPods kills the node plugin while a pod runs:
// the mount stays, and after the restart the delete unpublishes cleanly.
func TestNodeRestartKeepsRunningPods(t *testing.T) {
	ctx := setup(t)
	if err := env.c.EnsureNamespace(ctx, "restart", map[string]string{api.InjectLabel: "true"}); err != nil {
		t.Fatal(err)
	}
	created, err := env.c.Client.CoreV1().Pods("restart").Create(ctx, appPod("restart", nil), metav1.CreateOptions{})
	if err != nil {
		t.Fatal(err)
	}
	pod := waitRunning(ctx, t, "restart", created.Name)
	target := filepath.Join(env.c.KubeletRoot, "pods", string(pod.UID), "volumes", "kubernetes.io~csi", api.AgentVolumeName, "mount")

	if err := env.node.Process.Kill(); err != nil {
		t.Fatal(err)
	}
	_ = env.node.Wait()
	if _, mounted := mountOptions(target); !mounted {
		t.Fatal("the mount went away with the node process")
	}
	if _, err := os.Stat(filepath.Join(target, api.AgentLibraryRelativePath)); err != nil {
		t.Fatalf("agent not served while the node process is down: %v", err)
	}
	if err := launchNode(); err != nil {
		t.Fatal(err)
	}
	if err := cluster.Poll(ctx, 30*time.Second, "node plugin back", func() bool {
		return exec.Command(env.bin, "cache", "ls", "--admin-socket", env.adminSock).Run() == nil
	}); err != nil {
		t.Fatal(err)
	}
	deletePod(ctx, t, "restart", pod.Name)
	if _, mounted := mountOptions(target); mounted {
		t.Fatal("target still mounted after delete")
	}
}

// TestTenantDownFailsOpen: with the tenant unreachable and a version nobody
// has cached, the pod still starts after retryTimeout (20s in the injector's
// config here), with an empty agent dir and the reason on the node.
func TestTenantDownFailsOpen(t *testing.T) {
	ctx := setup(t)
	if err := env.c.EnsureNamespace(ctx, "down", map[string]string{api.InjectLabel: "true"}); err != nil {
		t.Fatal(err)
	}
	env.tenant.SetToken("rotated-away") // every call now fails with 401
	t.Cleanup(func() { env.tenant.SetToken(string(mustRead(t, filepath.Join(filepath.Dir(env.nodeCfg), "token")))) })
	running, target := runWithEmptyAgentDir(ctx, t, "down", map[string]string{api.VersionAnnotation: "1.309.66.20250301-101500"})
	var vols []storage.Volume
	cacheJSON(t, &vols, "volumes")
	found := false
	for _, v := range vols {
		if v.TargetPath == target {
			found = v.State == storage.VolumeFailedOpen && v.Reason != ""
		}
	}
	if !found {
		t.Fatalf("no failed-open record with a reason for %s: %+v", target, vols)
	}
	deletePod(ctx, t, "down", running.Name)
}

// runWithEmptyAgentDir creates an app pod with annotations, waits until it
// runs and checks that its agent dir (a failed-open volume) is empty.
func runWithEmptyAgentDir(ctx context.Context, t *testing.T, namespace string, annotations map[string]string) (*corev1.Pod, string) {
	t.Helper()
	created, err := env.c.Client.CoreV1().Pods(namespace).Create(ctx, appPod(namespace, annotations), metav1.CreateOptions{})
	if err != nil {
		t.Fatal(err)
	}
	running := waitRunning(ctx, t, namespace, created.Name)
	target := filepath.Join(env.c.KubeletRoot, "pods", string(running.UID), "volumes", "kubernetes.io~csi", api.AgentVolumeName, "mount")
	entries, err := os.ReadDir(target)
	if err != nil || len(entries) != 0 {
		t.Fatalf("agent dir of a failed-open volume: %v, %v; want empty", entries, err)
	}
	return running, target
}

// volumeRecord is the node's record of the volume at target (from
// `oneagent-csi cache volumes`), or nil.
func volumeRecord(t *testing.T, target string) *storage.Volume {
	t.Helper()
	var vols []storage.Volume
	cacheJSON(t, &vols, "volumes")
	for i := range vols {
		if vols[i].TargetPath == target {
			return &vols[i]
		}
	}
	return nil
}

func mustRead(t *testing.T, path string) []byte {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

// An annotation naming a tenant the node does not know (a typo, or injector
// and node configs out of step) fails open at once: the pod runs without the
// agent, and the reason is in the volume record and the kubelet's events
// never show a retry loop.
func TestUnknownTenantFailsOpenAtOnce(t *testing.T) {
	ctx := setup(t)
	if err := env.c.EnsureNamespace(ctx, "typo", map[string]string{api.InjectLabel: "true"}); err != nil {
		t.Fatal(err)
	}
	running, target := runWithEmptyAgentDir(ctx, t, "typo", map[string]string{api.TenantAnnotation: "prdo"})
	rec := volumeRecord(t, target)
	if rec == nil || rec.State != storage.VolumeFailedOpen || !strings.Contains(rec.Reason, "unknown_tenant") || !strings.Contains(rec.Reason, `"prdo"`) {
		t.Fatalf("record of %s = %+v; want failedOpen naming the unknown tenant", target, rec)
	}
	// At once: the first attempt failed open, so the pod never saw a
	// failed mount.
	evs, err := env.c.Client.CoreV1().Events("typo").List(ctx, metav1.ListOptions{FieldSelector: "involvedObject.name=" + running.Name})
	if err != nil {
		t.Fatal(err)
	}
	for _, e := range evs.Items {
		if e.Reason == "FailedMount" {
			t.Fatalf("the pod waited for a tenant that cannot come: %s: %s", e.Reason, e.Message)
		}
	}
	deletePod(ctx, t, "typo", running.Name)
}

// A pod in a namespace outside a tenant's list that asks for that tenant
// (another team's) runs without the agent at once, the reason visible.
func TestNamespaceOutsideATenantsListFailsOpen(t *testing.T) {
	ctx := setup(t)
	if err := env.c.EnsureNamespace(ctx, "team-a-shop", map[string]string{api.InjectLabel: "true"}); err != nil {
		t.Fatal(err)
	}
	running, target := runWithEmptyAgentDir(ctx, t, "team-a-shop", map[string]string{api.TenantAnnotation: "team-b"})
	rec := volumeRecord(t, target)
	if rec == nil || rec.State != storage.VolumeFailedOpen || !strings.Contains(rec.Reason, "refused_by_policy") ||
		!strings.Contains(rec.Reason, `namespace "team-a-shop" may not use tenant "team-b"`) {
		t.Fatalf("record of %s = %+v; want failedOpen refused by the tenant's policy", target, rec)
	}
	deletePod(ctx, t, "team-a-shop", running.Name)
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

var mountOptions = cluster.MountOptions

// TestContainerConfigFromTheDriver: with the pod annotation
// container-config: driver the pod has no init container; kubelet mounts
// each app container's container.conf from the CSI volume by subPath, with
// the agent and when the volume fails open (a tenant the node does not
// know), and the pods start either way.
func TestContainerConfigFromTheDriver(t *testing.T) {
	ctx := setup(t)
	if err := env.c.EnsureNamespace(ctx, "noinit", map[string]string{api.InjectLabel: "true"}); err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct {
		name   string
		tenant string
		agent  bool
	}{
		{"with the agent", "", true},
		{"failed open", "prdo", false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			ann := map[string]string{"oneagent.dynatrace.com/container-config": "driver"}
			if tc.tenant != "" {
				ann[api.TenantAnnotation] = tc.tenant
			}
			created, err := env.c.Client.CoreV1().Pods("noinit").Create(ctx, appPod("noinit", ann), metav1.CreateOptions{})
			if err != nil {
				t.Fatal(err)
			}
			if created.Annotations[api.InjectedAnnotation] != "true" || len(created.Spec.InitContainers) != 0 {
				t.Fatalf("pod not injected without an init container: annotations %v, init containers %+v",
					created.Annotations, created.Spec.InitContainers)
			}
			pod := waitRunning(ctx, t, "noinit", created.Name)
			var appID string
			for _, cs := range pod.Status.ContainerStatuses {
				if cs.Name == "shop" {
					appID = cs.ContainerID
				}
			}
			root := filepath.Join("/proc", containerPID(t, appID), "root")
			conf, err := os.ReadFile(filepath.Join(root, api.ContainerConfMountPath))
			for _, want := range []string{"containerName shop\n", "k8s_fullpodname " + pod.Name + "\n", "k8s_poduid " + string(pod.UID) + "\n",
				"k8s_namespace noinit\n", "k8s_node_name " + cluster.NodeName + "\n", "imageName " + cluster.AppImage + "\n"} {
				if err != nil || !strings.Contains(string(conf), want) {
					t.Fatalf("container.conf in the app container: %v\n%s\nwant a line %q", err, conf, want)
				}
			}
			_, err = os.Stat(filepath.Join(root, api.AgentMountPath, api.AgentLibraryRelativePath))
			if got := err == nil; got != tc.agent {
				t.Fatalf("agent library in the app container: %v, want present=%v", err, tc.agent)
			}
			if tc.agent {
				slice := filepath.Join(env.c.KubeletRoot, "pods", string(pod.UID), "volumes", "kubernetes.io~empty-dir", api.ConfigVolumeName, "shop")
				var markers []byte
				if err := cluster.Poll(ctx, 30*time.Second, "markers", func() bool {
					markers, _ = os.ReadFile(filepath.Join(slice, "loaded"))
					return strings.Contains(string(markers), "argv0=sleep")
				}); err != nil {
					t.Fatalf("%v: markers %q", err, markers)
				}
			}
			deletePod(ctx, t, "noinit", pod.Name)
			if left, _ := os.ReadDir(filepath.Join(env.dataDir, "volumes")); len(left) != 0 {
				t.Fatalf("volume layers left after the pod was deleted: %v", left)
			}
		})
	}
}
