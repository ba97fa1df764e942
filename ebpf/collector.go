//go:build linux

package ebpf

import (
	"path/filepath"

	"github.com/prometheus/client_golang/prometheus"
)

var (
	descSelections = prometheus.NewDesc("shardgate_reuseport_selections_total",
		"New connections the reuseport program sent to the active proxy generation.", []string{"steering"}, nil)
	descMigrations = prometheus.NewDesc("shardgate_reuseport_migrations_total",
		"Queued connections the reuseport program moved off a closing listener to the active generation.", []string{"steering"}, nil)
	descFallbacks = prometheus.NewDesc("shardgate_reuseport_fallbacks_total",
		"Connections left to the kernel's reuseport hash (no active listener to select).", []string{"steering"}, nil)
)

// Collector exports the program's counters, labelled steering=<pin
// directory name> (one per listen address). The counters live in the pinned
// map, so they continue across proxy generations.
func (s *Steering) Collector() prometheus.Collector { return NewCollector(s) }

// NewCollector exports the counters of several steerings (one per listen
// address) as one collector: a registry takes one collector per set of
// metric names.
func NewCollector(ss ...*Steering) prometheus.Collector { return collector(ss) }

type collector []*Steering

func (c collector) Describe(ch chan<- *prometheus.Desc) {
	ch <- descSelections
	ch <- descMigrations
	ch <- descFallbacks
}

func (c collector) Collect(ch chan<- prometheus.Metric) {
	for _, s := range c {
		collect(ch, s)
	}
}

func collect(ch chan<- prometheus.Metric, s *Steering) {
	n, err := s.Counters()
	if err != nil {
		ch <- prometheus.NewInvalidMetric(descSelections, err)
		return
	}
	name := filepath.Base(s.pinDir)
	ch <- prometheus.MustNewConstMetric(descSelections, prometheus.CounterValue, float64(n.Selections), name)
	ch <- prometheus.MustNewConstMetric(descMigrations, prometheus.CounterValue, float64(n.Migrations), name)
	ch <- prometheus.MustNewConstMetric(descFallbacks, prometheus.CounterValue, float64(n.Fallbacks), name)
}
