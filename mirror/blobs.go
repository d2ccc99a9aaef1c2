package mirror

import (
	"context"
	"errors"
	"io"
	"net/http"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/google/go-containerregistry/pkg/name"
	"github.com/google/go-containerregistry/pkg/v1/remote"
	"k8s.io/klog/v2"
)

// fetch is one upstream download of a blob into tmp/, which any number of
// requests read while it grows.
type fetch struct {
	partial string

	mu      sync.Mutex
	cond    *sync.Cond
	size    int64 // -1 until upstream said
	written int64
	done    bool
	err     error
}

func (f *fetch) update(fn func()) {
	f.mu.Lock()
	fn()
	f.mu.Unlock()
	f.cond.Broadcast()
}

func (m *Mirror) blobPath(digest string) string {
	return filepath.Join(m.o.Dir, "blobs", strings.TrimPrefix(digest, "sha256:"))
}

func (m *Mirror) serveBlob(w http.ResponseWriter, r *http.Request, repo, digest string) {
	w.Header().Set("Docker-Content-Digest", digest)
	w.Header().Set("Content-Type", "application/octet-stream")
	if f, err := os.Open(m.blobPath(digest)); err == nil {
		defer f.Close()
		http.ServeContent(w, r, "", time.Time{}, f)
		return
	}
	if r.Method == http.MethodHead {
		m.headBlob(w, r, repo, digest)
		return
	}
	f, src, cached, err := m.join(repo, digest)
	if err != nil {
		apiError(w, http.StatusInternalServerError, "UNKNOWN", err.Error())
		return
	}
	defer src.Close()
	if cached {
		http.ServeContent(w, r, "", time.Time{}, src)
		return
	}
	// Wait for upstream's answer (size or error) before the headers.
	f.mu.Lock()
	for f.size < 0 && f.err == nil {
		f.cond.Wait()
	}
	size, ferr := f.size, f.err
	f.mu.Unlock()
	if size < 0 {
		upstreamError(w, ferr)
		return
	}
	w.Header().Set("Content-Length", strconv.FormatInt(size, 10))
	buf := make([]byte, 256<<10)
	var sent int64
	for sent < size {
		f.mu.Lock()
		for f.written == sent && !f.done {
			f.cond.Wait()
		}
		written, done, ferr := f.written, f.done, f.err
		f.mu.Unlock()
		if written == sent && done {
			// Upstream broke off: cut the connection so the client sees a
			// short body, never a complete-looking wrong one.
			klog.FromContext(r.Context()).Error(ferr, "blob fetch failed while serving", "digest", digest)
			panic(http.ErrAbortHandler)
		}
		for sent < written {
			n, err := src.ReadAt(buf[:min(int64(len(buf)), written-sent)], sent)
			if n > 0 {
				if _, werr := w.Write(buf[:n]); werr != nil {
					return // the client went away; the fetch goes on for the others
				}
				sent += int64(n)
			}
			if err != nil && !errors.Is(err, io.EOF) {
				panic(http.ErrAbortHandler)
			}
		}
	}
}

// join returns the running fetch of digest (starting one when none runs)
// with the file to read it from, or the cached blob when it completed
// meanwhile. Looking up and opening happen under the lock the fetch takes
// to rename its file, so the file is always there to open.
func (m *Mirror) join(repo, digest string) (*fetch, *os.File, bool, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	if f, err := os.Open(m.blobPath(digest)); err == nil {
		return nil, f, true, nil
	}
	if f, ok := m.inflight[digest]; ok {
		src, err := os.Open(f.partial)
		return f, src, false, err
	}
	partial := filepath.Join(m.o.Dir, "tmp", strings.TrimPrefix(digest, "sha256:")+".partial")
	out, err := os.OpenFile(partial, os.O_WRONLY|os.O_CREATE|os.O_TRUNC, 0o644)
	if err != nil {
		return nil, nil, false, err
	}
	src, err := os.Open(partial)
	if err != nil {
		_ = out.Close()
		return nil, nil, false, err
	}
	f := &fetch{partial: partial, size: -1}
	f.cond = sync.NewCond(&f.mu)
	m.inflight[digest] = f
	go m.download(repo, digest, f, out)
	return f, src, false, nil
}

// download fetches the blob from upstream into f's file, on a context of
// its own: a client that goes away does not stop it for the others.
func (m *Mirror) download(repo, digest string, f *fetch, out *os.File) {
	ctx, cancel := context.WithTimeout(context.Background(), m.o.FetchTimeout)
	defer cancel()
	log := klog.Background().WithValues("repo", repo, "digest", digest)
	start := m.o.Now()
	err := m.copyBlob(ctx, repo, digest, f, out)
	if cerr := out.Close(); err == nil {
		err = cerr
	}
	m.mu.Lock()
	if err == nil {
		err = os.Rename(f.partial, m.blobPath(digest))
	}
	if err != nil {
		_ = os.Remove(f.partial)
	}
	delete(m.inflight, digest)
	m.mu.Unlock()
	f.update(func() { f.done, f.err = true, err })
	if err != nil {
		log.Error(err, "upstream blob fetch failed")
		return
	}
	log.Info("cached blob from upstream", "bytes", f.written, "took", m.o.Now().Sub(start).Round(time.Millisecond))
}

func (m *Mirror) copyBlob(ctx context.Context, repo, digest string, f *fetch, out *os.File) error {
	ref, err := name.NewDigest(m.reg.RegistryStr()+"/"+repo+"@"+digest, name.StrictValidation)
	if err != nil {
		return err
	}
	opts, err := m.options(ctx)
	if err != nil {
		return err
	}
	layer, err := remote.Layer(ref, opts...)
	if err != nil {
		return err
	}
	size, err := layer.Size()
	if err != nil {
		return err
	}
	f.update(func() { f.size = size })
	// Compressed verifies size and digest at the end of the stream.
	rc, err := layer.Compressed()
	if err != nil {
		return err
	}
	defer rc.Close()
	buf := make([]byte, 256<<10)
	for {
		n, rerr := rc.Read(buf)
		if n > 0 {
			if _, err := out.Write(buf[:n]); err != nil {
				return err
			}
			f.update(func() { f.written += int64(n) })
		}
		if errors.Is(rerr, io.EOF) {
			return out.Sync()
		}
		if rerr != nil {
			return rerr
		}
	}
}

// headBlob answers a HEAD for an uncached blob with upstream's size,
// without fetching it.
func (m *Mirror) headBlob(w http.ResponseWriter, r *http.Request, repo, digest string) {
	ref, err := name.NewDigest(m.reg.RegistryStr()+"/"+repo+"@"+digest, name.StrictValidation)
	if err != nil {
		apiError(w, http.StatusBadRequest, "DIGEST_INVALID", err.Error())
		return
	}
	opts, err := m.options(r.Context())
	if err != nil {
		apiError(w, http.StatusInternalServerError, "UNKNOWN", err.Error())
		return
	}
	layer, err := remote.Layer(ref, opts...)
	if err == nil {
		var size int64
		if size, err = layer.Size(); err == nil {
			w.Header().Set("Content-Length", strconv.FormatInt(size, 10))
			return
		}
	}
	upstreamError(w, err)
}
