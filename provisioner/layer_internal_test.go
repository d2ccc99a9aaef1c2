package provisioner

import (
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/spf13/afero"
)

// The tenant layer reads the module's config without following any link:
// it never merges a host file into every pod's config.
func TestReadFileNoFollow(t *testing.T) {
	root := t.TempDir()
	fsys := afero.NewBasePathFs(afero.NewOsFs(), root)
	secret := filepath.Join(t.TempDir(), "SECRET")
	if err := os.WriteFile(secret, []byte("host secret"), 0o600); err != nil {
		t.Fatal(err)
	}
	for _, dir := range []string{"a/agent/conf", "b/agent", "c/agent/conf"} {
		if err := os.MkdirAll(filepath.Join(root, dir), 0o755); err != nil {
			t.Fatal(err)
		}
	}
	if err := os.WriteFile(filepath.Join(root, "a/agent/conf/ruxitagentproc.conf"), []byte("[general]\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	// b: a dir on the way is a link; c: the file itself is a link.
	if err := os.Symlink(filepath.Dir(secret), filepath.Join(root, "b/agent/conf")); err != nil {
		t.Fatal(err)
	}
	if err := os.Symlink(secret, filepath.Join(root, "c/agent/conf/ruxitagentproc.conf")); err != nil {
		t.Fatal(err)
	}
	if b, err := readFileNoFollow(fsys, "a", "agent/conf/ruxitagentproc.conf"); err != nil || string(b) != "[general]\n" {
		t.Fatalf("plain file: %q, %v", b, err)
	}
	if err := os.Rename(secret, filepath.Join(filepath.Dir(secret), "ruxitagentproc.conf")); err != nil {
		t.Fatal(err)
	}
	for _, tree := range []string{"b", "c"} {
		b, err := readFileNoFollow(fsys, tree, "agent/conf/ruxitagentproc.conf")
		if err == nil || !strings.Contains(err.Error(), "symlink") {
			t.Errorf("%s: read %q, %v; want a refusal naming the symlink", tree, b, err)
		}
	}
}
