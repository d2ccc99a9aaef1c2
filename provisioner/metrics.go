package provisioner

import "github.com/prometheus/client_golang/prometheus"

type metrics struct {
	downloads       *prometheus.CounterVec
	downloadBytes   prometheus.Counter
	downloadSeconds prometheus.Histogram
}

func newMetrics(reg prometheus.Registerer) *metrics {
	m := &metrics{
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
	if reg != nil {
		reg.MustRegister(m.downloads, m.downloadBytes, m.downloadSeconds)
	}
	return m
}
