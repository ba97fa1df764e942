package proxy

import (
	"strings"
	"testing"
	"time"
)

func TestConfigConsulAndRegister(t *testing.T) {
	c, err := ParseConfig([]byte("shards: 2\nlisten: [\"0.0.0.0:1884\"]\nbackends:\n  consul: {}\nregister:\n  enabled: true\n"))
	if err != nil {
		t.Fatal(err)
	}
	if !c.UsesConsul() || c.Backends.Consul.Address != "127.0.0.1:8500" || c.Backends.Consul.Service != "mqtt-broker" || c.Backends.Consul.WaitTime.D() != time.Minute {
		t.Fatalf("consul defaults: %+v", c.Backends.Consul)
	}
	cc := c.ConsulConfig()
	if cc.Shards != 2 || cc.Service != "mqtt-broker" || cc.PanicThreshold != 0 {
		t.Fatalf("ConsulConfig %+v", cc)
	}
	r := c.Register
	if r.Service != "shardgate-proxy" || r.ID != "shardgate-proxy-1884" || r.Address != "0.0.0.0:1884" || r.ConsulAddress != "127.0.0.1:8500" || r.CheckInterval.D() != 5*time.Second {
		t.Fatalf("register defaults: %+v", r)
	}

	for _, tc := range []struct{ yaml, want string }{
		{"shards: 1\nbackends:\n  static: [{id: a, address: \"127.0.0.1:1\"}]\n  consul: {}\n", "backends: static and consul are exclusive"},
		{"backends:\n  consul: {panic_threshold: 1.5}\n", "backends.consul.panic_threshold"},
		{"backends:\n  consul: {scheme: ftp}\n", "backends.consul.scheme"},
		{"admin: \"off\"\nbackends:\n  consul: {}\nregister: {enabled: true}\n", "register.enabled"},
		{"backends:\n  consul: {}\nregister: {enabled: true, address: proxy.example}\n", "register.address"},
		{"backends:\n  consul: {}\nregister: {enabled: true, check_interval: 100ms}\n", "register.check_interval"},
		{"backends:\n  consul: {}\nregister: {enabled: true, id: a/b}\n", "register.id"},
	} {
		_, err := ParseConfig([]byte(tc.yaml))
		if err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("%q: err %v, want %q", tc.yaml, err, tc.want)
		}
	}
}
