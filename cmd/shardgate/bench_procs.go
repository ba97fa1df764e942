package main

import (
	"context"
	"fmt"
	"io"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"syscall"
	"time"

	"golang.org/x/sys/unix"
)

// benchProcs are the child processes of one bench run (brokers, proxies,
// HAProxy) and its scratch directory: a child dies with the bench
// (Pdeathsig) and when the run's context ends.
type benchProcs struct {
	dir    string
	ctx    context.Context
	cancel context.CancelFunc
	procs  []*exec.Cmd
}

// newBenchProcs makes the scratch directory, named after prefix.
func newBenchProcs(prefix string) (benchProcs, error) {
	dir, err := os.MkdirTemp("", prefix)
	if err != nil {
		return benchProcs{}, err
	}
	ctx, cancel := context.WithCancel(context.Background())
	return benchProcs{dir: dir, ctx: ctx, cancel: cancel}, nil
}

// start runs a child whose stderr goes to stderr.
func (b *benchProcs) start(stderr io.Writer, name string, args ...string) (*exec.Cmd, error) {
	cmd := exec.CommandContext(b.ctx, name, args...)
	cmd.Stderr = stderr
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	if err := cmd.Start(); err != nil {
		return nil, fmt.Errorf("start %s: %w", filepath.Base(name), err)
	}
	b.procs = append(b.procs, cmd)
	return cmd, nil
}

// stopAll kills the children still running (the context's cancel), reaps
// them except skip (already waited for), and removes the directory.
func (b *benchProcs) stopAll(skip *exec.Cmd) {
	b.cancel()
	for _, p := range b.procs {
		if p != skip {
			_ = p.Wait()
		}
	}
	os.RemoveAll(b.dir)
}

// startMosquitto runs Mosquitto number i on a free loopback port, with no
// connection limit and its open-files soft limit raised to the hard one
// (Go gives children the soft limit this process started with, often
// 1024), and waits until it accepts.
func (b *benchProcs) startMosquitto(mq string, i int) (*exec.Cmd, netip.AddrPort, error) {
	addr := netip.AddrPortFrom(netip.MustParseAddr("127.0.0.1"), uint16(freePort()))
	conf := filepath.Join(b.dir, fmt.Sprintf("mosquitto-%d.conf", i))
	if err := os.WriteFile(conf, []byte(fmt.Sprintf("listener %d 127.0.0.1\nallow_anonymous true\nmax_connections -1\npersistence false\nlog_dest none\n", addr.Port())), 0o644); err != nil {
		return nil, addr, err
	}
	cmd, err := b.start(os.Stderr, mq, "-c", conf)
	if err != nil {
		return nil, addr, err
	}
	raiseNoFile(cmd.Process.Pid)
	if err := waitTCP(addr.String(), 5*time.Second); err != nil {
		return nil, addr, fmt.Errorf("mosquitto %d: %w", i, err)
	}
	return cmd, addr, nil
}

// raiseNoFile lifts pid's open-files soft limit to its hard limit.
func raiseNoFile(pid int) {
	var rl unix.Rlimit
	if unix.Prlimit(pid, unix.RLIMIT_NOFILE, nil, &rl) == nil && rl.Cur < rl.Max {
		rl.Cur = rl.Max
		_ = unix.Prlimit(pid, unix.RLIMIT_NOFILE, &rl, nil)
	}
}
