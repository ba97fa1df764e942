package broker

import (
	"fmt"
	"strings"
	"testing"

	paho5 "github.com/eclipse/paho.golang/paho"

	"github.com/shardgate/shardgate/backend"
)

func TestAssignedIDHashesToShard(t *testing.T) {
	for _, shards := range []int{1, 2, 7, 64} {
		for _, shard := range []int{0, shards / 2, shards - 1} {
			h := AssignedIDHook(shard, shards).(*assignedIDHook)
			seen := map[string]bool{}
			for range 50 {
				id := h.newID()
				if got := backend.ShardOf([]byte(id), shards); got != shard {
					t.Fatalf("id %q of shard %d/%d hashes to shard %d", id, shard, shards, got)
				}
				if want := fmt.Sprintf("sg-%d-", shard); !strings.HasPrefix(id, want) || len(id) != len(want)+26 {
					t.Fatalf("id %q: want %q and 26 characters", id, want)
				}
				if strings.ContainsAny(id, "+#/\x00") {
					t.Fatalf("id %q cannot stand for ACL %%c", id)
				}
				if seen[id] {
					t.Fatalf("id %q assigned twice", id)
				}
				seen[id] = true
			}
		}
	}
}

func TestAssignedIDHookPanicsOnBadShard(t *testing.T) {
	for _, c := range [][2]int{{0, 0}, {-1, 3}, {3, 3}} {
		func() {
			defer func() {
				if recover() == nil {
					t.Errorf("AssignedIDHook(%d, %d) did not panic", c[0], c[1])
				}
			}()
			AssignedIDHook(c[0], c[1])
		}()
	}
}

// A real MQTT 5 client that connects with an empty client id and a
// persistent session gets, in the CONNACK, an id that the routing contract
// maps back to the broker's shard; reconnecting with it finds the session
// (and the ACL's %c already saw the assigned id).
func TestAssignedClientIDOverTheWire(t *testing.T) {
	const shards = 7
	f := newRedisFleet(t)
	for _, shard := range []int{0, 3, 6} {
		auth := newTestAuth(t, nil, "allow readwrite devices/%c/#\n", true)
		inst := f.start(fmt.Sprintf("s%d", shard), shard, shards, func(c *Config) {
			c.Auth = auth
			c.Hooks = append(c.Hooks, AssignedIDHook(shard, shards))
		})
		expiry := uint32(300)
		c, conn, ca := client5(t, inst.Addr(), &paho5.Connect{KeepAlive: 30, CleanStart: false,
			Properties: &paho5.ConnectProperties{SessionExpiryInterval: &expiry}}, nil)
		if ca.Properties == nil || ca.Properties.AssignedClientID == "" {
			t.Fatalf("shard %d: CONNACK has no Assigned Client Identifier: %+v", shard, ca)
		}
		id := ca.Properties.AssignedClientID
		if got := backend.ShardOf([]byte(id), shards); got != shard {
			t.Errorf("shard %d: assigned id %q hashes to shard %d", shard, id, got)
		}
		subscribe5(t, c, "devices/"+id+"/cmd", 1)
		_ = c.Disconnect(&paho5.Disconnect{})
		_ = conn.Close()

		_, _, ca = client5(t, inst.Addr(), &paho5.Connect{ClientID: id, KeepAlive: 30, CleanStart: false,
			Properties: &paho5.ConnectProperties{SessionExpiryInterval: &expiry}}, nil)
		if !ca.SessionPresent {
			t.Errorf("shard %d: reconnecting as %q: session present = 0", shard, id)
		}
		if ca.Properties != nil && ca.Properties.AssignedClientID != "" {
			t.Errorf("shard %d: a client with an id was assigned %q", shard, ca.Properties.AssignedClientID)
		}
	}
}
