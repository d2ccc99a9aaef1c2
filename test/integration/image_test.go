package integration

import (
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/container-storage-interface/spec/lib/go/csi"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/oneagent-csi/oneagent-csi/provisioner"
	"github.com/oneagent-csi/oneagent-csi/test/harness"
	"github.com/oneagent-csi/oneagent-csi/test/ocitest"
	"github.com/oneagent-csi/oneagent-csi/test/registryproc"
)

// A tenant whose code modules come from an image in a real registry (TLS,
// htpasswd): publish mounts the module read-only, a wrong password is a
// FailedPrecondition until retryTimeout and then fails open, and with the
// registry gone the cached module still serves at once.
func TestPublishFromImage(t *testing.T) {
	harness.RequireRoot(t)
	reg := registryproc.Start(t, registryproc.Options{Users: map[string]string{"puller": "s3cret"}})
	digest := reg.Push(t, "puller", "s3cret", ocitest.Repo, "1.311.72", ocitest.Module(t, "1.311.72"))
	secret := filepath.Join(t.TempDir(), ".dockerconfigjson")
	registryproc.WritePullSecret(t, secret, reg.Host, "puller", "s3cret")
	image := provisioner.Tenant{Name: "air", Image: reg.Host + "/" + ocitest.Repo + ":1.311.72", PullSecretFile: secret, CAFile: reg.CAFile}
	n := harness.Start(t, harness.Config{Provisioner: func(o *provisioner.Options) { o.Tenants = []provisioner.Tenant{image} }})
	ctx := harness.Ctx(t)

	target := harness.Target(n.TargetRoot, "img")
	if _, err := n.Node.NodePublishVolume(ctx, harness.PublishRequest("vol-img", target, map[string]string{"dynakube": "air"})); err != nil {
		t.Fatal(err)
	}
	b, err := os.ReadFile(filepath.Join(target, "agent/lib64/liboneagentproc.so"))
	if err != nil || string(b) != "elf 1.311.72" {
		t.Fatalf("library through the mount = %q, %v", b, err)
	}
	if err := os.WriteFile(filepath.Join(target, "x"), nil, 0o644); err == nil || !strings.Contains(err.Error(), "read-only") {
		t.Errorf("the volume is writable: %v", err)
	}
	rec, err := n.Index.GetVolume("vol-img")
	if err != nil || "sha256:"+rec.ArtifactID != digest {
		t.Fatalf("volume record %+v, %v; want artifact %s", rec, err, digest)
	}
	// The three layers, each once (the config blob is not needed).
	if got := reg.BlobsServed(); len(got) != 3 {
		t.Errorf("registry served blobs %v, want each of the 3 layers once", got)
	}
	for d, n := range reg.BlobsServed() {
		if n != 1 {
			t.Errorf("blob %s served %d times", d, n)
		}
	}

	t.Run("wrong password", func(t *testing.T) {
		registryproc.WritePullSecret(t, secret, reg.Host, "puller", "wrong")
		t.Cleanup(func() { registryproc.WritePullSecret(t, secret, reg.Host, "puller", "s3cret") })
		target := harness.Target(n.TargetRoot, "wrong")
		attrs := map[string]string{"dynakube": "air", "version": "1.999.0", "retryTimeout": "1s"}
		_, err := n.Node.NodePublishVolume(ctx, harness.PublishRequest("vol-wrong", target, attrs))
		if status.Code(err) != codes.FailedPrecondition || !strings.Contains(err.Error(), "credentials") {
			t.Fatalf("wrong password: %v, want FailedPrecondition about the credentials", err)
		}
		harness.Eventually(t, 20*time.Second, "fail-open after retryTimeout", func() bool {
			_, err := n.Node.NodePublishVolume(ctx, harness.PublishRequest("vol-wrong", target, attrs))
			return err == nil
		})
		failedOpenEmpty(t, n, "vol-wrong", target, "credentials")
		if _, err := n.Node.NodeUnpublishVolume(ctx, &csi.NodeUnpublishVolumeRequest{VolumeId: "vol-wrong", TargetPath: target}); err != nil {
			t.Fatal(err)
		}
	})

	t.Run("registry down, module cached", func(t *testing.T) {
		reg.Stop()
		target := harness.Target(n.TargetRoot, "down")
		start := time.Now()
		if _, err := n.Node.NodePublishVolume(ctx, harness.PublishRequest("vol-down", target, map[string]string{"dynakube": "air"})); err != nil {
			t.Fatal(err)
		}
		if _, err := os.Stat(filepath.Join(target, "agent/lib64/liboneagentproc.so")); err != nil {
			t.Fatalf("cached module not served: %v (after %s)", err, time.Since(start))
		}
	})
}
