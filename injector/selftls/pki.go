package selftls

import (
	"bytes"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"errors"
	"fmt"
	"math/big"
	"net"
	"time"
)

// Pair is a serving certificate, its key, and the CA that signed it. Every
// generation has a CA of its own whose validity ends with the leaf's, so an
// expired CA can be dropped from the trust bundle without checking which
// leaves it signed, and the Secret never holds a CA key: nobody can mint a
// leaf the webhook trusts from what is stored.
type Pair struct {
	// Leaf is the parsed serving certificate.
	Leaf *x509.Certificate
	// CertPEM and KeyPEM are the leaf and its key as stored.
	CertPEM, KeyPEM []byte
	// CA is the certificate that signed Leaf; nil when the bundle does not
	// hold it.
	CA *x509.Certificate
}

// backdate keeps a fresh certificate valid on API servers whose clock is a
// little behind ours.
const backdate = 5 * time.Minute

// Generate makes a new CA and a leaf it signs for hosts (DNS names or IP
// addresses), both valid until now+validity.
func Generate(hosts []string, now time.Time, validity time.Duration) (Pair, []byte, error) {
	if len(hosts) == 0 {
		return Pair{}, nil, errors.New("no host names for the certificate")
	}
	caKey, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return Pair{}, nil, err
	}
	notBefore, notAfter := now.Add(-backdate), now.Add(validity)
	caTmpl := &x509.Certificate{
		SerialNumber:          serial(),
		Subject:               pkix.Name{CommonName: fmt.Sprintf("oneagent-csi-injector-ca@%d", now.Unix())},
		NotBefore:             notBefore,
		NotAfter:              notAfter,
		IsCA:                  true,
		BasicConstraintsValid: true,
		MaxPathLenZero:        true,
		KeyUsage:              x509.KeyUsageCertSign | x509.KeyUsageCRLSign,
	}
	caDER, err := x509.CreateCertificate(rand.Reader, caTmpl, caTmpl, &caKey.PublicKey, caKey)
	if err != nil {
		return Pair{}, nil, fmt.Errorf("create CA certificate: %w", err)
	}
	ca, err := x509.ParseCertificate(caDER)
	if err != nil {
		return Pair{}, nil, err
	}
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return Pair{}, nil, err
	}
	leafTmpl := &x509.Certificate{
		SerialNumber: serial(),
		Subject:      pkix.Name{CommonName: hosts[0]},
		NotBefore:    notBefore,
		NotAfter:     notAfter,
		KeyUsage:     x509.KeyUsageDigitalSignature,
		ExtKeyUsage:  []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
	}
	for _, h := range hosts {
		if ip := net.ParseIP(h); ip != nil {
			leafTmpl.IPAddresses = append(leafTmpl.IPAddresses, ip)
		} else {
			leafTmpl.DNSNames = append(leafTmpl.DNSNames, h)
		}
	}
	leafDER, err := x509.CreateCertificate(rand.Reader, leafTmpl, ca, &key.PublicKey, caKey)
	if err != nil {
		return Pair{}, nil, fmt.Errorf("create serving certificate: %w", err)
	}
	leaf, err := x509.ParseCertificate(leafDER)
	if err != nil {
		return Pair{}, nil, err
	}
	keyDER, err := x509.MarshalPKCS8PrivateKey(key)
	if err != nil {
		return Pair{}, nil, err
	}
	p := Pair{Leaf: leaf, CA: ca,
		CertPEM: pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: leafDER}),
		KeyPEM:  pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: keyDER})}
	return p, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: caDER}), nil
}

func serial() *big.Int {
	n, err := rand.Int(rand.Reader, new(big.Int).Lsh(big.NewInt(1), 127))
	if err != nil {
		panic(err) // crypto/rand does not fail on Linux
	}
	return n
}

// ParsePair parses a stored leaf and key and finds its CA in bundle. It
// fails when the key does not match the certificate.
func ParsePair(certPEM, keyPEM []byte, bundle []*x509.Certificate) (Pair, error) {
	if len(certPEM) == 0 || len(keyPEM) == 0 {
		return Pair{}, errors.New("certificate or key is empty")
	}
	if _, err := tls.X509KeyPair(certPEM, keyPEM); err != nil {
		return Pair{}, err
	}
	block, _ := pem.Decode(certPEM)
	if block == nil || block.Type != "CERTIFICATE" {
		return Pair{}, errors.New("certificate is not PEM")
	}
	leaf, err := x509.ParseCertificate(block.Bytes)
	if err != nil {
		return Pair{}, err
	}
	p := Pair{Leaf: leaf, CertPEM: certPEM, KeyPEM: keyPEM}
	for _, ca := range bundle {
		if leaf.CheckSignatureFrom(ca) == nil {
			p.CA = ca
			break
		}
	}
	return p, nil
}

// ParseBundle parses the PEM certificates in data, skipping blocks that are
// not certificates.
func ParseBundle(data []byte) ([]*x509.Certificate, error) {
	var out []*x509.Certificate
	for len(data) > 0 {
		var block *pem.Block
		block, data = pem.Decode(data)
		if block == nil {
			break
		}
		if block.Type != "CERTIFICATE" {
			continue
		}
		c, err := x509.ParseCertificate(block.Bytes)
		if err != nil {
			return nil, err
		}
		out = append(out, c)
	}
	return out, nil
}

// EncodeBundle is the PEM form of certs, in order.
func EncodeBundle(certs []*x509.Certificate) []byte {
	var b bytes.Buffer
	for _, c := range certs {
		_ = pem.Encode(&b, &pem.Block{Type: "CERTIFICATE", Bytes: c.Raw})
	}
	return b.Bytes()
}

// contains reports whether bundle holds c.
func contains(bundle []*x509.Certificate, c *x509.Certificate) bool {
	if c == nil {
		return false
	}
	for _, b := range bundle {
		if b.Equal(c) {
			return true
		}
	}
	return false
}

// covers reports whether leaf names every host.
func covers(leaf *x509.Certificate, hosts []string) bool {
	for _, h := range hosts {
		if leaf.VerifyHostname(h) != nil {
			return false
		}
	}
	return true
}
