package procs

import (
	"sync/atomic"
	"testing"
	"time"
)

// governor returns a Governor between 1 and max that records what it sets
// instead of touching the runtime.
func governor(max int) (*Governor, *[]int) {
	var sets []int
	g := &Governor{max: max, cpu: func() time.Duration { return 0 }, set: func(n int) { sets = append(sets, n) }}
	g.mu.Lock()
	g.apply(1)
	g.mu.Unlock()
	return g, &sets
}

func (g *Governor) feed(cores ...float64) {
	for _, c := range cores {
		g.mu.Lock()
		g.observe(c)
		g.mu.Unlock()
	}
}

func TestGovernorRaisesOnLoad(t *testing.T) {
	g, sets := governor(4)
	if g.Procs() != 1 || len(*sets) != 1 || (*sets)[0] != 1 {
		t.Fatalf("start: procs %d, sets %v; want one thread", g.Procs(), *sets)
	}
	g.feed(0.2, 0.5, 0.74)
	if g.Procs() != 1 {
		t.Fatalf("raised at %d threads under 0.75 of a core", g.Procs())
	}
	g.feed(0.8)
	if g.Procs() != 4 || (*sets)[len(*sets)-1] != 4 || g.Raises.Load() != 1 {
		t.Fatalf("after 0.8 of a core: procs %d, sets %v, raises %d; want 4", g.Procs(), *sets, g.Raises.Load())
	}
}

func TestGovernorLowersAfterQuietWhile(t *testing.T) {
	g, sets := governor(2)
	g.Hot()
	if g.Procs() != 2 || g.Raises.Load() != 1 {
		t.Fatalf("Hot at one thread: procs %d, raises %d", g.Procs(), g.Raises.Load())
	}
	// A busy sample in the middle starts the count again.
	g.feed(0.3, 0.3, 0.3, 0.3, 0.3, 0.65)
	g.feed(0.3, 0.3, 0.3, 0.3, 0.3, 0.3, 0.3)
	if g.Procs() != 2 {
		t.Fatalf("lowered after 7 quiet samples (%v)", *sets)
	}
	g.feed(0.3)
	if g.Procs() != 1 || g.Lowers.Load() != 1 {
		t.Fatalf("after 8 quiet samples: procs %d, lowers %d", g.Procs(), g.Lowers.Load())
	}
	// Between lowerAt and raiseAt it stays where it is, either way: the
	// same load costs less on one thread than on two, so it cannot swing.
	g.feed(0.65, 0.7, 0.65)
	if g.Procs() != 1 {
		t.Fatalf("raised at %d under 0.75", g.Procs())
	}
	n := len(*sets)
	g.Hot()
	g.Hot()
	if g.Procs() != 2 || len(*sets) != n+1 {
		t.Fatalf("two Hot calls: procs %d, sets %v; want one move to 2", g.Procs(), (*sets)[n:])
	}
}

func TestGovernorRunSamplesProcessCPU(t *testing.T) {
	g, _ := governor(2)
	var used time.Duration
	start := time.Now()
	// Two cores' worth of CPU per second of wall time.
	g.cpu = func() time.Duration { used = 2 * time.Since(start); return used }
	stop := make(chan struct{})
	done := make(chan struct{})
	go func() { g.Run(stop); close(done) }()
	deadline := time.Now().Add(10 * sample)
	for g.Procs() != 2 && time.Now().Before(deadline) {
		time.Sleep(sample / 5)
	}
	close(stop)
	<-done
	if g.Procs() != 2 {
		t.Fatalf("Run did not raise under two cores of CPU")
	}
}

func TestProcessCPUMoves(t *testing.T) {
	a := processCPU()
	for x, end := 0, time.Now().Add(50*time.Millisecond); time.Now().Before(end); x++ {
		_ = x * x
	}
	if b := processCPU(); b <= a {
		t.Fatalf("process CPU did not move over 50 ms of spinning: %v then %v", a, b)
	}
}

// TestGovernorRunSamplesIdleSlowly: with the process idle on one thread,
// the samples come a second apart instead of every 250 ms.
func TestGovernorRunSamplesIdleSlowly(t *testing.T) {
	g, _ := governor(2)
	var calls atomic.Int64
	g.cpu = func() time.Duration { calls.Add(1); return 0 }
	stop := make(chan struct{})
	done := make(chan struct{})
	go func() { g.Run(stop); close(done) }()
	time.Sleep(sample + idleSample + sample/2)
	close(stop)
	<-done
	// The start, the first sample at 250 ms, the next a second later.
	if n := calls.Load(); n > 3 {
		t.Errorf("%d CPU reads in %v of an idle process, want 3", n, sample+idleSample+sample/2)
	}
	if g.Procs() != 1 {
		t.Errorf("idle: %d threads", g.Procs())
	}
}
