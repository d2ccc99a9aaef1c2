package troubleshoot

import (
	"bytes"
	"context"
	"crypto/tls"
	"encoding/pem"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/url"
	"strconv"
	"strings"

	"k8s.io/client-go/rest"
	"k8s.io/client-go/tools/portforward"
	"k8s.io/client-go/transport/spdy"
	"k8s.io/klog/v2"
	"k8s.io/streaming/pkg/httpstream"
)

// ServedCert is what one injector pod presented in a TLS handshake.
type ServedCert struct {
	// Pod is namespace/name of the injector pod.
	Pod string
	// Chain is the PEM certificate chain it presented; empty when Err is set.
	Chain []byte
	// Err says why there is no chain (port-forward refused, no TLS).
	Err string
}

// servedChain connects to port of pod ns/pod through the API server's
// pods/portforward with the user's credentials, does a TLS handshake for
// serverName as the API server would, and returns the chain the pod
// presents as PEM. It verifies nothing itself: the check does, against the
// webhook's caBundle.
func servedChain(ctx context.Context, cfg *rest.Config, ns, pod string, port int32, serverName string) ([]byte, error) {
	u, err := url.Parse(strings.TrimSuffix(cfg.Host, "/") + fmt.Sprintf("/api/v1/namespaces/%s/pods/%s/portforward", ns, pod))
	if err != nil {
		return nil, err
	}
	transport, upgrader, err := spdy.RoundTripperFor(cfg)
	if err != nil {
		return nil, err
	}
	spdyDialer := spdy.NewDialerForStreaming(upgrader, &http.Client{Transport: transport}, http.MethodPost, u)
	wsDialer, err := portforward.NewSPDYOverWebsocketDialerForStreaming(u, cfg)
	if err != nil {
		return nil, err
	}
	dialer := portforward.NewFallbackDialerForStreaming(wsDialer, spdyDialer, func(err error) bool {
		return httpstream.IsUpgradeFailure(err) || httpstream.IsHTTPSProxyError(err)
	})
	fwdCtx, stop := context.WithCancel(ctx)
	defer stop()
	ready := make(chan struct{})
	var errOut bytes.Buffer
	pf, err := portforward.NewOnAddressesForStreamingWithContext(fwdCtx, dialer, []string{"127.0.0.1"},
		[]string{"0:" + strconv.Itoa(int(port))}, ready, io.Discard, &errOut)
	if err != nil {
		return nil, err
	}
	done := make(chan error, 1)
	go func() { done <- pf.ForwardPorts() }()
	select {
	case <-ready:
	case err := <-done:
		if err == nil {
			err = errors.New("port-forward ended before it was ready")
		}
		return nil, fmt.Errorf("port-forward to %s/%s: %w", ns, pod, err)
	case <-ctx.Done():
		return nil, ctx.Err()
	}
	defer func() {
		stop()
		if err := <-done; err != nil {
			// The dial already reported what mattered to the check.
			klog.V(4).InfoS("port-forward ended", "pod", ns+"/"+pod, "err", err)
		}
	}()
	ports, err := pf.GetPorts()
	if err != nil {
		return nil, fmt.Errorf("port-forward to %s/%s: %w", ns, pod, err)
	}
	if len(ports) == 0 {
		return nil, fmt.Errorf("port-forward to %s/%s: no local port", ns, pod)
	}
	d := tls.Dialer{Config: &tls.Config{
		ServerName: serverName,
		// The chain is verified by the check against the webhook's
		// caBundle, not against this machine's roots.
		InsecureSkipVerify: true, //nolint:gosec // verified by checkServingCert
		MinVersion:         tls.VersionTLS12,
	}}
	conn, err := d.DialContext(ctx, "tcp", net.JoinHostPort("127.0.0.1", strconv.Itoa(int(ports[0].Local))))
	if err != nil {
		if msg := strings.TrimSpace(errOut.String()); msg != "" {
			return nil, fmt.Errorf("tls handshake with %s/%s port %d: %w (%s)", ns, pod, port, err, msg)
		}
		return nil, fmt.Errorf("tls handshake with %s/%s port %d: %w", ns, pod, port, err)
	}
	defer conn.Close()
	var chain bytes.Buffer
	for _, c := range conn.(*tls.Conn).ConnectionState().PeerCertificates {
		_ = pem.Encode(&chain, &pem.Block{Type: "CERTIFICATE", Bytes: c.Raw})
	}
	return chain.Bytes(), nil
}
