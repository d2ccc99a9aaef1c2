// Package e2e runs oneagent-csi's node driver and injector against a real
// kube-apiserver, etcd, kubelet and containerd on this machine (loopback
// only). Run as root: `make e2e` (also part of `make test`).
package e2e

import (
	"context"
	"encoding/json"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	admissionregistrationv1 "k8s.io/api/admissionregistration/v1"
	corev1 "k8s.io/api/core/v1"
	storagev1 "k8s.io/api/storage/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/utils/ptr"
	"sigs.k8s.io/yaml"

	"github.com/oneagent-csi/oneagent-csi/api"
	"github.com/oneagent-csi/oneagent-csi/test/e2e/cluster"
	"github.com/oneagent-csi/oneagent-csi/test/faketenant"
)

// env is shared by the scenarios: one cluster, one node driver, one
// injector.
var env struct {
	c          *cluster.Cluster
	tenant     *faketenant.Server
	bin        string
	nodeCfg    string
	nodeConfig map[string]any // what nodeCfg holds
	agentSO    []byte         // the agent library built from agentso/
	node       *exec.Cmd
	nodeLog    string
	adminSock  string
	httpAddr   string // the node's /metrics
	dataDir    string
	csiSocket  string
	injector   *exec.Cmd
	k8sBin     string
	skipReason string
}

func TestMain(m *testing.M) {
	os.Exit(run(m))
}

func run(m *testing.M) int {
	if os.Geteuid() != 0 {
		env.skipReason = "needs root (mounts, containerd, kubelet)"
		return m.Run()
	}
	ctx := context.Background()
	fail := func(err error) int {
		fmt.Fprintln(os.Stderr, "e2e setup:", err)
		return 1
	}
	k8sBin := os.Getenv("E2E_K8S_BIN")
	if k8sBin == "" {
		out, err := exec.Command("scripts/build-k8s.sh").Output()
		if err != nil {
			return fail(fmt.Errorf("build-k8s.sh: %w", err))
		}
		k8sBin = strings.TrimSpace(string(out))
	}
	env.k8sBin = k8sBin
	work, err := os.MkdirTemp("", "oneagent-csi-e2e-")
	if err != nil {
		return fail(err)
	}
	defer os.RemoveAll(work)
	env.bin = os.Getenv("ONEAGENT_CSI_BIN")
	if env.bin == "" {
		env.bin = filepath.Join(work, "oneagent-csi")
		b := exec.Command("go", "build", "-o", env.bin, "github.com/oneagent-csi/oneagent-csi/cmd/oneagent-csi")
		b.Env = append(os.Environ(), "CGO_ENABLED=0")
		if out, err := b.CombinedOutput(); err != nil {
			return fail(fmt.Errorf("build oneagent-csi: %w\n%s", err, out))
		}
	}
	so := filepath.Join(work, "liboneagentproc.so")
	if out, err := exec.Command("gcc", "-shared", "-fPIC", "-O2", "-Wall", "-o", so, "agentso/liboneagentproc.c").CombinedOutput(); err != nil {
		return fail(fmt.Errorf("gcc: %w\n%s", err, out))
	}
	soBytes, err := os.ReadFile(so)
	if err != nil {
		return fail(err)
	}
	env.agentSO = soBytes
	env.tenant, err = faketenant.Start(faketenant.Options{CacheDir: filepath.Join(work, "modules"),
		ExtraFiles: map[string][]byte{api.AgentLibraryRelativePath: soBytes}})
	if err != nil {
		return fail(err)
	}
	defer env.tenant.Close()

	c, err := cluster.Start(ctx, cluster.Options{K8sBin: k8sBin, OneAgentCSI: env.bin, Image: os.Getenv("ONEAGENT_CSI_IMAGE"), Dir: filepath.Join(work, "cluster")})
	if err != nil {
		return fail(err)
	}
	env.c = c
	code := 1
	defer func() {
		if code != 0 {
			fmt.Fprintln(os.Stderr, c.LogTails())
			if b, err := os.ReadFile(env.nodeLog); err == nil {
				fmt.Fprintf(os.Stderr, "--- node log ---\n%s\n", tail(b))
			}
		}
		deleteAllPods(ctx)
		stopCmd(env.injector)
		stopCmd(env.node)
		c.Stop()
	}()
	if err := startNode(ctx, work); err != nil {
		return fail(err)
	}
	if err := startInjector(ctx, work); err != nil {
		return fail(err)
	}
	code = m.Run()
	return code
}

func tail(b []byte) []byte {
	if len(b) > 6000 {
		return b[len(b)-6000:]
	}
	return b
}

func stopCmd(cmd *exec.Cmd) {
	if cmd == nil || cmd.Process == nil || cmd.ProcessState != nil {
		return
	}
	_ = cmd.Process.Signal(os.Interrupt)
	done := make(chan struct{})
	go func() { _ = cmd.Wait(); close(done) }()
	select {
	case <-done:
	case <-time.After(10 * time.Second):
		_ = cmd.Process.Kill()
		<-done
	}
}

// startNode runs `oneagent-csi node` as a host process registered with the
// kubelet, configured as deploy/kubernetes/node-config.yaml configures it.
func startNode(ctx context.Context, work string) error {
	env.dataDir = filepath.Join(work, "data")
	env.csiSocket = filepath.Join(work, "csi", "csi.sock")
	env.adminSock = filepath.Join(work, "csi", "admin.sock")
	// A fixed port (picked free now), so that benchmarks can read the
	// node's metrics; the node keeps it across relaunches.
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return err
	}
	env.httpAddr = l.Addr().String()
	_ = l.Close()
	tokenFile := filepath.Join(work, "token")
	if err := os.WriteFile(tokenFile, []byte(env.tenant.Token()), 0o600); err != nil {
		return err
	}
	caFile := filepath.Join(work, "tenant-ca.pem")
	if err := env.tenant.WriteCA(caFile); err != nil {
		return err
	}
	cfg := map[string]any{
		"nodeID": cluster.NodeName, "dataDir": env.dataDir, "csiSocket": env.csiSocket, "kubeletSocket": env.csiSocket,
		"registrationDir": filepath.Join(env.c.KubeletRoot, "plugins_registry"), "httpAddr": env.httpAddr, "adminSocket": env.adminSock,
		"publishWait": "5s", "kubeletDir": env.c.KubeletRoot,
		"client": map[string]any{"attempts": 2, "backoffBase": "100ms", "backoffMax": "500ms", "requestTimeout": "5s"},
		"tenants": []any{map[string]any{"name": "prod", "apiURL": env.tenant.URL, "tokenFile": tokenFile, "caFile": caFile},
			// A second team's tenant: only its own namespaces may use it.
			map[string]any{"name": "team-b", "apiURL": env.tenant.URL, "tokenFile": tokenFile, "caFile": caFile,
				"namespaces": []string{"team-b-*"}}},
	}
	env.nodeCfg = filepath.Join(work, "node.yaml")
	if err := writeNodeConfig(cfg); err != nil {
		return err
	}
	if err := launchNode(); err != nil {
		return err
	}
	driver := &storagev1.CSIDriver{ObjectMeta: metav1.ObjectMeta{Name: api.DefaultDriverName}, Spec: storagev1.CSIDriverSpec{
		AttachRequired: ptr.To(false), PodInfoOnMount: ptr.To(true), FSGroupPolicy: ptr.To(storagev1.NoneFSGroupPolicy),
		VolumeLifecycleModes: []storagev1.VolumeLifecycleMode{storagev1.VolumeLifecycleEphemeral}}}
	if _, err := env.c.Client.StorageV1().CSIDrivers().Create(ctx, driver, metav1.CreateOptions{}); err != nil {
		return err
	}
	return cluster.Poll(ctx, 30*time.Second, "the kubelet to register the driver", func() bool {
		n, err := env.c.Client.StorageV1().CSINodes().Get(ctx, cluster.NodeName, metav1.GetOptions{})
		if err != nil {
			return false
		}
		for _, d := range n.Spec.Drivers {
			if d.Name == api.DefaultDriverName {
				return true
			}
		}
		return false
	})
}

// writeNodeConfig writes cfg as the node's config file (read at the next
// launchNode).
func writeNodeConfig(cfg map[string]any) error {
	data, err := yaml.Marshal(cfg)
	if err != nil {
		return err
	}
	env.nodeConfig = cfg
	return os.WriteFile(env.nodeCfg, data, 0o600)
}

func launchNode() error {
	env.nodeLog = env.nodeCfg + ".log"
	logf, err := os.OpenFile(env.nodeLog, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o644)
	if err != nil {
		return err
	}
	env.node = exec.Command(env.bin, "node", "--config", env.nodeCfg, "-v", "2")
	env.node.Stdout, env.node.Stderr = logf, logf
	return env.node.Start()
}

// startInjector runs `oneagent-csi injector` with a certificate from a CA of
// its own and registers it by URL on 127.0.0.1, with the two entries of
// deploy/kubernetes/injector-webhook.yaml.
func startInjector(ctx context.Context, work string) error {
	caPEM, certFile, keyFile, err := cluster.WebhookCert(work)
	if err != nil {
		return err
	}
	cfg := []byte(fmt.Sprintf("defaultTenant: prod\ninitImage: %s\ninitImagePullPolicy: Never\nownNamespace: oneagent-csi\nretryTimeout: 20s\n", cluster.InitImage))
	cfgFile := filepath.Join(work, "injector.yaml")
	if err := os.WriteFile(cfgFile, cfg, 0o600); err != nil {
		return err
	}
	port, err := cluster.FreePort()
	if err != nil {
		return err
	}
	logf, err := os.Create(filepath.Join(work, "injector.log"))
	if err != nil {
		return err
	}
	env.injector = exec.Command(env.bin, "injector", "--config", cfgFile, "--cert-mode=files", "--cert-file", certFile, "--key-file", keyFile,
		"--addr", fmt.Sprintf("127.0.0.1:%d", port), "--http-addr", "127.0.0.1:0")
	env.injector.Stdout, env.injector.Stderr = logf, logf
	if err := env.injector.Start(); err != nil {
		return err
	}
	ignored := []string{"kube-system", "kube-public", "kube-node-lease", "istio-system", "oneagent-csi"}
	hook := func(name, path string, op metav1.LabelSelectorOperator) admissionregistrationv1.MutatingWebhook {
		url := fmt.Sprintf("https://127.0.0.1:%d%s", port, path)
		return admissionregistrationv1.MutatingWebhook{
			Name: name, AdmissionReviewVersions: []string{"v1"},
			ClientConfig: admissionregistrationv1.WebhookClientConfig{URL: &url, CABundle: caPEM},
			Rules: []admissionregistrationv1.RuleWithOperations{{Operations: []admissionregistrationv1.OperationType{admissionregistrationv1.Create},
				Rule: admissionregistrationv1.Rule{APIGroups: []string{""}, APIVersions: []string{"v1"}, Resources: []string{"pods"}}}},
			NamespaceSelector: &metav1.LabelSelector{MatchExpressions: []metav1.LabelSelectorRequirement{
				{Key: api.InjectLabel, Operator: op, Values: []string{"true"}},
				{Key: "kubernetes.io/metadata.name", Operator: metav1.LabelSelectorOpNotIn, Values: ignored},
			}},
			FailurePolicy:      ptr.To(admissionregistrationv1.Ignore),
			SideEffects:        ptr.To(admissionregistrationv1.SideEffectClassNone),
			TimeoutSeconds:     ptr.To[int32](5),
			ReinvocationPolicy: ptr.To(admissionregistrationv1.IfNeededReinvocationPolicy),
		}
	}
	mwc := &admissionregistrationv1.MutatingWebhookConfiguration{ObjectMeta: metav1.ObjectMeta{Name: "oneagent-csi-injector-e2e"},
		Webhooks: []admissionregistrationv1.MutatingWebhook{
			hook("namespace.injector.oneagent-csi.dynatrace.com", "/inject/namespace", metav1.LabelSelectorOpIn),
			hook("pod.injector.oneagent-csi.dynatrace.com", "/inject/pod", metav1.LabelSelectorOpNotIn),
		}}
	if _, err := env.c.Client.AdmissionregistrationV1().MutatingWebhookConfigurations().Create(ctx, mwc, metav1.CreateOptions{}); err != nil {
		return err
	}
	// Ready when a dry-run pod in an opted-in namespace comes back injected.
	if err := env.c.EnsureNamespace(ctx, "probe", map[string]string{api.InjectLabel: "true"}); err != nil {
		return err
	}
	return cluster.Poll(ctx, 30*time.Second, "the injector to answer the API server", func() bool {
		p, err := env.c.Client.CoreV1().Pods("probe").Create(ctx, appPod("probe", nil), metav1.CreateOptions{DryRun: []string{metav1.DryRunAll}})
		return err == nil && p.Annotations[api.InjectedAnnotation] == "true"
	})
}

// appPod is a pod as a ReplicaSet creates it (generateName, an owner, and
// nodeName because there is no scheduler), hostNetwork because there is no
// CNI. Its process writes what it sees and then sleeps.
func appPod(namespace string, annotations map[string]string) *corev1.Pod {
	script := `echo app-ran; grep oneagent /proc/self/mountinfo; ` +
		`if touch /opt/dynatrace/oneagent-paas/w 2>/dev/null; then echo VOLUME-WRITABLE; else echo volume-read-only; fi; exec sleep 3600`
	return &corev1.Pod{
		ObjectMeta: metav1.ObjectMeta{GenerateName: "shop-7c9f8d6b5-", Namespace: namespace, Annotations: annotations,
			Labels: map[string]string{"app": "shop"},
			OwnerReferences: []metav1.OwnerReference{{APIVersion: "apps/v1", Kind: "ReplicaSet", Name: "shop-7c9f8d6b5",
				UID: types.UID("3f1b2c4d-0000-4000-8000-000000000001"), Controller: ptr.To(true), BlockOwnerDeletion: ptr.To(true)}}},
		Spec: corev1.PodSpec{
			NodeName: cluster.NodeName, HostNetwork: true, AutomountServiceAccountToken: ptr.To(false),
			RestartPolicy: corev1.RestartPolicyAlways, TerminationGracePeriodSeconds: ptr.To[int64](2),
			Containers: []corev1.Container{{Name: "shop", Image: cluster.AppImage, ImagePullPolicy: corev1.PullNever,
				Command: []string{"/bin/sh", "-c", script}}},
		},
	}
}

func deleteAllPods(ctx context.Context) {
	nss, err := env.c.Client.CoreV1().Namespaces().List(ctx, metav1.ListOptions{})
	if err != nil {
		return
	}
	for _, ns := range nss.Items {
		_ = env.c.Client.CoreV1().Pods(ns.Name).DeleteCollection(ctx, metav1.DeleteOptions{GracePeriodSeconds: ptr.To[int64](0)}, metav1.ListOptions{})
	}
	_ = cluster.Poll(ctx, 60*time.Second, "all pods gone", func() bool {
		pods, err := env.c.Client.CoreV1().Pods("").List(ctx, metav1.ListOptions{})
		return err == nil && len(pods.Items) == 0
	})
}

// cacheJSON runs `oneagent-csi cache <args> -o json` against the node.
func cacheJSON(t *testing.T, v any, args ...string) {
	t.Helper()
	out, err := exec.Command(env.bin, append(append([]string{"cache"}, args...), "-o", "json", "--admin-socket", env.adminSock)...).Output()
	if err != nil {
		t.Fatalf("cache %v: %v", args, err)
	}
	if err := json.Unmarshal(out, v); err != nil {
		t.Fatalf("cache %v: %v\n%s", args, err, out)
	}
}
