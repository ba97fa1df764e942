package health

import (
	"context"
	"fmt"
	"io"
	"log/slog"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	consulapi "github.com/hashicorp/consul/api"
	"github.com/prometheus/client_golang/prometheus/testutil"

	"github.com/shardgate/shardgate/backend"
	"github.com/shardgate/shardgate/internal/consultest"
)

func apiClient(t *testing.T, agent *consultest.Agent) *consulapi.Client {
	t.Helper()
	cfg := consulapi.DefaultConfig()
	cfg.Address = agent.Addr()
	c, err := consulapi.NewClient(cfg)
	if err != nil {
		t.Fatal(err)
	}
	return c
}

// registerTTL registers an agent service (so maintenance works) with a TTL
// check the test flips; it starts passing.
func registerTTL(t *testing.T, c *consulapi.Client, id string, port int, meta map[string]string) {
	t.Helper()
	err := c.Agent().ServiceRegister(&consulapi.AgentServiceRegistration{
		ID: id, Name: DefaultService, Address: "127.0.0.1", Port: port, Meta: meta,
		Check: &consulapi.AgentServiceCheck{CheckID: id + "-ttl", TTL: "1h", Status: consulapi.HealthPassing},
	})
	if err != nil {
		t.Fatalf("register %s: %v", id, err)
	}
}

func setTTL(t *testing.T, c *consulapi.Client, id, status string) {
	t.Helper()
	if err := c.Agent().UpdateTTL(id+"-ttl", "set by test "+status, status); err != nil {
		t.Fatalf("ttl %s %s: %v", id, status, err)
	}
}

// registerCatalog registers a service of an external node straight into the
// catalog (raft state: it survives a restart of a server with a data
// directory, which an agent's TTL check state may not). status "" means no
// check.
func registerCatalog(t *testing.T, c *consulapi.Client, node, id string, port int, meta map[string]string, status string) {
	t.Helper()
	reg := &consulapi.CatalogRegistration{
		Node: node, Address: "127.0.0.1",
		Service: &consulapi.AgentService{ID: id, Service: DefaultService, Port: port, Meta: meta},
	}
	if status != "" {
		reg.Check = &consulapi.AgentCheck{Node: node, CheckID: id + "-check", Name: "check", Status: status, ServiceID: id, Output: "test " + status}
	}
	if _, err := c.Catalog().Register(reg, nil); err != nil {
		t.Fatalf("catalog register %s/%s: %v", node, id, err)
	}
}

func meta(shard, shards, priority int) map[string]string {
	return map[string]string{MetaShard: strconv.Itoa(shard), MetaShards: strconv.Itoa(shards), MetaPriority: strconv.Itoa(priority)}
}

// watch runs a watcher for the test and records what it publishes.
type watch struct {
	c    *Consul
	mu   sync.Mutex
	last *backend.Snapshot
	n    int
	done chan error
}

func startWatch(t *testing.T, cfg ConsulConfig) *watch {
	t.Helper()
	if cfg.Log == nil {
		cfg.Log = slog.New(slog.NewTextHandler(io.Discard, nil))
		if testing.Verbose() {
			cfg.Log = slog.New(slog.NewTextHandler(testWriter{t}, &slog.HandlerOptions{Level: slog.LevelDebug}))
		}
	}
	c, err := NewConsul(cfg)
	if err != nil {
		t.Fatal(err)
	}
	w := &watch{c: c, done: make(chan error, 1)}
	ctx, cancel := context.WithCancel(context.Background())
	go func() {
		w.done <- c.Run(ctx, func(s *backend.Snapshot) {
			w.mu.Lock()
			defer w.mu.Unlock()
			if w.last != nil && w.last.Equal(s) {
				t.Errorf("published an equal snapshot twice")
			}
			w.last, w.n = s, w.n+1
		})
	}()
	t.Cleanup(func() {
		cancel()
		select {
		case err := <-w.done:
			if err != nil {
				t.Errorf("Run: %v", err)
			}
		case <-time.After(10 * time.Second):
			t.Error("Run did not return after cancel")
		}
	})
	return w
}

type testWriter struct{ t *testing.T }

func (w testWriter) Write(p []byte) (int, error) {
	w.t.Log(strings.TrimSpace(string(p)))
	return len(p), nil
}

func (w *watch) snap() (*backend.Snapshot, int) {
	w.mu.Lock()
	defer w.mu.Unlock()
	return w.last, w.n
}

func (w *watch) waitFor(t *testing.T, what string, cond func(*backend.Snapshot) bool) *backend.Snapshot {
	t.Helper()
	deadline := time.Now().Add(15 * time.Second)
	for {
		s, _ := w.snap()
		if s != nil && cond(s) {
			return s
		}
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s; last snapshot: %s", what, describe(s))
		}
		time.Sleep(20 * time.Millisecond)
	}
}

func describe(s *backend.Snapshot) string {
	if s == nil {
		return "none"
	}
	var b strings.Builder
	for _, in := range s.Instances() {
		fmt.Fprintf(&b, "[%s %s shard=%d prio=%d healthy=%v] ", in.ID, in.Addr, in.Shard, in.Priority, in.Healthy)
	}
	return b.String()
}

func find(s *backend.Snapshot, id string) (backend.Instance, bool) {
	for _, in := range s.Instances() {
		if in.ID == id {
			return in, true
		}
	}
	return backend.Instance{}, false
}

func activeIs(shard int, id string) func(*backend.Snapshot) bool {
	return func(s *backend.Snapshot) bool {
		a, ok := s.Active(shard)
		return ok && a.ID == id
	}
}

func TestConsulSnapshotFollowsRegistrations(t *testing.T) {
	agent := consultest.Start(t, consultest.Options{})
	c := apiClient(t, agent)
	node := agent.NodeName()
	registerTTL(t, c, "b0", 18830, meta(0, 2, 0))
	registerTTL(t, c, "b0-standby", 18831, meta(0, 2, 1))
	registerTTL(t, c, "b1", 18832, meta(1, 2, 0))

	w := startWatch(t, ConsulConfig{Address: agent.Addr(), Shards: 2, WaitTime: 5 * time.Second})
	s := w.waitFor(t, "three healthy instances", func(s *backend.Snapshot) bool { return s.Len() == 3 && s.HealthyCount(0) == 2 })
	in, _ := find(s, node+"/b0-standby")
	if in.Addr.String() != "127.0.0.1:18831" || in.Shard != 0 || in.Priority != 1 {
		t.Fatalf("standby = %+v", in)
	}
	if !activeIs(0, node+"/b0")(s) || !activeIs(1, node+"/b1")(s) {
		t.Fatalf("active instances wrong: %s", describe(s))
	}
	if w.c.State() != StateOK {
		t.Fatalf("state %s", w.c.State())
	}

	t.Run("warning keeps the instance", func(t *testing.T) {
		setTTL(t, c, "b0", consulapi.HealthWarning)
		// Wait for Consul to have it, then for the watcher to have seen it.
		waitCheck(t, c, "b0", consulapi.HealthWarning)
		time.Sleep(300 * time.Millisecond)
		s, _ := w.snap()
		if !activeIs(0, node+"/b0")(s) {
			t.Fatalf("a warning check moved shard 0: %s", describe(s))
		}
	})
	t.Run("maintenance removes the instance", func(t *testing.T) {
		if err := c.Agent().EnableServiceMaintenance("b0", "test drain"); err != nil {
			t.Fatal(err)
		}
		s := w.waitFor(t, "b0 unhealthy", activeIs(0, node+"/b0-standby"))
		if in, _ := find(s, node+"/b0"); in.Healthy {
			t.Fatalf("b0 healthy in maintenance: %s", describe(s))
		}
		if err := c.Agent().DisableServiceMaintenance("b0"); err != nil {
			t.Fatal(err)
		}
		w.waitFor(t, "b0 back", activeIs(0, node+"/b0"))
	})
	t.Run("critical removes the instance", func(t *testing.T) {
		setTTL(t, c, "b0", consulapi.HealthCritical)
		w.waitFor(t, "b0 critical", activeIs(0, node+"/b0-standby"))
		setTTL(t, c, "b0", consulapi.HealthPassing)
		w.waitFor(t, "b0 passing", activeIs(0, node+"/b0"))
	})
	t.Run("shards mismatch refused", func(t *testing.T) {
		registerTTL(t, c, "wrong", 18840, meta(0, 3, -5))
		registerTTL(t, c, "byname", 18841, meta(1, 2, -5))
		// byname's address is a host name: refused, the proxy never resolves.
		if err := c.Agent().ServiceRegister(&consulapi.AgentServiceRegistration{
			ID: "byname", Name: DefaultService, Address: "broker.example", Port: 18841, Meta: meta(1, 2, -5),
			Check: &consulapi.AgentServiceCheck{CheckID: "byname-ttl", TTL: "1h", Status: consulapi.HealthPassing},
		}); err != nil {
			t.Fatal(err)
		}
		registerTTL(t, c, "b2", 18842, map[string]string{MetaShard: "1", MetaPriority: "3"}) // no shards meta: accepted
		s := w.waitFor(t, "b2 listed", func(s *backend.Snapshot) bool { _, ok := find(s, node+"/b2"); return ok })
		for _, id := range []string{"wrong", "byname"} {
			if _, ok := find(s, node+"/"+id); ok {
				t.Fatalf("%s routed despite breaking the contract: %s", id, describe(s))
			}
		}
		if !activeIs(0, node+"/b0")(s) {
			t.Fatalf("a refused instance with priority -5 took shard 0: %s", describe(s))
		}
		deadline := time.Now().Add(5 * time.Second)
		for w.c.Refused(RefusedShardsMismatch) != 1 || w.c.Refused(RefusedNotIP) != 1 {
			if time.Now().After(deadline) {
				t.Fatalf("refused: mismatch %d, not ip %d", w.c.Refused(RefusedShardsMismatch), w.c.Refused(RefusedNotIP))
			}
			time.Sleep(20 * time.Millisecond)
		}
		col := w.c.Collector()
		want := `
# HELP shardgate_consul_refused_instances_total Consul instances left out of routing because they break the registration contract, by reason (shards_mismatch: their shards meta differs from the proxy's shards).
# TYPE shardgate_consul_refused_instances_total counter
shardgate_consul_refused_instances_total{reason="address_not_ip"} 1
shardgate_consul_refused_instances_total{reason="bad_meta"} 0
shardgate_consul_refused_instances_total{reason="shards_mismatch"} 1
`
		if err := testutil.CollectAndCompare(col, strings.NewReader(want), "shardgate_consul_refused_instances_total"); err != nil {
			t.Fatal(err)
		}
		// Later answers (b2 flips) do not count the same refusal again.
		setTTL(t, c, "b2", consulapi.HealthCritical)
		w.waitFor(t, "b2 critical", func(s *backend.Snapshot) bool { in, _ := find(s, node+"/b2"); return !in.Healthy })
		if n := w.c.Refused(RefusedShardsMismatch); n != 1 {
			t.Fatalf("refusal counted %d times", n)
		}
	})
	t.Run("deregistered leaves", func(t *testing.T) {
		if err := c.Agent().ServiceDeregister("b1"); err != nil {
			t.Fatal(err)
		}
		w.waitFor(t, "b1 gone", func(s *backend.Snapshot) bool { _, ok := find(s, node+"/b1"); return !ok })
	})
	t.Run("an empty answer is the truth", func(t *testing.T) {
		for _, id := range []string{"b0", "b0-standby", "b2", "wrong", "byname"} {
			if err := c.Agent().ServiceDeregister(id); err != nil {
				t.Fatal(err)
			}
		}
		w.waitFor(t, "no instance", func(s *backend.Snapshot) bool { return s.Len() == 0 })
		if w.c.State() != StateOK {
			t.Fatalf("state %s", w.c.State())
		}
	})
}

func waitCheck(t *testing.T, c *consulapi.Client, id, status string) {
	t.Helper()
	deadline := time.Now().Add(5 * time.Second)
	for {
		entries, _, err := c.Health().Service(DefaultService, "", false, nil)
		if err == nil {
			for _, e := range entries {
				if e.Service.ID == id && e.Checks.AggregatedStatus() == status {
					return
				}
			}
		}
		if time.Now().After(deadline) {
			t.Fatalf("%s never %s", id, status)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// An answer whose index has not moved is ignored, and a changed answer that
// routes the same (a check's output changed) publishes nothing.
func TestConsulPublishesOnChangeOnly(t *testing.T) {
	agent := consultest.Start(t, consultest.Options{})
	c := apiClient(t, agent)
	registerCatalog(t, c, "n1", "b0", 1883, meta(0, 1, 0), consulapi.HealthPassing)
	w := startWatch(t, ConsulConfig{Address: agent.Addr(), Shards: 1, WaitTime: 500 * time.Millisecond})
	w.waitFor(t, "b0", activeIs(0, "n1/b0"))
	_, n0 := w.snap()
	st0 := w.c.Stats()

	// Consul answers each 0.5 s wait with the same index: ignored.
	time.Sleep(2 * time.Second)
	st := w.c.Stats()
	if st.Ignored-st0.Ignored < 2 {
		t.Fatalf("ignored %d answers in 2s of 0.5s waits; stats %+v", st.Ignored-st0.Ignored, st)
	}
	if st.Queries-st0.Queries > 10 {
		t.Fatalf("%d queries in 2s of 0.5s waits: not blocking", st.Queries-st0.Queries)
	}
	// New index, same routing: the output of the check changes.
	for i := range 5 {
		reg := &consulapi.CatalogRegistration{Node: "n1", Address: "127.0.0.1",
			Service: &consulapi.AgentService{ID: "b0", Service: DefaultService, Port: 1883, Meta: meta(0, 1, 0)},
			Check:   &consulapi.AgentCheck{Node: "n1", CheckID: "b0-check", Name: "check", Status: consulapi.HealthPassing, ServiceID: "b0", Output: fmt.Sprint("output ", i)}}
		if _, err := c.Catalog().Register(reg, nil); err != nil {
			t.Fatal(err)
		}
		time.Sleep(50 * time.Millisecond)
	}
	time.Sleep(500 * time.Millisecond)
	if _, n := w.snap(); n != n0 {
		t.Fatalf("published %d snapshots for changes that route the same", n-n0)
	}
	if w.c.Stats().Publishes != uint64(n0) {
		t.Fatalf("stats %+v, published %d", w.c.Stats(), n0)
	}
}

// Fail static: a killed Consul keeps the last snapshot, in state stale,
// with backoff rather than a hot loop; restarted (its catalog survives) the
// watcher catches up and publishes nothing, since nothing changed.
func TestConsulFailStatic(t *testing.T) {
	agent := consultest.Start(t, consultest.Options{DataDir: t.TempDir()})
	c := apiClient(t, agent)
	registerCatalog(t, c, "n1", "b0", 1883, meta(0, 2, 0), consulapi.HealthPassing)
	registerCatalog(t, c, "n2", "b1", 1883, meta(1, 2, 0), consulapi.HealthWarning)
	w := startWatch(t, ConsulConfig{Address: agent.Addr(), Shards: 2, WaitTime: 2 * time.Second,
		BackoffMin: 100 * time.Millisecond, BackoffMax: 800 * time.Millisecond})
	before := w.waitFor(t, "both shards", func(s *backend.Snapshot) bool { return activeIs(0, "n1/b0")(s) && activeIs(1, "n2/b1")(s) })
	_, n0 := w.snap()

	agent.Kill()
	deadline := time.Now().Add(10 * time.Second)
	for w.c.State() != StateStale {
		if time.Now().After(deadline) {
			t.Fatalf("state %s after kill", w.c.State())
		}
		time.Sleep(10 * time.Millisecond)
	}
	state, since, err := w.c.Detail()
	if state != StateStale || since.IsZero() || err == nil {
		t.Fatalf("detail %s %v %v", state, since, err)
	}
	f0 := w.c.Stats().Failures
	time.Sleep(3 * time.Second)
	// Backoff 100ms doubling to 800ms, jittered to [d/2, d): in 3s at
	// least 3 and at most ~12 attempts; a hot loop would make thousands.
	if f := w.c.Stats().Failures - f0; f < 3 || f > 15 {
		t.Fatalf("%d failed queries in 3s: backoff broken", f)
	}
	if s, n := w.snap(); n != n0 || !s.Equal(before) {
		t.Fatalf("snapshot changed while Consul was down: %s", describe(s))
	}
	want := `
# HELP shardgate_consul_state The Consul watcher's state: 1 for the current one (starting, ok, stale: Consul unreachable, routing on the last snapshot), 0 for the others.
# TYPE shardgate_consul_state gauge
shardgate_consul_state{state="ok"} 0
shardgate_consul_state{state="stale"} 1
shardgate_consul_state{state="starting"} 0
`
	if err := testutil.CollectAndCompare(w.c.Collector(), strings.NewReader(want), "shardgate_consul_state"); err != nil {
		t.Fatal(err)
	}

	agent.Restart()
	deadline = time.Now().Add(15 * time.Second)
	for w.c.State() != StateOK {
		if time.Now().After(deadline) {
			t.Fatalf("state %s after restart", w.c.State())
		}
		time.Sleep(10 * time.Millisecond)
	}
	time.Sleep(500 * time.Millisecond)
	if s, n := w.snap(); n != n0 || !s.Equal(before) {
		t.Fatalf("restart published %d snapshots (spurious change): %s", n-n0, describe(s))
	}
	// And it follows changes again.
	registerCatalog(t, c, "n1", "b0", 1883, meta(0, 2, 0), consulapi.HealthCritical)
	w.waitFor(t, "b0 critical after restart", func(s *backend.Snapshot) bool { _, ok := s.Active(0); return !ok })
}

// The index going backwards (a -dev agent restarted empty, then
// repopulated) resets the watch, and the empty answer in between is taken
// as the truth.
func TestConsulIndexReset(t *testing.T) {
	agent := consultest.Start(t, consultest.Options{})
	c := apiClient(t, agent)
	// Push the service's index well above where a fresh agent starts.
	for i := range 40 {
		registerCatalog(t, c, "n1", "b0", 1883+i%2, meta(0, 1, 0), consulapi.HealthPassing)
	}
	w := startWatch(t, ConsulConfig{Address: agent.Addr(), Shards: 1, WaitTime: time.Second,
		BackoffMin: 50 * time.Millisecond, BackoffMax: 200 * time.Millisecond})
	w.waitFor(t, "b0", activeIs(0, "n1/b0"))

	agent.Restart() // -dev: comes back empty, with a new raft index
	w.waitFor(t, "empty answer after the restart", func(s *backend.Snapshot) bool { return s.Len() == 0 })
	registerCatalog(t, c, "n2", "b9", 1999, meta(0, 1, 0), consulapi.HealthPassing)
	w.waitFor(t, "b9 after the reset", activeIs(0, "n2/b9"))
	if r := w.c.Stats().Resets; r < 1 {
		t.Fatalf("no index reset recorded: %+v", w.c.Stats())
	}
}

func TestNextIndex(t *testing.T) {
	for _, tc := range []struct {
		prev, got, next uint64
		changed, reset  bool
	}{
		{0, 10, 10, true, false},
		{10, 10, 10, false, false},
		{10, 12, 12, true, false},
		{10, 3, 0, true, true},
		{0, 0, 1, false, false}, // never wait on 0: it returns at once
	} {
		next, changed, reset := nextIndex(tc.prev, tc.got)
		if next != tc.next || changed != tc.changed || reset != tc.reset {
			t.Errorf("nextIndex(%d, %d) = %d %v %v, want %d %v %v", tc.prev, tc.got, next, changed, reset, tc.next, tc.changed, tc.reset)
		}
	}
}

func TestBackoffCappedAndJittered(t *testing.T) {
	var d time.Duration
	for range 20 {
		d = nextBackoff(d, DefaultBackoffMin, DefaultBackoffMax)
		j := jitter(d)
		if j < d/2 || j >= d {
			t.Fatalf("jitter(%v) = %v", d, j)
		}
	}
	if d != DefaultBackoffMax {
		t.Fatalf("backoff %v not capped at %v", d, DefaultBackoffMax)
	}
}

// Below the panic threshold every known instance takes devices; back above
// it, only the healthy ones.
func TestConsulPanicThreshold(t *testing.T) {
	agent := consultest.Start(t, consultest.Options{})
	c := apiClient(t, agent)
	registerCatalog(t, c, "n1", "a", 1883, nil, consulapi.HealthPassing)
	registerCatalog(t, c, "n2", "b", 1883, nil, consulapi.HealthPassing)
	registerCatalog(t, c, "n3", "c", 1883, nil, consulapi.HealthPassing)
	w := startWatch(t, ConsulConfig{Address: agent.Addr(), PanicThreshold: 0.5, WaitTime: 2 * time.Second})
	w.waitFor(t, "three healthy", func(s *backend.Snapshot) bool { return s.HealthyCount(-1) == 3 })
	registerCatalog(t, c, "n1", "a", 1883, nil, consulapi.HealthCritical)
	w.waitFor(t, "two healthy (2/3 above 0.5)", func(s *backend.Snapshot) bool { return s.HealthyCount(-1) == 2 })
	if w.c.Panicking() {
		t.Fatal("panicking at 2/3")
	}
	registerCatalog(t, c, "n2", "b", 1883, nil, consulapi.HealthCritical)
	w.waitFor(t, "panic: all three routed (1/3 below 0.5)", func(s *backend.Snapshot) bool { return s.HealthyCount(-1) == 3 })
	if !w.c.Panicking() {
		t.Fatal("not panicking at 1/3")
	}
	registerCatalog(t, c, "n2", "b", 1883, nil, consulapi.HealthPassing)
	w.waitFor(t, "out of panic", func(s *backend.Snapshot) bool { return s.HealthyCount(-1) == 2 })
	if w.c.Panicking() {
		t.Fatal("still panicking at 2/3")
	}
}
