package e2e

import (
	"encoding/json"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

// istioAPIVersion is the istio.io/api module whose CRDs validate the istio
// overlay (networking.istio.io/v1).
const istioAPIVersion = "v1.31.4"

// kubectlCmd runs the kubectl built with the cluster; its cache stays in
// the cluster's dir.
func kubectlCmd(args ...string) *exec.Cmd { return env.c.KubectlCmd(args...) }

func kubectl(t *testing.T, args ...string) string {
	t.Helper()
	out, err := kubectlCmd(args...).CombinedOutput()
	if err != nil {
		t.Fatalf("kubectl %s: %v\n%s", strings.Join(args, " "), err, out)
	}
	return string(out)
}

// TestDeployManifestsServerDryRun validates the kustomize base and the istio
// overlay with the real API server (server-side dry run), Istio's CRDs
// installed from the istio.io/api module.
func TestDeployManifestsServerDryRun(t *testing.T) {
	ctx := setup(t)
	// The namespace must exist for a dry run of the objects in it.
	if err := env.c.EnsureNamespace(ctx, "oneagent-csi", nil); err != nil {
		t.Fatal(err)
	}
	out := kubectl(t, "apply", "--dry-run=server", "-k", "../../deploy/kubernetes")
	for _, want := range []string{"daemonset.apps/oneagent-csi-node", "deployment.apps/oneagent-csi-injector",
		"mutatingwebhookconfiguration.admissionregistration.k8s.io/oneagent-csi-injector", "networkpolicy.networking.k8s.io/oneagent-csi-injector"} {
		if !strings.Contains(out, want) {
			t.Errorf("dry run output lacks %s:\n%s", want, out)
		}
	}

	// The base with the egress ports component: the node's policy gains the
	// ActiveGate and proxy ports and still passes the API server.
	rendered := kubectl(t, "kustomize", "testdata/egress-overlay")
	if !strings.Contains(rendered, "port: 9999") || !strings.Contains(rendered, "port: 3128") || !strings.Contains(rendered, "port: 443") {
		t.Errorf("the egress-ports overlay does not render the extra ports:\n%s", rendered)
	}
	if out := kubectl(t, "apply", "--dry-run=server", "-k", "testdata/egress-overlay"); !strings.Contains(out, "networkpolicy.networking.k8s.io/oneagent-csi-node") {
		t.Errorf("egress-ports overlay dry run lacks the node policy:\n%s", out)
	}

	dl, err := exec.Command("go", "mod", "download", "-json", "istio.io/api@"+istioAPIVersion).Output()
	if err != nil {
		t.Fatalf("download istio.io/api: %v", err)
	}
	var mod struct{ Dir string }
	if err := json.Unmarshal(dl, &mod); err != nil || mod.Dir == "" {
		t.Fatalf("go mod download: %v\n%s", err, dl)
	}
	kubectl(t, "apply", "--server-side", "-f", filepath.Join(mod.Dir, "kubernetes", "customresourcedefinitions.gen.yaml"))
	kubectl(t, "wait", "--for=condition=Established", "--timeout=60s", "crd/serviceentries.networking.istio.io")
	deadline := time.Now().Add(30 * time.Second)
	for {
		// The discovery cache may lag behind a fresh CRD for a moment.
		out, err := kubectlCmd("apply", "--dry-run=server", "-k", "../../deploy/istio").CombinedOutput()
		if err == nil {
			if !strings.Contains(string(out), "serviceentry.networking.istio.io/oneagent-csi-tenant-api") {
				t.Fatalf("istio overlay dry run lacks the ServiceEntry:\n%s", out)
			}
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("istio overlay dry run: %v\n%s", err, out)
		}
		time.Sleep(time.Second) // polling the API server's discovery, with a deadline
	}

	// `oneagent-csi istio egress` output for the fake tenant passes the
	// real API server's validation of Istio's CRDs.
	entries, err := exec.Command(env.bin, "istio", "egress", "--config", env.nodeCfg, "--tenant", "prod", "--namespace", "oneagent-csi").Output()
	if err != nil {
		t.Fatalf("istio egress: %v", err)
	}
	apply := kubectlCmd("apply", "--dry-run=server", "-f", "-")
	apply.Stdin = strings.NewReader(string(entries))
	if out, err := apply.CombinedOutput(); err != nil || !strings.Contains(string(out), "serviceentry.networking.istio.io/oneagent-csi-prod-") {
		t.Fatalf("rendered ServiceEntries rejected: %v\n%s\n%s", err, out, entries)
	}
}
