package broker

import (
	"bytes"
	"slices"

	mqtt "github.com/mochi-mqtt/server/v2"
	"github.com/mochi-mqtt/server/v2/packets"
)

// busHook connects a mochi server to the Bus: it keeps the instance's route
// table from subscription events and forwards what is published locally.
type busHook struct {
	mqtt.HookBase
	n *node
}

var _ mqtt.Hook = (*busHook)(nil)

// ID implements mqtt.Hook.
func (h *busHook) ID() string { return "shardgate-bus" }

// Provides implements mqtt.Hook.
func (h *busHook) Provides(b byte) bool {
	return bytes.IndexByte([]byte{
		mqtt.OnSubscribed,
		mqtt.OnUnsubscribed,
		mqtt.OnClientExpired,
		mqtt.OnPublished,
		mqtt.OnWillSent,
		mqtt.OnSelectSubscribers,
	}, b) >= 0
}

// OnSubscribed runs before the SUBACK is written, so a route exists by the
// time the device learns that it is subscribed and publishes elsewhere.
// Refused filters (reason code 0x80 or above, MQTT 5.0 §3.9.3) make no
// route.
func (h *busHook) OnSubscribed(cl *mqtt.Client, pk packets.Packet, reasonCodes []byte) {
	for i, sub := range pk.Filters {
		if i < len(reasonCodes) && reasonCodes[i] < packets.ErrUnspecifiedError.Code {
			h.n.addRoute(sub.Filter, cl.ID)
		}
	}
}

// OnUnsubscribed covers UNSUBSCRIBE and the end of a session (mochi calls it
// from UnsubscribeClient when a clean or expired session goes, and when a
// clean start replaces a session [MQTT-3.1.2-4]). A session that is only
// disconnected keeps its subscriptions and routes, so QoS 1/2 messages queue
// for it [MQTT-3.1.2-5].
func (h *busHook) OnUnsubscribed(cl *mqtt.Client, pk packets.Packet) {
	for _, sub := range pk.Filters {
		h.n.removeRoute(sub.Filter, cl.ID)
	}
}

// OnClientExpired ends a session whose Session Expiry Interval has passed
// [MQTT-3.1.2-23]. mochi forgets the client but leaves its subscriptions in
// its topic index; unsubscribing here removes them and their routes.
func (h *busHook) OnClientExpired(cl *mqtt.Client) {
	h.n.srv.UnsubscribeClient(cl)
	cl.ClearInflights()
}

// OnPublished forwards a device's publish after local delivery. Publishes
// injected by the bus (and Server.Publish) come from inline clients and are
// never forwarded again: that is what keeps messages from looping.
func (h *busHook) OnPublished(cl *mqtt.Client, pk packets.Packet) {
	if cl.Net.Inline || pk.Ignore {
		return
	}
	h.n.forward(pk)
}

// OnWillSent forwards a will message [MQTT-3.1.2-8]: mochi publishes wills
// without passing OnPublished.
func (h *busHook) OnWillSent(cl *mqtt.Client, pk packets.Packet) {
	if cl.Net.Inline || pk.Ignore {
		return
	}
	h.n.forward(pk)
}

// OnSelectSubscribers makes shared subscriptions fleet-wide: a message goes
// to one member of a group across all instances (MQTT 5.0 §4.8.2), not one
// per instance.
//
//   - A bus delivery (origin is a bridge) reaches only the groups the bus
//     assigned to this instance, and plain subscribers only if asked.
//   - A publish by a local device or its will is forwarded by OnPublished or
//     OnWillSent right after, and the bus picks the instance for each group,
//     this one included; so no group is served here now.
//   - Anything else ($SYS, Server.Publish, a delayed will whose session has
//     ended) is not forwarded and keeps mochi's local choice.
func (h *busHook) OnSelectSubscribers(subs *mqtt.Subscribers, pk packets.Packet) *mqtt.Subscribers {
	if a, ok := h.n.assign[pk.Origin]; ok {
		for group := range subs.Shared {
			if !slices.Contains(a.groups, group) {
				delete(subs.Shared, group)
			}
		}
		if !a.plain {
			clear(subs.Subscriptions)
			clear(subs.InlineSubscriptions)
		}
		return subs
	}
	if cl, ok := h.n.srv.Clients.Get(pk.Origin); ok && !cl.Net.Inline {
		clear(subs.Shared)
	}
	return subs
}

// allowHook lets every client connect and use every topic: the embedded
// fleet serves a demo on loopback. (mochi's own auth.AllowHook does the same
// but its package pulls in a YAML library for its ledger.)
type allowHook struct{ mqtt.HookBase }

// ID implements mqtt.Hook.
func (allowHook) ID() string { return "allow-all" }

// Provides implements mqtt.Hook.
func (allowHook) Provides(b byte) bool {
	return b == mqtt.OnConnectAuthenticate || b == mqtt.OnACLCheck
}

// OnConnectAuthenticate implements mqtt.Hook.
func (allowHook) OnConnectAuthenticate(*mqtt.Client, packets.Packet) bool { return true }

// OnACLCheck implements mqtt.Hook.
func (allowHook) OnACLCheck(*mqtt.Client, string, bool) bool { return true }
