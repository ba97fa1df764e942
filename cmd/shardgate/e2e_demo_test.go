package main

import (
	"encoding/json"
	"fmt"
	"os/exec"
	"testing"
	"time"

	"github.com/shardgate/shardgate/internal/servertest"
	"github.com/shardgate/shardgate/mqttwire"
	"github.com/shardgate/shardgate/proxy"
)

// e2eShardOf asks a separate `shardgate route --shards n` process for the
// shard of id.
func e2eShardOf(t *testing.T, bin, id string, n int) int {
	t.Helper()
	out, err := exec.Command(bin, "route", "--shards", fmt.Sprint(n), "--", id).Output()
	if err != nil {
		t.Fatalf("shardgate route %s: %v", id, err)
	}
	var a proxy.RouteAnswer
	if err := json.Unmarshal(out, &a); err != nil {
		t.Fatalf("shardgate route output %q: %v", out, err)
	}
	return a.Shard
}

// e2eIDsOnShards picks one client ID "<prefix>-<n>" per shard of 3, by
// `shardgate route --shards 3`.
func e2eIDsOnShards(t *testing.T, bin, prefix string) [3]string {
	t.Helper()
	var ids [3]string
	found := 0
	for n := 0; found < 3 && n < 100; n++ {
		id := fmt.Sprintf("%s-%d", prefix, n)
		if sh := e2eShardOf(t, bin, id, 3); ids[sh] == "" {
			ids[sh] = id
			found++
		}
	}
	if found < 3 {
		t.Fatalf("no client IDs %s-<n> on every one of 3 shards: %q", prefix, ids)
	}
	return ids
}

// TestE2EDemo runs `shardgate demo` (three embedded broker shards behind
// the proxy) and exchanges QoS 1 messages between a 5.0 subscriber and a
// 3.1.1 publisher on different shards, then checks that a retained message
// published on one shard reaches subscribers that arrive later on the
// others, and that /metrics counts what happened.
func TestE2EDemo(t *testing.T) {
	t.Parallel()
	bin := buildShardgate(t)
	listen, admin := servertest.FreePort(t).String(), servertest.FreePort(t).String()
	px := &e2eProxy{mqtt: listen, admin: admin}
	px.e2eProcess = e2eStart(t, "shardgate demo", bin, "demo", "--listen", listen, "--admin", admin)
	px.waitAdmin(t)
	px.waitReady(t)
	e2eWaitFor(t, "3 demo shards healthy", e2eWait, func() (bool, string) {
		b := px.backends(t)
		n := 0
		for _, in := range b.Instances {
			if in.Healthy {
				n++
			}
		}
		return b.Shards == 3 && n == 3, fmt.Sprintf("%+v", b.Instances)
	})

	subs := e2eIDsOnShards(t, bin, "e2e-sub")
	pubs := e2eIDsOnShards(t, bin, "e2e-pub")
	// The subscriber on shard 0, the publisher on shard 1; the late
	// subscribers of the retained message on shards 0 and 2.
	subID, pubID := subs[0], pubs[1]
	for id, want := range map[string]int{subID: 0, pubID: 1, subs[2]: 2} {
		if a := px.route(t, id); a.Shard != want || a.Instance == nil {
			t.Fatalf("the running demo routes %s to %+v; `shardgate route --shards 3` says shard %d", id, a, want)
		}
	}

	sub := e2eMustConnect(t, listen, subID, mqttwire.Level5)
	if err := sub.Subscribe("e2e/demo/#", 1); err != nil {
		t.Fatal(err)
	}
	pub := e2eMustConnect(t, listen, pubID, mqttwire.Level311)
	const n = 20
	for i := 0; i < n; i++ {
		if err := pub.Publish(fmt.Sprintf("e2e/demo/%d", i%3), 1, false, fmt.Sprint(i)); err != nil {
			t.Fatalf("QoS 1 publish %d (PUBACK through the proxy): %v", i, err)
		}
	}
	got := map[string]bool{}
	deadline := time.After(5 * time.Second)
	for len(got) < n {
		select {
		case m := <-sub.Messages():
			if m.QoS != 1 || m.Retain {
				t.Errorf("message %+v: want QoS 1, not retained", m)
			}
			got[m.Payload] = true
		case <-deadline:
			t.Fatalf("the shard-0 subscriber got %d of %d QoS 1 messages from the shard-1 publisher: %v", len(got), n, got)
		}
	}

	// Retained, published on shard 1, then subscribed to from shards 0
	// (a 5.0 device already connected) and 2 (a 3.1 device that connects
	// afterwards).
	if err := pub.Publish("e2e/retained/r1", 1, true, "kept"); err != nil {
		t.Fatal(err)
	}
	late := e2eMustConnect(t, listen, subs[2], mqttwire.Level31)
	for name, d := range map[string]e2eDevice{"shard-0 5.0 subscriber": sub, "shard-2 3.1 subscriber": late} {
		// The bus stores retained messages fleet-wide asynchronously to the
		// PUBACK: subscribe again until it is there. A subscription made
		// before the message reached this shard gets it live, without the
		// retain flag [MQTT-3.3.1-9]; the next subscribe re-sends it as
		// retained [MQTT-3.8.4-3], which is what is checked.
		var m e2eMessage
		e2eWaitFor(t, name+" receives the retained message", 5*time.Second, func() (bool, string) {
			if err := d.Subscribe("e2e/retained/#", 1); err != nil {
				return false, err.Error()
			}
			wait := time.After(200 * time.Millisecond)
			for {
				select {
				case m = <-d.Messages():
					if m.Topic == "e2e/retained/r1" && m.Retain {
						return true, ""
					}
				case <-wait:
					return false, "nothing yet"
				}
			}
		})
		if m.Topic != "e2e/retained/r1" || m.Payload != "kept" || !m.Retain {
			t.Errorf("%s got %+v, want the retained message (retain flag set)", name, m)
		}
	}

	connects := 3.0 // sub, pub, late
	e2eWaitFor(t, "metrics count the devices", e2eWait, func() (bool, string) {
		m := px.metrics(t)
		ok := m[`shardgate_connects_total{result="ok"}`] >= connects
		for sh := 0; sh < 3; sh++ {
			ok = ok && m[fmt.Sprintf(`shardgate_instances_healthy{shard="%d"}`, sh)] == 1
		}
		return ok, fmt.Sprintf("connects ok %v, healthy %v %v %v", m[`shardgate_connects_total{result="ok"}`],
			m[`shardgate_instances_healthy{shard="0"}`], m[`shardgate_instances_healthy{shard="1"}`], m[`shardgate_instances_healthy{shard="2"}`])
	})
}
