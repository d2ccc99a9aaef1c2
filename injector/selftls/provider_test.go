package selftls

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	admissionregistrationv1 "k8s.io/api/admissionregistration/v1"
	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/runtime/schema"
)

// memClient is an in-memory Client with the API server's optimistic
// concurrency (resourceVersion) for unit tests; the real API server is in
// test/e2e.
type memClient struct {
	mu      sync.Mutex
	rv      int
	secret  *corev1.Secret
	webhook *admissionregistrationv1.MutatingWebhookConfiguration
	deny    bool
	// clock and history model an API server that sees a new caBundle only
	// after its informer catches up.
	clock   *fakeClock
	history []bundleAt
}

type bundleAt struct {
	at     time.Time
	bundle []byte
}

var (
	secretsGR  = schema.GroupResource{Resource: "secrets"}
	webhooksGR = schema.GroupResource{Group: "admissionregistration.k8s.io", Resource: "mutatingwebhookconfigurations"}
)

func newMemClient() *memClient {
	return &memClient{webhook: &admissionregistrationv1.MutatingWebhookConfiguration{
		ObjectMeta: metav1.ObjectMeta{Name: "oneagent-csi-injector", ResourceVersion: "1"},
		Webhooks:   []admissionregistrationv1.MutatingWebhook{{Name: "a"}, {Name: "b"}}}, rv: 1}
}

func (m *memClient) next() string { m.rv++; return strconv.Itoa(m.rv) }

func (m *memClient) GetSecret(_ context.Context, ns, name string) (*corev1.Secret, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.deny {
		return nil, apierrors.NewForbidden(secretsGR, name, nil)
	}
	if m.secret == nil {
		return nil, apierrors.NewNotFound(secretsGR, name)
	}
	return m.secret.DeepCopy(), nil
}

func (m *memClient) CreateSecret(_ context.Context, s *corev1.Secret) (*corev1.Secret, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.secret != nil {
		return nil, apierrors.NewAlreadyExists(secretsGR, s.Name)
	}
	m.secret = s.DeepCopy()
	m.secret.ResourceVersion = m.next()
	return m.secret.DeepCopy(), nil
}

func (m *memClient) UpdateSecret(_ context.Context, s *corev1.Secret) (*corev1.Secret, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.secret == nil {
		return nil, apierrors.NewNotFound(secretsGR, s.Name)
	}
	if s.ResourceVersion != m.secret.ResourceVersion {
		return nil, apierrors.NewConflict(secretsGR, s.Name, nil)
	}
	m.secret = s.DeepCopy()
	m.secret.ResourceVersion = m.next()
	return m.secret.DeepCopy(), nil
}

func (m *memClient) GetWebhook(_ context.Context, name string) (*admissionregistrationv1.MutatingWebhookConfiguration, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.deny {
		return nil, apierrors.NewForbidden(webhooksGR, name, nil)
	}
	return m.webhook.DeepCopy(), nil
}

func (m *memClient) UpdateWebhook(_ context.Context, w *admissionregistrationv1.MutatingWebhookConfiguration) (*admissionregistrationv1.MutatingWebhookConfiguration, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	if w.ResourceVersion != m.webhook.ResourceVersion {
		return nil, apierrors.NewConflict(webhooksGR, w.Name, nil)
	}
	m.webhook = w.DeepCopy()
	m.webhook.ResourceVersion = m.next()
	if m.clock != nil {
		m.history = append(m.history, bundleAt{m.clock.Now(), w.Webhooks[0].ClientConfig.CABundle})
	}
	return m.webhook.DeepCopy(), nil
}

// fakeClock is a clock the test moves.
type fakeClock struct {
	mu  sync.Mutex
	now time.Time
}

func (c *fakeClock) Now() time.Time      { c.mu.Lock(); defer c.mu.Unlock(); return c.now }
func (c *fakeClock) Add(d time.Duration) { c.mu.Lock(); defer c.mu.Unlock(); c.now = c.now.Add(d) }
func newProvider(t *testing.T, c Client, clock *fakeClock) *Provider {
	t.Helper()
	p, err := New(Options{Client: c, Namespace: "oneagent-csi", Validity: 90 * time.Minute, Settle: time.Minute, Interval: 10 * time.Second, Now: clock.Now})
	if err != nil {
		t.Fatal(err)
	}
	return p
}

// verifies reports whether the bundle an API server lagging by lag behind
// the stored webhook configuration verifies what p serves for the Service
// name.
func verifies(t *testing.T, m *memClient, p *Provider, now time.Time, lag time.Duration) error {
	t.Helper()
	cert, err := p.GetCertificate(&tls.ClientHelloInfo{})
	if err != nil {
		return err
	}
	leaf, err := x509.ParseCertificate(cert.Certificate[0])
	if err != nil {
		t.Fatal(err)
	}
	m.mu.Lock()
	defer m.mu.Unlock()
	var seen []byte
	for _, h := range m.history {
		if !h.at.After(now.Add(-lag)) {
			seen = h.bundle
		}
	}
	pool := x509.NewCertPool()
	pool.AppendCertsFromPEM(seen)
	_, err = leaf.Verify(x509.VerifyOptions{Roots: pool, DNSName: hosts[0], CurrentTime: now})
	return err
}

func TestProviderTwoReplicasShareOneSecretAndRotateWithoutAGap(t *testing.T) {
	ctx := context.Background()
	m := newMemClient()
	clock := &fakeClock{now: time.Date(2026, 12, 1, 12, 0, 0, 0, time.UTC)}
	m.clock = clock
	a, b := newProvider(t, m, clock), newProvider(t, m, clock)
	if err := a.Sync(ctx); err != nil {
		t.Fatal(err)
	}
	first := string(m.secret.Data[KeyCert])
	if err := b.Sync(ctx); err != nil {
		t.Fatal(err)
	}
	if string(m.secret.Data[KeyCert]) != first {
		t.Fatal("the second replica replaced the first one's certificate")
	}
	for _, p := range []*Provider{a, b} {
		if err := p.Ready(); err != nil {
			t.Fatalf("not ready: %v", err)
		}
	}
	// Step through two validity periods in 10 s ticks, the replicas taking
	// turns; after every step, whatever either replica serves verifies
	// against the bundle of an API server 30 s behind (Settle is 1m).
	clock.Add(30 * time.Second)
	serials := map[string]bool{}
	for step := range 2 * 90 * 6 {
		clock.Add(10 * time.Second)
		p := a
		if step%2 == 1 {
			p = b
		}
		if err := p.Sync(ctx); err != nil {
			t.Fatalf("step %d: %v", step, err)
		}
		for i, q := range []*Provider{a, b} {
			if err := verifies(t, m, q, clock.Now(), 30*time.Second); err != nil {
				t.Fatalf("step %d (%s): replica %d serves a certificate the webhook does not trust: %v", step, clock.Now(), i, err)
			}
		}
		serials[string(m.secret.Data[KeyCert])] = true
	}
	if len(serials) < 3 {
		t.Fatalf("%d certificates over two validity periods, want at least 3 (two rotations)", len(serials))
	}
	if got := len(mustBundle(t, m.secret.Data[KeyBundle])); got > 2 {
		t.Fatalf("bundle holds %d CAs, want at most 2 (expired ones dropped)", got)
	}
}

func mustBundle(t *testing.T, b []byte) []*x509.Certificate {
	t.Helper()
	certs, err := ParseBundle(b)
	if err != nil {
		t.Fatal(err)
	}
	return certs
}

func TestProviderRestoresADeletedSecret(t *testing.T) {
	ctx := context.Background()
	m := newMemClient()
	clock := &fakeClock{now: time.Date(2026, 12, 1, 12, 0, 0, 0, time.UTC)}
	a := newProvider(t, m, clock)
	if err := a.Sync(ctx); err != nil {
		t.Fatal(err)
	}
	before := m.secret.DeepCopy()
	m.mu.Lock()
	m.secret = nil
	m.mu.Unlock()
	if err := a.Sync(ctx); err != nil {
		t.Fatal(err)
	}
	if string(m.secret.Data[KeyCert]) != string(before.Data[KeyCert]) || string(m.secret.Data[KeyBundle]) != string(before.Data[KeyBundle]) {
		t.Fatal("the Secret was recreated with new certificates; replicas still serving the old leaf would fail")
	}
}

func TestProviderNotReadyWhenDenied(t *testing.T) {
	m := newMemClient()
	m.deny = true
	clock := &fakeClock{now: time.Now()}
	a := newProvider(t, m, clock)
	a.syncLogged(context.Background())
	err := a.Ready()
	if err == nil || !strings.Contains(err.Error(), "permission denied") {
		t.Fatalf("Ready() = %v, want permission denied", err)
	}
}

func TestProviderConcurrentFirstStart(t *testing.T) {
	m := newMemClient()
	clock := &fakeClock{now: time.Now()}
	var ps []*Provider
	for range 4 {
		ps = append(ps, newProvider(t, m, clock))
	}
	var wg sync.WaitGroup
	errs := make([]error, len(ps))
	for i, p := range ps {
		wg.Go(func() { errs[i] = p.Sync(context.Background()) })
	}
	wg.Wait()
	for i, err := range errs {
		if err != nil {
			t.Fatalf("replica %d: %v", i, err)
		}
	}
	// Every replica serves the one stored leaf (some after a second pass).
	for _, p := range ps {
		if err := p.Sync(context.Background()); err != nil {
			t.Fatal(err)
		}
		c, _ := p.GetCertificate(nil)
		if string(c.Certificate[0]) != string(mustLeafDER(t, m.secret.Data[KeyCert])) {
			t.Fatal("a replica serves a certificate other than the stored one")
		}
	}
}

func mustLeafDER(t *testing.T, certPEM []byte) []byte {
	t.Helper()
	c := mustBundle(t, certPEM)
	if len(c) != 1 {
		t.Fatalf("%d certificates", len(c))
	}
	return c[0].Raw
}

func TestNewRejectsRenewBeforeShorterThanARotation(t *testing.T) {
	_, err := New(Options{Client: newMemClient(), Namespace: "x", Validity: time.Hour, RenewBefore: time.Minute, Settle: time.Minute, Interval: 10 * time.Second})
	if err == nil || !strings.Contains(err.Error(), "renew-before") {
		t.Fatalf("err = %v, want one naming renew-before", err)
	}
}
