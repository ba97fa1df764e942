package proxy

import (
	"bufio"
	"bytes"
	"encoding/hex"
	"io"
	"math/rand/v2"
	"net"
	"net/netip"
	"strings"
	"testing"
	"time"

	proxyproto "github.com/pires/go-proxyproto"
)

// ppv2Hex turns an annotated fixture (hex bytes, "#" comments to end of line)
// into bytes.
func ppv2Hex(t *testing.T, s string) []byte {
	t.Helper()
	var clean strings.Builder
	for line := range strings.Lines(s) {
		line, _, _ = strings.Cut(line, "#")
		clean.WriteString(strings.Join(strings.Fields(line), ""))
	}
	b, err := hex.DecodeString(clean.String())
	if err != nil {
		t.Fatalf("fixture: %v", err)
	}
	return b
}

func TestProxyV2Fixtures(t *testing.T) {
	for _, tc := range []struct {
		name     string
		src, dst netip.AddrPort
		want     string
	}{
		{
			name: "tcp4",
			src:  netip.MustParseAddrPort("192.0.2.10:51234"),
			dst:  netip.MustParseAddrPort("198.51.100.1:1883"),
			want: `
				0d 0a 0d 0a 00 0d 0a 51 55 49 54 0a # signature \r\n\r\n\0\r\nQUIT\n
				21                                  # version 2, command PROXY
				11                                  # AF_INET, STREAM
				00 0c                               # 12 address bytes follow
				c0 00 02 0a                         # src 192.0.2.10
				c6 33 64 01                         # dst 198.51.100.1
				c8 22                               # src port 51234
				07 5b                               # dst port 1883`,
		},
		{
			name: "tcp4 from IPv4-mapped, as a dual-stack listener reports it",
			src:  netip.MustParseAddrPort("[::ffff:192.0.2.10]:51234"),
			dst:  netip.MustParseAddrPort("[::ffff:198.51.100.1]:8883"),
			want: `
				0d 0a 0d 0a 00 0d 0a 51 55 49 54 0a # signature
				21 11 00 0c                         # PROXY, TCP over IPv4, length 12
				c0 00 02 0a c6 33 64 01             # src, dst
				c8 22 22 b3                         # ports 51234, 8883`,
		},
		{
			name: "tcp6",
			src:  netip.MustParseAddrPort("[2001:db8::1]:40000"),
			dst:  netip.MustParseAddrPort("[2001:db8:ffff::2%eth0]:1883"),
			want: `
				0d 0a 0d 0a 00 0d 0a 51 55 49 54 0a             # signature
				21                                              # version 2, command PROXY
				21                                              # AF_INET6, STREAM
				00 24                                           # 36 address bytes follow
				20 01 0d b8 00 00 00 00 00 00 00 00 00 00 00 01 # src 2001:db8::1
				20 01 0d b8 ff ff 00 00 00 00 00 00 00 00 00 02 # dst, zone dropped
				9c 40                                           # src port 40000
				07 5b                                           # dst port 1883`,
		},
		{
			name: "mixed families: both as IPv6, the IPv4 one mapped",
			src:  netip.MustParseAddrPort("192.0.2.10:51234"),
			dst:  netip.MustParseAddrPort("[2001:db8::2]:1883"),
			want: `
				0d 0a 0d 0a 00 0d 0a 51 55 49 54 0a             # signature
				21 21 00 24                                     # PROXY, TCP over IPv6, length 36
				00 00 00 00 00 00 00 00 00 00 ff ff c0 00 02 0a # src ::ffff:192.0.2.10
				20 01 0d b8 00 00 00 00 00 00 00 00 00 00 00 02 # dst 2001:db8::2
				c8 22 07 5b                                     # ports`,
		},
		{
			name: "unknown source: LOCAL, no addresses",
			src:  netip.AddrPort{},
			dst:  netip.MustParseAddrPort("198.51.100.1:1883"),
			want: `
				0d 0a 0d 0a 00 0d 0a 51 55 49 54 0a # signature
				20                                  # version 2, command LOCAL
				00                                  # AF_UNSPEC, UNSPEC
				00 00                               # no address block`,
		},
	} {
		t.Run(tc.name, func(t *testing.T) {
			want := ppv2Hex(t, tc.want)
			prefix := []byte("keep")
			got := AppendProxyV2(prefix, tc.src, tc.dst)
			if !bytes.HasPrefix(got, []byte("keep")) {
				t.Fatalf("AppendProxyV2 overwrote dst: %q", got)
			}
			if got = got[4:]; !bytes.Equal(got, want) {
				t.Fatalf("AppendProxyV2(%s, %s)\n got %x\nwant %x", tc.src, tc.dst, got, want)
			}
			if len(got) > ProxyV2MaxLen {
				t.Errorf("header is %d bytes, above ProxyV2MaxLen %d", len(got), ProxyV2MaxLen)
			}
		})
	}
}

// ppv2Parse reads a header followed by a payload with go-proxyproto, an
// independent implementation (and the parser our broker uses), and checks
// that it consumed exactly the header.
func ppv2Parse(t *testing.T, hdr []byte) *proxyproto.Header {
	t.Helper()
	const payload = "\x10\x0cMQTT..." // stands in for the replayed CONNECT
	r := bufio.NewReader(io.MultiReader(bytes.NewReader(hdr), strings.NewReader(payload)))
	h, err := proxyproto.Read(r)
	if err != nil {
		t.Fatalf("go-proxyproto rejects %x: %v", hdr, err)
	}
	rest, _ := io.ReadAll(r)
	if string(rest) != payload {
		t.Fatalf("after the header go-proxyproto left %q, want the payload %q", rest, payload)
	}
	return h
}

func ppv2AddrPort(t *testing.T, a net.Addr) netip.AddrPort {
	t.Helper()
	ta, ok := a.(*net.TCPAddr)
	if !ok {
		t.Fatalf("address %v is %T, want *net.TCPAddr", a, a)
	}
	return ta.AddrPort()
}

// ppv2RandAddr returns a random IPv4, IPv4-mapped IPv6, or IPv6 address.
func ppv2RandAddr(r *rand.Rand) netip.Addr {
	var b [16]byte
	for i := range b {
		b[i] = byte(r.Uint32())
	}
	switch r.IntN(3) {
	case 0:
		return netip.AddrFrom4([4]byte(b[:4]))
	case 1: // as a dual-stack listener reports an IPv4 peer
		return netip.AddrFrom16(netip.AddrFrom4([4]byte(b[:4])).As16())
	default:
		return netip.AddrFrom16(b)
	}
}

// Every header, for random addresses of every family mix, parses with
// go-proxyproto back to the same endpoints.
func TestProxyV2RoundTripGoProxyproto(t *testing.T) {
	seed := uint64(time.Now().UnixNano())
	t.Logf("seed %d", seed)
	r := rand.New(rand.NewPCG(seed, 0x5eed))
	buf := make([]byte, 0, ProxyV2MaxLen)
	for i := range 20000 {
		s := ppv2RandAddr(r)
		d := ppv2RandAddr(r)
		src := netip.AddrPortFrom(s, uint16(r.Uint32()))
		dst := netip.AddrPortFrom(d, uint16(r.Uint32()))

		hdr := AppendProxyV2(buf[:0], src, dst)
		h := ppv2Parse(t, hdr)
		both4 := s.Unmap().Is4() && d.Unmap().Is4()
		wantProto, wantLen := proxyproto.TCPv6, 52
		if both4 {
			wantProto, wantLen = proxyproto.TCPv4, 28
		}
		if h.Version != 2 || h.Command != proxyproto.PROXY || h.TransportProtocol != wantProto || len(hdr) != wantLen {
			t.Fatalf("#%d %s → %s: version %d command %#x proto %#x len %d; want 2, PROXY, %#x, %d",
				i, src, dst, h.Version, h.Command, h.TransportProtocol, len(hdr), wantProto, wantLen)
		}
		gs, gd := ppv2AddrPort(t, h.SourceAddr), ppv2AddrPort(t, h.DestinationAddr)
		// Endpoints are equal up to IPv4-mapping: the header has one family.
		if gs.Addr().Unmap() != s.Unmap() || gs.Port() != src.Port() ||
			gd.Addr().Unmap() != d.Unmap() || gd.Port() != dst.Port() {
			t.Fatalf("#%d: wrote %s → %s, go-proxyproto read %s → %s", i, src, dst, gs, gd)
		}
	}
}

func TestProxyV2LocalParses(t *testing.T) {
	h := ppv2Parse(t, AppendProxyV2(nil, netip.AddrPort{}, netip.AddrPort{}))
	if h.Command != proxyproto.LOCAL || h.TransportProtocol != proxyproto.UNSPEC {
		t.Fatalf("command %#x proto %#x, want LOCAL UNSPEC", h.Command, h.TransportProtocol)
	}
}

// End to end over a real TCP connection into go-proxyproto's Listener, the
// way our broker accepts PROXY headers: the accepted connection reports the
// device's address, and the bytes after the header arrive untouched.
func TestProxyV2GoProxyprotoListener(t *testing.T) {
	for _, tc := range []struct{ network, laddr, device string }{
		{"tcp4", "127.0.0.1:0", "203.0.113.7:50001"},
		{"tcp6", "[::1]:0", "[2001:db8::7]:50002"},
	} {
		t.Run(tc.network, func(t *testing.T) {
			inner, err := net.Listen(tc.network, tc.laddr)
			if err != nil {
				t.Fatalf("listen: %v", err)
			}
			ln := &proxyproto.Listener{Listener: inner, ReadHeaderTimeout: 5 * time.Second}
			defer ln.Close()

			device := netip.MustParseAddrPort(tc.device)
			vip := ln.Addr().(*net.TCPAddr).AddrPort()
			connect := []byte{0x10, 0x0c, 0, 4, 'M', 'Q', 'T', 'T', 4, 2, 0, 60, 0, 0}
			go func() {
				c, err := net.Dial(tc.network, vip.String())
				if err != nil {
					return
				}
				defer c.Close()
				c.Write(append(AppendProxyV2(nil, device, vip), connect...))
				io.Copy(io.Discard, c)
			}()

			c, err := ln.Accept()
			if err != nil {
				t.Fatalf("accept: %v", err)
			}
			defer c.Close()
			c.SetDeadline(time.Now().Add(5 * time.Second))
			got := make([]byte, len(connect))
			if _, err := io.ReadFull(c, got); err != nil {
				t.Fatalf("read after header: %v", err)
			}
			if !bytes.Equal(got, connect) {
				t.Errorf("bytes after the header %x, want %x", got, connect)
			}
			if ra := ppv2AddrPort(t, c.RemoteAddr()); ra != device {
				t.Errorf("broker sees the device as %s, want %s", ra, device)
			}
			if la := ppv2AddrPort(t, c.LocalAddr()); la != vip {
				t.Errorf("broker sees the destination as %s, want %s", la, vip)
			}
		})
	}
}

func TestProxyV2NoAlloc(t *testing.T) {
	buf := make([]byte, 0, ProxyV2MaxLen)
	src := netip.MustParseAddrPort("[2001:db8::1]:1")
	dst := netip.MustParseAddrPort("192.0.2.1:1883")
	if n := testing.AllocsPerRun(100, func() { buf = AppendProxyV2(buf[:0], src, dst) }); n != 0 {
		t.Errorf("AppendProxyV2 into a buffer with room: %v allocs, want 0", n)
	}
}

func BenchmarkAppendProxyV2(b *testing.B) {
	buf := make([]byte, 0, ProxyV2MaxLen)
	src := netip.MustParseAddrPort("192.0.2.10:51234")
	dst := netip.MustParseAddrPort("198.51.100.1:1883")
	b.ReportAllocs()
	for b.Loop() {
		buf = AppendProxyV2(buf[:0], src, dst)
	}
}
