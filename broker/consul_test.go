package broker

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/http"
	"net/http/httptest"
	"net/netip"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	consulapi "github.com/hashicorp/consul/api"

	"github.com/shardgate/shardgate/internal/consultest"
)

// consulReadyz is a broker's /readyz as the agent's HTTP check sees it: a
// real HTTP server on 127.0.0.1 whose answer the test sets, counting the
// checks it answers.
type consulReadyz struct {
	srv *httptest.Server

	mu     sync.Mutex
	status int
	counts map[int]int // status → checks answered with it
}

func newConsulReadyz(t *testing.T) *consulReadyz {
	t.Helper()
	z := &consulReadyz{status: http.StatusOK, counts: map[int]int{}}
	z.srv = httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.URL.Path != "/readyz" {
			http.NotFound(w, r)
			return
		}
		z.mu.Lock()
		status := z.status
		// Counted before the answer, so a state the agent derives from
		// this answer is never seen with a count that misses it.
		z.counts[status]++
		z.mu.Unlock()
		w.WriteHeader(status)
		fmt.Fprintln(w, http.StatusText(status))
	}))
	t.Cleanup(z.srv.Close)
	return z
}

func (z *consulReadyz) url() string { return z.srv.URL + "/readyz" }

func (z *consulReadyz) set(status int) {
	z.mu.Lock()
	z.status = status
	z.mu.Unlock()
}

func (z *consulReadyz) count(status int) int {
	z.mu.Lock()
	defer z.mu.Unlock()
	return z.counts[status]
}

func consulClient(t *testing.T, agent *consultest.Agent) *consulapi.Client {
	t.Helper()
	c, err := consulapi.NewClient(&consulapi.Config{Address: agent.Addr()})
	if err != nil {
		t.Fatal(err)
	}
	return c
}

// consulTestRegistration is a registration with the test agent and readyz,
// with the check and keeper as fast as the agent allows (Consul runs
// checks at most once a second).
func consulTestRegistration(agent *consultest.Agent, z *consulReadyz) RegistrationConfig {
	return RegistrationConfig{
		Consul:         &consulapi.Config{Address: agent.Addr()},
		Address:        netip.MustParseAddrPort("127.0.0.1:18830"),
		Shard:          1,
		Shards:         3,
		Priority:       2,
		Tags:           []string{"test"},
		CheckURL:       z.url(),
		CheckInterval:  time.Second,
		CheckTimeout:   time.Second,
		ResyncInterval: 300 * time.Millisecond,
	}
}

// consulEventually polls cond until it returns "" or the timeout passes,
// then fails with cond's last complaint.
func consulEventually(t *testing.T, timeout time.Duration, cond func() string) {
	t.Helper()
	deadline := time.Now().Add(timeout)
	for {
		why := cond()
		if why == "" {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("after %v: %s", timeout, why)
		}
		time.Sleep(100 * time.Millisecond)
	}
}

// consulPassing is what a proxy's watcher must see: the service's
// instances whose checks are all passing or warning. Not the health
// endpoint's passing-only results: those leave out warning instances (see
// TestConsulRegistrationContract).
func consulPassing(t *testing.T, c *consulapi.Client) []*consulapi.ServiceEntry {
	t.Helper()
	all, _, err := c.Health().Service(registrationService, "", false, nil)
	if err != nil {
		t.Fatalf("health query: %v", err)
	}
	var es []*consulapi.ServiceEntry
	for _, e := range all {
		if st := e.Checks.AggregatedStatus(); st == consulapi.HealthPassing || st == consulapi.HealthWarning {
			es = append(es, e)
		}
	}
	return es
}

// consulCheckStatus is the status of the registration's readyz check on
// the agent, "" when it has none.
func consulCheckStatus(t *testing.T, c *consulapi.Client, id string) string {
	t.Helper()
	checks, err := c.Agent().Checks()
	if err != nil {
		t.Fatalf("agent checks: %v", err)
	}
	if ch := checks["service:"+id]; ch != nil {
		return ch.Status
	}
	return ""
}

func consulRegister(t *testing.T, cfg RegistrationConfig) *Registration {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	r, err := Register(ctx, cfg)
	if err != nil {
		t.Fatalf("Register: %v", err)
	}
	t.Cleanup(func() { r.Deregister() })
	return r
}

func consulWaitPassing(t *testing.T, c *consulapi.Client, id string) *consulapi.ServiceEntry {
	t.Helper()
	var got *consulapi.ServiceEntry
	consulEventually(t, 15*time.Second, func() string {
		for _, e := range consulPassing(t, c) {
			if e.Service.ID == id {
				got = e
				return ""
			}
		}
		return id + " not among the passing instances"
	})
	return got
}

func consulWaitNotPassing(t *testing.T, c *consulapi.Client, id string) {
	t.Helper()
	consulEventually(t, 15*time.Second, func() string {
		for _, e := range consulPassing(t, c) {
			if e.Service.ID == id {
				return id + " still among the passing instances"
			}
		}
		return ""
	})
}

// TestConsulRegistrationContract: the registration the proxies read — name,
// id, address by IP, shard meta, tags, an HTTP check on /readyz — and a
// 429 from /readyz (a Redis fault) is a warning that keeps the instance in
// the passing results, then Deregister removes it.
func TestConsulRegistrationContract(t *testing.T) {
	agent := consultest.Start(t, consultest.Options{})
	c := consulClient(t, agent)
	z := newConsulReadyz(t)
	r := consulRegister(t, consulTestRegistration(agent, z))

	const id = "mqtt-broker-1-18830"
	if r.ServiceID() != id {
		t.Fatalf("ServiceID %q, want the default %q", r.ServiceID(), id)
	}
	if want := agent.NodeName() + "/" + id; r.InstanceID() != want {
		t.Fatalf("InstanceID %q, want %q", r.InstanceID(), want)
	}
	e := consulWaitPassing(t, c, id)
	s := e.Service
	if s.Service != "mqtt-broker" || s.Address != "127.0.0.1" || s.Port != 18830 || !slices.Equal(s.Tags, []string{"test"}) {
		t.Errorf("service %s %s:%d tags %v, want mqtt-broker 127.0.0.1:18830 tags [test]", s.Service, s.Address, s.Port, s.Tags)
	}
	if m := s.Meta; m["shard"] != "1" || m["shards"] != "3" || m["priority"] != "2" {
		t.Errorf("meta %v, want shard 1, shards 3, priority 2", m)
	}
	if e.Node.Node != agent.NodeName() {
		t.Errorf("node %q, want the agent's %q", e.Node.Node, agent.NodeName())
	}

	checks, err := c.Agent().Checks()
	if err != nil {
		t.Fatal(err)
	}
	ch := checks["service:"+id]
	if ch == nil {
		t.Fatalf("no check service:%s among %v", id, checks)
	}
	// The agent does not return a check's definition; its output names
	// what it ran.
	if ch.ServiceID != id || ch.Type != "http" || !strings.HasPrefix(ch.Output, "HTTP GET "+z.url()+": 200 OK") {
		t.Errorf("check %+v, want an http check of %s on GET %s", ch, id, z.url())
	}
	if ch.Status != consulapi.HealthPassing {
		t.Errorf("check status %s, want passing", ch.Status)
	}

	// A Redis fault: /readyz answers 429. Consul calls it warning, and the
	// instance stays healthy for the proxies.
	z.set(http.StatusTooManyRequests)
	consulEventually(t, 10*time.Second, func() string {
		if st := consulCheckStatus(t, c, id); st != consulapi.HealthWarning {
			return "check status " + st + ", want warning"
		}
		return ""
	})
	consulEventually(t, 5*time.Second, func() string {
		all, _, err := c.Health().Service(registrationService, "", false, nil)
		if err != nil || len(all) != 1 || all[0].Checks.AggregatedStatus() != consulapi.HealthWarning {
			return fmt.Sprintf("health: %d instances (err %v), want %s in warning", len(all), err, id)
		}
		return ""
	})
	if es := consulPassing(t, c); len(es) != 1 || es[0].Service.ID != id {
		t.Fatalf("healthy instances with a warning check: %d, want %s", len(es), id)
	}
	// Pinned because the proxies' watcher depends on it: the health
	// endpoint's passing-only filter (?passing) drops warning instances, so
	// a watcher must ask for every instance and leave out those with a
	// critical check itself (maintenance is a critical check too).
	if es, _, err := c.Health().Service(registrationService, "", true, nil); err != nil || len(es) != 0 {
		t.Fatalf("passing-only health query with a warning check: %d instances (err %v); Consul now keeps warning in ?passing", len(es), err)
	}

	if err := r.Deregister(); err != nil {
		t.Fatalf("Deregister: %v", err)
	}
	if _, _, err := c.Agent().Service(id, nil); !consulNotFound(err) {
		t.Fatalf("agent service after Deregister: err %v, want 404", err)
	}
	consulEventually(t, 5*time.Second, func() string {
		es, _, err := c.Health().Service(registrationService, "", false, nil)
		if err != nil || len(es) != 0 {
			return fmt.Sprintf("catalog after Deregister: %d instances, err %v", len(es), err)
		}
		return ""
	})
	if err := r.Deregister(); err != nil {
		t.Fatalf("second Deregister: %v", err)
	}
	if err := r.Maintenance(true, "late"); !errors.Is(err, ErrDeregistered) {
		t.Fatalf("Maintenance after Deregister: %v, want ErrDeregistered", err)
	}
}

func consulNotFound(err error) bool {
	var se consulapi.StatusError
	return errors.As(err, &se) && se.Code == http.StatusNotFound
}

// TestConsulCheckHysteresis: FailuresBeforeCritical 3 and
// SuccessBeforePassing 2 reach the agent. The agent's check definition does
// not show them, so the test watches their effect: one failed /readyz
// changes nothing (not even a warning), the third in a row makes the
// instance critical, and it passes again only after two passing checks.
func TestConsulCheckHysteresis(t *testing.T) {
	agent := consultest.Start(t, consultest.Options{})
	c := consulClient(t, agent)
	z := newConsulReadyz(t)
	cfg := consulTestRegistration(agent, z)
	r := consulRegister(t, cfg)
	id := r.ServiceID()

	// Coming up, Consul counts the first result as enough (its counters
	// start satisfied): a registered broker that is ready passes at once.
	consulEventually(t, 10*time.Second, func() string {
		if st := consulCheckStatus(t, c, id); st != consulapi.HealthPassing {
			return "check status " + st + ", want passing"
		}
		return ""
	})

	// One failure: not critical, not even warning.
	z.set(http.StatusServiceUnavailable)
	consulEventually(t, 5*time.Second, func() string {
		if z.count(http.StatusServiceUnavailable) == 0 {
			return "no failed check yet"
		}
		return ""
	})
	z.set(http.StatusOK)
	ok := z.count(http.StatusOK)
	consulEventually(t, 5*time.Second, func() string {
		if st := consulCheckStatus(t, c, id); st != consulapi.HealthPassing {
			t.Fatalf("check status %s after one failed check, want passing", st)
		}
		if z.count(http.StatusOK) < ok+2 {
			return "waiting for two more checks"
		}
		return ""
	})

	// Failing for good: critical at the third failure in a row.
	fails := z.count(http.StatusServiceUnavailable)
	z.set(http.StatusServiceUnavailable)
	consulEventually(t, 10*time.Second, func() string {
		st := consulCheckStatus(t, c, id)
		n := z.count(http.StatusServiceUnavailable) - fails
		if st != consulapi.HealthPassing && n < 3 {
			t.Fatalf("check status %s after %d failed checks, want passing until the 3rd", st, n)
		}
		if st != consulapi.HealthCritical {
			return "check status " + st + ", want critical"
		}
		return ""
	})
	consulWaitNotPassing(t, c, id)

	// Recovering: passing again at the second passing check.
	ok = z.count(http.StatusOK)
	z.set(http.StatusOK)
	consulEventually(t, 10*time.Second, func() string {
		st := consulCheckStatus(t, c, id)
		n := z.count(http.StatusOK) - ok
		if st != consulapi.HealthCritical && n < 2 {
			t.Fatalf("check status %s after %d passing checks, want critical until the 2nd", st, n)
		}
		if st != consulapi.HealthPassing {
			return "check status " + st + ", want passing"
		}
		return ""
	})
}

// TestConsulMaintenance: Maintenance(true) takes the instance out of the
// proxies' healthy set while it stays registered; Maintenance(false) brings
// it back; an operator's maintenance is not undone by the keeper.
func TestConsulMaintenance(t *testing.T) {
	agent := consultest.Start(t, consultest.Options{})
	c := consulClient(t, agent)
	z := newConsulReadyz(t)
	r := consulRegister(t, consulTestRegistration(agent, z))
	id := r.ServiceID()
	consulWaitPassing(t, c, id)

	if err := r.Maintenance(true, "shutting down"); err != nil {
		t.Fatalf("Maintenance(true): %v", err)
	}
	consulWaitNotPassing(t, c, id)
	consulAssertMaintenance(t, c, id, "shutting down")

	if err := r.Maintenance(false, ""); err != nil {
		t.Fatalf("Maintenance(false): %v", err)
	}
	consulWaitPassing(t, c, id)

	// An operator's `consul maint -enable -service=ID` is the same agent
	// call; the keeper, looking every 300ms, leaves it alone.
	if err := c.Agent().EnableServiceMaintenance(id, "operator"); err != nil {
		t.Fatal(err)
	}
	consulWaitNotPassing(t, c, id)
	time.Sleep(1500 * time.Millisecond)
	consulAssertMaintenance(t, c, id, "operator")
}

// consulAssertMaintenance: the instance is registered, in maintenance for
// reason.
func consulAssertMaintenance(t *testing.T, c *consulapi.Client, id, reason string) {
	t.Helper()
	all, _, err := c.Health().Service(registrationService, "", false, nil)
	if err != nil {
		t.Fatal(err)
	}
	if len(all) != 1 || all[0].Service.ID != id || all[0].Checks.AggregatedStatus() != consulapi.HealthMaint {
		t.Fatalf("registered instances: %d, want %s in maintenance", len(all), id)
	}
	for _, ch := range all[0].Checks {
		if ch.CheckID == "_service_maintenance:"+id && !strings.Contains(ch.Notes, reason) {
			t.Errorf("maintenance notes %q, want the reason %q", ch.Notes, reason)
		}
	}
}

// TestConsulKeeperReregisters: the keeper registers the service again when
// the agent forgets it — deregistered behind the broker's back, or a -dev
// agent restarted without state — and keeps it in maintenance if the
// broker had put it there.
func TestConsulKeeperReregisters(t *testing.T) {
	agent := consultest.Start(t, consultest.Options{})
	c := consulClient(t, agent)
	z := newConsulReadyz(t)
	r := consulRegister(t, consulTestRegistration(agent, z))
	id := r.ServiceID()
	consulWaitPassing(t, c, id)

	consulWaitRegistered := func(what string) {
		t.Helper()
		start := time.Now()
		consulEventually(t, 10*time.Second, func() string {
			if _, _, err := c.Agent().Service(id, nil); err != nil {
				return "service not back on the agent: " + err.Error()
			}
			return ""
		})
		t.Logf("%s: registered again after %v", what, time.Since(start).Round(time.Millisecond))
	}

	// Behind its back, out of maintenance: back, and passing again.
	if err := c.Agent().ServiceDeregister(id); err != nil {
		t.Fatal(err)
	}
	consulWaitRegistered("deregistered")
	e := consulWaitPassing(t, c, id)
	if e.Service.Meta["shard"] != "1" || e.Service.Port != 18830 {
		t.Fatalf("re-registered as %+v, want the same registration", e.Service)
	}

	// In maintenance, the agent restarted without state: back, still in
	// maintenance with the same reason.
	if err := r.Maintenance(true, "draining"); err != nil {
		t.Fatal(err)
	}
	consulWaitNotPassing(t, c, id)
	agent.Restart()
	consulWaitRegistered("agent restarted")
	consulEventually(t, 5*time.Second, func() string {
		checks, err := c.Agent().Checks()
		if err != nil {
			return err.Error()
		}
		if checks["_service_maintenance:"+id] == nil {
			return "no maintenance check after re-registration"
		}
		return ""
	})
	consulAssertMaintenance(t, c, id, "draining")
	// Long enough for the new check to pass twice: maintenance holds.
	time.Sleep(2500 * time.Millisecond)
	if st := consulCheckStatus(t, c, id); st != consulapi.HealthPassing {
		t.Fatalf("readyz check %s, want passing underneath the maintenance", st)
	}
	if es := consulPassing(t, c); len(es) != 0 {
		t.Fatalf("%d passing instances, want none while in maintenance", len(es))
	}

	// Maintenance off after the re-registration works as before.
	if err := r.Maintenance(false, ""); err != nil {
		t.Fatal(err)
	}
	consulWaitPassing(t, c, id)
}

// TestConsulMaintenanceWhileAgentDown: a Maintenance call that cannot reach
// the agent reports the error, and the keeper applies it once the agent is
// back — the SIGTERM path must not lose its drain to an agent restart.
func TestConsulMaintenanceWhileAgentDown(t *testing.T) {
	agent := consultest.Start(t, consultest.Options{DataDir: t.TempDir()})
	c := consulClient(t, agent)
	z := newConsulReadyz(t)
	r := consulRegister(t, consulTestRegistration(agent, z))
	id := r.ServiceID()
	consulWaitPassing(t, c, id)

	agent.Kill()
	if err := r.Maintenance(true, "shutting down"); err == nil {
		t.Fatal("Maintenance(true) with the agent down: no error")
	}
	agent.Restart()
	// The agent kept the service (data dir), so only the retry puts it
	// into maintenance.
	consulWaitNotPassing(t, c, id)
	consulAssertMaintenance(t, c, id, "shutting down")
}

func TestConsulRegistrationConfigErrors(t *testing.T) {
	good := RegistrationConfig{
		Consul:   &consulapi.Config{Address: "127.0.0.1:1"},
		Address:  netip.MustParseAddrPort("10.0.0.1:1883"),
		CheckURL: "http://127.0.0.1:9884/readyz",
	}
	for _, tc := range []struct {
		name  string
		edit  func(*RegistrationConfig)
		field string
	}{
		{"no port", func(c *RegistrationConfig) { c.Address = netip.AddrPortFrom(c.Address.Addr(), 0) }, "Address"},
		{"shard out of range", func(c *RegistrationConfig) { c.Shard, c.Shards = 3, 3 }, "Shard"},
		{"negative shards", func(c *RegistrationConfig) { c.Shards = -1 }, "Shards"},
		{"no check", func(c *RegistrationConfig) { c.CheckURL = "" }, "CheckURL"},
		{"check not http", func(c *RegistrationConfig) { c.CheckURL = "tcp://127.0.0.1:9884" }, "CheckURL"},
		{"slash in id", func(c *RegistrationConfig) { c.ServiceID = "a/b" }, "ServiceID"},
		{"negative deregister", func(c *RegistrationConfig) { c.DeregisterCriticalAfter = -time.Second }, "DeregisterCriticalAfter"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			cfg := good
			tc.edit(&cfg)
			_, err := Register(context.Background(), cfg)
			if err == nil || !strings.Contains(err.Error(), "RegistrationConfig."+tc.field+":") {
				t.Fatalf("Register: %v, want an error naming %s", err, tc.field)
			}
		})
	}

	cfg, err := good.withDefaults()
	if err != nil {
		t.Fatal(err)
	}
	if cfg.Service != "mqtt-broker" || cfg.ServiceID != "mqtt-broker-0-1883" || cfg.Shards != 1 ||
		cfg.CheckInterval != 2*time.Second || cfg.CheckTimeout != time.Second ||
		cfg.FailuresBeforeCritical != 3 || cfg.SuccessBeforePassing != 2 || cfg.DeregisterCriticalAfter != 0 {
		t.Fatalf("defaults: %+v", cfg)
	}
}

// TestConsulRegisterReplacesStaleRegistration: a previous life of the
// instance left a registration under the same id, with other checks and an
// old address; Register replaces all of it (ReplaceExistingChecks), and an
// unspecified announce address becomes the agent's own.
func TestConsulRegisterReplacesStaleRegistration(t *testing.T) {
	agent := consultest.Start(t, consultest.Options{})
	c := consulClient(t, agent)
	z := newConsulReadyz(t)
	cfg := consulTestRegistration(agent, z)
	cfg.Address = netip.MustParseAddrPort("0.0.0.0:18831")
	cfg.ServiceID = "broker-a"
	stale := &consulapi.AgentServiceRegistration{
		ID: cfg.ServiceID, Name: registrationService, Address: "10.9.9.9", Port: 1,
		Meta: map[string]string{"shard": "2", "shards": "9"},
		Checks: consulapi.AgentServiceChecks{
			{CheckID: "stale-tcp", TCP: "127.0.0.1:1", Interval: "10s"},
			{CheckID: "service:broker-a", HTTP: "http://127.0.0.1:1/readyz", Interval: "10s"},
		},
	}
	if err := c.Agent().ServiceRegister(stale); err != nil {
		t.Fatal(err)
	}
	r := consulRegister(t, cfg)

	e := consulWaitPassing(t, c, r.ServiceID())
	if s := e.Service; s.Address != "127.0.0.1" || s.Port != 18831 || s.Meta["shard"] != "1" || s.Meta["shards"] != "3" {
		t.Fatalf("service %s:%d meta %v, want the agent's 127.0.0.1:18831, shard 1 of 3", s.Address, s.Port, s.Meta)
	}
	checks, err := c.Agent().ChecksWithFilter(`ServiceID == "broker-a"`)
	if err != nil {
		t.Fatal(err)
	}
	if len(checks) != 1 || checks["service:broker-a"] == nil || !strings.Contains(checks["service:broker-a"].Output, z.url()) {
		t.Fatalf("checks of broker-a: %v, want only service:broker-a on %s", checks, z.url())
	}
}

// TestConsulRegisterHungAgent: the initial registration gives up when ctx
// does, even against an agent that accepts and never answers.
func TestConsulRegisterHungAgent(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	go func() {
		for {
			conn, err := ln.Accept()
			if err != nil {
				return
			}
			defer conn.Close() // held open, unanswered, until the test ends
		}
	}()
	ctx, cancel := context.WithTimeout(context.Background(), 300*time.Millisecond)
	defer cancel()
	start := time.Now()
	_, err = Register(ctx, RegistrationConfig{
		Consul:   &consulapi.Config{Address: ln.Addr().String()},
		Address:  netip.MustParseAddrPort("127.0.0.1:1883"),
		CheckURL: "http://127.0.0.1:9884/readyz",
	})
	if err == nil || !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("Register against a hung agent: %v, want the context's deadline", err)
	}
	if d := time.Since(start); d > 2*time.Second {
		t.Fatalf("Register took %v against a hung agent, with a 300ms context", d)
	}
}

// TestConsulKeeperBackoff: the keeper's pauses — the resync interval when
// all is well, else a backoff that grows, is capped, and is never zero —
// spread by jitter.
func TestConsulKeeperBackoff(t *testing.T) {
	if got := keeperWait(3*time.Second, 0); got != 3*time.Second {
		t.Fatalf("wait with no failure: %v, want the interval", got)
	}
	prev := time.Duration(0)
	for f := 1; f < 100; f++ {
		w := keeperWait(3*time.Second, f)
		if w < keeperBackoffMin || w > keeperBackoffMax || w < prev {
			t.Fatalf("wait after %d failures: %v (before: %v), want growing within [%v, %v]", f, w, prev, keeperBackoffMin, keeperBackoffMax)
		}
		prev = w
	}
	if prev != keeperBackoffMax {
		t.Fatalf("wait after many failures: %v, want the cap %v", prev, keeperBackoffMax)
	}
	seen := map[time.Duration]bool{}
	for range 1000 {
		j := jitter(time.Second)
		if j < 800*time.Millisecond || j > 1200*time.Millisecond {
			t.Fatalf("jitter(1s) = %v, want within ±20%%", j)
		}
		seen[j] = true
	}
	if len(seen) < 100 {
		t.Fatalf("jitter(1s) took %d values in 1000 draws", len(seen))
	}
}
