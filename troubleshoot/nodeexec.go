package troubleshoot

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"net/url"
	"strings"

	"k8s.io/apimachinery/pkg/util/httpstream"
	"k8s.io/client-go/rest"
	"k8s.io/client-go/tools/remotecommand"

	"github.com/oneagent-csi/oneagent-csi/storage"
)

// driverBinary is the binary's path in the image (Dockerfile, make image).
const driverBinary = "/usr/local/bin/oneagent-csi"

// nodeVolumes asks the node driver in pod ns/pod, through the API server's
// pods/exec with the user's credentials, for its volume records (the admin
// API behind `oneagent-csi cache volumes`).
func nodeVolumes(ctx context.Context, cfg *rest.Config, ns, pod string) ([]storage.Volume, error) {
	q := url.Values{}
	for _, arg := range []string{driverBinary, "cache", "volumes", "-o", "json"} {
		q.Add("command", arg)
	}
	q.Set("container", "node")
	q.Set("stdout", "true")
	q.Set("stderr", "true")
	u, err := url.Parse(strings.TrimSuffix(cfg.Host, "/") + fmt.Sprintf("/api/v1/namespaces/%s/pods/%s/exec?%s", ns, pod, q.Encode()))
	if err != nil {
		return nil, err
	}
	ws, err := remotecommand.NewWebSocketExecutor(cfg, "GET", u.String())
	if err != nil {
		return nil, err
	}
	spdy, err := remotecommand.NewSPDYExecutor(cfg, "POST", u)
	if err != nil {
		return nil, err
	}
	exec, err := remotecommand.NewFallbackExecutor(ws, spdy, func(err error) bool {
		return httpstream.IsUpgradeFailure(err) || httpstream.IsHTTPSProxyError(err)
	})
	if err != nil {
		return nil, err
	}
	var stdout, stderr bytes.Buffer
	if err := exec.StreamWithContext(ctx, remotecommand.StreamOptions{Stdout: &stdout, Stderr: &stderr}); err != nil {
		return nil, fmt.Errorf("exec in %s/%s: %w: %s", ns, pod, err, strings.TrimSpace(stderr.String()))
	}
	var vols []storage.Volume
	if err := json.Unmarshal(stdout.Bytes(), &vols); err != nil {
		return nil, fmt.Errorf("volumes from %s/%s: %w", ns, pod, err)
	}
	return vols, nil
}
