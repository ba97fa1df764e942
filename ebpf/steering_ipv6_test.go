//go:build linux

package ebpf

import (
	"net/netip"
	"path/filepath"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// The generation handover on an IPv6 address: the program and its
// sockarray do not care about the family, but the pin directory, the
// listeners and the migration are exercised on [::1] here.
func TestSteeringIPv6Handover(t *testing.T) {
	enterNetns(t)
	if err := unix.Access("/proc/sys/net/ipv6", unix.F_OK); err != nil {
		privileged(t, "no IPv6 in this kernel: %v", err)
	}
	g1a, addr := listen(t, netip.MustParseAddrPort("[::1]:0"))
	g1b, _ := listen(t, addr)
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
	dialN(t, addr, 100)
	if got := counts(acceptAll(t, []int{g1a, g1b}, 100)); got[0]+got[1] != 100 {
		t.Fatalf("generation 1 accepted %v of 100", got)
	}
	queued := dialN(t, addr, 30)

	s2 := openSteering(t, dir)
	g2a, _ := listen(t, addr)
	if err := s2.Insert(2, []int{g2a}); err != nil {
		t.Fatal(err)
	}
	if err := s2.Activate(2); err != nil {
		t.Fatal(err)
	}
	dialN(t, addr, 100)
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
