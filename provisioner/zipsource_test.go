package provisioner_test

import (
	"archive/zip"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/oneagent-csi/oneagent-csi/provisioner"
	"github.com/oneagent-csi/oneagent-csi/test/faketenant"
)

// The artifact is the same whether the ZIP streams (the tenant answers
// range requests) or is downloaded first (it does not): its id is the
// SHA-256 of the whole ZIP, and tmp/ ends clean.
func TestZipInstallStreamedOrDownloaded(t *testing.T) {
	for _, tc := range []struct {
		name    string
		noRange bool
	}{
		{"streamed", false},
		{"downloaded", true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			f := newFixtureWith(t, faketenant.Options{NoRange: tc.noRange, ModuleSize: 2 << 20}, nil)
			version := f.srv.Latest()
			a, err := f.prov.EnsureArtifact(context.Background(), "prod", version)
			if err != nil {
				t.Fatal(err)
			}
			zipPath, err := f.srv.ModulePath(version)
			if err != nil {
				t.Fatal(err)
			}
			data, err := os.ReadFile(zipPath)
			if err != nil {
				t.Fatal(err)
			}
			sum := sha256.Sum256(data)
			if a.ID != hex.EncodeToString(sum[:]) || a.ZipSize != int64(len(data)) {
				t.Errorf("artifact %s (%d bytes), want the ZIP's sha256 %x (%d bytes)", a.ID, a.ZipSize, sum, len(data))
			}
			if n := f.srv.Downloads(version); n != 1 {
				t.Errorf("%d whole downloads, want 1", n)
			}
			if got := tmpEntries(t, f.layout); len(got) != 0 {
				t.Errorf("tmp/ not clean: %v", got)
			}
			if _, err := os.Stat(filepath.Join(f.layout.Abs(f.layout.Artifact(a.ID)), f.layout.TreeName(), "agent/lib64/liboneagentproc.so")); err != nil {
				t.Errorf("the tree lacks the agent: %v", err)
			}
		})
	}
}

// While a ZIP streams, tmp/ holds the stage being extracted and never a
// copy of the ZIP: the disk holds the extracted tree only.
func TestZipStreamKeepsNoCompressedCopy(t *testing.T) {
	f := newFixtureWith(t, faketenant.Options{ModuleSize: 1 << 20}, nil)
	f.srv.SetFaults(faketenant.Fault{Kind: faketenant.FaultSlow, Route: faketenant.RouteDownload, Rate: 2 << 20})
	version := f.srv.Latest()
	done := make(chan error, 1)
	go func() {
		_, err := f.prov.EnsureArtifact(context.Background(), "prod", version)
		done <- err
	}()
	sawStage := false
	for {
		for _, name := range tmpEntries(t, f.layout) {
			if strings.HasSuffix(name, ".zip") {
				t.Fatalf("tmp/ holds %s while the ZIP streams", name)
			}
			sawStage = sawStage || strings.HasSuffix(name, ".d")
		}
		select {
		case err := <-done:
			if err != nil {
				t.Fatal(err)
			}
			if !sawStage {
				t.Error("never saw the stage in tmp/: did the install stream?")
			}
			return
		case <-time.After(5 * time.Millisecond):
		}
	}
}

// A central directory the rules refuse is refused from the end of the ZIP
// alone: its data is never downloaded, also not after the backoff.
func TestZipDirectoryRefusedBeforeTheData(t *testing.T) {
	reg := prometheus.NewRegistry()
	now := time.Unix(1_800_000_000, 0)
	clock := func() time.Time { return now }
	f := newFixtureWith(t, faketenant.Options{}, func(o *provisioner.Options) { o.Registerer = reg; o.Now = clock })
	zipPath := filepath.Join(t.TempDir(), "evil.zip")
	writeZip(t, zipPath, map[string]string{"agent/../../etc/cron.d/evil": "x"})
	version := f.srv.Latest()
	f.srv.ServeModuleFile(version, zipPath)
	for i := range 2 {
		_, err := f.prov.EnsureArtifact(context.Background(), "prod", version)
		if !errors.Is(err, provisioner.ErrBadArchive) || !strings.Contains(err.Error(), "climbs out") {
			t.Fatalf("attempt %d: err = %v, want a bad archive", i, err)
		}
		now = now.Add(time.Hour) // past the backoff
	}
	if n := f.srv.Requests(faketenant.RouteDownload); n != 0 {
		t.Errorf("the refused archive's data was requested %d times", n)
	}
	if got := metricValue(t, reg, "oneagent_csi_downloads_total", "result", "bad_archive"); got != 1 {
		t.Errorf("bad_archive counted %v times, want 1", got)
	}
	if got := tmpEntries(t, f.layout); len(got) != 0 {
		t.Errorf("tmp/ not clean: %v", got)
	}
}

func writeZip(t *testing.T, path string, files map[string]string) {
	t.Helper()
	out, err := os.Create(path)
	if err != nil {
		t.Fatal(err)
	}
	zw := zip.NewWriter(out)
	for name, data := range files {
		w, err := zw.Create(name)
		if err != nil {
			t.Fatal(err)
		}
		if _, err := w.Write([]byte(data)); err != nil {
			t.Fatal(err)
		}
	}
	if err := zw.Close(); err != nil {
		t.Fatal(err)
	}
	if err := out.Close(); err != nil {
		t.Fatal(err)
	}
}

// A tenant (or a proxy in front of it) that answers the range request with
// 416 gets the ZIP downloaded whole instead.
func TestZipRangeRefusedFallsBackToDownload(t *testing.T) {
	f := newFixture(t, nil)
	f.srv.SetFaults(faketenant.Fault{Kind: faketenant.FaultStatus, Route: faketenant.RouteDownloadRange, Status: http.StatusRequestedRangeNotSatisfiable})
	version := f.srv.Latest()
	if _, err := f.prov.EnsureArtifact(context.Background(), "prod", version); err != nil {
		t.Fatal(err)
	}
	if n, r := f.srv.Downloads(version), f.srv.Requests(faketenant.RouteDownloadRange); n != 1 || r != 1 {
		t.Errorf("%d whole downloads and %d range requests, want 1 and 1", n, r)
	}
	if got := tmpEntries(t, f.layout); len(got) != 0 {
		t.Errorf("tmp/ not clean: %v", got)
	}
}

// A tenant whose download differs from what its range request returned
// (an archive built per request) is retried at once, and its ZIPs are
// downloaded whole from then on: the directory fetched first does not
// describe its data.
func TestZipChangedArchiveIsDownloadedFirstFromThenOn(t *testing.T) {
	f := newFixture(t, nil)
	f.srv.SetFaults(faketenant.Fault{Kind: faketenant.FaultCorruptEnd, Route: faketenant.RouteDownload, Count: 1})
	ctx := context.Background()
	if _, err := f.prov.EnsureArtifact(ctx, "prod", f.srv.Latest()); err != nil {
		t.Fatal(err)
	}
	if d, r := f.srv.Requests(faketenant.RouteDownload), f.srv.Requests(faketenant.RouteDownloadRange); d != 2 || r != 1 {
		t.Fatalf("%d downloads and %d range requests, want 2 (streamed, then whole) and 1", d, r)
	}
	if _, err := f.prov.EnsureArtifact(ctx, "prod", faketenant.DefaultVersions[0]); err != nil {
		t.Fatal(err)
	}
	if r := f.srv.Requests(faketenant.RouteDownloadRange); r != 1 {
		t.Errorf("the next version asked for a range again (%d range requests)", r)
	}
	if got := tmpEntries(t, f.layout); len(got) != 0 {
		t.Errorf("tmp/ not clean: %v", got)
	}
}

// The same when the other archive shows first as a local header that does
// not match the directory: the download's own directory differs from the
// one fetched first, so it is another archive, not a bad one: not refused.
func TestZipOtherArchiveIsNotRefused(t *testing.T) {
	reg := prometheus.NewRegistry()
	f := newFixture(t, func(o *provisioner.Options) { o.Registerer = reg })
	f.srv.SetFaults(faketenant.Fault{Kind: faketenant.FaultOtherArchive, Route: faketenant.RouteDownload, Count: 1, Version: faketenant.DefaultVersions[0]})
	if _, err := f.prov.EnsureArtifact(context.Background(), "prod", f.srv.Latest()); err != nil {
		t.Fatal(err)
	}
	if got := metricValue(t, reg, "oneagent_csi_downloads_total", "result", "bad_archive"); got != 0 {
		t.Errorf("bad_archive counted %v times, want 0", got)
	}
	if d, r := f.srv.Requests(faketenant.RouteDownload), f.srv.Requests(faketenant.RouteDownloadRange); d != 2 || r != 1 {
		t.Fatalf("%d downloads and %d range requests, want 2 (streamed, then whole) and 1", d, r)
	}
}

// A central directory longer than the first range (here ~300 KiB for 2,500
// files) is completed with a second range request.
func TestZipLongDirectoryTakesTwoRanges(t *testing.T) {
	f := newFixture(t, nil)
	files := map[string]string{"agent/lib64/liboneagentproc.so": "elf"}
	for i := range 2500 {
		files[fmt.Sprintf("agent/res/%s/file%05d.txt", strings.Repeat("d", 60), i)] = "x"
	}
	zipPath := filepath.Join(t.TempDir(), "long.zip")
	writeZip(t, zipPath, files)
	version := f.srv.Latest()
	f.srv.ServeModuleFile(version, zipPath)
	a, err := f.prov.EnsureArtifact(context.Background(), "prod", version)
	if err != nil {
		t.Fatal(err)
	}
	if a.Files != len(files) {
		t.Errorf("installed %d files, want %d", a.Files, len(files))
	}
	if r, d := f.srv.Requests(faketenant.RouteDownloadRange), f.srv.Requests(faketenant.RouteDownload); r != 2 || d != 1 {
		t.Errorf("%d range requests and %d downloads, want 2 and 1", r, d)
	}
}
