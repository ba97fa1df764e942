package proxy

import (
	"context"
	"encoding/binary"
	"fmt"
	"log/slog"
	"math"
	"net/netip"
	"sync"
	"sync/atomic"
	"time"
)

// Reasons Admission.Admit gives for a refusal; they are also the values of
// the reason label of shardgate_connect_rejects_total.
const (
	AdmissionShardRate   = "shard_rate"   // the shard's token bucket is empty
	AdmissionSourceLimit = "source_limit" // the source address holds PerSourceMax connections
)

// AdmissionConfig paces new devices. The zero value admits everything.
type AdmissionConfig struct {
	// Rate is how many new connections per second each shard admits, on
	// average; a reconnect storm after an outage is spread out at this pace
	// instead of landing on the brokers at once. Devices routed without a
	// shard share one bucket of the same rate. 0 (default): unlimited.
	Rate float64
	// Burst is how many connections a shard admits at once after a quiet
	// period (the bucket's size). 0 (default): max(1, Rate), Rate rounded
	// down.
	Burst int
	// PerSourceMax caps the concurrent connections from one source IP
	// address, so one misbehaving host (or NAT) cannot hold every slot.
	// 0 (default): unlimited.
	PerSourceMax int
}

// Validate reports a configuration that makes no sense.
func (c AdmissionConfig) Validate() error {
	switch {
	case math.IsNaN(c.Rate) || math.IsInf(c.Rate, 0) || c.Rate < 0:
		return fmt.Errorf("admission rate %v: must be a finite number >= 0", c.Rate)
	case c.Burst < 0:
		return fmt.Errorf("admission burst %d: must be >= 0", c.Burst)
	case c.PerSourceMax < 0 || c.PerSourceMax > math.MaxInt32:
		return fmt.Errorf("admission per-source max %d: must be between 0 and %d", c.PerSourceMax, math.MaxInt32)
	}
	return nil
}

// admStripes is the number of independently locked parts of the per-source
// table, so loops on different cores rarely wait for each other.
const admStripes = 64

// Admission decides whether a new device may go on to its broker: a token
// bucket per shard, and a limit of concurrent connections per source
// address. It is safe for concurrent use by every event loop, and Admit
// does not allocate in steady state. NewAdmission keeps the buckets in the
// process; NewSharedAdmission keeps them in an AdmissionRegion shared by the
// worker processes of one host.
type Admission struct {
	limits       atomic.Pointer[admLimits]
	perSourceMax atomic.Int32
	// counting is set once a per-source limit has been configured; until
	// then Release has nothing to undo.
	counting atomic.Bool
	stripes  [admStripes]admStripe

	now  func() time.Time // time.Now; tests replace it
	base time.Time        // bucket times are nanoseconds since base
	// region holds the buckets when they are shared between processes;
	// nil: they live in each admLimits.
	region *AdmissionRegion
}

// admLimits is one configuration of the token buckets, swapped whole by
// Reconfigure.
type admLimits struct {
	// Generic cell rate algorithm, the token bucket expressed as one time
	// per bucket: a connection is admitted when the bucket's theoretical
	// arrival time, advanced by interval, is at most tolerance ahead of now.
	// It needs one compare-and-swap and no lock.
	interval  int64 // ns per token; 0: unlimited
	tolerance int64 // burst × interval
	// buckets[s] is shard s's bucket; every other shard (-1, out of range)
	// uses overflow. Both point into an AdmissionRegion when shared.
	buckets  []admBucket
	overflow *admBucket
}

type admBucket struct {
	tat atomic.Int64 // theoretical arrival time, ns since Admission.base
	_   [56]byte     // a cache line per bucket: loops on other cores admit other shards
}

// admBucketSize is the size of admBucket, and of a bucket's slot in an
// AdmissionRegion.
const admBucketSize = 64

type admStripe struct {
	mu sync.Mutex
	// n counts open connections per source; an address is deleted when its
	// count drops to 0, so the table holds the sources connected now, not
	// every device ever seen.
	n map[netip.Addr]int32
	_ [48]byte
}

// NewAdmission returns an Admission for shards shards (shard numbers 0 to
// shards-1). cfg should have passed Validate; out-of-range values are
// clamped to "unlimited".
func NewAdmission(cfg AdmissionConfig, shards int) *Admission {
	return newAdmissionClock(cfg, shards, time.Now)
}

func newAdmissionClock(cfg AdmissionConfig, shards int, now func() time.Time) *Admission {
	return newAdmissionAt(cfg, shards, now, now(), nil)
}

func newAdmissionAt(cfg AdmissionConfig, shards int, now func() time.Time, base time.Time, r *AdmissionRegion) *Admission {
	a := &Admission{now: now, base: base, region: r}
	for i := range a.stripes {
		a.stripes[i].n = make(map[netip.Addr]int32)
	}
	a.Reconfigure(cfg, shards)
	return a
}

// Reconfigure applies a new configuration (SIGHUP reload). The token buckets
// start full. Per-source counts carry over; when a per-source limit is
// switched on, connections admitted before were not counted, so the limit
// is loose (never tight) until they have closed.
//
// On a shared Admission the buckets are refilled only when the limits
// differ from the ones the region was last configured with, by whichever
// process gets there first: every worker reloads on SIGHUP, and N refills
// would let N bursts through. Reloading the same limits is then a no-op
// for the buckets, and so is a worker starting (or restarting) with them.
func (a *Admission) Reconfigure(cfg AdmissionConfig, shards int) {
	shards = max(shards, 0)
	l := &admLimits{}
	if cfg.Rate > 0 && !math.IsInf(cfg.Rate, 0) {
		burst := float64(cfg.Burst)
		if cfg.Burst <= 0 {
			burst = max(1, math.Floor(cfg.Rate))
		}
		// Whole nanoseconds, so exactly burst connections fit in the
		// tolerance; capped far below overflow for absurdly slow rates.
		const limit = math.MaxInt64 / 4
		l.interval = int64(min(max(1, math.Round(float64(time.Second)/cfg.Rate)), limit))
		l.tolerance = int64(min(burst*float64(l.interval), limit))
	}
	if a.region != nil {
		a.region.bind(l, shards, a.elapsed())
	} else {
		all := make([]admBucket, shards+1)
		l.buckets, l.overflow = all[:shards], &all[shards]
		fillBuckets(all, a.elapsed(), l.tolerance)
	}
	a.limits.Store(l)
	ps := int32(min(max(cfg.PerSourceMax, 0), math.MaxInt32))
	a.perSourceMax.Store(ps)
	if ps > 0 {
		a.counting.Store(true)
	}
}

// fillBuckets makes every bucket full at now: an arrival time far enough
// in the past that a whole burst fits.
func fillBuckets(b []admBucket, now, tolerance int64) {
	for i := range b {
		b[i].tat.Store(now - tolerance)
	}
}

func (a *Admission) elapsed() int64 { return int64(a.now().Sub(a.base)) }

// Admit decides whether a device from src, routed to shard, may connect. On
// true the caller must call Release(src) when the connection closes. On false
// reason is AdmissionSourceLimit or AdmissionShardRate, and nothing is held.
//
// Shard -1 (routed without a shard) and any shard outside [0, shards) use
// one shared bucket. An invalid src (unknown peer) is not limited per
// source. IPv4-mapped IPv6 sources count as their IPv4 address.
//
// The source limit is checked first, so a host at its limit does not use up
// its shard's tokens; if the bucket then refuses, the source count is undone.
func (a *Admission) Admit(shard int, src netip.Addr) (ok bool, reason string) {
	src = admKey(src)
	counted := false
	if ps := a.perSourceMax.Load(); ps > 0 && src.IsValid() {
		st := &a.stripes[admStripeOf(src)]
		st.mu.Lock()
		n := st.n[src]
		if n >= ps {
			st.mu.Unlock()
			return false, AdmissionSourceLimit
		}
		st.n[src] = n + 1
		st.mu.Unlock()
		counted = true
	}
	if !a.take(shard) {
		if counted {
			a.release(src)
		}
		return false, AdmissionShardRate
	}
	return true, ""
}

// Release returns the source slot of a connection Admit let in.
func (a *Admission) Release(src netip.Addr) {
	if !a.counting.Load() {
		return
	}
	src = admKey(src)
	if src.IsValid() {
		a.release(src)
	}
}

// Sources reports how many source addresses hold connections now (the size
// of the per-source table).
func (a *Admission) Sources() int {
	n := 0
	for i := range a.stripes {
		st := &a.stripes[i]
		st.mu.Lock()
		n += len(st.n)
		st.mu.Unlock()
	}
	return n
}

func (a *Admission) release(src netip.Addr) {
	st := &a.stripes[admStripeOf(src)]
	st.mu.Lock()
	switch n := st.n[src]; {
	case n > 1:
		st.n[src] = n - 1
	case n == 1:
		delete(st.n, src)
	}
	// n == 0: a connection admitted before the limit was switched on.
	st.mu.Unlock()
}

// take takes one token from shard's bucket (GCRA, see admLimits).
func (a *Admission) take(shard int) bool {
	l := a.limits.Load()
	if l.interval == 0 {
		return true
	}
	b := l.overflow
	if shard >= 0 && shard < len(l.buckets) {
		b = &l.buckets[shard]
	}
	now := a.elapsed()
	for {
		tat := b.tat.Load()
		next := max(tat, now) + l.interval
		if next-now > l.tolerance {
			return false
		}
		if b.tat.CompareAndSwap(tat, next) {
			return true
		}
	}
}

// admKey is the per-source table key: one entry per host whatever way the
// listener reported it.
func admKey(a netip.Addr) netip.Addr {
	return a.Unmap().WithZone("")
}

func admStripeOf(a netip.Addr) uint32 {
	b := a.As16()
	x := binary.LittleEndian.Uint64(b[:8]) ^ binary.LittleEndian.Uint64(b[8:])
	// Fibonacci hashing: the top bits of the product mix every input bit.
	return uint32((x * 0x9E3779B97F4A7C15) >> 58) // 64 stripes = 6 bits
}

// SampledLog writes at most one line per interval for each reason and counts
// the lines it drops, reporting them as "suppressed" on the next line it
// writes for that reason. It keeps a refusal storm (thousands of devices a
// second refused for the same reason) from flooding the log while still
// saying how much happened. Reasons should come from a small fixed set: each
// one keeps a few bytes of state for good. Safe for concurrent use.
type SampledLog struct {
	log      *slog.Logger
	interval time.Duration
	now      func() time.Time // time.Now; tests replace it

	mu      sync.Mutex
	reasons map[string]*admSample
}

type admSample struct {
	last       time.Time // when the last line was written
	suppressed int
}

// NewSampledLog writes through l (nil: slog.Default()) at most once per
// interval per reason (0: one second).
func NewSampledLog(l *slog.Logger, interval time.Duration) *SampledLog {
	if l == nil {
		l = slog.Default()
	}
	if interval <= 0 {
		interval = time.Second
	}
	return &SampledLog{log: l, interval: interval, now: time.Now, reasons: make(map[string]*admSample)}
}

// Allow reports whether a line for reason may be written now, and if so how
// many were suppressed since the last one (the count restarts). A refused
// call counts as suppressed. Callers on a hot path call Allow first and
// build the line's attributes only when it returns true.
func (s *SampledLog) Allow(reason string) (ok bool, suppressed int) {
	now := s.now()
	s.mu.Lock()
	defer s.mu.Unlock()
	r := s.reasons[reason]
	if r == nil {
		r = &admSample{}
		s.reasons[reason] = r
	} else if now.Sub(r.last) < s.interval {
		r.suppressed++
		return false, 0
	}
	r.last = now
	suppressed, r.suppressed = r.suppressed, 0
	return true, suppressed
}

// Log writes msg with args and reason="..." at level if Allow(reason)
// permits, adding suppressed=N when lines were dropped since the last one.
func (s *SampledLog) Log(ctx context.Context, level slog.Level, reason, msg string, args ...any) {
	if !s.log.Enabled(ctx, level) {
		return
	}
	ok, n := s.Allow(reason)
	if !ok {
		return
	}
	attrs := make([]any, 0, len(args)+4)
	attrs = append(attrs, args...)
	attrs = append(attrs, "reason", reason)
	if n > 0 {
		attrs = append(attrs, "suppressed", n)
	}
	s.log.Log(ctx, level, msg, attrs...)
}
