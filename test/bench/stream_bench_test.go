package bench

import (
	"bufio"

	"context"
	"crypto/sha256"
	"encoding/hex"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/google/go-containerregistry/pkg/authn"
	"github.com/google/go-containerregistry/pkg/name"
	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/remote"
	"github.com/google/go-containerregistry/pkg/v1/tarball"
	"github.com/klauspost/compress/gzip"
	"github.com/spf13/afero"
	"golang.org/x/sys/unix"

	"github.com/oneagent-csi/oneagent-csi/internal/readahead"
	"github.com/oneagent-csi/oneagent-csi/provisioner"
	"github.com/oneagent-csi/oneagent-csi/provisioner/extract"
	"github.com/oneagent-csi/oneagent-csi/test/faketenant"
	"github.com/oneagent-csi/oneagent-csi/test/harness"
	"github.com/oneagent-csi/oneagent-csi/test/ocitest"
	"github.com/oneagent-csi/oneagent-csi/test/registryproc"
)

// BenchmarkInstallWhileDownloading installs the synthetic 1 GiB code module
// with the real node process (GOMAXPROCS=64), as a ZIP from the fake tenant
// over loopback HTTPS and as an image from a real registry (distribution,
// TLS and htpasswd) on loopback, and runs the tools a user would compare it
// with on the same content, on the same disk, in every iteration:
//
//   - the node with a tenant that ignores range requests: the ZIP is
//     downloaded into tmp/ (download alone), then extracted (extraction
//     alone);
//   - the node with a tenant that answers them: the ZIP is extracted while
//     it downloads (the default);
//   - `unzip -q` of the ZIP and `tar -xzf` of the same tree as a tar.gz;
//   - the node with an image tenant (one gzip layer: that tar.gz), the
//     layer's download alone (to nowhere, SHA-256 on the way) and its
//     extraction alone (the node's extractor on the local tar.gz, in this
//     process), and `crane export <image> - | tar -x` of the same image.
//
// The disk use of the data dir's filesystem is sampled every 5 ms during
// each node install (statfs; ext4 counts delayed allocations), peak RSS is
// the node's VmHWM.
func BenchmarkInstallWhileDownloading(b *testing.B) {
	harness.RequireRoot(b)
	for _, tool := range []string{"unzip", "tar", "bash"} {
		if _, err := exec.LookPath(tool); err != nil {
			b.Skipf("%s not installed", tool)
		}
	}
	fx := newInstallFixture(b)
	crane := craneBinary(b)

	var runs installRuns
	var unzipT, tarT, craneT time.Duration
	b.ResetTimer()
	for i := 0; i < b.N; i++ {
		runs.run(b, fx)
		unzipT += timeCommand(b, fx.work, "unzip", "-q", "-d", "{out}", fx.zipPath)
		tarT += timeCommand(b, fx.work, "tar", "-xzf", fx.tgz, "-C", "{out}")
		craneT += timeCommand(b, fx.work, "bash", "-c", `set -o pipefail; DOCKER_CONFIG=`+fx.dockerDir+` SSL_CERT_FILE=`+fx.reg.CAFile+` `+crane+` export `+fx.ref+` - | tar -x -C {out}`)
	}
	b.StopTimer()
	seq, streamed, image, layerDownload, layerExtract := runs.seq, runs.streamed, runs.image, runs.layerDownload, runs.layerExtract
	n := float64(b.N)
	s := func(d time.Duration) float64 { return d.Seconds() / n }
	b.ReportMetric(s(seq.download), "s-download")
	b.ReportMetric(s(seq.extract), "s-extract")
	b.ReportMetric(s(seq.took), "s-download+extract")
	b.ReportMetric(s(streamed.took), "s-streamed")
	b.ReportMetric(streamed.took.Seconds()/max(seq.download, seq.extract).Seconds(), "streamed/max(dl,ex)")
	b.ReportMetric(s(unzipT), "s-unzip")
	b.ReportMetric(s(tarT), "s-tar-xzf")
	b.ReportMetric(seq.extract.Seconds()/unzipT.Seconds(), "extract/unzip")
	b.ReportMetric(seq.extract.Seconds()/tarT.Seconds(), "extract/tar")
	b.ReportMetric(streamed.took.Seconds()/unzipT.Seconds(), "streamed/unzip")
	b.ReportMetric(float64(streamed.diskPeak)/float64(streamed.diskFinal), "disk-peak/final-streamed")
	b.ReportMetric(float64(seq.diskPeak)/float64(seq.diskFinal), "disk-peak/final-downloaded")
	b.ReportMetric(float64(streamed.peakRSS)/n/(1<<20), "MiB-rss-streamed")
	b.ReportMetric(float64(seq.peakRSS)/n/(1<<20), "MiB-rss-downloaded")
	b.ReportMetric(s(image.took), "s-image")
	b.ReportMetric(s(layerDownload.took), "s-image-download")
	b.ReportMetric(s(layerExtract.took), "s-image-extract")
	b.ReportMetric(image.took.Seconds()/max(layerDownload.took, layerExtract.took).Seconds(), "image/max(dl,ex)")
	reportCPU(b, image, layerDownload, layerExtract)
	b.ReportMetric(s(craneT), "s-crane-export-tar")
	b.ReportMetric(image.took.Seconds()/craneT.Seconds(), "image/crane")
	b.ReportMetric(float64(image.diskPeak)/float64(image.diskFinal), "disk-peak/final-image")
	b.ReportMetric(float64(image.peakRSS)/n/(1<<20), "MiB-rss-image")
}

// timeCommand runs a command with {out} replaced by a fresh dir on the
// same disk as the installs, after a sync, and returns its time.
func timeCommand(b *testing.B, work string, name string, args ...string) time.Duration {
	b.Helper()
	out := filepath.Join(work, "out")
	if err := os.MkdirAll(out, 0o755); err != nil {
		b.Fatal(err)
	}
	defer removeAll(b, out)
	for i, a := range args {
		args[i] = strings.ReplaceAll(a, "{out}", out)
	}
	unix.Sync()
	start := time.Now()
	if o, err := exec.Command(name, args...).CombinedOutput(); err != nil {
		b.Fatalf("%s %v: %v\n%s", name, args, err, tail(o, 4096))
	}
	d := time.Since(start)
	b.Logf("%s: %v", name, d.Round(time.Millisecond))
	return d
}

// moduleTarGz writes the ZIP's tree below opt/dynatrace/oneagent/ (the
// layout of a code-modules image) as a tar.gz with the system's tar and
// gzip, once per process, untimed.
func moduleTarGz(b *testing.B, zipPath string) string {
	b.Helper()
	dir := sharedDir(b, "targz")
	tgz := filepath.Join(dir, filepath.Base(zipPath)+".tar.gz")
	if _, err := os.Stat(tgz); err == nil {
		return tgz
	}
	tree := filepath.Join(dir, "tree")
	root := filepath.Join(tree, "opt/dynatrace/oneagent")
	if err := os.MkdirAll(root, 0o755); err != nil {
		b.Fatal(err)
	}
	defer removeAll(b, tree)
	if o, err := exec.Command("unzip", "-q", "-d", root, zipPath).CombinedOutput(); err != nil {
		b.Fatalf("unzip: %v\n%s", err, o)
	}
	if o, err := exec.Command("tar", "-czf", tgz+".tmp", "-C", tree, "opt").CombinedOutput(); err != nil {
		b.Fatalf("tar: %v\n%s", err, o)
	}
	if err := os.Rename(tgz+".tmp", tgz); err != nil {
		b.Fatal(err)
	}
	return tgz
}

// craneBinary builds crane (go-containerregistry's CLI, the version in
// go.mod) with `go install`, once per process.
func craneBinary(b *testing.B) string {
	b.Helper()
	dir := sharedDir(b, "crane")
	bin := filepath.Join(dir, "crane")
	if _, err := os.Stat(bin); err == nil {
		return bin
	}
	cmd := exec.Command("go", "install", "github.com/google/go-containerregistry/cmd/crane@"+ggcrVersion(b))
	cmd.Dir = dir
	cmd.Env = append(os.Environ(), "GOBIN="+dir, "GOFLAGS=-mod=mod")
	if o, err := cmd.CombinedOutput(); err != nil {
		b.Fatalf("build crane: %v\n%s", err, o)
	}
	return bin
}

// ggcrVersion is the go-containerregistry version this module uses.
func ggcrVersion(b *testing.B) string {
	b.Helper()
	out, err := exec.Command("go", "list", "-m", "-f", "{{.Version}}", "github.com/google/go-containerregistry").Output()
	if err != nil {
		b.Fatalf("go list: %v", err)
	}
	return strings.TrimSpace(string(out))
}

// extractLayerAlone applies the image's layer from the local tar.gz with
// the node's extractor, in this process: the image's "extraction alone".
// Decompression runs in its own goroutine, as in the node.
func extractLayerAlone(b *testing.B, tgz, work string) phase {
	b.Helper()
	dest := filepath.Join(work, "layer")
	defer removeAll(b, dest)
	unix.Sync()
	cpu := busyCPU(b)
	start := time.Now()
	f, err := os.Open(tgz)
	if err != nil {
		b.Fatal(err)
	}
	defer f.Close()
	st, err := f.Stat()
	if err != nil {
		b.Fatal(err)
	}
	z, err := gzip.NewReader(bufio.NewReaderSize(f, 256<<10))
	if err != nil {
		b.Fatal(err)
	}
	// The node's stages without the network: gunzip in a goroutine, up to
	// 4 × 128 KiB ahead of the tree (as provisioner/registry reads a layer).
	pr := readahead.New(z, 128<<10, 4)
	defer pr.Close()
	layers, err := extract.NewLayers(afero.NewOsFs(), dest, "opt/dynatrace/oneagent", extract.Options{})
	if err != nil {
		b.Fatal(err)
	}
	if err := layers.Apply(context.Background(), pr, st.Size()); err != nil {
		b.Fatal(err)
	}
	if _, err := layers.Finish(); err != nil {
		b.Fatal(err)
	}
	p := phase{took: time.Since(start), cpu: busyCPU(b) - cpu}
	b.Logf("layer extraction alone: %v (%.1f CPU-s)", p.took.Round(time.Millisecond), p.cpu)
	return p
}

// downloadLayerAlone fetches the image's layer blob from the registry with
// its SHA-256, to nowhere: the image's "download alone".
func downloadLayerAlone(b *testing.B, fx *installFixture) phase {
	b.Helper()
	tr := fx.reg.Transport(b)
	digest := fx.layerDigest
	d, err := name.NewDigest(fx.ref[:strings.LastIndex(fx.ref, ":")] + "@" + digest.String())
	if err != nil {
		b.Fatal(err)
	}
	cpu := busyCPU(b)
	start := time.Now()
	layer, err := remote.Layer(d, remote.WithTransport(tr), remote.WithAuth(&authn.Basic{Username: "bench", Password: "bench-pass"}))
	if err != nil {
		b.Fatal(err)
	}
	rc, err := layer.Compressed()
	if err != nil {
		b.Fatal(err)
	}
	defer rc.Close()
	h := sha256.New()
	if _, err := io.Copy(h, rc); err != nil {
		b.Fatal(err)
	}
	p := phase{took: time.Since(start), cpu: busyCPU(b) - cpu}
	if got := hex.EncodeToString(h.Sum(nil)); got != digest.Hex {
		b.Fatalf("downloaded layer has sha256 %s, want %s", got, digest.Hex)
	}
	b.Logf("layer download alone: %v (%.1f CPU-s)", p.took.Round(time.Millisecond), p.cpu)
	return p
}

// installFixture is what the install benchmarks share: the module as a
// ZIP from two fake tenants (one answering range requests, one not) and as
// a one-layer image in a real registry with its pull secret.
type installFixture struct {
	streaming               *faketenant.Server
	streamTenant, seqTenant provisioner.Tenant
	imageTenant             provisioner.Tenant
	zipPath, tgz            string
	reg                     *registryproc.Registry
	ref                     string
	layerDigest             v1.Hash
	// dockerDir holds the pull secret as a docker config.json.
	dockerDir string
	// work is where the installs and tools write.
	work string
}

func newInstallFixture(b *testing.B) *installFixture {
	b.Helper()
	fx := &installFixture{work: b.TempDir()}
	cache := sharedDir(b, "modules")
	// The tenants offer HTTP/2, as real ones do.
	fx.streaming, fx.streamTenant = harness.StartTenant(b, faketenant.Options{ModuleSize: moduleSize(b), CacheDir: cache, HTTP2: true})
	_, fx.seqTenant = harness.StartTenant(b, faketenant.Options{ModuleSize: moduleSize(b), CacheDir: cache, NoRange: true, HTTP2: true})
	var err error
	if fx.zipPath, err = fx.streaming.ModulePath(fx.streaming.Latest()); err != nil {
		b.Fatal(err)
	}
	fx.tgz = moduleTarGz(b, fx.zipPath)

	// The same tree as an image: one gzip layer, pushed once.
	fx.reg = registryproc.Start(b, registryproc.Options{Users: map[string]string{"bench": "bench-pass"}})
	layer, err := tarball.LayerFromFile(fx.tgz)
	if err != nil {
		b.Fatal(err)
	}
	fx.ref = fx.reg.Host + "/" + ocitest.Repo + ":bench"
	fx.reg.Push(b, "bench", "bench-pass", ocitest.Repo, "bench", ocitest.Image(b, layer))
	if fx.layerDigest, err = layer.Digest(); err != nil {
		b.Fatal(err)
	}
	fx.dockerDir = filepath.Join(fx.work, "docker")
	if err := os.MkdirAll(fx.dockerDir, 0o700); err != nil {
		b.Fatal(err)
	}
	secret := filepath.Join(fx.dockerDir, "config.json")
	registryproc.WritePullSecret(b, secret, fx.reg.Host, "bench", "bench-pass")
	fx.imageTenant = provisioner.Tenant{Name: "air", Image: fx.ref, PullSecretFile: secret, CAFile: fx.reg.CAFile}
	return fx
}

// installRuns adds up what both install benchmarks time in every
// iteration: the ZIP downloaded then extracted, the ZIP streamed, the image
// install, and the layer's download alone and extraction alone.
type installRuns struct {
	seq, streamed, image        installResult
	layerDownload, layerExtract phase
}

func (r *installRuns) run(b *testing.B, fx *installFixture) {
	b.Helper()
	r.seq.add(coldInstall(b, fx.seqTenant, fx.work, nil))
	r.streamed.add(coldInstall(b, fx.streamTenant, fx.work, nil))
	r.image.add(coldInstall(b, fx.imageTenant, fx.work, nil))
	r.layerDownload.add(downloadLayerAlone(b, fx))
	r.layerExtract.add(extractLayerAlone(b, fx.tgz, fx.work))
}

// phase is one timed step outside the node: its wall time and the CPU the
// whole machine spent meanwhile (busyCPU).
type phase struct {
	took time.Duration
	cpu  float64
}

func (p *phase) add(o phase) {
	p.took += o.took
	p.cpu += o.cpu
}

// reportCPU reports the CPU the machine spent on the image install beside
// the sum of its download alone and extraction alone: on a machine whose
// cores the extraction alone already keeps busy, the install cannot take
// less wall time than that CPU allows, however well the two overlap.
func reportCPU(b *testing.B, image installResult, download, extraction phase) {
	n := float64(b.N)
	b.ReportMetric(image.cpu/n, "cpu-s-image")
	b.ReportMetric(download.cpu/n, "cpu-s-image-download")
	b.ReportMetric(extraction.cpu/n, "cpu-s-image-extract")
	b.ReportMetric(image.cpu/(download.cpu+extraction.cpu), "cpu-image/(dl+ex)")
	b.ReportMetric(extraction.cpu/extraction.took.Seconds(), "cores-busy-image-extract")
}
