package main

import (
	"bufio"
	"errors"
	"flag"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/shardgate/shardgate/mqttwire"
)

// benchScenarios are the `shardgate bench` scenarios by name; each file
// that adds one registers it in an init function.
var benchScenarios = map[string]benchScenario{
	"idle":        {benchIdle, "memory and file descriptors per idle connection through a proxy process"},
	"propagation": {benchPropagation, "time from `consul maint` until N proxies route away"},
}

type benchScenario struct {
	run  func(args []string) error
	help string
}

func runBench(args []string) error {
	names := make([]string, 0, len(benchScenarios))
	for n := range benchScenarios {
		names = append(names, n)
	}
	slices.Sort(names)
	if len(args) < 1 {
		var b strings.Builder
		b.WriteString("usage: shardgate bench <scenario> [flags]; scenarios:")
		for _, n := range names {
			fmt.Fprintf(&b, "\n  %-12s %s", n, benchScenarios[n].help)
		}
		return errors.New(b.String())
	}
	if args[0] == "agent" {
		// One load-generating process of a multi-process scenario
		// (internal/loadgen.RunAgents): a job as JSON on stdin, its
		// report as JSON on stdout. Not for people, so not listed.
		return benchAgent(args[1:])
	}
	sc, ok := benchScenarios[args[0]]
	if !ok {
		return fmt.Errorf("unknown scenario %q (known: %s)", args[0], strings.Join(names, ", "))
	}
	return sc.run(args[1:])
}

// benchIdle measures what an idle device costs the proxy: it starts
// Mosquitto backends and a proxy as separate processes (the open-files limit
// is per process), opens MQTT connections through the proxy in steps, and
// after each step forces a GC in the proxy and reads its RSS and open fds
// from /proc. The per-connection figures are differences against the step
// with no connection, measured in the same run.
func benchIdle(args []string) error {
	fs := flag.NewFlagSet("bench idle", flag.ContinueOnError)
	conns := fs.Int("conns", 9000, "idle connections to hold at the last step")
	steps := fs.String("steps", "", "comma-separated connection counts to measure at (default 0, conns/9, conns/3, conns)")
	backends := fs.Int("backends", 3, "Mosquitto backends (one shard each)")
	mosquitto := fs.String("mosquitto", "", "mosquitto binary (default: from PATH or /usr/sbin)")
	parallel := fs.Int("parallel", 64, "connects in flight while filling a step")
	settle := fs.Duration("settle", 2*time.Second, "wait after a GC before reading RSS")
	hold := fs.Duration("hold", 0, "keep the connections open this long after the last step")
	if err := fs.Parse(args); err != nil {
		return err
	}
	counts, err := benchSteps(*steps, *conns)
	if err != nil {
		return err
	}
	mq, err := findMosquitto(*mosquitto)
	if err != nil {
		return err
	}
	procs, err := newBenchProcs("shardgate-bench-")
	if err != nil {
		return err
	}
	defer procs.stopAll(nil)

	var cfg strings.Builder
	proxyPort, adminPort := freePort(), freePort()
	fmt.Fprintf(&cfg, "listen: [\"127.0.0.1:%d\"]\nadmin: \"127.0.0.1:%d\"\nshards: %d\nevent_loops: 2\nhealth: {type: tcp, interval: 1s}\nlog: {level: warn}\nbackends:\n  static:\n", proxyPort, adminPort, *backends)
	for i := 0; i < *backends; i++ {
		_, addr, err := procs.startMosquitto(mq, i)
		if err != nil {
			return err
		}
		fmt.Fprintf(&cfg, "    - {id: mosquitto-%d, address: %q, shard: %d}\n", i, addr, i)
	}
	cfgPath := filepath.Join(procs.dir, "proxy.yaml")
	if err := os.WriteFile(cfgPath, []byte(cfg.String()), 0o644); err != nil {
		return err
	}
	self, err := os.Executable()
	if err != nil {
		return err
	}
	px, err := procs.start(os.Stderr, self, "proxy", "--config", cfgPath)
	if err != nil {
		return err
	}
	admin := fmt.Sprintf("127.0.0.1:%d", adminPort)
	if err := waitReady(admin, 10*time.Second); err != nil {
		return fmt.Errorf("proxy: %w", err)
	}
	target := fmt.Sprintf("127.0.0.1:%d", proxyPort)

	fmt.Printf("shardgate bench idle: %d Mosquitto backends, proxy pid %d (event_loops 2), clients in this process\n\n", *backends, px.Process.Pid)
	fmt.Printf("%8s %12s %12s %12s %8s %14s %14s %10s\n", "conns", "rss_kib", "rss_anon_kib", "heap_kib", "fds", "rss_B/conn", "anon_B/conn", "fds/conn")
	var held []net.Conn
	defer func() {
		for _, c := range held {
			c.Close()
		}
	}()
	var base procSample
	for i, n := range counts {
		if n > len(held) {
			more, err := openIdle(target, len(held), n-len(held), *parallel)
			held = append(held, more...)
			if err != nil {
				return fmt.Errorf("after %d connections: %w", len(held), err)
			}
		}
		s, err := sampleProxy(px.Process.Pid, admin, *settle)
		if err != nil {
			return err
		}
		if i == 0 {
			base = s
		}
		row := fmt.Sprintf("%8d %12d %12d %12d %8d", n, s.rss/1024, s.anon/1024, s.heap/1024, s.fds)
		if n > base.conns && n > 0 {
			d := float64(n - base.conns)
			row += fmt.Sprintf(" %14.0f %14.0f %10.2f", float64(s.rss-base.rss)/d, float64(s.anon-base.anon)/d, float64(s.fds-base.fds)/d)
		}
		s.conns = n
		if i == 0 {
			base = s
		}
		fmt.Println(row)
	}
	if *hold > 0 {
		time.Sleep(*hold)
	}
	// Every held connection must still be open: a proxy that dropped idle
	// devices would look cheap.
	alive := 0
	for _, c := range held {
		_ = c.SetReadDeadline(time.Now().Add(time.Millisecond))
		var b [1]byte
		if _, err := c.Read(b[:]); err != nil && errors.Is(err, os.ErrDeadlineExceeded) {
			alive++
		}
	}
	fmt.Printf("\n%d of %d connections still open at the end\n", alive, len(held))
	if alive != len(held) {
		return fmt.Errorf("%d connections were closed while idle", len(held)-alive)
	}
	return nil
}

func benchSteps(spec string, conns int) ([]int, error) {
	if spec == "" {
		return []int{0, conns / 9, conns / 3, conns}, nil
	}
	var out []int
	for _, f := range strings.Split(spec, ",") {
		n, err := strconv.Atoi(strings.TrimSpace(f))
		if err != nil || n < 0 {
			return nil, fmt.Errorf("--steps: %q is not a count", f)
		}
		if len(out) > 0 && n < out[len(out)-1] {
			return nil, errors.New("--steps must not decrease")
		}
		out = append(out, n)
	}
	return out, nil
}

// openIdle opens n MQTT 3.1.1 connections (keepalive 0: the device never
// needs to ping) and waits for each CONNACK.
func openIdle(target string, first, n, parallel int) ([]net.Conn, error) {
	out := make([]net.Conn, n)
	var next atomic.Int64
	var wg sync.WaitGroup
	errs := make(chan error, parallel)
	for w := 0; w < parallel; w++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for {
				i := int(next.Add(1) - 1)
				if i >= n {
					return
				}
				c, err := connectMQTT(target, fmt.Sprintf("bench-idle-%d", first+i))
				if err != nil {
					errs <- err
					return
				}
				out[i] = c
			}
		}()
	}
	wg.Wait()
	close(errs)
	var kept []net.Conn
	for _, c := range out {
		if c != nil {
			kept = append(kept, c)
		}
	}
	return kept, <-errs
}

func connectMQTT(target, id string) (net.Conn, error) {
	c, err := net.DialTimeout("tcp", target, 10*time.Second)
	if err != nil {
		return nil, err
	}
	pkt := mqttwire.AppendConnect(nil, mqttwire.ConnectOptions{Level: mqttwire.Level311, ClientID: id, CleanStart: true})
	_ = c.SetDeadline(time.Now().Add(10 * time.Second))
	if _, err := c.Write(pkt); err != nil {
		c.Close()
		return nil, err
	}
	var ack [4]byte
	if _, err := io.ReadFull(c, ack[:]); err != nil {
		c.Close()
		return nil, fmt.Errorf("%s: CONNACK: %w", id, err)
	}
	if _, code, _, err := mqttwire.ParseConnack(ack[:], mqttwire.Level311); err != nil || code != 0 {
		c.Close()
		return nil, fmt.Errorf("%s: CONNACK code %d (%v)", id, code, err)
	}
	_ = c.SetDeadline(time.Time{})
	return c, nil
}

type procSample struct {
	conns           int
	rss, anon, heap int64
	fds             int
}

// sampleProxy forces a GC in the proxy (the admin pprof heap endpoint with
// gc=1 runs runtime.GC), waits for the heap to settle and reads /proc.
func sampleProxy(pid int, admin string, settle time.Duration) (procSample, error) {
	var s procSample
	resp, err := http.Get("http://" + admin + "/debug/pprof/heap?gc=1")
	if err != nil {
		return s, err
	}
	io.Copy(io.Discard, resp.Body)
	resp.Body.Close()
	time.Sleep(settle)
	f, err := os.Open(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		return s, err
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		k, v, ok := strings.Cut(sc.Text(), ":")
		if !ok {
			continue
		}
		kb, _ := strconv.ParseInt(strings.TrimSuffix(strings.TrimSpace(v), " kB"), 10, 64)
		switch k {
		case "VmRSS":
			s.rss = kb * 1024
		case "RssAnon":
			s.anon = kb * 1024
		}
	}
	ents, err := os.ReadDir(fmt.Sprintf("/proc/%d/fd", pid))
	if err != nil {
		return s, err
	}
	s.fds = len(ents)
	s.heap, _ = scrapeGauge(admin, "go_memstats_heap_inuse_bytes")
	return s, nil
}

func scrapeGauge(admin, name string) (int64, error) {
	resp, err := http.Get("http://" + admin + "/metrics")
	if err != nil {
		return 0, err
	}
	defer resp.Body.Close()
	sc := bufio.NewScanner(resp.Body)
	for sc.Scan() {
		if v, ok := strings.CutPrefix(sc.Text(), name+" "); ok {
			f, err := strconv.ParseFloat(v, 64)
			return int64(f), err
		}
	}
	return 0, fmt.Errorf("metric %s not found", name)
}

func findMosquitto(flagPath string) (string, error) {
	if flagPath != "" {
		return flagPath, nil
	}
	if p, err := exec.LookPath("mosquitto"); err == nil {
		return p, nil
	}
	if _, err := os.Stat("/usr/sbin/mosquitto"); err == nil {
		return "/usr/sbin/mosquitto", nil
	}
	return "", errors.New("mosquitto not found (apt-get install mosquitto, or --mosquitto PATH)")
}

func freePort() int {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		panic(err)
	}
	defer l.Close()
	return l.Addr().(*net.TCPAddr).Port
}

func waitTCP(addr string, within time.Duration) error {
	deadline := time.Now().Add(within)
	for {
		c, err := net.DialTimeout("tcp", addr, time.Second)
		if err == nil {
			c.Close()
			return nil
		}
		if time.Now().After(deadline) {
			return err
		}
		time.Sleep(50 * time.Millisecond)
	}
}

func waitReady(admin string, within time.Duration) error {
	deadline := time.Now().Add(within)
	for {
		resp, err := http.Get("http://" + admin + "/readyz")
		if err == nil {
			resp.Body.Close()
			if resp.StatusCode == http.StatusOK {
				return nil
			}
			err = errors.New(resp.Status)
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("not ready after %s: %w", within, err)
		}
		time.Sleep(100 * time.Millisecond)
	}
}
