package proxy

import (
	"encoding/binary"
	"fmt"
	"net/netip"
	"time"
	"unsafe"

	"golang.org/x/sys/unix"
)

// listenBacklog is the accept queue of each listener socket. A reconnect
// storm arrives faster than one loop turn; the kernel caps it at
// net.core.somaxconn.
const listenBacklog = 4096

// listener is one device-facing socket of one loop. Every loop has its own
// socket per configured address, all bound with SO_REUSEPORT, and the kernel
// spreads new connections over them.
type listener struct {
	fd     int
	addr   netip.AddrPort
	paused bool // out of epoll for now (loop.pauseListener)
}

// listenSocket opens a nonblocking, close-on-exec TCP listener on addr with
// SO_REUSEADDR and SO_REUSEPORT. These are raw sockets, not net.Listen: Go
// 1.24+ makes net listeners MPTCP by default, which breaks reuseport eBPF and
// sockmaps (DESIGN.md, pitfalls); a socket(2) with IPPROTO_TCP is plain TCP.
// IPv6 listeners set IPV6_V6ONLY so "[::]:1883" and "0.0.0.0:1883" can be
// listed side by side. Listeners set TCP_NODELAY, which accepted sockets
// inherit: MQTT packets are small and latency-bound.
//
// A positive deferAccept sets TCP_DEFER_ACCEPT: the kernel completes the
// handshake but hands the connection over only once its first bytes (the
// CONNECT: an MQTT client always speaks first) have arrived, so the accept,
// the first read and the CONNECT arrive in one wakeup, and a silent client
// costs a request socket in the kernel instead of an fd and a loop turn. A
// client still silent after about deferAccept is handed over anyway (Linux
// counts it in SYN-ACK retransmissions), and connect.timeout applies from
// then on.
func listenSocket(addr netip.AddrPort, deferAccept time.Duration) (int, netip.AddrPort, error) {
	family := unix.AF_INET
	if addr.Addr().Is6() && !addr.Addr().Is4In6() {
		family = unix.AF_INET6
	}
	fd, err := unix.Socket(family, unix.SOCK_STREAM|unix.SOCK_NONBLOCK|unix.SOCK_CLOEXEC, unix.IPPROTO_TCP)
	if err != nil {
		return -1, addr, fmt.Errorf("listen %s: socket: %w", addr, err)
	}
	fail := func(what string, err error) (int, netip.AddrPort, error) {
		unix.Close(fd)
		return -1, addr, fmt.Errorf("listen %s: %s: %w", addr, what, err)
	}
	if err := unix.SetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_REUSEADDR, 1); err != nil {
		return fail("SO_REUSEADDR", err)
	}
	if err := unix.SetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_REUSEPORT, 1); err != nil {
		return fail("SO_REUSEPORT", err)
	}
	if family == unix.AF_INET6 {
		if err := unix.SetsockoptInt(fd, unix.IPPROTO_IPV6, unix.IPV6_V6ONLY, 1); err != nil {
			return fail("IPV6_V6ONLY", err)
		}
	}
	if err := unix.SetsockoptInt(fd, unix.IPPROTO_TCP, unix.TCP_NODELAY, 1); err != nil {
		return fail("TCP_NODELAY", err)
	}
	if deferAccept > 0 {
		secs := int((deferAccept + time.Second - 1) / time.Second)
		if err := unix.SetsockoptInt(fd, unix.IPPROTO_TCP, unix.TCP_DEFER_ACCEPT, secs); err != nil {
			return fail("TCP_DEFER_ACCEPT", err)
		}
	}
	if err := unix.Bind(fd, sockaddrOf(addr)); err != nil {
		return fail("bind", err)
	}
	if err := unix.Listen(fd, listenBacklog); err != nil {
		return fail("listen", err)
	}
	sa, err := unix.Getsockname(fd)
	if err != nil {
		return fail("getsockname", err)
	}
	return fd, addrPortOf(sa), nil
}

// sockaddrOf converts an address to a fresh unix.Sockaddr (fresh: the
// implementations write their raw form into themselves).
func sockaddrOf(a netip.AddrPort) unix.Sockaddr {
	ip := a.Addr()
	if ip.Is4() || ip.Is4In6() {
		return &unix.SockaddrInet4{Port: int(a.Port()), Addr: ip.Unmap().As4()}
	}
	return &unix.SockaddrInet6{Port: int(a.Port()), Addr: ip.As16()}
}

// addrPortOf converts a socket address from accept or getsockname. IPv4
// peers of an IPv6 socket (possible only without IPV6_V6ONLY) are unmapped.
func addrPortOf(sa unix.Sockaddr) netip.AddrPort {
	switch sa := sa.(type) {
	case *unix.SockaddrInet4:
		return netip.AddrPortFrom(netip.AddrFrom4(sa.Addr), uint16(sa.Port))
	case *unix.SockaddrInet6:
		return netip.AddrPortFrom(netip.AddrFrom16(sa.Addr).Unmap(), uint16(sa.Port))
	}
	return netip.AddrPort{}
}

// addrPortOfRaw is addrPortOf for a raw socket address, as accept4 fills it.
func addrPortOfRaw(rsa *unix.RawSockaddrAny) netip.AddrPort {
	switch rsa.Addr.Family {
	case unix.AF_INET:
		sa := (*unix.RawSockaddrInet4)(unsafe.Pointer(rsa))
		port := binary.BigEndian.Uint16((*[2]byte)(unsafe.Pointer(&sa.Port))[:])
		return netip.AddrPortFrom(netip.AddrFrom4(sa.Addr), port)
	case unix.AF_INET6:
		sa := (*unix.RawSockaddrInet6)(unsafe.Pointer(rsa))
		port := binary.BigEndian.Uint16((*[2]byte)(unsafe.Pointer(&sa.Port))[:])
		return netip.AddrPortFrom(netip.AddrFrom16(sa.Addr).Unmap(), port)
	}
	return netip.AddrPort{}
}
