package readahead

import (
	"bytes"
	"errors"
	"io"
	"math/rand/v2"
	"testing"
	"testing/iotest"
)

// The sizes the tests read with.
const (
	testChunk  = 64 << 10
	testChunks = 3
)

func TestReadAhead(t *testing.T) {
	data := make([]byte, 3*testChunk+12345)
	rng := rand.New(rand.NewPCG(1, 1))
	for i := range data {
		data[i] = byte(rng.IntN(256))
	}
	broken := errors.New("connection reset")
	for _, tc := range []struct {
		name    string
		r       io.Reader
		want    []byte
		wantErr error
	}{
		{"all bytes in order", iotest.HalfReader(bytes.NewReader(data)), data, nil},
		{"empty", bytes.NewReader(nil), nil, nil},
		// A truncated stream must stay an error, not become an end.
		{"error after data", io.MultiReader(bytes.NewReader(data[:1000]), iotest.ErrReader(io.ErrUnexpectedEOF)), data[:1000], io.ErrUnexpectedEOF},
		{"error at once", iotest.ErrReader(broken), nil, broken},
	} {
		t.Run(tc.name, func(t *testing.T) {
			ra := New(tc.r, testChunk, testChunks)
			defer ra.Close()
			got, err := io.ReadAll(iotest.OneByteReader(io.LimitReader(ra, 1<<30)))
			if !errors.Is(err, tc.wantErr) {
				t.Fatalf("err = %v, want %v", err, tc.wantErr)
			}
			if !bytes.Equal(got, tc.want) {
				t.Fatalf("got %d bytes, want %d (same content: %v)", len(got), len(tc.want), bytes.Equal(got, tc.want[:min(len(got), len(tc.want))]))
			}
		})
	}
}

// countingReader counts reads.
type countingReader struct{ reads int }

func (c *countingReader) Read(p []byte) (int, error) { c.reads++; return len(p), nil }

// After Close the source is not read any more (the caller reads it next).
func TestReadAheadCloseStopsReading(t *testing.T) {
	src := &countingReader{}
	ra := New(src, testChunk, testChunks)
	if _, err := io.ReadFull(ra, make([]byte, 10)); err != nil {
		t.Fatal(err)
	}
	ra.Close()
	reads := src.reads
	if reads > testChunks+2 {
		t.Errorf("%d reads: more than the read-ahead allows", reads)
	}
	if _, err := ra.Read(make([]byte, testChunk*(testChunks+2))); err == nil && src.reads != reads {
		t.Errorf("source read after Close: %d -> %d", reads, src.reads)
	}
	if src.reads != reads {
		t.Errorf("source read after Close: %d -> %d", reads, src.reads)
	}
}
