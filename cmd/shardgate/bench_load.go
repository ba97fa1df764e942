package main

import (
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"os"
	"os/signal"
	"strings"
	"syscall"
	"text/tabwriter"
	"time"

	"github.com/shardgate/shardgate/internal/loadgen"
	"github.com/shardgate/shardgate/mqttwire"
)

// The capacity-planning scenarios: fleets of simulated devices
// (internal/loadgen) in agent processes, against any MQTT target (a
// shardgate proxy, HAProxy, a broker), so the same command measures each
// and their figures compare.
func init() {
	benchScenarios["storm"] = benchScenario{benchStorm, "N devices connect at once (in-flight bound, optional retry): time until all are connected, refusals, CONNACK percentiles"}
	benchScenarios["churn"] = benchScenario{benchChurn, "devices connect and disconnect at a rate: CONNACK percentiles, achieved rate"}
	benchScenarios["latency"] = benchScenario{benchLatency, "publish → delivery percentiles at QoS 0/1/2 at a fixed rate, each device on its own topic"}
	benchScenarios["hold"] = benchScenario{benchHold, "N devices held with keepalives for a duration: connect time, unexpected disconnects"}
}

// devicesPerAgent keeps an agent under the 20000 open-files limit of a
// process here, with room for its own descriptors.
const devicesPerAgent = 15000

// loadFlags are the flags every load scenario takes.
type loadFlags struct {
	fs        *flag.FlagSet
	target    *string
	devices   *int
	agents    *int
	locals    *string
	json      *bool
	prefix    *string
	mqtt      *string
	inFlight  *int
	keepAlive *int
}

func newLoadFlags(name string, devices, inFlight, keepAlive int) *loadFlags {
	fs := flag.NewFlagSet("bench "+name, flag.ContinueOnError)
	return &loadFlags{
		fs:        fs,
		target:    fs.String("target", "", "IP:port of a proxy, HAProxy or broker (required)"),
		devices:   fs.Int("devices", devices, "simulated devices"),
		agents:    fs.Int("agents", 0, fmt.Sprintf("agent processes (default ceil(devices/%d))", devicesPerAgent)),
		locals:    fs.String("locals", "", "comma-separated source IPs, round-robin over devices (default: 127.0.0.2-127.0.0.9 when devices > 20000)"),
		json:      fs.Bool("json", false, "print the merged report as JSON instead of the table"),
		prefix:    fs.String("prefix", "bench-"+name+"-", "client ID prefix (IDs are prefix + index)"),
		mqtt:      fs.String("mqtt", "3.1.1", "protocol version: 3.1.1 or 5"),
		inFlight:  fs.Int("in-flight", inFlight, "connects in flight over all agents (latency: publishes in flight)"),
		keepAlive: fs.Int("keepalive", keepAlive, "keepalive seconds; devices ping at this pace (0: off)"),
	}
}

// jobs validates the common flags and splits the fleet into one job per
// agent: contiguous ranges of device indexes, the in-flight bound shared
// out, the same start time.
func (f *loadFlags) jobs(kind string) ([]loadgen.Job, error) {
	if *f.target == "" {
		return nil, errors.New("--target is required")
	}
	if *f.devices < 1 {
		return nil, errors.New("--devices must be at least 1")
	}
	var level byte
	switch *f.mqtt {
	case "3.1.1", "4":
		level = mqttwire.Level311
	case "5", "5.0":
		level = mqttwire.Level5
	default:
		return nil, fmt.Errorf("--mqtt %q: want 3.1.1 or 5", *f.mqtt)
	}
	if *f.keepAlive < 0 || *f.keepAlive > 65535 {
		return nil, errors.New("--keepalive must be 0..65535")
	}
	agents := *f.agents
	if agents <= 0 {
		agents = (*f.devices + devicesPerAgent - 1) / devicesPerAgent
	}
	agents = min(agents, *f.devices)
	var locals []string
	if *f.locals != "" {
		for _, s := range strings.Split(*f.locals, ",") {
			locals = append(locals, strings.TrimSpace(s))
		}
	} else if *f.devices > 20000 {
		for i := 2; i <= 9; i++ {
			locals = append(locals, fmt.Sprintf("127.0.0.%d", i))
		}
	}
	// Agents take a moment to start; they all begin at the same instant.
	start := time.Now().Add(500*time.Millisecond + time.Duration(agents)*50*time.Millisecond)
	jobs := make([]loadgen.Job, agents)
	first := 0
	for i := range jobs {
		n := *f.devices / agents
		if i < *f.devices%agents {
			n++
		}
		jobs[i] = loadgen.Job{
			Kind: kind, Target: *f.target, Prefix: *f.prefix, First: first, Count: n,
			Locals: locals, Level: level, KeepAlive: uint16(*f.keepAlive),
			InFlight: max(1, *f.inFlight/agents), StartAt: start,
		}
		first += n
	}
	return jobs, nil
}

// run runs the jobs in agents and prints the merged report.
func (f *loadFlags) run(scenario, setup string, jobs []loadgen.Job) (loadgen.Report, error) {
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGINT, syscall.SIGTERM)
	defer stop()
	self, err := os.Executable()
	if err != nil {
		return loadgen.Report{}, err
	}
	if !*f.json {
		fmt.Printf("shardgate bench %s → %s: %d devices, %d agent(s), %s\n", scenario, *f.target, *f.devices, len(jobs), setup)
	}
	reports, err := loadgen.RunAgents(ctx, self, jobs)
	if err != nil {
		return loadgen.Report{}, err
	}
	rep := loadgen.Merge(reports)
	if *f.json {
		enc := json.NewEncoder(os.Stdout)
		enc.SetIndent("", "  ")
		return rep, enc.Encode(loadResult{Scenario: scenario, Target: *f.target, Agents: len(jobs), Setup: setup, Report: rep})
	}
	printLoadReport(os.Stdout, rep)
	return rep, nil
}

// loadResult is the --json output: the merged report (its fields at the
// top level, histograms included so runs can be plotted) and the run's
// setup.
type loadResult struct {
	Scenario, Target string
	Agents           int
	Setup            string
	loadgen.Report
}

func benchStorm(args []string) error {
	f := newLoadFlags("storm", 1000, 512, 0)
	retry := f.fs.Bool("retry", false, "refused or failed devices retry (backoff 100ms..5s with jitter) until connected")
	hold := f.fs.Duration("hold", 0, "keep the devices connected this long after the last one connected")
	if err := f.fs.Parse(args); err != nil {
		return err
	}
	jobs, err := f.jobs(loadgen.KindStorm)
	if err != nil {
		return err
	}
	for i := range jobs {
		jobs[i].Retry, jobs[i].Duration = *retry, loadgen.Duration(*hold)
	}
	rep, err := f.run("storm", fmt.Sprintf("%d in flight, retry %t", *f.inFlight, *retry), jobs)
	if err != nil {
		return err
	}
	if *retry && rep.Connected != *f.devices {
		return fmt.Errorf("bench storm: %d of %d devices connected", rep.Connected, *f.devices)
	}
	return nil
}

func benchChurn(args []string) error {
	f := newLoadFlags("churn", 1000, 256, 0)
	rate := f.fs.Float64("rate", 500, "connects per second over all agents")
	duration := f.fs.Duration("duration", 30*time.Second, "how long to churn")
	hold := f.fs.Duration("hold", 0, "how long each device stays connected (0: disconnect right after CONNACK); keep it below devices/rate, or an ID reconnects while still connected")
	if err := f.fs.Parse(args); err != nil {
		return err
	}
	if *rate <= 0 {
		return errors.New("--rate must be positive")
	}
	jobs, err := f.jobs(loadgen.KindChurn)
	if err != nil {
		return err
	}
	for i := range jobs {
		jobs[i].Rate = *rate / float64(len(jobs))
		jobs[i].Duration, jobs[i].Hold = loadgen.Duration(*duration), loadgen.Duration(*hold)
	}
	_, err = f.run("churn", fmt.Sprintf("%g connects/s for %s, hold %s", *rate, *duration, *hold), jobs)
	return err
}

func benchLatency(args []string) error {
	f := newLoadFlags("latency", 100, 64, 0)
	qos := f.fs.Int("qos", 0, "QoS of the publishes and subscriptions: 0, 1 or 2")
	rate := f.fs.Float64("rate", 1000, "messages per second over all devices")
	duration := f.fs.Duration("duration", 10*time.Second, "how long to publish")
	topic := f.fs.String("topic", "devices/{id}/telemetry", "topic of each device; {id} is its client ID")
	size := f.fs.Int("size", 16, "payload bytes (at least 8: the send time)")
	if err := f.fs.Parse(args); err != nil {
		return err
	}
	if *qos < 0 || *qos > 2 {
		return errors.New("--qos must be 0, 1 or 2")
	}
	if *rate <= 0 {
		return errors.New("--rate must be positive")
	}
	jobs, err := f.jobs(loadgen.KindLatency)
	if err != nil {
		return err
	}
	for i := range jobs {
		jobs[i].QoS, jobs[i].Topic, jobs[i].Size = byte(*qos), *topic, *size
		jobs[i].Rate = *rate * float64(jobs[i].Count) / float64(*f.devices)
		jobs[i].Duration = loadgen.Duration(*duration)
	}
	_, err = f.run("latency", fmt.Sprintf("QoS %d, %g msg/s for %s, topic %s", *qos, *rate, *duration, *topic), jobs)
	return err
}

func benchHold(args []string) error {
	f := newLoadFlags("hold", 1000, 256, 60)
	duration := f.fs.Duration("duration", time.Minute, "how long to hold the devices once connected")
	retry := f.fs.Bool("retry", false, "refused or failed connects retry until connected")
	if err := f.fs.Parse(args); err != nil {
		return err
	}
	jobs, err := f.jobs(loadgen.KindHold)
	if err != nil {
		return err
	}
	for i := range jobs {
		jobs[i].Duration, jobs[i].Retry = loadgen.Duration(*duration), *retry
	}
	rep, err := f.run("hold", fmt.Sprintf("keepalive %ds, held %s", *f.keepAlive, *duration), jobs)
	if err != nil {
		return err
	}
	if rep.Lost > 0 {
		return fmt.Errorf("bench hold: %d devices disconnected unexpectedly", rep.Lost)
	}
	if rep.Connected != *f.devices {
		return fmt.Errorf("bench hold: %d of %d devices connected", rep.Connected, *f.devices)
	}
	return nil
}

// benchAgent is one agent of RunAgents: job on stdin, report on stdout.
func benchAgent(args []string) error {
	if len(args) != 0 {
		return errors.New("bench agent takes no arguments: it reads a job as JSON on stdin")
	}
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGINT, syscall.SIGTERM)
	defer stop()
	return loadgen.ServeAgent(ctx, os.Stdin, os.Stdout)
}

func printLoadReport(w *os.File, r loadgen.Report) {
	tw := tabwriter.NewWriter(w, 0, 0, 2, ' ', 0)
	row := func(k, v, note string) { fmt.Fprintf(tw, "  %s\t%s\t%s\n", k, v, note) }
	fmt.Fprintln(tw)
	row("devices", fmt.Sprint(r.Devices), "")
	row("connected", fmt.Sprint(r.Connected), "successful CONNACKs")
	row("refused", fmt.Sprint(r.Refused), "refusing CONNACKs, every try")
	row("failed", fmt.Sprint(r.Failed), "tries without a CONNACK")
	row("retries", fmt.Sprint(r.Retries), "")
	row("lost", fmt.Sprint(r.Lost), "unexpected disconnects")
	row("first connect", fmtDur(r.FirstConnect), "since the start")
	row("all connected", fmtDur(r.AllConnected), "since the start")
	row("elapsed", fmtDur(r.Elapsed), "")
	if r.Kind == loadgen.KindChurn && r.Elapsed > 0 {
		row("connects/s", fmt.Sprintf("%.0f", float64(r.Connected)/r.Elapsed.Seconds()), "achieved")
	}
	if r.Kind == loadgen.KindLatency {
		row("published", fmt.Sprint(r.Published), "")
		row("delivered", fmt.Sprint(r.Messages), "")
	}
	fmt.Fprintln(tw)
	fmt.Fprintf(tw, "  \tn\tp50\tp90\tp99\tp99.9\tmax\n")
	pct := func(name string, p loadgen.Percentiles) {
		fmt.Fprintf(tw, "  %s\t%d\t%s\t%s\t%s\t%s\t%s\n", name, p.N, fmtDur(p.P50), fmtDur(p.P90), fmtDur(p.P99), fmtDur(p.P999), fmtDur(p.Max))
	}
	pct("connack", r.Connack)
	if r.Kind == loadgen.KindLatency {
		pct("latency", r.Latency)
	}
	tw.Flush()
	for _, e := range r.Errors {
		fmt.Fprintf(w, "  error sample: %s\n", e)
	}
}

func fmtDur(d time.Duration) string {
	switch {
	case d == 0:
		return "-"
	case d < time.Millisecond:
		return d.Round(time.Microsecond).String()
	case d < time.Second:
		return d.Round(10 * time.Microsecond).String()
	default:
		return d.Round(time.Millisecond).String()
	}
}
