package provisioner

import (
	"fmt"
	"os"
	"path/filepath"

	"github.com/oneagent-csi/oneagent-csi/storage"
)

// commitArtifact installs the tree extracted into stagePath (its tree
// directory) as artifact a, whichever source it came from: it writes the
// manifest beside the tree, makes everything durable, renames the stage
// into artifacts/ and records a under key. Nothing is visible in artifacts/
// before every check of the extraction has passed and this returns.
func (p *Provisioner) commitArtifact(stagePath string, a storage.Artifact, key storage.ArtifactKey, entries []storage.ManifestEntry) error {
	l, fs := p.opts.Layout, p.opts.Fs
	hdr := storage.ManifestHeader{Schema: storage.ManifestSchema, ArtifactID: a.ID, Version: a.Version, Flavor: a.Flavor, Arch: a.Arch,
		ZipSize: a.ZipSize, Size: a.Size, Files: a.Files, InstalledAt: a.InstalledAt, Image: a.Image}
	mf, err := fs.OpenFile(filepath.Join(stagePath, l.ManifestName()), os.O_WRONLY|os.O_CREATE|os.O_EXCL, 0o644)
	if err != nil {
		return err
	}
	if err := storage.WriteManifest(mf, hdr, entries); err != nil {
		_ = mf.Close()
		return err
	}
	if err := mf.Sync(); err != nil {
		_ = mf.Close()
		return err
	}
	if err := mf.Close(); err != nil {
		return err
	}
	// Every extracted file and dir must be on disk before the rename makes
	// the artifact "ready": a power cut never leaves a truncated file in it.
	if err := syncFilesystem(fs, stagePath); err != nil {
		return fmt.Errorf("install artifact %s: %w", a.ID, err)
	}
	if err := fs.Rename(stagePath, l.Artifact(a.ID)); err != nil {
		if _, serr := fs.Stat(l.ArtifactManifest(a.ID)); serr != nil {
			return fmt.Errorf("install artifact %s: %w", a.ID, err)
		}
		// A concurrent install of the same bytes under another key won.
	}
	if err := syncDir(fs, l.ArtifactsDir()); err != nil {
		return fmt.Errorf("install artifact %s: %w", a.ID, err)
	}
	return p.opts.Index.PutArtifact(a, key)
}
