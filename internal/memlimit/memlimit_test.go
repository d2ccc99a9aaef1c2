package memlimit

import (
	"os"
	"path/filepath"
	"testing"
)

func write(t *testing.T, path, data string) {
	t.Helper()
	if err := os.MkdirAll(filepath.Dir(path), 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(path, []byte(data), 0o644); err != nil {
		t.Fatal(err)
	}
}

func TestFromCgroup(t *testing.T) {
	tests := []struct {
		name   string
		cgroup string
		files  map[string]string
		want   int64
	}{
		{"v2", "0::/kubepods/pod1/c1\n", map[string]string{"kubepods/pod1/c1/memory.max": "67108864\n"}, 64 << 20},
		{"v2 unlimited", "0::/x\n", map[string]string{"x/memory.max": "max\n"}, 0},
		{"v2 in a cgroup namespace", "0::/\n", map[string]string{"memory.max": "33554432\n"}, 32 << 20},
		{"v1", "4:memory:/kubepods/pod1/c1\n3:cpu,cpuacct:/kubepods\n0::/\n",
			map[string]string{"memory/kubepods/pod1/c1/memory.limit_in_bytes": "67108864\n"}, 64 << 20},
		{"v1 unlimited", "4:memory:/\n", map[string]string{"memory/memory.limit_in_bytes": "9223372036854771712\n"}, 0},
		{"v1 on a hybrid host, v2 tree without memory", "4:memory:/a\n0::/a\n",
			map[string]string{"memory/a/memory.limit_in_bytes": "33554432\n"}, 32 << 20},
		{"none", "0::/gone\n", nil, 0},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			dir := t.TempDir()
			write(t, filepath.Join(dir, "proc"), tc.cgroup)
			for p, data := range tc.files {
				write(t, filepath.Join(dir, "cg", p), data)
			}
			got, from, err := FromCgroup(Options{ProcCgroup: filepath.Join(dir, "proc"), Root: filepath.Join(dir, "cg")})
			if err != nil || got != tc.want {
				t.Fatalf("limit = %d (from %s), %v; want %d", got, from, err, tc.want)
			}
		})
	}
}

func TestGoLimit(t *testing.T) {
	if got := GoLimit(32 << 20); got != 28<<20 {
		t.Fatalf("GoLimit(32 MiB) = %d, want 28 MiB", got)
	}
}
