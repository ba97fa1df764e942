package proxy

import (
	"bytes"
	"context"
	"fmt"
	"net"
	"net/netip"
	"os"
	"strconv"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/eclipse/paho.golang/paho"
	mqtt "github.com/eclipse/paho.mqtt.golang"
	"github.com/prometheus/client_golang/prometheus/testutil"

	"github.com/shardgate/shardgate/backend"
	"github.com/shardgate/shardgate/internal/servertest"
	"github.com/shardgate/shardgate/mqttwire"
)

// Shard 0 has instance A (priority 0, active) and B (priority 1, standby).
func drainPair(a, b netip.AddrPort) []backend.Instance {
	ia, ib := inst("A", a, 0), inst("B", b, 0)
	ib.Priority = 1
	return []backend.Instance{ia, ib}
}

// failA swaps in a snapshot where A is unhealthy and tells the proxy, as
// the source's update callback does.
func failA(p *testProxy) *backend.Snapshot {
	old := p.router.Load()
	ins := old.Instances()
	for i := range ins {
		if ins[i].ID == "A" {
			ins[i].Healthy = false
		}
	}
	next := backend.NewSnapshot(old.Shards(), ins, backend.SnapshotOptions{})
	p.router.Store(next)
	p.OnSnapshot(old, next)
	return next
}

// healA makes A healthy again.
func healA(p *testProxy) {
	old := p.router.Load()
	ins := old.Instances()
	for i := range ins {
		ins[i].Healthy = true
	}
	next := backend.NewSnapshot(old.Shards(), ins, backend.SnapshotOptions{})
	p.router.Store(next)
	p.OnSnapshot(old, next)
}

func (p *testProxy) active(id string) float64 {
	return testutil.ToFloat64(p.metrics.ConnectionsActive.WithLabelValues("0", id))
}

// TestDrainMovesDevicesAtPace: 20 paho devices on Mosquitto A; A becomes
// unhealthy; new devices go to B at once; the live ones are closed at
// 0.25 × 20 = 5 per second, in steps, and each reconnect lands on B.
func TestDrainMovesDevicesAtPace(t *testing.T) {
	a := servertest.Mosquitto(t, servertest.MosquittoOptions{}).Addr()
	b := servertest.Mosquitto(t, servertest.MosquittoOptions{}).Addr()
	p := startProxy(t, proxySetup{shards: 1, instances: drainPair(a, b), config: func(c *Config) {
		c.Drain.Rate = 0.25
	}})
	const n = 20
	var mu sync.Mutex
	var lost []time.Time
	clients := make([]mqtt.Client, n)
	for i := range n {
		o := mqtt.NewClientOptions().AddBroker("tcp://" + p.addr).SetClientID("dev-" + strconv.Itoa(i)).
			SetProtocolVersion(4).SetCleanSession(true).SetKeepAlive(30 * time.Second).
			SetAutoReconnect(true).SetMaxReconnectInterval(100 * time.Millisecond).
			SetConnectionLostHandler(func(mqtt.Client, error) {
				mu.Lock()
				lost = append(lost, time.Now())
				mu.Unlock()
			})
		c := mqtt.NewClient(o)
		if tok := c.Connect(); !tok.WaitTimeout(5*time.Second) || tok.Error() != nil {
			t.Fatalf("connect %d: %v", i, tok.Error())
		}
		clients[i] = c
		t.Cleanup(func() { c.Disconnect(0) })
	}
	eventually(t, "20 devices on A", func() bool { return p.active("A") == n })

	start := time.Now()
	failA(p)
	// A new device goes to B at once, before any live one was moved.
	fresh, _ := paho3(t, p.addr, mqttwire.Level311, "fresh", true)
	t.Cleanup(func() { fresh.Disconnect(0) })
	if got := p.active("B"); got != 1 {
		t.Fatalf("new device: connections_active{B} = %v, want 1", got)
	}
	time.Sleep(time.Second)
	mu.Lock()
	early := len(lost)
	mu.Unlock()
	if early == 0 || early > 8 {
		t.Errorf("after 1 s of a 5/s drain %d devices were moved, want 1..8", early)
	}
	remaining := testutil.ToFloat64(p.metrics.DrainRemaining.WithLabelValues("A"))
	if remaining <= 0 || remaining >= n {
		t.Errorf("drain_remaining{A} after 1 s = %v, want between 0 and %d", remaining, n)
	}
	deadline := time.Now().Add(10 * time.Second)
	for p.active("A") != 0 || p.active("B") != n+1 {
		if time.Now().After(deadline) {
			t.Fatalf("A %v, B %v connections after the drain, want 0, %d", p.active("A"), p.active("B"), n+1)
		}
		time.Sleep(20 * time.Millisecond)
	}
	mu.Lock()
	defer mu.Unlock()
	if len(lost) != n {
		t.Fatalf("%d devices lost their connection, want %d", len(lost), n)
	}
	took := lost[len(lost)-1].Sub(start)
	t.Logf("20 devices moved in %v (first after %v)", took, lost[0].Sub(start))
	// 20 at 5/s: the last token is handed out at 4 s.
	if took < 3*time.Second || took > 6*time.Second {
		t.Errorf("drain took %v, want ~4 s", took)
	}
	counterIs(t, "drained_total{A}", p.metrics.Drained.WithLabelValues("A"), n)
	eventually(t, "drain_remaining{A} = 0", func() bool {
		return testutil.ToFloat64(p.metrics.DrainRemaining.WithLabelValues("A")) == 0
	})
	for i, c := range clients {
		if !c.IsConnectionOpen() {
			t.Errorf("device %d did not reconnect", i)
		}
	}
}

// fakeBroker is a raw TCP server named as a fake: the tests read the exact
// bytes the proxy writes to the broker.
func fakeBroker(t *testing.T) *rawBackend { return startRawBackend(t) }

// rawDevice connects a raw device through the proxy to the fake broker,
// which answers the CONNACK; it returns both ends.
func rawDevice(t *testing.T, p *testProxy, fb *rawBackend, level byte, id string) (dev, bk *net.TCPConn) {
	t.Helper()
	dev = dialProxy(t, p.addr)
	connect := connectPacket(level, id, 0)
	dev.Write(connect)
	bk = fb.accept(t)
	if got := readFull(t, bk, len(connect)); !bytes.Equal(got, connect) {
		t.Fatalf("broker got %x, want the CONNECT", got)
	}
	ack := mqttwire.AppendConnack(nil, level, false, mqttwire.Success)
	bk.Write(ack)
	readFull(t, dev, len(ack))
	eventually(t, "relaying", func() bool { return p.active("A") == 1 })
	return dev, bk
}

func fastDrain(c *Config) { c.Drain.MinRate = 100 }

// publish returns a QoS 0 PUBLISH with a payload of n bytes.
func publish(topic string, n int) []byte {
	body := append([]byte{byte(len(topic) >> 8), byte(len(topic))}, topic...)
	body = append(body, bytes.Repeat([]byte{'x'}, n)...)
	var lb []byte
	for l := len(body); ; {
		d := byte(l % 128)
		l /= 128
		if l > 0 {
			d |= 0x80
		}
		lb = append(lb, d)
		if l == 0 {
			break
		}
	}
	return append(append([]byte{0x30}, lb...), body...)
}

// TestDrainDisconnectAfterLargePublish: a 3.1.1 device is halfway through a
// large PUBLISH when its connection is chosen; the broker gets the rest of
// that PUBLISH, then E0 00, then FIN, and nothing of the packet after it;
// the device just sees the close.
func TestDrainDisconnectAfterLargePublish(t *testing.T) {
	fa, fb := fakeBroker(t), fakeBroker(t)
	p := startProxy(t, proxySetup{shards: 1, instances: drainPair(fa.addr(), fb.addr()), config: fastDrain})
	dev, bk := rawDevice(t, p, fa, mqttwire.Level311, "big")
	pub := publish("t/big", 200<<10)
	half := len(pub) / 2
	dev.Write(pub[:half])
	got := readFull(t, bk, half)

	failA(p)
	// Chosen within a pacer interval, but the packet is not complete: the
	// broker sees nothing more and stays connected.
	eventually(t, "chosen", func() bool { return testutil.ToFloat64(p.metrics.Drained.WithLabelValues("A")) == 1 })
	bk.SetReadDeadline(time.Now().Add(300 * time.Millisecond))
	var one [1]byte
	if n, err := bk.Read(one[:]); n != 0 || err == nil {
		t.Fatalf("broker got %x (err %v) before the PUBLISH was complete", one[:n], err)
	}
	// The rest of the PUBLISH and, in the same write, the next packet.
	dev.Write(append(append([]byte(nil), pub[half:]...), publish("t/next", 10)...))
	rest := readUntilClosed(t, bk, 5*time.Second)
	got = append(got, rest...)
	want := append(append([]byte(nil), pub...), 0xE0, 0x00)
	if !bytes.Equal(got, want) {
		t.Fatalf("broker got %d bytes ending %x, want the PUBLISH (%d) then E0 00", len(got), tail(got), len(pub))
	}
	if b := readUntilClosed(t, dev, 5*time.Second); len(b) != 0 {
		t.Fatalf("3.1.1 device got %x, want only the close", b)
	}
	dev.Close()
	bk.Close()
	eventually(t, "closed", func() bool { return p.active("A") == 0 })
}

func tail(b []byte) []byte { return b[max(0, len(b)-8):] }

// TestDrainMQTT5Device: an MQTT 5 device gets DISCONNECT 0x9C (use another
// server) after the broker's packet in progress; the broker gets E0 00.
func TestDrainMQTT5Device(t *testing.T) {
	fa, fb := fakeBroker(t), fakeBroker(t)
	p := startProxy(t, proxySetup{shards: 1, instances: drainPair(fa.addr(), fb.addr()), config: fastDrain})
	dev, bk := rawDevice(t, p, fa, mqttwire.Level5, "v5")
	// The broker is halfway through a PUBLISH to the device (5.0: a
	// property length 0 after the topic).
	down := []byte{0x30, 0x0b, 0x00, 0x06, 't', '/', 'd', 'o', 'w', 'n', 0x00, 'h', 'i'}
	bk.Write(down[:5])
	readFull(t, dev, 5)
	failA(p)
	eventually(t, "chosen", func() bool { return testutil.ToFloat64(p.metrics.Drained.WithLabelValues("A")) == 1 })
	time.Sleep(200 * time.Millisecond)
	bk.Write(down[5:])
	got := readUntilClosed(t, dev, 5*time.Second)
	want := append(append([]byte(nil), down[5:]...), 0xE0, 0x01, 0x9C)
	if !bytes.Equal(got, want) {
		t.Fatalf("device got %x, want the rest of the PUBLISH then E0 01 9C", got)
	}
	if b := readUntilClosed(t, bk, 5*time.Second); !bytes.Equal(b, []byte{0xE0, 0x00}) {
		t.Fatalf("broker got %x, want E0 00", b)
	}
}

// TestDrainNoBrokerDisconnect: with drain.disconnect_broker false the broker
// sees only the close (it fires the will, as for any lost device).
func TestDrainNoBrokerDisconnect(t *testing.T) {
	fa, fb := fakeBroker(t), fakeBroker(t)
	p := startProxy(t, proxySetup{shards: 1, instances: drainPair(fa.addr(), fb.addr()), config: func(c *Config) {
		fastDrain(c)
		f := false
		c.Drain.DisconnectBroker = &f
	}})
	dev, bk := rawDevice(t, p, fa, mqttwire.Level311, "nodisc")
	failA(p)
	if b := readUntilClosed(t, bk, 5*time.Second); len(b) != 0 {
		t.Fatalf("broker got %x, want only the close", b)
	}
	readUntilClosed(t, dev, 5*time.Second)
}

// TestDrainPaho5UseAnotherServer: a real MQTT 5 client through the proxy to
// Mosquitto is told 0x9C.
func TestDrainPaho5UseAnotherServer(t *testing.T) {
	a := servertest.Mosquitto(t, servertest.MosquittoOptions{}).Addr()
	b := servertest.Mosquitto(t, servertest.MosquittoOptions{}).Addr()
	p := startProxy(t, proxySetup{shards: 1, instances: drainPair(a, b), config: fastDrain})
	nc, err := net.DialTimeout("tcp", p.addr, 2*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	reason := make(chan byte, 1)
	c := paho.NewClient(paho.ClientConfig{Conn: nc, OnServerDisconnect: func(d *paho.Disconnect) { reason <- d.ReasonCode }})
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	if _, err := c.Connect(ctx, &paho.Connect{ClientID: "p5", CleanStart: true, KeepAlive: 30}); err != nil {
		t.Fatal(err)
	}
	eventually(t, "relaying", func() bool { return p.active("A") == 1 })
	failA(p)
	select {
	case r := <-reason:
		if r != byte(mqttwire.UseAnotherServer) {
			t.Fatalf("DISCONNECT reason 0x%02x, want 0x9c", r)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("no DISCONNECT from the server")
	}
}

// TestDrainStopsWhenInstanceReturns: a drain at 1/s is stopped when A is
// healthy again; the connections left stay, and shutdown during a drain
// returns.
func TestDrainStopsWhenInstanceReturns(t *testing.T) {
	fa, fb := fakeBroker(t), fakeBroker(t)
	p := startProxy(t, proxySetup{shards: 1, instances: drainPair(fa.addr(), fb.addr())})
	const n = 10
	for i := range n {
		dev := dialProxy(t, p.addr)
		dev.Write(connectPacket(mqttwire.Level311, fmt.Sprintf("r%d", i), 0))
		bk := fa.accept(t)
		go func() { // the broker side and the device close when told
			b := make([]byte, 512)
			for {
				if _, err := bk.Read(b); err != nil {
					bk.Close()
					return
				}
			}
		}()
		go func() {
			b := make([]byte, 512)
			for {
				if _, err := dev.Read(b); err != nil {
					dev.Close()
					return
				}
			}
		}()
	}
	eventually(t, "relaying", func() bool { return p.active("A") == n })
	failA(p) // max(1/s, 5% of 10) = 1/s
	time.Sleep(1500 * time.Millisecond)
	healA(p)
	time.Sleep(300 * time.Millisecond)
	left := p.active("A")
	if left == n || left < n-3 {
		t.Fatalf("%v connections left on A after 1.5 s at 1/s, want %d..%d", left, n-3, n-1)
	}
	time.Sleep(1500 * time.Millisecond)
	if got := p.active("A"); got != left {
		t.Fatalf("A went from %v to %v connections after it returned", left, got)
	}
	if got := testutil.ToFloat64(p.metrics.DrainRemaining.WithLabelValues("A")); got != 0 {
		t.Fatalf("drain_remaining{A} = %v after the drain stopped", got)
	}
	// A second drain, cut by a shutdown.
	failA(p)
	ctx, cancel := context.WithTimeout(context.Background(), 300*time.Millisecond)
	defer cancel()
	done := make(chan struct{})
	go func() { p.Shutdown(ctx); close(done) }()
	select {
	case <-done:
	case <-time.After(3 * time.Second):
		t.Fatal("Shutdown during a drain did not return")
	}
}

// TestDrainPace measures the drain of N idle devices (default 1000) on
// Mosquitto at the default pace (5% of N per second). It is a measurement:
// run it with SHARDGATE_DRAIN_N=1000 go test -run TestDrainPace -v ./proxy
func TestDrainPace(t *testing.T) {
	ns := os.Getenv("SHARDGATE_DRAIN_N")
	if ns == "" {
		t.Skip("a measurement: set SHARDGATE_DRAIN_N (e.g. 1000)")
	}
	n, err := strconv.Atoi(ns)
	if err != nil || n < 1 {
		t.Fatalf("SHARDGATE_DRAIN_N=%q", ns)
	}
	a := servertest.Mosquitto(t, servertest.MosquittoOptions{}).Addr()
	b := servertest.Mosquitto(t, servertest.MosquittoOptions{}).Addr()
	p := startProxy(t, proxySetup{shards: 1, instances: drainPair(a, b)})
	ack := len(mqttwire.AppendConnack(nil, mqttwire.Level311, false, mqttwire.Success))
	closed := make(chan time.Time, n)
	for i := range n {
		dev := dialProxy(t, p.addr)
		dev.Write(connectPacket(mqttwire.Level311, fmt.Sprintf("idle-%d", i), 0))
		readFull(t, dev, ack)
		dev.SetReadDeadline(time.Time{})
		go func() {
			var b [64]byte
			for {
				if _, err := dev.Read(b[:]); err != nil {
					dev.Close()
					closed <- time.Now()
					return
				}
			}
		}()
	}
	eventually(t, "all relaying", func() bool { return p.active("A") == float64(n) })
	start := time.Now()
	failA(p)
	var last time.Time
	marks := map[int]time.Duration{}
	for i := 1; i <= n; i++ {
		select {
		case last = <-closed:
		case <-time.After(30 * time.Second):
			t.Fatalf("%d of %d devices moved", i-1, n)
		}
		if i == n/4 || i == n/2 || i == 3*n/4 {
			marks[i] = last.Sub(start)
		}
	}
	took := last.Sub(start)
	t.Logf("drained %d idle devices in %.2f s (25%%: %.2f s, 50%%: %.2f s, 75%%: %.2f s); pace %.0f/s",
		n, took.Seconds(), marks[n/4].Seconds(), marks[n/2].Seconds(), marks[3*n/4].Seconds(), max(1, 0.05*float64(n)))
	eventually(t, "A empty", func() bool { return p.active("A") == 0 })
}

// BenchmarkDrainScan is the cost of one full pass of a loop over an fd
// table of 1M entries (RLIMIT_NOFILE 1048576) with none to move: the most
// a drain costs a loop per drain, plus one rescan per second while the
// loop still owns connections of the instance.
func BenchmarkDrainScan(b *testing.B) {
	p := &Proxy{table: make([]atomic.Pointer[conn], 1<<20)}
	l := &loop{p: p}
	other := &instLive{id: "other"}
	// Half the table holds relaying connections of another instance.
	g := &activeGauge{inst: other}
	for fd := 0; fd < len(p.table); fd += 2 {
		p.table[fd].Store(&conn{dev: int32(fd), state: stRelay, gauge: g})
	}
	target := &instLive{id: "A"}
	b.ResetTimer()
	for range b.N {
		st := &loopDrain{}
		budget := len(p.table)
		if l.nextToDrain(target, st, &budget) != nil {
			b.Fatal("found one")
		}
	}
}

// TestDrainScanInChunks: with a scan chunk far smaller than the fd table the
// loops still find every connection promptly, a chunk per turn, without
// waiting for the next token.
func TestDrainScanInChunks(t *testing.T) {
	// Restored after the proxy's shutdown (cleanups run last first).
	t.Cleanup(func(c int) func() { return func() { drainScanChunk = c } }(drainScanChunk))
	drainScanChunk = 16
	fa, fb := fakeBroker(t), fakeBroker(t)
	p := startProxy(t, proxySetup{shards: 1, instances: drainPair(fa.addr(), fb.addr()), config: fastDrain})
	const n = 5
	for i := range n {
		dev := dialProxy(t, p.addr)
		dev.Write(connectPacket(mqttwire.Level311, fmt.Sprintf("c%d", i), 0))
		fa.accept(t)
	}
	eventually(t, "relaying", func() bool { return p.active("A") == n })
	failA(p)
	counterIs(t, "drained_total{A}", p.metrics.Drained.WithLabelValues("A"), n)
}
