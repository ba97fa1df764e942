package main

import (
	"fmt"
	"strconv"
	"sync"
	"testing"
	"time"

	"github.com/shardgate/shardgate/internal/servertest"
	"github.com/shardgate/shardgate/mqttwire"
)

// probeSet subscribes directly on each broker (not through the proxy) to
// probe/# and records which broker saw which topic: the ground truth of
// where the proxy sent a device.
type e2eProbes struct {
	mu   sync.Mutex
	seen map[string][]int // topic → indexes of the brokers that got it
}

func e2eNewProbes(t *testing.T, ms []*servertest.MosquittoServer, name string) *e2eProbes {
	t.Helper()
	ps := &e2eProbes{seen: map[string][]int{}}
	for i, m := range ms {
		ps.watch(t, i, m, name)
	}
	return ps
}

// watch subscribes on broker i (again, e.g. after a restart).
func (ps *e2eProbes) watch(t *testing.T, i int, m *servertest.MosquittoServer, name string) {
	t.Helper()
	d := e2eMustConnect(t, m.String(), fmt.Sprintf("%s-probe-%d-%d", name, i, time.Now().UnixNano()%1e6), mqttwire.Level311)
	if err := d.Subscribe("probe/#", 1); err != nil {
		t.Fatalf("probe subscribe on broker %d: %v", i, err)
	}
	stop := make(chan struct{})
	t.Cleanup(func() { close(stop) })
	go func() {
		for {
			select {
			case msg := <-d.Messages():
				ps.mu.Lock()
				ps.seen[msg.Topic] = append(ps.seen[msg.Topic], i)
				ps.mu.Unlock()
			case <-stop:
				return
			}
		}
	}()
}

func (ps *e2eProbes) brokers(topic string) []int {
	ps.mu.Lock()
	defer ps.mu.Unlock()
	return append([]int(nil), ps.seen[topic]...)
}

// landsOn publishes through device d to probe/<id> and returns the broker
// index the message reached (failing if it reached none, or several).
func (ps *e2eProbes) landsOn(t *testing.T, d e2eDevice, id string) int {
	t.Helper()
	topic := "probe/" + id
	if err := d.Publish(topic, 1, false, id); err != nil {
		t.Fatalf("publish %s: %v", topic, err)
	}
	e2eWaitFor(t, "a broker receives "+topic, 5*time.Second, func() (bool, string) {
		got := ps.brokers(topic)
		return len(got) > 0, fmt.Sprint(got)
	})
	time.Sleep(20 * time.Millisecond) // a second broker getting it too would be a bug: give it a moment
	got := ps.brokers(topic)
	if len(got) != 1 {
		t.Fatalf("%s reached brokers %v, want exactly one", topic, got)
	}
	return got[0]
}

// TestE2EProxyRoutesToShardBrokers runs `shardgate proxy` in front of three
// real Mosquitto brokers, one per shard, and proves with broker-side
// subscriptions that every device lands on the broker /api/v1/route names,
// with MQTT 3.1, 3.1.1 and 5.0 clients; then checks /api/v1/backends and
// /metrics.
func TestE2EProxyRoutesToShardBrokers(t *testing.T) {
	t.Parallel()
	bin := buildShardgate(t)
	ms := e2eBrokers(t, 3)
	px := e2eStartProxy(t, bin, e2eFleetOf(t, ms))
	px.waitReady(t)
	e2eWaitFor(t, "3 instances healthy", e2eWait, func() (bool, string) {
		b := px.backends(t)
		h := b.healthy()
		return len(h) == 3 && h["m0"] && h["m1"] && h["m2"], fmt.Sprint(h)
	})

	byAddr := map[string]int{}
	for i, m := range ms {
		byAddr[m.String()] = i
	}
	probes := e2eNewProbes(t, ms, "routes")

	const devices = 30
	levels := []byte{mqttwire.Level31, mqttwire.Level311, mqttwire.Level5}
	perShard := make([]int, len(ms))
	perLevel := map[byte]int{}
	for i := 0; i < devices; i++ {
		id := fmt.Sprintf("e2e-dev-%02d", i) // ≤ 23 bytes: MQTT 3.1 limit
		level := levels[i%len(levels)]
		a := px.route(t, id)
		if a.Instance == nil || a.Address == nil {
			t.Fatalf("/api/v1/route?client_id=%s = %+v: no instance", id, a)
		}
		want, ok := byAddr[*a.Address]
		if !ok || *a.Instance != "m"+strconv.Itoa(a.Shard) || want != a.Shard {
			t.Fatalf("/api/v1/route?client_id=%s = shard %d instance %s address %s: not that shard's broker", id, a.Shard, *a.Instance, *a.Address)
		}
		d := e2eMustConnect(t, px.mqtt, id, level)
		// The device works through the proxy: a round trip on its own topic.
		own := "dev/" + id
		if err := d.Subscribe(own, 1); err != nil {
			t.Fatalf("%s (level %d) subscribe: %v", id, level, err)
		}
		e2eRoundTrip(t, d, own, "hello "+id)
		if got := probes.landsOn(t, d, id); got != want {
			t.Errorf("device %s (level %d) landed on broker %d (%s), /api/v1/route names broker %d (%s)",
				id, level, got, ms[got].String(), want, *a.Address)
		}
		d.Disconnect()
		perShard[want]++
		perLevel[level]++
	}
	for sh, n := range perShard {
		if n == 0 {
			t.Errorf("no device of the %d landed on shard %d: the test proves less than it claims", devices, sh)
		}
	}
	t.Logf("devices per shard %v, per protocol level %v", perShard, perLevel)

	// Every broker's direct subscription saw only its own devices: no
	// topic reached two brokers (checked once more, after the last device).
	time.Sleep(100 * time.Millisecond)
	probes.mu.Lock()
	for topic, got := range probes.seen {
		if len(got) != 1 {
			t.Errorf("%s reached brokers %v", topic, got)
		}
	}
	probes.mu.Unlock()

	b := px.backends(t)
	if b.Contract != "v1" || b.Shards != 3 || len(b.Instances) != 3 {
		t.Fatalf("/api/v1/backends = %+v, want contract v1, 3 shards, 3 instances", b)
	}
	for _, in := range b.Instances {
		if !in.Healthy || !in.Active || in.Address != ms[in.Shard].String() || in.ID != "m"+strconv.Itoa(in.Shard) {
			t.Errorf("/api/v1/backends instance %+v: want healthy, active, m<shard> at that shard's broker", in)
		}
	}
	if len(b.Checks) != 3 {
		t.Errorf("/api/v1/backends has %d checks, want 3", len(b.Checks))
	}
	for _, c := range b.Checks {
		if c.State != "healthy" || !c.Healthy {
			t.Errorf("/api/v1/backends check %+v: want state healthy", c)
		}
	}

	t.Run("metrics", func(t *testing.T) {
		// The loops add their counts to the metrics once per tick: poll.
		var m map[string]float64
		e2eWaitFor(t, fmt.Sprintf(`shardgate_connects_total{result="ok"} ≥ %d (the connects made)`, devices), e2eWait, func() (bool, string) {
			m = px.metrics(t)
			got := m[`shardgate_connects_total{result="ok"}`]
			return got >= devices, fmt.Sprint(got)
		})
		for sh := range ms {
			key := fmt.Sprintf(`shardgate_instances_healthy{shard="%d"}`, sh)
			if v, ok := m[key]; !ok || v != 1 {
				t.Errorf("%s = %v (present %v), want 1", key, v, ok)
			}
		}
		for _, dir := range []string{"upstream", "downstream"} {
			for _, name := range []string{"shardgate_bytes_total", "shardgate_packets_total"} {
				key := fmt.Sprintf(`%s{direction=%q}`, name, dir)
				if m[key] <= 0 {
					t.Errorf("%s = %v, want > 0 after %d devices' traffic", key, m[key], devices)
				}
			}
		}
		var rejected float64
		for k, v := range m {
			if len(k) > len("shardgate_connect_rejects_total") && k[:len("shardgate_connect_rejects_total")] == "shardgate_connect_rejects_total" {
				rejected += v
			}
		}
		if rejected != 0 {
			t.Errorf("shardgate_connect_rejects_total sums to %v, want 0: every device was well-behaved", rejected)
		}
	})
}
