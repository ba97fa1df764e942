package broker

import (
	"errors"
	"fmt"
	"log/slog"
	"maps"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	mqtt "github.com/mochi-mqtt/server/v2"
	"github.com/mochi-mqtt/server/v2/packets"
	"github.com/redis/go-redis/v9"
	"github.com/vmihailenco/msgpack/v5"
)

// RedisBus is the Bus of a networked fleet: broker instances in separate
// processes that share a Redis.
//
// Routes. Each instance keeps its route set in Redis (the filters it has
// local subscribers for) with a version, changed by one script that also
// announces the change on the fleet's route channel. Every RedisBus holds
// the whole fleet's route table in memory, fed by those announcements; an
// announcement whose version does not follow the last one seen (a lost
// message, a reconnect) makes it reload that instance's set, and each
// heartbeat it compares every instance's version with Redis. An instance is
// alive while its liveness key, renewed every heartbeat, has not expired; a
// dead instance's routes are dropped and removed from Redis, and an instance
// that starts clears whatever routes its previous life left behind.
//
// Messages. A publish is planned on the in-memory table: each instance with
// a matching route (+, #, $share and $-topic rules) gets one envelope on its
// own channel, each shared subscription group goes to one instance that
// holds members; no route, no traffic. One Redis PUBLISH per receiving
// instance, pipelined, in the publisher's order. A retained message is
// stored once, in the fleet's retained hash, and every instance stores it in
// its engine (those that get no delivery get a retain-only envelope); an
// instance loads the hash when it joins.
//
// Delivery is at most once between instances: Redis pub/sub does not keep
// messages for a subscriber that is disconnected. What a device must not
// lose is kept by its session (RedisSessions) once the message has reached
// the instance that holds it.
type RedisBus struct {
	rdb       redis.UniversalClient
	keys      keyspace
	timeout   time.Duration
	heartbeat time.Duration
	log       *slog.Logger

	mu      sync.Mutex // serialises Join and Leave
	members map[string]*busMember
	watcher *routeWatcher // running while at least one member has joined

	// The fleet's route table; written only by the route watcher (and by
	// Join before the watcher starts).
	routeMu sync.Mutex
	known   map[string]*knownInstance // alive instances and their routes
	routes  *mqtt.TopicsIndex         // filter → instances
	alive   atomic.Pointer[map[string]struct{}]

	errs atomic.Uint64 // failed bus operations
}

var _ Bus = (*RedisBus)(nil)

// knownInstance is one instance in the in-memory route table.
type knownInstance struct {
	version int64
	filters map[string]struct{}
}

// busMember is an instance of this process that has joined the bus.
type busMember struct {
	id string
	r  Receiver
	ps *redis.PubSub

	mu    sync.Mutex          // serialises route changes
	owned map[string]struct{} // its routes, to announce again if Redis lost them

	received atomic.Uint64 // envelopes received on its channel
	stop     chan struct{}
	done     sync.WaitGroup
}

// NewRedisBus returns a bus on rdb. The caller owns rdb and closes it after
// every instance has left the bus.
func NewRedisBus(rdb redis.UniversalClient, opts RedisOptions) *RedisBus {
	opts = opts.withDefaults()
	b := &RedisBus{
		rdb:       rdb,
		keys:      keyspace{opts.KeyPrefix},
		timeout:   opts.Timeout,
		heartbeat: opts.Heartbeat,
		log:       opts.Log,
		members:   make(map[string]*busMember),
		known:     make(map[string]*knownInstance),
		routes:    mqtt.NewTopicsIndex(),
	}
	b.alive.Store(&map[string]struct{}{})
	return b
}

// ttl is how long an instance stays alive without a heartbeat.
func (b *RedisBus) ttl() time.Duration { return 3 * b.heartbeat }

// Route events on the route channel, one line each: op, instance, version,
// then the filter (which may hold anything, newlines included).
const (
	routeAdd    = "a"
	routeRemove = "d"
	routeReset  = "r" // the instance's set was replaced: reload it
	routeLeave  = "l" // the instance left: drop it
)

// resetScript replaces an instance's route set with ARGV[4...], bumps its
// version, renews its liveness key and announces the reset. KEYS: alive,
// routes, rv. ARGV: ttl in ms, instance, route channel, filters.
var resetScript = redis.NewScript(`
redis.call('DEL', KEYS[2])
for i = 4, #ARGV, 500 do
  redis.call('SADD', KEYS[2], unpack(ARGV, i, math.min(i + 499, #ARGV)))
end
local v = redis.call('INCR', KEYS[3])
redis.call('SET', KEYS[1], '1', 'PX', ARGV[1])
redis.call('PUBLISH', ARGV[3], 'r\n' .. ARGV[2] .. '\n' .. v .. '\n')
return v
`)

// routeScript adds (ARGV[1] = "a") or removes ("d") a route and, if that
// changed the set, bumps the version and announces the change. KEYS:
// routes, rv. ARGV: op, instance, filter, route channel.
var routeScript = redis.NewScript(`
local n
if ARGV[1] == 'a' then n = redis.call('SADD', KEYS[1], ARGV[3]) else n = redis.call('SREM', KEYS[1], ARGV[3]) end
if n == 1 then
  local v = redis.call('INCR', KEYS[2])
  redis.call('PUBLISH', ARGV[4], ARGV[1] .. '\n' .. ARGV[2] .. '\n' .. v .. '\n' .. ARGV[3])
end
return n
`)

// leaveScript removes an instance's keys and announces it. KEYS: alive,
// routes, rv. ARGV: instance, route channel.
var leaveScript = redis.NewScript(`
redis.call('DEL', KEYS[1], KEYS[2], KEYS[3])
redis.call('PUBLISH', ARGV[2], 'l\n' .. ARGV[1] .. '\n0\n')
return 1
`)

// reapScript removes the route set of an instance whose liveness key has
// expired. KEYS: alive, routes, rv.
var reapScript = redis.NewScript(`
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
redis.call('DEL', KEYS[2], KEYS[3])
return 1
`)

// snapshotScript returns an instance's route version and set, read
// atomically. KEYS: rv, routes.
var snapshotScript = redis.NewScript(`
return {tonumber(redis.call('GET', KEYS[1]) or '0'), redis.call('SMEMBERS', KEYS[2])}
`)

// Join implements Bus. The instance's stale routes (from a previous life)
// are cleared, the fleet's route table and retained messages are loaded,
// and deliveries start, before Join returns.
func (b *RedisBus) Join(instance string, r Receiver) error {
	if err := validInstanceID(instance); err != nil {
		return err
	}
	b.mu.Lock()
	defer b.mu.Unlock()
	if _, ok := b.members[instance]; ok {
		return fmt.Errorf("broker: instance %q has joined the bus already", instance)
	}

	m := &busMember{id: instance, r: r, owned: make(map[string]struct{}), stop: make(chan struct{})}
	// Subscribe before announcing, so nothing routed here after the
	// announcement is missed.
	ctx, cancel := callCtx(b.timeout)
	defer cancel()
	m.ps = b.rdb.Subscribe(ctx, b.keys.busChannel(instance))
	if _, err := m.ps.Receive(ctx); err != nil {
		_ = m.ps.Close()
		return fmt.Errorf("join %q: subscribe: %w", instance, err)
	}
	if err := b.announce(m); err != nil {
		_ = m.ps.Close()
		return fmt.Errorf("join %q: %w", instance, err)
	}
	if b.watcher == nil {
		w, err := b.startWatcher()
		if err != nil {
			b.withdraw(instance)
			_ = m.ps.Close()
			return fmt.Errorf("join %q: %w", instance, err)
		}
		b.watcher = w
	} else {
		b.watcher.refreshNow()
	}
	if err := b.loadRetained(r); err != nil {
		b.log.Warn("load retained messages", "instance", instance, "error", err)
	}

	b.members[instance] = m
	m.done.Add(2)
	go b.receiveLoop(m)
	go b.heartbeatLoop(m)
	return nil
}

// announce (re)writes m's route set and liveness key, and registers it in
// the instance registry.
func (b *RedisBus) announce(m *busMember) error {
	m.mu.Lock()
	filters := slices.Collect(maps.Keys(m.owned))
	m.mu.Unlock()
	args := []any{b.ttl().Milliseconds(), m.id, b.keys.routeChannel()}
	for _, f := range filters {
		args = append(args, f)
	}
	ctx, cancel := callCtx(b.timeout)
	defer cancel()
	if err := resetScript.Run(ctx, b.rdb, b.keys.instanceKeys(m.id), args...).Err(); err != nil {
		return fmt.Errorf("announce routes: %w", err)
	}
	if err := b.rdb.SAdd(ctx, b.keys.instances(), m.id).Err(); err != nil {
		return fmt.Errorf("register instance: %w", err)
	}
	return nil
}

// Leave implements Bus.
func (b *RedisBus) Leave(instance string) error {
	b.mu.Lock()
	m, ok := b.members[instance]
	if !ok {
		b.mu.Unlock()
		return fmt.Errorf("leave %q: %w", instance, ErrUnknownInstance)
	}
	delete(b.members, instance)
	var w *routeWatcher
	if len(b.members) == 0 {
		w, b.watcher = b.watcher, nil
	}
	b.mu.Unlock()

	close(m.stop)
	_ = m.ps.Close()
	m.done.Wait()
	err := b.withdraw(instance)
	if w != nil {
		w.close()
	}
	return err
}

// withdraw removes an instance's keys from Redis and announces it.
func (b *RedisBus) withdraw(instance string) error {
	ctx, cancel := callCtx(b.timeout)
	defer cancel()
	err := leaveScript.Run(ctx, b.rdb, b.keys.instanceKeys(instance), instance, b.keys.routeChannel()).Err()
	if err == nil {
		err = b.rdb.SRem(ctx, b.keys.instances(), instance).Err()
	}
	if err != nil {
		return fmt.Errorf("leave %q: %w", instance, err)
	}
	return nil
}

// AddRoute implements Bus. The route is in Redis when AddRoute returns;
// other instances see it when the announcement reaches them (usually well
// under a millisecond later).
func (b *RedisBus) AddRoute(instance, filter string) error {
	return b.changeRoute(instance, filter, routeAdd)
}

// RemoveRoute implements Bus.
func (b *RedisBus) RemoveRoute(instance, filter string) error {
	return b.changeRoute(instance, filter, routeRemove)
}

func (b *RedisBus) changeRoute(instance, filter, op string) error {
	b.mu.Lock()
	m, ok := b.members[instance]
	b.mu.Unlock()
	if !ok {
		return fmt.Errorf("route %q for %q: %w", filter, instance, ErrUnknownInstance)
	}
	m.mu.Lock()
	defer m.mu.Unlock()
	if op == routeAdd {
		m.owned[filter] = struct{}{}
	} else {
		delete(m.owned, filter)
	}
	keys := b.keys.instanceKeys(instance)
	ctx, cancel := callCtx(b.timeout)
	defer cancel()
	if err := routeScript.Run(ctx, b.rdb, keys[1:], op, instance, filter, b.keys.routeChannel()).Err(); err != nil {
		b.errs.Add(1)
		return fmt.Errorf("route %q for %q: %w", filter, instance, err)
	}
	return nil
}

// envelope is what an instance receives on its bus channel.
type envelope struct {
	Kind    byte               `msgpack:"k"` // envDeliver or envRetain
	Plain   bool               `msgpack:"p,omitempty"`
	Groups  []string           `msgpack:"g,omitempty"`
	Message msgpack.RawMessage `msgpack:"m"`
}

const (
	envDeliver = 1
	envRetain  = 2
)

// Publish implements Bus: one pipelined round trip to Redis carries the
// retained message (if any) and an envelope for each receiving instance.
func (b *RedisBus) Publish(origin string, pk packets.Packet) error {
	alive := *b.alive.Load()
	plan := planDelivery(b.routes, origin, pk.TopicName, func(instance string) bool {
		_, ok := alive[instance]
		return ok
	})
	retain := pk.FixedHeader.Retain
	if len(plan) == 0 && !retain {
		return nil
	}

	msg, err := encodeMessage(pk)
	if err != nil {
		return fmt.Errorf("publish %q: %w", pk.TopicName, err)
	}
	ctx, cancel := callCtx(b.timeout)
	defer cancel()
	pipe := b.rdb.Pipeline()
	if retain {
		if len(pk.Payload) == 0 {
			pipe.HDel(ctx, b.keys.retained(), pk.TopicName) // [MQTT-3.3.1-6]
		} else {
			pipe.HSet(ctx, b.keys.retained(), pk.TopicName, msg)
		}
	}
	send := func(instance string, env envelope) error {
		env.Message = msg
		payload, err := msgpack.Marshal(env)
		if err != nil {
			return err
		}
		pipe.Publish(ctx, b.keys.busChannel(instance), payload)
		return nil
	}
	for instance, d := range plan {
		if err := send(instance, envelope{Kind: envDeliver, Plain: d.Plain, Groups: d.Groups}); err != nil {
			return fmt.Errorf("publish %q: %w", pk.TopicName, err)
		}
	}
	if retain {
		for instance := range alive {
			if _, ok := plan[instance]; ok || instance == origin {
				continue
			}
			if err := send(instance, envelope{Kind: envRetain}); err != nil {
				return fmt.Errorf("publish %q: %w", pk.TopicName, err)
			}
		}
	}
	if _, err := pipe.Exec(ctx); err != nil {
		b.errs.Add(1)
		return fmt.Errorf("publish %q: %w", pk.TopicName, err)
	}
	return nil
}

// receiveLoop hands what arrives on m's channel to its Receiver, in order.
func (b *RedisBus) receiveLoop(m *busMember) {
	defer m.done.Done()
	for msg := range m.ps.Channel(redis.WithChannelSize(4096)) {
		m.received.Add(1)
		var env envelope
		if err := msgpack.Unmarshal([]byte(msg.Payload), &env); err != nil {
			b.errs.Add(1)
			b.log.Warn("malformed bus envelope", "instance", m.id, "error", err)
			continue
		}
		pk, err := decodeMessage(env.Message)
		if err != nil {
			b.errs.Add(1)
			b.log.Warn("malformed bus message", "instance", m.id, "error", err)
			continue
		}
		switch env.Kind {
		case envDeliver:
			err = m.r.Deliver(Delivery{Packet: pk, Plain: env.Plain, Groups: env.Groups})
		case envRetain:
			err = m.r.Retain(pk)
		default:
			err = fmt.Errorf("unknown envelope kind %d", env.Kind)
		}
		if err != nil && !errors.Is(err, ErrClosed) {
			b.errs.Add(1)
			b.log.Warn("bus delivery", "instance", m.id, "topic", pk.TopicName, "error", err)
		}
	}
}

// heartbeatScript renews the liveness key and says whether it had expired
// (the instance's routes may have been reaped meanwhile). KEYS: alive.
// ARGV: ttl in ms.
var heartbeatScript = redis.NewScript(`
if redis.call('SET', KEYS[1], '1', 'PX', ARGV[1], 'GET') then return 1 end
return 0
`)

// heartbeatLoop renews m's liveness key; if it had expired (a long pause,
// Redis lost it), m's routes are announced again.
func (b *RedisBus) heartbeatLoop(m *busMember) {
	defer m.done.Done()
	t := time.NewTicker(b.heartbeat)
	defer t.Stop()
	for {
		select {
		case <-m.stop:
			return
		case <-t.C:
		}
		ctx, cancel := callCtx(b.timeout)
		kept, err := heartbeatScript.Run(ctx, b.rdb, b.keys.instanceKeys(m.id)[:1], b.ttl().Milliseconds()).Int()
		if err == nil {
			err = b.rdb.SAdd(ctx, b.keys.instances(), m.id).Err()
		}
		cancel()
		if err != nil {
			b.errs.Add(1)
			b.log.Warn("bus heartbeat", "instance", m.id, "error", err)
			continue
		}
		if kept == 0 {
			b.log.Warn("bus liveness key had expired; announcing routes again", "instance", m.id)
			if err := b.announce(m); err != nil {
				b.errs.Add(1)
				b.log.Warn("bus heartbeat", "instance", m.id, "error", err)
			}
		}
	}
}

// loadRetained stores the fleet's retained messages in r.
func (b *RedisBus) loadRetained(r Receiver) error {
	now := time.Now().Unix()
	var cursor uint64
	for {
		ctx, cancel := callCtx(b.timeout)
		kv, next, err := b.rdb.HScan(ctx, b.keys.retained(), cursor, "", 256).Result()
		cancel()
		if err != nil {
			return err
		}
		for i := 1; i < len(kv); i += 2 {
			pk, err := decodeMessage([]byte(kv[i]))
			if err != nil {
				b.log.Warn("skip stored retained message", "topic", kv[i-1], "error", err)
				continue
			}
			if expired(pk, now) {
				continue
			}
			pk.FixedHeader.Retain = true
			if err := r.Retain(pk); err != nil {
				return err
			}
		}
		if cursor = next; cursor == 0 {
			return nil
		}
	}
}

// routeWatcher keeps the in-memory route table current.
type routeWatcher struct {
	b       *RedisBus
	ps      *redis.PubSub
	refresh chan struct{}
	stop    chan struct{}
	done    chan struct{}
}

// startWatcher subscribes to the route channel, loads the whole table, then
// applies announcements in order: one published before the load is either
// in it or applied on top of it, and the version check makes applying it
// twice harmless.
func (b *RedisBus) startWatcher() (*routeWatcher, error) {
	ctx, cancel := callCtx(b.timeout)
	defer cancel()
	ps := b.rdb.Subscribe(ctx, b.keys.routeChannel())
	if _, err := ps.Receive(ctx); err != nil {
		_ = ps.Close()
		return nil, fmt.Errorf("subscribe to route channel: %w", err)
	}
	w := &routeWatcher{b: b, ps: ps, refresh: make(chan struct{}, 1), stop: make(chan struct{}), done: make(chan struct{})}
	ch := ps.ChannelWithSubscriptions(redis.WithChannelSize(4096))
	if err := b.refreshAll(); err != nil {
		_ = ps.Close()
		return nil, fmt.Errorf("load route table: %w", err)
	}
	go w.run(ch)
	return w, nil
}

// refreshNow asks the watcher for a full check of the route table.
func (w *routeWatcher) refreshNow() {
	select {
	case w.refresh <- struct{}{}:
	default:
	}
}

func (w *routeWatcher) close() {
	close(w.stop)
	_ = w.ps.Close()
	<-w.done
}

func (w *routeWatcher) run(ch <-chan any) {
	defer close(w.done)
	b := w.b
	t := time.NewTicker(b.heartbeat)
	defer t.Stop()
	for {
		var err error
		select {
		case <-w.stop:
			return
		case <-t.C:
			err = b.refreshAll()
		case <-w.refresh:
			err = b.refreshAll()
		case v, ok := <-ch:
			if !ok {
				return
			}
			switch v := v.(type) {
			case *redis.Subscription:
				// A reconnect: announcements may have been lost.
				if v.Kind == "subscribe" {
					err = b.refreshAll()
				}
			case *redis.Message:
				err = b.applyEvent(v.Payload)
			}
		}
		if err != nil {
			b.errs.Add(1)
			b.log.Warn("route table", "error", err)
		}
	}
}

// applyEvent applies one route announcement to the in-memory table.
func (b *RedisBus) applyEvent(payload string) error {
	parts := strings.SplitN(payload, "\n", 4)
	if len(parts) != 4 {
		return fmt.Errorf("malformed route event %q", payload)
	}
	op, instance, filter := parts[0], parts[1], parts[3]
	version, err := strconv.ParseInt(parts[2], 10, 64)
	if err != nil {
		return fmt.Errorf("malformed route event %q", payload)
	}
	switch op {
	case routeLeave:
		b.forget(instance)
		return nil
	case routeReset:
		return b.reload(instance)
	case routeAdd, routeRemove:
	default:
		return fmt.Errorf("unknown route event %q", payload)
	}

	b.routeMu.Lock()
	k := b.known[instance]
	switch {
	case k != nil && version <= k.version:
		// Already in the table (loaded after it was announced).
	case k != nil && version == k.version+1:
		k.version = version
		if op == routeAdd {
			k.filters[filter] = struct{}{}
			b.routes.Subscribe(instance, packets.Subscription{Filter: filter})
		} else {
			delete(k.filters, filter)
			b.routes.Unsubscribe(filter, instance)
		}
	default:
		// A gap (lost announcements) or a new instance.
		b.routeMu.Unlock()
		return b.reload(instance)
	}
	b.routeMu.Unlock()
	return nil
}

// reload replaces one instance's routes with what Redis holds.
func (b *RedisBus) reload(instance string) error {
	keys := b.keys.instanceKeys(instance)
	ctx, cancel := callCtx(b.timeout)
	defer cancel()
	res, err := snapshotScript.Run(ctx, b.rdb, []string{keys[2], keys[1]}).Slice()
	if err != nil {
		return fmt.Errorf("load routes of %q: %w", instance, err)
	}
	version, _ := res[0].(int64)
	var filters []string
	members, _ := res[1].([]any)
	for _, f := range members {
		if s, ok := f.(string); ok {
			filters = append(filters, s)
		}
	}
	b.setRoutes(instance, version, filters)
	return nil
}

// setRoutes makes filters the routes of instance: new ones first, so a
// concurrent publish never sees a route missing that is in both.
func (b *RedisBus) setRoutes(instance string, version int64, filters []string) {
	b.routeMu.Lock()
	defer b.routeMu.Unlock()
	k := b.known[instance]
	if k == nil {
		k = &knownInstance{filters: make(map[string]struct{})}
		b.known[instance] = k
	}
	next := make(map[string]struct{}, len(filters))
	for _, f := range filters {
		next[f] = struct{}{}
		if _, ok := k.filters[f]; !ok {
			b.routes.Subscribe(instance, packets.Subscription{Filter: f})
		}
	}
	for f := range k.filters {
		if _, ok := next[f]; !ok {
			b.routes.Unsubscribe(f, instance)
		}
	}
	k.filters, k.version = next, version
	b.setAliveLocked()
}

// forget drops an instance from the table.
func (b *RedisBus) forget(instance string) {
	b.routeMu.Lock()
	defer b.routeMu.Unlock()
	k, ok := b.known[instance]
	if !ok {
		return
	}
	for f := range k.filters {
		b.routes.Unsubscribe(f, instance)
	}
	delete(b.known, instance)
	b.setAliveLocked()
}

func (b *RedisBus) setAliveLocked() {
	alive := make(map[string]struct{}, len(b.known))
	for id := range b.known {
		alive[id] = struct{}{}
	}
	b.alive.Store(&alive)
}

// refreshAll compares the table with Redis: instances that are registered
// and alive are reloaded if their version differs, dead ones are dropped
// and their routes removed from Redis.
func (b *RedisBus) refreshAll() error {
	ctx, cancel := callCtx(b.timeout)
	defer cancel()
	ids, err := b.rdb.SMembers(ctx, b.keys.instances()).Result()
	if err != nil {
		return fmt.Errorf("list instances: %w", err)
	}
	pipe := b.rdb.Pipeline()
	exists := make([]*redis.IntCmd, len(ids))
	versions := make([]*redis.StringCmd, len(ids))
	for i, id := range ids {
		keys := b.keys.instanceKeys(id)
		exists[i] = pipe.Exists(ctx, keys[0])
		versions[i] = pipe.Get(ctx, keys[2])
	}
	if _, err := pipe.Exec(ctx); err != nil && !errors.Is(err, redis.Nil) {
		return fmt.Errorf("check instances: %w", err)
	}

	registered := make(map[string]struct{}, len(ids))
	var errs []error
	for i, id := range ids {
		registered[id] = struct{}{}
		if exists[i].Val() == 0 {
			b.forget(id)
			if err := b.reap(id); err != nil {
				errs = append(errs, err)
			}
			continue
		}
		v, _ := versions[i].Int64()
		b.routeMu.Lock()
		k := b.known[id]
		current := k != nil && k.version == v
		b.routeMu.Unlock()
		if !current {
			if err := b.reload(id); err != nil {
				errs = append(errs, err)
			}
		}
	}
	b.routeMu.Lock()
	var gone []string
	for id := range b.known {
		if _, ok := registered[id]; !ok {
			gone = append(gone, id)
		}
	}
	b.routeMu.Unlock()
	for _, id := range gone {
		b.forget(id)
	}
	return errors.Join(errs...)
}

// reap removes a dead instance's routes and registration. An instance that
// is in fact alive registers again at its next heartbeat.
func (b *RedisBus) reap(instance string) error {
	ctx, cancel := callCtx(b.timeout)
	defer cancel()
	n, err := reapScript.Run(ctx, b.rdb, b.keys.instanceKeys(instance)).Int()
	if err == nil && n == 1 {
		err = b.rdb.SRem(ctx, b.keys.instances(), instance).Err()
		b.log.Info("removed the routes of a dead instance", "instance", instance)
	}
	if err != nil {
		return fmt.Errorf("reap %q: %w", instance, err)
	}
	return nil
}

// hasRoute reports whether the in-memory table routes filter to instance
// (tests).
func (b *RedisBus) hasRoute(instance, filter string) bool {
	b.routeMu.Lock()
	defer b.routeMu.Unlock()
	k := b.known[instance]
	if k == nil {
		return false
	}
	_, ok := k.filters[filter]
	return ok
}

// isAlive reports whether the table counts instance as a live member
// (tests).
func (b *RedisBus) isAlive(instance string) bool {
	_, ok := (*b.alive.Load())[instance]
	return ok
}

// received returns how many envelopes instance has received on its channel.
func (b *RedisBus) received(instance string) uint64 {
	b.mu.Lock()
	defer b.mu.Unlock()
	if m, ok := b.members[instance]; ok {
		return m.received.Load()
	}
	return 0
}
