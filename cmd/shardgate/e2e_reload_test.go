package main

import (
	"fmt"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/shardgate/shardgate/internal/servertest"
	"github.com/shardgate/shardgate/mqttwire"
)

// TestE2ESighupReloadsBackends rewrites a running proxy's configuration to
// add a standby broker (priority 1) for shard 0 and sends SIGHUP: the same
// process lists four instances, keeps the primary active, and its connected
// devices keep working. A SIGHUP with an invalid configuration keeps the
// old one and logs the bad field. Killing the primary then moves shard 0's
// new devices to the standby, which proves the reloaded backends route.
func TestE2ESighupReloadsBackends(t *testing.T) {
	t.Parallel()
	bin := buildShardgate(t)
	ms := e2eBrokers(t, 3)
	standby := servertest.Mosquitto(t, servertest.MosquittoOptions{})
	cfg := e2eFleetOf(t, ms)
	px := e2eStartProxy(t, bin, cfg)
	px.waitReady(t)
	e2eWaitFor(t, "3 instances healthy", e2eWait, func() (bool, string) {
		h := px.backends(t).healthy()
		return len(h) == 3 && h["m0"] && h["m1"] && h["m2"], fmt.Sprint(h)
	})

	// One connected device per shard, one per protocol level.
	levels := []byte{mqttwire.Level311, mqttwire.Level5, mqttwire.Level31}
	ids := make([]string, len(ms))
	devs := make([]e2eDevice, len(ms))
	for sh := range ms {
		ids[sh] = e2eIDOnShard(t, px, "e2e-hup", sh)
		devs[sh] = e2eMustConnect(t, px.mqtt, ids[sh], levels[sh])
		if err := devs[sh].Subscribe("dev/"+ids[sh], 1); err != nil {
			t.Fatal(err)
		}
		e2eRoundTrip(t, devs[sh], "dev/"+ids[sh], "before")
	}
	stillConnected := func(when string) {
		t.Helper()
		for sh, d := range devs {
			select {
			case <-d.Lost():
				t.Fatalf("%s: device %s (shard %d) lost its connection", when, ids[sh], sh)
			default:
			}
			e2eRoundTrip(t, d, "dev/"+ids[sh], when)
		}
	}
	pid := px.pid()

	next := cfg
	next.backends = append(append([]e2eBackend(nil), cfg.backends...), e2eBackend{id: "m0b", addr: standby.String(), shard: 0, priority: 1})
	px.writeConfig(t, next.yaml())
	px.signal(t, syscall.SIGHUP)
	px.waitLog(t, e2eWait, "SIGHUP: backends, health checks and admission reloaded")
	e2eWaitFor(t, "/api/v1/backends lists 4 healthy instances, m0 active for shard 0, m0b its standby", e2eWait, func() (bool, string) {
		b := px.backends(t)
		ok := len(b.Instances) == 4
		for _, in := range b.Instances {
			switch in.ID {
			case "m0":
				ok = ok && in.Healthy && in.Active && in.Priority == 0
			case "m0b":
				ok = ok && in.Healthy && !in.Active && in.Priority == 1 && in.Shard == 0 && in.Address == standby.String()
			default:
				ok = ok && in.Healthy && in.Active
			}
		}
		return ok, fmt.Sprintf("%+v", b.Instances)
	})
	if px.exited() || px.pid() != pid {
		t.Fatalf("the proxy process did not survive SIGHUP (exited %v, pid %d → %d)", px.exited(), pid, px.pid())
	}
	stillConnected("after SIGHUP")
	for sh, id := range ids {
		if got := px.routeAddr(t, id); got != ms[sh].String() {
			t.Errorf("after SIGHUP %s routes to %q, want its primary %s", id, got, ms[sh].String())
		}
	}

	// An invalid configuration: the proxy keeps the one it has and says
	// which field is wrong.
	bad := strings.Replace(next.yaml(), fmt.Sprintf("%q", ms[1].String()), `"broker-1:1883"`, 1)
	if bad == next.yaml() {
		t.Fatal("test bug: the invalid configuration is the valid one")
	}
	px.writeConfig(t, bad)
	px.signal(t, syscall.SIGHUP)
	line := px.waitLog(t, e2eWait, "SIGHUP", "backends.static[1].address")
	t.Logf("invalid SIGHUP logged: %s", line)
	time.Sleep(300 * time.Millisecond) // three health intervals: a wrong reload would show
	if b := px.backends(t); len(b.Instances) != 4 || !b.healthy()["m1"] {
		t.Errorf("after an invalid SIGHUP /api/v1/backends = %+v, want the 4 instances of before", b.Instances)
	}
	if px.exited() {
		t.Fatal("the proxy exited on an invalid SIGHUP")
	}
	stillConnected("after an invalid SIGHUP")

	// The standby added by the reload takes shard 0 when its primary dies.
	ms[0].Kill()
	e2eWaitFor(t, "shard 0 routes to the standby m0b", 3*time.Second, func() (bool, string) {
		a := px.route(t, ids[0])
		return a.Instance != nil && *a.Instance == "m0b", fmt.Sprintf("%+v", a)
	})
	probes := e2eNewProbes(t, []*servertest.MosquittoServer{standby}, "hup")
	d := e2eMustConnect(t, px.mqtt, ids[0], mqttwire.Level5)
	if got := probes.landsOn(t, d, ids[0]); got != 0 {
		t.Fatalf("probe index %d", got)
	}
}
