package troubleshoot

import (
	"fmt"
	"slices"
	"strings"

	corev1 "k8s.io/api/core/v1"
	networkingv1 "k8s.io/api/networking/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/labels"

	"github.com/oneagent-csi/oneagent-csi/api"
	"github.com/oneagent-csi/oneagent-csi/storage"
)

// Namespace checks the pods of s.Namespace (all of s.Pods): opted in,
// injected or why not, mount failures, and network policies that keep the
// agent from its tenant.
func Namespace(s Snapshot) []Result {
	s.Install.defaults()
	if s.Namespace == nil {
		return nil
	}
	ns := s.Namespace.Name
	var rs []Result
	optedIn := s.Namespace.Labels[api.InjectLabel] == "true"
	if excluded := excludedBy(s, ns); excluded != "" {
		rs = append(rs, fail("namespace", ns, "the webhook never sees pods here: "+excluded, "use another namespace; the ignored ones are never injected"))
	} else if optedIn {
		rs = append(rs, ok("namespace", ns, "labelled "+api.InjectLabel+"=true: new pods are injected"))
	} else {
		rs = append(rs, warn("namespace", ns, "not labelled "+api.InjectLabel+"=true: only pods annotated "+api.InjectAnnotation+": \"true\" are injected",
			"kubectl label namespace "+ns+" "+api.InjectLabel+"=true (then recreate the pods)"))
	}
	for _, p := range s.Pods {
		rs = append(rs, checkPod(s, p, optedIn)...)
	}
	return rs
}

// excludedBy says which webhook rule keeps ns out, if one does.
func excludedBy(s Snapshot, ns string) string {
	if s.Webhook == nil {
		return ""
	}
	for _, h := range s.Webhook.Webhooks {
		if h.NamespaceSelector == nil {
			continue
		}
		for _, e := range h.NamespaceSelector.MatchExpressions {
			if e.Key == "kubernetes.io/metadata.name" && e.Operator == metav1.LabelSelectorOpNotIn && slices.Contains(e.Values, ns) {
				return "it is in the webhook's ignored namespaces"
			}
		}
	}
	return ""
}

func checkPod(s Snapshot, p corev1.Pod, optedIn bool) []Result {
	subject := p.Namespace + "/" + p.Name
	var rs []Result
	switch p.Annotations[api.InjectedAnnotation] {
	case "true":
		rs = append(rs, ok("pod-injected", subject, "injected"))
	case "false":
		rs = append(rs, warn("pod-injected", subject, "not injected: "+p.Annotations[api.ReasonAnnotation],
			"see README, \"The injector\", for the reason"))
	default:
		if optedIn || p.Annotations[api.InjectAnnotation] == "true" {
			rs = append(rs, fail("pod-injected", subject, "the injector never saw this pod: it was created before the install or the label, or while the webhook was unreachable",
				"recreate it (kubectl rollout restart of its owner); if new pods are missed too, see the webhook checks"))
		}
	}
	for _, e := range s.Events {
		if e.InvolvedObject.Kind == "Pod" && e.InvolvedObject.Name == p.Name && e.Reason == "FailedMount" &&
			(strings.Contains(e.Message, s.Install.DriverName) || strings.Contains(e.Message, "\""+api.AgentVolumeName+"\"")) {
			rs = append(rs, fail("pod-mount", subject, fmt.Sprintf("FailedMount (%d×): %s", max(e.Count, 1), e.Message),
				"the driver on node "+p.Spec.NodeName+": its log, and `oneagent-csi cache volumes` in its pod"))
			break
		}
	}
	if p.Annotations[api.InjectedAnnotation] == "true" {
		if r, checked := checkContainerConf(p); checked {
			rs = append(rs, r)
		}
		if r, checked := checkVolume(s, p); checked {
			rs = append(rs, r)
		}
		if np := blockingEgress(s.NetworkPolicies, p); np != "" {
			rs = append(rs, warn("pod-egress", subject, "NetworkPolicy "+np+" selects this pod for egress and allows no TCP 443: the agent cannot reach the tenant",
				"add an egress rule for TCP 443 to the tenant (or its ActiveGate) to "+np))
		}
	}
	return rs
}

// checkContainerConf finds app containers of a pod injected with
// containerConfig: driver that kubelet cannot create because the agent
// volume has no container.conf for them: the node's driver is older than
// that mode.
func checkContainerConf(p corev1.Pod) (Result, bool) {
	listed := false
	for _, v := range p.Spec.Volumes {
		if v.Name == api.AgentVolumeName && v.CSI != nil && v.CSI.VolumeAttributes[api.AttrContainers] != "" {
			listed = true
		}
	}
	if !listed {
		return Result{}, false
	}
	subject := p.Namespace + "/" + p.Name
	for _, cs := range p.Status.ContainerStatuses {
		if w := cs.State.Waiting; w != nil && w.Reason == "CreateContainerConfigError" && strings.Contains(w.Message, "subPath") &&
			strings.Contains(w.Message, "\""+api.AgentVolumeName+"\"") {
			return fail("pod-container-config", subject, fmt.Sprintf("container %s cannot start: the agent volume holds no container.conf for it "+
				"(the driver on %s predates containerConfig: driver)", cs.Name, p.Spec.NodeName),
				"upgrade the driver DaemonSet on "+p.Spec.NodeName+" (or annotate the pod "+
					"oneagent.dynatrace.com/container-config: init), then recreate the pod"), true
		}
	}
	return ok("pod-container-config", subject, "container.conf served by the driver (no init container)"), true
}

// checkVolume reports the driver's record of p's agent volume on its node:
// published, still waiting for the code module, or failed open (the pod
// runs without the agent) with the driver's reason.
func checkVolume(s Snapshot, p corev1.Pod) (Result, bool) {
	vols, asked := s.NodeVolumes[p.Spec.NodeName]
	if !asked {
		return Result{}, false
	}
	subject := p.Namespace + "/" + p.Name
	for _, v := range vols {
		if v.PodUID != string(p.UID) && (v.PodNamespace != p.Namespace || v.PodName != p.Name) {
			continue
		}
		switch v.State {
		case storage.VolumePublished:
			return ok("pod-volume", subject, fmt.Sprintf("agent volume published on %s (tenant %s, version %s)", p.Spec.NodeName, v.Tenant, v.Version)), true
		case storage.VolumePending:
			return warn("pod-volume", subject, fmt.Sprintf("the driver on %s is still getting the code module (since %s); the pod waits at most retryTimeout",
				p.Spec.NodeName, v.FirstAttempt.UTC().Format("15:04:05")), "the driver's log on "+p.Spec.NodeName+" says why (tenant reachable? token?)"), true
		case storage.VolumeFailedOpen:
			return fail("pod-volume", subject, "the agent volume failed open, the pod runs without the agent: "+v.Reason,
				"fix the cause, then recreate the pod"), true
		}
	}
	if p.Status.Phase == corev1.PodRunning {
		return warn("pod-volume", subject, "the driver on "+p.Spec.NodeName+" has no record of this pod's volume", "the driver's log on "+p.Spec.NodeName), true
	}
	return Result{}, false
}

// blockingEgress names a NetworkPolicy that restricts p's egress without
// allowing TCP 443 anywhere; policies are additive, so any policy with
// such a rule lets the agent out.
func blockingEgress(nps []networkingv1.NetworkPolicy, p corev1.Pod) string {
	var restricting []string
	for _, np := range nps {
		sel, err := metav1.LabelSelectorAsSelector(&np.Spec.PodSelector)
		if err != nil || !sel.Matches(labels.Set(p.Labels)) || !slices.Contains(np.Spec.PolicyTypes, networkingv1.PolicyTypeEgress) {
			continue
		}
		for _, rule := range np.Spec.Egress {
			if len(rule.Ports) == 0 {
				return "" // every port to its peers
			}
			for _, port := range rule.Ports {
				proto := corev1.ProtocolTCP
				if port.Protocol != nil {
					proto = *port.Protocol
				}
				if proto != corev1.ProtocolTCP {
					continue
				}
				if port.Port == nil || port.Port.IntValue() == 443 || (port.EndPort != nil && port.Port.IntValue() <= 443 && 443 <= int(*port.EndPort)) {
					return ""
				}
			}
		}
		restricting = append(restricting, np.Name)
	}
	if len(restricting) == 0 {
		return ""
	}
	return strings.Join(restricting, ", ")
}
