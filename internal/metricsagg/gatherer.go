package metricsagg

import (
	"context"
	"slices"
	"sync"
	"sync/atomic"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	dto "github.com/prometheus/client_model/go"
)

// DefaultTimeout bounds a Gather's fetches when Gatherer.Timeout is zero.
const DefaultTimeout = 5 * time.Second

// Fetch returns one source's metric families, or an error; it must return
// once ctx is done.
type Fetch func(context.Context) ([]*dto.MetricFamily, error)

// Gatherer is a prometheus.Gatherer that sums the families of sources
// fetched at each Gather, plus the carry, keeping only families whose name
// passes keep (nil: all).
//
// Combined with a registry as prometheus.Gatherers{reg, g}, the names keep
// lets through must not also be in reg: Gatherers refuses a family that
// two gatherers expose with different help or type.
type Gatherer struct {
	// Timeout bounds each Gather's fetches, which run concurrently. Zero
	// means DefaultTimeout. Set it before the first Gather.
	Timeout time.Duration

	keep  func(name string) bool
	carry *Carry

	mu      sync.Mutex
	sources map[string]Fetch

	errors    atomic.Uint64
	conflicts atomic.Uint64
}

var _ prometheus.Gatherer = (*Gatherer)(nil)

// NewGatherer returns a Gatherer with no sources that keeps the families
// whose names pass keep (nil: all), adding c's carried totals. A nil c is
// a carry of the Gatherer's own.
func NewGatherer(keep func(name string) bool, c *Carry) *Gatherer {
	if c == nil {
		c = &Carry{}
	}
	return &Gatherer{keep: keep, carry: c}
}

// SetSources replaces the sources fetched at Gather: source name → fetch.
// Every source answering is observed in the carry under its name. A
// failing fetch is skipped and counted in Errors: its gauges no longer
// count, and its counters, histograms and summaries stay at its last
// observation (see Carry).
//
// Dropping a source here does not drop what it counted: Retire it in the
// carry when its process is gone.
func (g *Gatherer) SetSources(src map[string]func(context.Context) ([]*dto.MetricFamily, error)) {
	m := make(map[string]Fetch, len(src))
	for name, f := range src {
		m[name] = f
	}
	g.mu.Lock()
	g.sources = m
	g.mu.Unlock()
}

// Errors is how many fetches have failed since the Gatherer was made.
func (g *Gatherer) Errors() uint64 { return g.errors.Load() }

// Conflicts is how many source families Gather has skipped since the
// Gatherer was made because another source had the family with another
// type.
func (g *Gatherer) Conflicts() uint64 { return g.conflicts.Load() }

type fetched struct {
	fams []*dto.MetricFamily
	err  error
}

// Gather fetches every source concurrently and returns the sum of the
// answers and the carry. Failing sources are not an error (the sum is
// still complete for every counter); the error is always nil. Gathers on
// Gatherers sharing a Carry run one at a time: a second scrape waits for
// the first, at most Timeout.
func (g *Gatherer) Gather() ([]*dto.MetricFamily, error) {
	timeout := g.Timeout
	if timeout <= 0 {
		timeout = DefaultTimeout
	}
	g.mu.Lock()
	names := sortedKeys(g.sources)
	fetches := make([]Fetch, len(names))
	for i, name := range names {
		fetches[i] = g.sources[name]
	}
	g.mu.Unlock()

	g.carry.round.Lock()
	defer g.carry.round.Unlock()

	ctx, cancel := context.WithTimeout(context.Background(), timeout)
	defer cancel()
	results := make([]fetched, len(names))
	var wg sync.WaitGroup
	for i, fetch := range fetches {
		wg.Go(func() { results[i] = fetchSource(ctx, fetch) })
	}
	wg.Wait()

	fresh := map[string]bool{}
	var sets [][]*dto.MetricFamily
	for i, r := range results {
		if r.err != nil {
			g.errors.Add(1)
			continue
		}
		g.carry.Observe(names[i], r.fams)
		fresh[names[i]] = true
		sets = append(sets, r.fams)
	}
	sets = append(sets, g.carry.held(fresh)...)
	if g.keep != nil {
		for i, set := range sets {
			sets[i] = g.filter(set)
		}
	}
	out, conflicts := MergeConflicts(sets...)
	g.conflicts.Add(uint64(len(conflicts)))
	return out, nil
}

// fetchSource runs one fetch; it is named so stack dumps of a hung fetch
// say what they are.
func fetchSource(ctx context.Context, fetch Fetch) fetched {
	fams, err := fetch(ctx)
	return fetched{fams: fams, err: err}
}

func (g *Gatherer) filter(fams []*dto.MetricFamily) []*dto.MetricFamily {
	out := make([]*dto.MetricFamily, 0, len(fams))
	for _, mf := range fams {
		if g.keep(mf.GetName()) {
			out = append(out, mf)
		}
	}
	return out
}

func sortedKeys[V any](m map[string]V) []string {
	keys := make([]string, 0, len(m))
	for k := range m {
		keys = append(keys, k)
	}
	slices.Sort(keys)
	return keys
}
