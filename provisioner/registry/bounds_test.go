package registry_test

import (
	"bytes"
	"context"
	"crypto/rand"
	"errors"
	"net/http"
	"strings"
	"testing"

	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/mutate"
	"github.com/google/go-containerregistry/pkg/v1/static"
	"github.com/google/go-containerregistry/pkg/v1/types"
	"github.com/klauspost/compress/zstd"
	"github.com/spf13/afero"

	"github.com/oneagent-csi/oneagent-csi/provisioner/extract"
	"github.com/oneagent-csi/oneagent-csi/provisioner/registry"
	"github.com/oneagent-csi/oneagent-csi/test/ocitest"
)

// chunked drops the length of every manifest answer, so that the bound
// is met while the body is read, not from its header.
func chunked(next http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if !strings.Contains(r.URL.Path, "/manifests/") || r.Method != http.MethodGet {
			next.ServeHTTP(w, r)
			return
		}
		next.ServeHTTP(noLength{w}, r)
	})
}

type noLength struct{ http.ResponseWriter }

func (n noLength) WriteHeader(code int) {
	n.Header().Del("Content-Length")
	n.ResponseWriter.WriteHeader(code)
}

func (n noLength) Write(p []byte) (int, error) {
	n.Header().Del("Content-Length")
	return n.ResponseWriter.Write(p)
}

// A registry's answer is bounded before it is read: a manifest over
// limits.maxManifestBytes (by its length, or as it streams without one), an
// image with more layers than limits.maxLayers, and a zstd layer whose
// window is over limits.maxZstdWindow are bad images, refused before any
// tree is started (or, for the window, before the decoder allocates it).
func TestRegistryAnswersAreBounded(t *testing.T) {
	bigWindow := func(t *testing.T) []byte {
		var buf bytes.Buffer
		zw, err := zstd.NewWriter(&buf, zstd.WithWindowSize(64<<20), zstd.WithSingleSegment(false))
		if err != nil {
			t.Fatal(err)
		}
		// More than a block, written before the end is known: the frame
		// declares the window instead of its content size.
		noise := make([]byte, 1<<20)
		_, _ = rand.Read(noise)
		if _, err := zw.Write(ocitest.Tar(t, map[string]string{"opt/dynatrace/oneagent/agent/lib64/liboneagentproc.so": string(noise)})); err != nil {
			t.Fatal(err)
		}
		if err := zw.Close(); err != nil {
			t.Fatal(err)
		}
		return buf.Bytes()
	}

	cases := []struct {
		name    string
		wrap    func(http.Handler) http.Handler
		image   func(t *testing.T) v1.Image
		resolve bool // the refusal comes at Resolve already
		want    string
	}{
		{"manifest over the bound", nil, func(t *testing.T) v1.Image {
			return mutate.Annotations(module(t, "1"), map[string]string{"padding": strings.Repeat("x", extract.DefaultMaxManifestBytes)}).(v1.Image)
		}, true, "limits.maxManifestBytes"},
		{"manifest over the bound without a length", chunked, func(t *testing.T) v1.Image {
			return mutate.Annotations(module(t, "1"), map[string]string{"padding": strings.Repeat("x", extract.DefaultMaxManifestBytes)}).(v1.Image)
		}, true, "limits.maxManifestBytes"},
		{"too many layers", nil, func(t *testing.T) v1.Image {
			var ls []v1.Layer
			for i := range extract.DefaultMaxLayers + 1 {
				ls = append(ls, static.NewLayer(ocitest.Tar(t, map[string]string{"opt/dynatrace/oneagent/f": string(rune('a' + i%26))}), types.OCIUncompressedLayer))
			}
			return image(t, ls...)
		}, false, "limits.maxLayers"},
		{"zstd window over the bound", nil, func(t *testing.T) v1.Image {
			return image(t, static.NewLayer(bigWindow(t), types.OCILayerZStd))
		}, false, "limits.maxZstdWindow"},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			host := serve(t, tc.wrap)
			digest := push(t, host, "1", tc.image(t))
			p := newPuller(t, registry.Source{Image: host + "/" + repo + ":1"})
			_, rerr := p.Resolve(context.Background(), "")
			if tc.resolve {
				if !errors.Is(rerr, extract.ErrBadArchive) || !strings.Contains(rerr.Error(), tc.want) {
					t.Fatalf("Resolve = %v, want a bad image naming %s", rerr, tc.want)
				}
			} else if rerr != nil {
				t.Fatalf("Resolve = %v", rerr)
			}
			tr := &tree{fsys: afero.NewMemMapFs()}
			_, err := p.Pull(context.Background(), digest, tr.start)
			if !errors.Is(err, extract.ErrBadArchive) || !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("Pull = %v, want a bad image naming %s", err, tc.want)
			}
			if tc.want != "limits.maxZstdWindow" && tr.starts != 0 {
				t.Errorf("a tree was started %d times before the refusal", tr.starts)
			}
		})
	}
}
