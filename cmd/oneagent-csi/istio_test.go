package main

import (
	"bytes"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"sigs.k8s.io/yaml"

	"github.com/oneagent-csi/oneagent-csi/test/faketenant"
	"github.com/oneagent-csi/oneagent-csi/test/harness"
)

func TestRenderServiceEntries(t *testing.T) {
	var out bytes.Buffer
	err := renderServiceEntries(&out, "prod", "istio-system", []string{
		"https://abc12345.live.dynatrace.com/api",
		"https://abc12345.live.dynatrace.com:443/communication",
		"https://sg-eu-1.dynatrace.com:9999/communication",
		"https://10.0.0.7:9999/communication",
	})
	if err != nil {
		t.Fatal(err)
	}
	docs := strings.Split(out.String(), "---\n")
	if len(docs) != 3 {
		t.Fatalf("%d ServiceEntries, want 3 (one per host):\n%s", len(docs), out.String())
	}
	type se struct {
		Metadata struct{ Name, Namespace string }
		Spec     struct {
			Hosts      []string
			Addresses  []string
			Resolution string
			Ports      []struct{ Number int }
		}
	}
	var got []se
	for _, d := range docs {
		var s se
		if err := yaml.Unmarshal([]byte(d), &s); err != nil {
			t.Fatal(err)
		}
		got = append(got, s)
	}
	if got[0].Spec.Addresses[0] != "10.0.0.7" || got[0].Spec.Resolution != "STATIC" {
		t.Errorf("IP endpoint: %+v", got[0])
	}
	if got[1].Spec.Hosts[0] != "abc12345.live.dynatrace.com" || len(got[1].Spec.Ports) != 1 || got[1].Spec.Ports[0].Number != 443 {
		t.Errorf("API host: %+v", got[1])
	}
	if got[2].Spec.Hosts[0] != "sg-eu-1.dynatrace.com" || got[2].Spec.Ports[0].Number != 9999 || got[2].Metadata.Namespace != "istio-system" {
		t.Errorf("ActiveGate: %+v", got[2])
	}
	if err := renderServiceEntries(&out, "prod", "x", []string{"not a url"}); err == nil || !strings.Contains(err.Error(), "not a url") {
		t.Errorf("bad endpoint: %v", err)
	}
}

func TestIstioEgressAgainstTheFakeTenant(t *testing.T) {
	srv, tenant := harness.StartTenant(t, faketenant.Options{})
	data, err := yaml.Marshal(map[string]any{"nodeID": "n", "tenants": []any{tenant}})
	if err != nil {
		t.Fatal(err)
	}
	cfg := filepath.Join(t.TempDir(), "node.yaml")
	if err := os.WriteFile(cfg, data, 0o600); err != nil {
		t.Fatal(err)
	}
	root := newRootCommand()
	var out, errOut bytes.Buffer
	root.SetOut(&out)
	root.SetErr(&errOut)
	root.SetArgs([]string{"istio", "egress", "--config", cfg, "--tenant", tenant.Name})
	if err := root.Execute(); err != nil {
		t.Fatalf("%v\n%s", err, errOut.String())
	}
	if !strings.Contains(out.String(), "kind: ServiceEntry") || !strings.Contains(out.String(), "127.0.0.1") || srv.Requests(faketenant.RouteConnection) != 1 {
		t.Fatalf("output:\n%s", out.String())
	}
	root = newRootCommand()
	root.SetOut(&out)
	root.SetErr(&errOut)
	root.SetArgs([]string{"istio", "egress", "--config", cfg, "--tenant", "nope"})
	if err := root.Execute(); err == nil || !strings.Contains(err.Error(), `--tenant "nope"`) {
		t.Fatalf("unknown tenant: %v", err)
	}
}
