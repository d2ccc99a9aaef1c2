package integration

import (
	"strings"
	"testing"

	"github.com/container-storage-interface/spec/lib/go/csi"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/oneagent-csi/oneagent-csi/driver"
	"github.com/oneagent-csi/oneagent-csi/provisioner"
	"github.com/oneagent-csi/oneagent-csi/test/faketenant"
	"github.com/oneagent-csi/oneagent-csi/test/harness"
)

// The tenant's policy, with real mounts: a refused app volume fails open at
// once with the reason; a refused host volume is PermissionDenied.
func TestTenantPolicy(t *testing.T) {
	harness.RequireRoot(t)
	pinned := faketenant.DefaultVersions[0]
	n := harness.Start(t, harness.Config{
		Provisioner: func(o *provisioner.Options) {
			o.Tenants[0].Namespaces = []string{"shop", "team-a-*"}
			o.Tenants[0].VersionPins = []string{pinned}
		},
		Driver: func(o *driver.Options) { o.HostAllow = []driver.HostAllowRule{{Namespace: "team-b"}} },
	})
	ctx := harness.Ctx(t)
	publish := func(id, namespace string, attrs map[string]string) (string, error) {
		target := harness.Target(n.TargetRoot, id)
		req := harness.PublishRequest(id, target, attrs)
		req.VolumeContext["csi.storage.k8s.io/pod.namespace"] = namespace
		req.Readonly = attrs["writable"] != "true"
		_, err := n.Node.NodePublishVolume(ctx, req)
		return target, err
	}
	unpublish := func(id, target string) {
		if _, err := n.Node.NodeUnpublishVolume(ctx, &csi.NodeUnpublishVolumeRequest{VolumeId: id, TargetPath: target}); err != nil {
			t.Fatal(err)
		}
	}

	// Allowed: a listed namespace, a glob, the allowed pin.
	for id, ns := range map[string]string{"ok-shop": "shop", "ok-glob": "team-a-web"} {
		target, err := publish(id, ns, map[string]string{"version": pinned})
		if err != nil {
			t.Fatalf("%s: %v", id, err)
		}
		if names := harness.DirNames(t, target); len(names) == 0 {
			t.Fatalf("%s: the agent is not served", id)
		}
		defer unpublish(id, target)
	}

	refused := []struct {
		id, namespace string
		attrs         map[string]string
		reason        string
	}{
		{"other-team", "team-b", nil, `namespace "team-b" may not use tenant "prod"`},
		{"pin-not-listed", "shop", map[string]string{"version": faketenant.DefaultVersions[1]}, "does not allow pinning"},
		{"writable", "shop", map[string]string{"writable": "true"}, "does not allow writable"},
	}
	for _, tc := range refused {
		t.Run(tc.id, func(t *testing.T) {
			target, err := publish(tc.id, tc.namespace, tc.attrs)
			if err != nil {
				t.Fatalf("refused app volume: %v, want fail-open at once", err)
			}
			failedOpenEmpty(t, n, tc.id, target, "refused_by_policy")
			failedOpenEmpty(t, n, tc.id, target, tc.reason)
			unpublish(tc.id, target)
		})
	}

	// Host mode: the policy refuses with PermissionDenied.
	_, err := publish("host-other", "team-b", map[string]string{"mode": "host"})
	if status.Code(err) != codes.PermissionDenied || !strings.Contains(err.Error(), "may not use tenant") {
		t.Fatalf("host volume outside the tenant's namespaces: %v, want PermissionDenied", err)
	}
}

// maxPinnedVersions bounds the distinct pinned versions in use on a node.
func TestMaxPinnedVersions(t *testing.T) {
	harness.RequireRoot(t)
	n := harness.Start(t, harness.Config{Provisioner: func(o *provisioner.Options) { o.Tenants[0].MaxPinnedVersions = 1 }})
	ctx := harness.Ctx(t)
	first := harness.Target(n.TargetRoot, "pin-1")
	if _, err := n.Node.NodePublishVolume(ctx, harness.PublishRequest("pin-1", first, map[string]string{"version": faketenant.DefaultVersions[0]})); err != nil {
		t.Fatal(err)
	}
	same := harness.Target(n.TargetRoot, "pin-1b")
	if _, err := n.Node.NodePublishVolume(ctx, harness.PublishRequest("pin-1b", same, map[string]string{"version": faketenant.DefaultVersions[0]})); err != nil {
		t.Fatal(err)
	}
	if len(harness.DirNames(t, same)) == 0 {
		t.Fatal("a second volume pinning the version in use is not served")
	}
	second := harness.Target(n.TargetRoot, "pin-2")
	if _, err := n.Node.NodePublishVolume(ctx, harness.PublishRequest("pin-2", second, map[string]string{"version": faketenant.DefaultVersions[1]})); err != nil {
		t.Fatalf("second pinned version: %v, want fail-open", err)
	}
	failedOpenEmpty(t, n, "pin-2", second, "maxPinnedVersions")
	for id, target := range map[string]string{"pin-1": first, "pin-1b": same, "pin-2": second} {
		if _, err := n.Node.NodeUnpublishVolume(ctx, &csi.NodeUnpublishVolumeRequest{VolumeId: id, TargetPath: target}); err != nil {
			t.Fatal(err)
		}
	}
	// Once the first version is no longer in use, another may be pinned.
	third := harness.Target(n.TargetRoot, "pin-3")
	if _, err := n.Node.NodePublishVolume(ctx, harness.PublishRequest("pin-3", third, map[string]string{"version": faketenant.DefaultVersions[1]})); err != nil {
		t.Fatal(err)
	}
	if len(harness.DirNames(t, third)) == 0 {
		t.Fatal("a pin after the others were unpublished is not served")
	}
	if _, err := n.Node.NodeUnpublishVolume(ctx, &csi.NodeUnpublishVolumeRequest{VolumeId: "pin-3", TargetPath: third}); err != nil {
		t.Fatal(err)
	}
}
