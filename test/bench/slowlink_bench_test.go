package bench

import (
	"net"
	"net/url"
	"os"
	"os/exec"
	"strings"
	"testing"

	"github.com/oneagent-csi/oneagent-csi/test/harness"
)

// BenchmarkInstallOverSlowLink is BenchmarkInstallWhileDownloading's node
// installs with the link, not the CPU, as the limit: what the fake tenants
// and the registry send is shaped on loopback to $ONEAGENT_CSI_BENCH_LINK
// (tc's rate syntax, default 400mbit: 50 MB/s, a node pulling from a
// registry or mirror elsewhere in its network). On this benchmark's
// machines the extraction alone keeps both cores busy, so on a free
// loopback the download's CPU (the registry's TLS, the node's TLS and
// hashes) can only add to it; behind a slower link the download leaves
// CPU free, and an install that overlaps the two takes about the longer of
// them, where one that does them in turn takes their sum.
//
// Every iteration: the ZIP downloaded first then extracted (download
// alone, extraction alone), the ZIP extracted while it downloads, the
// image install, the layer's download alone and its extraction alone (not
// shaped: from the local tar.gz).
func BenchmarkInstallOverSlowLink(b *testing.B) {
	harness.RequireRoot(b)
	if _, err := exec.LookPath("tc"); err != nil {
		b.Skip("tc (iproute2) not installed")
	}
	rate := os.Getenv("ONEAGENT_CSI_BENCH_LINK")
	if rate == "" {
		rate = "400mbit"
	}
	fx := newInstallFixture(b)
	shapeLoopback(b, rate, portOf(b, fx.streamTenant.APIURL), portOf(b, fx.seqTenant.APIURL), portOf(b, "https://"+fx.reg.Host))

	var runs installRuns
	b.ResetTimer()
	for i := 0; i < b.N; i++ {
		runs.run(b, fx)
	}
	b.StopTimer()
	seq, streamed, image, layerDownload, layerExtract := runs.seq, runs.streamed, runs.image, runs.layerDownload, runs.layerExtract
	n := float64(b.N)
	s := func(p float64) float64 { return p / n }
	b.ReportMetric(s(seq.download.Seconds()), "s-download")
	b.ReportMetric(s(seq.extract.Seconds()), "s-extract")
	b.ReportMetric(s(seq.took.Seconds()), "s-download+extract")
	b.ReportMetric(s(streamed.took.Seconds()), "s-streamed")
	b.ReportMetric(streamed.took.Seconds()/max(seq.download, seq.extract).Seconds(), "streamed/max(dl,ex)")
	b.ReportMetric(streamed.took.Seconds()/seq.took.Seconds(), "streamed/(dl+ex)")
	b.ReportMetric(s(image.took.Seconds()), "s-image")
	b.ReportMetric(s(layerDownload.took.Seconds()), "s-image-download")
	b.ReportMetric(s(layerExtract.took.Seconds()), "s-image-extract")
	b.ReportMetric(image.took.Seconds()/max(layerDownload.took, layerExtract.took).Seconds(), "image/max(dl,ex)")
	b.ReportMetric(image.took.Seconds()/(layerDownload.took+layerExtract.took).Seconds(), "image/(dl+ex)")
	b.ReportMetric(float64(streamed.peakRSS)/n/(1<<20), "MiB-rss-streamed")
	b.ReportMetric(float64(image.peakRSS)/n/(1<<20), "MiB-rss-image")
	reportCPU(b, image, layerDownload, layerExtract)
}

// shapeLoopback limits what is sent from the given local ports on the
// loopback interface to rate (an HTB class; everything else on loopback
// goes through an unlimited one) until the benchmark ends. It refuses to
// replace a root qdisc someone else put on lo.
func shapeLoopback(b *testing.B, rate string, ports ...string) {
	b.Helper()
	out, err := exec.Command("tc", "qdisc", "show", "dev", "lo", "root").CombinedOutput()
	if err != nil {
		b.Skipf("tc qdisc show: %v: %s", err, out)
	}
	if !strings.HasPrefix(string(out), "qdisc noqueue") {
		b.Fatalf("lo already has a root qdisc (%s): remove it (tc qdisc del dev lo root) or run elsewhere", strings.TrimSpace(string(out)))
	}
	if out, err := exec.Command("tc", "qdisc", "add", "dev", "lo", "root", "handle", "1:", "htb", "default", "10").CombinedOutput(); err != nil {
		b.Skipf("no HTB qdisc on lo: %v: %s", err, out)
	}
	b.Cleanup(func() {
		if out, err := exec.Command("tc", "qdisc", "del", "dev", "lo", "root").CombinedOutput(); err != nil {
			b.Errorf("removing the shaping from lo: %v: %s", err, out)
		}
	})
	tc(b, "class", "add", "dev", "lo", "parent", "1:", "classid", "1:10", "htb", "rate", "100gbit")
	tc(b, "class", "add", "dev", "lo", "parent", "1:", "classid", "1:20", "htb", "rate", rate)
	for _, port := range ports {
		tc(b, "filter", "add", "dev", "lo", "parent", "1:", "protocol", "ip", "u32", "match", "ip", "sport", port, "0xffff", "flowid", "1:20")
	}
	b.Logf("loopback traffic from ports %v shaped to %s", ports, rate)
}

func tc(b *testing.B, args ...string) {
	b.Helper()
	if out, err := exec.Command("tc", args...).CombinedOutput(); err != nil {
		b.Fatalf("tc %s: %v: %s", strings.Join(args, " "), err, out)
	}
}

// portOf is the port of an https URL.
func portOf(b *testing.B, raw string) string {
	b.Helper()
	u, err := url.Parse(raw)
	if err != nil {
		b.Fatal(err)
	}
	_, port, err := net.SplitHostPort(u.Host)
	if err != nil {
		b.Fatalf("%s: %v", raw, err)
	}
	return port
}
