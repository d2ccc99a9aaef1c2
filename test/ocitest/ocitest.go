// Package ocitest builds code-module images for tests with
// go-containerregistry and serves them from its in-memory registry (unit
// tests; integration tests use the real distribution registry).
package ocitest

import (
	"archive/tar"
	"bytes"
	"compress/gzip"
	"encoding/pem"
	"io"
	"log"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"sort"
	"strings"
	"testing"

	"github.com/google/go-containerregistry/pkg/name"
	ggcrregistry "github.com/google/go-containerregistry/pkg/registry"
	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/empty"
	"github.com/google/go-containerregistry/pkg/v1/mutate"
	"github.com/google/go-containerregistry/pkg/v1/remote"
	"github.com/google/go-containerregistry/pkg/v1/static"
	"github.com/google/go-containerregistry/pkg/v1/types"
	"github.com/klauspost/compress/zstd"
)

// Repo is the repository tests push code modules to.
const Repo = "dynatrace/dynatrace-codemodules"

// Tar is a tar stream of regular files (path -> content), in path order.
// A name whose base starts with .wh. is a whiteout.
func Tar(t testing.TB, files map[string]string) []byte {
	t.Helper()
	names := make([]string, 0, len(files))
	for p := range files {
		names = append(names, p)
	}
	sort.Strings(names)
	var buf bytes.Buffer
	tw := tar.NewWriter(&buf)
	for _, p := range names {
		c := files[p]
		if err := tw.WriteHeader(&tar.Header{Name: p, Typeflag: tar.TypeReg, Mode: 0o644, Size: int64(len(c))}); err != nil {
			t.Fatal(err)
		}
		if _, err := tw.Write([]byte(c)); err != nil {
			t.Fatal(err)
		}
	}
	if err := tw.Close(); err != nil {
		t.Fatal(err)
	}
	return buf.Bytes()
}

// Gzip compresses b.
func Gzip(t testing.TB, b []byte) []byte {
	t.Helper()
	var buf bytes.Buffer
	zw := gzip.NewWriter(&buf)
	if _, err := zw.Write(b); err != nil {
		t.Fatal(err)
	}
	if err := zw.Close(); err != nil {
		t.Fatal(err)
	}
	return buf.Bytes()
}

// Zstd compresses b.
func Zstd(t testing.TB, b []byte) []byte {
	t.Helper()
	zw, err := zstd.NewWriter(nil)
	if err != nil {
		t.Fatal(err)
	}
	return zw.EncodeAll(b, nil)
}

// Image is an OCI image of layers.
func Image(t testing.TB, layers ...v1.Layer) v1.Image {
	t.Helper()
	img, err := mutate.AppendLayers(empty.Image, layers...)
	if err != nil {
		t.Fatal(err)
	}
	return mutate.MediaType(img, types.OCIManifestSchema1)
}

// Module is a code-module image in three layers (gzip, zstd, plain): the
// second replaces the agent library and deletes a file of the first.
func Module(t testing.TB, version string) v1.Image {
	t.Helper()
	return Image(t,
		static.NewLayer(Gzip(t, Tar(t, map[string]string{
			"opt/dynatrace/oneagent/agent/lib64/liboneagentproc.so": "old",
			"opt/dynatrace/oneagent/agent/conf/ruxitagentproc.conf": "[general]\nloglevel info\n",
			"opt/dynatrace/oneagent/agent/conf/gone":                "x",
			"etc/os-release":                                        "outside the module",
		})), types.OCILayer),
		static.NewLayer(Zstd(t, Tar(t, map[string]string{
			"opt/dynatrace/oneagent/agent/lib64/liboneagentproc.so": "elf " + version,
			"opt/dynatrace/oneagent/agent/conf/.wh.gone":            "",
		})), types.OCILayerZStd),
		static.NewLayer(Tar(t, map[string]string{
			"opt/dynatrace/oneagent/manifest.json": `{"version":"` + version + `"}`,
		}), types.OCIUncompressedLayer),
	)
}

// Serve runs go-containerregistry's in-memory registry behind wrap (nil:
// none) and returns its host:port.
func Serve(t testing.TB, wrap func(http.Handler) http.Handler) string {
	t.Helper()
	h := ggcrregistry.New(ggcrregistry.Logger(log.New(io.Discard, "", 0)))
	if wrap != nil {
		h = wrap(h)
	}
	s := httptest.NewServer(h)
	t.Cleanup(s.Close)
	return strings.TrimPrefix(s.URL, "http://")
}

// ServeTLS is Serve over HTTPS offering HTTP/2, as most registries do. It
// returns the host and a file with the certificate to trust, and a
// transport that trusts it (for pushing).
func ServeTLS(t testing.TB, wrap func(http.Handler) http.Handler) (host, caFile string, tr http.RoundTripper) {
	t.Helper()
	h := ggcrregistry.New(ggcrregistry.Logger(log.New(io.Discard, "", 0)))
	if wrap != nil {
		h = wrap(h)
	}
	s := httptest.NewUnstartedServer(h)
	s.EnableHTTP2 = true
	s.StartTLS()
	t.Cleanup(s.Close)
	caFile = filepath.Join(t.TempDir(), "ca.pem")
	pemBytes := pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: s.Certificate().Raw})
	if err := os.WriteFile(caFile, pemBytes, 0o644); err != nil {
		t.Fatal(err)
	}
	return strings.TrimPrefix(s.URL, "https://"), caFile, s.Client().Transport
}

// Push writes img as host/Repo:tag and returns its digest.
func Push(t testing.TB, host, tag string, img v1.Image, opts ...remote.Option) string {
	t.Helper()
	ref, err := name.NewTag(host+"/"+Repo+":"+tag, name.Insecure)
	if err != nil {
		t.Fatal(err)
	}
	if err := remote.Write(ref, img, opts...); err != nil {
		t.Fatal(err)
	}
	d, err := img.Digest()
	if err != nil {
		t.Fatal(err)
	}
	return d.String()
}

// CountBlobGets wraps a registry handler and counts blob downloads.
func CountBlobGets(n *int64) func(http.Handler) http.Handler {
	return func(next http.Handler) http.Handler {
		return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			if r.Method == http.MethodGet && strings.Contains(r.URL.Path, "/blobs/") {
				*n++
			}
			next.ServeHTTP(w, r)
		})
	}
}
