// Package servertest runs real servers on loopback for tests: Mosquitto, the
// broker the proxy fronts, and redis-server, the broker's shared state. Tests
// talk to the real thing, not a fake; internal/consultest does the same for
// Consul.
//
// The servers are Debian's packages, which `make deps` installs. Without
// one, a test fails with the apt-get command that installs it, or skips
// under -short.
package servertest

import (
	"fmt"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"sync"
	"syscall"
	"testing"
	"time"
)

// loopback is where every server listens.
var loopback = netip.MustParseAddr("127.0.0.1")

// RequireBinary returns the path of the program name: on $PATH, else in
// /usr/sbin or /sbin, where Debian puts daemons such as mosquitto that a
// user's $PATH may lack. When it is missing the test fails, saying which
// Debian package to install, or skips under -short.
func RequireBinary(t testing.TB, name, aptPackage string) string {
	t.Helper()
	if p, err := exec.LookPath(name); err == nil {
		return p
	}
	for _, dir := range []string{"/usr/sbin", "/sbin"} {
		p := filepath.Join(dir, name)
		if fi, err := os.Stat(p); err == nil && fi.Mode().IsRegular() && fi.Mode().Perm()&0o111 != 0 {
			return p
		}
	}
	if testing.Short() {
		t.Skipf("servertest: %s not installed (apt-get install -y %s)", name, aptPackage)
	}
	t.Fatalf("servertest: %s not installed: apt-get install -y %s (make deps), or go test -short to skip", name, aptPackage)
	return ""
}

// FreePort returns an address on 127.0.0.1 whose TCP port was free a moment
// ago: for a server to listen on, or for a dial that must be refused.
func FreePort(t testing.TB) netip.AddrPort {
	t.Helper()
	l, err := net.Listen("tcp", net.JoinHostPort(loopback.String(), "0"))
	if err != nil {
		t.Fatalf("servertest: free port: %v", err)
	}
	defer l.Close()
	return l.Addr().(*net.TCPAddr).AddrPort()
}

// server is one server process on a fixed loopback port: started, killed and
// restarted there. Its output is kept, and logged when the test fails.
// Mosquitto and Redis differ only in their arguments and in how they say
// they are ready.
type server struct {
	name    string // the binary, looked up by RequireBinary
	args    func(addr netip.AddrPort) []string
	ready   func(addr netip.AddrPort) error
	timeout time.Duration // for ready; 0: defaultStartTimeout

	t      testing.TB
	bin    string
	addr   netip.AddrPort
	output *tailBuffer

	mu   sync.Mutex
	cmd  *exec.Cmd
	done chan struct{} // closed when cmd has exited
}

// startServer starts s, which names its binary, arguments and readiness
// probe, on port (0: a free port), and kills it when the test ends. It
// fails the test (or skips it under -short) when the binary is not
// installed.
func startServer(t testing.TB, s *server, aptPackage string, port uint16) *server {
	t.Helper()
	s.t, s.bin, s.output = t, RequireBinary(t, s.name, aptPackage), &tailBuffer{max: 64 << 10}
	if s.timeout <= 0 {
		s.timeout = defaultStartTimeout
	}
	t.Cleanup(func() {
		s.Kill()
		if t.Failed() {
			t.Logf("servertest: last output of %s on %s:\n%s", s.name, s.addr, s.output.String())
		}
	})
	s.launch(port)
	return s
}

// defaultStartTimeout bounds the wait for a server to be ready when its
// options leave StartTimeout zero.
const defaultStartTimeout = 10 * time.Second

// launch starts the server on port, or on a free port when port is 0. A
// port found free can be taken before the server binds it, so a server that
// exits at once is tried again on another port.
func (s *server) launch(port uint16) {
	s.t.Helper()
	var err error
	for range 3 {
		s.addr = netip.AddrPortFrom(loopback, port)
		if port == 0 {
			s.addr = FreePort(s.t)
		}
		var exited bool
		if exited, err = s.start(); err == nil || !exited || port != 0 {
			break
		}
	}
	if err != nil {
		s.t.Fatalf("servertest: %s on %s not ready: %v", s.name, s.addr, err)
	}
}

// start runs the server on s.addr and waits until it is ready. exited says
// whether it ended before that.
func (s *server) start() (exited bool, err error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.cmd != nil {
		return false, fmt.Errorf("%s already running", s.name)
	}
	cmd := exec.Command(s.bin, s.args(s.addr)...)
	cmd.Stdout, cmd.Stderr = s.output, s.output
	cmd.SysProcAttr = sysProcAttr()
	fmt.Fprintf(s.output, "servertest: starting %s %v\n", s.bin, cmd.Args[1:])
	if err := cmd.Start(); err != nil {
		return false, fmt.Errorf("start %s: %w", s.bin, err)
	}
	raiseFileLimit(cmd.Process.Pid)
	done := make(chan struct{})
	go func() {
		cmd.Wait()
		close(done)
	}()
	s.cmd, s.done = cmd, done

	deadline := time.After(s.timeout)
	for {
		last := s.ready(s.addr)
		if last == nil {
			return false, nil
		}
		select {
		case <-done:
			s.cmd, s.done = nil, nil
			return true, fmt.Errorf("%s exited: %s (last: %v)", s.name, cmd.ProcessState, last)
		case <-deadline:
			return false, fmt.Errorf("not ready after %s: %w", s.timeout, last)
		case <-time.After(20 * time.Millisecond):
		}
	}
}

// Addr is the server's address on 127.0.0.1, the same across Restart.
func (s *server) Addr() netip.AddrPort { return s.addr }

// String is the server's address, host:port.
func (s *server) String() string { return s.addr.String() }

// Kill ends the server with SIGKILL, as a crash would, and waits for it to
// exit. Clients see their connections reset and new ones refused until
// Restart. It is safe to call more than once.
func (s *server) Kill() {
	s.t.Helper()
	s.signal(syscall.SIGKILL, 10*time.Second)
}

// Stop ends the server gracefully (SIGTERM, SIGKILL after 10s) and waits for
// it to exit. It is safe to call more than once.
func (s *server) Stop() {
	s.t.Helper()
	s.signal(syscall.SIGTERM, 10*time.Second)
}

// Restart stops the server if it runs, then starts it again on the same port
// and waits until it is ready. It comes back empty: nothing persists.
func (s *server) Restart() {
	s.t.Helper()
	s.Stop()
	if _, err := s.start(); err != nil {
		s.t.Fatalf("servertest: %s on %s did not restart: %v", s.name, s.addr, err)
	}
}

// signal sends sig to a running server and waits up to grace for it to
// exit, then kills it.
func (s *server) signal(sig syscall.Signal, grace time.Duration) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.cmd == nil {
		return
	}
	cmd, done := s.cmd, s.done
	s.cmd, s.done = nil, nil
	_ = cmd.Process.Signal(sig)
	select {
	case <-done:
		return
	case <-time.After(grace):
	}
	_ = cmd.Process.Kill()
	select {
	case <-done:
	case <-time.After(10 * time.Second):
		s.t.Errorf("servertest: %s pid %d did not exit after SIGKILL", s.name, cmd.Process.Pid)
	}
}

// tailBuffer keeps the last max bytes written to it: a server's output,
// shown when a test fails.
type tailBuffer struct {
	mu  sync.Mutex
	max int
	buf []byte
}

func (b *tailBuffer) Write(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	b.buf = append(b.buf, p...)
	if over := len(b.buf) - b.max; over > 0 {
		b.buf = append(b.buf[:0], b.buf[over:]...)
	}
	return len(p), nil
}

func (b *tailBuffer) String() string {
	b.mu.Lock()
	defer b.mu.Unlock()
	return string(b.buf)
}
