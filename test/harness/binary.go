package harness

import (
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"sync"
	"testing"
)

var (
	buildOnce sync.Once
	builtBin  string
	buildErr  error
)

// Binary returns the oneagent-csi binary for tests that run the real
// process: $ONEAGENT_CSI_BIN (set by make test and make bench) or, when that
// is unset, a build made once per test binary.
func Binary(t testing.TB) string {
	t.Helper()
	if b := os.Getenv("ONEAGENT_CSI_BIN"); b != "" {
		return b
	}
	buildOnce.Do(func() {
		dir, err := os.MkdirTemp("", "oneagent-csi-bin-")
		if err != nil {
			buildErr = err
			return
		}
		builtBin = filepath.Join(dir, "oneagent-csi")
		out, err := exec.Command("go", "build", "-o", builtBin, "github.com/oneagent-csi/oneagent-csi/cmd/oneagent-csi").CombinedOutput()
		if err != nil {
			buildErr = fmt.Errorf("go build: %w\n%s", err, out)
		}
	})
	if buildErr != nil {
		t.Fatal(buildErr)
	}
	return builtBin
}

// TestCommand builds the command test/cmd/<name> once per test binary and
// returns its path.
func TestCommand(t testing.TB, name string) string {
	t.Helper()
	testCmdMu.Lock()
	defer testCmdMu.Unlock()
	if p, ok := testCmds[name]; ok {
		return p
	}
	dir, err := os.MkdirTemp("", "oneagent-csi-testcmd-")
	if err != nil {
		t.Fatal(err)
	}
	p := filepath.Join(dir, name)
	out, err := exec.Command("go", "build", "-o", p, "github.com/oneagent-csi/oneagent-csi/test/cmd/"+name).CombinedOutput()
	if err != nil {
		t.Fatalf("go build test/cmd/%s: %v\n%s", name, err, out)
	}
	testCmds[name] = p
	return p
}

var (
	testCmdMu sync.Mutex
	testCmds  = map[string]string{}
)
