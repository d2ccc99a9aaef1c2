package cluster

import (
	"archive/tar"
	"bytes"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"sort"
	"strings"
)

// Images the cluster imports into containerd (no registry: docker-archive
// tarballs, imagePullPolicy Never).
const (
	PauseImage = "docker.io/local/pause:1"
	AppImage   = "docker.io/local/app:1"
	// InitImage holds the oneagent-csi binary, for the init container.
	InitImage = "docker.io/local/oneagent-csi:e2e"
)

// appBinaries are copied from the host with the libraries ldd lists: the
// app must be dynamically linked for LD_PRELOAD to act.
var appBinaries = []string{"/bin/dash", "/bin/cat", "/bin/ls", "/bin/sleep", "/bin/grep", "/bin/echo", "/usr/bin/id", "/usr/bin/env", "/usr/bin/head", "/bin/touch"}

var ldLib = regexp.MustCompile(`(/[^ ]+)`)

// appRootfs builds a small dynamically linked userland in dir.
func appRootfs(dir string) error {
	for _, d := range []string{"bin", "etc", "tmp", "proc", "sys", "dev", "var/lib", "opt"} {
		if err := os.MkdirAll(filepath.Join(dir, d), 0o755); err != nil {
			return err
		}
	}
	if err := os.Chmod(filepath.Join(dir, "tmp"), 0o1777); err != nil {
		return err
	}
	for _, b := range appBinaries {
		if err := copyFile(b, filepath.Join(dir, "bin", filepath.Base(b)), 0o755); err != nil {
			return err
		}
		out, err := exec.Command("ldd", b).Output()
		if err != nil {
			return fmt.Errorf("ldd %s: %w", b, err)
		}
		for _, lib := range ldLib.FindAllString(string(out), -1) {
			dst := filepath.Join(dir, lib)
			if _, err := os.Stat(dst); err == nil {
				continue
			}
			if err := os.MkdirAll(filepath.Dir(dst), 0o755); err != nil {
				return err
			}
			if err := copyFile(lib, dst, 0o755); err != nil {
				return err
			}
		}
	}
	if err := os.Symlink("dash", filepath.Join(dir, "bin", "sh")); err != nil {
		return err
	}
	if err := os.Symlink("bin", filepath.Join(dir, "usr")); err != nil && !os.IsExist(err) {
		return err
	}
	if err := os.WriteFile(filepath.Join(dir, "etc/passwd"), []byte("root:x:0:0:root:/root:/bin/sh\n"), 0o644); err != nil {
		return err
	}
	return os.WriteFile(filepath.Join(dir, "etc/group"), []byte("root:x:0:\n"), 0o644)
}

func copyFile(src, dst string, mode os.FileMode) error {
	in, err := os.Open(src)
	if err != nil {
		return err
	}
	defer in.Close()
	out, err := os.OpenFile(dst, os.O_CREATE|os.O_WRONLY|os.O_TRUNC, mode)
	if err != nil {
		return err
	}
	if _, err := io.Copy(out, in); err != nil {
		_ = out.Close()
		return err
	}
	return out.Close()
}

// writeDockerArchive writes a one-layer image of rootfs in `docker save`
// format, which `ctr images import` reads.
func writeDockerArchive(ref, rootfs, out string, entrypoint []string) error {
	var layer bytes.Buffer
	tw := tar.NewWriter(&layer)
	var paths []string
	if err := filepath.WalkDir(rootfs, func(p string, _ fs.DirEntry, err error) error {
		if err == nil && p != rootfs {
			paths = append(paths, p)
		}
		return err
	}); err != nil {
		return err
	}
	sort.Strings(paths)
	for _, p := range paths {
		info, err := os.Lstat(p)
		if err != nil {
			return err
		}
		link := ""
		if info.Mode()&fs.ModeSymlink != 0 {
			if link, err = os.Readlink(p); err != nil {
				return err
			}
		}
		hdr, err := tar.FileInfoHeader(info, link)
		if err != nil {
			return err
		}
		rel, _ := filepath.Rel(rootfs, p)
		hdr.Name, hdr.Uid, hdr.Gid, hdr.Uname, hdr.Gname = filepath.ToSlash(rel), 0, 0, "", ""
		if info.IsDir() {
			hdr.Name += "/"
		}
		if err := tw.WriteHeader(hdr); err != nil {
			return err
		}
		if info.Mode().IsRegular() {
			f, err := os.Open(p)
			if err != nil {
				return err
			}
			_, err = io.Copy(tw, f)
			_ = f.Close()
			if err != nil {
				return err
			}
		}
	}
	if err := tw.Close(); err != nil {
		return err
	}
	diff := sha256.Sum256(layer.Bytes())
	config, err := json.Marshal(map[string]any{
		"architecture": "amd64", "os": "linux", "created": "1970-01-01T00:00:00Z",
		"config": map[string]any{"Env": []string{"PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"}, "Entrypoint": entrypoint, "WorkingDir": "/"},
		"rootfs": map[string]any{"type": "layers", "diff_ids": []string{"sha256:" + hex.EncodeToString(diff[:])}},
	})
	if err != nil {
		return err
	}
	cfgSum := sha256.Sum256(config)
	cfgName := hex.EncodeToString(cfgSum[:]) + ".json"
	manifest, err := json.Marshal([]map[string]any{{"Config": cfgName, "RepoTags": []string{strings.TrimPrefix(ref, "docker.io/")}, "Layers": []string{"layer.tar"}}})
	if err != nil {
		return err
	}
	f, err := os.Create(out)
	if err != nil {
		return err
	}
	otw := tar.NewWriter(f)
	for _, e := range []struct {
		name string
		data []byte
	}{{"manifest.json", manifest}, {cfgName, config}, {"layer.tar", layer.Bytes()}} {
		if err := otw.WriteHeader(&tar.Header{Name: e.name, Mode: 0o644, Size: int64(len(e.data)), Typeflag: tar.TypeReg}); err != nil {
			_ = f.Close()
			return err
		}
		if _, err := otw.Write(e.data); err != nil {
			_ = f.Close()
			return err
		}
	}
	if err := otw.Close(); err != nil {
		_ = f.Close()
		return err
	}
	return f.Close()
}

// importOCITarball imports an OCI layout tarball (its platform's content)
// and tags the image it names as ref.
func (c *Cluster) importOCITarball(path, ref string) error {
	f, err := os.Open(path)
	if err != nil {
		return err
	}
	defer f.Close()
	var name string
	tr := tar.NewReader(f)
	for {
		h, err := tr.Next()
		if errors.Is(err, io.EOF) {
			break
		}
		if err != nil {
			return fmt.Errorf("%s: %w", path, err)
		}
		if h.Name != "index.json" {
			continue
		}
		var idx struct {
			Manifests []struct {
				Annotations map[string]string `json:"annotations"`
			} `json:"manifests"`
		}
		if err := json.NewDecoder(tr).Decode(&idx); err != nil {
			return fmt.Errorf("%s: index.json: %w", path, err)
		}
		if len(idx.Manifests) == 1 {
			name = idx.Manifests[0].Annotations["io.containerd.image.name"]
		}
		break
	}
	if name == "" {
		return fmt.Errorf("%s: not an OCI layout tarball naming one image (io.containerd.image.name)", path)
	}
	if _, err := c.ctr("images", "import", path); err != nil {
		return err
	}
	return c.TagImage(name, ref)
}
