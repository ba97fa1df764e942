package proxy

import (
	"context"
	"strconv"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	mqtt "github.com/eclipse/paho.mqtt.golang"

	"github.com/shardgate/shardgate/backend"
	"github.com/shardgate/shardgate/internal/servertest"
)

// TestHandOffMovesEveryDeviceAtPace: the old generation (p1) stopped
// accepting and relays 20 paho devices of Mosquitto; the next one (p2)
// serves the same broker. HandOff (upgrade.handoff_delay) moves all 20 at
// the drain pace, 0.25 × 20 = 5 per second: each reconnects and lands on
// p2 (p1's listeners are closed; the devices list both proxies, as a
// reconnect to one address lands on the next generation), no will fires,
// and p1's Shutdown returns once the last one left, before its grace.
func TestHandOffMovesEveryDeviceAtPace(t *testing.T) {
	m := servertest.Mosquitto(t, servertest.MosquittoOptions{}).Addr()
	setup := proxySetup{shards: 1, instances: []backend.Instance{inst("A", m, 0)}, config: func(c *Config) {
		c.Drain.Rate = 0.25
	}}
	p1, p2 := startProxy(t, setup), startProxy(t, setup)

	var wills atomic.Int64
	watcher, _ := paho3(t, m.String(), 4, "will-watcher", true)
	t.Cleanup(func() { watcher.Disconnect(0) })
	if tok := watcher.Subscribe("will/#", 1, func(mqtt.Client, mqtt.Message) { wills.Add(1) }); !tok.WaitTimeout(5*time.Second) || tok.Error() != nil {
		t.Fatalf("subscribe: %v", tok.Error())
	}

	const n = 20
	var mu sync.Mutex
	var lost []time.Time
	clients := make([]mqtt.Client, n)
	for i := range n {
		id := "handoff-" + strconv.Itoa(i)
		o := mqtt.NewClientOptions().AddBroker("tcp://"+p1.addr).AddBroker("tcp://"+p2.addr).
			SetClientID(id).SetProtocolVersion(4).SetCleanSession(true).SetKeepAlive(30*time.Second).
			SetWill("will/"+id, "gone", 1, false).
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
	eventually(t, "20 devices on the old generation", func() bool { return p1.active("A") == n })

	// The handover: p1 stops accepting and keeps its devices.
	down := make(chan error, 1)
	go func() {
		ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		defer cancel()
		down <- p1.Shutdown(ctx)
	}()
	time.Sleep(500 * time.Millisecond)
	if got := p1.active("A"); got != n {
		t.Fatalf("before the handoff the old generation relays %v devices, want %d", got, n)
	}

	start := time.Now()
	if got := p1.HandOff(); got != n {
		t.Errorf("HandOff set out to move %d connections, want %d", got, n)
	}
	time.Sleep(time.Second)
	mu.Lock()
	early := len(lost)
	mu.Unlock()
	if early == 0 || early > 8 {
		t.Errorf("after 1 s of a 5/s handoff %d devices were moved, want 1..8", early)
	}
	select {
	case err := <-down:
		if err != nil {
			t.Fatalf("old generation's Shutdown: %v, want nil (every device moved)", err)
		}
	case <-time.After(15 * time.Second):
		t.Fatalf("the old generation still relays %v devices 16 s into a 4 s handoff", p1.active("A"))
	}
	took := time.Since(start)
	eventually(t, "20 devices on the new generation", func() bool { return p2.active("A") == n })
	mu.Lock()
	defer mu.Unlock()
	t.Logf("handoff of %d devices: old generation exited after %v (first moved after %v)", n, took, lost[0].Sub(start))
	if len(lost) != n {
		t.Errorf("%d devices lost their connection, want %d", len(lost), n)
	}
	// 20 at 5/s: the last token is handed out at 4 s.
	if last := lost[len(lost)-1].Sub(start); last < 3*time.Second || last > 6*time.Second {
		t.Errorf("handoff took %v, want ~4 s", last)
	}
	counterIs(t, "drained_total{A}", p1.metrics.Drained.WithLabelValues("A"), n)
	for i, c := range clients {
		if !c.IsConnectionOpen() {
			t.Errorf("device %d did not reconnect", i)
		}
	}
	time.Sleep(300 * time.Millisecond) // a will would be published at once
	if w := wills.Load(); w != 0 {
		t.Errorf("%d wills fired for devices that only moved", w)
	}
}

// After the proxy stopped, a late HandOff (the delay's timer firing as the
// last device left) starts nothing.
func TestHandOffAfterShutdownDoesNothing(t *testing.T) {
	fb := fakeBroker(t)
	p := startProxy(t, proxySetup{shards: 1, instances: []backend.Instance{inst("A", fb.addr(), 0)}})
	if err := p.Shutdown(context.Background()); err != nil {
		t.Fatal(err)
	}
	if got := p.HandOff(); got != 0 {
		t.Errorf("HandOff after Shutdown = %d, want 0", got)
	}
	if l := p.drainList(); len(l) != 0 {
		t.Errorf("%d drains running after Shutdown", len(l))
	}
}

func TestUpgradeHandoffDelayConfig(t *testing.T) {
	const base = "backends:\n  static:\n    - {id: a, address: \"127.0.0.1:1883\"}\n"
	for _, tc := range []struct {
		name, yaml string
		want       time.Duration
		bad        bool
	}{
		{"default keeps devices", "", 0, false},
		{"below the grace", "upgrade: {handoff_delay: 10s}\nshutdown: {grace: 1m}\n", 10 * time.Second, false},
		{"not below the grace", "upgrade: {handoff_delay: 30s}\n", 0, true},
		{"negative", "upgrade: {handoff_delay: -1s}\n", 0, true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			c, err := ParseConfig([]byte(base + tc.yaml))
			if tc.bad {
				if err == nil {
					t.Fatal("accepted")
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			if got := c.Upgrade.HandoffDelay.D(); got != tc.want {
				t.Errorf("handoff_delay = %v, want %v", got, tc.want)
			}
		})
	}
}
