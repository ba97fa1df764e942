package servertest

import (
	"fmt"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

// MosquittoOptions configures Mosquitto. The zero value is a broker on a free
// port that lets anonymous clients in.
type MosquittoOptions struct {
	// Port is the listener's port on 127.0.0.1. Default: a free port.
	Port uint16

	// Config is more lines of mosquitto.conf, after the listener: e.g.
	// "max_keepalive 10". Default: none.
	Config []string

	// DenyAnonymous writes allow_anonymous false, so a CONNECT without
	// credentials is refused. Default: allow_anonymous true.
	DenyAnonymous bool

	// StartTimeout bounds the wait for the listener. Default 10s.
	StartTimeout time.Duration
}

// config is the broker's mosquitto.conf for a listener on addr. Persistence
// is off, so a restarted broker comes back empty; the log keeps errors and
// warnings, for the test's output when it fails.
func (o MosquittoOptions) config(addr netip.AddrPort) string {
	var b strings.Builder
	fmt.Fprintf(&b, "listener %d %s\n", addr.Port(), addr.Addr())
	fmt.Fprintf(&b, "allow_anonymous %t\n", !o.DenyAnonymous)
	b.WriteString("persistence false\nlog_dest stderr\nlog_type error\nlog_type warning\n")
	for _, line := range o.Config {
		b.WriteString(line + "\n")
	}
	return b.String()
}

// MosquittoServer is a running Mosquitto broker. It is killed when the test
// ends.
type MosquittoServer struct {
	*server
}

// Mosquitto starts a Mosquitto broker on 127.0.0.1 and waits until it
// accepts connections. It fails the test (or skips it under -short) when
// mosquitto is not installed.
func Mosquitto(t testing.TB, opts MosquittoOptions) *MosquittoServer {
	t.Helper()
	conf := filepath.Join(t.TempDir(), "mosquitto.conf")
	return &MosquittoServer{startServer(t, &server{
		name:    "mosquitto",
		timeout: opts.StartTimeout,
		ready:   dialReady,
		args: func(addr netip.AddrPort) []string {
			if err := os.WriteFile(conf, []byte(opts.config(addr)), 0o644); err != nil {
				t.Fatalf("servertest: %v", err)
			}
			return []string{"-c", conf}
		},
	}, "mosquitto", opts.Port)}
}

// dialReady says whether a TCP connection to addr opens.
func dialReady(addr netip.AddrPort) error {
	c, err := net.DialTimeout("tcp", addr.String(), time.Second)
	if err != nil {
		return err
	}
	return c.Close()
}
