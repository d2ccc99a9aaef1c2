package e2e

import (
	"context"
	"maps"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/google/go-containerregistry/pkg/v1/static"
	"github.com/google/go-containerregistry/pkg/v1/types"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/oneagent-csi/oneagent-csi/api"
	"github.com/oneagent-csi/oneagent-csi/storage"
	"github.com/oneagent-csi/oneagent-csi/test/e2e/cluster"
	"github.com/oneagent-csi/oneagent-csi/test/ocitest"
	"github.com/oneagent-csi/oneagent-csi/test/registryproc"
)

// restartNode stops the node process and starts it with the config edit
// makes; the previous config comes back when the test ends.
func restartNode(t *testing.T, edit func(cfg map[string]any)) {
	t.Helper()
	before := maps.Clone(env.nodeConfig)
	restart := func(cfg map[string]any) {
		if err := env.node.Process.Kill(); err != nil {
			t.Fatal(err)
		}
		_ = env.node.Wait()
		if err := writeNodeConfig(cfg); err != nil {
			t.Fatal(err)
		}
		if err := launchNode(); err != nil {
			t.Fatal(err)
		}
		if err := cluster.Poll(context.Background(), 30*time.Second, "node plugin back", func() bool { // also from Cleanup, after t.Context ended
			return exec.Command(env.bin, "cache", "ls", "--admin-socket", env.adminSock).Run() == nil
		}); err != nil {
			t.Fatal(err)
		}
	}
	cfg := maps.Clone(before)
	edit(cfg)
	restart(cfg)
	t.Cleanup(func() { restart(before) })
}

// TestImageTenant: a tenant whose code modules come from an image in a real
// registry (distribution, TLS, htpasswd): an injected pod of that tenant
// runs with the agent from the image loaded.
func TestImageTenant(t *testing.T) {
	ctx := setup(t)
	reg := registryproc.Start(t, registryproc.Options{Users: map[string]string{"puller": "s3cret"}})
	img := ocitest.Image(t, static.NewLayer(ocitest.Gzip(t, ocitest.Tar(t, map[string]string{
		"opt/dynatrace/oneagent/" + api.AgentLibraryRelativePath: string(env.agentSO),
		"opt/dynatrace/oneagent/agent/conf/ruxitagentproc.conf":  "[general]\nloglevel info\n",
		"opt/dynatrace/oneagent/manifest.json":                   `{"version":"1.311.72"}`,
	})), types.OCILayer))
	digest := reg.Push(t, "puller", "s3cret", ocitest.Repo, "1.311.72", img)
	secret := filepath.Join(t.TempDir(), ".dockerconfigjson")
	registryproc.WritePullSecret(t, secret, reg.Host, "puller", "s3cret")
	restartNode(t, func(cfg map[string]any) {
		tenants := slices.Clone(cfg["tenants"].([]any))
		cfg["tenants"] = append(tenants, map[string]any{"name": "air", "image": reg.Host + "/" + ocitest.Repo + ":1.311.72",
			"pullSecretFile": secret, "caFile": reg.CAFile})
	})

	if err := env.c.EnsureNamespace(ctx, "air-shop", map[string]string{api.InjectLabel: "true"}); err != nil {
		t.Fatal(err)
	}
	created, err := env.c.Client.CoreV1().Pods("air-shop").Create(ctx, appPod("air-shop", map[string]string{api.TenantAnnotation: "air"}), metav1.CreateOptions{})
	if err != nil {
		t.Fatal(err)
	}
	pod := waitRunning(ctx, t, "air-shop", created.Name)
	target := filepath.Join(env.c.KubeletRoot, "pods", string(pod.UID), "volumes", "kubernetes.io~csi", api.AgentVolumeName, "mount")
	if b, err := os.ReadFile(filepath.Join(target, api.AgentLibraryRelativePath)); err != nil || len(b) != len(env.agentSO) {
		t.Fatalf("the image's agent library not at the target: %v", err)
	}
	var appID string
	for _, cs := range pod.Status.ContainerStatuses {
		if cs.Name == "shop" {
			appID = cs.ContainerID
		}
	}
	m, err := os.ReadFile(filepath.Join("/proc", containerPID(t, appID), "maps"))
	if err != nil || !strings.Contains(string(m), "/opt/dynatrace/oneagent-paas/agent/lib64/liboneagentproc.so") {
		t.Fatalf("liboneagentproc.so from the image not mapped in the app's pid 1: %v", err)
	}
	var vols []storage.Volume
	cacheJSON(t, &vols, "volumes")
	var arts []storage.ArtifactInfo
	cacheJSON(t, &arts, "ls")
	found := false
	for _, a := range arts {
		found = found || (a.Version == digest && a.Image == reg.Host+"/"+ocitest.Repo)
	}
	if !found || len(vols) != 1 || vols[0].Tenant != "air" || "sha256:"+vols[0].ArtifactID != digest {
		t.Fatalf("volumes %+v, artifacts %+v; want the pod on the image artifact %s", vols, arts, digest)
	}
	deletePod(ctx, t, "air-shop", pod.Name)
}
