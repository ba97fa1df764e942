package proxy

import (
	"net"
	"net/netip"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/shardgate/shardgate/backend"
	"github.com/shardgate/shardgate/mqttwire"
)

// brokerSegsIn dials a fresh loopback listener with d, writes a CONNECT as
// soon as the connect completes (as the loop's replay does), and returns the
// number of segments the listener's accepted socket received up to that
// CONNECT (TCP_INFO tcpi_segs_in).
func brokerSegsIn(t *testing.T, d *Dialer) uint32 {
	t.Helper()
	ln, err := net.Listen("tcp4", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	fd, _, err := d.Start(netip.MustParseAddrPort(ln.Addr().String()))
	if err != nil {
		t.Fatal(err)
	}
	defer unix.Close(fd)
	if err := dialWaitConnected(t, fd); err != nil {
		t.Fatal(err)
	}
	pkt := mqttwire.AppendDisconnect(nil, mqttwire.Level311, 0)
	if _, err := unix.Write(fd, pkt); err != nil {
		t.Fatal(err)
	}
	c, err := ln.Accept()
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	_ = c.SetReadDeadline(time.Now().Add(5 * time.Second))
	if _, err := c.Read(make([]byte, 16)); err != nil {
		t.Fatal(err)
	}
	raw, err := c.(*net.TCPConn).SyscallConn()
	if err != nil {
		t.Fatal(err)
	}
	var info *unix.TCPInfo
	var serr error
	_ = raw.Control(func(s uintptr) { info, serr = unix.GetsockoptTCPInfo(int(s), unix.IPPROTO_TCP, unix.TCP_INFO) })
	if serr != nil {
		t.Fatal(serr)
	}
	return info.Segs_in
}

// TestDialSmartConnectSavesASegment: with QuickAck off (the default) the last
// ACK of the handshake leaves with the first bytes written, so the broker
// receives one segment fewer than from a dial that ACKs at once.
func TestDialSmartConnectSavesASegment(t *testing.T) {
	smart, err := NewDialer(DialConfig{})
	if err != nil {
		t.Fatal(err)
	}
	quick, err := NewDialer(DialConfig{QuickAck: true})
	if err != nil {
		t.Fatal(err)
	}
	// Several rounds: a write that the scheduler delays past the held
	// ACK's timer (40 ms or more) sends it alone once in a while, so most
	// rounds, not every one, must save the segment.
	var s, q uint32
	for range 5 {
		s += brokerSegsIn(t, smart)
		q += brokerSegsIn(t, quick)
	}
	t.Logf("segments received by the broker in 5 connects: smart %d, quick ACK %d", s, q)
	if s+3 > q {
		t.Errorf("smart connect: %d segments in 5 connects, want at least 3 fewer than the %d with quick ACKs", s, q)
	}
}

// TestDeferAcceptHoldsSilentClients: with connect.defer_accept the kernel
// keeps a client that has sent nothing, and hands it over with its first
// bytes; with 0s the proxy owns it at once.
func TestDeferAcceptHoldsSilentClients(t *testing.T) {
	bk := startRawBackend(t)
	for _, tc := range []struct {
		name     string
		deferred time.Duration
		want     int // connections the proxy owns while the client is silent
	}{
		{"defer 5s", 5 * time.Second, 0},
		{"off", 0, 1},
	} {
		t.Run(tc.name, func(t *testing.T) {
			px := startProxy(t, proxySetup{
				instances: []backend.Instance{inst("raw", bk.addr(), -1)},
				config: func(c *Config) {
					d := Duration(tc.deferred)
					c.Connect.DeferAccept = &d
				},
			})
			c, err := net.Dial("tcp", px.addr)
			if err != nil {
				t.Fatal(err)
			}
			defer c.Close()
			if tc.want == 1 {
				eventually(t, "the proxy owns the silent client", func() bool { return px.Active() == 1 })
			} else {
				time.Sleep(300 * time.Millisecond)
				if got := px.Active(); got != 0 {
					t.Fatalf("silent client: the proxy owns %d connections after 300 ms, want 0", got)
				}
			}
			if _, err := c.Write(connectPacket(mqttwire.Level311, "dev-1", 60)); err != nil {
				t.Fatal(err)
			}
			deadline := time.Now().Add(5 * time.Second)
			for px.Active() != 1 && time.Now().Before(deadline) {
				time.Sleep(5 * time.Millisecond)
			}
			if got := px.Active(); got != 1 {
				t.Fatalf("after the CONNECT: the proxy owns %d connections, want 1", got)
			}
		})
	}
}
