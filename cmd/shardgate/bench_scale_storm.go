package main

import (
	"context"
	"fmt"
	"text/tabwriter"
	"time"

	"github.com/shardgate/shardgate/internal/loadgen"
)

// scaleStorm is one storm: the fleet connected, cut at once (its agents
// killed), and reconnecting all at once with retry.
type scaleStorm struct {
	// AdmissionRate is admission.rate per shard (burst the same); 0: off.
	AdmissionRate float64
	Report        loadgen.Report // the reconnecting agents' merged report
	// Reconnect is StartAt to the last CONNACK (Report.AllConnected).
	Reconnect time.Duration
	// BrokerCPU and ProxyCPU are the CPU of every Mosquitto and of every
	// proxy process from StartAt to the last CONNACK.
	BrokerCPU, ProxyCPU time.Duration
	// ProxyRefused is the proxy's shard_rate refusals in the storm.
	ProxyRefused float64
}

// scaleStormPace is what the first storm says the brokers sustain, and the
// admission rate derived from it.
type scaleStormPace struct {
	PerBroker float64 // CONNACKs/s per broker in the storm without admission
	Share     float64
	Rate      float64 // admission.rate per shard of the second storm
}

// runScaleStorms storms twice: admission off, then admission at a share
// of the per-broker pace the first storm reached.
func runScaleStorms(ctx context.Context, env *scaleEnv, cfg *scaleConfig, res *scaleResult, logf func(string, ...any)) error {
	off, err := scaleStormOnce(ctx, env, cfg, 0, logf)
	res.Storms = append(res.Storms, off)
	if err != nil {
		return err
	}
	pace := &scaleStormPace{Share: cfg.AdmissionShare, Rate: cfg.AdmissionRate}
	pace.PerBroker = float64(cfg.Devices) / float64(cfg.Brokers) / off.Reconnect.Seconds()
	if pace.Rate == 0 {
		pace.Rate = max(1, float64(int(pace.PerBroker*pace.Share)))
	}
	res.Pace = pace
	logf("brokers sustained %.0f CONNACKs/s each; admission.rate %g per shard (burst %g)", pace.PerBroker, pace.Rate, pace.Rate)
	on, err := scaleStormOnce(ctx, env, cfg, pace.Rate, logf)
	res.Storms = append(res.Storms, on)
	return err
}

func scaleStormOnce(ctx context.Context, env *scaleEnv, cfg *scaleConfig, rate float64, logf func(string, ...any)) (scaleStorm, error) {
	s := scaleStorm{AdmissionRate: rate}
	// Connect the fleet (admission off), then cut it.
	hold := scaleJobs(loadgen.KindHold, env.listen, "storm-", cfg.Devices, cfg.Agents, cfg.Locals, cfg.KeepAlive, cfg.InFlight, true, 24*time.Hour)
	fleet, err := startFleet(ctx, hold)
	if err != nil {
		return s, err
	}
	logf("storm (admission %s): connecting %d devices...", admissionName(rate), cfg.Devices)
	if _, err := waitFleetConnected(env, fleet, cfg.Devices, cfg.ConnectTimeout); err != nil {
		fleet.cut()
		return s, err
	}
	logf("cutting all %d at once (agents killed)...", cfg.Devices)
	fleet.cut()
	// The proxy and the brokers finish closing before the storm, so the
	// storm's CPU is the reconnection's alone.
	if _, err := env.waitConnections(0, true, 2*time.Minute); err != nil {
		return s, err
	}
	time.Sleep(time.Second)
	if rate > 0 {
		if err := env.setAdmission(rate); err != nil {
			return s, err
		}
		defer func() { _ = env.setAdmission(0); time.Sleep(time.Second) }()
		time.Sleep(time.Second)
	}
	refused0, err := env.scaleMetric(`shardgate_connect_rejects_total{reason="shard_rate"}`)
	if err != nil {
		return s, err
	}
	pids, err := env.pids()
	if err != nil {
		return s, err
	}
	// Every device reconnects at once: each agent has all its devices in
	// flight.
	storm := scaleJobs(loadgen.KindStorm, env.listen, "storm-", cfg.Devices, cfg.Agents, cfg.Locals, cfg.KeepAlive, cfg.Devices, true, 24*time.Hour)
	series := sampleCPU(100*time.Millisecond, env.brokers, pids)
	fleet, err = startFleet(ctx, storm)
	if err != nil {
		series.end()
		return s, err
	}
	logf("storm: %d devices reconnecting at once with retry...", cfg.Devices)
	_, werr := waitFleetConnected(env, fleet, cfg.Devices, cfg.ConnectTimeout)
	series.end()
	rep, err := fleet.finish(2 * time.Minute)
	s.Report, s.Reconnect = rep, rep.AllConnected
	if werr != nil {
		return s, werr
	}
	if err != nil {
		return s, err
	}
	if rep.Connected != cfg.Devices || rep.AllConnected == 0 {
		return s, fmt.Errorf("storm: %d of %d devices reconnected", rep.Connected, cfg.Devices)
	}
	cpu := series.between(storm[0].StartAt, storm[0].StartAt.Add(rep.AllConnected))
	s.BrokerCPU, s.ProxyCPU = cpu[0], cpu[1]
	if refused1, err := env.scaleMetric(`shardgate_connect_rejects_total{reason="shard_rate"}`); err == nil {
		s.ProxyRefused = refused1 - refused0
	}
	logf("storm (admission %s): all reconnected after %s, %d refusals, %d retries", admissionName(rate), fmtDur(s.Reconnect), rep.Refused, rep.Retries)
	// The devices closed cleanly (SIGINT); the next phase starts empty.
	if _, err := env.waitConnections(0, true, 2*time.Minute); err != nil {
		return s, err
	}
	time.Sleep(time.Second)
	return s, nil
}

func admissionName(rate float64) string {
	if rate == 0 {
		return "off"
	}
	return fmt.Sprintf("%g/s per shard", rate)
}

func printScaleStorms(tw *tabwriter.Writer, r *scaleResult) {
	fmt.Fprintln(tw)
	if p := r.Pace; p != nil {
		fmt.Fprintf(tw, "  brokers' pace without admission: %.0f CONNACKs/s per broker; admission.rate %g per shard (burst %g)\n\n", p.PerBroker, p.Rate, p.Rate)
	}
	fmt.Fprintf(tw, "  admission\tdevices\treconnected\tall in\trefused\tfailed\tretries\tCONNACK p50\tp99\tbroker CPU\tproxy CPU\n")
	for _, s := range r.Storms {
		fmt.Fprintf(tw, "  %s\t%d\t%d\t%s\t%d\t%d\t%d\t%s\t%s\t%s\t%s\n", admissionName(s.AdmissionRate), s.Report.Devices, s.Report.Connected,
			fmtDur(s.Reconnect), s.Report.Refused, s.Report.Failed, s.Report.Retries, fmtDur(s.Report.Connack.P50), fmtDur(s.Report.Connack.P99),
			s.BrokerCPU.Round(10*time.Millisecond), s.ProxyCPU.Round(10*time.Millisecond))
	}
}

func stormErrors(r *scaleResult) []string {
	var out []string
	for _, s := range r.Storms {
		out = append(out, s.Report.Errors...)
	}
	if r.Hold != nil {
		out = append(out, r.Hold.Report.Errors...)
	}
	return out
}
