// Package cachecli runs `oneagent-csi cache` against a running node process
// (admin socket) and offline (read-only index), and compares the outputs
// with golden files. Run with -update to rewrite them.
package cachecli

import (
	"bytes"
	"encoding/json"
	"errors"
	"flag"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"testing"

	"github.com/container-storage-interface/spec/lib/go/csi"

	"github.com/oneagent-csi/oneagent-csi/storage"
	"github.com/oneagent-csi/oneagent-csi/test/faketenant"
	"github.com/oneagent-csi/oneagent-csi/test/harness"
)

var update = flag.Bool("update", false, "rewrite the golden files")

var timestamps = regexp.MustCompile(`\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?(Z|[+-]\d\d:\d\d)`)

// run executes the binary; it returns stdout, stderr and the exit code.
func run(t *testing.T, args ...string) (string, string, int) {
	t.Helper()
	cmd := exec.Command(harness.Binary(t), args...)
	var out, errb bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &errb
	err := cmd.Run()
	code := 0
	var ee *exec.ExitError
	if errors.As(err, &ee) {
		code = ee.ExitCode()
	} else if err != nil {
		t.Fatal(err)
	}
	return out.String(), errb.String(), code
}

// golden compares out (timestamps and per-run paths replaced) with
// testdata/<name>.
func golden(t *testing.T, name, out string, replace ...string) {
	t.Helper()
	out = timestamps.ReplaceAllString(out, "<time>")
	out = strings.NewReplacer(replace...).Replace(out)
	path := filepath.Join("testdata", name)
	if *update {
		if err := os.WriteFile(path, []byte(out), 0o644); err != nil {
			t.Fatal(err)
		}
		return
	}
	want, err := os.ReadFile(path)
	if err != nil {
		t.Fatalf("%v (run go test ./test/cachecli -update to create it)", err)
	}
	if string(want) != out {
		t.Errorf("%s differs from the golden file\n--- got\n%s\n--- want\n%s", name, out, want)
	}
}

func TestCacheCommands(t *testing.T) {
	harness.RequireRoot(t)
	e := harness.NewProcessEnv(t, faketenant.Options{}, false)
	p := e.Start()
	ctx := harness.Ctx(t)
	target := harness.Target(e.Targets, "pod-a")
	req := harness.PublishRequest("vol-a", target, nil)
	if _, err := p.Node.NodePublishVolume(ctx, req); err != nil {
		t.Fatal(err)
	}
	sock := "--admin-socket=" + e.AdminSocket

	out, stderr, code := run(t, "cache", "ls", sock)
	if code != 0 {
		t.Fatalf("cache ls: exit %d: %s", code, stderr)
	}
	golden(t, "ls.txt", out)
	out, _, _ = run(t, "cache", "ls", sock, "-o", "json")
	golden(t, "ls.json", out)
	var infos []storage.ArtifactInfo
	if err := json.Unmarshal([]byte(out), &infos); err != nil || len(infos) != 1 || infos[0].Refs != 1 || infos[0].Mounts != 1 {
		t.Fatalf("ls -o json = %+v, %v", infos, err)
	}
	id := infos[0].ID
	out, _, _ = run(t, "cache", "ls", sock, "-o", "yaml")
	if !strings.Contains(out, "version: "+infos[0].Version) {
		t.Errorf("ls -o yaml:\n%s", out)
	}

	out, stderr, code = run(t, "cache", "volumes", sock)
	if code != 0 {
		t.Fatalf("cache volumes: exit %d: %s", code, stderr)
	}
	golden(t, "volumes.txt", out)
	out, _, code = run(t, "cache", "show", sock, infos[0].Version)
	if code != 0 || !strings.Contains(out, id) || !strings.Contains(out, "vol-a") {
		t.Errorf("cache show %s: exit %d\n%s", infos[0].Version, code, out)
	}
	if _, stderr, code = run(t, "cache", "show", sock, "9.9.9"); code == 0 || !strings.Contains(stderr, "not found") {
		t.Errorf("show of an unknown version: exit %d, %s", code, stderr)
	}
	out, _, code = run(t, "cache", "du", sock)
	if code != 0 || !strings.Contains(out, "artifact") || !strings.Contains(out, "total") {
		t.Errorf("cache du: exit %d\n%s", code, out)
	}
	out, stderr, code = run(t, "cache", "verify", sock)
	if code != 0 {
		t.Fatalf("verify of an intact cache: exit %d: %s%s", code, out, stderr)
	}
	golden(t, "verify-ok.txt", out)
	out, _, code = run(t, "cache", "gc", "--dry-run", sock)
	if code != 0 || !strings.Contains(out, "would delete 0") {
		t.Errorf("gc --dry-run: exit %d\n%s", code, out)
	}

	// A modified file is found, and the exit code says so.
	layout, _ := storage.NewLayout(e.DataDir)
	lib := filepath.Join(layout.Abs(layout.ArtifactTree(id)), "agent/lib64/liboneagentproc.so")
	if err := os.WriteFile(lib, []byte("tampered"), 0o755); err != nil {
		t.Fatal(err)
	}
	out, stderr, code = run(t, "cache", "verify", sock, id[:8])
	if code == 0 || !strings.Contains(out, "CORRUPT") || !strings.Contains(out, "agent/lib64/liboneagentproc.so") || !strings.Contains(stderr, "do not match") {
		t.Fatalf("verify of a modified file: exit %d\n%s%s", code, out, stderr)
	}
	golden(t, "verify-corrupt.txt", out)

	// The node process is down: --offline reads the index read-only.
	if _, err := p.Node.NodeUnpublishVolume(ctx, &csi.NodeUnpublishVolumeRequest{VolumeId: "vol-a", TargetPath: target}); err != nil {
		t.Fatal(err)
	}
	p.Stop(t)
	if _, stderr, code = run(t, "cache", "ls", sock); code == 0 || !strings.Contains(stderr, "--offline") {
		t.Errorf("ls with the node down: exit %d, %s", code, stderr)
	}
	out, stderr, code = run(t, "cache", "ls", "--offline", "--data-dir="+e.DataDir)
	if code != 0 || !strings.Contains(stderr, "offline") {
		t.Fatalf("ls --offline: exit %d: %s", code, stderr)
	}
	golden(t, "ls-offline.txt", out)
	if _, stderr, code = run(t, "cache", "gc", "--offline", "--data-dir="+e.DataDir); code == 0 || !strings.Contains(stderr, "running node process") {
		t.Errorf("gc --offline: exit %d, %s", code, stderr)
	}
}
