package selftls

import (
	"crypto/x509"
	"time"
)

// State is what the Secret holds, parsed.
type State struct {
	// Serving is the pair every replica serves (tls.crt, tls.key); nil when
	// absent or unreadable.
	Serving *Pair
	// Next is the pair of a rotation under way (next.crt, next.key): its CA
	// is already in Bundle, and it becomes Serving once the webhook
	// configuration has trusted that CA for Policy.Settle.
	Next *Pair
	// Bundle is the CA bundle (ca.crt) the webhook configuration must carry.
	Bundle []*x509.Certificate
	// NextTrustedSince is when a replica first saw the webhook configuration
	// carry Next's CA; zero before.
	NextTrustedSince time.Time
}

// Policy are the rotation times.
type Policy struct {
	// Hosts the serving certificate must name.
	Hosts []string
	// Validity of a new generation (CA and leaf).
	Validity time.Duration
	// RenewBefore is how long before the leaf expires a rotation starts. It
	// must exceed Settle plus the time replicas take to reload, so that the
	// old leaf, still trusted, is served until every replica has the new one.
	RenewBefore time.Duration
	// Settle is how long the webhook configuration must have carried the new
	// CA before replicas switch to the new leaf: API servers see the change
	// through their informers, not at once.
	Settle time.Duration
}

// Observed is what the planner needs besides the Secret.
type Observed struct {
	// Now is the current time.
	Now time.Time
	// WebhookBundle is the caBundle the webhook configuration carries now
	// (the smallest set over its webhooks: the one every entry trusts).
	WebhookBundle []*x509.Certificate
	// Generate makes a new generation (Generate bound to Policy.Hosts).
	Generate func() (Pair, error)
}

// Plan returns the state the Secret should move to, and whether it differs
// from s. It is pure apart from o.Generate. The steps, each at most once:
//
//  1. No usable serving pair (absent, expired, not covering Hosts, or its CA
//     missing from the bundle): promote Next if the webhook trusts it,
//     else start over with a new generation served at once (nothing could be
//     trusted anyway).
//  2. A rotation is due (RenewBefore the leaf's end) and none is under way:
//     make Next and put its CA first in the bundle.
//  3. A rotation is under way: note when the webhook first carries Next's
//     CA; after Settle, Next becomes Serving.
//  4. CAs that have expired leave the bundle. The old CA therefore stays
//     until the old leaf has expired, long after every replica has
//     switched.
func Plan(s State, p Policy, o Observed) (State, bool, error) {
	now := o.Now
	out := s
	out.Bundle = append([]*x509.Certificate(nil), s.Bundle...)
	changed := false
	usable := func(pr *Pair) bool {
		return pr != nil && pr.CA != nil && contains(out.Bundle, pr.CA) &&
			now.Before(pr.Leaf.NotAfter) && !now.Before(pr.Leaf.NotBefore) && covers(pr.Leaf, p.Hosts)
	}
	if out.Next != nil && !usable(out.Next) {
		out.Next, out.NextTrustedSince, changed = nil, time.Time{}, true
	}
	if !usable(out.Serving) {
		if out.Next != nil && contains(o.WebhookBundle, out.Next.CA) {
			out.Serving, out.Next, out.NextTrustedSince = out.Next, nil, time.Time{}
		} else {
			g, err := o.Generate()
			if err != nil {
				return s, false, err
			}
			out.Serving, out.Next, out.NextTrustedSince = &g, nil, time.Time{}
			out.Bundle = append([]*x509.Certificate{g.CA}, out.Bundle...)
		}
		changed = true
	}
	if out.Next == nil && !now.Before(out.Serving.Leaf.NotAfter.Add(-p.RenewBefore)) {
		g, err := o.Generate()
		if err != nil {
			return s, false, err
		}
		out.Next, out.NextTrustedSince = &g, time.Time{}
		out.Bundle = append([]*x509.Certificate{g.CA}, out.Bundle...)
		changed = true
	}
	if out.Next != nil {
		trusted := contains(o.WebhookBundle, out.Next.CA)
		switch {
		case !trusted && !out.NextTrustedSince.IsZero():
			out.NextTrustedSince, changed = time.Time{}, true
		case trusted && out.NextTrustedSince.IsZero():
			out.NextTrustedSince, changed = now, true
		case trusted && now.Sub(out.NextTrustedSince) >= p.Settle:
			out.Serving, out.Next, out.NextTrustedSince = out.Next, nil, time.Time{}
			changed = true
		}
	}
	kept := out.Bundle[:0]
	for _, ca := range out.Bundle {
		if now.Before(ca.NotAfter) && !contains(kept, ca) {
			kept = append(kept, ca)
		}
	}
	if !sameBundle(kept, s.Bundle) {
		changed = true
	}
	out.Bundle = kept
	return out, changed, nil
}

func sameBundle(a, b []*x509.Certificate) bool {
	if len(a) != len(b) {
		return false
	}
	for i := range a {
		if !a[i].Equal(b[i]) {
			return false
		}
	}
	return true
}
