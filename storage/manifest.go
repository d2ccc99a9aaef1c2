package storage

import (
	"bufio"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"time"

	"github.com/spf13/afero"
)

// ManifestSchema is the schema this build writes: 2 = the files are in the
// artifact's tree/ (1 = at the artifact dir's root, still read).
const ManifestSchema = 2

// ManifestHeader is the first line of an artifact manifest. Reconcile reads
// only this line, so start-up does not parse thousands of file entries.
type ManifestHeader struct {
	Schema      int       `json:"schema"`
	ArtifactID  string    `json:"artifactID"`
	Version     string    `json:"version"`
	Flavor      string    `json:"flavor"`
	Arch        string    `json:"arch"`
	ZipSize     int64     `json:"zipSize"`
	Size        int64     `json:"size"`
	Files       int       `json:"files"`
	InstalledAt time.Time `json:"installedAt"`
	// Image is the repository an image artifact was pulled from (its
	// Version is then the manifest digest); empty for ZIP artifacts.
	Image string `json:"image,omitempty"`
}

// ManifestEntry is one file, directory or symlink of an artifact, one JSON
// object per line after the header.
type ManifestEntry struct {
	Path   string `json:"path"`
	Type   string `json:"type"` // file | dir | symlink
	Mode   uint32 `json:"mode"`
	Size   int64  `json:"size,omitempty"`
	SHA256 string `json:"sha256,omitempty"`
	Link   string `json:"link,omitempty"`
}

// WriteManifest writes header and entries as JSON lines.
func WriteManifest(w io.Writer, h ManifestHeader, entries []ManifestEntry) error {
	bw := bufio.NewWriter(w)
	enc := json.NewEncoder(bw)
	if err := enc.Encode(h); err != nil {
		return fmt.Errorf("write manifest header: %w", err)
	}
	for _, e := range entries {
		if err := enc.Encode(e); err != nil {
			return fmt.Errorf("write manifest entry %s: %w", e.Path, err)
		}
	}
	return bw.Flush()
}

// ReadManifestHeader reads only the header of a manifest file.
func ReadManifestHeader(fs afero.Fs, path string) (ManifestHeader, error) {
	var h ManifestHeader
	f, err := fs.Open(path)
	if err != nil {
		return h, err
	}
	defer f.Close()
	line, err := bufio.NewReader(f).ReadBytes('\n')
	if err != nil && !errors.Is(err, io.EOF) {
		return h, fmt.Errorf("read manifest %s: %w", path, err)
	}
	if err := json.Unmarshal(line, &h); err != nil {
		return h, fmt.Errorf("decode manifest header %s: %w", path, err)
	}
	if (h.Schema != 1 && h.Schema != ManifestSchema) || h.ArtifactID == "" {
		return h, fmt.Errorf("manifest %s: unsupported schema %d or missing artifact id", path, h.Schema)
	}
	return h, nil
}

// ReadManifest reads a whole manifest.
func ReadManifest(fs afero.Fs, path string) (ManifestHeader, []ManifestEntry, error) {
	h, err := ReadManifestHeader(fs, path)
	if err != nil {
		return h, nil, err
	}
	f, err := fs.Open(path)
	if err != nil {
		return h, nil, err
	}
	defer f.Close()
	dec := json.NewDecoder(bufio.NewReader(f))
	var skip ManifestHeader
	if err := dec.Decode(&skip); err != nil {
		return h, nil, err
	}
	var entries []ManifestEntry
	for {
		var e ManifestEntry
		if err := dec.Decode(&e); err != nil {
			if errors.Is(err, io.EOF) {
				return h, entries, nil
			}
			return h, nil, fmt.Errorf("decode manifest %s: %w", path, err)
		}
		entries = append(entries, e)
	}
}
