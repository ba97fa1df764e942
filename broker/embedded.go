package broker

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/netip"
	"strconv"
	"sync"
)

// DefaultShards is the shard count of an embedded fleet when neither Shards
// nor Addrs says otherwise.
const DefaultShards = 3

// EmbeddedConfig configures an embedded fleet: several broker shards in one
// process joined by an in-process bus, no Redis, no Consul (`shardgate
// demo`).
type EmbeddedConfig struct {
	// Shards is the number of shards, one MQTT server each. Default: the
	// number of Addrs, or DefaultShards (3) when Addrs is empty too.
	Shards int
	// Addrs is the listen address of each shard, index = shard. Port 0
	// picks a free port; Embedded.Addrs reports the real one. Default:
	// "127.0.0.1:0" for every shard. When set, it must have one entry per
	// shard.
	Addrs []string
	// Log receives the fleet's logs; each shard's records carry a "shard"
	// attribute. Default: discard.
	Log *slog.Logger
}

func (c EmbeddedConfig) withDefaults() (EmbeddedConfig, error) {
	if c.Shards < 0 {
		return c, fmt.Errorf("broker: EmbeddedConfig.Shards: %d is negative", c.Shards)
	}
	if c.Shards == 0 {
		c.Shards = len(c.Addrs)
		if c.Shards == 0 {
			c.Shards = DefaultShards
		}
	}
	switch {
	case len(c.Addrs) == 0:
		c.Addrs = make([]string, c.Shards)
		for i := range c.Addrs {
			c.Addrs[i] = "127.0.0.1:0"
		}
	case len(c.Addrs) != c.Shards:
		return c, fmt.Errorf("broker: EmbeddedConfig.Addrs: %d addresses for %d shards", len(c.Addrs), c.Shards)
	}
	if c.Log == nil {
		c.Log = slog.New(slog.DiscardHandler)
	}
	return c, nil
}

// Embedded is a running embedded fleet. To devices it behaves as one broker
// reachable at any shard's address: a publish on one shard reaches the
// matching subscribers on every shard, retained messages are stored on every
// shard, and a shared subscription delivers each message to one member
// fleet-wide. A client id has one session fleet-wide: connecting to a
// second shard closes the first connection (DISCONNECT 0x8E) and ends the
// session there. The session's state lives on the shard a device connects
// to, which is where the proxy's routing contract always sends it; a device
// that reaches another shard directly starts a new session there.
type Embedded struct {
	nodes    []*node
	addrs    []netip.AddrPort
	bus      *LocalBus
	sessions *MemorySessions
	log      *slog.Logger

	closeOnce sync.Once
	closeErr  error
}

// StartEmbedded binds every shard's address and starts serving. ctx bounds
// the start only; Close stops the fleet. On error nothing is left running.
func StartEmbedded(ctx context.Context, cfg EmbeddedConfig) (*Embedded, error) {
	cfg, err := cfg.withDefaults()
	if err != nil {
		return nil, err
	}
	e := &Embedded{bus: NewLocalBus(), sessions: NewMemorySessions(), log: cfg.Log}

	var lc net.ListenConfig
	// Go makes listeners MPTCP by default; the fleet's peer is the proxy,
	// over plain TCP (DESIGN.md, known pitfalls).
	lc.SetMultipathTCP(false)
	for i, addr := range cfg.Addrs {
		if err := ctx.Err(); err != nil {
			e.abort()
			return nil, fmt.Errorf("broker: start shard %d: %w", i, err)
		}
		ln, err := lc.Listen(ctx, "tcp", addr)
		if err != nil {
			e.abort()
			return nil, fmt.Errorf("broker: shard %d: listen on %s: %w", i, addr, err)
		}
		ap, err := netip.ParseAddrPort(ln.Addr().String())
		if err != nil {
			_ = ln.Close()
			e.abort()
			return nil, fmt.Errorf("broker: shard %d: listen address %s: %w", i, ln.Addr(), err)
		}
		n, err := newNode(nodeConfig{
			Shard:    i,
			Instance: "embedded-" + strconv.Itoa(i),
			Bus:      e.bus,
			Sessions: e.sessions,
			Listener: ln,
			Log:      cfg.Log.With("shard", i),
		})
		if err != nil {
			_ = ln.Close()
			e.abort()
			return nil, err
		}
		if err := n.start(); err != nil {
			_ = ln.Close()
			e.abort()
			return nil, err
		}
		e.nodes = append(e.nodes, n)
		e.addrs = append(e.addrs, ap)
		n.log.Info("broker shard listening", "address", ap.String())
	}
	return e, nil
}

// abort closes the shards started so far.
func (e *Embedded) abort() { _ = e.Close() }

// Addrs returns the listen address of each shard, index = shard.
func (e *Embedded) Addrs() []netip.AddrPort {
	return append([]netip.AddrPort(nil), e.addrs...)
}

// Shards returns the number of shards.
func (e *Embedded) Shards() int { return len(e.nodes) }

// Forwarded returns how many messages the bus has delivered into shard
// from other shards (a shard is counted once per message, however many of
// its subscribers match). A shard with no matching subscriber gets none,
// except retained messages, which are stored without a delivery and counted
// by the shardgate_broker_bus_retained_total metric instead.
func (e *Embedded) Forwarded(shard int) uint64 {
	if shard < 0 || shard >= len(e.nodes) {
		return 0
	}
	return e.nodes[shard].received.Load()
}

// Close stops every shard: first it detaches them from the bus (so wills
// fired by the shutdown stay on their shard), then each server disconnects
// its clients (MQTT 5: DISCONNECT 0x8B, server shutting down) and waits for
// their goroutines. Close is idempotent.
func (e *Embedded) Close() error {
	e.closeOnce.Do(func() {
		for _, n := range e.nodes {
			n.leave()
		}
		var errs []error
		for _, n := range e.nodes {
			if err := n.close(); err != nil {
				errs = append(errs, fmt.Errorf("close shard %d: %w", n.shard, err))
			}
		}
		e.closeErr = errors.Join(errs...)
	})
	return e.closeErr
}
