// Package svgplot writes small line and grouped-bar charts as standalone SVG
// documents with the standard library only, for benchmark reports that are
// committed next to the markdown that shows them.
//
// The output is deterministic for a given input (no timestamps, no random
// IDs), so regenerating a plot from the same figures leaves git clean.
// Every data point is drawn inside the plot rectangle, which is marked
// class="plot"; line-chart markers are circles of class="point" and bars
// are rectangles of class="bar", so a reader (or a test) can find them.
package svgplot

import (
	"bytes"
	"encoding/xml"
	"fmt"
	"io"
	"math"
	"strconv"
)

// Palette colours series in order, repeating when there are more series.
var Palette = []string{"#4477aa", "#ee6677", "#228833", "#ccbb44", "#66ccee", "#aa3377"}

// Series is one named line: point i is (X[i], Y[i]). X and Y must have the
// same length; NaN and infinite values are skipped.
type Series struct {
	Name string
	X, Y []float64
}

// LineChart draws series against a shared numeric X axis. Both axes start
// at 0 unless a value is negative, so magnitudes compare honestly.
type LineChart struct {
	Title  string
	XLabel string
	YLabel string
	Series []Series
	// Width and Height are the document size in pixels. Default 640×400.
	Width, Height int
}

// BarSeries is one named set of bars, Values[i] belonging to category i.
type BarSeries struct {
	Name   string
	Values []float64
}

// BarChart draws, for each category, one bar per series side by side.
type BarChart struct {
	Title      string
	YLabel     string
	Categories []string
	Series     []BarSeries
	// Width and Height are the document size in pixels. Default 640×400.
	Width, Height int
}

// Margins around the plot rectangle: room for tick labels, axis titles and
// the legend on the right.
const (
	marginLeft   = 70
	marginRight  = 130
	marginTop    = 40
	marginBottom = 55
)

func size(w, h int) (int, int) {
	if w <= 0 {
		w = 640
	}
	if h <= 0 {
		h = 400
	}
	return w, h
}

// frame is the mapping of data values onto the plot rectangle.
type frame struct {
	x0, y0, w, h       float64 // plot rectangle in pixels (y0 is the top)
	xmin, xmax         float64
	ymin, ymax         float64
	xticks, yticks     []float64
	docWidth, docHight int
}

func (f *frame) px(x float64) float64 {
	if f.xmax == f.xmin {
		return f.x0 + f.w/2
	}
	return f.x0 + (x-f.xmin)/(f.xmax-f.xmin)*f.w
}

func (f *frame) py(y float64) float64 {
	if f.ymax == f.ymin {
		return f.y0 + f.h/2
	}
	return f.y0 + f.h - (y-f.ymin)/(f.ymax-f.ymin)*f.h
}

func newFrame(w, h int) *frame {
	w, h = size(w, h)
	return &frame{
		x0: marginLeft, y0: marginTop,
		w: float64(w - marginLeft - marginRight), h: float64(h - marginTop - marginBottom),
		docWidth: w, docHight: h,
	}
}

// niceAxis widens [lo, hi] to round tick values (1, 2 or 5 × 10^k), with
// about five ticks.
func niceAxis(lo, hi float64) (float64, float64, []float64) {
	if lo > 0 {
		lo = 0
	}
	if hi < 0 {
		hi = 0
	}
	if hi == lo {
		hi = lo + 1
	}
	raw := (hi - lo) / 5
	mag := math.Pow(10, math.Floor(math.Log10(raw)))
	step := mag
	for _, m := range []float64{1, 2, 5, 10} {
		if m*mag >= raw {
			step = m * mag
			break
		}
	}
	lo = math.Floor(lo/step) * step
	hi = math.Ceil(hi/step) * step
	var ticks []float64
	for v := lo; v <= hi+step/2; v += step {
		ticks = append(ticks, math.Round(v/step)*step)
	}
	return lo, hi, ticks
}

func finite(v float64) bool { return !math.IsNaN(v) && !math.IsInf(v, 0) }

// svgWriter accumulates the document; text goes through xml.EscapeText.
type svgWriter struct{ b bytes.Buffer }

func (s *svgWriter) printf(format string, a ...any) { fmt.Fprintf(&s.b, format, a...) }

func (s *svgWriter) text(x, y float64, anchor, extra, txt string) {
	s.printf(`<text x="%s" y="%s" text-anchor="%s"%s>`, num(x), num(y), anchor, extra)
	_ = xml.EscapeText(&s.b, []byte(txt))
	s.b.WriteString("</text>\n")
}

func num(v float64) string { return strconv.FormatFloat(v, 'f', 1, 64) }

// label formats a tick value compactly: 12000 as 12k, 0.25 as 0.25.
func label(v float64) string {
	a := math.Abs(v)
	switch {
	case a >= 1e6 && math.Mod(v, 1e5) == 0:
		return strconv.FormatFloat(v/1e6, 'f', -1, 64) + "M"
	case a >= 1e3 && math.Mod(v, 100) == 0:
		return strconv.FormatFloat(v/1e3, 'f', -1, 64) + "k"
	}
	return strconv.FormatFloat(v, 'g', 4, 64)
}

func (s *svgWriter) open(f *frame, title string) {
	s.printf(`<svg xmlns="http://www.w3.org/2000/svg" width="%d" height="%d" viewBox="0 0 %d %d" font-family="sans-serif" font-size="12">`+"\n",
		f.docWidth, f.docHight, f.docWidth, f.docHight)
	s.printf(`<rect width="%d" height="%d" fill="white"/>`+"\n", f.docWidth, f.docHight)
	s.text(float64(f.docWidth)/2, 22, "middle", ` font-size="15"`, title)
	s.printf(`<rect class="plot" x="%s" y="%s" width="%s" height="%s" fill="none" stroke="#888"/>`+"\n",
		num(f.x0), num(f.y0), num(f.w), num(f.h))
}

func (s *svgWriter) yAxis(f *frame, ylabel string) {
	for _, t := range f.yticks {
		y := f.py(t)
		s.printf(`<line x1="%s" y1="%s" x2="%s" y2="%s" stroke="#ddd"/>`+"\n", num(f.x0), num(y), num(f.x0+f.w), num(y))
		s.text(f.x0-6, y+4, "end", "", label(t))
	}
	cy := f.y0 + f.h/2
	s.text(16, cy, "middle", fmt.Sprintf(` transform="rotate(-90 16 %s)"`, num(cy)), ylabel)
}

func (s *svgWriter) legend(f *frame, names []string) {
	x := f.x0 + f.w + 12
	for i, n := range names {
		y := f.y0 + 10 + float64(i)*18
		s.printf(`<rect x="%s" y="%s" width="12" height="12" fill="%s"/>`+"\n", num(x), num(y-10), Palette[i%len(Palette)])
		s.text(x+18, y, "start", "", n)
	}
}

// WriteTo writes the chart as an SVG document.
func (c LineChart) WriteTo(w io.Writer) (int64, error) {
	f := newFrame(c.Width, c.Height)
	xmin, xmax, ymin, ymax := math.Inf(1), math.Inf(-1), math.Inf(1), math.Inf(-1)
	for _, s := range c.Series {
		for i := range min(len(s.X), len(s.Y)) {
			if !finite(s.X[i]) || !finite(s.Y[i]) {
				continue
			}
			xmin, xmax = math.Min(xmin, s.X[i]), math.Max(xmax, s.X[i])
			ymin, ymax = math.Min(ymin, s.Y[i]), math.Max(ymax, s.Y[i])
		}
	}
	if xmin > xmax { // no finite point at all
		xmin, xmax, ymin, ymax = 0, 1, 0, 1
	}
	f.xmin, f.xmax, f.xticks = niceAxis(xmin, xmax)
	f.ymin, f.ymax, f.yticks = niceAxis(ymin, ymax)

	var s svgWriter
	s.open(f, c.Title)
	s.yAxis(f, c.YLabel)
	for _, t := range f.xticks {
		x := f.px(t)
		s.printf(`<line x1="%s" y1="%s" x2="%s" y2="%s" stroke="#ddd"/>`+"\n", num(x), num(f.y0), num(x), num(f.y0+f.h))
		s.text(x, f.y0+f.h+16, "middle", "", label(t))
	}
	s.text(f.x0+f.w/2, f.y0+f.h+40, "middle", "", c.XLabel)
	names := make([]string, len(c.Series))
	for si, ser := range c.Series {
		names[si] = ser.Name
		col := Palette[si%len(Palette)]
		var pts bytes.Buffer
		for i := range min(len(ser.X), len(ser.Y)) {
			if !finite(ser.X[i]) || !finite(ser.Y[i]) {
				continue
			}
			fmt.Fprintf(&pts, "%s,%s ", num(f.px(ser.X[i])), num(f.py(ser.Y[i])))
		}
		s.printf(`<polyline fill="none" stroke="%s" stroke-width="2" points="%s"/>`+"\n", col, bytes.TrimSpace(pts.Bytes()))
		for i := range min(len(ser.X), len(ser.Y)) {
			if !finite(ser.X[i]) || !finite(ser.Y[i]) {
				continue
			}
			s.printf(`<circle class="point" cx="%s" cy="%s" r="3" fill="%s"><title>`, num(f.px(ser.X[i])), num(f.py(ser.Y[i])), col)
			_ = xml.EscapeText(&s.b, []byte(fmt.Sprintf("%s: %s, %s", ser.Name, label(ser.X[i]), strconv.FormatFloat(ser.Y[i], 'g', 4, 64))))
			s.b.WriteString("</title></circle>\n")
		}
	}
	s.legend(f, names)
	s.b.WriteString("</svg>\n")
	return s.b.WriteTo(w)
}

// WriteTo writes the chart as an SVG document.
func (c BarChart) WriteTo(w io.Writer) (int64, error) {
	f := newFrame(c.Width, c.Height)
	ymin, ymax := 0.0, 0.0
	for _, s := range c.Series {
		for _, v := range s.Values {
			if finite(v) {
				ymin, ymax = math.Min(ymin, v), math.Max(ymax, v)
			}
		}
	}
	f.ymin, f.ymax, f.yticks = niceAxis(ymin, ymax)

	var s svgWriter
	s.open(f, c.Title)
	s.yAxis(f, c.YLabel)
	groupW := f.w / float64(max(1, len(c.Categories)))
	barW := groupW * 0.8 / float64(max(1, len(c.Series)))
	zero := f.py(0)
	names := make([]string, len(c.Series))
	for ci, cat := range c.Categories {
		gx := f.x0 + float64(ci)*groupW + groupW*0.1
		s.text(f.x0+(float64(ci)+0.5)*groupW, f.y0+f.h+16, "middle", "", cat)
		for si, ser := range c.Series {
			names[si] = ser.Name
			if ci >= len(ser.Values) || !finite(ser.Values[ci]) {
				continue
			}
			v := ser.Values[ci]
			top, bottom := f.py(v), zero
			if top > bottom {
				top, bottom = bottom, top
			}
			s.printf(`<rect class="bar" x="%s" y="%s" width="%s" height="%s" fill="%s"><title>`,
				num(gx+float64(si)*barW), num(top), num(barW), num(bottom-top), Palette[si%len(Palette)])
			_ = xml.EscapeText(&s.b, []byte(fmt.Sprintf("%s %s: %s", ser.Name, cat, strconv.FormatFloat(v, 'g', 4, 64))))
			s.b.WriteString("</title></rect>\n")
		}
	}
	for si, ser := range c.Series {
		names[si] = ser.Name
	}
	s.legend(f, names)
	s.b.WriteString("</svg>\n")
	return s.b.WriteTo(w)
}
