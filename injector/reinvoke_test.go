package injector

import (
	"os"
	"path/filepath"
	"reflect"
	"strings"
	"testing"

	corev1 "k8s.io/api/core/v1"

	"github.com/oneagent-csi/oneagent-csi/api"
)

// apiServerDefaults sets on every container what the API server defaults
// when it stores a pod (the fields that matter for our init container).
func apiServerDefaults(p *corev1.Pod) {
	for _, list := range [][]corev1.Container{p.Spec.InitContainers, p.Spec.Containers} {
		for i := range list {
			c := &list[i]
			if c.TerminationMessagePath == "" {
				c.TerminationMessagePath = corev1.TerminationMessagePathDefault
			}
			if c.TerminationMessagePolicy == "" {
				c.TerminationMessagePolicy = corev1.TerminationMessageReadFile
			}
			if c.ImagePullPolicy == "" {
				c.ImagePullPolicy = corev1.PullIfNotPresent
			}
			for j := range c.Env {
				if f := c.Env[j].ValueFrom; f != nil && f.FieldRef != nil && f.FieldRef.APIVersion == "" {
					f.FieldRef.APIVersion = "v1"
				}
			}
		}
	}
}

func envNames(c *corev1.Container) []string {
	var names []string
	for _, e := range c.Env {
		names = append(names, e.Name)
	}
	return names
}

// What the user wrote is never removed or reordered, on the first pass or a
// reinvocation; a reinvocation on the stored (defaulted) pod changes nothing.
func TestReinvocationKeepsTheUsersWordsAndSendsNoPatch(t *testing.T) {
	cfg := testConfig(t)
	lib := agentLibrary(cfg)
	tests := []struct {
		name     string
		env      []corev1.EnvVar
		wantEnv  []string
		wantVals map[string]string
	}{
		{"user's own DT_DEPLOYMENT_METADATA", []corev1.EnvVar{{Name: DeploymentMetadataEnv, Value: "team=payments"}},
			[]string{DeploymentMetadataEnv, LDPreloadEnv}, map[string]string{DeploymentMetadataEnv: "team=payments"}},
		{"LD_PRELOAD equal to ours, referenced by a later variable", []corev1.EnvVar{
			{Name: LDPreloadEnv, Value: lib}, {Name: "JAVA_TOOL_PRELOAD", Value: "$(LD_PRELOAD)"}},
			[]string{LDPreloadEnv, "JAVA_TOOL_PRELOAD", DeploymentMetadataEnv}, map[string]string{LDPreloadEnv: lib}},
		{"no env", nil, []string{LDPreloadEnv, DeploymentMetadataEnv}, map[string]string{LDPreloadEnv: lib}},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			pod := appPod(func(p *corev1.Pod) { p.Spec.Containers[0].Env = tc.env })
			first, res := Mutate(pod, Request{Namespace: "shop"}, cfg)
			if !res.Injected {
				t.Fatalf("not injected: %s", res.Reason)
			}
			stored := first.DeepCopy()
			apiServerDefaults(stored)
			again, _ := Mutate(stored, Request{Namespace: "shop"}, cfg)
			for pass, p := range map[string]*corev1.Pod{"first pass": first, "reinvocation": again} {
				c := container(p, "app")
				if got := envNames(c); !reflect.DeepEqual(got, tc.wantEnv) {
					t.Errorf("%s: env = %v, want %v", pass, got, tc.wantEnv)
				}
				for name, want := range tc.wantVals {
					if got, _ := envOf(c, name); got != want {
						t.Errorf("%s: %s = %q, want %q", pass, name, got, want)
					}
				}
			}
			patch, err := CreatePatch(stored, again)
			if err != nil {
				t.Fatal(err)
			}
			if string(patch) != "[]" && string(patch) != "null" && len(patch) != 0 {
				t.Errorf("reinvocation on the stored pod sends a patch: %s", patch)
			}
		})
	}
}

// initUser: inherit leaves the uid and gid to the platform (OpenShift).
func TestInitUserInherit(t *testing.T) {
	dir := t.TempDir()
	write := func(body string) string {
		p := filepath.Join(dir, "injector.yaml")
		if err := os.WriteFile(p, []byte("initImage: example/oneagent-csi:1\ndefaultTenant: prod\n"+body), 0o600); err != nil {
			t.Fatal(err)
		}
		return p
	}
	cfg, err := LoadConfig(write("initUser: inherit\n"))
	if err != nil {
		t.Fatal(err)
	}
	out, _ := Mutate(appPod(), Request{Namespace: "shop"}, &cfg)
	sc := container(out, api.InitContainerName).SecurityContext
	if sc.RunAsUser != nil || sc.RunAsGroup != nil || sc.RunAsNonRoot == nil || !*sc.RunAsNonRoot {
		t.Fatalf("init container security context = %+v; want no uid/gid, runAsNonRoot", sc)
	}
	if cfg, err := LoadConfig(write("initUser: 2000\n")); err != nil || cfg.InitUser != 2000 || cfg.InitUserInherit {
		t.Fatalf("initUser 2000: %+v, %v", cfg.InitUser, err)
	}
	for _, bad := range []string{"initUser: someone\n", "initUser: 1337\n", "initUser: [1]\n"} {
		if _, err := LoadConfig(write(bad)); err == nil || !strings.Contains(err.Error(), "initUser") {
			t.Errorf("%q: %v, want an error naming initUser", bad, err)
		}
	}
}
