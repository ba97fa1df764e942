package backend

import (
	"fmt"
	"math/rand/v2"
	"net/netip"
	"sync"
	"testing"
)

// The properties the routing contract promises (docs/routing-contract.md),
// over at least 100 000 random client IDs.

const propertyIDs = 100000

var (
	propertyOnce sync.Once
	propertySet  [][]byte
)

func propertyClientIDs() [][]byte {
	propertyOnce.Do(func() { propertySet = randomIDs(propertyIDs, 20140606) })
	return propertySet
}

// instanceCounts is N = 3..64, or a spread of it with -short.
func instanceCounts() []int {
	if testing.Short() {
		return []int{3, 4, 5, 8, 13, 16, 31, 32, 33, 64}
	}
	var ns []int
	for n := 3; n <= 64; n++ {
		ns = append(ns, n)
	}
	return ns
}

func noMetaFleet(n int) []Instance {
	ins := make([]Instance, n)
	for i := range ins {
		ins[i] = Instance{
			ID:      fmt.Sprintf("node%d/mqtt-broker", i),
			Addr:    netip.AddrPortFrom(netip.AddrFrom4([4]byte{10, 0, byte(i >> 8), byte(i)}), 1883),
			Shard:   -1,
			Healthy: true,
		}
	}
	return ins
}

// routeAll routes every ID and returns the chosen instance IDs.
func routeAll(t *testing.T, s *Snapshot, ids [][]byte) []string {
	t.Helper()
	out := make([]string, len(ids))
	for i, id := range ids {
		r, ok := s.Route(id)
		if !ok {
			t.Fatalf("%q refused", id)
		}
		out[i] = r.Instance.ID
	}
	return out
}

func TestPropertyIndependentRouters(t *testing.T) {
	ids := propertyClientIDs()
	r := rand.New(rand.NewPCG(1, 1))
	// A sharded fleet with standbys, priorities, a dead shard and spares
	// without meta, and a fleet without meta.
	var sharded []Instance
	for sh := range 16 {
		for k := range 3 {
			sharded = append(sharded, Instance{
				ID:       fmt.Sprintf("n%d/s%d", k, sh),
				Addr:     netip.AddrPortFrom(netip.AddrFrom4([4]byte{10, 1, byte(sh), byte(k)}), 1883),
				Shard:    sh,
				Priority: k % 2,
				Healthy:  sh != 5 && (k != 0 || sh%4 != 0),
			})
		}
	}
	sharded = append(sharded, noMetaFleet(3)...)
	for _, fleet := range []struct {
		name   string
		shards int
		ins    []Instance
	}{{"sharded", 16, sharded}, {"no-meta", 0, noMetaFleet(17)}} {
		t.Run(fleet.name, func(t *testing.T) {
			t.Parallel()
			base := routeAll(t, NewSnapshot(fleet.shards, fleet.ins, SnapshotOptions{}), ids)
			for round := range 3 {
				shuffled := append([]Instance(nil), fleet.ins...)
				r.Shuffle(len(shuffled), func(i, j int) { shuffled[i], shuffled[j] = shuffled[j], shuffled[i] })
				router := NewRouter(NewSnapshot(fleet.shards, shuffled, SnapshotOptions{}))
				for i, id := range ids {
					got, ok := router.Route(id)
					if !ok || got.Instance.ID != base[i] {
						t.Fatalf("round %d: %q → %+v, first router said %s", round, id, got, base[i])
					}
				}
			}
		})
	}
}

// TestPropertyBalanceAndMovement: without shard meta, over N = 3..64
// instances,
//   - the most loaded instance carries at most 1.10 × the mean;
//   - removing one instance (or its going unhealthy) moves only the IDs it
//     had, at most 1/N + 2 % of them;
//   - adding one moves only the IDs it now takes, at most 1/(N+1) + 2 %.
func TestPropertyBalanceAndMovement(t *testing.T) {
	ids := propertyClientIDs()
	for _, n := range instanceCounts() {
		t.Run(fmt.Sprint(n), func(t *testing.T) {
			t.Parallel()
			fleet := noMetaFleet(n + 1)
			s := NewSnapshot(0, fleet[:n], SnapshotOptions{})
			before := make([]string, len(ids))
			load := make([]int, n)
			for i, id := range ids {
				r, ok := s.Route(id)
				if !ok {
					t.Fatalf("%q refused", id)
				}
				before[i] = r.Instance.ID
				load[r.Index]++
			}
			mean, maxLoad := float64(len(ids))/float64(n), 0
			for _, l := range load {
				maxLoad = max(maxLoad, l)
			}
			ratio := float64(maxLoad) / mean
			t.Logf("N=%d max/mean %.4f", n, ratio)
			if ratio > 1.10 {
				t.Errorf("N=%d: max/mean = %.4f > 1.10 (loads %v)", n, ratio, load)
			}

			// Remove instance `gone` (not always the last one).
			gone := (n * 7) % n
			removed := append(append([]Instance(nil), fleet[:gone]...), fleet[gone+1:n]...)
			after := routeAll(t, NewSnapshot(0, removed, SnapshotOptions{}), ids)
			checkMoves(t, "remove", ids, before, after, fleet[gone].ID, 1/float64(n), true)

			// The same instance going unhealthy is the same as its removal
			// (on a sample: it is the same computation).
			sick := append([]Instance(nil), fleet[:n]...)
			sick[gone].Healthy = false
			sample := ids[:len(ids)/10]
			if got := routeAll(t, NewSnapshot(0, sick, SnapshotOptions{}), sample); !equalStrings(got, after[:len(sample)]) {
				t.Errorf("instance %s unhealthy routes differently from its removal", fleet[gone].ID)
			}

			// Add one.
			checkMoves(t, "add", ids, before, routeAll(t, NewSnapshot(0, fleet, SnapshotOptions{}), ids), fleet[n].ID, 1/float64(n+1), false)
		})
	}
}

// checkMoves asserts that at most want+2% of IDs changed instance and that
// every move is from (fromChanged) or to (!fromChanged) the changed instance.
func checkMoves(t *testing.T, what string, ids [][]byte, before, after []string, changed string, want float64, fromChanged bool) {
	t.Helper()
	moved := 0
	for i := range ids {
		if before[i] == after[i] {
			continue
		}
		moved++
		if fromChanged && before[i] != changed {
			t.Fatalf("%s %s: %q moved from %s, which did not change", what, changed, ids[i], before[i])
		}
		if !fromChanged && after[i] != changed {
			t.Fatalf("%s %s: %q moved to %s, not to the new instance", what, changed, ids[i], after[i])
		}
	}
	frac := float64(moved) / float64(len(ids))
	if frac > want+0.02 {
		t.Errorf("%s %s: moved %.4f of IDs, want ≤ %.4f", what, changed, frac, want+0.02)
	}
}

// TestPropertyGrowShards: growing the shard count from n to n+1 moves about
// 1/(n+1) of IDs (within 2 %), every one of them into the new shard n.
func TestPropertyGrowShards(t *testing.T) {
	ids := propertyClientIDs()
	hashes := make([]uint64, len(ids))
	for i, id := range ids {
		hashes[i] = KeyHash(id)
	}
	prev := make([]int, len(ids)) // n = 1: everything in shard 0
	for n := 1; n <= 64; n++ {
		moved := 0
		load := make([]int, n+1)
		for i, h := range hashes {
			s := JumpHash(h, n+1)
			load[s]++
			if s != prev[i] {
				if s != n {
					t.Fatalf("%d→%d shards: %q moved from %d to %d, not to the new shard", n, n+1, ids[i], prev[i], s)
				}
				moved++
			}
			prev[i] = s
		}
		frac, want := float64(moved)/float64(len(ids)), 1/float64(n+1)
		if frac > want+0.02 || frac < want-0.02 {
			t.Errorf("%d→%d shards: moved %.4f, want %.4f ± 0.02", n, n+1, frac, want)
		}
		mean, maxLoad := float64(len(ids))/float64(n+1), 0
		for _, l := range load {
			maxLoad = max(maxLoad, l)
		}
		if r := float64(maxLoad) / mean; r > 1.10 {
			t.Errorf("%d shards: max/mean %.4f > 1.10", n+1, r)
		}
	}
}

// TestPropertyShardedInstanceChanges: in a sharded fleet, adding or removing
// a standby moves nothing, and a shard's failover moves exactly that
// shard's devices.
func TestPropertyShardedInstanceChanges(t *testing.T) {
	ids := propertyClientIDs()
	if testing.Short() {
		ids = ids[:20000]
	}
	const shards = 8
	var fleet []Instance
	for sh := range shards {
		fleet = append(fleet,
			Instance{ID: fmt.Sprintf("p%d", sh), Shard: sh, Priority: 0, Healthy: true},
			Instance{ID: fmt.Sprintf("s%d", sh), Shard: sh, Priority: 1, Healthy: true})
	}
	before := routeAll(t, NewSnapshot(shards, fleet, SnapshotOptions{}), ids)
	noStandby3 := append(append([]Instance(nil), fleet[:7]...), fleet[8:]...) // drop s3
	if after := routeAll(t, NewSnapshot(shards, noStandby3, SnapshotOptions{}), ids); !equalStrings(before, after) {
		t.Error("removing a standby moved devices")
	}
	failover := append([]Instance(nil), fleet...)
	failover[6].Healthy = false // p3
	after := routeAll(t, NewSnapshot(shards, failover, SnapshotOptions{}), ids)
	for i, id := range ids {
		if ShardOf(id, shards) == 3 {
			if after[i] != "s3" {
				t.Fatalf("%q of shard 3 went to %s, want the standby s3", id, after[i])
			}
		} else if after[i] != before[i] {
			t.Fatalf("%q of shard %d moved on shard 3's failover", id, ShardOf(id, shards))
		}
	}
}

func equalStrings(a, b []string) bool {
	if len(a) != len(b) {
		return false
	}
	for i := range a {
		if a[i] != b[i] {
			return false
		}
	}
	return true
}
