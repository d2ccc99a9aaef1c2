package main

import (
	"bytes"
	"strings"
	"testing"
	"text/tabwriter"

	"github.com/oneagent-csi/oneagent-csi/storage"
)

func TestCacheShowsTheImageOfImageArtifacts(t *testing.T) {
	img := storage.ArtifactInfo{ID: "7df3cbb15bfaae0c459f93066ecc722fb9db57d1ac09268d15a42277c12dfe34", Flavor: "image", Arch: "x86",
		Version: "sha256:7df3cbb15bfaae0c459f93066ecc722fb9db57d1ac09268d15a42277c12dfe34", Image: "registry.example.com/dynatrace/codemodules:1.311.72"}
	zip := storage.ArtifactInfo{ID: "0123456789abcdef", Version: "1.311.72.20250410-123003", Flavor: "default", Arch: "x86"}
	var ls bytes.Buffer
	w := tabwriter.NewWriter(&ls, 0, 4, 2, ' ', 0)
	printArtifacts(w, []storage.ArtifactInfo{img, zip})
	_ = w.Flush()
	if !strings.Contains(ls.String(), "registry.example.com/dynatrace/codemodules:1.311.72@sha256:7df3cbb15bfa ") ||
		!strings.Contains(ls.String(), " 1.311.72.20250410-123003 ") {
		t.Errorf("cache ls:\n%s", ls.String())
	}
	var show bytes.Buffer
	w = tabwriter.NewWriter(&show, 0, 4, 2, ' ', 0)
	printShow(w, []storage.ArtifactDetail{{ArtifactInfo: img}})
	_ = w.Flush()
	for _, want := range []string{"Image: registry.example.com/dynatrace/codemodules:1.311.72", "Version: sha256:7df3cbb15bfaae0c459f93066ecc722fb9db57d1ac09268d15a42277c12dfe34"} {
		if !strings.Contains(strings.Join(strings.Fields(show.String()), " "), want) {
			t.Errorf("cache show lacks %q:\n%s", want, show.String())
		}
	}
}
