package main

import (
	"fmt"
	"io"
	"math"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/shardgate/shardgate/internal/svgplot"
)

// compareResults holds every run's metrics by figure and target, in run
// order, so per-run differences (target − direct in the same run) can be
// taken before the median.
type compareResults struct {
	runs map[string]map[string][]cmpMetrics
}

func newCompareResults() *compareResults {
	return &compareResults{runs: map[string]map[string][]cmpMetrics{}}
}

func (r *compareResults) add(fig, target string, m cmpMetrics) {
	if r.runs[fig] == nil {
		r.runs[fig] = map[string][]cmpMetrics{}
	}
	r.runs[fig][target] = append(r.runs[fig][target], m)
}

// median of one metric over the runs; NaN when it was never measured.
func (r *compareResults) median(fig, target, key string) float64 {
	var v []float64
	for _, m := range r.runs[fig][target] {
		if x, ok := m[key]; ok {
			v = append(v, x)
		}
	}
	return medianOf(v)
}

// medianAdded is the median over runs of target's metric minus direct's in
// the same run.
func (r *compareResults) medianAdded(fig, target, key string) float64 {
	t, d := r.runs[fig][target], r.runs[fig]["direct"]
	var v []float64
	for i := range min(len(t), len(d)) {
		a, ok1 := t[i][key]
		b, ok2 := d[i][key]
		if ok1 && ok2 {
			v = append(v, a-b)
		}
	}
	return medianOf(v)
}

func medianOf(v []float64) float64 {
	if len(v) == 0 {
		return math.NaN()
	}
	v = slices.Clone(v)
	slices.Sort(v)
	if len(v)%2 == 1 {
		return v[len(v)/2]
	}
	return (v[len(v)/2-1] + v[len(v)/2]) / 2
}

type comparePlot struct {
	title string
	path  string // where it was written
	link  string // path relative to the report, for the markdown image
}

type compareReport struct {
	cfg     compareConfig
	res     *compareResults
	command string
	machine string
	plots   []comparePlot
}

// fnum formats a figure with about three significant digits; "–" for a
// figure not measured.
func fnum(v float64) string {
	switch a := math.Abs(v); {
	case math.IsNaN(v):
		return "–"
	case v == math.Trunc(v) && a < 1e6:
		return strconv.FormatFloat(v, 'f', 0, 64)
	case a >= 100:
		return strconv.FormatFloat(v, 'f', 0, 64)
	case a >= 10:
		return strconv.FormatFloat(v, 'f', 1, 64)
	case a >= 1:
		return strconv.FormatFloat(v, 'f', 2, 64)
	}
	return strconv.FormatFloat(v, 'f', 3, 64)
}

func withUnit(v float64, unit string) string {
	if math.IsNaN(v) {
		return "–"
	}
	return fnum(v) + " " + unit
}

func signed(v float64, unit string) string {
	if math.IsNaN(v) {
		return "–"
	}
	if v >= 0 {
		return "+" + fnum(v) + " " + unit
	}
	return fnum(v) + " " + unit
}

func ratio(a, b float64) float64 {
	if math.IsNaN(a) || math.IsNaN(b) || b == 0 {
		return math.NaN()
	}
	return a / b
}

func times(v float64) string {
	if math.IsNaN(v) {
		return "–"
	}
	return strconv.FormatFloat(v, 'f', 2, 64) + "×"
}

// metOr says whether a goal is met; "not measured" when one of the figures
// it compares is missing (a figure left out with --figures).
func metOr(ok bool, figures ...float64) string {
	for _, v := range figures {
		if math.IsNaN(v) {
			return "not measured"
		}
	}
	if ok {
		return "**met**"
	}
	return "**not met**"
}

func (c *compareReport) markdown() string {
	var b strings.Builder
	r, cfg := c.res, &c.cfg
	last := cfg.idleSteps[len(cfg.idleSteps)-1]
	lastK := strconv.Itoa(last)
	p := func(format string, a ...any) { fmt.Fprintf(&b, format, a...) }

	p("# shardgate vs HAProxy vs direct-to-broker\n\n")
	p("- Date: %s\n", time.Now().UTC().Format("2006-01-02 15:04 MST"))
	p("- Machine: %s\n", c.machine)
	p("- Command: `%s`\n", strings.TrimSpace(c.command))
	p("- Setup: %d Mosquitto brokers (one shard each); shardgate `proxy` (`event_loops: 2`, `threads: auto`: one thread while it keeps up, see docs/perf-notes.md; static backends, TCP health checks every 1 s, log level warn); "+
		"HAProxy (`nbthread 2`, the client ID captured with `mqtt_field_value` into a variable, `balance hash` on it with `hash-type consistent`, "+
		"TCP checks every 1 s, client/server timeouts 1 h); direct: each device connects to the broker the routing contract gives its client ID, "+
		"the proxies' split of devices over brokers. Every process is separate; the MQTT 3.1.1 clients run in the bench process. "+
		"Within a run the targets take turns figure by figure (in the connect figure, in %d turns; in the latency figure, ping by ping); each figure is the median of %d runs. CPU is utime+stime of the whole process "+
		"(all threads) from `/proc/<pid>/stat`, 10 ms ticks; \"in the kernel\" is stime.\n\n", cmpBrokers, cfg.connectParts(), cfg.runs)

	// Targets, as ratios against HAProxy in the same run.
	hc, sc := r.median("connect", "haproxy", "proxy_ms"), r.median("connect", "shardgate", "proxy_ms")
	hm, sm := r.median("messages", "haproxy", "proxy_s"), r.median("messages", "shardgate", "proxy_s")
	hr, sr := r.median("idle", "haproxy", "rss@"+lastK), r.median("idle", "shardgate", "rss@"+lastK)
	sfd := r.median("idle", "shardgate", "fdsper@"+lastK)
	hl, sl := r.medianAdded("latency", "haproxy", "p99"), r.medianAdded("latency", "shardgate", "p99")
	hs, ss := r.median("storm", "haproxy", "p99"), r.median("storm", "shardgate", "p99")
	p("## Targets (shardgate against HAProxy in the same run)\n\n")
	p("| figure | HAProxy | shardgate | shardgate / HAProxy | goal | |\n|---|---:|---:|---:|---|---|\n")
	p("| proxy CPU per 1000 connects | %s | %s | %s | ≤ 0.8× | %s |\n", withUnit(hc, "ms"), withUnit(sc, "ms"), times(ratio(sc, hc)), metOr(ratio(sc, hc) <= 0.8, sc, hc))
	p("| proxy CPU per 100k messages at %d msg/s | %s | %s | %s | ≤ 0.8× | %s |\n", cfg.msgRate, withUnit(hm, "s"), withUnit(sm, "s"), times(ratio(sm, hm)), metOr(ratio(sm, hm) <= 0.8, sm, hm))
	p("| proxy RSS per idle connection (at %d) | %s | %s, %s fds | %s | ≤ 0.25× with 2 fds | %s |\n", last, withUnit(hr, "B"), withUnit(sr, "B"), fnum(sfd), times(ratio(sr, hr)), metOr(ratio(sr, hr) <= 0.25 && sfd <= 2.05, sr, hr, sfd))
	p("| added p99 latency at %d msg/s | %s | %s | %s | ≤ HAProxy's | %s |\n", cfg.pingRate, signed(hl, "ms"), signed(sl, "ms"), times(ratio(sl, hl)), metOr(sl <= hl, sl, hl))
	p("| connect storm CONNACK p99 (%d in flight) | %s | %s | %s | ≤ HAProxy's | %s |\n\n", cfg.stormInflight, withUnit(hs, "ms"), withUnit(ss, "ms"), times(ratio(ss, hs)), metOr(ss <= hs, ss, hs))

	targets := []string{"direct", "haproxy", "shardgate"}
	// A figure left out with --figures has no section.
	measured := func(fig string) bool { return r.runs[fig] != nil }

	if measured("connect") {
		p("## 1. Proxy CPU per 1000 connects\n\n")
		p("%d devices, %d in flight, each CONNECT→CONNACK→DISCONNECT then close; CPU from before the first connect until the proxy has closed the last connection. "+
			"The targets take turns, %d devices at a time, and each figure sums its turns.\n\n", cfg.connects, cfg.connectInflight, cfg.connects/cfg.connectParts())
		p("| target | proxy CPU per 1000 connects | of it in the kernel | brokers' CPU per 1000 connects | connects/s | failed |\n|---|---:|---:|---:|---:|---:|\n")
		for _, t := range targets {
			p("| %s | %s | %s | %s | %s | %s |\n", t, withUnit(r.median("connect", t, "proxy_ms"), "ms"), withUnit(r.median("connect", t, "proxy_sys_ms"), "ms"),
				withUnit(r.median("connect", t, "broker_ms"), "ms"), fnum(r.median("connect", t, "rate")), fnum(r.median("connect", t, "failed")))
		}
		p("\nshardgate / HAProxy: %s.\n\n", times(ratio(sc, hc)))
	}

	if measured("messages") {
		p("## 2. Proxy CPU per 100k QoS 0 messages at a fixed rate\n\n")
		p("%d devices, each publishing on its own topic and subscribed to it, all through the target, paced to %d msg/s in total for %s (64-byte payloads), "+
			"so every message crosses the proxy twice, as from a publisher to a subscriber; "+
			"CPU from the first publish until every message has come back.\n\n", cfg.msgPublishers, cfg.msgRate, cfg.msgTime)
		p("| target | proxy CPU per 100k messages | of it in the kernel | brokers' CPU per 100k messages | achieved msg/s | delivered |\n|---|---:|---:|---:|---:|---:|\n")
		for _, t := range targets {
			p("| %s | %s | %s | %s | %s | %s%% |\n", t, withUnit(r.median("messages", t, "proxy_s"), "s"), withUnit(r.median("messages", t, "proxy_sys_s"), "s"),
				withUnit(r.median("messages", t, "broker_s"), "s"), fnum(r.median("messages", t, "rate")), fnum(r.median("messages", t, "delivered")))
		}
		p("\nshardgate / HAProxy: %s.\n\n", times(ratio(sm, hm)))
	}

	if measured("idle") {
		p("## 3. Idle memory and fds per connection\n\n")
		p("Idle devices (keepalive 0) held in steps of %s; at each step, after a GC for shardgate (`/debug/pprof/heap?gc=1`) and %s, "+
			"VmRSS and RssAnon from `/proc/<pid>/status` and the fds in `/proc/<pid>/fd`. Per connection = (value at N − value at %d) / (N − %d). "+
			"Each run measures a newly started proxy process (HAProxy keeps the memory of earlier connections in its pools). Direct has no proxy. The last step stays under half the open-files limit of one process (%s).\n\n",
			joinInts(cfg.idleSteps), cfg.settle, cfg.idleSteps[0], cfg.idleSteps[0], "two sockets per device")
		p("| target | RSS per connection (at %d) | RssAnon per connection | fds per connection | RSS at %d |\n|---|---:|---:|---:|---:|\n", last, last)
		for _, t := range targets[1:] {
			p("| %s | %s | %s | %s | %s |\n", t, withUnit(r.median("idle", t, "rss@"+lastK), "B"), withUnit(r.median("idle", t, "anon@"+lastK), "B"),
				fnum(r.median("idle", t, "fdsper@"+lastK)), withUnit(r.median("idle", t, "rss_kib@"+lastK), "KiB"))
		}
		p("\nshardgate / HAProxy RSS per connection: %s.\n\n", times(ratio(sr, hr)))
		p("| connections | HAProxy RSS | HAProxy per connection | shardgate RSS | shardgate per connection |\n|---:|---:|---:|---:|---:|\n")
		for _, n := range cfg.idleSteps {
			k := strconv.Itoa(n)
			p("| %d | %s | %s | %s | %s |\n", n, withUnit(r.median("idle", "haproxy", "rss_kib@"+k), "KiB"), withUnit(r.median("idle", "haproxy", "rss@"+k), "B"),
				withUnit(r.median("idle", "shardgate", "rss_kib@"+k), "KiB"), withUnit(r.median("idle", "shardgate", "rss@"+k), "B"))
		}
		p("\n")
	}

	if measured("latency") {
		p("## 4. Latency at light load\n\n")
		p("%d devices per target, each publishing to its own topic and waiting for the message to come back through the same target, %d msg/s per target for %s; "+
			"round trip from the write to the receipt. The targets take turns ping by ping, one round trip at a time, so noise on the shared machine falls on all alike. "+
			"Added = target − direct in the same run.\n\n", cfg.pingDevices, cfg.pingRate, cfg.pingTime)
		p("| target | p50 | p90 | p99 | p99.9 | added p50 | added p99 | samples |\n|---|---:|---:|---:|---:|---:|---:|---:|\n")
		for _, t := range targets {
			a50, a99 := math.NaN(), math.NaN()
			if t != "direct" {
				a50, a99 = r.medianAdded("latency", t, "p50"), r.medianAdded("latency", t, "p99")
			}
			p("| %s | %s | %s | %s | %s | %s | %s | %s |\n", t, withUnit(r.median("latency", t, "p50"), "ms"), withUnit(r.median("latency", t, "p90"), "ms"),
				withUnit(r.median("latency", t, "p99"), "ms"), withUnit(r.median("latency", t, "p999"), "ms"), signed(a50, "ms"), signed(a99, "ms"),
				fnum(r.median("latency", t, "samples")))
		}
		p("\nshardgate / HAProxy added p99: %s.\n\n", times(ratio(sl, hl)))
	}

	if measured("storm") {
		p("## 5. Connect storm\n\n")
		p("%d devices connect with %d in flight and stay connected; time from dial to CONNACK of each.\n\n", cfg.storm, cfg.stormInflight)
		p("| target | CONNACK p50 | CONNACK p99 | max | all connected in | failed | p99 vs direct |\n|---|---:|---:|---:|---:|---:|---:|\n")
		dp99 := r.median("storm", "direct", "p99")
		for _, t := range targets {
			vs := "–"
			if t != "direct" {
				vs = times(ratio(r.median("storm", t, "p99"), dp99))
			}
			p("| %s | %s | %s | %s | %s | %s | %s |\n", t, withUnit(r.median("storm", t, "p50"), "ms"), withUnit(r.median("storm", t, "p99"), "ms"),
				withUnit(r.median("storm", t, "max"), "ms"), withUnit(r.median("storm", t, "total_s"), "s"), fnum(r.median("storm", t, "failed")), vs)
		}
		p("\nshardgate / HAProxy p99: %s.\n", times(ratio(ss, hs)))
	}

	if len(c.plots) > 0 {
		p("\n## Plots\n\n")
		for _, pl := range c.plots {
			link := pl.link
			if link == "" {
				link = pl.path
			}
			p("![%s](%s)\n\n", pl.title, filepath.ToSlash(link))
		}
	}
	return b.String()
}

func joinInts(v []int) string {
	s := make([]string, len(v))
	for i, n := range v {
		s[i] = strconv.Itoa(n)
	}
	return strings.Join(s, ", ")
}

// writeComparePlots writes the latency percentiles per target and the
// memory per connection against the connection count.
func writeComparePlots(dir string, cfg *compareConfig, r *compareResults) ([]comparePlot, error) {
	lat := svgplot.BarChart{
		Title:      fmt.Sprintf("Round-trip latency at %d msg/s (median of %d runs)", cfg.pingRate, cfg.runs),
		YLabel:     "milliseconds",
		Categories: []string{"p50", "p90", "p99", "p99.9"},
	}
	for _, t := range []string{"direct", "haproxy", "shardgate"} {
		s := svgplot.BarSeries{Name: t}
		for _, k := range []string{"p50", "p90", "p99", "p999"} {
			s.Values = append(s.Values, r.median("latency", t, k))
		}
		lat.Series = append(lat.Series, s)
	}
	mem := svgplot.LineChart{
		Title:  fmt.Sprintf("Proxy RSS per idle connection (median of %d runs)", cfg.runs),
		XLabel: "idle connections",
		YLabel: "bytes per connection",
	}
	for _, t := range []string{"haproxy", "shardgate"} {
		s := svgplot.Series{Name: t}
		for _, n := range cfg.idleSteps[1:] {
			s.X = append(s.X, float64(n))
			s.Y = append(s.Y, r.median("idle", t, "rss@"+strconv.Itoa(n)))
		}
		mem.Series = append(mem.Series, s)
	}
	var out []comparePlot
	for _, pl := range []struct {
		fig, title, file string
		chart            io.WriterTo
	}{
		{"latency", lat.Title, "compare-latency.svg", lat},
		{"idle", mem.Title, "compare-memory.svg", mem},
	} {
		if r.runs[pl.fig] == nil {
			continue
		}
		path := filepath.Join(dir, pl.file)
		f, err := os.Create(path)
		if err != nil {
			return nil, err
		}
		_, err = pl.chart.WriteTo(f)
		if cerr := f.Close(); err == nil {
			err = cerr
		}
		if err != nil {
			return nil, fmt.Errorf("write %s: %w", path, err)
		}
		out = append(out, comparePlot{title: pl.title, path: path})
	}
	return out, nil
}
