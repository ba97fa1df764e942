package proxy

import (
	"encoding/binary"
	"errors"
	"fmt"
	"os"
	"sync/atomic"
	"time"
	"unsafe"

	"golang.org/x/sys/unix"
)

// Layout of an AdmissionRegion: one 64-byte header line, then one 64-byte
// line per bucket, the shared overflow bucket last. Every process mapping
// the region must agree on it, so the header names it and
// OpenAdmissionRegion refuses anything else.
const (
	admRegionMagic   = 0x4e47524d44414753 // "SGADMRGN" read as little-endian
	admRegionVersion = 1
	admRegionHeader  = 64
	// admRegionMaxShards bounds the region at 256 MiB, far beyond any
	// shard count, so a corrupt or hostile size is refused, not mapped.
	admRegionMaxShards = 1 << 22

	admOffMagic   = 0  // uint64
	admOffVersion = 8  // uint32
	admOffBuckets = 12 // uint32, overflow bucket included
	admOffConfig  = 16 // uint64, atomic: fingerprint of the limits last applied
)

// The region's layout is admBucket's: a change to one must change the other.
var _ [admBucketSize]byte = [unsafe.Sizeof(admBucket{})]byte{}

// AdmissionRegion is shared memory holding the per-shard token buckets of
// every worker process on the host, so that the per-shard rates are
// host-wide: the same limits as one process, however many workers accept.
// It is a memfd mapped MAP_SHARED, sealed against shrinking and growing
// (a region that shrank under a mapping would kill its processes with
// SIGBUS), with a 64-byte header and one 64-byte cache line per bucket.
// The header records the layout (magic, version, bucket count), so a
// worker from another build refuses a region it would misread, and the
// limits the buckets were last filled for, so that reloads in N workers
// refill them once.
//
// The supervisor creates it with NewAdmissionRegion and passes File to its
// workers (os/exec ExtraFiles); each worker maps it with
// OpenAdmissionRegion and builds its Admission with NewSharedAdmission.
type AdmissionRegion struct {
	f       *os.File
	mem     []byte
	config  *atomic.Uint64 // in mem, at admOffConfig
	buckets []admBucket    // in mem; the last one is the overflow bucket
}

// NewAdmissionRegion creates a region with room for shards+1 buckets:
// shards 0 to shards-1 get their own, and shard -1 (routed without a shard)
// and every shard outside that range share the last one. The region's
// room is fixed; an Admission configured later with more shards sends the
// extra ones to the shared bucket.
func NewAdmissionRegion(shards int) (*AdmissionRegion, error) {
	if shards < 0 || shards > admRegionMaxShards {
		return nil, fmt.Errorf("admission region for %d shards: must be between 0 and %d", shards, admRegionMaxShards)
	}
	n := shards + 1
	size := admRegionHeader + n*admBucketSize
	fd, err := unix.MemfdCreate("shardgate-admission", unix.MFD_CLOEXEC|unix.MFD_ALLOW_SEALING)
	if err != nil {
		return nil, fmt.Errorf("admission region: memfd_create: %w", err)
	}
	f := os.NewFile(uintptr(fd), "shardgate-admission")
	if err := unix.Ftruncate(fd, int64(size)); err != nil {
		f.Close()
		return nil, fmt.Errorf("admission region: size %d bytes: %w", size, err)
	}
	const seals = unix.F_SEAL_SHRINK | unix.F_SEAL_GROW | unix.F_SEAL_SEAL
	if _, err := unix.FcntlInt(uintptr(fd), unix.F_ADD_SEALS, seals); err != nil {
		f.Close()
		return nil, fmt.Errorf("admission region: seal: %w", err)
	}
	mem, err := unix.Mmap(fd, 0, size, unix.PROT_READ|unix.PROT_WRITE, unix.MAP_SHARED)
	if err != nil {
		f.Close()
		return nil, fmt.Errorf("admission region: mmap %d bytes: %w", size, err)
	}
	// Plain stores: no other process can see the memfd before File is
	// handed out, and the fd passing (fork/exec) orders these writes before
	// the workers' reads.
	binary.LittleEndian.PutUint64(mem[admOffMagic:], admRegionMagic)
	binary.LittleEndian.PutUint32(mem[admOffVersion:], admRegionVersion)
	binary.LittleEndian.PutUint32(mem[admOffBuckets:], uint32(n))
	return newAdmissionRegion(f, mem), nil
}

// OpenAdmissionRegion maps the region behind f, a memfd from
// NewAdmissionRegion inherited from the supervisor. It takes ownership of
// nothing: it keeps a duplicate of the descriptor (for File), and the
// caller closes f after it returns. It refuses a file that is not such a
// region: a wrong size, magic, version or bucket count, or a memfd not
// sealed against shrinking.
func OpenAdmissionRegion(f *os.File) (*AdmissionRegion, error) {
	rc, err := f.SyscallConn()
	if err != nil {
		return nil, fmt.Errorf("admission region %s: %w", f.Name(), err)
	}
	fd := -1
	cerr := rc.Control(func(s uintptr) {
		fd, err = unix.FcntlInt(s, unix.F_DUPFD_CLOEXEC, 0)
	})
	if err = errors.Join(cerr, err); err != nil {
		return nil, fmt.Errorf("admission region %s: dup: %w", f.Name(), err)
	}
	own := os.NewFile(uintptr(fd), f.Name())
	mem, err := mapAdmissionRegion(fd)
	if err != nil {
		own.Close()
		return nil, fmt.Errorf("admission region %s: %w", f.Name(), err)
	}
	return newAdmissionRegion(own, mem), nil
}

// mapAdmissionRegion checks fd's size, maps it and checks the header and
// the seals.
func mapAdmissionRegion(fd int) ([]byte, error) {
	var st unix.Stat_t
	if err := unix.Fstat(fd, &st); err != nil {
		return nil, fmt.Errorf("fstat: %w", err)
	}
	size := st.Size
	if size < admRegionHeader+admBucketSize || (size-admRegionHeader)%admBucketSize != 0 ||
		size > admRegionHeader+(admRegionMaxShards+1)*admBucketSize {
		return nil, fmt.Errorf("size %d bytes is not a %d-byte header and 1 to %d buckets of %d bytes: not an admission region",
			size, admRegionHeader, admRegionMaxShards+1, admBucketSize)
	}
	mem, err := unix.Mmap(fd, 0, int(size), unix.PROT_READ|unix.PROT_WRITE, unix.MAP_SHARED)
	if err != nil {
		return nil, fmt.Errorf("mmap %d bytes: %w", size, err)
	}
	if err := checkAdmissionRegion(fd, mem); err != nil {
		unix.Munmap(mem)
		return nil, err
	}
	return mem, nil
}

func checkAdmissionRegion(fd int, mem []byte) error {
	if m := binary.LittleEndian.Uint64(mem[admOffMagic:]); m != admRegionMagic {
		return fmt.Errorf("magic %#x, want %#x: not an admission region", m, uint64(admRegionMagic))
	}
	if v := binary.LittleEndian.Uint32(mem[admOffVersion:]); v != admRegionVersion {
		return fmt.Errorf("layout version %d, this build reads version %d (supervisor and worker from different builds?)", v, admRegionVersion)
	}
	n := binary.LittleEndian.Uint32(mem[admOffBuckets:])
	if have := (len(mem) - admRegionHeader) / admBucketSize; int64(n) != int64(have) {
		return fmt.Errorf("header says %d buckets, the %d bytes hold %d", n, len(mem), have)
	}
	seals, err := unix.FcntlInt(uintptr(fd), unix.F_GET_SEALS, 0)
	if err != nil {
		return fmt.Errorf("seals: %w (want a memfd from NewAdmissionRegion)", err)
	}
	if seals&unix.F_SEAL_SHRINK == 0 {
		return errors.New("memfd not sealed against shrinking: it could be truncated under the mapping (want a memfd from NewAdmissionRegion)")
	}
	return nil
}

func newAdmissionRegion(f *os.File, mem []byte) *AdmissionRegion {
	n := (len(mem) - admRegionHeader) / admBucketSize
	return &AdmissionRegion{
		f:      f,
		mem:    mem,
		config: (*atomic.Uint64)(unsafe.Pointer(&mem[admOffConfig])),
		// mmap returns page-aligned memory, so each bucket is cache-line
		// aligned and its int64 8-byte aligned for the atomics.
		buckets: unsafe.Slice((*admBucket)(unsafe.Pointer(&mem[admRegionHeader])), n),
	}
}

// File returns the memfd, to pass to a worker via ExtraFiles. The region
// owns it: Close closes it.
func (r *AdmissionRegion) File() *os.File { return r.f }

// Close unmaps the region and closes its memfd. Admissions built on r must
// not be used afterwards: their buckets are gone. Other mappings (other
// processes) are not affected.
func (r *AdmissionRegion) Close() error {
	if r.mem == nil {
		return nil
	}
	err := unix.Munmap(r.mem)
	r.mem, r.buckets, r.config = nil, nil, nil
	return errors.Join(err, r.f.Close())
}

// bind points l at the region's buckets for shards shards and, if the
// region's buckets were last filled for other limits, refills them. The
// compare-and-swap on the config word makes exactly one of N processes
// reloading the same limits the one that refills.
func (r *AdmissionRegion) bind(l *admLimits, shards int, now int64) {
	l.buckets = r.buckets[:min(shards, len(r.buckets)-1)]
	l.overflow = &r.buckets[len(r.buckets)-1]
	fp := admFingerprint(l.interval, l.tolerance, int64(len(l.buckets)))
	for {
		cur := r.config.Load()
		if cur == fp {
			return
		}
		if r.config.CompareAndSwap(cur, fp) {
			fillBuckets(r.buckets, now, l.tolerance)
			return
		}
	}
}

// admFingerprint reduces the limits to the region's 64-bit config word
// (never 0, which is a new region's: no limits applied yet). Two different
// limits with one fingerprint (odds 2⁻⁶⁴) would cost one refill.
func admFingerprint(vs ...int64) uint64 {
	h := uint64(0x9E3779B97F4A7C15)
	for _, v := range vs {
		// splitmix64's finalizer: every input bit changes about half the
		// output bits.
		h ^= uint64(v)
		h = (h ^ h>>30) * 0xBF58476D1CE4E5B9
		h = (h ^ h>>27) * 0x94D049BB133111EB
		h ^= h >> 31
	}
	return max(h, 1)
}

// NewSharedAdmission is NewAdmission whose per-shard token buckets live in
// r, so every process using r draws from the same buckets and the per-shard
// rates hold for the host, not for each process. The bucket times are
// CLOCK_MONOTONIC nanoseconds, one clock for every process on the host,
// instead of time since a per-process start. Reconfigure refills the
// buckets only when the limits change (see Reconfigure), so creating it in
// a worker that starts while others run gives no extra burst.
//
// The per-source limit (PerSourceMax) stays per process: each worker
// counts the connections it holds, so a source can hold up to PerSourceMax
// in every worker.
func NewSharedAdmission(cfg AdmissionConfig, shards int, r *AdmissionRegion) *Admission {
	return newAdmissionAt(cfg, shards, time.Now, monotonicBase(), r)
}

// monotonicBase returns the time.Time at which CLOCK_MONOTONIC read zero,
// so that time.Since(base) is CLOCK_MONOTONIC now. Go's monotonic clock
// on Linux is CLOCK_MONOTONIC read through the vDSO, so Admit reads the
// host's clock without a system call; only the offset to Go's start is
// sampled here, from the closest of a few readings (off by half the gap
// between two time.Now calls, microseconds, against token intervals of
// milliseconds).
func monotonicBase() time.Time {
	var base time.Time
	best := time.Duration(-1)
	for range 5 {
		var ts unix.Timespec
		t1 := time.Now()
		if err := unix.ClockGettime(unix.CLOCK_MONOTONIC, &ts); err != nil {
			// CLOCK_MONOTONIC exists on every Linux this runs on.
			panic("clock_gettime(CLOCK_MONOTONIC): " + err.Error())
		}
		t2 := time.Now()
		if gap := t2.Sub(t1); best < 0 || gap < best {
			best = gap
			base = t1.Add(gap / 2).Add(-time.Duration(ts.Nano()))
		}
	}
	return base
}
