package main

import (
	"errors"
	"fmt"
	"testing"
	"time"

	"github.com/shardgate/shardgate/mqttwire"
)

// e2eIDOnShard returns the first client ID "<prefix>-<n>" that the proxy
// routes to shard (its routing snapshot decides; call it while every
// instance is healthy). IDs stay within MQTT 3.1's 23 bytes.
func e2eIDOnShard(t *testing.T, px *e2eProxy, prefix string, shard int) string {
	t.Helper()
	for n := 0; n < 200; n++ {
		id := fmt.Sprintf("%s-%d", prefix, n)
		if px.route(t, id).Shard == shard {
			return id
		}
	}
	t.Fatalf("no client ID %s-<n> routes to shard %d", prefix, shard)
	return ""
}

// TestE2EHealthChecksFollowBrokers kills one of three real Mosquitto shards
// under two running proxies, one with no_instance: spill (the default) and
// one with no_instance: reject. The MQTT health checks take it out within
// a second; its devices are spilled to a live broker by the first, refused
// with CONNACK "server unavailable" in their own protocol's code by the
// second; devices of other shards see nothing. Restarted, it is healthy
// again and takes its devices back.
func TestE2EHealthChecksFollowBrokers(t *testing.T) {
	t.Parallel()
	bin := buildShardgate(t)
	ms := e2eBrokers(t, 3)
	spill := e2eStartProxy(t, bin, e2eFleetOf(t, ms))
	rcfg := e2eFleetOf(t, ms)
	rcfg.noInstance = "reject"
	reject := e2eStartProxy(t, bin, rcfg)
	pxs := []*e2eProxy{spill, reject}
	allHealthy := func(want bool, ids ...string) func() (bool, string) {
		return func() (bool, string) {
			var state []map[string]bool
			ok := true
			for _, px := range pxs {
				h := px.backends(t).healthy()
				state = append(state, h)
				for _, id := range ids {
					ok = ok && h[id] == want
				}
			}
			return ok, fmt.Sprint(state)
		}
	}
	for _, px := range pxs {
		px.waitReady(t)
	}
	e2eWaitFor(t, "3 instances healthy in both proxies", e2eWait, allHealthy(true, "m0", "m1", "m2"))

	const victim = 1
	victimID := e2eIDOnShard(t, spill, "e2e-vic", victim)
	otherID := e2eIDOnShard(t, spill, "e2e-oth", 0)
	byAddr := map[string]int{}
	for i, m := range ms {
		byAddr[m.String()] = i
	}
	probes := e2eNewProbes(t, ms, "health")

	// Connected before the kill: one device on the victim's shard, one on
	// another shard, each through the proxy.
	onVictim := e2eMustConnect(t, spill.mqtt, victimID, mqttwire.Level311)
	other := e2eMustConnect(t, spill.mqtt, otherID, mqttwire.Level5)
	if err := other.Subscribe("dev/"+otherID, 1); err != nil {
		t.Fatal(err)
	}
	e2eRoundTrip(t, other, "dev/"+otherID, "before")
	if got := probes.landsOn(t, onVictim, victimID+"/before"); got != victim {
		t.Fatalf("%s landed on broker %d before the kill, want %d", victimID, got, victim)
	}

	killed := time.Now()
	ms[victim].Kill()
	e2eWaitFor(t, "m1 unhealthy in both proxies' /api/v1/backends", 3*time.Second, allHealthy(false, "m1"))
	t.Logf("m1 seen unhealthy %s after the kill", time.Since(killed).Round(time.Millisecond))
	for _, px := range pxs {
		b := px.backends(t)
		for _, c := range b.Checks {
			if c.ID == "m1" && (c.State != "unhealthy" || c.LastError == "") {
				t.Errorf("check of m1 = %+v, want state unhealthy with the last error", c)
			}
		}
		if h := b.healthy(); !h["m0"] || !h["m2"] {
			t.Errorf("the live brokers are not healthy: %v", h)
		}
	}
	// The victim's device lost its broker; the other device saw nothing.
	select {
	case <-onVictim.Lost():
	case <-time.After(5 * time.Second):
		t.Errorf("the device on the killed broker still looks connected")
	}
	select {
	case <-other.Lost():
		t.Fatalf("a device of shard 0 lost its connection when shard %d's broker died", victim)
	default:
	}
	e2eRoundTrip(t, other, "dev/"+otherID, "after the kill")

	t.Run("spill", func(t *testing.T) {
		a := spill.route(t, victimID)
		if a.Shard != victim || a.Address == nil || *a.Address == ms[victim].String() {
			t.Fatalf("route %s = %+v: want shard %d spilled to a live broker", victimID, a, victim)
		}
		want := byAddr[*a.Address]
		for i, level := range []byte{mqttwire.Level31, mqttwire.Level311, mqttwire.Level5} {
			d := e2eMustConnect(t, spill.mqtt, victimID, level)
			if got := probes.landsOn(t, d, fmt.Sprintf("%s/spill-%d", victimID, i)); got != want {
				t.Errorf("spilled device (level %d) landed on broker %d, /api/v1/route names %d", level, got, want)
			}
			d.Disconnect()
		}
		m := spill.metrics(t)
		for sh := range ms {
			want := 1.0
			if sh == victim {
				want = 0
			}
			key := fmt.Sprintf(`shardgate_instances_healthy{shard="%d"}`, sh)
			if v, ok := m[key]; !ok || v != want {
				t.Errorf("%s = %v (present %v), want %v", key, v, ok, want)
			}
		}
	})

	t.Run("reject", func(t *testing.T) {
		if a := reject.route(t, victimID); a.Shard != victim || a.Instance != nil {
			t.Fatalf("route %s under reject = %+v: want shard %d with no instance", victimID, a, victim)
		}
		for _, c := range []struct {
			level byte
			code  byte
			what  string
		}{
			// 5.0: reason 0x88 server unavailable [MQTT-3.2.2.2].
			{mqttwire.Level5, 0x88, "5.0 reason code 0x88 (server unavailable)"},
			// 3.1.1 and 3.1: return code 3, server unavailable.
			{mqttwire.Level311, 3, "3.1.1 return code 3 (server unavailable)"},
			{mqttwire.Level31, 3, "3.1 return code 3 (server unavailable)"},
		} {
			_, err := e2eConnect(reject.mqtt, victimID, c.level)
			var ref *e2eRefused
			if !errors.As(err, &ref) || ref.code != c.code {
				t.Errorf("level %d device of the dead shard: %v, want CONNACK with %s", c.level, err, c.what)
			}
		}
		// A device of a live shard is not affected.
		d := e2eMustConnect(t, reject.mqtt, otherID+"r", mqttwire.Level5)
		d.Disconnect()
		e2eWaitFor(t, `shardgate_connect_rejects_total{reason="no_instance"} = 3`, e2eWait, func() (bool, string) {
			v := reject.metrics(t)[`shardgate_connect_rejects_total{reason="no_instance"}`]
			return v == 3, fmt.Sprint(v)
		})
	})

	ms[victim].Restart()
	e2eWaitFor(t, "m1 healthy again in both proxies", 3*time.Second, allHealthy(true, "m0", "m1", "m2"))
	probes.watch(t, victim, ms[victim], "health")
	for _, px := range pxs {
		if got := px.routeAddr(t, victimID); got != ms[victim].String() {
			t.Fatalf("route %s after the restart = %q, want the restarted broker %s", victimID, got, ms[victim].String())
		}
	}
	// Both proxies hand the shard's devices to its own broker again.
	for i, px := range pxs {
		d := e2eMustConnect(t, px.mqtt, victimID, mqttwire.Level5)
		if got := probes.landsOn(t, d, fmt.Sprintf("%s/back-%d", victimID, i)); got != victim {
			t.Errorf("after the restart %s landed on broker %d, want %d", victimID, got, victim)
		}
		d.Disconnect()
	}
	e2eRoundTrip(t, other, "dev/"+otherID, "at the end")
}
