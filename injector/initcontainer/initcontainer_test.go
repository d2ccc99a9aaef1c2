package initcontainer

import (
	"bytes"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

func agentTree(t *testing.T, withLib bool) string {
	t.Helper()
	root := t.TempDir()
	if withLib {
		lib := filepath.Join(root, "agent", "lib64", "liboneagentproc.so")
		if err := os.MkdirAll(filepath.Dir(lib), 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(lib, []byte("\x7fELF"), 0o755); err != nil {
			t.Fatal(err)
		}
	}
	return root
}

func TestRun(t *testing.T) {
	containers := []Container{{Name: "app", Image: "example/app:1.0"}, {Name: "worker", Image: "example/worker@sha256:abc"}}
	tests := []struct {
		name      string
		agent     bool
		policy    string
		wantErr   error
		wantOut   string
		wantConfs bool
	}{
		{name: "agent present", agent: true, policy: "silent", wantOut: "agent present", wantConfs: true},
		{name: "agent present, policy fail", agent: true, policy: "fail", wantOut: "agent present", wantConfs: true},
		{name: "agent missing, silent", agent: false, policy: "silent", wantOut: "starts without the agent", wantConfs: true},
		{name: "agent missing, fail", agent: false, policy: "fail", wantErr: ErrAgentMissing, wantOut: "will not start"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			install, conf := agentTree(t, tc.agent), t.TempDir()
			var out bytes.Buffer
			err := Run(Options{InstallPath: install, ConfigDir: conf, FailurePolicy: tc.policy, Containers: containers,
				PodName: "shop-1", PodUID: "uid-1", Namespace: "shop", NodeName: "node-a", Out: &out})
			if !errors.Is(err, tc.wantErr) || (tc.wantErr == nil && err != nil) {
				t.Fatalf("err = %v, want %v", err, tc.wantErr)
			}
			if !strings.Contains(out.String(), tc.wantOut) {
				t.Errorf("output %q does not say %q", out.String(), tc.wantOut)
			}
			for _, c := range containers {
				path := filepath.Join(conf, c.Name, "agent", "config", "container.conf")
				data, err := os.ReadFile(path)
				if !tc.wantConfs {
					if err == nil {
						t.Errorf("%s written although the pod must not start", path)
					}
					continue
				}
				if err != nil {
					t.Fatal(err)
				}
				for _, want := range []string{"[container]", "containerName " + c.Name, "imageName " + c.Image, "k8s_fullpodname shop-1",
					"k8s_poduid uid-1", "k8s_namespace shop", "k8s_node_name node-a"} {
					if !strings.Contains(string(data), want+"\n") {
						t.Errorf("%s lacks %q:\n%s", c.Name, want, data)
					}
				}
				st, err := os.Stat(filepath.Join(conf, c.Name))
				if err != nil || st.Mode().Perm() != 0o777 {
					t.Errorf("slice of %s: %v %v, want world-writable", c.Name, st.Mode(), err)
				}
				leftovers, _ := filepath.Glob(filepath.Join(conf, c.Name, "agent", "config", ".container.conf-*"))
				if len(leftovers) > 0 {
					t.Errorf("temporary files left: %v", leftovers)
				}
			}
		})
	}
}

func TestRunRejectsBadOptions(t *testing.T) {
	for _, tc := range []struct {
		name string
		opts Options
		want string
	}{
		{"policy", Options{FailurePolicy: "maybe", Containers: []Container{{Name: "a", Image: "i"}}}, "--failure-policy"},
		{"no containers", Options{}, "--container"},
		{"container name with a slash", Options{Containers: []Container{{Name: "../x", Image: "i"}}}, `"../x"`},
	} {
		t.Run(tc.name, func(t *testing.T) {
			tc.opts.ConfigDir, tc.opts.Out = t.TempDir(), &bytes.Buffer{}
			err := Run(tc.opts)
			if err == nil || !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("err = %v, want it to name %s", err, tc.want)
			}
			if entries, _ := os.ReadDir(tc.opts.ConfigDir); len(entries) != 0 {
				t.Errorf("files written for bad options: %v", entries)
			}
		})
	}
}

func TestParseContainer(t *testing.T) {
	for in, ok := range map[string]bool{"app=example/app:1": true, "app=reg:5000/a@sha256:ab": true, "app": false, "=img": false, "App=x": false, "a=": false} {
		_, err := ParseContainer(in)
		if (err == nil) != ok {
			t.Errorf("ParseContainer(%q) err = %v", in, err)
		}
	}
}
