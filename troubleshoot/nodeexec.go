package troubleshoot

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"net/url"
	"strings"

	"k8s.io/client-go/rest"
	"k8s.io/client-go/tools/remotecommand"
	"k8s.io/streaming/pkg/httpstream"

	"github.com/oneagent-csi/oneagent-csi/provisioner"
	"github.com/oneagent-csi/oneagent-csi/storage"
)

// driverBinary is the binary's path in the image (Dockerfile, make image).
const driverBinary = "/usr/local/bin/oneagent-csi"

// nodeVolumes asks the node driver in pod ns/pod for its volume records
// (the admin API behind `oneagent-csi cache volumes`).
func nodeVolumes(ctx context.Context, cfg *rest.Config, ns, pod string) ([]storage.Volume, error) {
	var vols []storage.Volume
	return vols, execJSON(ctx, cfg, ns, pod, []string{"cache", "volumes", "-o", "json"}, &vols)
}

// nodeTenantChecks has the node driver in pod ns/pod ask its tenants now
// (`oneagent-csi cache tenant-check`).
func nodeTenantChecks(ctx context.Context, cfg *rest.Config, ns, pod string) ([]provisioner.TenantCheck, error) {
	var checks []provisioner.TenantCheck
	return checks, execJSON(ctx, cfg, ns, pod, []string{"cache", "tenant-check", "-o", "json"}, &checks)
}

// execJSON runs the driver binary with args in the node container of pod
// ns/pod, through the API server's pods/exec with the user's credentials,
// and decodes its JSON output (also when it exits non-zero, as
// tenant-check does on a failing tenant).
func execJSON(ctx context.Context, cfg *rest.Config, ns, pod string, args []string, into any) error {
	q := url.Values{}
	for _, arg := range append([]string{driverBinary}, args...) {
		q.Add("command", arg)
	}
	q.Set("container", "node")
	q.Set("stdout", "true")
	q.Set("stderr", "true")
	u, err := url.Parse(strings.TrimSuffix(cfg.Host, "/") + fmt.Sprintf("/api/v1/namespaces/%s/pods/%s/exec?%s", ns, pod, q.Encode()))
	if err != nil {
		return err
	}
	ws, err := remotecommand.NewWebSocketExecutor(cfg, "GET", u.String())
	if err != nil {
		return err
	}
	spdy, err := remotecommand.NewSPDYExecutor(cfg, "POST", u)
	if err != nil {
		return err
	}
	exec, err := remotecommand.NewFallbackExecutor(ws, spdy, func(err error) bool {
		return httpstream.IsUpgradeFailure(err) || httpstream.IsHTTPSProxyError(err)
	})
	if err != nil {
		return err
	}
	var stdout, stderr bytes.Buffer
	runErr := exec.StreamWithContext(ctx, remotecommand.StreamOptions{Stdout: &stdout, Stderr: &stderr})
	if err := json.Unmarshal(stdout.Bytes(), into); err != nil {
		if runErr != nil {
			return fmt.Errorf("exec %s in %s/%s: %w: %s", strings.Join(args, " "), ns, pod, runErr, strings.TrimSpace(stderr.String()))
		}
		return fmt.Errorf("output of %s in %s/%s: %w", strings.Join(args, " "), ns, pod, err)
	}
	return nil
}
