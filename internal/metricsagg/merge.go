// Package metricsagg sums the metric families of several processes into
// one exposition: a workers' supervisor serves the sum of its workers'
// metrics, so Prometheus sees one proxy however many workers it runs.
//
// Merge adds up series with the same name and labels. Carry keeps what
// workers that exited had counted, so a restarted worker (counting from
// zero again) never makes a summed counter go backwards. Gatherer puts the
// two behind prometheus.Gatherer.
package metricsagg

import (
	"fmt"
	"math"
	"slices"
	"sort"
	"strings"

	dto "github.com/prometheus/client_model/go"
	"google.golang.org/protobuf/proto"
)

// TypeConflict is a family that a later source exposes with a different
// type than the first source that had it. Merge keeps the first type and
// skips the conflicting source's family.
type TypeConflict struct {
	Name string         // family name
	Set  int            // index of the skipped source among Merge's sets
	Kept dto.MetricType // the type of the first source with the family
	Got  dto.MetricType // the skipped source's type
}

func (c *TypeConflict) Error() string {
	return fmt.Sprintf("metric family %s: source %d has type %s, %s kept", c.Name, c.Set, c.Got, c.Kept)
}

// Merge sums metric families from many sources. Series with the same
// family name and the same label set add up:
//   - counter, gauge and untyped: values;
//   - histogram: sample count, sample sum, and classic buckets by upper
//     bound over the union of all sources' bounds; where a source lacks a
//     bound, its count there is its count at its largest bound below (no
//     bound below: zero), the most it provably had. +Inf buckets are left
//     out (the exposition writes them from the sample count), and so are
//     native-histogram fields and exemplars;
//   - summary: sample count and sum; quantiles cannot be summed and are
//     dropped.
//
// A family whose type differs between sources keeps the first type seen
// and skips the others; MergeConflicts reports them. Help and unit are the
// first non-empty seen. Timestamps and created timestamps are dropped.
//
// Output is new (it shares nothing with the inputs, which are not
// modified), sorted by family name, series by label set, labels by name;
// families without series are left out.
func Merge(sets ...[]*dto.MetricFamily) []*dto.MetricFamily {
	out, _ := MergeConflicts(sets...)
	return out
}

// MergeConflicts is Merge that also returns the families it skipped for a
// type conflict.
func MergeConflicts(sets ...[]*dto.MetricFamily) ([]*dto.MetricFamily, []*TypeConflict) {
	fams := map[string]*family{}
	var conflicts []*TypeConflict
	for i, set := range sets {
		for _, mf := range set {
			if mf == nil || len(mf.GetMetric()) == 0 {
				continue
			}
			f := fams[mf.GetName()]
			if f == nil {
				f = &family{name: mf.GetName(), typ: mf.GetType(), series: map[string]*series{}}
				fams[f.name] = f
			} else if f.typ != mf.GetType() {
				conflicts = append(conflicts, &TypeConflict{Name: f.name, Set: i, Kept: f.typ, Got: mf.GetType()})
				continue
			}
			if f.help == "" {
				f.help = mf.GetHelp()
			}
			if f.unit == "" {
				f.unit = mf.GetUnit()
			}
			for _, m := range mf.GetMetric() {
				if m != nil {
					f.add(m)
				}
			}
		}
	}
	out := make([]*dto.MetricFamily, 0, len(fams))
	for _, f := range fams {
		out = append(out, f.proto())
	}
	slices.SortFunc(out, func(a, b *dto.MetricFamily) int { return strings.Compare(a.GetName(), b.GetName()) })
	return out, conflicts
}

// family accumulates one metric family across sources.
type family struct {
	name, help, unit string
	typ              dto.MetricType
	series           map[string]*series // by labelKey
}

// series accumulates one label set's values across sources.
type series struct {
	labels []*dto.LabelPair // sorted by name, our own copies

	value float64 // counter, gauge, untyped

	count      uint64  // histogram, summary sample count
	countFloat float64 // the same, for float histograms
	isFloat    bool    // a source had float histogram counts
	sum        float64
	buckets    [][]bucket // histogram: each contribution's finite buckets, sorted by bound
}

type bucket struct {
	bound float64
	count uint64
	float float64
}

func (f *family) add(m *dto.Metric) {
	labels := sortedLabels(m.GetLabel())
	key := labelKey(labels)
	s := f.series[key]
	if s == nil {
		s = &series{labels: labels}
		f.series[key] = s
	}
	switch f.typ {
	case dto.MetricType_COUNTER:
		s.value += m.GetCounter().GetValue()
	case dto.MetricType_GAUGE:
		s.value += m.GetGauge().GetValue()
	case dto.MetricType_UNTYPED:
		s.value += m.GetUntyped().GetValue()
	case dto.MetricType_SUMMARY:
		s.count += m.GetSummary().GetSampleCount()
		s.sum += m.GetSummary().GetSampleSum()
	case dto.MetricType_HISTOGRAM, dto.MetricType_GAUGE_HISTOGRAM:
		s.addHistogram(m.GetHistogram())
	}
}

func (s *series) addHistogram(h *dto.Histogram) {
	// As client_golang does: a histogram counts in floats when any of its
	// counts is a float, and then the integer fields are unset.
	if h.GetSampleCountFloat() > 0 {
		s.isFloat = true
	}
	s.count += h.GetSampleCount()
	s.countFloat += h.GetSampleCountFloat() + float64(h.GetSampleCount())
	s.sum += h.GetSampleSum()
	bs := make([]bucket, 0, len(h.GetBucket()))
	for _, b := range h.GetBucket() {
		if math.IsInf(b.GetUpperBound(), +1) {
			continue
		}
		if b.GetCumulativeCountFloat() > 0 {
			s.isFloat = true
		}
		bs = append(bs, bucket{
			bound: b.GetUpperBound(),
			count: b.GetCumulativeCount(),
			float: b.GetCumulativeCountFloat() + float64(b.GetCumulativeCount()),
		})
	}
	sort.SliceStable(bs, func(i, j int) bool { return bs[i].bound < bs[j].bound })
	s.buckets = append(s.buckets, bs)
}

func (f *family) proto() *dto.MetricFamily {
	mf := &dto.MetricFamily{Name: proto.String(f.name), Type: f.typ.Enum()}
	if f.help != "" {
		mf.Help = proto.String(f.help)
	}
	if f.unit != "" {
		mf.Unit = proto.String(f.unit)
	}
	all := make([]*series, 0, len(f.series))
	for _, s := range f.series {
		all = append(all, s)
	}
	slices.SortFunc(all, func(a, b *series) int { return compareLabels(a.labels, b.labels) })
	mf.Metric = make([]*dto.Metric, 0, len(all))
	for _, s := range all {
		m := &dto.Metric{Label: s.labels}
		switch f.typ {
		case dto.MetricType_COUNTER:
			m.Counter = &dto.Counter{Value: proto.Float64(s.value)}
		case dto.MetricType_GAUGE:
			m.Gauge = &dto.Gauge{Value: proto.Float64(s.value)}
		case dto.MetricType_UNTYPED:
			m.Untyped = &dto.Untyped{Value: proto.Float64(s.value)}
		case dto.MetricType_SUMMARY:
			m.Summary = &dto.Summary{SampleCount: proto.Uint64(s.count), SampleSum: proto.Float64(s.sum)}
		case dto.MetricType_HISTOGRAM, dto.MetricType_GAUGE_HISTOGRAM:
			m.Histogram = s.histogram()
		}
		mf.Metric = append(mf.Metric, m)
	}
	return mf
}

// histogram sums the contributions' buckets over the union of their
// bounds.
func (s *series) histogram() *dto.Histogram {
	h := &dto.Histogram{SampleSum: proto.Float64(s.sum)}
	if s.isFloat {
		h.SampleCountFloat = proto.Float64(s.countFloat)
	} else {
		h.SampleCount = proto.Uint64(s.count)
	}
	var bounds []float64
	for _, bs := range s.buckets {
		for _, b := range bs {
			bounds = append(bounds, b.bound)
		}
	}
	slices.Sort(bounds)
	bounds = slices.Compact(bounds)
	for _, bound := range bounds {
		var count uint64
		var float float64
		for _, bs := range s.buckets {
			// The contribution's largest bound at or below this one.
			i := sort.Search(len(bs), func(i int) bool { return bs[i].bound > bound }) - 1
			if i >= 0 {
				count += bs[i].count
				float += bs[i].float
			}
		}
		b := &dto.Bucket{UpperBound: proto.Float64(bound)}
		if s.isFloat {
			b.CumulativeCountFloat = proto.Float64(float)
		} else {
			b.CumulativeCount = proto.Uint64(count)
		}
		h.Bucket = append(h.Bucket, b)
	}
	return h
}

// sortedLabels copies labels sorted by name, as exposition and the
// registry's consistency checks expect.
func sortedLabels(in []*dto.LabelPair) []*dto.LabelPair {
	out := make([]*dto.LabelPair, 0, len(in))
	for _, lp := range in {
		if lp == nil {
			continue
		}
		out = append(out, &dto.LabelPair{Name: proto.String(lp.GetName()), Value: proto.String(lp.GetValue())})
	}
	slices.SortStableFunc(out, func(a, b *dto.LabelPair) int { return strings.Compare(a.GetName(), b.GetName()) })
	return out
}

// labelKey identifies a sorted label set. 0xff never occurs in UTF-8, so
// it cannot be part of a name or value.
func labelKey(labels []*dto.LabelPair) string {
	var b strings.Builder
	for _, lp := range labels {
		b.WriteString(lp.GetName())
		b.WriteByte(0xff)
		b.WriteString(lp.GetValue())
		b.WriteByte(0xff)
	}
	return b.String()
}

func compareLabels(a, b []*dto.LabelPair) int {
	for i := range min(len(a), len(b)) {
		if c := strings.Compare(a[i].GetName(), b[i].GetName()); c != 0 {
			return c
		}
		if c := strings.Compare(a[i].GetValue(), b[i].GetValue()); c != 0 {
			return c
		}
	}
	return len(a) - len(b)
}
