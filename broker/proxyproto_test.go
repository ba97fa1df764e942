package broker

import (
	"bytes"
	"context"
	"errors"
	"io"
	"net"
	"net/netip"
	"sync"
	"testing"
	"time"

	paho5 "github.com/eclipse/paho.golang/paho"
	mqtt "github.com/mochi-mqtt/server/v2"
	"github.com/mochi-mqtt/server/v2/packets"

	"github.com/shardgate/shardgate/proxy"
)

// remoteHook records the remote address mochi sees for each client id,
// before the CONNACK, so that it is there when the client has connected.
type remoteHook struct {
	mqtt.HookBase
	mu     sync.Mutex
	remote map[string]string
}

func (h *remoteHook) ID() string           { return "test-remote" }
func (h *remoteHook) Provides(b byte) bool { return b == mqtt.OnSessionEstablish }
func (h *remoteHook) get(id string) string { h.mu.Lock(); defer h.mu.Unlock(); return h.remote[id] }
func (h *remoteHook) OnSessionEstablish(cl *mqtt.Client, _ packets.Packet) {
	h.mu.Lock()
	defer h.mu.Unlock()
	h.remote[cl.ID] = cl.Net.Remote
}

// startProxied starts an instance behind ProxyProtocolListener with the
// given trusted prefixes.
func startProxied(t *testing.T, trusted ...string) (*Instance, *remoteHook) {
	t.Helper()
	var nets []netip.Prefix
	for _, s := range trusted {
		nets = append(nets, netip.MustParsePrefix(s))
	}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	rh := &remoteHook{remote: map[string]string{}}
	f := newRedisFleet(t)
	inst := f.start("s0", 0, 1, func(c *Config) {
		c.Listener = ProxyProtocolListener(ln, nets)
		c.Hooks = append(c.Hooks, rh)
	})
	return inst, rh
}

// connectWith dials addr, writes header (if any), then connects an MQTT 5
// client over the same connection.
func connectWith(t *testing.T, addr netip.AddrPort, header []byte, id string) (*paho5.Connack, error) {
	t.Helper()
	conn, err := net.Dial("tcp", addr.String())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = conn.Close() })
	if _, err := conn.Write(header); err != nil {
		t.Fatal(err)
	}
	c := paho5.NewClient(paho5.ClientConfig{ClientID: id, Conn: conn})
	ctx, cancel := context.WithTimeout(context.Background(), waitFor)
	defer cancel()
	ca, err := c.Connect(ctx, &paho5.Connect{ClientID: id, KeepAlive: 30, CleanStart: true})
	if err == nil {
		t.Cleanup(func() { _ = c.Disconnect(&paho5.Disconnect{}) })
	}
	return ca, err
}

var (
	device    = netip.MustParseAddrPort("203.0.113.7:40001")
	brokerAP  = netip.MustParseAddrPort("192.0.2.1:1883")
	device6   = netip.MustParseAddrPort("[2001:db8::7]:40002")
	headerV1  = []byte("PROXY TCP4 198.51.100.9 192.0.2.1 5555 1883\r\n")
	headerV2  = proxy.AppendProxyV2(nil, device, brokerAP)
	headerV26 = proxy.AppendProxyV2(nil, device6, netip.MustParseAddrPort("[2001:db8::1]:1883"))
)

// The proxy's header, from a trusted source, gives the broker the device's
// address; v1 headers are accepted too, and a trusted source may connect
// without one.
func TestProxyProtocolTrusted(t *testing.T) {
	inst, rh := startProxied(t, "10.0.0.0/8", "127.0.0.1/32")
	for _, tc := range []struct {
		id     string
		header []byte
		want   string
	}{
		{"v2", headerV2, device.String()},
		{"v2-ipv6", headerV26, device6.String()},
		{"v1", headerV1, "198.51.100.9:5555"},
		{"none", nil, "127.0.0.1:"},
	} {
		if _, err := connectWith(t, inst.Addr(), tc.header, tc.id); err != nil {
			t.Errorf("%s: connect: %v", tc.id, err)
			continue
		}
		got := rh.get(tc.id)
		if tc.header == nil {
			if ap, err := netip.ParseAddrPort(got); err != nil || ap.Addr() != netip.MustParseAddr("127.0.0.1") {
				t.Errorf("%s: broker saw %q, want the socket's own 127.0.0.1", tc.id, got)
			}
		} else if got != tc.want {
			t.Errorf("%s: broker saw %q, want %q", tc.id, got, tc.want)
		}
	}
}

// A header from a source that is not trusted is refused: the connection is
// closed before any CONNACK. Without a header, the same source is served
// as itself.
func TestProxyProtocolUntrusted(t *testing.T) {
	// An IPv4-mapped prefix that does not hold 127.0.0.1, and one that
	// is not loopback at all.
	inst, rh := startProxied(t, "10.0.0.0/8", "::ffff:192.168.0.0/112")
	for _, h := range [][]byte{headerV2, headerV1} {
		conn, err := net.Dial("tcp", inst.Addr().String())
		if err != nil {
			t.Fatal(err)
		}
		// Header and a whole CONNECT: the broker must not answer it.
		if _, err := conn.Write(append(append([]byte{}, h...), connectBytes("forged")...)); err != nil {
			t.Fatal(err)
		}
		_ = conn.SetReadDeadline(time.Now().Add(waitFor))
		n, err := conn.Read(make([]byte, 64))
		var ne net.Error
		if n != 0 || err == nil || errors.As(err, &ne) && ne.Timeout() {
			t.Errorf("header from an untrusted source: read %d bytes, %v; want the connection closed", n, err)
		}
		_ = conn.Close()
	}
	if got := rh.get("forged"); got != "" {
		t.Errorf("a client with a forged header connected from %q", got)
	}
	if _, err := connectWith(t, inst.Addr(), nil, "plain"); err != nil {
		t.Fatalf("headerless client: %v", err)
	}
	if ap, err := netip.ParseAddrPort(rh.get("plain")); err != nil || ap.Addr() != netip.MustParseAddr("127.0.0.1") {
		t.Errorf("headerless client seen from %q, want 127.0.0.1", rh.get("plain"))
	}
}

// A trusted client that sends nothing holds up neither accept nor other
// clients, and its header wait ends after proxyHeaderTimeout.
func TestProxyProtocolSilentClient(t *testing.T) {
	old := proxyHeaderTimeout
	proxyHeaderTimeout = 200 * time.Millisecond
	t.Cleanup(func() { proxyHeaderTimeout = old })
	inst, rh := startProxied(t, "127.0.0.0/8")

	silent, err := net.Dial("tcp", inst.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	defer silent.Close()
	start := time.Now()
	if _, err := connectWith(t, inst.Addr(), headerV2, "next"); err != nil {
		t.Fatalf("client after a silent one: %v", err)
	}
	if d := time.Since(start); d > proxyHeaderTimeout {
		t.Errorf("client after a silent one waited %v", d)
	}
	if got := rh.get("next"); got != device.String() {
		t.Errorf("broker saw %q, want %q", got, device)
	}
	// Past the header timeout the silent connection is an ordinary one
	// with no header: a CONNECT now is served as from itself.
	time.Sleep(2 * proxyHeaderTimeout)
	if _, err := silent.Write(connectBytes("late")); err != nil {
		t.Fatal(err)
	}
	_ = silent.SetReadDeadline(time.Now().Add(waitFor))
	if _, err := io.ReadFull(silent, make([]byte, 2)); err != nil {
		t.Fatalf("silent client's late CONNECT: %v", err)
	}
	waitUntil(t, "late client seen", func() bool { return rh.get("late") != "" })
}

func TestPeerAddr(t *testing.T) {
	for _, tc := range []struct {
		in   net.Addr
		want string
	}{
		{&net.TCPAddr{IP: net.ParseIP("::ffff:10.1.2.3"), Port: 1}, "10.1.2.3"},
		{&net.TCPAddr{IP: net.ParseIP("fe80::1"), Port: 1, Zone: "eth0"}, "fe80::1"},
		{&net.UnixAddr{Name: "@x", Net: "unix"}, ""},
		{nil, ""},
	} {
		got, err := peerAddr(tc.in)
		if tc.want == "" {
			if err == nil {
				t.Errorf("peerAddr(%v) = %v, want an error", tc.in, got)
			}
			continue
		}
		if err != nil || got.String() != tc.want {
			t.Errorf("peerAddr(%v) = %v, %v; want %s", tc.in, got, err, tc.want)
		}
	}
}

// connectBytes is an MQTT 3.1.1 CONNECT, clean session, keep alive 30 s.
func connectBytes(id string) []byte {
	var pk packets.Packet
	pk.FixedHeader.Type = packets.Connect
	pk.ProtocolVersion = 4
	pk.Connect.ProtocolName = []byte("MQTT")
	pk.Connect.Clean = true
	pk.Connect.Keepalive = 30
	pk.Connect.ClientIdentifier = id
	var b bytes.Buffer
	if err := pk.ConnectEncode(&b); err != nil {
		panic(err)
	}
	return b.Bytes()
}
