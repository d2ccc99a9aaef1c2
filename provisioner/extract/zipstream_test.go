package extract_test

import (
	"archive/zip"
	"bytes"
	"context"
	"encoding/binary"
	"errors"
	"io"
	"math/rand/v2"
	"strings"
	"testing"

	"github.com/spf13/afero"

	"github.com/oneagent-csi/oneagent-csi/provisioner/extract"
)

// textData is compressible content of n bytes.
func textData(seed uint64, n int) []byte {
	rng := rand.New(rand.NewPCG(seed, seed))
	b := make([]byte, n)
	for i := range b {
		b[i] = "abcdefghijklmnopqrstuvwxyz 0123456789\n"[rng.IntN(38)]
	}
	return b
}

// streamModule has small files (read whole) and large ones (piped to a
// worker while they arrive), stored and deflated, a dir and a link.
func streamModule(t *testing.T) []byte {
	t.Helper()
	return makeZip(t,
		zipEntry{name: "agent/", mode: 0o755 | 1<<31},
		zipEntry{name: "agent/conf/small.conf", data: textData(1, 300), method: zip.Deflate},
		zipEntry{name: "agent/lib64/liboneagentproc.so", mode: 0o755, data: textData(2, 3<<20), method: zip.Deflate},
		zipEntry{name: "agent/lib64/stored.bin", data: textData(3, 1<<20), method: zip.Store},
		zipEntry{name: "agent/bin/current", mode: 0o777 | 1<<27, data: []byte("../lib64")},
		zipEntry{name: "agent/tiny", data: []byte("x")},
	)
}

// ZipStream produces what Zip produces from the same archive.
func TestZipStreamMatchesZip(t *testing.T) {
	data := streamModule(t)
	fromFile, err := extractBytes(t, afero.NewBasePathFs(afero.NewOsFs(), t.TempDir()), data, extract.Limits{})
	if err != nil {
		t.Fatal(err)
	}
	fromStream, err := streamBytes(t, afero.NewBasePathFs(afero.NewOsFs(), t.TempDir()), data, extract.Limits{})
	if err != nil {
		t.Fatal(err)
	}
	if fromFile.Size != fromStream.Size || fromFile.Files != fromStream.Files || len(fromFile.Entries) != len(fromStream.Entries) {
		t.Fatalf("file: %d bytes %d files %d entries; stream: %d bytes %d files %d entries",
			fromFile.Size, fromFile.Files, len(fromFile.Entries), fromStream.Size, fromStream.Files, len(fromStream.Entries))
	}
	for i := range fromFile.Entries {
		if fromFile.Entries[i] != fromStream.Entries[i] {
			t.Errorf("entry %d: file %+v, stream %+v", i, fromFile.Entries[i], fromStream.Entries[i])
		}
	}
}

// failingReader returns data up to at, then err.
type failingReader struct {
	data []byte
	at   int
	err  error
	off  int
}

func (f *failingReader) Read(p []byte) (int, error) {
	if f.off >= f.at {
		return 0, f.err
	}
	n := copy(p, f.data[f.off:f.at])
	f.off += n
	return n, nil
}

// A download that breaks off or fails is the source's fault, not the
// archive's: it is retried, not refused. Wherever it breaks (in a small
// file, in a piped large one, in the central directory), the error says so
// and no goroutine is left waiting.
func TestZipStreamSourceFailures(t *testing.T) {
	data := streamModule(t)
	tail, err := fetchTail(data, extract.Limits{})
	if err != nil {
		t.Fatal(err)
	}
	large := bytes.Index(data, []byte("agent/lib64/liboneagentproc.so")) + 1<<20
	broken := errors.New("connection reset by peer")
	for _, tc := range []struct {
		name string
		at   int
		err  error
		want error
	}{
		{"ends in a small file", 40, io.EOF, io.ErrUnexpectedEOF},
		{"ends in a large file", large, io.EOF, io.ErrUnexpectedEOF},
		{"ends in the central directory", len(data) - 10, io.EOF, io.ErrUnexpectedEOF},
		{"breaks in a small file", 40, broken, broken},
		{"breaks in a large file", large, broken, broken},
	} {
		t.Run(tc.name, func(t *testing.T) {
			body := &failingReader{data: data, at: tc.at, err: tc.err}
			_, err := extract.ZipStream(context.Background(), afero.NewMemMapFs(), "out", tail, body, extract.Options{Workers: 2})
			if !errors.Is(err, tc.want) || errors.Is(err, extract.ErrBadArchive) {
				t.Fatalf("err = %v, want %v and not a bad archive", err, tc.want)
			}
		})
	}
}

func TestZipStreamRefusesWhatTheDirectoryDoesNotSay(t *testing.T) {
	data := streamModule(t)
	localName := bytes.Index(data, []byte("agent/lib64/stored.bin"))
	for _, tc := range []struct {
		name    string
		mutate  func(body, tail []byte)
		badFile bool // refused as a bad archive (else: a retryable error)
		want    string
	}{
		{"local header names another file", func(body, _ []byte) { body[localName+len("agent/lib64/")] = 'S' }, true, "local header names"},
		{"local header has another method", func(body, _ []byte) { binary.LittleEndian.PutUint16(body[localName-30+8:], zip.Deflate) }, true, "compression method"},
		{"central directory differs in the download", func(body, _ []byte) { body[len(body)-30] ^= 0xff }, false, "changed between its requests"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			body := bytes.Clone(data)
			tail, err := fetchTail(bytes.Clone(data), extract.Limits{})
			if err != nil {
				t.Fatal(err)
			}
			tc.mutate(body, tail.Data)
			_, err = extract.ZipStream(context.Background(), afero.NewMemMapFs(), "out", tail, bytes.NewReader(body), extract.Options{Workers: 2})
			if err == nil || !strings.Contains(err.Error(), tc.want) || errors.Is(err, extract.ErrBadArchive) != tc.badFile {
				t.Fatalf("err = %v, want %q (bad archive: %v)", err, tc.want, tc.badFile)
			}
		})
	}
}

// Two directory records pointing at the same data (a classic zip bomb:
// overlapping entries) are refused.
func TestZipStreamRefusesOverlappingEntries(t *testing.T) {
	data := makeZip(t, zipEntry{name: "a", data: []byte("one")}, zipEntry{name: "b", data: []byte("two")})
	dir := bytes.LastIndex(data, []byte{0x50, 0x4b, 0x01, 0x02}) // the second record
	binary.LittleEndian.PutUint32(data[dir+42:], 0)
	_, err := streamBytes(t, afero.NewMemMapFs(), data, extract.Limits{})
	if !errors.Is(err, extract.ErrBadArchive) || !strings.Contains(err.Error(), "overlaps") {
		t.Fatalf("err = %v, want a bad archive about overlapping entries", err)
	}
}

// A tail that does not reach back to the central directory is the
// caller's mistake, reported as such.
func TestZipStreamNeedsTheWholeDirectory(t *testing.T) {
	data := makeZip(t, zipEntry{name: "a", data: []byte("one")}, zipEntry{name: "b", data: []byte("two")})
	_, err := extract.ZipStream(context.Background(), afero.NewMemMapFs(), "out", tailOf(data, 30), bytes.NewReader(data), extract.Options{})
	if err == nil || errors.Is(err, extract.ErrBadArchive) {
		t.Fatalf("err = %v, want an error about the fetched tail", err)
	}
}
