package injector

import (
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"reflect"
	"slices"
	"strings"
	"testing"
	"time"
	"unicode/utf8"

	jsonpatch "github.com/evanphx/json-patch/v5"
	appsv1 "k8s.io/api/apps/v1"
	corev1 "k8s.io/api/core/v1"
	"k8s.io/utils/ptr"
	"sigs.k8s.io/yaml"

	"github.com/oneagent-csi/oneagent-csi/api"
)

func testConfig(t testing.TB, edit ...func(*Config)) *Config {
	t.Helper()
	c := Config{DefaultTenant: "prod", InitImage: "registry.example.com/oneagent-csi:0.2.0", ClusterID: "cluster-uid", Version: "0.2.0", OwnNamespace: "oneagent-csi"}
	for _, e := range edit {
		e(&c)
	}
	if err := c.Complete(); err != nil {
		t.Fatal(err)
	}
	return &c
}

func appPod(edit ...func(*corev1.Pod)) *corev1.Pod {
	p := &corev1.Pod{}
	p.Name, p.Namespace = "shop-1", "shop"
	p.Annotations = map[string]string{api.InjectAnnotation: "true"}
	p.Spec.Containers = []corev1.Container{{Name: "app", Image: "example/app:1.0"}}
	for _, e := range edit {
		e(p)
	}
	return p
}

func requiredAffinity(terms ...corev1.NodeSelectorTerm) *corev1.Affinity {
	return &corev1.Affinity{NodeAffinity: &corev1.NodeAffinity{
		RequiredDuringSchedulingIgnoredDuringExecution: &corev1.NodeSelector{NodeSelectorTerms: terms}}}
}

func container(p *corev1.Pod, name string) *corev1.Container {
	for _, list := range [][]corev1.Container{p.Spec.InitContainers, p.Spec.Containers} {
		for i := range list {
			if list[i].Name == name {
				return &list[i]
			}
		}
	}
	return nil
}

func envOf(c *corev1.Container, name string) (string, int) {
	n := 0
	v := ""
	for _, e := range c.Env {
		if e.Name == name {
			v = e.Value
			n++
		}
	}
	return v, n
}

func initNames(p *corev1.Pod) []string {
	var out []string
	for _, c := range p.Spec.InitContainers {
		out = append(out, c.Name)
	}
	return out
}

func mustJSON(t testing.TB, v any) []byte {
	t.Helper()
	b, err := json.Marshal(v)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

// checkPatch applies the JSON patch from original to mutated with an
// independent JSON-patch library and expects exactly the mutated pod.
func checkPatch(t *testing.T, original, mutated *corev1.Pod) {
	t.Helper()
	patch, err := CreatePatch(original, mutated)
	if err != nil {
		t.Fatal(err)
	}
	if len(patch) == 0 {
		if !reflect.DeepEqual(mustJSON(t, original), mustJSON(t, mutated)) {
			t.Fatal("empty patch for a changed pod")
		}
		return
	}
	ops, err := jsonpatch.DecodePatch(patch)
	if err != nil {
		t.Fatalf("patch does not decode: %v\n%s", err, patch)
	}
	applied, err := ops.Apply(mustJSON(t, original))
	if err != nil {
		t.Fatalf("patch does not apply: %v\n%s", err, patch)
	}
	var got, want any
	_ = json.Unmarshal(applied, &got)
	_ = json.Unmarshal(mustJSON(t, mutated), &want)
	if !reflect.DeepEqual(got, want) {
		t.Fatalf("patched pod differs from the mutated pod\npatched: %s\nmutated: %s", applied, mustJSON(t, mutated))
	}
}

// checkInjected verifies DESIGN §5 field by field for the listed app
// containers.
func checkInjected(t *testing.T, p *corev1.Pod, cfg *Config, apps ...string) {
	t.Helper()
	if p.Annotations[api.InjectedAnnotation] != "true" {
		t.Fatalf("injected annotation = %q", p.Annotations[api.InjectedAnnotation])
	}
	if _, ok := p.Annotations[api.ReasonAnnotation]; ok {
		t.Errorf("reason annotation on an injected pod")
	}
	var agent, conf *corev1.Volume
	for i := range p.Spec.Volumes {
		switch p.Spec.Volumes[i].Name {
		case api.AgentVolumeName:
			agent = &p.Spec.Volumes[i]
		case api.ConfigVolumeName:
			conf = &p.Spec.Volumes[i]
		}
	}
	if agent == nil || agent.CSI == nil || agent.CSI.Driver != cfg.DriverName || !ptr.Deref(agent.CSI.ReadOnly, false) ||
		agent.CSI.VolumeAttributes[api.AttrMode] != "app" || agent.CSI.VolumeAttributes[api.AttrDynakube] == "" {
		t.Errorf("agent volume = %+v", agent)
	}
	if conf == nil || conf.EmptyDir == nil {
		t.Errorf("config volume = %+v", conf)
	}
	listed := agent.CSI.VolumeAttributes[api.AttrContainers]
	ic := container(p, api.InitContainerName)
	switch {
	case listed != "" && ic != nil:
		t.Fatal("an init container although the driver writes container.conf")
	case listed == "" && ic == nil:
		t.Fatal("no init container")
	case ic != nil:
		sc := ic.SecurityContext
		if sc == nil || !ptr.Deref(sc.ReadOnlyRootFilesystem, false) || ptr.Deref(sc.AllowPrivilegeEscalation, true) ||
			ptr.Deref(sc.Privileged, true) || !ptr.Deref(sc.RunAsNonRoot, false) || ptr.Deref(sc.RunAsUser, 0) == 1337 ||
			ptr.Deref(sc.RunAsGroup, 0) == 1337 || ic.LivenessProbe != nil || ic.ReadinessProbe != nil || len(ic.Ports) != 0 {
			t.Errorf("init container security = %+v", ic)
		}
	}
	listedContainers, err := api.ParseContainers(listed)
	if err != nil {
		t.Errorf("containers attribute: %v", err)
	}
	if listed != "" && len(listedContainers) != len(apps) {
		t.Errorf("containers attribute %q, want the app containers %v", listed, apps)
	}
	for _, name := range apps {
		c := container(p, name)
		if c == nil {
			t.Fatalf("no container %s", name)
		}
		var agentMount, confMount, confFile int
		for _, m := range c.VolumeMounts {
			if m.Name == api.AgentVolumeName && m.MountPath == cfg.InstallPath && m.ReadOnly {
				agentMount++
			}
			if m.Name == api.ConfigVolumeName && m.MountPath == api.ConfigMountPath && m.SubPath == name && !m.ReadOnly {
				confMount++
			}
			if m.Name == api.AgentVolumeName && m.MountPath == api.ContainerConfMountPath && m.ReadOnly &&
				m.SubPath == api.ContainerConfRelativePath(name) {
				confFile++
			}
		}
		wantFile := 0
		if listed != "" {
			wantFile = 1
		}
		if agentMount != 1 || confMount != 1 || confFile != wantFile {
			t.Errorf("%s: mounts = %+v", name, c.VolumeMounts)
		}
		pre, n := envOf(c, LDPreloadEnv)
		if n != 1 || strings.Count(pre, agentLibrary(cfg)) != 1 || !strings.HasSuffix(pre, agentLibrary(cfg)) {
			t.Errorf("%s: LD_PRELOAD = %q (%d times)", name, pre, n)
		}
		if md, n := envOf(c, DeploymentMetadataEnv); n != 1 || !strings.Contains(md, "orchestration_tech=oneagent-csi") {
			t.Errorf("%s: %s = %q", name, DeploymentMetadataEnv, md)
		}
		if ic != nil && !slices.Contains(ic.Args, "--container="+name+"="+c.Image) {
			t.Errorf("init args %v do not name %s", ic.Args, name)
		}
		if listed != "" && !slices.Contains(listedContainers, api.Container{Name: name, Image: c.Image}) {
			t.Errorf("containers attribute %q does not name %s=%s", listed, name, c.Image)
		}
	}
}

func TestMutate(t *testing.T) {
	cfg := testConfig(t)
	tests := []struct {
		name string
		pod  *corev1.Pod
		req  Request
		cfg  *Config
		// injected app containers; nil means not injected
		apps []string
		// reason (substring) when not injected; "-" means the pod must be
		// returned untouched (no annotation either)
		reason string
		check  func(t *testing.T, in, out *corev1.Pod)
	}{
		{name: "pod annotation opts in", pod: appPod(), apps: []string{"app"}},
		{name: "namespace label opts in", pod: appPod(func(p *corev1.Pod) { p.Annotations = nil }), req: Request{NamespaceOptIn: true}, apps: []string{"app"}},
		{name: "not opted in", pod: appPod(func(p *corev1.Pod) { p.Annotations = nil }), reason: "-"},
		{name: "ignored namespace", pod: appPod(), req: Request{Namespace: "kube-system", NamespaceOptIn: true}, reason: "-"},
		{name: "own namespace ignored", pod: appPod(), req: Request{Namespace: "oneagent-csi"}, reason: "-"},
		{name: "pod opts out in a labelled namespace", req: Request{NamespaceOptIn: true},
			pod: appPod(func(p *corev1.Pod) { p.Annotations[api.InjectAnnotation] = "false" }), reason: "oneagent.dynatrace.com/inject"},
		{name: "legacy opt-out", req: Request{NamespaceOptIn: true},
			pod: appPod(func(p *corev1.Pod) { p.Annotations[api.LegacyInjectAnnotation] = "false" }), reason: "dynatrace.com/inject"},
		{name: "tenant and version annotations", pod: appPod(func(p *corev1.Pod) {
			p.Annotations[api.TenantAnnotation] = "staging"
			p.Annotations[api.VersionAnnotation] = "1.311.72.20250410-123003"
		}), apps: []string{"app"}, check: func(t *testing.T, _, out *corev1.Pod) {
			attrs := out.Spec.Volumes[0].CSI.VolumeAttributes
			if attrs[api.AttrDynakube] != "staging" || attrs[api.AttrVersion] != "1.311.72.20250410-123003" || attrs[api.AttrRetryTimeout] != "10m" {
				t.Errorf("attributes = %v", attrs)
			}
		}},
		{name: "invalid tenant annotation", pod: appPod(func(p *corev1.Pod) { p.Annotations[api.TenantAnnotation] = "../x" }), reason: "oneagent.dynatrace.com/tenant"},
		{name: "invalid version annotation", pod: appPod(func(p *corev1.Pod) { p.Annotations[api.VersionAnnotation] = "latest; rm" }), reason: "oneagent.dynatrace.com/version"},
		{name: "no tenant anywhere", pod: appPod(), cfg: testConfig(t, func(c *Config) { c.DefaultTenant = "" }), reason: "no tenant"},
		{name: "invalid failure policy annotation", pod: appPod(func(p *corev1.Pod) { p.Annotations[FailurePolicyAnnotation] = "panic" }), reason: FailurePolicyAnnotation},
		{name: "failure policy annotation", pod: appPod(func(p *corev1.Pod) { p.Annotations[FailurePolicyAnnotation] = "fail" }), apps: []string{"app"},
			check: func(t *testing.T, _, out *corev1.Pod) {
				if !slices.Contains(container(out, api.InitContainerName).Args, "--failure-policy=fail") {
					t.Errorf("init args = %v", container(out, api.InitContainerName).Args)
				}
			}},
		{name: "per-container opt-out", pod: appPod(func(p *corev1.Pod) {
			p.Spec.Containers = append(p.Spec.Containers, corev1.Container{Name: "db", Image: "example/db:1"})
			p.Annotations[api.ContainerInjectPrefix+"db"] = "false"
		}), apps: []string{"app"}, check: func(t *testing.T, in, out *corev1.Pod) {
			if !reflect.DeepEqual(container(in, "db"), container(out, "db")) {
				t.Errorf("opted-out container changed: %+v", container(out, "db"))
			}
		}},
		{name: "every container opted out", pod: appPod(func(p *corev1.Pod) { p.Annotations[api.ContainerInjectPrefix+"app"] = "false" }), reason: "no app container"},
		{name: "multiple app containers", pod: appPod(func(p *corev1.Pod) {
			p.Spec.Containers = append(p.Spec.Containers, corev1.Container{Name: "worker", Image: "example/worker:2"})
		}), apps: []string{"app", "worker"}},
		{name: "existing LD_PRELOAD kept, ours appended", pod: appPod(func(p *corev1.Pod) {
			p.Spec.Containers[0].Env = []corev1.EnvVar{{Name: "A", Value: "1"}, {Name: LDPreloadEnv, Value: "/usr/lib/libjemalloc.so"}, {Name: "B", Value: "2"}}
		}), apps: []string{"app"}, check: func(t *testing.T, _, out *corev1.Pod) {
			env := out.Spec.Containers[0].Env
			if env[0].Name != "A" || env[1].Value != "/usr/lib/libjemalloc.so /opt/dynatrace/oneagent-paas/agent/lib64/liboneagentproc.so" || env[2].Name != "B" {
				t.Errorf("env = %+v", env)
			}
		}},
		{name: "LD_PRELOAD from valueFrom is not touched", pod: appPod(func(p *corev1.Pod) {
			p.Spec.Containers[0].Env = []corev1.EnvVar{{Name: LDPreloadEnv, ValueFrom: &corev1.EnvVarSource{ConfigMapKeyRef: &corev1.ConfigMapKeySelector{Key: "k"}}}}
		}), reason: "valueFrom"},
		{name: "existing env and mounts kept", pod: appPod(func(p *corev1.Pod) {
			p.Spec.Containers[0].Env = []corev1.EnvVar{{Name: "JAVA_OPTS", Value: "-Xmx1g"}}
			p.Spec.Containers[0].VolumeMounts = []corev1.VolumeMount{{Name: "data", MountPath: "/data"}}
			p.Spec.Volumes = []corev1.Volume{{Name: "data"}}
		}), apps: []string{"app"}, check: func(t *testing.T, _, out *corev1.Pod) {
			c := out.Spec.Containers[0]
			if c.Env[0].Name != "JAVA_OPTS" || c.VolumeMounts[0].Name != "data" || out.Spec.Volumes[0].Name != "data" {
				t.Errorf("existing entries moved: %+v", c)
			}
		}},
		{name: "something else mounted at the install path", pod: appPod(func(p *corev1.Pod) {
			p.Spec.Containers[0].VolumeMounts = []corev1.VolumeMount{{Name: "mine", MountPath: api.AgentMountPath}}
		}), reason: "already mounted"},
		{name: "conflicting volume name", pod: appPod(func(p *corev1.Pod) { p.Spec.Volumes = []corev1.Volume{{Name: api.AgentVolumeName}} }), reason: "volume named oneagent"},
		{name: "conflicting init container name", pod: appPod(func(p *corev1.Pod) {
			p.Spec.InitContainers = []corev1.Container{{Name: api.InitContainerName, Image: "other"}}
		}), reason: "container named dynatrace-oneagent-init"},
		{name: "init containers are not injected, ours goes last", pod: appPod(func(p *corev1.Pod) {
			p.Spec.InitContainers = []corev1.Container{{Name: "migrate", Image: "example/migrate:1"}}
		}), apps: []string{"app"}, check: func(t *testing.T, in, out *corev1.Pod) {
			if !reflect.DeepEqual(initNames(out), []string{"migrate", api.InitContainerName}) || !reflect.DeepEqual(in.Spec.InitContainers[0], out.Spec.InitContainers[0]) {
				t.Errorf("init containers = %v", initNames(out))
			}
		}},
		{name: "ephemeral containers ignored", pod: appPod(func(p *corev1.Pod) {
			p.Spec.EphemeralContainers = []corev1.EphemeralContainer{{EphemeralContainerCommon: corev1.EphemeralContainerCommon{Name: "debug", Image: "busybox"}}}
		}), apps: []string{"app"}, check: func(t *testing.T, in, out *corev1.Pod) {
			if !reflect.DeepEqual(in.Spec.EphemeralContainers, out.Spec.EphemeralContainers) {
				t.Errorf("ephemeral containers changed")
			}
		}},
		{name: "gateway: only istio-proxy", pod: appPod(func(p *corev1.Pod) {
			p.Spec.Containers = []corev1.Container{{Name: "istio-proxy", Image: "proxyv2"}}
		}), reason: "istio-proxy: Istio's container"},
		{name: "pod's non-root user is kept for the init container", pod: appPod(func(p *corev1.Pod) {
			p.Spec.SecurityContext = &corev1.PodSecurityContext{RunAsUser: ptr.To[int64](2000), RunAsGroup: ptr.To[int64](2000)}
		}), apps: []string{"app"}, check: func(t *testing.T, _, out *corev1.Pod) {
			sc := container(out, api.InitContainerName).SecurityContext
			if sc.RunAsUser != nil || sc.RunAsGroup != nil {
				t.Errorf("init container overrides the pod's user: %+v", sc)
			}
		}},
		{name: "pod running as 1337 does not make the init container 1337", pod: appPod(func(p *corev1.Pod) {
			p.Spec.SecurityContext = &corev1.PodSecurityContext{RunAsUser: ptr.To[int64](1337), RunAsGroup: ptr.To[int64](1337)}
		}), apps: []string{"app"}},
		{name: "envoy metrics off by default", pod: appPod(func(p *corev1.Pod) {
			p.Annotations["prometheus.io/port"], p.Annotations["prometheus.io/path"] = "15020", "/stats/prometheus"
			p.Spec.Containers = append(p.Spec.Containers, corev1.Container{Name: "istio-proxy"})
		}), apps: []string{"app"}, check: func(t *testing.T, _, out *corev1.Pod) {
			if _, ok := out.Annotations[MetricsScrapeAnnotation]; ok {
				t.Error("metrics annotations without envoyMetrics")
			}
		}},
		{name: "envoy metrics from Istio's advertised endpoint", cfg: testConfig(t, func(c *Config) { c.EnvoyMetrics = true }), pod: appPod(func(p *corev1.Pod) {
			p.Annotations["prometheus.io/port"], p.Annotations["prometheus.io/path"] = "15020", "/stats/prometheus"
			p.Spec.Containers = append(p.Spec.Containers, corev1.Container{Name: "istio-proxy"})
		}), apps: []string{"app"}, check: func(t *testing.T, _, out *corev1.Pod) {
			a := out.Annotations
			if a[MetricsScrapeAnnotation] != "true" || a[MetricsPortAnnotation] != "15020" || a[MetricsPathAnnotation] != "/stats/prometheus" {
				t.Errorf("annotations = %v", a)
			}
		}},
		{name: "envoy metrics keep the pod's own", cfg: testConfig(t, func(c *Config) { c.EnvoyMetrics = true }), pod: appPod(func(p *corev1.Pod) {
			p.Annotations["prometheus.io/port"], p.Annotations["prometheus.io/path"] = "15020", "/stats/prometheus"
			p.Annotations[MetricsPortAnnotation] = "9000"
			p.Spec.Containers = append(p.Spec.Containers, corev1.Container{Name: "istio-proxy"})
		}), apps: []string{"app"}, check: func(t *testing.T, _, out *corev1.Pod) {
			if out.Annotations[MetricsPortAnnotation] != "9000" || out.Annotations[MetricsScrapeAnnotation] != "" {
				t.Errorf("annotations = %v", out.Annotations)
			}
		}},
		{name: "windows pod by spec.os", pod: appPod(func(p *corev1.Pod) { p.Spec.OS = &corev1.PodOS{Name: corev1.Windows} }), reason: "Linux nodes only"},
		{name: "windows pod by node selector", pod: appPod(func(p *corev1.Pod) { p.Spec.NodeSelector = map[string]string{"kubernetes.io/os": "windows"} }), reason: "excludes Linux nodes"},
		{name: "linux node selector", pod: appPod(func(p *corev1.Pod) { p.Spec.NodeSelector = map[string]string{"kubernetes.io/os": "linux"} }), apps: []string{"app"}},
		{name: "windows-only required affinity", pod: appPod(func(p *corev1.Pod) {
			p.Spec.Affinity = requiredAffinity(corev1.NodeSelectorTerm{MatchExpressions: []corev1.NodeSelectorRequirement{
				{Key: "kubernetes.io/os", Operator: corev1.NodeSelectorOpIn, Values: []string{"windows"}}}})
		}), reason: "excludes Linux nodes"},
		{name: "affinity NotIn linux", pod: appPod(func(p *corev1.Pod) {
			p.Spec.Affinity = requiredAffinity(corev1.NodeSelectorTerm{MatchExpressions: []corev1.NodeSelectorRequirement{
				{Key: "kubernetes.io/os", Operator: corev1.NodeSelectorOpNotIn, Values: []string{"linux"}}}})
		}), reason: "excludes Linux nodes"},
		{name: "one affinity term admits linux", pod: appPod(func(p *corev1.Pod) {
			p.Spec.Affinity = requiredAffinity(
				corev1.NodeSelectorTerm{MatchExpressions: []corev1.NodeSelectorRequirement{{Key: "kubernetes.io/os", Operator: corev1.NodeSelectorOpIn, Values: []string{"windows"}}}},
				corev1.NodeSelectorTerm{MatchExpressions: []corev1.NodeSelectorRequirement{{Key: "kubernetes.io/os", Operator: corev1.NodeSelectorOpIn, Values: []string{"linux", "windows"}}}})
		}), apps: []string{"app"}},
		{name: "affinity on other labels only", pod: appPod(func(p *corev1.Pod) {
			p.Spec.Affinity = requiredAffinity(corev1.NodeSelectorTerm{MatchExpressions: []corev1.NodeSelectorRequirement{
				{Key: "topology.kubernetes.io/zone", Operator: corev1.NodeSelectorOpIn, Values: []string{"a"}}}})
		}), apps: []string{"app"}},
		{name: "static (mirror) pod", pod: appPod(func(p *corev1.Pod) { p.Annotations["kubernetes.io/config.mirror"] = "abc" }), reason: "static pod"},
		{name: "pod selects only nodes without the driver", cfg: testConfig(t, func(c *Config) { c.NoDriverNodeLabel = "example.com/no-oneagent=true" }),
			pod: appPod(func(p *corev1.Pod) { p.Spec.NodeSelector = map[string]string{"example.com/no-oneagent": "true"} }), reason: "which have no driver"},
		{name: "pod selects another value of the no-driver label", cfg: testConfig(t, func(c *Config) { c.NoDriverNodeLabel = "example.com/no-oneagent=true" }),
			pod: appPod(func(p *corev1.Pod) { p.Spec.NodeSelector = map[string]string{"example.com/no-oneagent": "false"} }), apps: []string{"app"}},
		{name: "affinity requires the no-driver label key", cfg: testConfig(t, func(c *Config) { c.NoDriverNodeLabel = "example.com/gpu-only" }),
			pod: appPod(func(p *corev1.Pod) {
				p.Spec.Affinity = requiredAffinity(corev1.NodeSelectorTerm{MatchExpressions: []corev1.NodeSelectorRequirement{
					{Key: "example.com/gpu-only", Operator: corev1.NodeSelectorOpExists}}})
			}), reason: "which have no driver"},
		{name: "affinity excludes the no-driver label", cfg: testConfig(t, func(c *Config) { c.NoDriverNodeLabel = "example.com/no-oneagent=true" }),
			pod: appPod(func(p *corev1.Pod) {
				p.Spec.Affinity = requiredAffinity(corev1.NodeSelectorTerm{MatchExpressions: []corev1.NodeSelectorRequirement{
					{Key: "example.com/no-oneagent", Operator: corev1.NodeSelectorOpNotIn, Values: []string{"true"}}}})
			}), apps: []string{"app"}},
		{name: "a long invalid annotation gives a short reason", pod: appPod(func(p *corev1.Pod) {
			p.Annotations[api.TenantAnnotation] = strings.Repeat("\u00e9\"x", 20000)
		}), reason: "not a valid tenant name", check: func(t *testing.T, _, out *corev1.Pod) {
			r := out.Annotations[api.ReasonAnnotation]
			if len(r) > 256 || !utf8.ValidString(r) {
				t.Errorf("reason is %d bytes (valid UTF-8: %t), want at most 256", len(r), utf8.ValidString(r))
			}
		}},
		{name: "envoy metrics not for pods outside the mesh", cfg: testConfig(t, func(c *Config) { c.EnvoyMetrics = true }), pod: appPod(),
			apps: []string{"app"}, check: func(t *testing.T, _, out *corev1.Pod) {
				if _, ok := out.Annotations[MetricsScrapeAnnotation]; ok {
					t.Error("metrics annotations on a pod without Istio")
				}
			}},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			c := cfg
			if tc.cfg != nil {
				c = tc.cfg
			}
			req := tc.req
			if req.Namespace == "" {
				req.Namespace = "shop"
			}
			in := tc.pod.DeepCopy()
			out, res := Mutate(tc.pod, req, c)
			if !reflect.DeepEqual(in, tc.pod) {
				t.Fatal("Mutate modified its input")
			}
			switch {
			case tc.apps != nil:
				if !res.Injected || !reflect.DeepEqual(res.Containers, tc.apps) {
					t.Fatalf("result = %+v, want injected into %v", res, tc.apps)
				}
				checkInjected(t, out, c, tc.apps...)
			case tc.reason == "-":
				if res.Injected || out != tc.pod {
					t.Fatalf("pod not selected but result = %+v", res)
				}
			default:
				if res.Injected || !strings.Contains(res.Reason, tc.reason) {
					t.Fatalf("result = %+v, want not injected because of %q", res, tc.reason)
				}
				// Unchanged but for the two annotations.
				want := in.DeepCopy()
				if want.Annotations == nil {
					want.Annotations = map[string]string{}
				}
				want.Annotations[api.InjectedAnnotation], want.Annotations[api.ReasonAnnotation] = "false", res.Reason
				if !reflect.DeepEqual(want, out) {
					t.Fatalf("not injected, but the pod changed beyond the annotations:\n%s", mustJSON(t, out))
				}
			}
			if tc.check != nil {
				tc.check(t, in, out)
			}
			checkPatch(t, in, out)
			// Ours twice = ours once.
			again, res2 := Mutate(out, req, c)
			if !reflect.DeepEqual(mustJSON(t, again), mustJSON(t, out)) || res2.Injected != res.Injected {
				t.Fatalf("second run changed the pod:\nfirst:  %s\nsecond: %s", mustJSON(t, out), mustJSON(t, again))
			}
		})
	}
}

// loadPod reads a fixture: a Pod, or a Deployment's pod template.
func loadPod(t testing.TB, name string) *corev1.Pod {
	t.Helper()
	data, err := os.ReadFile(filepath.Join("testdata", "istio", name))
	if err != nil {
		t.Fatal(err)
	}
	doc := strings.Split(string(data), "\n---")[0]
	var kind struct{ Kind string }
	if err := yaml.Unmarshal([]byte(doc), &kind); err != nil {
		t.Fatal(err)
	}
	switch kind.Kind {
	case "Pod":
		var p corev1.Pod
		if err := yaml.UnmarshalStrict([]byte(doc), &p); err != nil {
			t.Fatalf("%s: %v", name, err)
		}
		return &p
	case "Deployment":
		var d appsv1.Deployment
		if err := yaml.UnmarshalStrict([]byte(doc), &d); err != nil {
			t.Fatalf("%s: %v", name, err)
		}
		return &corev1.Pod{ObjectMeta: d.Spec.Template.ObjectMeta, Spec: d.Spec.Template.Spec}
	}
	t.Fatalf("%s: kind %q", name, kind.Kind)
	return nil
}

// istioParts returns Istio's containers, volumes and annotations as JSON,
// for byte-for-byte comparison.
func istioParts(t testing.TB, p *corev1.Pod) map[string]string {
	out := map[string]string{}
	for _, c := range p.Spec.InitContainers {
		if isIstioContainer(c.Name) {
			out["init/"+c.Name] = string(mustJSON(t, c))
		}
	}
	for _, c := range p.Spec.Containers {
		if isIstioContainer(c.Name) {
			out["container/"+c.Name] = string(mustJSON(t, c))
		}
	}
	for _, v := range p.Spec.Volumes {
		if v.Name != api.AgentVolumeName && v.Name != api.ConfigVolumeName {
			out["volume/"+v.Name] = string(mustJSON(t, v))
		}
	}
	for k, v := range p.Annotations {
		if strings.Contains(k, "istio.io") || strings.HasPrefix(k, "prometheus.io/") || strings.HasPrefix(k, "kubectl.kubernetes.io/") {
			out["annotation/"+k] = v
		}
	}
	for k, v := range p.Labels {
		out["label/"+k] = v
	}
	return out
}

func TestShortDuration(t *testing.T) {
	for d, want := range map[time.Duration]string{10 * time.Minute: "10m", time.Hour: "1h", 90 * time.Second: "1m30s", 30 * time.Second: "30s", 2*time.Hour + 5*time.Minute: "2h5m"} {
		if got := shortDuration(d); got != want {
			t.Errorf("shortDuration(%v) = %q, want %q", d, got, want)
		}
	}
}

func TestMutateIstioFixtures(t *testing.T) {
	for _, by := range []ContainerConfig{ContainerConfigInit, ContainerConfigDriver} {
		t.Run(string(by), func(t *testing.T) {
			testMutateIstioFixtures(t, testConfig(t, func(c *Config) { c.EnvoyMetrics, c.ContainerConfig = true, by }))
		})
	}
}

func testMutateIstioFixtures(t *testing.T, cfg *Config) {
	tests := []struct {
		file string
		// init containers after our run, by name
		inits []string
	}{
		{"a-classic-sidecar.yaml", []string{api.InitContainerName, "istio-init"}},
		{"a-classic-sidecar-deployment.yaml", []string{api.InitContainerName, "istio-init"}},
		{"b-native-sidecar.yaml", []string{"istio-init", "istio-proxy", api.InitContainerName}},
		{"c-cni-classic.yaml", []string{"istio-validation", api.InitContainerName}},
		{"d-hold-application.yaml", []string{api.InitContainerName, "istio-init"}},
		{"e-dynatrace-then-istio-classic.yaml", []string{api.InitContainerName, "istio-init"}},
		{"e-dynatrace-then-istio-native.yaml", []string{"istio-init", "istio-proxy", api.InitContainerName}},
		{"e-dynatrace-then-istio-cni-classic.yaml", []string{"istio-validation", api.InitContainerName}},
		{"g-classic-reinjected.yaml", []string{api.InitContainerName, "istio-init"}},
	}
	for _, tc := range tests {
		t.Run(tc.file, func(t *testing.T) {
			in := loadPod(t, tc.file)
			if in.Annotations[api.InjectedAnnotation] != "true" {
				in.Annotations[api.InjectAnnotation] = "true"
			}
			out, res := Mutate(in, Request{Namespace: "demo"}, cfg)
			if !res.Injected || !reflect.DeepEqual(res.Containers, []string{"myapp"}) {
				t.Fatalf("result = %+v", res)
			}
			checkInjected(t, out, cfg, "myapp")
			wantInits := tc.inits
			if cfg.ContainerConfig == ContainerConfigDriver {
				wantInits = slices.DeleteFunc(slices.Clone(wantInits), func(n string) bool { return n == api.InitContainerName })
			}
			if got := initNames(out); !reflect.DeepEqual(got, wantInits) {
				t.Errorf("init containers = %v, want %v", got, wantInits)
			}
			if !reflect.DeepEqual(istioParts(t, in), istioParts(t, out)) {
				t.Errorf("Istio's parts changed")
			}
			// The app container: only our mounts and env were added.
			before := &corev1.Pod{Spec: corev1.PodSpec{Containers: []corev1.Container{*container(in, "myapp").DeepCopy()}}}
			after := &corev1.Pod{Spec: corev1.PodSpec{Containers: []corev1.Container{*container(out, "myapp").DeepCopy()}}}
			strip(before)
			strip(after)
			stripPreload(before)
			stripPreload(after)
			if b, a := mustJSON(t, before.Spec.Containers[0]), mustJSON(t, after.Spec.Containers[0]); string(b) != string(a) {
				t.Errorf("app container changed beyond our mounts and env\nbefore: %s\nafter:  %s", b, a)
			}
			a := out.Annotations
			if a[MetricsScrapeAnnotation] != "true" || a[MetricsPortAnnotation] != in.Annotations["prometheus.io/port"] || a[MetricsPathAnnotation] != in.Annotations["prometheus.io/path"] {
				t.Errorf("envoy metrics annotations = %v", a)
			}
			checkPatch(t, in, out)
			again, _ := Mutate(out, Request{Namespace: "demo"}, cfg)
			if !reflect.DeepEqual(mustJSON(t, again), mustJSON(t, out)) {
				t.Errorf("second run changed the pod")
			}
		})
	}
}

// TestMutateOrderIndependent compares "Istio, then ours" (ours on an Istio
// fixture) with "ours, then Istio, then ours again" (ours on the e-*
// fixtures, where Istio ran on an already injected pod; the API server
// re-invokes ours because reinvocationPolicy is IfNeeded): the pods must be
// identical.
func TestMutateOrderIndependent(t *testing.T) {
	for _, by := range []ContainerConfig{ContainerConfigInit, ContainerConfigDriver} {
		t.Run(string(by), func(t *testing.T) {
			testMutateOrderIndependent(t, testConfig(t, func(c *Config) { c.ContainerConfig = by }))
		})
	}
}

func testMutateOrderIndependent(t *testing.T, cfg *Config) {
	for _, pair := range [][2]string{
		{"a-classic-sidecar.yaml", "e-dynatrace-then-istio-classic.yaml"},
		{"b-native-sidecar.yaml", "e-dynatrace-then-istio-native.yaml"},
		{"c-cni-classic.yaml", "e-dynatrace-then-istio-cni-classic.yaml"},
	} {
		t.Run(pair[0], func(t *testing.T) {
			istioFirst := loadPod(t, pair[0])
			istioFirst.Annotations[api.InjectAnnotation] = "true"
			oursFirst := loadPod(t, pair[1])
			oursFirst.Annotations[api.InjectAnnotation] = "true"
			a, _ := Mutate(istioFirst, Request{Namespace: "demo"}, cfg)
			b, _ := Mutate(oursFirst, Request{Namespace: "demo"}, cfg)
			if ja, jb := mustJSON(t, a), mustJSON(t, b); string(ja) != string(jb) {
				t.Fatalf("results differ by order\nistio first: %s\nours first:  %s", ja, jb)
			}
		})
	}
}

func TestMutateContainerConfig(t *testing.T) {
	twoApps := func(p *corev1.Pod) {
		p.Spec.Containers = append(p.Spec.Containers, corev1.Container{Name: "cart", Image: "example/cart@sha256:ab"},
			corev1.Container{Name: "istio-proxy", Image: "istio/proxyv2:1.24.0"})
	}
	tests := []struct {
		name       string
		config     ContainerConfig
		annotation map[string]string
		want       ContainerConfig
		attr       string
		reason     string
	}{
		{"default is the init container", "", nil, ContainerConfigInit, "", ""},
		{"driver by config", ContainerConfigDriver, nil, ContainerConfigDriver, "app=example/app:1.0,cart=example/cart@sha256:ab", ""},
		{"driver by annotation", ContainerConfigInit, map[string]string{ContainerConfigAnnotation: "driver"}, ContainerConfigDriver,
			"app=example/app:1.0,cart=example/cart@sha256:ab", ""},
		{"init by annotation", ContainerConfigDriver, map[string]string{ContainerConfigAnnotation: "init"}, ContainerConfigInit, "", ""},
		{"failure policy fail needs the init container", ContainerConfigDriver, map[string]string{FailurePolicyAnnotation: "fail"},
			ContainerConfigInit, "", ""},
		{"bad annotation", ContainerConfigDriver, map[string]string{ContainerConfigAnnotation: "sidecar"}, "", "",
			`annotation oneagent.dynatrace.com/container-config: "sidecar" is not init or driver`},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			cfg := testConfig(t, func(c *Config) { c.ContainerConfig = tc.config })
			pod := appPod(twoApps, func(p *corev1.Pod) {
				for k, v := range tc.annotation {
					p.Annotations[k] = v
				}
			})
			out, res := Mutate(pod, Request{Namespace: "shop"}, cfg)
			if tc.reason != "" {
				if res.Injected || out.Annotations[api.ReasonAnnotation] != tc.reason {
					t.Fatalf("result %+v, reason %q; want not injected: %s", res, out.Annotations[api.ReasonAnnotation], tc.reason)
				}
				return
			}
			if !res.Injected || res.ContainerConfig != tc.want {
				t.Fatalf("result %+v, want injected with container config %s", res, tc.want)
			}
			checkInjected(t, out, cfg, "app", "cart")
			var attr string
			for _, v := range out.Spec.Volumes {
				if v.Name == api.AgentVolumeName {
					attr = v.CSI.VolumeAttributes[api.AttrContainers]
				}
			}
			if attr != tc.attr {
				t.Errorf("containers attribute %q, want %q", attr, tc.attr)
			}
			checkPatch(t, pod, out)
			again, _ := Mutate(out, Request{Namespace: "shop"}, cfg)
			if !reflect.DeepEqual(mustJSON(t, again), mustJSON(t, out)) {
				t.Errorf("second run changed the pod")
			}
		})
	}
	// A pod injected one way and re-invoked after the config changed ends
	// up exactly as if it had been injected the new way.
	for _, from := range []ContainerConfig{ContainerConfigInit, ContainerConfigDriver} {
		to := ContainerConfigDriver
		if from == to {
			to = ContainerConfigInit
		}
		t.Run("re-invoked from "+string(from)+" to "+string(to), func(t *testing.T) {
			first, _ := Mutate(appPod(twoApps), Request{Namespace: "shop"}, testConfig(t, func(c *Config) { c.ContainerConfig = from }))
			cfg := testConfig(t, func(c *Config) { c.ContainerConfig = to })
			switched, _ := Mutate(first, Request{Namespace: "shop"}, cfg)
			direct, _ := Mutate(appPod(twoApps), Request{Namespace: "shop"}, cfg)
			if a, b := mustJSON(t, switched), mustJSON(t, direct); string(a) != string(b) {
				t.Fatalf("switched:\n%s\ndirect:\n%s", a, b)
			}
			checkPatch(t, first, switched)
		})
	}
	t.Run("config value", func(t *testing.T) {
		c := Config{InitImage: "x", ContainerConfig: "sidecar"}
		if err := c.Complete(); err == nil || !strings.Contains(err.Error(), "containerConfig") {
			t.Fatalf("err = %v, want one naming containerConfig", err)
		}
	})
}

func TestContainerConfigFor(t *testing.T) {
	many := make([]api.Container, api.MaxContainers+1)
	for i := range many {
		many[i] = api.Container{Name: fmt.Sprintf("c%d", i), Image: "img"}
	}
	ok := []api.Container{{Name: "app", Image: "example/app:1"}}
	tests := []struct {
		name    string
		asked   ContainerConfig
		policy  FailurePolicy
		targets []api.Container
		want    ContainerConfig
	}{
		{"driver", ContainerConfigDriver, FailureSilent, ok, ContainerConfigDriver},
		{"init", ContainerConfigInit, FailureSilent, ok, ContainerConfigInit},
		{"fail policy", ContainerConfigDriver, FailureFail, ok, ContainerConfigInit},
		{"too many containers", ContainerConfigDriver, FailureSilent, many, ContainerConfigInit},
		{"image the attribute cannot carry", ContainerConfigDriver, FailureSilent, []api.Container{{Name: "app", Image: "a,b"}}, ContainerConfigInit},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			if got := containerConfigFor(tc.asked, tc.policy, tc.targets); got != tc.want {
				t.Fatalf("got %s, want %s", got, tc.want)
			}
		})
	}
}
