package ociimage

import (
	"archive/tar"
	"errors"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"github.com/google/go-containerregistry/pkg/name"
	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/layout"
	"github.com/google/go-containerregistry/pkg/v1/types"
)

const testCA = "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n"

// fakeELF is an ELF header for machine, then a marker.
func fakeELF(t *testing.T, dir string, machine uint16, marker string) string {
	t.Helper()
	b := make([]byte, 64)
	copy(b, "\x7fELF")
	b[18], b[19] = byte(machine), byte(machine>>8)
	b = append(b, marker...)
	p := filepath.Join(dir, marker)
	if err := os.WriteFile(p, b, 0o755); err != nil {
		t.Fatal(err)
	}
	return p
}

func fixture(t *testing.T) (dir string, o Options) {
	dir = t.TempDir()
	ca := filepath.Join(dir, "ca.pem")
	if err := os.WriteFile(ca, []byte(testCA), 0o644); err != nil {
		t.Fatal(err)
	}
	return dir, Options{Name: "registry.example.com:5000/oneagent-csi:1.2.3", CACertificates: ca, Version: "1.2.3",
		Platforms: []Platform{{Arch: "amd64", Binary: fakeELF(t, dir, 62, "bin-amd64")}, {Arch: "arm64", Binary: fakeELF(t, dir, 183, "bin-arm64")}}}
}

func TestFullName(t *testing.T) {
	for in, want := range map[string]string{
		"oneagent-csi:1.2":                        "docker.io/library/oneagent-csi:1.2",
		"oneagent-csi":                            "docker.io/library/oneagent-csi:latest",
		"dynatrace/oneagent-csi:1":                "docker.io/dynatrace/oneagent-csi:1",
		"registry.example.com:5000/team/csi:v1.0": "registry.example.com:5000/team/csi:v1.0",
		"localhost/csi:x":                         "localhost/csi:x",
	} {
		ref, err := name.NewTag(in)
		if err != nil {
			t.Fatal(err)
		}
		if got, _ := fullName(ref); got != want {
			t.Errorf("fullName(%s) = %s, want %s", in, got, want)
		}
	}
}

func TestWriteIndexForEveryPlatform(t *testing.T) {
	dir, o := fixture(t)
	out := filepath.Join(dir, "image.tar")
	digest, err := Write(out, o)
	if err != nil {
		t.Fatal(err)
	}
	unpacked := filepath.Join(dir, "unpacked")
	if err := os.MkdirAll(unpacked, 0o755); err != nil {
		t.Fatal(err)
	}
	if b, err := exec.Command("tar", "-xf", out, "-C", unpacked).CombinedOutput(); err != nil {
		t.Fatalf("tar: %v\n%s", err, b)
	}
	p, err := layout.FromPath(unpacked)
	if err != nil {
		t.Fatal(err)
	}
	root, err := p.ImageIndex()
	if err != nil {
		t.Fatal(err)
	}
	rm, err := root.IndexManifest()
	if err != nil {
		t.Fatal(err)
	}
	if len(rm.Manifests) != 1 || rm.Manifests[0].Digest != digest ||
		rm.Manifests[0].Annotations["io.containerd.image.name"] != o.Name || rm.Manifests[0].Annotations["org.opencontainers.image.ref.name"] != "1.2.3" {
		t.Fatalf("index.json = %+v, want the index %s named %s", rm.Manifests, digest, o.Name)
	}
	idx, err := root.ImageIndex(digest)
	if err != nil {
		t.Fatal(err)
	}
	im, err := idx.IndexManifest()
	if err != nil {
		t.Fatal(err)
	}
	if im.MediaType != types.OCIImageIndex || len(im.Manifests) != 2 {
		t.Fatalf("index %s with %d manifests, want an OCI index of 2", im.MediaType, len(im.Manifests))
	}
	for i, arch := range []string{"amd64", "arm64"} {
		d := im.Manifests[i]
		if d.Platform == nil || d.Platform.OS != "linux" || d.Platform.Architecture != arch {
			t.Fatalf("manifest %d platform %+v, want linux/%s", i, d.Platform, arch)
		}
		img, err := idx.Image(d.Digest)
		if err != nil {
			t.Fatal(err)
		}
		cf, err := img.ConfigFile()
		if err != nil {
			t.Fatal(err)
		}
		if cf.Architecture != arch || cf.OS != "linux" || strings.Join(cf.Config.Entrypoint, " ") != "/usr/local/bin/oneagent-csi" {
			t.Errorf("%s config: %s/%s entrypoint %v", arch, cf.OS, cf.Architecture, cf.Config.Entrypoint)
		}
		files := layerFiles(t, img)
		if files[BinaryPath].mode != 0o755 || !strings.HasSuffix(files[BinaryPath].data, "bin-"+arch) {
			t.Errorf("%s: binary %+v", arch, files[BinaryPath])
		}
		if files[CAPath].data != testCA || files[CAPath].mode != 0o644 {
			t.Errorf("%s: CA file %+v", arch, files[CAPath])
		}
	}

	// The same inputs give the same image.
	again, err := Write(filepath.Join(dir, "again.tar"), o)
	if err != nil || again != digest {
		t.Fatalf("second build %s (%v), want %s", again, err, digest)
	}
}

type file struct {
	mode int64
	data string
}

func layerFiles(t *testing.T, img v1.Image) map[string]file {
	t.Helper()
	layers, err := img.Layers()
	if err != nil || len(layers) != 1 {
		t.Fatalf("layers %d, %v", len(layers), err)
	}
	rc, err := layers[0].Uncompressed()
	if err != nil {
		t.Fatal(err)
	}
	defer rc.Close()
	out := map[string]file{}
	tr := tar.NewReader(rc)
	for {
		h, err := tr.Next()
		if errors.Is(err, io.EOF) {
			return out
		}
		if err != nil {
			t.Fatal(err)
		}
		b, _ := io.ReadAll(tr)
		out[h.Name] = file{h.Mode, string(b)}
	}
}

func TestWriteRefusesBadInputAndLeavesNothing(t *testing.T) {
	for _, tc := range []struct {
		name   string
		mutate func(dir string, o *Options)
		want   string
	}{
		{"wrong architecture", func(dir string, o *Options) { o.Platforms[1].Arch = "amd64" }, "ELF machine 183 is not amd64"},
		{"not ELF", func(dir string, o *Options) { o.Platforms[0].Binary = o.CACertificates }, "not an ELF binary"},
		{"missing binary", func(dir string, o *Options) { o.Platforms[0].Binary = filepath.Join(dir, "nope") }, "no such file"},
		{"no CA", func(dir string, o *Options) { o.CACertificates = filepath.Join(dir, "nope") }, "CA certificates"},
		{"CA without PEM", func(dir string, o *Options) { o.CACertificates = o.Platforms[0].Binary }, "no PEM certificate"},
		{"no name", func(dir string, o *Options) { o.Name = "" }, "image name is required"},
		{"bad name", func(dir string, o *Options) { o.Name = "Oneagent CSI" }, `image name "Oneagent CSI"`},
		{"no platform", func(dir string, o *Options) { o.Platforms = nil }, "at least one platform"},
		{"unknown architecture", func(dir string, o *Options) { o.Platforms[0].Arch = "mips" }, `unsupported architecture "mips"`},
	} {
		t.Run(tc.name, func(t *testing.T) {
			dir, o := fixture(t)
			tc.mutate(dir, &o)
			outDir := filepath.Join(dir, "out")
			if err := os.MkdirAll(outDir, 0o755); err != nil {
				t.Fatal(err)
			}
			_, err := Write(filepath.Join(outDir, "image.tar"), o)
			if err == nil || !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("err = %v, want %q", err, tc.want)
			}
			if left, _ := os.ReadDir(outDir); len(left) != 0 {
				t.Fatalf("left behind: %v", left)
			}
		})
	}
}
