package extract_test

import (
	"archive/tar"
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"sort"
	"strings"
	"testing"

	"github.com/spf13/afero"

	"github.com/oneagent-csi/oneagent-csi/provisioner/extract"
	"github.com/oneagent-csi/oneagent-csi/storage"
)

// moduleRoot is where Dynatrace's code-module images keep the module.
const moduleRoot = "opt/dynatrace/oneagent"

type tarEntry struct {
	name string
	typ  byte
	mode int64
	data string
	link string
	// sparse, when set, makes the entry a PAX (GNU 1.0) sparse file of
	// this real size whose only data is data, at its end.
	sparse int64
}

func file(name, data string) tarEntry { return tarEntry{name: name, typ: tar.TypeReg, data: data} }
func dir(name string) tarEntry        { return tarEntry{name: name, typ: tar.TypeDir} }
func symlink(name, target string) tarEntry {
	return tarEntry{name: name, typ: tar.TypeSymlink, link: target}
}
func whiteout(name string) tarEntry { return tarEntry{name: name, typ: tar.TypeReg} }

// in puts a path below the module's root.
func in(p string) string { return moduleRoot + "/" + p }

func makeTar(t testing.TB, entries ...tarEntry) []byte {
	t.Helper()
	var buf bytes.Buffer
	tw := tar.NewWriter(&buf)
	for _, e := range entries {
		if e.sparse > 0 {
			writeSparse(t, tw, &buf, e)
			continue
		}
		mode := e.mode
		if mode == 0 {
			mode = 0o644
		}
		h := &tar.Header{Name: e.name, Typeflag: e.typ, Mode: mode, Linkname: e.link, Format: tar.FormatPAX}
		if e.typ == tar.TypeReg {
			h.Size = int64(len(e.data))
		}
		if err := tw.WriteHeader(h); err != nil {
			t.Fatal(err)
		}
		if _, err := tw.Write([]byte(e.data)); err != nil {
			t.Fatal(err)
		}
	}
	if err := tw.Close(); err != nil {
		t.Fatal(err)
	}
	return buf.Bytes()
}

// writeSparse writes e as archive/tar reads a PAX sparse file: an extended
// header with GNU.sparse.* records (archive/tar writes none, so it is made
// by hand), then the sparse map and the data.
func writeSparse(t testing.TB, tw *tar.Writer, buf *bytes.Buffer, e tarEntry) {
	t.Helper()
	record := func(k, v string) string {
		s := " " + k + "=" + v + "\n"
		n := len(s)
		for len(fmt.Sprint(n))+len(s) != n {
			n = len(fmt.Sprint(n)) + len(s)
		}
		return fmt.Sprint(n) + s
	}
	records := record("GNU.sparse.major", "1") + record("GNU.sparse.minor", "0") +
		record("GNU.sparse.name", e.name) + record("GNU.sparse.realsize", fmt.Sprint(e.sparse))
	if err := tw.Flush(); err != nil { // the previous entry's padding
		t.Fatal(err)
	}
	start := buf.Len()
	if err := tw.WriteHeader(&tar.Header{Name: "PaxHeaders/x", Typeflag: tar.TypeReg, Mode: 0o644, Size: int64(len(records)), Format: tar.FormatUSTAR}); err != nil {
		t.Fatal(err)
	}
	if _, err := tw.Write([]byte(records)); err != nil {
		t.Fatal(err)
	}
	if err := tw.Flush(); err != nil {
		t.Fatal(err)
	}
	h := buf.Bytes()[start : start+512]
	h[156] = tar.TypeXHeader
	copy(h[148:156], "        ")
	sum := 0
	for _, c := range h {
		sum += int(c)
	}
	copy(h[148:156], fmt.Sprintf("%06o\x00 ", sum))
	sparseMap := fmt.Sprintf("1\n%d\n%d\n", e.sparse-int64(len(e.data)), len(e.data))
	sparseMap += strings.Repeat("\x00", 512-len(sparseMap))
	if err := tw.WriteHeader(&tar.Header{Name: e.name, Typeflag: tar.TypeReg, Mode: 0o644, Size: int64(len(sparseMap) + len(e.data)), Format: tar.FormatUSTAR}); err != nil {
		t.Fatal(err)
	}
	if _, err := tw.Write([]byte(sparseMap + e.data)); err != nil {
		t.Fatal(err)
	}
}

// applyLayers builds the tree from layers into out on fsys.
func applyLayers(t *testing.T, fsys afero.Fs, limits extract.Limits, layers ...[]byte) (extract.Result, error) {
	t.Helper()
	l, err := extract.NewLayers(fsys, "out", moduleRoot, extract.Options{Limits: limits})
	if err != nil {
		t.Fatal(err)
	}
	for _, layer := range layers {
		if err := l.Apply(context.Background(), bytes.NewReader(layer), int64(len(layer))); err != nil {
			return extract.Result{}, err
		}
	}
	return l.Finish()
}

func TestLayersRejectUnsafeEntries(t *testing.T) {
	zeros := strings.Repeat("\x00", 4<<20)
	base := []tarEntry{dir(moduleRoot), file(in("agent/lib64/liboneagentproc.so"), "elf")}
	layer := func(extra ...tarEntry) []tarEntry { return append(append([]tarEntry(nil), base...), extra...) }
	tests := []struct {
		name   string
		layers [][]tarEntry
		limits extract.Limits
		// compressed overrides the size handed to Apply (the ratio check).
		compressed int64
		want       string
	}{
		{"dot-dot", [][]tarEntry{layer(file(in("../../../etc/passwd"), "x"))}, extract.Limits{}, 0, "climbs out"},
		{"absolute", [][]tarEntry{layer(file("/"+in("x"), "x"))}, extract.Limits{}, 0, "absolute"},
		{"backslash", [][]tarEntry{layer(file(in(`..\evil`), "x"))}, extract.Limits{}, 0, "backslash"},
		{"symlink absolute", [][]tarEntry{layer(symlink(in("l"), "/etc"))}, extract.Limits{}, 0, "outside"},
		{"symlink climbing", [][]tarEntry{layer(symlink(in("agent/l"), "../../x"))}, extract.Limits{}, 0, "outside"},
		{"symlink chain climbing", [][]tarEntry{layer(symlink(in("l"), "."), symlink(in("esc"), "l/.."))}, extract.Limits{}, 0, "outside"},
		{"entry below a symlink", [][]tarEntry{layer(symlink(in("l"), "agent"), file(in("l/x"), "x"))}, extract.Limits{}, 0, "below symlink"},
		{"entry below a file", [][]tarEntry{layer(file(in("f"), "x"), file(in("f/x"), "x"))}, extract.Limits{}, 0, "below file"},
		{"character device", [][]tarEntry{layer(tarEntry{name: in("dev"), typ: tar.TypeChar})}, extract.Limits{}, 0, "unsupported type character device"},
		{"fifo", [][]tarEntry{layer(tarEntry{name: in("fifo"), typ: tar.TypeFifo})}, extract.Limits{}, 0, "unsupported type fifo"},
		{"hard link outside the tree", [][]tarEntry{layer(file("etc/passwd", "root"), tarEntry{name: in("h"), typ: tar.TypeLink, link: "etc/passwd"})}, extract.Limits{}, 0, "does not name a file"},
		{"hard link to a later entry", [][]tarEntry{layer(tarEntry{name: in("h"), typ: tar.TypeLink, link: in("later")}, file(in("later"), "x"))}, extract.Limits{}, 0, "does not name a file"},
		{"hard link to a directory", [][]tarEntry{layer(tarEntry{name: in("h"), typ: tar.TypeLink, link: in("agent")})}, extract.Limits{}, 0, "does not name a file"},
		{"hard link climbing", [][]tarEntry{layer(tarEntry{name: in("h"), typ: tar.TypeLink, link: in("../../../etc/passwd")})}, extract.Limits{}, 0, "climbs out"},
		{"too many entries", [][]tarEntry{layer(file(in("a"), "x"), file(in("b"), "x"))}, extract.Limits{MaxEntries: 3}, 0, "more than 3 entries"},
		{"too large", [][]tarEntry{layer(file(in("big"), strings.Repeat("x", 100)))}, extract.Limits{MaxBytes: 50}, 0, "limit of 50 bytes"},
		{"expansion ratio", [][]tarEntry{layer(file(in("zeros"), zeros))}, extract.Limits{}, 10 << 10, "ratio limit"},
		{"sparse file", [][]tarEntry{layer(tarEntry{name: in("holes"), typ: tar.TypeReg, data: "x", sparse: 64 << 20})}, extract.Limits{}, 0, "sparse"},
		{"twice in one layer", [][]tarEntry{layer(file(in("a"), "x"), file(in("a"), "y"))}, extract.Limits{}, 0, "appears twice"},
		{"reserved name", [][]tarEntry{layer(file(in(storage.Layout{}.ManifestName()), "x"))}, extract.Limits{}, 0, "reserved"},
		{"long component", [][]tarEntry{layer(file(in(strings.Repeat("a", 300)), "x"))}, extract.Limits{}, 0, "longer than 255"},
		{"whiteout climbing", [][]tarEntry{layer(whiteout(in("../../../.wh.etc")))}, extract.Limits{}, 0, "climbs out"},
		{"whiteout through a symlink", [][]tarEntry{layer(symlink(in("l"), "agent")), {whiteout(in("l/.wh.lib64"))}}, extract.Limits{}, 0, "below symlink"},
		{"whiteout as a directory", [][]tarEntry{layer(dir(in(".wh.agent")))}, extract.Limits{}, 0, "not a regular file"},
		{"root is a file", [][]tarEntry{{file(moduleRoot, "x")}}, extract.Limits{}, 0, "not a directory"},
		{"nothing at the root", [][]tarEntry{{file("usr/bin/sh", "x")}}, extract.Limits{}, 0, "nothing at opt/dynatrace/oneagent"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			root := t.TempDir()
			fsys := afero.NewBasePathFs(afero.NewOsFs(), root)
			l, err := extract.NewLayers(fsys, "out", moduleRoot, extract.Options{Limits: tc.limits})
			if err != nil {
				t.Fatal(err)
			}
			for _, entries := range tc.layers {
				data := makeTar(t, entries...)
				size := int64(len(data))
				if tc.compressed > 0 {
					size = tc.compressed
				}
				if err = l.Apply(context.Background(), bytes.NewReader(data), size); err != nil {
					break
				}
			}
			if err == nil {
				_, err = l.Finish()
			}
			if !errors.Is(err, extract.ErrBadArchive) || !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("err = %v, want a bad archive saying %q", err, tc.want)
			}
			// Nothing was written beside the tree (the caller removes the
			// tree itself).
			if des, _ := os.ReadDir(root); len(des) != 1 || des[0].Name() != "out" {
				t.Errorf("beside the tree: %v", des)
			}
		})
	}
}

func TestLayersTruncatedStream(t *testing.T) {
	data := makeTar(t, dir(moduleRoot), file(in("agent/lib64/liboneagentproc.so"), strings.Repeat("x", 4096)))
	fsys := afero.NewBasePathFs(afero.NewOsFs(), t.TempDir())
	l, err := extract.NewLayers(fsys, "out", moduleRoot, extract.Options{})
	if err != nil {
		t.Fatal(err)
	}
	err = l.Apply(context.Background(), bytes.NewReader(data[:2048]), 2048)
	if !errors.Is(err, extract.ErrBadArchive) {
		t.Fatalf("err = %v, want a bad archive", err)
	}
}

// tree lists what is on disk below dir: path -> kind, mode and content.
func tree(t *testing.T, root string) map[string]string {
	t.Helper()
	out := map[string]string{}
	err := filepath.Walk(root, func(p string, info os.FileInfo, err error) error {
		if err != nil || p == root {
			return err
		}
		rel, _ := filepath.Rel(root, p)
		switch {
		case info.Mode()&os.ModeSymlink != 0:
			target, _ := os.Readlink(p)
			out[rel] = "-> " + target
		case info.IsDir():
			out[rel] = "dir " + info.Mode().Perm().String()
		default:
			b, _ := os.ReadFile(p)
			out[rel] = info.Mode().Perm().String() + " " + string(b)
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	return out
}

func TestLayersApplyInOrderWithWhiteouts(t *testing.T) {
	tests := []struct {
		name   string
		layers [][]tarEntry
		want   map[string]string
	}{
		{"later layers replace, whiteouts delete", [][]tarEntry{
			{dir("opt/"), dir("opt/dynatrace/"), dir(moduleRoot + "/"), file(in("agent/lib64/liboneagentproc.so"), "v1"),
				file(in("agent/conf/a"), "a"), file(in("agent/conf/b"), "b"), file(in("old"), "old"), file("etc/hostname", "outside")},
			{whiteout(in(".wh.old")), file(in("agent/conf/c"), "c"), whiteout(in("agent/conf/.wh..wh..opq")),
				file(in("agent/lib64/liboneagentproc.so"), "v2"), whiteout(".wh.etc"), whiteout(in(".wh.never-there"))},
		}, map[string]string{
			"agent": "dir -rwxr-xr-x", "agent/lib64": "dir -rwxr-xr-x", "agent/conf": "dir -rwxr-xr-x",
			"agent/lib64/liboneagentproc.so": "-rw-r--r-- v2", "agent/conf/c": "-rw-r--r-- c",
		}},
		{"a whiteout of a parent of the root empties the tree", [][]tarEntry{
			{file(in("x"), "x"), file(in("agent/y"), "y")},
			{whiteout("opt/.wh.dynatrace"), file(in("z"), "z")},
		}, map[string]string{"z": "-rw-r--r-- z"}},
		{"a file replaces a directory and a link a file", [][]tarEntry{
			{file(in("d/f"), "f"), file(in("l"), "l")},
			{file(in("d"), "now a file"), symlink(in("l"), "d")},
		}, map[string]string{"d": "-rw-r--r-- now a file", "l": "-> d"}},
		{"modes are normalised", [][]tarEntry{
			{{name: in("suid"), typ: tar.TypeReg, mode: 0o4777, data: "s"}, {name: in("ww"), typ: tar.TypeReg, mode: 0o666, data: "w"},
				{name: in("d"), typ: tar.TypeDir, mode: 0o1777}},
		}, map[string]string{"suid": "-rwxr-xr-x s", "ww": "-rw-r--r-- w", "d": "dir -rwxr-xr-x"}},
		{"hard links inside the tree", [][]tarEntry{
			{file(in("a"), "same"), {name: in("b"), typ: tar.TypeLink, link: "./" + in("a")}},
		}, map[string]string{"a": "-rw-r--r-- same", "b": "-rw-r--r-- same"}},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			root := t.TempDir()
			fsys := afero.NewBasePathFs(afero.NewOsFs(), root)
			var layers [][]byte
			for _, entries := range tc.layers {
				layers = append(layers, makeTar(t, entries...))
			}
			res, err := applyLayers(t, fsys, extract.Limits{}, layers...)
			if err != nil {
				t.Fatal(err)
			}
			got := tree(t, filepath.Join(root, "out"))
			if len(got) != len(tc.want) {
				t.Errorf("tree = %v, want %v", got, tc.want)
			}
			for p, w := range tc.want {
				if got[p] != w {
					t.Errorf("%s = %q, want %q", p, got[p], w)
				}
			}
			// The manifest lists exactly the tree, sorted, with sizes and
			// checksums of the final files.
			var paths []string
			for _, e := range res.Entries {
				paths = append(paths, e.Path)
				if e.Type == "file" && (e.SHA256 == "" || e.Size == 0) {
					t.Errorf("manifest entry without size or checksum: %+v", e)
				}
			}
			if !sort.StringsAreSorted(paths) || len(paths) != len(tc.want) {
				t.Errorf("manifest paths = %v, want the tree %v", paths, tc.want)
			}
		})
	}
}

func TestLayersOnAMemoryFilesystem(t *testing.T) {
	fsys := afero.NewMemMapFs()
	res, err := applyLayers(t, fsys, extract.Limits{},
		makeTar(t, file(in("agent/lib64/liboneagentproc.so"), "elf"), tarEntry{name: in("copy"), typ: tar.TypeLink, link: in("agent/lib64/liboneagentproc.so")}))
	if err != nil {
		t.Fatal(err)
	}
	if res.Files != 2 || res.Size != 6 {
		t.Errorf("result = %+v", res)
	}
	if b, err := afero.ReadFile(fsys, "out/copy"); err != nil || string(b) != "elf" {
		t.Errorf("copy = %q, %v", b, err)
	}
}

// Every manifest entry has the size and SHA-256 of the file on disk, small
// or large, also after later layers replace, link and delete them.
func TestLayersManifestMatchesTheFiles(t *testing.T) {
	var first, second []tarEntry
	for i := range 200 {
		first = append(first, file(in(fmt.Sprintf("agent/lib/f%03d", i)), strings.Repeat(fmt.Sprint(i), 100+i*50)))
	}
	big := strings.Repeat("0123456789abcdef", 300<<10/16)
	first = append(first, file(in("agent/lib64/big.so"), big), file(in("agent/lib64/big2.so"), big+"2"))
	for i := 0; i < 200; i += 7 {
		second = append(second, file(in(fmt.Sprintf("agent/lib/f%03d", i)), "replaced "+fmt.Sprint(i)))
	}
	second = append(second,
		tarEntry{name: in("agent/lib/link"), typ: tar.TypeLink, link: in("agent/lib/f001")},
		whiteout(in("agent/lib/.wh.f002")),
		file(in("agent/lib64/big.so"), big+"v2"))
	root := t.TempDir()
	fsys := afero.NewBasePathFs(afero.NewOsFs(), root)
	res, err := applyLayers(t, fsys, extract.Limits{}, makeTar(t, first...), makeTar(t, second...))
	if err != nil {
		t.Fatal(err)
	}
	files := 0
	for _, e := range res.Entries {
		if e.Type != "file" {
			continue
		}
		files++
		data, err := os.ReadFile(filepath.Join(root, "out", e.Path))
		if err != nil {
			t.Fatal(err)
		}
		sum := sha256.Sum256(data)
		if e.Size != int64(len(data)) || e.SHA256 != hex.EncodeToString(sum[:]) {
			t.Errorf("%s: manifest says %d bytes sha256 %s, the file has %d bytes sha256 %x", e.Path, e.Size, e.SHA256, len(data), sum)
		}
	}
	if want := 200 - 1 + 1 + 2; files != want {
		t.Errorf("%d files in the manifest, want %d", files, want)
	}
}
