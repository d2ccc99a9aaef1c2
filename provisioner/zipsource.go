package provisioner

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"hash"
	"io"
	"os"
	"path/filepath"
	"time"

	"k8s.io/klog/v2"

	"github.com/oneagent-csi/oneagent-csi/internal/diskio"
	"github.com/oneagent-csi/oneagent-csi/provisioner/extract"
	"github.com/oneagent-csi/oneagent-csi/storage"
)

// The tenant's ZIP source. A code module is installed while it downloads:
// the end of the ZIP (its central directory) is fetched first with a range
// request, every entry is checked against it, and the archive is then
// extracted from the one sequential download into a stage in tmp/. A tenant
// that ignores the range sends the whole archive in answer to the first
// request: it is then downloaded into tmp/ and extracted from there.
// Either way nothing reaches artifacts/ before every check has passed, and
// the artifact id is the SHA-256 of the whole ZIP.

// installOnce installs key's ZIP from c's tenant once: streamed when the
// tenant answers range requests, downloaded first otherwise. Whatever
// fails, tmp/ is left clean.
func (p *Provisioner) installOnce(ctx context.Context, c *Client, key storage.ArtifactKey) (storage.Artifact, error) {
	start := p.opts.Now()
	if _, ok := p.downloadFirst.Load(c.Tenant().Name); ok {
		whole, err := c.OpenAgentZipRange(ctx, key.Version, key.Flavor, key.Arch, "")
		if err != nil {
			return storage.Artifact{}, err
		}
		return p.installDownloaded(ctx, c, key, whole)
	}
	tail, whole, err := p.fetchZipTail(ctx, c, key)
	if err != nil {
		return storage.Artifact{}, err
	}
	if whole.Body != nil {
		return p.installDownloaded(ctx, c, key, whole)
	}
	return p.installStreamed(ctx, c, key, tail, start)
}

// fetchZipTail fetches the end of key's ZIP, as far back as its central
// directory starts. When the tenant does not answer the range, whole is
// the download of the whole archive that it started instead (or that was
// started for it).
func (p *Provisioner) fetchZipTail(ctx context.Context, c *Client, key storage.ArtifactKey) (tail extract.ZipTail, whole ZipPart, err error) {
	fail := func(err error) (extract.ZipTail, ZipPart, error) {
		return extract.ZipTail{}, ZipPart{}, fmt.Errorf("tenant %q version %s: fetch the central directory: %w", c.Tenant().Name, key.Version, err)
	}
	part, err := c.OpenAgentZipRange(ctx, key.Version, key.Flavor, key.Arch, fmt.Sprintf("bytes=-%d", extract.ZipTailProbe))
	switch {
	case errors.Is(err, errRangeRefused):
		whole, err = c.OpenAgentZipRange(ctx, key.Version, key.Flavor, key.Arch, "")
		return tail, whole, err
	case err != nil:
		return tail, whole, err
	case !part.Partial:
		return tail, part, nil
	}
	data, err := readPart(part)
	if err != nil {
		return fail(err)
	}
	tail = extract.ZipTail{Data: data, Offset: part.Start, Size: part.Size}
	dirStart, err := extract.ZipTailStart(tail, p.opts.Limits)
	if err != nil {
		return fail(err)
	}
	if dirStart < tail.Offset {
		more, err := c.OpenAgentZipRange(ctx, key.Version, key.Flavor, key.Arch, fmt.Sprintf("bytes=%d-%d", dirStart, tail.Offset-1))
		if err != nil {
			return fail(err)
		}
		if !more.Partial || more.Start != dirStart || more.Size != tail.Size {
			_ = more.Body.Close()
			return fail(fmt.Errorf("second range answered for bytes %d of %d: %w", more.Start, more.Size, ErrUnavailable))
		}
		// One buffer for the whole directory: the rest of it is read into
		// its front, the probe copied behind (no second copy of the
		// directory).
		whole := make([]byte, tail.Offset-dirStart, tail.Size-dirStart)
		if err := readPartInto(more, whole, p.opts.Limits.MaxDirectoryBytes); err != nil {
			return fail(err)
		}
		tail.Data, tail.Offset = append(whole, tail.Data...), dirStart
	}
	return tail, whole, nil
}

// readPart reads a (small) partial answer whole: the probe at the end of
// the archive.
func readPart(part ZipPart) ([]byte, error) {
	if part.Length > extract.ZipTailProbe {
		_ = part.Body.Close()
		return nil, fmt.Errorf("partial answer of %d bytes for a probe of %d: %w", part.Length, extract.ZipTailProbe, ErrUnavailable)
	}
	data := make([]byte, part.Length)
	return data, readPartInto(part, data, extract.ZipTailProbe)
}

// readPartInto reads a partial answer of exactly len(buf) bytes (at most
// limit) into buf.
func readPartInto(part ZipPart, buf []byte, limit int64) error {
	defer part.Body.Close()
	if part.Length != int64(len(buf)) || part.Length > limit {
		return fmt.Errorf("partial answer of %d bytes, %d expected (at most %d): %w", part.Length, len(buf), limit, ErrUnavailable)
	}
	if _, err := io.ReadFull(part.Body, buf); err != nil {
		//nolint:errorlint // classified by ErrUnavailable only; the cause is text
		return fmt.Errorf("%w: partial answer of %d bytes: %v", ErrUnavailable, part.Length, err)
	}
	return nil
}

// installStreamed downloads key's ZIP once and extracts it on the way into
// a stage in tmp/, checked against tail, then installs the stage. start is
// when the install began (for the log).
func (p *Provisioner) installStreamed(ctx context.Context, c *Client, key storage.ArtifactKey, tail extract.ZipTail, start time.Time) (storage.Artifact, error) {
	l, fs := p.opts.Layout, p.opts.Fs
	log := klog.FromContext(ctx)
	tenant := c.Tenant().Name
	refuse := func(digest string, err error) error {
		err = fmt.Errorf("tenant %q version %s: %w", tenant, key.Version, err)
		until := p.refused.remember(tenant, key, digest, err, p.opts.Now(), p.opts.RefusalBackoff)
		log.Error(err, "archive refused; the version is not downloaded again before", "until", until.Format(time.RFC3339), "sha256", digest)
		return err
	}
	// A directory the rules refuse is refused by its bytes, before any data
	// is downloaded (again).
	zipSize := tail.Size // tail is not kept during the download: the directory is parsed into the plan
	dirSum := sha256.Sum256(tail.Data)
	dirDigest := "directory:" + hex.EncodeToString(dirSum[:])
	if err := p.refused.sameArchive(tenant, key, dirDigest, p.opts.Now(), p.opts.RefusalBackoff); err != nil {
		return storage.Artifact{}, err
	}
	dirStart, err := extract.CheckZipTail(tail, p.opts.Limits)
	if err != nil {
		if errors.Is(err, ErrBadArchive) {
			return storage.Artifact{}, refuse(dirDigest, err)
		}
		return storage.Artifact{}, fmt.Errorf("tenant %q version %s: %w", tenant, key.Version, err)
	}
	dirOnlySum := sha256.Sum256(tail.Data[dirStart-tail.Offset:])
	stagePath := l.TmpEntry(randomName("install-") + ".d")
	defer func() { _ = fs.RemoveAll(stagePath) }()

	part, err := c.OpenAgentZipRange(ctx, key.Version, key.Flavor, key.Arch, "")
	if err != nil {
		return storage.Artifact{}, err
	}
	defer part.Body.Close()
	if part.Size >= 0 && part.Size != tail.Size {
		p.stopStreaming(log, tenant)
		return storage.Artifact{}, fmt.Errorf("tenant %q version %s: the archive is %d bytes, its central directory was fetched from one of %d: %w",
			tenant, key.Version, part.Size, tail.Size, ErrUnavailable)
	}
	if err := fs.Mkdir(stagePath, 0o755); err != nil {
		return storage.Artifact{}, err
	}
	h := sha256.New()
	pr := &progressReader{r: part.Body, total: tail.Size, log: log, start: time.Now(), last: time.Now(), h: h}
	ex, err := extract.ZipStream(ctx, fs, filepath.Join(stagePath, l.TreeName()), tail, pr,
		extract.Options{Limits: p.opts.Limits, Workers: p.opts.ExtractWorkers, PageCache: p.opts.PageCache})
	switch {
	case err == nil:
	case errors.Is(err, ErrBadArchive):
		// Refused in its data: the rest is read (not written) for the
		// archive's SHA-256, so that the same bytes downloaded after the
		// backoff are known as such, as when the ZIP is downloaded first.
		// Its central directory is compared on the way: another one than
		// fetched first means another archive (built per request), whose
		// data the plan did not describe: not a refusal.
		dir := &directoryCheck{pos: pr.n, start: dirStart, h: sha256.New()}
		if _, derr := io.Copy(dir, pr); derr != nil || (part.Length >= 0 && pr.n != part.Length) {
			p.metrics.downloadBytes.Add(float64(pr.n))
			return storage.Artifact{}, refuse("", err)
		}
		p.metrics.downloadBytes.Add(float64(pr.n))
		if dir.complete && !bytes.Equal(dir.h.Sum(nil), dirOnlySum[:]) {
			p.stopStreaming(log, tenant)
			//nolint:errorlint // classified by ErrUnavailable only; the cause is text
			return storage.Artifact{}, fmt.Errorf("tenant %q version %s: %w: the download's central directory differs from the one fetched first (%v)",
				tenant, key.Version, ErrUnavailable, err)
		}
		digest := hex.EncodeToString(h.Sum(nil))
		if again := p.refused.sameArchive(tenant, key, digest, p.opts.Now(), p.opts.RefusalBackoff); again != nil {
			return storage.Artifact{}, again
		}
		return storage.Artifact{}, refuse(digest, err)
	case ctx.Err() != nil:
		p.metrics.downloadBytes.Add(float64(pr.n))
		return storage.Artifact{}, fmt.Errorf("tenant %q version %s: download: %w", tenant, key.Version, ctx.Err())
	case errors.Is(err, extract.ErrSource) && !errors.Is(err, ErrUnavailable):
		p.metrics.downloadBytes.Add(float64(pr.n))
		if errors.Is(err, extract.ErrArchiveChanged) {
			p.stopStreaming(log, tenant)
		}
		//nolint:errorlint // classified by ErrUnavailable only; the cause is text
		return storage.Artifact{}, fmt.Errorf("tenant %q version %s: download broke off after %d bytes: %w: %v", tenant, key.Version, pr.n, ErrUnavailable, err)
	default:
		p.metrics.downloadBytes.Add(float64(pr.n))
		return storage.Artifact{}, fmt.Errorf("tenant %q version %s: %w", tenant, key.Version, err)
	}
	p.metrics.downloadBytes.Add(float64(pr.n))
	id := hex.EncodeToString(h.Sum(nil))
	now := p.opts.Now()
	a := storage.Artifact{ID: id, Version: key.Version, Flavor: key.Flavor, Arch: key.Arch, ZipSize: zipSize,
		Size: ex.Size, Files: ex.Files, State: storage.ArtifactReady, InstalledAt: now, LastUsed: now}
	if hdr, err := storage.ReadManifestHeader(fs, l.ArtifactManifest(id)); err == nil && hdr.ArtifactID == id {
		// Same ZIP already installed under another key (e.g. another flavor alias).
		a.Size, a.Files, a.InstalledAt = hdr.Size, hdr.Files, hdr.InstalledAt
		return a, p.opts.Index.PutArtifact(a, key)
	}
	if err := p.commitArtifact(stagePath, a, key, ex.Entries); err != nil {
		return storage.Artifact{}, err
	}
	log.Info("installed code module", "artifact", id, "zipBytes", zipSize, "files", ex.Files, "bytes", ex.Size,
		"streamed", true, "install", now.Sub(start).Round(time.Millisecond))
	return a, nil
}

// directoryCheck hashes the bytes written to it that lie at or after
// start in the archive (the central directory), the first written one
// being at pos; complete when the hash covers all of them.
type directoryCheck struct {
	pos, start int64
	h          hash.Hash
	complete   bool
}

func (d *directoryCheck) Write(b []byte) (int, error) {
	if d.pos <= d.start {
		d.complete = true
	}
	if skip := d.start - d.pos; skip < int64(len(b)) {
		d.h.Write(b[max(skip, 0):])
	}
	d.pos += int64(len(b))
	return len(b), nil
}

// stopStreaming makes tenant's ZIPs downloaded whole from now on (until
// the node restarts): it served other bytes at the download than at the
// range request, so the directory fetched first cannot be trusted to
// describe the data (a tenant that builds its archives per request).
func (p *Provisioner) stopStreaming(log klog.Logger, tenant string) {
	if _, loaded := p.downloadFirst.LoadOrStore(tenant, true); !loaded {
		log.Info("the tenant served another archive than at the range request: its ZIPs are downloaded whole, then extracted, from now on")
	}
}

// installDownloaded downloads the whole ZIP (whole, already requested)
// into tmp/, extracts it next to it into <stage>/tree, and installs the
// stage as artifacts/<sha256 of the ZIP>.
func (p *Provisioner) installDownloaded(ctx context.Context, c *Client, key storage.ArtifactKey, whole ZipPart) (storage.Artifact, error) {
	l, fs := p.opts.Layout, p.opts.Fs
	log := klog.FromContext(ctx)
	base := randomName("install-")
	zipPath, stagePath := l.TmpEntry(base+".zip"), l.TmpEntry(base+".d")
	defer func() {
		_ = fs.Remove(zipPath)
		_ = fs.RemoveAll(stagePath)
	}()

	dlStart := p.opts.Now()
	zipSize, digest, err := p.download(ctx, c, key, whole, zipPath)
	if err != nil {
		return storage.Artifact{}, err
	}
	dlTime := p.opts.Now().Sub(dlStart)
	id := hex.EncodeToString(digest)
	p.metrics.downloadBytes.Add(float64(zipSize))
	if err := p.refused.sameArchive(c.Tenant().Name, key, id, p.opts.Now(), p.opts.RefusalBackoff); err != nil {
		return storage.Artifact{}, err
	}

	if h, err := storage.ReadManifestHeader(fs, l.ArtifactManifest(id)); err == nil && h.ArtifactID == id {
		// Same ZIP already installed under another key (e.g. another flavor alias).
		a := storage.Artifact{ID: id, Version: key.Version, Flavor: key.Flavor, Arch: key.Arch, ZipSize: zipSize,
			Size: h.Size, Files: h.Files, State: storage.ArtifactReady, InstalledAt: h.InstalledAt, LastUsed: p.opts.Now()}
		return a, p.opts.Index.PutArtifact(a, key)
	}

	exStart := p.opts.Now()
	if err := fs.Mkdir(stagePath, 0o755); err != nil {
		return storage.Artifact{}, err
	}
	ex, err := extract.Zip(ctx, fs, zipPath, filepath.Join(stagePath, l.TreeName()),
		extract.Options{Limits: p.opts.Limits, Workers: p.opts.ExtractWorkers, PageCache: p.opts.PageCache})
	if err != nil {
		err = fmt.Errorf("tenant %q version %s: %w", c.Tenant().Name, key.Version, err)
		if errors.Is(err, ErrBadArchive) {
			until := p.refused.remember(c.Tenant().Name, key, id, err, p.opts.Now(), p.opts.RefusalBackoff)
			log.Error(err, "archive refused; the version is not downloaded again before", "until", until.Format(time.RFC3339), "sha256", id)
		}
		return storage.Artifact{}, err
	}
	_ = fs.Remove(zipPath) // free the space before the tree is renamed in
	now := p.opts.Now()
	a := storage.Artifact{ID: id, Version: key.Version, Flavor: key.Flavor, Arch: key.Arch, ZipSize: zipSize,
		Size: ex.Size, Files: ex.Files, State: storage.ArtifactReady, InstalledAt: now, LastUsed: now}
	if err := p.commitArtifact(stagePath, a, key, ex.Entries); err != nil {
		return storage.Artifact{}, err
	}
	log.Info("installed code module", "artifact", id, "zipBytes", zipSize, "files", ex.Files, "bytes", ex.Size,
		"download", dlTime.Round(time.Millisecond), "extract", now.Sub(exStart).Round(time.Millisecond))
	return a, nil
}

// download streams the answer body into path, hashing it on the way, and
// logs progress every 5 seconds.
func (p *Provisioner) download(ctx context.Context, c *Client, key storage.ArtifactKey, whole ZipPart, path string) (int64, []byte, error) {
	body, total := whole.Body, whole.Length
	defer body.Close()
	f, err := p.opts.Fs.OpenFile(path, os.O_WRONLY|os.O_CREATE|os.O_EXCL, 0o600)
	if err != nil {
		return 0, nil, err
	}
	w := diskio.NewWriteBehind(f, diskio.WriteBehindChunk(p.opts.PageCache))
	h := sha256.New()
	pr := &progressReader{r: body, total: total, log: klog.FromContext(ctx), start: time.Now(), last: time.Now(), h: h}
	n, err := io.CopyBuffer(w, pr, make([]byte, 256<<10))
	if cerr := w.Close(); err == nil && cerr != nil {
		return n, nil, cerr
	}
	if err != nil {
		if ctx.Err() != nil {
			return n, nil, fmt.Errorf("tenant %q version %s: download: %w", c.Tenant().Name, key.Version, ctx.Err())
		}
		//nolint:errorlint // classified by ErrUnavailable only; the cause is text
		return n, nil, fmt.Errorf("tenant %q version %s: download broke off after %d bytes: %w: %v", c.Tenant().Name, key.Version, n, ErrUnavailable, err)
	}
	if total >= 0 && n != total {
		// A broken transfer, not a bad archive: retried at once.
		return n, nil, fmt.Errorf("tenant %q version %s: download has %d of %d bytes: %w", c.Tenant().Name, key.Version, n, total, ErrUnavailable)
	}
	return n, h.Sum(nil), nil
}

type progressReader struct {
	r     io.Reader
	h     hash.Hash
	total int64
	n     int64
	log   klog.Logger
	start time.Time
	last  time.Time
}

func (pr *progressReader) Read(b []byte) (int, error) {
	n, err := pr.r.Read(b)
	pr.h.Write(b[:n])
	pr.n += int64(n)
	if now := time.Now(); now.Sub(pr.last) >= 5*time.Second {
		pr.last = now
		rate := float64(pr.n) / now.Sub(pr.start).Seconds() / (1 << 20)
		kv := []any{"bytes", pr.n, "rateMiBps", fmt.Sprintf("%.1f", rate)}
		if pr.total > 0 {
			kv = append(kv, "total", pr.total, "percent", fmt.Sprintf("%.0f", 100*float64(pr.n)/float64(pr.total)))
		}
		pr.log.Info("downloading code module", kv...)
	}
	return n, err
}
