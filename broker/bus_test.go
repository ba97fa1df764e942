package broker

import (
	"errors"
	"fmt"
	"slices"
	"strings"
	"sync"
	"testing"

	paho3 "github.com/eclipse/paho.mqtt.golang"
	"github.com/mochi-mqtt/server/v2/packets"
)

// recorder is a fake Receiver that records what the bus hands it; the
// fleet tests exercise the real one (node).
type recorder struct {
	mu         sync.Mutex
	deliveries []Delivery
	retained   []packets.Packet
}

func (r *recorder) Deliver(d Delivery) error {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.deliveries = append(r.deliveries, d)
	return nil
}

func (r *recorder) Retain(pk packets.Packet) error {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.retained = append(r.retained, pk)
	return nil
}

func (r *recorder) take() ([]Delivery, []packets.Packet) {
	r.mu.Lock()
	defer r.mu.Unlock()
	d, p := r.deliveries, r.retained
	r.deliveries, r.retained = nil, nil
	return d, p
}

func publishPacket(topic string, retain bool) packets.Packet {
	return packets.Packet{
		FixedHeader: packets.FixedHeader{Type: packets.Publish, Qos: 1, Retain: retain},
		TopicName:   topic,
		Payload:     []byte("p"),
	}
}

func newTestBus(t *testing.T, routes map[string][]string) (*LocalBus, map[string]*recorder) {
	t.Helper()
	b := NewLocalBus()
	recs := make(map[string]*recorder)
	for _, instance := range []string{"a", "b", "c"} {
		recs[instance] = new(recorder)
		if err := b.Join(instance, recs[instance]); err != nil {
			t.Fatal(err)
		}
		for _, f := range routes[instance] {
			if err := b.AddRoute(instance, f); err != nil {
				t.Fatal(err)
			}
		}
	}
	return b, recs
}

func TestLocalBusRouting(t *testing.T) {
	for _, tc := range []struct {
		name   string
		routes map[string][]string
		topic  string
		want   map[string]bool // instance → gets a plain delivery
	}{
		{"exact", map[string][]string{"b": {"x/1"}, "c": {"x/2"}}, "x/1", map[string]bool{"b": true}},
		{"plus", map[string][]string{"b": {"x/+"}, "c": {"+/2"}}, "x/1", map[string]bool{"b": true}},
		{"hash matches the parent level (4.7.1.2)", map[string][]string{"b": {"x/#"}, "c": {"x/1/#"}}, "x/1", map[string]bool{"b": true, "c": true}},
		{"origin is never a plain target", map[string][]string{"a": {"#"}, "b": {"#"}}, "x", map[string]bool{"b": true}},
		{"no route, no traffic", map[string][]string{"b": {"y"}, "c": {"x/+/z"}}, "x/1", map[string]bool{}},
		{"$ topics need an explicit first level [MQTT-4.7.2-1]", map[string][]string{"b": {"#"}, "c": {"$SYS/#"}}, "$SYS/x", map[string]bool{"c": true}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			b, recs := newTestBus(t, tc.routes)
			if err := b.Publish("a", publishPacket(tc.topic, false)); err != nil {
				t.Fatal(err)
			}
			for instance, r := range recs {
				ds, ret := r.take()
				want := 0
				if tc.want[instance] {
					want = 1
				}
				if len(ds) != want || len(ret) != 0 {
					t.Errorf("%s: %d deliveries, %d retains; want %d, 0", instance, len(ds), len(ret), want)
				}
				for _, d := range ds {
					if !d.Plain || len(d.Groups) != 0 || d.Packet.TopicName != tc.topic {
						t.Errorf("%s: delivery %+v", instance, d)
					}
				}
			}
		})
	}
}

// Each message reaches a shared group once, on one of the instances that
// hold members, the origin included.
func TestLocalBusSharedGroups(t *testing.T) {
	const group = "$share/g/jobs/+"
	b, recs := newTestBus(t, map[string][]string{
		"a": {group},
		"b": {group, "jobs/#"},
		"c": {group},
	})
	const n = 300
	for range n {
		if err := b.Publish("a", publishPacket("jobs/1", false)); err != nil {
			t.Fatal(err)
		}
	}
	served := map[string]int{}
	plainB := 0
	for instance, r := range recs {
		ds, _ := r.take()
		for _, d := range ds {
			if d.Plain {
				if instance != "b" {
					t.Errorf("plain delivery to %s", instance)
				}
				plainB++
			}
			if instance == "a" && d.Plain {
				t.Error("plain delivery back to the origin")
			}
			for _, g := range d.Groups {
				if g != group {
					t.Errorf("%s got group %q", instance, g)
				}
				served[instance]++
			}
		}
	}
	if plainB != n {
		t.Errorf("b got %d plain deliveries, want %d", plainB, n)
	}
	if total := served["a"] + served["b"] + served["c"]; total != n {
		t.Errorf("group served %d times for %d messages: %v", total, n, served)
	}
	for _, instance := range []string{"a", "b", "c"} {
		if served[instance] == 0 {
			t.Errorf("%s never chosen in %d messages: %v", instance, n, served)
		}
	}
}

// A retained message is stored on every instance, the origin included (so
// that all agree on the last one), and delivered where routes match.
func TestLocalBusRetained(t *testing.T) {
	b, recs := newTestBus(t, map[string][]string{"b": {"state/+"}})
	if err := b.Publish("a", publishPacket("state/x", true)); err != nil {
		t.Fatal(err)
	}
	for instance, r := range recs {
		ds, ret := r.take()
		if instance == "b" {
			if len(ds) != 1 || len(ret) != 0 || !ds[0].Packet.FixedHeader.Retain {
				t.Errorf("b: %d deliveries %+v, %d retains; want 1 retained delivery", len(ds), ds, len(ret))
			}
			continue
		}
		if len(ds) != 0 || len(ret) != 1 {
			t.Errorf("%s: %d deliveries, %d retains; want 0, 1", instance, len(ds), len(ret))
		}
	}
}

func TestLocalBusLeave(t *testing.T) {
	b, recs := newTestBus(t, map[string][]string{"b": {"x", "y/#"}, "c": {"x"}})
	if got := b.Routes("b"); got != 2 {
		t.Fatalf("Routes(b) = %d, want 2", got)
	}
	if err := b.Leave("b"); err != nil {
		t.Fatal(err)
	}
	if got := b.Routes("b"); got != 0 {
		t.Errorf("Routes(b) after Leave = %d", got)
	}
	if err := b.Publish("a", publishPacket("x", true)); err != nil {
		t.Fatal(err)
	}
	if ds, ret := recs["b"].take(); len(ds)+len(ret) != 0 {
		t.Errorf("left instance got %d deliveries, %d retains", len(ds), len(ret))
	}
	if ds, _ := recs["c"].take(); len(ds) != 1 {
		t.Errorf("c got %d deliveries, want 1", len(ds))
	}
	for name, err := range map[string]error{
		"publish":      b.Publish("b", publishPacket("x", false)),
		"add route":    b.AddRoute("b", "x"),
		"remove route": b.RemoveRoute("b", "x"),
		"leave":        b.Leave("b"),
	} {
		if !errors.Is(err, ErrUnknownInstance) {
			t.Errorf("%s after Leave: err = %v, want ErrUnknownInstance", name, err)
		}
	}
	if err := b.Join("a", new(recorder)); err == nil {
		t.Error("joined twice under one name")
	}
}

// Retained messages published at the same time to one topic on two shards
// leave every shard with the same retained message.
func TestRetainedOrderConverges(t *testing.T) {
	e := startFleet(t, 3)
	addrs := e.Addrs()
	pubs := []paho3.Client{
		client311(t, addrs[0], "pub-0", true, nil),
		client311(t, addrs[1], "pub-1", true, nil),
	}
	for round := range 50 {
		var wg sync.WaitGroup
		start := make(chan struct{})
		for i, pub := range pubs {
			wg.Go(func() {
				<-start
				pub.Publish("race", 1, true, fmt.Sprintf("%d-%d", round, i)).WaitTimeout(waitFor)
			})
		}
		close(start)
		wg.Wait()
		waitUntil(t, fmt.Sprintf("round %d: one retained message on every shard", round), func() bool {
			var vals []string
			for _, n := range e.nodes {
				pk, _ := n.srv.Topics.Retained.Get("race")
				vals = append(vals, string(pk.Payload))
			}
			return strings.HasPrefix(vals[0], fmt.Sprintf("%d-", round)) &&
				!slices.ContainsFunc(vals, func(v string) bool { return v != vals[0] })
		})
	}
}
