package selftls

import (
	"context"
	"fmt"

	admissionregistrationv1 "k8s.io/api/admissionregistration/v1"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/runtime/schema"
	"k8s.io/apimachinery/pkg/runtime/serializer"
	"k8s.io/client-go/rest"
)

// Client is the API the Provider needs: one Secret and one webhook
// configuration. Errors are the API server's (apierrors.IsNotFound,
// IsConflict, IsForbidden work on them).
type Client interface {
	GetSecret(ctx context.Context, namespace, name string) (*corev1.Secret, error)
	CreateSecret(ctx context.Context, s *corev1.Secret) (*corev1.Secret, error)
	// UpdateSecret fails with a Conflict when s.ResourceVersion is not the
	// stored one.
	UpdateSecret(ctx context.Context, s *corev1.Secret) (*corev1.Secret, error)
	GetWebhook(ctx context.Context, name string) (*admissionregistrationv1.MutatingWebhookConfiguration, error)
	// UpdateWebhook fails with a Conflict like UpdateSecret.
	UpdateWebhook(ctx context.Context, w *admissionregistrationv1.MutatingWebhookConfiguration) (*admissionregistrationv1.MutatingWebhookConfiguration, error)
}

// restClient implements Client with two REST clients whose scheme knows
// only these two groups: client-go's typed clientset would link every API
// group into the binary (about 20 MB).
type restClient struct {
	core, admission rest.Interface
}

// NewClient returns a Client for cfg.
func NewClient(cfg *rest.Config) (Client, error) {
	scheme := runtime.NewScheme()
	if err := corev1.AddToScheme(scheme); err != nil {
		return nil, err
	}
	if err := admissionregistrationv1.AddToScheme(scheme); err != nil {
		return nil, err
	}
	metav1.AddToGroupVersion(scheme, schema.GroupVersion{Version: "v1"})
	codecs := serializer.NewCodecFactory(scheme).WithoutConversion()
	mk := func(path string, gv schema.GroupVersion) (rest.Interface, error) {
		c := rest.CopyConfig(cfg)
		c.APIPath, c.GroupVersion, c.NegotiatedSerializer = path, &gv, codecs
		if c.UserAgent == "" {
			c.UserAgent = "oneagent-csi-injector"
		}
		rc, err := rest.RESTClientFor(c)
		if err != nil {
			return nil, fmt.Errorf("kubernetes client: %w", err)
		}
		return rc, nil
	}
	core, err := mk("/api", corev1.SchemeGroupVersion)
	if err != nil {
		return nil, err
	}
	admission, err := mk("/apis", admissionregistrationv1.SchemeGroupVersion)
	if err != nil {
		return nil, err
	}
	return &restClient{core: core, admission: admission}, nil
}

func (c *restClient) GetSecret(ctx context.Context, namespace, name string) (*corev1.Secret, error) {
	out := &corev1.Secret{}
	return out, c.core.Get().Namespace(namespace).Resource("secrets").Name(name).Do(ctx).Into(out)
}

func (c *restClient) CreateSecret(ctx context.Context, s *corev1.Secret) (*corev1.Secret, error) {
	out := &corev1.Secret{}
	return out, c.core.Post().Namespace(s.Namespace).Resource("secrets").Body(s).Do(ctx).Into(out)
}

func (c *restClient) UpdateSecret(ctx context.Context, s *corev1.Secret) (*corev1.Secret, error) {
	out := &corev1.Secret{}
	return out, c.core.Put().Namespace(s.Namespace).Resource("secrets").Name(s.Name).Body(s).Do(ctx).Into(out)
}

func (c *restClient) GetWebhook(ctx context.Context, name string) (*admissionregistrationv1.MutatingWebhookConfiguration, error) {
	out := &admissionregistrationv1.MutatingWebhookConfiguration{}
	return out, c.admission.Get().Resource("mutatingwebhookconfigurations").Name(name).Do(ctx).Into(out)
}

func (c *restClient) UpdateWebhook(ctx context.Context, w *admissionregistrationv1.MutatingWebhookConfiguration) (*admissionregistrationv1.MutatingWebhookConfiguration, error) {
	out := &admissionregistrationv1.MutatingWebhookConfiguration{}
	return out, c.admission.Put().Resource("mutatingwebhookconfigurations").Name(w.Name).Body(w).Do(ctx).Into(out)
}
