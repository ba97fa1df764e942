package health

import (
	"context"
	"net/http"
	"net/http/httptest"
	"net/netip"
	"testing"
	"time"

	consulapi "github.com/hashicorp/consul/api"

	"github.com/shardgate/shardgate/internal/consultest"
)

// Register puts the service in Consul with a passing HTTP check, registers
// it again when a restarted agent forgot it, and Deregister removes it.
func TestRegisterKeepsAndRemoves(t *testing.T) {
	agent := consultest.Start(t, consultest.Options{})
	c := apiClient(t, agent)
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, _ *http.Request) { w.Write([]byte("ready")) }))
	t.Cleanup(srv.Close)
	cfg := consulapi.DefaultConfig()
	cfg.Address = agent.Addr()
	r, err := Register(context.Background(), RegisterConfig{
		Consul: cfg, Service: "shardgate-proxy", ID: "px-1", Address: netip.MustParseAddrPort("0.0.0.0:1883"),
		CheckURL: srv.URL + "/readyz", CheckInterval: time.Second, ResyncInterval: 200 * time.Millisecond,
		Meta: map[string]string{"shards": "4"},
	})
	if err != nil {
		t.Fatal(err)
	}
	passing := func() bool {
		entries, _, err := c.Health().Service("shardgate-proxy", "", true, nil)
		return err == nil && len(entries) == 1 && entries[0].Service.ID == "px-1" && entries[0].Service.Port == 1883 && entries[0].Service.Meta["shards"] == "4"
	}
	waitTrue(t, "registered and passing", passing)

	agent.Restart() // -dev: the agent comes back without the service
	waitTrue(t, "registered again after the agent restart", passing)

	if err := r.Deregister(context.Background()); err != nil {
		t.Fatal(err)
	}
	entries, _, err := c.Health().Service("shardgate-proxy", "", false, nil)
	if err != nil || len(entries) != 0 {
		t.Fatalf("still registered: %d %v", len(entries), err)
	}
	time.Sleep(500 * time.Millisecond) // the keeper is stopped: nothing comes back
	if entries, _, _ := c.Health().Service("shardgate-proxy", "", false, nil); len(entries) != 0 {
		t.Fatal("registered again after Deregister")
	}
}

func waitTrue(t *testing.T, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(15 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting: %s", what)
		}
		time.Sleep(50 * time.Millisecond)
	}
}
