package extract_test

import (
	"archive/zip"
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"math/rand/v2"
	"os"
	"path/filepath"
	"runtime"
	"strings"
	"testing"

	"github.com/spf13/afero"

	"github.com/oneagent-csi/oneagent-csi/provisioner/extract"
	"github.com/oneagent-csi/oneagent-csi/test/faketenant"
)

type zipEntry struct {
	name   string
	mode   os.FileMode
	data   []byte
	method uint16
}

func makeZip(t *testing.T, entries ...zipEntry) []byte {
	t.Helper()
	var buf bytes.Buffer
	zw := zip.NewWriter(&buf)
	// Method 12 (bzip2) written as plain bytes: enough for the reader to see
	// an unsupported method.
	zw.RegisterCompressor(12, func(w io.Writer) (io.WriteCloser, error) { return nopWriteCloser{w}, nil })
	for _, e := range entries {
		h := &zip.FileHeader{Name: e.name, Method: e.method}
		if e.mode == 0 {
			e.mode = 0o644
		}
		h.SetMode(e.mode)
		w, err := zw.CreateHeader(h)
		if err != nil {
			t.Fatal(err)
		}
		if _, err := w.Write(e.data); err != nil {
			t.Fatal(err)
		}
	}
	if err := zw.Close(); err != nil {
		t.Fatal(err)
	}
	return buf.Bytes()
}

type nopWriteCloser struct{ io.Writer }

func (nopWriteCloser) Close() error { return nil }

// zipModes are the two ways a ZIP is extracted: from a file on disk, and
// while it downloads (its central directory fetched first).
var zipModes = []struct {
	name    string
	extract func(t *testing.T, fsys afero.Fs, data []byte, limits extract.Limits) (extract.Result, error)
}{
	{"file", extractBytes},
	{"stream", streamBytes},
}

func extractBytes(t *testing.T, fsys afero.Fs, data []byte, limits extract.Limits) (extract.Result, error) {
	t.Helper()
	if err := afero.WriteFile(fsys, "in.zip", data, 0o600); err != nil {
		t.Fatal(err)
	}
	return extract.Zip(context.Background(), fsys, "in.zip", "out", extract.Options{Limits: limits, Workers: 2})
}

// tailOf is the last n bytes of data, as a range request returns them.
func tailOf(data []byte, n int) extract.ZipTail {
	n = min(n, len(data))
	return extract.ZipTail{Data: data[len(data)-n:], Offset: int64(len(data) - n), Size: int64(len(data))}
}

// fetchTail fetches the tail the way the provisioner does: the end
// records first, then as far back as the central directory starts.
func fetchTail(data []byte, limits extract.Limits) (extract.ZipTail, error) {
	tail := tailOf(data, extract.ZipTailProbe)
	start, err := extract.ZipTailStart(tail, limits)
	if err != nil {
		return tail, err
	}
	if start < tail.Offset {
		tail = tailOf(data, len(data)-int(start))
	}
	return tail, nil
}

func streamBytes(t *testing.T, fsys afero.Fs, data []byte, limits extract.Limits) (extract.Result, error) {
	t.Helper()
	tail, err := fetchTail(data, limits)
	if err != nil {
		return extract.Result{}, err
	}
	return extract.ZipStream(context.Background(), fsys, "out", tail, bytes.NewReader(data), extract.Options{Limits: limits, Workers: 2})
}

func TestExtractRejectsUnsafeArchives(t *testing.T) {
	zeros := make([]byte, 4<<20)
	tests := []struct {
		name    string
		entries []zipEntry
		limits  extract.Limits
		want    string
	}{
		{"dot-dot", []zipEntry{{name: "agent/../../etc/passwd", data: []byte("x")}}, extract.Limits{}, "climbs out"},
		{"absolute", []zipEntry{{name: "/etc/passwd", data: []byte("x")}}, extract.Limits{}, "absolute"},
		{"backslash", []zipEntry{{name: `..\evil`, data: []byte("x")}}, extract.Limits{}, "backslash"},
		{"symlink absolute", []zipEntry{{name: "l", mode: os.ModeSymlink | 0o777, data: []byte("/etc")}}, extract.Limits{}, "outside"},
		{"symlink climbing", []zipEntry{{name: "a/l", mode: os.ModeSymlink | 0o777, data: []byte("../../x")}}, extract.Limits{}, "outside"},
		{"write through symlink", []zipEntry{
			{name: "l", mode: os.ModeSymlink | 0o777, data: []byte("d")},
			{name: "l/f", data: []byte("x")},
		}, extract.Limits{}, "below symlink"},
		{"device file", []zipEntry{{name: "dev", mode: os.ModeDevice | 0o644}}, extract.Limits{}, "unsupported type"},
		{"named pipe", []zipEntry{{name: "fifo", mode: os.ModeNamedPipe | 0o644}}, extract.Limits{}, "unsupported type"},
		{"duplicate", []zipEntry{{name: "a", data: []byte("1")}, {name: "a", data: []byte("2")}}, extract.Limits{}, "twice"},
		{"too many entries", []zipEntry{{name: "a"}, {name: "b"}, {name: "c"}}, extract.Limits{MaxEntries: 2}, "entries exceed"},
		{"too big", []zipEntry{{name: "a", data: make([]byte, 2048)}}, extract.Limits{MaxBytes: 1024}, "exceeds the limit"},
		{"zip bomb ratio", []zipEntry{{name: "bomb", data: zeros, method: zip.Deflate}}, extract.Limits{}, "ratio limit"},
		{"unsupported method", []zipEntry{{name: "a.bz2", data: []byte("x"), method: 12}}, extract.Limits{}, "compression method 12"},
		{"reserved name", []zipEntry{{name: ".oneagent-csi-manifest", data: []byte("{}")}}, extract.Limits{}, "reserved"},
		// Each link passes a textual check; followed through the others, the
		// last one reads a host file.
		{"symlink chain escape", []zipEntry{
			{name: "l", mode: os.ModeSymlink | 0o777, data: []byte(".")},
			{name: "esc", mode: os.ModeSymlink | 0o777, data: []byte("l/..")},
			{name: "esc2", mode: os.ModeSymlink | 0o777, data: []byte("esc/..")},
			{name: "agent/conf/ruxitagentproc.conf", mode: os.ModeSymlink | 0o777, data: []byte("../../esc2/SECRET")},
		}, extract.Limits{}, "outside the artifact"},
		{"symlink through a dir link", []zipEntry{
			{name: "agent/up", mode: os.ModeSymlink | 0o777, data: []byte("..")},
			{name: "x", mode: os.ModeSymlink | 0o777, data: []byte("agent/up/..")},
		}, extract.Limits{}, "outside the artifact"},
		{"symlink loop", []zipEntry{
			{name: "a", mode: os.ModeSymlink | 0o777, data: []byte("b")},
			{name: "b", mode: os.ModeSymlink | 0o777, data: []byte("a/x")},
		}, extract.Limits{}, "outside the artifact"},
		{"file named as the root", []zipEntry{{name: "./.", mode: 0o644, data: []byte("dropped?")}}, extract.Limits{}, "names the archive root"},
		{"file with an empty name", []zipEntry{{name: "", mode: 0o644, data: []byte("x")}}, extract.Limits{}, "names the archive root"},
		{"file named dot", []zipEntry{{name: ".", mode: 0o644, data: []byte("x")}}, extract.Limits{}, "names the archive root"},
		{"component too long", []zipEntry{{name: "agent/" + strings.Repeat("n", 300), data: []byte("x")}}, extract.Limits{}, "longer than 255"},
		{"name too long", []zipEntry{{name: strings.Repeat("d/", 5000) + "f", data: []byte("x")}}, extract.Limits{}, "longer than 2048"},
	}
	for _, mode := range zipModes {
		for _, tc := range tests {
			t.Run(mode.name+"/"+tc.name, func(t *testing.T) {
				fsys := afero.NewBasePathFs(afero.NewOsFs(), t.TempDir())
				_, err := mode.extract(t, fsys, makeZip(t, tc.entries...), tc.limits)
				if !errors.Is(err, extract.ErrBadArchive) || !strings.Contains(err.Error(), tc.want) {
					t.Fatalf("err = %v, want bad archive mentioning %q", err, tc.want)
				}
				if len(err.Error()) > 300 {
					t.Errorf("error message is %d bytes; a hostile name must not make it long", len(err.Error()))
				}
				// While streaming, link targets arrive as data: a bad one is
				// refused after the files are written (into a dir the caller
				// removes), never after a link was created.
				linkTarget := mode.name == "stream" && strings.Contains(tc.want, "outside")
				if _, err := fsys.Stat("out"); !linkTarget && !errors.Is(err, fs.ErrNotExist) {
					t.Errorf("out/ was created for an archive refused before extraction")
				}
				if linkTarget {
					for _, e := range tc.entries {
						if _, _, err := fsys.(afero.Lstater).LstatIfPossible(filepath.Join("out", e.name)); err == nil && e.mode&os.ModeSymlink != 0 {
							t.Errorf("link %s was created", e.name)
						}
					}
				}
			})
		}
	}
}

// Links that stay inside the tree, also through other links, are kept.
func TestExtractKeepsLinksInsideTheTree(t *testing.T) {
	for _, mode := range zipModes {
		t.Run(mode.name, func(t *testing.T) { testKeepsLinksInsideTheTree(t, mode.extract) })
	}
}

func testKeepsLinksInsideTheTree(t *testing.T, extractBytes func(*testing.T, afero.Fs, []byte, extract.Limits) (extract.Result, error)) {
	fsys := afero.NewBasePathFs(afero.NewOsFs(), t.TempDir())
	_, err := extractBytes(t, fsys, makeZip(t,
		zipEntry{name: "agent/lib64/liboneagentproc.so", data: []byte("elf")},
		zipEntry{name: "agent/lib", mode: os.ModeSymlink | 0o777, data: []byte("lib64")},
		zipEntry{name: "agent/bin/current", mode: os.ModeSymlink | 0o777, data: []byte("../lib/liboneagentproc.so")},
		zipEntry{name: "here", mode: os.ModeSymlink | 0o777, data: []byte(".")},
		zipEntry{name: "via", mode: os.ModeSymlink | 0o777, data: []byte("here/agent/../agent/lib")},
	), extract.Limits{})
	if err != nil {
		t.Fatal(err)
	}
	b, err := afero.ReadFile(fsys, "out/agent/bin/current")
	if err != nil || string(b) != "elf" {
		t.Fatalf("link through a link: %q, %v", b, err)
	}
}

func TestExtractDetectsCorruption(t *testing.T) {
	// Text-like, so that deflate compresses it within the ratio limit.
	rng := rand.New(rand.NewPCG(1, 2))
	content := make([]byte, 128<<10)
	for i := range content {
		content[i] = "abcdefghijklmnopqrstuvwxyz 0123456789\n"[rng.IntN(38)]
	}
	for _, tc := range []struct {
		name   string
		method uint16
		flip   func(data []byte) int // offset of a byte inside the file data
	}{
		{"stored", zip.Store, func(data []byte) int { return bytes.Index(data, content[:16]) + 100 }},
		// The deflate stream starts right after the 30 byte local header
		// and the name.
		{"deflated", zip.Deflate, func(data []byte) int { return 30 + len("agent/lib64/lib.so") + 2 }},
	} {
		for _, mode := range zipModes {
			t.Run(mode.name+"/"+tc.name, func(t *testing.T) {
				data := makeZip(t, zipEntry{name: "agent/lib64/lib.so", data: content, method: tc.method})
				data[tc.flip(data)] ^= 0xff
				root := t.TempDir()
				_, err := mode.extract(t, afero.NewBasePathFs(afero.NewOsFs(), root), data, extract.Limits{})
				if !errors.Is(err, extract.ErrBadArchive) || !strings.Contains(err.Error(), "agent/lib64/lib.so") {
					t.Fatalf("err = %v, want a bad archive error naming the entry", err)
				}
			})
		}
	}
}

func TestExtractSyntheticModule(t *testing.T) {
	for _, mode := range zipModes {
		t.Run(mode.name, func(t *testing.T) { testSyntheticModule(t, mode.extract) })
	}
}

func testSyntheticModule(t *testing.T, extractBytes func(*testing.T, afero.Fs, []byte, extract.Limits) (extract.Result, error)) {
	var buf bytes.Buffer
	if err := faketenant.WriteModule(&buf, faketenant.ModuleSpec{Version: "1.311.72.20250410-123003", Size: 512 << 10}); err != nil {
		t.Fatal(err)
	}
	root := t.TempDir()
	fsys := afero.NewBasePathFs(afero.NewOsFs(), root)
	ex, err := extractBytes(t, fsys, buf.Bytes(), extract.Limits{})
	if err != nil {
		t.Fatal(err)
	}
	if ex.Files < 8 || ex.Size < int64(buf.Len()) {
		t.Errorf("extracted %d files / %d bytes from a %d byte zip", ex.Files, ex.Size, buf.Len())
	}
	for _, p := range []string{"agent/lib64/liboneagentproc.so", "agent/conf/ruxitagentproc.conf", "manifest.json"} {
		if _, err := os.Stat(filepath.Join(root, "out", p)); err != nil {
			t.Errorf("%s missing: %v", p, err)
		}
	}
	link, err := os.Readlink(filepath.Join(root, "out", "agent/bin/current"))
	if err != nil || link != "1.311.72.20250410-123003" {
		t.Errorf("symlink agent/bin/current = %q, %v", link, err)
	}
	st, err := os.Stat(filepath.Join(root, "out", "agent/lib64/liboneagentproc.so"))
	if err != nil || st.Mode().Perm() != 0o755 {
		t.Errorf("liboneagentproc.so mode = %v, %v", st.Mode(), err)
	}
	var hashed int
	for _, e := range ex.Entries {
		if e.Type == "file" && len(e.SHA256) == 64 {
			hashed++
		}
	}
	if hashed != ex.Files {
		t.Errorf("%d of %d files have a sha256 in the manifest", hashed, ex.Files)
	}
}

func TestExtractRefusesTooManyEntriesBeforeDecodingThem(t *testing.T) {
	tests := []struct {
		name    string
		entries int
		limit   int
		want    string
	}{
		{"200,000 entries", 200_000, 0, "200000 entries exceed the limit of 100000"},
		{"count only in the ZIP64 record", 70_000, 69_999, "70000 entries exceed the limit of 69999"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			var buf bytes.Buffer
			zw := zip.NewWriter(&buf)
			for i := range tc.entries {
				if _, err := zw.CreateHeader(&zip.FileHeader{Name: fmt.Sprintf("agent/lib/f%06d", i), Method: zip.Store}); err != nil {
					t.Fatal(err)
				}
			}
			if err := zw.Close(); err != nil {
				t.Fatal(err)
			}
			fsys := afero.NewBasePathFs(afero.NewOsFs(), t.TempDir())
			if err := afero.WriteFile(fsys, "in.zip", buf.Bytes(), 0o600); err != nil {
				t.Fatal(err)
			}
			buf = bytes.Buffer{}
			var before, after runtime.MemStats
			runtime.GC()
			runtime.ReadMemStats(&before)
			_, err := extract.Zip(context.Background(), fsys, "in.zip", "out",
				extract.Options{Limits: extract.Limits{MaxEntries: tc.limit}, Workers: 2})
			runtime.ReadMemStats(&after)
			if !errors.Is(err, extract.ErrBadArchive) || !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("err = %v, want a refusal saying %q", err, tc.want)
			}
			if alloc := after.TotalAlloc - before.TotalAlloc; alloc > 1<<20 {
				t.Fatalf("refusing took %d KiB of allocations: the central directory was decoded", alloc>>10)
			}
		})
	}
}

// A central directory is held and parsed in memory, so its size is bounded
// (limits.MaxDirectoryBytes, half the extraction memory budget) before it
// is read, in both ways a ZIP is extracted. A streamed directory used to
// be allowed 32 MiB (136 MiB of heap for 95,000 entries), one on disk
// anything its entry count allowed.
func TestExtractRefusesADirectoryOverItsMemory(t *testing.T) {
	var buf bytes.Buffer
	zw := zip.NewWriter(&buf)
	long := strings.Repeat("n", 120)
	for i := range 40_000 { // 40,000 headers of ~175 bytes: 7 MiB
		if _, err := zw.CreateHeader(&zip.FileHeader{Name: fmt.Sprintf("agent/lib/%s%06d", long, i), Method: zip.Store}); err != nil {
			t.Fatal(err)
		}
	}
	if err := zw.Close(); err != nil {
		t.Fatal(err)
	}
	data := buf.Bytes()
	for _, mode := range zipModes {
		t.Run(mode.name, func(t *testing.T) {
			fsys := afero.NewBasePathFs(afero.NewOsFs(), t.TempDir())
			_, err := mode.extract(t, fsys, data, extract.Limits{})
			if !errors.Is(err, extract.ErrBadArchive) || !strings.Contains(err.Error(), "extractMemory") {
				t.Fatalf("err = %v, want a refusal naming the memory bound", err)
			}
			if _, err := fsys.Stat("out"); err == nil {
				if des, _ := afero.ReadDir(fsys, "out"); len(des) > 0 {
					t.Errorf("the refused archive left %d entries in out", len(des))
				}
			}
		})
	}
	t.Run("within a larger budget", func(t *testing.T) {
		fsys := afero.NewBasePathFs(afero.NewOsFs(), t.TempDir())
		if _, err := streamBytes(t, fsys, data, extract.Limits{MaxDirectoryBytes: 16 << 20}); err != nil {
			t.Fatal(err)
		}
	})
}
