package main

import (
	"context"
	"encoding/json"
	"fmt"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/shardgate/shardgate/internal/loadgen"
	"github.com/shardgate/shardgate/internal/servertest"
)

// benchLoad runs `shardgate bench <args> --json` and decodes its report.
func benchLoad(t *testing.T, bin string, args ...string) loadResult {
	t.Helper()
	cmd := exec.Command(bin, append(append([]string{"bench"}, args...), "--json")...)
	var stderr strings.Builder
	cmd.Stderr = &stderr
	out, err := cmd.Output()
	if err != nil {
		t.Fatalf("shardgate bench %s: %v\n%s\n%s", strings.Join(args, " "), err, out, stderr.String())
	}
	var r loadResult
	if err := json.Unmarshal(out, &r); err != nil {
		t.Fatalf("bench %s: decode %q: %v", args[0], out, err)
	}
	return r
}

// startLoadProxy runs a proxy with one shard on Mosquitto and extra YAML.
func startLoadProxy(t *testing.T, bin, extra string) *e2eProxy {
	t.Helper()
	cfg := e2eFleetOf(t, e2eBrokers(t, 1))
	px := &e2eProxy{mqtt: cfg.listen, admin: cfg.admin, cfgPath: filepath.Join(t.TempDir(), "proxy.yaml")}
	px.writeConfig(t, cfg.yaml()+extra)
	px.e2eProcess = e2eStart(t, "shardgate proxy", bin, "proxy", "--config", px.cfgPath)
	px.waitAdmin(t)
	px.waitReady(t)
	return px
}

// TestBenchStormRetriesThroughAdmission storms a proxy whose admission
// lets 100 devices/s in, from 2 agent processes, with retry: every device
// ends connected, the refusals the devices saw are the proxy's shard_rate
// refusals, and every refused or failed try was retried.
func TestBenchStormRetriesThroughAdmission(t *testing.T) {
	bin := buildShardgate(t)
	px := startLoadProxy(t, bin, "admission: {rate: 100, burst: 20}\n")
	const devices = 300
	r := benchLoad(t, bin, "storm", "--target", px.mqtt, "--devices", "300", "--agents", "2", "--in-flight", "64", "--retry")
	if r.Agents != 2 || r.Devices != devices || r.Connected != devices || r.Connack.N != devices {
		t.Fatalf("agents %d devices %d connected %d connack n %d; want 2, %d, all", r.Agents, r.Devices, r.Connected, r.Connack.N, devices)
	}
	if r.Refused == 0 || r.Retries != r.Refused+r.Failed {
		t.Fatalf("refused %d failed %d retries %d: want refusals, each try retried", r.Refused, r.Failed, r.Retries)
	}
	// 280 devices beyond the burst at 100/s: the pace of the admission,
	// not of the devices, decides when the last one is in.
	if r.AllConnected < 2*time.Second || r.FirstConnect > r.AllConnected {
		t.Fatalf("first %v, all %v: want all after ≥ 2s", r.FirstConnect, r.AllConnected)
	}
	if got := px.metrics(t)[`shardgate_connect_rejects_total{reason="shard_rate"}`]; int(got) != r.Refused {
		t.Fatalf("proxy refused %v on shard_rate, devices saw %d refusals", got, r.Refused)
	}
}

// TestBenchLoadScenarios runs each scenario small through a real proxy and
// checks that the report adds up.
func TestBenchLoadScenarios(t *testing.T) {
	bin := buildShardgate(t)
	px := startLoadProxy(t, bin, "")

	t.Run("storm", func(t *testing.T) {
		r := benchLoad(t, bin, "storm", "--target", px.mqtt, "--devices", "200", "--agents", "2", "--in-flight", "32")
		if r.Connected != 200 || r.Refused != 0 || r.Failed != 0 || r.Connack.N != 200 || r.AllConnected < r.FirstConnect || r.FirstConnect <= 0 {
			t.Fatalf("%+v", r.Report)
		}
	})
	t.Run("hold", func(t *testing.T) {
		// keepalive 1s held 3s: the broker closes a device that misses
		// 1.5s of pings, so lost 0 means the pings went through the proxy.
		r := benchLoad(t, bin, "hold", "--target", px.mqtt, "--devices", "200", "--agents", "2", "--keepalive", "1", "--duration", "3s",
			"--locals", "127.0.0.2,127.0.0.3")
		if r.Connected != 200 || r.Lost != 0 || r.Connack.N != 200 || r.AllConnected <= 0 {
			t.Fatalf("%+v", r.Report)
		}
	})
	t.Run("churn", func(t *testing.T) {
		r := benchLoad(t, bin, "churn", "--target", px.mqtt, "--devices", "50", "--agents", "2", "--rate", "100", "--duration", "2s")
		// Each of 2 agents starts a connect every 1/50 s for 2 s: 200.
		if r.Connected != 200 || r.Failed != 0 || r.Refused != 0 || r.Lost != 0 || r.Connack.N != 200 {
			t.Fatalf("%+v", r.Report)
		}
	})
	for _, qos := range []string{"0", "1", "2"} {
		t.Run("latency-qos"+qos, func(t *testing.T) {
			r := benchLoad(t, bin, "latency", "--target", px.mqtt, "--devices", "20", "--agents", "2", "--qos", qos, "--rate", "200", "--duration", "1s",
				"--topic", "devices/{id}/telemetry")
			if r.Connected != 20 || r.Published == 0 || r.Messages != r.Published || r.Latency.N != int64(r.Messages) ||
				r.Latency.P50 <= 0 || r.Latency.P50 > r.Latency.P99 || r.Latency.P99 > r.Latency.Max || len(r.Errors) != 0 {
				t.Fatalf("%+v", r.Report)
			}
		})
	}
}

// TestBenchHoldFailsWhenDevicesMissing: a hold that could not connect its
// devices exits non-zero, so a benchmark script cannot mistake it for a
// clean run.
func TestBenchHoldFailsWhenDevicesMissing(t *testing.T) {
	bin := buildShardgate(t)
	closed := servertest.FreePort(t).String()
	out, err := exec.Command(bin, "bench", "hold", "--target", closed, "--devices", "5", "--duration", "0s").CombinedOutput()
	if err == nil || !strings.Contains(string(out), "0 of 5 devices connected") {
		t.Fatalf("err %v, output:\n%s", err, out)
	}
}

// TestRunAgentsInterrupted: cancelling RunAgents interrupts its agents,
// which close their devices and still report what they held.
func TestRunAgentsInterrupted(t *testing.T) {
	bin := buildShardgate(t)
	px := startLoadProxy(t, bin, "")
	jobs := []loadgen.Job{
		{Kind: loadgen.KindHold, Target: px.mqtt, Prefix: "intr-", First: 0, Count: 50, KeepAlive: 5, Duration: loadgen.Duration(time.Hour)},
		{Kind: loadgen.KindHold, Target: px.mqtt, Prefix: "intr-", First: 50, Count: 50, KeepAlive: 5, Duration: loadgen.Duration(time.Hour)},
	}
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	type result struct {
		reports []loadgen.Report
		err     error
	}
	done := make(chan result, 1)
	go func() {
		rs, err := loadgen.RunAgents(ctx, bin, jobs)
		done <- result{rs, err}
	}()
	e2eWaitFor(t, "100 devices through the proxy", e2eWait, func() (bool, string) {
		ok := px.metrics(t)[`shardgate_connects_total{result="ok"}`]
		return ok == 100, fmt.Sprint(ok)
	})
	cancel()
	var res result
	select {
	case res = <-done:
	case <-time.After(loadgen.AgentStopGrace):
		t.Fatal("RunAgents did not return after the cancel")
	}
	if res.err != nil {
		t.Fatal(res.err)
	}
	for i, r := range res.reports {
		if r.Kind != loadgen.KindHold || r.Devices != 50 || r.Connected != 50 || r.Lost != 0 {
			t.Fatalf("agent %d: %+v", i, r)
		}
	}
	e2eWaitFor(t, "the agents' devices disconnected", e2eWait, func() (bool, string) {
		var active float64
		for k, v := range px.metrics(t) {
			if strings.HasPrefix(k, "shardgate_connections_active") {
				active += v
			}
		}
		return active == 0, fmt.Sprint(active)
	})
}
