// Package ociimage writes oneagent-csi's runtime image without a container
// engine: per platform one layer holding the static binary and the CA
// certificates on an empty base, the platforms in one OCI index, the whole
// as an OCI image layout tarball that `ctr images import`, `docker load`
// (25+), `podman load` and `crane push` take. The same inputs give the same
// bytes (fixed timestamps, sorted entries), so the digest is reproducible.
package ociimage

import (
	"archive/tar"
	"bytes"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"sort"
	"time"

	"github.com/google/go-containerregistry/pkg/name"
	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/empty"
	"github.com/google/go-containerregistry/pkg/v1/layout"
	"github.com/google/go-containerregistry/pkg/v1/mutate"
	"github.com/google/go-containerregistry/pkg/v1/tarball"
	"github.com/google/go-containerregistry/pkg/v1/types"
)

// BinaryPath is where the binary is in the image, as in the Dockerfile.
const BinaryPath = "usr/local/bin/oneagent-csi"

// CAPath is where the CA certificates are: the first file Go's crypto/x509
// looks for on Linux.
const CAPath = "etc/ssl/certs/ca-certificates.crt"

// epoch is every file's and the config's timestamp (reproducible builds).
var epoch = time.Unix(0, 0).UTC()

// Platform is one entry of the index.
type Platform struct {
	// Arch is the GOARCH, e.g. amd64 or arm64.
	Arch string
	// Binary is the static oneagent-csi binary built for Arch.
	Binary string
}

// Options configure Write.
type Options struct {
	// Name is the image reference recorded in the tarball, e.g.
	// registry.example.com/oneagent-csi:1.2.3 (ctr import names the image
	// after it). Required.
	Name string
	// Platforms are the linux platforms of the index, at least one.
	Platforms []Platform
	// CACertificates is a PEM bundle of trusted CAs. Default: the build
	// machine's /etc/ssl/certs/ca-certificates.crt.
	CACertificates string
	// Version is recorded as the org.opencontainers.image.version label.
	Version string
}

// Write builds the index and writes it to out as an OCI layout tarball,
// through a temporary file renamed at the end: out is complete or absent.
func Write(out string, o Options) (v1.Hash, error) {
	if o.Name == "" {
		return v1.Hash{}, errors.New("image name is required")
	}
	ref, err := name.NewTag(o.Name)
	if err != nil {
		return v1.Hash{}, fmt.Errorf("image name %q: %w", o.Name, err)
	}
	if len(o.Platforms) == 0 {
		return v1.Hash{}, errors.New("at least one platform is required")
	}
	if o.CACertificates == "" {
		o.CACertificates = "/etc/ssl/certs/ca-certificates.crt"
	}
	ca, err := os.ReadFile(o.CACertificates)
	if err != nil {
		return v1.Hash{}, fmt.Errorf("CA certificates: %w", err)
	}
	if !bytes.Contains(ca, []byte("-----BEGIN CERTIFICATE-----")) {
		return v1.Hash{}, fmt.Errorf("CA certificates %s: no PEM certificate in it", o.CACertificates)
	}
	idx := mutate.IndexMediaType(empty.Index, types.OCIImageIndex)
	for _, p := range o.Platforms {
		img, err := platformImage(p, ca, o.Version)
		if err != nil {
			return v1.Hash{}, fmt.Errorf("linux/%s: %w", p.Arch, err)
		}
		idx = mutate.AppendManifests(idx, mutate.IndexAddendum{Add: img,
			Descriptor: v1.Descriptor{Platform: &v1.Platform{OS: "linux", Architecture: p.Arch}}})
	}
	digest, err := idx.Digest()
	if err != nil {
		return v1.Hash{}, err
	}
	dir, err := os.MkdirTemp(filepath.Dir(out), ".image-layout-")
	if err != nil {
		return v1.Hash{}, err
	}
	defer os.RemoveAll(dir)
	lp, err := layout.Write(dir, empty.Index)
	if err != nil {
		return v1.Hash{}, err
	}
	full, tag := fullName(ref)
	if err := lp.AppendIndex(idx, layout.WithAnnotations(map[string]string{
		"io.containerd.image.name":          full,
		"org.opencontainers.image.ref.name": tag,
	})); err != nil {
		return v1.Hash{}, err
	}
	tmp := out + ".tmp"
	if err := tarDir(dir, tmp); err != nil {
		_ = os.Remove(tmp)
		return v1.Hash{}, err
	}
	return digest, os.Rename(tmp, out)
}

// fullName is the reference as containerd's CRI looks images up (Docker
// Hub names spelled out: oneagent-csi:1 is docker.io/library/oneagent-csi:1)
// and its tag.
func fullName(ref name.Tag) (full, tag string) {
	registry := ref.RegistryStr()
	if registry == name.DefaultRegistry {
		registry = "docker.io"
	}
	return registry + "/" + ref.RepositoryStr() + ":" + ref.TagStr(), ref.TagStr()
}

// platformImage is the image for one platform: one layer, the entrypoint.
func platformImage(p Platform, ca []byte, version string) (v1.Image, error) {
	bin, err := os.ReadFile(p.Binary)
	if err != nil {
		return nil, err
	}
	if err := checkELF(bin, p.Arch); err != nil {
		return nil, fmt.Errorf("%s: %w", p.Binary, err)
	}
	var buf bytes.Buffer
	tw := tar.NewWriter(&buf)
	for _, d := range []string{"etc/", "etc/ssl/", "etc/ssl/certs/", "tmp/", "usr/", "usr/local/", "usr/local/bin/"} {
		mode := int64(0o755)
		if d == "tmp/" {
			mode = 0o1777
		}
		if err := tw.WriteHeader(&tar.Header{Typeflag: tar.TypeDir, Name: d, Mode: mode, ModTime: epoch, Format: tar.FormatPAX}); err != nil {
			return nil, err
		}
	}
	for _, f := range []struct {
		name string
		mode int64
		data []byte
	}{{CAPath, 0o644, ca}, {BinaryPath, 0o755, bin}} {
		if err := tw.WriteHeader(&tar.Header{Typeflag: tar.TypeReg, Name: f.name, Mode: f.mode, Size: int64(len(f.data)), ModTime: epoch, Format: tar.FormatPAX}); err != nil {
			return nil, err
		}
		if _, err := tw.Write(f.data); err != nil {
			return nil, err
		}
	}
	if err := tw.Close(); err != nil {
		return nil, err
	}
	data := buf.Bytes()
	layer, err := tarball.LayerFromOpener(func() (io.ReadCloser, error) { return io.NopCloser(bytes.NewReader(data)), nil },
		tarball.WithMediaType(types.OCILayer))
	if err != nil {
		return nil, err
	}
	base := mutate.ConfigMediaType(mutate.MediaType(empty.Image, types.OCIManifestSchema1), types.OCIConfigJSON)
	img, err := mutate.AppendLayers(base, layer)
	if err != nil {
		return nil, err
	}
	cf, err := img.ConfigFile()
	if err != nil {
		return nil, err
	}
	cf = cf.DeepCopy()
	cf.OS, cf.Architecture, cf.Created = "linux", p.Arch, v1.Time{Time: epoch}
	cf.Config.Entrypoint = []string{"/" + BinaryPath}
	cf.Config.Env = []string{"PATH=/usr/local/bin:/usr/bin:/bin"}
	cf.Config.User = "0"
	cf.Config.Labels = map[string]string{"org.opencontainers.image.title": "oneagent-csi", "org.opencontainers.image.version": version}
	cf.History = nil
	return mutate.ConfigFile(img, cf)
}

// checkELF refuses a binary that is not a static-looking ELF for arch: a
// wrong GOARCH would give an image that fails at its first start.
func checkELF(b []byte, arch string) error {
	if len(b) < 20 || string(b[:4]) != "\x7fELF" {
		return errors.New("not an ELF binary")
	}
	machine := uint16(b[18]) | uint16(b[19])<<8
	want := map[string]uint16{"amd64": 62, "arm64": 183, "ppc64le": 21, "s390x": 22}[arch]
	if want == 0 {
		return fmt.Errorf("unsupported architecture %q", arch)
	}
	if machine != want {
		return fmt.Errorf("ELF machine %d is not %s", machine, arch)
	}
	return nil
}

// tarDir writes dir as an uncompressed tar with sorted names and fixed
// timestamps.
func tarDir(dir, out string) error {
	var files []string
	if err := filepath.Walk(dir, func(path string, info os.FileInfo, err error) error {
		if err != nil {
			return err
		}
		if path != dir {
			files = append(files, path)
		}
		return nil
	}); err != nil {
		return err
	}
	sort.Strings(files)
	f, err := os.Create(out)
	if err != nil {
		return err
	}
	tw := tar.NewWriter(f)
	for _, path := range files {
		info, err := os.Stat(path)
		if err != nil {
			f.Close()
			return err
		}
		rel, _ := filepath.Rel(dir, path)
		h := &tar.Header{Name: filepath.ToSlash(rel), ModTime: epoch, Mode: 0o644, Format: tar.FormatPAX}
		if info.IsDir() {
			h.Typeflag, h.Name, h.Mode = tar.TypeDir, h.Name+"/", 0o755
			if err := tw.WriteHeader(h); err != nil {
				f.Close()
				return err
			}
			continue
		}
		h.Typeflag, h.Size = tar.TypeReg, info.Size()
		if err := tw.WriteHeader(h); err != nil {
			f.Close()
			return err
		}
		src, err := os.Open(path)
		if err != nil {
			f.Close()
			return err
		}
		_, err = io.Copy(tw, src)
		src.Close()
		if err != nil {
			f.Close()
			return err
		}
	}
	if err := tw.Close(); err != nil {
		f.Close()
		return err
	}
	if err := f.Sync(); err != nil {
		f.Close()
		return err
	}
	return f.Close()
}
