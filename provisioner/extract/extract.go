// Package extract unpacks code-module archives safely: ZIP files from the
// tenant's deployment API and tar layers of OCI images. Both formats go
// through one set of entry rules (rules.go): no absolute names or "..",
// links resolved inside the tree only, no devices or fifos, modes
// normalised, size/entry/ratio limits, and the same manifest entries.
// Nothing here renames into place: the caller installs the tree once every
// check has passed.
package extract

import (
	"errors"
	"fmt"
	"runtime"

	"github.com/oneagent-csi/oneagent-csi/storage"
)

// ErrBadArchive: the archive is corrupt, truncated or unsafe.
var ErrBadArchive = errors.New("bad archive")

func badArchive(format string, a ...any) error {
	return fmt.Errorf("%w: %s", ErrBadArchive, fmt.Sprintf(format, a...))
}

// Limits bound what an archive may expand to, against zip bombs and disk
// exhaustion. Zero fields take the defaults.
type Limits struct {
	// MaxBytes caps the total extracted size. Default 8 GiB.
	MaxBytes int64 `json:"maxBytes,omitempty"`
	// MaxEntries caps the number of entries. Default 100000.
	MaxEntries int `json:"maxEntries,omitempty"`
	// MaxRatio caps the expansion ratio (extracted / compressed) of the whole
	// archive and of every entry above 1 MiB. Default 100.
	MaxRatio float64 `json:"maxRatio,omitempty"`
	// MaxManifestBytes caps an image manifest or index, checked before it
	// is read (a registry's answer is read whole into memory). Default 4 MiB.
	MaxManifestBytes int64 `json:"maxManifestBytes,omitempty"`
	// MaxLayers caps an image's layer count. Default 128.
	MaxLayers int `json:"maxLayers,omitempty"`
	// MaxZstdWindow caps the window a zstd layer may declare: the decoder
	// holds the whole window in memory, outside what Go's memory limit can
	// reclaim. zstd's own levels use at most 8 MiB; a layer declaring more
	// is a bad image. Default 8 MiB.
	MaxZstdWindow int64 `json:"maxZstdWindow,omitempty"`
	// MaxDirectoryBytes caps a ZIP's central directory, checked from its
	// end record before the directory is read: the directory is held and
	// parsed in memory (a 32 MiB one of 95,000 entries took 136 MiB of
	// heap). Not a config key: the node sets it to half its extraction
	// memory budget (extractMemory). Default 4 MiB; a code module of
	// 15,000 files has one of about 2 MiB.
	MaxDirectoryBytes int64 `json:"-"`
}

// Defaults of Limits' image bounds.
const (
	DefaultMaxManifestBytes = 4 << 20
	DefaultMaxLayers        = 128
	DefaultMaxZstdWindow    = 8 << 20
	DefaultMaxDirectory     = 4 << 20
)

// Defaults fills zero fields with the defaults.
func (l *Limits) Defaults() {
	if l.MaxBytes == 0 {
		l.MaxBytes = 8 << 30
	}
	if l.MaxEntries == 0 {
		l.MaxEntries = 100000
	}
	if l.MaxRatio == 0 {
		l.MaxRatio = 100
	}
	if l.MaxManifestBytes == 0 {
		l.MaxManifestBytes = DefaultMaxManifestBytes
	}
	if l.MaxLayers == 0 {
		l.MaxLayers = DefaultMaxLayers
	}
	if l.MaxZstdWindow == 0 {
		l.MaxZstdWindow = DefaultMaxZstdWindow
	}
	if l.MaxDirectoryBytes == 0 {
		l.MaxDirectoryBytes = DefaultMaxDirectory
	}
}

// ratioCheckMin is the entry size above which the per-entry ratio is checked:
// small files of repeated bytes legitimately compress very well.
const ratioCheckMin = 1 << 20

// Options tune an extraction. Zero fields take the defaults.
type Options struct {
	// Limits bound what the archive may expand to.
	Limits Limits
	// Workers extract files in parallel. Default WorkersFor(8 MiB).
	Workers int
	// PageCache bounds the written data kept dirty or under writeback in
	// the page cache (closed files waiting for writeback, and a quarter of
	// it per open file). Default diskio.DefaultPageCache.
	PageCache int64
}

// Result is what an extraction produced.
type Result struct {
	Entries []storage.ManifestEntry
	Size    int64
	Files   int
}

// WorkersFor is the number of extraction workers whose buffers fit in
// memory bytes: at least 1, at most GOMAXPROCS.
func WorkersFor(memory int64) int {
	return int(max(1, min(memory/WorkerMemory, int64(runtime.GOMAXPROCS(0)))))
}
