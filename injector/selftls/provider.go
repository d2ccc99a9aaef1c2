// Package selftls lets the injector provision its own TLS without
// cert-manager: a CA and a serving certificate in one Secret of its
// namespace, shared by every replica, and the caBundle of its own
// MutatingWebhookConfiguration kept current. Replicas agree through the
// Secret's resourceVersion (optimistic concurrency): whoever updates first
// wins, the others re-read. Rotation never leaves the API server trusting a
// bundle that does not verify what a replica serves (see Plan).
package selftls

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"slices"
	"sync"
	"time"

	admissionregistrationv1 "k8s.io/api/admissionregistration/v1"
	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/klog/v2"
)

// Keys of the Secret.
const (
	KeyCert     = corev1.TLSCertKey       // the serving leaf
	KeyKey      = corev1.TLSPrivateKeyKey // its key
	KeyBundle   = "ca.crt"                // the CA bundle the webhook carries
	KeyNextCert = "next.crt"              // the leaf of a rotation under way
	KeyNextKey  = "next.key"              // its key
	// AnnotationNextTrustedSince records when the webhook configuration was
	// first seen carrying the next leaf's CA (RFC 3339).
	AnnotationNextTrustedSince = "oneagent-csi.dynatrace.com/next-trusted-since"
)

// Options configure a Provider.
type Options struct {
	// Client talks to the API server (NewClient). Required.
	Client Client
	// Namespace of the Secret. Required.
	Namespace string
	// SecretName is the Secret holding the certificates. Default
	// oneagent-csi-injector-certs.
	SecretName string
	// WebhookName is the MutatingWebhookConfiguration whose caBundle is kept
	// current (every entry of it). Default oneagent-csi-injector.
	WebhookName string
	// Hosts the certificate names. Default the Service's names
	// <ServiceName>.<Namespace>.svc and ….svc.cluster.local.
	Hosts []string
	// ServiceName is the webhook's Service, for the default Hosts. Default
	// oneagent-csi-injector.
	ServiceName string
	// Validity of a generation. Default 90 days.
	Validity time.Duration
	// RenewBefore starts a rotation this long before the leaf expires.
	// Default a third of Validity.
	RenewBefore time.Duration
	// Settle is how long the webhook must carry a new CA before replicas
	// serve the new leaf. Default 1m.
	Settle time.Duration
	// Interval between syncs (Secret and webhook read, leaf reloaded).
	// Default 10s.
	Interval time.Duration
	// Now is the clock. Default time.Now.
	Now func() time.Time
}

// Provider keeps the Secret and the webhook's caBundle current and serves
// the Secret's leaf.
type Provider struct {
	opts   Options
	policy Policy

	mu       sync.Mutex
	cert     *tls.Certificate
	serving  *x509.Certificate
	last     *corev1.Secret // as last read or written, to recreate it if deleted
	trusted  bool           // the webhook carried the serving leaf's CA at the last sync
	syncErr  error
	denied   bool
	lastSync time.Time
}

// New validates opts and fills in the defaults.
func New(opts Options) (*Provider, error) {
	if opts.Client == nil {
		return nil, errors.New("selftls: Client is required")
	}
	if opts.Namespace == "" {
		return nil, errors.New("selftls: Namespace is required")
	}
	if opts.SecretName == "" {
		opts.SecretName = "oneagent-csi-injector-certs"
	}
	if opts.WebhookName == "" {
		opts.WebhookName = "oneagent-csi-injector"
	}
	if opts.ServiceName == "" {
		opts.ServiceName = "oneagent-csi-injector"
	}
	if len(opts.Hosts) == 0 {
		svc := opts.ServiceName + "." + opts.Namespace + ".svc"
		opts.Hosts = []string{svc, svc + ".cluster.local"}
	}
	if opts.Validity == 0 {
		opts.Validity = 90 * 24 * time.Hour
	}
	if opts.RenewBefore == 0 {
		opts.RenewBefore = opts.Validity / 3
	}
	if opts.Settle == 0 {
		opts.Settle = time.Minute
	}
	if opts.Interval == 0 {
		opts.Interval = 10 * time.Second
	}
	if opts.Now == nil {
		opts.Now = time.Now
	}
	if opts.RenewBefore >= opts.Validity {
		return nil, fmt.Errorf("renew-before %s must be shorter than the validity %s", opts.RenewBefore, opts.Validity)
	}
	// The old leaf must stay valid while the new CA settles and every
	// replica reloads (two intervals: one to see the promotion, one spare).
	if need := opts.Settle + 3*opts.Interval; opts.RenewBefore < need {
		return nil, fmt.Errorf("renew-before %s must be at least settle %s plus three check intervals (%s)", opts.RenewBefore, opts.Settle, need)
	}
	return &Provider{opts: opts, policy: Policy{Hosts: opts.Hosts, Validity: opts.Validity, RenewBefore: opts.RenewBefore, Settle: opts.Settle}}, nil
}

// Run syncs at once and then every Interval until ctx ends. Errors are
// logged and retried; they make Ready fail while they last.
func (p *Provider) Run(ctx context.Context) {
	t := time.NewTicker(p.opts.Interval)
	defer t.Stop()
	for {
		p.syncLogged(ctx)
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
	}
}

func (p *Provider) syncLogged(ctx context.Context) {
	err := p.Sync(ctx)
	p.mu.Lock()
	defer p.mu.Unlock()
	p.syncErr = err
	p.denied = apierrors.IsForbidden(err) || apierrors.IsUnauthorized(err)
	if err == nil {
		p.lastSync = p.opts.Now()
		return
	}
	if p.denied {
		klog.ErrorS(err, "the injector may not manage its certificate: grant get and update on Secret "+p.opts.Namespace+"/"+p.opts.SecretName+
			" (and create on secrets) and get and update on MutatingWebhookConfiguration "+p.opts.WebhookName+" (deploy/kubernetes/injector-rbac.yaml)")
		return
	}
	klog.ErrorS(err, "certificate sync failed; retrying", "secret", klog.KRef(p.opts.Namespace, p.opts.SecretName), "webhook", p.opts.WebhookName)
}

// Sync makes one pass: read the webhook's bundle and the Secret, move the
// Secret on (Plan), make the webhook carry the Secret's bundle, and load the
// serving leaf. A conflict with another replica is retried at once with
// fresh reads.
func (p *Provider) Sync(ctx context.Context) error {
	var err error
	for range 5 {
		if err = p.syncOnce(ctx); !apierrors.IsConflict(err) && !apierrors.IsAlreadyExists(err) {
			return err
		}
	}
	return err
}

func (p *Provider) syncOnce(ctx context.Context) error {
	mwc, err := p.opts.Client.GetWebhook(ctx, p.opts.WebhookName)
	if err != nil {
		return fmt.Errorf("get MutatingWebhookConfiguration %s: %w", p.opts.WebhookName, err)
	}
	if len(mwc.Webhooks) == 0 {
		return fmt.Errorf("MutatingWebhookConfiguration %s has no webhooks", p.opts.WebhookName)
	}
	webhookBundle, err := commonBundle(mwc.Webhooks)
	if err != nil {
		return fmt.Errorf("MutatingWebhookConfiguration %s: caBundle: %w", p.opts.WebhookName, err)
	}

	sec, err := p.opts.Client.GetSecret(ctx, p.opts.Namespace, p.opts.SecretName)
	switch {
	case apierrors.IsNotFound(err):
		sec = p.restore()
		if sec, err = p.opts.Client.CreateSecret(ctx, sec); err != nil {
			return fmt.Errorf("create Secret %s/%s: %w", p.opts.Namespace, p.opts.SecretName, err)
		}
		klog.InfoS("created the certificate Secret", "secret", klog.KObj(sec), "restored", len(sec.Data) > 0)
	case err != nil:
		return fmt.Errorf("get Secret %s/%s: %w", p.opts.Namespace, p.opts.SecretName, err)
	}
	state := decode(sec)
	now := p.opts.Now()
	next, changed, err := Plan(state, p.policy, Observed{Now: now, WebhookBundle: webhookBundle, Generate: func() (Pair, error) {
		pr, _, err := Generate(p.opts.Hosts, now, p.opts.Validity)
		return pr, err
	}})
	if err != nil {
		return err
	}
	if changed {
		upd := sec.DeepCopy()
		encode(upd, next)
		if sec, err = p.opts.Client.UpdateSecret(ctx, upd); err != nil {
			return fmt.Errorf("update Secret %s/%s: %w", p.opts.Namespace, p.opts.SecretName, err)
		}
		klog.InfoS("updated the certificate Secret", "secret", klog.KObj(sec), "serving", serialOf(next.Serving),
			"next", serialOf(next.Next), "bundle", len(next.Bundle), "servingExpires", next.Serving.Leaf.NotAfter)
	}
	want := EncodeBundle(next.Bundle)
	if needsBundle(mwc.Webhooks, want) {
		upd := mwc.DeepCopy()
		for i := range upd.Webhooks {
			upd.Webhooks[i].ClientConfig.CABundle = want
		}
		if _, err := p.opts.Client.UpdateWebhook(ctx, upd); err != nil {
			return fmt.Errorf("update caBundle of MutatingWebhookConfiguration %s: %w", p.opts.WebhookName, err)
		}
		klog.InfoS("updated the webhook's caBundle", "webhook", p.opts.WebhookName, "cas", len(next.Bundle))
		webhookBundle = next.Bundle
	}
	return p.load(sec, next, contains(webhookBundle, next.Serving.CA))
}

// load serves next.Serving and remembers the Secret.
func (p *Provider) load(sec *corev1.Secret, s State, trusted bool) error {
	pair, err := tls.X509KeyPair(s.Serving.CertPEM, s.Serving.KeyPEM)
	if err != nil {
		return fmt.Errorf("serving certificate of Secret %s/%s: %w", p.opts.Namespace, p.opts.SecretName, err)
	}
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.serving == nil || !p.serving.Equal(s.Serving.Leaf) {
		klog.InfoS("serving a new webhook certificate", "serial", serialOf(s.Serving), "expires", s.Serving.Leaf.NotAfter)
	}
	p.cert, p.serving, p.last, p.trusted = &pair, s.Serving.Leaf, sec.DeepCopy(), trusted
	return nil
}

// restore is the Secret to create when it is missing: the one last seen
// (another replica may still serve its leaf, and the webhook trusts it), or
// an empty one that the next step fills.
func (p *Provider) restore() *corev1.Secret {
	p.mu.Lock()
	defer p.mu.Unlock()
	sec := &corev1.Secret{ObjectMeta: metav1.ObjectMeta{Name: p.opts.SecretName, Namespace: p.opts.Namespace,
		Labels: map[string]string{"app.kubernetes.io/managed-by": "oneagent-csi-injector"}}, Type: corev1.SecretTypeOpaque}
	if p.last != nil {
		sec.Data = p.last.Data
		sec.Annotations = p.last.Annotations
	}
	return sec
}

// GetCertificate is for tls.Config.GetCertificate.
func (p *Provider) GetCertificate(*tls.ClientHelloInfo) (*tls.Certificate, error) {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.cert == nil {
		return nil, errors.New("no certificate yet")
	}
	return p.cert, nil
}

// Ready fails while no certificate is loaded, while the API server may not
// trust it, and while the injector lacks the permissions it needs.
func (p *Provider) Ready() error {
	p.mu.Lock()
	defer p.mu.Unlock()
	switch {
	case p.denied:
		return fmt.Errorf("permission denied: %w", p.syncErr)
	case p.cert == nil && p.syncErr != nil:
		return p.syncErr
	case p.cert == nil:
		return errors.New("no certificate yet")
	case !p.trusted:
		return errors.New("the webhook configuration does not trust the served certificate yet")
	}
	return nil
}

// TLSConfig returns a server TLS config (TLS 1.2 or later) using p.
func (p *Provider) TLSConfig() *tls.Config {
	return &tls.Config{MinVersion: tls.VersionTLS12, GetCertificate: p.GetCertificate}
}

func decode(sec *corev1.Secret) State {
	var s State
	s.Bundle, _ = ParseBundle(sec.Data[KeyBundle])
	if pr, err := ParsePair(sec.Data[KeyCert], sec.Data[KeyKey], s.Bundle); err == nil {
		s.Serving = &pr
	}
	if pr, err := ParsePair(sec.Data[KeyNextCert], sec.Data[KeyNextKey], s.Bundle); err == nil {
		s.Next = &pr
	}
	if t, err := time.Parse(time.RFC3339Nano, sec.Annotations[AnnotationNextTrustedSince]); err == nil && s.Next != nil {
		s.NextTrustedSince = t
	}
	return s
}

func encode(sec *corev1.Secret, s State) {
	if sec.Data == nil {
		sec.Data = map[string][]byte{}
	}
	sec.Data[KeyCert], sec.Data[KeyKey] = s.Serving.CertPEM, s.Serving.KeyPEM
	sec.Data[KeyBundle] = EncodeBundle(s.Bundle)
	if s.Next != nil {
		sec.Data[KeyNextCert], sec.Data[KeyNextKey] = s.Next.CertPEM, s.Next.KeyPEM
	} else {
		delete(sec.Data, KeyNextCert)
		delete(sec.Data, KeyNextKey)
	}
	if s.NextTrustedSince.IsZero() {
		delete(sec.Annotations, AnnotationNextTrustedSince)
	} else {
		if sec.Annotations == nil {
			sec.Annotations = map[string]string{}
		}
		sec.Annotations[AnnotationNextTrustedSince] = s.NextTrustedSince.UTC().Format(time.RFC3339Nano)
	}
}

// commonBundle is the CAs every webhook entry carries.
func commonBundle(hooks []admissionWebhook) ([]*x509.Certificate, error) {
	var common []*x509.Certificate
	for i, h := range hooks {
		b, err := ParseBundle(h.ClientConfig.CABundle)
		if err != nil {
			return nil, err
		}
		if i == 0 {
			common = b
			continue
		}
		common = slices.DeleteFunc(common, func(c *x509.Certificate) bool { return !contains(b, c) })
	}
	return common, nil
}

func needsBundle(hooks []admissionWebhook, want []byte) bool {
	for _, h := range hooks {
		if string(h.ClientConfig.CABundle) != string(want) {
			return true
		}
	}
	return false
}

func serialOf(p *Pair) string {
	if p == nil {
		return ""
	}
	return p.Leaf.SerialNumber.Text(16)
}

type admissionWebhook = admissionregistrationv1.MutatingWebhook
