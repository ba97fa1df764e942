package proxy

import (
	"bytes"
	"context"
	"encoding/json"
	"log/slog"
	"math"
	"net/netip"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"
)

// admClock is a manual clock for token-bucket tests, so they never sleep.
type admClock struct{ ns atomic.Int64 }

func (c *admClock) now() time.Time          { return time.Unix(1700000000, c.ns.Load()) }
func (c *admClock) advance(d time.Duration) { c.ns.Add(int64(d)) }

func admNew(cfg AdmissionConfig, shards int) (*Admission, *admClock) {
	c := &admClock{}
	return newAdmissionClock(cfg, shards, c.now), c
}

var (
	admSrcA = netip.MustParseAddr("192.0.2.1")
	admSrcB = netip.MustParseAddr("192.0.2.2")
)

// admCount admits up to n devices to shard from distinct sources and returns
// how many got in.
func admCount(a *Admission, shard, n int) int {
	in := 0
	for i := range n {
		src := netip.AddrFrom4([4]byte{10, byte(i >> 16), byte(i >> 8), byte(i)})
		if ok, reason := a.Admit(shard, src); ok {
			in++
		} else if reason != AdmissionShardRate {
			panic("unexpected reason " + reason)
		}
	}
	return in
}

func TestAdmissionTokenBucket(t *testing.T) {
	a, clk := admNew(AdmissionConfig{Rate: 10, Burst: 5}, 4)
	if got := admCount(a, 0, 100); got != 5 {
		t.Fatalf("a full bucket admitted %d at once, want the burst 5", got)
	}
	if ok, reason := a.Admit(0, admSrcA); ok || reason != AdmissionShardRate {
		t.Fatalf("empty bucket: Admit = %v %q, want false %q", ok, reason, AdmissionShardRate)
	}
	clk.advance(99 * time.Millisecond)
	if got := admCount(a, 0, 100); got != 0 {
		t.Fatalf("99ms at 10/s admitted %d, want 0", got)
	}
	clk.advance(1 * time.Millisecond)
	if got := admCount(a, 0, 100); got != 1 {
		t.Fatalf("100ms at 10/s admitted %d, want 1", got)
	}
	// A long quiet period refills only up to the burst.
	clk.advance(time.Hour)
	if got := admCount(a, 0, 100); got != 5 {
		t.Fatalf("after an hour admitted %d at once, want the burst 5", got)
	}
}

// Over a long storm the admitted count is rate × time + burst.
func TestAdmissionStormPace(t *testing.T) {
	const rate, burst = 200.0, 50
	a, clk := admNew(AdmissionConfig{Rate: rate, Burst: burst}, 1)
	in := 0
	for range 10000 { // 10 s of attempts, 1 per ms per "device", 3 devices per ms
		in += admCount(a, 0, 3)
		clk.advance(time.Millisecond)
	}
	want := int(rate*10) + burst
	if in < want-1 || in > want+1 {
		t.Fatalf("10s storm at %v/s, burst %d: admitted %d, want %d", rate, burst, in, want)
	}
}

func TestAdmissionBurstDefault(t *testing.T) {
	for _, tc := range []struct {
		rate float64
		want int
	}{
		{10, 10}, {0.5, 1}, {2.5, 2}, {1, 1},
	} {
		a, _ := admNew(AdmissionConfig{Rate: tc.rate}, 1)
		if got := admCount(a, 0, 100); got != tc.want {
			t.Errorf("rate %v, burst unset: admitted %d at once, want %d", tc.rate, got, tc.want)
		}
	}
}

func TestAdmissionUnlimited(t *testing.T) {
	a, _ := admNew(AdmissionConfig{}, 3)
	if got := admCount(a, 1, 100000); got != 100000 {
		t.Fatalf("rate 0 admitted %d of 100000", got)
	}
	if a.Sources() != 0 {
		t.Fatalf("no per-source limit but %d sources tracked", a.Sources())
	}
}

func TestAdmissionShardsIndependent(t *testing.T) {
	a, _ := admNew(AdmissionConfig{Rate: 1, Burst: 3}, 3)
	if got := admCount(a, 0, 10); got != 3 {
		t.Fatalf("shard 0 admitted %d, want 3", got)
	}
	if got := admCount(a, 1, 10); got != 3 {
		t.Fatalf("shard 1 admitted %d after shard 0 ran dry, want its own 3", got)
	}
	// Unsharded (-1) and out-of-range shards share one bucket of their own.
	if got := admCount(a, -1, 2); got != 2 {
		t.Fatalf("shard -1 admitted %d, want 2", got)
	}
	if got := admCount(a, 3, 10); got != 1 {
		t.Fatalf("shard 3 (out of range) admitted %d, want the shared bucket's last 1", got)
	}
	if got := admCount(a, 2, 10); got != 3 {
		t.Fatalf("shard 2 admitted %d, want 3", got)
	}
}

func TestAdmissionSourceLimit(t *testing.T) {
	a, _ := admNew(AdmissionConfig{PerSourceMax: 2}, 1)
	for i := range 2 {
		if ok, _ := a.Admit(0, admSrcA); !ok {
			t.Fatalf("connection %d from A refused", i)
		}
	}
	if ok, reason := a.Admit(0, admSrcA); ok || reason != AdmissionSourceLimit {
		t.Fatalf("third from A: %v %q, want false %q", ok, reason, AdmissionSourceLimit)
	}
	// The same host seen through a dual-stack listener is the same source.
	if ok, _ := a.Admit(0, netip.AddrFrom16(admSrcA.As16())); ok {
		t.Fatal("IPv4-mapped A admitted past A's limit")
	}
	if ok, _ := a.Admit(0, admSrcB); !ok {
		t.Fatal("B refused because of A")
	}
	a.Release(admSrcA)
	if ok, _ := a.Admit(0, admSrcA); !ok {
		t.Fatal("A refused after one of its connections closed")
	}
	// An unknown peer address is not limited per source.
	for range 5 {
		if ok, _ := a.Admit(0, netip.Addr{}); !ok {
			t.Fatal("invalid source refused")
		}
		a.Release(netip.Addr{})
	}
	a.Release(admSrcA)
	a.Release(netip.AddrFrom16(admSrcA.As16()))
	a.Release(admSrcB)
	if n := a.Sources(); n != 0 {
		t.Fatalf("%d sources tracked after every connection closed, want 0", n)
	}
	// A stray Release (never admitted) does not go negative and lend slots.
	a.Release(admSrcA)
	for i := range 2 {
		if ok, _ := a.Admit(0, admSrcA); !ok {
			t.Fatalf("connection %d from A refused", i)
		}
	}
	if ok, _ := a.Admit(0, admSrcA); ok {
		t.Fatal("stray Release raised A's limit")
	}
}

// The source limit is checked before a token is taken; a token refusal does
// not leave the source counted.
func TestAdmissionOrder(t *testing.T) {
	a, clk := admNew(AdmissionConfig{Rate: 1, Burst: 1, PerSourceMax: 1}, 1)
	if ok, _ := a.Admit(0, admSrcA); !ok {
		t.Fatal("first device refused")
	}
	clk.advance(time.Second) // one token back
	if ok, reason := a.Admit(0, admSrcA); ok || reason != AdmissionSourceLimit {
		t.Fatalf("A at its limit: %v %q, want %q", ok, reason, AdmissionSourceLimit)
	}
	// A's refusal did not spend the token: B gets it.
	if ok, reason := a.Admit(0, admSrcB); !ok {
		t.Fatalf("B refused (%s): the source-limited attempt spent the token", reason)
	}
	// Bucket empty now: C is refused for rate and must not stay counted.
	srcC := netip.MustParseAddr("2001:db8::c")
	if ok, reason := a.Admit(0, srcC); ok || reason != AdmissionShardRate {
		t.Fatalf("C: %v %q, want %q", ok, reason, AdmissionShardRate)
	}
	if n := a.Sources(); n != 2 {
		t.Fatalf("%d sources tracked, want 2 (A, B; not the refused C)", n)
	}
	clk.advance(time.Second)
	if ok, reason := a.Admit(0, srcC); !ok {
		t.Fatalf("C refused (%s) once a token is back", reason)
	}
}

// The per-source table holds the sources connected now, not every device
// ever seen.
func TestAdmissionSourceTableShrinks(t *testing.T) {
	a, _ := admNew(AdmissionConfig{PerSourceMax: 3}, 1)
	var srcs []netip.Addr
	for i := range 50000 {
		src := netip.AddrFrom4([4]byte{10, byte(i >> 16), byte(i >> 8), byte(i)})
		if i%2 == 1 {
			src = netip.AddrFrom16([16]byte{0x20, 0x01, 0x0d, 0xb8, 14: byte(i >> 8), 15: byte(i)})
		}
		if ok, reason := a.Admit(0, src); !ok {
			t.Fatalf("device %d refused: %s", i, reason)
		}
		srcs = append(srcs, src)
	}
	if n := a.Sources(); n != len(srcs) {
		t.Fatalf("%d sources tracked, want %d", n, len(srcs))
	}
	perStripe := map[uint32]int{}
	for _, s := range srcs {
		perStripe[admStripeOf(s)]++
	}
	if len(perStripe) != admStripes {
		t.Errorf("sources fell into %d of %d stripes", len(perStripe), admStripes)
	}
	for _, s := range srcs {
		a.Release(s)
	}
	if n := a.Sources(); n != 0 {
		t.Fatalf("%d sources tracked after all closed, want 0", n)
	}
}

// Loops on every core admit at once: the bucket hands out exactly its burst
// and the source counts balance.
func TestAdmissionConcurrent(t *testing.T) {
	a, _ := admNew(AdmissionConfig{Rate: 1, Burst: 1000, PerSourceMax: 1000000}, 2)
	var in atomic.Int64
	var wg sync.WaitGroup
	for g := range 8 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := range 1000 {
				src := netip.AddrFrom4([4]byte{10, byte(g), byte(i >> 8), byte(i % 7)})
				if ok, _ := a.Admit(0, src); ok {
					in.Add(1)
					a.Release(src)
				}
			}
		}()
	}
	wg.Wait()
	if in.Load() != 1000 {
		t.Fatalf("8×1000 concurrent attempts at an instant admitted %d, want the burst 1000", in.Load())
	}
	if n := a.Sources(); n != 0 {
		t.Fatalf("%d sources left tracked", n)
	}
}

func TestAdmissionReconfigure(t *testing.T) {
	a, _ := admNew(AdmissionConfig{Rate: 1, Burst: 1, PerSourceMax: 1}, 1)
	if ok, _ := a.Admit(0, admSrcA); !ok {
		t.Fatal("refused")
	}
	a.Reconfigure(AdmissionConfig{Rate: 100, Burst: 10, PerSourceMax: 2}, 4)
	if got := admCount(a, 3, 100); got != 10 {
		t.Fatalf("after reload shard 3 admitted %d, want 10", got)
	}
	// A's count survived the reload: one more slot, not two.
	if ok, _ := a.Admit(0, admSrcA); !ok {
		t.Fatal("A refused below its new limit")
	}
	if ok, reason := a.Admit(0, admSrcA); ok || reason != AdmissionSourceLimit {
		t.Fatalf("A past its new limit: %v %q", ok, reason)
	}
	a.Reconfigure(AdmissionConfig{}, 4)
	if got := admCount(a, 0, 1000); got != 1000 {
		t.Fatalf("unlimited after reload admitted %d", got)
	}
}

func TestAdmissionConfigValidate(t *testing.T) {
	for _, tc := range []struct {
		cfg  AdmissionConfig
		want string // "" = valid
	}{
		{AdmissionConfig{}, ""},
		{AdmissionConfig{Rate: 0.1, Burst: 3, PerSourceMax: 10}, ""},
		{AdmissionConfig{Rate: -1}, "rate"},
		{AdmissionConfig{Rate: math.NaN()}, "rate"},
		{AdmissionConfig{Rate: math.Inf(1)}, "rate"},
		{AdmissionConfig{Burst: -1}, "burst"},
		{AdmissionConfig{PerSourceMax: -2}, "per-source"},
	} {
		err := tc.cfg.Validate()
		if (err == nil) != (tc.want == "") || (err != nil && !strings.Contains(err.Error(), tc.want)) {
			t.Errorf("Validate(%+v) = %v, want error mentioning %q", tc.cfg, err, tc.want)
		}
	}
}

func TestAdmissionNoAlloc(t *testing.T) {
	a := NewAdmission(AdmissionConfig{Rate: 1e6, Burst: 1 << 30, PerSourceMax: 10}, 8)
	srcs := make([]netip.Addr, 256)
	for i := range srcs {
		srcs[i] = netip.AddrFrom4([4]byte{10, 0, byte(i >> 8), byte(i)})
	}
	i := 0
	step := func() {
		src := srcs[i%len(srcs)]
		i++
		if ok, _ := a.Admit(i%8, src); ok {
			a.Release(src)
		}
	}
	for range 10000 { // let the maps reach their working size
		step()
	}
	if n := testing.AllocsPerRun(10000, step); n != 0 {
		t.Fatalf("Admit+Release: %v allocs per op in steady state, want 0", n)
	}
}

func BenchmarkAdmission(b *testing.B) {
	srcs := make([]netip.Addr, 4096)
	for i := range srcs {
		srcs[i] = netip.AddrFrom4([4]byte{10, 0, byte(i >> 8), byte(i)})
	}
	for _, bc := range []struct {
		name string
		cfg  AdmissionConfig
	}{
		{"unlimited", AdmissionConfig{}},
		{"rate", AdmissionConfig{Rate: 1e9, Burst: 1 << 30}},
		{"rate+source", AdmissionConfig{Rate: 1e9, Burst: 1 << 30, PerSourceMax: 10}},
	} {
		b.Run(bc.name, func(b *testing.B) {
			a := NewAdmission(bc.cfg, 16)
			b.ReportAllocs()
			i := 0
			for b.Loop() {
				src := srcs[i&4095]
				i++
				if ok, _ := a.Admit(i&15, src); ok {
					a.Release(src)
				}
			}
		})
		b.Run(bc.name+"/parallel", func(b *testing.B) {
			a := NewAdmission(bc.cfg, 16)
			b.ReportAllocs()
			var seq atomic.Int64
			b.RunParallel(func(pb *testing.PB) {
				i := int(seq.Add(1)) * 1000
				for pb.Next() {
					src := srcs[i&4095]
					i++
					if ok, _ := a.Admit(i&15, src); ok {
						a.Release(src)
					}
				}
			})
		})
	}
}

func TestSampledLog(t *testing.T) {
	var buf bytes.Buffer
	s := NewSampledLog(slog.New(slog.NewJSONHandler(&buf, nil)), time.Second)
	clk := &admClock{}
	s.now = clk.now
	ctx := context.Background()
	lines := func() []map[string]any {
		var out []map[string]any
		for line := range strings.Lines(buf.String()) {
			var m map[string]any
			if err := json.Unmarshal([]byte(line), &m); err != nil {
				t.Fatalf("log line %q: %v", line, err)
			}
			out = append(out, m)
		}
		buf.Reset()
		return out
	}

	for i := range 100 {
		s.Log(ctx, slog.LevelWarn, AdmissionShardRate, "device refused", "shard", 2, "i", i)
		clk.advance(5 * time.Millisecond) // 100 refusals in 0.5 s
	}
	s.Log(ctx, slog.LevelWarn, AdmissionSourceLimit, "device refused", "source", "192.0.2.1")
	got := lines()
	if len(got) != 2 {
		t.Fatalf("%d lines for 100 refusals of one reason and 1 of another in 0.5s, want 2: %v", len(got), got)
	}
	if got[0]["reason"] != AdmissionShardRate || got[0]["i"] != 0.0 || got[0]["shard"] != 2.0 || got[0]["suppressed"] != nil {
		t.Errorf("first line %v", got[0])
	}
	if got[1]["reason"] != AdmissionSourceLimit || got[1]["suppressed"] != nil {
		t.Errorf("other reason's line %v", got[1])
	}

	clk.advance(600 * time.Millisecond) // a second after the first line
	s.Log(ctx, slog.LevelWarn, AdmissionShardRate, "device refused", "shard", 2)
	got = lines()
	if len(got) != 1 || got[0]["suppressed"] != 99.0 {
		t.Fatalf("next line after the interval: %v, want suppressed=99", got)
	}
	clk.advance(time.Second)
	s.Log(ctx, slog.LevelWarn, AdmissionShardRate, "device refused")
	if got = lines(); len(got) != 1 || got[0]["suppressed"] != nil {
		t.Fatalf("line after a quiet interval: %v, want no suppressed count", got)
	}

	// Disabled level: nothing written, nothing counted.
	s.Log(ctx, slog.LevelDebug, "debug", "x")
	if got = lines(); len(got) != 0 {
		t.Fatalf("debug line written: %v", got)
	}

	if ok, _ := s.Allow("fresh"); !ok {
		t.Fatal("first Allow of a reason refused")
	}
	if ok, _ := s.Allow("fresh"); ok {
		t.Fatal("second Allow within the interval allowed")
	}
	clk.advance(time.Second)
	if ok, n := s.Allow("fresh"); !ok || n != 1 {
		t.Fatalf("Allow after the interval = %v %d, want true 1", ok, n)
	}
}

func BenchmarkSampledLogSuppressed(b *testing.B) {
	s := NewSampledLog(slog.New(slog.NewTextHandler(&bytes.Buffer{}, nil)), time.Hour)
	s.Allow(AdmissionShardRate)
	b.ReportAllocs()
	for b.Loop() {
		if ok, _ := s.Allow(AdmissionShardRate); ok {
			b.Fatal("allowed within the interval")
		}
	}
}
