// Package fleet runs many real `oneagent-csi node` processes on this
// machine behind one pull-through registry (distribution in proxy mode) in
// front of one upstream registry, as a cluster with an in-cluster mirror
// does, and measures what a new code-module image costs the upstream and
// how long the last node takes. Run with `make fleet`.
package fleet

import (
	"crypto/rand"
	"fmt"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"strconv"
	"sync"
	"testing"
	"time"

	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/static"
	"github.com/google/go-containerregistry/pkg/v1/types"

	"github.com/oneagent-csi/oneagent-csi/provisioner"
	"github.com/oneagent-csi/oneagent-csi/test/harness"
	"github.com/oneagent-csi/oneagent-csi/test/ocitest"
	"github.com/oneagent-csi/oneagent-csi/test/registryproc"
)

// nodes is the fleet size; FLEET_NODES overrides it.
func nodes(t *testing.T) int {
	if s := os.Getenv("FLEET_NODES"); s != "" {
		n, err := strconv.Atoi(s)
		if err != nil || n < 1 {
			t.Fatalf("FLEET_NODES=%q: want a positive number", s)
		}
		return n
	}
	return 20
}

// moduleImage is a code-module image of three incompressible layers of
// layerSize bytes each (the real module is ~1 GiB; this keeps 20 nodes
// within a CI machine's disk while every byte still crosses the network).
func moduleImage(t *testing.T, version string, layerSize int) v1.Image {
	t.Helper()
	var layers []v1.Layer
	for i := range 3 {
		data := make([]byte, layerSize)
		if _, err := rand.Read(data); err != nil {
			t.Fatal(err)
		}
		files := map[string]string{fmt.Sprintf("opt/dynatrace/oneagent/agent/lib64/part%d.so", i): string(data)}
		if i == 0 {
			files["opt/dynatrace/oneagent/agent/lib64/liboneagentproc.so"] = "elf " + version
		}
		layers = append(layers, static.NewLayer(ocitest.Gzip(t, ocitest.Tar(t, files)), types.OCILayer))
	}
	return ocitest.Image(t, layers...)
}

// startMirror runs `oneagent-csi mirror` in front of upstream, on plain
// HTTP as inside a cluster, and returns its mirrors entry.
func startMirror(t *testing.T, upstream *registryproc.Registry, secret string) string {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := l.Addr().String()
	_ = l.Close()
	logf, err := os.Create(filepath.Join(t.TempDir(), "mirror.log"))
	if err != nil {
		t.Fatal(err)
	}
	cmd := exec.Command(harness.Binary(t), "mirror", "--upstream", upstream.Host, "--ca-file", upstream.CAFile,
		"--pull-secret-file", secret, "--dir", t.TempDir(), "--listen", addr, "-v", "2")
	cmd.Stdout, cmd.Stderr = logf, logf
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		_ = cmd.Process.Kill()
		_ = cmd.Wait()
		_ = logf.Close()
	})
	harness.Eventually(t, 30*time.Second, "mirror to serve", func() bool {
		resp, err := http.Get("http://" + addr + "/v2/")
		if err == nil {
			resp.Body.Close()
		}
		return err == nil && resp.StatusCode == http.StatusOK
	})
	return "http://" + addr
}

// fleetResult is one fleet run.
type fleetResult struct {
	took []time.Duration // per node, sorted
	last time.Duration   // from the start to the last install
}

// TestFleetInstallsThroughOneMirror: N nodes install a new image at once
// through one pull-through mirror in front of the upstream registry.
// Through `oneagent-csi mirror` the upstream serves each layer exactly
// once; through distribution's proxy mode the count is reported (it
// fetches again for every request that arrives while a fetch runs). The
// time to the last install is reported against one node alone.
func TestFleetInstallsThroughOneMirror(t *testing.T) {
	harness.RequireRoot(t)
	n := nodes(t)
	const layerSize = 8 << 20
	upstream := registryproc.Start(t, registryproc.Options{Users: map[string]string{"puller": "s3cret"}})
	dir := t.TempDir()
	secret := filepath.Join(dir, ".dockerconfigjson")
	registryproc.WritePullSecret(t, secret, upstream.Host, "puller", "s3cret")
	ours := startMirror(t, upstream, secret)
	proxy := registryproc.Start(t, registryproc.Options{Upstream: &registryproc.Upstream{
		URL: "https://" + upstream.Host, Username: "puller", Password: "s3cret", CAFile: upstream.CAFile}})
	// The nodes trust both TLS registries' CAs and hold the upstream's
	// credentials (the mirrors need none).
	caBundle := filepath.Join(dir, "ca.pem")
	var bundle []byte
	for _, f := range []string{upstream.CAFile, proxy.CAFile} {
		b, err := os.ReadFile(f)
		if err != nil {
			t.Fatal(err)
		}
		bundle = append(bundle, b...)
	}
	if err := os.WriteFile(caBundle, bundle, 0o600); err != nil {
		t.Fatal(err)
	}
	tenant := func(tag, mirror string) provisioner.Tenant {
		return provisioner.Tenant{Name: "air", Image: upstream.Host + "/" + ocitest.Repo + ":" + tag, PullSecretFile: secret,
			CAFile: caBundle, Mirrors: []string{mirror}}
	}
	publish := func(e *harness.ProcessEnv, p *harness.NodeProcess, id string) time.Duration {
		target := harness.Target(e.Targets, id)
		start := time.Now()
		if _, err := p.Node.NodePublishVolume(harness.Ctx(t), harness.PublishRequest(id, target, map[string]string{"dynakube": "air"})); err != nil {
			t.Errorf("node %s: %v", id, err)
			return 0
		}
		took := time.Since(start)
		if _, err := os.Stat(filepath.Join(target, "agent/lib64/liboneagentproc.so")); err != nil {
			t.Errorf("node %s: %v", id, err)
		}
		return took
	}
	fleet := func(tag, mirror string) fleetResult {
		envs := make([]*harness.ProcessEnv, n)
		procs := make([]*harness.NodeProcess, n)
		for i := range n {
			envs[i] = harness.NewProcessEnvFor(t, tenant(tag, mirror), false)
			procs[i] = envs[i].Start()
		}
		r := fleetResult{took: make([]time.Duration, n)}
		var wg sync.WaitGroup
		start := time.Now()
		for i := range n {
			wg.Go(func() { r.took[i] = publish(envs[i], procs[i], fmt.Sprintf("%s-%02d", tag, i)) })
		}
		wg.Wait()
		r.last = time.Since(start)
		for _, p := range procs {
			p.Stop(t)
		}
		if t.Failed() {
			t.FailNow()
		}
		sort.Slice(r.took, func(i, j int) bool { return r.took[i] < r.took[j] })
		return r
	}
	layersOf := func(img v1.Image) []string {
		m, err := img.Manifest()
		if err != nil {
			t.Fatal(err)
		}
		var ds []string
		for _, l := range m.Layers {
			ds = append(ds, l.Digest.String())
		}
		return ds
	}

	// One node alone through our mirror, an image of its own.
	upstream.Push(t, "puller", "s3cret", ocitest.Repo, "alone", moduleImage(t, "alone", layerSize))
	aloneEnv := harness.NewProcessEnvFor(t, tenant("alone", ours), false)
	alone := publish(aloneEnv, aloneEnv.Start(), "alone")

	// The fleet through `oneagent-csi mirror`: a new image, all at once.
	img := moduleImage(t, "fleet", layerSize)
	upstream.Push(t, "puller", "s3cret", ocitest.Repo, "fleet", img)
	viaOurs := fleet("fleet", ours)
	served := upstream.BlobsServed()
	for _, d := range layersOf(img) {
		if served[d] != 1 {
			t.Errorf("through oneagent-csi mirror the upstream served layer %s %d times, want once", d, served[d])
		}
	}

	// The same through distribution's proxy mode, for comparison.
	img2 := moduleImage(t, "proxy", layerSize)
	upstream.Push(t, "puller", "s3cret", ocitest.Repo, "proxy", img2)
	viaProxy := fleet("proxy", proxy.Host)
	served = upstream.BlobsServed()
	worst := 0
	for _, d := range layersOf(img2) {
		worst = max(worst, served[d])
	}

	t.Logf("fleet of %d node processes, image of 3 × %d MiB layers (gzip, incompressible), upstream: distribution %s (TLS, htpasswd)", n, layerSize>>20, registryproc.Version)
	t.Logf("| | upstream GETs per layer | first install | median | last install | last vs one node alone |")
	t.Logf("|---|---:|---:|---:|---:|---:|")
	t.Logf("| one node alone (through oneagent-csi mirror) | 1 | %s | | %s | 1× |", alone.Round(time.Millisecond), alone.Round(time.Millisecond))
	for _, row := range []struct {
		name string
		gets int
		r    fleetResult
	}{{"fleet through `oneagent-csi mirror`", 1, viaOurs}, {"fleet through distribution's proxy mode", worst, viaProxy}} {
		t.Logf("| %s | %d | %s | %s | %s | %.2f× |", row.name, row.gets, row.r.took[0].Round(time.Millisecond), row.r.took[n/2].Round(time.Millisecond),
			row.r.last.Round(time.Millisecond), row.r.last.Seconds()/alone.Seconds())
	}
}
