package idleread_test

import (
	"bytes"
	"errors"
	"io"
	"sync/atomic"
	"testing"
	"time"

	"github.com/oneagent-csi/oneagent-csi/internal/idleread"
)

// blockingReader waits in Read until release is closed.
type blockingReader struct{ release chan struct{} }

func (b blockingReader) Read([]byte) (int, error) {
	<-b.release
	return 0, io.EOF
}

func TestIdleCountsOnlyTheWaitInsideARead(t *testing.T) {
	const idle = 20 * time.Millisecond
	t.Run("a pause between reads is not idle", func(t *testing.T) {
		var fired atomic.Bool
		r := idleread.New(bytes.NewReader(make([]byte, 8)), idle, func() { fired.Store(true) })
		buf := make([]byte, 4)
		if _, err := r.Read(buf); err != nil {
			t.Fatal(err)
		}
		time.Sleep(5 * idle) // the consumer's pause, not synchronisation
		if _, err := r.Read(buf); err != nil {
			t.Fatal(err)
		}
		if fired.Load() {
			t.Fatal("onIdle called for a pause between reads")
		}
	})
	t.Run("a read that waits is idle", func(t *testing.T) {
		release := make(chan struct{})
		r := idleread.New(blockingReader{release}, idle, func() { close(release) })
		done := make(chan error, 1)
		go func() { _, err := r.Read(make([]byte, 1)); done <- err }()
		select {
		case err := <-done:
			if !errors.Is(err, io.EOF) {
				t.Fatalf("read returned %v after onIdle", err)
			}
		case <-time.After(10 * time.Second):
			t.Fatal("onIdle never called for a read waiting without a byte")
		}
	})
}
