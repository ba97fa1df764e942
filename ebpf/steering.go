//go:build linux

package ebpf

import (
	"errors"
	"fmt"
	"math/rand/v2"
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"

	"github.com/cilium/ebpf"
	"golang.org/x/sys/unix"
)

// MaxListenersPerGen is how many listeners of one address one generation
// can insert (MAX_PER_GEN in reuseport.c). The sockarray holds two
// generations: generation g uses slots (g%2)*MaxListenersPerGen onwards.
const MaxListenersPerGen = 128

// DefaultPinBase is where the proxy pins its steering by default.
const DefaultPinBase = "/sys/fs/bpf/shardgate"

// Pin names inside a steering's pin directory.
const (
	pinProg      = "select_active"
	pinListeners = "listeners"
	pinActive    = "active"
	pinCounters  = "counters"
	pinSlots     = "slot_worker"
	pinLoads     = "worker_load"
)

// Counter indexes in the per-CPU counters map (CNT_* in reuseport.c).
const (
	cntSelections = iota
	cntMigrations
	cntFallbacks
	cntMax
)

// Counters are the program's counts since its maps were created.
type Counters struct {
	Selections uint64 // new connections sent to the active generation
	Migrations uint64 // requests moved off a closing listener to it
	Fallbacks  uint64 // left to the kernel's hash (no active listener)
}

// Steering is the SK_REUSEPORT program and maps of one listen address,
// pinned in bpffs so every proxy generation of that address shares them.
type Steering struct {
	pinDir    string
	prog      *ebpf.Program
	listeners *ebpf.Map
	active    *ebpf.Map
	counters  *ebpf.Map
	slots     *ebpf.Map // slot → worker+1 (workers.go)
	loads     *ebpf.Map // worker → connection count (workers.go)

	mu       sync.Mutex
	inserted map[uint32]int // generation → listeners inserted by this process
}

// PinDirFor is the pin directory of the steering of addr under base: the
// same config gives the same directory, so the next generation finds it.
// bpffs refuses names with a dot, so dots and colons become underscores.
func PinDirFor(base string, addr netip.AddrPort) string {
	family := "tcp4-"
	if addr.Addr().Is6() && !addr.Addr().Is4In6() {
		family = "tcp6-"
	}
	ip := strings.NewReplacer(".", "_", ":", "_").Replace(addr.Addr().Unmap().String())
	return filepath.Join(base, family+ip+"-"+strconv.Itoa(int(addr.Port())))
}

// OpenSteering opens the steering pinned at pinDir, or creates it. Creation
// is atomic: everything is pinned into a temporary directory next to pinDir
// and renamed into place, so a concurrent or crashed opener never leaves a
// half-made directory; if another process wins the rename, its steering is
// opened instead. bpffs is mounted at /sys/fs/bpf if pinDir is under it and
// nothing is mounted there. A steering pinned by another version is brought
// up to this one in place when its listeners, active and counters maps fit
// this program: the maps it lacks are created and this program replaces the
// pinned one (it takes over the group at the next Attach).
func OpenSteering(pinDir string) (*Steering, error) {
	s, err := openPinned(pinDir, true)
	if err == nil || !errors.Is(err, os.ErrNotExist) {
		return s, err
	}
	parent := filepath.Dir(pinDir)
	if err := ensureBPFFS(parent); err != nil {
		return nil, err
	}
	tmp, err := os.MkdirTemp(parent, "tmp-"+filepath.Base(pinDir)+"-") // no dots: bpffs
	if err != nil {
		return nil, fmt.Errorf("steering: %w", err)
	}
	defer os.RemoveAll(tmp) // empty after a successful rename's source is gone

	var objs reuseportObjects
	if err := loadReuseportObjects(&objs, nil); err != nil {
		return nil, fmt.Errorf("steering: load: %w", err)
	}
	defer objs.Close() // the pins keep them; openPinned takes fresh fds
	pins := []struct {
		name string
		pin  func(string) error
	}{
		{pinProg, objs.SelectActive.Pin},
		{pinListeners, objs.Listeners.Pin},
		{pinActive, objs.Active.Pin},
		{pinCounters, objs.Counters.Pin},
		{pinSlots, objs.SlotWorker.Pin},
		{pinLoads, objs.WorkerLoad.Pin},
	}
	for _, p := range pins {
		if err := p.pin(filepath.Join(tmp, p.name)); err != nil {
			return nil, fmt.Errorf("steering: pin %s: %w", p.name, err)
		}
	}
	if err := os.Rename(tmp, pinDir); err != nil {
		if !errors.Is(err, unix.EEXIST) && !errors.Is(err, unix.ENOTEMPTY) {
			return nil, fmt.Errorf("steering: %w", err)
		}
		// Another process created it first: use theirs.
	}
	return openPinned(pinDir, true)
}

// openPinned opens the pins of an existing steering, checking they match
// this binary's program; an error wrapping os.ErrNotExist means there is
// none. With upgrade, a steering pinned by another version whose maps this
// program can share is brought up to this version in place (see upgrade);
// without it (PruneStale, which only reads the active generation and the
// listeners), maps this program added may be missing and stay nil.
func openPinned(pinDir string, upgrade bool) (s *Steering, err error) {
	if _, err := os.Stat(pinDir); err != nil {
		return nil, fmt.Errorf("steering: %w", err)
	}
	spec, err := loadReuseport()
	if err != nil {
		return nil, fmt.Errorf("steering: %w", err)
	}
	s = &Steering{pinDir: pinDir, inserted: make(map[uint32]int)}
	defer func() {
		if err != nil {
			s.Close()
			s = nil
		}
	}()
	if s.prog, err = ebpf.LoadPinnedProgram(filepath.Join(pinDir, pinProg), nil); err != nil {
		return s, fmt.Errorf("steering: %w", err)
	}
	for _, m := range []struct {
		name string
		dst  **ebpf.Map
		// added: a map only worker steering reads, which an older
		// version did not pin; a fresh one (no worker tags, no loads)
		// steers as that version did.
		added bool
	}{{pinListeners, &s.listeners, false}, {pinActive, &s.active, false}, {pinCounters, &s.counters, false}, {pinSlots, &s.slots, true}, {pinLoads, &s.loads, true}} {
		path := filepath.Join(pinDir, m.name)
		*m.dst, err = ebpf.LoadPinnedMap(path, nil)
		if errors.Is(err, os.ErrNotExist) && m.added {
			if !upgrade {
				err = nil
				continue
			}
			*m.dst, err = pinNewMap(spec.Maps[m.name], path)
		}
		if err != nil {
			if errors.Is(err, os.ErrNotExist) {
				// The directory exists but lacks a map the program
				// cannot do without: pinned by another version. %v,
				// not %w: this is no "no steering here" for
				// OpenSteering.
				return s, fmt.Errorf("steering: pinned map %s missing in %s, pinned by another version (remove the directory): %v", m.name, pinDir, err)
			}
			return s, fmt.Errorf("steering: %w", err)
		}
		if err = spec.Maps[m.name].Compatible(*m.dst); err != nil {
			return s, fmt.Errorf("steering: pinned map %s in %s is from another version (remove the directory): %w", m.name, pinDir, err)
		}
	}
	if upgrade {
		if err = s.upgrade(spec); err != nil {
			return s, err
		}
	}
	return s, nil
}

// pinNewMap creates a map from spec and pins it at path, or opens the one
// another process pinned there first (a pin never replaces an existing
// file), so concurrent upgraders end up sharing one map.
func pinNewMap(spec *ebpf.MapSpec, path string) (*ebpf.Map, error) {
	m, err := ebpf.NewMap(spec)
	if err != nil {
		return nil, fmt.Errorf("create map %s: %w", spec.Name, err)
	}
	err = m.Pin(path)
	if err == nil {
		return m, nil
	}
	m.Close()
	if !errors.Is(err, os.ErrExist) {
		return nil, fmt.Errorf("pin map %s: %w", spec.Name, err)
	}
	return ebpf.LoadPinnedMap(path, nil)
}

// upgrade makes the pinned program this binary's program over the pinned
// maps. A directory pinned by an older version holds that version's
// program, whose instructions differ, or which reads maps of its own that
// were never pinned (those pinNewMap just created are not the ones it
// reads): new maps are useless to it. So load this program against the
// pinned maps and compare it with the pinned one by tag (the kernel's hash
// of the instructions, map references masked) and by the maps it uses; if
// either differs, pin the new program in place of the old one through a
// temporary name and a rename, so the pin is never missing. The old
// program stays attached to the listeners' reuseport group until the
// generation opening this steering attaches its own (Attach, which every
// generation does): SO_ATTACH_REUSEPORT_EBPF replaces the group's program,
// and both steer through the same listeners and active maps meanwhile.
func (s *Steering) upgrade(spec *ebpf.CollectionSpec) error {
	coll, err := ebpf.NewCollectionWithOptions(spec, ebpf.CollectionOptions{MapReplacements: map[string]*ebpf.Map{
		pinListeners: s.listeners, pinActive: s.active, pinCounters: s.counters, pinSlots: s.slots, pinLoads: s.loads,
	}})
	if err != nil {
		return fmt.Errorf("steering: load against the maps pinned in %s: %w", s.pinDir, err)
	}
	prog := coll.DetachProgram(pinProg)
	coll.Close() // the maps are clones of s's; prog keeps its own references
	if prog == nil {
		return fmt.Errorf("steering: program %s missing", pinProg)
	}
	same, err := sameProgram(s.prog, prog)
	if err != nil || same {
		prog.Close()
		return err
	}
	tmp := filepath.Join(s.pinDir, fmt.Sprintf("tmp-%s-%d-%d", pinProg, os.Getpid(), rand.Uint64())) // no dots: bpffs
	if err := prog.Pin(tmp); err != nil {
		prog.Close()
		return fmt.Errorf("steering: pin upgraded program: %w", err)
	}
	if err := os.Rename(tmp, filepath.Join(s.pinDir, pinProg)); err != nil {
		os.Remove(tmp)
		prog.Close()
		return fmt.Errorf("steering: replace the pinned program: %w", err)
	}
	s.prog.Close()
	s.prog = prog
	return nil
}

// sameProgram reports whether a and b have the same instructions and use
// the same maps.
func sameProgram(a, b *ebpf.Program) (bool, error) {
	ai, err := a.Info()
	if err != nil {
		return false, fmt.Errorf("steering: pinned program: %w", err)
	}
	bi, err := b.Info()
	if err != nil {
		return false, fmt.Errorf("steering: program: %w", err)
	}
	am, aok := ai.MapIDs()
	bm, bok := bi.MapIDs()
	if !aok || !bok {
		return false, errors.New("steering: the kernel reports no map IDs of programs")
	}
	slices.Sort(am)
	slices.Sort(bm)
	return ai.Tag == bi.Tag && slices.Equal(am, bm), nil
}

// ensureBPFFS makes dir (and its parents) on a bpffs, mounting bpffs at
// /sys/fs/bpf first if dir is under it and it is not mounted.
func ensureBPFFS(dir string) error {
	const root = "/sys/fs/bpf"
	if strings.HasPrefix(filepath.Clean(dir)+"/", root+"/") && !isBPFFS(root) {
		if err := os.MkdirAll(root, 0o700); err != nil {
			return fmt.Errorf("steering: %w", err)
		}
		if err := unix.Mount("bpf", root, "bpf", 0, "mode=0700"); err != nil {
			return fmt.Errorf("steering: mount bpffs at %s: %w", root, err)
		}
	}
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return fmt.Errorf("steering: %w", err)
	}
	if !isBPFFS(dir) {
		return fmt.Errorf("steering: %s is not on a bpffs", dir)
	}
	return nil
}

func isBPFFS(path string) bool {
	var st unix.Statfs_t
	return unix.Statfs(path, &st) == nil && st.Type == unix.BPF_FS_MAGIC
}

// PinDir returns the steering's pin directory.
func (s *Steering) PinDir() string { return s.pinDir }

// Attach attaches the program to the SO_REUSEPORT group of listenerFD
// (SO_ATTACH_REUSEPORT_EBPF). The program belongs to the group, not the
// socket: one listener per address is enough, and a new generation joining
// the group finds it attached; attaching again replaces it with itself.
func (s *Steering) Attach(listenerFD int) error {
	if err := unix.SetsockoptInt(listenerFD, unix.SOL_SOCKET, unix.SO_ATTACH_REUSEPORT_EBPF, s.prog.FD()); err != nil {
		return fmt.Errorf("steering: SO_ATTACH_REUSEPORT_EBPF: %w", err)
	}
	return nil
}

// Insert puts the listening sockets fds into generation gen's slots. They
// take no connection until Activate(gen).
func (s *Steering) Insert(gen uint32, fds []int) error {
	if len(fds) == 0 || len(fds) > MaxListenersPerGen {
		return fmt.Errorf("steering: %d listeners, want 1 to %d", len(fds), MaxListenersPerGen)
	}
	base := (gen % 2) * MaxListenersPerGen
	for i, fd := range fds {
		if err := s.listeners.Update(base+uint32(i), uint64(fd), ebpf.UpdateAny); err != nil {
			return fmt.Errorf("steering: insert listener %d of generation %d: %w", i, gen, err)
		}
		// No worker owns these slots: the hash picks among them, even
		// if a worker generation used them before.
		if err := s.slots.Update(base+uint32(i), uint32(0), ebpf.UpdateAny); err != nil {
			return fmt.Errorf("steering: insert listener %d of generation %d: %w", i, gen, err)
		}
	}
	s.mu.Lock()
	s.inserted[gen] = len(fds)
	s.mu.Unlock()
	return nil
}

// activeGen is struct active_gen of reuseport.c.
type activeGen = reuseportActiveGen

// Activate makes gen, inserted by this Steering, the generation that takes
// every new connection and every migrating one, from now on. It records the
// calling process as the generation's owner (Active().PID).
func (s *Steering) Activate(gen uint32) error {
	s.mu.Lock()
	n, ok := s.inserted[gen]
	s.mu.Unlock()
	if !ok {
		return fmt.Errorf("steering: generation %d has no listeners inserted", gen)
	}
	v := activeGen{Gen: gen, Base: (gen % 2) * MaxListenersPerGen, Count: uint32(n), Pid: uint32(os.Getpid())}
	if err := s.active.Update(uint32(0), &v, ebpf.UpdateAny); err != nil {
		return fmt.Errorf("steering: activate generation %d: %w", gen, err)
	}
	return nil
}

// Generation describes the active generation.
type Generation struct {
	Gen       uint32 // 0: none was ever activated
	Listeners int    // listeners it inserted
	PID       int    // the process that activated it
}

// Active returns the active generation.
func (s *Steering) Active() (Generation, error) {
	var v activeGen
	if err := s.active.Lookup(uint32(0), &v); err != nil {
		return Generation{}, fmt.Errorf("steering: %w", err)
	}
	return Generation{Gen: v.Gen, Listeners: int(v.Count), PID: int(v.Pid)}, nil
}

// Counters sums the program's per-CPU counters.
func (s *Steering) Counters() (Counters, error) {
	var sums [cntMax]uint64
	for i := range sums {
		var per []uint64
		if err := s.counters.Lookup(uint32(i), &per); err != nil {
			return Counters{}, fmt.Errorf("steering: counters: %w", err)
		}
		for _, v := range per {
			sums[i] += v
		}
	}
	return Counters{Selections: sums[cntSelections], Migrations: sums[cntMigrations], Fallbacks: sums[cntFallbacks]}, nil
}

// Close closes this process's handles. The pins stay: the program stays
// attached to the group and the next generation opens the maps.
func (s *Steering) Close() error {
	var errs []error
	if s.prog != nil {
		errs = append(errs, s.prog.Close())
	}
	for _, m := range []*ebpf.Map{s.listeners, s.active, s.counters, s.slots, s.loads} {
		if m != nil {
			errs = append(errs, m.Close())
		}
	}
	return errors.Join(errs...)
}

// PruneStale removes the steerings under base whose active generation's
// process is gone and whose listener slots are all empty: what a proxy
// killed without its shutdown (SIGKILL, a crash) leaves in bpffs. A
// steering still being set up (no generation yet) is left alone.
func PruneStale(base string) {
	ents, err := os.ReadDir(base)
	if err != nil {
		return
	}
	for _, e := range ents {
		dir := filepath.Join(base, e.Name())
		if !e.IsDir() || strings.HasPrefix(e.Name(), "tmp-") {
			continue
		}
		s, err := openPinned(dir, false)
		if err != nil {
			continue
		}
		g, err := s.Active()
		stale := err == nil && g.Gen != 0 && g.PID != 0 && unix.Kill(g.PID, 0) == unix.ESRCH && s.empty()
		s.Close()
		if stale {
			os.RemoveAll(dir)
		}
	}
}

// empty reports whether no listener sits in the sockarray (closed sockets
// leave it by themselves).
func (s *Steering) empty() bool {
	var cookie uint64
	for k := uint32(0); k < s.listeners.MaxEntries(); k++ {
		if err := s.listeners.Lookup(k, &cookie); err == nil {
			return false
		}
	}
	return true
}
