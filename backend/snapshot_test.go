package backend

import (
	"fmt"
	"math/rand/v2"
	"net/netip"
	"slices"
	"strings"
	"testing"
)

func inst(id string, shard, prio int, healthy bool) Instance {
	return Instance{ID: id, Addr: netip.MustParseAddrPort("127.0.0.1:1883"), Shard: shard, Priority: prio, Healthy: healthy}
}

// idFor finds a client ID whose shard among shards is want, so table tests
// can aim at a shard.
func idFor(t testing.TB, shards, want int) []byte {
	t.Helper()
	for i := range 100000 {
		id := fmt.Appendf(nil, "dev-%d", i)
		if ShardOf(id, shards) == want {
			return id
		}
	}
	t.Fatalf("no client ID for shard %d of %d", want, shards)
	return nil
}

// bruteRendezvous is the rendezvous hash of the contract written as plainly
// as possible, to check the precomputed one.
func bruteRendezvous(key []byte, instances []Instance) (string, bool) {
	best, bestW, found := "", uint64(0), false
	for _, in := range instances {
		if !in.Healthy {
			continue
		}
		w := RendezvousWeight(in.ID, key)
		if !found || w > bestW || (w == bestW && in.ID < best) {
			best, bestW, found = in.ID, w, true
		}
	}
	return best, found
}

func TestRouteShardToInstance(t *testing.T) {
	const shards = 4
	tests := []struct {
		name      string
		instances []Instance
		policy    Policy
		shard     int
		wantID    string // "" = refused
		spilled   bool
	}{
		{
			name:      "lowest priority wins",
			instances: []Instance{inst("a", 1, 5, true), inst("b", 1, 0, true), inst("c", 1, 3, true)},
			shard:     1, wantID: "b",
		},
		{
			name:      "equal priority: smallest ID",
			instances: []Instance{inst("node2/b", 2, 0, true), inst("node1/z", 2, 0, true), inst("node10/a", 2, 0, true)},
			shard:     2, wantID: "node1/z",
		},
		{
			name:      "IDs compare as bytes, not numbers",
			instances: []Instance{inst("b-9", 0, 0, true), inst("b-10", 0, 0, true)},
			shard:     0, wantID: "b-10",
		},
		{
			name:      "unhealthy primary: standby takes over",
			instances: []Instance{inst("primary", 3, 0, false), inst("standby", 3, 1, true)},
			shard:     3, wantID: "standby",
		},
		{
			name:      "negative priority is preferred",
			instances: []Instance{inst("a", 0, 0, true), inst("b", 0, -1, true)},
			shard:     0, wantID: "b",
		},
		{
			name:      "no healthy instance, reject",
			instances: []Instance{inst("a", 0, 0, false), inst("b", 1, 0, true)},
			policy:    Reject, shard: 0, wantID: "",
		},
		{
			name:      "no healthy instance, spill to the only healthy one",
			instances: []Instance{inst("a", 0, 0, false), inst("b", 1, 0, true)},
			policy:    Spill, shard: 0, wantID: "b", spilled: true,
		},
		{
			name:      "spill may land on an instance without shard meta",
			instances: []Instance{inst("a", 0, 0, false), inst("nometa", -1, 0, true)},
			shard:     0, wantID: "nometa", spilled: true,
		},
		{
			name:      "instance without shard meta serves no shard in a sharded fleet",
			instances: []Instance{inst("nometa", -1, 0, true), inst("s1", 1, 0, true)},
			policy:    Reject, shard: 0, wantID: "",
		},
		{
			name:      "shard outside [0, shards) serves no shard",
			instances: []Instance{inst("big", 7, 0, true), inst("s1", 1, 0, true)},
			policy:    Reject, shard: 0, wantID: "",
		},
		{
			name:      "nothing healthy, spill refuses",
			instances: []Instance{inst("a", 0, 0, false), inst("b", 1, 0, false)},
			shard:     0, wantID: "",
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			s := NewSnapshot(shards, tt.instances, SnapshotOptions{NoInstance: tt.policy})
			id := idFor(t, shards, tt.shard)
			r, ok := s.Route(id)
			if r.Shard != tt.shard {
				t.Errorf("Shard = %d, want %d", r.Shard, tt.shard)
			}
			if tt.wantID == "" {
				if ok || r.Instance != nil || r.Index != -1 {
					t.Fatalf("Route = %+v, %v; want refused", r, ok)
				}
				return
			}
			if !ok || r.Instance == nil {
				t.Fatalf("Route refused, want %s", tt.wantID)
			}
			if r.Instance.ID != tt.wantID || r.Spilled != tt.spilled {
				t.Errorf("Route = %s spilled=%v, want %s spilled=%v", r.Instance.ID, r.Spilled, tt.wantID, tt.spilled)
			}
			if got := s.Instances()[r.Index]; got != *r.Instance {
				t.Errorf("Index %d is %s, not the routed instance", r.Index, got.ID)
			}
			if tt.spilled {
				want, _ := bruteRendezvous(id, tt.instances)
				if want != r.Instance.ID {
					t.Errorf("spill went to %s, rendezvous says %s", r.Instance.ID, want)
				}
			} else if a, ok := s.Active(tt.shard); !ok || a.ID != tt.wantID {
				t.Errorf("Active(%d) = %s, %v", tt.shard, a.ID, ok)
			}
		})
	}
}

func TestRouteSpillSpreadsAndRejectRefuses(t *testing.T) {
	// Shard 2 of 4 is down. Spill spreads its devices over all healthy
	// instances; devices of other shards do not move; Reject refuses exactly
	// shard 2's devices.
	var ins []Instance
	for sh := range 4 {
		ins = append(ins, inst(fmt.Sprintf("s%d-a", sh), sh, 0, sh != 2), inst(fmt.Sprintf("s%d-b", sh), sh, 1, sh != 2))
	}
	spill := NewSnapshot(4, ins, SnapshotOptions{NoInstance: Spill})
	reject := NewSnapshot(4, ins, SnapshotOptions{NoInstance: Reject})
	up := slices.Clone(ins)
	for i := range up {
		up[i].Healthy = true
	}
	all := NewSnapshot(4, up, SnapshotOptions{})
	landed := map[string]int{}
	for _, id := range randomIDs(20000, 7) {
		shard := ShardOf(id, 4)
		rs, oks := spill.Route(id)
		rr, okr := reject.Route(id)
		ra, _ := all.Route(id)
		if shard != 2 {
			if !oks || !okr || rs.Instance.ID != ra.Instance.ID || rr.Instance.ID != ra.Instance.ID || rs.Spilled {
				t.Fatalf("%q of healthy shard %d moved: spill %+v reject %+v", id, shard, rs, rr)
			}
			continue
		}
		if okr {
			t.Fatalf("reject routed %q of dead shard 2", id)
		}
		if !oks || !rs.Spilled || rs.Shard != 2 || rs.Instance.Shard == 2 {
			t.Fatalf("spill of %q = %+v, %v", id, rs, oks)
		}
		landed[rs.Instance.ID]++
	}
	if len(landed) != 6 {
		t.Errorf("spilled devices landed on %d instances (%v), want all 6 healthy ones", len(landed), landed)
	}
}

func TestRouteWithoutShardMeta(t *testing.T) {
	ins := []Instance{inst("broker-a", -1, 0, true), inst("broker-b", -1, 0, true), inst("node1/mqtt-broker-0", -1, 0, true), inst("down", -1, 0, false)}
	for _, shards := range []int{0, 1, 16} {
		s := NewSnapshot(shards, ins, SnapshotOptions{NoInstance: Reject})
		if s.Sharded() {
			t.Fatalf("shards=%d: snapshot without shard meta claims to be sharded", shards)
		}
		// The worked example of docs/routing-contract.md.
		if r, ok := s.Route([]byte("client-1")); !ok || r.Instance.ID != "broker-b" || r.Shard != -1 || r.Spilled {
			t.Fatalf("shards=%d: client-1 → %+v, %v; want broker-b, shard -1", shards, r, ok)
		}
		for _, id := range randomIDs(2000, 3) {
			r, ok := s.Route(id)
			want, _ := bruteRendezvous(id, ins)
			if !ok || r.Instance.ID != want {
				t.Fatalf("%q → %+v, want %s", id, r, want)
			}
		}
	}
	// Nothing healthy.
	if r, ok := NewSnapshot(0, []Instance{inst("a", -1, 0, false)}, SnapshotOptions{}).Route([]byte("x")); ok || r.Index != -1 {
		t.Errorf("Route with nothing healthy = %+v, %v", r, ok)
	}
}

// TestRendezvousLongKeys covers keys and IDs longer than an XXH64 block
// and the streaming state's buffer.
func TestRendezvousLongKeys(t *testing.T) {
	long := strings.Repeat("L", 300)
	ins := []Instance{inst("a", -1, 0, true), inst("b", -1, 0, true), inst(long, -1, 0, true), inst("c", -1, 0, true)}
	s := NewSnapshot(0, ins, SnapshotOptions{})
	short := NewSnapshot(0, ins[:2], SnapshotOptions{})
	for i, id := range randomIDs(3000, 13) {
		if i%2 == 0 {
			id = append(id, long...)
		}
		for _, sn := range []*Snapshot{s, short} {
			want, _ := bruteRendezvous(id, sn.Instances())
			if r, _ := sn.Route(id); r.Instance.ID != want {
				t.Fatalf("%d-byte key → %.10s…, want %.10s…", len(id), r.Instance.ID, want)
			}
		}
	}
}

func TestRendezvousTies(t *testing.T) {
	// Two instances with the same ID can't exist, so equal weights need a
	// hash collision; check the tie rule on the selection code directly by
	// giving two candidates the same prefix.
	s := NewSnapshot(0, []Instance{inst("a", -1, 0, true), inst("b", -1, 0, true)}, SnapshotOptions{})
	s.healthy[1].prefix = s.healthy[0].prefix
	for _, id := range append(randomIDs(100, 5), []byte(strings.Repeat("k", 300))) {
		if r, _ := s.Route(id); r.Instance.ID != "a" {
			t.Fatalf("tie went to %s, want the smaller ID a", r.Instance.ID)
		}
	}
}

func TestRouteNilAndEmpty(t *testing.T) {
	var s *Snapshot
	if r, ok := s.Route([]byte("x")); ok || r.Instance != nil {
		t.Error("nil snapshot routed")
	}
	if s.Shards() != 0 || s.Len() != 0 || s.Instances() != nil || s.Sharded() || s.HealthyCount(0) != 0 {
		t.Error("nil snapshot accessors")
	}
	if _, ok := NewRouter(nil).Route([]byte("x")); ok {
		t.Error("empty router routed")
	}
	if _, ok := NewSnapshot(4, nil, SnapshotOptions{}).Route([]byte("x")); ok {
		t.Error("empty snapshot routed")
	}
}

func TestRouteVariantsAgree(t *testing.T) {
	var ins []Instance
	for sh := range 8 {
		ins = append(ins, inst(fmt.Sprintf("i%d", sh), sh, 0, sh%3 != 0))
	}
	s := NewSnapshot(8, ins, SnapshotOptions{})
	for _, a := range []string{"127.0.0.1", "::ffff:127.0.0.1", "2001:db8::7", "10.1.2.3"} {
		addr := netip.MustParseAddr(a)
		want, _ := s.Route(SourceKey(addr))
		if got, _ := s.RouteAddr(addr); got != want {
			t.Errorf("RouteAddr(%s) = %+v, Route(SourceKey) = %+v", a, got, want)
		}
	}
	if got, want := SourceKey(netip.MustParseAddr("::ffff:10.0.0.1")), []byte{10, 0, 0, 1}; !slices.Equal(got, want) {
		t.Errorf("SourceKey(mapped) = %x", got)
	}
	if len(SourceKey(netip.Addr{})) != 0 {
		t.Error("SourceKey(zero) not empty")
	}
	for _, id := range randomIDs(1000, 11) {
		want, _ := s.Route(id)
		if got, _ := s.RouteString(string(id)); got != want {
			t.Fatalf("RouteString(%q) = %+v, Route = %+v", id, got, want)
		}
		if got, _ := NewRouter(s).Route(id); got != want {
			t.Fatalf("Router.Route(%q) = %+v, Route = %+v", id, got, want)
		}
	}
}

func TestSnapshotDuplicatesAndEqual(t *testing.T) {
	a := []Instance{inst("x", 0, 1, true), inst("x", 0, 0, false), inst("y", 1, 0, true)}
	b := []Instance{inst("y", 1, 0, true), inst("x", 0, 0, false), inst("x", 0, 1, true)}
	sa := NewSnapshot(2, a, SnapshotOptions{})
	sb := NewSnapshot(2, b, SnapshotOptions{})
	if sa.Len() != 2 || !sa.Equal(sb) {
		t.Fatalf("duplicates: %+v vs %+v", sa.Instances(), sb.Instances())
	}
	if got := sa.Instances()[0]; got.Priority != 0 || got.Healthy {
		t.Errorf("kept duplicate %+v, want the first in instance order", got)
	}
	if sa.Equal(NewSnapshot(2, a, SnapshotOptions{NoInstance: Reject})) || sa.Equal(NewSnapshot(3, a, SnapshotOptions{})) || sa.Equal(nil) {
		t.Error("Equal ignores policy, shards or nil")
	}
	// The caller's slice is not kept.
	a[0].ID = "changed"
	if sa.Instances()[0].ID != "x" {
		t.Error("snapshot aliases the caller's slice")
	}
	if n := sa.HealthyCount(1); n != 1 {
		t.Errorf("HealthyCount(1) = %d", n)
	}
}

func TestPolicyText(t *testing.T) {
	for _, tt := range []struct {
		in   string
		want Policy
		err  bool
	}{{"", Spill, false}, {"spill", Spill, false}, {"reject", Reject, false}, {"Reject", Spill, true}, {"drop", Spill, true}} {
		var p Policy
		err := p.UnmarshalText([]byte(tt.in))
		if (err != nil) != tt.err || (err == nil && p != tt.want) {
			t.Errorf("UnmarshalText(%q) = %v, %v", tt.in, p, err)
		}
	}
	if b, _ := Reject.MarshalText(); string(b) != "reject" {
		t.Errorf("MarshalText = %s", b)
	}
}

// randomIDs returns n distinct pseudo-random client IDs, the same for the
// same seed: mixed lengths and alphabets like real fleets (serials, UUIDs,
// prefixes with counters).
func randomIDs(n int, seed uint64) [][]byte {
	r := rand.New(rand.NewPCG(seed, seed^0x5ca1ab1e))
	const alnum = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_/:"
	ids := make([][]byte, 0, n)
	seen := make(map[string]bool, n)
	for len(ids) < n {
		var id []byte
		switch r.IntN(3) {
		case 0:
			id = fmt.Appendf(nil, "device-%d", r.IntN(1<<40))
		case 1:
			id = fmt.Appendf(nil, "%08x-%04x-%04x-%04x-%012x", r.Uint32(), r.Uint32()&0xffff, r.Uint32()&0xffff, r.Uint32()&0xffff, r.Uint64()&0xffffffffffff)
		default:
			id = make([]byte, 1+r.IntN(40))
			for i := range id {
				id[i] = alnum[r.IntN(len(alnum))]
			}
		}
		if !seen[string(id)] {
			seen[string(id)] = true
			ids = append(ids, id)
		}
	}
	return ids
}
