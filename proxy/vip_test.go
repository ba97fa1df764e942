package proxy

import (
	"errors"
	"net"
	"os"
	"os/exec"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus/testutil"
	"golang.org/x/sys/unix"

	"github.com/shardgate/shardgate/backend"
)

// A device connecting to a VIP address (127.0.10.5:1883: local through lo's
// 127.0.0.0/8 route, bound by no socket) reaches the broker through the
// proxy, whose only sockets are on 127.0.0.1; an address outside the VIP is
// refused. The whole test process runs again in a network namespace of its
// own (the SK_LOOKUP program attaches to the namespace, and the proxy's loops
// open sockets from threads of their own, so one locked thread in a
// namespace is not enough).
func TestProxyVIPReachesBroker(t *testing.T) {
	if os.Getenv("SHARDGATE_VIP_CHILD") != "1" {
		cmd := exec.Command(os.Args[0], "-test.run=^TestProxyVIPReachesBroker$", "-test.v", "-test.count=1")
		cmd.Env = append(os.Environ(), "SHARDGATE_VIP_CHILD=1")
		cmd.SysProcAttr = &syscall.SysProcAttr{Cloneflags: syscall.CLONE_NEWNET}
		out, err := cmd.CombinedOutput()
		if err != nil && strings.Contains(err.Error(), "operation not permitted") {
			dialPrivileged(t, "a process in a new network namespace: %v", err)
		}
		t.Logf("in a new network namespace:\n%s", out)
		if err != nil {
			t.Fatalf("child: %v", err)
		}
		if strings.Contains(string(out), "--- SKIP") {
			t.Skip("skipped in the namespace (see above)")
		}
		return
	}
	vipLoUp(t)
	b := startRawBackend(t)
	p := startProxy(t, proxySetup{instances: []backend.Instance{inst("b", b.addr(), -1)},
		config: func(c *Config) {
			c.Reuseport.PinDir = "off"
			c.VIP = VIPConfig{Prefixes: []string{"127.0.10.0/28"}, Ports: []string{"1883"}}
		}})
	if p.vip.Load() == nil {
		_, _, _, err := p.cfg.VIP.Parsed()
		dialPrivileged(t, "VIP not attached (see the log): %v", err)
	}

	c := dialProxy(t, "127.0.10.5:1883")
	if _, err := c.Write(connectPacket(4, "vip-device", 60)); err != nil {
		t.Fatal(err)
	}
	bc := b.accept(t)
	defer bc.Close()
	want := connectPacket(4, "vip-device", 60)
	if got := readFull(t, bc, len(want)); string(got) != string(want) {
		t.Fatalf("broker got %x, want the device's CONNECT %x", got, want)
	}

	for _, s := range []string{"127.0.10.20:1883", "127.0.10.5:1884"} {
		c, err := net.DialTimeout("tcp", s, 2*time.Second)
		if err == nil {
			c.Close()
			t.Fatalf("connect %s succeeded, want refused", s)
		}
		if !errors.Is(err, unix.ECONNREFUSED) {
			t.Fatalf("connect %s: %v, want ECONNREFUSED", s, err)
		}
	}
	tcp, err := os.ReadFile("/proc/thread-self/net/tcp")
	if err != nil {
		t.Fatal(err)
	}
	// 127.0.10.x is 0A00007F-ish in /proc/net/tcp: "xx0A007F" little-endian.
	for _, line := range strings.Split(string(tcp), "\n")[1:] {
		if f := strings.Fields(line); len(f) > 3 && f[3] == "0A" && strings.HasSuffix(strings.SplitN(f[1], ":", 2)[0], "0A007F") {
			t.Fatalf("a socket listens on a VIP address: %s", line)
		}
	}
	// The counters are on the proxy's registry.
	n, err := testutil.GatherAndCount(p.reg, "shardgate_vip_lookups_total")
	if err != nil || n != 4 {
		t.Fatalf("shardgate_vip_lookups_total: %d series, %v", n, err)
	}
	counts, err := p.vip.Load().Counts()
	if err != nil || counts["matched"] != 1 || counts["no_socket"] != 0 || counts["not_vip"] < 2 {
		t.Fatalf("VIP counts %v, %v: want matched 1, no_socket 0, not_vip >= 2", counts, err)
	}
}

func TestVIPConfigValidate(t *testing.T) {
	for _, tc := range []struct {
		name string
		vip  VIPConfig
		err  string
	}{
		{"off", VIPConfig{}, ""},
		{"ok", VIPConfig{Prefixes: []string{"10.99.0.0/28", "2001:db8::/64"}, Ports: []string{"1883", "8000-8010"}, Listen: "127.0.0.1:1999"}, ""},
		{"bad prefix", VIPConfig{Prefixes: []string{"10.99.0.0"}, Ports: []string{"1883"}}, "vip.prefixes[0]"},
		{"no ports", VIPConfig{Prefixes: []string{"10.99.0.0/28"}}, "vip.ports"},
		{"bad range", VIPConfig{Prefixes: []string{"10.99.0.0/28"}, Ports: []string{"9-1"}}, "vip.ports[0]"},
		{"port 0", VIPConfig{Prefixes: []string{"10.99.0.0/28"}, Ports: []string{"0"}}, "vip.ports[0]"},
		{"bad listen", VIPConfig{Prefixes: []string{"10.99.0.0/28"}, Ports: []string{"1883"}, Listen: "x"}, "vip.listen"},
		{"ports without prefixes", VIPConfig{Ports: []string{"1883"}}, "vip.prefixes"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			c := &Config{Listen: []string{"127.0.0.1:0"}, VIP: tc.vip}
			c.Backends.Static = []backend.StaticInstance{{ID: "b", Address: "127.0.0.1:1"}}
			c.SetDefaults()
			err := c.Validate()
			if tc.err == "" {
				if err != nil {
					t.Fatal(err)
				}
				return
			}
			if err == nil || !strings.Contains(err.Error(), tc.err) {
				t.Fatalf("Validate = %v, want an error naming %s", err, tc.err)
			}
		})
	}
}

// vipLoUp sets lo up (a new namespace's lo is down).
func vipLoUp(t *testing.T) {
	t.Helper()
	s, err := unix.Socket(unix.AF_INET, unix.SOCK_DGRAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer unix.Close(s)
	ifr, err := unix.NewIfreq("lo")
	if err != nil {
		t.Fatal(err)
	}
	if err := unix.IoctlIfreq(s, unix.SIOCGIFFLAGS, ifr); err != nil {
		t.Fatalf("SIOCGIFFLAGS lo: %v", err)
	}
	ifr.SetUint16(ifr.Uint16() | unix.IFF_UP)
	if err := unix.IoctlIfreq(s, unix.SIOCSIFFLAGS, ifr); err != nil {
		t.Fatalf("set lo up: %v", err)
	}
}
