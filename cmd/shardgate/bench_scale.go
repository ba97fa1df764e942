package main

import (
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"os/signal"
	"strings"
	"syscall"
	"text/tabwriter"
	"time"

	"github.com/shardgate/shardgate/internal/loadgen"
)

// The host-scale scenario: a fleet of devices, spread over agent processes
// and source addresses, held through `shardgate proxy --workers` in front
// of several brokers, with what each device costs the proxy and the kernel;
// or, with --storm, the whole fleet cut and reconnecting at once, with and
// without admission.
func init() {
	benchScenarios["scale"] = benchScenario{benchScale, "100k devices held through proxy workers to a broker fleet: connect time, memory, fds and kernel memory per device, keepalive CPU; --storm: 50k devices cut and reconnecting, with and without admission"}
}

// devicesPerWorker keeps a worker under the 20000 open-files limit of a
// process here (two descriptors per device), with room to spare.
const devicesPerWorker = 9000

// devicesPerBroker keeps a Mosquitto broker (one descriptor per device)
// under the same limit.
const devicesPerBroker = 19000

type scaleConfig struct {
	Devices, Brokers, Workers, EventLoops, Agents int
	KeepAlive                                     int // seconds
	Hold                                          time.Duration
	InFlight                                      int
	Locals, ProxySources                          []string
	Storm                                         bool
	AdmissionRate, AdmissionShare                 float64
	Settle, ConnectTimeout, IdleWindow            time.Duration
}

// scaleResult is the --json output.
type scaleResult struct {
	Machine string
	Config  scaleConfig
	Hold    *scaleHold      `json:",omitempty"`
	Storms  []scaleStorm    `json:",omitempty"`
	Pace    *scaleStormPace `json:",omitempty"`
}

func benchScale(args []string) error {
	fs := flag.NewFlagSet("bench scale", flag.ContinueOnError)
	devices := fs.Int("devices", 0, "devices (default 100000; with --storm 50000)")
	brokers := fs.Int("brokers", 8, "Mosquitto brokers, one shard each")
	workers := fs.Int("workers", 0, fmt.Sprintf("proxy worker processes (default ceil(devices/%d): 2 fds per device under the open-files limit)", devicesPerWorker))
	loops := fs.Int("event-loops", 0, "event_loops of the whole proxy, shared out over the workers (default: one per worker)")
	agents := fs.Int("agents", 0, fmt.Sprintf("agent processes (default ceil(devices/%d))", devicesPerAgent))
	keepAlive := fs.Int("keepalive", 60, "keepalive seconds; devices ping at this pace")
	hold := fs.Duration("hold", 5*time.Minute, "how long to hold the devices once connected and measured")
	inFlight := fs.Int("in-flight", 512, "connects in flight over all agents while filling")
	locals := fs.String("locals", "127.0.0.2,127.0.0.3,127.0.0.4,127.0.0.5,127.0.0.6,127.0.0.7,127.0.0.8,127.0.0.9", "devices' source IPs, round-robin (each brings ~28k ports towards the proxy)")
	sources := fs.String("proxy-sources", "", "the proxy's dial.source_addresses towards the brokers, comma-separated (default none: each broker's own address:port already brings ~28k ports)")
	storm := fs.Bool("storm", false, "storm instead of hold: connect, cut all at once, reconnect with retry; twice: admission off, then on")
	rate := fs.Float64("admission-rate", 0, "--storm: admission.rate per shard for the second storm (default: --admission-share of the per-broker CONNACK pace the first storm measured)")
	share := fs.Float64("admission-share", 0.8, "--storm: share of the measured per-broker pace the admission lets in")
	settle := fs.Duration("settle", 2*time.Second, "wait after the GC in every proxy process before reading memory")
	connectTimeout := fs.Duration("connect-timeout", 10*time.Minute, "give up when the devices are not all connected by then")
	idle := fs.Duration("idle-window", 20*time.Second, "hold: measure the proxy's CPU with no device this long first (health checks, steering), to take it out of the keepalive CPU")
	mq := fs.String("mosquitto", "", "mosquitto binary (default: from PATH or /usr/sbin)")
	jsonOut := fs.Bool("json", false, "print the result as JSON instead of tables")
	jsonFile := fs.String("json-file", "", "also write the result as JSON to this file")
	out := fs.String("out", "", "also write the result tables into this markdown file, in the section named by --section (between its <!-- bench:NAME --> markers)")
	section := fs.String("section", "", "with --out: the section to replace (default scale-hold, or scale-storm with --storm)")
	if err := fs.Parse(args); err != nil {
		return err
	}
	cfg := scaleConfig{
		Devices: *devices, Brokers: *brokers, Workers: *workers, EventLoops: *loops, Agents: *agents,
		KeepAlive: *keepAlive, Hold: *hold, InFlight: *inFlight, Locals: splitList(*locals), ProxySources: splitList(*sources),
		Storm: *storm, AdmissionRate: *rate, AdmissionShare: *share, Settle: *settle, ConnectTimeout: *connectTimeout, IdleWindow: *idle,
	}
	if err := cfg.defaults(); err != nil {
		return err
	}
	mosq, err := findMosquitto(*mq)
	if err != nil {
		return err
	}
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGINT, syscall.SIGTERM)
	defer stop()

	env, err := startScaleEnv(mosq, cfg.Brokers)
	if err != nil {
		return err
	}
	defer env.stop()
	if err := env.startProxy(cfg.Workers, cfg.EventLoops, cfg.ProxySources, 0); err != nil {
		return err
	}
	res := scaleResult{Machine: describeScaleMachine(mosq), Config: cfg}
	logf := func(format string, a ...any) {
		if !*jsonOut {
			fmt.Printf(format+"\n", a...)
		}
	}
	logf("shardgate bench scale: %d devices, %d brokers, proxy with %d workers (event_loops %d), %d agents, sources %s",
		cfg.Devices, cfg.Brokers, cfg.Workers, cfg.EventLoops, len(scaleJobs(loadgen.KindHold, "", "", cfg.Devices, cfg.Agents, nil, 0, 1, false, 0)), strings.Join(cfg.Locals, ","))
	logf("machine: %s", res.Machine)
	if cfg.Storm {
		err = runScaleStorms(ctx, env, &cfg, &res, logf)
	} else {
		var h scaleHold
		h, err = runScaleHold(ctx, env, &cfg, logf)
		res.Hold = &h
	}
	if *jsonFile != "" {
		raw, jerr := json.MarshalIndent(res, "", "  ")
		if jerr == nil {
			jerr = os.WriteFile(*jsonFile, append(raw, '\n'), 0o644)
		}
		if jerr != nil {
			err = errors.Join(err, jerr)
		}
	}
	if *out != "" {
		name := *section
		if name == "" {
			name = "scale-hold"
			if cfg.Storm {
				name = "scale-storm"
			}
		}
		var b strings.Builder
		printScale(&b, &res)
		report := fmt.Sprintf("Latest `make bench` run (%s): `shardgate bench scale %s`; machine: %s\n\n```\n%s```\n",
			time.Now().UTC().Format("2006-01-02 15:04 MST"), strings.Join(args, " "), res.Machine, b.String())
		if werr := writeReportSection(*out, name, report); werr != nil {
			err = errors.Join(err, werr)
		}
	}
	if *jsonOut {
		enc := json.NewEncoder(os.Stdout)
		enc.SetIndent("", "  ")
		if jerr := enc.Encode(res); jerr != nil {
			return errors.Join(err, jerr)
		}
	} else {
		printScale(os.Stdout, &res)
	}
	return err
}

func splitList(s string) []string {
	var out []string
	for _, f := range strings.Split(s, ",") {
		if f = strings.TrimSpace(f); f != "" {
			out = append(out, f)
		}
	}
	return out
}

// defaults fills the zero values and checks the fleet fits the open-files
// limit of each process.
func (c *scaleConfig) defaults() error {
	if c.Devices == 0 {
		c.Devices = 100000
		if c.Storm {
			c.Devices = 50000
		}
	}
	if c.Workers == 0 {
		c.Workers = (c.Devices + devicesPerWorker - 1) / devicesPerWorker
	}
	if c.EventLoops == 0 {
		c.EventLoops = c.Workers
	}
	switch {
	case c.Devices < 1:
		return errors.New("--devices must be positive")
	case c.Brokers < 1:
		return errors.New("--brokers must be positive")
	case c.Workers < 1:
		return errors.New("--workers must be positive")
	case c.EventLoops < c.Workers:
		return errors.New("--event-loops must be at least --workers")
	case c.KeepAlive < 0 || c.KeepAlive > 65535:
		return errors.New("--keepalive must be 0..65535")
	case c.InFlight < 1:
		return errors.New("--in-flight must be positive")
	case c.AdmissionShare <= 0 || c.AdmissionShare > 1:
		return errors.New("--admission-share must be in (0, 1]")
	case c.AdmissionRate < 0:
		return errors.New("--admission-rate must not be negative")
	}
	if per := (c.Devices + c.Workers - 1) / c.Workers; 2*per > 19000 {
		return fmt.Errorf("%d devices per worker need %d fds: more than a process may open here; raise --workers", per, 2*per)
	}
	if per := (c.Devices + c.Brokers - 1) / c.Brokers; per > devicesPerBroker {
		return fmt.Errorf("%d devices per broker: more than a process may open here; raise --brokers", per)
	}
	if len(c.Locals) > 0 && c.Devices/len(c.Locals) > 25000 {
		return fmt.Errorf("%d devices per source IP towards one proxy port: more than the ephemeral ports; add --locals", c.Devices/len(c.Locals))
	}
	if len(c.Locals) == 0 && c.Devices > 25000 {
		return errors.New("more than 25000 devices from one source IP: set --locals")
	}
	return nil
}

// scaleHold is what the hold measured.
type scaleHold struct {
	Report loadgen.Report // the agents' merged report
	// ConnectTime is StartAt to the last CONNACK; ConnectCPU the proxy's
	// CPU (all its processes) from StartAt until it held every device.
	ConnectTime, ConnectCPU time.Duration
	BrokerConnectCPU        time.Duration
	Base, Full              memSample // before any device, with all of them (after GC)
	WorkerMin, WorkerMax    int       // devices per worker
	WorkerConns             []int
	HeldAfter               int // devices the proxy held at the end of the hold window
	// Window is the measured part of the hold; ProxyCPU the proxy's CPU
	// in it, UpPackets/DownPackets and UpBytes/DownBytes what it relayed
	// (keepalives: PINGREQ up, PINGRESP down).
	Window              time.Duration
	ProxyCPU, BrokerCPU time.Duration
	// IdleWindow and IdleCPU are the proxy with no device: its own work
	// (health checks, steering loads), taken out of the keepalive CPU.
	IdleWindow, IdleCPU    time.Duration
	UpPackets, DownPackets float64
	UpBytes, DownBytes     float64
	PerDevice              scalePerDevice
}

// scalePerDevice are the differences between the full and the base samples
// divided by the devices held.
type scalePerDevice struct {
	RSS, Anon   float64 // bytes, the proxy's processes
	Fds         float64
	SockstatMem float64 // bytes, host-wide TCP buffer memory
	// Slab is host-wide: every device is 4 sockets here (device, the
	// proxy's two, broker), all on loopback; ProxySlab is the proxy's 2.
	Slab, ProxySlab float64
	// KeepaliveCPU is proxy CPU per device per keepalive round trip;
	// ConnectCPU per connect.
	KeepaliveCPU, ConnectCPU time.Duration
}

// scaleSteady is how long after the workers serve the no-device window
// starts.
const scaleSteady = 2 * time.Second

func runScaleHold(ctx context.Context, env *scaleEnv, cfg *scaleConfig, logf func(string, ...any)) (scaleHold, error) {
	var h scaleHold
	base, err := env.sampleScale(cfg.Settle)
	if err != nil {
		return h, err
	}
	h.Base = base
	pids, err := env.pids()
	if err != nil {
		return h, err
	}
	if cfg.IdleWindow > 0 {
		// A worker writes its steering load every 20 ms for its first
		// second, then once a second while its count stands still, as
		// it does through the hold: measure the steady state.
		time.Sleep(time.Until(env.up.Add(scaleSteady)))
		c0, err := cpuOf(pids)
		if err != nil {
			return h, err
		}
		t0 := time.Now()
		time.Sleep(cfg.IdleWindow)
		c1, err := cpuOf(pids)
		if err != nil {
			return h, err
		}
		h.IdleCPU, h.IdleWindow = c1-c0, time.Since(t0)
	}
	// The agents hold until told: the measured window starts after the
	// memory sample, however long the connects took.
	// A connect that fails while the fleet fills (a broker's accept queue
	// full on a loaded host) retries, and counts in Failed and Retries, not
	// in Lost: Lost is what the hold dropped.
	jobs := scaleJobs(loadgen.KindHold, env.listen, "scale-", cfg.Devices, cfg.Agents, cfg.Locals, cfg.KeepAlive, cfg.InFlight, true, 24*time.Hour)
	series := sampleCPU(100*time.Millisecond, pids, env.brokers)
	fleet, err := startFleet(ctx, jobs)
	if err != nil {
		series.end()
		return h, err
	}
	defer fleet.cut()
	logf("connecting %d devices from %d agents (%d in flight)...", cfg.Devices, len(jobs), cfg.InFlight)
	_, err = waitFleetConnected(env, fleet, cfg.Devices, cfg.ConnectTimeout)
	connected := time.Now()
	series.end()
	if err != nil {
		return h, err
	}
	cpu := series.between(fleet.start(), connected)
	h.ConnectCPU, h.BrokerConnectCPU = cpu[0], cpu[1]
	logf("all %d devices held after %s; GC in every proxy process and sampling...", cfg.Devices, time.Since(fleet.start()).Round(time.Millisecond))

	if h.Full, err = env.sampleScale(cfg.Settle); err != nil {
		return h, err
	}
	st, err := env.status()
	if err != nil {
		return h, err
	}
	h.WorkerMin = -1
	for _, w := range st.Workers {
		h.WorkerConns = append(h.WorkerConns, w.Connections)
		if h.WorkerMin < 0 || w.Connections < h.WorkerMin {
			h.WorkerMin = w.Connections
		}
		h.WorkerMax = max(h.WorkerMax, w.Connections)
	}

	// The hold window: the proxy's and the brokers' CPU and what the
	// proxy relayed (keepalives only: the devices send nothing else).
	logf("holding %s (keepalive %ds)...", cfg.Hold, cfg.KeepAlive)
	counters := func() (v [4]float64, err error) {
		for i, s := range []string{`shardgate_packets_total{direction="upstream"}`, `shardgate_packets_total{direction="downstream"}`,
			`shardgate_bytes_total{direction="upstream"}`, `shardgate_bytes_total{direction="downstream"}`} {
			if v[i], err = env.scaleMetric(s); err != nil {
				return v, err
			}
		}
		return v, nil
	}
	c0, err := counters()
	if err != nil {
		return h, err
	}
	pcpu0, err1 := cpuOf(pids)
	bcpu0, err2 := cpuOf(env.brokers)
	t0 := time.Now()
	if err := errors.Join(err1, err2); err != nil {
		return h, err
	}
	select {
	case <-time.After(cfg.Hold):
	case <-ctx.Done():
		return h, ctx.Err()
	}
	pcpu1, err1 := cpuOf(pids)
	bcpu1, err2 := cpuOf(env.brokers)
	h.Window = time.Since(t0)
	if err := errors.Join(err1, err2); err != nil {
		return h, fmt.Errorf("a proxy or broker process ended during the hold: %w", err)
	}
	c1, err := counters()
	if err != nil {
		return h, err
	}
	h.ProxyCPU, h.BrokerCPU = pcpu1-pcpu0, bcpu1-bcpu0
	h.UpPackets, h.DownPackets, h.UpBytes, h.DownBytes = c1[0]-c0[0], c1[1]-c0[1], c1[2]-c0[2], c1[3]-c0[3]
	if st, err := env.status(); err == nil {
		h.HeldAfter = st.Connections
	}

	rep, err := fleet.finish(2 * time.Minute)
	h.Report = rep
	h.ConnectTime = rep.AllConnected
	if err != nil {
		return h, err
	}
	h.PerDevice = h.perDevice(cfg.Devices)
	switch {
	case rep.Connected != cfg.Devices || rep.AllConnected == 0:
		return h, fmt.Errorf("bench scale: %d of %d devices connected", rep.Connected, cfg.Devices)
	case rep.Lost > 0:
		return h, fmt.Errorf("bench scale: %d devices disconnected unexpectedly during the hold", rep.Lost)
	case h.HeldAfter != cfg.Devices:
		return h, fmt.Errorf("bench scale: the proxy held %d of %d devices at the end of the hold", h.HeldAfter, cfg.Devices)
	}
	return h, nil
}

func (h *scaleHold) perDevice(devices int) scalePerDevice {
	d := float64(devices)
	p := scalePerDevice{
		RSS:         float64(h.Full.RSS-h.Base.RSS) / d,
		Anon:        float64(h.Full.Anon-h.Base.Anon) / d,
		Fds:         float64(h.Full.Fds-h.Base.Fds) / d,
		SockstatMem: float64(h.Full.SockstatMem-h.Base.SockstatMem) / d,
		ConnectCPU:  time.Duration(float64(h.ConnectCPU) / d),
	}
	if h.Full.Slab > 0 && h.Base.Slab > 0 {
		p.Slab = float64(h.Full.Slab-h.Base.Slab) / d
		p.ProxySlab = p.Slab / 2
	}
	// Keepalive round trips in the window: one PINGREQ up per device
	// per keepalive.
	if h.UpPackets > 0 {
		p.KeepaliveCPU = time.Duration(float64(h.keepaliveCPU()) / h.UpPackets)
	}
	return p
}

// keepaliveCPU is the hold window's proxy CPU less what the proxy spends
// with no device in as long (never below zero).
func (h *scaleHold) keepaliveCPU() time.Duration {
	c := h.ProxyCPU
	if h.IdleWindow > 0 {
		c -= time.Duration(float64(h.IdleCPU) * h.Window.Seconds() / h.IdleWindow.Seconds())
	}
	return max(c, 0)
}

func describeScaleMachine(mq string) string {
	s := describeMachine(mq, "true")
	// describeMachine names HAProxy's version, which this bench does not
	// use: drop that part.
	parts := strings.Split(s, "; ")
	if len(parts) == 3 {
		parts = []string{parts[0], parts[2]}
	}
	var mem string
	if raw, err := os.ReadFile("/proc/meminfo"); err == nil {
		if line, _, ok := strings.Cut(string(raw), "\n"); ok {
			mem = strings.Join(strings.Fields(strings.TrimPrefix(line, "MemTotal:")), " ")
		}
	}
	return strings.Join(parts, "; ") + "; RAM " + mem
}

func printScale(w io.Writer, r *scaleResult) {
	tw := tabwriter.NewWriter(w, 0, 0, 2, ' ', 0)
	defer tw.Flush()
	row := func(k, v, note string) { fmt.Fprintf(tw, "  %s\t%s\t%s\n", k, v, note) }
	if h := r.Hold; h != nil {
		d := float64(r.Config.Devices)
		p := h.PerDevice
		fmt.Fprintln(tw)
		row("devices", fmt.Sprintf("%d of %d connected", h.Report.Connected, r.Config.Devices), fmt.Sprintf("%d workers, %d brokers, keepalive %ds; %d failed tries while filling, %d retries", r.Config.Workers, r.Config.Brokers, r.Config.KeepAlive, h.Report.Failed, h.Report.Retries))
		row("connect all", fmtDur(h.ConnectTime), fmt.Sprintf("%.0f connects/s; CONNACK p50 %s p99 %s", d/max(h.ConnectTime.Seconds(), 1e-9), fmtDur(h.Report.Connack.P50), fmtDur(h.Report.Connack.P99)))
		row("proxy CPU to connect", fmt.Sprintf("%s", h.ConnectCPU.Round(time.Millisecond)), fmt.Sprintf("%.1f ms per 1000 connects (brokers %s)", 1000*ms(h.ConnectCPU)/d, h.BrokerConnectCPU.Round(time.Millisecond)))
		row("lost during hold", fmt.Sprint(h.Report.Lost), fmt.Sprintf("held %s, proxy held %d at the end", h.Window.Round(time.Second), h.HeldAfter))
		row("worker balance", fmt.Sprintf("min %d max %d", h.WorkerMin, h.WorkerMax), fmt.Sprint(h.WorkerConns))
		row("proxy RSS", fmt.Sprintf("%.0f B/device", p.RSS), fmt.Sprintf("%d processes, %.1f MiB → %.1f MiB", h.Full.Processes, mib(h.Base.RSS), mib(h.Full.RSS)))
		row("proxy anon RSS", fmt.Sprintf("%.0f B/device", p.Anon), fmt.Sprintf("%.1f MiB → %.1f MiB", mib(h.Base.Anon), mib(h.Full.Anon)))
		row("proxy fds", fmt.Sprintf("%.2f /device", p.Fds), fmt.Sprintf("%d → %d", h.Base.Fds, h.Full.Fds))
		row("kernel socket slab", fmt.Sprintf("%.0f B/device", p.Slab), fmt.Sprintf("host-wide, 4 loopback sockets per device; the proxy's 2: %.0f B", p.ProxySlab))
		row("kernel TCP buffers", fmt.Sprintf("%.1f B/device", p.SockstatMem), "sockstat TCP mem, host-wide, idle sockets")
		win := max(h.Window.Seconds(), 1e-9)
		row("keepalive traffic", fmt.Sprintf("%.0f pings/s", h.UpPackets/win), fmt.Sprintf("expected %.0f; %.0f B/s up, %.0f B/s down", d/float64(max(r.Config.KeepAlive, 1)), h.UpBytes/win, h.DownBytes/win))
		row("proxy CPU in hold", fmt.Sprintf("%.2f%% of a core", 100*h.ProxyCPU.Seconds()/win), fmt.Sprintf("%s in %s (brokers %.2f%%)", h.ProxyCPU.Round(time.Millisecond), h.Window.Round(time.Second), 100*h.BrokerCPU.Seconds()/win))
		if h.IdleWindow > 0 {
			row("proxy CPU, no device", fmt.Sprintf("%.2f%% of a core", 100*h.IdleCPU.Seconds()/h.IdleWindow.Seconds()), fmt.Sprintf("%s in %s: health checks, steering loads", h.IdleCPU.Round(time.Millisecond), h.IdleWindow.Round(time.Second)))
		}
		row("keepalive CPU", fmt.Sprintf("%s per ping", p.KeepaliveCPU.Round(10*time.Nanosecond)), fmt.Sprintf("hold less no-device CPU: %.2f%% of a core", 100*h.keepaliveCPU().Seconds()/win))
	}
	if len(r.Storms) > 0 {
		printScaleStorms(tw, r)
	}
	for _, e := range stormErrors(r) {
		fmt.Fprintf(tw, "  error sample: %s\n", e)
	}
}

func mib(b int64) float64 { return float64(b) / (1 << 20) }
