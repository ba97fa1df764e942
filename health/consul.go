// Package health produces backend snapshots from Consul: a blocking-query
// watcher on the broker service's health endpoint (Consul, a
// backend.Source) that fails static when Consul is unreachable, and the
// proxy's own registration (Register).
package health

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"math/rand/v2"
	"net/netip"
	"strconv"
	"sync"
	"sync/atomic"
	"time"

	consulapi "github.com/hashicorp/consul/api"

	"github.com/shardgate/shardgate/backend"
)

// Meta keys of the registration contract (DESIGN.md, "Contracts between the
// parts"): the broker announces them, the watcher routes by them.
const (
	MetaShard    = "shard"
	MetaShards   = "shards"
	MetaPriority = "priority"
)

// DefaultService is the Consul service brokers register under.
const DefaultService = "mqtt-broker"

// Defaults of ConsulConfig.
const (
	DefaultWaitTime   = 60 * time.Second
	DefaultBackoffMin = 250 * time.Millisecond
	DefaultBackoffMax = 30 * time.Second
)

// State is the watcher's view of Consul.
type State string

const (
	// StateStarting: no answer from Consul yet, no snapshot.
	StateStarting State = "starting"
	// StateOK: the last query was answered; the snapshot is Consul's.
	StateOK State = "ok"
	// StateStale: Consul is unreachable (errors, timeouts) and routing goes
	// on with the last good snapshot (fail static).
	StateStale State = "stale"
)

// States lists every State, for metrics that export each one.
var States = []State{StateStarting, StateOK, StateStale}

// Refusal reasons (label of shardgate_consul_refused_instances_total).
const (
	RefusedShardsMismatch = "shards_mismatch" // `shards` meta ≠ the proxy's shards
	RefusedBadMeta        = "bad_meta"        // `shard`/`shards`/`priority` not an integer
	RefusedNotIP          = "address_not_ip"  // no IP address (the hot path never resolves names)
)

// RefusalReasons lists every refusal reason.
var RefusalReasons = []string{RefusedShardsMismatch, RefusedBadMeta, RefusedNotIP}

// TLSConfig is the TLS to Consul's HTTPS API.
type TLSConfig struct {
	CAFile             string `yaml:"ca_file"`
	CertFile           string `yaml:"cert_file"`
	KeyFile            string `yaml:"key_file"`
	InsecureSkipVerify bool   `yaml:"insecure_skip_verify"`
}

// ConsulConfig configures the watcher. The zero value of each field is its
// default.
type ConsulConfig struct {
	// Address of the Consul HTTP API, host:port. Default "127.0.0.1:8500"
	// (or CONSUL_HTTP_ADDR).
	Address string
	// Scheme is "http" (default) or "https".
	Scheme string
	// Datacenter to query. Default: the agent's.
	Datacenter string
	// Service is the broker service name. Default "mqtt-broker".
	Service string
	// Tag, when set, keeps only instances carrying it.
	Tag string
	// Token is the ACL token. Default none (or CONSUL_HTTP_TOKEN).
	Token string
	// TLS to Consul.
	TLS TLSConfig
	// Shards is the proxy's shard count; an instance whose `shards` meta
	// differs is refused.
	Shards int
	// NoInstance is the policy for a shard with no healthy instance.
	NoInstance backend.Policy
	// PanicThreshold, in (0, 1], routes to every known instance (all taken
	// as healthy) when healthy/total falls below it, as Envoy's
	// healthy_panic_threshold. Default 0: off.
	PanicThreshold float64
	// WaitTime is the blocking query's wait. Default 60s.
	WaitTime time.Duration
	// BackoffMin and BackoffMax bound the jittered, doubling wait between
	// failed queries. Defaults 250ms and 30s.
	BackoffMin, BackoffMax time.Duration
	// Log receives state changes and refusals. Default slog.Default().
	Log *slog.Logger
}

func (c ConsulConfig) withDefaults() (ConsulConfig, error) {
	if c.Service == "" {
		c.Service = DefaultService
	}
	if c.Scheme != "" && c.Scheme != "http" && c.Scheme != "https" {
		return c, fmt.Errorf("scheme: %q is neither http nor https", c.Scheme)
	}
	if c.Shards < 0 {
		return c, fmt.Errorf("shards: %d is negative", c.Shards)
	}
	if c.PanicThreshold < 0 || c.PanicThreshold > 1 || c.PanicThreshold != c.PanicThreshold {
		return c, fmt.Errorf("panic_threshold: %v is outside 0..1", c.PanicThreshold)
	}
	if c.WaitTime < 0 || c.BackoffMin < 0 || c.BackoffMax < 0 {
		return c, errors.New("wait_time: negative duration")
	}
	if c.WaitTime == 0 {
		c.WaitTime = DefaultWaitTime
	}
	if c.BackoffMin == 0 {
		c.BackoffMin = DefaultBackoffMin
	}
	if c.BackoffMax == 0 {
		c.BackoffMax = DefaultBackoffMax
	}
	c.BackoffMax = max(c.BackoffMax, c.BackoffMin)
	if c.Log == nil {
		c.Log = slog.Default()
	}
	return c, nil
}

// Validate checks the configuration.
func (c ConsulConfig) Validate() error {
	_, err := c.withDefaults()
	return err
}

// APIConfig is the consul/api client configuration of Address, Scheme,
// Datacenter, Token and TLS (the environment's CONSUL_HTTP_* fill what is
// unset).
func (c ConsulConfig) APIConfig() *consulapi.Config {
	ac := consulapi.DefaultConfig()
	if c.Address != "" {
		ac.Address = c.Address
	}
	if c.Scheme != "" {
		ac.Scheme = c.Scheme
	}
	if c.Datacenter != "" {
		ac.Datacenter = c.Datacenter
	}
	if c.Token != "" {
		ac.Token = c.Token
	}
	if c.TLS != (TLSConfig{}) {
		ac.TLSConfig.CAFile = c.TLS.CAFile
		ac.TLSConfig.CertFile = c.TLS.CertFile
		ac.TLSConfig.KeyFile = c.TLS.KeyFile
		ac.TLSConfig.InsecureSkipVerify = c.TLS.InsecureSkipVerify
	}
	return ac
}

// Consul watches the broker service in Consul and publishes snapshots; it
// implements backend.Source. Consul being unreachable keeps the last good
// snapshot (fail static); a reachable Consul's answer is the truth, even an
// empty one.
type Consul struct {
	cfg    ConsulConfig
	client *consulapi.Client
	log    *slog.Logger

	mu         sync.Mutex
	state      State
	staleSince time.Time
	lastErr    error
	panicking  bool

	refused   map[string]*atomic.Uint64 // by reason
	queries   atomic.Uint64
	failures  atomic.Uint64
	ignored   atomic.Uint64 // answers whose index had not moved
	resets    atomic.Uint64 // index went backwards
	publishes atomic.Uint64

	// refusedIDs are the instances refused by the last answer, so a
	// refusal is logged and counted once, not on every answer.
	refusedIDs map[string]string
}

var _ backend.Source = (*Consul)(nil)

// NewConsul builds a watcher; it does not contact Consul.
func NewConsul(cfg ConsulConfig) (*Consul, error) {
	cfg, err := cfg.withDefaults()
	if err != nil {
		return nil, fmt.Errorf("backends.consul.%w", err)
	}
	ac := cfg.APIConfig()
	// The blocking query's own wait bounds the call (context per query); no
	// client-wide timeout would fit both it and a quick call.
	client, err := consulapi.NewClient(ac)
	if err != nil {
		return nil, fmt.Errorf("backends.consul: %w", err)
	}
	c := &Consul{cfg: cfg, client: client, log: cfg.Log, state: StateStarting, refused: map[string]*atomic.Uint64{}, refusedIDs: map[string]string{}}
	for _, r := range RefusalReasons {
		c.refused[r] = new(atomic.Uint64)
	}
	return c, nil
}

// Config is the defaulted configuration.
func (c *Consul) Config() ConsulConfig { return c.cfg }

// State is the current state.
func (c *Consul) State() State {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.state
}

// Detail describes the state for /readyz: since when Consul is unreachable
// and why.
func (c *Consul) Detail() (State, time.Time, error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.state, c.staleSince, c.lastErr
}

// Refused is the number of refusals of reason so far (each instance counted
// once per time it starts being refused).
func (c *Consul) Refused(reason string) uint64 {
	if n, ok := c.refused[reason]; ok {
		return n.Load()
	}
	return 0
}

// Stats are the watcher's counters, for tests and debugging.
type Stats struct {
	Queries, Failures, Ignored, Resets, Publishes uint64
}

// Stats returns the counters.
func (c *Consul) Stats() Stats {
	return Stats{c.queries.Load(), c.failures.Load(), c.ignored.Load(), c.resets.Load(), c.publishes.Load()}
}

// Run queries Consul until ctx is done (then returns nil) and calls update
// with every snapshot that routes differently from the previous one.
func (c *Consul) Run(ctx context.Context, update func(*backend.Snapshot)) error {
	var (
		index   uint64
		last    *backend.Snapshot
		backoff time.Duration
	)
	for ctx.Err() == nil {
		entries, meta, err := c.query(ctx, index)
		if ctx.Err() != nil {
			return nil
		}
		if err != nil {
			c.failures.Add(1)
			c.unreachable(err, last != nil)
			backoff = nextBackoff(backoff, c.cfg.BackoffMin, c.cfg.BackoffMax)
			if !sleep(ctx, jitter(backoff)) {
				return nil
			}
			continue
		}
		backoff = 0
		c.reachable()
		next, changed, reset := nextIndex(index, meta.LastIndex)
		if reset {
			c.resets.Add(1)
			c.log.Info("consul index went backwards: resetting the blocking query", "was", index, "now", meta.LastIndex)
		}
		index = next
		if !changed && last != nil {
			c.ignored.Add(1)
			continue
		}
		snap := c.snapshot(entries)
		if last != nil && snap.Equal(last) {
			continue
		}
		last = snap
		c.publishes.Add(1)
		update(snap)
	}
	return nil
}

// query runs one blocking query, bounded by a context a little longer than
// the wait Consul may take (it adds up to WaitTime/16 of jitter).
func (c *Consul) query(ctx context.Context, index uint64) ([]*consulapi.ServiceEntry, *consulapi.QueryMeta, error) {
	c.queries.Add(1)
	wait := c.cfg.WaitTime
	qctx, cancel := context.WithTimeout(ctx, wait+wait/8+5*time.Second)
	defer cancel()
	opts := (&consulapi.QueryOptions{
		WaitIndex:  index,
		WaitTime:   wait,
		Datacenter: c.cfg.Datacenter,
		Token:      c.cfg.Token,
	}).WithContext(qctx)
	// passingOnly=false: Consul's ?passing drops warning instances too, and
	// a broker reports a Redis fault as warning while it keeps its devices.
	// Health is decided per entry below.
	entries, meta, err := c.client.Health().Service(c.cfg.Service, c.cfg.Tag, false, opts)
	if err != nil {
		return nil, nil, fmt.Errorf("consul health query for %q: %w", c.cfg.Service, err)
	}
	return entries, meta, nil
}

// nextIndex applies Consul's blocking-query rules to an answer's index: an
// index that went backwards (a restarted or different server) resets the
// watch to 0, which returns at once; an unchanged index means nothing
// changed (the wait timed out); an index of 0 is never waited on (it would
// hot-loop), 1 is used instead.
func nextIndex(prev, got uint64) (next uint64, changed, reset bool) {
	switch {
	case got < prev:
		return 0, true, true
	case got == prev:
		return max(prev, 1), false, false
	}
	return got, true, false
}

// unreachable records a failed query: the first one after an answer (with a
// snapshot to keep) makes the state stale, logged once.
func (c *Consul) unreachable(err error, haveSnapshot bool) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.lastErr = err
	if c.state == StateStale || !haveSnapshot {
		if c.state == StateStarting && c.failures.Load() == 1 {
			c.log.Error("consul unreachable: no backend snapshot yet", "err", err)
		} else {
			c.log.Debug("consul still unreachable", "err", err)
		}
		return
	}
	c.state, c.staleSince = StateStale, time.Now()
	c.log.Error("consul unreachable: routing on the last snapshot (fail static)", "err", err)
}

func (c *Consul) reachable() {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.state == StateOK {
		return
	}
	if c.state == StateStale {
		c.log.Warn("consul reachable again: routing on its answers", "unreachable_for", time.Since(c.staleSince).Round(time.Millisecond).String())
	} else {
		c.log.Info("consul reachable", "address", c.cfg.Address, "service", c.cfg.Service)
	}
	c.state, c.staleSince, c.lastErr = StateOK, time.Time{}, nil
}

// snapshot turns Consul's answer into a snapshot, refusing entries that
// break the registration contract and applying the panic threshold.
func (c *Consul) snapshot(entries []*consulapi.ServiceEntry) *backend.Snapshot {
	ins := make([]backend.Instance, 0, len(entries))
	refused := map[string]string{}
	for _, e := range entries {
		in, reason, detail := c.instance(e)
		if reason != "" {
			refused[in.ID] = reason
			if c.refusedIDs[in.ID] != reason {
				c.refused[reason].Add(1)
				c.log.Error("consul instance refused", "instance", in.ID, "reason", reason, "detail", detail)
			}
			continue
		}
		ins = append(ins, in)
	}
	for id := range c.refusedIDs {
		if _, still := refused[id]; !still {
			c.log.Info("consul instance no longer refused", "instance", id)
		}
	}
	c.refusedIDs = refused

	healthy := 0
	for _, in := range ins {
		if in.Healthy {
			healthy++
		}
	}
	panicking := c.cfg.PanicThreshold > 0 && len(ins) > 0 && float64(healthy)/float64(len(ins)) < c.cfg.PanicThreshold
	c.mu.Lock()
	was := c.panicking
	c.panicking = panicking
	c.mu.Unlock()
	if panicking != was {
		if panicking {
			c.log.Error("healthy fraction below the panic threshold: routing to every known instance", "healthy", healthy, "total", len(ins), "threshold", c.cfg.PanicThreshold)
		} else {
			c.log.Warn("healthy fraction back above the panic threshold: routing to healthy instances only", "healthy", healthy, "total", len(ins), "threshold", c.cfg.PanicThreshold)
		}
	}
	if panicking {
		for i := range ins {
			ins[i].Healthy = true
		}
	}
	return backend.NewSnapshot(c.cfg.Shards, ins, backend.SnapshotOptions{NoInstance: c.cfg.NoInstance})
}

// Panicking reports whether the panic threshold is in effect.
func (c *Consul) Panicking() bool {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.panicking
}

// instance converts one entry; a non-empty reason refuses it.
func (c *Consul) instance(e *consulapi.ServiceEntry) (in backend.Instance, reason, detail string) {
	node, svc := "", e.Service
	addr := ""
	if e.Node != nil {
		node, addr = e.Node.Node, e.Node.Address
	}
	in.ID = node + "/" + svc.ID
	if svc.Address != "" {
		addr = svc.Address
	}
	ip, err := netip.ParseAddr(addr)
	if err != nil || svc.Port <= 0 || svc.Port > 65535 {
		return in, RefusedNotIP, fmt.Sprintf("address %q port %d: the proxy dials by IP only", addr, svc.Port)
	}
	in.Addr = netip.AddrPortFrom(ip.Unmap(), uint16(svc.Port))
	in.Shard = -1
	if v, ok := svc.Meta[MetaShards]; ok {
		n, err := strconv.Atoi(v)
		if err != nil {
			return in, RefusedBadMeta, fmt.Sprintf("meta shards=%q is not an integer", v)
		}
		if n != c.cfg.Shards {
			return in, RefusedShardsMismatch, fmt.Sprintf("meta shards=%d, the proxy has shards=%d", n, c.cfg.Shards)
		}
	}
	if v, ok := svc.Meta[MetaShard]; ok {
		n, err := strconv.Atoi(v)
		if err != nil {
			return in, RefusedBadMeta, fmt.Sprintf("meta shard=%q is not an integer", v)
		}
		in.Shard = n
	}
	if v, ok := svc.Meta[MetaPriority]; ok {
		n, err := strconv.Atoi(v)
		if err != nil {
			return in, RefusedBadMeta, fmt.Sprintf("meta priority=%q is not an integer", v)
		}
		in.Priority = n
	}
	// Warning keeps the instance (a broker's Redis fault); critical,
	// including maintenance (a critical check of its own), removes it.
	switch e.Checks.AggregatedStatus() {
	case consulapi.HealthPassing, consulapi.HealthWarning:
		in.Healthy = true
	}
	return in, "", ""
}

// nextBackoff doubles prev within [lo, hi].
func nextBackoff(prev, lo, hi time.Duration) time.Duration {
	if prev < lo {
		return lo
	}
	return min(prev*2, hi)
}

// jitter returns a duration in [d/2, d), so proxies that lost Consul
// together do not return together.
func jitter(d time.Duration) time.Duration {
	if d <= 1 {
		return d
	}
	return d/2 + rand.N(d/2)
}

func sleep(ctx context.Context, d time.Duration) bool {
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-ctx.Done():
		return false
	case <-t.C:
		return true
	}
}
