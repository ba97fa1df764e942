package broker

import (
	"net/netip"
	"strings"
	"testing"
	"time"
)

func TestParseConfigDefaults(t *testing.T) {
	c, err := ParseConfig([]byte("shard: 2\nshards: 3\nauth: {allow_anonymous: true}\n"))
	if err != nil {
		t.Fatal(err)
	}
	if !strings.HasSuffix(c.InstanceID, "-2") {
		t.Errorf("instance_id = %q, want hostname-2", c.InstanceID)
	}
	for _, tc := range []struct {
		field     string
		got, want any
	}{
		{"listen", c.Listen, ":1883"},
		{"admin", c.Admin, "127.0.0.1:9884"},
		{"redis.address", c.Redis.Address, "127.0.0.1:6379"},
		{"redis.timeout", c.Redis.Timeout.D(), time.Second},
		{"redis.heartbeat", c.Redis.Heartbeat.D(), 2 * time.Second},
		{"redis.key_prefix", c.Redis.KeyPrefix, "sg"},
		{"consul.address", c.Consul.Address, "127.0.0.1:8500"},
		{"consul.service", c.Consul.Service, "mqtt-broker"},
		{"consul.service_id", c.Consul.ServiceID, c.InstanceID},
		{"consul.check_interval", c.Consul.CheckInterval.D(), 2 * time.Second},
		{"consul.check_timeout", c.Consul.CheckTimeout.D(), time.Second},
		{"consul.failures_before_critical", c.Consul.FailuresBeforeCritical, 3},
		{"consul.success_before_passing", c.Consul.SuccessBeforePassing, 2},
		{"shutdown.grace", c.Shutdown.Grace.D(), 30 * time.Second},
		{"log.level", c.Log.Level, "info"},
	} {
		if tc.got != tc.want {
			t.Errorf("%s = %v, want %v", tc.field, tc.got, tc.want)
		}
	}
}

// TestParseConfigErrorsNameTheField: a bad config fails at start, saying
// which field is wrong.
func TestParseConfigErrorsNameTheField(t *testing.T) {
	for _, tc := range []struct{ yaml, field string }{
		{"auth: {allow_anonymous: true}\nshard: 3\nshards: 3\n", "shard:"},
		{"auth: {allow_anonymous: true}\nredis:\n  timeout: soon\n", "redis.timeout:"},
		{"auth: {allow_anonymous: true}\nredis:\n  adress: x:1\n", "redis.adress:"},
		{"auth: {allow_anonymous: true}\nshutdown: {grace: -1s}\n", "shutdown.grace:"},
		{"auth: {allow_anonymous: true}\nproxy_protocol: {trusted: [10.0.0.0/8, nope]}\n", "proxy_protocol.trusted[1]:"},
		{"auth: {allow_anonymous: true}\nconsul: {enabled: true, announce_address: host:1}\n", "consul.announce_address:"},
		{"auth: {allow_anonymous: true}\nadmin: \"off\"\nconsul: {enabled: true}\n", "admin:"},
		{"auth: {allow_anonymous: true}\ninstance_id: \"a\\nb\"\n", "instance_id:"},
		{"shard: 0\n", "auth:"},
		{"auth: {allow_anonymous: true}\nredis: {address: a:1, cluster_addresses: [b:1]}\n", "redis.address:"},
	} {
		_, err := ParseConfig([]byte(tc.yaml))
		if err == nil || !strings.Contains(err.Error(), tc.field) {
			t.Errorf("%q: error %v, want one naming %s", tc.yaml, err, tc.field)
		}
	}
}

func TestConfigTrustedAndAnnounce(t *testing.T) {
	c, err := ParseConfig([]byte("auth: {allow_anonymous: true}\nproxy_protocol: {trusted: [10.1.2.3/8, 192.0.2.7, \"::1\"]}\nconsul: {announce_address: \"192.0.2.1:1883\"}\n"))
	if err != nil {
		t.Fatal(err)
	}
	want := []netip.Prefix{netip.MustParsePrefix("10.0.0.0/8"), netip.MustParsePrefix("192.0.2.7/32"), netip.MustParsePrefix("::1/128")}
	got := c.TrustedPrefixes()
	if len(got) != len(want) {
		t.Fatalf("trusted = %v, want %v", got, want)
	}
	for i := range want {
		if got[i] != want[i] {
			t.Errorf("trusted[%d] = %v, want %v", i, got[i], want[i])
		}
	}
	bound := netip.MustParseAddrPort("0.0.0.0:1883")
	if a := c.AnnounceAddr(bound); a.String() != "192.0.2.1:1883" {
		t.Errorf("announce = %v", a)
	}
	c.Consul.AnnounceAddress = ""
	if a := c.AnnounceAddr(netip.MustParseAddrPort("127.0.0.1:1999")); a.String() != "127.0.0.1:1999" {
		t.Errorf("announce of a specific listen IP = %v", a)
	}
	if a := c.AnnounceAddr(bound); a.Addr().IsUnspecified() || a.Port() != 1883 {
		t.Errorf("announce of an unspecified listen IP = %v", a)
	}
}
