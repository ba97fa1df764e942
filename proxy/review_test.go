package proxy

import (
	"bytes"
	"context"
	"io"
	"log/slog"
	"net"
	"net/netip"
	"os"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/shardgate/shardgate/backend"
	"github.com/shardgate/shardgate/mqttwire"
)

// Tests from a review of the event loop. They build their proxy themselves
// (rvNewProxy) rather than through the shared test helpers.

// rvNewProxy creates, but does not start, a proxy with one event loop in
// front of one backend at bk.
func rvNewProxy(t *testing.T, bk netip.AddrPort) *Proxy {
	t.Helper()
	cfg := &Config{Listen: []string{"127.0.0.1:0"}, EventLoops: 1}
	cfg.Backends.Static = []backend.StaticInstance{{ID: "rv", Address: bk.String()}}
	cfg.SetDefaults()
	snap := backend.NewSnapshot(0, []backend.Instance{{ID: "rv", Addr: bk, Shard: -1, Healthy: true}},
		backend.SnapshotOptions{})
	p, err := New(Options{
		Config: cfg,
		Router: backend.NewRouter(snap),
		Log:    slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelError})),
	})
	if err != nil {
		t.Fatalf("New: %v", err)
	}
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 200*time.Millisecond)
		defer cancel()
		p.Shutdown(ctx)
	})
	return p
}

// cpuTime is the process's user+system CPU time so far.
func cpuTime(t *testing.T) time.Duration {
	t.Helper()
	var ru unix.Rusage
	if err := unix.Getrusage(unix.RUSAGE_SELF, &ru); err != nil {
		t.Fatal(err)
	}
	return time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
}

// Regression: once a loop had lost its spare fd (its reopen after a shed
// failed because another thread took the number just freed), every later
// EMFILE left the level-triggered listener readable and un-accepted, and the
// loop spun on epoll_wait at 100% CPU until fds were free again. Now a loop
// that can neither accept nor shed takes the listener out of epoll for a
// tick, and tries to get its spare back first.
func TestEMFILEWithoutSpareSpins(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	p := rvNewProxy(t, ln.Addr().(*net.TCPAddr).AddrPort())
	l := p.loops[0]
	// The spare lost to a race, before the loop runs.
	unix.Close(l.spare)
	l.spare = -1
	p.Start()

	fd, err := unix.Socket(unix.AF_INET, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer unix.Close(fd)

	var orig unix.Rlimit
	if err := unix.Getrlimit(unix.RLIMIT_NOFILE, &orig); err != nil {
		t.Fatal(err)
	}
	// No fd number free below the limit: accept4 gets EMFILE, and so
	// does reopening the spare.
	used := usedFDs(t)
	lowest := 0
	for i, n := range used {
		if n != i {
			break
		}
		lowest = i + 1
	}
	lim := orig
	lim.Cur = uint64(lowest)
	if err := unix.Setrlimit(unix.RLIMIT_NOFILE, &lim); err != nil {
		t.Fatal(err)
	}
	restored := false
	restore := func() {
		if !restored {
			restored = true
			unix.Setrlimit(unix.RLIMIT_NOFILE, &orig)
		}
	}
	defer restore()
	if err := unix.Connect(fd, sockaddrOf(p.Addrs()[0])); err != nil {
		restore()
		t.Fatalf("connect: %v", err)
	}
	time.Sleep(100 * time.Millisecond) // the loop sees the listener readable
	before := cpuTime(t)
	time.Sleep(time.Second)
	spent := cpuTime(t) - before
	restore()
	if spent > 300*time.Millisecond {
		t.Fatalf("loop spent %v of CPU in 1 s with a connection it could not accept", spent)
	}
	t.Logf("CPU in 1 s at EMFILE: %v", spent)

	// With fds back, devices are served again. The waiting device may
	// have been shed (accepted and closed) if any fd of the test process
	// came free during the EMFILE window, which is shed's job, so a second
	// device connects too and one of the two must reach the broker.
	connect := mqttwire.AppendConnect(nil, mqttwire.ConnectOptions{Level: mqttwire.Level311, ClientID: "rv-emfile", CleanStart: true})
	unix.Write(fd, connect) // fails harmlessly if the device was shed
	dev2, err := net.Dial("tcp", p.Addrs()[0].String())
	if err != nil {
		t.Fatalf("connect after fds came back: %v", err)
	}
	defer dev2.Close()
	if _, err := dev2.Write(connect); err != nil {
		t.Fatal(err)
	}
	ln.(*net.TCPListener).SetDeadline(time.Now().Add(5 * time.Second))
	bk, err := ln.Accept()
	if err != nil {
		t.Fatalf("no backend connection after fds came back: %v", err)
	}
	defer bk.Close()
	bk.SetReadDeadline(time.Now().Add(5 * time.Second))
	got := make([]byte, len(connect))
	if _, err := io.ReadFull(bk, got); err != nil {
		t.Fatalf("backend read: %v", err)
	}
	if !bytes.Equal(got, connect) {
		t.Fatalf("backend got % x, want the CONNECT % x", got, connect)
	}
}
