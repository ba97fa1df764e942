//go:build linux

package ebpf

import (
	"net"
	"net/netip"
	"path/filepath"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// listen6 opens a raw nonblocking SO_REUSEPORT IPv6-only listener.
func listen6(t *testing.T, addr netip.AddrPort) (int, netip.AddrPort) {
	t.Helper()
	fd, err := unix.Socket(unix.AF_INET6, unix.SOCK_STREAM|unix.SOCK_NONBLOCK|unix.SOCK_CLOEXEC, unix.IPPROTO_TCP)
	if err != nil {
		t.Fatal(err)
	}
	if err := unix.SetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_REUSEPORT, 1); err != nil {
		t.Fatal(err)
	}
	if err := unix.SetsockoptInt(fd, unix.IPPROTO_IPV6, unix.IPV6_V6ONLY, 1); err != nil {
		t.Fatal(err)
	}
	if err := unix.Bind(fd, &unix.SockaddrInet6{Port: int(addr.Port()), Addr: addr.Addr().As16()}); err != nil {
		t.Fatal(err)
	}
	if err := unix.Listen(fd, 1024); err != nil {
		t.Fatal(err)
	}
	sa, err := unix.Getsockname(fd)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { unix.Close(fd) })
	return fd, netip.AddrPortFrom(addr.Addr(), uint16(sa.(*unix.SockaddrInet6).Port))
}

func dial6(t *testing.T, addr netip.AddrPort, n int) []net.Conn {
	t.Helper()
	conns := make([]net.Conn, 0, n)
	for i := range n {
		c, err := net.DialTimeout("tcp6", addr.String(), 2*time.Second)
		if err != nil {
			t.Fatalf("connect #%d to %v: %v", i, addr, err)
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

// The generation handover on an IPv6 address: the program and its
// sockarray do not care about the family, but the pin directory, the
// listeners and the migration are exercised on [::1] here.
func TestSteeringIPv6Handover(t *testing.T) {
	enterNetns(t)
	if err := unix.Access("/proc/sys/net/ipv6", unix.F_OK); err != nil {
		privileged(t, "no IPv6 in this kernel: %v", err)
	}
	g1a, addr := listen6(t, netip.MustParseAddrPort("[::1]:0"))
	g1b, _ := listen6(t, addr)
	dir := PinDirFor(filepath.Dir(testPinDir(t)), addr)
	s1 := openSteering(t, dir)
	if err := s1.Attach(g1a); err != nil {
		privileged(t, "%v", err)
	}
	if err := s1.Insert(1, []int{g1a, g1b}); err != nil {
		t.Fatal(err)
	}
	if err := s1.Activate(1); err != nil {
		t.Fatal(err)
	}
	dial6(t, addr, 100)
	if got := counts(acceptAll(t, []int{g1a, g1b}, 100)); got[0]+got[1] != 100 {
		t.Fatalf("generation 1 accepted %v of 100", got)
	}
	queued := dial6(t, addr, 30)

	s2 := openSteering(t, dir)
	g2a, _ := listen6(t, addr)
	if err := s2.Insert(2, []int{g2a}); err != nil {
		t.Fatal(err)
	}
	if err := s2.Activate(2); err != nil {
		t.Fatal(err)
	}
	dial6(t, addr, 100)
	if got := counts(acceptAll(t, []int{g2a}, 100)); got[0] != 100 {
		t.Fatalf("generation 2 accepted %v of the 100 new connections", got)
	}
	unix.Close(g1a)
	unix.Close(g1b)
	fds := acceptAll(t, []int{g2a}, 30)
	if n := len(fds[0]); n != 30 {
		t.Fatalf("%d of 30 queued IPv6 connections migrated to generation 2", n)
	}
	for _, fd := range fds[0] {
		if _, err := unix.Write(fd, []byte{'x'}); err != nil {
			t.Fatal(err)
		}
	}
	buf := make([]byte, 1)
	for i, c := range queued {
		c.SetReadDeadline(time.Now().Add(2 * time.Second))
		if _, err := c.Read(buf); err != nil {
			t.Fatalf("queued IPv6 connection #%d: %v (reset instead of migrated?)", i, err)
		}
	}
	t.Logf("IPv6 %v: pin dir %s; 100 to generation 1, 100 to generation 2, 30 queued migrated", addr, dir)
}
