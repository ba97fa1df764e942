package main

import (
	"fmt"
	"net/http"
	"net/http/httptest"
	"net/netip"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	consulapi "github.com/hashicorp/consul/api"

	"github.com/shardgate/shardgate/backend"
	"github.com/shardgate/shardgate/internal/consultest"
	"github.com/shardgate/shardgate/internal/servertest"
)

func e2eConsulClient(t *testing.T, agent *consultest.Agent) *consulapi.Client {
	t.Helper()
	cfg := consulapi.DefaultConfig()
	cfg.Address = agent.Addr()
	c, err := consulapi.NewClient(cfg)
	if err != nil {
		t.Fatal(err)
	}
	return c
}

// e2eConsulProxy runs `shardgate proxy` with backends from the agent.
func e2eConsulProxy(t *testing.T, bin string, agent *consultest.Agent, shards int, extra string) *e2eProxy {
	t.Helper()
	listen, admin := servertest.FreePort(t).String(), servertest.FreePort(t).String()
	y := fmt.Sprintf("listen: [%q]\nadmin: %q\nevent_loops: 1\nshards: %d\nbackends:\n  consul: {address: %q, wait_time: 10s}\n%s",
		listen, admin, shards, agent.Addr(), extra)
	px := &e2eProxy{mqtt: listen, admin: admin, cfgPath: t.TempDir() + "/proxy.yaml"}
	px.writeConfig(t, y)
	px.e2eProcess = e2eStart(t, "shardgate proxy", bin, "proxy", "--config", px.cfgPath)
	px.waitAdmin(t)
	return px
}

// e2eRegisterBroker registers a broker service with the agent the way our
// brokers do (meta shard, shards, priority), with a TTL check the test sets.
func e2eRegisterBroker(t *testing.T, c *consulapi.Client, id string, port, shard, shards, priority int) {
	t.Helper()
	err := c.Agent().ServiceRegister(&consulapi.AgentServiceRegistration{
		ID: id, Name: "mqtt-broker", Address: "127.0.0.1", Port: port,
		Meta:  map[string]string{"shard": strconv.Itoa(shard), "shards": strconv.Itoa(shards), "priority": strconv.Itoa(priority)},
		Check: &consulapi.AgentServiceCheck{CheckID: id + "-ttl", TTL: "1h", Status: consulapi.HealthPassing},
	})
	if err != nil {
		t.Fatal(err)
	}
}

// snapshotOf rebuilds the routing snapshot a proxy's /api/v1/backends lists.
func (b e2eBackends) snapshot(t *testing.T) *backend.Snapshot {
	t.Helper()
	ins := make([]backend.Instance, 0, len(b.Instances))
	for _, in := range b.Instances {
		ins = append(ins, backend.Instance{ID: in.ID, Addr: netip.MustParseAddrPort(in.Address), Shard: in.Shard, Priority: in.Priority, Healthy: in.Healthy})
	}
	return backend.NewSnapshot(b.Shards, ins, backend.SnapshotOptions{})
}

// TestE2EConsulProxiesAgree runs two proxy processes on one Consul agent and
// checks after every change (register, maintenance on, off) that they route
// 10k client IDs to the same instances, and that the listing they route by
// is the proxy's own (a sample through /api/v1/route). One proxy registers
// itself in Consul, with its /readyz as the check, and leaves on SIGTERM.
func TestE2EConsulProxiesAgree(t *testing.T) {
	t.Parallel()
	bin := buildShardgate(t)
	agent := consultest.Start(t, consultest.Options{})
	c := e2eConsulClient(t, agent)
	const shards = 3
	for s := range shards {
		e2eRegisterBroker(t, c, fmt.Sprintf("b%d", s), 20000+s, s, shards, 0)
	}
	a := e2eConsulProxy(t, bin, agent, shards, "register: {enabled: true, id: px-a, check_interval: 1s}\n")
	b := e2eConsulProxy(t, bin, agent, shards, "")
	a.waitReady(t)
	b.waitReady(t)
	node := agent.NodeName()

	ids := make([]string, 10000)
	for i := range ids {
		ids[i] = fmt.Sprintf("device-%05d", i)
	}
	agree := func(step string, want func(e2eBackends) bool) {
		t.Helper()
		var la, lb e2eBackends
		e2eWaitFor(t, step+": both proxies see it", e2eWait, func() (bool, string) {
			la, lb = a.backends(t), b.backends(t)
			return want(la) && want(lb), fmt.Sprint(la.Instances, " / ", lb.Instances)
		})
		sa, sb := la.snapshot(t), lb.snapshot(t)
		moved := 0
		for _, id := range ids {
			ra, _ := sa.RouteString(id)
			rb, _ := sb.RouteString(id)
			if (ra.Instance == nil) != (rb.Instance == nil) || (ra.Instance != nil && ra.Instance.ID != rb.Instance.ID) {
				moved++
			}
		}
		if moved != 0 {
			t.Fatalf("%s: the proxies disagree on %d of %d client IDs", step, moved, len(ids))
		}
		for _, id := range ids[:25] {
			r, _ := sa.RouteString(id)
			for _, px := range []*e2eProxy{a, b} {
				got := px.route(t, id)
				if got.Instance == nil || r.Instance == nil || *got.Instance != r.Instance.ID {
					t.Fatalf("%s: %s routed to %v by the proxy, %v by its listing", step, id, got.Instance, r.Instance)
				}
			}
		}
	}
	has := func(id string, healthy bool) func(e2eBackends) bool {
		return func(l e2eBackends) bool { return l.healthy()[node+"/"+id] == healthy && len(l.Instances) > 0 }
	}
	agree("start", has("b0", true))

	e2eRegisterBroker(t, c, "b0-standby", 20100, 0, shards, 1)
	agree("standby registered", has("b0-standby", true))

	if err := c.Agent().EnableServiceMaintenance("b0", "e2e drain"); err != nil {
		t.Fatal(err)
	}
	agree("b0 in maintenance", has("b0", false))
	if r := a.route(t, "device-00000"); r.Shard == 0 && (r.Instance == nil || *r.Instance != node+"/b0-standby") {
		t.Fatalf("shard 0 device not on the standby: %+v", r)
	}
	if err := c.Agent().DisableServiceMaintenance("b0"); err != nil {
		t.Fatal(err)
	}
	agree("b0 back", has("b0", true))

	// A shards mismatch is refused by both and counted.
	e2eRegisterBroker(t, c, "stranger", 20200, 0, shards+1, -1)
	e2eRegisterBroker(t, c, "b1-standby", 20201, 1, shards, 1)
	agree("stranger refused", func(l e2eBackends) bool {
		h := l.healthy()
		_, stranger := h[node+"/stranger"]
		return h[node+"/b1-standby"] && !stranger
	})
	for _, px := range []*e2eProxy{a, b} {
		m := px.metrics(t)
		if m[`shardgate_consul_refused_instances_total{reason="shards_mismatch"}`] != 1 || m[`shardgate_consul_state{state="ok"}`] != 1 {
			t.Fatalf("metrics: refused %v, state ok %v", m[`shardgate_consul_refused_instances_total{reason="shards_mismatch"}`], m[`shardgate_consul_state{state="ok"}`])
		}
	}

	// Proxy a is registered, passing (its /readyz is 200), and leaves on
	// SIGTERM.
	e2eWaitFor(t, "proxy a registered and passing", e2eWait, func() (bool, string) {
		entries, _, err := c.Health().Service("shardgate-proxy", "", true, nil)
		return err == nil && len(entries) == 1 && entries[0].Service.ID == "px-a", fmt.Sprint(len(entries), err)
	})
	a.signal(t, syscall.SIGTERM)
	a.waitExit(t, 40*time.Second)
	if entries, _, err := c.Health().Service("shardgate-proxy", "", false, nil); err != nil || len(entries) != 0 {
		t.Fatalf("proxy a still registered after SIGTERM: %d %v", len(entries), err)
	}
}

// flakyCheck is a broker /readyz stand-in (a fake, named as one: only the
// check's answers matter here) that fails exactly one request on demand.
type flakyCheck struct {
	mu       sync.Mutex
	failNext bool
	served   int
	failedAt int
}

func (f *flakyCheck) ServeHTTP(w http.ResponseWriter, _ *http.Request) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.served++
	if f.failNext {
		f.failNext, f.failedAt = false, f.served
		http.Error(w, "one failure", http.StatusServiceUnavailable)
		return
	}
	w.Write([]byte("ok"))
}

func (f *flakyCheck) failOnce() {
	f.mu.Lock()
	f.failNext, f.failedAt = true, 0
	f.mu.Unlock()
}

// after reports whether the failure happened and n more checks passed.
func (f *flakyCheck) after(n int) bool {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.failedAt > 0 && f.served >= f.failedAt+n
}

// TestE2EConsulHysteresisInCheck: a check with FailuresBeforeCritical=3 that
// fails once keeps the instance in the healthy set, so none of the devices
// connected through the proxy to it (real paho clients, real Mosquitto)
// moves; the same single failure without it takes the instance out, and the
// proxy's drain moves devices to the standby.
func TestE2EConsulHysteresisInCheck(t *testing.T) {
	t.Parallel()
	bin := buildShardgate(t)
	agent := consultest.Start(t, consultest.Options{})
	c := e2eConsulClient(t, agent)
	node := agent.NodeName()
	ms := e2eBrokers(t, 2)
	port := func(m *servertest.MosquittoServer) int { return int(netip.MustParseAddrPort(m.String()).Port()) }
	check := &flakyCheck{}
	srv := httptest.NewServer(check)
	t.Cleanup(srv.Close)
	register := func(failures int) {
		err := c.Agent().ServiceRegister(&consulapi.AgentServiceRegistration{
			ID: "primary", Name: "mqtt-broker", Address: "127.0.0.1", Port: port(ms[0]),
			Meta: map[string]string{"shard": "0", "shards": "1", "priority": "0"},
			Check: &consulapi.AgentServiceCheck{CheckID: "primary-readyz", HTTP: srv.URL + "/readyz",
				Interval: "1s", Timeout: "1s", FailuresBeforeCritical: failures},
		})
		if err != nil {
			t.Fatal(err)
		}
	}
	register(3)
	e2eRegisterBroker(t, c, "standby", port(ms[1]), 0, 1, 1)
	// drain.rate 1: the whole instance within a second, so a one-check flap
	// is long enough to move devices when it counts.
	px := e2eConsulProxy(t, bin, agent, 1, "drain: {rate: 1}\n")
	active := func() string {
		for _, in := range px.backends(t).Instances {
			if in.Active {
				return strings.TrimPrefix(in.ID, node+"/")
			}
		}
		return ""
	}
	primaryActive := func() (bool, string) { a := active(); return a == "primary", a }
	e2eWaitFor(t, "primary active", e2eWait, primaryActive)

	devices := func(round string) []*e2eV3 {
		var ds []*e2eV3
		for i := range 5 {
			d, err := e2eConnectV3(px.mqtt, fmt.Sprintf("%s-%d", round, i), 4)
			if err != nil {
				t.Fatal(err)
			}
			t.Cleanup(d.Disconnect)
			ds = append(ds, d)
		}
		return ds
	}
	lost := func(ds []*e2eV3) int {
		n := 0
		for _, d := range ds {
			select {
			case <-d.Lost():
				n++
			default:
			}
		}
		return n
	}
	flap := func() (left bool) {
		check.failOnce()
		deadline := time.Now().Add(20 * time.Second)
		for !check.after(2) {
			if a := active(); a != "primary" {
				left = true
			}
			if time.Now().After(deadline) {
				t.Fatal("the check never failed then passed twice")
			}
			time.Sleep(20 * time.Millisecond)
		}
		return left
	}

	ds := devices("hyst")
	if flap() {
		t.Fatal("one failed check with FailuresBeforeCritical=3 moved shard 0 off the primary")
	}
	time.Sleep(500 * time.Millisecond)
	if n := lost(ds); n != 0 {
		t.Fatalf("%d of %d devices moved by one failed check with FailuresBeforeCritical=3", n, len(ds))
	}

	// Re-registered without hysteresis (its new check starts critical: the
	// first devices may move then, so a fresh set connects after).
	register(0)
	e2eWaitFor(t, "primary active again after re-registration", e2eWait, primaryActive)
	time.Sleep(300 * time.Millisecond)
	ds = devices("flap")
	if !flap() {
		t.Fatal("one failed check without FailuresBeforeCritical did not take the primary out")
	}
	e2eWaitFor(t, "primary back", e2eWait, primaryActive)
	if n := lost(ds); n == 0 {
		t.Fatal("the same flap without FailuresBeforeCritical moved no device")
	} else {
		t.Logf("the flap without hysteresis moved %d of %d devices", n, len(ds))
	}
}
