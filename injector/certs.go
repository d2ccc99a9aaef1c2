package injector

import (
	"crypto/tls"
	"errors"
	"fmt"
	"os"
	"sync"
	"time"

	"k8s.io/klog/v2"
)

// CertReloader serves a certificate and key from files and picks up new
// ones when the files change (cert-manager rewrites a Secret volume by
// swapping a symlink). The files are checked at most once per Interval, on
// a TLS handshake; a new pair that does not load (say, half written) is
// logged and the old one kept.
type CertReloader struct {
	certFile, keyFile string
	interval          time.Duration
	now               func() time.Time

	mu        sync.Mutex
	cert      *tls.Certificate
	certStamp fileStamp
	keyStamp  fileStamp
	checked   time.Time
}

type fileStamp struct {
	mod  time.Time
	size int64
}

func stamp(path string) (fileStamp, error) {
	st, err := os.Stat(path)
	if err != nil {
		return fileStamp{}, err
	}
	return fileStamp{st.ModTime(), st.Size()}, nil
}

// NewCertReloader loads the pair once; an error names the file. interval
// defaults to 10s.
func NewCertReloader(certFile, keyFile string, interval time.Duration) (*CertReloader, error) {
	if interval <= 0 {
		interval = 10 * time.Second
	}
	r := &CertReloader{certFile: certFile, keyFile: keyFile, interval: interval, now: time.Now}
	if err := r.load(); err != nil {
		return nil, err
	}
	return r, nil
}

func (r *CertReloader) load() error {
	cs, err := stamp(r.certFile)
	if err != nil {
		return fmt.Errorf("certificate file: %w", err)
	}
	ks, err := stamp(r.keyFile)
	if err != nil {
		return fmt.Errorf("key file: %w", err)
	}
	pair, err := tls.LoadX509KeyPair(r.certFile, r.keyFile)
	if err != nil {
		return fmt.Errorf("load certificate %s and key %s: %w", r.certFile, r.keyFile, err)
	}
	r.cert, r.certStamp, r.keyStamp = &pair, cs, ks
	return nil
}

// GetCertificate is for tls.Config.GetCertificate.
func (r *CertReloader) GetCertificate(*tls.ClientHelloInfo) (*tls.Certificate, error) {
	r.mu.Lock()
	defer r.mu.Unlock()
	if now := r.now(); now.Sub(r.checked) >= r.interval {
		r.checked = now
		cs, cerr := stamp(r.certFile)
		ks, kerr := stamp(r.keyFile)
		if cerr == nil && kerr == nil && (cs != r.certStamp || ks != r.keyStamp) {
			if err := r.load(); err != nil {
				klog.ErrorS(err, "new certificate does not load; still serving the previous one")
			} else {
				klog.InfoS("reloaded the webhook certificate", "certFile", r.certFile)
			}
		}
	}
	if r.cert == nil {
		return nil, errors.New("no certificate loaded")
	}
	return r.cert, nil
}

// Ready reports whether a certificate is loaded.
func (r *CertReloader) Ready() error {
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.cert == nil {
		return errors.New("no certificate loaded")
	}
	return nil
}

// TLSConfig returns a server TLS config (TLS 1.2 or later) using r.
func (r *CertReloader) TLSConfig() *tls.Config {
	return &tls.Config{MinVersion: tls.VersionTLS12, GetCertificate: r.GetCertificate}
}
