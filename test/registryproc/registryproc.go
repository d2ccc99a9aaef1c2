// Package registryproc runs the CNCF distribution registry as a real
// process on loopback for tests: TLS from a CA of its own, htpasswd users,
// optionally as a pull-through cache of another registry, with its access
// log kept so that tests can count what it served.
package registryproc

import (
	"bufio"
	"bytes"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/base64"
	"encoding/json"
	"encoding/pem"
	"fmt"
	"math/big"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/google/go-containerregistry/pkg/authn"
	"github.com/google/go-containerregistry/pkg/name"
	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/remote"
	"golang.org/x/crypto/bcrypt"
)

// Version is the distribution release the tests run.
const Version = "v3.1.2"

// Options of one registry.
type Options struct {
	// Users maps user names to passwords (htpasswd auth); empty: no auth.
	Users map[string]string
	// Upstream, when set, makes this registry a pull-through cache of
	// that registry.
	Upstream *Upstream
}

// Upstream is the registry a pull-through cache fetches from.
type Upstream struct {
	// URL is https://host:port.
	URL string
	// Username and Password log in to it.
	Username, Password string
	// CAFile verifies its certificate.
	CAFile string
}

// Registry is a running registry process.
type Registry struct {
	// Host is 127.0.0.1:port.
	Host string
	// CAFile is the PEM file of the CA that signed its certificate.
	CAFile string

	cmd  *exec.Cmd
	mu   sync.Mutex
	logs bytes.Buffer
	done chan struct{}
}

// Start runs a registry with a fresh storage dir; it stops at the end of
// the test.
func Start(t testing.TB, opts Options) *Registry {
	t.Helper()
	bin := Binary(t)
	dir := t.TempDir()
	port := freePort(t)
	r := &Registry{Host: fmt.Sprintf("127.0.0.1:%d", port), CAFile: filepath.Join(dir, "ca.pem"), done: make(chan struct{})}
	crt, key := writePKI(t, dir, r.CAFile)
	cfg := map[string]any{
		"version": 0.1,
		"log":     map[string]any{"level": "info", "formatter": "json", "accesslog": map[string]any{"disabled": true}},
		"storage": map[string]any{"filesystem": map[string]any{"rootdirectory": filepath.Join(dir, "data")}, "delete": map[string]any{"enabled": true}},
		"http": map[string]any{"addr": r.Host, "secret": "oneagent-csi-test",
			"tls": map[string]any{"certificate": crt, "key": key}},
	}
	if len(opts.Users) > 0 {
		path := filepath.Join(dir, "htpasswd")
		var b strings.Builder
		for u, p := range opts.Users {
			h, err := bcrypt.GenerateFromPassword([]byte(p), bcrypt.MinCost)
			if err != nil {
				t.Fatal(err)
			}
			fmt.Fprintf(&b, "%s:%s\n", u, h)
		}
		if err := os.WriteFile(path, []byte(b.String()), 0o600); err != nil {
			t.Fatal(err)
		}
		cfg["auth"] = map[string]any{"htpasswd": map[string]any{"realm": "oneagent-csi-test", "path": path}}
	}
	env := os.Environ()
	if u := opts.Upstream; u != nil {
		cfg["proxy"] = map[string]any{"remoteurl": u.URL, "username": u.Username, "password": u.Password}
		if u.CAFile != "" {
			// The registry trusts the system roots; SSL_CERT_FILE adds the
			// upstream's CA for this process only.
			env = append(env, "SSL_CERT_FILE="+u.CAFile)
		}
	}
	cfgPath := filepath.Join(dir, "config.json") // YAML is a superset of JSON
	b, err := json.Marshal(cfg)
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(cfgPath, b, 0o600); err != nil {
		t.Fatal(err)
	}
	r.cmd = exec.Command(bin, "serve", cfgPath)
	r.cmd.Env = env
	r.cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	stderr, err := r.cmd.StderrPipe()
	if err != nil {
		t.Fatal(err)
	}
	r.cmd.Stdout = r.cmd.Stderr
	if err := r.cmd.Start(); err != nil {
		t.Fatalf("start registry: %v", err)
	}
	go func() {
		defer close(r.done)
		sc := bufio.NewScanner(stderr)
		sc.Buffer(make([]byte, 64<<10), 1<<20)
		for sc.Scan() {
			r.mu.Lock()
			r.logs.Write(sc.Bytes())
			r.logs.WriteByte('\n')
			r.mu.Unlock()
		}
	}()
	t.Cleanup(r.Stop)
	if err := r.waitReady(30 * time.Second); err != nil {
		t.Fatalf("registry on %s: %v\n%s", r.Host, err, r.Log())
	}
	return r
}

func (r *Registry) waitReady(timeout time.Duration) error {
	pool := x509.NewCertPool()
	ca, err := os.ReadFile(r.CAFile)
	if err != nil {
		return err
	}
	pool.AppendCertsFromPEM(ca)
	tr := http.DefaultTransport.(*http.Transport).Clone()
	tr.TLSClientConfig.RootCAs = pool
	c := &http.Client{Transport: tr, Timeout: 2 * time.Second}
	deadline := time.Now().Add(timeout)
	for {
		resp, err := c.Get("https://" + r.Host + "/v2/")
		if err == nil {
			resp.Body.Close()
			return nil // 200, or 401 with auth: it answers
		}
		select {
		case <-r.done:
			return fmt.Errorf("registry exited: %w", r.cmd.Wait())
		default:
		}
		if time.Now().After(deadline) {
			return err
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// Stop ends the process (idempotent); the registry is unreachable after.
func (r *Registry) Stop() {
	if r.cmd.Process == nil {
		return
	}
	_ = r.cmd.Process.Signal(syscall.SIGTERM)
	select {
	case <-r.done:
	case <-time.After(10 * time.Second):
		_ = r.cmd.Process.Kill()
		<-r.done
	}
	_ = r.cmd.Wait()
}

// Log is what the process logged so far.
func (r *Registry) Log() string {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.logs.String()
}

// BlobsServed counts, per blob digest, the GET requests the registry
// answered with 200, from its request log.
func (r *Registry) BlobsServed() map[string]int {
	out := map[string]int{}
	for _, line := range strings.Split(r.Log(), "\n") {
		var e struct {
			Method string `json:"http.request.method"`
			URI    string `json:"http.request.uri"`
			Status int    `json:"http.response.status"`
		}
		if json.Unmarshal([]byte(line), &e) != nil || e.Method != http.MethodGet || e.Status != http.StatusOK {
			continue
		}
		if i := strings.Index(e.URI, "/blobs/"); i >= 0 {
			out[e.URI[i+len("/blobs/"):]]++
		}
	}
	return out
}

func freePort(t testing.TB) int {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	return l.Addr().(*net.TCPAddr).Port
}

// writePKI writes a CA (to caFile) and a certificate for 127.0.0.1 signed
// by it, and returns the certificate and key paths.
func writePKI(t testing.TB, dir, caFile string) (string, string) {
	t.Helper()
	caKey, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	caTmpl := &x509.Certificate{SerialNumber: big.NewInt(1), Subject: pkix.Name{CommonName: "oneagent-csi test registry CA"},
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(24 * time.Hour), IsCA: true, BasicConstraintsValid: true,
		KeyUsage: x509.KeyUsageCertSign}
	caDER, err := x509.CreateCertificate(rand.Reader, caTmpl, caTmpl, &caKey.PublicKey, caKey)
	if err != nil {
		t.Fatal(err)
	}
	ca, _ := x509.ParseCertificate(caDER)
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	tmpl := &x509.Certificate{SerialNumber: big.NewInt(2), Subject: pkix.Name{CommonName: "127.0.0.1"},
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(24 * time.Hour),
		IPAddresses: []net.IP{net.ParseIP("127.0.0.1")}, DNSNames: []string{"localhost"},
		KeyUsage: x509.KeyUsageDigitalSignature, ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth}}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, ca, &key.PublicKey, caKey)
	if err != nil {
		t.Fatal(err)
	}
	keyDER, err := x509.MarshalECPrivateKey(key)
	if err != nil {
		t.Fatal(err)
	}
	crt, keyPath := filepath.Join(dir, "tls.crt"), filepath.Join(dir, "tls.key")
	for path, block := range map[string]*pem.Block{caFile: {Type: "CERTIFICATE", Bytes: caDER}, crt: {Type: "CERTIFICATE", Bytes: der},
		keyPath: {Type: "EC PRIVATE KEY", Bytes: keyDER}} {
		if err := os.WriteFile(path, pem.EncodeToMemory(block), 0o600); err != nil {
			t.Fatal(err)
		}
	}
	return crt, keyPath
}

// Transport is an HTTP transport that trusts the registry's CA.
func (r *Registry) Transport(t testing.TB) *http.Transport {
	t.Helper()
	ca, err := os.ReadFile(r.CAFile)
	if err != nil {
		t.Fatal(err)
	}
	pool := x509.NewCertPool()
	pool.AppendCertsFromPEM(ca)
	tr := http.DefaultTransport.(*http.Transport).Clone()
	tr.TLSClientConfig = &tls.Config{RootCAs: pool, MinVersion: tls.VersionTLS12}
	return tr
}

// Push writes img to this registry as repo:tag with user's credentials,
// over TLS verified by the registry's CA, and returns its digest.
func (r *Registry) Push(t testing.TB, user, pass, repo, tag string, img v1.Image) string {
	t.Helper()
	tr := r.Transport(t)
	ref, err := name.NewTag(r.Host + "/" + repo + ":" + tag)
	if err != nil {
		t.Fatal(err)
	}
	if err := remote.Write(ref, img, remote.WithTransport(tr), remote.WithAuth(&authn.Basic{Username: user, Password: pass})); err != nil {
		t.Fatalf("push to %s: %v", ref, err)
	}
	d, err := img.Digest()
	if err != nil {
		t.Fatal(err)
	}
	return d.String()
}

// WritePullSecret writes a .dockerconfigjson with user's credentials for
// host to path.
func WritePullSecret(t testing.TB, path, host, user, pass string) {
	t.Helper()
	auth := base64.StdEncoding.EncodeToString([]byte(user + ":" + pass))
	if err := os.WriteFile(path, fmt.Appendf(nil, `{"auths":{%q:{"auth":%q}}}`, host, auth), 0o600); err != nil {
		t.Fatal(err)
	}
}
