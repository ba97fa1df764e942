package backend

import (
	"cmp"
	"fmt"
	"net/netip"
	"slices"
	"unsafe"

	"github.com/cespare/xxhash/v2"
)

// Instance is one broker endpoint as a source sees it.
type Instance struct {
	// ID is unique within a snapshot. Consul: node name + "/" + service ID;
	// static: the configured id. It breaks priority ties and seeds the
	// rendezvous weights, so every proxy must see the same ID.
	ID string
	// Addr is dialled by IP, never a name: no DNS on the hot path.
	Addr netip.AddrPort
	// Shard is the logical shard the instance serves, or -1 when it has no
	// shard meta. An instance whose shard is outside [0, shards) serves no
	// shard (it only takes spilled devices).
	Shard int
	// Priority orders the instances of a shard: lower is preferred.
	Priority int
	// Healthy instances take devices; the others are listed but never chosen.
	Healthy bool
}

// Policy says what happens to a device whose shard has no healthy instance.
// The zero value is Spill.
type Policy uint8

const (
	// Spill routes the device by rendezvous hash over every healthy instance
	// of any shard (the default).
	Spill Policy = iota
	// Reject refuses the device (the proxy answers CONNACK server
	// unavailable).
	Reject
)

// String returns the configuration spelling: "spill" or "reject".
func (p Policy) String() string {
	switch p {
	case Spill:
		return "spill"
	case Reject:
		return "reject"
	}
	return fmt.Sprintf("Policy(%d)", uint8(p))
}

// ParsePolicy parses "spill" or "reject"; "" is the default, Spill.
func ParsePolicy(s string) (Policy, error) {
	switch s {
	case "", "spill":
		return Spill, nil
	case "reject":
		return Reject, nil
	}
	return Spill, fmt.Errorf("%q is not spill or reject", s)
}

// MarshalText implements encoding.TextMarshaler.
func (p Policy) MarshalText() ([]byte, error) {
	if p > Reject {
		return nil, fmt.Errorf("invalid policy %d", uint8(p))
	}
	return []byte(p.String()), nil
}

// UnmarshalText implements encoding.TextUnmarshaler (YAML and JSON configs).
func (p *Policy) UnmarshalText(b []byte) error {
	v, err := ParsePolicy(string(b))
	if err != nil {
		return err
	}
	*p = v
	return nil
}

// SnapshotOptions are the routing settings a snapshot is built with.
type SnapshotOptions struct {
	// NoInstance is the policy for a shard with no healthy instance.
	// Default Spill.
	NoInstance Policy
}

// Route is where a device goes.
type Route struct {
	// Shard is the device's logical shard (ShardOf), also when it was
	// spilled to another shard's instance or refused. It is -1 when the
	// snapshot has no shard meta and every instance is its own shard.
	Shard int
	// Instance points into the snapshot (read-only; valid as long as the
	// snapshot is referenced). Nil when the device is refused.
	Instance *Instance
	// Index is the position of Instance in Snapshot.Instances(), -1 if none.
	Index int
	// Spilled is true when the shard had no healthy instance and the device
	// went to another shard's instance under the Spill policy.
	Spilled bool
}

// Snapshot is an immutable backend set with precomputed routing tables.
// Build it with NewSnapshot; share it freely between goroutines.
type Snapshot struct {
	shards    int
	policy    Policy
	sharded   bool
	instances []Instance // sorted by ID, IDs unique
	// active[s] is the index in instances of shard s's active instance, -1
	// when the shard has no healthy instance.
	active []int32
	// healthy holds every healthy instance in ID order with its rendezvous
	// prefix, the candidates of a spill (sharded) or of every device (not
	// sharded).
	healthy []hrwCandidate
}

type hrwCandidate struct {
	index  int32
	prefix xxhash.Digest // XXH64 state after ID + "\x00", copied for each key
}

// NewSnapshot builds a snapshot of instances for a fleet of shards logical
// shards. The order of instances does not matter: proxies that see the same
// set in any order route identically. IDs should be unique; of instances
// sharing an ID only the first in (ID, Addr, Shard, Priority, Healthy)
// order is kept, so the result is still independent of input order.
//
// The snapshot is sharded when shards >= 1 and at least one instance (healthy
// or not) has a shard in [0, shards). Otherwise every instance is its own
// shard and devices are spread by rendezvous hash over the healthy ones.
func NewSnapshot(shards int, instances []Instance, opts SnapshotOptions) *Snapshot {
	if shards < 0 {
		shards = 0
	}
	s := &Snapshot{shards: shards, policy: opts.NoInstance}
	s.instances = slices.Clone(instances)
	slices.SortFunc(s.instances, compareInstances)
	s.instances = slices.CompactFunc(s.instances, func(a, b Instance) bool { return a.ID == b.ID })

	for _, in := range s.instances {
		if in.Shard >= 0 && in.Shard < shards {
			s.sharded = true
			break
		}
	}
	if s.sharded {
		s.active = make([]int32, shards)
		for i := range s.active {
			s.active[i] = -1
		}
		for i, in := range s.instances {
			if !in.Healthy || in.Shard < 0 || in.Shard >= shards {
				continue
			}
			// Instances are in ID order, so a strictly lower priority is
			// the only way to displace the current choice: ties keep the
			// smaller ID.
			cur := s.active[in.Shard]
			if cur < 0 || in.Priority < s.instances[cur].Priority {
				s.active[in.Shard] = int32(i)
			}
		}
	}
	for i, in := range s.instances {
		if in.Healthy {
			s.healthy = append(s.healthy, hrwCandidate{index: int32(i), prefix: rendezvousPrefix(in.ID)})
		}
	}
	return s
}

func compareInstances(a, b Instance) int {
	if c := cmp.Compare(a.ID, b.ID); c != 0 {
		return c
	}
	if c := a.Addr.Compare(b.Addr); c != 0 {
		return c
	}
	if c := cmp.Compare(a.Shard, b.Shard); c != 0 {
		return c
	}
	if c := cmp.Compare(a.Priority, b.Priority); c != 0 {
		return c
	}
	switch {
	case a.Healthy == b.Healthy:
		return 0
	case b.Healthy:
		return -1
	}
	return 1
}

// Route maps a client ID to its shard and instance. ok is false when the
// device must be refused: its shard has no healthy instance and the policy is
// Reject, or nothing at all is healthy. It does not allocate. A nil snapshot
// refuses everything.
func (s *Snapshot) Route(clientID []byte) (r Route, ok bool) {
	if s == nil {
		return Route{Shard: -1, Index: -1}, false
	}
	if !s.sharded {
		return s.spill(-1, clientID, false)
	}
	shard := ShardOf(clientID, s.shards)
	if i := s.active[shard]; i >= 0 {
		return Route{Shard: shard, Instance: &s.instances[i], Index: int(i)}, true
	}
	if s.policy == Reject {
		return Route{Shard: shard, Index: -1}, false
	}
	return s.spill(shard, clientID, true)
}

// RouteString is Route for a client ID held in a string; it does not copy or
// allocate.
func (s *Snapshot) RouteString(clientID string) (Route, bool) {
	// The bytes are only read, never kept or written.
	return s.Route(unsafe.Slice(unsafe.StringData(clientID), len(clientID)))
}

// RouteAddr routes a device with an empty client ID by its source address:
// Route(SourceKey(addr)), without allocating.
func (s *Snapshot) RouteAddr(addr netip.Addr) (Route, bool) {
	var buf [16]byte
	return s.Route(AppendSourceKey(buf[:0], addr))
}

// spill routes key to the healthy instance with the highest rendezvous
// weight; Route.Shard is shard.
func (s *Snapshot) spill(shard int, key []byte, spilled bool) (Route, bool) {
	best := s.rendezvous(key)
	if best < 0 {
		return Route{Shard: shard, Index: -1}, false
	}
	return Route{Shard: shard, Instance: &s.instances[best], Index: int(best), Spilled: spilled}, true
}

// rendezvous returns the index of the healthy instance with the highest
// weight XXH64(ID + "\x00" + key), -1 if none is healthy. Equal weights go
// to the smaller ID: candidates are in ID order and only a strictly higher
// weight replaces the choice.
func (s *Snapshot) rendezvous(key []byte) int32 {
	best, bestW := int32(-1), uint64(0)
	for i := range s.healthy {
		c := &s.healthy[i]
		d := c.prefix // the state after ID + "\x00": hash only the key
		d.Write(key)
		if w := d.Sum64(); best < 0 || w > bestW {
			best, bestW = c.index, w
		}
	}
	return best
}

// Shards is the logical shard count the snapshot was built with.
func (s *Snapshot) Shards() int {
	if s == nil {
		return 0
	}
	return s.shards
}

// Sharded reports whether routing goes by shard (some instance has shard
// meta) rather than by rendezvous hash over all instances.
func (s *Snapshot) Sharded() bool { return s != nil && s.sharded }

// NoInstance is the snapshot's policy for a shard with no healthy instance.
func (s *Snapshot) NoInstance() Policy {
	if s == nil {
		return Spill
	}
	return s.policy
}

// Instances returns a copy of the instances, sorted by ID (the order Route's
// Index refers to).
func (s *Snapshot) Instances() []Instance {
	if s == nil {
		return nil
	}
	return slices.Clone(s.instances)
}

// Len is the number of instances.
func (s *Snapshot) Len() int {
	if s == nil {
		return 0
	}
	return len(s.instances)
}

// Active returns the instance that takes shard's devices, false when the
// snapshot is not sharded, shard is out of range or has no healthy instance.
func (s *Snapshot) Active(shard int) (Instance, bool) {
	if s == nil || !s.sharded || shard < 0 || shard >= len(s.active) || s.active[shard] < 0 {
		return Instance{}, false
	}
	return s.instances[s.active[shard]], true
}

// HealthyCount is the number of healthy instances announcing shard (-1
// counts the instances without shard meta), for the instances_healthy
// metric.
func (s *Snapshot) HealthyCount(shard int) int {
	if s == nil {
		return 0
	}
	n := 0
	for _, in := range s.instances {
		if in.Healthy && in.Shard == shard {
			n++
		}
	}
	return n
}

// Equal reports whether two snapshots route identically: same shard count,
// policy and instances. Sources use it to publish on change only.
func (s *Snapshot) Equal(o *Snapshot) bool {
	if s == nil || o == nil {
		return s == o
	}
	return s.shards == o.shards && s.policy == o.policy && slices.Equal(s.instances, o.instances)
}
