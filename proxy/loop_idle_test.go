package proxy

import (
	"bufio"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"runtime"
	"runtime/debug"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/shardgate/shardgate/backend"
	"github.com/shardgate/shardgate/internal/servertest"
	"github.com/shardgate/shardgate/mqttwire"
)

// TestIdleFootprint measures what an idle device costs the proxy: it runs
// the proxy in a child process in front of a real Mosquitto, holds N idle
// MQTT connections through it, and reads the child's RSS (after a GC) and fd
// count before and after. The target is 2 fds and at most 1 KiB of
// proxy RSS per idle connection.
//
// N defaults to 2000 so the test stays quick; the benchmark figure uses
//
//	SHARDGATE_IDLE_CONNS=9000 go test ./proxy -run TestIdleFootprint -v
func TestIdleFootprint(t *testing.T) {
	if os.Getenv("SHARDGATE_IDLE_CHILD") != "" {
		idleChild()
		return
	}
	n := 2000
	if s := os.Getenv("SHARDGATE_IDLE_CONNS"); s != "" {
		var err error
		if n, err = strconv.Atoi(s); err != nil || n < 1 {
			t.Fatalf("SHARDGATE_IDLE_CONNS=%q", s)
		}
	}
	broker := servertest.Mosquitto(t, servertest.MosquittoOptions{}).Addr()
	cmd := exec.Command(os.Args[0], "-test.run=^TestIdleFootprint$")
	cmd.Env = append(os.Environ(), "SHARDGATE_IDLE_CHILD="+broker.String())
	cmd.Stderr = os.Stderr
	stdin, _ := cmd.StdinPipe()
	stdout, _ := cmd.StdoutPipe()
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	defer func() {
		stdin.Close()
		cmd.Process.Kill()
		cmd.Wait()
	}()
	out := bufio.NewScanner(stdout)
	next := func() map[string]int {
		if !out.Scan() {
			t.Fatalf("proxy child: %v", out.Err())
		}
		m := map[string]int{}
		for _, f := range strings.Fields(out.Text()) {
			k, v, _ := strings.Cut(f, "=")
			m[k], _ = strconv.Atoi(v)
		}
		return m
	}
	first := next()
	addr := fmt.Sprintf("127.0.0.1:%d", first["port"])
	io.WriteString(stdin, "\n")
	base := next()

	conns := make([]net.Conn, 0, n)
	defer func() {
		for _, c := range conns {
			c.Close()
		}
	}()
	start := time.Now()
	ack := make([]byte, 4)
	for i := range n {
		c, err := net.DialTimeout("tcp", addr, 5*time.Second)
		if err != nil {
			t.Fatalf("connection %d: %v", i, err)
		}
		conns = append(conns, c)
		c.Write(mqttwire.AppendConnect(nil, mqttwire.ConnectOptions{
			Level: mqttwire.Level311, ClientID: fmt.Sprintf("idle-%05d", i), CleanStart: true}))
		c.SetReadDeadline(time.Now().Add(10 * time.Second))
		if _, err := io.ReadFull(c, ack); err != nil || ack[3] != 0 {
			t.Fatalf("connection %d: CONNACK %x, %v", i, ack, err)
		}
	}
	connected := time.Since(start)
	io.WriteString(stdin, "\n")
	held := next()
	if held["active"] != n {
		t.Fatalf("proxy holds %d connections, want %d", held["active"], n)
	}
	perConn := float64(held["rss"]-base["rss"]) * 1024 / float64(n)
	heapPerConn := float64(held["heap"]-base["heap"]) / float64(n)
	fdsPerConn := float64(held["fds"]-base["fds"]) / float64(n)
	t.Logf("%d idle connections (connected in %v): proxy RSS %d KiB → %d KiB; %.0f B RSS, %.0f B heap, %.2f fds per connection",
		n, connected.Round(time.Millisecond), base["rss"], held["rss"], perConn, heapPerConn, fdsPerConn)
	if fdsPerConn != 2 {
		t.Errorf("%.2f fds per connection, want 2", fdsPerConn)
	}
	if perConn > 1024 && !raceEnabled {
		t.Errorf("%.0f B of RSS per idle connection, want <= 1024", perConn)
	}
}

// idleChild is the proxy process of TestIdleFootprint: it prints its port,
// then its RSS (KiB), heap in use, fd count and active connections after a
// GC whenever a line arrives on stdin.
func idleChild() {
	broker := netip.MustParseAddrPort(os.Getenv("SHARDGATE_IDLE_CHILD"))
	cfg := &Config{Listen: []string{"127.0.0.1:0"},
		Backends: BackendsConfig{Static: []backend.StaticInstance{{ID: "m", Address: broker.String()}}}}
	cfg.SetDefaults()
	snap := backend.NewSnapshot(0, []backend.Instance{inst("m", broker, -1)}, backend.SnapshotOptions{})
	p, err := New(Options{Config: cfg, Router: backend.NewRouter(snap),
		Log: slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelError}))})
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	p.Start()
	fmt.Printf("port=%d\n", p.Addrs()[0].Port())
	in := bufio.NewScanner(os.Stdin)
	for in.Scan() {
		runtime.GC()
		debug.FreeOSMemory()
		var ms runtime.MemStats
		runtime.ReadMemStats(&ms)
		fds, _ := os.ReadDir("/proc/self/fd")
		fmt.Printf("rss=%d heap=%d fds=%d active=%d\n", procRSS(), ms.HeapInuse, len(fds), p.Active())
	}
	os.Exit(0)
}

// procRSS returns VmRSS of this process in KiB.
func procRSS() int {
	b, _ := os.ReadFile("/proc/self/status")
	for _, l := range strings.Split(string(b), "\n") {
		if v, ok := strings.CutPrefix(l, "VmRSS:"); ok {
			n, _ := strconv.Atoi(strings.TrimSuffix(strings.TrimSpace(v), " kB"))
			return n
		}
	}
	return 0
}
