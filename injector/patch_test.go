package injector

import (
	"encoding/json"
	"testing"

	corev1 "k8s.io/api/core/v1"
	"k8s.io/utils/ptr"
)

func TestCreatePatch(t *testing.T) {
	base := func() *corev1.Pod {
		p := appPod(func(p *corev1.Pod) {
			p.Annotations["a/b~c"] = "1"
			p.Spec.InitContainers = []corev1.Container{{Name: "i1"}, {Name: "i2"}, {Name: "i3"}}
			p.Spec.Volumes = []corev1.Volume{{Name: "v1"}}
		})
		return p
	}
	tests := []struct {
		name string
		edit func(p *corev1.Pod)
		ops  int
	}{
		{"equal", func(*corev1.Pod) {}, 0},
		{"annotation added, changed, removed (escaped key)", func(p *corev1.Pod) {
			p.Annotations["new"] = "x"
			p.Annotations["oneagent.dynatrace.com/inject"] = "false"
			delete(p.Annotations, "a/b~c")
		}, 3},
		{"all annotations removed", func(p *corev1.Pod) { p.Annotations = nil }, 1},
		{"labels added", func(p *corev1.Pod) { p.Labels = map[string]string{"x": "y"} }, 1},
		{"init container inserted in the middle and at the end", func(p *corev1.Pod) {
			p.Spec.InitContainers = []corev1.Container{{Name: "i1"}, {Name: "new"}, {Name: "i2"}, {Name: "i3"}, {Name: "last"}}
		}, 2},
		{"init containers removed", func(p *corev1.Pod) { p.Spec.InitContainers = []corev1.Container{{Name: "i2"}} }, 2},
		{"init containers reordered", func(p *corev1.Pod) {
			p.Spec.InitContainers = []corev1.Container{{Name: "i3"}, {Name: "i1"}, {Name: "i2"}}
		}, 3},
		{"init containers replaced by fewer different ones", func(p *corev1.Pod) { p.Spec.InitContainers = []corev1.Container{{Name: "x"}} }, 1},
		{"nested field of a container", func(p *corev1.Pod) {
			p.Spec.Containers[0].Env = []corev1.EnvVar{{Name: "A", Value: "1"}}
			p.Spec.Containers[0].SecurityContext = &corev1.SecurityContext{RunAsNonRoot: ptr.To(true)}
		}, 2},
		{"volumes cleared", func(p *corev1.Pod) { p.Spec.Volumes = nil }, 1},
		// VolumeSource is embedded without a JSON name: its fields are the
		// volume's own in the encoded pod (a re-injection that changes the
		// agent volume's attributes).
		{"volume source changed in place", func(p *corev1.Pod) {
			p.Spec.Volumes[0].CSI = &corev1.CSIVolumeSource{Driver: "d", VolumeAttributes: map[string]string{"containers": "app=a"}}
		}, 1},
		{"scalar spec field", func(p *corev1.Pod) { p.Spec.NodeName = "n1"; p.Spec.HostNetwork = true }, 2},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			orig := base()
			mut := base()
			tc.edit(mut)
			patch, err := CreatePatch(orig, mut)
			if err != nil {
				t.Fatal(err)
			}
			var ops []map[string]any
			if patch != nil {
				if err := json.Unmarshal(patch, &ops); err != nil {
					t.Fatalf("patch is not JSON: %v\n%s", err, patch)
				}
			}
			if len(ops) != tc.ops {
				t.Errorf("%d operations, want %d: %s", len(ops), tc.ops, patch)
			}
			checkPatch(t, orig, mut)
		})
	}
	t.Run("status changes are refused", func(t *testing.T) {
		mut := base()
		mut.Status.Phase = corev1.PodRunning
		if _, err := CreatePatch(base(), mut); err == nil {
			t.Fatal("patch of status accepted")
		}
	})
}
