// Package consultest runs a real Consul agent on loopback for tests: the
// broker's self-registration, the proxy's health watcher and `consul maint`
// drains are tested against the real thing, not a fake.
//
// The agent is the one `make consul` builds (Consul v1.14.11, kept outside
// the clone and linked at bin/consul); SHARDGATE_CONSUL names another
// binary. Without one, Start fails the test with "run make consul", or skips
// it under -short.
package consultest

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"sync"
	"syscall"
	"testing"
	"time"
)

// Version is the Consul release that `make consul` builds.
const Version = "v1.14.11"

// Options configures Start. The zero value is a -dev agent.
type Options struct {
	// DataDir, when set, runs a one-server cluster (-server
	// -bootstrap-expect=1) that keeps its state there, so the catalog and
	// the agent's own registrations survive Restart. Default: -dev, whose
	// state is in memory and lost on Restart.
	DataDir string

	// NodeName is the agent's node name. Default "shardgate-test".
	NodeName string

	// StartTimeout bounds the wait for the HTTP API and a raft leader.
	// Default 30s.
	StartTimeout time.Duration
}

func (o Options) nodeName() string {
	if o.NodeName == "" {
		return "shardgate-test"
	}
	return o.NodeName
}

func (o Options) startTimeout() time.Duration {
	if o.StartTimeout <= 0 {
		return 30 * time.Second
	}
	return o.StartTimeout
}

// ports are the agent's listeners, all on 127.0.0.1, fixed for its whole
// life so Restart brings it back where clients and raft expect it.
type ports struct {
	http, serfLAN, serfWAN, server int
}

// Agent is a running Consul agent. It is stopped when the test ends.
type Agent struct {
	t      testing.TB
	bin    string
	opts   Options
	ports  ports
	output *tailBuffer

	mu   sync.Mutex
	cmd  *exec.Cmd
	done chan struct{} // closed when cmd has exited
}

// Start starts an agent and waits until it has a leader. It fails the test
// (or skips it under -short) when there is no consul binary.
func Start(t testing.TB, opts Options) *Agent {
	t.Helper()
	bin, err := Binary()
	if err != nil {
		if testing.Short() {
			t.Skipf("consultest: %v", err)
		}
		t.Fatalf("consultest: %v", err)
	}
	if opts.DataDir != "" {
		if opts.DataDir, err = filepath.Abs(opts.DataDir); err != nil {
			t.Fatalf("consultest: data dir: %v", err)
		}
	}
	a := &Agent{
		t:      t,
		bin:    bin,
		opts:   opts,
		ports:  freePorts(t),
		output: &tailBuffer{max: 64 << 10},
	}
	t.Cleanup(func() {
		a.Stop()
		if t.Failed() {
			t.Logf("consultest: last consul output:\n%s", a.output.String())
		}
	})
	a.start()
	return a
}

// Binary finds the consul binary: $SHARDGATE_CONSUL, else bin/consul at the
// root of the shardgate module.
func Binary() (string, error) {
	if p := os.Getenv("SHARDGATE_CONSUL"); p != "" {
		if _, err := os.Stat(p); err != nil {
			return "", fmt.Errorf("SHARDGATE_CONSUL (run make consul, or unset it): %w", err)
		}
		return p, nil
	}
	root, err := moduleRoot()
	if err != nil {
		return "", err
	}
	p := filepath.Join(root, "bin", "consul")
	if _, err := os.Stat(p); err != nil {
		return "", fmt.Errorf("no consul binary at %s (run make consul): %w", p, err)
	}
	return p, nil
}

// moduleRoot walks up from the working directory (a test's package
// directory) to the nearest go.mod, which is shardgate's: tools/consul, the
// only nested module, is never an ancestor of a package that imports this.
func moduleRoot() (string, error) {
	dir, err := os.Getwd()
	if err != nil {
		return "", err
	}
	for {
		if _, err := os.Stat(filepath.Join(dir, "go.mod")); err == nil {
			return dir, nil
		}
		parent := filepath.Dir(dir)
		if parent == dir {
			return "", errors.New("no go.mod above the working directory (run make consul, or set SHARDGATE_CONSUL)")
		}
		dir = parent
	}
}

// Addr is the agent's HTTP API address, host:port, for api.Config.Address.
func (a *Agent) Addr() string {
	return net.JoinHostPort("127.0.0.1", strconv.Itoa(a.ports.http))
}

// URL is the agent's HTTP API base URL.
func (a *Agent) URL() string { return "http://" + a.Addr() }

// NodeName is the agent's node name.
func (a *Agent) NodeName() string { return a.opts.nodeName() }

// Kill ends the agent with SIGKILL, as a crash would, and waits for it to
// exit. Clients see connection errors until Restart.
func (a *Agent) Kill() {
	a.t.Helper()
	a.signal(syscall.SIGKILL, 10*time.Second)
}

// Stop ends the agent gracefully (SIGTERM, SIGKILL after 10s) and waits for
// it to exit. It is safe to call more than once.
func (a *Agent) Stop() {
	a.t.Helper()
	a.signal(syscall.SIGTERM, 10*time.Second)
}

// Restart stops the agent if it runs, then starts it again on the same ports
// and data directory and waits for a leader. A -dev agent (no DataDir) comes
// back empty.
func (a *Agent) Restart() {
	a.t.Helper()
	a.Stop()
	a.start()
}

func (a *Agent) args() []string {
	p := a.ports
	args := []string{"agent",
		"-node=" + a.opts.nodeName(),
		"-bind=127.0.0.1", "-advertise=127.0.0.1", "-client=127.0.0.1",
		"-http-port=" + strconv.Itoa(p.http),
		"-serf-lan-port=" + strconv.Itoa(p.serfLAN),
		"-serf-wan-port=" + strconv.Itoa(p.serfWAN),
		"-server-port=" + strconv.Itoa(p.server),
		"-dns-port=-1", "-grpc-port=-1", "-grpc-tls-port=-1",
		// No calls home: the update check would reach the internet.
		"-hcl=disable_update_check = true",
		"-hcl=disable_anonymous_signature = true",
	}
	if a.opts.DataDir == "" {
		return append(args, "-dev")
	}
	return append(args,
		"-server", "-bootstrap-expect=1", "-data-dir="+a.opts.DataDir,
		// -dev's fast raft timing, so leader election takes well under a
		// second rather than several.
		"-hcl=performance { raft_multiplier = 1 }",
		"-log-level=debug",
	)
}

func (a *Agent) start() {
	a.t.Helper()
	a.mu.Lock()
	defer a.mu.Unlock()
	if a.cmd != nil {
		a.t.Fatal("consultest: agent already running")
	}
	cmd := exec.Command(a.bin, a.args()...)
	cmd.Env = append(os.Environ(), "CHECKPOINT_DISABLE=1")
	cmd.Stdout = a.output
	cmd.Stderr = a.output
	cmd.SysProcAttr = sysProcAttr()
	fmt.Fprintf(a.output, "consultest: starting %s %v\n", a.bin, cmd.Args[1:])
	if err := cmd.Start(); err != nil {
		a.t.Fatalf("consultest: start %s: %v", a.bin, err)
	}
	done := make(chan struct{})
	go func() {
		cmd.Wait()
		close(done)
	}()
	a.cmd, a.done = cmd, done

	if err := a.waitReady(done); err != nil {
		a.t.Fatalf("consultest: agent on %s not ready: %v\n%s", a.Addr(), err, a.output.String())
	}
}

// waitReady polls until the agent has a raft leader and its own node is in
// the catalog, so a test's first registration and health query behave as
// they would against a settled cluster.
func (a *Agent) waitReady(exited <-chan struct{}) error {
	ctx, cancel := context.WithTimeout(context.Background(), a.opts.startTimeout())
	defer cancel()
	client := &http.Client{Timeout: 2 * time.Second}
	var last error
	for {
		last = a.ready(ctx, client)
		if last == nil {
			return nil
		}
		select {
		case <-exited:
			return fmt.Errorf("consul exited: %w", last)
		case <-ctx.Done():
			return fmt.Errorf("%w (last: %v)", ctx.Err(), last)
		case <-time.After(50 * time.Millisecond):
		}
	}
}

func (a *Agent) ready(ctx context.Context, client *http.Client) error {
	var leader string
	if err := getJSON(ctx, client, a.URL()+"/v1/status/leader", &leader); err != nil {
		return err
	}
	if leader == "" {
		return errors.New("no leader yet")
	}
	var node *struct{ Node struct{ Node string } }
	if err := getJSON(ctx, client, a.URL()+"/v1/catalog/node/"+a.opts.nodeName(), &node); err != nil {
		return err
	}
	if node == nil {
		return errors.New("own node not in the catalog yet")
	}
	return nil
}

func getJSON(ctx context.Context, client *http.Client, url string, v any) error {
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, url, nil)
	if err != nil {
		return err
	}
	resp, err := client.Do(req)
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(resp.Body)
	if err != nil {
		return err
	}
	if resp.StatusCode != http.StatusOK {
		return fmt.Errorf("GET %s: %s: %s", url, resp.Status, bytes.TrimSpace(body))
	}
	return json.Unmarshal(body, v)
}

// signal sends sig to a running agent and waits up to grace for it to exit,
// then kills it.
func (a *Agent) signal(sig syscall.Signal, grace time.Duration) {
	a.mu.Lock()
	defer a.mu.Unlock()
	if a.cmd == nil {
		return
	}
	cmd, done := a.cmd, a.done
	a.cmd, a.done = nil, nil
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
		a.t.Errorf("consultest: consul pid %d did not exit after SIGKILL", cmd.Process.Pid)
	}
}

// freePorts picks the agent's ports: each free for TCP on 127.0.0.1, and the
// serf ports for UDP as well (gossip uses both). All stay held until every
// one is picked, so no two are the same.
func freePorts(t testing.TB) ports {
	t.Helper()
	var closers []io.Closer
	defer func() {
		for _, c := range closers {
			c.Close()
		}
	}()
	pick := func(udp bool) int {
		for range 100 {
			l, err := net.Listen("tcp", "127.0.0.1:0")
			if err != nil {
				t.Fatalf("consultest: free port: %v", err)
			}
			port := l.Addr().(*net.TCPAddr).Port
			if !udp {
				closers = append(closers, l)
				return port
			}
			u, err := net.ListenPacket("udp", net.JoinHostPort("127.0.0.1", strconv.Itoa(port)))
			if err != nil {
				l.Close()
				continue
			}
			closers = append(closers, l, u)
			return port
		}
		t.Fatal("consultest: no port free for both TCP and UDP")
		return 0
	}
	return ports{http: pick(false), serfLAN: pick(true), serfWAN: pick(true), server: pick(false)}
}

// tailBuffer keeps the last max bytes written to it: the agent's output,
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
