package proxy

import (
	"net"
	"os"
	"slices"
	"strconv"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus/testutil"

	"golang.org/x/sys/unix"

	"github.com/shardgate/shardgate/backend"
	"github.com/shardgate/shardgate/mqttwire"
)

// usedFDs lists the process's open fd numbers.
func usedFDs(t *testing.T) []int {
	t.Helper()
	f, err := os.Open("/proc/self/fd")
	if err != nil {
		t.Fatal(err)
	}
	names, err := f.Readdirnames(-1)
	self := int(f.Fd())
	f.Close()
	if err != nil {
		t.Fatal(err)
	}
	var fds []int
	for _, n := range names {
		if fd, err := strconv.Atoi(n); err == nil && fd != self {
			fds = append(fds, fd)
		}
	}
	slices.Sort(fds)
	return fds
}

// Out of file descriptors, a level-triggered listener stays readable; the
// loop gives up its spare fd to accept the device and close it at once,
// counts it, and goes on serving once fds are free again.
func TestAcceptShedOnEMFILE(t *testing.T) {
	b := startRawBackend(t)
	p := startProxy(t, proxySetup{instances: []backend.Instance{inst("b", b.addr(), -1)},
		config: func(c *Config) { c.EventLoops = 1 }})

	var orig unix.Rlimit
	if err := unix.Getrlimit(unix.RLIMIT_NOFILE, &orig); err != nil {
		t.Fatal(err)
	}
	// Lower the soft limit so that exactly one fd number stays free: the
	// test's own socket takes it, the proxy's accept4 gets EMFILE.
	used := usedFDs(t)
	free := []int{}
	for n, i := 0, 0; len(free) < 2; n++ {
		if i < len(used) && used[i] == n {
			i++
			continue
		}
		free = append(free, n)
	}
	lim := orig
	lim.Cur = uint64(free[1])
	if err := unix.Setrlimit(unix.RLIMIT_NOFILE, &lim); err != nil {
		t.Fatal(err)
	}
	restored := false
	restore := func() {
		if !restored {
			restored = true
			unix.Setrlimit(unix.RLIMIT_NOFILE, &orig)
		}
	}
	defer restore()

	fd, err := unix.Socket(unix.AF_INET, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		restore()
		t.Fatalf("socket: %v", err)
	}
	defer unix.Close(fd)
	addr := p.Addrs()[0]
	if err := unix.Connect(fd, sockaddrOf(addr)); err != nil {
		restore()
		t.Fatalf("connect: %v", err)
	}
	// The proxy sheds the device: it sees the connection closed.
	unix.SetsockoptTimeval(fd, unix.SOL_SOCKET, unix.SO_RCVTIMEO, &unix.Timeval{Sec: 5})
	n, _ := unix.Read(fd, make([]byte, 8))
	restore()
	if n > 0 {
		t.Fatalf("shed device read %d bytes", n)
	}
	counterIs(t, "accepts_shed_total", p.metrics.AcceptsShed, 1)

	// With fds back, devices are served again.
	dev := dialProxy(t, p.addr)
	connect := connectPacket(mqttwire.Level311, "after-emfile", 0)
	dev.Write(connect)
	var bk net.Conn
	select {
	case bk = <-b.conns:
	case <-time.After(5 * time.Second):
		var lim unix.Rlimit
		unix.Getrlimit(unix.RLIMIT_NOFILE, &lim)
		t.Fatalf("no backend connection: shed=%v rejects=%v ok=%v active=%d rlimit=%d spare=%d",
			testutil.ToFloat64(p.metrics.AcceptsShed), testutil.ToFloat64(p.metrics.ConnectRejects.WithLabelValues(reasonDialFailed)),
			testutil.ToFloat64(p.connects(resultOK)), p.Active(), lim.Cur, p.loops[0].spare)
	}
	readFull(t, bk, len(connect))
}
