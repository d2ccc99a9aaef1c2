package registry

import (
	"errors"
	"fmt"
	"io"
	"net/http"
	"strings"

	"github.com/klauspost/compress/zstd"

	"github.com/oneagent-csi/oneagent-csi/provisioner/extract"
)

// boundedAnswers bounds every registry answer that is read whole (a
// manifest, an index, a token; everything but a blob, which is streamed)
// before it is read: go-containerregistry reads up to 100 MiB of a
// manifest, and a 10 MiB one cost about 73 MiB of heap as it was parsed.
// One tag pointing at such an answer must not crash-loop a fleet's node
// drivers at their prefetch.
type boundedAnswers struct {
	base http.RoundTripper
	max  int64
}

func (b boundedAnswers) RoundTrip(req *http.Request) (*http.Response, error) {
	resp, err := b.base.RoundTrip(req)
	if err != nil || strings.Contains(req.URL.Path, "/blobs/") || req.Method == http.MethodHead {
		return resp, err
	}
	if resp.ContentLength > b.max {
		_ = resp.Body.Close()
		return nil, tooLarge(req, resp.ContentLength, b.max)
	}
	resp.Body = &boundedBody{ReadCloser: resp.Body, req: req, limit: b.max}
	return resp, nil
}

// tooLarge is the refusal of an answer over the bound; size is its
// length when the registry declared one, else -1.
func tooLarge(req *http.Request, size, limit int64) error {
	what := fmt.Sprintf("more than %d bytes", limit)
	if size >= 0 {
		what = fmt.Sprintf("%d bytes", size)
	}
	return fmt.Errorf("%w: %s %s answered %s, over limits.maxManifestBytes (%d)", extract.ErrBadArchive, req.Method, req.URL.Redacted(), what, limit)
}

// boundedBody fails a read once an answer without a declared length
// passes the bound.
type boundedBody struct {
	io.ReadCloser
	req   *http.Request
	limit int64
	read  int64
}

func (b *boundedBody) Read(p []byte) (int, error) {
	if room := b.limit - b.read + 1; int64(len(p)) > room {
		p = p[:room]
	}
	n, err := b.ReadCloser.Read(p)
	if b.read += int64(n); b.read > b.limit {
		return 0, tooLarge(b.req, -1, b.limit)
	}
	return n, err
}

// zstdWindowReader makes a frame whose window is over the bound a bad
// image, not a failed download.
type zstdWindowReader struct {
	r     io.Reader
	limit int64
}

func (z zstdWindowReader) Read(p []byte) (int, error) {
	n, err := z.r.Read(p)
	if err != nil && errors.Is(err, zstd.ErrWindowSizeExceeded) {
		return n, fmt.Errorf("%w: a zstd layer declares a window over limits.maxZstdWindow (%d bytes): %v", extract.ErrBadArchive, z.limit, err) //nolint:errorlint // one sentinel
	}
	return n, err
}
