package svgplot

import (
	"bytes"
	"encoding/xml"
	"io"
	"math"
	"strconv"
	"strings"
	"testing"
)

// element is one start tag of a parsed document.
type element struct {
	name  string
	attrs map[string]string
}

// parse decodes doc as XML to the end, failing on any syntax error, and
// returns its elements in document order.
func parse(t *testing.T, doc []byte) []element {
	t.Helper()
	d := xml.NewDecoder(bytes.NewReader(doc))
	d.Strict = true
	var out []element
	depth := 0
	for {
		tok, err := d.Token()
		if err == io.EOF {
			break
		}
		if err != nil {
			t.Fatalf("not well-formed XML: %v\n%s", err, doc)
		}
		switch tok := tok.(type) {
		case xml.StartElement:
			depth++
			e := element{name: tok.Name.Local, attrs: map[string]string{}}
			for _, a := range tok.Attr {
				e.attrs[a.Name.Local] = a.Value
			}
			out = append(out, e)
		case xml.EndElement:
			depth--
		}
	}
	if depth != 0 {
		t.Fatalf("unbalanced elements (depth %d at EOF)", depth)
	}
	if len(out) == 0 || out[0].name != "svg" {
		t.Fatalf("root is not <svg>: %+v", out)
	}
	return out
}

func attr(t *testing.T, e element, k string) float64 {
	t.Helper()
	v, err := strconv.ParseFloat(e.attrs[k], 64)
	if err != nil {
		t.Fatalf("<%s> %s=%q: %v", e.name, k, e.attrs[k], err)
	}
	return v
}

type rect struct{ x, y, w, h float64 }

func (r rect) contains(x, y float64) bool {
	const eps = 0.11 // coordinates are written with one decimal
	return x >= r.x-eps && x <= r.x+r.w+eps && y >= r.y-eps && y <= r.y+r.h+eps
}

func plotRect(t *testing.T, els []element) rect {
	t.Helper()
	for _, e := range els {
		if e.name == "rect" && e.attrs["class"] == "plot" {
			return rect{attr(t, e, "x"), attr(t, e, "y"), attr(t, e, "width"), attr(t, e, "height")}
		}
	}
	t.Fatal("no plot rectangle")
	return rect{}
}

func render(t *testing.T, w io.WriterTo) []byte {
	t.Helper()
	var b bytes.Buffer
	n, err := w.WriteTo(&b)
	if err != nil || n != int64(b.Len()) {
		t.Fatalf("WriteTo = %d, %v; wrote %d bytes", n, err, b.Len())
	}
	return b.Bytes()
}

func TestLineChartPointsInPlotAndOrdered(t *testing.T) {
	tests := []struct {
		name   string
		series []Series
		points int
	}{
		{"two series", []Series{
			{Name: "haproxy", X: []float64{2000, 5000, 9500}, Y: []float64{3900, 3600, 3500}},
			{Name: "shardgate", X: []float64{2000, 5000, 9500}, Y: []float64{1500, 800, 525}},
		}, 6},
		{"single point", []Series{{Name: "one", X: []float64{7}, Y: []float64{7}}}, 1},
		{"negative and tiny values", []Series{{Name: "d", X: []float64{0, 1, 2}, Y: []float64{-0.004, 0.001, 0.003}}}, 3},
		{"NaN and Inf skipped", []Series{{Name: "n", X: []float64{1, 2, 3, 4}, Y: []float64{1, math.NaN(), math.Inf(1), 4}}}, 2},
		{"no data", nil, 0},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			els := parse(t, render(t, LineChart{Title: "t", XLabel: "x", YLabel: "y", Series: tc.series}))
			plot := plotRect(t, els)
			var pts [][2]float64
			for _, e := range els {
				if e.name == "circle" && e.attrs["class"] == "point" {
					x, y := attr(t, e, "cx"), attr(t, e, "cy")
					if !plot.contains(x, y) {
						t.Errorf("point (%v,%v) outside plot %+v", x, y, plot)
					}
					pts = append(pts, [2]float64{x, y})
				}
			}
			if len(pts) != tc.points {
				t.Fatalf("%d points drawn, want %d", len(pts), tc.points)
			}
			// Within a series, a larger value must be drawn higher (smaller
			// y) and a larger x further right.
			i := 0
			for _, s := range tc.series {
				var xs, ys []float64
				for k := range s.X {
					if finite(s.X[k]) && finite(s.Y[k]) {
						xs, ys = append(xs, s.X[k]), append(ys, s.Y[k])
					}
				}
				for k := 1; k < len(xs); k++ {
					a, b := pts[i+k-1], pts[i+k]
					if (xs[k] > xs[k-1]) != (b[0] > a[0]) {
						t.Errorf("%s: x %v→%v drawn at %v→%v", s.Name, xs[k-1], xs[k], a[0], b[0])
					}
					if ys[k] != ys[k-1] && (ys[k] > ys[k-1]) != (b[1] < a[1]) {
						t.Errorf("%s: y %v→%v drawn at %v→%v", s.Name, ys[k-1], ys[k], a[1], b[1])
					}
				}
				i += len(xs)
			}
		})
	}
}

func TestBarChartBarsInPlotAndProportional(t *testing.T) {
	c := BarChart{
		Title: "latency <added> & more", YLabel: "ms",
		Categories: []string{"p50", "p90", "p99", "p99.9"},
		Series: []BarSeries{
			{Name: "direct", Values: []float64{0.1, 0.2, 0.4, 0.8}},
			{Name: "haproxy", Values: []float64{0.2, 0.3, 0.5, 1.6}},
			{Name: "shardgate", Values: []float64{0.15, 0.25, 0.45, math.NaN()}},
		},
	}
	doc := render(t, c)
	els := parse(t, doc)
	plot := plotRect(t, els)
	var bars []rect
	for _, e := range els {
		if e.name == "rect" && e.attrs["class"] == "bar" {
			r := rect{attr(t, e, "x"), attr(t, e, "y"), attr(t, e, "width"), attr(t, e, "height")}
			if !plot.contains(r.x, r.y) || !plot.contains(r.x+r.w, r.y+r.h) {
				t.Errorf("bar %+v outside plot %+v", r, plot)
			}
			bars = append(bars, r)
		}
	}
	if len(bars) != 11 { // 12 values, one NaN
		t.Fatalf("%d bars, want 11", len(bars))
	}
	// Bars start at zero, so heights are proportional to values: haproxy's
	// p99.9 (1.6) is twice direct's (0.8); bars go category by category.
	if got := bars[10].h / bars[9].h; math.Abs(got-2) > 0.02 {
		t.Errorf("height ratio %v, want 2", got)
	}
	if !strings.Contains(string(doc), "latency &lt;added&gt; &amp; more") {
		t.Error("title not escaped")
	}
}

func TestNiceAxisCoversRange(t *testing.T) {
	for _, r := range [][2]float64{{0, 1}, {0, 0}, {3, 7}, {-5, 12}, {0, 0.0123}, {100, 98765}} {
		lo, hi, ticks := niceAxis(r[0], r[1])
		if lo > math.Min(r[0], 0) || hi < r[1] || hi <= lo {
			t.Errorf("niceAxis(%v) = [%v, %v], does not cover it", r, lo, hi)
		}
		if len(ticks) < 2 || len(ticks) > 12 || ticks[0] != lo || math.Abs(ticks[len(ticks)-1]-hi) > 1e-9*math.Abs(hi) {
			t.Errorf("niceAxis(%v) ticks %v for [%v, %v]", r, ticks, lo, hi)
		}
	}
}
