package proxy

import (
	"bufio"
	"context"
	"encoding/binary"
	"fmt"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// admSlow refills one token in 100 s: a test that runs for seconds sees
// only the burst, whatever the machine's load.
var admSlow = AdmissionConfig{Rate: 0.01, Burst: 50}

func newTestRegion(t *testing.T, shards int) *AdmissionRegion {
	t.Helper()
	r, err := NewAdmissionRegion(shards)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { r.Close() })
	return r
}

// openDup maps the region again through a duplicate of its memfd, as a
// worker does with the descriptor it inherits.
func openDup(t *testing.T, r *AdmissionRegion) *AdmissionRegion {
	t.Helper()
	fd, err := unix.Dup(int(r.File().Fd()))
	if err != nil {
		t.Fatal(err)
	}
	f := os.NewFile(uintptr(fd), "dup")
	r2, err := OpenAdmissionRegion(f)
	f.Close() // OpenAdmissionRegion keeps its own descriptor
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { r2.Close() })
	return r2
}

// admRoundRobin offers n devices to shard, one to each Admission in turn,
// and returns how many each admitted.
func admRoundRobin(as []*Admission, shard, n int) []int {
	got := make([]int, len(as))
	for i := range n {
		src := netip.AddrFrom4([4]byte{10, 1, byte(i >> 8), byte(i)})
		if ok, _ := as[i%len(as)].Admit(shard, src); ok {
			got[i%len(as)]++
		}
	}
	return got
}

func sum(xs []int) int {
	n := 0
	for _, x := range xs {
		n += x
	}
	return n
}

// Admissions on one region, whether they share a mapping or map the memfd
// separately, draw from one bucket per shard: a burst of B admits B in
// total, not B per Admission.
func TestSharedAdmissionOneBucket(t *testing.T) {
	r := newTestRegion(t, 2)
	r2 := openDup(t, r)
	as := []*Admission{
		NewSharedAdmission(admSlow, 2, r),
		NewSharedAdmission(admSlow, 2, r),
		NewSharedAdmission(admSlow, 2, r2),
	}
	got := admRoundRobin(as, 0, 300)
	if sum(got) != admSlow.Burst {
		t.Fatalf("shard 0: three Admissions on one region admitted %v = %d, want the one burst %d", got, sum(got), admSlow.Burst)
	}
	for i, n := range got {
		if n == 0 {
			t.Fatalf("Admission %d admitted nothing of %v: the round robin did not share the bucket", i, got)
		}
	}
	// Shard 1 has its own bucket, emptied through the second mapping only.
	if got := admRoundRobin(as[2:], 1, 300); sum(got) != admSlow.Burst {
		t.Fatalf("shard 1 through the second mapping admitted %d, want %d", sum(got), admSlow.Burst)
	}
	if got := admRoundRobin(as[:2], 1, 300); sum(got) != 0 {
		t.Fatalf("shard 1 through the first mapping admitted %d after the second emptied it, want 0", sum(got))
	}
	// Unsharded and out-of-range shards share the overflow bucket across
	// mappings too.
	in := 0
	for i := range 300 {
		shard := []int{-1, 2, 7}[i%3]
		if ok, _ := as[i%3].Admit(shard, admSrcA); ok {
			in++
		}
	}
	if in != admSlow.Burst {
		t.Fatalf("shards -1, 2 and 7 admitted %d, want the overflow bucket's %d", in, admSlow.Burst)
	}
}

// An Admission configured with more shards than the region has room for
// sends the extra shards to the overflow bucket instead of out of bounds.
func TestSharedAdmissionShardsBeyondRoom(t *testing.T) {
	r := newTestRegion(t, 2)
	a := NewSharedAdmission(admSlow, 10, r)
	if got := admCount(a, 1, 100); got != admSlow.Burst {
		t.Fatalf("shard 1 (in the region) admitted %d, want %d", got, admSlow.Burst)
	}
	if got := admCount(a, 5, 30) + admCount(a, 9, 100); got != admSlow.Burst {
		t.Fatalf("shards 5 and 9 (beyond the region's 2) admitted %d, want the overflow bucket's %d", got, admSlow.Burst)
	}
	if got := admCount(a, -1, 100); got != 0 {
		t.Fatalf("shard -1 admitted %d after shards 5 and 9 emptied the overflow bucket, want 0", got)
	}
	if got := admCount(a, 0, 100); got != admSlow.Burst {
		t.Fatalf("shard 0 admitted %d, want its own %d", got, admSlow.Burst)
	}
}

// Every worker reloads on SIGHUP: the same limits reloaded in 4 processes
// refill the buckets once, not 4 times, and a worker starting with them
// refills nothing.
func TestSharedAdmissionReconfigureRefillsOnce(t *testing.T) {
	r := newTestRegion(t, 2)
	cfg := AdmissionConfig{Rate: 0.01, Burst: 10}
	var as []*Admission
	for range 4 {
		as = append(as, NewSharedAdmission(cfg, 1, r))
	}
	// Each Admission admits all it can right after its own Reconfigure: a
	// refill per call would let 4 bursts through.
	reloadShards := func(cfg AdmissionConfig, shards int) int {
		in := 0
		for _, a := range as {
			a.Reconfigure(cfg, shards)
			in += admCount(a, 0, 100)
		}
		return in
	}
	reload := func(cfg AdmissionConfig) int { return reloadShards(cfg, 1) }
	if got := sum(admRoundRobin(as, 0, 100)); got != 10 {
		t.Fatalf("4 Admissions created with burst 10 admitted %d, want 10", got)
	}
	if got := reload(cfg); got != 0 {
		t.Fatalf("the same limits reloaded by 4 Admissions admitted %d from empty buckets, want 0", got)
	}
	next := AdmissionConfig{Rate: 0.01, Burst: 15}
	if got := reload(next); got != 15 {
		t.Fatalf("new limits (burst 15) reloaded by 4 Admissions admitted %d, want one refill: 15", got)
	}
	if got := admCount(NewSharedAdmission(next, 1, r), 0, 100); got != 0 {
		t.Fatalf("a worker starting with the current limits admitted %d from empty buckets, want 0", got)
	}
	// The per-source limit is not part of the buckets' limits.
	if got := reload(AdmissionConfig{Rate: 0.01, Burst: 15, PerSourceMax: 1000}); got != 0 {
		t.Fatalf("a per-source change refilled the buckets: %d admitted", got)
	}
	// Going unlimited and back is two changes, so the buckets start full.
	as[0].Reconfigure(AdmissionConfig{}, 1)
	if got := admCount(as[0], 0, 1000); got != 1000 {
		t.Fatalf("unlimited admitted %d of 1000", got)
	}
	if got := reload(next); got != 15 {
		t.Fatalf("limits restored after unlimited admitted %d, want 15", got)
	}
	// A change of shard count is a change too (shard 1 moves from the
	// overflow bucket to its own), refilled once.
	if got := reloadShards(next, 2); got != 15 {
		t.Fatalf("2 shards instead of 1, reloaded by 4 Admissions: shard 0 admitted %d, want 15", got)
	}
	if got := reloadShards(next, 2); got != 0 {
		t.Fatalf("identical reload admitted %d", got)
	}
}

// The buckets' times are CLOCK_MONOTONIC, the clock every process on the
// host reads alike, not time since this process started.
func TestSharedAdmissionClock(t *testing.T) {
	a := NewSharedAdmission(admSlow, 1, newTestRegion(t, 1))
	mono := func() int64 {
		var ts unix.Timespec
		if err := unix.ClockGettime(unix.CLOCK_MONOTONIC, &ts); err != nil {
			t.Fatal(err)
		}
		return ts.Nano()
	}
	// The slack covers the offset's sampling error; a per-process clock
	// would be off by the host's uptime.
	const slack = int64(time.Millisecond)
	for range 3 {
		before := mono()
		got := a.elapsed()
		after := mono()
		if got < before-slack || got > after+slack {
			t.Fatalf("shared Admission clock %d ns, CLOCK_MONOTONIC read %d..%d ns", got, before, after)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

func TestSharedAdmissionNoAlloc(t *testing.T) {
	a := NewSharedAdmission(AdmissionConfig{Rate: 1e6, Burst: 1 << 30, PerSourceMax: 10}, 8, newTestRegion(t, 8))
	srcs := make([]netip.Addr, 256)
	for i := range srcs {
		srcs[i] = netip.AddrFrom4([4]byte{10, 0, byte(i >> 8), byte(i)})
	}
	i := 0
	step := func() {
		src := srcs[i%len(srcs)]
		i++
		if ok, _ := a.Admit(i%10-1, src); ok {
			a.Release(src)
		}
	}
	for range 10000 {
		step()
	}
	if n := testing.AllocsPerRun(10000, step); n != 0 {
		t.Fatalf("shared Admit+Release: %v allocs per op in steady state, want 0", n)
	}
}

// admRegionBytes is a region image: header fields as given, then buckets.
func admRegionBytes(magic uint64, version, buckets uint32, size int) []byte {
	b := make([]byte, size)
	if size >= admRegionHeader {
		binary.LittleEndian.PutUint64(b[admOffMagic:], magic)
		binary.LittleEndian.PutUint32(b[admOffVersion:], version)
		binary.LittleEndian.PutUint32(b[admOffBuckets:], buckets)
	}
	return b
}

func admMemfd(t *testing.T, b []byte, seal bool) *os.File {
	t.Helper()
	fd, err := unix.MemfdCreate("test-region", unix.MFD_CLOEXEC|unix.MFD_ALLOW_SEALING)
	if err != nil {
		t.Fatal(err)
	}
	f := os.NewFile(uintptr(fd), "test-region")
	t.Cleanup(func() { f.Close() })
	if _, err := f.Write(b); err != nil {
		t.Fatal(err)
	}
	if seal {
		if _, err := unix.FcntlInt(uintptr(fd), unix.F_ADD_SEALS, unix.F_SEAL_SHRINK|unix.F_SEAL_GROW); err != nil {
			t.Fatal(err)
		}
	}
	return f
}

func openFds(t *testing.T) int {
	t.Helper()
	es, err := os.ReadDir("/proc/self/fd")
	if err != nil {
		t.Fatal(err)
	}
	return len(es)
}

func TestOpenAdmissionRegionRefuses(t *testing.T) {
	const good = admRegionHeader + 3*admBucketSize
	plain := filepath.Join(t.TempDir(), "region")
	if err := os.WriteFile(plain, admRegionBytes(admRegionMagic, admRegionVersion, 3, good), 0o600); err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct {
		name string
		file func() *os.File
		want string // "": accepted
	}{
		{"valid", func() *os.File { return admMemfd(t, admRegionBytes(admRegionMagic, admRegionVersion, 3, good), true) }, ""},
		{"empty", func() *os.File { return admMemfd(t, nil, true) }, "size 0 bytes"},
		{"header only", func() *os.File {
			return admMemfd(t, admRegionBytes(admRegionMagic, admRegionVersion, 0, admRegionHeader), true)
		}, "size 64 bytes"},
		{"partial bucket", func() *os.File { return admMemfd(t, admRegionBytes(admRegionMagic, admRegionVersion, 3, good-8), true) }, "size 248 bytes"},
		{"magic", func() *os.File { return admMemfd(t, admRegionBytes(0x1234, admRegionVersion, 3, good), true) }, "magic 0x1234"},
		{"zeroes", func() *os.File { return admMemfd(t, make([]byte, good), true) }, "not an admission region"},
		{"version", func() *os.File { return admMemfd(t, admRegionBytes(admRegionMagic, 2, 3, good), true) }, "layout version 2"},
		{"bucket count", func() *os.File { return admMemfd(t, admRegionBytes(admRegionMagic, admRegionVersion, 5, good), true) }, "header says 5 buckets"},
		{"unsealed", func() *os.File { return admMemfd(t, admRegionBytes(admRegionMagic, admRegionVersion, 3, good), false) }, "not sealed"},
		{"regular file", func() *os.File {
			f, err := os.OpenFile(plain, os.O_RDWR, 0)
			if err != nil {
				t.Fatal(err)
			}
			t.Cleanup(func() { f.Close() })
			return f
		}, "seals"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			f := tc.file()
			fds := openFds(t)
			r, err := OpenAdmissionRegion(f)
			if tc.want == "" {
				if err != nil {
					t.Fatalf("refused: %v", err)
				}
				if err := r.Close(); err != nil {
					t.Fatal(err)
				}
			} else if err == nil || !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("OpenAdmissionRegion = %v, want an error mentioning %q", err, tc.want)
			}
			if n := openFds(t); n != fds {
				t.Fatalf("%d descriptors open after, %d before", n, fds)
			}
		})
	}
}

func TestNewAdmissionRegionShards(t *testing.T) {
	for _, n := range []int{-1, admRegionMaxShards + 1} {
		if r, err := NewAdmissionRegion(n); err == nil {
			r.Close()
			t.Errorf("NewAdmissionRegion(%d) accepted", n)
		}
	}
	// A region for no shards still has the overflow bucket.
	a := NewSharedAdmission(admSlow, 0, newTestRegion(t, 0))
	if got := admCount(a, -1, 100) + admCount(a, 0, 100); got != admSlow.Burst {
		t.Fatalf("0-shard region admitted %d, want %d", got, admSlow.Burst)
	}
}

// Cross-process test parameters: a slow rate, so the bound on the total is
// tight in tokens yet loose in time on a loaded machine.
const (
	admProcEnv    = "SHARDGATE_TEST_ADMISSION_CHILD"
	admProcRate   = 200.0
	admProcBurst  = 20
	admProcWindow = time.Second
	admProcs      = 3
)

// TestSharedAdmissionChild is the worker process of
// TestSharedAdmissionProcesses, run by re-executing the test binary; on
// its own it does nothing. It maps the region on fd 3, says "ready", waits
// for a line on stdin, admits as fast as it can for admProcWindow, and
// prints how many it admitted and the clock span they fell in.
func TestSharedAdmissionChild(t *testing.T) {
	if os.Getenv(admProcEnv) != "1" {
		t.Skip("child process of TestSharedAdmissionProcesses")
	}
	f := os.NewFile(3, "region")
	r, err := OpenAdmissionRegion(f)
	f.Close()
	if err != nil {
		fmt.Println("error", err)
		os.Exit(2)
	}
	a := NewSharedAdmission(AdmissionConfig{Rate: admProcRate, Burst: admProcBurst}, 1, r)
	fmt.Println("ready")
	if _, err := bufio.NewReader(os.Stdin).ReadString('\n'); err != nil {
		fmt.Println("error", err)
		os.Exit(2)
	}
	var n, first, last int64
	end := time.Now().Add(admProcWindow)
	for time.Now().Before(end) {
		before := a.elapsed()
		if ok, _ := a.Admit(0, admSrcA); ok {
			last = a.elapsed()
			if n == 0 {
				first = before
			}
			n++
		}
		// Ask often enough (tokens come every 5 ms) without taking the
		// cores from the other processes.
		time.Sleep(100 * time.Microsecond)
	}
	fmt.Println("result", n, first, last)
	os.Exit(0)
}

// Worker processes admitting at once from one region stay within one
// host-wide GCRA bound (burst + rate × time), not one per process.
func TestSharedAdmissionProcesses(t *testing.T) {
	if os.Getenv(admProcEnv) != "" {
		t.Skip("in a child")
	}
	r := newTestRegion(t, 1)
	ctx, cancel := context.WithTimeout(t.Context(), 30*time.Second)
	defer cancel()
	type child struct {
		cmd   *exec.Cmd
		stdin *os.File
		out   *bufio.Scanner
	}
	line := func(c child) []string {
		if !c.out.Scan() {
			t.Fatalf("child %d: no output (%v)", c.cmd.Process.Pid, c.out.Err())
		}
		f := strings.Fields(c.out.Text())
		if len(f) > 0 && f[0] == "error" {
			t.Fatalf("child %d: %s", c.cmd.Process.Pid, c.out.Text())
		}
		return f
	}
	var cs []child
	for range admProcs {
		cmd := exec.CommandContext(ctx, os.Args[0], "-test.run=^TestSharedAdmissionChild$", "-test.count=1")
		cmd.Env = append(os.Environ(), admProcEnv+"=1")
		cmd.ExtraFiles = []*os.File{r.File()}
		cmd.Stderr = os.Stderr
		inR, inW, err := os.Pipe()
		if err != nil {
			t.Fatal(err)
		}
		cmd.Stdin = inR
		stdout, err := cmd.StdoutPipe()
		if err != nil {
			t.Fatal(err)
		}
		if err := cmd.Start(); err != nil {
			t.Fatal(err)
		}
		inR.Close()
		t.Cleanup(func() { inW.Close(); cmd.Wait() })
		cs = append(cs, child{cmd, inW, bufio.NewScanner(stdout)})
	}
	for _, c := range cs {
		if f := line(c); len(f) != 1 || f[0] != "ready" {
			t.Fatalf("child %d: %q, want ready", c.cmd.Process.Pid, f)
		}
	}
	for _, c := range cs {
		if _, err := c.stdin.WriteString("go\n"); err != nil {
			t.Fatal(err)
		}
	}
	var total, first, last int64
	var each []int64
	for i, c := range cs {
		var n, f, l int64
		if _, err := fmt.Sscan(strings.Join(line(c), " ")[len("result"):], &n, &f, &l); err != nil {
			t.Fatalf("child %d: %v", c.cmd.Process.Pid, err)
		}
		each = append(each, n)
		total += n
		if n > 0 {
			if i == 0 || first == 0 || f < first {
				first = f
			}
			last = max(last, l)
		}
	}
	for _, n := range each {
		if n == 0 {
			t.Fatalf("a child admitted nothing (%v): the processes did not admit concurrently", each)
		}
	}
	span := time.Duration(last - first)
	// GCRA: from a full bucket, the admissions in a span number at most
	// burst + rate × span; one more for the clocks' offsets between
	// processes (microseconds) and rounding.
	bound := admProcBurst + admProcRate*span.Seconds()
	t.Logf("%d processes admitted %v = %d in %v; bound %.1f", admProcs, each, total, span, bound)
	if float64(total) > bound+1 {
		t.Fatalf("%d processes admitted %d in %v, more than the host-wide bound %.1f (one bucket per process would allow %.0f)",
			admProcs, total, span, bound, admProcs*bound)
	}
	// Demand never stops, so the bucket is drained at its rate; tokens
	// wait up to burst/rate (100 ms) for a process to be scheduled, so
	// only a long stall of every process would lose any. The margin keeps
	// a loaded machine from failing the test.
	if low := admProcBurst + 0.8*admProcRate*span.Seconds(); float64(total) < low {
		t.Fatalf("%d processes admitted %d in %v, fewer than %.1f: tokens went unused", admProcs, total, span, low)
	}
	if span < admProcWindow/2 {
		t.Fatalf("admissions spanned %v of a %v window", span, admProcWindow)
	}
}
