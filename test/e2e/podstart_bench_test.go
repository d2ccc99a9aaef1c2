package e2e

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io/fs"
	"net/http"
	"os"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/utils/ptr"

	"github.com/oneagent-csi/oneagent-csi/api"
	"github.com/oneagent-csi/oneagent-csi/test/e2e/cluster"
)

// startTimes is how long the pods of one burst took, per pod.
type startTimes struct{ running, output []time.Duration }

// BenchmarkPodStart creates 20 pods at once in a namespace the injector
// wires (module cached on the node) and 20 in one it leaves alone, and
// measures, per pod, the time from its create call to Running (seen by the
// client polling) and to the app's first output line (the container log's
// own timestamp). The baseline is the uninjected burst in the same
// iteration; a third burst of uninjected pods with a trivial init container
// of their own shows what an init container costs by itself, and a fourth
// of injected pods with container-config: driver (no init container, the
// driver serves container.conf) what injection costs without one. The order
// rotates between iterations, and every burst starts on a quiet node: the
// pods of the one before are gone from the API and torn down on the node
// (kubelet removed their pod directories, so their containers are stopped
// and their volumes unmounted). Without that wait, each burst overlapped
// the teardown of the one before it, and with three iterations of four
// bursts the driver burst always followed the init-container burst, the
// heaviest teardown. The node driver's mean NodePublishVolume latency
// during the injected bursts is reported beside them: its share of the
// time to Running.
func BenchmarkPodStart(b *testing.B) {
	if env.skipReason != "" {
		b.Skip(env.skipReason)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Minute)
	defer cancel()
	const pods = 20
	for ns, labels := range map[string]map[string]string{"start-injected": {api.InjectLabel: "true"}, "start-plain": nil, "start-init": nil,
		"start-driver": {api.InjectLabel: "true"}} {
		if err := env.c.EnsureNamespace(ctx, ns, labels); err != nil {
			b.Fatal(err)
		}
	}
	// Warm: the module is installed and the image unpacked before timing.
	spaces := []string{"start-plain", "start-injected", "start-init", "start-driver"}
	for _, ns := range spaces {
		burst(ctx, b, ns, 1)
	}
	times := map[string]*startTimes{}
	for _, ns := range spaces {
		times[ns] = &startTimes{}
	}
	// The node driver's own share: its NodePublishVolume latency (from its
	// histogram) during the bursts of each injected namespace.
	publish := map[string]*publishStat{"start-injected": {}, "start-driver": {}}
	b.ResetTimer()
	for i := 0; i < b.N; i++ {
		for k := range spaces {
			ns := spaces[(k+i)%len(spaces)]
			before := publishSeconds(b)
			r := burst(ctx, b, ns, pods)
			if ps := publish[ns]; ps != nil {
				after := publishSeconds(b)
				ps.sum, ps.count = ps.sum+after.sum-before.sum, ps.count+after.count-before.count
			}
			t := times[ns]
			t.running, t.output = append(t.running, r.running...), append(t.output, r.output...)
		}
	}
	b.StopTimer()
	injected, plain, withInit, driver := *times["start-injected"], *times["start-plain"], *times["start-init"], *times["start-driver"]
	ms := func(d time.Duration) float64 { return float64(d.Microseconds()) / 1000 }
	b.ReportMetric(ms(mean(plain.running)), "ms-running-plain")
	b.ReportMetric(ms(mean(injected.running)), "ms-running-injected")
	b.ReportMetric(mean(injected.running).Seconds()/mean(plain.running).Seconds(), "running-injected/plain")
	b.ReportMetric(ms(pct(injected.running, 95)), "ms-running-injected-p95")
	b.ReportMetric(ms(mean(plain.output)), "ms-output-plain")
	b.ReportMetric(ms(mean(injected.output)), "ms-output-injected")
	b.ReportMetric(mean(injected.output).Seconds()/mean(plain.output).Seconds(), "output-injected/plain")
	b.ReportMetric(ms(mean(withInit.running)), "ms-running-own-init")
	b.ReportMetric(mean(withInit.running).Seconds()/mean(plain.running).Seconds(), "running-own-init/plain")
	b.ReportMetric(ms(mean(driver.running)), "ms-running-driver-conf")
	b.ReportMetric(mean(driver.running).Seconds()/mean(plain.running).Seconds(), "running-driver-conf/plain")
	b.ReportMetric(ms(pct(driver.running, 95)), "ms-running-driver-conf-p95")
	b.ReportMetric(ms(mean(driver.output)), "ms-output-driver-conf")
	b.ReportMetric(mean(driver.output).Seconds()/mean(plain.output).Seconds(), "output-driver-conf/plain")
	b.ReportMetric(publish["start-injected"].meanMillis(), "ms-node-publish-injected")
	b.ReportMetric(publish["start-driver"].meanMillis(), "ms-node-publish-driver-conf")
}

// publishStat is the node driver's NodePublishVolume histogram's sum and
// count (every mode and code).
type publishStat struct{ sum, count float64 }

func (p *publishStat) meanMillis() float64 {
	if p.count == 0 {
		return 0
	}
	return 1000 * p.sum / p.count
}

// publishSeconds reads the node's publish latency histogram totals.
func publishSeconds(b *testing.B) publishStat {
	b.Helper()
	resp, err := http.Get("http://" + env.httpAddr + "/metrics")
	if err != nil {
		b.Fatal(err)
	}
	defer resp.Body.Close()
	var st publishStat
	sc := bufio.NewScanner(resp.Body)
	for sc.Scan() {
		line := sc.Text()
		if !strings.Contains(line, `operation="publish"`) {
			continue
		}
		fields := strings.Fields(line)
		v, err := strconv.ParseFloat(fields[len(fields)-1], 64)
		if err != nil {
			continue
		}
		switch {
		case strings.HasPrefix(line, "oneagent_csi_operation_duration_seconds_sum{"):
			st.sum += v
		case strings.HasPrefix(line, "oneagent_csi_operation_duration_seconds_count{"):
			st.count += v
		}
	}
	if err := sc.Err(); err != nil {
		b.Fatal(err)
	}
	return st
}

// burst creates n app pods in ns at once, waits until all run and have
// written their first line, returns the times and deletes the pods.
func burst(ctx context.Context, b *testing.B, ns string, n int) startTimes {
	b.Helper()
	created := make([]time.Time, n)
	names := make([]string, n)
	uids := make([]string, n)
	var wg sync.WaitGroup
	errs := make(chan error, n)
	for i := range n {
		wg.Add(1)
		go func() {
			defer wg.Done()
			var ann map[string]string
			if ns == "start-driver" {
				ann = map[string]string{"oneagent.dynatrace.com/container-config": "driver"}
			}
			p := appPod(ns, ann)
			if ns == "start-init" {
				p.Spec.InitContainers = []corev1.Container{{Name: "prepare", Image: cluster.AppImage, ImagePullPolicy: corev1.PullNever,
					Command: []string{"/bin/sh", "-c", "true"}}}
			}
			created[i] = time.Now()
			got, err := env.c.Client.CoreV1().Pods(ns).Create(ctx, p, metav1.CreateOptions{})
			if err != nil {
				errs <- err
				return
			}
			names[i], uids[i] = got.Name, string(got.UID)
		}()
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		b.Fatal(err)
	}
	index := map[string]int{}
	for i, name := range names {
		index[name] = i
	}
	r := startTimes{running: make([]time.Duration, n)}
	seen := 0
	if err := cluster.Poll(ctx, 5*time.Minute, fmt.Sprintf("%d pods in %s running", n, ns), func() bool {
		list, err := env.c.Client.CoreV1().Pods(ns).List(ctx, metav1.ListOptions{})
		if err != nil {
			return false
		}
		now := time.Now()
		for _, p := range list.Items {
			i, ok := index[p.Name]
			if ok && p.Status.Phase == corev1.PodRunning && r.running[i] == 0 {
				r.running[i] = now.Sub(created[i])
				seen++
			}
		}
		return seen == n
	}); err != nil {
		b.Fatal(err)
	}
	for i, name := range names {
		var first time.Time
		if err := cluster.Poll(ctx, time.Minute, "first output of "+name, func() bool {
			raw, err := env.c.Client.CoreV1().Pods(ns).GetLogs(name, &corev1.PodLogOptions{Container: "shop", Timestamps: true}).DoRaw(ctx)
			if err != nil {
				return false
			}
			sc := bufio.NewScanner(strings.NewReader(string(raw)))
			if !sc.Scan() {
				return false
			}
			ts, _, _ := strings.Cut(sc.Text(), " ")
			first, err = time.Parse(time.RFC3339Nano, ts)
			return err == nil
		}); err != nil {
			b.Fatal(err)
		}
		r.output = append(r.output, first.Sub(created[i]))
	}
	if err := env.c.Client.CoreV1().Pods(ns).DeleteCollection(ctx, metav1.DeleteOptions{GracePeriodSeconds: ptr.To[int64](0)}, metav1.ListOptions{}); err != nil {
		b.Fatal(err)
	}
	if err := cluster.Poll(ctx, 2*time.Minute, "pods of "+ns+" gone", func() bool {
		list, err := env.c.Client.CoreV1().Pods(ns).List(ctx, metav1.ListOptions{})
		return err == nil && len(list.Items) == 0
	}); err != nil {
		b.Fatal(err)
	}
	if err := cluster.Poll(ctx, 2*time.Minute, "pods of "+ns+" torn down on the node", func() bool {
		for _, uid := range uids {
			if _, err := os.Stat(filepath.Join(env.c.KubeletRoot, "pods", uid)); !errors.Is(err, fs.ErrNotExist) {
				return false
			}
		}
		return true
	}); err != nil {
		b.Fatal(err)
	}
	return r
}

func mean(ds []time.Duration) time.Duration {
	if len(ds) == 0 {
		return 0
	}
	var sum time.Duration
	for _, d := range ds {
		sum += d
	}
	return sum / time.Duration(len(ds))
}

func pct(ds []time.Duration, p int) time.Duration {
	if len(ds) == 0 {
		return 0
	}
	s := append([]time.Duration(nil), ds...)
	sort.Slice(s, func(i, j int) bool { return s[i] < s[j] })
	return s[min(len(s)-1, len(s)*p/100)]
}
