package consultest_test

import (
	"net/http"
	"net/http/httptest"
	"os/exec"
	"strings"
	"testing"
	"time"

	"github.com/hashicorp/consul/api"

	"github.com/shardgate/shardgate/internal/consultest"
)

func TestBinaryVersion(t *testing.T) {
	bin, err := consultest.Binary()
	if err != nil {
		if testing.Short() {
			t.Skip(err)
		}
		t.Fatal(err)
	}
	out, err := exec.Command(bin, "version").CombinedOutput()
	if err != nil {
		t.Fatalf("%s version: %v\n%s", bin, err, out)
	}
	first, _, _ := strings.Cut(string(out), "\n")
	if want := "Consul " + consultest.Version; first != want {
		t.Fatalf("%s version: first line %q, want %q", bin, first, want)
	}
}

// TestMaintenanceDrainsService is the chain the proxy's watcher relies on:
// a broker registers through the agent with its shard meta and an HTTP
// check, the health endpoint (passing only) lists it once the check passes,
// and `consul maint` drops it, seen through a blocking query.
func TestMaintenanceDrainsService(t *testing.T) {
	agent := consultest.Start(t, consultest.Options{})
	c := newClient(t, agent)
	readyz := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, _ *http.Request) {
		w.WriteHeader(http.StatusOK)
	}))
	t.Cleanup(readyz.Close)

	const id = "mqtt-broker-0"
	reg := &api.AgentServiceRegistration{
		ID:      id,
		Name:    "mqtt-broker",
		Address: "127.0.0.1",
		Port:    1883,
		Meta:    map[string]string{"shard": "0", "shards": "3", "priority": "0"},
		Check: &api.AgentServiceCheck{
			HTTP:                   readyz.URL + "/readyz",
			Interval:               "1s",
			Timeout:                "1s",
			SuccessBeforePassing:   1,
			FailuresBeforeCritical: 2,
		},
	}
	if err := c.Agent().ServiceRegisterOpts(reg, api.ServiceRegisterOpts{ReplaceExistingChecks: true}); err != nil {
		t.Fatalf("register: %v", err)
	}

	entries, idx := waitHealth(t, c, 0, func(es []*api.ServiceEntry) bool { return len(es) == 1 })
	svc := entries[0].Service
	if svc.ID != id || svc.Meta["shard"] != "0" || svc.Meta["shards"] != "3" || svc.Meta["priority"] != "0" {
		t.Fatalf("healthy instance %s meta %v, want %s with shard 0 of 3, priority 0", svc.ID, svc.Meta, id)
	}

	if err := c.Agent().EnableServiceMaintenance(id, "consultest drain"); err != nil {
		t.Fatalf("enable maintenance: %v", err)
	}
	start := time.Now()
	_, idx = waitHealth(t, c, idx, func(es []*api.ServiceEntry) bool { return len(es) == 0 })
	t.Logf("maintenance seen after %v", time.Since(start))
	// Still registered, only held out by the maintenance check.
	all, _, err := c.Health().Service("mqtt-broker", "", false, nil)
	if err != nil {
		t.Fatalf("health query: %v", err)
	}
	if len(all) != 1 || all[0].Checks.AggregatedStatus() != api.HealthMaint {
		t.Fatalf("all instances in maintenance: %d, want 1 with status %s", len(all), api.HealthMaint)
	}

	if err := c.Agent().DisableServiceMaintenance(id); err != nil {
		t.Fatalf("disable maintenance: %v", err)
	}
	waitHealth(t, c, idx, func(es []*api.ServiceEntry) bool { return len(es) == 1 })
}

// TestRestartKeepsCatalog: with a data dir the agent's registrations
// survive a crash and a restart on the same ports.
func TestRestartKeepsCatalog(t *testing.T) {
	agent := consultest.Start(t, consultest.Options{DataDir: t.TempDir()})
	c := newClient(t, agent)
	reg := &api.AgentServiceRegistration{
		ID: "mqtt-broker-1", Name: "mqtt-broker", Address: "127.0.0.1", Port: 1884,
		Meta: map[string]string{"shard": "1", "shards": "3", "priority": "0"},
	}
	if err := c.Agent().ServiceRegister(reg); err != nil {
		t.Fatalf("register: %v", err)
	}
	waitHealth(t, c, 0, func(es []*api.ServiceEntry) bool { return len(es) == 1 })

	agent.Kill()
	if _, _, err := c.Health().Service("mqtt-broker", "", true, nil); err == nil {
		t.Fatal("health query succeeded with the agent killed")
	}
	agent.Restart()
	es, _ := waitHealth(t, c, 0, func(es []*api.ServiceEntry) bool { return len(es) == 1 })
	if got := es[0].Service.ID; got != "mqtt-broker-1" {
		t.Fatalf("after restart: instance %s, want mqtt-broker-1", got)
	}
}

func newClient(t *testing.T, agent *consultest.Agent) *api.Client {
	t.Helper()
	c, err := api.NewClient(&api.Config{Address: agent.Addr()})
	if err != nil {
		t.Fatal(err)
	}
	return c
}

// waitHealth runs blocking queries on the passing instances of mqtt-broker
// from index idx until ok accepts the result, as the proxy's watcher does,
// and returns that result and its index.
func waitHealth(t *testing.T, c *api.Client, idx uint64, ok func([]*api.ServiceEntry) bool) ([]*api.ServiceEntry, uint64) {
	t.Helper()
	deadline := time.Now().Add(30 * time.Second)
	for time.Now().Before(deadline) {
		es, meta, err := c.Health().Service("mqtt-broker", "", true, &api.QueryOptions{WaitIndex: idx, WaitTime: 5 * time.Second})
		if err != nil {
			t.Fatalf("health query: %v", err)
		}
		if meta.LastIndex < idx {
			idx = 0 // the index went back (a restart): start over
		} else {
			idx = meta.LastIndex
		}
		if ok(es) {
			return es, idx
		}
	}
	t.Fatal("health of mqtt-broker: no expected result within 30s")
	return nil, 0
}
