//go:build linux

package ebpf

import (
	"bufio"
	"encoding/binary"
	"encoding/hex"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/link"
	"github.com/prometheus/client_golang/prometheus/testutil"
	"golang.org/x/sys/unix"
)

// vipPrivileged skips a test that needs privileges it does not have, or
// fails it when SHARDGATE_REQUIRE_PRIVILEGED=1 (CI runs as root, so a skip
// there means a broken runner, not a passing test).
func vipPrivileged(t *testing.T, format string, args ...any) {
	t.Helper()
	skipUnprivileged(t, "root / a network namespace / SK_LOOKUP", format, args...)
}

// vipEnterNetns moves the calling test goroutine's OS thread into a fresh
// network namespace with lo up and `local <anyIP> dev lo` in the local table
// (AnyIP: every address of anyIP is local, none is assigned to an interface).
// The thread is never unlocked, so the runtime destroys it when the test
// ends and no other goroutine ever runs in the namespace. Sockets belong to
// the namespace of the thread that creates them: create them on the test
// goroutine (other goroutines may use them). No subtests.
func vipEnterNetns(t *testing.T, anyIP netip.Prefix) {
	t.Helper()
	enterLoopbackNetns(t, "root / a network namespace / SK_LOOKUP")
	lo, err := net.InterfaceByName("lo")
	if err != nil {
		t.Fatal(err)
	}
	if err := vipAddLocalRoute(anyIP, lo.Index); err != nil {
		t.Fatalf("ip route add local %v dev lo: %v", anyIP, err)
	}
}

// vipAddLocalRoute is `ip route add local <p> dev <ifindex> table local`, by
// netlink from the calling thread (so in its namespace).
func vipAddLocalRoute(p netip.Prefix, ifindex int) error {
	if !p.Addr().Is4() {
		return fmt.Errorf("IPv4 only: %v", p)
	}
	fd, err := unix.Socket(unix.AF_NETLINK, unix.SOCK_RAW|unix.SOCK_CLOEXEC, unix.NETLINK_ROUTE)
	if err != nil {
		return err
	}
	defer unix.Close(fd)

	const hdr, rtm, attr = unix.SizeofNlMsghdr, unix.SizeofRtMsg, 8
	b := make([]byte, hdr+rtm+2*attr)
	ne := binary.NativeEndian
	ne.PutUint32(b[0:], uint32(len(b)))
	ne.PutUint16(b[4:], unix.RTM_NEWROUTE)
	ne.PutUint16(b[6:], unix.NLM_F_REQUEST|unix.NLM_F_ACK|unix.NLM_F_CREATE|unix.NLM_F_EXCL)
	ne.PutUint32(b[8:], 1) // seq
	r := b[hdr:]
	r[0] = unix.AF_INET
	r[1] = byte(p.Bits()) // dst_len
	r[4] = unix.RT_TABLE_LOCAL
	r[5] = unix.RTPROT_STATIC
	r[6] = unix.RT_SCOPE_HOST
	r[7] = unix.RTN_LOCAL
	a := b[hdr+rtm:]
	ne.PutUint16(a[0:], attr)
	ne.PutUint16(a[2:], unix.RTA_DST)
	dst := p.Masked().Addr().As4()
	copy(a[4:], dst[:])
	a = a[attr:]
	ne.PutUint16(a[0:], attr)
	ne.PutUint16(a[2:], unix.RTA_OIF)
	ne.PutUint32(a[4:], uint32(ifindex))

	if err := unix.Sendto(fd, b, 0, &unix.SockaddrNetlink{Family: unix.AF_NETLINK}); err != nil {
		return err
	}
	resp := make([]byte, 4096)
	n, _, err := unix.Recvfrom(fd, resp, 0)
	if err != nil {
		return err
	}
	msgs, err := syscall.ParseNetlinkMessage(resp[:n])
	if err != nil {
		return err
	}
	for _, m := range msgs {
		if m.Header.Type == unix.NLMSG_ERROR && len(m.Data) >= 4 {
			if e := int32(ne.Uint32(m.Data)); e != 0 {
				return unix.Errno(-e)
			}
			return nil
		}
	}
	return errors.New("no netlink ack")
}

// vipListen is a plain TCP listener (not MPTCP, no SO_REUSEPORT) on addr,
// created on the calling thread. It returns the raw fd (for the SOCKMAP), a
// net.Listener on a dup of it, and a func closing both (also run at cleanup).
func vipListen(t *testing.T, addr netip.AddrPort) (int, net.Listener, func()) {
	t.Helper()
	fd, err := unix.Socket(unix.AF_INET, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		t.Fatal(err)
	}
	sa := &unix.SockaddrInet4{Port: int(addr.Port()), Addr: addr.Addr().As4()}
	if err := unix.Bind(fd, sa); err != nil {
		t.Fatalf("bind %v: %v", addr, err)
	}
	if err := unix.Listen(fd, 128); err != nil {
		t.Fatal(err)
	}
	f := os.NewFile(uintptr(fd), addr.String())
	ln, err := net.FileListener(f)
	if err != nil {
		t.Fatal(err)
	}
	// ln holds a dup; f keeps fd open for the SOCKMAP until closed.
	closeBoth := sync.OnceFunc(func() { ln.Close(); f.Close() })
	t.Cleanup(closeBoth)
	return fd, ln, closeBoth
}

// vipDial connects to dst from the calling thread's namespace.
func vipDial(dst netip.AddrPort) (net.Conn, error) {
	d := net.Dialer{Timeout: 3 * time.Second}
	d.SetMultipathTCP(false)
	return d.Dial("tcp4", dst.String())
}

// tcpSocket is one row of /proc/net/tcp.
type tcpSocket struct {
	local netip.AddrPort
	state uint8 // 0x0A: LISTEN
}

// vipSocketTable reads the IPv4 TCP socket table of the calling thread's
// namespace (/proc/thread-self/net/tcp: /proc/self/net is the main
// thread's, the host's).
func vipSocketTable(t *testing.T) []tcpSocket {
	t.Helper()
	f, err := os.Open("/proc/thread-self/net/tcp")
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	var out []tcpSocket
	sc := bufio.NewScanner(f)
	sc.Scan() // header
	for sc.Scan() {
		fields := strings.Fields(sc.Text())
		if len(fields) < 4 {
			continue
		}
		ip, port, ok := strings.Cut(fields[1], ":")
		if !ok {
			t.Fatalf("bad /proc/net/tcp line %q", sc.Text())
		}
		raw, err1 := hex.DecodeString(ip)
		p, err2 := strconv.ParseUint(port, 16, 16)
		st, err3 := strconv.ParseUint(fields[3], 16, 8)
		if err := errors.Join(err1, err2, err3); err != nil || len(raw) != 4 {
			t.Fatalf("bad /proc/net/tcp line %q: %v", sc.Text(), err)
		}
		// The address is the kernel's __be32 printed as a host-order word.
		a := [4]byte{raw[3], raw[2], raw[1], raw[0]}
		out = append(out, tcpSocket{netip.AddrPortFrom(netip.AddrFrom4(a), uint16(p)), uint8(st)})
	}
	if err := sc.Err(); err != nil {
		t.Fatal(err)
	}
	return out
}

func vipAttach(t *testing.T, prefixes []netip.Prefix, ports [][2]uint16, fd int) *VIP {
	t.Helper()
	v, err := AttachVIP("", prefixes, ports, fd)
	if err != nil {
		if errors.Is(err, os.ErrPermission) || errors.Is(err, ebpf.ErrNotSupported) {
			vipPrivileged(t, "%v", err)
		}
		t.Fatal(err)
	}
	t.Cleanup(func() { v.Close() })
	return v
}

func vipWantRefused(t *testing.T, dst netip.AddrPort) {
	t.Helper()
	c, err := vipDial(dst)
	if err == nil {
		c.Close()
		t.Fatalf("connect %v succeeded, want ECONNREFUSED", dst)
	}
	if !errors.Is(err, unix.ECONNREFUSED) {
		t.Fatalf("connect %v: %v, want ECONNREFUSED", dst, err)
	}
}

// vipWantAccepted connects to dst and checks that ln accepts the connection
// with dst as its local address.
func vipWantAccepted(t *testing.T, ln net.Listener, dst netip.AddrPort) {
	t.Helper()
	c, err := vipDial(dst)
	if err != nil {
		t.Fatalf("connect %v: %v", dst, err)
	}
	defer c.Close()
	ln.(*net.TCPListener).SetDeadline(time.Now().Add(3 * time.Second))
	s, err := ln.Accept()
	if err != nil {
		t.Fatalf("listener %v did not accept the connection to %v: %v", ln.Addr(), dst, err)
	}
	defer s.Close()
	if got := s.LocalAddr().(*net.TCPAddr).AddrPort(); got != dst {
		t.Fatalf("accepted connection's local address = %v, want %v", got, dst)
	}
	if _, err := c.Write([]byte("ping")); err != nil {
		t.Fatal(err)
	}
	buf := make([]byte, 4)
	s.SetReadDeadline(time.Now().Add(3 * time.Second))
	if _, err := s.Read(buf); err != nil || string(buf) != "ping" {
		t.Fatalf("relay through the VIP connection: %q, %v", buf, err)
	}
}

const vipWant = `
# HELP shardgate_vip_lookups_total SK_LOOKUP VIP dispatch: TCP socket lookups by result (matched: sent to the proxy's listener; not_vip: destination outside the VIP prefixes/ports; no_socket: in the VIP but no listener; assign_error: the kernel refused the listener).
# TYPE shardgate_vip_lookups_total counter
shardgate_vip_lookups_total{result="assign_error"} 0
shardgate_vip_lookups_total{result="matched"} %d
shardgate_vip_lookups_total{result="no_socket"} %d
shardgate_vip_lookups_total{result="not_vip"} %d
`

// TestVIPDispatchesRangeWithoutBinding is issue 5's "One VIP" proof: with
// 10.99.0.0/24 local (AnyIP, no address assigned) and the VIP 10.99.0.0/28 on
// ports 1883-1884, connections to 10.99.0.5:1883 and 10.99.0.14:1884 reach a
// listener bound to 127.0.0.1:1883 only, while the socket table shows no
// socket bound to any 10.99.0.x address; 10.99.0.20:1883 (outside the
// prefix) and 10.99.0.5:1885 (outside the ports, though 127.0.0.1:1885 has a
// listener) are refused.
func TestVIPDispatchesRangeWithoutBinding(t *testing.T) {
	vipEnterNetns(t, netip.MustParsePrefix("10.99.0.0/24"))
	vipNet := netip.MustParsePrefix("10.99.0.0/24")

	fd, ln, closeListener := vipListen(t, netip.MustParseAddrPort("127.0.0.1:1883"))
	vipListen(t, netip.MustParseAddrPort("127.0.0.1:1885"))

	// Before the program: the VIP addresses are local but nothing listens.
	vipWantRefused(t, netip.MustParseAddrPort("10.99.0.5:1883"))

	v := vipAttach(t, []netip.Prefix{netip.MustParsePrefix("10.99.0.0/28")}, [][2]uint16{{1883, 1884}}, fd)

	for _, s := range vipSocketTable(t) {
		if vipNet.Contains(s.local.Addr()) {
			t.Fatalf("socket table has %v (state %#x) bound in %v", s.local, s.state, vipNet)
		}
	}
	addrs, err := net.InterfaceAddrs()
	if err != nil {
		t.Fatal(err)
	}
	for _, a := range addrs {
		if p, err := netip.ParsePrefix(a.String()); err == nil && vipNet.Contains(p.Addr()) {
			t.Fatalf("interface address %v in %v: the VIP must not be assigned", a, vipNet)
		}
	}

	vipWantAccepted(t, ln, netip.MustParseAddrPort("10.99.0.5:1883"))
	vipWantAccepted(t, ln, netip.MustParseAddrPort("10.99.0.0:1883"))
	vipWantAccepted(t, ln, netip.MustParseAddrPort("10.99.0.15:1884"))
	vipWantRefused(t, netip.MustParseAddrPort("10.99.0.16:1883"))
	vipWantRefused(t, netip.MustParseAddrPort("10.99.0.20:1883"))
	vipWantRefused(t, netip.MustParseAddrPort("10.99.0.5:1885"))
	// The listener on 127.0.0.1:1885 is only reachable at its own address.
	if c, err := vipDial(netip.MustParseAddrPort("127.0.0.1:1885")); err != nil {
		t.Fatalf("127.0.0.1:1885: %v", err)
	} else {
		c.Close()
	}

	// While dispatching, the only LISTEN sockets are the two on 127.0.0.1.
	var listening []netip.AddrPort
	for _, s := range vipSocketTable(t) {
		if s.state == 0x0A {
			listening = append(listening, s.local)
		}
	}
	if len(listening) != 2 || listening[0].Addr() != netip.MustParseAddr("127.0.0.1") || listening[1].Addr() != netip.MustParseAddr("127.0.0.1") {
		t.Fatalf("LISTEN sockets = %v, want 127.0.0.1:1883 and 127.0.0.1:1885 only", listening)
	}

	// matched 3; not_vip 4 (10.99.0.16, .20, :1885, 127.0.0.1:1885).
	if err := testutil.CollectAndCompare(v.Collector(), strings.NewReader(fmt.Sprintf(vipWant, 3, 0, 4))); err != nil {
		t.Fatal(err)
	}

	// The listener closes: the kernel drops it from the SOCKMAP and the VIP
	// is refused, counted as no_socket.
	closeListener()
	vipWantRefused(t, netip.MustParseAddrPort("10.99.0.5:1883"))
	if err := testutil.CollectAndCompare(v.Collector(), strings.NewReader(fmt.Sprintf(vipWant, 3, 1, 4))); err != nil {
		t.Fatal(err)
	}
}

// TestVIPCloseDetaches: after Close no sk_lookup program is left on the
// namespace and the VIP is refused.
func TestVIPCloseDetaches(t *testing.T) {
	vipEnterNetns(t, netip.MustParsePrefix("10.99.0.0/24"))
	fd, ln, _ := vipListen(t, netip.MustParseAddrPort("127.0.0.1:1883"))
	v := vipAttach(t, []netip.Prefix{netip.MustParsePrefix("10.99.0.0/28")}, [][2]uint16{{1883, 1883}}, fd)
	vipWantAccepted(t, ln, netip.MustParseAddrPort("10.99.0.5:1883"))
	if n := vipAttached(t); n != 1 {
		t.Fatalf("%d sk_lookup programs attached, want 1", n)
	}
	if err := v.Close(); err != nil {
		t.Fatal(err)
	}
	if err := v.Close(); err != nil {
		t.Fatalf("second Close: %v", err)
	}
	if n := vipAttached(t); n != 0 {
		t.Fatalf("%d sk_lookup programs attached after Close, want 0", n)
	}
	vipWantRefused(t, netip.MustParseAddrPort("10.99.0.5:1883"))
}

// TestVIPSetupFailureLeavesNothing: a listener fd the SOCKMAP refuses (a UDP
// socket) fails AttachVIP with nothing attached.
func TestVIPSetupFailureLeavesNothing(t *testing.T) {
	vipEnterNetns(t, netip.MustParsePrefix("10.99.0.0/24"))
	// Probe that loading works at all (skip otherwise), then detach.
	fd, _, _ := vipListen(t, netip.MustParseAddrPort("127.0.0.1:1883"))
	vipAttach(t, []netip.Prefix{netip.MustParsePrefix("10.99.0.0/28")}, [][2]uint16{{1883, 1883}}, fd).Close()

	udp, err := unix.Socket(unix.AF_INET, unix.SOCK_DGRAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer unix.Close(udp)
	v, err := AttachVIP("", []netip.Prefix{netip.MustParsePrefix("10.99.0.0/28")}, [][2]uint16{{1883, 1883}}, udp)
	if err == nil {
		v.Close()
		t.Fatal("AttachVIP with a UDP socket succeeded")
	}
	if !strings.Contains(err.Error(), "SOCKMAP") {
		t.Fatalf("error does not say what failed: %v", err)
	}
	if n := vipAttached(t); n != 0 {
		t.Fatalf("%d sk_lookup programs attached after a failed AttachVIP, want 0", n)
	}
}

// vipAttached counts the sk_lookup programs attached to the calling
// thread's network namespace.
func vipAttached(t *testing.T) int {
	t.Helper()
	ns, err := os.Open("/proc/thread-self/ns/net")
	if err != nil {
		t.Fatal(err)
	}
	defer ns.Close()
	res, err := link.QueryPrograms(link.QueryOptions{Target: int(ns.Fd()), Attach: ebpf.AttachSkLookup})
	if err != nil {
		t.Fatal(err)
	}
	return len(res.Programs)
}

func TestVIPArguments(t *testing.T) {
	for _, tc := range []struct {
		name     string
		prefixes []netip.Prefix
		ports    [][2]uint16
	}{
		{"no prefixes", nil, [][2]uint16{{1883, 1883}}},
		{"no ports", []netip.Prefix{netip.MustParsePrefix("10.0.0.0/8")}, nil},
		{"port 0", []netip.Prefix{netip.MustParsePrefix("10.0.0.0/8")}, [][2]uint16{{0, 10}}},
		{"reversed range", []netip.Prefix{netip.MustParsePrefix("10.0.0.0/8")}, [][2]uint16{{20, 10}}},
		{"invalid prefix", []netip.Prefix{{}}, [][2]uint16{{1883, 1883}}},
		{"mapped prefix", []netip.Prefix{netip.MustParsePrefix("::ffff:10.0.0.0/104")}, [][2]uint16{{1883, 1883}}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			if v, err := AttachVIP("", tc.prefixes, tc.ports, -1); err == nil {
				v.Close()
				t.Fatal("AttachVIP succeeded")
			}
		})
	}
}

func TestVIPKeyAndPorts(t *testing.T) {
	k, err := vipKey(netip.MustParsePrefix("10.99.0.7/28"))
	if err != nil {
		t.Fatal(err)
	}
	want := [16]byte{10: 0xff, 11: 0xff, 12: 10, 13: 99, 14: 0, 15: 0}
	if k.Prefixlen != 96+28 || k.Addr != want {
		t.Fatalf("vipKey(10.99.0.7/28) = %d %v", k.Prefixlen, k.Addr)
	}
	k, err = vipKey(netip.MustParsePrefix("2001:db8::/32"))
	if err != nil || k.Prefixlen != 32 || k.Addr != netip.MustParseAddr("2001:db8::").As16() {
		t.Fatalf("vipKey(2001:db8::/32) = %v, %v", k, err)
	}

	bm, err := vipPortBitmap([][2]uint16{{1883, 1884}, {65535, 65535}, {63, 64}})
	if err != nil {
		t.Fatal(err)
	}
	set := 0
	for p := 0; p < 65536; p++ {
		if bm[p/64]&(1<<(p%64)) != 0 {
			set++
			switch p {
			case 63, 64, 1883, 1884, 65535:
			default:
				t.Errorf("port %d set", p)
			}
		}
	}
	if set != 5 {
		t.Fatalf("%d ports set, want 5", set)
	}
}
