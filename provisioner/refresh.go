package provisioner

import (
	"context"
	"fmt"
	"math/rand/v2"
	"sync"
	"time"

	"k8s.io/klog/v2"
)

// staleCache keeps one value per key and serves it stale-while-revalidate:
// a fresh value (younger than ttl) is returned as it is; a stale one is
// returned at once while a single background refresh runs; only a caller
// with no value at all waits for the tenant (until its ctx ends). After a
// failed refresh the next one waits a backoff that doubles from
// backoffBase up to ttl, so a sick tenant is not hammered by every publish.
type staleCache[T any] struct {
	ttl         time.Duration
	backoffBase time.Duration
	now         func() time.Time
	// refreshed, when set, counts every finished refresh by result ("ok",
	// "failed"); it is called with the outcome already recorded.
	refreshed func(result string)

	mu      sync.Mutex
	entries map[string]*staleEntry[T]
}

type staleEntry[T any] struct {
	val      T
	has      bool
	at       time.Time // when val was fetched
	failures int
	retryAt  time.Time // no refresh before this after a failure
	running  chan struct{}
	lastErr  error
}

func newStaleCache[T any](ttl, backoffBase time.Duration, now func() time.Time) *staleCache[T] {
	return &staleCache[T]{ttl: ttl, backoffBase: backoffBase, now: now, entries: map[string]*staleEntry[T]{}}
}

// peek returns the value of key and when it was fetched.
func (c *staleCache[T]) peek(key string) (T, time.Time, bool) {
	c.mu.Lock()
	defer c.mu.Unlock()
	e := c.entries[key]
	if e == nil || !e.has {
		var zero T
		return zero, time.Time{}, false
	}
	return e.val, e.at, true
}

// seed sets a value known from elsewhere (the index) as fetched at at, unless
// the key has one already.
func (c *staleCache[T]) seed(key string, val T, at time.Time) {
	c.mu.Lock()
	defer c.mu.Unlock()
	e := c.entry(key)
	if !e.has {
		e.val, e.has, e.at = val, true, at
	}
}

func (c *staleCache[T]) entry(key string) *staleEntry[T] {
	e := c.entries[key]
	if e == nil {
		e = &staleEntry[T]{}
		c.entries[key] = e
	}
	return e
}

// get returns the value of key, fetching or refreshing it as described on
// staleCache; stale reports that the value is older than ttl. fetch runs on
// a context detached from ctx, bounded by fetchTimeout.
func (c *staleCache[T]) get(ctx context.Context, key string, fetchTimeout time.Duration, fetch func(context.Context) (T, error)) (val T, stale bool, err error) {
	now := c.now()
	c.mu.Lock()
	e := c.entry(key)
	if e.has && now.Sub(e.at) < c.ttl {
		v := e.val
		c.mu.Unlock()
		return v, false, nil
	}
	if e.running == nil && (!e.has || !now.Before(e.retryAt)) {
		e.running = make(chan struct{})
		go c.refresh(klog.FromContext(ctx), key, e, fetchTimeout, fetch)
	}
	if e.has {
		v := e.val
		c.mu.Unlock()
		return v, true, nil
	}
	running, lastErr := e.running, e.lastErr
	c.mu.Unlock()
	if running == nil {
		// Nothing known and the last fetch failed moments ago.
		var zero T
		return zero, false, lastErr
	}
	select {
	case <-running:
	case <-ctx.Done():
		// The request goes on; the caller may try again (Unavailable,
		// not a deadline of its own making).
		var zero T
		return zero, false, fmt.Errorf("%w: no answer yet: %w", ErrUnavailable, ctx.Err())
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	if e.has {
		return e.val, false, nil
	}
	var zero T
	return zero, false, e.lastErr
}

// kick starts a background refresh of key unless one runs or a backoff
// holds; it does not wait.
func (c *staleCache[T]) kick(ctx context.Context, key string, fetchTimeout time.Duration, fetch func(context.Context) (T, error)) {
	c.mu.Lock()
	defer c.mu.Unlock()
	e := c.entry(key)
	if e.running == nil && !c.now().Before(e.retryAt) {
		e.running = make(chan struct{})
		go c.refresh(klog.FromContext(ctx), key, e, fetchTimeout, fetch)
	}
}

func (c *staleCache[T]) refresh(log klog.Logger, key string, e *staleEntry[T], timeout time.Duration, fetch func(context.Context) (T, error)) {
	ctx, cancel := context.WithTimeout(klog.NewContext(context.Background(), log), timeout)
	defer cancel()
	v, err := fetch(ctx)
	c.mu.Lock()
	defer c.mu.Unlock()
	if err == nil {
		e.val, e.has, e.at, e.failures, e.lastErr = v, true, c.now(), 0, nil
	} else {
		e.failures++
		e.lastErr = err
		e.retryAt = c.now().Add(c.backoff(e.failures))
		if e.has {
			log.Info("tenant did not answer, serving the last known value", "key", key, "failures", e.failures,
				"nextTry", e.retryAt.Sub(c.now()).Round(time.Second), "err", err)
		}
	}
	close(e.running)
	e.running = nil
	if c.refreshed != nil {
		result := "ok"
		if err != nil {
			result = "failed"
		}
		c.refreshed(result)
	}
}

// backoff is backoffBase doubled per failure, at most ttl, with "equal
// jitter" (half fixed, half random) so that a fleet does not retry in step.
func (c *staleCache[T]) backoff(failures int) time.Duration {
	d := c.backoffBase
	for i := 1; i < failures && d < c.ttl; i++ {
		d *= 2
	}
	d = min(d, max(c.ttl, c.backoffBase))
	return d/2 + time.Duration(rand.Int64N(int64(d/2)+1))
}
