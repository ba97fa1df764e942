package metricsagg

import (
	"context"
	"errors"
	"fmt"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync"
	"sync/atomic"
	"testing"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"github.com/prometheus/client_golang/prometheus/promhttp"
	"github.com/prometheus/client_golang/prometheus/testutil"
	dto "github.com/prometheus/client_model/go"
)

// worker is one worker process's metrics: a real registry with the
// runtime collectors a real worker has, plus shardgate families.
type worker struct {
	reg      *prometheus.Registry
	accepted prometheus.Counter
	refused  *prometheus.CounterVec
	held     prometheus.Gauge
	handoff  prometheus.Histogram
	peek     prometheus.Summary
}

func newWorker() *worker {
	w := &worker{
		reg:      prometheus.NewRegistry(),
		accepted: prometheus.NewCounter(prometheus.CounterOpts{Name: "shardgate_accepted_total", Help: "Devices accepted."}),
		refused:  prometheus.NewCounterVec(prometheus.CounterOpts{Name: "shardgate_refused_total", Help: "Devices refused."}, []string{"reason"}),
		held:     prometheus.NewGauge(prometheus.GaugeOpts{Name: "shardgate_held", Help: "Devices held."}),
		handoff:  prometheus.NewHistogram(prometheus.HistogramOpts{Name: "shardgate_handoff_seconds", Help: "Handoff latency.", Buckets: []float64{0.01, 0.1, 1}}),
		peek:     prometheus.NewSummary(prometheus.SummaryOpts{Name: "shardgate_peek_bytes", Help: "CONNECT size.", Objectives: map[float64]float64{0.5: 0.05}}),
	}
	w.reg.MustRegister(w.accepted, w.refused, w.held, w.handoff, w.peek, collectors.NewGoCollector())
	return w
}

// slot is a worker index the supervisor restarts: the process behind it
// can be down (its fetch fails) or replaced by a new one.
type slot struct {
	w    atomic.Pointer[worker]
	down atomic.Bool
}

var errDown = errors.New("worker not answering")

func (s *slot) fetch(context.Context) ([]*dto.MetricFamily, error) {
	if s.down.Load() {
		return nil, errDown
	}
	return s.w.Load().reg.Gather()
}

func newSlots(n int) []*slot {
	slots := make([]*slot, n)
	for i := range slots {
		slots[i] = &slot{}
		slots[i].w.Store(newWorker())
	}
	return slots
}

func sources(slots []*slot) map[string]func(context.Context) ([]*dto.MetricFamily, error) {
	m := map[string]func(context.Context) ([]*dto.MetricFamily, error){}
	for i, s := range slots {
		m[fmt.Sprintf("worker-%d", i)] = s.fetch
	}
	return m
}

func isShardgate(name string) bool { return strings.HasPrefix(name, "shardgate_") }

// cumulativeValues flattens what must never decrease: counter values,
// histogram and summary counts and sums of non-negative samples, and
// histogram buckets.
func cumulativeValues(fams []*dto.MetricFamily) map[string]float64 {
	v := map[string]float64{}
	for _, mf := range fams {
		for _, m := range mf.Metric {
			key := mf.GetName()
			for _, lp := range m.Label {
				key += fmt.Sprintf(",%s=%q", lp.GetName(), lp.GetValue())
			}
			switch mf.GetType() {
			case dto.MetricType_COUNTER:
				v[key] = m.GetCounter().GetValue()
			case dto.MetricType_SUMMARY:
				v[key+"_count"] = float64(m.GetSummary().GetSampleCount())
				v[key+"_sum"] = m.GetSummary().GetSampleSum()
			case dto.MetricType_HISTOGRAM:
				v[key+"_count"] = float64(m.GetHistogram().GetSampleCount())
				v[key+"_sum"] = m.GetHistogram().GetSampleSum()
				for _, b := range m.GetHistogram().GetBucket() {
					v[fmt.Sprintf("%s_bucket_%g", key, b.GetUpperBound())] = float64(b.GetCumulativeCount())
				}
			}
		}
	}
	return v
}

// assertGrew fails if any value in prev is missing from or smaller in cur.
func assertGrew(t *testing.T, step string, prev, cur map[string]float64) {
	t.Helper()
	for k, p := range prev {
		c, ok := cur[k]
		if !ok {
			t.Fatalf("%s: %s vanished (was %g)", step, k, p)
		}
		if c < p {
			t.Fatalf("%s: %s went back from %g to %g", step, k, p, c)
		}
	}
}

func find(fams []*dto.MetricFamily, name string) *dto.MetricFamily {
	for _, mf := range fams {
		if mf.GetName() == name {
			return mf
		}
	}
	return nil
}

func scalar(t *testing.T, fams []*dto.MetricFamily, name string) float64 {
	t.Helper()
	mf := find(fams, name)
	if mf == nil || len(mf.Metric) != 1 {
		t.Fatalf("%s: %v, want one series", name, mf)
	}
	m := mf.Metric[0]
	switch mf.GetType() {
	case dto.MetricType_COUNTER:
		return m.GetCounter().GetValue()
	case dto.MetricType_GAUGE:
		return m.GetGauge().GetValue()
	case dto.MetricType_HISTOGRAM:
		return float64(m.GetHistogram().GetSampleCount())
	case dto.MetricType_SUMMARY:
		return float64(m.GetSummary().GetSampleCount())
	}
	t.Fatalf("%s: type %s", name, mf.GetType())
	return 0
}

// TestCarryAcrossRestart walks one worker through dying, being retired and
// coming back from zero, and another through not answering for a while:
// no summed counter, count or bucket ever goes back, and gauges count
// only workers that answer.
func TestCarryAcrossRestart(t *testing.T) {
	slots := newSlots(2)
	var carry Carry
	g := NewGatherer(isShardgate, &carry)
	g.SetSources(sources(slots))

	w0, w1 := slots[0].w.Load(), slots[1].w.Load()
	w0.accepted.Add(10)
	w0.refused.WithLabelValues("rate").Add(3)
	w0.held.Set(3)
	w0.handoff.Observe(0.05)
	w0.peek.Observe(100)
	w1.accepted.Add(5)
	w1.held.Set(4)
	w1.handoff.Observe(0.5)

	steps := []struct {
		name     string
		before   func()
		accepted float64
		held     float64
		handoffs float64
	}{
		{"both up", func() {}, 15, 7, 2},
		{"worker 0 down", func() {
			w0.accepted.Add(100) // counted after its last answer: lost with it
			slots[0].down.Store(true)
		}, 15, 4, 2},
		{"worker 0 retired", func() { carry.Retire("worker-0") }, 15, 4, 2},
		{"worker 0 restarted from zero", func() {
			nw := newWorker()
			nw.accepted.Add(2)
			nw.held.Set(1)
			slots[0].w.Store(nw)
			slots[0].down.Store(false)
		}, 17, 5, 2},
		{"worker 1 not answering", func() { slots[1].down.Store(true) }, 17, 1, 2},
		{"worker 1 answering again", func() {
			w1.accepted.Add(1)
			w1.handoff.Observe(2)
			slots[1].down.Store(false)
		}, 18, 5, 3},
	}
	var prev map[string]float64
	for _, s := range steps {
		s.before()
		fams := gather(t, g)
		if got := scalar(t, fams, "shardgate_accepted_total"); got != s.accepted {
			t.Fatalf("%s: accepted %g, want %g", s.name, got, s.accepted)
		}
		if got := scalar(t, fams, "shardgate_held"); got != s.held {
			t.Fatalf("%s: held %g, want %g", s.name, got, s.held)
		}
		if got := scalar(t, fams, "shardgate_handoff_seconds"); got != s.handoffs {
			t.Fatalf("%s: handoffs %g, want %g", s.name, got, s.handoffs)
		}
		if find(fams, "go_goroutines") != nil {
			t.Fatalf("%s: keep let go_goroutines through", s.name)
		}
		cur := cumulativeValues(fams)
		assertGrew(t, s.name, prev, cur)
		prev = cur
	}
	if g.Errors() != 3 {
		t.Fatalf("Errors() = %d, want 3 (worker 0 down for two scrapes, worker 1 for one)", g.Errors())
	}
	// Counters, histogram buckets, counts and sums, summary counts and sums.
	if len(prev) != 9 {
		t.Fatalf("%d cumulative values checked, want 9: %v", len(prev), prev)
	}
}

func TestCarryFamilies(t *testing.T) {
	var c Carry
	if f := c.Families(); len(f) != 0 {
		t.Fatalf("Families before any Retire: %v", f)
	}
	w := newWorker()
	w.accepted.Add(6)
	w.held.Set(9)
	w.handoff.Observe(0.5)
	w.peek.Observe(40)
	c.Observe("w", gather(t, w.reg))
	if f := c.Families(); len(f) != 0 {
		t.Fatalf("Families before any Retire, with an observed source: %v", f)
	}
	c.Retire("w")
	c.Retire("w") // forgotten already: nothing more to carry
	c.Retire("never observed")
	got := c.Families()
	want := `
# HELP shardgate_accepted_total Devices accepted.
# TYPE shardgate_accepted_total counter
shardgate_accepted_total 6
# HELP shardgate_handoff_seconds Handoff latency.
# TYPE shardgate_handoff_seconds histogram
shardgate_handoff_seconds_bucket{le="0.01"} 0
shardgate_handoff_seconds_bucket{le="0.1"} 0
shardgate_handoff_seconds_bucket{le="1"} 1
shardgate_handoff_seconds_bucket{le="+Inf"} 1
shardgate_handoff_seconds_sum 0.5
shardgate_handoff_seconds_count 1
# HELP shardgate_peek_bytes CONNECT size.
# TYPE shardgate_peek_bytes summary
shardgate_peek_bytes_sum 40
shardgate_peek_bytes_count 1
`
	gf := prometheus.GathererFunc(func() ([]*dto.MetricFamily, error) { return got, nil })
	if err := testutil.GatherAndCompare(gf, strings.NewReader(want), "shardgate_accepted_total", "shardgate_handoff_seconds", "shardgate_peek_bytes"); err != nil {
		t.Fatal(err)
	}
	// Gauges (shardgate_held, go_goroutines, ...) are dropped: a dead
	// worker holds nothing. The Go runtime's counters are carried too.
	if find(got, "shardgate_held") != nil || find(got, "go_goroutines") != nil {
		t.Fatalf("gauges carried: %s", toText(t, got))
	}
	if find(got, "go_memstats_mallocs_total") == nil {
		t.Fatalf("runtime counter not carried: %s", toText(t, got))
	}
	for _, mf := range got {
		switch mf.GetType() {
		case dto.MetricType_COUNTER, dto.MetricType_HISTOGRAM, dto.MetricType_SUMMARY:
		default:
			t.Fatalf("carried %s of type %s", mf.GetName(), mf.GetType())
		}
	}
}

// TestGatherersConsistency serves a supervisor's own registry and the
// workers' sum together, as the supervisor's /metrics does, through
// client_golang's consistency checks.
func TestGatherersConsistency(t *testing.T) {
	sup := prometheus.NewRegistry()
	workers := prometheus.NewGauge(prometheus.GaugeOpts{Name: "shardgate_supervisor_workers", Help: "Workers running."})
	sup.MustRegister(workers, collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))
	workers.Set(3)

	slots := newSlots(3)
	for i, s := range slots {
		w := s.w.Load()
		w.accepted.Add(float64(i + 1))
		w.refused.WithLabelValues([]string{"rate", "source", "rate"}[i]).Inc()
		w.handoff.Observe(0.001 * float64(i))
		w.peek.Observe(100)
	}
	keep := func(name string) bool {
		return isShardgate(name) && !strings.HasPrefix(name, "shardgate_supervisor_")
	}
	g := NewGatherer(keep, nil)
	g.SetSources(sources(slots))
	both := prometheus.Gatherers{sup, g}

	if _, err := both.Gather(); err != nil {
		t.Fatalf("Gatherers{supervisor, workers}: %v", err)
	}
	want := `
# HELP shardgate_accepted_total Devices accepted.
# TYPE shardgate_accepted_total counter
shardgate_accepted_total 6
# HELP shardgate_refused_total Devices refused.
# TYPE shardgate_refused_total counter
shardgate_refused_total{reason="rate"} 2
shardgate_refused_total{reason="source"} 1
# HELP shardgate_supervisor_workers Workers running.
# TYPE shardgate_supervisor_workers gauge
shardgate_supervisor_workers 3
`
	if err := testutil.GatherAndCompare(both, strings.NewReader(want), "shardgate_accepted_total", "shardgate_refused_total", "shardgate_supervisor_workers"); err != nil {
		t.Fatal(err)
	}
	rec := httptest.NewRecorder()
	promhttp.HandlerFor(both, promhttp.HandlerOpts{ErrorHandling: promhttp.HTTPErrorOnError}).ServeHTTP(rec, httptest.NewRequest("GET", "/metrics", nil))
	if rec.Code != http.StatusOK || !strings.Contains(rec.Body.String(), "shardgate_handoff_seconds_bucket") {
		t.Fatalf("/metrics: %d\n%s", rec.Code, rec.Body.String())
	}

	// The check has teeth: without keep, the workers' go_* families
	// collide with the supervisor's own.
	all := NewGatherer(nil, nil)
	all.SetSources(sources(slots))
	if _, err := (prometheus.Gatherers{sup, all}).Gather(); err == nil {
		t.Fatal("Gatherers with clashing go_* families passed the consistency check")
	}
}

// TestGatherSkipsFailing: a failing fetch is counted and leaves no gauge
// behind, and a source never answered contributes nothing.
func TestGatherSkipsFailing(t *testing.T) {
	slots := newSlots(1)
	slots[0].w.Load().held.Set(5)
	slots[0].w.Load().accepted.Add(1)
	g := NewGatherer(isShardgate, nil)
	src := sources(slots)
	src["broken"] = func(context.Context) ([]*dto.MetricFamily, error) { return nil, errDown }
	g.SetSources(src)
	fams := gather(t, g)
	if got := scalar(t, fams, "shardgate_held"); got != 5 {
		t.Fatalf("held %g, want 5", got)
	}
	if g.Errors() != 1 {
		t.Fatalf("Errors() = %d, want 1", g.Errors())
	}
	slots[0].down.Store(true)
	fams = gather(t, g)
	if find(fams, "shardgate_held") != nil {
		t.Fatalf("a worker not answering still counts its gauge: %s", toText(t, fams))
	}
	if got := scalar(t, fams, "shardgate_accepted_total"); got != 1 {
		t.Fatalf("accepted %g, want 1 (the last answer)", got)
	}
	if g.Errors() != 3 {
		t.Fatalf("Errors() = %d, want 3", g.Errors())
	}
}

// TestGatherConflictsCounted: a source exposing a family with another
// type than the first source is skipped and counted.
func TestGatherConflictsCounted(t *testing.T) {
	slots := newSlots(1)
	slots[0].w.Load().accepted.Add(2)
	odd := prometheus.NewRegistry()
	og := prometheus.NewGauge(prometheus.GaugeOpts{Name: "shardgate_accepted_total", Help: "Devices accepted."})
	odd.MustRegister(og)
	og.Set(1000)
	g := NewGatherer(isShardgate, nil)
	src := sources(slots) // "worker-0" sorts before "z-odd": its counter is kept
	src["z-odd"] = func(context.Context) ([]*dto.MetricFamily, error) { return odd.Gather() }
	g.SetSources(src)
	fams := gather(t, g)
	if got := scalar(t, fams, "shardgate_accepted_total"); got != 2 || find(fams, "shardgate_accepted_total").GetType() != dto.MetricType_COUNTER {
		t.Fatalf("accepted %g (%s), want the counter's 2", got, find(fams, "shardgate_accepted_total").GetType())
	}
	if g.Conflicts() != 1 {
		t.Fatalf("Conflicts() = %d, want 1", g.Conflicts())
	}
}

// TestConcurrentGatherRestart: scrapes racing with worker restarts (run
// with -race) each see sums that never go back.
func TestConcurrentGatherRestart(t *testing.T) {
	slots := newSlots(2)
	var carry Carry
	g := NewGatherer(isShardgate, &carry)
	g.SetSources(sources(slots))

	stop := make(chan struct{})
	var restarter sync.WaitGroup
	restarter.Go(func() {
		for i := 0; ; i++ {
			select {
			case <-stop:
				return
			default:
			}
			for _, s := range slots {
				s.w.Load().accepted.Inc()
				s.w.Load().handoff.Observe(0.05)
			}
			s := slots[i%2]
			s.down.Store(true)
			carry.Retire(fmt.Sprintf("worker-%d", i%2))
			s.w.Store(newWorker())
			s.down.Store(false)
		}
	})
	var scrapers sync.WaitGroup
	errs := make(chan error, 4)
	for range 4 {
		scrapers.Go(func() {
			prev := 0.0
			for range 200 {
				fams, _ := g.Gather()
				mf := find(fams, "shardgate_accepted_total")
				if mf == nil {
					continue
				}
				v := mf.Metric[0].GetCounter().GetValue()
				if v < prev {
					errs <- fmt.Errorf("accepted went back from %g to %g", prev, v)
					return
				}
				prev = v
			}
		})
	}
	scrapers.Wait()
	close(stop)
	restarter.Wait()
	close(errs)
	for err := range errs {
		t.Fatal(err)
	}
}
