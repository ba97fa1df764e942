package proxy

import (
	"bytes"
	"crypto/sha256"
	"io"
	"net"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus/testutil"
	"golang.org/x/sys/unix"

	"github.com/shardgate/shardgate/backend"
	"github.com/shardgate/shardgate/mqttwire"
)

// noCloseWait passes a device's FIN after its DISCONNECT on at once
// (dial.close_wait 0s), for raw backends that do not close on DISCONNECT.
func noCloseWait(c *Config) {
	d := Duration(0)
	c.Dial.CloseWait = &d
}

// oneRawBackend starts a proxy in front of one raw TCP backend.
func oneRawBackend(t *testing.T, config func(*Config)) (*testProxy, *rawBackend) {
	t.Helper()
	b := startRawBackend(t)
	p := startProxy(t, proxySetup{
		instances: []backend.Instance{inst("raw", b.addr(), -1)},
		config:    config,
	})
	return p, b
}

// The broker receives exactly the bytes the device sent: the CONNECT and
// whatever followed it in the same segment, not re-encoded; with PROXY v2 on,
// preceded by a header naming the device and the address it connected to.
func TestReplayUnchanged(t *testing.T) {
	for _, tc := range []struct {
		name  string
		level byte
		ppv2  bool
	}{
		{"3.1.1", mqttwire.Level311, false},
		{"3.1", mqttwire.Level31, false},
		{"5.0", mqttwire.Level5, false},
		{"5.0+proxyv2", mqttwire.Level5, true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			p, b := oneRawBackend(t, func(c *Config) {
				if tc.ppv2 {
					c.ProxyProtocol.Send = "v2"
				}
			})
			dev := dialProxy(t, p.addr)
			connect := mqttwire.AppendConnect(nil, mqttwire.ConnectOptions{
				Level: tc.level, ClientID: "replay-" + tc.name, CleanStart: true, KeepAlive: 30,
				Username: "u", Password: "secret",
			})
			// A PUBLISH sent right behind the CONNECT, before any CONNACK.
			publish := []byte{0x30, 0x07, 0x00, 0x03, 'a', '/', 'b', 'h', 'i'}
			if tc.level == mqttwire.Level5 {
				publish = []byte{0x30, 0x08, 0x00, 0x03, 'a', '/', 'b', 0x00, 'h', 'i'}
			}
			sent := append(append([]byte(nil), connect...), publish...)
			if _, err := dev.Write(sent); err != nil {
				t.Fatal(err)
			}
			bk := b.accept(t)
			want := sent
			if tc.ppv2 {
				src := dev.LocalAddr().(*net.TCPAddr).AddrPort()
				dst := dev.RemoteAddr().(*net.TCPAddr).AddrPort()
				want = append(AppendProxyV2(nil, src, dst), sent...)
			}
			got := readFull(t, bk, len(want))
			if !bytes.Equal(got, want) {
				t.Fatalf("broker got\n%x\nwant\n%x", got, want)
			}
			// And the other way: what the broker says reaches the device.
			connack := mqttwire.AppendConnack(nil, tc.level, false, mqttwire.Success)
			bk.Write(connack)
			if got := readFull(t, dev, len(connack)); !bytes.Equal(got, connack) {
				t.Fatalf("device got %x, want %x", got, connack)
			}
			counterIs(t, "connects_total{ok}", p.connects(resultOK), 1)
			counterIs(t, "packets_total{upstream}", p.metrics.pktUp, 2)
			counterIs(t, "packets_total{downstream}", p.metrics.pktDown, 1)
			counterIs(t, "bytes_total{upstream}", p.metrics.up, float64(len(sent)))
			counterIs(t, "bytes_total{downstream}", p.metrics.down, float64(len(connack)))
			if n := testutil.ToFloat64(p.metrics.ConnectionsActive.WithLabelValues("-1", "raw")); n != 1 {
				t.Fatalf("connections_active = %v, want 1", n)
			}
			if n := testutil.CollectAndCount(p.metrics.Handoff); n != 1 {
				t.Fatalf("handoff_seconds series = %d", n)
			}
			dev.Close()
			bk.Close()
			eventually(t, "connection closed", func() bool { return p.Active() == 0 })
			if n := testutil.ToFloat64(p.metrics.ConnectionsActive.WithLabelValues("-1", "raw")); n != 0 {
				t.Fatalf("connections_active = %v after close, want 0", n)
			}
		})
	}
}

// A device that shuts its write side still receives everything the broker
// sends afterwards; the broker sees the FIN. And the mirror image: the broker
// half-closes, the device keeps sending.
func TestHalfClose(t *testing.T) {
	p, b := oneRawBackend(t, nil)
	payload := bytes.Repeat([]byte("0123456789abcdef"), 64<<10) // 1 MiB

	t.Run("device first", func(t *testing.T) {
		dev := dialProxy(t, p.addr)
		connect := connectPacket(mqttwire.Level311, "half-dev", 0)
		dev.Write(connect)
		bk := b.accept(t)
		readFull(t, bk, len(connect))
		if err := dev.CloseWrite(); err != nil {
			t.Fatal(err)
		}
		// The broker sees EOF...
		bk.SetReadDeadline(time.Now().Add(5 * time.Second))
		if n, err := bk.Read(make([]byte, 1)); n != 0 || err != io.EOF {
			t.Fatalf("broker read after device FIN: n=%d err=%v, want EOF", n, err)
		}
		// ...and can still send a lot, all of which arrives.
		go func() {
			bk.Write(payload)
			bk.CloseWrite()
		}()
		got := readUntilClosed(t, dev, 10*time.Second)
		if !bytes.Equal(got, payload) {
			t.Fatalf("device got %d bytes, want %d, equal=%v", len(got), len(payload), bytes.Equal(got, payload))
		}
		eventually(t, "both closed", func() bool { return p.Active() == 0 })
	})

	t.Run("broker first", func(t *testing.T) {
		dev := dialProxy(t, p.addr)
		connect := connectPacket(mqttwire.Level311, "half-bk", 0)
		dev.Write(connect)
		bk := b.accept(t)
		readFull(t, bk, len(connect))
		bk.Write([]byte{0x20, 0x02, 0x00, 0x00})
		bk.CloseWrite()
		if got := readUntilClosed(t, dev, 5*time.Second); !bytes.Equal(got, []byte{0x20, 0x02, 0x00, 0x00}) {
			t.Fatalf("device got %x before EOF", got)
		}
		go func() {
			dev.Write(payload)
			dev.CloseWrite()
		}()
		got := readUntilClosed(t, bk, 10*time.Second)
		if !bytes.Equal(got, payload) {
			t.Fatalf("broker got %d bytes, want %d", len(got), len(payload))
		}
		eventually(t, "both closed", func() bool { return p.Active() == 0 })
	})
}

// A peer that does not read makes the proxy stop reading the other side: the
// writer blocks, and the proxy holds at most one lent buffer for that
// direction. When the reader reads again, every byte arrives, in order. Both
// directions: a broker that stalls on a device's upload, and a device that
// stalls on a broker's download.
func TestBackpressure(t *testing.T) {
	for _, up := range []bool{true, false} {
		name := map[bool]string{true: "upstream", false: "downstream"}[up]
		t.Run(name, func(t *testing.T) {
			p, b := oneRawBackend(t, nil)
			dev := dialProxy(t, p.addr)
			connect := connectPacket(mqttwire.Level311, "stall-"+name, 0)
			dev.Write(connect)
			bk := b.accept(t)
			readFull(t, bk, len(connect))
			writer, reader := dev, bk
			if !up {
				writer, reader = bk, dev
			}
			written := stallAndDrain(t, p, writer, reader)
			bytesDir := p.metrics.up
			want := len(connect) + written
			if !up {
				bytesDir, want = p.metrics.down, written
			}
			counterIs(t, "bytes_total{"+name+"}", bytesDir, float64(want))
		})
	}
}

// stallAndDrain writes to writer until it blocks (reader is not read), checks
// the proxy lent one buffer, then drains reader while writing more, at least
// 20 MB in all, and compares what arrived. It returns the bytes written.
func stallAndDrain(t *testing.T, p *testProxy, writer, reader *net.TCPConn) int {
	t.Helper()
	const total = 50 << 20
	chunk := make([]byte, 1<<20)
	for i := range chunk {
		chunk[i] = byte(i * 7)
	}
	// Framed as one huge PUBLISH, so the framer runs across reads.
	hdr := []byte{0x30, 0xff, 0xff, 0xff, 0x7f} // remaining length 268435455
	sum := sha256.New()
	sum.Write(hdr)
	written := 0
	writer.SetWriteDeadline(time.Now().Add(1 * time.Second))
	n, err := writer.Write(hdr)
	written += n
	for err == nil && written < total {
		n, err = writer.Write(chunk)
		sum.Write(chunk[:n])
		written += n
	}
	if err == nil {
		t.Fatalf("wrote all %d bytes to a peer that reads nothing", written)
	}
	if ne, ok := err.(net.Error); !ok || !ne.Timeout() {
		t.Fatalf("write: %v, want a timeout (blocked)", err)
	}
	// Kernel buffers on three sockets plus one lent 64 KiB buffer: far
	// below what the writer wanted to send.
	if written > 30<<20 {
		t.Fatalf("wrote %d bytes before blocking", written)
	}
	counterIs(t, "relay_buffers", p.metrics.RelayBuffers, 1)
	t.Logf("writer blocked after %d bytes", written)

	got := sha256.New()
	done := make(chan int64)
	go func() {
		n, _ := io.Copy(got, reader)
		done <- n
	}()
	writer.SetWriteDeadline(time.Now().Add(20 * time.Second))
	for target := max(written+5<<20, 20<<20); written < target; {
		n, err := writer.Write(chunk)
		sum.Write(chunk[:n])
		written += n
		if err != nil {
			t.Fatalf("write after the reader resumed: %v", err)
		}
	}
	writer.CloseWrite()
	select {
	case n := <-done:
		if n != int64(written) {
			t.Fatalf("reader got %d bytes, writer wrote %d", n, written)
		}
	case <-time.After(20 * time.Second):
		t.Fatal("reader did not get EOF")
	}
	if !bytes.Equal(got.Sum(nil), sum.Sum(nil)) {
		t.Fatal("bytes differ")
	}
	counterIs(t, "relay_buffers", p.metrics.RelayBuffers, 0)
	return written
}

// A device silent for longer than 1.5 × its keepalive is cut off
// [MQTT-3.1.2-24]; bytes from the broker do not count as the device's.
//
// This is a behaviour test, not a timing benchmark. The lower bound is
// exact: the proxy read the PINGREQ after the device wrote it, so it may not
// close before 1.5 s after that write whatever the scheduler does. The upper
// bound only has to tell the keepalive from no close at all: the precise
// tick is pinned by TestKeepaliveCutOneTickEarly on a virtual clock, and in
// one full run the close was seen 3.3 s late, a stall of the test process
// (the loop is woken every 200 ms by the broker's bytes here, so no timer
// path can be that late; see that test's comment).
func TestKeepaliveClose(t *testing.T) {
	p, b := oneRawBackend(t, nil)
	dev := dialProxy(t, p.addr)
	connect := connectPacket(mqttwire.Level311, "sleepy", 1)
	dev.Write(connect)
	bk := b.accept(t)
	readFull(t, bk, len(connect))
	// The device talks once more, then falls silent.
	time.Sleep(300 * time.Millisecond)
	last := time.Now()
	dev.Write([]byte{0xc0, 0x00}) // PINGREQ
	readFull(t, bk, 2)
	// The broker keeps talking; that does not keep the device alive.
	stop := make(chan struct{})
	defer close(stop)
	go func() {
		for {
			select {
			case <-stop:
				return
			case <-time.After(200 * time.Millisecond):
				bk.Write([]byte{0xd0, 0x00})
			}
		}
	}()
	const limit = 10 * time.Second
	dev.SetReadDeadline(last.Add(limit))
	buf := make([]byte, 64)
	for {
		_, err := dev.Read(buf)
		if err != nil {
			if ne, ok := err.(net.Error); ok && ne.Timeout() {
				t.Fatalf("connection not closed within %v", limit)
			}
			break
		}
	}
	silent := time.Since(last)
	t.Logf("closed after %v of silence", silent)
	if silent < 1500*time.Millisecond {
		t.Fatalf("closed after %v of silence, before 1.5 × the keepalive", silent)
	}
	counterIs(t, "idle_closes_total", p.metrics.IdleCloses, 1)
	eventually(t, "connection forgotten", func() bool { return p.Active() == 0 })
}

// A keepalive of 0 means no limit, unless keepalive.max_idle says otherwise.
func TestKeepaliveZeroMaxIdle(t *testing.T) {
	p, b := oneRawBackend(t, func(c *Config) { c.Keepalive.MaxIdle = Duration(500 * time.Millisecond) })
	dev := dialProxy(t, p.addr)
	connect := connectPacket(mqttwire.Level311, "ka0", 0)
	dev.Write(connect)
	bk := b.accept(t)
	readFull(t, bk, len(connect))
	start := time.Now()
	readUntilClosed(t, dev, 3*time.Second)
	if d := time.Since(start); d < 400*time.Millisecond {
		t.Fatalf("closed after %v, want >= 500ms", d)
	}
	counterIs(t, "idle_closes_total", p.metrics.IdleCloses, 1)
}

// Packets are counted by framing in both directions, across reads that split
// headers and bodies anywhere.
func TestFramingCounts(t *testing.T) {
	p, b := oneRawBackend(t, nil)
	dev := dialProxy(t, p.addr)
	connect := connectPacket(mqttwire.Level5, "framer", 0)
	dev.Write(connect)
	bk := b.accept(t)
	readFull(t, bk, len(connect))
	// 100 PUBLISHes of 200 bytes written one byte at a time in places.
	pub := append([]byte{0x30, 0xc8, 0x01}, make([]byte, 200)...)
	var stream []byte
	for range 100 {
		stream = append(stream, pub...)
	}
	for i := 0; i < len(stream); {
		n := 1 + i%7
		if i > 5000 {
			n = len(stream) - i
		}
		dev.Write(stream[i : i+n])
		i += n
		if i < 50 {
			time.Sleep(time.Millisecond)
		}
	}
	readFull(t, bk, len(stream))
	counterIs(t, "packets_total{upstream}", p.metrics.pktUp, 101)
}

// The last FIN of a connection is passed on by closing the socket: the peer
// must see a clean EOF after every byte, not a reset. Each side in turn
// sends its last packet and its FIN together, which epoll reports with
// EPOLLRDHUP, so the FIN is taken without a read returning 0.
func TestLastFINIsNotAReset(t *testing.T) {
	p, b := oneRawBackend(t, noCloseWait)
	connack := []byte{0x20, 0x02, 0x00, 0x00}
	disconnect := []byte{0xe0, 0x00}
	for _, devLast := range []bool{true, false} {
		name := "device last"
		if !devLast {
			name = "broker last"
		}
		t.Run(name, func(t *testing.T) {
			dev := dialProxy(t, p.addr)
			connect := connectPacket(mqttwire.Level311, "last-fin-"+name[:1], 0)
			dev.Write(connect)
			bk := b.accept(t)
			readFull(t, bk, len(connect))
			first, second := bk, dev
			firstMsg, secondMsg := connack, disconnect
			if !devLast {
				first, second = dev, bk
				firstMsg, secondMsg = disconnect, connack
			}
			// The first side's packet and FIN, then the second's.
			first.Write(firstMsg)
			first.CloseWrite()
			second.SetReadDeadline(time.Now().Add(5 * time.Second))
			if got, err := io.ReadAll(second); err != nil || !bytes.Equal(got, firstMsg) {
				t.Fatalf("first direction: got %x, %v; want %x and EOF", got, err, firstMsg)
			}
			second.Write(secondMsg)
			second.CloseWrite()
			first.SetReadDeadline(time.Now().Add(5 * time.Second))
			if got, err := io.ReadAll(first); err != nil || !bytes.Equal(got, secondMsg) {
				t.Fatalf("second direction: got %x, %v; want %x and a clean EOF", got, err, secondMsg)
			}
			eventually(t, "both closed", func() bool { return p.Active() == 0 })
		})
	}
}

// A device that sends more than its CONNECT while its broker is still being
// dialled (here: the broker's accept queue is full, so the SYN is dropped and
// retried a second later) has every byte relayed, in order, once the dial
// completes. The device is taken out of the epoll set when it speaks during
// the dial, and put back when the relay starts.
func TestDeviceSpeaksDuringDial(t *testing.T) {
	fd, err := unix.Socket(unix.AF_INET, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer unix.Close(fd)
	if err := unix.Bind(fd, &unix.SockaddrInet4{Addr: [4]byte{127, 0, 0, 1}}); err != nil {
		t.Fatal(err)
	}
	if err := unix.Listen(fd, 0); err != nil {
		t.Fatal(err)
	}
	sa, _ := unix.Getsockname(fd)
	full := addrPortOf(sa)
	var fillers []net.Conn
	for range 3 {
		if c, err := net.DialTimeout("tcp", full.String(), 200*time.Millisecond); err == nil {
			fillers = append(fillers, c)
		}
	}
	defer func() {
		for _, c := range fillers {
			c.Close()
		}
	}()
	p := startProxy(t, proxySetup{instances: []backend.Instance{inst("slow", full, -1)},
		config: func(c *Config) { c.Dial.Timeout = Duration(10 * time.Second) }})
	dev := dialProxy(t, p.addr)
	connect := connectPacket(mqttwire.Level311, "eager", 0)
	publish := []byte{0x30, 0x07, 0x00, 0x03, 'a', '/', 'b', 'h', 'i'}
	dev.Write(connect)
	time.Sleep(100 * time.Millisecond) // the proxy is dialling now
	dev.Write(publish)
	time.Sleep(100 * time.Millisecond)
	dev.Write(publish)
	// Free the accept queue: the proxy's retried SYN gets in.
	for range fillers {
		if nfd, _, err := unix.Accept4(fd, unix.SOCK_CLOEXEC); err == nil {
			unix.Close(nfd)
		}
	}
	tv := unix.Timeval{Sec: 10}
	unix.SetsockoptTimeval(fd, unix.SOL_SOCKET, unix.SO_RCVTIMEO, &tv)
	var bfd int
	for {
		// Fillers that completed their handshake after the first
		// round come out first; the proxy's connection carries a CONNECT.
		nfd, _, err := unix.Accept4(fd, unix.SOCK_CLOEXEC)
		if err != nil {
			t.Fatalf("broker: no connection from the proxy: %v", err)
		}
		unix.SetsockoptTimeval(nfd, unix.SOL_SOCKET, unix.SO_RCVTIMEO, &tv)
		var one [1]byte
		if n, _ := unix.Read(nfd, one[:]); n == 1 && one[0] == connect[0] {
			bfd = nfd
			break
		}
		unix.Close(nfd)
	}
	defer unix.Close(bfd)
	want := append(append(append([]byte(nil), connect[1:]...), publish...), publish...)
	got := make([]byte, 0, len(want))
	buf := make([]byte, 256)
	for len(got) < len(want) {
		n, err := unix.Read(bfd, buf)
		if n <= 0 {
			t.Fatalf("broker got %x, then %v; want %x", got, err, want)
		}
		got = append(got, buf[:n]...)
	}
	if !bytes.Equal(got, want) {
		t.Fatalf("broker got %x, want %x", got, want)
	}
	// The relay runs both ways from here.
	unix.Write(bfd, []byte{0x20, 0x02, 0x00, 0x00})
	if got := readFull(t, dev, 4); !bytes.Equal(got, []byte{0x20, 0x02, 0x00, 0x00}) {
		t.Fatalf("device got %x, want the CONNACK", got)
	}
}

// A device that sends its CONNECT and DISCONNECT and half-closes at once
// (the FIN arrives with, or right behind, the data, often before the
// broker is even dialled): the broker gets exactly those bytes and then
// EOF, every time. Edge-triggered sockets must not lose the FIN queued
// behind data the loop had not consumed yet.
func TestConnectDisconnectAndFINAtOnce(t *testing.T) {
	// This raw broker does not close on DISCONNECT: the device's FIN is
	// to pass on at once, not after dial.close_wait.
	p, b := oneRawBackend(t, noCloseWait)
	for i := range 50 {
		dev := dialProxy(t, p.addr)
		want := append(connectPacket(mqttwire.Level311, "fin-at-once-"+itoa(i), 0), 0xe0, 0x00)
		dev.Write(want)
		dev.CloseWrite()
		bk := b.accept(t)
		bk.SetReadDeadline(time.Now().Add(5 * time.Second))
		got, err := io.ReadAll(bk)
		if err != nil || !bytes.Equal(got, want) {
			t.Fatalf("device %d: the broker got %x, %v; want %x and EOF", i, got, err, want)
		}
		bk.Close()
		dev.Close()
	}
	eventually(t, "every connection closed", func() bool { return p.Active() == 0 })
}
