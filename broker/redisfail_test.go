package broker

import (
	"context"
	"fmt"
	"log/slog"
	"os"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/testutil"

	"github.com/shardgate/shardgate/internal/servertest"
)

// TestRedisDownLocalDeliveryGoesOn is the broker's Redis-failure promise: Redis killed under a
// running instance with two local devices exchanging QoS 1 messages. The
// devices stay connected and every message is delivered, each publish
// acknowledged within the Redis timeout's bound; the instance reports the
// fault (RedisError, shardgate_broker_redis_up 0). Redis restarted empty
// on the same port: the fault clears by itself, routes are announced
// afresh (cross-shard delivery works again), and the persistent session
// that Redis lost is written afresh, so a standby can take it over.
func TestRedisDownLocalDeliveryGoesOn(t *testing.T) {
	srv := servertest.Redis(t, servertest.RedisOptions{})
	fc := FileConfig{Redis: RedisFileConfig{Address: srv.String(), Timeout: Duration(200 * time.Millisecond)}}
	rdb, err := fc.RedisClient()
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = rdb.Close() })
	log := slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelWarn})).With("test", t.Name())
	start := func(id string, shard int) *Instance {
		inst, err := Start(context.Background(), Config{
			InstanceID: id, Shard: shard, Shards: 2, Listen: "127.0.0.1:0",
			Redis: rdb, RedisKeyPrefix: "rf", RedisTimeout: 200 * time.Millisecond,
			Heartbeat: testHeartbeat, Log: log,
		})
		if err != nil {
			t.Fatalf("Start %s: %v", id, err)
		}
		t.Cleanup(func() { _ = inst.Close() })
		return inst
	}
	a, b := start("rf-a", 0), start("rf-b", 1)

	got := newSink()
	sub := client311(t, a.Addr(), "rf-sub", false, got)
	subscribe311(t, sub, "local/x", 1)
	pub := client311(t, a.Addr(), "rf-pub", true, nil)
	remote := newSink()
	rsub := client311(t, b.Addr(), "rf-remote", true, remote)
	subscribe311(t, rsub, "cross/x", 1)
	waitRoute(t, "rf-b", "cross/x", a)
	publish311(t, pub, "cross/x", 1, false, "before")
	remote.wait(t, 1)

	srv.Kill()
	waitUntil(t, "RedisError reports the fault", func() bool { return a.RedisError() != nil })
	if up := redisUp(t, a); up != 0 {
		t.Errorf("shardgate_broker_redis_up = %v while Redis is down, want 0", up)
	}

	const n = 20
	var want []string
	began := time.Now()
	for i := range n {
		p := fmt.Sprint(i)
		want = append(want, p)
		tok := pub.Publish("local/x", 1, false, p)
		if !tok.WaitTimeout(5*time.Second) || tok.Error() != nil {
			t.Fatalf("QoS 1 publish %d not acknowledged with Redis down: %v", i, tok.Error())
		}
	}
	took := time.Since(began)
	if g := ordered(got.exactly(t, n)); !slices.Equal(g, want) {
		t.Errorf("with Redis down the local subscriber got %v, want %v", g, want)
	}
	if !sub.IsConnectionOpen() || !pub.IsConnectionOpen() || !rsub.IsConnectionOpen() {
		t.Error("a device was disconnected while Redis was down")
	}
	t.Logf("%d QoS 1 round trips with Redis down took %s", n, took)
	errs := testutil.ToFloat64(metric(t, a, "shardgate_broker_redis_errors_total"))
	if errs == 0 {
		t.Error("shardgate_broker_redis_errors_total = 0 after failed Redis calls")
	}

	// A device that connects during the outage is served; its session
	// claim fails, and is made when Redis returns.
	late := client311(t, a.Addr(), "rf-late", false, nil)
	subscribe311(t, late, "late/x", 1)

	srv.Restart()
	waitUntil(t, "the fault clears on both instances", func() bool {
		return a.RedisError() == nil && b.RedisError() == nil
	})
	if up := redisUp(t, a); up != 1 {
		t.Errorf("shardgate_broker_redis_up = %v after Redis returned, want 1", up)
	}
	waitRoute(t, "rf-b", "cross/x", a)
	deadline := time.Now().Add(waitFor)
	for len(remote.all()) < 2 {
		// The bus's subscription to its channel reconnects on its own;
		// until then a forwarded message is lost (at most once between
		// instances), so publish until one arrives.
		if time.Now().After(deadline) {
			t.Fatal("cross-shard delivery did not resume after Redis returned")
		}
		publish311(t, pub, "cross/x", 0, false, "after")
		time.Sleep(50 * time.Millisecond)
	}

	// The persistent session that Redis lost is in Redis again, with its
	// subscription, and takes writes.
	keys := keyspace{"rf"}.clientKeys("rf-sub")
	waitUntil(t, "the lost session written afresh", func() bool {
		owner, _ := rdb.HGet(context.Background(), keys[0], "owner").Result()
		return owner == "rf-a" && rdb.HExists(context.Background(), keys[1], "local/x").Val()
	})
	lateKeys := keyspace{"rf"}.clientKeys("rf-late")
	waitUntil(t, "the session of the device connected during the outage written", func() bool {
		owner, _ := rdb.HGet(context.Background(), lateKeys[0], "owner").Result()
		return owner == "rf-a" && rdb.HExists(context.Background(), lateKeys[1], "late/x").Val()
	})
	subscribe311(t, sub, "local/y", 1)
	waitUntil(t, "a subscription made after recovery stored", func() bool {
		return rdb.HExists(context.Background(), keys[1], "local/y").Val()
	})
}

// metric returns the instance's series whose name is name (the only one,
// or the first).
func metric(t *testing.T, inst *Instance, name string) prometheus.Collector {
	t.Helper()
	return collectorFunc(func(ch chan<- prometheus.Metric) {
		c := make(chan prometheus.Metric, 64)
		go func() { inst.Collect(c); close(c) }()
		for m := range c {
			if strings.Contains(m.Desc().String(), `"`+name+`"`) {
				ch <- m
			}
		}
	})
}

func redisUp(t *testing.T, inst *Instance) float64 {
	t.Helper()
	return testutil.ToFloat64(metric(t, inst, "shardgate_broker_redis_up"))
}

// collectorFunc is an unchecked collector around a collect function.
type collectorFunc func(chan<- prometheus.Metric)

func (f collectorFunc) Describe(chan<- *prometheus.Desc)    {}
func (f collectorFunc) Collect(ch chan<- prometheus.Metric) { f(ch) }

// TestInstanceMetrics checks the metric set on a running instance:
// messages by QoS, sessions, subscriptions, cross-shard traffic in and out,
// Redis latency; an instance with no matching subscriber gets no
// cross-shard traffic.
func TestInstanceMetrics(t *testing.T) {
	f := newRedisFleet(t)
	a, b, c := f.start("m-a", 0, 3), f.start("m-b", 1, 3), f.start("m-c", 2, 3)
	got := newSink()
	sub := client311(t, b.Addr(), "m-sub", false, got)
	subscribe311(t, sub, "m/x", 1)
	waitRoute(t, "m-b", "m/x", a, c)
	pub := client311(t, a.Addr(), "m-pub", true, nil)
	publish311(t, pub, "m/x", 1, false, "one")
	publish311(t, pub, "m/x", 0, false, "two")
	got.wait(t, 2)

	reg := prometheus.NewPedanticRegistry()
	reg.MustRegister(a)
	if _, err := reg.Gather(); err != nil {
		t.Fatalf("gather: %v", err)
	}
	expect := func(inst *Instance, want string, names ...string) {
		t.Helper()
		deadline := time.Now().Add(waitFor)
		for {
			err := testutil.CollectAndCompare(inst, strings.NewReader(want), names...)
			if err == nil {
				return
			}
			if time.Now().After(deadline) {
				t.Fatalf("metrics of %s: %v", inst.InstanceID(), err)
			}
			time.Sleep(20 * time.Millisecond)
		}
	}
	expect(a, `
# HELP shardgate_broker_messages_received_total PUBLISH packets the instance received from its clients, by QoS (cross-shard deliveries are in shardgate_broker_cross_shard_messages_total).
# TYPE shardgate_broker_messages_received_total counter
shardgate_broker_messages_received_total{qos="0",shard="0"} 1
shardgate_broker_messages_received_total{qos="1",shard="0"} 1
shardgate_broker_messages_received_total{qos="2",shard="0"} 0
# HELP shardgate_broker_cross_shard_messages_total Cross-shard messages: direction in = delivered into the instance by the bus (once per message), out = published here and handed to the bus.
# TYPE shardgate_broker_cross_shard_messages_total counter
shardgate_broker_cross_shard_messages_total{direction="in",shard="0"} 0
shardgate_broker_cross_shard_messages_total{direction="out",shard="0"} 2
`, "shardgate_broker_messages_received_total", "shardgate_broker_cross_shard_messages_total")
	expect(b, `
# HELP shardgate_broker_messages_sent_total PUBLISH packets the instance sent to its clients, by QoS (resends included).
# TYPE shardgate_broker_messages_sent_total counter
shardgate_broker_messages_sent_total{qos="0",shard="1"} 1
shardgate_broker_messages_sent_total{qos="1",shard="1"} 1
shardgate_broker_messages_sent_total{qos="2",shard="1"} 0
# HELP shardgate_broker_cross_shard_messages_total Cross-shard messages: direction in = delivered into the instance by the bus (once per message), out = published here and handed to the bus.
# TYPE shardgate_broker_cross_shard_messages_total counter
shardgate_broker_cross_shard_messages_total{direction="in",shard="1"} 2
shardgate_broker_cross_shard_messages_total{direction="out",shard="1"} 0
# HELP shardgate_broker_sessions Sessions the instance holds in memory, connected or not (persistent sessions of disconnected devices included).
# TYPE shardgate_broker_sessions gauge
shardgate_broker_sessions{shard="1"} 1
# HELP shardgate_broker_subscriptions Subscriptions held by the shard's sessions.
# TYPE shardgate_broker_subscriptions gauge
shardgate_broker_subscriptions{shard="1"} 1
`, "shardgate_broker_messages_sent_total", "shardgate_broker_cross_shard_messages_total", "shardgate_broker_sessions", "shardgate_broker_subscriptions")
	// No subscriber on c: no cross-shard traffic reaches it.
	expect(c, `
# HELP shardgate_broker_cross_shard_messages_total Cross-shard messages: direction in = delivered into the instance by the bus (once per message), out = published here and handed to the bus.
# TYPE shardgate_broker_cross_shard_messages_total counter
shardgate_broker_cross_shard_messages_total{direction="in",shard="2"} 0
shardgate_broker_cross_shard_messages_total{direction="out",shard="2"} 0
`, "shardgate_broker_cross_shard_messages_total")
	if n := testutil.CollectAndCount(a, "shardgate_broker_redis_latency_seconds"); n != 1 {
		t.Errorf("redis latency histogram series: %d, want 1", n)
	}
}
