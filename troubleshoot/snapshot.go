package troubleshoot

import (
	admissionregistrationv1 "k8s.io/api/admissionregistration/v1"
	appsv1 "k8s.io/api/apps/v1"
	corev1 "k8s.io/api/core/v1"
	discoveryv1 "k8s.io/api/discovery/v1"
	networkingv1 "k8s.io/api/networking/v1"
	storagev1 "k8s.io/api/storage/v1"

	"github.com/oneagent-csi/oneagent-csi/provisioner"
	"github.com/oneagent-csi/oneagent-csi/storage"
)

// Install names the objects of an installation (deploy/kubernetes, the
// Helm chart).
type Install struct {
	// Namespace of the driver and injector. Default oneagent-csi.
	Namespace string
	// DriverName is the CSIDriver's name. Default csi.oneagent.dynatrace.com.
	DriverName string
	// DaemonSet of the node driver. Default oneagent-csi-node.
	DaemonSet string
	// Webhook is the MutatingWebhookConfiguration. Default oneagent-csi-injector.
	Webhook string
	// CertSecrets hold the certificate the injector serves, first found
	// wins: the self-provisioned one, then cert-manager's. Default
	// oneagent-csi-injector-certs, oneagent-csi-injector-tls.
	CertSecrets []string
	// InjectorConfig is the injector's ConfigMap (injector.yaml). Default
	// oneagent-csi-injector.
	InjectorConfig string
	// NodeConfig is the node ConfigMap (its config.yaml names the
	// tenants). Default oneagent-csi-node.
	NodeConfig string
}

func (i *Install) defaults() {
	if i.Namespace == "" {
		i.Namespace = "oneagent-csi"
	}
	if i.DriverName == "" {
		i.DriverName = "csi.oneagent.dynatrace.com"
	}
	if i.DaemonSet == "" {
		i.DaemonSet = "oneagent-csi-node"
	}
	if i.Webhook == "" {
		i.Webhook = "oneagent-csi-injector"
	}
	if len(i.CertSecrets) == 0 {
		i.CertSecrets = []string{"oneagent-csi-injector-certs", "oneagent-csi-injector-tls"}
	}
	if i.InjectorConfig == "" {
		i.InjectorConfig = "oneagent-csi-injector"
	}
	if i.NodeConfig == "" {
		i.NodeConfig = "oneagent-csi-node"
	}
}

// Snapshot is what the checks read. A nil pointer is an object that does
// not exist; Errors holds what could not be read (forbidden, say) by what.
type Snapshot struct {
	Install    Install
	CSIDriver  *storagev1.CSIDriver
	DaemonSet  *appsv1.DaemonSet
	DriverPods []corev1.Pod
	Nodes      []corev1.Node
	CSINodes   []storagev1.CSINode
	Webhook    *admissionregistrationv1.MutatingWebhookConfiguration
	// ServiceEndpoints are the EndpointSlices of each Service the webhook
	// calls, by namespace/name.
	ServiceEndpoints map[string][]discoveryv1.EndpointSlice
	// ServingCert is the PEM certificate chain the injector serves (its
	// Secret's tls.crt) and the Secret it came from.
	ServingCert       []byte
	ServingCertSecret string
	// ServedCerts are what the injector pods behind each webhook Service
	// (namespace/name) presented in a TLS handshake through port-forward.
	ServedCerts map[string][]ServedCert
	// EnvoyMetrics is the injector's envoyMetrics setting.
	EnvoyMetrics bool
	// TenantHosts are the host names of the tenants' apiURLs.
	TenantHosts []string

	// Namespace scope (empty Namespace: none).
	Namespace       *corev1.Namespace
	Pods            []corev1.Pod
	Events          []corev1.Event
	NetworkPolicies []networkingv1.NetworkPolicy
	// NodeVolumes are the driver's volume records by node, for the nodes
	// of the checked pods; a node whose driver could not be asked is in
	// Errors as "volumes on <node>".
	NodeVolumes map[string][]storage.Volume
	// TenantChecks are the tenant checks run by the drivers, by node: on
	// the nodes of the checked pods, or on one node without a namespace.
	TenantChecks map[string][]provisioner.TenantCheck

	// Istio: nil MeshConfig means Istio's config map was not found.
	MeshConfig *string
	// ServiceEntryHosts are the hosts of every ServiceEntry the user can
	// read; nil when the CRD is absent.
	ServiceEntryHosts []string

	Errors map[string]string
}
