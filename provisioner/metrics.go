package provisioner

import "github.com/prometheus/client_golang/prometheus"

type metrics struct {
	downloads       *prometheus.CounterVec
	imagePulls      *prometheus.CounterVec
	downloadBytes   prometheus.Counter
	downloadSeconds prometheus.Histogram
	gcDeletions     *prometheus.CounterVec
	gcFreed         prometheus.Counter
	gcOverrun       prometheus.Gauge
	refreshes       *prometheus.CounterVec
}

func newMetrics(reg prometheus.Registerer) *metrics {
	m := &metrics{
		imagePulls: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "oneagent_csi_image_pulls_total",
			Help: "Code-module image pulls by result (ok, unauthorized, not_found, bad_archive, timeout, unavailable, other).",
		}, []string{"result"}),
		downloads: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "oneagent_csi_downloads_total",
			Help: "Code module install attempts by result (ok, unauthorized, not_found, bad_archive, timeout, unavailable, other).",
		}, []string{"result"}),
		downloadBytes: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "oneagent_csi_download_bytes_total",
			Help: "Bytes of code module archives downloaded.",
		}),
		downloadSeconds: prometheus.NewHistogram(prometheus.HistogramOpts{
			Name:    "oneagent_csi_install_duration_seconds",
			Help:    "Wall time of successful code module installs (download and extraction).",
			Buckets: prometheus.ExponentialBuckets(0.25, 2, 14),
		}),
	}
	m.gcDeletions = prometheus.NewCounterVec(prometheus.CounterOpts{
		Name: "oneagent_csi_gc_deletions_total",
		Help: "Things cache GC deleted, by kind (artifact, layer, volume) and reason.",
	}, []string{"kind", "reason"})
	m.gcFreed = prometheus.NewCounter(prometheus.CounterOpts{
		Name: "oneagent_csi_gc_freed_bytes_total",
		Help: "Bytes of artifacts cache GC deleted.",
	})
	m.gcOverrun = prometheus.NewGauge(prometheus.GaugeOpts{
		Name: "oneagent_csi_cache_budget_overrun_bytes",
		Help: "How far the cache stayed over cache.maxBytes after the last GC pass, because the rest is in use or current.",
	})
	m.refreshes = prometheus.NewCounterVec(prometheus.CounterOpts{
		Name: "oneagent_csi_tenant_refreshes_total",
		Help: "Background refreshes of what the tenant says (kind: latest, config) by result (ok, failed); failed ones back off.",
	}, []string{"kind", "result"})
	if reg != nil {
		reg.MustRegister(m.downloads, m.imagePulls, m.downloadBytes, m.downloadSeconds, m.gcDeletions, m.gcFreed, m.gcOverrun, m.refreshes)
	}
	return m
}

func (m *metrics) observeGC(r GCReport) {
	if r.DryRun {
		return
	}
	for _, d := range r.Deleted {
		m.gcDeletions.WithLabelValues(d.Kind, d.Reason).Inc()
	}
	m.gcFreed.Add(float64(r.FreedBytes))
	m.gcOverrun.Set(float64(r.OverrunBytes))
}
