package servertest_test

import (
	"bufio"
	"fmt"
	"net"
	"strings"
	"testing"
	"time"

	"github.com/shardgate/shardgate/internal/servertest"
)

// TestMosquittoKillRestart is the crash-and-recover cycle the health
// checkers are tested with: killed, the broker refuses connections; restarted,
// it accepts them again on the same address.
func TestMosquittoKillRestart(t *testing.T) {
	m := servertest.Mosquitto(t, servertest.MosquittoOptions{})
	addr := m.Addr()
	if !addr.Addr().IsLoopback() || addr.Port() == 0 || m.String() != addr.String() {
		t.Fatalf("Addr %v, String %q: want 127.0.0.1 and a port", addr, m.String())
	}
	mustDial(t, addr.String())
	m.Kill()
	if c, err := net.DialTimeout("tcp", addr.String(), time.Second); err == nil {
		c.Close()
		t.Fatalf("dial %s after Kill: connected, want refused", addr)
	}
	m.Kill() // a second Kill is a no-op
	m.Restart()
	if m.Addr() != addr {
		t.Fatalf("Addr after Restart %v, want %v", m.Addr(), addr)
	}
	mustDial(t, addr.String())
	m.Restart() // from running: stops it first
	mustDial(t, addr.String())
	m.Stop()
	m.Stop()
}

// A CONNECT without credentials is refused with return code 5 (not
// authorized) under DenyAnonymous, accepted by default; Config lines reach
// mosquitto.conf (max_keepalive below 10 would not start).
func TestMosquittoAnonymous(t *testing.T) {
	for _, tc := range []struct {
		opts servertest.MosquittoOptions
		rc   byte
	}{
		{servertest.MosquittoOptions{}, 0},
		{servertest.MosquittoOptions{DenyAnonymous: true, Config: []string{"max_keepalive 30"}}, 5},
	} {
		t.Run(fmt.Sprint("deny=", tc.opts.DenyAnonymous), func(t *testing.T) {
			m := servertest.Mosquitto(t, tc.opts)
			c := mustDial(t, m.String())
			// MQTT 3.1.1 CONNECT: clean session, keep alive 60, client ID "t".
			c.Write([]byte{0x10, 13, 0, 4, 'M', 'Q', 'T', 'T', 4, 0x02, 0, 60, 0, 1, 't'})
			connack := make([]byte, 4)
			if _, err := c.Read(connack); err != nil {
				t.Fatal(err)
			}
			if connack[0] != 0x20 || connack[3] != tc.rc {
				t.Fatalf("CONNACK % x, want return code %d", connack, tc.rc)
			}
		})
	}
}

func TestMosquittoFixedPort(t *testing.T) {
	port := servertest.FreePort(t)
	m := servertest.Mosquitto(t, servertest.MosquittoOptions{Port: port.Port()})
	if m.Addr() != port {
		t.Fatalf("Addr %v, want %v", m.Addr(), port)
	}
	mustDial(t, port.String())
}

// Restart brings Redis back empty: no snapshot, no append-only file.
func TestRedisRestartEmpty(t *testing.T) {
	r := servertest.Redis(t, servertest.RedisOptions{Args: []string{"--databases", "2"}})
	if got := redisDo(t, r.String(), "SET k v"); got != "+OK" {
		t.Fatalf("SET: %q", got)
	}
	if got := redisDo(t, r.String(), "CONFIG GET databases"); got != "*2" {
		t.Fatalf("CONFIG GET databases: %q, want a 2-element array", got)
	}
	r.Restart()
	if got := redisDo(t, r.String(), "EXISTS k"); got != ":0" {
		t.Fatalf("EXISTS k after Restart: %q, want :0", got)
	}
	r.Kill()
	if c, err := net.DialTimeout("tcp", r.String(), time.Second); err == nil {
		c.Close()
		t.Fatalf("dial %s after Kill: connected, want refused", r)
	}
}

func mustDial(t *testing.T, addr string) net.Conn {
	t.Helper()
	c, err := net.DialTimeout("tcp", addr, time.Second)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	c.SetDeadline(time.Now().Add(5 * time.Second))
	return c
}

// redisDo sends one inline command and returns the first line of the reply.
func redisDo(t *testing.T, addr, cmd string) string {
	t.Helper()
	c := mustDial(t, addr)
	if _, err := c.Write([]byte(cmd + "\r\n")); err != nil {
		t.Fatal(err)
	}
	line, err := bufio.NewReader(c).ReadString('\n')
	if err != nil {
		t.Fatalf("%s: %v", cmd, err)
	}
	return strings.TrimSuffix(line, "\r\n")
}
