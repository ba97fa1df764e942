package metricsagg

import (
	"bytes"
	"slices"
	"strings"
	"testing"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/testutil"
	dto "github.com/prometheus/client_model/go"
	"github.com/prometheus/common/expfmt"
	"github.com/prometheus/common/model"
	"google.golang.org/protobuf/proto"
)

// mergeRegs are three real registries whose sums are worked out by hand in
// mergeWant. Bucket layouts: shardgate_handoff_seconds is the same in A
// and B, shardgate_peek_bytes differs.
func mergeRegs(t *testing.T) (a, b, c *prometheus.Registry) {
	t.Helper()
	accepted := prometheus.CounterOpts{Name: "shardgate_accepted_total", Help: "Devices accepted."}
	refused := prometheus.CounterOpts{Name: "shardgate_refused_total", Help: "Devices refused."}
	held := prometheus.GaugeOpts{Name: "shardgate_held", Help: "Devices held."}
	handoff := prometheus.HistogramOpts{Name: "shardgate_handoff_seconds", Help: "Handoff latency.", Buckets: []float64{0.3, 1}}
	peek := prometheus.HistogramOpts{Name: "shardgate_peek_bytes", Help: "CONNECT size."}
	size := prometheus.SummaryOpts{Name: "shardgate_connect_size", Help: "CONNECT size summary."}

	a = prometheus.NewRegistry()
	{
		acc := prometheus.NewCounter(accepted)
		ref := prometheus.NewCounterVec(refused, []string{"reason"})
		h := prometheus.NewGauge(held)
		ho := prometheus.NewHistogram(handoff)
		po := peek
		po.Buckets = []float64{10, 100}
		p := prometheus.NewHistogram(po)
		s := prometheus.NewSummary(size)
		a.MustRegister(acc, ref, h, ho, p, s)
		acc.Add(5)
		ref.WithLabelValues("rate").Add(1)
		ref.WithLabelValues("source").Add(2)
		h.Set(10)
		for _, v := range []float64{0.25, 0.5, 4} {
			ho.Observe(v)
		}
		for _, v := range []float64{5, 70, 500} {
			p.Observe(v)
		}
		s.Observe(1)
		s.Observe(2)
	}
	b = prometheus.NewRegistry()
	{
		acc := prometheus.NewCounter(accepted)
		ref := prometheus.NewCounterVec(refused, []string{"reason"})
		h := prometheus.NewGauge(held)
		ho := prometheus.NewHistogram(handoff)
		po := peek
		po.Buckets = []float64{10, 50, 1000}
		p := prometheus.NewHistogram(po)
		s := prometheus.NewSummary(size)
		b.MustRegister(acc, ref, h, ho, p, s)
		acc.Add(7)
		ref.WithLabelValues("source").Add(3)
		ref.WithLabelValues("shard").Add(4)
		h.Set(3)
		ho.Observe(0.25)
		for _, v := range []float64{20, 60, 2000} {
			p.Observe(v)
		}
		s.Observe(10)
	}
	c = prometheus.NewRegistry()
	{
		ref := prometheus.NewCounterVec(refused, []string{"reason"})
		h := prometheus.NewGauge(held)
		c.MustRegister(ref, h)
		ref.WithLabelValues("rate").Add(10)
		h.Set(-1)
	}
	return a, b, c
}

// mergeWant is the hand-computed sum of mergeRegs. For
// shardgate_peek_bytes, A has bounds {10,100} with cumulative counts 1,2
// (3 samples); B has {10,50,1000} with 0,1,2 (3 samples). At a bound it
// lacks, a source counts what it had at its largest bound below:
//
//	le=10:   A 1 + B 0 = 1
//	le=50:   A 1 + B 1 = 2
//	le=100:  A 2 + B 1 = 3
//	le=1000: A 2 + B 2 = 4
//	+Inf:    3 + 3 = 6; sum 575 + 2080 = 2655
const mergeWant = `
# HELP shardgate_accepted_total Devices accepted.
# TYPE shardgate_accepted_total counter
shardgate_accepted_total 12
# HELP shardgate_connect_size CONNECT size summary.
# TYPE shardgate_connect_size summary
shardgate_connect_size_sum 13
shardgate_connect_size_count 3
# HELP shardgate_handoff_seconds Handoff latency.
# TYPE shardgate_handoff_seconds histogram
shardgate_handoff_seconds_bucket{le="0.3"} 2
shardgate_handoff_seconds_bucket{le="1"} 3
shardgate_handoff_seconds_bucket{le="+Inf"} 4
shardgate_handoff_seconds_sum 5
shardgate_handoff_seconds_count 4
# HELP shardgate_held Devices held.
# TYPE shardgate_held gauge
shardgate_held 12
# HELP shardgate_peek_bytes CONNECT size.
# TYPE shardgate_peek_bytes histogram
shardgate_peek_bytes_bucket{le="10"} 1
shardgate_peek_bytes_bucket{le="50"} 2
shardgate_peek_bytes_bucket{le="100"} 3
shardgate_peek_bytes_bucket{le="1000"} 4
shardgate_peek_bytes_bucket{le="+Inf"} 6
shardgate_peek_bytes_sum 2655
shardgate_peek_bytes_count 6
# HELP shardgate_refused_total Devices refused.
# TYPE shardgate_refused_total counter
shardgate_refused_total{reason="rate"} 11
shardgate_refused_total{reason="shard"} 4
shardgate_refused_total{reason="source"} 5
`

func gather(t *testing.T, g prometheus.Gatherer) []*dto.MetricFamily {
	t.Helper()
	fams, err := g.Gather()
	if err != nil {
		t.Fatal(err)
	}
	return fams
}

func toText(t *testing.T, fams []*dto.MetricFamily) string {
	t.Helper()
	var b bytes.Buffer
	for _, mf := range fams {
		if _, err := expfmt.MetricFamilyToText(&b, mf); err != nil {
			t.Fatal(err)
		}
	}
	return b.String()
}

func TestMergeRegistries(t *testing.T) {
	a, b, c := mergeRegs(t)
	merged := prometheus.GathererFunc(func() ([]*dto.MetricFamily, error) {
		return Merge(gather(t, a), gather(t, b), gather(t, c)), nil
	})
	if err := testutil.GatherAndCompare(merged, strings.NewReader(mergeWant)); err != nil {
		t.Fatal(err)
	}
}

// TestMergeParsedText: workers' metrics arrive as parsed text, whose
// histograms carry an explicit +Inf bucket and whose labels come in the
// text's order; the sum must not change.
func TestMergeParsedText(t *testing.T) {
	a, b, c := mergeRegs(t)
	var parsed [][]*dto.MetricFamily
	for _, r := range []*prometheus.Registry{a, b, c} {
		p := expfmt.NewTextParser(model.UTF8Validation)
		byName, err := p.TextToMetricFamilies(strings.NewReader(toText(t, gather(t, r))))
		if err != nil {
			t.Fatal(err)
		}
		var fams []*dto.MetricFamily
		for _, mf := range byName {
			fams = append(fams, mf)
		}
		parsed = append(parsed, fams)
	}
	got := toText(t, Merge(parsed...))
	want := toText(t, Merge(gather(t, a), gather(t, b), gather(t, c)))
	if got != want {
		t.Fatalf("merge of parsed text differs:\n got:\n%s\nwant:\n%s", got, want)
	}
	if strings.Contains(got, `le="+Inf"} 3`) || !strings.Contains(got, `shardgate_peek_bytes_bucket{le="+Inf"} 6`) {
		t.Fatalf("+Inf bucket is not the summed sample count:\n%s", got)
	}
}

// TestMergeDeterministic: the order of families and series within a
// source does not matter, and the output is sorted.
func TestMergeDeterministic(t *testing.T) {
	a, b, c := mergeRegs(t)
	sets := [][]*dto.MetricFamily{gather(t, a), gather(t, b), gather(t, c)}
	want := toText(t, Merge(sets...))
	for _, set := range sets {
		slices.Reverse(set)
		for _, mf := range set {
			slices.Reverse(mf.Metric)
		}
	}
	if got := toText(t, Merge(sets...)); got != want {
		t.Fatalf("merge depends on input order:\n got:\n%s\nwant:\n%s", got, want)
	}
	out := Merge(sets...)
	for i := 1; i < len(out); i++ {
		if out[i-1].GetName() >= out[i].GetName() {
			t.Fatalf("families out of order: %s before %s", out[i-1].GetName(), out[i].GetName())
		}
	}
	for _, mf := range out {
		for i := 1; i < len(mf.Metric); i++ {
			if compareLabels(mf.Metric[i-1].Label, mf.Metric[i].Label) >= 0 {
				t.Fatalf("%s: series out of order", mf.GetName())
			}
		}
	}
}

// TestMergeLeavesInputs: Merge modifies no input, and its output shares
// nothing with them.
func TestMergeLeavesInputs(t *testing.T) {
	a, b, _ := mergeRegs(t)
	sets := [][]*dto.MetricFamily{gather(t, a), gather(t, b)}
	// Unsorted labels in an input, as a text parser may leave them.
	sets[1] = append(sets[1], &dto.MetricFamily{
		Name: proto.String("shardgate_links"), Type: dto.MetricType_GAUGE.Enum(),
		Metric: []*dto.Metric{{
			Label: []*dto.LabelPair{{Name: proto.String("z"), Value: proto.String("1")}, {Name: proto.String("a"), Value: proto.String("2")}},
			Gauge: &dto.Gauge{Value: proto.Float64(3)},
		}},
	})
	before := clone(sets)
	out := Merge(sets...)
	assertEqualSets(t, sets, before, "after Merge")
	for _, mf := range out {
		mf.Help = proto.String("changed")
		for _, m := range mf.Metric {
			for _, lp := range m.Label {
				lp.Value = proto.String("changed")
			}
			if h := m.Histogram; h != nil {
				for _, bk := range h.Bucket {
					bk.CumulativeCount = proto.Uint64(999)
				}
			}
		}
	}
	assertEqualSets(t, sets, before, "after changing Merge's output")
}

func clone(sets [][]*dto.MetricFamily) [][]*dto.MetricFamily {
	out := make([][]*dto.MetricFamily, len(sets))
	for i, set := range sets {
		for _, mf := range set {
			out[i] = append(out[i], proto.Clone(mf).(*dto.MetricFamily))
		}
	}
	return out
}

func assertEqualSets(t *testing.T, got, want [][]*dto.MetricFamily, when string) {
	t.Helper()
	for i := range want {
		if len(got[i]) != len(want[i]) {
			t.Fatalf("%s: set %d has %d families, had %d", when, i, len(got[i]), len(want[i]))
		}
		for j := range want[i] {
			if !proto.Equal(got[i][j], want[i][j]) {
				t.Fatalf("%s: set %d family %s changed", when, i, want[i][j].GetName())
			}
		}
	}
}

func TestMergeTypeConflict(t *testing.T) {
	first := prometheus.NewRegistry()
	ctr := prometheus.NewCounter(prometheus.CounterOpts{Name: "shardgate_thing", Help: "A counter here."})
	first.MustRegister(ctr)
	ctr.Add(4)
	second := prometheus.NewRegistry()
	g := prometheus.NewGauge(prometheus.GaugeOpts{Name: "shardgate_thing", Help: "A gauge there."})
	second.MustRegister(g)
	g.Set(100)
	third := prometheus.NewRegistry()
	ctr3 := prometheus.NewCounter(prometheus.CounterOpts{Name: "shardgate_thing", Help: "A counter here."})
	third.MustRegister(ctr3)
	ctr3.Add(1)

	out, conflicts := MergeConflicts(gather(t, first), gather(t, second), gather(t, third))
	want := "# HELP shardgate_thing A counter here.\n# TYPE shardgate_thing counter\nshardgate_thing 5\n"
	if got := toText(t, out); got != want {
		t.Fatalf("merged:\n%s\nwant:\n%s", got, want)
	}
	if len(conflicts) != 1 {
		t.Fatalf("conflicts %v, want one", conflicts)
	}
	c := conflicts[0]
	if c.Name != "shardgate_thing" || c.Set != 1 || c.Kept != dto.MetricType_COUNTER || c.Got != dto.MetricType_GAUGE {
		t.Fatalf("conflict %+v", *c)
	}
}

// TestMergeFloatHistogram: once a source counts a histogram in floats, the
// sum does too, keeping the integer sources' counts.
func TestMergeFloatHistogram(t *testing.T) {
	hist := func(h *dto.Histogram) []*dto.MetricFamily {
		return []*dto.MetricFamily{{Name: proto.String("shardgate_h"), Type: dto.MetricType_HISTOGRAM.Enum(), Metric: []*dto.Metric{{Histogram: h}}}}
	}
	ints := hist(&dto.Histogram{SampleCount: proto.Uint64(4), SampleSum: proto.Float64(8), Bucket: []*dto.Bucket{
		{UpperBound: proto.Float64(1), CumulativeCount: proto.Uint64(3)},
	}})
	floats := hist(&dto.Histogram{SampleCountFloat: proto.Float64(2.5), SampleSum: proto.Float64(1), Bucket: []*dto.Bucket{
		{UpperBound: proto.Float64(1), CumulativeCountFloat: proto.Float64(0.5)},
		{UpperBound: proto.Float64(2), CumulativeCountFloat: proto.Float64(1.5)},
	}})
	out := Merge(ints, floats)
	h := out[0].Metric[0].Histogram
	if h.SampleCount != nil || h.GetSampleCountFloat() != 6.5 || h.GetSampleSum() != 9 {
		t.Fatalf("counts: %v", h)
	}
	var got []float64
	for _, b := range h.Bucket {
		if b.CumulativeCount != nil {
			t.Fatalf("bucket %v has an integer count in a float histogram", b)
		}
		got = append(got, b.GetUpperBound(), b.GetCumulativeCountFloat())
	}
	if want := []float64{1, 3.5, 2, 4.5}; !slices.Equal(got, want) {
		t.Fatalf("buckets (bound, count) %v, want %v", got, want)
	}
}
