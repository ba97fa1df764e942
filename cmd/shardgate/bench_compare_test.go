package main

import (
	"bytes"
	"context"
	"encoding/xml"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"
)

// TestBenchCompareQuick runs `bench compare --quick --runs 1` through the
// built binary against real Mosquitto and HAProxy, and checks that the
// report holds every figure for every target with positive numbers, that
// the plots are SVG documents with their data drawn, and that no process
// the bench started outlives it.
func TestBenchCompareQuick(t *testing.T) {
	if testing.Short() {
		t.Skip("starts Mosquitto, HAProxy and a proxy")
	}
	// make test installs both (make deps).
	if _, err := findMosquitto(""); err != nil {
		t.Fatal(err)
	}
	if _, err := findHAProxy(""); err != nil {
		t.Fatal(err)
	}
	bin := buildShardgate(t)
	dir := t.TempDir()
	out, img := filepath.Join(dir, "report.md"), filepath.Join(dir, "img")
	ctx, cancel := context.WithTimeout(context.Background(), 4*time.Minute)
	defer cancel()
	cmd := exec.CommandContext(ctx, bin, "bench", "compare", "--quick", "--runs", "1", "--out", out, "--img-dir", img)
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	stdout, err := cmd.Output()
	if err != nil {
		t.Fatalf("bench compare: %v\n%s", err, stderr.String())
	}
	raw, err := os.ReadFile(out)
	if err != nil {
		t.Fatal(err)
	}
	report := string(raw)
	if !bytes.Contains(stdout, []byte("## 5. Connect storm")) {
		t.Error("the report is not printed on the terminal")
	}

	for _, want := range []string{"- Machine: ", "HAProxy version 2.", "mosquitto version", "- Command: `shardgate bench compare --quick --runs 1", "- Date: "} {
		if !strings.Contains(report, want) {
			t.Errorf("report lacks %q", want)
		}
	}

	// Every goal has a verdict.
	goals := section(t, report, "Targets")
	for _, row := range []string{"proxy CPU per 1000 connects", "proxy CPU per 100k messages", "proxy RSS per idle connection", "added p99 latency", "connect storm CONNACK p99"} {
		cells := tableRow(goals, row)
		if cells == nil {
			t.Errorf("no goal row %q", row)
			continue
		}
		if v := cells[len(cells)-1]; v != "**met**" && v != "**not met**" {
			t.Errorf("goal %q: verdict %q", row, v)
		}
	}

	for _, fig := range []struct {
		heading string
		targets []string
	}{
		{"1. Proxy CPU per 1000 connects", []string{"direct", "haproxy", "shardgate"}},
		{"2. Proxy CPU per 100k QoS 0 messages", []string{"direct", "haproxy", "shardgate"}},
		{"3. Idle memory and fds per connection", []string{"haproxy", "shardgate"}},
		{"4. Latency at light load", []string{"direct", "haproxy", "shardgate"}},
		{"5. Connect storm", []string{"direct", "haproxy", "shardgate"}},
	} {
		sec := section(t, report, fig.heading)
		for _, target := range fig.targets {
			cells := tableRow(sec, target)
			if cells == nil {
				t.Errorf("%s: no row for %s", fig.heading, target)
				continue
			}
			// The first column is the figure itself. Direct has no proxy
			// CPU: any positive figure in its row will do.
			positive := false
			for i, c := range cells[1:] {
				if v, ok := leadingNumber(c); ok && v > 0 {
					positive = true
				} else if i == 0 && target != "direct" {
					break
				}
			}
			if !positive {
				t.Errorf("%s, %s: no positive figure (row %q)", fig.heading, target, cells)
			}
		}
	}
	if cells := tableRow(section(t, report, "3. Idle memory"), "shardgate"); cells != nil {
		if v, ok := leadingNumber(cells[3]); !ok || v < 1.95 || v > 2.05 {
			t.Errorf("shardgate fds per idle connection %q, want 2", cells[3])
		}
	}

	for _, name := range []string{"compare-latency.svg", "compare-memory.svg"} {
		doc, err := os.ReadFile(filepath.Join(img, name))
		if err != nil {
			t.Fatal(err)
		}
		marks := svgMarks(t, name, doc)
		if marks == 0 {
			t.Errorf("%s: no data drawn", name)
		}
		if !strings.Contains(report, "](img/"+name+")") {
			t.Errorf("report does not show %s", name)
		}
	}

	// The children died with the run.
	m := regexp.MustCompile(`brokers \[([0-9 ]+)\], haproxy pid (\d+), shardgate pid (\d+)`).FindStringSubmatch(stderr.String())
	if m == nil {
		t.Fatalf("no process line in\n%s", stderr.String())
	}
	pids := append(strings.Fields(m[1]), m[2], m[3])
	for _, p := range pids {
		if _, err := os.Stat("/proc/" + p); err == nil {
			t.Errorf("process %s outlived the bench", p)
		}
	}
}

// section returns the text of the "## heading…" section of a report.
func section(t *testing.T, report, heading string) string {
	t.Helper()
	i := strings.Index(report, "\n## "+heading)
	if i < 0 {
		t.Fatalf("no section %q in the report:\n%s", heading, report)
	}
	s := report[i+1:]
	if j := strings.Index(s[3:], "\n## "); j >= 0 {
		s = s[:j+3]
	}
	return s
}

// tableRow returns the cells of the first table row whose first cell
// starts with name.
func tableRow(sec, name string) []string {
	for _, line := range strings.Split(sec, "\n") {
		if !strings.HasPrefix(line, "| ") {
			continue
		}
		cells := strings.Split(strings.Trim(line, "|"), "|")
		for i := range cells {
			cells[i] = strings.TrimSpace(cells[i])
		}
		if strings.HasPrefix(cells[0], name) {
			return cells
		}
	}
	return nil
}

func leadingNumber(cell string) (float64, bool) {
	f := strings.Fields(strings.TrimPrefix(cell, "+"))
	if len(f) == 0 {
		return 0, false
	}
	v, err := strconv.ParseFloat(strings.TrimSuffix(f[0], "%"), 64)
	return v, err == nil
}

// svgMarks parses doc as XML (failing on any error) with an <svg> root and
// counts its data marks (line points and bars).
func svgMarks(t *testing.T, name string, doc []byte) int {
	t.Helper()
	d := xml.NewDecoder(bytes.NewReader(doc))
	marks, root := 0, ""
	for {
		tok, err := d.Token()
		if err == io.EOF {
			break
		}
		if err != nil {
			t.Fatalf("%s is not well-formed XML: %v", name, err)
		}
		if se, ok := tok.(xml.StartElement); ok {
			if root == "" {
				root = se.Name.Local
			}
			for _, a := range se.Attr {
				if a.Name.Local == "class" && (a.Value == "point" || a.Value == "bar") {
					marks++
				}
			}
		}
	}
	if root != "svg" {
		t.Fatalf("%s: root element %q", name, root)
	}
	return marks
}

// TestCompareFiguresNamed: --figures picks figures in their usual order and
// refuses a name that is none.
func TestCompareFiguresNamed(t *testing.T) {
	all, err := compareFiguresNamed("")
	if err != nil || len(all) != len(compareFigures) {
		t.Fatalf("empty list: %d figures, %v; want all %d", len(all), err, len(compareFigures))
	}
	got, err := compareFiguresNamed("storm, latency")
	if err != nil {
		t.Fatal(err)
	}
	if len(got) != 2 || got[0].key != "latency" || got[1].key != "storm" {
		t.Errorf("storm, latency: got %v", got)
	}
	if _, err := compareFiguresNamed("latency,cpu"); err == nil || !strings.Contains(err.Error(), `"cpu"`) {
		t.Errorf("unknown figure: err %v", err)
	}
}

// TestCompareReportPartial: a report of the latency figure alone has its
// section and goal, and says of the others that they were not measured
// instead of judging them.
func TestCompareReportPartial(t *testing.T) {
	res := newCompareResults()
	for _, run := range []struct{ direct, haproxy, shardgate float64 }{{0.14, 0.22, 0.20}, {0.15, 0.24, 0.21}, {0.13, 0.21, 0.22}} {
		for name, p99 := range map[string]float64{"direct": run.direct, "haproxy": run.haproxy, "shardgate": run.shardgate} {
			res.add("latency", name, cmpMetrics{"p50": p99 / 2, "p90": p99 * 0.8, "p99": p99, "p999": p99 * 1.5, "samples": 6000})
		}
	}
	rep := compareReport{cfg: compareConfig{runs: 3, pingRate: 200, pingDevices: 4, pingTime: 30 * time.Second, idleSteps: []int{0, 100}}, res: res}
	md := rep.markdown()
	goals := section(t, md, "Targets")
	// Added p99 per run: haproxy 0.08, 0.09, 0.08; shardgate 0.06, 0.06, 0.09.
	if cells := tableRow(goals, "added p99 latency"); cells == nil || cells[len(cells)-1] != "**met**" || !strings.HasPrefix(cells[1], "+0.080") || !strings.HasPrefix(cells[2], "+0.060") {
		t.Errorf("latency goal row %q", cells)
	}
	for _, row := range []string{"proxy CPU per 1000 connects", "proxy CPU per 100k messages", "proxy RSS per idle connection", "connect storm CONNACK p99"} {
		if cells := tableRow(goals, row); cells == nil || cells[len(cells)-1] != "not measured" {
			t.Errorf("goal %q: %q, want not measured", row, cells)
		}
	}
	if !strings.Contains(md, "## 4. Latency at light load") {
		t.Error("no latency section")
	}
	for _, h := range []string{"## 1.", "## 2.", "## 3.", "## 5."} {
		if strings.Contains(md, h) {
			t.Errorf("section %s of a figure not measured", h)
		}
	}
}
