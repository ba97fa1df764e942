package broker

import (
	"fmt"
	"sync"
	"testing"
	"time"

	paho5 "github.com/eclipse/paho.golang/paho"
	paho3 "github.com/eclipse/paho.mqtt.golang"
)

// liveClients returns the shards on which clientID has an open connection.
func liveClients(e *Embedded, clientID string) []int {
	var shards []int
	for _, n := range e.nodes {
		if cl, ok := n.srv.Clients.Get(clientID); ok && !cl.Closed() {
			shards = append(shards, n.shard)
		}
	}
	return shards
}

// A client id has one session fleet-wide: connecting to another shard
// closes the first connection with DISCONNECT 0x8E [MQTT-3.1.4-3] and ends
// the session there, routes included; the new shard starts a new session.
func TestOneSessionPerClientID(t *testing.T) {
	e := startFleet(t, 3)
	addrs := e.Addrs()

	expiry := uint32(3600)
	kicked := make(chan byte, 1)
	first, _, _ := client5(t, addrs[0], &paho5.Connect{
		ClientID: "dup", CleanStart: false, KeepAlive: 30,
		Properties: &paho5.ConnectProperties{SessionExpiryInterval: &expiry},
	}, nil, func(cfg *paho5.ClientConfig) {
		cfg.OnServerDisconnect = func(d *paho5.Disconnect) { kicked <- d.ReasonCode }
	})
	subscribe5(t, first, "d/x", 1)

	_, _, ack := client5(t, addrs[1], &paho5.Connect{
		ClientID: "dup", CleanStart: false, KeepAlive: 30,
		Properties: &paho5.ConnectProperties{SessionExpiryInterval: &expiry},
	}, nil)
	if ack.SessionPresent {
		t.Error("session present on the new shard; its state stays on the old one")
	}
	select {
	case code := <-kicked:
		if code != 0x8E {
			t.Errorf("first connection got DISCONNECT 0x%02x, want 0x8E", code)
		}
	case <-time.After(waitFor):
		t.Fatal("first connection not disconnected")
	}
	if got := liveClients(e, "dup"); len(got) != 1 || got[0] != 1 {
		t.Errorf("dup is live on shards %v, want [1]", got)
	}
	if _, ok := e.nodes[0].srv.Clients.Get("dup"); ok {
		t.Error("shard 0 kept the session")
	}
	if got := e.bus.Routes("embedded-0"); got != 0 {
		t.Errorf("shard 0 still routes %d filters", got)
	}
	if got := e.nodes[0].takenOver.Load(); got != 1 {
		t.Errorf("shard 0 sessions taken over = %d, want 1", got)
	}

	// Back to shard 0, as MQTT 3.1.1 with a clean session: shard 1's
	// connection goes, and the session ends with the connection.
	back := client311(t, addrs[0], "dup", true, nil)
	waitUntil(t, "one live connection, on shard 0", func() bool {
		got := liveClients(e, "dup")
		return len(got) == 1 && got[0] == 0
	})
	if n := e.sessions.Len(); n != 1 {
		t.Errorf("store holds %d sessions, want 1", n)
	}
	back.Disconnect(100)
	waitUntil(t, "session released", func() bool { return e.sessions.Len() == 0 })
}

// Two connections with one client id racing to two shards end with exactly
// one live connection.
func TestConcurrentConnectsKeepOneSession(t *testing.T) {
	e := startFleet(t, 3)
	addrs := e.Addrs()
	for round := range 20 {
		id := fmt.Sprintf("racer-%d", round)
		var wg sync.WaitGroup
		clients := make([]paho3.Client, 2)
		for i, shard := range []int{0, 1} {
			wg.Go(func() {
				opts := paho3.NewClientOptions().AddBroker("tcp://" + addrs[shard].String()).
					SetClientID(id).SetCleanSession(true).SetAutoReconnect(false).SetConnectTimeout(waitFor)
				c := paho3.NewClient(opts)
				c.Connect().WaitTimeout(waitFor)
				clients[i] = c
			})
		}
		wg.Wait()
		waitUntil(t, id+" live on exactly one shard", func() bool { return len(liveClients(e, id)) == 1 })
		for _, c := range clients {
			if c.IsConnectionOpen() {
				c.Disconnect(0)
			}
		}
	}
}
