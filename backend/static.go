package backend

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net/netip"
	"strings"
	"sync"
	"time"
	"unicode/utf8"
)

// MaxShards bounds the shard count of a static configuration (each snapshot
// holds a table with one entry per shard).
const MaxShards = 1 << 16

// Health check types.
const (
	HealthTCP  = "tcp"  // connect within Timeout (the default)
	HealthMQTT = "mqtt" // MQTT 3.1.1 CONNECT, expect CONNACK accepted, DISCONNECT
	HealthNone = "none" // no checks: every instance is healthy
)

// StaticConfig is a fixed list of backends (proxy config `shards`,
// `no_instance`, `backends.static`, `health`). Errors from Validate name the
// fields by those YAML paths.
type StaticConfig struct {
	// Shards is the fleet's logical shard count. Required (≥ 1) when an
	// instance has a shard; 0 is allowed only when none has. At most
	// MaxShards.
	Shards int
	// NoInstance is the policy for a shard with no healthy instance.
	// Default Spill.
	NoInstance Policy
	// Instances are the backends; at least one.
	Instances []StaticInstance
	// Health configures the active checks.
	Health HealthConfig
	// Logger receives one line per health transition. Default
	// slog.Default().
	Logger *slog.Logger `yaml:"-"`
}

// StaticInstance is one entry of `backends.static`.
type StaticInstance struct {
	// ID is unique; valid UTF-8 without NUL (it is part of the rendezvous
	// weight).
	ID string `yaml:"id"`
	// Address is IP:port ("10.0.0.5:1883", "[2001:db8::5]:1883"): no host
	// names, so nothing resolves on the connection path.
	Address string `yaml:"address"`
	// Shard is the logical shard the instance serves, in [0, Shards). Nil
	// (omitted) or -1: no shard meta.
	Shard *int `yaml:"shard"`
	// Priority orders the instances of a shard, lower preferred. Default 0.
	Priority int `yaml:"priority"`
}

// HealthConfig configures the active health checks of static backends.
type HealthConfig struct {
	// Type is "tcp" (default), "mqtt" or "none".
	Type string `yaml:"type"`
	// Interval between two checks of one instance. Default 2s.
	Interval time.Duration `yaml:"interval"`
	// Timeout of one check (connect, and for mqtt the whole exchange).
	// Default 1s, or Interval if that is shorter; at most Interval.
	Timeout time.Duration `yaml:"timeout"`
	// Rise is the number of consecutive passing checks that make an
	// unhealthy instance healthy. Default 2.
	Rise int `yaml:"rise"`
	// Fall is the number of consecutive failing checks that make a healthy
	// instance unhealthy. Default 3.
	Fall int `yaml:"fall"`
}

// Defaults of HealthConfig.
const (
	DefaultHealthInterval = 2 * time.Second
	DefaultHealthTimeout  = time.Second
	DefaultHealthRise     = 2
	DefaultHealthFall     = 3
)

// withDefaults fills the zero fields.
func (h HealthConfig) withDefaults() HealthConfig {
	if h.Type == "" {
		h.Type = HealthTCP
	}
	if h.Interval == 0 {
		h.Interval = DefaultHealthInterval
	}
	if h.Timeout == 0 {
		h.Timeout = min(DefaultHealthTimeout, h.Interval)
	}
	if h.Rise == 0 {
		h.Rise = DefaultHealthRise
	}
	if h.Fall == 0 {
		h.Fall = DefaultHealthFall
	}
	return h
}

// FieldError is a configuration error that names its field by YAML path,
// e.g. `backends.static[2].address: "foo:1883" is not IP:port`.
type FieldError struct {
	Field string
	Msg   string
}

func (e *FieldError) Error() string { return e.Field + ": " + e.Msg }

// staticInstance is a validated StaticInstance.
type staticInstance struct {
	id       string
	addr     netip.AddrPort
	shard    int
	priority int
}

// Validate checks c and reports every problem, each as a *FieldError
// (joined with errors.Join).
func (c StaticConfig) Validate() error {
	_, err := c.parse()
	return err
}

func (c StaticConfig) parse() ([]staticInstance, error) {
	var errs []error
	fail := func(field, format string, a ...any) {
		errs = append(errs, &FieldError{Field: field, Msg: fmt.Sprintf(format, a...)})
	}
	switch {
	case c.Shards < 0:
		fail("shards", "%d is negative", c.Shards)
	case c.Shards > MaxShards:
		fail("shards", "%d is above the maximum %d", c.Shards, MaxShards)
	}
	if c.NoInstance != Spill && c.NoInstance != Reject {
		fail("no_instance", "%s is not spill or reject", c.NoInstance)
	}
	if len(c.Instances) == 0 {
		fail("backends.static", "no instances")
	}
	out := make([]staticInstance, 0, len(c.Instances))
	seen := map[string]int{}
	sharded := false
	for i, in := range c.Instances {
		field := func(name string) string { return fmt.Sprintf("backends.static[%d].%s", i, name) }
		si := staticInstance{id: in.ID, shard: -1, priority: in.Priority}
		switch {
		case in.ID == "":
			fail(field("id"), "empty")
		case !utf8.ValidString(in.ID) || strings.ContainsRune(in.ID, 0):
			fail(field("id"), "%q is not valid UTF-8 without NUL", in.ID)
		default:
			if j, dup := seen[in.ID]; dup {
				fail(field("id"), "%q duplicates backends.static[%d]", in.ID, j)
			} else {
				seen[in.ID] = i
			}
		}
		ap, err := netip.ParseAddrPort(in.Address)
		switch {
		case err != nil:
			fail(field("address"), "%q is not IP:port", in.Address)
		case ap.Port() == 0:
			fail(field("address"), "%q has port 0", in.Address)
		case ap.Addr().IsUnspecified():
			fail(field("address"), "%q is the unspecified address", in.Address)
		default:
			si.addr = ap
		}
		if in.Shard != nil && *in.Shard != -1 {
			switch sh := *in.Shard; {
			case sh < 0:
				fail(field("shard"), "%d is negative (omit it or use -1 for no shard)", sh)
			case c.Shards > 0 && sh >= c.Shards:
				fail(field("shard"), "%d is outside [0, %d)", sh, c.Shards)
			default:
				si.shard = sh
				sharded = true
			}
		}
		out = append(out, si)
	}
	if sharded && c.Shards == 0 {
		fail("shards", "must be at least 1 when backends have a shard")
	}
	h := c.Health
	switch h.Type {
	case "", HealthTCP, HealthMQTT, HealthNone:
	default:
		fail("health.type", "%q is not tcp, mqtt or none", h.Type)
	}
	for _, d := range []struct {
		name string
		v    time.Duration
	}{{"health.interval", h.Interval}, {"health.timeout", h.Timeout}} {
		if d.v < 0 {
			fail(d.name, "%s is negative", d.v)
		}
	}
	if d := h.withDefaults(); h.Timeout > 0 && d.Timeout > d.Interval {
		fail("health.timeout", "%s is longer than health.interval %s", d.Timeout, d.Interval)
	}
	if h.Rise < 0 {
		fail("health.rise", "%d is negative", h.Rise)
	}
	if h.Fall < 0 {
		fail("health.fall", "%d is negative", h.Fall)
	}
	return out, errors.Join(errs...)
}

// Static is a Source over a fixed list of backends with active health
// checks: each instance is probed on its own goroutine (TCP connect, or an
// MQTT CONNECT/CONNACK exchange) and changes state only after Rise passing
// or Fall failing checks in a row.
//
// Start-up: an instance's state is unknown until its first check, whose
// result decides at once (no Rise/Fall for the first one, as in seesaw's
// healthcheck). The first snapshot is published once every instance has its
// first result, or Timeout after the start, whichever comes first; an
// instance still unknown then counts as unhealthy. So a starting proxy
// neither refuses devices because its checks have not run yet nor sends
// them to a backend that is down. After the first check, each instance's
// checks are spread at random across the interval so they do not run in
// lockstep.
//
// Snapshots are published only when routing changes.
type Static struct {
	mu      sync.Mutex
	cfg     StaticConfig // defaults applied
	checks  map[string]*check
	order   []string // instance IDs in configuration order
	log     *slog.Logger
	running bool
	runCtx  context.Context
	wg      sync.WaitGroup
	kick    chan struct{} // state changed; capacity 1
	last    *Snapshot

	// onResult, if set, sees every check result (tests).
	onResult func(InstanceStatus)
}

var _ Source = (*Static)(nil)

// check is one instance and its health state, guarded by Static.mu except
// for the immutable id, addr and probe settings.
type check struct {
	id       string
	addr     netip.AddrPort
	shard    int
	priority int
	probe    HealthConfig // the settings its probe loop runs with
	st       checkState
	cancel   context.CancelFunc // stops the probe loop; nil when not running
	deadline time.Time          // publish without waiting for the first result after this
}

type checkState struct {
	known      bool // a first result arrived (or health checks are off)
	healthy    bool
	lastOK     bool
	lastErr    string
	lastCheck  time.Time
	lastChange time.Time
	streak     int // consecutive results equal to lastOK
	checks     uint64
}

// InstanceStatus is one static instance's configuration and check state,
// for /api/v1/backends.
type InstanceStatus struct {
	ID       string         `json:"id"`
	Address  netip.AddrPort `json:"address"`
	Shard    int            `json:"shard"`
	Priority int            `json:"priority"`
	// State is "healthy", "unhealthy" or "unknown" (no check result yet;
	// routed as unhealthy).
	State   string `json:"state"`
	Healthy bool   `json:"healthy"`
	// Check is the health check type: tcp, mqtt or none.
	Check string `json:"check"`
	// LastResult is "ok" or "fail", "" before the first check.
	LastResult string `json:"last_result,omitempty"`
	// LastError is the last failing check's error, "" after a pass.
	LastError string    `json:"last_error,omitempty"`
	LastCheck time.Time `json:"last_check,omitzero"`
	// Consecutive counts the results in a row equal to LastResult.
	Consecutive int `json:"consecutive"`
	// LastChange is when the state last changed (first result included).
	LastChange time.Time `json:"last_change,omitzero"`
	Checks     uint64    `json:"checks"`
}

// NewStatic validates cfg and returns a source that starts checking when Run
// is called.
func NewStatic(cfg StaticConfig) (*Static, error) {
	s := &Static{checks: map[string]*check{}, kick: make(chan struct{}, 1)}
	if err := s.Reconfigure(cfg); err != nil {
		return nil, err
	}
	return s, nil
}

// Reconfigure applies a new configuration, live if Run is running (SIGHUP).
// An instance with the same ID and address as before keeps its health state
// (and its probe loop, if the check settings are unchanged); others start
// unknown. A new snapshot is published if routing changes, after the new
// instances' first checks (at most Timeout). An invalid cfg changes nothing.
func (s *Static) Reconfigure(cfg StaticConfig) error {
	instances, err := cfg.parse()
	if err != nil {
		return err
	}
	cfg.Health = cfg.Health.withDefaults()
	cfg.Instances = append([]StaticInstance(nil), cfg.Instances...)
	log := cfg.Logger
	if log == nil {
		log = slog.Default()
	}

	s.mu.Lock()
	defer s.mu.Unlock()
	old := s.checks
	s.cfg, s.log = cfg, log
	s.checks = make(map[string]*check, len(instances))
	s.order = s.order[:0]
	for _, in := range instances {
		s.order = append(s.order, in.id)
		prev := old[in.id]
		if prev != nil && prev.addr == in.addr && prev.probe == probeSettings(cfg.Health) {
			// Same instance, same checks: keep the loop running.
			prev.shard, prev.priority = in.shard, in.priority
			s.checks[in.id] = prev
			delete(old, in.id)
			continue
		}
		c := &check{id: in.id, addr: in.addr, shard: in.shard, priority: in.priority, probe: probeSettings(cfg.Health)}
		if prev != nil && prev.addr == in.addr {
			c.st = prev.st // carry the health state over new check settings
		}
		if cfg.Health.Type == HealthNone {
			c.st.known, c.st.healthy = true, true
		}
		s.checks[in.id] = c
		if s.running {
			s.startLocked(c)
		}
	}
	for _, c := range old {
		if c.cancel != nil {
			c.cancel()
		}
	}
	s.pokeLocked()
	return nil
}

// probeSettings are the HealthConfig fields a probe loop runs with; Rise
// and Fall apply to results as they come, so changing them needs no
// restart.
func probeSettings(h HealthConfig) HealthConfig {
	return HealthConfig{Type: h.Type, Interval: h.Interval, Timeout: h.Timeout}
}

// Run checks the instances and publishes snapshots until ctx is done, then
// stops the checks and returns nil. Only one Run at a time.
func (s *Static) Run(ctx context.Context, update func(*Snapshot)) error {
	s.mu.Lock()
	if s.running {
		s.mu.Unlock()
		return errors.New("backend: static source is already running")
	}
	s.running, s.runCtx, s.last = true, ctx, nil
	for _, id := range s.order {
		s.startLocked(s.checks[id])
	}
	s.mu.Unlock()

	defer func() {
		s.mu.Lock()
		for _, c := range s.checks {
			if c.cancel != nil {
				c.cancel()
				c.cancel = nil
			}
		}
		s.running = false
		s.mu.Unlock()
		s.wg.Wait()
	}()
	return s.publishLoop(ctx, update)
}

// startLocked starts c's probe loop under the run context.
func (s *Static) startLocked(c *check) {
	if c.probe.Type == HealthNone {
		return
	}
	ctx, cancel := context.WithCancel(s.runCtx)
	c.cancel = cancel
	c.deadline = time.Now().Add(c.probe.Timeout)
	p := newProber(c.probe)
	s.wg.Add(1)
	go probeLoop(ctx, s, c, p, c.probe.Interval)
}

// publishLoop builds a snapshot on every state change and hands it to update
// when routing changed. It holds a snapshot back while an instance awaits its
// first check result (at most until that instance's deadline).
func (s *Static) publishLoop(ctx context.Context, update func(*Snapshot)) error {
	var wait *time.Timer
	defer func() {
		if wait != nil {
			wait.Stop()
		}
	}()
	for {
		snap, hold := s.build()
		if hold > 0 {
			if wait == nil {
				wait = time.NewTimer(hold)
			} else {
				wait.Reset(hold)
			}
		} else {
			s.mu.Lock()
			changed := !snap.Equal(s.last) || s.last == nil
			if changed {
				s.last = snap
			}
			s.mu.Unlock()
			if changed {
				update(snap)
			}
		}
		var timeout <-chan time.Time
		if wait != nil && hold > 0 {
			timeout = wait.C
		}
		select {
		case <-ctx.Done():
			return nil
		case <-s.kick:
		case <-timeout:
		}
	}
}

// build returns the current snapshot, or how long to hold it back for first
// results.
func (s *Static) build() (*Snapshot, time.Duration) {
	s.mu.Lock()
	defer s.mu.Unlock()
	now := time.Now()
	var hold time.Duration
	ins := make([]Instance, 0, len(s.order))
	for _, id := range s.order {
		c := s.checks[id]
		if !c.st.known && c.cancel != nil && now.Before(c.deadline) {
			hold = max(hold, c.deadline.Sub(now))
		}
		ins = append(ins, Instance{ID: c.id, Addr: c.addr, Shard: c.shard, Priority: c.priority, Healthy: c.st.known && c.st.healthy})
	}
	if hold > 0 {
		return nil, hold
	}
	return NewSnapshot(s.cfg.Shards, ins, SnapshotOptions{NoInstance: s.cfg.NoInstance}), 0
}

func (s *Static) pokeLocked() {
	select {
	case s.kick <- struct{}{}:
	default:
	}
}

// record applies one check result with rise/fall hysteresis.
func (s *Static) record(c *check, err error) {
	now := time.Now()
	s.mu.Lock()
	if s.checks[c.id] != c {
		s.mu.Unlock() // a result from a loop that Reconfigure retired
		return
	}
	st := &c.st
	ok := err == nil
	if st.checks > 0 && st.lastOK == ok {
		st.streak++
	} else {
		st.streak = 1
	}
	st.checks++
	st.lastOK, st.lastCheck = ok, now
	st.lastErr = ""
	if err != nil {
		st.lastErr = err.Error()
	}
	changed := false
	switch {
	case !st.known:
		st.known, st.healthy, changed = true, ok, true
	case st.healthy && !ok && st.streak >= s.cfg.Health.Fall:
		st.healthy, changed = false, true
	case !st.healthy && ok && st.streak >= s.cfg.Health.Rise:
		st.healthy, changed = true, true
	}
	if changed {
		st.lastChange = now
		s.pokeLocked()
	}
	status := c.statusLocked()
	log, hook := s.log, s.onResult
	s.mu.Unlock()

	if changed {
		log.Info("backend health changed", "instance", c.id, "address", c.addr.String(),
			"state", status.State, "consecutive", status.Consecutive, "error", status.LastError)
	}
	if hook != nil {
		hook(status)
	}
}

func (c *check) statusLocked() InstanceStatus {
	st := InstanceStatus{
		ID: c.id, Address: c.addr, Shard: c.shard, Priority: c.priority,
		State: "unknown", Healthy: c.st.known && c.st.healthy, Check: c.probe.Type,
		LastError: c.st.lastErr, LastCheck: c.st.lastCheck, Consecutive: c.st.streak,
		LastChange: c.st.lastChange, Checks: c.st.checks,
	}
	switch {
	case st.Healthy:
		st.State = "healthy"
	case c.st.known:
		st.State = "unhealthy"
	}
	if c.st.checks > 0 {
		st.LastResult = "fail"
		if c.st.lastOK {
			st.LastResult = "ok"
		}
	}
	return st
}

// Status returns every instance's check state, in configuration order.
func (s *Static) Status() []InstanceStatus {
	s.mu.Lock()
	defer s.mu.Unlock()
	out := make([]InstanceStatus, 0, len(s.order))
	for _, id := range s.order {
		out = append(out, s.checks[id].statusLocked())
	}
	return out
}

// Snapshot returns the last published snapshot, nil before the first.
func (s *Static) Snapshot() *Snapshot {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.last
}
