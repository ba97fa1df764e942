package proxy

import (
	"encoding/binary"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"sync/atomic"
	"time"
	"unsafe"

	"golang.org/x/sys/unix"
)

// dialDefaultTimeout bounds a backend connect when DialConfig.Timeout is zero.
const dialDefaultTimeout = 5 * time.Second

// ErrNoSourcePort reports that connect(2) found no free local port: every
// ephemeral port of the source address is already in a connection to the same
// destination (EADDRNOTAVAIL). The error returned by Start also wraps
// unix.EADDRNOTAVAIL.
var ErrNoSourcePort = errors.New("no free source port")

// DialConfig configures a Dialer. The zero value dials with the kernel's
// choice of source address and a 5 s timeout.
type DialConfig struct {
	// SourceAddrs is the pool of local addresses backend connections are
	// bound to, used round robin per address family. One address can hold
	// only as many connections to one broker address as
	// net.ipv4.ip_local_port_range has ports (~28k by default); each further
	// address adds as many again. Empty (default): no bind, the kernel
	// chooses the source address. An IPv4 pool does not apply to IPv6
	// destinations and vice versa; a family with no addresses in the pool
	// dials unbound. IPv4-mapped IPv6 addresses count as IPv4.
	SourceAddrs []netip.Addr
	// Timeout bounds a connect from Start until Finish; the event loop
	// enforces it with its timer wheel. Zero (default): 5 s.
	Timeout time.Duration
	// QuickAck keeps the kernel's immediate ACK of the broker's SYN-ACK.
	// False (default): TCP_QUICKACK is turned off before connect, so the
	// handshake's last ACK is held back and leaves with the first bytes
	// written, the replayed CONNECT: one segment fewer per connect (what
	// HAProxy calls tcp-smart-connect). A broker never speaks before the
	// CONNECT, so nothing waits on the held ACK.
	QuickAck bool
}

// Dialer starts nonblocking TCP connects to backends for the event loop. It is
// safe for concurrent use by several loops.
type Dialer struct {
	timeout  time.Duration
	quickAck bool
	v4       []netip.Addr
	v6       []netip.Addr
	next4    atomic.Uint64
	next6    atomic.Uint64
}

// NewDialer checks that every source address can be bound on this host and
// returns a Dialer. An error names the offending address.
func NewDialer(cfg DialConfig) (*Dialer, error) {
	if cfg.Timeout < 0 {
		return nil, fmt.Errorf("dial timeout %v: must not be negative", cfg.Timeout)
	}
	d := &Dialer{timeout: cfg.Timeout, quickAck: cfg.QuickAck}
	if d.timeout == 0 {
		d.timeout = dialDefaultTimeout
	}
	seen := make(map[netip.Addr]bool, len(cfg.SourceAddrs))
	for _, a := range cfg.SourceAddrs {
		a = a.Unmap()
		if !a.IsValid() || a.IsUnspecified() || a.IsMulticast() {
			return nil, fmt.Errorf("dial source address %q: not a unicast address", a)
		}
		if seen[a] {
			return nil, fmt.Errorf("dial source address %s: listed twice", a)
		}
		seen[a] = true
		if err := dialProbeSource(a); err != nil {
			return nil, err
		}
		if a.Is4() {
			d.v4 = append(d.v4, a)
		} else {
			d.v6 = append(d.v6, a)
		}
	}
	return d, nil
}

// Timeout is the connect deadline the caller applies between Start and Finish.
func (d *Dialer) Timeout() time.Duration { return d.timeout }

// Start creates a nonblocking, close-on-exec TCP socket, sets TCP_NODELAY
// (MQTT packets are small and latency matters more than segment count) and,
// unless DialConfig.QuickAck, turns TCP_QUICKACK off, binds it to the next source address of dst's family with
// IP_BIND_ADDRESS_NO_PORT, and starts connect(2).
//
// IP_BIND_ADDRESS_NO_PORT defers the choice of the local port from bind to
// connect, where the kernel knows the destination and may reuse a port that
// is busy only towards other destinations; without it bind(addr:0) reserves a
// port for good and one source address holds ~28k connections in total
// instead of ~28k per destination.
//
// inProgress is true when connect returned EINPROGRESS (always, for TCP, even
// on loopback): wait for EPOLLOUT (or EPOLLERR/EPOLLHUP) and call Finish. When
// connect fails with EADDRNOTAVAIL the source address has no free port towards
// dst, so Start tries the next address of the pool, up to once each; when all
// are exhausted the error wraps ErrNoSourcePort. On error no fd is left open.
func (d *Dialer) Start(dst netip.AddrPort) (fd int, inProgress bool, err error) {
	dstIP := dst.Addr().Unmap()
	if !dstIP.IsValid() || dst.Port() == 0 {
		return -1, false, fmt.Errorf("dial %s: invalid destination", dst)
	}
	pool, next := d.v4, &d.next4
	if dstIP.Is6() {
		pool, next = d.v6, &d.next6
	}
	tries := max(1, len(pool))
	var src netip.Addr
	for range tries {
		if len(pool) > 0 {
			src = pool[(next.Add(1)-1)%uint64(len(pool))]
		}
		fd, inProgress, err = dialOne(dstIP, dst.Port(), src, d.quickAck)
		// Only a bare EADDRNOTAVAIL from connect means "no port left";
		// the same errno from bind (address gone) comes wrapped and is final.
		if err != unix.EADDRNOTAVAIL {
			return fd, inProgress, err
		}
	}
	if len(pool) <= 1 {
		return -1, false, fmt.Errorf("dial %s from %s: %w (%w)", dst, dialSrcName(src), ErrNoSourcePort, err)
	}
	return -1, false, fmt.Errorf("dial %s: all %d source addresses tried, last %s: %w (%w)",
		dst, len(pool), src, ErrNoSourcePort, err)
}

// Finish reports the outcome of a connect started by Start, read from
// SO_ERROR once epoll reported the socket writable or in error. EPOLLOUT alone
// does not mean the connect succeeded. A nil result means the connection is
// established. On error the caller closes fd.
func Finish(fd int) error {
	soerr, err := unix.GetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_ERROR)
	if err != nil {
		return fmt.Errorf("connect: getsockopt SO_ERROR: %w", err)
	}
	if soerr != 0 {
		return &net.OpError{Op: "connect", Net: "tcp", Err: unix.Errno(soerr)}
	}
	return nil
}

// dialOne makes one attempt from src (invalid src: no bind). A connect that
// fails with EADDRNOTAVAIL returns that errno unwrapped, so Start can move on
// to the next source address.
func dialOne(dst netip.Addr, port uint16, src netip.Addr, quickAck bool) (int, bool, error) {
	family := unix.AF_INET
	if dst.Is6() {
		family = unix.AF_INET6
	}
	// socket, setsockopt and connect are raw calls, like the loop's own
	// (see sysRead): none of them sleeps on a nonblocking socket, and a
	// loopback connect runs the whole handshake in the caller's context.
	r, _, e := unix.RawSyscall(unix.SYS_SOCKET, uintptr(family),
		unix.SOCK_STREAM|unix.SOCK_NONBLOCK|unix.SOCK_CLOEXEC, unix.IPPROTO_TCP)
	if e != 0 {
		return -1, false, fmt.Errorf("dial %s: socket: %w", netip.AddrPortFrom(dst, port), e)
	}
	fd := int(r)
	one := int32(1)
	if _, _, e := unix.RawSyscall6(unix.SYS_SETSOCKOPT, uintptr(fd), unix.IPPROTO_TCP, unix.TCP_NODELAY,
		uintptr(unsafe.Pointer(&one)), 4, 0); e != 0 {
		unix.Close(fd)
		return -1, false, fmt.Errorf("dial %s: TCP_NODELAY: %w", netip.AddrPortFrom(dst, port), e)
	}
	if !quickAck {
		zero := int32(0)
		if _, _, e := unix.RawSyscall6(unix.SYS_SETSOCKOPT, uintptr(fd), unix.IPPROTO_TCP, unix.TCP_QUICKACK,
			uintptr(unsafe.Pointer(&zero)), 4, 0); e != 0 {
			unix.Close(fd)
			return -1, false, fmt.Errorf("dial %s: TCP_QUICKACK: %w", netip.AddrPortFrom(dst, port), e)
		}
	}
	if src.IsValid() {
		if err := dialBind(fd, src); err != nil {
			unix.Close(fd)
			return -1, false, fmt.Errorf("dial %s: %w", netip.AddrPortFrom(dst, port), err)
		}
	}
	var rsa unix.RawSockaddrAny
	n, err := dialRawSockaddr(&rsa, dst, port)
	if err != nil {
		unix.Close(fd)
		return -1, false, fmt.Errorf("dial %s: %w", netip.AddrPortFrom(dst, port), err)
	}
	_, _, e = unix.RawSyscall(unix.SYS_CONNECT, uintptr(fd), uintptr(unsafe.Pointer(&rsa)), uintptr(n))
	switch e {
	case 0:
		return fd, false, nil
	case unix.EINPROGRESS, unix.EINTR:
		// EINTR on a nonblocking connect: the handshake goes on
		// asynchronously, exactly as with EINPROGRESS (connect(2)).
		return fd, true, nil
	case unix.EADDRNOTAVAIL:
		unix.Close(fd)
		return -1, false, unix.EADDRNOTAVAIL
	default:
		unix.Close(fd)
		return -1, false, &net.OpError{Op: "dial", Net: "tcp",
			Source: dialTCPAddr(src), Addr: net.TCPAddrFromAddrPort(netip.AddrPortFrom(dst, port)), Err: e}
	}
}

// dialRawSockaddr writes a and port into rsa, in the form connect(2) takes,
// and returns its length.
func dialRawSockaddr(rsa *unix.RawSockaddrAny, a netip.Addr, port uint16) (int, error) {
	if a.Is4() {
		sa := (*unix.RawSockaddrInet4)(unsafe.Pointer(rsa))
		sa.Family = unix.AF_INET
		binary.BigEndian.PutUint16((*[2]byte)(unsafe.Pointer(&sa.Port))[:], port)
		sa.Addr = a.As4()
		return unix.SizeofSockaddrInet4, nil
	}
	sa := (*unix.RawSockaddrInet6)(unsafe.Pointer(rsa))
	sa.Family = unix.AF_INET6
	binary.BigEndian.PutUint16((*[2]byte)(unsafe.Pointer(&sa.Port))[:], port)
	sa.Addr = a.As16()
	if z := a.Zone(); z != "" {
		// Link-local addresses need the interface (fe80::1%eth0).
		ifi, err := net.InterfaceByName(z)
		if err != nil {
			return 0, fmt.Errorf("zone of %s: %w", a, err)
		}
		sa.Scope_id = uint32(ifi.Index)
	}
	return unix.SizeofSockaddrInet6, nil
}

// dialBind binds fd to src with port 0 and IP_BIND_ADDRESS_NO_PORT, so the
// port is chosen at connect time per destination (see Start).
func dialBind(fd int, src netip.Addr) error {
	if err := unix.SetsockoptInt(fd, unix.IPPROTO_IP, unix.IP_BIND_ADDRESS_NO_PORT, 1); err != nil {
		return fmt.Errorf("IP_BIND_ADDRESS_NO_PORT: %w", err)
	}
	sa, err := dialSockaddr(src, 0)
	if err != nil {
		return fmt.Errorf("bind %s: %w", src, err)
	}
	if err := unix.Bind(fd, sa); err != nil {
		return fmt.Errorf("bind %s: %w", src, err)
	}
	return nil
}

// dialProbeSource binds a throwaway socket to a, which fails when a is not an
// address of this host (EADDRNOTAVAIL), so a typo in the pool fails at start.
// IP_BIND_ADDRESS_NO_PORT keeps the probe from taking a port.
func dialProbeSource(a netip.Addr) error {
	family := unix.AF_INET
	if a.Is6() {
		family = unix.AF_INET6
	}
	fd, err := unix.Socket(family, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, unix.IPPROTO_TCP)
	if err != nil {
		return fmt.Errorf("dial source address %s: socket: %w", a, err)
	}
	defer unix.Close(fd)
	if err := dialBind(fd, a); err != nil {
		return fmt.Errorf("dial source address %s: %w", a, err)
	}
	return nil
}

// dialSockaddr converts a to a fresh unix.Sockaddr. A fresh value per call:
// unix.Sockaddr implementations write their raw form into themselves, so one
// shared value would race between loops.
func dialSockaddr(a netip.Addr, port uint16) (unix.Sockaddr, error) {
	if a.Is4() {
		return &unix.SockaddrInet4{Port: int(port), Addr: a.As4()}, nil
	}
	sa := &unix.SockaddrInet6{Port: int(port), Addr: a.As16()}
	if z := a.Zone(); z != "" {
		// Link-local addresses need the interface (fe80::1%eth0).
		ifi, err := net.InterfaceByName(z)
		if err != nil {
			return nil, fmt.Errorf("zone of %s: %w", a, err)
		}
		sa.ZoneId = uint32(ifi.Index)
	}
	return sa, nil
}

func dialSrcName(src netip.Addr) string {
	if !src.IsValid() {
		return "any"
	}
	return src.String()
}

func dialTCPAddr(src netip.Addr) net.Addr {
	if !src.IsValid() {
		return nil
	}
	return &net.TCPAddr{IP: src.AsSlice(), Zone: src.Zone()}
}
