// Package layering holds no code: its test checks that the production
// packages import each other only downwards (cmd → driver, injector,
// troubleshoot → provisioner → storage → api), so the contract in api stays
// below everything that uses it.
package layering

import (
	"go/build"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
)

const module = "github.com/oneagent-csi/oneagent-csi/"

// allowed lists, per production package, the project packages its non-test
// files may import. A package missing here fails the test, so a new one gets
// a place in the layers on purpose.
var allowed = map[string][]string{
	"api":                    nil,
	"storage":                {"api"},
	"provisioner/extract":    {"storage", "internal/diskio"},
	"provisioner/registry":   {"provisioner/extract", "internal/readahead", "internal/idleread"},
	"provisioner":            {"api", "storage", "provisioner/extract", "provisioner/registry", "internal/diskio", "internal/idleread"},
	"driver":                 {"api", "storage", "provisioner"},
	"injector":               {"api", "injector/selftls"},
	"injector/selftls":       nil,
	"injector/initcontainer": {"api"},
	"troubleshoot":           {"api", "storage", "provisioner", "injector"},
	"mirror":                 {"provisioner/registry"},
	"internal/memlimit":      nil,
	"internal/diskio":        nil,
	"internal/readahead":     nil,
	"internal/idleread":      nil,
	"internal/ociimage":      nil,
	"internal/layering":      nil,
	"cmd/oneagent-csi": {"api", "storage", "provisioner", "driver", "injector", "injector/selftls",
		"injector/initcontainer", "troubleshoot", "internal/memlimit", "internal/diskio", "provisioner/extract", "mirror"},
	"hack/image": {"internal/ociimage"},
}

func TestImportsRunDownwards(t *testing.T) {
	root, err := filepath.Abs("../..")
	if err != nil {
		t.Fatal(err)
	}
	seen := 0
	err = filepath.WalkDir(root, func(path string, d os.DirEntry, err error) error {
		if err != nil {
			return err
		}
		if !d.IsDir() {
			return nil
		}
		rel, _ := filepath.Rel(root, path)
		rel = filepath.ToSlash(rel)
		// test/ holds test programs and its own modules; hidden and
		// testdata directories hold no packages of this module.
		if rel == "test" || rel == "bin" || strings.HasPrefix(d.Name(), ".") || d.Name() == "testdata" {
			return filepath.SkipDir
		}
		pkg, err := build.ImportDir(path, 0)
		if err != nil {
			if _, ok := err.(*build.NoGoError); ok { //nolint:errorlint // go/build returns it unwrapped
				return nil
			}
			return err
		}
		seen++
		want, ok := allowed[rel]
		if !ok {
			t.Errorf("package %s is not placed in the layers: add it to allowed", rel)
			return nil
		}
		for _, imp := range pkg.Imports {
			dep, ok := strings.CutPrefix(imp, module)
			if !ok {
				continue
			}
			if !slices.Contains(want, dep) {
				t.Errorf("%s imports %s: allowed are %v", rel, dep, want)
			}
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	if seen < len(allowed)-1 { // internal/layering itself has only a test file
		t.Errorf("found %d packages, want at least %d: is the walk rooted at the module?", seen, len(allowed)-1)
	}
}
