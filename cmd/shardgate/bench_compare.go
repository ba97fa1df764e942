package main

import (
	"errors"
	"flag"
	"fmt"
	"io"
	"net/http"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/shardgate/shardgate/backend"
)

func init() {
	benchScenarios["compare"] = benchScenario{benchCompare, "shardgate vs HAProxy 2.6 vs direct-to-broker: CPU, idle memory, latency, connect storm; a markdown report with plots"}
}

// compareConfig holds the workload sizes of `bench compare`.
type compareConfig struct {
	runs            int
	connects        int
	connectInflight int
	msgRate         int
	msgPublishers   int
	msgTime         time.Duration
	idleSteps       []int
	idleParallel    int
	settle          time.Duration
	pingRate        int
	pingDevices     int
	pingTime        time.Duration
	storm           int
	stormInflight   int
}

// benchCompare measures shardgate against HAProxy 2.6 configured to keep a
// client ID on one broker, and against devices connecting straight to the
// broker their client ID maps to, on the same Mosquitto backends in one
// run. Within each run the targets take turns figure by figure, so drift of
// a shared machine spreads over all of them; each figure is the median of
// the runs.
func benchCompare(args []string) error {
	fs := flag.NewFlagSet("bench compare", flag.ContinueOnError)
	var cfg compareConfig
	out := fs.String("out", "", "write the markdown report to this file (it is printed either way)")
	section := fs.String("section", "", "with --out: replace only this named section of the file (between its <!-- bench:NAME --> markers, appended if absent), headings one level down")
	imgDir := fs.String("img-dir", "", "write the SVG plots here (default: the directory of --out; no plots without either)")
	fs.IntVar(&cfg.runs, "runs", 3, "runs per figure; each figure is the median")
	quick := fs.Bool("quick", false, "small counts and short times, for a test (flags given explicitly still win)")
	mosquittoFlag := fs.String("mosquitto", "", "mosquitto binary (default: from PATH or /usr/sbin)")
	haproxyFlag := fs.String("haproxy", "", "haproxy binary (default: from PATH or /usr/sbin)")
	fs.IntVar(&cfg.connects, "connects", 5000, "devices doing CONNECT→CONNACK→DISCONNECT for the connect CPU figure")
	fs.IntVar(&cfg.connectInflight, "connect-inflight", 16, "connects in flight for the connect CPU figure")
	fs.IntVar(&cfg.msgRate, "msg-rate", 20000, "QoS 0 messages per second, all publishers together")
	fs.IntVar(&cfg.msgPublishers, "msg-devices", 100, "devices of the message figure, each publishing on its own topic and subscribed to it")
	fs.DurationVar(&cfg.msgTime, "msg-time", 5*time.Second, "how long the publishers publish")
	figures := fs.String("figures", "", "measure only these figures, comma-separated (connect, messages, idle, latency, storm; default all): the others read \"not measured\"")
	steps := fs.String("idle-steps", "0,2000,5000,9500", "idle connection counts to measure memory at; the first is the baseline")
	fs.IntVar(&cfg.idleParallel, "idle-parallel", 64, "connects in flight while filling an idle step")
	fs.DurationVar(&cfg.settle, "settle", 2*time.Second, "wait after a GC (shardgate) or the last connect (HAProxy) before reading RSS")
	fs.IntVar(&cfg.pingRate, "ping-rate", 200, "ping-pong messages per second per target for the latency figure (the targets take turns)")
	fs.IntVar(&cfg.pingDevices, "ping-devices", 4, "devices per target sharing its ping-pong rate")
	fs.DurationVar(&cfg.pingTime, "ping-time", 30*time.Second, "how long the ping-pong runs, all targets in turn (30 s at 200 msg/s: 6000 round trips per target, so p99 rests on 60 of them)")
	fs.IntVar(&cfg.storm, "storm", 5000, "devices connecting at once in the connect storm")
	fs.IntVar(&cfg.stormInflight, "storm-inflight", 512, "connects in flight in the connect storm")
	if err := fs.Parse(args); err != nil {
		return err
	}
	if *quick {
		set := map[string]bool{}
		fs.Visit(func(f *flag.Flag) { set[f.Name] = true })
		for name, v := range map[string]string{
			"connects": "1000", "msg-rate": "2000", "msg-devices": "10", "msg-time": "2s",
			"idle-steps": "0,100,300", "settle": "300ms", "ping-rate": "100", "ping-devices": "2",
			"ping-time": "1s", "storm": "300", "storm-inflight": "64",
		} {
			if !set[name] {
				if err := fs.Set(name, v); err != nil {
					return err
				}
			}
		}
	}
	var err error
	if cfg.idleSteps, err = benchSteps(*steps, 0); err != nil {
		return fmt.Errorf("--idle-steps: %w", err)
	}
	if len(cfg.idleSteps) < 2 {
		return errors.New("--idle-steps needs a baseline and at least one more count")
	}
	var lim syscall.Rlimit
	if err := syscall.Getrlimit(syscall.RLIMIT_NOFILE, &lim); err == nil {
		// A proxy holds two sockets per device: past half the per-process
		// limit it refuses devices and the memory figure would be wrong.
		if top := cfg.idleSteps[len(cfg.idleSteps)-1]; uint64(2*top+100) > lim.Max {
			return fmt.Errorf("--idle-steps: %d idle devices need %d fds in one proxy process, over the open-files limit %d", top, 2*top+100, lim.Max)
		}
	}
	if cfg.runs < 1 || cfg.connects < 1 || cfg.msgRate < 1 || cfg.msgPublishers < 1 || cfg.pingRate < 1 || cfg.pingDevices < 1 || cfg.storm < 1 {
		return errors.New("bench compare: counts and rates must be at least 1")
	}
	if *imgDir == "" && *out != "" {
		*imgDir = filepath.Dir(*out)
	}
	figs, err := compareFiguresNamed(*figures)
	if err != nil {
		return err
	}
	mq, err := findMosquitto(*mosquittoFlag)
	if err != nil {
		return err
	}
	hap, err := findHAProxy(*haproxyFlag)
	if err != nil {
		return err
	}

	env, err := startCompareEnv(mq, hap)
	if err != nil {
		return err
	}
	defer env.stop()
	fmt.Fprintf(os.Stderr, "bench compare: brokers %v, haproxy pid %d, shardgate pid %d\n", env.brokerPids(), env.targets[1].pid, env.targets[2].pid)

	res := newCompareResults()
	for run := 0; run < cfg.runs; run++ {
		for _, fig := range figs {
			if fig.runAll != nil {
				fmt.Fprintf(os.Stderr, "run %d/%d: %s through every target, interleaved\n", run+1, cfg.runs, fig.name)
				ms, err := fig.runAll(env, &cfg, run)
				if err != nil {
					return fmt.Errorf("%s (run %d): %w", fig.name, run+1, err)
				}
				for _, t := range env.targets {
					res.add(fig.key, t.name, ms[t.name])
					if err := env.quiesce(t); err != nil {
						return fmt.Errorf("after %s through %s: %w", fig.name, t.name, err)
					}
				}
				continue
			}
			for _, t := range env.targets {
				if fig.proxyOnly && t.pid == 0 {
					continue
				}
				fmt.Fprintf(os.Stderr, "run %d/%d: %s through %s\n", run+1, cfg.runs, fig.name, t.name)
				m, err := fig.run(env, t, &cfg, run)
				if err != nil {
					return fmt.Errorf("%s through %s (run %d): %w", fig.name, t.name, run+1, err)
				}
				res.add(fig.key, t.name, m)
				if err := env.quiesce(t); err != nil {
					return fmt.Errorf("after %s through %s: %w", fig.name, t.name, err)
				}
			}
		}
	}

	rep := compareReport{cfg: cfg, res: res, command: "shardgate bench compare " + strings.Join(args, " "), machine: describeMachine(mq, hap)}
	if *imgDir != "" {
		if err := os.MkdirAll(*imgDir, 0o755); err != nil {
			return err
		}
		if rep.plots, err = writeComparePlots(*imgDir, &cfg, res); err != nil {
			return err
		}
		if *out != "" {
			for i, p := range rep.plots {
				if rel, err := filepath.Rel(filepath.Dir(*out), p.path); err == nil {
					rep.plots[i].link = rel
				}
			}
		}
	}
	text := rep.markdown()
	fmt.Print(text)
	if *out != "" && *section != "" {
		return writeReportSection(*out, *section, text)
	}
	if *out != "" {
		return os.WriteFile(*out, []byte(text), 0o644)
	}
	return nil
}

// compareFiguresNamed is the figures of a --figures list, in their usual
// order; all of them for an empty list.
func compareFiguresNamed(list string) ([]cmpFigure, error) {
	if strings.TrimSpace(list) == "" {
		return compareFigures, nil
	}
	want := map[string]bool{}
	for _, k := range strings.Split(list, ",") {
		k = strings.TrimSpace(k)
		if !slices.ContainsFunc(compareFigures, func(f cmpFigure) bool { return f.key == k }) {
			return nil, fmt.Errorf("--figures: no figure %q (connect, messages, idle, latency, storm)", k)
		}
		want[k] = true
	}
	var out []cmpFigure
	for _, f := range compareFigures {
		if want[f.key] {
			out = append(out, f)
		}
	}
	return out, nil
}

func findHAProxy(flagPath string) (string, error) {
	if flagPath != "" {
		return flagPath, nil
	}
	if p, err := exec.LookPath("haproxy"); err == nil {
		return p, nil
	}
	if _, err := os.Stat("/usr/sbin/haproxy"); err == nil {
		return "/usr/sbin/haproxy", nil
	}
	return "", errors.New("haproxy not found (apt-get install haproxy, or --haproxy PATH)")
}

// cmpTarget is where the devices of a figure connect.
type cmpTarget struct {
	name string
	// pid is the proxy process, 0 for direct-to-broker.
	pid int
	// admin is shardgate's admin address, for the GC before reading RSS.
	admin string
	// listen is the proxy's MQTT address; direct devices go to the broker
	// the routing contract gives them.
	listen string
	// baseFds is the proxy's fd count with no device, to see that it has
	// closed the connections of a workload.
	baseFds int
}

type cmpEnv struct {
	benchProcs
	haproxy string
	brokers []cmpBroker
	snap    *backend.Snapshot
	targets []*cmpTarget // direct, haproxy, shardgate
}

type cmpBroker struct {
	id   string
	addr netip.AddrPort
	pid  int
}

const cmpBrokers = 3

// addr is where device id connects through t.
func (e *cmpEnv) addr(t *cmpTarget, id string) string {
	if t.pid != 0 {
		return t.listen
	}
	r, ok := e.snap.RouteString(id)
	if !ok {
		panic("direct: no broker for " + id) // every broker is healthy in the snapshot
	}
	return r.Instance.Addr.String()
}

func (e *cmpEnv) brokerPids() []int {
	out := make([]int, len(e.brokers))
	for i, b := range e.brokers {
		out[i] = b.pid
	}
	return out
}

func (e *cmpEnv) stop() { e.stopAll(nil) }

// startCompareEnv starts the brokers, a shardgate proxy and HAProxy, and
// waits until both proxies answer.
func startCompareEnv(mq, hap string) (_ *cmpEnv, err error) {
	procs, err := newBenchProcs("shardgate-compare-")
	if err != nil {
		return nil, err
	}
	e := &cmpEnv{benchProcs: procs, haproxy: hap}
	defer func() {
		if err != nil {
			e.stop()
		}
	}()

	var instances []backend.Instance
	for i := range cmpBrokers {
		cmd, addr, err := e.startMosquitto(mq, i)
		if err != nil {
			return nil, err
		}
		b := cmpBroker{id: fmt.Sprintf("mosquitto-%d", i), addr: addr, pid: cmd.Process.Pid}
		e.brokers = append(e.brokers, b)
		instances = append(instances, backend.Instance{ID: b.id, Addr: b.addr, Shard: i, Healthy: true})
	}
	// The snapshot the proxy builds from the same static backends: direct
	// devices get the proxy's split of devices over brokers.
	e.snap = backend.NewSnapshot(cmpBrokers, instances, backend.SnapshotOptions{})
	e.targets = append(e.targets, &cmpTarget{name: "direct"})

	for _, start := range []func() (*cmpTarget, error){e.startHAProxy, e.startShardgate} {
		t, err := start()
		if err != nil {
			return nil, err
		}
		e.targets = append(e.targets, t)
	}

	// Both proxies must route a device before anything is measured (health
	// checks have run once).
	for _, t := range e.targets {
		id := "cmp-probe-" + t.name
		deadline := time.Now().Add(10 * time.Second)
		for {
			c, err := cmpConnect(e.addr(t, id), id)
			if err == nil {
				c.disconnect()
				break
			}
			if time.Now().After(deadline) {
				return nil, fmt.Errorf("%s does not connect devices: %w", t.name, err)
			}
			time.Sleep(200 * time.Millisecond)
		}
	}
	time.Sleep(500 * time.Millisecond)
	for _, t := range e.targets {
		if t.pid != 0 {
			if t.baseFds, err = procFds(t.pid); err != nil {
				return nil, err
			}
		}
	}
	return e, nil
}

// startHAProxy starts HAProxy in front of the brokers and waits until it
// listens.
func (e *cmpEnv) startHAProxy() (*cmpTarget, error) {
	hapPort := freePort()
	var hc strings.Builder
	// nbthread 2 as shardgate's two event loops. maxconn stays under half
	// the open-files limit (HAProxy refuses to start otherwise); the idle
	// figure needs at most 9900 devices.
	fmt.Fprintf(&hc, `global
    nbthread 2
    maxconn 9950
defaults
    mode tcp
    timeout connect 5s
    timeout client 1h
    timeout server 1h
frontend mqtt
    bind 127.0.0.1:%d
    tcp-request inspect-delay 5s
    tcp-request content set-var(sess.mqtt_cid) req.payload(0,0),mqtt_field_value(connect,client_identifier)
    tcp-request content accept if { req.payload(0,0),mqtt_is_valid }
    default_backend brokers
backend brokers
    balance hash var(sess.mqtt_cid)
    hash-type consistent
`, hapPort)
	for _, b := range e.brokers {
		fmt.Fprintf(&hc, "    server %s %s check inter 1s\n", b.id, b.addr)
	}
	hapCfg := filepath.Join(e.dir, fmt.Sprintf("haproxy-%d.cfg", hapPort))
	if err := os.WriteFile(hapCfg, []byte(hc.String()), 0o644); err != nil {
		return nil, err
	}
	cmd, err := e.start(os.Stderr, e.haproxy, "-f", hapCfg, "-db")
	if err != nil {
		return nil, err
	}
	t := &cmpTarget{name: "haproxy", pid: cmd.Process.Pid, listen: fmt.Sprintf("127.0.0.1:%d", hapPort)}
	if err := waitTCP(t.listen, 10*time.Second); err != nil {
		return nil, fmt.Errorf("haproxy: %w", err)
	}
	return t, nil
}

// startShardgate starts this binary's proxy in front of the brokers and
// waits until it is ready.
func (e *cmpEnv) startShardgate() (*cmpTarget, error) {
	proxyPort, adminPort := freePort(), freePort()
	var pc strings.Builder
	fmt.Fprintf(&pc, "listen: [\"127.0.0.1:%d\"]\nadmin: \"127.0.0.1:%d\"\nshards: %d\nevent_loops: 2\nhealth: {type: tcp, interval: 1s}\nlog: {level: warn}\nbackends:\n  static:\n", proxyPort, adminPort, cmpBrokers)
	for i, b := range e.brokers {
		fmt.Fprintf(&pc, "    - {id: %s, address: \"%s\", shard: %d}\n", b.id, b.addr, i)
	}
	pcfg := filepath.Join(e.dir, fmt.Sprintf("proxy-%d.yaml", proxyPort))
	if err := os.WriteFile(pcfg, []byte(pc.String()), 0o644); err != nil {
		return nil, err
	}
	self, err := os.Executable()
	if err != nil {
		return nil, err
	}
	cmd, err := e.start(os.Stderr, self, "proxy", "--config", pcfg)
	if err != nil {
		return nil, err
	}
	t := &cmpTarget{name: "shardgate", pid: cmd.Process.Pid, listen: fmt.Sprintf("127.0.0.1:%d", proxyPort), admin: fmt.Sprintf("127.0.0.1:%d", adminPort)}
	if err := waitReady(t.admin, 10*time.Second); err != nil {
		return nil, fmt.Errorf("shardgate proxy: %w", err)
	}
	return t, nil
}

// fresh starts a new process of t's kind, for a figure that must not see
// the memory earlier workloads left in the long-running one (HAProxy keeps
// freed connections in its pools). stop ends it.
func (e *cmpEnv) fresh(t *cmpTarget) (_ *cmpTarget, stop func(), err error) {
	start := e.startShardgate
	if t.name == "haproxy" {
		start = e.startHAProxy
	}
	ft, err := start()
	if err != nil {
		return nil, nil, err
	}
	stop = func() {
		for i, p := range e.procs {
			if p.Process.Pid == ft.pid {
				_ = p.Process.Kill()
				_ = p.Wait()
				e.procs = append(e.procs[:i], e.procs[i+1:]...)
				return
			}
		}
	}
	id := "cmp-probe-fresh"
	for deadline := time.Now().Add(10 * time.Second); ; time.Sleep(200 * time.Millisecond) {
		c, cerr := cmpConnect(ft.listen, id)
		if cerr == nil {
			c.disconnect()
			break
		}
		if time.Now().After(deadline) {
			stop()
			return nil, nil, fmt.Errorf("fresh %s does not connect devices: %w", t.name, cerr)
		}
	}
	return ft, stop, nil
}

// quiesce waits until the proxy has closed every device of the last
// workload, then lets the brokers finish theirs.
func (e *cmpEnv) quiesce(t *cmpTarget) error {
	if t.pid != 0 {
		// Slack for health-check connections open at the moment.
		if err := waitFds(t.pid, t.baseFds+2*cmpBrokers, 30*time.Second); err != nil {
			return err
		}
	}
	time.Sleep(300 * time.Millisecond)
	return nil
}

// noKeepalive scrapes the admin API without leaving an idle connection in
// the proxy, which would count in its fds.
var noKeepalive = &http.Client{Transport: &http.Transport{DisableKeepAlives: true}, Timeout: 30 * time.Second}

func forceGC(admin string) error {
	resp, err := noKeepalive.Get("http://" + admin + "/debug/pprof/heap?gc=1")
	if err != nil {
		return err
	}
	_, _ = io.Copy(io.Discard, resp.Body)
	return resp.Body.Close()
}

// procMem reads VmRSS and RssAnon (bytes) from /proc/<pid>/status.
func procMem(pid int) (rss, anon int64, err error) {
	raw, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		return 0, 0, err
	}
	for _, line := range strings.Split(string(raw), "\n") {
		k, v, ok := strings.Cut(line, ":")
		if !ok {
			continue
		}
		kb, _ := strconv.ParseInt(strings.TrimSuffix(strings.TrimSpace(v), " kB"), 10, 64)
		switch k {
		case "VmRSS":
			rss = kb * 1024
		case "RssAnon":
			anon = kb * 1024
		}
	}
	return rss, anon, nil
}

// describeMachine returns the facts a reader needs to compare runs.
func describeMachine(mq, hap string) string {
	model := "unknown CPU"
	if raw, err := os.ReadFile("/proc/cpuinfo"); err == nil {
		for _, line := range strings.Split(string(raw), "\n") {
			if k, v, ok := strings.Cut(line, ":"); ok && strings.TrimSpace(k) == "model name" {
				model = strings.TrimSpace(v)
				break
			}
		}
	}
	kernel := "?"
	if raw, err := os.ReadFile("/proc/sys/kernel/osrelease"); err == nil {
		kernel = strings.TrimSpace(string(raw))
	}
	first := func(name string, args ...string) string {
		out, _ := exec.Command(name, args...).CombinedOutput()
		line, _, _ := strings.Cut(string(out), "\n")
		return strings.TrimSpace(line)
	}
	return fmt.Sprintf("%s, %d cores, Linux %s, %s; %s; %s", model, runtime.NumCPU(), kernel, runtime.Version(), first(hap, "-v"), first(mq, "-h"))
}
