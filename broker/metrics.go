package broker

import (
	"context"
	"errors"
	"strconv"
	"sync/atomic"
	"time"

	mqtt "github.com/mochi-mqtt/server/v2"
	"github.com/mochi-mqtt/server/v2/packets"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/redis/go-redis/v9"
)

// Metrics of the embedded fleet (one series per shard) and of a broker
// instance. Embedded and Instance are prometheus.Collectors: register one
// once on the registry that serves /metrics (they register nothing by
// themselves, so two in one process cannot collide).
var (
	descBusReceived = prometheus.NewDesc("shardgate_broker_bus_received_total",
		"Messages the cross-shard bus delivered into the shard (one per message, however many local subscribers match).", []string{"shard"}, nil)
	descBusSent = prometheus.NewDesc("shardgate_broker_bus_sent_total",
		"Messages published on the shard (by devices, or as wills) handed to the cross-shard bus.", []string{"shard"}, nil)
	descBusRetained = prometheus.NewDesc("shardgate_broker_bus_retained_total",
		"Retained messages published on another shard and stored on this one without a delivery.", []string{"shard"}, nil)
	descBusErrors = prometheus.NewDesc("shardgate_broker_bus_errors_total",
		"Failed cross-shard bus operations (forwarding a publish, announcing or withdrawing a route).", []string{"shard"}, nil)
	descTakenOver = prometheus.NewDesc("shardgate_broker_sessions_taken_over_total",
		"Sessions the shard ended because the client id connected to another shard.", []string{"shard"}, nil)
	descSessErrors = prometheus.NewDesc("shardgate_broker_session_store_errors_total",
		"Failed session store operations (claiming or releasing a session).", []string{"shard"}, nil)
	descRoutes = prometheus.NewDesc("shardgate_broker_routes",
		"Topic filters with at least one subscription on the shard, as announced to the bus.", []string{"shard"}, nil)
	descClients = prometheus.NewDesc("shardgate_broker_clients_connected",
		"Clients connected to the shard.", []string{"shard"}, nil)
	descSubscriptions = prometheus.NewDesc("shardgate_broker_subscriptions",
		"Subscriptions held by the shard's sessions.", []string{"shard"}, nil)
	descRetainedMsgs = prometheus.NewDesc("shardgate_broker_retained_messages",
		"Retained messages stored on the shard.", []string{"shard"}, nil)
	descMsgsReceived = prometheus.NewDesc("shardgate_broker_messages_received_total",
		"PUBLISH packets the shard received, bus deliveries included.", []string{"shard"}, nil)
	descMsgsSent = prometheus.NewDesc("shardgate_broker_messages_sent_total",
		"PUBLISH packets the shard sent to clients.", []string{"shard"}, nil)
	descMsgsDropped = prometheus.NewDesc("shardgate_broker_messages_dropped_total",
		"Messages dropped because a client's write queue was full.", []string{"shard"}, nil)
)

var (
	_ prometheus.Collector = (*Embedded)(nil)
	_ prometheus.Collector = (*Instance)(nil)
)

var descSessionsLoaded = prometheus.NewDesc("shardgate_broker_sessions_loaded_total",
	"Sessions loaded from Redis when their device connected to the shard (held before by another instance, or by this one before a restart).", []string{"shard"}, nil)

// describeNode describes collectNode's series; byQoS leaves out the
// per-shard message totals, which an Instance reports by QoS instead.
func describeNode(ch chan<- *prometheus.Desc, byQoS bool) {
	for _, d := range []*prometheus.Desc{
		descBusReceived, descBusSent, descBusRetained, descBusErrors, descRoutes,
		descTakenOver, descSessErrors,
		descClients, descSubscriptions, descRetainedMsgs, descMsgsDropped,
	} {
		ch <- d
	}
	if !byQoS {
		ch <- descMsgsReceived
		ch <- descMsgsSent
	}
}

// Describe implements prometheus.Collector.
func (e *Embedded) Describe(ch chan<- *prometheus.Desc) { describeNode(ch, false) }

// Collect implements prometheus.Collector.
func (e *Embedded) Collect(ch chan<- prometheus.Metric) {
	for _, n := range e.nodes {
		collectNode(ch, n, false)
	}
}

// Describe implements prometheus.Collector. Register an Instance once on
// the registry that serves /metrics.
func (i *Instance) Describe(ch chan<- *prometheus.Desc) {
	describeNode(ch, true)
	for _, d := range []*prometheus.Desc{
		descSessionsLoaded, descSessions, descMsgsReceivedQoS, descMsgsSentQoS,
		descCrossShard, descRedisUp, descRedisErrors, descRedisLatency,
	} {
		ch <- d
	}
}

// Collect implements prometheus.Collector.
func (i *Instance) Collect(ch chan<- prometheus.Metric) {
	shard := strconv.Itoa(i.n.shard)
	collectNode(ch, i.n, true)
	ch <- prometheus.MustNewConstMetric(descSessionsLoaded, prometheus.CounterValue,
		float64(i.n.sessionsLoaded.Load()), shard)
	sessions := 0
	for _, cl := range i.n.srv.Clients.GetAll() {
		if !cl.Net.Inline { // the engine's inline client is no session
			sessions++
		}
	}
	ch <- prometheus.MustNewConstMetric(descSessions, prometheus.GaugeValue, float64(sessions), shard)
	for q := range 3 {
		qos := strconv.Itoa(q)
		ch <- prometheus.MustNewConstMetric(descMsgsReceivedQoS, prometheus.CounterValue,
			float64(i.stats.qos.received[q].Load()), shard, qos)
		ch <- prometheus.MustNewConstMetric(descMsgsSentQoS, prometheus.CounterValue,
			float64(i.stats.qos.sent[q].Load()), shard, qos)
	}
	ch <- prometheus.MustNewConstMetric(descCrossShard, prometheus.CounterValue,
		float64(i.n.received.Load()), shard, "in")
	ch <- prometheus.MustNewConstMetric(descCrossShard, prometheus.CounterValue,
		float64(i.n.sent.Load()), shard, "out")
	up := 1.0
	if i.redisErr.Load() != nil {
		up = 0
	}
	ch <- prometheus.MustNewConstMetric(descRedisUp, prometheus.GaugeValue, up, shard)
	ch <- prometheus.MustNewConstMetric(descRedisErrors, prometheus.CounterValue,
		float64(i.stats.errors.Load()), shard)
	i.stats.collectLatency(ch, shard)
}

// collectNode reports one instance's series.
func collectNode(ch chan<- prometheus.Metric, n *node, byQoS bool) {
	shard := strconv.Itoa(n.shard)
	counter := func(d *prometheus.Desc, v uint64) {
		ch <- prometheus.MustNewConstMetric(d, prometheus.CounterValue, float64(v), shard)
	}
	gauge := func(d *prometheus.Desc, v int64) {
		ch <- prometheus.MustNewConstMetric(d, prometheus.GaugeValue, float64(v), shard)
	}
	info := n.srv.Info
	counter(descBusReceived, n.received.Load())
	counter(descBusSent, n.sent.Load())
	counter(descBusRetained, n.retained.Load())
	counter(descBusErrors, n.busErrs.Load())
	gauge(descRoutes, int64(n.routeCount()))
	counter(descTakenOver, n.takenOver.Load())
	counter(descSessErrors, n.sessErrs.Load())
	gauge(descClients, atomic.LoadInt64(&info.ClientsConnected))
	gauge(descSubscriptions, atomic.LoadInt64(&info.Subscriptions))
	gauge(descRetainedMsgs, atomic.LoadInt64(&info.Retained))
	if !byQoS {
		counter(descMsgsReceived, uint64(atomic.LoadInt64(&info.MessagesReceived)))
		counter(descMsgsSent, uint64(atomic.LoadInt64(&info.MessagesSent)))
	}
	counter(descMsgsDropped, uint64(atomic.LoadInt64(&info.MessagesDropped)))
}

// Series of a networked Instance only.
var (
	descSessions = prometheus.NewDesc("shardgate_broker_sessions",
		"Sessions the instance holds in memory, connected or not (persistent sessions of disconnected devices included).", []string{"shard"}, nil)
	descMsgsReceivedQoS = prometheus.NewDesc("shardgate_broker_messages_received_total",
		"PUBLISH packets the instance received from its clients, by QoS (cross-shard deliveries are in shardgate_broker_cross_shard_messages_total).", []string{"shard", "qos"}, nil)
	descMsgsSentQoS = prometheus.NewDesc("shardgate_broker_messages_sent_total",
		"PUBLISH packets the instance sent to its clients, by QoS (resends included).", []string{"shard", "qos"}, nil)
	descCrossShard = prometheus.NewDesc("shardgate_broker_cross_shard_messages_total",
		"Cross-shard messages: direction in = delivered into the instance by the bus (once per message), out = published here and handed to the bus.", []string{"shard", "direction"}, nil)
	descRedisUp = prometheus.NewDesc("shardgate_broker_redis_up",
		"1 while Redis answers the instance's heartbeat PING, 0 while it fails (see /readyz).", []string{"shard"}, nil)
	descRedisErrors = prometheus.NewDesc("shardgate_broker_redis_errors_total",
		"Redis commands and pipelines of the instance that failed (timeouts and connection errors included; a missing key is no error).", []string{"shard"}, nil)
	descRedisLatency = prometheus.NewDesc("shardgate_broker_redis_latency_seconds",
		"Time of the instance's Redis commands and pipelines, failed ones included.", []string{"shard"}, nil)
)

// redisLatencyBuckets spans a loopback round trip (~100 µs) to the 1 s
// default timeout.
var redisLatencyBuckets = []float64{.0001, .00025, .0005, .001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5}

// redisStats is a go-redis hook that times every command and pipeline of
// the instance's client and counts the failures. Lock-free: it runs on
// the engine's paths.
type redisStats struct {
	// down is set while the instance's watch finds Redis failing: calls
	// then fail at once with errRedisDown instead of each spending its
	// retries and timeout on the engine's paths (a device's QoS 1 publish
	// waits for its session write). The watch's own probe still goes
	// through, and clears it.
	down    atomic.Bool
	errors  atomic.Uint64
	buckets []atomic.Uint64 // cumulative counts are built at collection
	count   atomic.Uint64
	sumNs   atomic.Uint64
	qos     *metricsHook
}

var _ redis.Hook = (*redisStats)(nil)

func newRedisStats() *redisStats {
	return &redisStats{buckets: make([]atomic.Uint64, len(redisLatencyBuckets))}
}

func (s *redisStats) observe(d time.Duration, err error) {
	if err != nil && !errors.Is(err, redis.Nil) {
		s.errors.Add(1)
	}
	sec := d.Seconds()
	for b, le := range redisLatencyBuckets {
		if sec <= le {
			s.buckets[b].Add(1)
			break
		}
	}
	s.count.Add(1)
	s.sumNs.Add(uint64(d))
}

// DialHook implements redis.Hook.
func (s *redisStats) DialHook(next redis.DialHook) redis.DialHook { return next }

// ProcessHook implements redis.Hook.
func (s *redisStats) ProcessHook(next redis.ProcessHook) redis.ProcessHook {
	return func(ctx context.Context, cmd redis.Cmder) error {
		if s.down.Load() && ctx.Value(probeKey{}) == nil {
			cmd.SetErr(errRedisDown)
			s.errors.Add(1)
			return errRedisDown
		}
		start := time.Now()
		err := next(ctx, cmd)
		s.observe(time.Since(start), err)
		return err
	}
}

// ProcessPipelineHook implements redis.Hook.
func (s *redisStats) ProcessPipelineHook(next redis.ProcessPipelineHook) redis.ProcessPipelineHook {
	return func(ctx context.Context, cmds []redis.Cmder) error {
		if s.down.Load() && ctx.Value(probeKey{}) == nil {
			for _, c := range cmds {
				c.SetErr(errRedisDown)
			}
			s.errors.Add(1)
			return errRedisDown
		}
		start := time.Now()
		err := next(ctx, cmds)
		s.observe(time.Since(start), err)
		return err
	}
}

// errRedisDown fails a Redis call made while the instance's watch finds
// Redis failing.
var errRedisDown = errors.New("broker: redis is failing (instance heartbeat); call not attempted")

// probeKey marks the watch's probe, which goes through while Redis is down.
type probeKey struct{}

func withProbe(ctx context.Context) context.Context {
	return context.WithValue(ctx, probeKey{}, true)
}

func (s *redisStats) collectLatency(ch chan<- prometheus.Metric, shard string) {
	cum := make(map[float64]uint64, len(redisLatencyBuckets))
	var acc uint64
	for b, le := range redisLatencyBuckets {
		acc += s.buckets[b].Load()
		cum[le] = acc
	}
	// count is read last so that it is never below the buckets' total.
	count := max(s.count.Load(), acc)
	ch <- prometheus.MustNewConstHistogram(descRedisLatency, count,
		time.Duration(s.sumNs.Load()).Seconds(), cum, shard)
}

// metricsHook counts the PUBLISH packets an instance's clients send and
// receive, by QoS.
type metricsHook struct {
	mqtt.HookBase
	received [3]atomic.Uint64
	sent     [3]atomic.Uint64
}

// ID implements mqtt.Hook.
func (h *metricsHook) ID() string { return "shardgate-metrics" }

// Provides implements mqtt.Hook.
func (h *metricsHook) Provides(b byte) bool {
	return b == mqtt.OnPacketRead || b == mqtt.OnPacketSent
}

// OnPacketRead implements mqtt.Hook.
func (h *metricsHook) OnPacketRead(cl *mqtt.Client, pk packets.Packet) (packets.Packet, error) {
	if pk.FixedHeader.Type == packets.Publish && pk.FixedHeader.Qos < 3 {
		h.received[pk.FixedHeader.Qos].Add(1)
	}
	return pk, nil
}

// OnPacketSent implements mqtt.Hook.
func (h *metricsHook) OnPacketSent(cl *mqtt.Client, pk packets.Packet, b []byte) {
	if pk.FixedHeader.Type == packets.Publish && pk.FixedHeader.Qos < 3 && !cl.Net.Inline {
		h.sent[pk.FixedHeader.Qos].Add(1)
	}
}
