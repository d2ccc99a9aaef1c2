package provisioner_test

import (
	"archive/tar"
	"bytes"
	"context"
	"errors"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/google/go-containerregistry/pkg/v1/static"
	"github.com/google/go-containerregistry/pkg/v1/types"
	"k8s.io/mount-utils"

	"github.com/oneagent-csi/oneagent-csi/provisioner"
	"github.com/oneagent-csi/oneagent-csi/storage"
	"github.com/oneagent-csi/oneagent-csi/test/faketenant"
	"github.com/oneagent-csi/oneagent-csi/test/harness"
	"github.com/oneagent-csi/oneagent-csi/test/ocitest"
)

// imageFixture is a provisioner whose tenants take code modules from an
// image in go-containerregistry's registry.
type imageFixture struct {
	host   string
	digest string
	blobs  *atomic.Int64
	layout storage.Layout
	idx    *storage.Index
}

func newImageFixture(t *testing.T) *imageFixture {
	t.Helper()
	f := &imageFixture{blobs: &atomic.Int64{}}
	f.host = ocitest.Serve(t, func(next http.Handler) http.Handler {
		return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			if r.Method == http.MethodGet && strings.Contains(r.URL.Path, "/blobs/") {
				f.blobs.Add(1)
			}
			next.ServeHTTP(w, r)
		})
	})
	f.digest = ocitest.Push(t, f.host, "1.311.72", ocitest.Module(t, "1.311.72"))
	var err error
	if f.layout, err = storage.NewLayout(t.TempDir()); err != nil {
		t.Fatal(err)
	}
	if f.idx, _, err = storage.Open(storage.ReconcileOptions{Layout: f.layout}); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { f.idx.Close() })
	return f
}

func (f *imageFixture) provisioner(t *testing.T, tenants ...provisioner.Tenant) *provisioner.Provisioner {
	t.Helper()
	p, err := provisioner.New(provisioner.Options{Layout: f.layout, Index: f.idx, Tenants: tenants, Client: fastRetries})
	if err != nil {
		t.Fatal(err)
	}
	return p
}

func (f *imageFixture) image() string { return f.host + "/" + ocitest.Repo + ":1.311.72" }

func TestImageTenantServesTheModuleFromItsImage(t *testing.T) {
	f := newImageFixture(t)
	p := f.provisioner(t, provisioner.Tenant{Name: "air", Image: f.image()}, provisioner.Tenant{Name: "gap", Image: f.image()})
	ctx := context.Background()
	prep, err := p.Prepare(ctx, "air", "")
	if err != nil {
		t.Fatal(err)
	}
	// Content-addressed: the artifact is the manifest digest.
	if prep.Version != f.digest || "sha256:"+prep.Artifact.ID != f.digest || prep.Artifact.Image != f.host+"/"+ocitest.Repo {
		t.Fatalf("prepared %+v, want artifact %s", prep.Artifact, f.digest)
	}
	tree := f.layout.Abs(f.layout.ArtifactTree(prep.Artifact.ID))
	if b, err := os.ReadFile(filepath.Join(tree, "agent/lib64/liboneagentproc.so")); err != nil || string(b) != "elf 1.311.72" {
		t.Fatalf("library = %q, %v", b, err)
	}
	if _, err := os.Stat(filepath.Join(tree, "agent/conf/gone")); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("whited-out file present: %v", err)
	}
	// No API: the layer is the module's own configuration.
	conf, err := os.ReadFile(filepath.Join(f.layout.Abs(f.layout.LayerTree("air", prep.Layer.Rev)), "agent/conf/ruxitagentproc.conf"))
	if err != nil || !strings.Contains(string(conf), "loglevel info") {
		t.Fatalf("layer conf %q: %v", conf, err)
	}
	h, entries, err := storage.ReadManifest(afs(f.layout), f.layout.ArtifactManifest(prep.Artifact.ID))
	if err != nil || h.Image != prep.Artifact.Image || h.Version != f.digest || len(entries) != 6 {
		t.Fatalf("manifest %+v, %d entries: %v", h, len(entries), err)
	}
	if got := tmpEntries(t, f.layout); len(got) != 0 {
		t.Errorf("tmp/ not clean: %v", got)
	}
	// `cache verify` works the same as for ZIP artifacts.
	if r, err := storage.Verify(afs(f.layout), f.layout, prep.Artifact.ID); err != nil || !r.OK() || r.Files != 3 {
		t.Fatalf("verify: %+v, %v", r, err)
	}
	if err := os.WriteFile(filepath.Join(tree, "manifest.json"), []byte("changed"), 0o644); err != nil {
		t.Fatal(err)
	}
	if r, _ := storage.Verify(afs(f.layout), f.layout, prep.Artifact.ID); r.OK() {
		t.Fatal("verify did not notice a changed file")
	}
	// A second tenant with the same image: one artifact, no second pull.
	pulled := f.blobs.Load()
	prep2, err := p.Prepare(ctx, "gap", "")
	if err != nil || prep2.Artifact.ID != prep.Artifact.ID || f.blobs.Load() != pulled {
		t.Fatalf("second tenant: %+v, %v; blob GETs %d -> %d", prep2.Artifact, err, pulled, f.blobs.Load())
	}
}

func TestImageWithTenantAPIMergesTheTenantConfig(t *testing.T) {
	f := newImageFixture(t)
	_, tenant := startTenant(t, faketenant.Options{})
	tenant.Image = f.image()
	p := f.provisioner(t, tenant)
	prep, err := p.Prepare(context.Background(), "prod", "")
	if err != nil {
		t.Fatal(err)
	}
	if prep.Version != f.digest {
		t.Fatalf("version %s, want the image digest %s", prep.Version, f.digest)
	}
	conf, err := os.ReadFile(filepath.Join(f.layout.Abs(f.layout.LayerTree("prod", prep.Layer.Rev)), "agent/conf/ruxitagentproc.conf"))
	if err != nil || !strings.Contains(string(conf), "tenant fake-tenant-uuid") || !strings.Contains(string(conf), "loglevel info") {
		t.Fatalf("layer conf %q: %v", conf, err)
	}
}

func TestImageFailures(t *testing.T) {
	t.Run("version pin names a missing tag", func(t *testing.T) {
		f := newImageFixture(t)
		p := f.provisioner(t, provisioner.Tenant{Name: "air", Image: f.image()})
		_, err := p.Prepare(context.Background(), "air", "9.9.9")
		if !errors.Is(err, provisioner.ErrNotFound) || !provisioner.IsPermanent(err) {
			t.Fatalf("err = %v, want a permanent not found", err)
		}
	})
	t.Run("wrong credentials", func(t *testing.T) {
		f := newImageFixture(t)
		secret := filepath.Join(t.TempDir(), ".dockerconfigjson")
		if err := os.WriteFile(secret, []byte(`{"auths":{"`+f.host+`":{"auth":"dTpw"}}}`), 0o600); err != nil {
			t.Fatal(err)
		}
		guarded := ocitest.Serve(t, func(http.Handler) http.Handler {
			return http.HandlerFunc(func(w http.ResponseWriter, _ *http.Request) {
				w.Header().Set("WWW-Authenticate", `Basic realm="test"`)
				w.WriteHeader(http.StatusUnauthorized)
			})
		})
		p := f.provisioner(t, provisioner.Tenant{Name: "air", Image: guarded + "/" + ocitest.Repo + ":1", PullSecretFile: secret})
		_, err := p.Prepare(context.Background(), "air", "")
		if !errors.Is(err, provisioner.ErrUnauthorized) {
			t.Fatalf("err = %v, want unauthorized", err)
		}
	})
	t.Run("an image with a device file is refused and nothing stays in tmp", func(t *testing.T) {
		f := newImageFixture(t)
		hostile := ocitest.Image(t, static.NewLayer(hostileTar(t), types.OCIUncompressedLayer))
		ocitest.Push(t, f.host, "hostile", hostile)
		p := f.provisioner(t, provisioner.Tenant{Name: "air", Image: f.host + "/" + ocitest.Repo + ":hostile"})
		_, err := p.Prepare(context.Background(), "air", "")
		if !errors.Is(err, provisioner.ErrBadArchive) || !strings.Contains(err.Error(), "unsupported type") {
			t.Fatalf("err = %v, want a bad archive", err)
		}
		if got := tmpEntries(t, f.layout); len(got) != 0 {
			t.Errorf("tmp/ not clean: %v", got)
		}
		if arts, _ := f.idx.ListArtifacts(); len(arts) != 0 {
			t.Errorf("artifacts recorded: %+v", arts)
		}
		// Remembered: the next publish is refused without pulling again.
		pulled := f.blobs.Load()
		if _, err := p.Prepare(context.Background(), "air", ""); !errors.Is(err, provisioner.ErrBadArchive) || f.blobs.Load() != pulled {
			t.Errorf("second prepare: %v, blob GETs %d -> %d; want the refusal remembered", err, pulled, f.blobs.Load())
		}
	})
	t.Run("a transfer that breaks is tried again, not refused", func(t *testing.T) {
		f := newImageFixture(t)
		var drop atomic.Bool
		drop.Store(true)
		flaky := ocitest.Serve(t, func(next http.Handler) http.Handler {
			return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
				if r.Method != http.MethodGet || !strings.Contains(r.URL.Path, "/blobs/") || !drop.CompareAndSwap(true, false) {
					next.ServeHTTP(w, r)
					return
				}
				// The first blob: its length announced, half of it sent,
				// the connection closed.
				rec := httptest.NewRecorder()
				next.ServeHTTP(rec, r)
				body := rec.Body.Bytes()
				w.Header().Set("Content-Length", strconv.Itoa(len(body)))
				w.WriteHeader(rec.Code)
				_, _ = w.Write(body[:len(body)/2])
			})
		})
		digest := ocitest.Push(t, flaky, "1.311.72", ocitest.Module(t, "1.311.72"))
		drop.Store(true)
		p := f.provisioner(t, provisioner.Tenant{Name: "air", Image: flaky + "/" + ocitest.Repo + ":1.311.72"})
		// The broken transfer is unavailable, so the provisioner's retries
		// pull again (a bad archive would be refused for the backoff).
		prep, err := p.Prepare(context.Background(), "air", "")
		if err != nil || prep.Artifact.ID != strings.TrimPrefix(digest, "sha256:") {
			t.Fatalf("prepare: %+v, %v; want the image installed after the broken transfer", prep.Artifact, err)
		}
		if drop.Load() {
			t.Fatal("no transfer was broken")
		}
		if got := tmpEntries(t, f.layout); len(got) != 0 {
			t.Errorf("tmp/ not clean: %v", got)
		}
	})
	t.Run("registry down with the module cached", func(t *testing.T) {
		f := newImageFixture(t)
		tenant := provisioner.Tenant{Name: "air", Image: f.image()}
		first, err := f.provisioner(t, tenant).Prepare(context.Background(), "air", "")
		if err != nil {
			t.Fatal(err)
		}
		// A restarted node whose registry is gone: the resolution the first
		// recorded and the installed artifact serve at once.
		tenant.Image = closedHost(t) + "/" + ocitest.Repo + ":1.311.72"
		prep, err := f.provisioner(t, tenant).Prepare(context.Background(), "air", "")
		if err != nil || prep.Artifact.ID != first.Artifact.ID {
			t.Fatalf("prepared %+v: %v", prep.Artifact, err)
		}
	})
	t.Run("config", func(t *testing.T) {
		for _, tc := range []struct {
			tenant provisioner.Tenant
			want   string
		}{
			{provisioner.Tenant{Name: "a"}, "apiURL or image"},
			{provisioner.Tenant{Name: "a", Image: "Not A Ref"}, `image "Not A Ref"`},
			{provisioner.Tenant{Name: "a", Image: "r.example.com/x:1", Version: "1.2.3"}, "tenants[0].version"},
			{provisioner.Tenant{Name: "a", Image: "r.example.com/x:1", Mirrors: []string{"https://m/path"}}, "mirrors"},
		} {
			f := newImageFixture(t)
			_, err := provisioner.New(provisioner.Options{Layout: f.layout, Index: f.idx, Tenants: []provisioner.Tenant{tc.tenant}})
			if err == nil || !strings.Contains(err.Error(), tc.want) {
				t.Errorf("%+v: %v, want an error naming %s", tc.tenant, err, tc.want)
			}
		}
	})
}

func closedHost(t *testing.T) string {
	t.Helper()
	l, err := netListen()
	if err != nil {
		t.Fatal(err)
	}
	addr := l.Addr().String()
	_ = l.Close()
	return addr
}

// hostileTar is a layer with a device file in the module.
func hostileTar(t *testing.T) []byte {
	t.Helper()
	var buf bytes.Buffer
	tw := tar.NewWriter(&buf)
	for _, h := range []*tar.Header{
		{Name: "opt/dynatrace/oneagent/agent/lib64/liboneagentproc.so", Typeflag: tar.TypeReg, Mode: 0o755},
		{Name: "opt/dynatrace/oneagent/agent/null", Typeflag: tar.TypeChar, Mode: 0o666, Devmajor: 1, Devminor: 3},
	} {
		if err := tw.WriteHeader(h); err != nil {
			t.Fatal(err)
		}
	}
	if err := tw.Close(); err != nil {
		t.Fatal(err)
	}
	return buf.Bytes()
}

func TestGCKeepsTheCurrentAndPreviousImages(t *testing.T) {
	f := newImageFixture(t)
	clk := &clock{now: time.Date(2026, 11, 1, 0, 0, 0, 0, time.UTC)}
	// Three builds, installed one after the other through pins; the
	// tenant's own tag is the newest.
	var digests []string
	for _, v := range []string{"v1", "v2", "v3"} {
		digests = append(digests, ocitest.Push(t, f.host, v, ocitest.Module(t, v)))
	}
	ocitest.Push(t, f.host, "current", ocitest.Module(t, "v3"))
	p, err := provisioner.New(provisioner.Options{Layout: f.layout, Index: f.idx, Client: fastRetries, Now: clk.Now,
		Tenants: []provisioner.Tenant{{Name: "air", Image: f.host + "/" + ocitest.Repo + ":current"}},
		GC:      provisioner.GCOptions{MountInfo: func() ([]mount.MountInfo, error) { return nil, nil }}})
	if err != nil {
		t.Fatal(err)
	}
	for _, v := range []string{"v1", "v2", ""} {
		if _, err := p.Prepare(context.Background(), "air", v); err != nil {
			t.Fatal(err)
		}
		clk.add(time.Hour)
	}
	if _, err := p.GC(context.Background(), false); err != nil {
		t.Fatal(err)
	}
	var kept []string
	arts, _ := f.idx.ListArtifacts()
	for _, a := range arts {
		kept = append(kept, a.Version)
	}
	slices.Sort(kept)
	want := []string{digests[1], digests[2]}
	slices.Sort(want)
	if !slices.Equal(kept, want) {
		t.Fatalf("kept %v, want the current image and the one installed before it %v (not %s)", kept, want, digests[0])
	}
}

// A tag that moves: volumes get the installed image at once while the new
// one installs in the background, then the new one.
func TestMovedTagServesTheInstalledImageMeanwhile(t *testing.T) {
	var blocked atomic.Bool
	release := make(chan struct{})
	host := ocitest.Serve(t, func(next http.Handler) http.Handler {
		return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			if blocked.Load() && r.Method == http.MethodGet && strings.Contains(r.URL.Path, "/blobs/") {
				<-release
			}
			next.ServeHTTP(w, r)
		})
	})
	first := ocitest.Push(t, host, "current", ocitest.Module(t, "v1"))
	layout, err := storage.NewLayout(t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	idx, _, err := storage.Open(storage.ReconcileOptions{Layout: layout})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { idx.Close() })
	clk := &clock{now: time.Date(2026, 11, 1, 0, 0, 0, 0, time.UTC)}
	p, err := provisioner.New(provisioner.Options{Layout: layout, Index: idx, Client: fastRetries, Now: clk.Now, LatestTTL: time.Minute,
		Tenants: []provisioner.Tenant{{Name: "air", Image: host + "/" + ocitest.Repo + ":current"}}})
	if err != nil {
		t.Fatal(err)
	}
	ctx := context.Background()
	if prep, err := p.Prepare(ctx, "air", ""); err != nil || prep.Version != first {
		t.Fatalf("first: %+v, %v", prep.Version, err)
	}
	second := ocitest.Push(t, host, "current", ocitest.Module(t, "v2"))
	blocked.Store(true)
	clk.add(2 * time.Minute)
	harness.Eventually(t, 10*time.Second, "the moved tag resolved", func() bool {
		v, err := p.ResolveVersion(ctx, "air", "")
		return err == nil && v == second
	})
	pctx, cancel := context.WithTimeout(ctx, 5*time.Second)
	prep, err := p.Prepare(pctx, "air", "")
	cancel()
	if err != nil || prep.Version != first {
		t.Fatalf("while the new image downloads: %s, %v; want the installed %s at once", prep.Version, err, first)
	}
	close(release)
	harness.Eventually(t, 20*time.Second, "the new image served", func() bool {
		prep, err := p.Prepare(ctx, "air", "")
		return err == nil && prep.Version == second
	})
}

func TestCheckImageTenant(t *testing.T) {
	f := newImageFixture(t)
	guarded := ocitest.Serve(t, func(http.Handler) http.Handler {
		return http.HandlerFunc(func(w http.ResponseWriter, _ *http.Request) {
			w.Header().Set("WWW-Authenticate", `Basic realm="test"`)
			w.WriteHeader(http.StatusUnauthorized)
		})
	})
	p := f.provisioner(t, provisioner.Tenant{Name: "air", Image: f.image()},
		provisioner.Tenant{Name: "locked", Image: guarded + "/" + ocitest.Repo + ":1"})
	checks, err := p.CheckTenants(context.Background(), "", 10*time.Second)
	if err != nil || len(checks) != 2 {
		t.Fatalf("%+v, %v", checks, err)
	}
	if c := checks[0]; !c.OK() || c.Image != f.image() || len(c.Steps) != 1 || !strings.Contains(c.Steps[0].Detail, f.digest) {
		t.Errorf("air: %+v", c)
	}
	if c := checks[1]; c.OK() || c.Steps[0].Name != "image" || !strings.Contains(c.Steps[0].Detail, "pullSecretFile") {
		t.Errorf("locked: %+v", c)
	}
}
