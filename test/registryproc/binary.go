package registryproc

import (
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"sync"
	"testing"

	"golang.org/x/sys/unix"
)

var (
	buildOnce sync.Once
	built     string
	buildErr  error
)

// Binary returns the registry binary: $ONEAGENT_CSI_REGISTRY_BIN (set by
// make test) or one built with `go install` from the Go module proxy into
// the user cache dir, once per machine (a file lock keeps parallel test
// binaries from building it twice).
func Binary(t testing.TB) string {
	t.Helper()
	if b := os.Getenv("ONEAGENT_CSI_REGISTRY_BIN"); b != "" {
		return b
	}
	buildOnce.Do(func() { built, buildErr = build() })
	if buildErr != nil {
		t.Fatal(buildErr)
	}
	return built
}

func build() (string, error) {
	cache, err := os.UserCacheDir()
	if err != nil {
		return "", err
	}
	dir := filepath.Join(cache, "oneagent-csi", "registry-"+Version)
	bin := filepath.Join(dir, "registry")
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return "", err
	}
	lock, err := os.OpenFile(filepath.Join(dir, ".lock"), os.O_CREATE|os.O_RDWR, 0o600)
	if err != nil {
		return "", err
	}
	defer lock.Close()
	if err := unix.Flock(int(lock.Fd()), unix.LOCK_EX); err != nil {
		return "", err
	}
	if _, err := os.Stat(bin); err == nil {
		return bin, nil
	}
	tmp, err := os.MkdirTemp(dir, "build-")
	if err != nil {
		return "", err
	}
	defer os.RemoveAll(tmp)
	cmd := exec.Command("go", "install", "github.com/distribution/distribution/v3/cmd/registry@"+Version)
	cmd.Dir = tmp
	cmd.Env = append(os.Environ(), "GOBIN="+tmp, "CGO_ENABLED=0", "GOFLAGS=")
	if out, err := cmd.CombinedOutput(); err != nil {
		return "", fmt.Errorf("go install distribution registry %s: %w\n%s", Version, err, out)
	}
	return bin, os.Rename(filepath.Join(tmp, "registry"), bin)
}
