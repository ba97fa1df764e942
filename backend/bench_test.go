package backend

import (
	"fmt"
	"net/netip"
	"testing"
)

// Benchmarks of the hot path: go test ./backend -run '^$' -bench . -benchmem

func shardedFleet(shards, perShard int) []Instance {
	var ins []Instance
	for sh := range shards {
		for k := range perShard {
			ins = append(ins, Instance{
				ID:       fmt.Sprintf("node%d/mqtt-broker-%d", k, sh),
				Addr:     netip.AddrPortFrom(netip.AddrFrom4([4]byte{10, byte(k), byte(sh >> 8), byte(sh)}), 1883),
				Shard:    sh,
				Priority: k,
				Healthy:  true,
			})
		}
	}
	return ins
}

func benchRoute(b *testing.B, s *Snapshot) {
	ids := randomIDs(4096, 99)
	b.ReportAllocs()
	b.ResetTimer()
	for i := 0; b.Loop(); i++ {
		if _, ok := s.Route(ids[i&4095]); !ok {
			b.Fatal("refused")
		}
	}
}

func BenchmarkShardOf(b *testing.B) {
	ids := randomIDs(4096, 99)
	for _, shards := range []int{16, 1000} {
		b.Run(fmt.Sprintf("shards=%d", shards), func(b *testing.B) {
			b.ReportAllocs()
			for i := 0; b.Loop(); i++ {
				ShardOf(ids[i&4095], shards)
			}
		})
	}
}

func BenchmarkRoute(b *testing.B) {
	b.Run("sharded/shards=16", func(b *testing.B) {
		benchRoute(b, NewSnapshot(16, shardedFleet(16, 2), SnapshotOptions{}))
	})
	b.Run("sharded/shards=1000", func(b *testing.B) {
		benchRoute(b, NewSnapshot(1000, shardedFleet(1000, 2), SnapshotOptions{}))
	})
	b.Run("spill/shards=16", func(b *testing.B) {
		ins := shardedFleet(16, 2)
		for i := range ins {
			ins[i].Healthy = ins[i].Shard%2 == 1 // every other shard down: half the devices spill
		}
		benchRoute(b, NewSnapshot(16, ins, SnapshotOptions{}))
	})
	for _, n := range []int{3, 16, 64} {
		b.Run(fmt.Sprintf("no-meta/N=%d", n), func(b *testing.B) {
			benchRoute(b, NewSnapshot(0, noMetaFleet(n), SnapshotOptions{}))
		})
	}
}

func BenchmarkRouteString(b *testing.B) {
	s := NewSnapshot(16, shardedFleet(16, 2), SnapshotOptions{})
	ids := make([]string, 4096)
	for i, id := range randomIDs(4096, 99) {
		ids[i] = string(id)
	}
	b.ReportAllocs()
	for i := 0; b.Loop(); i++ {
		s.RouteString(ids[i&4095])
	}
}

func BenchmarkRouteAddr(b *testing.B) {
	s := NewSnapshot(16, shardedFleet(16, 2), SnapshotOptions{})
	addrs := []netip.Addr{netip.MustParseAddr("192.0.2.1"), netip.MustParseAddr("::ffff:192.0.2.2"), netip.MustParseAddr("2001:db8::3")}
	b.ReportAllocs()
	for i := 0; b.Loop(); i++ {
		s.RouteAddr(addrs[i%3])
	}
}

// BenchmarkRouterParallel is the proxy's view: many loops routing through
// one Router while the snapshot is swapped now and then.
func BenchmarkRouterParallel(b *testing.B) {
	s := NewSnapshot(16, shardedFleet(16, 2), SnapshotOptions{})
	r := NewRouter(s)
	ids := randomIDs(4096, 99)
	b.ReportAllocs()
	b.RunParallel(func(pb *testing.PB) {
		i := 0
		for pb.Next() {
			if i&1023 == 0 {
				r.Store(s)
			}
			r.Load().Route(ids[i&4095])
			i++
		}
	})
}

func BenchmarkNewSnapshot(b *testing.B) {
	ins := shardedFleet(64, 3)
	b.ReportAllocs()
	for b.Loop() {
		NewSnapshot(64, ins, SnapshotOptions{})
	}
}
