package driver

import (
	"github.com/prometheus/client_golang/prometheus"
	"k8s.io/klog/v2"

	"github.com/oneagent-csi/oneagent-csi/api"
	"github.com/oneagent-csi/oneagent-csi/storage"
)

var (
	cacheBytesDesc = prometheus.NewDesc("oneagent_csi_cache_bytes",
		"Bytes of extracted code modules in the cache.", nil, nil)
	cacheArtifactsDesc = prometheus.NewDesc("oneagent_csi_cache_artifacts",
		"Cached code modules by state.", []string{"state"}, nil)
	volumesDesc = prometheus.NewDesc("oneagent_csi_volumes",
		"Volume records by mode and state (pending, published, failedOpen).", []string{"mode", "state"}, nil)
)

// cacheCollector reads the index at scrape time, so the numbers are never
// stale and nothing has to keep counters in step with the index.
type cacheCollector struct{ idx *storage.Index }

// NewCacheCollector exports cache size and volume counts from the index.
func NewCacheCollector(idx *storage.Index) prometheus.Collector { return cacheCollector{idx} }

func (c cacheCollector) Describe(ch chan<- *prometheus.Desc) {
	ch <- cacheBytesDesc
	ch <- cacheArtifactsDesc
	ch <- volumesDesc
}

func (c cacheCollector) Collect(ch chan<- prometheus.Metric) {
	arts, err := c.idx.ListArtifacts()
	if err != nil {
		klog.ErrorS(err, "metrics: cannot list artifacts")
		return
	}
	var total int64
	byState := map[string]int{string(storage.ArtifactReady): 0}
	for _, a := range arts {
		total += a.Size
		byState[string(a.State)]++
	}
	ch <- prometheus.MustNewConstMetric(cacheBytesDesc, prometheus.GaugeValue, float64(total))
	for s, n := range byState {
		ch <- prometheus.MustNewConstMetric(cacheArtifactsDesc, prometheus.GaugeValue, float64(n), s)
	}
	vols, err := c.idx.ListVolumes()
	if err != nil {
		klog.ErrorS(err, "metrics: cannot list volumes")
		return
	}
	type key struct{ mode, state string }
	counts := map[key]int{}
	// Every known series, zero included, so that dashboards see 0, not nothing.
	for _, m := range []api.Mode{api.ModeApp, api.ModeHost} {
		for _, st := range []storage.VolumeState{storage.VolumePending, storage.VolumePublished, storage.VolumeFailedOpen} {
			counts[key{string(m), string(st)}] = 0
		}
	}
	for _, v := range vols {
		counts[key{string(v.Mode), string(v.State)}]++
	}
	for k, n := range counts {
		ch <- prometheus.MustNewConstMetric(volumesDesc, prometheus.GaugeValue, float64(n), k.mode, k.state)
	}
}
