//go:build linux

package ebpf

import (
	"math"
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"testing"

	"github.com/cilium/ebpf"
	"golang.org/x/sys/unix"
)

// fourWorkers opens 4 "workers" of 2 listeners each on one address in a
// fresh namespace, inserted and activated as generation 1; steered tags
// them by worker (least-loaded), otherwise they are plain slots (hash).
func fourWorkers(t *testing.T, steered bool) (*Steering, netip.AddrPort, [][]int) {
	t.Helper()
	enterNetns(t)
	s := openSteering(t, testPinDir(t))
	first, addr := listen(t, netip.MustParseAddrPort("127.0.0.1:0"))
	return attachFourWorkers(t, s, first, addr, steered)
}

// attachFourWorkers attaches s's program to the group of first, then opens
// and inserts the workers' listeners as fourWorkers says.
func attachFourWorkers(t *testing.T, s *Steering, first int, addr netip.AddrPort, steered bool) (*Steering, netip.AddrPort, [][]int) {
	t.Helper()
	if err := s.Attach(first); err != nil {
		privileged(t, "%v", err)
	}
	workers := [][]int{{first}, nil, nil, nil}
	var all []int
	for w := range workers {
		for len(workers[w]) < 2 {
			fd, _ := listen(t, addr)
			workers[w] = append(workers[w], fd)
		}
		all = append(all, workers[w]...)
		if steered {
			if err := s.InsertWorker(1, w, 2*w, workers[w]); err != nil {
				t.Fatal(err)
			}
		}
	}
	if steered {
		if err := s.ActivateSlots(1, 8); err != nil {
			t.Fatal(err)
		}
	} else {
		if err := s.Insert(1, all); err != nil {
			t.Fatal(err)
		}
		if err := s.Activate(1); err != nil {
			t.Fatal(err)
		}
	}
	return s, addr, workers
}

// fill opens total connections in batches of batch, accepting each batch
// per worker and (a loop tick) writing each worker's count, starting from
// start. It returns the final counts and how many of the first firstN
// connections worker 3 took.
func fill(t *testing.T, s *Steering, addr netip.AddrPort, workers [][]int, start []int, total, batch, firstN int, steered bool) (final []int, w3First int) {
	t.Helper()
	load := append([]int(nil), start...)
	tick := func() {
		if !steered {
			return
		}
		for w, n := range load {
			if err := s.SetLoad(w, n); err != nil {
				t.Fatal(err)
			}
		}
	}
	tick()
	var lns []int
	for _, l := range workers {
		lns = append(lns, l...)
	}
	per := len(workers[0])
	for done := 0; done < total; done += batch {
		dialN(t, addr, batch)
		for i, n := range counts(acceptAll(t, lns, batch)) {
			load[i/per] += n
			if i/per == 3 && done < firstN {
				w3First += n
			}
		}
		tick()
	}
	return load, w3First
}

func sum(xs []int) int {
	n := 0
	for _, x := range xs {
		n += x
	}
	return n
}

// Workers with 1000, 1000, 1000 and 0 connections (the last one just
// restarted): the empty one takes every new connection until the counts
// level, then all share; the kernel's hash alone gives it a quarter.
func TestSteeringLeastLoadedWorkers(t *testing.T) {
	start := []int{1000, 1000, 1000, 0}
	s, addr, workers := fourWorkers(t, true)
	final, first := fill(t, s, addr, workers, start, 4000, 50, 1000, true)
	t.Logf("least-loaded: counts %v → %v after 4000 connections; worker 3 took %d of the first 1000", start, final, first)
	if first != 1000 {
		t.Errorf("the empty worker took %d of the first 1000 connections, want all", first)
	}
	lo, hi := final[0], final[0]
	for _, n := range final {
		lo, hi = min(lo, n), max(hi, n)
	}
	if float64(hi-lo) > 0.10*float64(hi) {
		t.Errorf("counts %v not within 10%% of each other", final)
	}
	loads, err := s.Loads(4)
	if err != nil || loads[3] != final[3] {
		t.Errorf("Loads() = %v, %v; want %v", loads, err, final)
	}
	if err := s.SetDead(3); err != nil {
		t.Fatal(err)
	}
	if loads, _ := s.Loads(4); loads[3] != -1 {
		t.Errorf("after SetDead(3) Loads() = %v, want -1 for worker 3", loads)
	}
}

func TestSteeringHashAloneDoesNotLevel(t *testing.T) {
	start := []int{1000, 1000, 1000, 0}
	s, addr, workers := fourWorkers(t, false)
	final, first := fill(t, s, addr, workers, start, 4000, 50, 1000, false)
	t.Logf("hash only: counts %v → %v after 4000 connections; worker 3 took %d of the first 1000", start, final, first)
	if first > 500 {
		t.Errorf("with the hash alone the empty worker took %d of the first 1000, expected about 250", first)
	}
	if final[3] > final[0]-500 {
		t.Errorf("with the hash alone counts %v leveled; expected worker 3 about 1000 behind", final)
	}
}

// A dead worker's leftover slots are never chosen by load: connections go
// to the live workers, not to the kernel's fallback hash. A load pushed past
// the dead mark (the program's increment racing SetDead) still reads dead.
func TestSteeringDeadWorkerSkipped(t *testing.T) {
	s, addr, workers := fourWorkers(t, true)
	for w, n := range []int{10, 20, 30, 0} {
		if err := s.SetLoad(w, n); err != nil {
			t.Fatal(err)
		}
	}
	if err := s.SetDead(3); err != nil {
		t.Fatal(err)
	}
	if err := s.loads.Update(uint32(2), uint32(loadDead+1), 0); err != nil {
		t.Fatal(err)
	}
	dialN(t, addr, 40)
	got := perWorker(acceptAll(t, allListeners(workers), 40), len(workers[0]))
	// 10 + 25 = 20 + 15: the burst levels the two live workers.
	if want := []int{25, 15, 0, 0}; !slices.Equal(got, want) {
		t.Errorf("accepts per worker %v with workers 2 and 3 dead, want %v", got, want)
	}
	if loads, err := s.Loads(4); err != nil || !slices.Equal(loads, []int{35, 35, -1, -1}) {
		t.Errorf("Loads() = %v, %v; want [35 35 -1 -1] (dead stay dead)", loads, err)
	}
	c, err := s.Counters()
	if err != nil || c.Fallbacks != 0 {
		t.Errorf("counters %+v, %v; want no fallback", c, err)
	}
}

func allListeners(workers [][]int) []int {
	var lns []int
	for _, l := range workers {
		lns = append(lns, l...)
	}
	return lns
}

// perWorker sums accepted connections per worker of per listeners each.
func perWorker(accepted [][]int, per int) []int {
	got := make([]int, len(accepted)/per)
	for i, n := range counts(accepted) {
		got[i/per] += n
	}
	return got
}

// within reports whether every count is within frac of want.
func within(got []int, want int, frac float64) bool {
	for _, n := range got {
		if math.Abs(float64(n-want)) > frac*float64(want) {
			return false
		}
	}
	return true
}

// A reconnect storm: 400 connections with no SetLoad between them (no loop
// tick). The program counts its own choices, so they spread evenly; with the
// counts only user space writes, all 400 would see {0,0,0,0} and the hash
// would pick the worker of each one's first scanned slot.
func TestSteeringBurstSpreadsWithoutTicks(t *testing.T) {
	s, addr, workers := fourWorkers(t, true)
	for w := range workers {
		if err := s.SetLoad(w, 0); err != nil {
			t.Fatal(err)
		}
	}
	dialN(t, addr, 400)
	got := perWorker(acceptAll(t, allListeners(workers), 400), len(workers[0]))
	t.Logf("burst of 400 from {0,0,0,0}: accepts per worker %v", got)
	// Counting its choices, the program levels them to within one; the
	// hash alone spreads 400 by about ±9 (one σ) a worker.
	if sum(got) != 400 || !within(got, 100, 0.02) {
		t.Errorf("accepts per worker %v, want 100 ± 2%% each", got)
	}
	loads, err := s.Loads(4)
	if err != nil || !slices.Equal(loads, got) {
		t.Errorf("Loads() = %v, %v; want the program to have counted %v", loads, err, got)
	}
}

// A reconnect storm onto workers at {300,300,300,0} (the last one just
// restarted), with no tick: the empty worker takes the first 300, then the
// next 300 spread over all four.
func TestSteeringBurstFillsEmptyWorkerFirst(t *testing.T) {
	s, addr, workers := fourWorkers(t, true)
	start := []int{300, 300, 300, 0}
	for w, n := range start {
		if err := s.SetLoad(w, n); err != nil {
			t.Fatal(err)
		}
	}
	lns := allListeners(workers)
	dialN(t, addr, 300)
	first := perWorker(acceptAll(t, lns, 300), len(workers[0]))
	dialN(t, addr, 300)
	then := perWorker(acceptAll(t, lns, 300), len(workers[0]))
	t.Logf("burst from %v: first 300 per worker %v, next 300 %v", start, first, then)
	if !slices.Equal(first, []int{0, 0, 0, 300}) {
		t.Errorf("first 300 per worker %v, want all on the empty worker 3", first)
	}
	if sum(then) != 300 || !within(then, 75, 0.10) {
		t.Errorf("next 300 per worker %v, want 75 ± 10%% each", then)
	}
	loads, err := s.Loads(4)
	if err != nil || sum(loads) != 1500 || !within(loads, 375, 0.10) {
		t.Errorf("Loads() = %v, %v; want about 375 each", loads, err)
	}
}

// pinOlderLayout pins into dir what a version without worker steering
// pinned: the listeners, active and counters maps, and a program over them
// whose slot_worker and worker_load are its own, never pinned. It returns
// that program, still open so the caller can attach it as the older
// generation did.
func pinOlderLayout(t *testing.T, dir string) *ebpf.Program {
	t.Helper()
	if err := ensureBPFFS(filepath.Dir(dir)); err != nil {
		privileged(t, "%v", err)
	}
	if err := os.Mkdir(dir, 0o700); err != nil {
		t.Fatal(err)
	}
	spec, err := loadReuseport()
	if err != nil {
		t.Fatal(err)
	}
	replace := map[string]*ebpf.Map{}
	for _, name := range []string{pinListeners, pinActive, pinCounters} {
		m, err := ebpf.NewMap(spec.Maps[name])
		if err != nil {
			privileged(t, "create map %s: %v", name, err)
		}
		defer m.Close()
		if err := m.Pin(filepath.Join(dir, name)); err != nil {
			t.Fatal(err)
		}
		replace[name] = m
	}
	coll, err := ebpf.NewCollectionWithOptions(spec, ebpf.CollectionOptions{MapReplacements: replace})
	if err != nil {
		t.Fatal(err)
	}
	defer coll.Close()
	prog := coll.DetachProgram(pinProg)
	t.Cleanup(func() { prog.Close() })
	if err := prog.Pin(filepath.Join(dir, pinProg)); err != nil {
		t.Fatal(err)
	}
	return prog
}

func progID(t *testing.T, p *ebpf.Program) ebpf.ProgramID {
	t.Helper()
	info, err := p.Info()
	if err != nil {
		t.Fatal(err)
	}
	id, ok := info.ID()
	if !ok {
		t.Fatal("the kernel reports no program ID")
	}
	return id
}

// A pin directory left by a version without worker steering (no
// slot_worker or worker_load pinned, a program reading maps of its own) is
// upgraded in place: the missing maps are created and pinned, the program
// is replaced by this one over the pinned maps, and once the new generation
// attaches it, the group steers by the workers' loads. Before, OpenSteering
// refused the directory and the proxy fell back to the kernel's hash.
func TestSteeringUpgradesOlderPinDir(t *testing.T) {
	enterNetns(t)
	dir := testPinDir(t)
	older := pinOlderLayout(t, dir)
	first, addr := listen(t, netip.MustParseAddrPort("127.0.0.1:0"))
	// The older generation's program steers the group, as it would
	// until the next generation attaches.
	if err := unix.SetsockoptInt(first, unix.SOL_SOCKET, unix.SO_ATTACH_REUSEPORT_EBPF, older.FD()); err != nil {
		privileged(t, "SO_ATTACH_REUSEPORT_EBPF: %v", err)
	}

	s := openSteering(t, dir)
	for _, name := range []string{pinSlots, pinLoads} {
		if _, err := os.Stat(filepath.Join(dir, name)); err != nil {
			t.Errorf("map %s not pinned by the upgrade: %v", name, err)
		}
	}
	if progID(t, s.prog) == progID(t, older) {
		t.Fatal("OpenSteering kept the older program, which reads no pinned worker map")
	}
	pinned, err := ebpf.LoadPinnedProgram(filepath.Join(dir, pinProg), nil)
	if err != nil {
		t.Fatal(err)
	}
	defer pinned.Close()
	if progID(t, pinned) != progID(t, s.prog) {
		t.Error("the pinned program is not the one OpenSteering loaded")
	}
	if ents, _ := os.ReadDir(dir); len(ents) != 6 {
		t.Errorf("pin directory holds %d entries, want the program and 5 maps (no temporary left)", len(ents))
	}

	s, addr, workers := attachFourWorkers(t, s, first, addr, true)
	for w, n := range []int{300, 300, 300, 0} {
		if err := s.SetLoad(w, n); err != nil {
			t.Fatal(err)
		}
	}
	dialN(t, addr, 100)
	got := perWorker(acceptAll(t, allListeners(workers), 100), len(workers[0]))
	if !slices.Equal(got, []int{0, 0, 0, 100}) {
		t.Errorf("after the upgrade, accepts per worker %v from loads {300,300,300,0}, want all 100 on worker 3", got)
	}

	// The next generation finds the directory current and keeps its
	// program: no upgrade on every open.
	again := openSteering(t, dir)
	if progID(t, again.prog) != progID(t, s.prog) {
		t.Error("a second OpenSteering replaced an up-to-date program")
	}
}
