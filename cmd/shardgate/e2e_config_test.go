package main

import (
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/shardgate/shardgate/internal/servertest"
	"github.com/shardgate/shardgate/mqttwire"
)

// e2eRun runs the binary to its end (at most 10s) and returns its combined
// output and exit code.
func e2eRun(t *testing.T, bin string, args ...string) (string, int) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	out, err := exec.CommandContext(ctx, bin, args...).CombinedOutput()
	if ctx.Err() != nil {
		t.Fatalf("shardgate %s still running after 10s (it should have exited):\n%s", strings.Join(args, " "), out)
	}
	code := 0
	if ee, ok := err.(*exec.ExitError); ok {
		code = ee.ExitCode()
	} else if err != nil {
		t.Fatalf("run shardgate %s: %v", strings.Join(args, " "), err)
	}
	return string(out), code
}

// TestE2EConfigErrorsNameTheField runs `shardgate proxy` (with and without
// --check) on invalid configurations: each fails at once, with a non-zero
// exit and the YAML path of the bad field in the message, and binds
// nothing. `proxy --check` accepts a valid configuration without starting;
// started with every broker down, the proxy is alive but not ready, refuses
// devices with CONNACK "server unavailable", and exits 0 on SIGTERM.
func TestE2EConfigErrorsNameTheField(t *testing.T) {
	t.Parallel()
	bin := buildShardgate(t)
	dir := t.TempDir()
	listen, admin := servertest.FreePort(t).String(), servertest.FreePort(t).String()
	// Nothing listens on the backends' ports: no broker is needed to
	// check a configuration, and the one proxy started here has none.
	b0, b1 := servertest.FreePort(t).String(), servertest.FreePort(t).String()
	valid := fmt.Sprintf(`listen: [%q]
admin: %q
shards: 2
health: {type: mqtt, interval: 100ms, rise: 1, fall: 1}
backends:
  static:
    - {id: b0, address: %q, shard: 0}
    - {id: b1, address: %q, shard: 1}
`, listen, admin, b0, b1)
	write := func(name, y string) string {
		p := filepath.Join(dir, name+".yaml")
		if err := os.WriteFile(p, []byte(y), 0o644); err != nil {
			t.Fatal(err)
		}
		return p
	}
	okPath := write("valid", valid)
	out, code := e2eRun(t, bin, "proxy", "--check", "--config", okPath)
	if code != 0 || !strings.Contains(out, "ok") {
		t.Fatalf("proxy --check on a valid config: exit %d\n%s", code, out)
	}

	for _, c := range []struct {
		name, from, to string
		field          string // must appear in the error
		bug            string // a known product bug: the case is skipped, with this reason
	}{
		{"host name as address", fmt.Sprintf("%q", b1), `"broker-1:1883"`, "backends.static[1].address", ""},
		{"port 0", fmt.Sprintf("%q", b1), `"127.0.0.1:0"`, "backends.static[1].address", ""},
		{"shard out of range", "shard: 1}", "shard: 2}", "backends.static[1].shard", ""},
		{"duplicate id", "id: b1,", "id: b0,", "backends.static[1].id", ""},
		{"bad listen", fmt.Sprintf("listen: [%q]", listen), `listen: ["localhost:1883"]`, "listen[0]", ""},
		{"bad admin", fmt.Sprintf("admin: %q", admin), `admin: "9883"`, "admin: ", ""},
		{"bad health type", "type: mqtt", "type: http", "health.type", ""},
		{"health timeout above interval", "interval: 100ms,", "interval: 100ms, timeout: 2s,", "health.timeout", ""},
		{"bad no_instance", "shards: 2\n", "shards: 2\nno_instance: drop\n", "no_instance", ""},
		{"unknown field", "shards: 2\n", "shards: 2\nshard_count: 2\n", "shard_count", ""},
		{"negative connect timeout", "shards: 2\n", "shards: 2\nconnect: {timeout: -1s}\n", "connect.timeout", ""},
		{"keepalive factor below 1", "shards: 2\n", "shards: 2\nkeepalive: {factor: 0.5}\n", "keepalive.factor", ""},
		{"duration that is not one", "shards: 2\n", "shards: 2\nshutdown: {grace: soon}\n", "shutdown.grace", ""},
		{"negative grace", "shards: 2\n", "shards: 2\nshutdown: {grace: -1s}\n", "shutdown.grace", ""},
	} {
		t.Run(c.name, func(t *testing.T) {
			if c.bug != "" {
				t.Skip("bug: " + c.bug)
			}
			y := strings.Replace(valid, c.from, c.to, 1)
			if y == valid {
				t.Fatalf("test bug: %q not in the valid config", c.from)
			}
			p := write(strings.ReplaceAll(c.name, " ", "-"), y)
			for _, args := range [][]string{{"proxy", "--check", "--config", p}, {"proxy", "--config", p}} {
				out, code := e2eRun(t, bin, args...)
				if code == 0 {
					t.Errorf("shardgate %s: exit 0 on an invalid config\n%s", strings.Join(args, " "), out)
				}
				if !strings.Contains(out, c.field) {
					t.Errorf("shardgate %s: the error does not name %s:\n%s", strings.Join(args, " "), c.field, out)
				}
			}
		})
	}
	// Nothing was left listening by the failed starts.
	for _, a := range []string{listen, admin} {
		if c, err := net.DialTimeout("tcp", a, time.Second); err == nil {
			c.Close()
			t.Errorf("something listens on %s after the failed starts", a)
		}
	}

	// The valid configuration starts, with every broker down: alive
	// (/healthz) but not ready (/readyz 503), and devices are told the
	// server is unavailable instead of being reset.
	px := &e2eProxy{mqtt: listen, admin: admin, cfgPath: okPath}
	px.e2eProcess = e2eStart(t, "shardgate proxy", bin, "proxy", "--config", okPath)
	px.waitAdmin(t)
	e2eWaitFor(t, "/readyz answers 503 naming the cause", e2eWait, func() (bool, string) {
		code, body, err := e2eGet(admin, "/readyz")
		return err == nil && code == 503 && strings.Contains(string(body), "healthy"), fmt.Sprint(code, " ", string(body), " ", err)
	})
	e2eWaitFor(t, "both instances checked and unhealthy", e2eWait, func() (bool, string) {
		b := px.backends(t)
		ok := len(b.Checks) == 2
		for _, c := range b.Checks {
			ok = ok && c.State == "unhealthy"
		}
		return ok, fmt.Sprintf("%+v", b.Checks)
	})
	_, err := e2eConnect(listen, "e2e-nobody-home", mqttwire.Level311)
	var ref *e2eRefused
	if !errors.As(err, &ref) || ref.code != 3 {
		t.Errorf("3.1.1 device with no healthy broker: %v, want CONNACK return code 3 (server unavailable)", err)
	}
	_, err = e2eConnect(listen, "e2e-nobody-home", mqttwire.Level5)
	if !errors.As(err, &ref) || ref.code != 0x88 {
		t.Errorf("5.0 device with no healthy broker: %v, want CONNACK reason 0x88 (server unavailable)", err)
	}
	// SIGTERM with no device connected: a prompt, clean exit.
	px.signal(t, syscall.SIGTERM)
	if code := px.waitExit(t, 5*time.Second); code != 0 {
		t.Errorf("exit code %d after SIGTERM with no device, want 0", code)
	}
}
