package main

import (
	"fmt"
	"net"
	"os/exec"
	"path/filepath"
	"regexp"
	"runtime"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// e2eEnterNetns moves the test goroutine's thread into a new network
// namespace with lo up. Processes the test starts from this goroutine are
// forked from that thread and live in the namespace too, and so do the
// sockets it creates; HTTP clients, which dial on other goroutines, do not
// (the test reads the logs instead). The thread is never unlocked: the
// runtime ends it with the test goroutine.
func e2eEnterNetns(t *testing.T) {
	t.Helper()
	runtime.LockOSThread()
	if err := unix.Unshare(unix.CLONE_NEWNET); err != nil {
		e2ePrivileged(t, "unshare(CLONE_NEWNET): %v", err)
	}
	if out, err := exec.Command("ip", "link", "set", "lo", "up").CombinedOutput(); err != nil {
		t.Fatalf("ip link set lo up: %v: %s", err, out)
	}
}

// TestE2EVIPWithWorkers: the SK_LOOKUP VIP through `proxy --workers 2`:
// every worker attaches its own program for the VIP, all assigning the
// workers' VIP listeners (one SO_REUSEPORT group), so devices reach the
// proxy on any address of the /28 with no socket bound there, addresses and
// ports outside the VIP are refused, and the VIP keeps working while a
// worker is killed and restarted.
func TestE2EVIPWithWorkers(t *testing.T) {
	bin := buildShardgate(t)
	e2eEnterNetns(t)
	if out, err := exec.Command("ip", "route", "add", "local", "10.99.0.0/28", "dev", "lo").CombinedOutput(); err != nil {
		t.Fatalf("ip route add local 10.99.0.0/28: %v: %s", err, out)
	}
	ms := e2eBrokers(t, 1)
	cfg := e2eFleetOf(t, ms)
	cfg.grace = "2s"
	cfg.admin = "off"
	vipListen := fmt.Sprintf("127.0.0.1:%d", freePort())
	px := &e2eProxy{mqtt: cfg.listen, cfgPath: filepath.Join(t.TempDir(), "proxy.yaml")}
	px.writeConfig(t, cfg.yaml()+fmt.Sprintf("reuseport: {pin_dir: %q}\nvip: {prefixes: [\"10.99.0.0/28\"], ports: [\"1883\"], listen: %q}\n", e2eUpgradePinDir(t), vipListen))
	px.e2eProcess = e2eStart(t, "shardgate proxy --workers 2 (netns)", bin, "proxy", "--config", px.cfgPath, "--workers", "2")
	t.Cleanup(func() { _ = px.cmd.Process.Signal(syscall.SIGTERM) })
	line := px.waitLog(t, e2eWait, "shardgate proxy started", "workers=2")
	if !strings.Contains(line, "ebpf generation") {
		e2ePrivileged(t, "the supervisor runs without eBPF steering: %s", line)
	}
	for w := range 2 {
		l := px.waitLog(t, e2eWait, "event loops running", fmt.Sprintf("worker=%d", w))
		if strings.Contains(l, "vip=off") {
			e2ePrivileged(t, "worker %d serves no VIP: %s", w, l)
		}
	}
	// No socket is bound to a VIP address: the VIP listeners are on
	// vip.listen only.
	if out, err := exec.Command("ss", "-Hltn").CombinedOutput(); err != nil || strings.Contains(string(out), "10.99.0.") {
		t.Fatalf("ss -ltn: %v\n%s", err, out)
	}
	for _, a := range []string{"10.99.0.1:1883", "10.99.0.7:1883", "10.99.0.15:1883"} {
		if err := e2eRawConnect(a, "e2e-vip-"+a); err != nil {
			t.Errorf("device to VIP %s: %v", a, err)
		}
	}
	for _, a := range []string{"10.99.0.7:1884", "10.99.0.16:1883"} {
		if c, err := net.DialTimeout("tcp", a, time.Second); err == nil {
			c.Close()
			t.Errorf("connection to %s (outside the VIP) was accepted", a)
		}
	}

	// Kill worker 0; the VIP keeps serving through worker 1's program
	// while the supervisor restarts it, and then through both.
	m := regexp.MustCompile(`msg="worker serving" worker=0 pid=(\d+)`).FindStringSubmatch(px.out.String())
	if m == nil {
		t.Fatalf("no \"worker serving\" line for worker 0:\n%s", px.out.String())
	}
	pid, _ := strconv.Atoi(m[1])
	if err := syscall.Kill(pid, syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	px.waitLog(t, e2eWait, "worker died; restarting it", "worker=0")
	failed := 0
	deadline := time.Now().Add(3 * time.Second)
	n := 0
	for ; time.Now().Before(deadline); n++ {
		if err := e2eRawConnect("10.99.0.5:1883", fmt.Sprintf("e2e-vip-restart-%d", n)); err != nil {
			failed++
		}
		time.Sleep(10 * time.Millisecond)
	}
	t.Logf("VIP while worker 0 was killed and restarted: %d of %d devices failed", failed, n)
	if failed > 0 {
		t.Errorf("%d of %d devices to the VIP failed while a worker restarted", failed, n)
	}
	if strings.Count(px.out.String(), `msg="worker serving" worker=0`) < 2 {
		t.Errorf("worker 0 was not restarted")
	}
}
