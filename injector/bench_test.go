package injector

import (
	"bytes"
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"path/filepath"
	"slices"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"

	"github.com/oneagent-csi/oneagent-csi/api"
)

// BenchmarkMutate measures the pure mutation and the patch for a classic
// Istio pod; the baseline decodes the same pod from JSON, which every
// admission does anyway.
func BenchmarkMutate(b *testing.B) {
	cfg := testConfig(b)
	pod := loadPod(b, "a-classic-sidecar.yaml")
	pod.Annotations[api.InjectAnnotation] = "true"
	raw := mustJSON(b, pod)
	b.Run("baseline=decode", func(b *testing.B) {
		b.ReportAllocs()
		for b.Loop() {
			var p corev1.Pod
			if err := json.Unmarshal(raw, &p); err != nil {
				b.Fatal(err)
			}
		}
	})
	b.Run("mutate", func(b *testing.B) {
		b.ReportAllocs()
		for b.Loop() {
			if _, res := Mutate(pod, Request{Namespace: "demo"}, cfg); !res.Injected {
				b.Fatal(res.Reason)
			}
		}
	})
	b.Run("mutate+patch", func(b *testing.B) {
		b.ReportAllocs()
		for b.Loop() {
			out, _ := Mutate(pod, Request{Namespace: "demo"}, cfg)
			if _, err := CreatePatch(pod, out); err != nil {
				b.Fatal(err)
			}
		}
	})
}

// BenchmarkAdmissionHTTPS posts AdmissionReviews over HTTPS on loopback from
// 1, 4 and 16 concurrent clients with keep-alive (as the API server does) and
// reports admissions per second and the p99 latency. The baseline serves
// the same requests with a handler that answers a fixed allowed review
// without decoding: the cost of TLS and HTTP alone.
func BenchmarkAdmissionHTTPS(b *testing.B) {
	pod := loadPod(b, "a-classic-sidecar.yaml")
	pod.Annotations[api.InjectAnnotation] = "true"
	body := reviewFor(b, pod, "bench")
	s, err := NewServer(ServerOptions{Config: testConfig(b)})
	if err != nil {
		b.Fatal(err)
	}
	fixed := mustJSON(b, allowed("bench", nil, ""))
	for _, tc := range []struct {
		name    string
		handler http.Handler
	}{
		{"baseline=fixed-answer", http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			_, _ = io.Copy(io.Discard, r.Body)
			_, _ = w.Write(fixed)
		})},
		{"webhook", s.Handler()},
	} {
		url, client := startTLS(b, tc.handler)
		for _, clients := range []int{1, 4, 16} {
			b.Run(fmt.Sprintf("%s/clients=%d", tc.name, clients), func(b *testing.B) {
				admissionLoad(b, client, url, body, clients)
			})
		}
	}
}

// admissionLoad sends b.N reviews from clients concurrent clients and
// reports throughput and p99.
func admissionLoad(b *testing.B, client *http.Client, url string, body []byte, clients int) {
	var next atomic.Int64
	lat := make([]time.Duration, b.N)
	var wg sync.WaitGroup
	b.ResetTimer()
	start := time.Now()
	for range clients {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for {
				i := next.Add(1) - 1
				if i >= int64(b.N) {
					return
				}
				t0 := time.Now()
				resp, err := client.Post(url+PathPodOptIn, "application/json", bytes.NewReader(body))
				if err != nil {
					b.Error(err)
					return
				}
				_, _ = io.Copy(io.Discard, resp.Body)
				resp.Body.Close()
				if resp.StatusCode != http.StatusOK {
					b.Errorf("status %d", resp.StatusCode)
				}
				lat[i] = time.Since(t0)
			}
		}()
	}
	wg.Wait()
	elapsed := time.Since(start)
	b.StopTimer()
	slices.Sort(lat)
	b.ReportMetric(float64(b.N)/elapsed.Seconds(), "admissions/s")
	b.ReportMetric(float64(lat[len(lat)*99/100].Microseconds())/1000, "ms-p99")
}

func startTLS(b *testing.B, h http.Handler) (string, *http.Client) {
	b.Helper()
	dir := b.TempDir()
	cert := writeCert(b, dir, 1)
	certs, err := NewCertReloader(filepath.Join(dir, "tls.crt"), filepath.Join(dir, "tls.key"), time.Minute)
	if err != nil {
		b.Fatal(err)
	}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		b.Fatal(err)
	}
	srv := &http.Server{Handler: h, ReadHeaderTimeout: 5 * time.Second}
	go func() { _ = srv.Serve(tls.NewListener(ln, certs.TLSConfig())) }()
	b.Cleanup(func() { _ = srv.Close() })
	pool := x509.NewCertPool()
	pool.AddCert(cert)
	tr := &http.Transport{TLSClientConfig: &tls.Config{RootCAs: pool, MinVersion: tls.VersionTLS12}, MaxIdleConnsPerHost: 64}
	b.Cleanup(tr.CloseIdleConnections)
	return "https://" + ln.Addr().String(), &http.Client{Transport: tr}
}
