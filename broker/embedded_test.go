package broker

import (
	"context"
	"fmt"
	"net"
	"runtime"
	"runtime/pprof"
	"slices"
	"strings"
	"testing"
	"time"

	paho5 "github.com/eclipse/paho.golang/paho"
	"github.com/prometheus/client_golang/prometheus/testutil"
)

// A subscriber on shard 2 receives what a publisher on shard 0 sends, once;
// a subscriber on the publisher's own shard gets exactly one copy too (no
// loop back through the bus); shard 1, with no subscriber, gets no traffic.
func TestCrossShardPublish(t *testing.T) {
	for _, qos := range []byte{0, 1, 2} {
		t.Run(fmt.Sprintf("qos%d", qos), func(t *testing.T) {
			e := startFleet(t, 3)
			addrs := e.Addrs()

			remote, local := newSink(), newSink()
			subRemote := client311(t, addrs[2], "sub-remote", true, remote)
			subscribe311(t, subRemote, "t/x", qos)
			subLocal := client311(t, addrs[0], "sub-local", true, local)
			subscribe311(t, subLocal, "t/x", qos)

			pub := client311(t, addrs[0], "pub", true, nil)
			const n = 20
			var want []string
			for i := range n {
				p := fmt.Sprintf("m%02d", i)
				want = append(want, p)
				publish311(t, pub, "t/x", qos, false, p)
			}

			for name, s := range map[string]*sink{"shard 2": remote, "shard 0": local} {
				got := s.exactly(t, n)
				if !slices.Equal(payloads(got), want) {
					t.Errorf("%s received %v, want %v", name, payloads(got), want)
				}
				for _, m := range got {
					if m.QoS != qos || m.Retain {
						t.Errorf("%s: message %+v, want QoS %d, not retained", name, m, qos)
					}
				}
			}
			if got := e.Forwarded(2); got != n {
				t.Errorf("Forwarded(2) = %d, want %d", got, n)
			}
			for _, shard := range []int{0, 1} {
				if got := e.Forwarded(shard); got != 0 {
					t.Errorf("Forwarded(%d) = %d, want 0 (no remote subscriber)", shard, got)
				}
			}
		})
	}
}

// Routes follow subscriptions: once the last subscriber of a shard has
// unsubscribed, or its clean session has ended, the shard gets no more
// traffic for the filter.
func TestRoutesFollowSubscriptions(t *testing.T) {
	e := startFleet(t, 3)
	addrs := e.Addrs()

	s1, s2 := newSink(), newSink()
	a := client311(t, addrs[1], "a", true, s1)
	subscribe311(t, a, "r/#", 1)
	b := client311(t, addrs[2], "b", true, s2)
	subscribe311(t, b, "r/+", 1)
	pub := client311(t, addrs[0], "pub", true, nil)

	publish311(t, pub, "r/1", 1, false, "one")
	s1.wait(t, 1)
	s2.wait(t, 1)

	if tok := a.Unsubscribe("r/#"); !tok.WaitTimeout(waitFor) || tok.Error() != nil {
		t.Fatalf("unsubscribe: %v", tok.Error())
	}
	b.Disconnect(100) // clean session: its subscriptions end with it [MQTT-3.1.2-6]
	waitUntil(t, "routes withdrawn", func() bool { return e.bus.Routes("embedded-1")+e.bus.Routes("embedded-2") == 0 })

	publish311(t, pub, "r/2", 1, false, "two")
	time.Sleep(200 * time.Millisecond)
	if got := e.Forwarded(1) + e.Forwarded(2); got != 2 {
		t.Errorf("Forwarded(1)+Forwarded(2) = %d, want 2 (only the first message)", got)
	}

	const want = `
# HELP shardgate_broker_bus_received_total Messages the cross-shard bus delivered into the shard (one per message, however many local subscribers match).
# TYPE shardgate_broker_bus_received_total counter
shardgate_broker_bus_received_total{shard="0"} 0
shardgate_broker_bus_received_total{shard="1"} 1
shardgate_broker_bus_received_total{shard="2"} 1
# HELP shardgate_broker_bus_sent_total Messages published on the shard (by devices, or as wills) handed to the cross-shard bus.
# TYPE shardgate_broker_bus_sent_total counter
shardgate_broker_bus_sent_total{shard="0"} 2
shardgate_broker_bus_sent_total{shard="1"} 0
shardgate_broker_bus_sent_total{shard="2"} 0
# HELP shardgate_broker_routes Topic filters with at least one subscription on the shard, as announced to the bus.
# TYPE shardgate_broker_routes gauge
shardgate_broker_routes{shard="0"} 0
shardgate_broker_routes{shard="1"} 0
shardgate_broker_routes{shard="2"} 0
`
	if err := testutil.CollectAndCompare(e, strings.NewReader(want),
		"shardgate_broker_bus_received_total", "shardgate_broker_bus_sent_total", "shardgate_broker_routes"); err != nil {
		t.Error(err)
	}
}

// A retained message published on shard 1 is retained on every shard, and
// so is its deletion by an empty retained message [MQTT-3.3.1-6].
func TestRetainedAcrossShards(t *testing.T) {
	e := startFleet(t, 3)
	addrs := e.Addrs()

	pub := client311(t, addrs[1], "pub", true, nil)
	// mochi sends the PUBACK before it delivers and forwards the message:
	// wait until the other shards have stored it, or a subscriber could get
	// it as a live message instead.
	publish311(t, pub, "state/lamp", 1, true, "on")
	waitRetained(t, e, "state/lamp", "on")

	for _, shard := range []int{0, 2} {
		s := newSink()
		c := client311(t, addrs[shard], fmt.Sprintf("late-%d", shard), true, s)
		subscribe311(t, c, "state/#", 1)
		got := s.exactly(t, 1)
		if m := got[0]; m.Topic != "state/lamp" || m.Payload != "on" || !m.Retain {
			t.Errorf("shard %d: got %+v, want retained state/lamp=on", shard, m)
		}
		c.Disconnect(100)
	}
	for shard := range 3 {
		if got := e.Forwarded(shard); got != 0 {
			t.Errorf("Forwarded(%d) = %d, want 0: retained messages are stored, not delivered, where nobody subscribes", shard, got)
		}
	}

	publish311(t, pub, "state/lamp", 1, true, "")
	waitRetained(t, e, "state/lamp", "")
	for _, shard := range []int{0, 2} {
		s := newSink()
		c := client311(t, addrs[shard], fmt.Sprintf("later-%d", shard), true, s)
		subscribe311(t, c, "state/#", 1)
		s.exactly(t, 0)
	}
}

// A retained message reaches a current subscriber on another shard as a
// normal message (retain flag cleared for 3.1.1 [MQTT-3.3.1-9]) and is
// stored there for later subscribers.
func TestRetainedWithSubscriber(t *testing.T) {
	e := startFleet(t, 3)
	addrs := e.Addrs()

	now := newSink()
	c := client311(t, addrs[2], "now", true, now)
	subscribe311(t, c, "cfg/+", 1)
	// mochi looks for retained messages after it has sent the SUBACK; a
	// second SUBSCRIBE is processed after that lookup, so the publish below
	// cannot race it and arrive twice (live and as retained).
	subscribe311(t, c, "sync", 0)
	pub := client311(t, addrs[0], "pub", true, nil)
	publish311(t, pub, "cfg/a", 1, true, "v1")
	if m := now.exactly(t, 1)[0]; m.Payload != "v1" || m.Retain {
		t.Errorf("current subscriber got %+v, want v1 without retain flag", m)
	}

	later := newSink()
	c2 := client311(t, addrs[2], "later", true, later)
	subscribe311(t, c2, "cfg/+", 1)
	if m := later.exactly(t, 1)[0]; m.Payload != "v1" || !m.Retain {
		t.Errorf("later subscriber got %+v, want retained v1", m)
	}
}

// Wildcard filters match across shards as on one broker: + one level, #
// any number including the parent level (§4.7.1.2), and neither matches
// a topic starting with $ at the first level [MQTT-4.7.2-1].
func TestWildcardsAcrossShards(t *testing.T) {
	e := startFleet(t, 3)
	addrs := e.Addrs()

	plus, hash, mid, all := newSink(), newSink(), newSink(), newSink()
	subscribe311(t, client311(t, addrs[2], "plus", true, plus), "sensors/+/temp", 0)
	subscribe311(t, client311(t, addrs[2], "hash", true, hash), "sensors/#", 0)
	subscribe311(t, client311(t, addrs[1], "mid", true, mid), "+/+/humidity", 0)
	subscribe311(t, client311(t, addrs[1], "all", true, all), "#", 0)

	pub := client311(t, addrs[0], "pub", true, nil)
	for _, topic := range []string{"sensors/a/temp", "sensors/b/humidity", "sensors", "other/x/temp"} {
		publish311(t, pub, topic, 1, false, topic)
	}

	for _, tc := range []struct {
		name string
		s    *sink
		want []string
	}{
		{"sensors/+/temp", plus, []string{"sensors/a/temp"}},
		{"sensors/#", hash, []string{"sensors", "sensors/a/temp", "sensors/b/humidity"}},
		{"+/+/humidity", mid, []string{"sensors/b/humidity"}},
		{"#", all, []string{"other/x/temp", "sensors", "sensors/a/temp", "sensors/b/humidity"}},
	} {
		if got := payloads(tc.s.exactly(t, len(tc.want))); !slices.Equal(got, tc.want) {
			t.Errorf("%s received %v, want %v", tc.name, got, tc.want)
		}
	}
}

// MQTT 5 properties of a publish survive the bus, and a 3.1.1 subscriber on
// another shard gets the same message without them.
func TestMQTT5PropertiesAcrossShards(t *testing.T) {
	e := startFleet(t, 3)
	addrs := e.Addrs()

	s5, s3 := newSink(), newSink()
	sub5, _, _ := client5(t, addrs[2], &paho5.Connect{ClientID: "sub5", CleanStart: true, KeepAlive: 30}, s5)
	subscribe5(t, sub5, "rpc/req", 1)
	subscribe311(t, client311(t, addrs[1], "sub3", true, s3), "rpc/req", 1)

	pub, _, _ := client5(t, addrs[0], &paho5.Connect{ClientID: "pub5", CleanStart: true, KeepAlive: 30}, nil)
	expiry := uint32(3600)
	publish5(t, pub, &paho5.Publish{
		Topic:   "rpc/req",
		QoS:     1,
		Payload: []byte("ping"),
		Properties: &paho5.PublishProperties{
			ContentType:     "text/plain",
			ResponseTopic:   "rpc/resp/pub5",
			CorrelationData: []byte{1, 2, 3},
			MessageExpiry:   &expiry,
			User:            paho5.UserProperties{{Key: "trace", Value: "abc"}},
		},
	})

	m := s5.exactly(t, 1)[0]
	if m.Payload != "ping" || m.QoS != 1 || m.Props == nil {
		t.Fatalf("MQTT 5 subscriber got %+v", m)
	}
	p := m.Props
	if p.ContentType != "text/plain" || p.ResponseTopic != "rpc/resp/pub5" || string(p.CorrelationData) != "\x01\x02\x03" ||
		p.User.Get("trace") != "abc" || p.MessageExpiry == nil || *p.MessageExpiry == 0 || *p.MessageExpiry > expiry {
		t.Errorf("properties did not survive: %+v (user %v)", p, p.User)
	}
	if m := s3.exactly(t, 1)[0]; m.Payload != "ping" {
		t.Errorf("3.1.1 subscriber got %+v", m)
	}
}

// A shared subscription group with members on every shard gets each
// message once fleet-wide, and a plain subscriber next to a member still
// gets every message.
func TestSharedSubscriptionFleetWide(t *testing.T) {
	e := startFleet(t, 3)
	addrs := e.Addrs()

	members := make([]*sink, 3)
	for shard := range 3 {
		members[shard] = newSink()
		c, _, _ := client5(t, addrs[shard], &paho5.Connect{ClientID: fmt.Sprintf("worker-%d", shard), CleanStart: true, KeepAlive: 30}, members[shard])
		subscribe5(t, c, "$share/workers/jobs/+", 1)
	}
	plain := newSink()
	subscribe311(t, client311(t, addrs[1], "observer", true, plain), "jobs/+", 1)

	pub := client311(t, addrs[0], "pub", true, nil)
	const n = 60
	var want []string
	for i := range n {
		p := fmt.Sprintf("job%02d", i)
		want = append(want, p)
		publish311(t, pub, "jobs/new", 1, false, p)
	}

	if got := payloads(plain.exactly(t, n)); !slices.Equal(got, want) {
		t.Errorf("plain subscriber received %v, want %v", got, want)
	}
	deadline := time.Now().Add(waitFor)
	var got []message
	for time.Now().Before(deadline) {
		got = got[:0]
		for _, s := range members {
			got = append(got, s.all()...)
		}
		if len(got) >= n {
			break
		}
		time.Sleep(20 * time.Millisecond)
	}
	time.Sleep(200 * time.Millisecond)
	got = got[:0]
	served := 0
	for _, s := range members {
		m := s.all()
		got = append(got, m...)
		if len(m) > 0 {
			served++
		}
	}
	if !slices.Equal(payloads(got), want) {
		t.Fatalf("group received %d messages %v, want each of %d exactly once", len(got), payloads(got), n)
	}
	// Each message goes to a uniformly chosen shard: all 60 on one member
	// has probability 3·3⁻⁶⁰.
	if served < 2 {
		t.Errorf("only %d of 3 members received messages", served)
	}
}

// A persistent session on shard 2 keeps its route while the device is
// offline: a QoS 1 message published on shard 0 meanwhile is queued and
// delivered when the device returns [MQTT-3.1.2-5].
func TestPersistentSessionQueuesAcrossShards(t *testing.T) {
	e := startFleet(t, 3)
	addrs := e.Addrs()

	c := client311(t, addrs[2], "sleepy", false, nil)
	subscribe311(t, c, "cmd/sleepy", 1)
	c.Disconnect(100)

	pub := client311(t, addrs[0], "pub", true, nil)
	publish311(t, pub, "cmd/sleepy", 1, false, "wake up")

	s := newSink()
	client311(t, addrs[2], "sleepy", false, s)
	if m := s.exactly(t, 1)[0]; m.Payload != "wake up" || m.QoS != 1 {
		t.Errorf("got %+v, want the queued QoS 1 message", m)
	}
}

// The will of a device that drops without DISCONNECT reaches subscribers
// on other shards [MQTT-3.1.2-8].
func TestWillAcrossShards(t *testing.T) {
	e := startFleet(t, 3)
	addrs := e.Addrs()

	s := newSink()
	subscribe311(t, client311(t, addrs[2], "watcher", true, s), "status/+", 1)

	_, conn, _ := client5(t, addrs[0], &paho5.Connect{
		ClientID: "dying", CleanStart: true, KeepAlive: 30,
		WillMessage: &paho5.WillMessage{Topic: "status/dying", QoS: 1, Payload: []byte("offline")},
	}, nil)
	_ = conn.Close()

	if m := s.exactly(t, 1)[0]; m.Topic != "status/dying" || m.Payload != "offline" {
		t.Errorf("got %+v, want the will", m)
	}
}

// Close disconnects every client, stops every shard and leaves no goroutine
// behind, whether clients are connected or not.
func TestCloseLeavesNoGoroutines(t *testing.T) {
	before := runtime.NumGoroutine()

	e, err := StartEmbedded(context.Background(), EmbeddedConfig{Shards: 3})
	if err != nil {
		t.Fatal(err)
	}
	addrs := e.Addrs()
	s := newSink()
	sub := client311(t, addrs[2], "sub", true, s)
	subscribe311(t, sub, "x", 1)
	pub := client311(t, addrs[0], "pub", true, nil)
	publish311(t, pub, "x", 1, false, "hello")
	s.wait(t, 1)
	// A connection that never sends CONNECT.
	idle, err := net.Dial("tcp", addrs[1].String())
	if err != nil {
		t.Fatal(err)
	}
	defer idle.Close()

	if err := e.Close(); err != nil {
		t.Fatalf("Close: %v", err)
	}
	if err := e.Close(); err != nil {
		t.Fatalf("second Close: %v", err)
	}
	_ = idle.SetReadDeadline(time.Now().Add(waitFor))
	if _, err := idle.Read(make([]byte, 1)); err == nil {
		t.Error("connection without CONNECT still open after Close")
	}
	waitUntil(t, "clients see the disconnect", func() bool { return !sub.IsConnectionOpen() && !pub.IsConnectionOpen() })
	for _, a := range addrs {
		if c, err := net.DialTimeout("tcp", a.String(), time.Second); err == nil {
			c.Close()
			t.Errorf("%s still accepts connections after Close", a)
		}
	}

	deadline := time.Now().Add(waitFor)
	for runtime.NumGoroutine() > before && time.Now().Before(deadline) {
		time.Sleep(20 * time.Millisecond)
	}
	if now := runtime.NumGoroutine(); now > before {
		var b strings.Builder
		_ = pprof.Lookup("goroutine").WriteTo(&b, 1)
		t.Fatalf("%d goroutines before StartEmbedded, %d after Close:\n%s", before, now, b.String())
	}
}

func TestStartEmbeddedConfig(t *testing.T) {
	t.Run("addrs mismatch", func(t *testing.T) {
		_, err := StartEmbedded(context.Background(), EmbeddedConfig{Shards: 3, Addrs: []string{"127.0.0.1:0"}})
		if err == nil || !strings.Contains(err.Error(), "EmbeddedConfig.Addrs") {
			t.Fatalf("err = %v, want one naming EmbeddedConfig.Addrs", err)
		}
	})
	t.Run("defaults", func(t *testing.T) {
		e, err := StartEmbedded(context.Background(), EmbeddedConfig{})
		if err != nil {
			t.Fatal(err)
		}
		defer e.Close()
		if e.Shards() != DefaultShards || len(e.Addrs()) != DefaultShards {
			t.Fatalf("%d shards, %d addrs, want %d", e.Shards(), len(e.Addrs()), DefaultShards)
		}
		for i, a := range e.Addrs() {
			if !a.Addr().IsLoopback() || a.Port() == 0 {
				t.Errorf("shard %d address %s, want loopback with a real port", i, a)
			}
		}
	})
	t.Run("address in use", func(t *testing.T) {
		before := runtime.NumGoroutine()
		busy, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			t.Fatal(err)
		}
		defer busy.Close()
		_, err = StartEmbedded(context.Background(), EmbeddedConfig{Addrs: []string{"127.0.0.1:0", busy.Addr().String()}})
		if err == nil || !strings.Contains(err.Error(), "shard 1") {
			t.Fatalf("err = %v, want a listen error for shard 1", err)
		}
		waitUntil(t, "shard 0 stopped", func() bool { return runtime.NumGoroutine() <= before })
	})
	t.Run("cancelled", func(t *testing.T) {
		ctx, cancel := context.WithCancel(context.Background())
		cancel()
		if _, err := StartEmbedded(ctx, EmbeddedConfig{}); err == nil {
			t.Fatal("started with a cancelled context")
		}
	})
}

// waitRetained waits until every shard stores payload as the retained
// message of topic ("": none).
func waitRetained(t *testing.T, e *Embedded, topic, payload string) {
	t.Helper()
	waitUntil(t, "retained "+topic+" on every shard", func() bool {
		for _, n := range e.nodes {
			pk, ok := n.srv.Topics.Retained.Get(topic)
			if string(pk.Payload) != payload || ok != (payload != "") {
				return false
			}
		}
		return true
	})
}

func waitUntil(t *testing.T, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(waitFor)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(10 * time.Millisecond)
	}
}
