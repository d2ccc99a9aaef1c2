// Package injector is the mutating admission webhook that wires pods for the
// OneAgent code module (shared/DESIGN.md §5): Mutate is a pure function over
// a pod; Server adapts it to admission.k8s.io/v1 over HTTPS.
package injector

import (
	"fmt"
	"slices"
	"strings"
	"time"

	corev1 "k8s.io/api/core/v1"
	"k8s.io/utils/ptr"

	"github.com/oneagent-csi/oneagent-csi/api"
)

// Names the injector adds to pods besides those in package api.
const (
	// InitConfigMountPath is where the init container sees oneagent-config.
	InitConfigMountPath = "/mnt/config"
	// LDPreloadEnv is the variable that loads the agent into processes.
	LDPreloadEnv = "LD_PRELOAD"
	// DeploymentMetadataEnv tells the agent how it was deployed.
	DeploymentMetadataEnv = "DT_DEPLOYMENT_METADATA"
)

// Metrics annotations read by Dynatrace's Prometheus scraping.
const (
	metricsAnnotationPrefix = "metrics.dynatrace.com/"
	MetricsScrapeAnnotation = metricsAnnotationPrefix + "scrape"
	MetricsPortAnnotation   = metricsAnnotationPrefix + "port"
	MetricsPathAnnotation   = metricsAnnotationPrefix + "path"
)

// Istio's names (shared/notes/istio.md): never modified, never used.
var istioContainers = []string{"istio-proxy", "istio-init", "istio-validation", "enable-core-dump"}

func isIstioContainer(name string) bool { return slices.Contains(istioContainers, name) }

// Request is what Mutate needs to know besides the pod.
type Request struct {
	// Namespace of the pod: the admission request's, because pod.Namespace
	// may still be empty when the pod is created.
	Namespace string
	// NamespaceOptIn is true when the namespace carries the label
	// oneagent.dynatrace.com/inject=true. The webhook knows it from which
	// of its two entries the API server called (README, "Injector").
	NamespaceOptIn bool
}

// Result says what Mutate decided.
type Result struct {
	// Injected is true when the returned pod carries the agent.
	Injected bool
	// Reason explains why not (empty when injected or not selected at all).
	Reason string
	// Containers are the app containers that got the agent.
	Containers []string
	// Skipped are app containers left alone, with the reason for each.
	Skipped map[string]string
	// ContainerConfig is who writes the containers' container.conf in the
	// injected pod.
	ContainerConfig ContainerConfig
}

// Mutate returns a copy of pod wired for the code module, or the pod itself
// (unchanged) when the pod is not selected. It never modifies its input.
//
// Mutate is idempotent and independent of Istio's injector: it first removes
// everything an earlier run of its own added (recognised by its names and
// the injected annotation, never by Istio's status annotation), then adds it
// again, so running it twice gives the same pod, and it places its init
// container by a rule that gives the same order whether Istio's injector ran
// before or after (placeInit).
func Mutate(pod *corev1.Pod, req Request, cfg *Config) (*corev1.Pod, Result) {
	ann := pod.Annotations
	if slices.Contains(cfg.IgnoredNamespaces, req.Namespace) {
		return pod, Result{Reason: fmt.Sprintf("namespace %s is ignored", req.Namespace)}
	}
	ours := ann[api.InjectedAnnotation] == "true"
	if !req.NamespaceOptIn && ann[api.InjectAnnotation] != "true" && !ours {
		return pod, Result{Reason: "not opted in"}
	}

	out := pod.DeepCopy()
	if ours {
		strip(out)
	}
	notInjected := func(format string, a ...any) (*corev1.Pod, Result) {
		if ours {
			stripPreload(out)
		}
		reason := boundReason(fmt.Sprintf(format, a...))
		setAnnotation(out, api.InjectedAnnotation, "false")
		setAnnotation(out, api.ReasonAnnotation, reason)
		return out, Result{Reason: reason}
	}
	if v := ann[api.InjectAnnotation]; v == "false" {
		return notInjected("pod annotation %s is \"false\"", api.InjectAnnotation)
	}
	if v := ann[api.LegacyInjectAnnotation]; v == "false" {
		return notInjected("pod annotation %s is \"false\"", api.LegacyInjectAnnotation)
	}
	if !ours {
		if c := conflict(pod); c != "" {
			// Left exactly as it was, but for saying why.
			return notInjected("%s", c)
		}
	}

	if why := unservable(pod, cfg); why != "" {
		return notInjected("%s", why)
	}

	tenant := firstNonEmpty(ann[api.TenantAnnotation], cfg.DefaultTenant)
	switch {
	case tenant == "":
		return notInjected("no tenant: set annotation %s or the injector's defaultTenant", api.TenantAnnotation)
	case !api.ValidTenantName(tenant):
		return notInjected("annotation %s: %s is not a valid tenant name", api.TenantAnnotation, quoteShort(tenant))
	}
	version := firstNonEmpty(ann[api.VersionAnnotation], cfg.DefaultVersion)
	if version != "" && !api.ValidVersion(version) {
		return notInjected("annotation %s: %s is not a valid version", api.VersionAnnotation, quoteShort(version))
	}
	policy := FailurePolicy(firstNonEmpty(ann[FailurePolicyAnnotation], string(cfg.FailurePolicy)))
	if policy != FailureSilent && policy != FailureFail {
		return notInjected("annotation %s: %s is not silent or fail", FailurePolicyAnnotation, quoteShort(string(policy)))
	}
	confBy := ContainerConfig(firstNonEmpty(ann[ContainerConfigAnnotation], string(cfg.ContainerConfig)))
	if confBy != ContainerConfigInit && confBy != ContainerConfigDriver {
		return notInjected("annotation %s: %s is not init or driver", ContainerConfigAnnotation, quoteShort(string(confBy)))
	}

	res := Result{Skipped: map[string]string{}}
	var apps []int
	for i := range out.Spec.Containers {
		c := &out.Spec.Containers[i]
		if reason := skipContainer(out, c, cfg); reason != "" {
			res.Skipped[c.Name] = reason
			continue
		}
		apps = append(apps, i)
	}
	if len(apps) == 0 {
		if len(res.Skipped) == 0 {
			return notInjected("pod has no containers")
		}
		names := make([]string, 0, len(res.Skipped))
		for n, why := range res.Skipped {
			names = append(names, n+": "+why)
		}
		slices.Sort(names)
		return notInjected("no app container to inject (%s)", strings.Join(names, "; "))
	}

	var targets []api.Container
	for _, i := range apps {
		c := &out.Spec.Containers[i]
		targets = append(targets, api.Container{Name: c.Name, Image: c.Image})
	}
	confBy = containerConfigFor(confBy, policy, targets)
	vol := agentVolume(cfg, tenant, version)
	if confBy == ContainerConfigDriver {
		vol.CSI.VolumeAttributes[api.AttrContainers] = api.FormatContainers(targets)
	}
	out.Spec.Volumes = append(out.Spec.Volumes, vol, configVolume(cfg))
	for _, i := range apps {
		c := &out.Spec.Containers[i]
		injectContainer(c, cfg, confBy)
		res.Containers = append(res.Containers, c.Name)
	}
	res.ContainerConfig = confBy
	if confBy == ContainerConfigInit {
		placeInit(out, initContainer(out, cfg, policy, targets))
	}
	delete(out.Annotations, api.ReasonAnnotation)
	setAnnotation(out, api.InjectedAnnotation, "true")
	if cfg.EnvoyMetrics {
		addEnvoyMetrics(out)
	}
	res.Injected = true
	if len(res.Skipped) == 0 {
		res.Skipped = nil
	}
	return out, res
}

// conflict names a volume or container of the pod that has one of our
// names although we did not inject the pod.
func conflict(pod *corev1.Pod) string {
	for _, v := range pod.Spec.Volumes {
		if v.Name == api.AgentVolumeName || v.Name == api.ConfigVolumeName {
			return fmt.Sprintf("pod already has a volume named %s", v.Name)
		}
	}
	for _, list := range [][]corev1.Container{pod.Spec.InitContainers, pod.Spec.Containers} {
		for _, c := range list {
			if c.Name == api.InitContainerName {
				return fmt.Sprintf("pod already has a container named %s", c.Name)
			}
		}
	}
	return ""
}

// skipContainer says why an app container does not get the agent, or "".
func skipContainer(pod *corev1.Pod, c *corev1.Container, cfg *Config) string {
	if isIstioContainer(c.Name) {
		return "Istio's container"
	}
	if pod.Annotations[api.ContainerInjectPrefix+c.Name] == "false" {
		return fmt.Sprintf("annotation %s%s is \"false\"", api.ContainerInjectPrefix, c.Name)
	}
	for _, e := range c.Env {
		if e.Name == LDPreloadEnv && e.ValueFrom != nil {
			return "LD_PRELOAD comes from valueFrom and cannot be appended to"
		}
	}
	for _, m := range c.VolumeMounts {
		if m.MountPath == cfg.InstallPath || m.MountPath == api.ConfigMountPath {
			return fmt.Sprintf("volume %s is already mounted at %s", m.Name, m.MountPath)
		}
	}
	return ""
}

func agentVolume(cfg *Config, tenant, version string) corev1.Volume {
	attrs := map[string]string{
		api.AttrMode:         string(api.ModeApp),
		api.AttrDynakube:     tenant,
		api.AttrRetryTimeout: shortDuration(cfg.RetryTimeout.Duration),
	}
	if version != "" {
		attrs[api.AttrVersion] = version
	}
	return corev1.Volume{Name: api.AgentVolumeName, VolumeSource: corev1.VolumeSource{CSI: &corev1.CSIVolumeSource{
		Driver: cfg.DriverName, ReadOnly: ptr.To(true), VolumeAttributes: attrs,
	}}}
}

// shortDuration writes 10m rather than time.Duration's 10m0s.
func shortDuration(d time.Duration) string {
	s := d.String()
	if strings.HasSuffix(s, "m0s") {
		s = strings.TrimSuffix(s, "0s")
	}
	if strings.HasSuffix(s, "h0m") {
		s = strings.TrimSuffix(s, "0m")
	}
	return s
}

func configVolume(cfg *Config) corev1.Volume {
	q := cfg.ConfigSizeLimit.DeepCopy()
	return corev1.Volume{Name: api.ConfigVolumeName, VolumeSource: corev1.VolumeSource{EmptyDir: &corev1.EmptyDirVolumeSource{SizeLimit: &q}}}
}

// containerConfigFor decides who writes the containers' container.conf:
// the driver only when asked to and able to. The init container is what
// stops a pod whose failure policy is fail, and the volume attribute holds
// at most api.MaxContainers entries of images it can carry.
func containerConfigFor(asked ContainerConfig, policy FailurePolicy, targets []api.Container) ContainerConfig {
	if asked != ContainerConfigDriver || policy == FailureFail || len(targets) > api.MaxContainers {
		return ContainerConfigInit
	}
	for _, t := range targets {
		if !api.ValidImage(t.Image) {
			return ContainerConfigInit
		}
	}
	return ContainerConfigDriver
}

// injectContainer adds the mounts and environment to one app container.
func injectContainer(c *corev1.Container, cfg *Config, confBy ContainerConfig) {
	c.VolumeMounts = append(c.VolumeMounts,
		corev1.VolumeMount{Name: api.AgentVolumeName, MountPath: cfg.InstallPath, ReadOnly: true},
		corev1.VolumeMount{Name: api.ConfigVolumeName, MountPath: api.ConfigMountPath, SubPath: c.Name},
	)
	if confBy == ContainerConfigDriver {
		// The driver writes the file into the volume; kubelet mounts it
		// over the spot in the container's writable slice where the init
		// container would have written it.
		c.VolumeMounts = append(c.VolumeMounts, corev1.VolumeMount{Name: api.AgentVolumeName,
			MountPath: api.ContainerConfMountPath, SubPath: api.ContainerConfRelativePath(c.Name), ReadOnly: true})
	}
	// What the user wrote stays where it is: LD_PRELOAD gets our library
	// appended in place (once), and a DT_DEPLOYMENT_METADATA of the user's
	// own is kept as it is.
	lib := agentLibrary(cfg)
	preload, metadata := false, false
	for i := range c.Env {
		switch c.Env[i].Name {
		case LDPreloadEnv:
			c.Env[i].Value = appendPreload(c.Env[i].Value, lib)
			preload = true
		case DeploymentMetadataEnv:
			if isOurMetadata(c.Env[i]) {
				c.Env[i].Value = deploymentMetadata(cfg)
			}
			metadata = true
		}
	}
	if !preload {
		c.Env = append(c.Env, corev1.EnvVar{Name: LDPreloadEnv, Value: lib})
	}
	if !metadata {
		c.Env = append(c.Env, corev1.EnvVar{Name: DeploymentMetadataEnv, Value: deploymentMetadata(cfg)})
	}
}

// metadataPrefix starts every DT_DEPLOYMENT_METADATA this injector writes.
const metadataPrefix = "orchestration_tech=oneagent-csi;"

func isOurMetadata(e corev1.EnvVar) bool {
	return e.ValueFrom == nil && strings.HasPrefix(e.Value, metadataPrefix)
}

func agentLibrary(cfg *Config) string {
	return strings.TrimSuffix(cfg.InstallPath, "/") + "/" + api.AgentLibraryRelativePath
}

func deploymentMetadata(cfg *Config) string {
	return fmt.Sprintf("%sscript_version=%s;orchestrator_id=%s", metadataPrefix, firstNonEmpty(cfg.Version, "dev"), cfg.ClusterID)
}

// appendPreload appends lib to an LD_PRELOAD value (space separated, as the
// dynamic loader accepts) unless it is already there.
func appendPreload(value, lib string) string {
	if slices.Contains(strings.FieldsFunc(value, isPreloadSep), lib) {
		return value
	}
	if strings.TrimSpace(value) == "" {
		return lib
	}
	return value + " " + lib
}

func isPreloadSep(r rune) bool { return r == ' ' || r == ':' || r == '\t' }

func initContainer(pod *corev1.Pod, cfg *Config, policy FailurePolicy, targets []api.Container) corev1.Container {
	args := []string{"init",
		"--install-path=" + cfg.InstallPath,
		"--config-dir=" + InitConfigMountPath,
		"--failure-policy=" + string(policy),
	}
	for _, t := range targets {
		args = append(args, "--container="+t.Name+"="+t.Image)
	}
	// Fields the API server would default are set as it sets them, so that
	// a reinvocation on the stored pod finds nothing to change.
	field := func(name, path string) corev1.EnvVar {
		return corev1.EnvVar{Name: name, ValueFrom: &corev1.EnvVarSource{FieldRef: &corev1.ObjectFieldSelector{APIVersion: "v1", FieldPath: path}}}
	}
	sc := &corev1.SecurityContext{
		AllowPrivilegeEscalation: ptr.To(false),
		Privileged:               ptr.To(false),
		ReadOnlyRootFilesystem:   ptr.To(true),
		RunAsNonRoot:             ptr.To(true),
		Capabilities:             &corev1.Capabilities{Drop: []corev1.Capability{"ALL"}},
		SeccompProfile:           &corev1.SeccompProfile{Type: corev1.SeccompProfileTypeRuntimeDefault},
	}
	// Use the pod's own non-root user when it has one; otherwise ours. Never
	// Istio's 1337, whose traffic iptables lets bypass the proxy.
	// With initUser: inherit the platform assigns it (OpenShift).
	psc := pod.Spec.SecurityContext
	if !cfg.InitUserInherit && (psc == nil || psc.RunAsUser == nil || *psc.RunAsUser == 0 || *psc.RunAsUser == 1337) {
		sc.RunAsUser = ptr.To(cfg.InitUser)
	}
	if !cfg.InitUserInherit && (psc == nil || psc.RunAsGroup == nil || *psc.RunAsGroup == 1337) {
		sc.RunAsGroup = ptr.To(cfg.InitUser)
	}
	return corev1.Container{
		Name:            api.InitContainerName,
		Image:           cfg.InitImage,
		ImagePullPolicy: cfg.InitImagePullPolicy,
		Args:            args,
		Env: []corev1.EnvVar{
			field("K8S_PODNAME", "metadata.name"),
			field("K8S_PODUID", "metadata.uid"),
			field("K8S_NAMESPACE", "metadata.namespace"),
			field("K8S_NODE_NAME", "spec.nodeName"),
		},
		Resources:                *cfg.InitResources.DeepCopy(),
		SecurityContext:          sc,
		TerminationMessagePath:   corev1.TerminationMessagePathDefault,
		TerminationMessagePolicy: corev1.TerminationMessageReadFile,
		VolumeMounts: []corev1.VolumeMount{
			{Name: api.AgentVolumeName, MountPath: cfg.InstallPath, ReadOnly: true},
			{Name: api.ConfigVolumeName, MountPath: InitConfigMountPath},
		},
	}
}

// placeInit adds the init container where it ends up the same whichever of
// Istio's injector and ours runs first (shared/notes/istio.md):
//   - native sidecars (istio-proxy is an init container, put at the front by
//     Istio): append, so our container runs with the proxy up;
//   - classic mode (Istio moves istio-init, and enable-core-dump, to the end):
//     insert before that tail, so our container runs before the iptables
//     redirect, which it does not need anyway;
//   - istio-cni (istio-validation is moved to the front) or no Istio: append.
//
// Our init container needs no network, so wherever it runs, the redirect
// and mTLS cannot break it.
func placeInit(pod *corev1.Pod, c corev1.Container) {
	inits := pod.Spec.InitContainers
	for _, ic := range inits {
		if ic.Name == "istio-proxy" {
			pod.Spec.InitContainers = append(inits, c)
			return
		}
	}
	at := len(inits)
	for at > 0 && (inits[at-1].Name == "istio-init" || inits[at-1].Name == "enable-core-dump") {
		at--
	}
	pod.Spec.InitContainers = slices.Insert(inits, at, c)
}

// addEnvoyMetrics points Dynatrace's Prometheus scraping at Istio's merged
// metrics endpoint of a meshed pod that has no metrics.dynatrace.com/*
// annotations of its own.
func addEnvoyMetrics(pod *corev1.Pod) {
	for k := range pod.Annotations {
		if strings.HasPrefix(k, metricsAnnotationPrefix) {
			return
		}
	}
	port, path := pod.Annotations["prometheus.io/port"], pod.Annotations["prometheus.io/path"]
	if port == "" || path == "" {
		// Istio did not advertise a merged endpoint: use Envoy's own port.
		port, path = "", ""
		for _, list := range [][]corev1.Container{pod.Spec.InitContainers, pod.Spec.Containers} {
			for _, c := range list {
				if c.Name != "istio-proxy" {
					continue
				}
				for _, p := range c.Ports {
					if p.Name == "http-envoy-prom" {
						port, path = fmt.Sprint(p.ContainerPort), "/stats/prometheus"
					}
				}
			}
		}
	}
	if port == "" {
		return // not meshed (yet: a later run after Istio's adds them)
	}
	setAnnotation(pod, MetricsScrapeAnnotation, "true")
	setAnnotation(pod, MetricsPortAnnotation, port)
	setAnnotation(pod, MetricsPathAnnotation, path)
}

// strip removes everything an earlier run of Mutate added, except metrics
// annotations (kept: they may as well be the pod's own).
func strip(pod *corev1.Pod) {
	pod.Spec.Volumes = slices.DeleteFunc(pod.Spec.Volumes, func(v corev1.Volume) bool {
		return v.Name == api.AgentVolumeName || v.Name == api.ConfigVolumeName
	})
	pod.Spec.InitContainers = slices.DeleteFunc(pod.Spec.InitContainers, func(c corev1.Container) bool {
		return c.Name == api.InitContainerName
	})
	for i := range pod.Spec.Containers {
		c := &pod.Spec.Containers[i]
		if isIstioContainer(c.Name) {
			continue
		}
		c.VolumeMounts = slices.DeleteFunc(c.VolumeMounts, func(m corev1.VolumeMount) bool {
			return m.Name == api.AgentVolumeName || m.Name == api.ConfigVolumeName
		})
		// LD_PRELOAD is left alone: a user's may equal ours, and moving
		// it would break variables that refer to it. Injecting again
		// appends nothing twice (stripPreload undoes it when a pod ends up
		// not injected).
		c.Env = slices.DeleteFunc(c.Env, func(e corev1.EnvVar) bool {
			return e.Name == DeploymentMetadataEnv && isOurMetadata(e)
		})
		if len(c.VolumeMounts) == 0 {
			c.VolumeMounts = nil
		}
		if len(c.Env) == 0 {
			c.Env = nil
		}
	}
	if len(pod.Spec.InitContainers) == 0 {
		pod.Spec.InitContainers = nil
	}
	if len(pod.Spec.Volumes) == 0 {
		pod.Spec.Volumes = nil
	}
	delete(pod.Annotations, api.InjectedAnnotation)
	delete(pod.Annotations, api.ReasonAnnotation)
}

// stripPreload removes our library from the app containers' LD_PRELOAD of a
// pod an earlier run injected and this run does not: our own variable
// (exactly our library) goes, an appended one is cut off.
func stripPreload(pod *corev1.Pod) {
	for i := range pod.Spec.Containers {
		c := &pod.Spec.Containers[i]
		if isIstioContainer(c.Name) {
			continue
		}
		c.Env = slices.DeleteFunc(c.Env, func(e corev1.EnvVar) bool {
			return e.Name == LDPreloadEnv && e.ValueFrom == nil && strings.HasSuffix(e.Value, "/"+api.AgentLibraryRelativePath) &&
				!strings.ContainsFunc(e.Value, isPreloadSep)
		})
		for j := range c.Env {
			if c.Env[j].Name == LDPreloadEnv && c.Env[j].ValueFrom == nil {
				if k := strings.LastIndexFunc(c.Env[j].Value, isPreloadSep); k >= 0 && strings.HasSuffix(c.Env[j].Value, "/"+api.AgentLibraryRelativePath) {
					c.Env[j].Value = c.Env[j].Value[:k]
				}
			}
		}
		if len(c.Env) == 0 {
			c.Env = nil
		}
	}
}

func setAnnotation(pod *corev1.Pod, k, v string) {
	if pod.Annotations == nil {
		pod.Annotations = map[string]string{}
	}
	pod.Annotations[k] = v
}

func firstNonEmpty(a ...string) string {
	for _, s := range a {
		if s != "" {
			return s
		}
	}
	return ""
}
