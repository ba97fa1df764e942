package broker

import (
	"fmt"
	"net/netip"
	"slices"
	"testing"
)

// queueWhileAway subscribes a persistent-session device on addr, takes it
// offline, publishes n QoS 1 messages to it through pubAddr, and waits
// until queued() says they are queued.
func queueWhileAway(t *testing.T, addr, pubAddr netip.AddrPort, id string, n int, routed, queued func() bool) []string {
	t.Helper()
	topic := "q/" + id
	dev, _ := connect311(t, addr, id, false, nil)
	subscribe311(t, dev, topic, 1)
	dev.Disconnect(100)
	waitUntil(t, "route to the device", routed)
	pub := client311(t, pubAddr, "pub-"+id, true, nil)
	want := make([]string, n)
	for i := range n {
		want[i] = fmt.Sprintf("m%03d", i)
		publish311(t, pub, topic, 1, false, want[i])
	}
	waitUntil(t, "messages queued", queued)
	return want
}

// Regression: a device that returns to the instance holding its session got
// its queued messages in any order within each second, because mochi's
// resend sorts by creation second with an unstable sort [MQTT-4.6.0-1].
func TestReconnectSameInstanceKeepsOrder(t *testing.T) {
	t.Run("redis", func(t *testing.T) {
		f := newRedisFleet(t)
		a, p := f.start("s0-a", 0, 2), f.start("s1", 1, 2)
		want := queueWhileAway(t, a.Addr(), p.Addr(), "d", 100,
			func() bool { return p.bus.hasRoute("s0-a", "q/d") },
			func() bool { cl, ok := a.n.srv.Clients.Get("d"); return ok && cl.State.Inflight.Len() == 100 })
		s := newSink()
		if _, present := connect311(t, a.Addr(), "d", false, s); !present {
			t.Error("session present = 0")
		}
		if got := ordered(s.exactly(t, 100)); !slices.Equal(got, want) {
			t.Errorf("delivered %v, want in order", got)
		}
	})
	t.Run("embedded", func(t *testing.T) {
		e := startFleet(t, 3)
		addrs := e.Addrs()
		want := queueWhileAway(t, addrs[2], addrs[0], "d", 100,
			func() bool { return e.bus.Routes("embedded-2") == 1 },
			func() bool { cl, ok := e.nodes[2].srv.Clients.Get("d"); return ok && cl.State.Inflight.Len() == 100 })
		s := newSink()
		client311(t, addrs[2], "d", false, s)
		if got := ordered(s.exactly(t, 100)); !slices.Equal(got, want) {
			t.Errorf("delivered %v, want in order", got)
		}
	})
}
