package faketenant

import (
	"archive/zip"
	"bufio"
	"compress/flate"
	"encoding/binary"
	"encoding/json"
	"fmt"
	"hash/fnv"
	"io"
	"math/rand/v2"
	"os"
	"path/filepath"
	"sort"
)

// ModuleSpec describes a synthetic code module. The same spec always gives
// the same bytes.
type ModuleSpec struct {
	Version string
	// Size is the approximate size of the ZIP in bytes (extracted data is
	// about 2.7 times larger, like real code modules). Minimum 64 KiB.
	Size int64
	// ExtraFiles are added to the module (path → content), replacing
	// generated files of the same path; e.g. a real liboneagentproc.so.
	ExtraFiles map[string][]byte
}

// meanCompressed is the average compressed size of a generated file; a real
// 1 GiB module has about 15,000 files.
const meanCompressed = 70 << 10

// fixedFiles are present in every module, laid out like a real one.
func fixedFiles(version string) map[string][]byte {
	manifest, _ := json.MarshalIndent(map[string]any{
		"version":      version,
		"technologies": map[string]any{"process": map[string]any{"x86": []map[string]string{{"path": "agent/lib64/liboneagentproc.so"}}}},
	}, "", "  ")
	return map[string][]byte{
		"manifest.json":                          manifest,
		"agent/installer.version":                []byte(version + "\n"),
		"agent/lib64/liboneagentproc.so":         append([]byte("\x7fELF synthetic liboneagentproc "+version+"\n"), make([]byte, 4096)...),
		"agent/conf/ruxitagentproc.conf":         []byte("# synthetic code module configuration\n[general]\nloglevel info\ntenant \ntenantToken \nserverAddress \n\n[agentType]\nprocess on\n"),
		"agent/conf/runtime/default.conf":        []byte("[runtime]\nversion " + version + "\n"),
		"agent/bin/" + version + "/oneagentutil": []byte("#!/bin/sh\necho synthetic oneagentutil " + version + "\n"),
	}
}

// WriteModule writes the ZIP of spec to w.
func WriteModule(w io.Writer, spec ModuleSpec) error {
	size := max(spec.Size, 64<<10)
	h := fnv.New64a()
	h.Write([]byte(spec.Version))
	seed := h.Sum64()
	rng := rand.New(rand.NewChaCha8(seedBytes(seed)))

	bw := bufio.NewWriterSize(w, 1<<20)
	zw := zip.NewWriter(bw)
	zw.RegisterCompressor(zip.Deflate, func(out io.Writer) (io.WriteCloser, error) {
		return flate.NewWriter(out, flate.BestSpeed)
	})
	files := fixedFiles(spec.Version)
	for p, b := range spec.ExtraFiles {
		files[p] = b
	}
	names := make([]string, 0, len(files))
	for p := range files {
		names = append(names, p)
	}
	sort.Strings(names)
	for _, p := range names {
		mode := os.FileMode(0o644)
		if filepath.Ext(p) == ".so" || filepath.Base(filepath.Dir(p)) == spec.Version {
			mode = 0o755
		}
		if err := addFile(zw, p, mode, files[p]); err != nil {
			return err
		}
	}
	// A symlink, as real modules have, pointing inside the module.
	hdr := &zip.FileHeader{Name: "agent/bin/current", Method: zip.Store}
	hdr.SetMode(os.ModeSymlink | 0o777)
	lw, err := zw.CreateHeader(hdr)
	if err != nil {
		return err
	}
	if _, err := lw.Write([]byte(spec.Version)); err != nil {
		return err
	}

	count := int(max(size/meanCompressed, 8))
	per := size / int64(count)
	content := make([]byte, 0, 4*per)
	for i := range count {
		dir := fmt.Sprintf("agent/bin/%s/any/lib%02d", spec.Version, i%97)
		name := fmt.Sprintf("%s/module%05d.so", dir, i)
		if _, replaced := files[name]; replaced {
			continue
		}
		// Vary sizes between half and one and a half of the mean.
		compressed := per/2 + rng.Int64N(per+1)
		content = fillContent(content[:0], rng, compressed)
		if err := addFile(zw, name, 0o755, content); err != nil {
			return err
		}
	}
	if err := zw.Close(); err != nil {
		return err
	}
	return bw.Flush()
}

func seedBytes(s uint64) [32]byte {
	var b [32]byte
	binary.LittleEndian.PutUint64(b[:], s)
	return b
}

// fillContent appends about compressed*2.7 bytes that compress to about
// compressed bytes: random runs (incompressible) interleaved with repeated
// text (compresses very well).
func fillContent(buf []byte, rng *rand.Rand, compressed int64) []byte {
	const block = 4096
	random := make([]byte, block)
	pattern := []byte("symbol_table_entry oneagent code module padding 0123456789abcdef\n")
	target := compressed * 27 / 10
	for int64(len(buf)) < target {
		// 36% random, 64% pattern per 11 KiB.
		for i := 0; i < block; i += 8 {
			binary.LittleEndian.PutUint64(random[i:], rng.Uint64())
		}
		buf = append(buf, random...)
		for n := 0; n < 7*1024; n += len(pattern) {
			buf = append(buf, pattern...)
		}
	}
	return buf[:target]
}

func addFile(zw *zip.Writer, name string, mode os.FileMode, data []byte) error {
	hdr := &zip.FileHeader{Name: name, Method: zip.Deflate}
	hdr.SetMode(mode)
	w, err := zw.CreateHeader(hdr)
	if err != nil {
		return fmt.Errorf("zip %s: %w", name, err)
	}
	_, err = w.Write(data)
	return err
}
