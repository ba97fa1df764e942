package proxy

import (
	"context"
	"errors"
	"io"
	"log/slog"
	"net"
	"net/netip"
	"os"
	"strconv"
	"sync"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/testutil"

	"github.com/shardgate/shardgate/backend"
	"github.com/shardgate/shardgate/mqttwire"
)

// testProxy is a started Proxy with its own metrics registry.
type testProxy struct {
	*Proxy
	reg  *prometheus.Registry
	addr string // first listen address
	snap *backend.Snapshot
}

// proxySetup describes a test proxy.
type proxySetup struct {
	shards    int // 0: instances have no shard
	instances []backend.Instance
	policy    backend.Policy
	config    func(*Config)
}

// startProxy starts a proxy on 127.0.0.1:0 (and whatever config adds) in
// front of the given instances.
func startProxy(t *testing.T, s proxySetup) *testProxy {
	t.Helper()
	cfg := &Config{Listen: []string{"127.0.0.1:0"}, EventLoops: 2, Shards: s.shards}
	for _, in := range s.instances {
		sb := backend.StaticInstance{ID: in.ID, Address: in.Addr.String()}
		if in.Shard >= 0 && s.shards > 0 {
			sh := in.Shard
			sb.Shard = &sh
		}
		cfg.Backends.Static = append(cfg.Backends.Static, sb)
	}
	cfg.SetDefaults()
	if s.config != nil {
		s.config(cfg)
	}
	snap := backend.NewSnapshot(s.shards, s.instances, backend.SnapshotOptions{NoInstance: s.policy})
	reg := prometheus.NewRegistry()
	p, err := New(Options{
		Config:   cfg,
		Router:   backend.NewRouter(snap),
		Registry: reg,
		Log:      slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelError})),
	})
	if err != nil {
		t.Fatalf("New: %v", err)
	}
	p.Start()
	t.Cleanup(func() {
		// Connections a test left open (raw backends close after the
		// proxy) are cut after a short grace.
		ctx, cancel := context.WithTimeout(context.Background(), 200*time.Millisecond)
		defer cancel()
		p.Shutdown(ctx)
	})
	return &testProxy{Proxy: p, reg: reg, addr: p.Addrs()[0].String(), snap: snap}
}

// inst makes a healthy instance.
func inst(id string, addr netip.AddrPort, shard int) backend.Instance {
	return backend.Instance{ID: id, Addr: addr, Shard: shard, Healthy: true}
}

// rawBackend is a TCP server standing in for a broker where a test needs to
// see or control the bytes (a real broker would answer or close).
type rawBackend struct {
	ln    net.Listener
	conns chan net.Conn
}

func startRawBackend(t *testing.T) *rawBackend {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	b := &rawBackend{ln: ln, conns: make(chan net.Conn, 64)}
	var mu sync.Mutex
	var all []net.Conn
	go func() {
		for {
			c, err := ln.Accept()
			if errors.Is(err, net.ErrClosed) {
				return
			}
			if err != nil {
				// EMFILE while a test squeezes the fd limit: retry.
				time.Sleep(10 * time.Millisecond)
				continue
			}
			mu.Lock()
			all = append(all, c)
			mu.Unlock()
			b.conns <- c
		}
	}()
	t.Cleanup(func() {
		ln.Close()
		mu.Lock()
		for _, c := range all {
			c.Close()
		}
		mu.Unlock()
	})
	return b
}

func (b *rawBackend) addr() netip.AddrPort {
	return b.ln.Addr().(*net.TCPAddr).AddrPort()
}

// accept waits for the proxy's connection.
func (b *rawBackend) accept(t *testing.T) *net.TCPConn {
	t.Helper()
	select {
	case c := <-b.conns:
		return c.(*net.TCPConn)
	case <-time.After(5 * time.Second):
		t.Fatal("backend: no connection from the proxy")
		return nil
	}
}

// dialProxy opens a raw device connection.
func dialProxy(t *testing.T, addr string) *net.TCPConn {
	t.Helper()
	c, err := net.DialTimeout("tcp", addr, 2*time.Second)
	if err != nil {
		t.Fatalf("dial proxy: %v", err)
	}
	t.Cleanup(func() { c.Close() })
	return c.(*net.TCPConn)
}

func connectPacket(level byte, id string, keepalive uint16) []byte {
	return mqttwire.AppendConnect(nil, mqttwire.ConnectOptions{Level: level, ClientID: id, CleanStart: true, KeepAlive: keepalive})
}

// readFull reads n bytes with a deadline.
func readFull(t *testing.T, c net.Conn, n int) []byte {
	t.Helper()
	c.SetReadDeadline(time.Now().Add(5 * time.Second))
	b := make([]byte, n)
	if _, err := io.ReadFull(c, b); err != nil {
		t.Fatalf("read %d bytes: %v (got %q)", n, err, b)
	}
	return b
}

// readUntilClosed reads until EOF or reset and returns what came, failing
// if the connection is still open after d.
func readUntilClosed(t *testing.T, c net.Conn, d time.Duration) []byte {
	t.Helper()
	c.SetReadDeadline(time.Now().Add(d))
	b, err := io.ReadAll(c)
	var ne net.Error
	if errors.As(err, &ne) && ne.Timeout() {
		t.Fatalf("connection still open after %v (read %q)", d, b)
	}
	return b
}

// eventually polls cond until it holds or 5 s pass.
func eventually(t *testing.T, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(5 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// counterIs waits until a counter (flushed by the loops once per tick)
// reaches want.
func counterIs(t *testing.T, what string, c prometheus.Collector, want float64) {
	t.Helper()
	deadline := time.Now().Add(5 * time.Second)
	for {
		got := testutil.ToFloat64(c)
		if got == want {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("%s = %v, want %v", what, got, want)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

func (p *testProxy) rejects(reason string) prometheus.Collector {
	return p.metrics.ConnectRejects.WithLabelValues(reason)
}

func (p *testProxy) connects(result string) prometheus.Collector {
	return p.metrics.Connects.WithLabelValues(result)
}

func itoa(i int) string { return strconv.Itoa(i) }
