package integration

import (
	"crypto/x509"
	"encoding/base64"
	"fmt"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/container-storage-interface/spec/lib/go/csi"
	"github.com/google/go-containerregistry/pkg/authn"
	"github.com/google/go-containerregistry/pkg/name"
	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/remote"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/oneagent-csi/oneagent-csi/provisioner"
	"github.com/oneagent-csi/oneagent-csi/test/harness"
	"github.com/oneagent-csi/oneagent-csi/test/ocitest"
	"github.com/oneagent-csi/oneagent-csi/test/registryproc"
)

// pushTo writes img to the real registry r as Repo:tag with user's
// credentials, over TLS verified by r's CA, and returns its digest.
func pushTo(t *testing.T, r *registryproc.Registry, user, pass, tag string, img v1.Image) string {
	t.Helper()
	ca, err := os.ReadFile(r.CAFile)
	if err != nil {
		t.Fatal(err)
	}
	pool := x509.NewCertPool()
	pool.AppendCertsFromPEM(ca)
	tr := http.DefaultTransport.(*http.Transport).Clone()
	tr.TLSClientConfig.RootCAs = pool
	ref, err := name.NewTag(r.Host + "/" + ocitest.Repo + ":" + tag)
	if err != nil {
		t.Fatal(err)
	}
	if err := remote.Write(ref, img, remote.WithTransport(tr), remote.WithAuth(&authn.Basic{Username: user, Password: pass})); err != nil {
		t.Fatalf("push to %s: %v", ref, err)
	}
	d, _ := img.Digest()
	return d.String()
}

// pullSecret writes a .dockerconfigjson for host.
func pullSecret(t *testing.T, path, host, user, pass string) {
	t.Helper()
	auth := base64.StdEncoding.EncodeToString([]byte(user + ":" + pass))
	if err := os.WriteFile(path, fmt.Appendf(nil, `{"auths":{%q:{"auth":%q}}}`, host, auth), 0o600); err != nil {
		t.Fatal(err)
	}
}

// A tenant whose code modules come from an image in a real registry (TLS,
// htpasswd): publish mounts the module read-only, a wrong password is a
// FailedPrecondition until retryTimeout and then fails open, and with the
// registry gone the cached module still serves at once.
func TestPublishFromImage(t *testing.T) {
	harness.RequireRoot(t)
	reg := registryproc.Start(t, registryproc.Options{Users: map[string]string{"puller": "s3cret"}})
	digest := pushTo(t, reg, "puller", "s3cret", "1.311.72", ocitest.Module(t, "1.311.72"))
	secret := filepath.Join(t.TempDir(), ".dockerconfigjson")
	pullSecret(t, secret, reg.Host, "puller", "s3cret")
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
		pullSecret(t, secret, reg.Host, "puller", "wrong")
		t.Cleanup(func() { pullSecret(t, secret, reg.Host, "puller", "s3cret") })
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
