package main

// End-to-end proof of the drain's last case: the only instance of a shard is
// put in maintenance with `consul maint`; the proxies drain it anyway, and
// its devices then follow each proxy's no_instance policy.

import (
	"errors"
	"fmt"
	"net/netip"
	"os/exec"
	"strings"
	"testing"
	"time"

	"github.com/shardgate/shardgate/backend"
	"github.com/shardgate/shardgate/internal/consultest"
	"github.com/shardgate/shardgate/internal/servertest"
	"github.com/shardgate/shardgate/mqttwire"
)

// TestE2EConsulLastInstanceDrainedByPolicy: two real Mosquitto brokers are
// registered in a real Consul agent as the only instance of shard 0 and of
// shard 1; two `shardgate proxy` processes watch the agent, one with
// no_instance: reject, one with the default spill. Devices of shard 0 (MQTT
// 3.1.1 and 5.0) connect through each and land on shard 0's broker. `consul
// maint -enable` on it (the real CLI): both proxies drain it although no
// instance of shard 0 is left; on reconnect the reject proxy refuses the
// devices with CONNACK "server unavailable" in their own protocol's code,
// the spill proxy puts them on shard 1's broker. `consul maint -disable`:
// new devices of shard 0 reach its broker again through both proxies.
func TestE2EConsulLastInstanceDrainedByPolicy(t *testing.T) {
	t.Parallel()
	bin := buildShardgate(t)
	consulBin, err := consultest.Binary()
	if err != nil {
		if testing.Short() {
			t.Skip(err)
		}
		t.Fatal(err)
	}
	agent := consultest.Start(t, consultest.Options{})
	c := e2eConsulClient(t, agent)
	node := agent.NodeName()
	ms := e2eBrokers(t, 2)
	port := func(m *servertest.MosquittoServer) int { return int(netip.MustParseAddrPort(m.String()).Port()) }
	const shards = 2
	e2eRegisterBroker(t, c, "li0", port(ms[0]), 0, shards, 0)
	e2eRegisterBroker(t, c, "li1", port(ms[1]), 1, shards, 0)
	id0, id1 := node+"/li0", node+"/li1"

	// drain.rate 1: the whole instance within a second.
	reject := e2eConsulProxy(t, bin, agent, shards, "no_instance: reject\ndrain: {rate: 1}\n")
	spill := e2eConsulProxy(t, bin, agent, shards, "drain: {rate: 1}\n")
	pxs := []*e2eProxy{reject, spill}
	names := []string{"reject", "spill"}
	healthy := func(want0 bool) func() (bool, string) {
		return func() (bool, string) {
			var state []map[string]bool
			ok := true
			for _, px := range pxs {
				h := px.backends(t).healthy()
				state = append(state, h)
				ok = ok && h[id0] == want0 && h[id1]
			}
			return ok, fmt.Sprint(state)
		}
	}
	e2eWaitFor(t, "both proxies see both instances healthy", e2eWait, healthy(true))

	metric := func(px *e2eProxy, name, inst string) float64 {
		for k, v := range px.metrics(t) {
			if strings.HasPrefix(k, name+"{") && strings.Contains(k, `instance="`+inst+`"`) {
				return v
			}
		}
		return 0
	}
	active := func(px *e2eProxy, inst string) float64 { return metric(px, "shardgate_connections_active", inst) }

	// Client IDs of shard 0, distinct per proxy and per round (both
	// proxies share the brokers).
	shard0IDs := func(prefix string, n int) []string {
		var ids []string
		for i := 0; len(ids) < n; i++ {
			id := fmt.Sprintf("%s-%d", prefix, i)
			if backend.ShardOf([]byte(id), shards) == 0 {
				ids = append(ids, id)
			}
		}
		return ids
	}
	levels := []byte{mqttwire.Level311, mqttwire.Level5, mqttwire.Level311, mqttwire.Level5}
	const n = 4

	devs := make([][]e2eDevice, len(pxs))
	ids := make([][]string, len(pxs))
	for p, px := range pxs {
		ids[p] = shard0IDs("li-"+names[p], n)
		if r := px.route(t, ids[p][0]); r.Shard != 0 || r.Instance == nil || *r.Instance != id0 {
			t.Fatalf("%s proxy routes %s to %+v, want shard 0's instance %s", names[p], ids[p][0], r, id0)
		}
		for i, id := range ids[p] {
			devs[p] = append(devs[p], e2eMustConnect(t, px.mqtt, id, levels[i]))
		}
	}
	for p, px := range pxs {
		e2eWaitFor(t, names[p]+" proxy: its devices on shard 0's broker", e2eWait, func() (bool, string) {
			a0, a1 := active(px, id0), active(px, id1)
			return a0 == n && a1 == 0, fmt.Sprintf("connections_active li0 %v, li1 %v", a0, a1)
		})
	}

	// The SRE's command, on the only instance of shard 0.
	maint := time.Now()
	out, err := exec.Command(consulBin, "maint", "-enable", "-service=li0", "-reason=e2e last instance", "-http-addr="+agent.Addr()).CombinedOutput()
	if err != nil {
		t.Fatalf("consul maint -enable: %v\n%s", err, out)
	}
	e2eWaitFor(t, "both proxies see shard 0's instance out of the healthy set", 5*time.Second, healthy(false))

	// Drained although nothing of shard 0 is left to move to.
	for p, px := range pxs {
		for i, d := range devs[p] {
			select {
			case <-d.Lost():
			case <-time.After(e2eWait):
				t.Fatalf("%s proxy: device %s (level %d) still connected %s after consul maint", names[p], ids[p][i], levels[i], time.Since(maint))
			}
		}
		e2eWaitFor(t, names[p]+" proxy: the drain of shard 0's instance ended", e2eWait, func() (bool, string) {
			rem := metric(px, "shardgate_drain_remaining", id0)
			drained := metric(px, "shardgate_drained_total", id0)
			a0 := active(px, id0)
			return rem == 0 && drained == n && a0 == 0, fmt.Sprintf("drain_remaining %v, drained_total %v, connections_active %v", rem, drained, a0)
		})
	}
	t.Logf("both proxies drained shard 0's last instance %s after consul maint", time.Since(maint).Round(time.Millisecond))

	// The devices reconnect. Reject: CONNACK server unavailable, 5.0
	// reason 0x88, 3.1.1 return code 3.
	if r := reject.route(t, ids[0][0]); r.Shard != 0 || r.Instance != nil {
		t.Fatalf("reject proxy: route %s = %+v, want shard 0 with no instance", ids[0][0], r)
	}
	for i, id := range ids[0] {
		want := byte(3)
		if levels[i] == mqttwire.Level5 {
			want = 0x88
		}
		d, err := e2eConnect(reject.mqtt, id, levels[i])
		var ref *e2eRefused
		if !errors.As(err, &ref) || ref.code != want {
			if d != nil {
				d.Disconnect()
			}
			t.Errorf("reject proxy: level %d device %s reconnecting: %v, want CONNACK code 0x%02x", levels[i], id, err, want)
		}
	}
	e2eWaitFor(t, `reject proxy: shardgate_connect_rejects_total{reason="no_instance"} = 4`, e2eWait, func() (bool, string) {
		v := reject.metrics(t)[`shardgate_connect_rejects_total{reason="no_instance"}`]
		return v == n, fmt.Sprint(v)
	})
	if a := active(reject, id1); a != 0 {
		t.Errorf("reject proxy: %v connections on shard 1's broker, want 0", a)
	}

	// Spill: they connect, on shard 1's broker.
	if a := spill.routeAddr(t, ids[1][0]); a != ms[1].String() {
		t.Fatalf("spill proxy: route %s = %q, want shard 1's broker %s", ids[1][0], a, ms[1].String())
	}
	for i, id := range ids[1] {
		d := e2eMustConnect(t, spill.mqtt, id, levels[i])
		topic := "dev/" + id
		if err := d.Subscribe(topic, 1); err != nil {
			t.Fatalf("spill proxy: subscribe %s: %v", topic, err)
		}
		e2eRoundTrip(t, d, topic, "spilled")
	}
	e2eWaitFor(t, "spill proxy: the devices on shard 1's broker", e2eWait, func() (bool, string) {
		a0, a1 := active(spill, id0), active(spill, id1)
		return a0 == 0 && a1 == n, fmt.Sprintf("connections_active li0 %v, li1 %v", a0, a1)
	})

	// Maintenance off: new devices of shard 0 reach its broker again
	// through both proxies (the spilled ones stay where they are).
	out, err = exec.Command(consulBin, "maint", "-disable", "-service=li0", "-http-addr="+agent.Addr()).CombinedOutput()
	if err != nil {
		t.Fatalf("consul maint -disable: %v\n%s", err, out)
	}
	e2eWaitFor(t, "both proxies see shard 0's instance healthy again", 5*time.Second, healthy(true))
	for p, px := range pxs {
		fresh := shard0IDs("li-back-"+names[p], n)
		if a := px.routeAddr(t, fresh[0]); a != ms[0].String() {
			t.Fatalf("%s proxy: route %s after maint -disable = %q, want shard 0's broker %s", names[p], fresh[0], a, ms[0].String())
		}
		for i, id := range fresh {
			d := e2eMustConnect(t, px.mqtt, id, levels[i])
			topic := "dev/" + id
			if err := d.Subscribe(topic, 1); err != nil {
				t.Fatalf("%s proxy: subscribe %s: %v", names[p], topic, err)
			}
			e2eRoundTrip(t, d, topic, "back")
		}
		wantOn1 := 0.0
		if px == spill {
			wantOn1 = n
		}
		e2eWaitFor(t, names[p]+" proxy: new shard 0 devices on shard 0's broker", e2eWait, func() (bool, string) {
			a0, a1 := active(px, id0), active(px, id1)
			return a0 == n && a1 == wantOn1, fmt.Sprintf("connections_active li0 %v, li1 %v (want %d, %v)", a0, a1, n, wantOn1)
		})
	}
}
