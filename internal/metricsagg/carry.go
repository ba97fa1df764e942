package metricsagg

import (
	"sync"

	dto "github.com/prometheus/client_model/go"
)

// Carry keeps what retired sources had counted, so sums never go
// backwards: a worker that exits takes its counts with it, and its
// replacement counts from zero, but the supervisor's sum must go on from
// where it was, or Prometheus reads a counter reset and rate() spikes.
//
// A source is one process's metrics: keep its name for the process's whole
// life, and Retire it when the process is gone, before its replacement is
// first observed under the same name.
//
// The zero value is ready to use. Carry is safe for concurrent use.
type Carry struct {
	// round is held by a Gatherer for a whole Gather and by Retire. Gathers
	// in turn observe each source in the order they fetched it, so an
	// older answer never replaces a newer one (the retired count would be
	// lower than a sum already served); and no Gather sees a source both
	// live and carried (a double count) or neither (a dip).
	round sync.Mutex

	mu       sync.Mutex
	observed map[string][]*dto.MetricFamily // live sources' latest families
	carried  []*dto.MetricFamily            // retired sources' cumulative totals, merged
}

// Observe remembers source's latest families. fams is kept, not copied:
// it must not be modified afterwards.
func (c *Carry) Observe(source string, fams []*dto.MetricFamily) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.observed == nil {
		c.observed = map[string][]*dto.MetricFamily{}
	}
	c.observed[source] = fams
}

// Retire folds source's last observed counters, histograms and summaries
// (counts and sums) into the carry and forgets the source; gauges and
// untyped are dropped (a dead worker holds nothing). Retiring a source
// never observed does nothing.
//
// Retire waits for Gathers in progress on this carry (each bounded by its
// Gatherer's Timeout); it must not be called from a source's fetch.
func (c *Carry) Retire(source string) {
	c.round.Lock()
	defer c.round.Unlock()
	c.mu.Lock()
	defer c.mu.Unlock()
	last, ok := c.observed[source]
	if !ok {
		return
	}
	delete(c.observed, source)
	c.carried = Merge(c.carried, cumulative(last))
}

// Families returns the carried totals (empty before any Retire), as new
// families the caller may keep or modify.
func (c *Carry) Families() []*dto.MetricFamily {
	c.mu.Lock()
	defer c.mu.Unlock()
	return Merge(c.carried)
}

// held returns what a Gather adds to its fresh answers: the carried totals
// and, for each live source that did not answer this time (fresh lacks
// it), the cumulative part of its last observation. A worker that cannot
// answer is likely dying; its gauges no longer count, but what it counted
// happened, and leaving it out until Retire would make the sum dip and
// come back, which Prometheus reads as a counter reset.
func (c *Carry) held(fresh map[string]bool) [][]*dto.MetricFamily {
	c.mu.Lock()
	defer c.mu.Unlock()
	sets := [][]*dto.MetricFamily{c.carried}
	for _, name := range sortedKeys(c.observed) {
		if !fresh[name] {
			sets = append(sets, cumulative(c.observed[name]))
		}
	}
	return sets
}

// cumulative keeps the families whose values only grow while the process
// lives: counters, histograms and summaries.
func cumulative(fams []*dto.MetricFamily) []*dto.MetricFamily {
	out := make([]*dto.MetricFamily, 0, len(fams))
	for _, mf := range fams {
		switch mf.GetType() {
		case dto.MetricType_COUNTER, dto.MetricType_HISTOGRAM, dto.MetricType_SUMMARY:
			out = append(out, mf)
		}
	}
	return out
}
