package injector

import (
	"crypto/tls"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"runtime/debug"
	"time"

	gojson "github.com/goccy/go-json"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/promhttp"
	admissionv1 "k8s.io/api/admission/v1"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/klog/v2"
)

// Webhook paths. The MutatingWebhookConfiguration has two entries: one
// whose namespaceSelector matches namespaces labelled
// oneagent.dynatrace.com/inject=true (every pod there is opted in), and one
// for all other namespaces, where only pods with the inject annotation are
// injected. So the webhook knows a namespace's label without reading
// namespaces from the API server.
const (
	PathNamespaceOptIn = "/inject/namespace"
	PathPodOptIn       = "/inject/pod"
)

// maxReviewBytes bounds a request body; the API server's own limit for an
// object is about 3 MiB.
const maxReviewBytes = 4 << 20

// Request results counted in metrics.
const (
	resultInjected    = "injected"
	resultNotInjected = "not_injected"
	resultSkipped     = "skipped"
	resultError       = "error"
)

// ServerOptions configure the webhook's HTTP side.
type ServerOptions struct {
	// Config of the mutation. Required, already completed.
	Config *Config
	// Certs serves the TLS certificate (files: CertReloader; self-provisioned:
	// selftls.Provider). Required for HTTPS; Handler works without it.
	Certs CertSource
	// Registerer receives the webhook's metrics. Default: none.
	Registerer prometheus.Registerer
	// Gatherer serves /metrics. Default: none (no /metrics).
	Gatherer prometheus.Gatherer
	// Now is the clock. Default time.Now.
	Now func() time.Time
}

// CertSource is where the webhook's serving certificate comes from. Ready
// fails while the webhook cannot be called with success (no certificate, or
// one the API server does not trust); /readyz reports it.
type CertSource interface {
	GetCertificate(*tls.ClientHelloInfo) (*tls.Certificate, error)
	Ready() error
}

// Server answers AdmissionReviews for pods.
type Server struct {
	opts     ServerOptions
	requests *prometheus.CounterVec
	latency  prometheus.Histogram
}

// NewServer returns a webhook server.
func NewServer(opts ServerOptions) (*Server, error) {
	if opts.Config == nil {
		return nil, errors.New("injector: Config is required")
	}
	if opts.Now == nil {
		opts.Now = time.Now
	}
	s := &Server{opts: opts,
		requests: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "oneagent_csi_injector_requests_total",
			Help: "Admission requests by result (injected, not_injected, skipped, error). Every request is allowed.",
		}, []string{"result"}),
		latency: prometheus.NewHistogram(prometheus.HistogramOpts{
			Name:    "oneagent_csi_injector_request_duration_seconds",
			Help:    "Time to answer an admission request, decoding and patch included.",
			Buckets: []float64{.0001, .00025, .0005, .001, .0025, .005, .01, .025, .05, .1, .5},
		}),
	}
	if opts.Registerer != nil {
		if err := opts.Registerer.Register(s.requests); err != nil {
			return nil, err
		}
		if err := opts.Registerer.Register(s.latency); err != nil {
			return nil, err
		}
	}
	return s, nil
}

// Handler serves the two webhook paths, /healthz, /readyz and /metrics.
func (s *Server) Handler() http.Handler {
	mux := http.NewServeMux()
	mux.HandleFunc(PathNamespaceOptIn, s.serveAdmission(true))
	mux.HandleFunc(PathPodOptIn, s.serveAdmission(false))
	mux.Handle("/", s.HealthHandler())
	return mux
}

// HealthHandler serves /healthz, /readyz (a certificate is loaded) and
// /metrics.
func (s *Server) HealthHandler() http.Handler {
	mux := http.NewServeMux()
	mux.HandleFunc("/healthz", func(w http.ResponseWriter, _ *http.Request) { _, _ = io.WriteString(w, "ok\n") })
	mux.HandleFunc("/readyz", func(w http.ResponseWriter, _ *http.Request) {
		if s.opts.Certs != nil {
			if err := s.opts.Certs.Ready(); err != nil {
				http.Error(w, "not ready: "+err.Error(), http.StatusServiceUnavailable)
				return
			}
		}
		_, _ = io.WriteString(w, "ok\n")
	})
	if s.opts.Gatherer != nil {
		mux.Handle("/metrics", promhttp.HandlerFor(s.opts.Gatherer, promhttp.HandlerOpts{}))
	}
	return mux
}

// serveAdmission answers one AdmissionReview. It never denies: whatever
// goes wrong, the pod is allowed unpatched, with a warning for the user and
// a log line for the operator.
func (s *Server) serveAdmission(namespaceOptIn bool) http.HandlerFunc {
	return func(w http.ResponseWriter, r *http.Request) {
		start := s.opts.Now()
		result := resultError
		var uid string
		defer func() {
			if p := recover(); p != nil {
				klog.ErrorS(fmt.Errorf("panic: %v", p), "admission handler panicked; pod allowed unchanged", "uid", uid, "stack", string(debug.Stack()))
				writeReview(w, allowed(uid, nil, "oneagent-csi injector failed internally; the pod was admitted without the agent"))
				result = resultError
			}
			s.requests.WithLabelValues(result).Inc()
			s.latency.Observe(s.opts.Now().Sub(start).Seconds())
		}()
		if r.Method != http.MethodPost {
			http.Error(w, "POST an AdmissionReview", http.StatusMethodNotAllowed)
			return
		}
		body, err := io.ReadAll(io.LimitReader(r.Body, maxReviewBytes+1))
		if err == nil && len(body) > maxReviewBytes {
			err = fmt.Errorf("body exceeds %d bytes", maxReviewBytes)
		}
		var review admissionv1.AdmissionReview
		if err == nil {
			err = decodeJSON(body, &review)
		}
		if review.Request != nil {
			uid = string(review.Request.UID)
		}
		if err == nil {
			err = checkReview(&review)
		}
		if err != nil {
			klog.InfoS("malformed admission review; allowed unchanged", "uid", uid, "err", err)
			writeReview(w, allowed(uid, nil, "oneagent-csi injector: "+err.Error()+"; admitted without the agent"))
			return
		}
		req := review.Request
		var pod corev1.Pod
		if err := decodeJSON(req.Object.Raw, &pod); err != nil {
			klog.InfoS("pod does not decode; allowed unchanged", "uid", uid, "namespace", req.Namespace, "err", err)
			writeReview(w, allowed(uid, nil, "oneagent-csi injector: pod does not decode: "+err.Error()+"; admitted without the agent"))
			return
		}
		out, res := Mutate(&pod, Request{Namespace: req.Namespace, NamespaceOptIn: namespaceOptIn}, s.opts.Config)
		podRef := klog.KRef(req.Namespace, firstNonEmpty(pod.Name, pod.GenerateName))
		if out == &pod {
			result = resultSkipped
			klog.V(4).InfoS("pod not selected", "pod", podRef, "reason", res.Reason)
			writeReview(w, allowed(uid, nil, ""))
			return
		}
		patch, err := CreatePatch(&pod, out)
		if err != nil {
			klog.ErrorS(err, "cannot build the patch; pod allowed unchanged", "pod", podRef)
			writeReview(w, allowed(uid, nil, "oneagent-csi injector: "+err.Error()+"; admitted without the agent"))
			return
		}
		if res.Injected {
			result = resultInjected
			klog.V(2).InfoS("injected", "pod", podRef, "containers", res.Containers, "containerConfig", res.ContainerConfig, "skipped", res.Skipped)
		} else {
			result = resultNotInjected
			klog.InfoS("not injected", "pod", podRef, "reason", res.Reason)
		}
		writeReview(w, allowed(uid, patch, ""))
	}
}

// decodeJSON decodes with goccy/go-json: it gives the same result as
// encoding/json for Kubernetes types (checked in the tests) in about 40% of
// the time, and decoding the pod is the largest cost of an admission.
func decodeJSON(data []byte, v any) error { return gojson.Unmarshal(data, v) }

// checkReview accepts only v1 AdmissionReviews that create a pod.
func checkReview(r *admissionv1.AdmissionReview) error {
	switch {
	case r.APIVersion != admissionv1.SchemeGroupVersion.String() || r.Kind != "AdmissionReview":
		return fmt.Errorf("apiVersion/kind %q/%q: want admission.k8s.io/v1 AdmissionReview", r.APIVersion, r.Kind)
	case r.Request == nil:
		return errors.New("review has no request")
	case r.Request.UID == "":
		return errors.New("request.uid is empty")
	case r.Request.Kind.Group != "" || r.Request.Kind.Kind != "Pod":
		return fmt.Errorf("request.kind %s: only core/v1 Pod is handled", r.Request.Kind.String())
	case r.Request.SubResource != "":
		return fmt.Errorf("request.subResource %q: only pods themselves are handled", r.Request.SubResource)
	case r.Request.Operation != admissionv1.Create:
		return fmt.Errorf("request.operation %s: only CREATE is handled", r.Request.Operation)
	case len(r.Request.Object.Raw) == 0:
		return errors.New("request.object is empty")
	}
	return nil
}

func allowed(uid string, patch []byte, warning string) *admissionv1.AdmissionReview {
	resp := &admissionv1.AdmissionResponse{UID: types.UID(uid), Allowed: true}
	if len(patch) > 0 {
		pt := admissionv1.PatchTypeJSONPatch
		resp.Patch, resp.PatchType = patch, &pt
	}
	if warning != "" {
		resp.Warnings = []string{warning}
	}
	return &admissionv1.AdmissionReview{
		TypeMeta: metav1.TypeMeta{APIVersion: admissionv1.SchemeGroupVersion.String(), Kind: "AdmissionReview"},
		Response: resp,
	}
}

func writeReview(w http.ResponseWriter, review *admissionv1.AdmissionReview) {
	data, err := json.Marshal(review)
	if err != nil {
		http.Error(w, err.Error(), http.StatusInternalServerError)
		return
	}
	w.Header().Set("Content-Type", "application/json")
	_, _ = w.Write(data)
}
