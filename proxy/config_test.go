package proxy

import (
	"os"
	"path/filepath"
	"runtime"
	"strings"
	"testing"
	"time"
)

func TestConfigDefaults(t *testing.T) {
	c, err := ParseConfig([]byte("backends:\n  static:\n    - {id: a, address: \"127.0.0.1:1883\"}\n"))
	if err != nil {
		t.Fatal(err)
	}
	checks := []struct {
		name      string
		got, want any
	}{
		{"listen", c.Listen, []string{"0.0.0.0:1883"}},
		{"admin", c.Admin, "127.0.0.1:9883"},
		{"event_loops", c.EventLoops, runtime.NumCPU()},
		{"threads", c.Threads, "auto"},
		{"no_instance", c.NoInstance, "spill"},
		{"empty_client_id", c.EmptyClientID, "source"},
		{"connect.timeout", c.Connect.Timeout.D(), 10 * time.Second},
		{"connect.max_size", int(c.Connect.MaxSize), 64 << 10},
		{"connect.max_client_id_length", c.Connect.MaxClientIDLength, 65535},
		{"connect.defer_accept", c.DeferAccept(), time.Second},
		{"dial.timeout", c.Dial.Timeout.D(), 5 * time.Second},
		{"dial.smart_connect", c.Dial.SmartConnect == nil, true},
		{"dial.close_wait", c.CloseWait(), 2 * time.Second},
		{"keepalive.factor", c.Keepalive.Factor, 1.5},
		{"shutdown.grace", c.Shutdown.Grace.D(), 30 * time.Second},
		{"admission.rate", c.Admission.Rate, 0.0},
		{"admission.burst", c.Admission.Burst, 0},
		{"log.level", c.Log.Level, "info"},
	}
	for _, ch := range checks {
		if !equalAny(ch.got, ch.want) {
			t.Errorf("%s = %v, want %v", ch.name, ch.got, ch.want)
		}
	}
	// The health defaults are the static source's.
	sc := c.StaticConfig()
	if sc.Health.Type != "" || sc.Health.Interval != 0 {
		t.Errorf("health defaults should be left to backend: %+v", sc.Health)
	}
}

func equalAny(a, b any) bool {
	as, aok := a.([]string)
	bs, bok := b.([]string)
	if aok && bok {
		return strings.Join(as, ",") == strings.Join(bs, ",")
	}
	return a == b
}

func TestConfigValues(t *testing.T) {
	c, err := ParseConfig([]byte(`
listen: ["127.0.0.1:1883", "[::1]:1883"]
shards: 2
no_instance: reject
connect: {timeout: 500ms, max_size: 1MiB, defer_accept: 0s}
admission: {rate: 250.5}
dial: {source_addresses: ["127.0.0.2", "::1"], smart_connect: false, close_wait: 0s}
backends:
  static:
    - {id: a, address: "127.0.0.1:1883", shard: 0}
    - {id: b, address: "[::1]:1884", shard: 1, priority: 3}
`))
	if err != nil {
		t.Fatal(err)
	}
	if c.Connect.Timeout.D() != 500*time.Millisecond || c.Connect.MaxSize != 1<<20 {
		t.Errorf("connect = %+v", c.Connect)
	}
	if c.DeferAccept() != 0 {
		t.Errorf("connect.defer_accept = %v, want 0 (off)", c.DeferAccept())
	}
	if c.CloseWait() != 0 {
		t.Errorf("dial.close_wait = %v, want 0 (off)", c.CloseWait())
	}
	if c.Dial.SmartConnect == nil || *c.Dial.SmartConnect {
		t.Errorf("dial.smart_connect = %v, want false", c.Dial.SmartConnect)
	}
	if c.Admission.Burst != 250 {
		t.Errorf("burst default = %d, want 250 (max(1, rate))", c.Admission.Burst)
	}
	if got := c.ListenAddrs(); len(got) != 2 || got[1].String() != "[::1]:1883" {
		t.Errorf("listen = %v", got)
	}
	if got := c.SourceAddrs(); len(got) != 2 || !got[1].Is6() {
		t.Errorf("source addresses = %v", got)
	}
	snap, err := StaticSnapshot(c)
	if err != nil {
		t.Fatal(err)
	}
	if snap.Shards() != 2 || snap.Len() != 2 {
		t.Errorf("snapshot: %d shards, %d instances", snap.Shards(), snap.Len())
	}
	if a, ok := snap.Active(1); !ok || a.ID != "b" || a.Priority != 3 {
		t.Errorf("active of shard 1 = %+v %v", a, ok)
	}
}

// TestConfigErrorsNameTheField: a bad config fails at start, and the error
// says which field to fix.
func TestConfigErrorsNameTheField(t *testing.T) {
	const ok = "backends:\n  static:\n    - {id: a, address: \"127.0.0.1:1883\"}\n"
	cases := []struct{ yaml, field string }{
		{"listen: [\"localhost:1883\"]\n" + ok, "listen[0]"},
		{"admin: \"nope\"\n" + ok, "admin"},
		{"threads: 0\n" + ok, "threads"},
		{"threads: many\n" + ok, "threads"},
		{"no_instance: drop\n" + ok, "no_instance"},
		{"empty_client_id: maybe\n" + ok, "empty_client_id"},
		{"connect: {max_size: 8}\n" + ok, "connect.max_size"},
		{"connect: {timeout: soon}\n" + ok, "not a duration"},
		{"connect: {defer_accept: -1s}\n" + ok, "connect.defer_accept"},
		{"dial: {close_wait: 2m}\n" + ok, "dial.close_wait"},
		{"connect: {max_size: 12XB}\n" + ok, "not a size"},
		{"keepalive: {factor: 0.5}\n" + ok, "keepalive.factor"},
		{"proxy_protocol: {send: v1}\n" + ok, "proxy_protocol.send"},
		{"dial: {source_addresses: [\"eth0\"]}\n" + ok, "dial.source_addresses[0]"},
		{"log: {level: loud}\n" + ok, "log.level"},
		{"lisen: [\"127.0.0.1:1\"]\n" + ok, "lisen"}, // unknown field
		{"", "backends.static"},
		{"backends:\n  static:\n    - {id: a, address: \"db.local:1883\"}\n", "backends.static[0].address"},
		{"backends:\n  static:\n    - {id: a, address: \"127.0.0.1:1\"}\n    - {id: a, address: \"127.0.0.1:2\"}\n", "backends.static[1].id"},
		{"shards: 2\nbackends:\n  static:\n    - {id: a, address: \"127.0.0.1:1\", shard: 2}\n", "backends.static[0].shard"},
		{"health: {type: icmp}\n" + ok, "health.type"},
		{"shutdown: {grace: soon}\n" + ok, "shutdown.grace: line 1"},
		{"shutdown:\n  grace: -1s\n" + ok, "shutdown.grace"},
		{"shards: two\n" + ok, "shards: line 1"},
		{"connect:\n  max_size: huge\n" + ok, "connect.max_size: line 2"},
		{"backends:\n  static:\n    - {id: a, address: \"127.0.0.1:1\", priority: high}\n", "backends.static[0].priority"},
		{"admission: {rate: .nan}\n" + ok, "admission.rate"},
	}
	for _, tc := range cases {
		t.Run(tc.field, func(t *testing.T) {
			_, err := ParseConfig([]byte(tc.yaml))
			if err == nil {
				t.Fatalf("config accepted:\n%s", tc.yaml)
			}
			if !strings.Contains(err.Error(), tc.field) {
				t.Errorf("error %q does not name %q", err, tc.field)
			}
		})
	}
}

func TestLoadConfigExample(t *testing.T) {
	c, err := LoadConfig(filepath.Join("..", "deploy", "examples", "proxy.yaml"))
	if err != nil {
		t.Fatalf("the shipped example must load: %v", err)
	}
	if c.Shards != 3 || len(c.Backends.Static) != 6 || c.Health.Type != "mqtt" {
		t.Errorf("example: %+v", c)
	}
	if _, err := LoadConfig(filepath.Join(t.TempDir(), "missing.yaml")); !os.IsNotExist(err) {
		t.Errorf("missing file: %v", err)
	}
}
