package main

// End-to-end tests of `shardgate broker`: broker processes sharing a real
// redis-server, behind a `shardgate proxy` with MQTT health checks, and
// registered in a real Consul agent.

import (
	"context"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/eclipse/paho.golang/paho"
	mqtt3 "github.com/eclipse/paho.mqtt.golang"
	consulapi "github.com/hashicorp/consul/api"

	"github.com/shardgate/shardgate/internal/consultest"
	"github.com/shardgate/shardgate/internal/servertest"
)

// e2eBrokerOpts is one `shardgate broker` configuration.
type e2eBrokerOpts struct {
	id                string
	shard, shards     int
	priority          int
	redis, keyPrefix  string
	grace             string // "" = default
	consul            string // agent address; "" = no registration
	listen, adminAddr string // "" = a free port
}

// e2eBroker is a running `shardgate broker`.
type e2eBroker struct {
	*e2eProcess
	mqtt, admin string
}

func e2eStartBroker(t *testing.T, bin string, o e2eBrokerOpts) *e2eBroker {
	t.Helper()
	if o.listen == "" {
		o.listen = servertest.FreePort(t).String()
	}
	if o.adminAddr == "" {
		o.adminAddr = servertest.FreePort(t).String()
	}
	var y strings.Builder
	fmt.Fprintf(&y, "instance_id: %s\nlisten: %q\nadmin: %q\nshard: %d\nshards: %d\npriority: %d\n",
		o.id, o.listen, o.adminAddr, o.shard, o.shards, o.priority)
	fmt.Fprintf(&y, "redis: {address: %q, key_prefix: %s, heartbeat: 200ms, timeout: 500ms}\n", o.redis, o.keyPrefix)
	y.WriteString("auth: {allow_anonymous: true}\nlog: {level: debug}\n")
	if o.grace != "" {
		fmt.Fprintf(&y, "shutdown: {grace: %s}\n", o.grace)
	}
	if o.consul != "" {
		fmt.Fprintf(&y, "consul: {enabled: true, address: %q, check_interval: 1s, success_before_passing: 1}\n", o.consul)
	}
	path := filepath.Join(t.TempDir(), o.id+".yaml")
	if err := os.WriteFile(path, []byte(y.String()), 0o644); err != nil {
		t.Fatal(err)
	}
	b := &e2eBroker{mqtt: o.listen, admin: o.adminAddr}
	b.e2eProcess = e2eStart(t, "shardgate broker "+o.id, bin, "broker", "--config", path)
	e2eWaitFor(t, o.id+" /readyz answers 200", e2eWait, func() (bool, string) {
		if b.exited() {
			t.Fatalf("%s exited with %v:\n%s", b.name, b.state, b.out.String())
		}
		code, body, err := e2eGet(b.admin, "/readyz")
		return err == nil && code == 200, fmt.Sprintf("%d %q %v", code, body, err)
	})
	return b
}

// clients is shardgate_broker_clients_connected of the broker.
// clientsSettled polls clients until it reads want, for up to a second, and
// returns the last count: the proxy's MQTT health checks are clients too,
// for the few milliseconds each lasts, and a scrape can meet one.
func (b *e2eBroker) clientsSettled(t *testing.T, want float64) float64 {
	t.Helper()
	n := b.clients(t)
	for deadline := time.Now().Add(time.Second); n != want && time.Now().Before(deadline); n = b.clients(t) {
		time.Sleep(10 * time.Millisecond)
	}
	return n
}

func (b *e2eBroker) clients(t *testing.T) float64 {
	t.Helper()
	code, body, err := e2eGet(b.admin, "/metrics")
	if err != nil || code != 200 {
		return -1
	}
	for name, v := range e2eParseMetrics(t, body) {
		if strings.HasPrefix(name, "shardgate_broker_clients_connected{") {
			return v
		}
	}
	return -1
}

// TestE2EBrokerFailoverDeliversQueuedInOrder is the takeover proof
// with real processes: two `shardgate broker` instances of shard 0
// (priority 0 and 1) and one of shard 1 share a redis-server, behind a
// `shardgate proxy` whose MQTT health checks run every 100 ms. A device
// with a persistent session subscribes at QoS 1 through the proxy (it lands
// on the primary) and disconnects; a device of shard 1 publishes 100 QoS 1
// messages through the proxy, queued in the session on the primary. The
// primary is SIGKILLed; the device reconnects through the proxy, lands on
// the standby and receives all 100, in order, none twice.
func TestE2EBrokerFailoverDeliversQueuedInOrder(t *testing.T) {
	t.Parallel()
	bin := buildShardgate(t)
	rs := servertest.Redis(t, servertest.RedisOptions{})
	common := e2eBrokerOpts{shards: 2, redis: rs.String(), keyPrefix: "fo"}
	start := func(id string, shard, priority int) *e2eBroker {
		o := common
		o.id, o.shard, o.priority = id, shard, priority
		return e2eStartBroker(t, bin, o)
	}
	primary, standby, other := start("s0-a", 0, 0), start("s0-b", 0, 1), start("s1", 1, 0)
	px := e2eStartProxy(t, bin, e2eFleet{
		listen: servertest.FreePort(t).String(), admin: servertest.FreePort(t).String(), shards: 2,
		backends: []e2eBackend{
			{id: "s0-a", addr: primary.mqtt, shard: 0, priority: 0},
			{id: "s0-b", addr: standby.mqtt, shard: 0, priority: 1},
			{id: "s1", addr: other.mqtt, shard: 1, priority: 0},
		},
	})
	px.waitReady(t)
	e2eWaitFor(t, "3 instances healthy", e2eWait, func() (bool, string) {
		h := px.backends(t).healthy()
		return h["s0-a"] && h["s0-b"] && h["s1"], fmt.Sprint(h)
	})
	devID := e2eIDOnShard(t, px, "fo-dev", 0)
	pubID := e2eIDOnShard(t, px, "fo-pub", 1)

	var mu sync.Mutex
	var got []string
	dev := e2eConnectPersistent(t, px.mqtt, devID, func(m mqtt3.Message) {
		mu.Lock()
		got = append(got, string(m.Payload()))
		mu.Unlock()
	})
	if tok := dev.Subscribe("fo/q", 1, nil); !tok.WaitTimeout(e2eWait) || tok.Error() != nil {
		t.Fatalf("subscribe: %v", tok.Error())
	}
	if n := primary.clientsSettled(t, 1); n != 1 {
		t.Fatalf("the device is not on the primary: its clients_connected = %v", n)
	}
	dev.Disconnect(250)

	pub := e2eConnectPersistent(t, px.mqtt, pubID, nil)
	if n := other.clientsSettled(t, 1); n != 1 {
		t.Fatalf("the publisher is not on shard 1's instance: its clients_connected = %v", n)
	}
	const total = 100
	want := make([]string, total)
	for i := range want {
		want[i] = fmt.Sprintf("m%03d", i)
		if tok := pub.Publish("fo/q", 1, false, want[i]); !tok.WaitTimeout(e2eWait) || tok.Error() != nil {
			t.Fatalf("publish %d: %v", i, tok.Error())
		}
	}
	// The messages cross to the primary through Redis and are queued in
	// the session there, which writes them to Redis.
	e2eWaitFor(t, "100 messages queued on the primary", e2eWait, func() (bool, string) {
		code, body, err := e2eGet(primary.admin, "/metrics")
		if err != nil || code != 200 {
			return false, fmt.Sprint(code, err)
		}
		in := e2eParseMetrics(t, body)[`shardgate_broker_cross_shard_messages_total{direction="in",shard="0"}`]
		return in == total, fmt.Sprintf("cross-shard in: %v", in)
	})
	time.Sleep(200 * time.Millisecond) // the session writes follow each delivery

	primary.kill()
	e2eWaitFor(t, "the proxy sees the primary down", e2eWait, func() (bool, string) {
		h := px.backends(t).healthy()
		return !h["s0-a"] && h["s0-b"], fmt.Sprint(h)
	})
	dev = e2eConnectPersistent(t, px.mqtt, devID, func(m mqtt3.Message) {
		mu.Lock()
		got = append(got, string(m.Payload()))
		mu.Unlock()
	})
	if n := standby.clientsSettled(t, 1); n != 1 {
		t.Errorf("the device is not on the standby: its clients_connected = %v", n)
	}
	e2eWaitFor(t, "100 messages delivered by the standby", e2eWait, func() (bool, string) {
		mu.Lock()
		defer mu.Unlock()
		return len(got) >= total, fmt.Sprintf("%d received", len(got))
	})
	time.Sleep(500 * time.Millisecond) // any duplicate would arrive now
	mu.Lock()
	defer mu.Unlock()
	if !slices.Equal(got, want) {
		t.Errorf("received %d messages %v,\nwant the 100 in order, none twice", len(got), got)
	}
}

// e2eConnectPersistent connects an MQTT 3.1.1 client with a persistent
// session (CleanSession 0). Messages without a subscription handler
// (those of the stored session) go to handle.
func e2eConnectPersistent(t *testing.T, addr, id string, handle func(mqtt3.Message)) mqtt3.Client {
	t.Helper()
	opts := mqtt3.NewClientOptions().AddBroker("tcp://" + addr).SetClientID(id).
		SetProtocolVersion(4).SetCleanSession(false).SetAutoReconnect(false).
		SetConnectRetry(false).SetConnectTimeout(5 * time.Second).SetOrderMatters(true)
	if handle != nil {
		opts.SetDefaultPublishHandler(func(_ mqtt3.Client, m mqtt3.Message) { handle(m) })
	}
	c := mqtt3.NewClient(opts)
	if tok := c.Connect(); !tok.WaitTimeout(e2eWait) || tok.Error() != nil {
		t.Fatalf("connect %s via %s: %v", id, addr, tok.Error())
	}
	t.Cleanup(func() {
		if c.IsConnectionOpen() {
			c.Disconnect(100)
		}
	})
	return c
}

// TestE2EBrokerSIGTERMMaintenanceFirst: a broker registered in a real
// Consul agent, with an MQTT 5 device connected, gets SIGTERM. Its service
// leaves the passing-only health answer (what every proxy watches) while
// the process still runs and the device is still served; after the grace
// period the device gets DISCONNECT 0x8B, and the process deregisters and
// exits 0.
func TestE2EBrokerSIGTERMMaintenanceFirst(t *testing.T) {
	t.Parallel()
	bin := buildShardgate(t)
	agent := consultest.Start(t, consultest.Options{})
	rs := servertest.Redis(t, servertest.RedisOptions{})
	const grace = 3 * time.Second
	b := e2eStartBroker(t, bin, e2eBrokerOpts{
		id: "term-0", shards: 1, redis: rs.String(), keyPrefix: "term",
		grace: grace.String(), consul: agent.Addr(),
	})
	cc := consulapi.DefaultConfig()
	cc.Address = agent.Addr()
	client, err := consulapi.NewClient(cc)
	if err != nil {
		t.Fatal(err)
	}
	passing := func() []string {
		entries, _, err := client.Health().Service("mqtt-broker", "", true, nil)
		if err != nil {
			return []string{"error: " + err.Error()}
		}
		var ids []string
		for _, e := range entries {
			ids = append(ids, e.Service.ID)
		}
		return ids
	}
	e2eWaitFor(t, "the broker passing in consul", 20*time.Second, func() (bool, string) {
		ids := passing()
		return slices.Contains(ids, "term-0"), fmt.Sprint(ids)
	})

	conn, err := net.DialTimeout("tcp", b.mqtt, 5*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	disconnected := make(chan byte, 1)
	c := paho.NewClient(paho.ClientConfig{
		Conn: conn,
		OnServerDisconnect: func(d *paho.Disconnect) {
			select {
			case disconnected <- d.ReasonCode:
			default:
			}
		},
	})
	ctx, cancel := context.WithTimeout(context.Background(), e2eWait)
	defer cancel()
	if _, err := c.Connect(ctx, &paho.Connect{ClientID: "term-dev", CleanStart: true, KeepAlive: 30}); err != nil {
		t.Fatal(err)
	}

	sent := time.Now()
	b.signal(t, syscall.SIGTERM)
	e2eWaitFor(t, "the service out of the passing set while the broker runs", grace, func() (bool, string) {
		ids := passing()
		return !slices.Contains(ids, "term-0") && !b.exited(), fmt.Sprint(ids, " exited=", b.exited())
	})
	t.Logf("out of the passing set %s after SIGTERM", time.Since(sent).Round(time.Millisecond))
	// Maintenance comes first and closing the listener right after it, so
	// a dial made the moment the service left the passing set may still
	// land; within a second it must be refused.
	e2eWaitFor(t, "the broker refuses new connections after SIGTERM", time.Second, func() (bool, string) {
		c, err := net.DialTimeout("tcp", b.mqtt, time.Second)
		if err == nil {
			c.Close()
			return false, "still accepting"
		}
		return true, ""
	})
	select {
	case code := <-disconnected:
		if since := time.Since(sent); since < grace-200*time.Millisecond {
			t.Errorf("DISCONNECT after %s, before the %s grace", since, grace)
		}
		if code != 0x8B {
			t.Errorf("DISCONNECT reason 0x%02X, want 0x8B (server shutting down)", code)
		}
	case <-time.After(grace + 5*time.Second):
		t.Fatal("no DISCONNECT after the grace period")
	}
	if code := b.waitExit(t, 10*time.Second); code != 0 {
		t.Errorf("exit code %d", code)
	}
	out := b.out.String()
	var at []int
	for _, step := range []string{"step 1: service in maintenance", "step 2:", "step 3:", "step 4:", "step 5: deregistered"} {
		i := strings.Index(out, step)
		if i < 0 {
			t.Errorf("no %q in the log", step)
		}
		at = append(at, i)
	}
	if !slices.IsSorted(at) {
		t.Errorf("shutdown steps out of order: %v", at)
	}
	entries, _, err := client.Health().Service("mqtt-broker", "", false, nil)
	if err == nil && len(entries) != 0 {
		t.Errorf("service still registered after exit: %d entries", len(entries))
	}
}

// TestE2EBrokerRedisOutage: redis-server killed under a running broker
// with a device connected. /readyz turns to 429 with the fault's detail
// (Consul's warning, still passing) and shardgate_broker_redis_up to 0;
// the device stays connected and served. Restarted on the same port,
// Redis is back in /readyz (200) and the metric by itself.
func TestE2EBrokerRedisOutage(t *testing.T) {
	t.Parallel()
	bin := buildShardgate(t)
	rs := servertest.Redis(t, servertest.RedisOptions{})
	b := e2eStartBroker(t, bin, e2eBrokerOpts{id: "out-0", shards: 1, redis: rs.String(), keyPrefix: "out"})
	dev, err := e2eConnectV5(b.mqtt, "out-dev")
	if err != nil {
		t.Fatal(err)
	}
	defer dev.Disconnect()
	if err := dev.Subscribe("out/x", 1); err != nil {
		t.Fatal(err)
	}
	readyz := func(code int, body string) func() (bool, string) {
		return func() (bool, string) {
			c, b, err := e2eGet(b.admin, "/readyz")
			return err == nil && c == code && strings.Contains(string(b), body), fmt.Sprintf("%d %q %v", c, b, err)
		}
	}
	redisUp := func() float64 {
		_, body, _ := e2eGet(b.admin, "/metrics")
		return e2eParseMetrics(t, body)[`shardgate_broker_redis_up{shard="0"}`]
	}

	rs.Kill()
	e2eWaitFor(t, "/readyz 429 warning", e2eWait, readyz(429, "warning: redis failing since"))
	if up := redisUp(); up != 0 {
		t.Errorf("shardgate_broker_redis_up = %v with Redis down", up)
	}
	e2eRoundTrip(t, dev, "out/x", "during")

	rs.Restart()
	e2eWaitFor(t, "/readyz 200 again", e2eWait, readyz(200, "ok"))
	if up := redisUp(); up != 1 {
		t.Errorf("shardgate_broker_redis_up = %v after Redis returned", up)
	}
	e2eRoundTrip(t, dev, "out/x", "after")
	select {
	case <-dev.Lost():
		t.Error("the device was disconnected during the outage")
	default:
	}
	b.waitLog(t, e2eWait, "redis answers again")
}
