package selftls

import (
	"crypto/x509"
	"testing"
	"time"
)

var hosts = []string{"oneagent-csi-injector.oneagent-csi.svc", "oneagent-csi-injector.oneagent-csi.svc.cluster.local"}

func gen(t *testing.T, at time.Time, validity time.Duration, names ...string) *Pair {
	t.Helper()
	if len(names) == 0 {
		names = hosts
	}
	p, _, err := Generate(names, at, validity)
	if err != nil {
		t.Fatal(err)
	}
	return &p
}

func TestPlan(t *testing.T) {
	t0 := time.Date(2026, 12, 1, 12, 0, 0, 0, time.UTC)
	const validity = 90 * time.Minute
	policy := Policy{Hosts: hosts, Validity: validity, RenewBefore: 30 * time.Minute, Settle: time.Minute}
	old := gen(t, t0, validity)
	next := gen(t, t0.Add(60*time.Minute), validity)
	renamed := gen(t, t0, validity, "other.oneagent-csi.svc")
	bundle := func(ps ...*Pair) []*x509.Certificate {
		var out []*x509.Certificate
		for _, p := range ps {
			out = append(out, p.CA)
		}
		return out
	}
	type want struct {
		changed      bool
		serving      string // "old", "next", "new" (generated here), "renamed"
		next         string // "", "next", "new"
		bundle       []string
		trustedSince time.Time
	}
	cases := []struct {
		name    string
		state   State
		now     time.Time
		webhook []*x509.Certificate
		want    want
	}{
		{name: "empty Secret: a generation served at once", state: State{}, now: t0,
			want: want{changed: true, serving: "new", bundle: []string{"new"}}},
		{name: "current and trusted: nothing to do", state: State{Serving: old, Bundle: bundle(old)}, now: t0.Add(10 * time.Minute), webhook: bundle(old),
			want: want{serving: "old", bundle: []string{"old"}}},
		{name: "rotation due: next made, its CA first, old one kept", state: State{Serving: old, Bundle: bundle(old)}, now: t0.Add(61 * time.Minute), webhook: bundle(old),
			want: want{changed: true, serving: "old", next: "new", bundle: []string{"new", "old"}}},
		{name: "next not yet trusted: wait", state: State{Serving: old, Next: next, Bundle: bundle(next, old)}, now: t0.Add(62 * time.Minute), webhook: bundle(old),
			want: want{serving: "old", next: "next", bundle: []string{"next", "old"}}},
		{name: "next trusted: settling starts", state: State{Serving: old, Next: next, Bundle: bundle(next, old)}, now: t0.Add(62 * time.Minute), webhook: bundle(next, old),
			want: want{changed: true, serving: "old", next: "next", bundle: []string{"next", "old"}, trustedSince: t0.Add(62 * time.Minute)}},
		{name: "settling not over", state: State{Serving: old, Next: next, Bundle: bundle(next, old), NextTrustedSince: t0.Add(62 * time.Minute)}, now: t0.Add(62*time.Minute + 59*time.Second), webhook: bundle(next, old),
			want: want{serving: "old", next: "next", bundle: []string{"next", "old"}, trustedSince: t0.Add(62 * time.Minute)}},
		{name: "settled: next served, old CA stays", state: State{Serving: old, Next: next, Bundle: bundle(next, old), NextTrustedSince: t0.Add(62 * time.Minute)}, now: t0.Add(63 * time.Minute), webhook: bundle(next, old),
			want: want{changed: true, serving: "next", bundle: []string{"next", "old"}}},
		{name: "webhook lost the next CA: settling restarts", state: State{Serving: old, Next: next, Bundle: bundle(next, old), NextTrustedSince: t0.Add(62 * time.Minute)}, now: t0.Add(63 * time.Minute), webhook: bundle(old),
			want: want{changed: true, serving: "old", next: "next", bundle: []string{"next", "old"}}},
		{name: "old CA expired: dropped", state: State{Serving: next, Bundle: bundle(next, old)}, now: t0.Add(91 * time.Minute), webhook: bundle(next, old),
			want: want{changed: true, serving: "next", bundle: []string{"next"}}},
		{name: "serving expired, next trusted: promoted at once", state: State{Serving: old, Next: next, Bundle: bundle(next, old)}, now: t0.Add(91 * time.Minute), webhook: bundle(next),
			want: want{changed: true, serving: "next", bundle: []string{"next"}}},
		{name: "serving expired, nothing next: new generation", state: State{Serving: old, Bundle: bundle(old)}, now: t0.Add(91 * time.Minute), webhook: bundle(old),
			want: want{changed: true, serving: "new", bundle: []string{"new"}}},
		{name: "serving names another service: new generation, old CA kept", state: State{Serving: renamed, Bundle: bundle(renamed)}, now: t0.Add(time.Minute), webhook: bundle(renamed),
			want: want{changed: true, serving: "new", bundle: []string{"new", "renamed"}}},
		{name: "serving CA missing from the bundle: new generation", state: State{Serving: old}, now: t0.Add(time.Minute),
			want: want{changed: true, serving: "new", bundle: []string{"new"}}},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			var made *Pair
			got, changed, err := Plan(tc.state, policy, Observed{Now: tc.now, WebhookBundle: tc.webhook, Generate: func() (Pair, error) {
				if made != nil {
					t.Fatal("generated twice")
				}
				made = gen(t, tc.now, validity)
				return *made, nil
			}})
			if err != nil {
				t.Fatal(err)
			}
			name := func(p *Pair) string {
				switch {
				case p == nil:
					return ""
				case p == old || p.Leaf.Equal(old.Leaf):
					return "old"
				case p.Leaf.Equal(next.Leaf):
					return "next"
				case p.Leaf.Equal(renamed.Leaf):
					return "renamed"
				case made != nil && p.Leaf.Equal(made.Leaf):
					return "new"
				}
				return "unknown"
			}
			caName := func(c *x509.Certificate) string {
				for n, p := range map[string]*Pair{"old": old, "next": next, "renamed": renamed, "new": made} {
					if p != nil && p.CA.Equal(c) {
						return n
					}
				}
				return "unknown"
			}
			if changed != tc.want.changed {
				t.Errorf("changed = %v, want %v", changed, tc.want.changed)
			}
			if n := name(got.Serving); n != tc.want.serving {
				t.Errorf("serving = %q, want %q", n, tc.want.serving)
			}
			if n := name(got.Next); n != tc.want.next {
				t.Errorf("next = %q, want %q", n, tc.want.next)
			}
			var b []string
			for _, c := range got.Bundle {
				b = append(b, caName(c))
			}
			if len(b) != len(tc.want.bundle) {
				t.Fatalf("bundle = %v, want %v", b, tc.want.bundle)
			}
			for i := range b {
				if b[i] != tc.want.bundle[i] {
					t.Fatalf("bundle = %v, want %v", b, tc.want.bundle)
				}
			}
			if !got.NextTrustedSince.Equal(tc.want.trustedSince) {
				t.Errorf("trustedSince = %v, want %v", got.NextTrustedSince, tc.want.trustedSince)
			}
		})
	}
}
