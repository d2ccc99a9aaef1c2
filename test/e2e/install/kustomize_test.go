package install

import (
	"context"
	"os"
	"path/filepath"
	"sort"
	"strings"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/oneagent-csi/oneagent-csi/api"
	"github.com/oneagent-csi/oneagent-csi/test/e2e/cluster"
)

const namespace = "oneagent-csi"

// TestKustomizeInstall installs with `kubectl apply -k` as README says (the
// base, with the image this cluster has and the fake tenant), runs an app
// and a meshed app with the agent, updates the DaemonSet's image while they
// run, and uninstalls with `kubectl delete -k`.
func TestKustomizeInstall(t *testing.T) {
	ctx := setup(t)
	layer := tenantLayer(t, "../testdata/install-overlay")
	kubectl(t, "apply", "-k", layer)
	waitInstalled(ctx, t)

	apps := "shop"
	kubectl(t, "create", "namespace", apps)
	kubectl(t, "label", "namespace", apps, api.InjectLabel+"=true")
	applyObjects(t, appDeployment("shop", apps), istioRootCert(apps), meshedDeployment(t, apps))
	shop := runningPod(ctx, t, apps, "shop")
	meshed := runningPod(ctx, t, apps, "myapp")
	checkAgentLoaded(ctx, t, shop, "shop")
	checkAgentLoaded(ctx, t, meshed, "myapp")

	// A new image, rolled out while the apps run: their mounts keep
	// serving, a new process still loads the agent, and a pod deleted
	// after the update is unpublished by the new driver pod.
	old := driverPodName(ctx, t)
	if err := env.c.TagImage(cluster.InitImage, cluster.InitImage+"-next"); err != nil {
		t.Fatal(err)
	}
	kubectl(t, "-n", namespace, "set", "image", "daemonset/oneagent-csi-node", "node="+cluster.InitImage+"-next")
	kubectl(t, "-n", namespace, "rollout", "status", "daemonset/oneagent-csi-node", "--timeout=180s")
	if now := driverPodName(ctx, t); now == old {
		t.Fatalf("the driver pod %s was not replaced", old)
	}
	for _, p := range []*corev1.Pod{shop, meshed} {
		if _, err := os.Stat(filepath.Join(agentTarget(p), api.AgentLibraryRelativePath)); err != nil {
			t.Fatalf("%s: the agent is gone after the update: %v", p.Name, err)
		}
	}
	kubectl(t, "-n", apps, "exec", shop.Name, "-c", "shop", "--", "/bin/sh", "-c", "exec sleep 0")
	marker := filepath.Join(env.c.KubeletRoot, "pods", string(shop.UID), "volumes", "kubernetes.io~empty-dir", api.ConfigVolumeName, "shop", "loaded")
	if b, _ := os.ReadFile(marker); strings.Count(string(b), "argv0=sleep") < 2 {
		t.Fatalf("a process started after the update did not load the agent: %q", b)
	}
	kubectl(t, "-n", apps, "scale", "deployment/shop", "--replicas=0")
	if err := cluster.Poll(ctx, 60*time.Second, "the shop pod gone and unpublished", func() bool {
		_, mounted := mountOptions(agentTarget(shop))
		_, err := env.c.Client.CoreV1().Pods(apps).Get(ctx, shop.Name, metav1.GetOptions{})
		return apierrors.IsNotFound(err) && !mounted
	}); err != nil {
		t.Fatal(err)
	}

	// Uninstall as README says: the injected workloads first (their
	// volumes are unpublished while the driver still runs), then the
	// manifests.
	kubectl(t, "delete", "namespace", apps, "--timeout=120s")
	kubectl(t, "delete", "-k", layer, "--timeout=180s")
	checkUninstalled(ctx, t)
}

// waitInstalled waits for the DaemonSet and the injector to roll out, the
// driver to be registered on the node and the webhook's caBundle to be set.
func waitInstalled(ctx context.Context, t *testing.T) {
	t.Helper()
	kubectl(t, "-n", namespace, "rollout", "status", "daemonset/oneagent-csi-node", "--timeout=180s")
	kubectl(t, "-n", namespace, "rollout", "status", "deployment/oneagent-csi-injector", "--timeout=180s")
	if err := cluster.Poll(ctx, 60*time.Second, "the driver in CSINode", func() bool {
		n, err := env.c.Client.StorageV1().CSINodes().Get(ctx, cluster.NodeName, metav1.GetOptions{})
		if err != nil {
			return false
		}
		for _, d := range n.Spec.Drivers {
			if d.Name == api.DefaultDriverName {
				return true
			}
		}
		return false
	}); err != nil {
		t.Fatal(err)
	}
	w, err := env.c.Client.AdmissionregistrationV1().MutatingWebhookConfigurations().Get(ctx, "oneagent-csi-injector", metav1.GetOptions{})
	if err != nil {
		t.Fatal(err)
	}
	for _, h := range w.Webhooks {
		if len(h.ClientConfig.CABundle) == 0 {
			t.Fatalf("webhook %s has no caBundle once the injector is ready", h.Name)
		}
	}
}

func driverPodName(ctx context.Context, t *testing.T) string {
	t.Helper()
	var name string
	if err := cluster.Poll(ctx, 60*time.Second, "one driver pod", func() bool {
		list, err := env.c.Client.CoreV1().Pods(namespace).List(ctx, metav1.ListOptions{LabelSelector: "app.kubernetes.io/name=oneagent-csi-node"})
		if err != nil || len(list.Items) != 1 {
			return false
		}
		name = list.Items[0].Name
		return true
	}); err != nil {
		t.Fatal(err)
	}
	return name
}

// checkUninstalled checks that nothing of ours is left in the cluster and
// that the host keeps exactly what README says stays: the data dir (the
// cache, reused by a reinstall) and the plugin dir kubelet created.
func checkUninstalled(ctx context.Context, t *testing.T) {
	t.Helper()
	if err := cluster.Poll(ctx, 120*time.Second, "the namespace gone", func() bool {
		_, err := env.c.Client.CoreV1().Namespaces().Get(ctx, namespace, metav1.GetOptions{})
		return apierrors.IsNotFound(err)
	}); err != nil {
		t.Fatal(err)
	}
	if _, err := env.c.Client.AdmissionregistrationV1().MutatingWebhookConfigurations().Get(ctx, "oneagent-csi-injector", metav1.GetOptions{}); !apierrors.IsNotFound(err) {
		t.Errorf("the webhook configuration is left: %v", err)
	}
	if _, err := env.c.Client.StorageV1().CSIDrivers().Get(ctx, api.DefaultDriverName, metav1.GetOptions{}); !apierrors.IsNotFound(err) {
		t.Errorf("the CSIDriver is left: %v", err)
	}
	for _, dir := range []string{filepath.Join(env.c.KubeletRoot, "pods"), dataDir} {
		for _, m := range mountsBelow(dir) {
			if m != dataDir { // the shared bind mount the node had before
				t.Errorf("mount left: %s", m)
			}
		}
	}
	// README, "Uninstall": the data dir holds the cache (reused by a
	// reinstall); the plugin dir is empty; nothing is registered with
	// kubelet.
	for dir, want := range map[string][]string{
		dataDir:   {"artifacts", "empty", "host", "index.db", "tenants", "tmp", "volumes"},
		pluginDir: nil,
		filepath.Join(env.c.KubeletRoot, "plugins_registry"): nil,
	} {
		entries, err := os.ReadDir(dir)
		if err != nil {
			t.Errorf("%s: %v", dir, err)
			continue
		}
		var got []string
		for _, e := range entries {
			got = append(got, e.Name())
		}
		sort.Strings(got)
		if strings.Join(got, " ") != strings.Join(want, " ") {
			t.Errorf("left in %s: %v, want %v", dir, got, want)
		}
	}
	if entries, err := os.ReadDir(filepath.Join(dataDir, "volumes")); err != nil || len(entries) != 0 {
		t.Errorf("volume dirs left in the data dir: %v %v", entries, err)
	}
}
