//go:build linux

package ebpf

import (
	"fmt"

	"github.com/cilium/ebpf"
)

// MaxWorkers is how many worker processes one steering can balance
// (MAX_WORKERS in reuseport.c).
const MaxWorkers = 64

// loadDead is LOAD_DEAD in reuseport.c: a worker whose load is this or
// more is never picked by load (its listeners are gone or going). The
// program's own increments can push a dead worker's load past it, never
// back to a small count.
const loadDead = 1 << 31

// InsertWorker puts worker's listening sockets fds into generation gen's
// slots first .. first+len(fds)-1 and tags them with the worker, so the
// program balances new connections over workers by their SetLoad counts.
// Each worker process inserts its own listeners at its own offset (worker
// × listeners per worker); one of them activates the generation with
// ActivateSlots once the slot range is final. They take no connection until
// then.
func (s *Steering) InsertWorker(gen uint32, worker, first int, fds []int) error {
	if worker < 0 || worker >= MaxWorkers {
		return fmt.Errorf("steering: worker %d, want 0 to %d", worker, MaxWorkers-1)
	}
	if len(fds) == 0 || first < 0 || first+len(fds) > MaxListenersPerGen {
		return fmt.Errorf("steering: listeners %d..%d, want within 0..%d", first, first+len(fds)-1, MaxListenersPerGen-1)
	}
	base := (gen%2)*MaxListenersPerGen + uint32(first)
	for i, fd := range fds {
		// Tag first: a slot is never selected by load with another
		// worker's tag.
		if err := s.slots.Update(base+uint32(i), uint32(worker+1), ebpf.UpdateAny); err != nil {
			return fmt.Errorf("steering: tag listener %d of worker %d: %w", i, worker, err)
		}
		if err := s.listeners.Update(base+uint32(i), uint64(fd), ebpf.UpdateAny); err != nil {
			return fmt.Errorf("steering: insert listener %d of worker %d, generation %d: %w", i, worker, gen, err)
		}
	}
	s.mu.Lock()
	if n := first + len(fds); n > s.inserted[gen] {
		s.inserted[gen] = n
	}
	s.mu.Unlock()
	return nil
}

// ActivateSlots makes gen the active generation over its first n slots,
// whichever processes inserted them (the workers' supervisor, or the last
// worker to insert). Empty slots are skipped by the program.
func (s *Steering) ActivateSlots(gen uint32, n int) error {
	if n <= 0 || n > MaxListenersPerGen {
		return fmt.Errorf("steering: %d slots, want 1 to %d", n, MaxListenersPerGen)
	}
	s.mu.Lock()
	s.inserted[gen] = n
	s.mu.Unlock()
	return s.Activate(gen)
}

// SetLoad records worker's connection count for the program: one map
// write, meant for once per loop tick, not per connection. Between two
// calls the program adds 1 for each connection it steers to the worker, so
// a burst spreads over the workers; SetLoad overwrites that estimate with
// the true count, which also accounts for the connections that closed.
func (s *Steering) SetLoad(worker int, conns int) error {
	if worker < 0 || worker >= MaxWorkers {
		return fmt.Errorf("steering: worker %d, want 0 to %d", worker, MaxWorkers-1)
	}
	v := uint32(min(max(conns, 0), loadDead-1))
	if err := s.loads.Update(uint32(worker), v, ebpf.UpdateAny); err != nil {
		return fmt.Errorf("steering: load of worker %d: %w", worker, err)
	}
	return nil
}

// SetDead excludes worker from least-loaded selection until its next
// SetLoad: its supervisor calls it when the worker process exits, so the
// empty slots it left do not look least loaded (the program would then
// fall back to the hash for every connection).
func (s *Steering) SetDead(worker int) error {
	if worker < 0 || worker >= MaxWorkers {
		return fmt.Errorf("steering: worker %d, want 0 to %d", worker, MaxWorkers-1)
	}
	if err := s.loads.Update(uint32(worker), uint32(loadDead), ebpf.UpdateAny); err != nil {
		return fmt.Errorf("steering: mark worker %d dead: %w", worker, err)
	}
	return nil
}

// Loads returns the first n workers' counts as the program sees them (the
// last SetLoad plus the connections steered since); a dead worker's is -1.
func (s *Steering) Loads(n int) ([]int, error) {
	out := make([]int, n)
	for w := range out {
		var v uint32
		if err := s.loads.Lookup(uint32(w), &v); err != nil {
			return nil, fmt.Errorf("steering: load of worker %d: %w", w, err)
		}
		out[w] = int(v)
		if v >= loadDead {
			out[w] = -1
		}
	}
	return out, nil
}
