package driver

import "github.com/prometheus/client_golang/prometheus"

type metrics struct {
	ops      *prometheus.HistogramVec
	failOpen *prometheus.CounterVec
	inFlight *prometheus.GaugeVec
}

func newMetrics(reg prometheus.Registerer) *metrics {
	m := &metrics{
		ops: prometheus.NewHistogramVec(prometheus.HistogramOpts{
			Name:    "oneagent_csi_operation_duration_seconds",
			Help:    "Latency of NodePublishVolume and NodeUnpublishVolume by operation, mode and gRPC code.",
			Buckets: []float64{.0005, .001, .002, .005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10, 30},
		}, []string{"operation", "mode", "code"}),
		failOpen: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "oneagent_csi_fail_open_total",
			Help: "Volumes published as an empty directory (the pod starts without the agent), by reason: retry_timeout, invalid_attributes, unknown_tenant, version_not_found, refused_by_policy.",
		}, []string{"reason"}),
		inFlight: prometheus.NewGaugeVec(prometheus.GaugeOpts{
			Name: "oneagent_csi_operations_in_flight",
			Help: "CSI node operations currently running.",
		}, []string{"operation"}),
	}
	if reg != nil {
		reg.MustRegister(m.ops, m.failOpen, m.inFlight)
	}
	return m
}
