package backend

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/netip"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/shardgate/shardgate/internal/servertest"
)

func intp(v int) *int { return &v }

var quietLog = slog.New(slog.DiscardHandler)

func TestStaticConfigValidate(t *testing.T) {
	good := func() StaticConfig {
		return StaticConfig{
			Shards: 4,
			Instances: []StaticInstance{
				{ID: "a", Address: "10.0.0.1:1883", Shard: intp(0)},
				{ID: "b", Address: "[2001:db8::1]:1883", Shard: intp(3), Priority: 1},
				{ID: "c", Address: "10.0.0.3:1883"},
			},
		}
	}
	if err := good().Validate(); err != nil {
		t.Fatalf("good config: %v", err)
	}
	tests := []struct {
		name   string
		modify func(c *StaticConfig)
		want   string // exact error text
	}{
		{"address not IP:port", func(c *StaticConfig) { c.Instances[2].Address = "foo:1883" }, `backends.static[2].address: "foo:1883" is not IP:port`},
		{"address without port", func(c *StaticConfig) { c.Instances[0].Address = "10.0.0.1" }, `backends.static[0].address: "10.0.0.1" is not IP:port`},
		{"port 0", func(c *StaticConfig) { c.Instances[0].Address = "10.0.0.1:0" }, `backends.static[0].address: "10.0.0.1:0" has port 0`},
		{"unspecified", func(c *StaticConfig) { c.Instances[1].Address = "[::]:1883" }, `backends.static[1].address: "[::]:1883" is the unspecified address`},
		{"duplicate ID", func(c *StaticConfig) { c.Instances[2].ID = "a" }, `backends.static[2].id: "a" duplicates backends.static[0]`},
		{"empty ID", func(c *StaticConfig) { c.Instances[1].ID = "" }, `backends.static[1].id: empty`},
		{"NUL in ID", func(c *StaticConfig) { c.Instances[1].ID = "b\x00" }, `backends.static[1].id: "b\x00" is not valid UTF-8 without NUL`},
		{"shard too big", func(c *StaticConfig) { c.Instances[1].Shard = intp(4) }, `backends.static[1].shard: 4 is outside [0, 4)`},
		{"shard negative", func(c *StaticConfig) { c.Instances[0].Shard = intp(-2) }, `backends.static[0].shard: -2 is negative (omit it or use -1 for no shard)`},
		{"shards missing", func(c *StaticConfig) { c.Shards = 0 }, `shards: must be at least 1 when backends have a shard`},
		{"shards negative", func(c *StaticConfig) { c.Shards = -1 }, "shards: -1 is negative"},
		{"shards too many", func(c *StaticConfig) { c.Shards = MaxShards + 1 }, fmt.Sprintf("shards: %d is above the maximum %d", MaxShards+1, MaxShards)},
		{"no instances", func(c *StaticConfig) { c.Instances = nil }, "backends.static: no instances"},
		{"bad policy", func(c *StaticConfig) { c.NoInstance = 7 }, "no_instance: Policy(7) is not spill or reject"},
		{"health type", func(c *StaticConfig) { c.Health.Type = "http" }, `health.type: "http" is not tcp, mqtt or none`},
		{"timeout > interval", func(c *StaticConfig) { c.Health.Timeout = 3 * time.Second }, "health.timeout: 3s is longer than health.interval 2s"},
		{"negative interval", func(c *StaticConfig) { c.Health.Interval = -time.Second }, "health.interval: -1s is negative"},
		{"negative rise", func(c *StaticConfig) { c.Health.Rise = -1 }, "health.rise: -1 is negative"},
		{"negative fall", func(c *StaticConfig) { c.Health.Fall = -1 }, "health.fall: -1 is negative"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			c := good()
			tt.modify(&c)
			err := c.Validate()
			if err == nil || err.Error() != tt.want {
				t.Fatalf("Validate = %v, want %s", err, tt.want)
			}
			var fe *FieldError
			if !errors.As(err, &fe) {
				t.Errorf("%T is not a *FieldError", err)
			}
			if _, err := NewStatic(c); err == nil {
				t.Error("NewStatic accepted it")
			}
		})
	}
	// Every problem is reported, not only the first.
	c := good()
	c.Instances[0].Address = "x"
	c.Instances[1].ID = "a"
	if err := c.Validate(); err == nil || strings.Count(err.Error(), "\n") != 1 {
		t.Errorf("two problems reported as %q", err)
	}
	// Shard -1 and no shard at all are the same; shards may be 0 then.
	c = StaticConfig{Instances: []StaticInstance{{ID: "x", Address: "127.0.0.1:1", Shard: intp(-1)}, {ID: "y", Address: "127.0.0.1:2"}}}
	if err := c.Validate(); err != nil {
		t.Errorf("no-meta config: %v", err)
	}
}

// recorder collects a Static's check results and snapshots.
type recorder struct {
	mu      sync.Mutex
	results []InstanceStatus
	snaps   []*Snapshot
	changed chan struct{}
}

func newRecorder() *recorder { return &recorder{changed: make(chan struct{}, 1)} }

func (r *recorder) result(st InstanceStatus) {
	r.mu.Lock()
	r.results = append(r.results, st)
	r.mu.Unlock()
	r.poke()
}

func (r *recorder) update(s *Snapshot) {
	r.mu.Lock()
	r.snaps = append(r.snaps, s)
	r.mu.Unlock()
	r.poke()
}

func (r *recorder) poke() {
	select {
	case r.changed <- struct{}{}:
	default:
	}
}

// waitFor waits until cond holds over what was recorded.
func (r *recorder) waitFor(t *testing.T, what string, timeout time.Duration, cond func(results []InstanceStatus, snaps []*Snapshot) bool) {
	t.Helper()
	deadline := time.After(timeout)
	for {
		r.mu.Lock()
		ok := cond(r.results, r.snaps)
		r.mu.Unlock()
		if ok {
			return
		}
		select {
		case <-r.changed:
		case <-deadline:
			r.mu.Lock()
			defer r.mu.Unlock()
			t.Fatalf("timed out after %s waiting for %s; results %+v", timeout, what, r.results)
		}
	}
}

func (r *recorder) snapshots() []*Snapshot {
	r.mu.Lock()
	defer r.mu.Unlock()
	return append([]*Snapshot(nil), r.snaps...)
}

func (r *recorder) mark() int {
	r.mu.Lock()
	defer r.mu.Unlock()
	return len(r.results)
}

func healthyIn(s *Snapshot, id string) bool {
	for _, in := range s.Instances() {
		if in.ID == id {
			return in.Healthy
		}
	}
	return false
}

func lastSnap(snaps []*Snapshot) *Snapshot {
	if len(snaps) == 0 {
		return nil
	}
	return snaps[len(snaps)-1]
}

// startStatic runs a Static with a recorder until the test ends.
func startStatic(t *testing.T, cfg StaticConfig) (*Static, *recorder) {
	t.Helper()
	if cfg.Logger == nil {
		cfg.Logger = quietLog
	}
	s, err := NewStatic(cfg)
	if err != nil {
		t.Fatal(err)
	}
	rec := newRecorder()
	s.onResult = rec.result
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- s.Run(ctx, rec.update) }()
	t.Cleanup(func() {
		cancel()
		select {
		case err := <-done:
			if err != nil {
				t.Errorf("Run = %v", err)
			}
		case <-time.After(5 * time.Second):
			t.Error("Run did not return after cancel")
		}
	})
	return s, rec
}

// checkHysteresis walks the results of instance id from index from on and
// asserts the rise/fall rule: a healthy instance stays healthy through
// fall-1 failures in a row and is unhealthy at the fall-th; an unhealthy one
// stays unhealthy through rise-1 passes and is healthy at the rise-th.
// It returns how many transitions it saw.
func checkHysteresis(t *testing.T, results []InstanceStatus, id string, rise, fall int) (downs, ups int) {
	t.Helper()
	var prev *InstanceStatus
	for i := range results {
		st := results[i]
		if st.ID != id {
			continue
		}
		if prev != nil && prev.State != "unknown" {
			switch {
			case prev.Healthy && st.LastResult == "fail":
				want := st.Consecutive < fall
				if st.Healthy != want {
					t.Fatalf("after %d failures in a row (fall %d): healthy=%v, want %v", st.Consecutive, fall, st.Healthy, want)
				}
				if !st.Healthy {
					downs++
				}
			case !prev.Healthy && st.LastResult == "ok":
				want := st.Consecutive >= rise
				if st.Healthy != want {
					t.Fatalf("after %d passes in a row (rise %d): healthy=%v, want %v", st.Consecutive, rise, st.Healthy, want)
				}
				if st.Healthy {
					ups++
				}
			case prev.Healthy != st.Healthy:
				t.Fatalf("state changed on a %s result: %+v → %+v", st.LastResult, *prev, st)
			}
		}
		prev = &st
	}
	return downs, ups
}

func TestStaticTCPChecks(t *testing.T) {
	up := listenTCP(t, "127.0.0.1:0")
	upAddr := up.Addr().String()
	deadAddr := servertest.FreePort(t).String()
	cfg := StaticConfig{
		Shards: 2,
		Instances: []StaticInstance{
			{ID: "up", Address: upAddr, Shard: intp(0)},
			{ID: "dead", Address: deadAddr, Shard: intp(1)},
		},
		Health: HealthConfig{Interval: 50 * time.Millisecond, Timeout: 50 * time.Millisecond, Rise: 2, Fall: 3},
	}
	s, rec := startStatic(t, cfg)

	// The first snapshot already knows both: the first result decides.
	rec.waitFor(t, "first snapshot", 2*time.Second, func(_ []InstanceStatus, snaps []*Snapshot) bool { return len(snaps) > 0 })
	first := rec.snapshots()[0]
	if !healthyIn(first, "up") || healthyIn(first, "dead") {
		t.Fatalf("first snapshot: %+v", first.Instances())
	}
	if s.Snapshot() == nil {
		t.Error("Snapshot() nil after publishing")
	}
	st := s.Status()
	if st[0].ID != "up" || st[0].State != "healthy" || st[0].LastResult != "ok" || st[0].Check != "tcp" ||
		st[1].State != "unhealthy" || !strings.Contains(st[1].LastError, "refused") {
		t.Errorf("Status = %+v", st)
	}

	// Steady state publishes nothing new.
	time.Sleep(300 * time.Millisecond)
	if n := len(rec.snapshots()); n != 1 {
		t.Fatalf("%d snapshots in steady state, want 1", n)
	}

	// Take "up" down: unhealthy after exactly Fall failures.
	mark := rec.mark()
	up.Close()
	rec.waitFor(t, "up unhealthy", 3*time.Second, func(_ []InstanceStatus, snaps []*Snapshot) bool { return !healthyIn(lastSnap(snaps), "up") })
	// Bring it back on the same port: healthy after exactly Rise passes.
	up2 := listenTCP(t, upAddr)
	defer up2.Close()
	rec.waitFor(t, "up healthy again", 3*time.Second, func(_ []InstanceStatus, snaps []*Snapshot) bool { return healthyIn(lastSnap(snaps), "up") })

	rec.mu.Lock()
	downs, ups := checkHysteresis(t, rec.results[mark:], "up", 2, 3)
	rec.mu.Unlock()
	if downs != 1 || ups != 1 {
		t.Errorf("saw %d downs and %d ups, want 1 and 1", downs, ups)
	}
	if n := len(rec.snapshots()); n != 3 {
		t.Errorf("%d snapshots, want 3 (initial, down, up)", n)
	}
}

// TestStaticMQTTChecks runs the MQTT probe against a real Mosquitto, kills
// it and starts it again.
func TestStaticMQTTChecks(t *testing.T) {
	mosq := servertest.Mosquitto(t, servertest.MosquittoOptions{})
	cfg := StaticConfig{
		Shards:     1,
		NoInstance: Reject,
		Instances:  []StaticInstance{{ID: "mosquitto", Address: mosq.String(), Shard: intp(0)}},
		Health:     HealthConfig{Type: "mqtt", Interval: 50 * time.Millisecond, Timeout: 50 * time.Millisecond, Rise: 2, Fall: 3},
	}
	s, rec := startStatic(t, cfg)
	rec.waitFor(t, "first snapshot", 2*time.Second, func(_ []InstanceStatus, snaps []*Snapshot) bool { return len(snaps) > 0 })
	if snap := rec.snapshots()[0]; !healthyIn(snap, "mosquitto") {
		t.Fatalf("first snapshot: %+v; status %+v", snap.Instances(), s.Status())
	}
	if r, ok := rec.snapshots()[0].Route([]byte("dev")); !ok || r.Instance.Addr.String() != mosq.String() {
		t.Fatalf("Route = %+v, %v", r, ok)
	}

	mark := rec.mark()
	mosq.Kill()
	rec.waitFor(t, "unhealthy after kill", 3*time.Second, func(_ []InstanceStatus, snaps []*Snapshot) bool { return !healthyIn(lastSnap(snaps), "mosquitto") })
	if _, ok := lastSnap(rec.snapshots()).Route([]byte("dev")); ok {
		t.Error("routed to a dead shard under reject")
	}
	mosq.Restart()
	rec.waitFor(t, "healthy after restart", 5*time.Second, func(_ []InstanceStatus, snaps []*Snapshot) bool { return healthyIn(lastSnap(snaps), "mosquitto") })

	rec.mu.Lock()
	downs, ups := checkHysteresis(t, rec.results[mark:], "mosquitto", 2, 3)
	rec.mu.Unlock()
	if downs != 1 || ups != 1 {
		t.Errorf("saw %d downs and %d ups, want 1 and 1", downs, ups)
	}
	if n := len(rec.snapshots()); n != 3 {
		t.Errorf("%d snapshots, want 3 (initial, down, up)", n)
	}
}

func TestMQTTProbeFailures(t *testing.T) {
	// A real Mosquitto that refuses anonymous clients answers CONNACK 0x05.
	auth := servertest.Mosquitto(t, servertest.MosquittoOptions{DenyAnonymous: true})
	p := mqttProbe{timeout: time.Second}
	err := p.probe(context.Background(), auth.Addr())
	if err == nil || !strings.Contains(err.Error(), "return code 0x05 (not authorized)") {
		t.Errorf("probe of an authenticating broker = %v", err)
	}

	// Not MQTT: a TCP server that answers with an HTTP error and closes,
	// one that closes at once, and one that never answers.
	for _, tt := range []struct {
		name  string
		serve func(c net.Conn)
		want  string
	}{
		{"http", func(c net.Conn) { c.Write([]byte("HTTP/1.1 400 Bad Request\r\n\r\n")) }, "expected CONNACK 20 02, got 48 54"},
		{"close", func(c net.Conn) {}, "connection closed before CONNACK"},
		{"silent", func(c net.Conn) { time.Sleep(time.Second) }, "i/o timeout"},
	} {
		t.Run(tt.name, func(t *testing.T) {
			ln := listenRaw(t, "127.0.0.1:0")
			defer ln.Close()
			go func() {
				for {
					c, err := ln.Accept()
					if err != nil {
						return
					}
					io.ReadFull(c, make([]byte, 2+45)) // the whole CONNECT
					tt.serve(c)
					c.Close()
				}
			}()
			start := time.Now()
			err := mqttProbe{timeout: 200 * time.Millisecond}.probe(context.Background(), netip.MustParseAddrPort(ln.Addr().String()))
			if err == nil || !strings.Contains(err.Error(), tt.want) {
				t.Errorf("probe = %v, want %q", err, tt.want)
			}
			if d := time.Since(start); d > time.Second {
				t.Errorf("probe took %s with a 200ms timeout", d)
			}
		})
	}
}

// TestHealthConnectFixture pins the probe's CONNECT bytes.
func TestHealthConnectFixture(t *testing.T) {
	got := appendHealthConnect(nil, 0x0123456789abcdef)
	want := []byte{
		0x10, 45, // CONNECT, remaining length 45
		0, 4, 'M', 'Q', 'T', 'T', // protocol name
		4,     // level 3.1.1
		0x02,  // clean session
		0, 60, // keep alive 60 s
		0, 33, // client ID length
	}
	want = append(want, "shardgate-health-0123456789abcdef"...)
	if !bytes.Equal(got, want) {
		t.Fatalf("CONNECT\n got % x\nwant % x", got, want)
	}
	if int(got[1]) != len(got)-2 {
		t.Errorf("remaining length %d, packet body %d", got[1], len(got)-2)
	}
}

// TestStaticFirstSnapshotWaitsForFirstRound: the first snapshot is held
// until every instance has its first result, but never longer than Timeout:
// an instance whose check hangs counts as unhealthy then.
func TestStaticFirstSnapshotWaitsForFirstRound(t *testing.T) {
	good := listenTCP(t, "127.0.0.1:0")
	defer good.Close()
	// A TCP server that accepts and never answers the MQTT CONNECT.
	hang := listenRaw(t, "127.0.0.1:0")
	defer hang.Close()
	var (
		heldMu sync.Mutex
		held   []net.Conn
	)
	defer func() {
		heldMu.Lock()
		defer heldMu.Unlock()
		for _, c := range held {
			c.Close()
		}
	}()
	go func() {
		for {
			c, err := hang.Accept()
			if err != nil {
				return
			}
			heldMu.Lock()
			held = append(held, c)
			heldMu.Unlock()
		}
	}()
	mosq := servertest.Mosquitto(t, servertest.MosquittoOptions{})
	const timeout = 400 * time.Millisecond
	start := time.Now()
	_, rec := startStatic(t, StaticConfig{
		Instances: []StaticInstance{{ID: "mosq", Address: mosq.String()}, {ID: "hang", Address: hang.Addr().String()}},
		Health:    HealthConfig{Type: "mqtt", Interval: time.Second, Timeout: timeout},
	})
	rec.waitFor(t, "first snapshot", 3*time.Second, func(_ []InstanceStatus, snaps []*Snapshot) bool { return len(snaps) > 0 })
	elapsed := time.Since(start)
	snaps := rec.snapshots()
	if elapsed < timeout-50*time.Millisecond {
		t.Errorf("first snapshot after %s, before the hanging check's timeout %s", elapsed, timeout)
	}
	if !healthyIn(snaps[0], "mosq") || healthyIn(snaps[0], "hang") {
		t.Errorf("first snapshot %+v", snaps[0].Instances())
	}
	if r, ok := snaps[0].Route([]byte("x")); !ok || r.Instance.ID != "mosq" {
		t.Errorf("Route = %+v, %v", r, ok)
	}
}

func TestStaticNoChecks(t *testing.T) {
	s, rec := startStatic(t, StaticConfig{
		Shards:    3,
		Instances: []StaticInstance{{ID: "a", Address: servertest.FreePort(t).String(), Shard: intp(0)}, {ID: "b", Address: servertest.FreePort(t).String(), Shard: intp(2)}},
		Health:    HealthConfig{Type: "none"},
	})
	rec.waitFor(t, "first snapshot", time.Second, func(_ []InstanceStatus, snaps []*Snapshot) bool { return len(snaps) > 0 })
	snap := rec.snapshots()[0]
	if !healthyIn(snap, "a") || !healthyIn(snap, "b") || snap.Shards() != 3 {
		t.Errorf("snapshot %+v", snap.Instances())
	}
	if st := s.Status(); st[0].State != "healthy" || st[0].Check != "none" || st[0].Checks != 0 {
		t.Errorf("Status %+v", st)
	}
}

func TestStaticReconfigure(t *testing.T) {
	a := listenTCP(t, "127.0.0.1:0")
	defer a.Close()
	b := listenTCP(t, "127.0.0.1:0")
	defer b.Close()
	c := listenTCP(t, "127.0.0.1:0")
	defer c.Close()
	health := HealthConfig{Interval: 50 * time.Millisecond, Timeout: 50 * time.Millisecond, Rise: 3, Fall: 3}
	cfg := StaticConfig{
		Shards: 1,
		Instances: []StaticInstance{
			{ID: "a", Address: a.Addr().String(), Shard: intp(0)},
			{ID: "b", Address: b.Addr().String(), Shard: intp(0), Priority: 1},
		},
		Health: health,
		Logger: quietLog,
	}
	s, rec := startStatic(t, cfg)
	rec.waitFor(t, "first snapshot", 2*time.Second, func(_ []InstanceStatus, snaps []*Snapshot) bool { return len(snaps) > 0 })
	if act, _ := rec.snapshots()[0].Active(0); act.ID != "a" {
		t.Fatalf("active %s, want a", act.ID)
	}

	// Invalid: refused, nothing changes.
	bad := cfg
	bad.Instances = []StaticInstance{{ID: "a", Address: "nope"}}
	if err := s.Reconfigure(bad); err == nil || !strings.Contains(err.Error(), "backends.static[0].address") {
		t.Fatalf("Reconfigure(bad) = %v", err)
	}

	// Swap priorities: published at once, health state kept.
	checksBefore := s.Status()[0].Checks
	cfg2 := cfg
	cfg2.Instances = []StaticInstance{
		{ID: "a", Address: a.Addr().String(), Shard: intp(0), Priority: 2},
		{ID: "b", Address: b.Addr().String(), Shard: intp(0), Priority: 1},
	}
	if err := s.Reconfigure(cfg2); err != nil {
		t.Fatal(err)
	}
	rec.waitFor(t, "b active", time.Second, func(_ []InstanceStatus, snaps []*Snapshot) bool {
		act, _ := lastSnap(snaps).Active(0)
		return act.ID == "b"
	})
	if st := s.Status(); st[0].Checks < checksBefore || st[0].State != "healthy" {
		t.Errorf("a's state not carried over: %+v (had %d checks)", st[0], checksBefore)
	}

	// New check settings, same addresses: state carried over, still healthy
	// without waiting for Rise passes.
	cfg3 := cfg2
	cfg3.Health.Interval = 60 * time.Millisecond
	n := len(rec.snapshots())
	if err := s.Reconfigure(cfg3); err != nil {
		t.Fatal(err)
	}
	time.Sleep(100 * time.Millisecond)
	if st := s.Status(); st[0].State != "healthy" || st[1].State != "healthy" || st[0].Checks < checksBefore {
		t.Errorf("state after new settings: %+v", st)
	}
	if got := len(rec.snapshots()); got != n {
		t.Errorf("new check settings published %d snapshots", got-n)
	}

	// b moves to a new address (c) and d is added: both start unknown, are
	// decided by their first check, and the snapshot waits for them.
	cfg4 := cfg3
	cfg4.Instances = []StaticInstance{
		{ID: "a", Address: a.Addr().String(), Shard: intp(0), Priority: 2},
		{ID: "b", Address: c.Addr().String(), Shard: intp(0), Priority: 1},
		{ID: "d", Address: servertest.FreePort(t).String(), Shard: intp(0), Priority: 0},
	}
	mark := len(rec.snapshots())
	if err := s.Reconfigure(cfg4); err != nil {
		t.Fatal(err)
	}
	rec.waitFor(t, "snapshot with d", time.Second, func(_ []InstanceStatus, snaps []*Snapshot) bool { return lastSnap(snaps).Len() == 3 })
	for _, snap := range rec.snapshots()[mark:] {
		if act, _ := snap.Active(0); act.ID != "b" || act.Addr.String() != c.Addr().String() {
			t.Errorf("active after moving b: %+v (want b at %s)", act, c.Addr())
		}
	}
	if st := s.Status(); st[1].Address.String() != c.Addr().String() || st[1].Checks > 3 || st[2].State != "unhealthy" {
		t.Errorf("Status after moving b and adding d: %+v", st)
	}

	// Remove b: a takes over.
	cfg5 := cfg4
	cfg5.Instances = []StaticInstance{cfg4.Instances[0], cfg4.Instances[2]}
	if err := s.Reconfigure(cfg5); err != nil {
		t.Fatal(err)
	}
	rec.waitFor(t, "a active again", time.Second, func(_ []InstanceStatus, snaps []*Snapshot) bool {
		act, _ := lastSnap(snaps).Active(0)
		return act.ID == "a" && lastSnap(snaps).Len() == 2
	})
	if len(s.Status()) != 2 {
		t.Errorf("Status lists %d instances", len(s.Status()))
	}
}

func TestStaticRunTwice(t *testing.T) {
	s, _ := startStatic(t, StaticConfig{Instances: []StaticInstance{{ID: "a", Address: servertest.FreePort(t).String()}}, Health: HealthConfig{Type: "none"}})
	time.Sleep(20 * time.Millisecond)
	if err := s.Run(context.Background(), func(*Snapshot) {}); err == nil {
		t.Error("second concurrent Run succeeded")
	}
}

// listenTCP listens on addr and closes every connection it accepts: up for
// a TCP check.
func listenTCP(t *testing.T, addr string) net.Listener {
	t.Helper()
	ln := listenRaw(t, addr)
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			c.Close()
		}
	}()
	return ln
}

// listenRaw listens on addr; the caller accepts.
func listenRaw(t *testing.T, addr string) net.Listener {
	t.Helper()
	var ln net.Listener
	var err error
	// The port of a listener just closed may take a moment to be free.
	for range 50 {
		if ln, err = net.Listen("tcp", addr); err == nil {
			break
		}
		time.Sleep(20 * time.Millisecond)
	}
	if err != nil {
		t.Fatal(err)
	}
	return ln
}
