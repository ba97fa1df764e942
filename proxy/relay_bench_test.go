package proxy

import (
	"bytes"
	"context"
	"io"
	"log/slog"
	"net"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/shardgate/shardgate/backend"
	"github.com/shardgate/shardgate/mqttwire"
)

// echoBackend accepts connections and answers a CONNECT with a CONNACK, then
// echoes every byte back, like a broker delivering a device's publishes to
// its own subscription. It closes when the device does.
func echoBackend(b *testing.B) net.Listener {
	b.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() { ln.Close() })
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			go echoBroker(c)
		}
	}()
	return ln
}

func echoBroker(c net.Conn) {
	defer c.Close()
	hdr := make([]byte, 2)
	if _, err := io.ReadFull(c, hdr); err != nil {
		return
	}
	// A CONNECT of the benchmarks fits a one-byte remaining length.
	if _, err := io.ReadFull(c, make([]byte, hdr[1])); err != nil {
		return
	}
	if _, err := c.Write([]byte{0x20, 0x02, 0x00, 0x00}); err != nil {
		return
	}
	io.Copy(c, c)
}

// benchProxy starts a proxy (two loops) in front of an echoBackend and
// returns its address.
func benchProxy(b *testing.B) string {
	b.Helper()
	ln := echoBackend(b)
	in := inst("echo", ln.Addr().(*net.TCPAddr).AddrPort(), -1)
	cfg := &Config{Listen: []string{"127.0.0.1:0"}, EventLoops: 2}
	cfg.Backends.Static = []backend.StaticInstance{{ID: in.ID, Address: in.Addr.String()}}
	cfg.SetDefaults()
	p, err := New(Options{
		Config:   cfg,
		Router:   backend.NewRouter(backend.NewSnapshot(0, []backend.Instance{in}, backend.SnapshotOptions{})),
		Registry: prometheus.NewRegistry(),
		Log:      slog.New(slog.NewTextHandler(io.Discard, nil)),
	})
	if err != nil {
		b.Fatal(err)
	}
	p.Start()
	b.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 200*time.Millisecond)
		defer cancel()
		p.Shutdown(ctx)
	})
	return p.Addrs()[0].String()
}

// BenchmarkRelayRoundTrip is one QoS 0 PUBLISH from a device to its broker
// and back through the proxy: two relays, each a wakeup, a read and a
// write of the loop.
func BenchmarkRelayRoundTrip(b *testing.B) {
	addr := benchProxy(b)
	c, err := net.Dial("tcp", addr)
	if err != nil {
		b.Fatal(err)
	}
	defer c.Close()
	c.Write(connectPacket(mqttwire.Level311, "bench-rtt", 0))
	ack := make([]byte, 4)
	if _, err := io.ReadFull(c, ack); err != nil {
		b.Fatal(err)
	}
	pub := []byte{0x30, 0x12, 0x00, 0x04, 'b', '/', 'r', 't', '0', '1', '2', '3', '4', '5', '6', '7', '8', '9', 'a', 'b'}
	got := make([]byte, len(pub))
	b.ReportAllocs()
	b.ResetTimer()
	for b.Loop() {
		if _, err := c.Write(pub); err != nil {
			b.Fatal(err)
		}
		if _, err := io.ReadFull(c, got); err != nil {
			b.Fatal(err)
		}
	}
	b.StopTimer()
	if !bytes.Equal(got, pub) {
		b.Fatalf("echo %x, want %x", got, pub)
	}
}

// BenchmarkConnect is one device's whole visit: connect, CONNECT, CONNACK,
// DISCONNECT and close, the proxy accepting, dialling, replaying and
// relaying both FINs.
func BenchmarkConnect(b *testing.B) {
	addr := benchProxy(b)
	connect := connectPacket(mqttwire.Level311, "bench-connect", 0)
	ack := make([]byte, 4)
	b.ReportAllocs()
	b.ResetTimer()
	for b.Loop() {
		c, err := net.Dial("tcp", addr)
		if err != nil {
			b.Fatal(err)
		}
		c.Write(connect)
		if _, err := io.ReadFull(c, ack); err != nil {
			b.Fatal(err)
		}
		c.Write([]byte{0xe0, 0x00})
		c.(*net.TCPConn).CloseWrite()
		// The broker's FIN, passed on: the visit is over for both.
		if _, err := io.ReadAll(c); err != nil {
			b.Fatal(err)
		}
		c.Close()
	}
}
