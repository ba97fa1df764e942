package broker

import (
	"strconv"
	"sync/atomic"

	"github.com/prometheus/client_golang/prometheus"
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

func describeNode(ch chan<- *prometheus.Desc) {
	for _, d := range []*prometheus.Desc{
		descBusReceived, descBusSent, descBusRetained, descBusErrors, descRoutes,
		descTakenOver, descSessErrors,
		descClients, descSubscriptions, descRetainedMsgs,
		descMsgsReceived, descMsgsSent, descMsgsDropped,
	} {
		ch <- d
	}
}

// Describe implements prometheus.Collector.
func (e *Embedded) Describe(ch chan<- *prometheus.Desc) { describeNode(ch) }

// Collect implements prometheus.Collector.
func (e *Embedded) Collect(ch chan<- prometheus.Metric) {
	for _, n := range e.nodes {
		collectNode(ch, n)
	}
}

// Describe implements prometheus.Collector. Register an Instance once on
// the registry that serves /metrics.
func (i *Instance) Describe(ch chan<- *prometheus.Desc) {
	describeNode(ch)
	ch <- descSessionsLoaded
}

// Collect implements prometheus.Collector.
func (i *Instance) Collect(ch chan<- prometheus.Metric) {
	collectNode(ch, i.n)
	ch <- prometheus.MustNewConstMetric(descSessionsLoaded, prometheus.CounterValue,
		float64(i.n.sessionsLoaded.Load()), strconv.Itoa(i.n.shard))
}

// collectNode reports one instance's series.
func collectNode(ch chan<- prometheus.Metric, n *node) {
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
	counter(descMsgsReceived, uint64(atomic.LoadInt64(&info.MessagesReceived)))
	counter(descMsgsSent, uint64(atomic.LoadInt64(&info.MessagesSent)))
	counter(descMsgsDropped, uint64(atomic.LoadInt64(&info.MessagesDropped)))
}
