package health

import "github.com/prometheus/client_golang/prometheus"

var (
	consulStateDesc = prometheus.NewDesc("shardgate_consul_state",
		"The Consul watcher's state: 1 for the current one (starting, ok, stale: Consul unreachable, routing on the last snapshot), 0 for the others.",
		[]string{"state"}, nil)
	consulRefusedDesc = prometheus.NewDesc("shardgate_consul_refused_instances_total",
		"Consul instances left out of routing because they break the registration contract, by reason (shards_mismatch: their shards meta differs from the proxy's shards).",
		[]string{"reason"}, nil)
	consulPanicDesc = prometheus.NewDesc("shardgate_consul_panic",
		"1 while the healthy fraction is below the panic threshold and every known instance takes devices.",
		nil, nil)
)

// Collector exports the watcher's state and refusal counters.
func (c *Consul) Collector() prometheus.Collector { return consulCollector{c} }

type consulCollector struct{ c *Consul }

func (cc consulCollector) Describe(ch chan<- *prometheus.Desc) {
	ch <- consulStateDesc
	ch <- consulRefusedDesc
	ch <- consulPanicDesc
}

func (cc consulCollector) Collect(ch chan<- prometheus.Metric) {
	cur := cc.c.State()
	for _, s := range States {
		v := 0.0
		if s == cur {
			v = 1
		}
		ch <- prometheus.MustNewConstMetric(consulStateDesc, prometheus.GaugeValue, v, string(s))
	}
	for _, r := range RefusalReasons {
		ch <- prometheus.MustNewConstMetric(consulRefusedDesc, prometheus.CounterValue, float64(cc.c.Refused(r)), r)
	}
	p := 0.0
	if cc.c.Panicking() {
		p = 1
	}
	ch <- prometheus.MustNewConstMetric(consulPanicDesc, prometheus.GaugeValue, p)
}
