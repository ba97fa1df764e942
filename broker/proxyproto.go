package broker

import (
	"errors"
	"fmt"
	"net"
	"net/netip"
	"slices"
	"time"

	"github.com/pires/go-proxyproto"
)

// proxyHeaderTimeout bounds how long a connection may take to send its
// PROXY header (or the first bytes that show it has none). The header is
// read in the connection's own goroutine, on its first read (mochi asks
// for the remote address first thing), never in the accept loop, so a
// silent client holds up only itself; the timeout bounds even that. A var
// so that tests can shorten it.
var proxyHeaderTimeout = 5 * time.Second

// ProxyProtocolListener wraps ln so that connections from a trusted source
// (the proxies) may start with a PROXY protocol header, v1 or v2: the
// connection's RemoteAddr is then the device's address the header gives.
// Trusted sources may also connect without a header (an operator's
// client, a health check): their own address is used.
//
// A connection from any other source that sends a header is refused: its
// first read fails and the broker closes it; anyone could claim any
// address otherwise. Without a header it is served normally, with its own
// address. trusted may be empty (every header refused); IPv4-mapped IPv6
// peers are matched as IPv4.
func ProxyProtocolListener(ln net.Listener, trusted []netip.Prefix) net.Listener {
	nets := make([]netip.Prefix, 0, len(trusted))
	for _, p := range trusted {
		if p.Addr().Is4In6() {
			// ::ffff:10.0.0.0/104 is 10.0.0.0/8.
			if bits := p.Bits() - 96; bits >= 0 {
				p = netip.PrefixFrom(p.Addr().Unmap(), bits)
			}
		}
		nets = append(nets, p.Masked())
	}
	return &proxyproto.Listener{
		Listener:          ln,
		ConnPolicy:        trustPolicy(nets),
		ReadHeaderTimeout: proxyHeaderTimeout,
	}
}

// trustPolicy returns the go-proxyproto policy: USE a header from a
// trusted source, REJECT one from anyone else. (REQUIRE would refuse
// trusted headerless connections; SKIP would hand an untrusted header to
// mochi as bytes, and IGNORE would accept it silently.)
func trustPolicy(trusted []netip.Prefix) proxyproto.ConnPolicyFunc {
	return func(o proxyproto.ConnPolicyOptions) (proxyproto.Policy, error) {
		src, err := peerAddr(o.Upstream)
		if err != nil {
			// Wrapping ErrInvalidUpstream closes only this connection;
			// Accept goes on.
			return proxyproto.REJECT, fmt.Errorf("%w: %w", proxyproto.ErrInvalidUpstream, err)
		}
		if slices.ContainsFunc(trusted, func(p netip.Prefix) bool { return p.Contains(src) }) {
			return proxyproto.USE, nil
		}
		return proxyproto.REJECT, nil
	}
}

// peerAddr returns a connection's peer IP, IPv4-mapped addresses unmapped
// and zones dropped (prefixes never match a zoned address).
func peerAddr(a net.Addr) (netip.Addr, error) {
	if a == nil {
		return netip.Addr{}, errors.New("no peer address")
	}
	var ap netip.AddrPort
	if t, ok := a.(*net.TCPAddr); ok {
		ap = t.AddrPort()
	} else {
		var err error
		if ap, err = netip.ParseAddrPort(a.String()); err != nil {
			return netip.Addr{}, fmt.Errorf("peer address %q: %w", a, err)
		}
	}
	return ap.Addr().Unmap().WithZone(""), nil
}
