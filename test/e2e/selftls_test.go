package e2e

import (
	"bytes"
	"context"
	"crypto/tls"
	"crypto/x509"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	admissionregistrationv1 "k8s.io/api/admissionregistration/v1"
	authenticationv1 "k8s.io/api/authentication/v1"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/utils/ptr"

	"github.com/oneagent-csi/oneagent-csi/api"
	"github.com/oneagent-csi/oneagent-csi/injector"
	"github.com/oneagent-csi/oneagent-csi/test/e2e/cluster"
)

const (
	selfTLSNamespace = "oneagent-csi"
	selfTLSSecret    = "oneagent-csi-injector-certs"
	selfTLSWebhook   = "oneagent-csi-injector"
	selfTLSProbeNS   = "selftls-probe"
)

// TestInjectorSelfProvisionedTLS runs two injector replicas with
// --cert-mode=self against the real API server, with the RBAC of
// deploy/kubernetes/injector-rbac.yaml as it ships, and a validity short
// enough to rotate twice. The webhook (failurePolicy Fail, one probe
// namespace) is called by the API server through a round-robin TCP
// balancer in front of the replicas. Every admission while a replica
// joins, during both rotations and after the Secret is deleted by hand
// must succeed; a replica without RBAC is not ready and says why.
func TestInjectorSelfProvisionedTLS(t *testing.T) {
	ctx := setup(t)
	c := env.c.Client
	if err := env.c.EnsureNamespace(ctx, selfTLSNamespace, nil); err != nil {
		t.Fatal(err)
	}
	if err := env.c.EnsureNamespace(ctx, selfTLSProbeNS, nil); err != nil {
		t.Fatal(err)
	}
	kubectl(t, "apply", "-f", "../../deploy/kubernetes/injector-rbac.yaml")
	t.Cleanup(func() {
		_, _ = kubectlCmd("delete", "--ignore-not-found", "-f", "../../deploy/kubernetes/injector-rbac.yaml").CombinedOutput()
		_ = c.AdmissionregistrationV1().MutatingWebhookConfigurations().Delete(context.Background(), selfTLSWebhook, metav1.DeleteOptions{})
	})
	work := t.TempDir()
	kc := serviceAccountKubeconfig(ctx, t, work, "oneagent-csi-injector")

	lb := startBalancer(t)
	url := "https://" + lb.addr + injector.PathNamespaceOptIn
	mwc := &admissionregistrationv1.MutatingWebhookConfiguration{ObjectMeta: metav1.ObjectMeta{Name: selfTLSWebhook},
		Webhooks: []admissionregistrationv1.MutatingWebhook{{
			Name: "namespace.injector.oneagent-csi.dynatrace.com", AdmissionReviewVersions: []string{"v1"},
			ClientConfig: admissionregistrationv1.WebhookClientConfig{URL: &url},
			Rules: []admissionregistrationv1.RuleWithOperations{{Operations: []admissionregistrationv1.OperationType{admissionregistrationv1.Create},
				Rule: admissionregistrationv1.Rule{APIGroups: []string{""}, APIVersions: []string{"v1"}, Resources: []string{"pods"}}}},
			NamespaceSelector: &metav1.LabelSelector{MatchLabels: map[string]string{"kubernetes.io/metadata.name": selfTLSProbeNS}},
			// Fail, so that a TLS failure is an error here, not a pod
			// admitted without the agent.
			FailurePolicy:  ptr.To(admissionregistrationv1.Fail),
			SideEffects:    ptr.To(admissionregistrationv1.SideEffectClassNone),
			TimeoutSeconds: ptr.To[int32](5),
		}}}
	if _, err := c.AdmissionregistrationV1().MutatingWebhookConfigurations().Create(ctx, mwc, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}

	a := startSelfTLSReplica(t, work, "a", kc)
	lb.add(a.addr)
	a.waitReady(ctx, t)
	first := secretData(ctx, t)[corev1.TLSCertKey]
	if len(first) == 0 {
		t.Fatal("the first replica wrote no certificate")
	}
	probe := newAdmissionProbe(ctx, t)
	probe.once(t)

	b := startSelfTLSReplica(t, work, "b", kc)
	lb.add(b.addr)
	b.waitReady(ctx, t)
	if got := secretData(ctx, t)[corev1.TLSCertKey]; !bytes.Equal(got, first) {
		t.Fatal("the second replica replaced the first one's certificate")
	}

	// Two rotations (validity 30s, renewal 12s before the end, so the old CA expires before the next rotation adds a CA), admissions
	// every 100 ms through the API server, and both replicas checked
	// directly against the bundle the webhook carries at every step.
	probe.start()
	served := map[string]bool{string(first): true}
	pruned := false
	bundleWas2 := false
	err := cluster.Poll(ctx, 150*time.Second, "two rotations, the old CA dropped after each", func() bool {
		d := secretData(ctx, t)
		served[string(d[corev1.TLSCertKey])] = true
		n := bytes.Count(d["ca.crt"], []byte("BEGIN CERTIFICATE"))
		if n >= 2 {
			bundleWas2 = true
		}
		if bundleWas2 && n == 1 && len(served) >= 3 {
			pruned = true
		}
		for _, r := range []*selfTLSReplica{a, b} {
			r.checkTrusted(ctx, t)
		}
		return pruned
	})
	if err != nil {
		t.Fatalf("%v (served %d certificates)\n%s\n%s", err, len(served), a.log(), b.log())
	}

	// The Secret deleted by hand: recreated with what the replicas serve.
	before := secretData(ctx, t)
	if err := c.CoreV1().Secrets(selfTLSNamespace).Delete(ctx, selfTLSSecret, metav1.DeleteOptions{}); err != nil {
		t.Fatal(err)
	}
	if err := cluster.Poll(ctx, 30*time.Second, "the Secret recreated", func() bool {
		s, err := c.CoreV1().Secrets(selfTLSNamespace).Get(ctx, selfTLSSecret, metav1.GetOptions{})
		return err == nil && len(s.Data[corev1.TLSCertKey]) > 0
	}); err != nil {
		t.Fatal(err)
	}
	if after := secretData(ctx, t); !bytes.Equal(after[corev1.TLSCertKey], before[corev1.TLSCertKey]) && !bytes.Equal(after["ca.crt"], before["ca.crt"]) {
		t.Error("the recreated Secret has neither the served certificate nor the trusted bundle")
	}
	// A few more admissions after the recreation.
	target := probe.count.Load() + 10
	if err := cluster.Poll(ctx, 30*time.Second, "admissions after the recreation", func() bool { return probe.count.Load() >= target }); err != nil {
		t.Fatal(err)
	}
	probe.stop()
	if f := probe.failures(); len(f) > 0 {
		t.Fatalf("%d of %d admissions failed, first: %s\n%s\n%s", len(f), probe.count.Load(), f[0], a.log(), b.log())
	}
	t.Logf("%d admissions, none failed; %d certificates served", probe.count.Load(), len(served))

	// A replica whose service account has no RBAC: not ready, and the log
	// says which rights it lacks.
	if _, err := c.CoreV1().ServiceAccounts(selfTLSNamespace).Create(ctx, &corev1.ServiceAccount{ObjectMeta: metav1.ObjectMeta{Name: "no-rbac"}}, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		_ = c.CoreV1().ServiceAccounts(selfTLSNamespace).Delete(context.Background(), "no-rbac", metav1.DeleteOptions{})
	})
	denied := startSelfTLSReplica(t, work, "denied", serviceAccountKubeconfig(ctx, t, work, "no-rbac"))
	if err := cluster.Poll(ctx, 30*time.Second, "the denied replica to log why", func() bool {
		return strings.Contains(denied.log(), "may not manage its certificate")
	}); err != nil {
		t.Fatalf("%v\n%s", err, denied.log())
	}
	code, body := denied.readyz(t)
	if code != http.StatusServiceUnavailable || !strings.Contains(body, "permission denied") {
		t.Fatalf("/readyz of the denied replica = %d %q, want 503 permission denied", code, body)
	}
}

func secretData(ctx context.Context, t *testing.T) map[string][]byte {
	t.Helper()
	s, err := env.c.Client.CoreV1().Secrets(selfTLSNamespace).Get(ctx, selfTLSSecret, metav1.GetOptions{})
	if err != nil {
		t.Fatal(err)
	}
	return s.Data
}

// serviceAccountKubeconfig writes a kubeconfig with a bound token of the
// service account (created when missing), as a pod would have.
func serviceAccountKubeconfig(ctx context.Context, t *testing.T, dir, sa string) string {
	t.Helper()
	c := env.c.Client
	if _, err := c.CoreV1().ServiceAccounts(selfTLSNamespace).Get(ctx, sa, metav1.GetOptions{}); err != nil {
		if _, err := c.CoreV1().ServiceAccounts(selfTLSNamespace).Create(ctx, &corev1.ServiceAccount{ObjectMeta: metav1.ObjectMeta{Name: sa}}, metav1.CreateOptions{}); err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() {
			_ = c.CoreV1().ServiceAccounts(selfTLSNamespace).Delete(context.Background(), sa, metav1.DeleteOptions{})
		})
	}
	tr, err := c.CoreV1().ServiceAccounts(selfTLSNamespace).CreateToken(ctx, sa,
		&authenticationv1.TokenRequest{Spec: authenticationv1.TokenRequestSpec{ExpirationSeconds: ptr.To[int64](3600)}}, metav1.CreateOptions{})
	if err != nil {
		t.Fatal(err)
	}
	path := filepath.Join(dir, sa+".kubeconfig")
	kc := fmt.Sprintf(`apiVersion: v1
kind: Config
clusters: [{name: e2e, cluster: {server: %q, insecure-skip-tls-verify: true}}]
users: [{name: sa, user: {token: %q}}]
contexts: [{name: e2e, context: {cluster: e2e, user: sa}}]
current-context: e2e
`, env.c.Config.Host, tr.Status.Token)
	if err := os.WriteFile(path, []byte(kc), 0o600); err != nil {
		t.Fatal(err)
	}
	return path
}

type selfTLSReplica struct {
	addr, httpAddr, logPath string
}

func startSelfTLSReplica(t *testing.T, dir, name, kubeconfig string) *selfTLSReplica {
	t.Helper()
	cfg := filepath.Join(dir, "injector.yaml")
	if err := os.WriteFile(cfg, []byte(fmt.Sprintf("defaultTenant: prod\ninitImage: %s\ninitImagePullPolicy: Never\n", cluster.InitImage)), 0o600); err != nil {
		t.Fatal(err)
	}
	port, err := cluster.FreePort()
	if err != nil {
		t.Fatal(err)
	}
	httpPort, err := cluster.FreePort()
	if err != nil {
		t.Fatal(err)
	}
	r := &selfTLSReplica{addr: fmt.Sprintf("127.0.0.1:%d", port), httpAddr: fmt.Sprintf("127.0.0.1:%d", httpPort), logPath: filepath.Join(dir, name+".log")}
	logf, err := os.Create(r.logPath)
	if err != nil {
		t.Fatal(err)
	}
	cmd := exec.Command(env.bin, "injector", "--config", cfg, "--cert-mode=self", "--kubeconfig", kubeconfig,
		"--cert-hosts=127.0.0.1", "--cert-validity=30s", "--cert-renew-before=12s", "--cert-settle=3s", "--cert-check-interval=1s",
		"--addr", r.addr, "--http-addr", r.httpAddr)
	cmd.Env = append(os.Environ(), "POD_NAMESPACE="+selfTLSNamespace)
	cmd.Stdout, cmd.Stderr = logf, logf
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { stopCmd(cmd); _ = logf.Close() })
	return r
}

func (r *selfTLSReplica) log() string {
	b, _ := os.ReadFile(r.logPath)
	return string(tail(b))
}

func (r *selfTLSReplica) readyz(t *testing.T) (int, string) {
	t.Helper()
	resp, err := http.Get("http://" + r.httpAddr + "/readyz")
	if err != nil {
		return 0, err.Error()
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	return resp.StatusCode, string(b)
}

func (r *selfTLSReplica) waitReady(ctx context.Context, t *testing.T) {
	t.Helper()
	if err := cluster.Poll(ctx, 30*time.Second, "replica ready", func() bool { code, _ := r.readyz(t); return code == http.StatusOK }); err != nil {
		t.Fatalf("%v\n%s", err, r.log())
	}
}

// checkTrusted handshakes with the replica as the API server does: the
// webhook's current caBundle as roots, the URL's host as the name.
func (r *selfTLSReplica) checkTrusted(ctx context.Context, t *testing.T) {
	t.Helper()
	mwc, err := env.c.Client.AdmissionregistrationV1().MutatingWebhookConfigurations().Get(ctx, selfTLSWebhook, metav1.GetOptions{})
	if err != nil {
		t.Fatal(err)
	}
	pool := x509.NewCertPool()
	pool.AppendCertsFromPEM(mwc.Webhooks[0].ClientConfig.CABundle)
	conn, err := tls.Dial("tcp", r.addr, &tls.Config{RootCAs: pool, ServerName: "127.0.0.1", MinVersion: tls.VersionTLS12})
	if err != nil {
		// The bundle may move on between the read and the handshake (a CA
		// added); the served leaf must verify against the bundle read
		// just after, too.
		t.Errorf("replica %s serves a certificate the webhook's bundle does not verify: %v\n%s", r.addr, err, r.log())
		return
	}
	_ = conn.Close()
}

// balancer is a round-robin TCP proxy, so the API server reaches every
// replica behind one URL, as through a Service.
type balancer struct {
	addr     string
	mu       sync.Mutex
	backends []string
	n        int
}

func startBalancer(t *testing.T) *balancer {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = ln.Close() })
	b := &balancer{addr: ln.Addr().String()}
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			go b.proxy(c)
		}
	}()
	return b
}

func (b *balancer) add(addr string) {
	b.mu.Lock()
	defer b.mu.Unlock()
	b.backends = append(b.backends, addr)
}

func (b *balancer) proxy(c net.Conn) {
	defer c.Close()
	b.mu.Lock()
	if len(b.backends) == 0 {
		b.mu.Unlock()
		return
	}
	to := b.backends[b.n%len(b.backends)]
	b.n++
	b.mu.Unlock()
	up, err := net.Dial("tcp", to)
	if err != nil {
		return
	}
	defer up.Close()
	done := make(chan struct{}, 2)
	go func() { _, _ = io.Copy(up, c); done <- struct{}{} }()
	go func() { _, _ = io.Copy(c, up); done <- struct{}{} }()
	<-done
}

// admissionProbe creates pods in the probe namespace (server dry run) and
// records every admission that fails or comes back without the agent.
type admissionProbe struct {
	ctx    context.Context
	count  atomic.Int64
	mu     sync.Mutex
	failed []string
	quit   chan struct{}
	done   chan struct{}
}

func newAdmissionProbe(ctx context.Context, t *testing.T) *admissionProbe {
	return &admissionProbe{ctx: ctx, quit: make(chan struct{}), done: make(chan struct{})}
}

func (p *admissionProbe) try() {
	pod, err := env.c.Client.CoreV1().Pods(selfTLSProbeNS).Create(p.ctx, appPod(selfTLSProbeNS, nil), metav1.CreateOptions{DryRun: []string{metav1.DryRunAll}})
	p.count.Add(1)
	var fail string
	switch {
	case err != nil:
		fail = err.Error()
	case pod.Annotations[api.InjectedAnnotation] != "true":
		fail = "not injected: " + pod.Annotations[api.ReasonAnnotation]
	}
	if fail != "" {
		p.mu.Lock()
		p.failed = append(p.failed, time.Now().Format(time.RFC3339Nano)+" "+fail)
		p.mu.Unlock()
	}
}

func (p *admissionProbe) once(t *testing.T) {
	t.Helper()
	p.try()
	if f := p.failures(); len(f) > 0 {
		t.Fatalf("admission through the self-provisioned certificate: %s", f[0])
	}
}

func (p *admissionProbe) start() {
	go func() {
		defer close(p.done)
		tick := time.NewTicker(100 * time.Millisecond)
		defer tick.Stop()
		for {
			select {
			case <-p.quit:
				return
			case <-tick.C:
				p.try()
			}
		}
	}()
}

func (p *admissionProbe) stop() { close(p.quit); <-p.done }

func (p *admissionProbe) failures() []string {
	p.mu.Lock()
	defer p.mu.Unlock()
	return append([]string(nil), p.failed...)
}
