package injector

import (
	"bytes"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/json"
	"encoding/pem"
	"io"
	"math/big"
	"net"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"reflect"
	"strings"
	"sync"
	"testing"
	"time"

	jsonpatch "github.com/evanphx/json-patch/v5"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/testutil"
	admissionv1 "k8s.io/api/admission/v1"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/runtime"
	k8stypes "k8s.io/apimachinery/pkg/types"

	"github.com/oneagent-csi/oneagent-csi/api"
)

func reviewFor(t testing.TB, pod *corev1.Pod, uid string) []byte {
	t.Helper()
	raw := mustJSON(t, pod)
	return mustJSON(t, admissionv1.AdmissionReview{
		TypeMeta: metav1.TypeMeta{APIVersion: "admission.k8s.io/v1", Kind: "AdmissionReview"},
		Request: &admissionv1.AdmissionRequest{
			UID:       k8stypes.UID("uid-" + uid),
			Kind:      metav1.GroupVersionKind{Version: "v1", Kind: "Pod"},
			Resource:  metav1.GroupVersionResource{Version: "v1", Resource: "pods"},
			Namespace: "shop",
			Operation: admissionv1.Create,
			Object:    runtime.RawExtension{Raw: raw},
		},
	})
}

func decodeResponse(t testing.TB, body []byte) *admissionv1.AdmissionResponse {
	t.Helper()
	var r admissionv1.AdmissionReview
	if err := json.Unmarshal(body, &r); err != nil {
		t.Fatalf("response is not an AdmissionReview: %v\n%s", err, body)
	}
	if r.APIVersion != "admission.k8s.io/v1" || r.Kind != "AdmissionReview" || r.Response == nil {
		t.Fatalf("response = %s", body)
	}
	return r.Response
}

func newTestServer(t testing.TB, reg *prometheus.Registry) *Server {
	t.Helper()
	opts := ServerOptions{Config: testConfig(t)}
	if reg != nil {
		opts.Registerer, opts.Gatherer = reg, reg
	}
	s, err := NewServer(opts)
	if err != nil {
		t.Fatal(err)
	}
	return s
}

func post(h http.Handler, path string, body []byte) *httptest.ResponseRecorder {
	rec := httptest.NewRecorder()
	h.ServeHTTP(rec, httptest.NewRequest(http.MethodPost, path, bytes.NewReader(body)))
	return rec
}

func TestAdmissionInjectsAndPatches(t *testing.T) {
	reg := prometheus.NewRegistry()
	s := newTestServer(t, reg)
	h := s.Handler()
	pod := appPod()
	rec := post(h, PathPodOptIn, reviewFor(t, pod, "1"))
	if rec.Code != http.StatusOK {
		t.Fatalf("status %d", rec.Code)
	}
	resp := decodeResponse(t, rec.Body.Bytes())
	if !resp.Allowed || resp.UID != "uid-1" || resp.PatchType == nil || *resp.PatchType != admissionv1.PatchTypeJSONPatch {
		t.Fatalf("response = %+v", resp)
	}
	ops, err := jsonpatch.DecodePatch(resp.Patch)
	if err != nil {
		t.Fatal(err)
	}
	patched, err := ops.Apply(mustJSON(t, pod))
	if err != nil {
		t.Fatal(err)
	}
	var got corev1.Pod
	if err := json.Unmarshal(patched, &got); err != nil {
		t.Fatal(err)
	}
	checkInjected(t, &got, testConfig(t), "app")

	// Pod-level entry: a pod without the annotation is not touched.
	plain := appPod(func(p *corev1.Pod) { p.Annotations = nil })
	resp = decodeResponse(t, post(h, PathPodOptIn, reviewFor(t, plain, "2")).Body.Bytes())
	if !resp.Allowed || resp.Patch != nil {
		t.Fatalf("unselected pod got %+v", resp)
	}
	// Namespace entry: the same pod is injected.
	resp = decodeResponse(t, post(h, PathNamespaceOptIn, reviewFor(t, plain, "3")).Body.Bytes())
	if !resp.Allowed || resp.Patch == nil {
		t.Fatalf("pod in a labelled namespace got %+v", resp)
	}
	if got := testutil.ToFloat64(s.requests.WithLabelValues(resultInjected)); got != 2 {
		t.Errorf("injected requests = %v, want 2", got)
	}
	if got := testutil.ToFloat64(s.requests.WithLabelValues(resultSkipped)); got != 1 {
		t.Errorf("skipped requests = %v, want 1", got)
	}
	if n, err := testutil.GatherAndCount(reg, "oneagent_csi_injector_request_duration_seconds"); err != nil || n != 1 {
		t.Errorf("latency histogram: %d series, %v", n, err)
	}
}

func TestAdmissionNeverDenies(t *testing.T) {
	valid := reviewFor(t, appPod(), "ok")
	edit := func(f func(r map[string]any)) []byte {
		var r map[string]any
		_ = json.Unmarshal(valid, &r)
		f(r)
		b, _ := json.Marshal(r)
		return b
	}
	req := func(r map[string]any) map[string]any { return r["request"].(map[string]any) }
	tests := []struct {
		name string
		body []byte
		uid  string
		warn string
	}{
		{"not json", []byte("{nope"), "", "invalid character"},
		{"empty body", nil, "", "unexpected end"},
		{"v1beta1 review", edit(func(r map[string]any) { r["apiVersion"] = "admission.k8s.io/v1beta1" }), "uid-ok", "admission.k8s.io/v1"},
		{"no request", edit(func(r map[string]any) { delete(r, "request") }), "", "no request"},
		{"no uid", edit(func(r map[string]any) { delete(req(r), "uid") }), "", "uid"},
		{"a deployment", edit(func(r map[string]any) {
			req(r)["kind"] = map[string]any{"group": "apps", "version": "v1", "kind": "Deployment"}
		}), "uid-ok", "only core/v1 Pod"},
		{"a subresource", edit(func(r map[string]any) { req(r)["subResource"] = "ephemeralcontainers" }), "uid-ok", "subResource"},
		{"an update", edit(func(r map[string]any) { req(r)["operation"] = "UPDATE" }), "uid-ok", "only CREATE"},
		{"no object", edit(func(r map[string]any) { delete(req(r), "object") }), "uid-ok", "object is empty"},
		{"object is not a pod", edit(func(r map[string]any) { req(r)["object"] = []any{1, 2} }), "uid-ok", "does not decode"},
		{"oversized", append(valid[:len(valid)-1], []byte(`,"x":"`+strings.Repeat("a", maxReviewBytes)+`"}`)...), "", "exceeds"},
	}
	h := newTestServer(t, nil).Handler()
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			rec := post(h, PathPodOptIn, tc.body)
			if rec.Code != http.StatusOK {
				t.Fatalf("status %d", rec.Code)
			}
			resp := decodeResponse(t, rec.Body.Bytes())
			if !resp.Allowed || resp.Patch != nil || string(resp.UID) != tc.uid {
				t.Fatalf("response = %+v", resp)
			}
			if len(resp.Warnings) != 1 || !strings.Contains(resp.Warnings[0], tc.warn) {
				t.Fatalf("warnings = %q, want one mentioning %q", resp.Warnings, tc.warn)
			}
		})
	}
}

// FuzzAdmissionReview feeds arbitrary bodies to the webhook: every answer
// must be 200 with an allowed AdmissionReview, whatever the input. `make
// test` runs it briefly with -fuzz; plain go test runs the seeds.
func FuzzAdmissionReview(f *testing.F) {
	f.Add(reviewFor(f, appPod(), "1"))
	f.Add(reviewFor(f, appPod(func(p *corev1.Pod) { p.Spec.Containers = nil }), "2"))
	f.Add([]byte(`{"apiVersion":"admission.k8s.io/v1","kind":"AdmissionReview","request":{"uid":"x","kind":{"version":"v1","kind":"Pod"},"operation":"CREATE","object":{"metadata":{"annotations":{"oneagent.dynatrace.com/inject":"true"}},"spec":{"containers":[{"name":"istio-proxy"}]}}}}`))
	f.Add([]byte(`{"apiVersion":"admission.k8s.io/v1","kind":"AdmissionReview","request":{"uid":"x","kind":{"version":"v1","kind":"Pod"},"operation":"CREATE","object":{"metadata":{"annotations":{"oneagent.dynatrace.com/injected":"true"}},"spec":{"initContainers":[{"name":"dynatrace-oneagent-init"}],"volumes":[{"name":"oneagent"}]}}}}`))
	f.Add([]byte(`{}`))
	f.Add([]byte(`null`))
	for _, name := range []string{"b-native-sidecar.yaml", "e-dynatrace-then-istio-classic.yaml"} {
		p := loadPod(f, name)
		p.Annotations[api.InjectAnnotation] = "true"
		f.Add(reviewFor(f, p, name))
	}
	h := newTestServer(f, nil).Handler()
	f.Fuzz(func(t *testing.T, body []byte) {
		for _, path := range []string{PathPodOptIn, PathNamespaceOptIn} {
			rec := post(h, path, body)
			if rec.Code != http.StatusOK {
				t.Fatalf("status %d for %q", rec.Code, body)
			}
			resp := decodeResponse(t, rec.Body.Bytes())
			if !resp.Allowed {
				t.Fatalf("denied: %+v", resp)
			}
			if resp.Patch != nil {
				if _, err := jsonpatch.DecodePatch(resp.Patch); err != nil {
					t.Fatalf("patch does not decode: %v", err)
				}
			}
		}
	})
}

// writeCert writes a self-signed certificate for 127.0.0.1 with the given
// serial number, replacing the files atomically (as a Secret volume update
// does).
func writeCert(t testing.TB, dir string, serial int64) *x509.Certificate {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	tmpl := &x509.Certificate{SerialNumber: big.NewInt(serial), Subject: pkix.Name{CommonName: "oneagent-csi-injector"},
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(time.Hour), IPAddresses: []net.IP{net.ParseIP("127.0.0.1")},
		KeyUsage: x509.KeyUsageDigitalSignature, ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth}, BasicConstraintsValid: true, IsCA: true}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		t.Fatal(err)
	}
	kder, err := x509.MarshalECPrivateKey(key)
	if err != nil {
		t.Fatal(err)
	}
	for name, block := range map[string]*pem.Block{"tls.crt": {Type: "CERTIFICATE", Bytes: der}, "tls.key": {Type: "EC PRIVATE KEY", Bytes: kder}} {
		tmp := filepath.Join(dir, "."+name+".tmp")
		if err := os.WriteFile(tmp, pem.EncodeToMemory(block), 0o600); err != nil {
			t.Fatal(err)
		}
		if err := os.Rename(tmp, filepath.Join(dir, name)); err != nil {
			t.Fatal(err)
		}
	}
	cert, _ := x509.ParseCertificate(der)
	return cert
}

func TestHTTPSEndToEndWithRotation(t *testing.T) {
	dir := t.TempDir()
	first := writeCert(t, dir, 1)
	certs, err := NewCertReloader(filepath.Join(dir, "tls.crt"), filepath.Join(dir, "tls.key"), 10*time.Millisecond)
	if err != nil {
		t.Fatal(err)
	}
	s, err := NewServer(ServerOptions{Config: testConfig(t), Certs: certs})
	if err != nil {
		t.Fatal(err)
	}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	srv := &http.Server{Handler: s.Handler(), ReadHeaderTimeout: 5 * time.Second}
	go func() { _ = srv.Serve(tls.NewListener(ln, certs.TLSConfig())) }()
	t.Cleanup(func() { _ = srv.Close() })
	url := "https://" + ln.Addr().String()

	pool := x509.NewCertPool()
	pool.AddCert(first)
	var poolMu sync.Mutex
	// A new connection per request, as after a rotation the API server
	// makes new connections.
	call := func(uid string) (*admissionv1.AdmissionResponse, int64, error) {
		poolMu.Lock()
		client := &http.Client{Transport: &http.Transport{TLSClientConfig: &tls.Config{RootCAs: pool.Clone(), MinVersion: tls.VersionTLS12}, DisableKeepAlives: true}}
		poolMu.Unlock()
		resp, err := client.Post(url+PathPodOptIn, "application/json", bytes.NewReader(reviewFor(t, appPod(), uid)))
		if err != nil {
			return nil, 0, err
		}
		defer resp.Body.Close()
		body, _ := io.ReadAll(resp.Body)
		return decodeResponse(t, body), resp.TLS.PeerCertificates[0].SerialNumber.Int64(), nil
	}
	resp, serial, err := call("a")
	if err != nil || !resp.Allowed || resp.Patch == nil || serial != 1 {
		t.Fatalf("first call: %+v serial %d err %v", resp, serial, err)
	}

	// A broken pair is not picked up: the old certificate keeps serving.
	if err := os.WriteFile(filepath.Join(dir, "tls.crt"), []byte("garbage"), 0o600); err != nil {
		t.Fatal(err)
	}
	if _, serial, err := call("b"); err != nil || serial != 1 {
		t.Fatalf("after a broken rotation: serial %d, %v", serial, err)
	}

	second := writeCert(t, dir, 2)
	poolMu.Lock()
	pool.AddCert(second)
	poolMu.Unlock()
	deadline := time.Now().Add(10 * time.Second)
	for {
		_, serial, err := call("c")
		if err == nil && serial == 2 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("rotation not picked up: serial %d, %v", serial, err)
		}
		time.Sleep(10 * time.Millisecond)
	}
	if err := certs.Ready(); err != nil {
		t.Fatal(err)
	}
}

func TestNewCertReloaderNamesTheFile(t *testing.T) {
	dir := t.TempDir()
	_, err := NewCertReloader(filepath.Join(dir, "missing.crt"), filepath.Join(dir, "missing.key"), 0)
	if err == nil || !strings.Contains(err.Error(), "certificate file") {
		t.Fatalf("err = %v", err)
	}
}

// TestDecodeMatchesEncodingJSON pins the faster decoder to encoding/json's
// result for every fixture pod and for admission reviews.
func TestDecodeMatchesEncodingJSON(t *testing.T) {
	files, err := filepath.Glob(filepath.Join("testdata", "istio", "*-*.yaml"))
	if err != nil || len(files) == 0 {
		t.Fatalf("no fixtures: %v", err)
	}
	for _, f := range files {
		if strings.Contains(f, "webhookconfiguration") {
			continue
		}
		pod := loadPod(t, filepath.Base(f))
		for _, raw := range [][]byte{mustJSON(t, pod), reviewFor(t, pod, "x")} {
			var std, fast admissionv1.AdmissionReview
			var stdPod, fastPod corev1.Pod
			stdErr, fastErr := json.Unmarshal(raw, &stdPod), decodeJSON(raw, &fastPod)
			if (stdErr == nil) != (fastErr == nil) || !reflect.DeepEqual(stdPod, fastPod) {
				t.Errorf("%s: pod decodes differently: %v / %v", f, stdErr, fastErr)
			}
			stdErr, fastErr = json.Unmarshal(raw, &std), decodeJSON(raw, &fast)
			if (stdErr == nil) != (fastErr == nil) || !reflect.DeepEqual(std, fast) {
				t.Errorf("%s: review decodes differently: %v / %v", f, stdErr, fastErr)
			}
		}
	}
}
