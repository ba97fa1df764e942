package proxy

import (
	"context"
	"errors"
	"net"
	"net/netip"
	"os"
	"runtime"
	"strings"
	"sync"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// dialWaitConnected waits for the connect started on fd to complete the way
// the event loop does (writable, then SO_ERROR) and returns Finish's result.
func dialWaitConnected(t *testing.T, fd int) error {
	t.Helper()
	pfd := []unix.PollFd{{Fd: int32(fd), Events: unix.POLLOUT}}
	deadline := time.Now().Add(5 * time.Second)
	for {
		n, err := unix.Poll(pfd, int(time.Until(deadline).Milliseconds()))
		if err == unix.EINTR {
			continue
		}
		if err != nil {
			t.Fatalf("poll: %v", err)
		}
		if n == 0 {
			t.Fatalf("connect on fd %d still in progress after 5s", fd)
		}
		return Finish(fd)
	}
}

func dialSockname(t *testing.T, fd int) netip.AddrPort {
	t.Helper()
	sa, err := unix.Getsockname(fd)
	if err != nil {
		t.Fatalf("getsockname: %v", err)
	}
	switch sa := sa.(type) {
	case *unix.SockaddrInet4:
		return netip.AddrPortFrom(netip.AddrFrom4(sa.Addr), uint16(sa.Port))
	case *unix.SockaddrInet6:
		return netip.AddrPortFrom(netip.AddrFrom16(sa.Addr), uint16(sa.Port))
	}
	t.Fatalf("getsockname: unexpected %T", sa)
	return netip.AddrPort{}
}

// dialListener listens on addr and accepts and holds every connection until
// the test ends. It returns the bound address and a count of accepted
// connections.
func dialListener(t *testing.T, network, addr string) (netip.AddrPort, func() int) {
	t.Helper()
	var lc net.ListenConfig
	lc.SetMultipathTCP(false)
	ln, err := lc.Listen(context.Background(), network, addr)
	if err != nil {
		t.Fatalf("listen %s %s: %v", network, addr, err)
	}
	var (
		mu    sync.Mutex
		conns []net.Conn
		done  = make(chan struct{})
	)
	go func() {
		defer close(done)
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			mu.Lock()
			conns = append(conns, c)
			mu.Unlock()
		}
	}()
	t.Cleanup(func() {
		ln.Close()
		<-done
		mu.Lock()
		defer mu.Unlock()
		for _, c := range conns {
			c.Close()
		}
	})
	accepted := func() int {
		mu.Lock()
		defer mu.Unlock()
		return len(conns)
	}
	return ln.Addr().(*net.TCPAddr).AddrPort(), accepted
}

func dialCloseAll(t *testing.T, fds *[]int) {
	t.Cleanup(func() {
		for _, fd := range *fds {
			unix.Close(fd)
		}
	})
}

func TestDialLoopbackIPv4(t *testing.T) {
	dst, accepted := dialListener(t, "tcp4", "127.0.0.1:0")
	d, err := NewDialer(DialConfig{})
	if err != nil {
		t.Fatal(err)
	}
	fd, inProgress, err := d.Start(dst)
	if err != nil {
		t.Fatalf("Start(%s): %v", dst, err)
	}
	defer unix.Close(fd)
	if !inProgress {
		t.Log("connect completed synchronously")
	}
	if err := dialWaitConnected(t, fd); err != nil {
		t.Fatalf("Finish: %v", err)
	}

	// The socket is what the event loop expects: nonblocking, close-on-exec,
	// Nagle off.
	fl, err := unix.FcntlInt(uintptr(fd), unix.F_GETFL, 0)
	if err != nil || fl&unix.O_NONBLOCK == 0 {
		t.Errorf("O_NONBLOCK not set (flags %#x, %v)", fl, err)
	}
	fdfl, err := unix.FcntlInt(uintptr(fd), unix.F_GETFD, 0)
	if err != nil || fdfl&unix.FD_CLOEXEC == 0 {
		t.Errorf("FD_CLOEXEC not set (flags %#x, %v)", fdfl, err)
	}
	if v, err := unix.GetsockoptInt(fd, unix.IPPROTO_TCP, unix.TCP_NODELAY); err != nil || v == 0 {
		t.Errorf("TCP_NODELAY = %d, %v; want 1", v, err)
	}

	peer, err := unix.Getpeername(fd)
	if err != nil {
		t.Fatalf("getpeername: %v", err)
	}
	if p := peer.(*unix.SockaddrInet4); p.Port != int(dst.Port()) {
		t.Errorf("peer port %d, want %d", p.Port, dst.Port())
	}
	// Bytes flow.
	if _, err := unix.Write(fd, []byte{0xC0, 0x00}); err != nil {
		t.Fatalf("write: %v", err)
	}
	deadline := time.Now().Add(5 * time.Second)
	for accepted() != 1 && time.Now().Before(deadline) {
		time.Sleep(5 * time.Millisecond)
	}
	if n := accepted(); n != 1 {
		t.Fatalf("listener accepted %d connections, want 1", n)
	}
}

func TestDialRefused(t *testing.T) {
	// A port with nothing listening: bind one, note it, close it.
	ln, err := net.Listen("tcp4", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	dst := ln.Addr().(*net.TCPAddr).AddrPort()
	ln.Close()

	d, err := NewDialer(DialConfig{})
	if err != nil {
		t.Fatal(err)
	}
	fd, inProgress, err := d.Start(dst)
	if err != nil {
		// Some kernels may refuse synchronously; that must still be ECONNREFUSED.
		if !errors.Is(err, unix.ECONNREFUSED) {
			t.Fatalf("Start: %v, want ECONNREFUSED", err)
		}
		return
	}
	defer unix.Close(fd)
	if !inProgress {
		t.Fatalf("connect to closed port %s completed synchronously", dst)
	}
	err = dialWaitConnected(t, fd)
	if !errors.Is(err, unix.ECONNREFUSED) {
		t.Fatalf("Finish = %v, want ECONNREFUSED", err)
	}
	if !strings.Contains(err.Error(), "connect") {
		t.Errorf("error %q does not say what failed", err)
	}
}

func TestDialLoopbackIPv6(t *testing.T) {
	if fd, err := unix.Socket(unix.AF_INET6, unix.SOCK_STREAM, 0); err != nil {
		t.Skipf("IPv6 not supported by this kernel: %v", err)
	} else {
		unix.Close(fd)
	}
	dst, _ := dialListener(t, "tcp6", "[::1]:0")
	// An IPv4-only pool does not apply to an IPv6 destination: it dials
	// unbound instead of failing.
	d, err := NewDialer(DialConfig{SourceAddrs: []netip.Addr{netip.MustParseAddr("127.0.0.1")}})
	if err != nil {
		t.Fatal(err)
	}
	fd, _, err := d.Start(dst)
	if err != nil {
		t.Fatalf("Start(%s): %v", dst, err)
	}
	defer unix.Close(fd)
	if err := dialWaitConnected(t, fd); err != nil {
		t.Fatalf("Finish: %v", err)
	}
	if got := dialSockname(t, fd).Addr(); got != netip.IPv6Loopback() {
		t.Errorf("local address %s, want ::1", got)
	}

	// An IPv6 pool binds IPv6 destinations.
	d6, err := NewDialer(DialConfig{SourceAddrs: []netip.Addr{netip.IPv6Loopback()}})
	if err != nil {
		t.Fatal(err)
	}
	fd6, _, err := d6.Start(dst)
	if err != nil {
		t.Fatalf("Start(%s) from ::1: %v", dst, err)
	}
	defer unix.Close(fd6)
	if err := dialWaitConnected(t, fd6); err != nil {
		t.Fatalf("Finish: %v", err)
	}
}

func TestDialSourceRoundRobin(t *testing.T) {
	// All of 127.0.0.0/8 is local on lo, so no namespace is needed here.
	dst, _ := dialListener(t, "tcp4", "127.0.0.1:0")
	srcs := []netip.Addr{netip.MustParseAddr("127.0.0.2"), netip.MustParseAddr("127.0.0.3"), netip.MustParseAddr("::ffff:127.0.0.4")}
	d, err := NewDialer(DialConfig{SourceAddrs: srcs})
	if err != nil {
		t.Fatal(err)
	}
	var fds []int
	dialCloseAll(t, &fds)
	for i := range 6 {
		fd, _, err := d.Start(dst)
		if err != nil {
			t.Fatalf("Start #%d: %v", i, err)
		}
		fds = append(fds, fd)
		if err := dialWaitConnected(t, fd); err != nil {
			t.Fatalf("Finish #%d: %v", i, err)
		}
		want := srcs[i%len(srcs)].Unmap()
		if got := dialSockname(t, fd).Addr(); got != want {
			t.Errorf("connection #%d from %s, want %s", i, got, want)
		}
	}
}

func TestDialConfig(t *testing.T) {
	d, err := NewDialer(DialConfig{})
	if err != nil {
		t.Fatal(err)
	}
	if d.Timeout() != 5*time.Second {
		t.Errorf("default Timeout() = %v, want 5s", d.Timeout())
	}
	d, err = NewDialer(DialConfig{Timeout: 1500 * time.Millisecond})
	if err != nil || d.Timeout() != 1500*time.Millisecond {
		t.Errorf("Timeout() = %v, %v; want 1.5s", d.Timeout(), err)
	}
	for _, tc := range []struct {
		name string
		cfg  DialConfig
		want string
	}{
		{"not local", DialConfig{SourceAddrs: []netip.Addr{netip.MustParseAddr("192.0.2.77")}}, "192.0.2.77"},
		{"unspecified", DialConfig{SourceAddrs: []netip.Addr{netip.IPv4Unspecified()}}, "0.0.0.0"},
		{"invalid", DialConfig{SourceAddrs: []netip.Addr{{}}}, "not a unicast address"},
		{"twice", DialConfig{SourceAddrs: []netip.Addr{netip.MustParseAddr("127.0.0.2"), netip.MustParseAddr("::ffff:127.0.0.2")}}, "listed twice"},
		{"negative timeout", DialConfig{Timeout: -time.Second}, "negative"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			_, err := NewDialer(tc.cfg)
			if err == nil || !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("NewDialer error %v, want one mentioning %q", err, tc.want)
			}
		})
	}

	if _, _, err := d.Start(netip.AddrPort{}); err == nil {
		t.Error("Start(invalid) succeeded")
	}
}

// dialPrivileged skips a test that needs privileges it does not have, or
// fails it when SHARDGATE_REQUIRE_PRIVILEGED=1 (CI runs as root, so a skip
// there means a broken runner, not a passing test).
func dialPrivileged(t *testing.T, format string, args ...any) {
	t.Helper()
	if os.Getenv("SHARDGATE_REQUIRE_PRIVILEGED") == "1" {
		t.Fatalf("SHARDGATE_REQUIRE_PRIVILEGED=1: "+format, args...)
	}
	t.Skipf("needs root / a network namespace: "+format, args...)
}

const dialPortRange = "40000 40099" // 100 ephemeral ports

// dialEnterNetns moves the calling test goroutine's OS thread into a fresh
// network namespace with lo up and a 100-port ephemeral range, so port
// exhaustion takes 100 connections instead of ~28k and touches nothing on the
// host. The thread is never unlocked: when the test goroutine ends the
// runtime destroys the thread, so no other goroutine ever runs in the
// namespace. Sockets are created in the namespace of the thread that creates
// them, so everything that opens sockets must run on the test goroutine
// (other goroutines may use those sockets). No subtests (they run on other
// goroutines).
func dialEnterNetns(t *testing.T) {
	t.Helper()
	hostRange, err := os.ReadFile("/proc/sys/net/ipv4/ip_local_port_range")
	if err != nil {
		t.Fatal(err)
	}
	hostNS, err := os.Readlink("/proc/thread-self/ns/net")
	if err != nil {
		t.Fatal(err)
	}
	runtime.LockOSThread()
	if err := unix.Unshare(unix.CLONE_NEWNET); err != nil {
		dialPrivileged(t, "unshare(CLONE_NEWNET): %v", err)
	}
	ns, err := os.Readlink("/proc/thread-self/ns/net")
	if err != nil || ns == hostNS {
		t.Fatalf("still in the host network namespace (%s, %v); refusing to change its sysctls", ns, err)
	}

	// ip link set lo up, by ioctl on a socket of this namespace.
	s, err := unix.Socket(unix.AF_INET, unix.SOCK_DGRAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer unix.Close(s)
	ifr, err := unix.NewIfreq("lo")
	if err != nil {
		t.Fatal(err)
	}
	if err := unix.IoctlIfreq(s, unix.SIOCGIFFLAGS, ifr); err != nil {
		t.Fatalf("SIOCGIFFLAGS lo: %v", err)
	}
	ifr.SetUint16(ifr.Uint16() | unix.IFF_UP)
	if err := unix.IoctlIfreq(s, unix.SIOCSIFFLAGS, ifr); err != nil {
		dialPrivileged(t, "set lo up: %v", err)
	}

	// net.ipv4.ip_local_port_range is per namespace; /proc/sys/net resolves
	// against the namespace of the opening thread.
	if err := os.WriteFile("/proc/sys/net/ipv4/ip_local_port_range", []byte(dialPortRange), 0); err != nil {
		dialPrivileged(t, "sysctl net.ipv4.ip_local_port_range: %v", err)
	}
	got, err := os.ReadFile("/proc/sys/net/ipv4/ip_local_port_range")
	if err != nil || strings.Join(strings.Fields(string(got)), " ") != dialPortRange {
		t.Fatalf("ip_local_port_range in namespace = %q, %v", got, err)
	}
	// Another goroutine runs on another thread, in the host namespace: the
	// host's range must be untouched.
	hostNow := make(chan []byte)
	go func() {
		b, _ := os.ReadFile("/proc/sys/net/ipv4/ip_local_port_range")
		hostNow <- b
	}()
	if b := <-hostNow; string(b) != string(hostRange) {
		t.Fatalf("host ip_local_port_range changed: %q → %q", hostRange, b)
	}
}

// dialUntilExhausted starts connects to dst until one fails, up to limit, and
// checks that every started connect completes. It returns the fds and the
// error that stopped it (nil if limit was reached).
func dialUntilExhausted(t *testing.T, d *Dialer, dst netip.AddrPort, limit int, fds *[]int) (int, error) {
	t.Helper()
	n := 0
	for ; n < limit; n++ {
		fd, _, err := d.Start(dst)
		if err != nil {
			return n, err
		}
		*fds = append(*fds, fd)
		if err := dialWaitConnected(t, fd); err != nil {
			t.Fatalf("connection #%d: %v", n, err)
		}
	}
	return n, nil
}

func dialWaitAccepted(t *testing.T, accepted func() int, want int) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for accepted() < want && time.Now().Before(deadline) {
		time.Sleep(10 * time.Millisecond)
	}
	if n := accepted(); n != want {
		t.Fatalf("listener accepted %d connections, want %d", n, want)
	}
}

var (
	dialSrc2 = netip.MustParseAddr("127.0.0.2")
	dialSrc3 = netip.MustParseAddr("127.0.0.3")
	dialSrc4 = netip.MustParseAddr("127.0.0.4")
)

// One source address holds at most as many connections to one destination as
// the ephemeral range has ports; the next connect fails with EADDRNOTAVAIL.
func TestDialNetnsOneSourceExhausts(t *testing.T) {
	dialEnterNetns(t)
	// A fixed port outside the ephemeral range, so the listener takes none.
	dst, accepted := dialListener(t, "tcp4", "127.0.0.1:1883")
	d, err := NewDialer(DialConfig{SourceAddrs: []netip.Addr{dialSrc2}})
	if err != nil {
		t.Fatal(err)
	}
	var fds []int
	dialCloseAll(t, &fds)
	n, err := dialUntilExhausted(t, d, dst, 1000, &fds)
	t.Logf("one source address: %d connections to %s, then: %v", n, dst, err)
	if n < 90 || n > 100 {
		t.Errorf("opened %d connections from one address with 100 ephemeral ports, want ~100", n)
	}
	if !errors.Is(err, ErrNoSourcePort) || !errors.Is(err, unix.EADDRNOTAVAIL) {
		t.Fatalf("error after exhaustion = %v, want ErrNoSourcePort wrapping EADDRNOTAVAIL", err)
	}
	for _, want := range []string{dst.String(), "127.0.0.2"} {
		if !strings.Contains(err.Error(), want) {
			t.Errorf("error %q does not name %s", err, want)
		}
	}
	for _, fd := range fds {
		if a := dialSockname(t, fd).Addr(); a != dialSrc2 {
			t.Fatalf("connection from %s, want %s", a, dialSrc2)
		}
	}
	dialWaitAccepted(t, accepted, n)

	// The same holds without a pool: the kernel's own choice (127.0.0.1)
	// runs out too, and reports the same sentinel.
	plain, _ := NewDialer(DialConfig{})
	var fds2 []int
	dialCloseAll(t, &fds2)
	n2, err := dialUntilExhausted(t, plain, dst, 1000, &fds2)
	t.Logf("no pool: %d connections, then: %v", n2, err)
	if !errors.Is(err, ErrNoSourcePort) {
		t.Fatalf("unbound dial after exhaustion = %v, want ErrNoSourcePort", err)
	}
}

// A pool of three addresses holds 250 connections to one destination, more
// than one address's 100 ports allow.
func TestDialNetnsPoolOf3Holds250(t *testing.T) {
	dialEnterNetns(t)
	dst, accepted := dialListener(t, "tcp4", "127.0.0.1:1883")
	pool := []netip.Addr{dialSrc2, dialSrc3, dialSrc4}
	d, err := NewDialer(DialConfig{SourceAddrs: pool})
	if err != nil {
		t.Fatal(err)
	}
	var fds []int
	dialCloseAll(t, &fds)
	n, err := dialUntilExhausted(t, d, dst, 250, &fds)
	if err != nil {
		t.Fatalf("connection #%d of 250 failed: %v", n, err)
	}
	dialWaitAccepted(t, accepted, 250)
	perSrc := map[netip.Addr]int{}
	seen := map[netip.AddrPort]bool{}
	for _, fd := range fds {
		la := dialSockname(t, fd)
		perSrc[la.Addr()]++
		if seen[la] {
			t.Fatalf("local address %s used twice", la)
		}
		seen[la] = true
	}
	t.Logf("250 connections to %s: per source %v", dst, perSrc)
	for _, a := range pool {
		if perSrc[a] < 83 || perSrc[a] > 84 {
			t.Errorf("source %s carries %d connections, want 83-84 (round robin)", a, perSrc[a])
		}
	}

	// Keep going until the whole pool is exhausted: ~300, then ErrNoSourcePort.
	more, err := dialUntilExhausted(t, d, dst, 1000, &fds)
	t.Logf("pool of 3: %d connections in all, then: %v", 250+more, err)
	if total := 250 + more; total < 270 || total > 300 {
		t.Errorf("pool of 3 opened %d connections, want ~300", total)
	}
	if !errors.Is(err, ErrNoSourcePort) || !strings.Contains(err.Error(), "3 source addresses") {
		t.Fatalf("error after exhausting the pool = %v, want ErrNoSourcePort naming the pool", err)
	}
}

// When the round robin lands on an exhausted address, Start moves on to the
// next one instead of failing the device.
func TestDialNetnsSkipsExhaustedSource(t *testing.T) {
	dialEnterNetns(t)
	dst, _ := dialListener(t, "tcp4", "127.0.0.1:1883")
	only2, err := NewDialer(DialConfig{SourceAddrs: []netip.Addr{dialSrc2}})
	if err != nil {
		t.Fatal(err)
	}
	var fds []int
	dialCloseAll(t, &fds)
	n, err := dialUntilExhausted(t, only2, dst, 1000, &fds)
	if !errors.Is(err, ErrNoSourcePort) {
		t.Fatalf("after %d: %v, want ErrNoSourcePort", n, err)
	}

	// 127.0.0.2 is full; a pool of .2 and .3 still serves every dial from .3.
	d, err := NewDialer(DialConfig{SourceAddrs: []netip.Addr{dialSrc2, dialSrc3}})
	if err != nil {
		t.Fatal(err)
	}
	start := len(fds)
	m, err := dialUntilExhausted(t, d, dst, 80, &fds)
	if err != nil {
		t.Fatalf("dial #%d with one exhausted source of two: %v", m, err)
	}
	for _, fd := range fds[start:] {
		if a := dialSockname(t, fd).Addr(); a != dialSrc3 {
			t.Fatalf("connection from %s, want %s", a, dialSrc3)
		}
	}
}

func BenchmarkDialStart(b *testing.B) {
	var lc net.ListenConfig
	lc.SetMultipathTCP(false)
	ln, err := lc.Listen(context.Background(), "tcp4", "127.0.0.1:0")
	if err != nil {
		b.Fatal(err)
	}
	defer ln.Close()
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			c.Close()
		}
	}()
	dst := ln.Addr().(*net.TCPAddr).AddrPort()
	d, err := NewDialer(DialConfig{SourceAddrs: []netip.Addr{dialSrc2, dialSrc3, dialSrc4}})
	if err != nil {
		b.Fatal(err)
	}
	b.ReportAllocs()
	for b.Loop() {
		fd, _, err := d.Start(dst)
		if err != nil {
			b.Fatal(err)
		}
		// SO_LINGER 0: close resets, so no TIME_WAIT piles up on the
		// source ports however long the benchmark runs.
		unix.SetsockoptLinger(fd, unix.SOL_SOCKET, unix.SO_LINGER, &unix.Linger{Onoff: 1})
		unix.Close(fd)
	}
}
