package injector

import (
	"fmt"
	"slices"
	"strings"
	"unicode/utf8"

	corev1 "k8s.io/api/core/v1"
)

// Labels and annotations set by Kubernetes that decide whether a pod can
// run where the driver runs.
const (
	osLabel              = "kubernetes.io/os"
	mirrorPodAnnotation  = "kubernetes.io/config.mirror"
	maxReasonAnnotation  = 256
	maxQuotedValueLength = 64
)

// unservable says why the driver can never serve the pod, or "": the
// DaemonSet runs on Linux nodes only (and not on nodes labelled as having no
// driver), and kubelet does not mount CSI volumes into static pods. Wiring
// such a pod would leave it waiting for a volume no driver mounts.
func unservable(pod *corev1.Pod, cfg *Config) string {
	if _, ok := pod.Annotations[mirrorPodAnnotation]; ok {
		return "static pod (mirror pod): kubelet does not mount CSI volumes into static pods"
	}
	if pod.Spec.OS != nil && pod.Spec.OS.Name != "" && pod.Spec.OS.Name != corev1.Linux {
		return fmt.Sprintf("spec.os.name is %s: the driver runs on Linux nodes only", quoteShort(string(pod.Spec.OS.Name)))
	}
	if !admitsLinux(pod) {
		return "the pod's node selector or required node affinity excludes Linux nodes: the driver runs on Linux nodes only"
	}
	if key, value, ok := noDriverLabel(cfg); ok && !admitsDriverNode(pod, key, value) {
		return fmt.Sprintf("the pod selects only nodes labelled %s, which have no driver", cfg.NoDriverNodeLabel)
	}
	return ""
}

func noDriverLabel(cfg *Config) (key, value string, ok bool) {
	if cfg.NoDriverNodeLabel == "" {
		return "", "", false
	}
	key, value, _ = strings.Cut(cfg.NoDriverNodeLabel, "=")
	return key, value, true
}

// labelState is a node's label key: absent, or present with a value.
type labelState struct {
	present bool
	value   string
}

// admitsLinux reports whether the pod may be scheduled onto a Linux node.
func admitsLinux(pod *corev1.Pod) bool {
	return admitsAny(pod, osLabel, []labelState{{present: true, value: "linux"}})
}

// admitsDriverNode reports whether the pod may be scheduled onto a node that
// does not carry the no-driver label key[=value]: a node without key, or
// (when value is set) with key at another value.
func admitsDriverNode(pod *corev1.Pod, key, value string) bool {
	states := []labelState{{present: false}}
	if value != "" {
		// Values the pod names, and one it does not name.
		seen := map[string]bool{value: true}
		add := func(v string) {
			if !seen[v] {
				seen[v] = true
				states = append(states, labelState{present: true, value: v})
			}
		}
		if v, ok := pod.Spec.NodeSelector[key]; ok {
			add(v)
		}
		for _, t := range requiredTerms(pod) {
			for _, e := range t.MatchExpressions {
				if e.Key == key {
					for _, v := range e.Values {
						add(v)
					}
				}
			}
		}
		states = append(states, labelState{present: true, value: "\x00another value"})
	}
	return admitsAny(pod, key, states)
}

func requiredTerms(pod *corev1.Pod) []corev1.NodeSelectorTerm {
	a := pod.Spec.Affinity
	if a == nil || a.NodeAffinity == nil || a.NodeAffinity.RequiredDuringSchedulingIgnoredDuringExecution == nil {
		return nil
	}
	return a.NodeAffinity.RequiredDuringSchedulingIgnoredDuringExecution.NodeSelectorTerms
}

// admitsAny reports whether the pod's node selector and required node
// affinity (terms ORed, expressions ANDed) admit a node whose label key is in
// one of the states; expressions on other keys are not judged.
func admitsAny(pod *corev1.Pod, key string, states []labelState) bool {
	terms := requiredTerms(pod)
	for _, s := range states {
		if v, ok := pod.Spec.NodeSelector[key]; ok && (!s.present || s.value != v) {
			continue
		}
		if len(terms) == 0 {
			return true
		}
		for _, t := range terms {
			if termAdmits(t, key, s) {
				return true
			}
		}
	}
	return false
}

// termAdmits reports whether every expression of the term on key holds for
// a node whose label key is in state s.
func termAdmits(t corev1.NodeSelectorTerm, key string, s labelState) bool {
	for _, e := range t.MatchExpressions {
		if e.Key != key {
			continue
		}
		listed := slices.Contains(e.Values, s.value)
		ok := true
		switch e.Operator {
		case corev1.NodeSelectorOpIn:
			ok = s.present && listed
		case corev1.NodeSelectorOpNotIn:
			ok = !s.present || !listed
		case corev1.NodeSelectorOpExists:
			ok = s.present
		case corev1.NodeSelectorOpDoesNotExist:
			ok = !s.present
		}
		if !ok {
			return false
		}
	}
	return true
}

// quoteShort quotes a user's value for a message, shortened so that a long
// value cannot make the message long.
func quoteShort(v string) string {
	if len(v) <= maxQuotedValueLength {
		return fmt.Sprintf("%q", v)
	}
	cut := maxQuotedValueLength
	for cut > 0 && !utf8.RuneStart(v[cut]) {
		cut--
	}
	return fmt.Sprintf("%q...(%d bytes)", v[:cut], len(v))
}

// boundReason keeps the reason annotation within maxReasonAnnotation bytes,
// cut at a character boundary: the pod's annotations must stay within the
// API server's limit whatever the user wrote.
func boundReason(s string) string {
	if len(s) <= maxReasonAnnotation {
		return s
	}
	cut := maxReasonAnnotation - len("...")
	for cut > 0 && !utf8.RuneStart(s[cut]) {
		cut--
	}
	return s[:cut] + "..."
}
