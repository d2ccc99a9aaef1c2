package provisioner

import (
	"fmt"
	"sync"
	"time"

	"github.com/oneagent-csi/oneagent-csi/storage"
)

// refusals remembers archives that extraction refused, per tenant and
// artifact key, so that a tenant serving a bad archive costs one download
// per backoff instead of several per publish. A re-download that brings the
// same bytes (same SHA-256) is refused without extracting it again and
// doubles the backoff; different bytes are tried.
type refusals struct {
	mu sync.Mutex
	m  map[string]*refusal
}

type refusal struct {
	digest string
	err    error
	until  time.Time
	times  int
}

// refusedAgain wraps the error of an archive refused before: it is not
// counted as a new bad archive.
type refusedAgain struct{ err error }

func (e *refusedAgain) Error() string { return e.err.Error() }
func (e *refusedAgain) Unwrap() error { return e.err }

// maxRefusalBackoff caps the wait before a refused version is downloaded again.
const maxRefusalBackoff = time.Hour

func refusalKey(tenant string, key storage.ArtifactKey) string { return tenant + "/" + key.String() }

// check returns an error wrapping ErrBadArchive while a refusal of the
// version holds.
func (r *refusals) check(tenant string, key storage.ArtifactKey, now time.Time) error {
	r.mu.Lock()
	defer r.mu.Unlock()
	f := r.m[refusalKey(tenant, key)]
	if f == nil || !now.Before(f.until) {
		return nil
	}
	return &refusedAgain{fmt.Errorf("archive refused %d time(s), next download in %s: %w",
		f.times, f.until.Sub(now).Round(time.Second), f.err)}
}

// sameArchive returns the remembered error (extending the backoff) when a
// new download brought the bytes that were refused before.
func (r *refusals) sameArchive(tenant string, key storage.ArtifactKey, digest string, now time.Time, base time.Duration) error {
	r.mu.Lock()
	defer r.mu.Unlock()
	f := r.m[refusalKey(tenant, key)]
	if f == nil || f.digest != digest {
		return nil
	}
	f.times++
	f.until = now.Add(backoffFor(f.times, base))
	return &refusedAgain{f.err}
}

// remember records a refusal and returns until when it holds.
func (r *refusals) remember(tenant string, key storage.ArtifactKey, digest string, err error, now time.Time, base time.Duration) time.Time {
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.m == nil {
		r.m = map[string]*refusal{}
	}
	f := r.m[refusalKey(tenant, key)]
	if f == nil || f.digest != digest {
		f = &refusal{digest: digest}
		r.m[refusalKey(tenant, key)] = f
	}
	f.times++
	f.err = err
	f.until = now.Add(backoffFor(f.times, base))
	return f.until
}

// backoffFor is base doubled per earlier refusal, at most an hour.
func backoffFor(times int, base time.Duration) time.Duration {
	d := base
	for i := 1; i < times && d < maxRefusalBackoff; i++ {
		d *= 2
	}
	return min(d, maxRefusalBackoff)
}
