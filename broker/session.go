package broker

import (
	"bytes"
	"cmp"
	"context"
	"slices"
	"sync"
	"time"

	mqtt "github.com/mochi-mqtt/server/v2"
	"github.com/mochi-mqtt/server/v2/packets"
)

// SessionStore holds the fleet-wide facts about MQTT sessions. A device may
// reach any instance (directly, or after a routing change), yet the fleet
// must keep one session per client id, as one broker does: a new connection
// with a client id in use takes the session over and the old connection is
// closed [MQTT-3.1.4-3].
//
// The embedded fleet's MemorySessions records which instance holds each
// session; the session's state (subscriptions, queued messages) stays in
// that instance's engine, so a device that moves to another instance starts
// there with a new session (CONNACK session present = 0 [MQTT-3.2.2-3]) and
// resubscribes. A networked store (Redis) keeps the state too, so the
// session moves with the device.
type SessionStore interface {
	// Claim makes instance the holder of clientID's session and returns the
	// previous holder ("" when there was none, or it was instance). Before
	// Claim returns, the previous holder's taken callback has run (in
	// process) or has been notified (networked).
	Claim(ctx context.Context, clientID, instance string) (previous string, err error)
	// Release records that the session has ended on instance. It does
	// nothing if another instance holds the session by now.
	Release(ctx context.Context, clientID, instance string) error
	// Watch registers taken, called with the client id when another
	// instance claims a session that instance holds: the instance must then
	// close the client's connection and end its copy of the session. The
	// returned function cancels the registration.
	Watch(instance string, taken func(clientID string)) (cancel func())
}

// sessionTimeout bounds a store call on the connection path.
const sessionTimeout = 2 * time.Second

// MemorySessions is the in-process SessionStore of an embedded fleet.
type MemorySessions struct {
	mu      sync.Mutex
	holders map[string]string                 // client id → instance
	watches map[string]*func(clientID string) // instance → taken callback
}

var _ SessionStore = (*MemorySessions)(nil)

// NewMemorySessions returns an empty store.
func NewMemorySessions() *MemorySessions {
	return &MemorySessions{
		holders: make(map[string]string),
		watches: make(map[string]*func(string)),
	}
}

// Claim implements SessionStore. The previous holder's callback runs on the
// caller's goroutine, outside the store's lock.
func (m *MemorySessions) Claim(_ context.Context, clientID, instance string) (string, error) {
	m.mu.Lock()
	previous := m.holders[clientID]
	m.holders[clientID] = instance
	taken := m.watches[previous]
	m.mu.Unlock()
	if previous == instance {
		return "", nil
	}
	if taken != nil {
		(*taken)(clientID)
	}
	return previous, nil
}

// Release implements SessionStore.
func (m *MemorySessions) Release(_ context.Context, clientID, instance string) error {
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.holders[clientID] == instance {
		delete(m.holders, clientID)
	}
	return nil
}

// Watch implements SessionStore.
func (m *MemorySessions) Watch(instance string, taken func(string)) func() {
	f := &taken
	m.mu.Lock()
	m.watches[instance] = f
	m.mu.Unlock()
	return func() {
		m.mu.Lock()
		defer m.mu.Unlock()
		if m.watches[instance] == f {
			delete(m.watches, instance)
		}
	}
}

// Len returns the number of sessions held.
func (m *MemorySessions) Len() int {
	m.mu.Lock()
	defer m.mu.Unlock()
	return len(m.holders)
}

// sessionHook keeps the SessionStore up to date with the sessions of one
// instance and ends the local copy of a session another instance claims.
type sessionHook struct {
	mqtt.HookBase
	n *node
}

var _ mqtt.Hook = (*sessionHook)(nil)

// ID implements mqtt.Hook.
func (h *sessionHook) ID() string { return "shardgate-sessions" }

// Provides implements mqtt.Hook.
func (h *sessionHook) Provides(b byte) bool {
	return bytes.IndexByte([]byte{
		mqtt.OnSessionEstablish,
		mqtt.OnSessionEstablished,
		mqtt.OnDisconnect,
		mqtt.OnClientExpired,
	}, b) >= 0
}

// OnSessionEstablish runs before mochi looks for a local session and before
// the CONNACK: the claim ends the client's session on any other instance
// first. The client is recorded as this instance's holder before the claim,
// so that a claim by another instance racing this one finds it.
func (h *sessionHook) OnSessionEstablish(cl *mqtt.Client, pk packets.Packet) {
	n := h.n
	n.sessMu.Lock()
	n.holding[cl.ID] = cl
	n.sessMu.Unlock()

	ctx, cancel := context.WithTimeout(context.Background(), sessionTimeout)
	defer cancel()
	previous, err := n.sessions.Claim(ctx, cl.ID, n.instance)
	switch {
	case err != nil:
		// Keep serving: a device is better served with a possible
		// duplicate session than refused.
		n.sessErrs.Add(1)
		n.log.Warn("claim session", "client", cl.ID, "error", err)
	case previous != "":
		n.log.Debug("session taken over from another instance", "client", cl.ID, "from", previous)
		// Another instance has held the session since this one did: a
		// copy left here (its takeover notification not yet handled, or
		// lost) is stale and must not be inherited.
		if old, ok := n.srv.Clients.Get(cl.ID); ok && old != cl {
			n.endSession(old)
		}
	}
	// mochi takes a copy still in memory over and resends its messages; a
	// persist hook orders them again by the store's queue order.
	if old, ok := n.srv.Clients.Get(cl.ID); ok && old != cl && !pk.Connect.Clean {
		orderInflight(old, nil)
	}
}

// orderInflight makes mochi resend cl's in-flight messages in the order
// they were queued [MQTT-4.6.0-1] when another connection takes the
// session over. mochi's resend sorts them by uint16(Created), a time in
// seconds, with an unstable sort, so the messages of one second go out in
// any order. The messages are sorted by their place in order (the
// session's queue order, from the store) and then by creation time and
// packet id (allocated in increasing order), and their Created times are
// renumbered base, base+1, … with base a multiple of 65536 not after the
// oldest. Nothing else reads an in-flight message's Created while
// MaximumMessageExpiryInterval is 0 (mochiOptions), so the renumbering
// only orders the resend.
func orderInflight(cl *mqtt.Client, order []uint16) {
	msgs := cl.State.Inflight.GetAll(false)
	if len(msgs) < 2 {
		return
	}
	rank := make(map[uint16]int, len(order))
	for i, id := range order {
		rank[id] = i
	}
	oldest := msgs[0].Created
	for _, pk := range msgs {
		oldest = min(oldest, pk.Created)
	}
	slices.SortStableFunc(msgs, func(a, b packets.Packet) int {
		ra, okA := rank[a.PacketID]
		rb, okB := rank[b.PacketID]
		switch {
		case okA && okB:
			return cmp.Compare(ra, rb)
		case okA:
			return -1
		case okB:
			return 1
		}
		return cmp.Or(cmp.Compare(a.Created, b.Created), cmp.Compare(a.PacketID, b.PacketID))
	})
	base := oldest - oldest%65536
	for i, pk := range msgs {
		pk.Created = base + int64(i)
		cl.State.Inflight.Set(pk)
	}
}

// holds reports whether cl is the client that holds its session here.
func (n *node) holds(cl *mqtt.Client) bool {
	n.sessMu.Lock()
	defer n.sessMu.Unlock()
	return n.holding[cl.ID] == cl
}

// OnSessionEstablished runs after the client is registered with the engine:
// if another instance claimed the session in the meantime, its callback may
// have found nothing to close here, so the client is closed now.
func (h *sessionHook) OnSessionEstablished(cl *mqtt.Client, _ packets.Packet) {
	n := h.n
	n.sessMu.Lock()
	holding := n.holding[cl.ID] == cl
	n.sessMu.Unlock()
	if !holding {
		n.endSession(cl)
	}
}

// OnDisconnect releases a session that ends with its connection (clean
// session, or Session Expiry Interval 0 [MQTT-3.1.2-23]).
func (h *sessionHook) OnDisconnect(cl *mqtt.Client, _ error, expire bool) {
	if expire && !cl.IsTakenOver() {
		h.n.release(cl)
	}
}

// OnClientExpired releases a session whose expiry interval has passed.
func (h *sessionHook) OnClientExpired(cl *mqtt.Client) {
	h.n.release(cl)
}

// release forgets cl's session if cl is still the holder here (a connection
// that a newer one with the same client id replaced is not).
func (n *node) release(cl *mqtt.Client) {
	n.sessMu.Lock()
	holding := n.holding[cl.ID] == cl
	if holding {
		delete(n.holding, cl.ID)
	}
	n.sessMu.Unlock()
	if !holding {
		return
	}
	ctx, cancel := context.WithTimeout(context.Background(), sessionTimeout)
	defer cancel()
	if err := n.sessions.Release(ctx, cl.ID, n.instance); err != nil {
		n.sessErrs.Add(1)
		n.log.Warn("release session", "client", cl.ID, "error", err)
	}
}

// sessionTaken is the SessionStore callback: another instance has claimed
// clientID's session.
func (n *node) sessionTaken(clientID string) {
	n.sessMu.Lock()
	delete(n.holding, clientID)
	n.sessMu.Unlock()
	if cl, ok := n.srv.Clients.Get(clientID); ok && !cl.Net.Inline {
		n.endSession(cl)
	}
}

// endSession closes cl's connection with DISCONNECT 0x8E, session taken
// over [MQTT-3.1.4-3] (mochi's takeover sends the same to 3.1.1 clients),
// and discards its session here: subscriptions (and so routes) and queued
// messages.
func (n *node) endSession(cl *mqtt.Client) {
	_ = n.srv.DisconnectClient(cl, packets.ErrSessionTakenOver)
	n.srv.UnsubscribeClient(cl)
	cl.ClearInflights()
	if cur, ok := n.srv.Clients.Get(cl.ID); ok && cur == cl {
		n.srv.Clients.Delete(cl.ID)
	}
	n.takenOver.Add(1)
}
