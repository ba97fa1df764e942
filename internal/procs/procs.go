// Package procs sets how many threads run the proxy's Go code at once
// (GOMAXPROCS) from its load: one while one keeps up, all of them when not.
//
// Each event loop parks in the runtime's network poller between wakeups.
// With more than one P, when two loops wake in the same poll the runtime
// wakes a second thread for the second loop and puts it back to sleep after
// a few microseconds of work: a futex wake, a futex sleep and two context
// switches, on every such wakeup. At light load that handoff costs more
// than the parallelism is worth: on two cores, 20k msg/s through two loops
// cost 12–15% less CPU on one thread than on two (docs/perf-notes.md).
// Under load the loops need every core, and the handoffs stop by themselves
// (a busy thread does not sleep). The Governor starts on one thread, goes to
// all of them as soon as the loops fall behind, and comes back to one when
// the whole process has used less than 0.6 of a core for 2 s.
package procs

import (
	"runtime"
	"sync"
	"sync/atomic"
	"time"

	"golang.org/x/sys/unix"
)

const (
	// sample is how often the Governor reads the process's CPU time;
	// idleSample how often while the process is nearly idle (under
	// idleBelow of a core on one thread): its wakeups are then most of
	// what an idle worker costs, and a storm out of quiet raises through
	// Hot, not through the sample.
	sample     = 250 * time.Millisecond
	idleSample = time.Second
	idleBelow  = 0.1
	// raiseAt: on one thread, CPU over one sample at or above this share
	// of a core means the thread is busy enough for wakeups to queue
	// behind each other.
	raiseAt = 0.75
	// lowerAt: on all threads, CPU below this share of a core for
	// lowerAfter samples in a row fits on one thread with room left: on
	// one thread the same work costs less than it did on all (10–15%),
	// so it stays under raiseAt and the Governor cannot swing. A raise
	// for a burst that one thread would have taken is undone this way.
	lowerAt    = 0.6
	lowerAfter = 8 // 2 s
)

// Governor moves GOMAXPROCS between 1 and a maximum. The zero value is not
// usable; see New.
type Governor struct {
	max  int
	mu   sync.Mutex // serialises moves
	cur  atomic.Int32
	cpu  func() time.Duration
	set  func(int)
	cool int // samples in a row under lowerAt
	// Raises counts the moves to the maximum, Lowers those back to 1.
	Raises, Lowers atomic.Uint64
}

// New returns a Governor between 1 and max threads, on one thread.
func New(max int) *Governor {
	g := &Governor{max: max, cpu: processCPU, set: func(n int) { runtime.GOMAXPROCS(n) }}
	g.mu.Lock()
	g.apply(1)
	g.mu.Unlock()
	return g
}

// Procs is the current GOMAXPROCS as the Governor last set it.
func (g *Governor) Procs() int { return int(g.cur.Load()) }

// Hot tells the Governor that a loop found work queued behind its thread
// (a full batch of events in one wakeup, an accept batch that did not
// empty the queue): at one thread, it goes to all of them there and then,
// in the caller, instead of at the next sample: a goroutine asked to do it
// would wait for the busy loops to let go of the one thread. At the maximum it
// costs an atomic load.
func (g *Governor) Hot() {
	if int(g.cur.Load()) >= g.max {
		return
	}
	g.mu.Lock()
	g.apply(g.max)
	g.mu.Unlock()
}

// Run samples the process's CPU and moves GOMAXPROCS until stop is closed.
func (g *Governor) Run(stop <-chan struct{}) {
	t := time.NewTimer(sample)
	defer t.Stop()
	last, at := g.cpu(), time.Now()
	for {
		select {
		case <-stop:
			return
		case now := <-t.C:
			c := g.cpu()
			next := sample
			if d := now.Sub(at); d > 0 {
				cores := float64(c-last) / float64(d)
				g.mu.Lock()
				g.observe(cores)
				g.mu.Unlock()
				if cores < idleBelow && g.Procs() == 1 {
					next = idleSample
				}
			}
			last, at = c, now
			t.Reset(next)
		}
	}
}

// observe takes the CPU used over the last sample, in cores, and moves.
// g.mu is held.
func (g *Governor) observe(cores float64) {
	if g.Procs() < g.max {
		if cores >= raiseAt {
			g.apply(g.max)
		}
		return
	}
	if cores >= lowerAt {
		g.cool = 0
		return
	}
	if g.cool++; g.cool >= lowerAfter {
		g.apply(1)
	}
}

// apply sets GOMAXPROCS to n; g.mu is held.
func (g *Governor) apply(n int) {
	g.cool = 0
	cur := int(g.cur.Load())
	switch {
	case cur == n:
		return
	case cur == 0: // New's first setting
	case n > cur:
		g.Raises.Add(1)
	default:
		g.Lowers.Add(1)
	}
	g.set(n)
	g.cur.Store(int32(n))
}

// processCPU is the user and system CPU time of the whole process so far.
func processCPU() time.Duration {
	var ru unix.Rusage
	if err := unix.Getrusage(unix.RUSAGE_SELF, &ru); err != nil {
		return 0
	}
	return time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
}
