package broker

import (
	"bytes"
	"errors"
	"sync/atomic"
	"time"

	mqtt "github.com/mochi-mqtt/server/v2"
	"github.com/mochi-mqtt/server/v2/packets"
)

// persistHook writes the state of this instance's persistent sessions to
// RedisSessions and loads a session on demand when its device connects
// here and the session is not in memory (it was held by another instance,
// or by this one before a restart). mochi's Stored* loaders run once, at
// Serve, and would load every session of the fleet into every instance;
// they are not used.
//
// Writes happen in the hook calls, before mochi acknowledges to the device
// (a SUBACK is written after OnSubscribed), and only for the connection
// that holds the session here (a connection taken over, or a copy ended by
// another instance's claim, writes nothing), and Redis refuses them once
// another instance has claimed the session.
type persistHook struct {
	mqtt.HookBase
	n  *node
	st *RedisSessions
}

var _ mqtt.Hook = (*persistHook)(nil)

// ID implements mqtt.Hook.
func (h *persistHook) ID() string { return "shardgate-persist" }

// Provides implements mqtt.Hook.
func (h *persistHook) Provides(b byte) bool {
	return bytes.IndexByte([]byte{
		mqtt.OnSessionEstablish,
		mqtt.OnSessionEstablished,
		mqtt.OnPacketEncode,
		mqtt.OnPacketRead,
		mqtt.OnSubscribed,
		mqtt.OnUnsubscribed,
		mqtt.OnQosPublish,
		mqtt.OnQosComplete,
		mqtt.OnQosDropped,
		mqtt.OnDisconnect,
		mqtt.OnClientExpired,
	}, b) >= 0
}

// persistent reports whether cl's session outlives its connection: MQTT 5
// Session Expiry Interval > 0 [MQTT-3.1.2-23], 3.1.1 CleanSession = 0
// [MQTT-3.1.2-4].
func persistent(cl *mqtt.Client) bool {
	if cl.Properties.ProtocolVersion == 5 {
		return cl.Properties.Props.SessionExpiryInterval > 0
	}
	return !cl.Properties.Clean
}

// sessionExpiry returns cl's Session Expiry Interval as the engine applies
// it (mochi gives 3.1.1 persistent sessions its maximum).
func (h *persistHook) sessionExpiry(cl *mqtt.Client) uint32 {
	maxExpiry := h.n.srv.Options.Capabilities.MaximumSessionExpiryInterval
	if cl.Properties.ProtocolVersion == 5 && cl.Properties.Props.SessionExpiryIntervalFlag {
		return min(cl.Properties.Props.SessionExpiryInterval, maxExpiry)
	}
	return maxExpiry
}

// tracked reports whether cl's session state is written: a device whose
// session outlives the connection and that holds the session here.
func (h *persistHook) tracked(cl *mqtt.Client) bool {
	return !cl.Net.Inline && persistent(cl) && h.n.holds(cl)
}

// failed counts and logs a failed write; a fenced one is expected (the
// session has moved) and only logged at debug level.
func (h *persistHook) failed(what string, cl *mqtt.Client, err error) {
	if errors.Is(err, errFenced) {
		h.n.log.Debug(what+": session has moved", "client", cl.ID)
		return
	}
	h.n.sessErrs.Add(1)
	h.n.log.Warn(what, "client", cl.ID, "error", err)
}

// OnSessionEstablish runs after sessionHook's claim and before mochi looks
// for a session in memory and sends the CONNACK.
//
//   - Clean start [MQTT-3.1.2-4]: the stored session is discarded.
//   - A copy of the session in memory here (the device reconnects to the
//     instance that held it): mochi takes it over; Redis has the same
//     state and only learns that the session is connected again.
//   - Otherwise the stored session is loaded: its granted subscriptions
//     enter the engine's topic index (and the bus's routes), its queued and
//     in-flight messages the client's in-flight table, keeping their packet
//     ids (a PUBREL stays a PUBREL: no QoS 2 message is delivered twice
//     [MQTT-4.3.3-10]). The CONNACK then says session present
//     [MQTT-3.2.2-3] (OnPacketEncode) and the messages are sent again in
//     their order [MQTT-4.6.0-1] (OnSessionEstablished).
func (h *persistHook) OnSessionEstablish(cl *mqtt.Client, pk packets.Packet) {
	if cl.Net.Inline || !h.n.holds(cl) {
		return
	}
	_, inMemory := h.n.srv.Clients.Get(cl.ID)
	o := openOptions{
		Clean:      pk.Connect.Clean,
		Persistent: persistent(cl),
		Expiry:     h.sessionExpiry(cl),
		Load:       !inMemory && !pk.Connect.Clean,
	}
	ctx, cancel := callCtx(h.st.timeout)
	defer cancel()
	stored, err := h.st.open(ctx, h.n.instance, cl.ID, o)
	if err != nil {
		// Serve the device with a new session rather than refuse it.
		h.failed("load session", cl, err)
		return
	}
	if !stored.Present {
		return
	}
	if !o.Load {
		// mochi takes the copy in memory over: order its resend by the
		// queue order stored here (see orderInflight).
		if old, ok := h.n.srv.Clients.Get(cl.ID); ok && old != cl {
			orderInflight(old, stored.Order)
		}
		return
	}
	h.restore(cl, stored)
}

// restore puts a stored session into the engine for cl, before the CONNACK.
func (h *persistHook) restore(cl *mqtt.Client, stored *storedSession) {
	srv := h.n.srv
	for _, sub := range stored.Subs {
		if srv.Topics.Subscribe(cl.ID, sub) { // [MQTT-3.8.4-3]
			atomic.AddInt64(&srv.Info.Subscriptions, 1)
		}
		cl.State.Subscriptions.Add(sub.Filter, sub)
		h.n.addRoute(sub.Filter, cl.ID)
	}
	ids := make([]uint16, 0, len(stored.Messages))
	for _, pk := range stored.Messages {
		if cl.State.Inflight.Set(pk) {
			atomic.AddInt64(&srv.Info.Inflight, 1)
		}
		ids = append(ids, pk.PacketID)
	}
	h.n.sessMu.Lock()
	h.n.restored[cl] = ids
	h.n.sessMu.Unlock()
	h.n.sessionsLoaded.Add(1)
	h.n.log.Debug("session loaded from Redis", "client", cl.ID,
		"subscriptions", len(stored.Subs), "messages", len(stored.Messages))
}

// OnPacketEncode sets Session Present on the CONNACK of a client whose
// session was loaded from Redis: mochi only knows about sessions it found
// in memory.
func (h *persistHook) OnPacketEncode(cl *mqtt.Client, pk packets.Packet) packets.Packet {
	if pk.FixedHeader.Type != packets.Connack || pk.ReasonCode >= packets.ErrUnspecifiedError.Code {
		return pk
	}
	h.n.sessMu.Lock()
	_, ok := h.n.restored[cl]
	h.n.sessMu.Unlock()
	if ok {
		pk.SessionPresent = true // [MQTT-3.2.2-3]
	}
	return pk
}

// OnSessionEstablished runs after the CONNACK: the loaded session's
// PUBLISH and PUBREL packets are sent again in the order they were queued
// [MQTT-4.6.0-1] (mochi's own resend orders by the second they were
// created, not within one). A PUBREC is not: the device, as sender, sends
// its PUBLISH or PUBREL again [MQTT-4.4.0-1].
func (h *persistHook) OnSessionEstablished(cl *mqtt.Client, _ packets.Packet) {
	h.n.sessMu.Lock()
	ids, ok := h.n.restored[cl]
	delete(h.n.restored, cl)
	h.n.sessMu.Unlock()
	if !ok || !h.n.holds(cl) {
		return
	}
	for _, id := range ids {
		pk, ok := cl.State.Inflight.Get(id)
		if !ok {
			continue
		}
		switch pk.FixedHeader.Type {
		case packets.Publish:
			pk.FixedHeader.Dup = true // [MQTT-3.3.1-1]
		case packets.Pubrel:
		default:
			continue
		}
		if err := cl.WritePacket(pk); err != nil {
			h.n.log.Debug("resend stored message", "client", cl.ID, "error", err)
			return
		}
	}
}

// OnPacketRead records that the device has received a QoS 2 message: its
// PUBREC turns the stored PUBLISH into a PUBREL [MQTT-4.3.3-5], which is
// what a standby must send again, never the PUBLISH. (mochi makes the same
// change in memory without a hook.)
func (h *persistHook) OnPacketRead(cl *mqtt.Client, pk packets.Packet) (packets.Packet, error) {
	if pk.FixedHeader.Type != packets.Pubrec || pk.ReasonCode >= packets.ErrUnspecifiedError.Code || !h.tracked(cl) {
		return pk, nil
	}
	if sent, ok := cl.State.Inflight.Get(pk.PacketID); !ok || sent.FixedHeader.Type != packets.Publish {
		return pk, nil
	}
	rel := packets.Packet{
		FixedHeader: packets.FixedHeader{Type: packets.Pubrel, Qos: 1},
		PacketID:    pk.PacketID,
		Created:     time.Now().Unix(),
	}
	ctx, cancel := callCtx(h.st.timeout)
	defer cancel()
	if err := h.st.saveMessage(ctx, h.n.instance, cl.ID, rel); err != nil {
		h.failed("save PUBREL state", cl, err)
	}
	return pk, nil
}

// OnSubscribed stores the granted subscriptions, before the SUBACK. A
// refused filter (reason code 0x80 or above, MQTT 5.0 §3.9.3; 0x80 in
// 3.1.1) is never stored: a standby that loads the session must not grant
// what this instance refused.
func (h *persistHook) OnSubscribed(cl *mqtt.Client, pk packets.Packet, reasonCodes []byte) {
	if !h.tracked(cl) {
		return
	}
	var granted []packets.Subscription
	for i, sub := range pk.Filters {
		if i < len(reasonCodes) && reasonCodes[i] < packets.ErrUnspecifiedError.Code {
			granted = append(granted, sub)
		}
	}
	if len(granted) == 0 {
		return
	}
	ctx, cancel := callCtx(h.st.timeout)
	defer cancel()
	if err := h.st.saveSubs(ctx, h.n.instance, cl.ID, granted); err != nil {
		h.failed("save subscriptions", cl, err)
	}
}

// OnUnsubscribed removes subscriptions [MQTT-3.10.4-2].
func (h *persistHook) OnUnsubscribed(cl *mqtt.Client, pk packets.Packet) {
	if !h.tracked(cl) || len(pk.Filters) == 0 {
		return
	}
	filters := make([]string, len(pk.Filters))
	for i, sub := range pk.Filters {
		filters[i] = sub.Filter
	}
	ctx, cancel := callCtx(h.st.timeout)
	defer cancel()
	if err := h.st.dropSubs(ctx, h.n.instance, cl.ID, filters); err != nil {
		h.failed("drop subscriptions", cl, err)
	}
}

// OnQosPublish stores a QoS 1/2 message the engine has put in the client's
// in-flight table: sent to a connected device, or queued for a
// disconnected one [MQTT-3.1.2-5]; and the PUBREC of a QoS 2 message the
// device sent, so a standby still knows the packet id is in use. The
// PUBACK of a device's QoS 1 message lives for microseconds and is not
// stored.
func (h *persistHook) OnQosPublish(cl *mqtt.Client, pk packets.Packet, _ int64, _ int) {
	switch pk.FixedHeader.Type {
	case packets.Publish, packets.Pubrec, packets.Pubrel:
	default:
		return
	}
	if !h.tracked(cl) {
		return
	}
	ctx, cancel := callCtx(h.st.timeout)
	defer cancel()
	if err := h.st.saveMessage(ctx, h.n.instance, cl.ID, pk); err != nil {
		h.failed("save message", cl, err)
	}
}

// OnQosComplete removes a message whose QoS flow has ended: the device's
// PUBACK or PUBCOMP for a message it received, its PUBREL for one it sent.
// mochi also reports the engine's own PUBACK to a device's QoS 1 message
// (built by the server, so it has a creation time; a decoded packet has
// none), which was never stored: skipping it saves a Redis call per QoS 1
// message a device publishes.
func (h *persistHook) OnQosComplete(cl *mqtt.Client, pk packets.Packet) {
	if pk.FixedHeader.Type == packets.Puback && pk.Created != 0 {
		return
	}
	h.drop(cl, pk.PacketID)
}

// OnQosDropped removes a message the engine has given up (expired, refused
// by the device, or the session ended).
func (h *persistHook) OnQosDropped(cl *mqtt.Client, pk packets.Packet) {
	h.drop(cl, pk.PacketID)
}

func (h *persistHook) drop(cl *mqtt.Client, id uint16) {
	if !h.tracked(cl) {
		return
	}
	ctx, cancel := callCtx(h.st.timeout)
	defer cancel()
	if err := h.st.dropMessage(ctx, h.n.instance, cl.ID, id); err != nil {
		h.failed("drop message", cl, err)
	}
}

// OnDisconnect records when a persistent session lost its connection, so
// that it expires on time on whichever instance loads it, and its keys
// expire in Redis with it. (A session that ends with its connection is
// deleted by sessionHook's Release.)
func (h *persistHook) OnDisconnect(cl *mqtt.Client, _ error, expire bool) {
	h.forgetRestored(cl)
	if expire || cl.IsTakenOver() || !h.tracked(cl) {
		return
	}
	at := time.Now()
	if stop := cl.StopTime(); stop > 0 {
		at = time.Unix(stop, 0)
	}
	ctx, cancel := callCtx(h.st.timeout)
	defer cancel()
	if err := h.st.disconnected(ctx, h.n.instance, cl.ID, at, h.sessionExpiry(cl)); err != nil {
		h.failed("record disconnect", cl, err)
	}
}

// OnClientExpired forgets a client whose CONNACK was never sent.
func (h *persistHook) OnClientExpired(cl *mqtt.Client) { h.forgetRestored(cl) }

func (h *persistHook) forgetRestored(cl *mqtt.Client) {
	h.n.sessMu.Lock()
	delete(h.n.restored, cl)
	h.n.sessMu.Unlock()
}
