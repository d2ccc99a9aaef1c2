package extract_test

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"os"
	"sync"
	"testing"

	"github.com/spf13/afero"

	"github.com/oneagent-csi/oneagent-csi/provisioner/extract"
)

// openDescriptors is how many descriptors this process holds now.
func openDescriptors(t *testing.T) int {
	t.Helper()
	entries, err := os.ReadDir("/proc/self/fd")
	if err != nil {
		t.Skipf("no /proc/self/fd: %v", err)
	}
	return len(entries)
}

// peakFs records the most descriptors the process held whenever a file is
// created through it.
type peakFs struct {
	afero.Fs
	t     *testing.T
	mu    sync.Mutex
	opens int
	peak  int
}

func (p *peakFs) OpenFile(name string, flag int, perm os.FileMode) (afero.File, error) {
	f, err := p.Fs.OpenFile(name, flag, perm)
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.opens++; p.opens%50 == 0 {
		p.peak = max(p.peak, openDescriptors(p.t))
	}
	return f, err
}

// tinyFiles is an archive's worth of one-byte files.
func tinyFiles(n int) []string {
	names := make([]string, n)
	for i := range names {
		names[i] = fmt.Sprintf("agent/lib/d%02d/f%05d", i%64, i)
	}
	return names
}

// Writing many small files must not hold a descriptor per file: a layer of
// tiny files over maxEntries used to leave one descriptor open for every
// file written before the limit tripped, so the process sat at
// RLIMIT_NOFILE after the failure and every later open (the fail-open bind
// included) failed.
func TestExtractionHoldsNoDescriptorPerFile(t *testing.T) {
	const files, bound = 3000, 64
	names := tinyFiles(files)
	var entries []tarEntry
	for _, n := range names {
		entries = append(entries, file(in(n), "x"))
	}
	layer := makeTar(t, entries...)

	t.Run("refused image layer", func(t *testing.T) {
		before := openDescriptors(t)
		fsys := &peakFs{Fs: afero.NewBasePathFs(afero.NewOsFs(), t.TempDir()), t: t}
		l, err := extract.NewLayers(fsys, "out", moduleRoot, extract.Options{Limits: extract.Limits{MaxEntries: files - 10}})
		if err != nil {
			t.Fatal(err)
		}
		err = l.Apply(context.Background(), bytes.NewReader(layer), int64(len(layer)))
		if !errors.Is(err, extract.ErrBadArchive) {
			t.Fatalf("Apply = %v, want a bad archive (too many entries)", err)
		}
		if after := openDescriptors(t); after > before+2 {
			t.Errorf("after the refused layer the process holds %d descriptors, %d before", after, before)
		}
		if fsys.peak > before+bound {
			t.Errorf("peak descriptors while extracting: %d (%d before), want at most %d more", fsys.peak, before, bound)
		}
	})

	t.Run("accepted image layer", func(t *testing.T) {
		before := openDescriptors(t)
		fsys := &peakFs{Fs: afero.NewBasePathFs(afero.NewOsFs(), t.TempDir()), t: t}
		l, err := extract.NewLayers(fsys, "out", moduleRoot, extract.Options{})
		if err != nil {
			t.Fatal(err)
		}
		if err := l.Apply(context.Background(), bytes.NewReader(layer), int64(len(layer))); err != nil {
			t.Fatal(err)
		}
		if between := openDescriptors(t); between > before+2 {
			t.Errorf("between layers the process holds %d descriptors, %d before", between, before)
		}
		if res, err := l.Finish(); err != nil || res.Files != files {
			t.Fatalf("Finish = %+v, %v", res, err)
		}
		if fsys.peak > before+bound {
			t.Errorf("peak descriptors while extracting: %d (%d before), want at most %d more", fsys.peak, before, bound)
		}
	})

	for _, mode := range zipModes {
		t.Run("zip "+mode.name, func(t *testing.T) {
			var entries []zipEntry
			for _, n := range names {
				entries = append(entries, zipEntry{name: n, data: []byte("x")})
			}
			data := makeZip(t, entries...)
			before := openDescriptors(t)
			fsys := &peakFs{Fs: afero.NewBasePathFs(afero.NewOsFs(), t.TempDir()), t: t}
			if res, err := mode.extract(t, fsys, data, extract.Limits{}); err != nil || res.Files != files {
				t.Fatalf("extract = %+v, %v", res, err)
			}
			if fsys.peak > before+bound {
				t.Errorf("peak descriptors while extracting: %d (%d before), want at most %d more", fsys.peak, before, bound)
			}
		})
	}
}
