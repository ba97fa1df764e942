package broker

import (
	"cmp"
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/netip"
	"slices"
	"strconv"
	"sync"
	"sync/atomic"
	"time"

	mqtt "github.com/mochi-mqtt/server/v2"
	"github.com/mochi-mqtt/server/v2/packets"
	"github.com/redis/go-redis/v9"
)

// DefaultListen is the MQTT listen address of a broker instance.
const DefaultListen = ":1883"

// Config configures one broker instance of a networked fleet (`shardgate
// broker`): one shard's MQTT server, with its sessions, retained messages
// and cross-shard routes in Redis. A shard may have several instances (an
// active one and its standby); the proxy decides which one devices reach.
type Config struct {
	// InstanceID names the instance fleet-wide (the Consul node name and
	// service ID, say). It must be unique and stable across restarts: an
	// instance that starts clears the routes its previous life left in
	// Redis. Required; no control characters.
	InstanceID string
	// Shard is the shard the instance serves, 0-based. Default 0.
	Shard int
	// Shards is the fleet's shard count. Default 1. Shard must be below it.
	Shards int
	// Listen is the MQTT listen address. Default ":1883"; port 0 picks a
	// free port (Instance.Addr reports it). Ignored when Listener is set.
	Listen string
	// Listener, if set, is served instead of binding Listen (a listener
	// wrapped for the PROXY protocol, say). Close closes it.
	Listener net.Listener
	// Redis is the fleet's Redis (a *redis.Client, or a
	// *redis.ClusterClient in production). Required. The caller owns it
	// and closes it after Close.
	Redis redis.UniversalClient
	// RedisKeyPrefix starts every Redis key and channel of the fleet.
	// Default "sg".
	RedisKeyPrefix string
	// RedisTimeout bounds every Redis call. Default 1 s.
	RedisTimeout time.Duration
	// Heartbeat is how often the instance renews its liveness in Redis
	// and checks the fleet's route table; an instance silent for 3
	// heartbeats is dead and its routes are removed. Default 2 s.
	Heartbeat time.Duration
	// Auth authenticates clients (OnConnectAuthenticate) and checks topic
	// ACLs (OnACLCheck). Default: allow every client and topic.
	Auth mqtt.Hook
	// Hooks are further mochi hooks, added after the broker's own.
	Hooks []mqtt.Hook
	// Log receives the instance's logs. Default: discard.
	Log *slog.Logger
}

func (c Config) withDefaults() (Config, error) {
	if err := validInstanceID(c.InstanceID); err != nil {
		return c, fmt.Errorf("broker: Config.InstanceID: %w", err)
	}
	if c.Shards == 0 {
		c.Shards = 1
	}
	if c.Shards < 0 {
		return c, fmt.Errorf("broker: Config.Shards: %d is negative", c.Shards)
	}
	if c.Shard < 0 || c.Shard >= c.Shards {
		return c, fmt.Errorf("broker: Config.Shard: %d is not in [0, %d)", c.Shard, c.Shards)
	}
	if c.Listen == "" {
		c.Listen = DefaultListen
	}
	if c.Redis == nil {
		return c, errors.New("broker: Config.Redis: required")
	}
	if c.Log == nil {
		c.Log = slog.New(slog.DiscardHandler)
	}
	return c, nil
}

// Instance is a running broker instance.
type Instance struct {
	n        *node
	addr     netip.AddrPort
	bus      *RedisBus
	sessions *RedisSessions
	rdb      redis.UniversalClient
	ln       net.Listener
	stats    *redisStats
	timeout  time.Duration
	beat     time.Duration

	redisErr  atomic.Pointer[redisFault] // nil while Redis answers
	stopWatch chan struct{}
	watchDone chan struct{}

	closeOnce sync.Once
	closeErr  error
}

// Start binds the listener, joins the fleet in Redis (clearing routes a
// previous life of the instance left), loads the fleet's retained messages
// and starts serving. ctx bounds the start only; Close stops the instance.
// On error nothing is left running.
func Start(ctx context.Context, cfg Config) (*Instance, error) {
	cfg, err := cfg.withDefaults()
	if err != nil {
		return nil, err
	}
	log := cfg.Log.With("shard", cfg.Shard, "instance", cfg.InstanceID)
	opts := RedisOptions{
		KeyPrefix: cfg.RedisKeyPrefix,
		Timeout:   cfg.RedisTimeout,
		Heartbeat: cfg.Heartbeat,
		Log:       log,
	}
	inst := &Instance{
		bus:       NewRedisBus(cfg.Redis, opts),
		sessions:  NewRedisSessions(cfg.Redis, opts),
		rdb:       cfg.Redis,
		stats:     newRedisStats(),
		stopWatch: make(chan struct{}),
		watchDone: make(chan struct{}),
	}
	inst.timeout, inst.beat = inst.sessions.timeout, opts.withDefaults().Heartbeat
	// Every call of this instance's Redis client is timed and its errors
	// counted (shardgate_broker_redis_*). The hook outlives Close when the
	// caller keeps the client; it then only counts.
	cfg.Redis.AddHook(inst.stats)
	metrics := &metricsHook{}
	inst.stats.qos = metrics
	cfg.Hooks = append([]mqtt.Hook{metrics}, cfg.Hooks...)

	pctx, cancel := context.WithTimeout(ctx, inst.sessions.timeout)
	err = cfg.Redis.Ping(pctx).Err()
	cancel()
	if err != nil {
		return nil, fmt.Errorf("broker: instance %s: redis: %w", cfg.InstanceID, err)
	}

	ln := cfg.Listener
	if ln == nil {
		var lc net.ListenConfig
		// Go makes listeners MPTCP by default; the broker's peer is the
		// proxy, over plain TCP (DESIGN.md, known pitfalls).
		lc.SetMultipathTCP(false)
		if ln, err = lc.Listen(ctx, "tcp", cfg.Listen); err != nil {
			return nil, fmt.Errorf("broker: instance %s: listen on %s: %w", cfg.InstanceID, cfg.Listen, err)
		}
	}
	ap, err := netip.ParseAddrPort(ln.Addr().String())
	if err != nil {
		_ = ln.Close()
		return nil, fmt.Errorf("broker: instance %s: listen address %s: %w", cfg.InstanceID, ln.Addr(), err)
	}
	inst.addr, inst.ln = ap, ln

	n, err := newNode(nodeConfig{
		Shard:    cfg.Shard,
		Instance: cfg.InstanceID,
		Bus:      inst.bus,
		Sessions: inst.sessions,
		State:    inst.sessions,
		Listener: ln,
		Auth:     cfg.Auth,
		Hooks:    cfg.Hooks,
		Log:      log,
	})
	if err != nil {
		_ = ln.Close()
		return nil, err
	}
	if err := ctx.Err(); err != nil {
		_ = ln.Close()
		return nil, fmt.Errorf("broker: start instance %s: %w", cfg.InstanceID, err)
	}
	if err := n.start(); err != nil {
		_ = ln.Close()
		return nil, fmt.Errorf("broker: instance %s: %w", cfg.InstanceID, err)
	}
	inst.n = n
	go inst.watchRedis(log)
	log.Info("broker instance listening", "address", ap.String())
	return inst, nil
}

// Addr returns the MQTT listen address.
func (i *Instance) Addr() netip.AddrPort { return i.addr }

// InstanceID returns the instance's id.
func (i *Instance) InstanceID() string { return i.n.instance }

// Shard returns the shard the instance serves.
func (i *Instance) Shard() int { return i.n.shard }

// Forwarded returns how many messages the bus has delivered into this
// instance from other instances (once per message, however many local
// subscribers match). An instance with no matching subscriber gets none;
// retained messages stored without a delivery are not counted.
func (i *Instance) Forwarded() uint64 { return i.n.received.Load() }

// Close leaves the fleet (routes withdrawn, so other instances stop sending
// here), then stops the server: every client is disconnected (MQTT 5:
// DISCONNECT 0x8B, server shutting down) and their goroutines waited for.
// Persistent sessions stay in Redis for whichever instance their devices
// reach next. Close is idempotent; it does not close Config.Redis.
func (i *Instance) Close() error {
	i.closeOnce.Do(func() {
		close(i.stopWatch)
		<-i.watchDone
		// The stats hook stays on a client the caller keeps: it must not
		// go on refusing calls once no watch can clear it.
		i.stats.down.Store(false)
		i.n.leave()
		i.closeErr = i.n.close()
	})
	return i.closeErr
}

// StopAccepting closes the MQTT listener: no new connection is accepted,
// the connected devices stay served. Close finishes the shutdown.
func (i *Instance) StopAccepting() { _ = i.ln.Close() }

// ClientsConnected returns how many devices are connected.
func (i *Instance) ClientsConnected() int {
	return int(atomic.LoadInt64(&i.n.srv.Info.ClientsConnected))
}

// redisFault is a Redis failure seen by the instance's watch.
type redisFault struct {
	err   error
	since time.Time
}

// RedisError reports whether Redis is failing, as the instance's watch
// last saw it (a PING every heartbeat, bounded by the Redis timeout): nil
// while Redis answers. While it fails the instance goes on serving its
// connected devices and delivering locally; what needs Redis (cross-shard
// routing, session writes, taking a session over) fails, each call within
// the Redis timeout, and is counted in shardgate_broker_redis_errors_total.
func (i *Instance) RedisError() error {
	f := i.redisErr.Load()
	if f == nil {
		return nil
	}
	return fmt.Errorf("redis failing since %s: %w", f.since.UTC().Format(time.RFC3339), f.err)
}

// watchRedis pings Redis every heartbeat and keeps RedisError current.
// When Redis answers again after a failure, the instance's routes are
// announced afresh (a Redis restarted empty, or route changes that failed
// meanwhile), so cross-shard routing to it resumes by itself; the bus's
// own subscriptions reconnect on their own and reload the route table.
// Sessions are written afresh on their next change.
func (i *Instance) watchRedis(log *slog.Logger) {
	defer close(i.watchDone)
	t := time.NewTicker(i.beat)
	defer t.Stop()
	for {
		select {
		case <-i.stopWatch:
			return
		case <-t.C:
		}
		ctx, cancel := callCtx(i.timeout)
		err := i.rdb.Ping(withProbe(ctx)).Err()
		cancel()
		prev := i.redisErr.Load()
		switch {
		case err != nil && prev == nil:
			i.redisErr.Store(&redisFault{err: err, since: time.Now()})
			i.stats.down.Store(true)
			log.Error("redis failing: serving connected devices locally; cross-shard routing and session writes fail until it returns", "error", err)
		case err != nil:
			i.redisErr.Store(&redisFault{err: err, since: prev.since})
		case prev != nil:
			i.stats.down.Store(false)
			if err := i.reannounce(); err != nil {
				log.Warn("redis answers again, but announcing routes failed; retrying", "error", err)
				continue
			}
			i.redisErr.Store(nil)
			rewritten, err := i.resyncSessions()
			if err != nil {
				log.Warn("redis answers again; rewriting lost sessions failed (they are written afresh on their next change)", "error", err)
			}
			log.Info("redis answers again: routes announced afresh", "down_for", time.Since(prev.since).Round(time.Millisecond).String(), "sessions_rewritten", rewritten)
		}
	}
}

// reannounce rewrites the instance's routes and liveness in Redis.
func (i *Instance) reannounce() error {
	i.bus.mu.Lock()
	m, ok := i.bus.members[i.n.instance]
	w := i.bus.watcher
	i.bus.mu.Unlock()
	if !ok {
		return nil
	}
	if err := i.bus.announce(m); err != nil {
		return err
	}
	if w != nil {
		w.refreshNow()
	}
	return nil
}

// Shutdown ends the instance's service to its remaining devices, then
// closes it: MQTT 5 clients get DISCONNECT 0x8B (server shutting down),
// 3.1.1 clients are closed (3.1.1 defines no DISCONNECT from the server).
// No will is published: the device is being moved, it has not gone away;
// it reconnects to another instance of its shard, where its session waits.
func (i *Instance) Shutdown() error {
	i.StopAccepting()
	for _, cl := range i.n.srv.Clients.GetAll() {
		if cl.Net.Inline {
			continue
		}
		atomic.StoreUint32(&cl.Properties.Will.Flag, 0)
		if cl.Properties.ProtocolVersion < 5 && !cl.Closed() {
			cl.Stop(packets.ErrServerShuttingDown)
		}
	}
	return i.Close()
}

// resyncSessions writes afresh, after a Redis outage, the state of the
// persistent sessions this instance holds: the writes made meanwhile
// failed, and a Redis restarted empty has lost them all (every write of
// such a session would then be refused as fenced, its generation gone,
// and a standby would find nothing to take over). A session that another
// instance has claimed meanwhile is left alone.
func (i *Instance) resyncSessions() (int, error) {
	n, st := i.n, i.sessions
	var errs []error
	rewritten := 0
	for _, cl := range n.srv.Clients.GetAll() {
		if cl.Net.Inline || !persistent(cl) || !n.holds(cl) {
			continue
		}
		// No generation: the device connected during the outage and its
		// claim failed; it is claimed now.
		gen, claimed := st.generation(n.instance, cl.ID)
		ctx, cancel := callCtx(i.timeout)
		err := i.resyncSession(ctx, cl, gen, claimed)
		cancel()
		switch {
		case errors.Is(err, errSessionMoved):
		case err != nil:
			errs = append(errs, err)
		default:
			rewritten++
		}
	}
	return rewritten, errors.Join(errs...)
}

var errSessionMoved = errors.New("session claimed by another instance")

func (i *Instance) resyncSession(ctx context.Context, cl *mqtt.Client, gen int64, claimed bool) error {
	n, st := i.n, i.sessions
	keys := st.keys.clientKeys(cl.ID)
	vals, err := i.rdb.HMGet(ctx, keys[0], "owner", "gen").Result()
	if err != nil {
		return fmt.Errorf("check session %q: %w", cl.ID, err)
	}
	owner, _ := vals[0].(string)
	stored, _ := vals[1].(string)
	switch {
	case vals[0] == nil || !claimed:
		// Lost (Redis restarted empty), or never claimed (the device
		// connected during the outage): claim it.
		if _, err := st.Claim(ctx, cl.ID, n.instance); err != nil {
			return err
		}
	case owner == n.instance && stored == strconv.FormatInt(gen, 10):
		// Still ours, but writes failed while Redis was unreachable:
		// replace its state with the engine's.
		if err := i.rdb.Del(ctx, keys[1:]...).Err(); err != nil {
			return fmt.Errorf("rewrite session %q: %w", cl.ID, err)
		}
	default:
		return errSessionMoved
	}
	expiry := n.srv.Options.Capabilities.MaximumSessionExpiryInterval
	if cl.Properties.ProtocolVersion == 5 && cl.Properties.Props.SessionExpiryIntervalFlag {
		expiry = min(cl.Properties.Props.SessionExpiryInterval, expiry)
	}
	if _, err := st.open(ctx, n.instance, cl.ID, openOptions{Persistent: true, Expiry: expiry}); err != nil {
		return fmt.Errorf("rewrite session %q: %w", cl.ID, err)
	}
	subs := cl.State.Subscriptions.GetAll()
	if len(subs) > 0 {
		all := make([]packets.Subscription, 0, len(subs))
		for _, sub := range subs {
			all = append(all, sub)
		}
		if err := st.saveSubs(ctx, n.instance, cl.ID, all); err != nil {
			return fmt.Errorf("rewrite session %q: %w", cl.ID, err)
		}
	}
	// Oldest first, the order a standby must resend them in: creation
	// time (seconds), then packet id, which the engine hands out in order.
	msgs := cl.State.Inflight.GetAll(false)
	slices.SortStableFunc(msgs, func(a, b packets.Packet) int {
		return cmp.Or(cmp.Compare(a.Created, b.Created), cmp.Compare(a.PacketID, b.PacketID))
	})
	for _, pk := range msgs {
		if err := st.saveMessage(ctx, n.instance, cl.ID, pk); err != nil {
			return fmt.Errorf("rewrite session %q: %w", cl.ID, err)
		}
	}
	if cl.Closed() {
		at := time.Now()
		if stop := cl.StopTime(); stop > 0 {
			at = time.Unix(stop, 0)
		}
		if err := st.disconnected(ctx, n.instance, cl.ID, at, expiry); err != nil {
			return fmt.Errorf("rewrite session %q: %w", cl.ID, err)
		}
	}
	return nil
}
