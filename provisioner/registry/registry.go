// Package registry fetches code-module images from OCI registries: it
// resolves a tag to the manifest digest of the node's platform and streams
// the image's layers, decompressed and digest-checked, to whoever builds
// the tree (extract.Layers). Mirrors are tried in order before the image's
// own registry, as containerd's hosts configuration does, so a pull-through
// cache inside the cluster serves a fleet from one upstream download.
package registry

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"os"
	"slices"
	"strings"
	"time"

	"github.com/google/go-containerregistry/pkg/name"
	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/remote"
	"github.com/google/go-containerregistry/pkg/v1/remote/transport"
	"github.com/google/go-containerregistry/pkg/v1/types"
	"github.com/klauspost/compress/gzip"
	"github.com/klauspost/compress/zstd"
	"k8s.io/klog/v2"

	"github.com/oneagent-csi/oneagent-csi/internal/idleread"
	"github.com/oneagent-csi/oneagent-csi/internal/readahead"
	"github.com/oneagent-csi/oneagent-csi/provisioner/extract"
)

// Sentinel errors; the provisioner maps them to its own.
var (
	// ErrUnauthorized: every registry tried refused the credentials.
	ErrUnauthorized = errors.New("registry refused the credentials")
	// ErrNotFound: the image (or its platform) does not exist.
	ErrNotFound = errors.New("image not found")
	// ErrUnavailable: no registry could be reached or all failed.
	ErrUnavailable = errors.New("registry unavailable")
)

// Source says where one tenant's code-module image comes from.
type Source struct {
	// Image is an OCI reference with a tag or a digest, e.g.
	// registry.example.com/dynatrace/dynatrace-codemodules:1.311.72.
	Image string
	// PullSecretFile is a kubernetes.io/dockerconfigjson Secret's file
	// (.dockerconfigjson); re-read on every pull. Empty: anonymous.
	PullSecretFile string
	// CAFile is a PEM bundle trusted in addition to the system roots.
	CAFile string
	// Proxy is an HTTPS proxy URL; empty uses HTTPS_PROXY/NO_PROXY.
	Proxy string
	// Mirrors are registry hosts (host[:port], or http://host[:port] for
	// a plain-HTTP mirror inside the cluster) tried in order before the
	// image's own registry, with the same repository path.
	Mirrors []string
	// Arch is the platform's architecture (amd64, arm64); the OS is linux.
	Arch string
	// RequestTimeout bounds the wait for a registry's answer (its response
	// headers) to every request, so a registry that accepts connections
	// but never answers is passed over for the next one. Default 30s.
	RequestTimeout time.Duration
	// IdleTimeout aborts a layer download that receives no bytes for this
	// long while the node is waiting for them (not while the node's own
	// disk holds the stream back); the next registry is tried and the
	// install retried, as for a stalled tenant. Default 60s.
	IdleTimeout time.Duration
	// Limits bound what a registry's answers may cost before anything is
	// installed: MaxManifestBytes every answer but a blob (manifests,
	// indexes, tokens), MaxLayers the layer count, MaxZstdWindow a zstd
	// layer's window. Zero fields take extract's defaults.
	Limits extract.Limits
}

// Defaults of Source's timeouts.
const (
	DefaultRequestTimeout = 30 * time.Second
	DefaultIdleTimeout    = 60 * time.Second
)

// Puller pulls one Source.
type Puller struct {
	src       Source
	ref       name.Reference
	transport http.RoundTripper
}

// New validates src (the reference, the mirrors, the CA file and the
// proxy, each named when it is wrong) and returns its Puller.
func New(src Source) (*Puller, error) {
	ref, err := name.ParseReference(src.Image, name.StrictValidation)
	if err != nil {
		return nil, fmt.Errorf("image %q: %w", src.Image, err)
	}
	for _, m := range src.Mirrors {
		host, _ := mirrorHost(m)
		if _, err := name.NewRegistry(host, name.StrictValidation); err != nil || host == "" || strings.ContainsAny(host, "/@") {
			return nil, fmt.Errorf("mirrors: %q is not a registry host[:port] (or http://host[:port] for a mirror inside the cluster)", m)
		}
	}
	if src.Arch == "" {
		return nil, errors.New("arch: required")
	}
	if src.RequestTimeout == 0 {
		src.RequestTimeout = DefaultRequestTimeout
	}
	if src.IdleTimeout == 0 {
		src.IdleTimeout = DefaultIdleTimeout
	}
	src.Limits.Defaults()
	t, err := Transport(src.CAFile, src.Proxy)
	if err != nil {
		return nil, err
	}
	t.ResponseHeaderTimeout = src.RequestTimeout
	return &Puller{src: src, ref: ref, transport: boundedAnswers{base: t, max: src.Limits.MaxManifestBytes}}, nil
}

// Transport is the HTTP transport to registries: the system roots plus
// the PEM certificates in caFile (if set), through proxy (if set; else
// HTTPS_PROXY/NO_PROXY). It speaks HTTP/1.1 only: over HTTP/2, Go's client
// reads a layer ahead into the process, up to the stream's flow-control
// window (4 MiB), whenever the tree is written slower than the registry
// sends; over HTTP/1.1 what is not read yet waits in the kernel's socket buffer
// and TCP holds the registry back (BENCHMARKS.md: 4.5 MiB less peak RSS
// and less CPU per image install).
func Transport(caFile, proxy string) (*http.Transport, error) {
	t := http.DefaultTransport.(*http.Transport).Clone()
	t.Protocols = new(http.Protocols)
	t.Protocols.SetHTTP1(true)
	if caFile != "" {
		pem, err := os.ReadFile(caFile)
		if err != nil {
			return nil, fmt.Errorf("caFile: %w", err)
		}
		pool, err := x509.SystemCertPool()
		if err != nil {
			pool = x509.NewCertPool()
		}
		if !pool.AppendCertsFromPEM(pem) {
			return nil, fmt.Errorf("caFile %s: no PEM certificate in it", caFile)
		}
		t.TLSClientConfig = &tls.Config{RootCAs: pool, MinVersion: tls.VersionTLS12}
	}
	if proxy != "" {
		u, err := url.Parse(proxy)
		if err != nil || u.Host == "" {
			return nil, fmt.Errorf("proxy %q: not a URL", proxy)
		}
		t.Proxy = http.ProxyURL(u)
	}
	return t, nil
}

// Image is the configured reference, normalised.
func (p *Puller) Image() string { return p.ref.Name() }

// Repository is the configured image's repository (no tag or digest).
func (p *Puller) Repository() string { return p.ref.Context().Name() }

// refs are the references to try for ref, mirrors first.
func (p *Puller) refs(ref name.Reference) []name.Reference {
	var out []name.Reference
	repo := ref.Context().RepositoryStr()
	for _, m := range p.src.Mirrors {
		host, plain := mirrorHost(m)
		var opts []name.Option
		if plain {
			opts = append(opts, name.Insecure)
		}
		var r name.Reference
		var err error
		switch v := ref.(type) {
		case name.Digest:
			r, err = name.NewDigest(host+"/"+repo+"@"+v.DigestStr(), opts...)
		default:
			r, err = name.NewTag(host+"/"+repo+":"+ref.Identifier(), opts...)
		}
		if err == nil {
			out = append(out, r)
		}
	}
	return append(out, ref)
}

// mirrorHost splits a mirrors entry into its host and whether it is
// plain HTTP ("http://host:port", for a mirror inside the cluster whose
// traffic never leaves it); a bare host or "https://host" is TLS.
func mirrorHost(m string) (string, bool) {
	if h, ok := strings.CutPrefix(m, "http://"); ok {
		return h, true
	}
	return strings.TrimPrefix(m, "https://"), false
}

func (p *Puller) options(ctx context.Context) ([]remote.Option, error) {
	keys, err := ReadKeychain(p.src.PullSecretFile)
	if err != nil {
		return nil, err
	}
	return []remote.Option{remote.WithContext(ctx), remote.WithTransport(p.transport), remote.WithAuthFromKeychain(keys),
		remote.WithPlatform(v1.Platform{OS: "linux", Architecture: p.src.Arch}),
		// One attempt per host: the provisioner retries with backoff.
		remote.WithRetryBackoff(remote.Backoff{Steps: 1})}, nil
}

// Resolved is what a reference stands for on this node's platform.
type Resolved struct {
	// Digest is the platform's image manifest digest (sha256:...): the
	// artifact's identity.
	Digest string
	// Host is the registry that answered.
	Host string
}

// Resolve returns the manifest digest of the configured image for the
// platform, asking the mirrors first. tag, when set, replaces the
// reference's tag (a volume's version pin).
func (p *Puller) Resolve(ctx context.Context, tag string) (Resolved, error) {
	ref := p.ref
	if tag != "" {
		t, err := name.NewTag(p.ref.Context().Name()+":"+tag, name.StrictValidation)
		if err != nil {
			return Resolved{}, fmt.Errorf("%w: tag %q: %v", ErrNotFound, tag, err) //nolint:errorlint // one sentinel
		}
		ref = t
	}
	opts, err := p.options(ctx)
	if err != nil {
		return Resolved{}, err
	}
	var errs []error
	for _, r := range p.refs(ref) {
		d, err := p.resolveAt(ctx, r, opts)
		if err == nil {
			return Resolved{Digest: d.String(), Host: r.Context().RegistryStr()}, nil
		}
		errs = append(errs, classify(r, err))
		if ctx.Err() != nil {
			break
		}
	}
	return Resolved{}, joinClassified(errs)
}

// resolveAt asks one registry for the platform's manifest digest of r,
// within RequestTimeout (the exchanges of a resolution are small).
func (p *Puller) resolveAt(ctx context.Context, r name.Reference, opts []remote.Option) (v1.Hash, error) {
	rctx, cancel := context.WithTimeoutCause(ctx, p.src.RequestTimeout, errStalled)
	defer cancel()
	img, err := remote.Image(r, append(slices.Clip(opts), remote.WithContext(rctx))...)
	if err != nil {
		if ctx.Err() == nil && errors.Is(context.Cause(rctx), errStalled) {
			return v1.Hash{}, fmt.Errorf("no answer within %v", p.src.RequestTimeout) // classify: unavailable
		}
		return v1.Hash{}, err
	}
	return img.Digest()
}

// Tree receives an image's layers in order (extract.Layers).
type Tree interface {
	Apply(ctx context.Context, layer io.Reader, compressedSize int64) error
}

// Pull streams the layers of the image manifest digest to a tree, trying
// the mirrors first. start is called for every registry tried and returns
// a fresh tree (the caller drops the previous one). Each layer is
// decompressed as it arrives and its digest checked at its end; a layer
// whose content the tree refuses is still read to its end, so that a
// corrupted copy (try the next registry) is told from a bad image (stop).
func (p *Puller) Pull(ctx context.Context, digest string, start func() (Tree, error)) (string, error) {
	d, err := name.NewDigest(p.ref.Context().Name()+"@"+digest, name.StrictValidation)
	if err != nil {
		return "", fmt.Errorf("digest %q: %w", digest, err)
	}
	opts, err := p.options(ctx)
	if err != nil {
		return "", err
	}
	var errs []error
	for _, r := range p.refs(d) {
		host := r.Context().RegistryStr()
		err := p.pullFrom(ctx, r, opts, start)
		if err == nil {
			return host, nil
		}
		if errors.Is(err, extract.ErrBadArchive) && !errors.Is(err, errCorrupt) || ctx.Err() != nil {
			return host, err
		}
		klog.FromContext(ctx).Info("pull failed, trying the next registry", "host", host, "err", err.Error())
		errs = append(errs, err)
	}
	return "", joinClassified(errs)
}

// errCorrupt marks a layer whose bytes do not match its digest: the
// registry's copy is damaged, not the image.
var errCorrupt = errors.New("layer does not match its digest")

// errStalled is the cause of a layer download aborted for silence.
var errStalled = errors.New("no bytes received")

func (p *Puller) pullFrom(ctx context.Context, r name.Reference, opts []remote.Option, start func() (Tree, error)) error {
	// Its own context, so that a stalled layer download can be aborted
	// (the blob's reader lives in go-containerregistry and reads with the
	// context given here) without cancelling the caller's.
	ctx, cancel := context.WithCancelCause(ctx)
	defer cancel(nil)
	opts = append(slices.Clip(opts), remote.WithContext(ctx))
	// The manifest is small: RequestTimeout bounds getting all of it.
	slow := time.AfterFunc(p.src.RequestTimeout, func() { cancel(errStalled) })
	img, err := remote.Image(r, opts...)
	var m *v1.Manifest
	if err == nil {
		m, err = img.Manifest()
	}
	if !slow.Stop() {
		return fmt.Errorf("%s: %w: the manifest took longer than %v", r, ErrUnavailable, p.src.RequestTimeout)
	}
	if err != nil {
		return classify(r, err)
	}
	if m.MediaType != "" && !m.MediaType.IsImage() {
		return fmt.Errorf("%w: %s is a %s, not an image manifest", extract.ErrBadArchive, r, m.MediaType)
	}
	if len(m.Layers) > p.src.Limits.MaxLayers {
		return fmt.Errorf("%w: %s has %d layers, over limits.maxLayers (%d)", extract.ErrBadArchive, r, len(m.Layers), p.src.Limits.MaxLayers)
	}
	for _, l := range m.Layers {
		if _, err := decompressorFor(l.MediaType, p.src.Limits); err != nil {
			return err
		}
	}
	tree, err := start()
	if err != nil {
		return err
	}
	for i, desc := range m.Layers {
		layer, err := img.LayerByDigest(desc.Digest)
		if err != nil {
			return classify(r, err)
		}
		if err := applyLayer(ctx, cancel, p.src, tree, layer, desc, i); err != nil {
			return err
		}
	}
	return nil
}

// A layer is installed in three stages, each in its own goroutine: one
// receives (TLS, digests) while another decompresses what arrived before,
// and that one runs ahead of the tree writing the files, as `crane export |
// tar -x` runs in two processes. A tar stream is sequential; pipelining its
// stages is the parallelism it has.
//
// Sizes: the decompressed stage holds more (a tree write can stall on the
// disk for a while); the received stage only smooths TLS records into
// what gunzip reads. Both count in the node's RSS (README, Memory).
const (
	readAheadChunk  = 128 << 10
	readAheadChunks = 4

	receivedChunk  = 64 << 10
	receivedChunks = 3
)

// applyLayer streams one layer: raw bytes counted as they arrive,
// decompressed, handed to the tree; then the size and digest are checked.
//
// The digest is computed once, by go-containerregistry's reader of the
// blob (it hashes every byte it hands out and fails the read at the end
// when the hash differs). A second SHA-256 of the same bytes here cost a
// core about 0.8 s per GiB of layer, on a node that is busy decompressing
// and writing at the same time (BENCHMARKS.md).
//
// ctx is the pull's own context: abort cancels it when a read of the blob
// waits idle without a byte, which fails the read.
func applyLayer(ctx context.Context, abort context.CancelCauseFunc, src Source, tree Tree, layer v1.Layer, desc v1.Descriptor, index int) error {
	idle := src.IdleTimeout
	if desc.Digest.Algorithm != "sha256" {
		return fmt.Errorf("%w: layer %d digest %s: only sha256 is supported", extract.ErrBadArchive, index, desc.Digest)
	}
	rc, err := layer.Compressed()
	if err != nil {
		return fmt.Errorf("%w: layer %d %s: %v", ErrUnavailable, index, desc.Digest, err) //nolint:errorlint // classified by the sentinel
	}
	defer rc.Close()
	// Only the registry's silence counts, not the time the stages behind
	// take to ask for more.
	received := idleread.New(io.LimitReader(rc, desc.Size+1), idle, func() { abort(errStalled) })
	defer received.Stop()
	cr := &countingReader{r: received}
	raw := readahead.New(cr, receivedChunk, receivedChunks)
	decompress, _ := decompressorFor(desc.MediaType, src.Limits)
	plain, closeFn, derr := decompress(raw)
	if derr == nil {
		ahead := readahead.New(plain, readAheadChunk, readAheadChunks)
		err = tree.Apply(ctx, ahead, desc.Size)
		ahead.Close()
		closeFn()
	}
	raw.Close() // before cr is read below; what it read ahead is counted already
	// Read to the end (bounded by the declared size) so that the digest
	// covers the whole blob, whatever the tree did with it.
	_, _ = io.Copy(io.Discard, cr)
	switch {
	case cr.err != nil && !isDigestMismatch(cr.err):
		// The transfer broke (connection, timeout, cancel): the copy may
		// be fine, another registry or a later try can serve it.
		if errors.Is(context.Cause(ctx), errStalled) {
			return fmt.Errorf("%w: layer %d %s: download stalled, %w for %v after %d of %d bytes",
				ErrUnavailable, index, desc.Digest, errStalled, idle, cr.n, desc.Size)
		}
		if ctx.Err() != nil {
			return fmt.Errorf("layer %d %s: %w", index, desc.Digest, ctx.Err())
		}
		return fmt.Errorf("%w: layer %d %s: after %d of %d bytes: %v", ErrUnavailable, index, desc.Digest, cr.n, desc.Size, cr.err) //nolint:errorlint // classified by the sentinel
	case cr.n != desc.Size || cr.err != nil:
		what := fmt.Sprintf("%d bytes (manifest says %d)", cr.n, desc.Size)
		if cr.err != nil {
			what = cr.err.Error()
		}
		return fmt.Errorf("%w: %w: layer %d %s: %s", extract.ErrBadArchive, errCorrupt, index, desc.Digest, what)
	case derr != nil:
		return fmt.Errorf("%w: layer %d %s: %v", extract.ErrBadArchive, index, desc.Digest, derr) //nolint:errorlint // one sentinel
	case err != nil:
		return fmt.Errorf("layer %d %s: %w", index, desc.Digest, err)
	}
	return nil
}

// isDigestMismatch tells go-containerregistry's verification failure at
// the end of a blob (its error type is internal: "error verifying sha256
// checksum ...", "error verifying size ...") from a broken transfer.
// TestCorruptedBlob fails if that wording changes.
func isDigestMismatch(err error) bool {
	return strings.Contains(err.Error(), "error verifying")
}

// countingReader counts the bytes read and keeps the first error other
// than io.EOF.
type countingReader struct {
	r   io.Reader
	n   int64
	err error
}

func (c *countingReader) Read(p []byte) (int, error) {
	n, err := c.r.Read(p)
	c.n += int64(n)
	if err != nil && err != io.EOF && c.err == nil { //nolint:errorlint // io.EOF is returned unwrapped by contract
		c.err = err
	}
	return n, err
}

// decompressorFor returns how to read a layer of a media type.
func decompressorFor(mt types.MediaType, limits extract.Limits) (func(io.Reader) (io.Reader, func(), error), error) {
	switch mt {
	case types.OCILayer, types.DockerLayer, types.DockerForeignLayer, types.OCIRestrictedLayer:
		return func(r io.Reader) (io.Reader, func(), error) {
			z, err := gzip.NewReader(r)
			if err != nil {
				return nil, nil, err
			}
			return z, func() { _ = z.Close() }, nil
		}, nil
	case types.OCILayerZStd:
		return func(r io.Reader) (io.Reader, func(), error) {
			// The decoder allocates the window the frame declares; one
			// over the bound is refused before it is allocated.
			z, err := zstd.NewReader(r, zstd.WithDecoderConcurrency(1), zstd.WithDecoderLowmem(true),
				zstd.WithDecoderMaxWindow(uint64(limits.MaxZstdWindow)))
			if err != nil {
				return nil, nil, err
			}
			return zstdWindowReader{z, limits.MaxZstdWindow}, z.Close, nil
		}, nil
	case types.OCIUncompressedLayer, types.OCIUncompressedRestrictedLayer, "application/vnd.docker.image.rootfs.diff.tar":
		return func(r io.Reader) (io.Reader, func(), error) { return r, func() {}, nil }, nil
	}
	return nil, fmt.Errorf("%w: layer media type %q is not supported (gzip, zstd or uncompressed tar)", extract.ErrBadArchive, mt)
}

// classify maps a registry client error to the sentinels.
func classify(r name.Reference, err error) error {
	if err == nil {
		return nil
	}
	var te *transport.Error
	if errors.As(err, &te) {
		switch te.StatusCode {
		case http.StatusUnauthorized, http.StatusForbidden:
			return fmt.Errorf("%s: %w: %v", r, ErrUnauthorized, err) //nolint:errorlint // classified by the sentinel
		case http.StatusNotFound:
			return fmt.Errorf("%s: %w: %v", r, ErrNotFound, err) //nolint:errorlint // classified by the sentinel
		}
	}
	if strings.Contains(err.Error(), "no child with platform") {
		return fmt.Errorf("%s: %w: no image for linux/%s in the index", r, ErrNotFound, platformOf(err))
	}
	if errors.Is(err, extract.ErrBadArchive) || errors.Is(err, context.Canceled) || errors.Is(err, context.DeadlineExceeded) {
		return fmt.Errorf("%s: %w", r, err)
	}
	return fmt.Errorf("%s: %w: %v", r, ErrUnavailable, err) //nolint:errorlint // classified by the sentinel
}

func platformOf(err error) string {
	msg := err.Error()
	if i := strings.Index(msg, "linux/"); i >= 0 {
		return strings.Fields(msg[i+len("linux/"):])[0]
	}
	return "this node"
}

// joinClassified returns the errors of every registry tried, classified
// by the last one: the image's own registry is the authority, mirrors are
// best effort (a mirror without the image must not make it "not found").
func joinClassified(errs []error) error {
	if len(errs) == 0 {
		return ErrUnavailable
	}
	last := errs[len(errs)-1]
	if len(errs) == 1 {
		return last
	}
	for _, s := range []error{ErrUnauthorized, ErrNotFound, extract.ErrBadArchive, context.Canceled, context.DeadlineExceeded} {
		if errors.Is(last, s) {
			return fmt.Errorf("%w (every registry tried: %v)", s, errors.Join(errs...)) //nolint:errorlint // one sentinel, all causes as text
		}
	}
	return fmt.Errorf("%w (every registry tried: %v)", ErrUnavailable, errors.Join(errs...)) //nolint:errorlint // one sentinel, all causes as text
}
