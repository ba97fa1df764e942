package broker

import (
	"errors"
	"fmt"
	"log/slog"
	"net"
	"runtime"
	"slices"
	"strconv"
	"sync"
	"sync/atomic"

	mqtt "github.com/mochi-mqtt/server/v2"
	"github.com/mochi-mqtt/server/v2/packets"
)

// ErrClosed is returned by an instance that has been closed.
var ErrClosed = errors.New("broker: instance closed")

// node is one broker instance: a mochi server serving one shard, attached to
// the fleet's Bus.
type node struct {
	shard    int
	instance string
	srv      *mqtt.Server
	ln       *listener
	bus      Bus
	log      *slog.Logger
	left     atomic.Bool // off the bus: route and forward errors are expected
	closed   atomic.Bool

	// Bridges are inline clients through which bus deliveries are injected,
	// one delivery at a time each, so that the OnSelectSubscribers hook can
	// tell from a packet's origin which delivery it belongs to (see
	// assignment). Their ids hold U+0000, which no device's client id can
	// [MQTT-1.5.4-2], so they never collide with a device.
	bridges chan *mqtt.Client
	assign  map[string]*assignment // by bridge id; the map is fixed after start

	routeMu sync.Mutex
	routes  map[string]map[string]struct{} // filter → ids of local clients subscribed to it

	sessions SessionStore
	unwatch  func()
	sessMu   sync.Mutex
	holding  map[string]*mqtt.Client   // client id → the client that claimed its session here
	restored map[*mqtt.Client][]uint16 // clients whose session was loaded from the store, until the CONNACK: packet ids to send again, in order

	received atomic.Uint64 // deliveries the bus made into this instance
	sent     atomic.Uint64 // messages this instance handed to the bus
	retained atomic.Uint64 // retained messages stored here by the bus without delivery
	busErrs  atomic.Uint64 // failed bus operations

	takenOver      atomic.Uint64 // sessions ended here because another instance claimed them
	sessErrs       atomic.Uint64 // failed session store operations
	sessionsLoaded atomic.Uint64 // sessions loaded from the store when their device connected
}

// assignment is what the bus delivery in progress through one bridge may
// reach. Only the goroutine that holds the bridge touches it.
type assignment struct {
	plain  bool
	groups []string
}

type nodeConfig struct {
	Shard    int
	Instance string
	Bus      Bus
	Sessions SessionStore
	// State stores the state of persistent sessions so that they move
	// between instances; nil keeps it in the engine only (embedded fleet).
	State    *RedisSessions
	Listener net.Listener
	// Auth authenticates clients and checks ACLs; nil allows everything.
	Auth mqtt.Hook
	// Hooks are added after the broker's own.
	Hooks []mqtt.Hook
	Log   *slog.Logger
}

// mochiOptions are the engine settings every instance uses (DESIGN.md,
// "Broker engine notes").
func mochiOptions(log *slog.Logger) *mqtt.Options {
	caps := mqtt.NewDefaultServerCapabilities()
	// 8192 queued writes per client cost 64 KiB of heap per idle device; a
	// client that falls 128 packets behind is not keeping up anyway.
	caps.MaximumClientWritesPending = 128
	// The default drops retained and queued messages after 24 h whatever
	// their own Message Expiry Interval says [MQTT-3.3.2-5]; 0 turns it off.
	// orderInflight relies on it: with it off, nothing but the resend order
	// reads an in-flight message's Created time.
	caps.MaximumMessageExpiryInterval = 0
	// Else user properties of a PUBLISH are copied onto its PUBACK, which
	// some clients reject.
	caps.Compatibilities.NoInheritedPropertiesOnAck = true
	return &mqtt.Options{
		Capabilities: caps,
		Logger:       log,
		// Server.Publish and Server.Subscribe for the embedding program.
		InlineClient: true,
		// $SYS values are recomputed with runtime.ReadMemStats (a
		// stop-the-world) every interval, on every instance.
		SysTopicResendInterval: 10,
	}
}

func newNode(cfg nodeConfig) (*node, error) {
	n := &node{
		shard:    cfg.Shard,
		instance: cfg.Instance,
		bus:      cfg.Bus,
		log:      cfg.Log,
		routes:   make(map[string]map[string]struct{}),
		sessions: cfg.Sessions,
		holding:  make(map[string]*mqtt.Client),
		restored: make(map[*mqtt.Client][]uint16),
	}
	n.srv = mqtt.New(mochiOptions(slog.New(demoteInfo{cfg.Log.Handler()}).With("engine", "mochi")))

	// Enough bridges that deliveries from every core rarely wait for one.
	nb := 4 * runtime.GOMAXPROCS(0)
	n.bridges = make(chan *mqtt.Client, nb)
	n.assign = make(map[string]*assignment, nb)
	for i := range nb {
		cl := n.srv.NewClient(nil, mqtt.LocalListener, "\x00bus/"+strconv.Itoa(i), true)
		// Forwarded packets keep their MQTT 5 properties; InjectPacket stamps
		// the client's protocol version on them.
		cl.Properties.ProtocolVersion = 5
		n.assign[cl.ID] = &assignment{}
		n.bridges <- cl
	}

	// mochi allows a connection or a topic when any hook does, so the
	// allow-all hook is only there when no Auth hook is.
	auth := cfg.Auth
	if auth == nil {
		auth = new(allowHook)
	}
	// Order matters: the session hook claims a session before the persist
	// hook loads it.
	hooks := []mqtt.Hook{auth, &busHook{n: n}, &sessionHook{n: n}}
	if cfg.State != nil {
		hooks = append(hooks, &persistHook{n: n, st: cfg.State})
	}
	hooks = append(hooks, cfg.Hooks...)
	for _, h := range hooks {
		if err := n.srv.AddHook(h, nil); err != nil {
			return nil, fmt.Errorf("shard %d: add hook %s: %w", n.shard, h.ID(), err)
		}
	}
	n.ln = newListener("shard"+strconv.Itoa(n.shard), cfg.Listener, cfg.Log)
	n.ln.srv = n.srv
	if err := n.srv.AddListener(n.ln); err != nil {
		return nil, fmt.Errorf("shard %d: add listener: %w", n.shard, err)
	}
	return n, nil
}

// start joins the bus and the session store and starts serving.
func (n *node) start() error {
	if err := n.bus.Join(n.instance, n); err != nil {
		return fmt.Errorf("shard %d: %w", n.shard, err)
	}
	n.unwatch = n.sessions.Watch(n.instance, n.sessionTaken)
	if err := n.srv.Serve(); err != nil {
		n.leave()
		return fmt.Errorf("shard %d: serve: %w", n.shard, err)
	}
	return nil
}

// leave detaches the instance from the bus and the session store: from then
// on it neither sends nor receives cross-shard traffic.
func (n *node) leave() {
	n.left.Store(true)
	if n.unwatch != nil {
		n.unwatch()
	}
	if err := n.bus.Leave(n.instance); err != nil && !errors.Is(err, ErrUnknownInstance) {
		n.log.Warn("leave bus", "error", err)
	}
}

// close stops the server: listener first, then every client (mochi sends MQTT
// 5 clients DISCONNECT 0x8B, server shutting down), and waits for their
// goroutines.
func (n *node) close() error {
	if !n.closed.CompareAndSwap(false, true) {
		return nil
	}
	err := n.srv.Close()
	n.ln.wait()
	// The bridges are not taken back from the pool: a delivery that
	// passed the closed check may still hold one, and must find the pool
	// to return it to. They own no goroutine or socket.
	return err
}

// Deliver implements Receiver: it injects the packet through a bridge, as if
// a local client had published it, so mochi applies retain, subscription
// QoS, retain-as-published, no-local, subscription identifiers, topic aliases
// and message expiry exactly as for local publishes, and MQTT 5 properties
// survive.
func (n *node) Deliver(d Delivery) error {
	if n.closed.Load() {
		return ErrClosed
	}
	pk := d.Packet
	if !d.Plain && !n.hasMembers(pk.TopicName, d.Groups) {
		// Only shared groups were asked for and their members have left
		// meanwhile: injecting would reach the plain subscribers, which
		// have the message already (this is the origin) or get it from
		// another delivery.
		return nil
	}
	pk.FixedHeader.Type = packets.Publish
	pk.PacketID = 0
	if pk.FixedHeader.Qos > 0 {
		// PUBLISH validation wants a packet id for QoS > 0
		// [MQTT-2.2.1-3]; the inline path never acknowledges it.
		pk.PacketID = 1
	}

	cl := <-n.bridges
	a := n.assign[cl.ID]
	a.plain, a.groups = d.Plain, d.Groups
	err := n.srv.InjectPacket(cl, pk)
	a.plain, a.groups = false, nil
	n.bridges <- cl

	n.received.Add(1)
	if err != nil {
		return fmt.Errorf("shard %d: inject %q: %w", n.shard, pk.TopicName, err)
	}
	return nil
}

// hasMembers reports whether this instance has a local member of one of
// groups for topic.
func (n *node) hasMembers(topic string, groups []string) bool {
	subs := n.srv.Topics.Subscribers(topic)
	for g := range subs.Shared {
		if slices.Contains(groups, g) {
			return true
		}
	}
	return false
}

// Retain implements Receiver.
func (n *node) Retain(pk packets.Packet) error {
	if n.closed.Load() {
		return ErrClosed
	}
	n.srv.Topics.RetainMessage(pk.Copy(false))
	atomic.StoreInt64(&n.srv.Info.Retained, int64(n.srv.Topics.Retained.Len()))
	n.retained.Add(1)
	return nil
}

// forward hands a message that this instance has delivered locally to the
// bus.
func (n *node) forward(pk packets.Packet) {
	out := pk // mochi decodes every packet from a fresh buffer: no copy needed
	out.PacketID = 0
	out.FixedHeader.Dup = false
	out.Properties.TopicAlias = 0 // aliases are per connection [MQTT-3.3.2-10]
	out.Properties.TopicAliasFlag = false
	out.Properties.SubscriptionIdentifier = nil // set per receiving subscription [MQTT-3.3.4-3]
	out.Connect = packets.ConnectParams{}
	out.Mods = packets.Mods{}
	n.sent.Add(1)
	if err := n.bus.Publish(n.instance, out); err != nil && !n.left.Load() {
		n.busErrs.Add(1)
		n.log.Warn("forward publish", "topic", pk.TopicName, "error", err)
	}
}

// addRoute records that client subscribes to filter; the first subscriber
// of a filter on this instance announces the route to the bus.
func (n *node) addRoute(filter, client string) {
	n.routeMu.Lock()
	defer n.routeMu.Unlock()
	set := n.routes[filter]
	if set == nil {
		set = make(map[string]struct{}, 1)
		n.routes[filter] = set
	}
	if _, ok := set[client]; ok {
		return
	}
	set[client] = struct{}{}
	if len(set) == 1 {
		if err := n.bus.AddRoute(n.instance, filter); err != nil && !n.left.Load() {
			n.busErrs.Add(1)
			n.log.Warn("add route", "filter", filter, "error", err)
		}
	}
}

// removeRoute undoes addRoute; the last subscriber gone withdraws the route.
func (n *node) removeRoute(filter, client string) {
	n.routeMu.Lock()
	defer n.routeMu.Unlock()
	set := n.routes[filter]
	if _, ok := set[client]; !ok {
		return
	}
	delete(set, client)
	if len(set) > 0 {
		return
	}
	delete(n.routes, filter)
	if err := n.bus.RemoveRoute(n.instance, filter); err != nil && !n.left.Load() {
		n.busErrs.Add(1)
		n.log.Warn("remove route", "filter", filter, "error", err)
	}
}

// routeCount returns the number of filters with local subscribers.
func (n *node) routeCount() int {
	n.routeMu.Lock()
	defer n.routeMu.Unlock()
	return len(n.routes)
}
