package broker

import (
	"crypto/rand"
	"encoding/base32"
	"fmt"
	"strconv"

	mqtt "github.com/mochi-mqtt/server/v2"
	"github.com/mochi-mqtt/server/v2/packets"

	"github.com/shardgate/shardgate/backend"
)

// assignedIDTries bounds the search for an id of the shard. Each try hits
// the shard with probability 1/shards, so all of them miss with
// probability (1-1/shards)^(64·shards) < e⁻⁶⁴: never.
const assignedIDTries = 64

// idEncoding writes the random part of assigned ids: lower case, no
// padding, nothing that needs escaping in a topic level (ACL %c).
var idEncoding = base32.NewEncoding("abcdefghijklmnopqrstuvwxyz234567").WithPadding(base32.NoPadding)

// assignedIDHook gives clients that connect with an empty client id an id
// of the broker's own shard.
type assignedIDHook struct {
	mqtt.HookBase
	shard, shards int
	prefix        string
}

var _ mqtt.Hook = (*assignedIDHook)(nil)

// AssignedIDHook returns a hook, for Config.Hooks, that gives a client
// connecting with an empty client id [MQTT-3.1.3-6] an id that the routing
// contract maps to this broker's shard: backend.ShardOf(id, shards) ==
// shard. An MQTT 5 client learns it from the CONNACK's Assigned Client
// Identifier [MQTT-3.2.2-16]; reconnecting with it, through the proxy,
// brings the device back to this shard and its session, where mochi's own
// random id would send it to whichever shard that id hashes to. (A 3.1.1
// client never learns its id and has a clean session; the id only names
// it here.) Ids look like "sg-<shard>-<26 random base32 characters>".
//
// It panics unless 0 <= shard < shards, as Config validation does.
func AssignedIDHook(shard, shards int) mqtt.Hook {
	if shards < 1 || shard < 0 || shard >= shards {
		panic(fmt.Sprintf("broker: AssignedIDHook: shard %d is not in [0, %d)", shard, shards))
	}
	return &assignedIDHook{shard: shard, shards: shards, prefix: "sg-" + strconv.Itoa(shard) + "-"}
}

// ID implements mqtt.Hook.
func (h *assignedIDHook) ID() string { return "shardgate-assigned-id" }

// Provides implements mqtt.Hook.
func (h *assignedIDHook) Provides(b byte) bool { return b == mqtt.OnConnect }

// OnConnect implements mqtt.Hook. mochi has just given the client a random
// id (ParseConnect) and will send it in the CONNACK; OnConnect runs before
// authentication, the session's claim and the CONNACK, so everything after
// sees the id chosen here.
func (h *assignedIDHook) OnConnect(cl *mqtt.Client, pk packets.Packet) error {
	if pk.Connect.ClientIdentifier != "" || cl.Properties.Props.AssignedClientID == "" {
		return nil
	}
	id := h.newID()
	cl.ID = id
	cl.Properties.Props.AssignedClientID = id
	return nil
}

// newID returns a fresh id of the hook's shard.
func (h *assignedIDHook) newID() string {
	var id []byte
	var random [16]byte // 128 bits: ids never collide
	for range assignedIDTries * h.shards {
		_, _ = rand.Read(random[:]) // never fails (crypto/rand)
		id = idEncoding.AppendEncode(append(id[:0], h.prefix...), random[:])
		if backend.ShardOf(id, h.shards) == h.shard {
			break
		}
	}
	return string(id)
}
