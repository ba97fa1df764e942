package proxy

import (
	"bytes"
	"context"
	"fmt"
	"net"
	"net/netip"
	"sync"
	"testing"
	"time"
	"unsafe"

	"github.com/eclipse/paho.golang/paho"
	mqtt "github.com/eclipse/paho.mqtt.golang"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/testutil"
	"golang.org/x/sys/unix"

	"github.com/shardgate/shardgate/backend"
	"github.com/shardgate/shardgate/internal/servertest"
	"github.com/shardgate/shardgate/mqttwire"
)

// The per-connection record stays small: it is what an idle device costs
// in user space, next to ~7.7 KB of kernel socket state per pair.
func TestConnSize(t *testing.T) {
	if n := unsafe.Sizeof(conn{}); n > 128 {
		t.Fatalf("conn is %d bytes, want <= 128", n)
	}
	t.Logf("conn: %d bytes, handshake: %d bytes", unsafe.Sizeof(conn{}), unsafe.Sizeof(handshake{}))
}

// threeShards starts three Mosquittos, one per shard, and a proxy in front.
func threeShards(t *testing.T, config func(*Config)) (*testProxy, []netip.AddrPort) {
	t.Helper()
	var brokers []netip.AddrPort
	var insts []backend.Instance
	for i := range 3 {
		a := servertest.Mosquitto(t, servertest.MosquittoOptions{}).Addr()
		brokers = append(brokers, a)
		insts = append(insts, inst(fmt.Sprintf("mosq-%d", i), a, i))
	}
	p := startProxy(t, proxySetup{shards: 3, instances: insts, config: config})
	return p, brokers
}

// paho3 connects a paho.mqtt.golang client (3.1 or 3.1.1) to addr.
func paho3(t *testing.T, addr string, level byte, id string, clean bool) (mqtt.Client, bool) {
	t.Helper()
	o := mqtt.NewClientOptions().AddBroker("tcp://" + addr).SetClientID(id).
		SetProtocolVersion(uint(level)).SetCleanSession(clean).
		SetAutoReconnect(false).SetConnectRetry(false).SetConnectTimeout(5 * time.Second).
		SetKeepAlive(30 * time.Second)
	c := mqtt.NewClient(o)
	tok := c.Connect()
	if !tok.WaitTimeout(5*time.Second) || tok.Error() != nil {
		t.Fatalf("paho %d connect %s via %s: %v", level, id, addr, tok.Error())
	}
	return c, tok.(*mqtt.ConnectToken).SessionPresent()
}

// paho5 connects a paho.golang MQTT 5 client to addr.
func paho5(t *testing.T, addr, id string, onPublish func(paho.PublishReceived) (bool, error)) *paho.Client {
	t.Helper()
	nc, err := net.DialTimeout("tcp", addr, 2*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	cfg := paho.ClientConfig{Conn: nc}
	if onPublish != nil {
		cfg.OnPublishReceived = []func(paho.PublishReceived) (bool, error){onPublish}
	}
	c := paho.NewClient(cfg)
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	ca, err := c.Connect(ctx, &paho.Connect{ClientID: id, CleanStart: true, KeepAlive: 30})
	if err != nil {
		t.Fatalf("paho v5 connect %s: %v", id, err)
	}
	if ca.ReasonCode != 0 {
		t.Fatalf("paho v5 connect %s: reason 0x%02x", id, ca.ReasonCode)
	}
	return c
}

// receiver subscribes directly on each broker and records which broker saw
// which topic.
type receiver struct {
	mu   sync.Mutex
	seen map[string][]int // topic → broker indexes, one per message
}

func watchBrokers(t *testing.T, brokers []netip.AddrPort, filter string) *receiver {
	t.Helper()
	r := &receiver{seen: map[string][]int{}}
	for i, b := range brokers {
		c, _ := paho3(t, b.String(), mqttwire.Level311, fmt.Sprintf("watch-%d", i), true)
		tok := c.Subscribe(filter, 1, func(_ mqtt.Client, m mqtt.Message) {
			r.mu.Lock()
			r.seen[m.Topic()] = append(r.seen[m.Topic()], i)
			r.mu.Unlock()
		})
		if !tok.WaitTimeout(5*time.Second) || tok.Error() != nil {
			t.Fatalf("subscribe on broker %d: %v", i, tok.Error())
		}
		t.Cleanup(func() { c.Disconnect(0) })
	}
	return r
}

func (r *receiver) get(topic string) []int {
	r.mu.Lock()
	defer r.mu.Unlock()
	return append([]int(nil), r.seen[topic]...)
}

// Devices of every MQTT version reach the broker of their client ID's shard
// through the proxy, every time they connect. Which broker got a device is
// seen from outside: each publishes on its own topic, and subscribers
// connected straight to each Mosquitto say where it arrived.
func TestRoutingSticky(t *testing.T) {
	p, brokers := threeShards(t, nil)
	r := watchBrokers(t, brokers, "sticky/#")
	const ids = 60
	for round := range 2 {
		for i := range ids {
			id := fmt.Sprintf("device-%03d", i)
			topic := "sticky/" + id
			switch (i + round) % 3 {
			case 0, 1:
				level := []byte{mqttwire.Level31, mqttwire.Level311}[(i+round)%3]
				c, _ := paho3(t, p.addr, level, id, true)
				tok := c.Publish(topic, 1, false, "hello")
				if !tok.WaitTimeout(5*time.Second) || tok.Error() != nil {
					t.Fatalf("publish %s: %v", id, tok.Error())
				}
				c.Disconnect(0)
			case 2:
				c := paho5(t, p.addr, id, nil)
				ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
				if _, err := c.Publish(ctx, &paho.Publish{Topic: topic, QoS: 1, Payload: []byte("hello")}); err != nil {
					t.Fatalf("v5 publish %s: %v", id, err)
				}
				cancel()
				c.Disconnect(&paho.Disconnect{})
			}
		}
	}
	for i := range ids {
		id := fmt.Sprintf("device-%03d", i)
		rt, ok := p.snap.RouteString(id)
		if !ok {
			t.Fatalf("no route for %s", id)
		}
		want := rt.Shard
		eventually(t, "both messages of "+id, func() bool { return len(r.get("sticky/"+id)) == 2 })
		for _, got := range r.get("sticky/" + id) {
			if got != want {
				t.Fatalf("%s: a message reached broker %d, its shard is %d", id, got, want)
			}
		}
	}
	counterIs(t, "connects_total{ok}", p.connects(resultOK), 2*ids)
	eventually(t, "all closed", func() bool { return p.Active() == 0 })
	for i := range 3 {
		g := p.metrics.ConnectionsActive.WithLabelValues(itoa(i), fmt.Sprintf("mosq-%d", i))
		if v := testutil.ToFloat64(g); v != 0 {
			t.Fatalf("connections_active{shard=%d} = %v after all closed", i, v)
		}
	}
}

// A persistent session survives a reconnect through the proxy: the device
// lands on the broker that holds it (session present), and a message
// published while it was away is delivered.
func TestPersistentSession(t *testing.T) {
	p, _ := threeShards(t, nil)
	id := "persistent-1"
	c, present := paho3(t, p.addr, mqttwire.Level311, id, false)
	if present {
		t.Fatal("fresh session reported present")
	}
	got := make(chan string, 4)
	tok := c.Subscribe("persist/in", 1, nil)
	if !tok.WaitTimeout(5*time.Second) || tok.Error() != nil {
		t.Fatal(tok.Error())
	}
	c.Disconnect(0)
	// Publish straight to the broker the routing contract names for id.
	rt, _ := p.snap.RouteString(id)
	direct, _ := paho3(t, rt.Instance.Addr.String(), mqttwire.Level311, "publisher", true)
	if tk := direct.Publish("persist/in", 1, false, "while away"); !tk.WaitTimeout(5*time.Second) || tk.Error() != nil {
		t.Fatal(tk.Error())
	}
	direct.Disconnect(0)

	o := mqtt.NewClientOptions().AddBroker("tcp://" + p.addr).SetClientID(id).
		SetProtocolVersion(4).SetCleanSession(false).SetAutoReconnect(false).
		SetDefaultPublishHandler(func(_ mqtt.Client, m mqtt.Message) { got <- string(m.Payload()) })
	c2 := mqtt.NewClient(o)
	ctok := c2.Connect()
	if !ctok.WaitTimeout(5*time.Second) || ctok.Error() != nil {
		t.Fatal(ctok.Error())
	}
	defer c2.Disconnect(0)
	if !ctok.(*mqtt.ConnectToken).SessionPresent() {
		t.Fatal("session not present on reconnect through the proxy")
	}
	select {
	case m := <-got:
		if m != "while away" {
			t.Fatalf("got %q", m)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("queued message not delivered")
	}
}

// Refused devices get the exact CONNACK DESIGN.md names, in their dialect,
// and the refusal is counted by reason.
func TestRefusals(t *testing.T) {
	closedPort := servertest.FreePort(t)
	v4 := func(id string) []byte { return connectPacket(mqttwire.Level311, id, 30) }
	v5 := func(id string) []byte { return connectPacket(mqttwire.Level5, id, 30) }
	v31 := func(id string) []byte { return connectPacket(mqttwire.Level31, id, 30) }
	ack4 := func(code byte) []byte { return []byte{0x20, 0x02, 0x00, code} }
	ack5 := func(code byte) []byte { return []byte{0x20, 0x03, 0x00, code, 0x00} }
	level6 := v4("x")
	level6[8] = 6 // 10 LL 00 04 'M' 'Q' 'T' 'T' level
	badUTF8 := func(level byte) []byte {
		b := connectPacket(level, "ab", 30)
		b[len(b)-1] = 0xff // client ID "a\xff"
		return b
	}

	type step struct {
		send   []byte
		want   []byte // nil: the CONNECT must reach the broker
		reason string
	}
	for _, tc := range []struct {
		name   string
		setup  func(b *rawBackend) proxySetup
		steps  []step
		result string
	}{
		{
			name: "no instance",
			setup: func(b *rawBackend) proxySetup {
				in := inst("down", b.addr(), 0)
				in.Healthy = false
				return proxySetup{shards: 1, instances: []backend.Instance{in}, policy: backend.Reject}
			},
			steps: []step{
				{v4("a"), ack4(0x03), reasonNoInstance},
				{v5("a"), ack5(0x88), reasonNoInstance},
				{v31("a"), ack4(0x03), reasonNoInstance},
			},
		},
		{
			name: "shard rate",
			setup: func(b *rawBackend) proxySetup {
				return proxySetup{shards: 1, instances: []backend.Instance{inst("b", b.addr(), 0)},
					config: func(c *Config) { c.Admission.Rate, c.Admission.Burst = 0.001, 1 }}
			},
			steps: []step{
				{v5("first"), nil, ""},
				{v5("second"), ack5(0x89), reasonShardRate},
				{v4("third"), ack4(0x03), reasonShardRate},
			},
		},
		{
			name: "source limit",
			setup: func(b *rawBackend) proxySetup {
				return proxySetup{shards: 1, instances: []backend.Instance{inst("b", b.addr(), 0)},
					config: func(c *Config) { c.Admission.PerSourceMax = 1 }}
			},
			steps: []step{
				{v4("first"), nil, ""},
				{v5("second"), ack5(0x89), reasonSourceLimit},
				{v4("third"), ack4(0x03), reasonSourceLimit},
			},
		},
		{
			name: "client id too long",
			setup: func(b *rawBackend) proxySetup {
				return proxySetup{shards: 1, instances: []backend.Instance{inst("b", b.addr(), 0)},
					config: func(c *Config) { c.Connect.MaxClientIDLength = 8 }}
			},
			steps: []step{
				{v5("123456789"), ack5(0x85), reasonClientIDInvalid},
				{v4("123456789"), ack4(0x02), reasonClientIDInvalid},
				{v4("12345678"), nil, ""},
			},
		},
		{
			name: "empty client id rejected",
			setup: func(b *rawBackend) proxySetup {
				return proxySetup{shards: 1, instances: []backend.Instance{inst("b", b.addr(), 0)},
					config: func(c *Config) { c.EmptyClientID = "reject" }}
			},
			steps: []step{
				{v5(""), ack5(0x85), reasonClientIDInvalid},
				{v4(""), ack4(0x02), reasonClientIDInvalid},
			},
		},
		{
			name: "empty client id by source",
			setup: func(b *rawBackend) proxySetup {
				return proxySetup{shards: 1, instances: []backend.Instance{inst("b", b.addr(), 0)}}
			},
			steps: []step{{v5(""), nil, ""}, {v4(""), nil, ""}},
		},
		{
			name: "bad client id and level",
			setup: func(b *rawBackend) proxySetup {
				return proxySetup{shards: 1, instances: []backend.Instance{inst("b", b.addr(), 0)}}
			},
			steps: []step{
				{badUTF8(mqttwire.Level5), ack5(0x85), reasonClientIDInvalid},
				{badUTF8(mqttwire.Level311), ack4(0x02), reasonClientIDInvalid},
				{level6, ack4(0x01), reasonUnsupported},
			},
		},
		{
			name: "dial failed",
			setup: func(b *rawBackend) proxySetup {
				return proxySetup{shards: 1, instances: []backend.Instance{inst("dead", closedPort, 0)}}
			},
			steps: []step{
				{v5("a"), ack5(0x88), reasonDialFailed},
				{v4("a"), ack4(0x03), reasonDialFailed},
			},
			result: resultError,
		},
	} {
		t.Run(tc.name, func(t *testing.T) {
			b := startRawBackend(t)
			p := startProxy(t, tc.setup(b))
			counts := map[string]float64{}
			refused := 0.0
			for i, s := range tc.steps {
				dev := dialProxy(t, p.addr)
				if _, err := dev.Write(s.send); err != nil {
					t.Fatal(err)
				}
				if s.want == nil {
					bk := b.accept(t)
					if got := readFull(t, bk, len(s.send)); !bytes.Equal(got, s.send) {
						t.Fatalf("step %d: broker got %x", i, got)
					}
					continue // stays connected (source limit counts it)
				}
				got := readUntilClosed(t, dev, 5*time.Second)
				if !bytes.Equal(got, s.want) {
					t.Fatalf("step %d: device got %x, want %x", i, got, s.want)
				}
				counts[s.reason]++
				refused++
			}
			for reason, n := range counts {
				counterIs(t, "connect_rejects_total{"+reason+"}", p.rejects(reason), n)
			}
			result := tc.result
			if result == "" {
				result = resultRejected
			}
			counterIs(t, "connects_total{"+result+"}", p.connects(result), refused)
		})
	}
}

// Bad input is closed and counted by reason, while well-behaved devices on
// the same proxy keep exchanging messages.
func TestBadInputIsolated(t *testing.T) {
	p, _ := threeShards(t, func(c *Config) {
		c.Connect.Timeout = Duration(300 * time.Millisecond)
	})

	// Good devices: each publishes to itself, QoS 1, all along.
	const good = 10
	stop := make(chan struct{})
	var wg sync.WaitGroup
	errs := make(chan error, good)
	for i := range good {
		id := fmt.Sprintf("good-%d", i)
		recv := make(chan string, 16)
		var c mqtt.Client
		c, _ = paho3(t, p.addr, mqttwire.Level311, id, true)
		if tok := c.Subscribe("echo/"+id, 1, func(_ mqtt.Client, m mqtt.Message) { recv <- string(m.Payload()) }); !tok.WaitTimeout(5*time.Second) || tok.Error() != nil {
			t.Fatal(tok.Error())
		}
		wg.Add(1)
		go func() {
			defer wg.Done()
			defer c.Disconnect(0)
			for n := 0; ; n++ {
				select {
				case <-stop:
					return
				default:
				}
				msg := fmt.Sprint(n)
				if tok := c.Publish("echo/"+id, 1, false, msg); !tok.WaitTimeout(5*time.Second) || tok.Error() != nil {
					errs <- fmt.Errorf("%s publish %d: %v", id, n, tok.Error())
					return
				}
				select {
				case got := <-recv:
					if got != msg {
						errs <- fmt.Errorf("%s: got %q, want %q", id, got, msg)
						return
					}
				case <-time.After(5 * time.Second):
					errs <- fmt.Errorf("%s: message %d not echoed", id, n)
					return
				}
				time.Sleep(20 * time.Millisecond)
			}
		}()
	}

	for _, tc := range []struct {
		name   string
		send   func(c net.Conn)
		reason string
		within time.Duration
	}{
		{"http", func(c net.Conn) { c.Write([]byte("GET / HTTP/1.1\r\nHost: x\r\n\r\n")) }, reasonNotMQTT, time.Second},
		{"tls client hello", func(c net.Conn) {
			c.Write([]byte{0x16, 0x03, 0x01, 0x00, 0xa5, 0x01, 0x00, 0x00, 0xa1, 0x03, 0x03})
		}, reasonNotMQTT, time.Second},
		{"garbage", func(c net.Conn) { c.Write([]byte{0xde, 0xad, 0xbe, 0xef}) }, reasonNotMQTT, time.Second},
		{"wrong protocol name", func(c net.Conn) {
			c.Write([]byte{0x10, 0x0c, 0x00, 0x04, 'M', 'Q', 'T', 'X', 0x04, 0x02, 0x00, 0x3c, 0x00, 0x00})
		}, reasonNotMQTT, time.Second},
		{"200 MB claim", func(c net.Conn) {
			// 200,000,000 = 0x0BEBC200 as a variable byte integer.
			c.Write([]byte{0x10, 0x80, 0x84, 0xaf, 0x5f})
		}, reasonTooLarge, 500 * time.Millisecond},
		{"malformed flags", func(c net.Conn) {
			b := connectPacket(mqttwire.Level311, "m", 30)
			b[9] |= 0x01 // reserved connect flag [MQTT-3.1.2-3]
			c.Write(b)
		}, reasonMalformed, time.Second},
		{"dribble", func(c net.Conn) {
			b := connectPacket(mqttwire.Level311, "dribbler", 30)
			for _, x := range b {
				if _, err := c.Write([]byte{x}); err != nil {
					return
				}
				time.Sleep(50 * time.Millisecond)
			}
		}, reasonTimeout, 2 * time.Second},
		{"silent", func(net.Conn) {}, reasonTimeout, 2 * time.Second},
		{"closed early", func(c net.Conn) {
			b := connectPacket(mqttwire.Level311, "quitter", 30)
			c.Write(b[:5])
			c.(*net.TCPConn).CloseWrite()
		}, reasonClosedEarly, time.Second},
	} {
		t.Run(tc.name, func(t *testing.T) {
			before := testutil.ToFloat64(p.rejects(tc.reason))
			dev := dialProxy(t, p.addr)
			start := time.Now()
			go tc.send(dev)
			got := readUntilClosed(t, dev, 5*time.Second)
			if len(got) != 0 {
				t.Fatalf("device got %x, want a plain close", got)
			}
			if d := time.Since(start); d > tc.within {
				t.Fatalf("closed after %v, want within %v", d, tc.within)
			}
			counterIs(t, "connect_rejects_total{"+tc.reason+"}", p.rejects(tc.reason), before+1)
		})
	}
	close(stop)
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Error(err)
	}
}

// The dribbled CONNECT is cut at the deadline, not when it completes.
func TestConnectDeadline(t *testing.T) {
	b := startRawBackend(t)
	p := startProxy(t, proxySetup{instances: []backend.Instance{inst("b", b.addr(), -1)},
		config: func(c *Config) { c.Connect.Timeout = Duration(300 * time.Millisecond) }})
	dev := dialProxy(t, p.addr)
	start := time.Now()
	go func() {
		for _, x := range connectPacket(mqttwire.Level311, "slowpoke-with-a-long-id", 30) {
			if _, err := dev.Write([]byte{x}); err != nil {
				return
			}
			time.Sleep(30 * time.Millisecond)
		}
	}()
	readUntilClosed(t, dev, 3*time.Second)
	if d := time.Since(start); d < 280*time.Millisecond || d > time.Second {
		t.Fatalf("closed after %v, want ~300ms", d)
	}
	counterIs(t, "connect_rejects_total{timeout}", p.rejects(reasonTimeout), 1)
}

// IPv6 devices are proxied like IPv4 ones; the PROXY header carries the
// IPv6 source.
func TestIPv6(t *testing.T) {
	ln, err := net.Listen("tcp", "[::1]:0")
	if err != nil {
		t.Skipf("no IPv6 loopback: %v", err)
	}
	ln.Close()
	b := startRawBackend(t)
	p := startProxy(t, proxySetup{instances: []backend.Instance{inst("b", b.addr(), -1)},
		config: func(c *Config) {
			c.Listen = []string{"127.0.0.1:0", "[::1]:0"}
			c.ProxyProtocol.Send = "v2"
		}})
	addrs := p.Addrs()
	if len(addrs) != 2 || !addrs[1].Addr().Is6() || addrs[1].Port() == 0 {
		t.Fatalf("Addrs() = %v", addrs)
	}
	dev := dialProxy(t, addrs[1].String())
	connect := connectPacket(mqttwire.Level5, "v6-device", 30)
	dev.Write(connect)
	bk := b.accept(t)
	want := append(AppendProxyV2(nil, dev.LocalAddr().(*net.TCPAddr).AddrPort(), addrs[1]), connect...)
	if got := readFull(t, bk, len(want)); !bytes.Equal(got, want) {
		t.Fatalf("broker got %x, want %x", got, want)
	}
}

// Shutdown stops accepting at once, lets a live device go on until the
// deadline, then closes it; an idle proxy shuts down at once.
func TestShutdown(t *testing.T) {
	b := startRawBackend(t)
	p := startProxy(t, proxySetup{instances: []backend.Instance{inst("b", b.addr(), -1)}})
	dev := dialProxy(t, p.addr)
	connect := connectPacket(mqttwire.Level311, "stayer", 0)
	dev.Write(connect)
	bk := b.accept(t)
	readFull(t, bk, len(connect))

	ctx, cancel := context.WithTimeout(context.Background(), 500*time.Millisecond)
	defer cancel()
	errc := make(chan error, 1)
	start := time.Now()
	go func() { errc <- p.Shutdown(ctx) }()
	eventually(t, "listeners closed", func() bool {
		c, err := net.DialTimeout("tcp", p.addr, 100*time.Millisecond)
		if err == nil {
			c.Close()
		}
		return err != nil
	})
	// The device still works during the grace period.
	dev.Write([]byte{0xc0, 0x00})
	readFull(t, bk, 2)
	bk.Write([]byte{0xd0, 0x00})
	readFull(t, dev, 2)
	select {
	case err := <-errc:
		if err != context.DeadlineExceeded {
			t.Fatalf("Shutdown = %v, want deadline exceeded", err)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("Shutdown did not return")
	}
	if d := time.Since(start); d < 450*time.Millisecond {
		t.Fatalf("Shutdown returned after %v, before its deadline", d)
	}
	readUntilClosed(t, dev, 2*time.Second)
	if p.Active() != 0 {
		t.Fatalf("Active = %d after shutdown", p.Active())
	}

	// Nothing connected: returns at once, without error.
	p2 := startProxy(t, proxySetup{instances: []backend.Instance{inst("b", b.addr(), -1)}})
	start = time.Now()
	if err := p2.Shutdown(context.Background()); err != nil {
		t.Fatal(err)
	}
	if d := time.Since(start); d > time.Second {
		t.Fatalf("idle Shutdown took %v", d)
	}
	// Shutdown before Start, and twice, is fine.
	p3, err := New(Options{Config: p2.cfg, Router: p2.router})
	if err != nil {
		t.Fatal(err)
	}
	if err := p3.Shutdown(context.Background()); err != nil {
		t.Fatal(err)
	}
	if err := p3.Shutdown(context.Background()); err != nil {
		t.Fatal(err)
	}
}

// New fails at start, naming the address, when a listen address is taken by
// a socket without SO_REUSEPORT.
func TestListenError(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	cfg := &Config{Listen: []string{ln.Addr().String()},
		Backends: BackendsConfig{Static: []backend.StaticInstance{{ID: "b", Address: "127.0.0.1:1"}}}}
	cfg.SetDefaults()
	snap := backend.NewSnapshot(0, nil, backend.SnapshotOptions{})
	_, err = New(Options{Config: cfg, Router: backend.NewRouter(snap)})
	if err == nil {
		t.Fatal("New succeeded on a taken address")
	}
	if !bytes.Contains([]byte(err.Error()), []byte(ln.Addr().String())) {
		t.Fatalf("error %q does not name the address", err)
	}
}

// Metrics register under the DESIGN.md names; a second registration on the
// same registry is an error, not a panic.
func TestMetricsRegister(t *testing.T) {
	reg := prometheus.NewRegistry()
	m, err := NewMetrics(reg)
	if err != nil {
		t.Fatal(err)
	}
	m.ConnectionsActive.WithLabelValues("0", "a").Inc()
	m.InstancesHealthy.WithLabelValues("0").Set(1)
	m.Handoff.Observe(0.001)
	m.BackendDial.Observe(0.001)
	for _, name := range []string{
		"shardgate_connections_active", "shardgate_connects_total",
		"shardgate_connect_rejects_total", "shardgate_handoff_seconds",
		"shardgate_backend_dial_seconds", "shardgate_bytes_total",
		"shardgate_instances_healthy", "shardgate_packets_total",
		"shardgate_idle_closes_total",
	} {
		if n, err := testutil.GatherAndCount(reg, name); err != nil || n == 0 {
			t.Errorf("%s: %d series, err %v", name, n, err)
		}
	}
	if n, _ := testutil.GatherAndCount(reg, "shardgate_connect_rejects_total"); n != len(rejectReasons) {
		t.Errorf("connect_rejects_total has %d series, want every reason (%d) at 0", n, len(rejectReasons))
	}
	if _, err := NewMetrics(reg); err == nil {
		t.Fatal("second registration succeeded")
	}
}

// A broker that never completes the TCP handshake (its accept queue is full,
// so SYNs are dropped) is given up after dial.timeout: the device gets
// server unavailable, counted as dial_failed.
func TestDialTimeout(t *testing.T) {
	fd, err := unix.Socket(unix.AF_INET, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer unix.Close(fd)
	if err := unix.Bind(fd, &unix.SockaddrInet4{Addr: [4]byte{127, 0, 0, 1}}); err != nil {
		t.Fatal(err)
	}
	if err := unix.Listen(fd, 0); err != nil {
		t.Fatal(err)
	}
	sa, _ := unix.Getsockname(fd)
	full := addrPortOf(sa)
	// Fill the accept queue; later SYNs go unanswered.
	for range 3 {
		if c, err := net.DialTimeout("tcp", full.String(), 200*time.Millisecond); err == nil {
			defer c.Close()
		}
	}
	p := startProxy(t, proxySetup{instances: []backend.Instance{inst("stuck", full, -1)},
		config: func(c *Config) { c.Dial.Timeout = Duration(300 * time.Millisecond) }})
	dev := dialProxy(t, p.addr)
	start := time.Now()
	dev.Write(connectPacket(mqttwire.Level5, "patient", 30))
	got := readUntilClosed(t, dev, 5*time.Second)
	if want := []byte{0x20, 0x03, 0x00, 0x88, 0x00}; !bytes.Equal(got, want) {
		t.Fatalf("device got %x, want %x", got, want)
	}
	if d := time.Since(start); d < 250*time.Millisecond || d > 2*time.Second {
		t.Fatalf("refused after %v, want ~300ms", d)
	}
	counterIs(t, "connect_rejects_total{dial_failed}", p.rejects(reasonDialFailed), 1)
	counterIs(t, "connects_total{error}", p.connects(resultError), 1)
}
