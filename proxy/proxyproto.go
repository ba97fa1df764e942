package proxy

import "net/netip"

// PROXY protocol version 2, as specified by HAProxy in doc/proxy-protocol.txt
// (https://www.haproxy.org/download/3.0/doc/proxy-protocol.txt), section 2.2.
// The proxy writes one header at the start of every backend connection, before
// the replayed CONNECT, so the broker sees the device's address instead of
// ours. Only the binary version 2 is sent: it is fixed-size and needs no text
// formatting.
const (
	// ppv2Sig is the 12-byte signature; it cannot start an MQTT packet or
	// any other common protocol (section 2.2).
	ppv2Sig = "\r\n\r\n\x00\r\nQUIT\n"

	ppv2CmdLocal = 0x20 // version 2 (high nibble), command LOCAL
	ppv2CmdProxy = 0x21 // version 2, command PROXY

	ppv2FamUnspec = 0x00 // AF_UNSPEC, UNSPEC transport
	ppv2FamTCP4   = 0x11 // AF_INET (high nibble), STREAM (low nibble)
	ppv2FamTCP6   = 0x21 // AF_INET6, STREAM

	ppv2LenTCP4 = 4 + 4 + 2 + 2   // src addr, dst addr, src port, dst port
	ppv2LenTCP6 = 16 + 16 + 2 + 2 // same for IPv6

	// ProxyV2MaxLen is the most bytes AppendProxyV2 appends (a TCP over
	// IPv6 header), for sizing buffers.
	ProxyV2MaxLen = len(ppv2Sig) + 4 + ppv2LenTCP6
)

// AppendProxyV2 appends a PROXY protocol v2 header announcing a TCP connection
// from src (the device) to dstAddr (the address the device connected to) and
// returns the extended slice. It does not allocate when dst has room for
// ProxyV2MaxLen more bytes.
//
// Both addresses IPv4 (IPv4-mapped IPv6 counts as IPv4, as a dual-stack
// listener reports them): TCP over IPv4, 28 bytes. Otherwise TCP over IPv6,
// 52 bytes, with an IPv4 address written IPv4-mapped (::ffff:a.b.c.d), since
// the header has one family for both. IPv6 zones are dropped: the header has
// no place for them.
//
// If either address is invalid (unknown), the header carries the LOCAL
// command with no addresses, which tells the receiver to use the connection's
// own endpoints (section 2.2) rather than trust made-up ones.
func AppendProxyV2(dst []byte, src, dstAddr netip.AddrPort) []byte {
	dst = append(dst, ppv2Sig...)
	s, d := src.Addr().Unmap(), dstAddr.Addr().Unmap()
	switch {
	case !s.IsValid() || !d.IsValid():
		return append(dst, ppv2CmdLocal, ppv2FamUnspec, 0, 0)
	case s.Is4() && d.Is4():
		dst = append(dst, ppv2CmdProxy, ppv2FamTCP4, 0, ppv2LenTCP4)
		s4, d4 := s.As4(), d.As4()
		dst = append(dst, s4[:]...)
		dst = append(dst, d4[:]...)
	default:
		dst = append(dst, ppv2CmdProxy, ppv2FamTCP6, 0, ppv2LenTCP6)
		// As16 of an IPv4 address is its IPv4-mapped form.
		s16, d16 := s.As16(), d.As16()
		dst = append(dst, s16[:]...)
		dst = append(dst, d16[:]...)
	}
	sp, dp := src.Port(), dstAddr.Port()
	return append(dst, byte(sp>>8), byte(sp), byte(dp>>8), byte(dp))
}
