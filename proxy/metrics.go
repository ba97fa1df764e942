package proxy

import (
	"fmt"

	"github.com/prometheus/client_golang/prometheus"
)

// Results of connects_total.
const (
	resultOK       = "ok"       // CONNECT replayed to a broker
	resultRejected = "rejected" // refused by the proxy: bad input, policy, admission
	resultError    = "error"    // the proxy failed: backend dial, socket errors
)

// Reasons of connect_rejects_total.
const (
	reasonNotMQTT         = "not_mqtt"
	reasonMalformed       = "malformed"
	reasonTooLarge        = "too_large"
	reasonTimeout         = "timeout"
	reasonClosedEarly     = "closed_early"
	reasonUnsupported     = "unsupported_protocol"
	reasonClientIDInvalid = "client_id_invalid"
	reasonNoInstance      = "no_instance"
	reasonShardRate       = "shard_rate"
	reasonSourceLimit     = "source_limit"
	reasonDialFailed      = "dial_failed"
	reasonShutdown        = "shutdown"
)

var rejectReasons = []string{
	reasonNotMQTT, reasonMalformed, reasonTooLarge, reasonTimeout,
	reasonClosedEarly, reasonUnsupported, reasonClientIDInvalid,
	reasonNoInstance, reasonShardRate, reasonSourceLimit, reasonDialFailed,
	reasonShutdown,
}

// Directions of bytes_total and packets_total.
const (
	dirUp   = "upstream"   // device → broker
	dirDown = "downstream" // broker → device
)

// Metrics are the proxy's Prometheus metrics (DESIGN.md, "Metrics
// vocabulary"). The event loops count bytes and packets in plain per-loop
// counters and add them here once per tick, so the relay's hot path does no
// atomic operation per read.
type Metrics struct {
	// ConnectionsActive counts relayed connections by shard and instance.
	ConnectionsActive *prometheus.GaugeVec
	// Connects counts finished handshakes by result: ok, rejected, error.
	Connects *prometheus.CounterVec
	// ConnectRejects counts refused or failed handshakes by reason.
	ConnectRejects *prometheus.CounterVec
	// Handoff is the time from accept to the CONNECT replayed to a broker.
	Handoff prometheus.Histogram
	// BackendDial is the time of the TCP connect to a broker.
	BackendDial prometheus.Histogram
	// Bytes counts relayed bytes by direction (upstream: device → broker).
	Bytes *prometheus.CounterVec
	// Packets counts relayed MQTT packets by direction, the CONNECT included.
	Packets *prometheus.CounterVec
	// IdleCloses counts connections closed because the device was silent
	// for longer than its keepalive allows.
	IdleCloses prometheus.Counter
	// InstancesHealthy is set by whoever owns the backend snapshots.
	InstancesHealthy *prometheus.GaugeVec
	// AcceptsShed counts connections accepted and closed at once because
	// the process had no file descriptor left for them (EMFILE/ENFILE).
	AcceptsShed prometheus.Counter
	// RelayBuffers is the number of relay buffers lent to connections whose
	// peer could not take their bytes at once (backpressure); idle
	// connections hold none.
	RelayBuffers prometheus.Gauge
	// DrainRemaining is, per instance being drained, its connections not
	// moved yet; 0 once the drain ended (done, stopped or shut down).
	DrainRemaining *prometheus.GaugeVec
	// Drained counts connections chosen by a drain for a move, by instance.
	Drained *prometheus.CounterVec

	up, down        prometheus.Counter // Bytes by direction, resolved once
	pktUp, pktDown  prometheus.Counter
	connOK, connRej prometheus.Counter
	connErr         prometheus.Counter
	rejects         map[string]prometheus.Counter
}

// NewMetrics creates the proxy's metrics and registers them on reg. A nil reg
// registers nowhere (the metrics still count). Registering the same names
// twice on one registry is an error, not a panic.
func NewMetrics(reg prometheus.Registerer) (*Metrics, error) {
	const ns = "shardgate"
	m := &Metrics{
		ConnectionsActive: prometheus.NewGaugeVec(prometheus.GaugeOpts{
			Namespace: ns, Name: "connections_active",
			Help: "Connections relayed to a broker, by shard and instance.",
		}, []string{"shard", "instance"}),
		Connects: prometheus.NewCounterVec(prometheus.CounterOpts{
			Namespace: ns, Name: "connects_total",
			Help: "Device handshakes by result: ok (handed to a broker), rejected (refused by the proxy), error (the proxy failed).",
		}, []string{"result"}),
		ConnectRejects: prometheus.NewCounterVec(prometheus.CounterOpts{
			Namespace: ns, Name: "connect_rejects_total",
			Help: "Device handshakes that did not reach a broker, by reason.",
		}, []string{"reason"}),
		Handoff: prometheus.NewHistogram(prometheus.HistogramOpts{
			Namespace: ns, Name: "handoff_seconds",
			Help:    "Time from accept to the device's CONNECT replayed to its broker.",
			Buckets: []float64{.0005, .001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10},
		}),
		BackendDial: prometheus.NewHistogram(prometheus.HistogramOpts{
			Namespace: ns, Name: "backend_dial_seconds",
			Help:    "Time of the TCP connect to a broker.",
			Buckets: []float64{.0001, .00025, .0005, .001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5},
		}),
		Bytes: prometheus.NewCounterVec(prometheus.CounterOpts{
			Namespace: ns, Name: "bytes_total",
			Help: "Bytes relayed, by direction: upstream (device to broker) or downstream.",
		}, []string{"direction"}),
		Packets: prometheus.NewCounterVec(prometheus.CounterOpts{
			Namespace: ns, Name: "packets_total",
			Help: "MQTT packets relayed, by direction (counted by framing, not decoded).",
		}, []string{"direction"}),
		IdleCloses: prometheus.NewCounter(prometheus.CounterOpts{
			Namespace: ns, Name: "idle_closes_total",
			Help: "Connections closed because the device was silent beyond its keepalive allowance.",
		}),
		InstancesHealthy: prometheus.NewGaugeVec(prometheus.GaugeOpts{
			Namespace: ns, Name: "instances_healthy",
			Help: "Healthy broker instances by shard.",
		}, []string{"shard"}),
		AcceptsShed: prometheus.NewCounter(prometheus.CounterOpts{
			Namespace: ns, Name: "accepts_shed_total",
			Help: "Connections accepted and closed at once because the process was out of file descriptors.",
		}),
		RelayBuffers: prometheus.NewGauge(prometheus.GaugeOpts{
			Namespace: ns, Name: "relay_buffers",
			Help: "Relay buffers lent to connections under backpressure.",
		}),
		DrainRemaining: prometheus.NewGaugeVec(prometheus.GaugeOpts{
			Namespace: ns, Name: "drain_remaining",
			Help: "Connections of an instance being drained still to be moved; 0 once its drain ended.",
		}, []string{"instance"}),
		Drained: prometheus.NewCounterVec(prometheus.CounterOpts{
			Namespace: ns, Name: "drained_total",
			Help: "Connections moved off an instance that left the healthy set, by instance.",
		}, []string{"instance"}),
	}
	m.up = m.Bytes.WithLabelValues(dirUp)
	m.down = m.Bytes.WithLabelValues(dirDown)
	m.pktUp = m.Packets.WithLabelValues(dirUp)
	m.pktDown = m.Packets.WithLabelValues(dirDown)
	m.connOK = m.Connects.WithLabelValues(resultOK)
	m.connRej = m.Connects.WithLabelValues(resultRejected)
	m.connErr = m.Connects.WithLabelValues(resultError)
	m.rejects = make(map[string]prometheus.Counter, len(rejectReasons))
	for _, r := range rejectReasons {
		m.rejects[r] = m.ConnectRejects.WithLabelValues(r)
	}
	if reg == nil {
		return m, nil
	}
	var registered []prometheus.Collector
	for _, c := range []prometheus.Collector{
		m.ConnectionsActive, m.Connects, m.ConnectRejects, m.Handoff,
		m.BackendDial, m.Bytes, m.Packets, m.IdleCloses, m.InstancesHealthy,
		m.AcceptsShed, m.RelayBuffers, m.DrainRemaining, m.Drained,
	} {
		if err := reg.Register(c); err != nil {
			// All or nothing, so a retry on the same registry can work.
			for _, r := range registered {
				reg.Unregister(r)
			}
			return nil, fmt.Errorf("register proxy metrics: %w", err)
		}
		registered = append(registered, c)
	}
	return m, nil
}

// reject counts a handshake that did not reach a broker.
func (m *Metrics) reject(reason string) {
	m.rejects[reason].Inc()
	if reason == reasonDialFailed {
		m.connErr.Inc()
	} else {
		m.connRej.Inc()
	}
}
