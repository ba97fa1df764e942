//go:build linux

package ebpf

import (
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus/testutil"
	"golang.org/x/sys/unix"
)

// privileged skips a test that lacks privileges or a kernel feature, or
// fails it when SHARDGATE_REQUIRE_PRIVILEGED=1 (.ci/run sets it: a skip
// there is a broken runner, not a pass).
func privileged(t *testing.T, format string, args ...any) {
	t.Helper()
	skipUnprivileged(t, "root, bpffs and SK_REUSEPORT eBPF", format, args...)
}

// enterNetns moves the test goroutine's thread into a fresh network
// namespace with lo up and net.ipv4.tcp_migrate_req=0 (the default): the
// migration the tests see is the program's doing (a SELECT_OR_MIGRATE
// program migrates whatever the sysctl says), as on a host nobody tuned. The thread is never
// unlocked, so the runtime destroys it with the test goroutine. Sockets are
// created in the namespace of the creating thread: open them all on the test
// goroutine. No subtests.
func enterNetns(t *testing.T) {
	t.Helper()
	enterLoopbackNetns(t, "root, bpffs and SK_REUSEPORT eBPF")
	if err := os.WriteFile("/proc/sys/net/ipv4/tcp_migrate_req", []byte("0"), 0); err != nil {
		privileged(t, "sysctl net.ipv4.tcp_migrate_req: %v", err)
	}
}

// testPinDir is a pin directory of its own under /sys/fs/bpf, removed at
// the end of the test.
func testPinDir(t *testing.T) string {
	t.Helper()
	dir := filepath.Join("/sys/fs/bpf", fmt.Sprintf("shardgate-test-%d-%d", os.Getpid(), time.Now().UnixNano()), "tcp4-127_0_0_1-1883")
	t.Cleanup(func() { os.RemoveAll(filepath.Dir(dir)) })
	return dir
}

func openSteering(t *testing.T, dir string) *Steering {
	t.Helper()
	s, err := OpenSteering(dir)
	if err != nil {
		if errors.Is(err, unix.EPERM) || errors.Is(err, unix.EACCES) || errors.Is(err, unix.ENOTSUP) {
			privileged(t, "%v", err)
		}
		t.Fatal(err)
	}
	t.Cleanup(func() { s.Close() })
	return s
}

// listen opens a raw (never MPTCP) nonblocking SO_REUSEPORT listener, IPv4
// or IPv6 (IPv6-only) by addr.
func listen(t *testing.T, addr netip.AddrPort) (int, netip.AddrPort) {
	t.Helper()
	var family int
	var sa unix.Sockaddr
	if addr.Addr().Is4() {
		family, sa = unix.AF_INET, &unix.SockaddrInet4{Port: int(addr.Port()), Addr: addr.Addr().As4()}
	} else {
		family, sa = unix.AF_INET6, &unix.SockaddrInet6{Port: int(addr.Port()), Addr: addr.Addr().As16()}
	}
	fd, err := unix.Socket(family, unix.SOCK_STREAM|unix.SOCK_NONBLOCK|unix.SOCK_CLOEXEC, unix.IPPROTO_TCP)
	if err != nil {
		t.Fatal(err)
	}
	if err := unix.SetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_REUSEPORT, 1); err != nil {
		t.Fatal(err)
	}
	if family == unix.AF_INET6 {
		if err := unix.SetsockoptInt(fd, unix.IPPROTO_IPV6, unix.IPV6_V6ONLY, 1); err != nil {
			t.Fatal(err)
		}
	}
	if err := unix.Bind(fd, sa); err != nil {
		t.Fatal(err)
	}
	if err := unix.Listen(fd, 1024); err != nil {
		t.Fatal(err)
	}
	got, err := unix.Getsockname(fd)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { unix.Close(fd) })
	port := 0
	switch a := got.(type) {
	case *unix.SockaddrInet4:
		port = a.Port
	case *unix.SockaddrInet6:
		port = a.Port
	}
	return fd, netip.AddrPortFrom(addr.Addr(), uint16(port))
}

// acceptAll accepts on every listener until want connections were accepted
// in all (or 5 s passed) and returns the accepted fds per listener.
func acceptAll(t *testing.T, lns []int, want int) [][]int {
	t.Helper()
	got := make([][]int, len(lns))
	total := 0
	deadline := time.Now().Add(5 * time.Second)
	for total < want && time.Now().Before(deadline) {
		progress := false
		for i, ln := range lns {
			for {
				fd, _, err := unix.Accept4(ln, unix.SOCK_CLOEXEC)
				if err != nil {
					break
				}
				got[i] = append(got[i], fd)
				total++
				progress = true
			}
		}
		if !progress {
			time.Sleep(5 * time.Millisecond)
		}
	}
	t.Cleanup(func() {
		for _, fds := range got {
			for _, fd := range fds {
				unix.Close(fd)
			}
		}
	})
	return got
}

func dialN(t *testing.T, addr netip.AddrPort, n int) []net.Conn {
	t.Helper()
	conns := make([]net.Conn, 0, n)
	for i := 0; i < n; i++ {
		c, err := net.DialTimeout("tcp", addr.String(), 2*time.Second)
		if err != nil {
			t.Fatalf("connect #%d: %v", i, err)
		}
		conns = append(conns, c)
	}
	t.Cleanup(func() {
		for _, c := range conns {
			c.Close()
		}
	})
	return conns
}

func counts(fds [][]int) []int {
	n := make([]int, len(fds))
	for i := range fds {
		n[i] = len(fds[i])
	}
	return n
}

// Activating generation 2 sends every new connection to it while generation
// 1's listeners are still open; closing generation 1 with connections queued
// in its accept backlogs migrates them to generation 2 instead of resetting
// them.
func TestSteeringGenerationHandoverAndMigration(t *testing.T) {
	enterNetns(t)
	dir := testPinDir(t)
	s1 := openSteering(t, dir)

	g1a, addr := listen(t, netip.MustParseAddrPort("127.0.0.1:0"))
	g1b, _ := listen(t, addr)
	if err := s1.Attach(g1a); err != nil {
		privileged(t, "%v", err)
	}
	if err := s1.Insert(1, []int{g1a, g1b}); err != nil {
		t.Fatal(err)
	}
	if err := s1.Activate(1); err != nil {
		t.Fatal(err)
	}
	dialN(t, addr, 200)
	got := counts(acceptAll(t, []int{g1a, g1b}, 200))
	t.Logf("generation 1 active: accepts per listener %v", got)
	if got[0]+got[1] != 200 || got[0] == 0 || got[1] == 0 {
		t.Fatalf("generation 1 accepts %v, want 200 spread over both", got)
	}

	// Queued in generation 1's backlogs, never accepted by it.
	queued := dialN(t, addr, 50)

	// The next generation: another process would open the same pins.
	s2 := openSteering(t, dir)
	g2a, _ := listen(t, addr)
	g2b, _ := listen(t, addr)
	if err := s2.Insert(2, []int{g2a, g2b}); err != nil {
		t.Fatal(err)
	}
	if err := s2.Activate(2); err != nil {
		t.Fatal(err)
	}
	if g, err := s1.Active(); err != nil || g.Gen != 2 || g.Listeners != 2 || g.PID != os.Getpid() {
		t.Fatalf("Active() seen by generation 1 = %+v, %v; want generation 2, 2 listeners, pid %d", g, err, os.Getpid())
	}
	dialN(t, addr, 200)
	all := []int{g1a, g1b, g2a, g2b}
	// Accept only from generation 2 first: every new connection is there.
	got = counts(acceptAll(t, []int{g2a, g2b}, 200))
	t.Logf("generation 2 active: accepts per gen-2 listener %v", got)
	if got[0]+got[1] != 200 || got[0] == 0 || got[1] == 0 {
		t.Fatalf("generation 2 accepts %v, want 200 spread over both", got)
	}

	// Generation 1 stops: its 50 queued connections must move.
	before, err := s2.Counters()
	if err != nil {
		t.Fatal(err)
	}
	unix.Close(g1a)
	unix.Close(g1b)
	fds := acceptAll(t, all[2:], 50)
	got = counts(fds)
	t.Logf("after closing generation 1: migrated accepts per gen-2 listener %v", got)
	if got[0]+got[1] != 50 {
		t.Fatalf("%d of 50 queued connections reached generation 2", got[0]+got[1])
	}
	// Each migrated connection is alive: a byte written by generation 2
	// reaches its client.
	for _, l := range fds {
		for _, fd := range l {
			if _, err := unix.Write(fd, []byte{'x'}); err != nil {
				t.Fatal(err)
			}
		}
	}
	buf := make([]byte, 1)
	for i, c := range queued {
		c.SetReadDeadline(time.Now().Add(2 * time.Second))
		if _, err := c.Read(buf); err != nil {
			t.Fatalf("queued connection #%d: %v (reset instead of migrated?)", i, err)
		}
	}
	after, err := s2.Counters()
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("counters before close %+v, after %+v", before, after)
	if d := after.Migrations - before.Migrations; d < 50 {
		t.Errorf("migrations counter grew by %d, want ≥ 50", d)
	}
	if after.Selections < 450 {
		t.Errorf("selections = %d, want ≥ 450", after.Selections)
	}
	if after.Fallbacks != 0 {
		t.Errorf("fallbacks = %d, want 0", after.Fallbacks)
	}
	const want = `
# HELP shardgate_reuseport_fallbacks_total Connections left to the kernel's reuseport hash (no active listener to select).
# TYPE shardgate_reuseport_fallbacks_total counter
shardgate_reuseport_fallbacks_total{steering="tcp4-127_0_0_1-1883"} 0
`
	if err := testutil.CollectAndCompare(s2.Collector(), strings.NewReader(want), "shardgate_reuseport_fallbacks_total"); err != nil {
		t.Error(err)
	}
	if n := testutil.CollectAndCount(s2.Collector()); n != 3 {
		t.Errorf("collector exports %d metrics, want 3", n)
	}
}

// Two processes starting at once both end up with the same pins; a failed
// or raced creation leaves no temporary directory behind.
func TestSteeringOpenConcurrent(t *testing.T) {
	dir := testPinDir(t)
	if _, err := os.Stat("/sys/fs/bpf"); err != nil {
		privileged(t, "%v", err)
	}
	errs := make(chan error, 8)
	ss := make(chan *Steering, 8)
	for range 8 {
		go func() {
			s, err := OpenSteering(dir)
			errs <- err
			ss <- s
		}()
	}
	var opened []*Steering
	for range 8 {
		if err := <-errs; err != nil {
			if errors.Is(err, unix.EPERM) {
				privileged(t, "%v", err)
			}
			t.Fatal(err)
		}
		opened = append(opened, <-ss)
	}
	defer func() {
		for _, s := range opened {
			s.Close()
		}
	}()
	// A listener-free check that they share maps: activate through one,
	// read through another.
	if err := opened[0].active.Update(uint32(0), &activeGen{Gen: 7, Count: 1}, 0); err != nil {
		t.Fatal(err)
	}
	if g, err := opened[7].Active(); err != nil || g.Gen != 7 {
		t.Fatalf("Active() = %+v, %v through another opener; want generation 7", g, err)
	}
	ents, err := os.ReadDir(filepath.Dir(dir))
	if err != nil {
		t.Fatal(err)
	}
	if len(ents) != 1 || ents[0].Name() != filepath.Base(dir) {
		var names []string
		for _, e := range ents {
			names = append(names, e.Name())
		}
		t.Fatalf("pin base holds %v, want only %s", names, filepath.Base(dir))
	}
}

func TestSteeringInsertActivateErrors(t *testing.T) {
	dir := testPinDir(t)
	if _, err := os.Stat("/sys/fs/bpf"); err != nil {
		privileged(t, "%v", err)
	}
	s := openSteering(t, dir)
	if err := s.Activate(3); err == nil {
		t.Error("Activate of a generation never inserted succeeded")
	}
	if err := s.Insert(1, nil); err == nil {
		t.Error("Insert of no listeners succeeded")
	}
	// A socket that is not a listener cannot enter the sockarray.
	fd, err := unix.Socket(unix.AF_INET, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer unix.Close(fd)
	if err := s.Insert(1, []int{fd}); err == nil {
		t.Error("Insert of an unbound socket succeeded")
	}
	if g, err := s.Active(); err != nil || g != (Generation{}) {
		t.Errorf("Active() = %+v, %v on a fresh steering; want none", g, err)
	}
}

func TestPinDirFor(t *testing.T) {
	for _, tc := range []struct{ addr, want string }{
		{"127.0.0.1:1883", "/b/tcp4-127_0_0_1-1883"},
		{"[::ffff:10.0.0.1]:1883", "/b/tcp4-10_0_0_1-1883"},
		{"[::1]:8883", "/b/tcp6-__1-8883"},
	} {
		if got := PinDirFor("/b", netip.MustParseAddrPort(tc.addr)); got != tc.want {
			t.Errorf("PinDirFor(%s) = %s, want %s", tc.addr, got, tc.want)
		}
	}
}

// A steering whose process is gone and whose listeners are closed is
// removed; one whose process lives is kept.
func TestPruneStale(t *testing.T) {
	dir := testPinDir(t)
	if _, err := os.Stat("/sys/fs/bpf"); err != nil {
		privileged(t, "%v", err)
	}
	live := openSteering(t, dir)
	if err := live.active.Update(uint32(0), &activeGen{Gen: 1, Count: 1, Pid: uint32(os.Getpid())}, 0); err != nil {
		t.Fatal(err)
	}
	deadDir := filepath.Join(filepath.Dir(dir), "tcp4-127_0_0_1-1884")
	dead := openSteering(t, deadDir)
	// A pid that cannot exist (above pid_max's ceiling).
	if err := dead.active.Update(uint32(0), &activeGen{Gen: 1, Count: 1, Pid: 1 << 23}, 0); err != nil {
		t.Fatal(err)
	}
	PruneStale(filepath.Dir(dir))
	if _, err := os.Stat(dir); err != nil {
		t.Errorf("live steering removed: %v", err)
	}
	if _, err := os.Stat(deadDir); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("stale steering kept: %v", err)
	}
}
