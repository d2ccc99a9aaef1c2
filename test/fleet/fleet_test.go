// Package fleet runs many real `oneagent-csi node` processes on this
// machine behind one pull-through registry (distribution in proxy mode) in
// front of one upstream registry, as a cluster with an in-cluster mirror
// does, and measures what a new code-module image costs the upstream and
// how long the last node takes. Run with `make fleet`.
package fleet

import (
	"crypto/rand"
	"crypto/x509"
	"encoding/base64"
	"fmt"
	"net/http"
	"os"
	"path/filepath"
	"sort"
	"strconv"
	"sync"
	"testing"
	"time"

	"github.com/google/go-containerregistry/pkg/authn"
	"github.com/google/go-containerregistry/pkg/name"
	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/remote"
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

func push(t *testing.T, reg *registryproc.Registry, user, pass, tag string, img v1.Image) {
	t.Helper()
	ca, err := os.ReadFile(reg.CAFile)
	if err != nil {
		t.Fatal(err)
	}
	pool := x509.NewCertPool()
	pool.AppendCertsFromPEM(ca)
	tr := http.DefaultTransport.(*http.Transport).Clone()
	tr.TLSClientConfig.RootCAs = pool
	ref, err := name.NewTag(reg.Host + "/" + ocitest.Repo + ":" + tag)
	if err != nil {
		t.Fatal(err)
	}
	if err := remote.Write(ref, img, remote.WithTransport(tr), remote.WithAuth(&authn.Basic{Username: user, Password: pass})); err != nil {
		t.Fatal(err)
	}
}

// TestFleetInstallsThroughOneMirror: N nodes install a new image at once
// through the mirror; every node installs, and the upstream's request log
// says how often it served each layer. The time to the last install is
// reported against one node alone installing an image of the same size.
func TestFleetInstallsThroughOneMirror(t *testing.T) {
	harness.RequireRoot(t)
	n := nodes(t)
	const layerSize = 8 << 20
	upstream := registryproc.Start(t, registryproc.Options{Users: map[string]string{"puller": "s3cret"}})
	mirror := registryproc.Start(t, registryproc.Options{Upstream: &registryproc.Upstream{
		URL: "https://" + upstream.Host, Username: "puller", Password: "s3cret", CAFile: upstream.CAFile}})

	// The nodes trust both registries' CAs and hold the upstream's
	// credentials (the mirror needs none).
	dir := t.TempDir()
	caBundle := filepath.Join(dir, "ca.pem")
	var bundle []byte
	for _, f := range []string{upstream.CAFile, mirror.CAFile} {
		b, err := os.ReadFile(f)
		if err != nil {
			t.Fatal(err)
		}
		bundle = append(bundle, b...)
	}
	if err := os.WriteFile(caBundle, bundle, 0o600); err != nil {
		t.Fatal(err)
	}
	secret := filepath.Join(dir, ".dockerconfigjson")
	auth := base64.StdEncoding.EncodeToString([]byte("puller:s3cret"))
	if err := os.WriteFile(secret, fmt.Appendf(nil, `{"auths":{%q:{"auth":%q}}}`, upstream.Host, auth), 0o600); err != nil {
		t.Fatal(err)
	}
	tenant := func(tag string) provisioner.Tenant {
		return provisioner.Tenant{Name: "air", Image: upstream.Host + "/" + ocitest.Repo + ":" + tag, PullSecretFile: secret,
			CAFile: caBundle, Mirrors: []string{mirror.Host}}
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

	// One node alone, its own image of the same size.
	push(t, upstream, "puller", "s3cret", "alone", moduleImage(t, "alone", layerSize))
	aloneEnv := harness.NewProcessEnvFor(t, tenant("alone"), false)
	alone := publish(aloneEnv, aloneEnv.Start(), "alone")

	// The fleet: N nodes, a new image, all at once.
	img := moduleImage(t, "fleet", layerSize)
	push(t, upstream, "puller", "s3cret", "fleet", img)
	envs := make([]*harness.ProcessEnv, n)
	procs := make([]*harness.NodeProcess, n)
	for i := range n {
		envs[i] = harness.NewProcessEnvFor(t, tenant("fleet"), false)
		procs[i] = envs[i].Start()
	}
	took := make([]time.Duration, n)
	var wg sync.WaitGroup
	start := time.Now()
	for i := range n {
		wg.Go(func() { took[i] = publish(envs[i], procs[i], fmt.Sprintf("node-%02d", i)) })
	}
	wg.Wait()
	last := time.Since(start)
	if t.Failed() {
		t.FailNow()
	}

	m, err := img.Manifest()
	if err != nil {
		t.Fatal(err)
	}
	upstreamServed, mirrorServed := upstream.BlobsServed(), mirror.BlobsServed()
	worst := 0
	for _, l := range m.Layers {
		d := l.Digest.String()
		if upstreamServed[d] < 1 || mirrorServed[d] != n {
			t.Errorf("layer %s: upstream served %d, mirror %d; want the mirror to serve all %d nodes", d, upstreamServed[d], mirrorServed[d], n)
		}
		worst = max(worst, upstreamServed[d])
	}
	sort.Slice(took, func(i, j int) bool { return took[i] < took[j] })
	t.Logf("fleet of %d nodes, image of 3 × %d MiB layers, through one pull-through mirror", n, layerSize>>20)
	t.Logf("| | time | vs one node alone |")
	t.Logf("|---|---:|---:|")
	t.Logf("| one node alone | %s | 1× |", alone.Round(time.Millisecond))
	t.Logf("| fleet: first install | %s | %.2f× |", took[0].Round(time.Millisecond), took[0].Seconds()/alone.Seconds())
	t.Logf("| fleet: median install | %s | %.2f× |", took[n/2].Round(time.Millisecond), took[n/2].Seconds()/alone.Seconds())
	t.Logf("| fleet: last install | %s | %.2f× |", last.Round(time.Millisecond), last.Seconds()/alone.Seconds())
	t.Logf("upstream GETs per layer: at most %d (for %d nodes)", worst, n)
	if worst != 1 {
		// distribution's proxy mode caches a blob once the first fetch
		// completes; requests that arrive while it is in flight are
		// fetched from upstream again (registry/proxy/proxyblobstore.go).
		t.Logf("note: the mirror fetched some layers %d times from upstream: concurrent first requests are not coalesced by distribution's proxy", worst)
	}
}
