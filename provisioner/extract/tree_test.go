package extract_test

import (
	"bytes"
	"context"
	"fmt"
	"os"
	"testing"
	"time"

	"github.com/spf13/afero"

	"github.com/oneagent-csi/oneagent-csi/provisioner/extract"
)

// treeShapes are layers whose cost used to grow with the square of their
// entries: every symlink rebuilt a map of the whole tree, and every
// directory removal and opaque whiteout scanned every node.
var treeShapes = []struct {
	name   string
	layers func(t testing.TB, n int) [][]byte
}{
	{"symlinks", func(t testing.TB, n int) [][]byte {
		entries := []tarEntry{file(in("agent/lib64/liboneagentproc.so"), "elf")}
		for i := range n {
			entries = append(entries, symlink(in(fmt.Sprintf("agent/l%06d", i)), "lib64/liboneagentproc.so"))
		}
		return [][]byte{makeTar(t, entries...)}
	}},
	{"directory removals", func(t testing.TB, n int) [][]byte {
		var lower, upper []tarEntry
		for i := range n {
			lower = append(lower, dir(in(fmt.Sprintf("agent/d%06d", i))))
			upper = append(upper, whiteout(in(fmt.Sprintf("agent/.wh.d%06d", i))))
		}
		return [][]byte{makeTar(t, lower...), makeTar(t, append(upper, file(in("keep"), "x"))...)}
	}},
	{"opaque whiteouts", func(t testing.TB, n int) [][]byte {
		var lower, upper []tarEntry
		for i := range n {
			lower = append(lower, symlink(in(fmt.Sprintf("agent/d%06d/l", i)), "l"))
			upper = append(upper, whiteout(in(fmt.Sprintf("agent/d%06d/.wh..wh..opq", i))))
		}
		return [][]byte{makeTar(t, lower...), makeTar(t, upper...)}
	}},
}

// treeOnlyFs makes directories, links and removals free, so that what a
// test of the tree building measures is the tree building (on a real disk
// each such call costs more than the whole index work would at these
// sizes). Regular files live in memory.
type treeOnlyFs struct{ afero.Fs }

func (treeOnlyFs) Mkdir(string, os.FileMode) error           { return nil }
func (treeOnlyFs) MkdirAll(string, os.FileMode) error        { return nil }
func (treeOnlyFs) RemoveAll(string) error                    { return nil }
func (treeOnlyFs) Chmod(string, os.FileMode) error           { return nil }
func (treeOnlyFs) SymlinkIfPossible(string, string) error    { return nil }
func (treeOnlyFs) ReadlinkIfPossible(string) (string, error) { return "", nil }
func (treeOnlyFs) LstatIfPossible(string) (os.FileInfo, bool, error) {
	return nil, false, os.ErrNotExist
}

// buildTree applies layers and returns how long the tree building took.
func buildTree(t testing.TB, layers [][]byte) time.Duration {
	fsys := treeOnlyFs{afero.NewMemMapFs()}
	l, err := extract.NewLayers(fsys, "out", moduleRoot, extract.Options{Limits: extract.Limits{MaxEntries: 1 << 20}})
	if err != nil {
		t.Fatal(err)
	}
	start := time.Now()
	for _, layer := range layers {
		if err := l.Apply(context.Background(), bytes.NewReader(layer), 0); err != nil {
			t.Fatal(err)
		}
	}
	if _, err := l.Finish(); err != nil {
		t.Fatal(err)
	}
	return time.Since(start)
}

// Building a tree costs about the same per entry at 8 times the entries.
// The test compares the cost per entry of two sizes in the same run (no
// absolute time): a quadratic step makes the larger 8 times dearer per
// entry, a linear one about as dear.
func TestTreeBuildingIsLinearInEntries(t *testing.T) {
	if testing.Short() {
		t.Skip("builds trees of 16,000 entries")
	}
	const small, large = 2000, 16000
	for _, shape := range treeShapes {
		t.Run(shape.name, func(t *testing.T) {
			smallLayers, largeLayers := shape.layers(t, small), shape.layers(t, large)
			best := func(layers [][]byte, n int) float64 {
				b := time.Duration(1 << 62)
				for range 3 {
					b = min(b, buildTree(t, layers))
				}
				return float64(b) / float64(n)
			}
			perSmall, perLarge := best(smallLayers, small), best(largeLayers, large)
			if ratio := perLarge / perSmall; ratio > 3 {
				t.Errorf("per entry, %d entries cost %.1fx what %d do (%.1f µs against %.1f µs): the tree building is not linear",
					large, ratio, small, perLarge/1e3, perSmall/1e3)
			}
		})
	}
}

func BenchmarkTreeBuilding(b *testing.B) {
	for _, shape := range treeShapes {
		for _, n := range []int{1000, 10000} {
			b.Run(fmt.Sprintf("%s/%d", shape.name, n), func(b *testing.B) {
				layers := shape.layers(b, n)
				for b.Loop() {
					buildTree(b, layers)
				}
			})
		}
	}
}
