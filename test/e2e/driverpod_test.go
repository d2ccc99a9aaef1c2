package e2e

import (
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"golang.org/x/sys/unix"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/utils/ptr"
	"sigs.k8s.io/yaml"

	"github.com/oneagent-csi/oneagent-csi/api"
	"github.com/oneagent-csi/oneagent-csi/test/e2e/cluster"
)

// TestDriverAsPrivilegedPod runs the node driver the way the DaemonSet does:
// a privileged hostNetwork pod from the image, with Bidirectional mount
// propagation on the kubelet pods dir and the data dir. The app's volume
// must be read-only on the host too (a remount inside the driver's own
// mount namespace would not be) and must serve the agent.
func TestDriverAsPrivilegedPod(t *testing.T) {
	ctx := setup(t)
	stopCmd(env.node)
	t.Cleanup(func() {
		_ = env.c.Client.CoreV1().Pods("kube-system").Delete(ctx, "oneagent-csi-node", metav1.DeleteOptions{GracePeriodSeconds: ptr.To[int64](0)})
		_ = cluster.Poll(ctx, 60*time.Second, "driver pod gone", func() bool {
			_, err := env.c.Client.CoreV1().Pods("kube-system").Get(ctx, "oneagent-csi-node", metav1.GetOptions{})
			return err != nil
		})
		if err := launchNode(); err != nil {
			t.Error(err)
		}
	})
	if err := env.c.EnsureNamespace(ctx, "kube-system", nil); err != nil {
		t.Fatal(err)
	}
	dataDir := filepath.Join(env.c.Dir, "pod-data")
	csiDir := filepath.Join(env.c.Dir, "pod-csi")
	pods := filepath.Join(env.c.KubeletRoot, "pods")
	registry := filepath.Join(env.c.KubeletRoot, "plugins_registry")
	// Bidirectional propagation needs a shared mount at the host path (a
	// systemd host makes / shared; this machine does not): make the data
	// dir one, as kubelet does with its root dir. Stop unmounts it.
	if err := os.MkdirAll(dataDir, 0o755); err != nil {
		t.Fatal(err)
	}
	if err := unix.Mount(dataDir, dataDir, "", unix.MS_BIND, ""); err != nil {
		t.Fatal(err)
	}
	if err := unix.Mount("", dataDir, "", unix.MS_SHARED, ""); err != nil {
		t.Fatal(err)
	}
	var hostCfg map[string]any
	if err := yaml.Unmarshal(mustRead(t, env.nodeCfg), &hostCfg); err != nil {
		t.Fatal(err)
	}
	tenant := hostCfg["tenants"].([]any)[0].(map[string]any)
	files := map[string]string{
		"token":  string(mustRead(t, tenant["tokenFile"].(string))),
		"ca.pem": string(mustRead(t, tenant["caFile"].(string))),
	}
	tenant["tokenFile"], tenant["caFile"] = "/etc/oneagent-csi/config/token", "/etc/oneagent-csi/config/ca.pem"
	cfg := map[string]any{"nodeID": cluster.NodeName, "dataDir": dataDir, "csiSocket": filepath.Join(csiDir, "csi.sock"),
		"registrationDir": registry, "httpAddr": "127.0.0.1:0", "adminSocket": filepath.Join(csiDir, "admin.sock"),
		"publishWait": "5s", "kubeletDir": env.c.KubeletRoot, "tenants": []any{tenant}}
	b, err := yaml.Marshal(cfg)
	if err != nil {
		t.Fatal(err)
	}
	files["config.yaml"] = string(b)
	if _, err := env.c.Client.CoreV1().ConfigMaps("kube-system").Create(ctx, &corev1.ConfigMap{
		ObjectMeta: metav1.ObjectMeta{Name: "oneagent-csi-node"}, Data: files}, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	bidi := corev1.MountPropagationBidirectional
	hostPath := func(name, path string) corev1.Volume {
		return corev1.Volume{Name: name, VolumeSource: corev1.VolumeSource{HostPath: &corev1.HostPathVolumeSource{Path: path, Type: ptr.To(corev1.HostPathDirectoryOrCreate)}}}
	}
	driverPod := &corev1.Pod{
		ObjectMeta: metav1.ObjectMeta{Name: "oneagent-csi-node", Namespace: "kube-system",
			Labels: map[string]string{"app.kubernetes.io/name": "oneagent-csi-node", "sidecar.istio.io/inject": "false"}},
		Spec: corev1.PodSpec{
			NodeName: cluster.NodeName, HostNetwork: true, AutomountServiceAccountToken: ptr.To(false),
			TerminationGracePeriodSeconds: ptr.To[int64](5),
			Containers: []corev1.Container{{
				Name: "node", Image: cluster.InitImage, ImagePullPolicy: corev1.PullNever,
				Args:            []string{"node", "--config=/etc/oneagent-csi/config/config.yaml", "-v", "2"},
				SecurityContext: &corev1.SecurityContext{Privileged: ptr.To(true), ReadOnlyRootFilesystem: ptr.To(true)},
				VolumeMounts: []corev1.VolumeMount{
					{Name: "pods", MountPath: pods, MountPropagation: &bidi},
					{Name: "data", MountPath: dataDir, MountPropagation: &bidi},
					{Name: "registry", MountPath: registry},
					{Name: "csi", MountPath: csiDir},
					{Name: "config", MountPath: "/etc/oneagent-csi/config", ReadOnly: true},
				},
			}},
			Volumes: []corev1.Volume{hostPath("pods", pods), hostPath("data", dataDir), hostPath("registry", registry), hostPath("csi", csiDir),
				{Name: "config", VolumeSource: corev1.VolumeSource{ConfigMap: &corev1.ConfigMapVolumeSource{LocalObjectReference: corev1.LocalObjectReference{Name: "oneagent-csi-node"}}}}},
		},
	}
	if _, err := env.c.Client.CoreV1().Pods("kube-system").Create(ctx, driverPod, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	waitRunning(ctx, t, "kube-system", "oneagent-csi-node")
	if err := cluster.Poll(ctx, 60*time.Second, "the kubelet to register the driver pod's socket", func() bool {
		_, err := os.Stat(filepath.Join(registry, api.DefaultDriverName+"-reg.sock"))
		return err == nil
	}); err != nil {
		t.Fatal(err)
	}

	if err := env.c.EnsureNamespace(ctx, "podshop", map[string]string{api.InjectLabel: "true"}); err != nil {
		t.Fatal(err)
	}
	created, err := env.c.Client.CoreV1().Pods("podshop").Create(ctx, appPod("podshop", nil), metav1.CreateOptions{})
	if err != nil {
		t.Fatal(err)
	}
	pod := waitRunning(ctx, t, "podshop", created.Name)
	target := filepath.Join(pods, string(pod.UID), "volumes", "kubernetes.io~csi", api.AgentVolumeName, "mount")
	opts, ok := mountOptions(target)
	if !ok || !strings.HasPrefix(opts, "ro") {
		t.Fatalf("host view of the target: options %q (mounted %v), want read-only", opts, ok)
	}
	if _, err := os.Stat(filepath.Join(target, api.AgentLibraryRelativePath)); err != nil {
		t.Fatalf("agent not visible on the host: %v", err)
	}
	if err := os.WriteFile(filepath.Join(target, "x"), nil, 0o644); err == nil {
		t.Fatal("the host could write into the agent volume")
	}
	slice := filepath.Join(pods, string(pod.UID), "volumes", "kubernetes.io~empty-dir", api.ConfigVolumeName, "shop")
	if err := cluster.Poll(ctx, 30*time.Second, "markers", func() bool {
		b, _ := os.ReadFile(filepath.Join(slice, "loaded"))
		return strings.Contains(string(b), "argv0=sleep")
	}); err != nil {
		t.Fatal(err)
	}
	deletePod(ctx, t, "podshop", pod.Name)
	if _, mounted := mountOptions(target); mounted {
		t.Fatal("target still mounted on the host after delete")
	}
}
