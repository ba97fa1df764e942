package broker

import (
	"context"
	"fmt"
	"runtime"
	"runtime/pprof"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	paho5 "github.com/eclipse/paho.golang/paho"
	paho3 "github.com/eclipse/paho.mqtt.golang"
	mqtt "github.com/mochi-mqtt/server/v2"
	"github.com/mochi-mqtt/server/v2/packets"
)

// The shard's active instance dies while a persistent-session device is
// away with 100 QoS 1 messages queued for it; the device reconnects to the
// shard's standby, which finds the session in Redis: session present, all
// 100 messages in the order they were published, none twice.
func TestStandbyDeliversQueuedMessages(t *testing.T) {
	f := newRedisFleet(t)
	active := f.start("s0-a", 0, 2)
	standby := f.start("s0-b", 0, 2)
	other := f.start("s1", 1, 2)

	const id, topic = "device-1", "cmd/device-1"
	dev, _ := connect311(t, active.Addr(), id, false, nil)
	subscribe311(t, dev, topic, 1)
	dev.Disconnect(100)
	waitRoute(t, "s0-a", topic, other)

	pub := client311(t, other.Addr(), "pub", true, nil)
	const n = 100
	want := make([]string, n)
	for i := range n {
		want[i] = fmt.Sprintf("m%03d", i)
		publish311(t, pub, topic, 1, false, want[i])
	}
	order := f.keys.clientKeys(id)[3]
	waitUntil(t, "100 messages queued in Redis", func() bool {
		return f.rdb.ZCard(context.Background(), order).Val() == n
	})

	// Close, not a drain: nothing moves the session anywhere first.
	if err := active.Close(); err != nil {
		t.Fatal(err)
	}

	s := newSink()
	_, present := connect311(t, standby.Addr(), id, false, s)
	if !present {
		t.Error("CONNACK session present = 0 on the standby [MQTT-3.2.2-3]")
	}
	got := s.exactly(t, n)
	if !slices.Equal(ordered(got), want) {
		t.Errorf("standby delivered %v, want %v in order", ordered(got), want)
	}
	for _, m := range got {
		if m.QoS != 1 || m.Topic != topic {
			t.Fatalf("got %+v, want QoS 1 on %s", m, topic)
		}
	}
	waitUntil(t, "acknowledged messages removed from Redis", func() bool {
		return f.rdb.ZCard(context.Background(), order).Val() == 0 &&
			f.rdb.HLen(context.Background(), f.keys.clientKeys(id)[2]).Val() == 0
	})
	if got := standby.n.sessionsLoaded.Load(); got != 1 {
		t.Errorf("sessions loaded on the standby = %d, want 1", got)
	}

	// The subscription moved too: a new message reaches the device on the
	// standby, and the route table now points at the standby.
	waitRoute(t, "s0-b", topic, other)
	publish311(t, pub, topic, 1, false, "after")
	if m := s.wait(t, n+1)[n]; m.Payload != "after" {
		t.Errorf("got %+v after takeover, want the new message", m)
	}
}

// A subscriber on shard 2's instance receives a publish made on shard 0's
// instance, once; a subscriber on shard 0 gets exactly one copy (nothing
// loops back through Redis); shard 1's instance, with no subscriber, gets
// no cross-shard traffic at all.
func TestRedisCrossShardPublish(t *testing.T) {
	f := newRedisFleet(t)
	s0, s1, s2 := f.start("s0", 0, 3), f.start("s1", 1, 3), f.start("s2", 2, 3)

	remote, local := newSink(), newSink()
	subscribe311(t, client311(t, s2.Addr(), "sub-remote", true, remote), "t/+", 2)
	subscribe311(t, client311(t, s0.Addr(), "sub-local", true, local), "t/#", 2)
	waitRoute(t, "s2", "t/+", s0)

	pub := client311(t, s0.Addr(), "pub", true, nil)
	const n = 20
	var want []string
	for i := range n {
		p := fmt.Sprintf("m%02d", i)
		want = append(want, p)
		publish311(t, pub, "t/x", byte(i%3), false, p)
	}
	for name, s := range map[string]*sink{"shard 2": remote, "shard 0": local} {
		if got := ordered(s.exactly(t, n)); !slices.Equal(got, want) {
			t.Errorf("%s received %v, want %v", name, got, want)
		}
	}
	if got := s2.Forwarded(); got != n {
		t.Errorf("shard 2 Forwarded = %d, want %d", got, n)
	}
	for _, i := range []*Instance{s0, s1} {
		if got, raw := i.Forwarded(), i.bus.received(i.InstanceID()); got != 0 || raw != 0 {
			t.Errorf("%s: Forwarded = %d, bus envelopes = %d; want 0 (no remote subscriber)", i.InstanceID(), got, raw)
		}
	}
}

// A retained message published on one instance is stored once in Redis and
// reaches new subscribers on every instance, including one that starts
// later; an empty retained message deletes it everywhere [MQTT-3.3.1-6].
func TestRedisRetained(t *testing.T) {
	f := newRedisFleet(t)
	s0, s1 := f.start("s0", 0, 2), f.start("s1", 1, 2)

	pub := client311(t, s1.Addr(), "pub", true, nil)
	publish311(t, pub, "state/lamp", 1, true, "on")
	waitUntil(t, "retained on s0", func() bool {
		pk, ok := s0.n.srv.Topics.Retained.Get("state/lamp")
		return ok && string(pk.Payload) == "on"
	})
	if got := f.rdb.HLen(context.Background(), f.keys.retained()).Val(); got != 1 {
		t.Errorf("Redis holds %d retained messages, want 1", got)
	}

	late := f.start("s0-late", 0, 2)
	for _, i := range []*Instance{s0, late} {
		s := newSink()
		c := client311(t, i.Addr(), "new-"+i.InstanceID(), true, s)
		subscribe311(t, c, "state/#", 1)
		if m := s.exactly(t, 1)[0]; m.Topic != "state/lamp" || m.Payload != "on" || !m.Retain {
			t.Errorf("%s: got %+v, want retained state/lamp=on", i.InstanceID(), m)
		}
		c.Disconnect(100)
	}

	publish311(t, pub, "state/lamp", 1, true, "")
	waitUntil(t, "retained message deleted", func() bool {
		_, on0 := s0.n.srv.Topics.Retained.Get("state/lamp")
		_, onLate := late.n.srv.Topics.Retained.Get("state/lamp")
		return !on0 && !onLate && f.rdb.HLen(context.Background(), f.keys.retained()).Val() == 0
	})
}

// A shared subscription group with one member on each of 3 instances gets
// each message once fleet-wide (MQTT 5.0 §4.8.2).
func TestRedisSharedSubscription(t *testing.T) {
	f := newRedisFleet(t)
	insts := []*Instance{f.start("s0", 0, 3), f.start("s1", 1, 3), f.start("s2", 2, 3)}

	const filter = "$share/g/t"
	members := make([]*sink, len(insts))
	for i, inst := range insts {
		members[i] = newSink()
		c, _, _ := client5(t, inst.Addr(), &paho5.Connect{ClientID: fmt.Sprintf("worker-%d", i), CleanStart: true, KeepAlive: 30}, members[i])
		subscribe5(t, c, filter, 1)
	}
	for _, inst := range insts {
		waitRoute(t, inst.InstanceID(), filter, insts[0])
	}

	pub := client311(t, insts[0].Addr(), "pub", true, nil)
	const n = 60
	var want []string
	for i := range n {
		p := fmt.Sprintf("job%02d", i)
		want = append(want, p)
		publish311(t, pub, "t", 1, false, p)
	}
	waitUntil(t, "every message delivered", func() bool {
		total := 0
		for _, s := range members {
			total += len(s.all())
		}
		return total >= n
	})
	time.Sleep(200 * time.Millisecond)
	var got []message
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
	if served < 2 {
		t.Errorf("only %d of 3 members received messages", served)
	}
}

// The same client id connecting to instance A, then to instance B: A's
// connection is closed with DISCONNECT 0x8E [MQTT-3.1.4-3], exactly one
// live session remains, and it is B's, with the subscription A granted.
func TestRedisSessionTakeover(t *testing.T) {
	f := newRedisFleet(t)
	a, b, c := f.start("s0-a", 0, 2), f.start("s0-b", 0, 2), f.start("s1", 1, 2)

	expiry := uint32(3600)
	kicked := make(chan byte, 1)
	connect := &paho5.Connect{
		ClientID: "dup", CleanStart: false, KeepAlive: 30,
		Properties: &paho5.ConnectProperties{SessionExpiryInterval: &expiry},
	}
	first, _, _ := client5(t, a.Addr(), connect, nil, func(cfg *paho5.ClientConfig) {
		cfg.OnServerDisconnect = func(d *paho5.Disconnect) { kicked <- d.ReasonCode }
	})
	subscribe5(t, first, "d/x", 1)

	s := newSink()
	_, _, ack := client5(t, b.Addr(), connect, s)
	if !ack.SessionPresent {
		t.Error("session present = 0 on B: the session should move with the device")
	}
	select {
	case code := <-kicked:
		if code != 0x8E {
			t.Errorf("A's connection got DISCONNECT 0x%02x, want 0x8E", code)
		}
	case <-time.After(waitFor):
		t.Fatal("A's connection was not disconnected")
	}
	waitUntil(t, "exactly one live session, on B", func() bool {
		_, onA := a.n.srv.Clients.Get("dup")
		cl, onB := b.n.srv.Clients.Get("dup")
		return !onA && onB && !cl.Closed()
	})
	if got := a.n.takenOver.Load(); got != 1 {
		t.Errorf("A's sessions taken over = %d, want 1", got)
	}
	if owner := f.rdb.HGet(context.Background(), f.keys.clientKeys("dup")[0], "owner").Val(); owner != "s0-b" {
		t.Errorf("Redis says %q holds the session, want s0-b", owner)
	}

	waitUntil(t, "route moved from A to B", func() bool {
		return c.bus.hasRoute("s0-b", "d/x") && !c.bus.hasRoute("s0-a", "d/x")
	})
	pub := client311(t, c.Addr(), "pub", true, nil)
	publish311(t, pub, "d/x", 1, false, "hello")
	if m := s.exactly(t, 1)[0]; m.Payload != "hello" {
		t.Errorf("B's connection got %+v", m)
	}
	if got := a.Forwarded(); got != 0 {
		t.Errorf("A received %d messages after the takeover, want 0", got)
	}
}

// denyHook stands in for the ACL hook until it exists: it allows every
// client and topic except subscriptions to filters under secret/.
type denyHook struct{ mqtt.HookBase }

func (denyHook) ID() string { return "deny-secret" }
func (denyHook) Provides(b byte) bool {
	return b == mqtt.OnConnectAuthenticate || b == mqtt.OnACLCheck
}
func (denyHook) OnConnectAuthenticate(*mqtt.Client, packets.Packet) bool { return true }
func (denyHook) OnACLCheck(_ *mqtt.Client, topic string, write bool) bool {
	return write || !strings.HasPrefix(topic, "secret/")
}

// A subscription the active instance refused is not stored, so a standby
// that loads the session does not grant it, even one whose own ACLs would
// (the standby here allows everything).
func TestDeniedSubscriptionNotPersisted(t *testing.T) {
	f := newRedisFleet(t)
	active := f.start("s0-a", 0, 2, func(c *Config) { c.Auth = new(denyHook) })
	standby := f.start("s0-b", 0, 2)
	other := f.start("s1", 1, 2)

	dev, _ := connect311(t, active.Addr(), "dev", false, nil)
	tok := dev.SubscribeMultiple(map[string]byte{"ok/x": 1, "secret/x": 1}, nil)
	if !tok.WaitTimeout(waitFor) || tok.Error() != nil {
		t.Fatalf("subscribe: %v", tok.Error())
	}
	codes := tok.(interface{ Result() map[string]byte }).Result()
	if codes["ok/x"] != 1 || codes["secret/x"] != 0x80 {
		t.Fatalf("SUBACK codes %v, want ok/x granted QoS 1 and secret/x refused (0x80)", codes)
	}
	subs, err := f.rdb.HKeys(context.Background(), f.keys.clientKeys("dev")[1]).Result()
	if err != nil {
		t.Fatal(err)
	}
	if !slices.Equal(subs, []string{"ok/x"}) {
		t.Errorf("Redis stores subscriptions %v, want only [ok/x]", subs)
	}
	dev.Disconnect(100)
	if err := active.Close(); err != nil {
		t.Fatal(err)
	}

	s := newSink()
	_, present := connect311(t, standby.Addr(), "dev", false, s)
	if !present {
		t.Error("session present = 0 on the standby")
	}
	if subs := standby.n.srv.Topics.Subscribers("secret/x"); len(subs.Subscriptions) != 0 {
		t.Errorf("standby granted the refused subscription: %v", subs.Subscriptions)
	}
	waitRoute(t, "s0-b", "ok/x", other)
	pub := client311(t, other.Addr(), "pub", true, nil)
	publish311(t, pub, "secret/x", 1, false, "secret")
	publish311(t, pub, "ok/x", 1, false, "ok")
	if got := ordered(s.exactly(t, 1)); !slices.Equal(got, []string{"ok"}) {
		t.Errorf("device received %v, want only [ok]", got)
	}
	if other.bus.hasRoute("s0-b", "secret/x") {
		t.Error("the refused filter has a route")
	}
}

// The expiry clock survives the move: a session whose expiry interval has
// passed since its device disconnected is not loaded by another instance,
// and its keys are gone from Redis by themselves.
func TestSessionExpiryAcrossInstances(t *testing.T) {
	f := newRedisFleet(t)
	a, b := f.start("s0-a", 0, 1), f.start("s0-b", 0, 1)

	// 3 s, not 1: the session's keys expire that long after the
	// disconnect, and the test must see them before they do, even on a
	// loaded machine.
	expiry := uint32(3)
	connect := &paho5.Connect{
		ClientID: "brief", CleanStart: false, KeepAlive: 30,
		Properties: &paho5.ConnectProperties{SessionExpiryInterval: &expiry},
	}
	c, _, _ := client5(t, a.Addr(), connect, nil)
	subscribe5(t, c, "e/x", 1)
	_ = c.Disconnect(&paho5.Disconnect{})
	keys := f.keys.clientKeys("brief")
	waitUntil(t, "disconnect recorded", func() bool {
		return f.rdb.HExists(context.Background(), keys[0], "disc").Val()
	})
	if ttl := f.rdb.PTTL(context.Background(), keys[1]).Val(); ttl <= 0 || ttl > 3*time.Second {
		t.Errorf("subscriptions key TTL %v, want (0, 3s]", ttl)
	}
	time.Sleep(3200 * time.Millisecond)

	_, _, ack := client5(t, b.Addr(), connect, nil)
	if ack.SessionPresent {
		t.Error("expired session loaded on B [MQTT-3.1.2-23]")
	}
	if subs := b.n.srv.Topics.Subscribers("e/x"); len(subs.Subscriptions) != 0 {
		t.Errorf("expired session's subscription restored: %v", subs.Subscriptions)
	}
}

// A session that ends with its connection (clean session) leaves nothing
// in Redis.
func TestCleanSessionLeavesNothing(t *testing.T) {
	f := newRedisFleet(t)
	a := f.start("s0", 0, 1)
	c := client311(t, a.Addr(), "tidy", true, nil)
	subscribe311(t, c, "x/y", 1)
	c.Disconnect(100)
	keys := f.keys.clientKeys("tidy")
	waitUntil(t, "session keys deleted", func() bool {
		return f.rdb.Exists(context.Background(), keys...).Val() == 0
	})
}

// An instance that restarts clears the routes its previous life left in
// Redis, and the routes of an instance that died without leaving are
// removed once its liveness key expires.
func TestRoutesRebuiltAfterRestartAndDeath(t *testing.T) {
	f := newRedisFleet(t)
	ctx := context.Background()
	// A crashed previous life of s1 and a dead instance "ghost": routes,
	// no liveness key.
	for _, id := range []string{"s1", "ghost"} {
		keys := f.keys.instanceKeys(id)
		f.rdb.SAdd(ctx, keys[1], "stale/#")
		f.rdb.Set(ctx, keys[2], 7, 0)
		f.rdb.SAdd(ctx, f.keys.instances(), id)
	}
	f.rdb.Set(ctx, f.keys.instanceKeys("ghost")[0], 1, 3*testHeartbeat)

	s0 := f.start("s0", 0, 2)
	waitUntil(t, "ghost seen alive at first", func() bool { return s0.bus.hasRoute("ghost", "stale/#") })
	s1 := f.start("s1", 1, 2)
	if n := f.rdb.SCard(ctx, f.keys.instanceKeys("s1")[1]).Val(); n != 0 {
		t.Errorf("restarted s1 still has %d routes in Redis", n)
	}
	waitUntil(t, "ghost reaped, s1's stale route gone", func() bool {
		return !s0.bus.hasRoute("ghost", "stale/#") && !s0.bus.isAlive("ghost") &&
			!s0.bus.hasRoute("s1", "stale/#") && s0.bus.isAlive("s1") &&
			f.rdb.Exists(ctx, f.keys.instanceKeys("ghost")[1]).Val() == 0 &&
			!f.rdb.SIsMember(ctx, f.keys.instances(), "ghost").Val()
	})

	// A publish to the stale topic goes nowhere.
	pub := client311(t, s0.Addr(), "pub", true, nil)
	publish311(t, pub, "stale/x", 1, false, "x")
	time.Sleep(100 * time.Millisecond)
	if got := s1.bus.received("s1"); got != 0 {
		t.Errorf("s1 received %d envelopes for a stale route", got)
	}

	// Routes follow unsubscription and the end of clean sessions.
	sub := client311(t, s1.Addr(), "sub", true, nil)
	subscribe311(t, sub, "live/+", 1)
	waitRoute(t, "s1", "live/+", s0)
	sub.Disconnect(100)
	waitUntil(t, "route withdrawn", func() bool { return !s0.bus.hasRoute("s1", "live/+") })
}

// During a drain, one shard's devices sit on two instances: a device still
// on the old instance and one already on the standby exchange messages both
// ways, because routes are kept per instance, not per shard.
func TestDrainBothInstancesOfAShard(t *testing.T) {
	f := newRedisFleet(t)
	old, standby := f.start("s0-a", 0, 1), f.start("s0-b", 0, 1)

	onOld, onNew := newSink(), newSink()
	x := client311(t, old.Addr(), "x", true, onOld)
	subscribe311(t, x, "to/x", 1)
	y := client311(t, standby.Addr(), "y", true, onNew)
	subscribe311(t, y, "to/y", 1)
	waitRoute(t, "s0-a", "to/x", standby)
	waitRoute(t, "s0-b", "to/y", old)

	publish311(t, x, "to/y", 1, false, "from x")
	publish311(t, y, "to/x", 1, false, "from y")
	if m := onNew.exactly(t, 1)[0]; m.Payload != "from x" {
		t.Errorf("y got %+v", m)
	}
	if m := onOld.exactly(t, 1)[0]; m.Payload != "from y" {
		t.Errorf("x got %+v", m)
	}
}

// Two connections with one client id racing to two instances end with
// exactly one live connection.
func TestRedisConcurrentConnectsKeepOneSession(t *testing.T) {
	f := newRedisFleet(t)
	insts := []*Instance{f.start("s0-a", 0, 1), f.start("s0-b", 0, 1)}
	live := func(id string) int {
		n := 0
		for _, i := range insts {
			if cl, ok := i.n.srv.Clients.Get(id); ok && !cl.Closed() {
				n++
			}
		}
		return n
	}
	for round := range 10 {
		id := fmt.Sprintf("racer-%d", round)
		var wg sync.WaitGroup
		clients := make([]paho3.Client, 2)
		for i, inst := range insts {
			wg.Go(func() {
				opts := paho3.NewClientOptions().AddBroker("tcp://" + inst.Addr().String()).
					SetClientID(id).SetCleanSession(round%2 == 0).SetAutoReconnect(false).SetConnectTimeout(waitFor)
				c := paho3.NewClient(opts)
				c.Connect().WaitTimeout(waitFor)
				clients[i] = c
			})
		}
		wg.Wait()
		waitUntil(t, id+" live on exactly one instance, one client connected", func() bool {
			open := 0
			for _, c := range clients {
				if c.IsConnectionOpen() {
					open++
				}
			}
			return live(id) == 1 && open == 1
		})
		for _, c := range clients {
			if c.IsConnectionOpen() {
				c.Disconnect(0)
			}
		}
	}
}

// Close disconnects every client, leaves the fleet (its routes and
// liveness key are gone from Redis) and leaves no goroutine behind.
func TestInstanceCloseLeavesNothing(t *testing.T) {
	f := newRedisFleet(t)
	before := runtime.NumGoroutine()
	inst, err := Start(context.Background(), Config{
		InstanceID: "closer", Listen: "127.0.0.1:0", Redis: f.rdb, RedisKeyPrefix: f.prefix, Heartbeat: testHeartbeat,
	})
	if err != nil {
		t.Fatal(err)
	}
	c := client311(t, inst.Addr(), "c", false, nil)
	subscribe311(t, c, "a/b", 1)
	if err := inst.Close(); err != nil {
		t.Fatal(err)
	}
	if err := inst.Close(); err != nil {
		t.Fatalf("second Close: %v", err)
	}
	waitUntil(t, "client sees the disconnect", func() bool { return !c.IsConnectionOpen() })
	ctx := context.Background()
	if n := f.rdb.Exists(ctx, f.keys.instanceKeys("closer")...).Val(); n != 0 {
		t.Errorf("%d instance keys left in Redis", n)
	}
	if f.rdb.SIsMember(ctx, f.keys.instances(), "closer").Val() {
		t.Error("instance still registered")
	}
	// The persistent session stays, for whichever instance the device
	// reaches next.
	if !f.rdb.HExists(ctx, f.keys.clientKeys("c")[1], "a/b").Val() {
		t.Error("persistent session's subscription lost at Close")
	}
	deadline := time.Now().Add(waitFor)
	for runtime.NumGoroutine() > before && time.Now().Before(deadline) {
		time.Sleep(20 * time.Millisecond)
	}
	if now := runtime.NumGoroutine(); now > before {
		var b strings.Builder
		_ = pprof.Lookup("goroutine").WriteTo(&b, 1)
		t.Fatalf("%d goroutines before Start, %d after Close:\n%s", before, now, b.String())
	}
}

func TestStartConfig(t *testing.T) {
	rdb := redisClient(t)
	for _, tc := range []struct {
		name string
		cfg  Config
		want string
	}{
		{"no instance id", Config{Redis: rdb}, "Config.InstanceID"},
		{"control character", Config{InstanceID: "a\nb", Redis: rdb}, "Config.InstanceID"},
		{"no redis", Config{InstanceID: "x"}, "Config.Redis"},
		{"shard out of range", Config{InstanceID: "x", Shard: 3, Shards: 3, Redis: rdb}, "Config.Shard"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			if _, err := Start(context.Background(), tc.cfg); err == nil || !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("err = %v, want one naming %s", err, tc.want)
			}
		})
	}
}
