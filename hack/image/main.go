// Command image writes oneagent-csi's runtime image as an OCI layout
// tarball (internal/ociimage), for `make image`:
//
//	go run ./hack/image --name oneagent-csi:1.2.3 --out bin/oneagent-csi-image.tar \
//	  --binary amd64=bin/linux-amd64/oneagent-csi --binary arm64=bin/linux-arm64/oneagent-csi
package main

import (
	"flag"
	"fmt"
	"os"
	"strings"

	"github.com/oneagent-csi/oneagent-csi/internal/ociimage"
)

type binaries []ociimage.Platform

func (b *binaries) String() string { return fmt.Sprint(*b) }

func (b *binaries) Set(v string) error {
	arch, path, ok := strings.Cut(v, "=")
	if !ok || arch == "" || path == "" {
		return fmt.Errorf("--binary %q: want <arch>=<path>", v)
	}
	*b = append(*b, ociimage.Platform{Arch: arch, Binary: path})
	return nil
}

func main() {
	var (
		o    ociimage.Options
		bins binaries
		out  string
	)
	flag.StringVar(&o.Name, "name", "", "image reference recorded in the tarball (required)")
	flag.StringVar(&out, "out", "", "the tarball to write (required)")
	flag.Var(&bins, "binary", "<arch>=<path> of a static linux binary; repeat for each platform")
	flag.StringVar(&o.CACertificates, "ca", "/etc/ssl/certs/ca-certificates.crt", "PEM bundle of CA certificates put into the image")
	flag.StringVar(&o.Version, "version", "dev", "org.opencontainers.image.version label")
	flag.Parse()
	o.Platforms = bins
	if out == "" {
		fmt.Fprintln(os.Stderr, "image: --out is required")
		os.Exit(2)
	}
	digest, err := ociimage.Write(out, o)
	if err != nil {
		fmt.Fprintln(os.Stderr, "image:", err)
		os.Exit(1)
	}
	var archs []string
	for _, b := range bins {
		archs = append(archs, "linux/"+b.Arch)
	}
	fmt.Printf("wrote %s: %s %s (%s)\n", out, o.Name, digest, strings.Join(archs, ", "))
}
