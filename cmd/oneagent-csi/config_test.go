package main

import (
	"os"
	"path/filepath"
	"strings"
	"testing"
)

func TestNodeConfig(t *testing.T) {
	tests := []struct {
		name string
		yaml string
		want string // substring of the error; empty = valid
	}{
		{"valid", "nodeID: n\ntenants: [{name: prod, apiURL: 'https://x/api', tokenFile: /t}]\npublishWait: 5s\n", ""},
		{"unknown key", "nodeID: n\ntenantz: []\n", "tenantz"},
		{"bad duration", "nodeID: n\npublishWait: 5\ntenants: [{name: prod, apiURL: 'https://x/api', tokenFile: /t}]\n", "duration"},
		{"no tenants", "nodeID: n\n", "tenants"},
		{"bad tenant name", "nodeID: n\ntenants: [{name: Prod, apiURL: 'https://x/api', tokenFile: /t}]\n", "tenants[0].name"},
		{"no token file", "nodeID: n\ntenants: [{name: prod, apiURL: 'https://x/api'}]\n", "tenants[0].tokenFile"},
		{"image tenant without API", "nodeID: n\ntenants: [{name: air, image: 'registry.example.com/dynatrace/codemodules:1.311.72', pullSecretFile: /s, mirrors: [mirror.local:5000], imagePath: opt/dynatrace/oneagent}]\n", ""},
		{"neither API nor image", "nodeID: n\ntenants: [{name: prod, tokenFile: /t}]\n", "tenants[0].apiURL"},
		{"relative data dir", "nodeID: n\ndataDir: data\ntenants: [{name: prod, apiURL: 'https://x/api', tokenFile: /t}]\n", "dataDir"},
		{"cache settings", "nodeID: n\ncache: {keepPrevious: 2, maxBytes: 20Gi, gcInterval: 5m, orphanGrace: 1h}\ntenants: [{name: prod, apiURL: 'https://x/api', tokenFile: /t}]\n", ""},
		{"bad cache budget", "nodeID: n\ncache: {maxBytes: lots}\ntenants: [{name: prod, apiURL: 'https://x/api', tokenFile: /t}]\n", "maxBytes"},
		{"negative cache budget", "nodeID: n\ncache: {maxBytes: -1Gi}\ntenants: [{name: prod, apiURL: 'https://x/api', tokenFile: /t}]\n", "cache.maxBytes"},
		{"relative admin socket", "nodeID: n\nadminSocket: admin.sock\ntenants: [{name: prod, apiURL: 'https://x/api', tokenFile: /t}]\n", "adminSocket"},
		{"host allow without namespace", "nodeID: n\nhostAllow: [{serviceAccount: x}]\ntenants: [{name: prod, apiURL: 'https://x/api', tokenFile: /t}]\n", "hostAllow[0].namespace"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			p := filepath.Join(t.TempDir(), "c.yaml")
			if err := os.WriteFile(p, []byte(tc.yaml), 0o600); err != nil {
				t.Fatal(err)
			}
			cfg, err := LoadNodeConfig(p)
			if err == nil {
				cfg.applyDefaults()
				err = cfg.validate()
			}
			if tc.want == "" {
				if err != nil {
					t.Fatal(err)
				}
				if cfg.DataDir != defaultDataDir || cfg.KubeletSocket != cfg.CSISocket || !*cfg.Prefetch {
					t.Errorf("defaults not applied: %+v", cfg)
				}
				return
			}
			if err == nil || !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("err = %v, want mention of %q", err, tc.want)
			}
		})
	}
}
