package main

import (
	"encoding/json"
	"os/exec"
	"strings"
	"testing"
	"time"
)

// benchScaleJSON runs `shardgate bench scale <args> --json` and decodes it.
func benchScaleJSON(t *testing.T, bin string, args ...string) scaleResult {
	t.Helper()
	cmd := exec.Command(bin, append(append([]string{"bench", "scale"}, args...), "--json")...)
	var stderr strings.Builder
	cmd.Stderr = &stderr
	out, err := cmd.Output()
	if err != nil {
		t.Fatalf("shardgate bench scale %s: %v\n%s\n%s", strings.Join(args, " "), err, out, stderr.String())
	}
	var r scaleResult
	if err := json.Unmarshal(out, &r); err != nil {
		t.Fatalf("decode %q: %v", out, err)
	}
	return r
}

// TestBenchScaleTiny holds 600 devices through 2 workers to 2 brokers with
// a 1s keepalive for 3s: every device connects and stays (the brokers close
// a device that misses its pings, so the pings went through), the workers
// share them, and each per-device cost is measured above zero.
func TestBenchScaleTiny(t *testing.T) {
	bin := buildShardgate(t)
	const devices = 600
	r := benchScaleJSON(t, bin, "--devices", "600", "--workers", "2", "--brokers", "2", "--agents", "2",
		"--keepalive", "1", "--hold", "3s", "--settle", "200ms", "--idle-window", "1s", "--locals", "127.0.0.2,127.0.0.3")
	h := r.Hold
	if h == nil {
		t.Fatal("no hold in the result")
	}
	rep := h.Report
	if rep.Devices != devices || rep.Connected != devices || rep.Lost != 0 || rep.AllConnected <= 0 || h.HeldAfter != devices {
		t.Fatalf("devices %d connected %d lost %d all-connected %v held at the end %d; want %d, all, 0, >0, all",
			rep.Devices, rep.Connected, rep.Lost, rep.AllConnected, h.HeldAfter, devices)
	}
	if len(h.WorkerConns) != 2 || h.WorkerConns[0]+h.WorkerConns[1] != devices || h.WorkerMin > h.WorkerMax || h.WorkerMin != min(h.WorkerConns[0], h.WorkerConns[1]) {
		t.Fatalf("worker balance %v min %d max %d", h.WorkerConns, h.WorkerMin, h.WorkerMax)
	}
	p := h.PerDevice
	// Two descriptors per device (its socket and its broker's); a proxy
	// holding a device costs memory. (The kernel's slab is host-wide: on a
	// shared host another run closing its sockets can shrink it more than
	// 600 devices grow it, so it is not asserted here.)
	if p.Fds < 1.9 || p.Fds > 2.1 || p.RSS <= 0 || p.Anon <= 0 || p.ConnectCPU <= 0 {
		t.Fatalf("per device: %+v", p)
	}
	// keepalive 1s for ~3s: each device pinged about 3 times, every ping
	// answered.
	if h.UpPackets < devices || h.DownPackets < h.UpPackets*0.9 || h.ProxyCPU <= 0 {
		t.Fatalf("hold window %v: %v packets up, %v down, proxy CPU %v", h.Window, h.UpPackets, h.DownPackets, h.ProxyCPU)
	}
	// The per-ping cost is the hold's CPU less the no-device CPU of as
	// long, so never more than the hold's CPU per ping. (Whether it is
	// above zero is below the 10 ms accounting tick at this size: 1800
	// pings cost the proxy a few ticks, as does its idle second.)
	if h.IdleWindow <= 0 || p.KeepaliveCPU < 0 || p.KeepaliveCPU > time.Duration(float64(h.ProxyCPU)/h.UpPackets) {
		t.Fatalf("keepalive CPU %v per ping: idle window %v (%v), hold CPU %v for %v pings", p.KeepaliveCPU, h.IdleWindow, h.IdleCPU, h.ProxyCPU, h.UpPackets)
	}
}

// TestBenchScaleStormTiny storms 300 devices twice through 2 workers: all
// reconnect both times; the second storm, admitted at a share of the pace
// the first reached, is refused and retried at the proxy.
func TestBenchScaleStormTiny(t *testing.T) {
	bin := buildShardgate(t)
	const devices = 300
	r := benchScaleJSON(t, bin, "--storm", "--devices", "300", "--workers", "2", "--brokers", "2", "--agents", "2",
		"--keepalive", "0", "--settle", "200ms", "--locals", "127.0.0.2,127.0.0.3", "--admission-rate", "50")
	if len(r.Storms) != 2 || r.Pace == nil || r.Pace.Rate != 50 || r.Pace.PerBroker <= 0 {
		t.Fatalf("storms %d pace %+v", len(r.Storms), r.Pace)
	}
	for i, s := range r.Storms {
		rep := s.Report
		// (CPU is not checked: 300 connects may take less than the
		// kernel's 10ms accounting tick.)
		if rep.Connected != devices || s.Reconnect <= 0 || s.Reconnect < rep.FirstConnect || rep.Connack.N != devices {
			t.Fatalf("storm %d: connected %d all-in %v first %v connack n %d", i, rep.Connected, s.Reconnect, rep.FirstConnect, rep.Connack.N)
		}
	}
	off, on := r.Storms[0], r.Storms[1]
	if off.AdmissionRate != 0 || off.Report.Refused != 0 || on.AdmissionRate != 50 {
		t.Fatalf("admission off: rate %v refused %d; on: rate %v", off.AdmissionRate, off.Report.Refused, on.AdmissionRate)
	}
	// 300 devices over 2 shards at 50/s each (burst 50): at least 2s, and
	// every refusal the devices saw is one of the proxy's.
	if on.Report.Refused == 0 || float64(on.Report.Refused) != on.ProxyRefused || on.Report.Retries < on.Report.Refused || on.Reconnect.Seconds() < 2 {
		t.Fatalf("admission on: refused %d (proxy %v) retries %d all-in %v", on.Report.Refused, on.ProxyRefused, on.Report.Retries, on.Reconnect)
	}
}
