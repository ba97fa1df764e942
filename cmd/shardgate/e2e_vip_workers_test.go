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

// e2eVIPProxy moves the test into its own network namespace, routes the
// VIP 10.99.0.0/28 to it, starts one Mosquitto and writes the config of a
// proxy in front of it that serves the VIP on port 1883 (admin off,
// steering pinned under the test's own directory); the caller starts it.
func e2eVIPProxy(t *testing.T, grace string) *e2eProxy {
	t.Helper()
	e2eEnterNetns(t)
	if out, err := exec.Command("ip", "route", "add", "local", "10.99.0.0/28", "dev", "lo").CombinedOutput(); err != nil {
		t.Fatalf("ip route add local 10.99.0.0/28: %v: %s", err, out)
	}
	cfg := e2eFleetOf(t, e2eBrokers(t, 1))
	cfg.grace = grace
	cfg.admin = "off"
	vipListen := fmt.Sprintf("127.0.0.1:%d", freePort())
	px := &e2eProxy{mqtt: cfg.listen, cfgPath: filepath.Join(t.TempDir(), "proxy.yaml")}
	px.writeConfig(t, cfg.yaml()+fmt.Sprintf("reuseport: {pin_dir: %q}\nvip: {prefixes: [\"10.99.0.0/28\"], ports: [\"1883\"], listen: %q}\n", e2eUpgradePinDir(t), vipListen))
	return px
}

// TestE2EVIPWithWorkers: the SK_LOOKUP VIP through `proxy --workers 2`:
// every worker attaches its own program for the VIP, all assigning the
// workers' VIP listeners (one SO_REUSEPORT group), so devices reach the
// proxy on any address of the /28 with no socket bound there, addresses and
// ports outside the VIP are refused, and the VIP keeps working while a
// worker is killed and restarted.
func TestE2EVIPWithWorkers(t *testing.T) {
	bin := buildShardgate(t)
	px := e2eVIPProxy(t, "2s")
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

// TestE2EVIPUpgrade: an upgrade (SIGUSR2) of a proxy serving a VIP, in a
// test network namespace. Devices keep connecting to the VIP through the
// handover and none fails; devices held through the VIP stay with the old
// generation; once the old generation has exited, the new one's VIP
// program and listeners serve alone.
func TestE2EVIPUpgrade(t *testing.T) {
	bin := buildShardgate(t)
	px := e2eVIPProxy(t, e2eUpgradeGrace)
	px.e2eProcess = e2eStart(t, "shardgate proxy (netns, VIP)", bin, "proxy", "--config", px.cfgPath)
	t.Cleanup(func() { _ = px.cmd.Process.Signal(syscall.SIGTERM) })
	line := px.waitLog(t, e2eWait, "event loops running")
	if !strings.Contains(line, "ebpf generation 1") || strings.Contains(line, "vip=off") {
		e2ePrivileged(t, "the proxy runs without eBPF steering or VIP: %s", line)
	}
	px.waitLog(t, e2eWait, "shardgate proxy started")
	// The health checks must have seen the broker.
	e2eWaitFor(t, "a device through the VIP", e2eWait, func() (bool, string) {
		err := e2eRawConnect("10.99.0.2:1883", "e2e-vipupg-probe")
		return err == nil, fmt.Sprint(err)
	})
	held := e2eHoldDevices(t, "10.99.0.3:1883", "e2e-vipupg-held", 200)

	// Connects from this goroutine only: its thread is the one in the
	// namespace. ~100/s for 2 s before the upgrade and 3 s after.
	var total, failed int
	var samples []string
	connect := func(d time.Duration) {
		for end := time.Now().Add(d); time.Now().Before(end); total++ {
			addr := fmt.Sprintf("10.99.0.%d:1883", 1+total%14)
			if err := e2eRawConnect(addr, fmt.Sprintf("e2e-vipupg-%d", total)); err != nil {
				failed++
				if len(samples) < 5 {
					samples = append(samples, err.Error())
				}
			}
			time.Sleep(10 * time.Millisecond)
		}
	}
	connect(2 * time.Second)
	px.signal(t, syscall.SIGUSR2)
	line = px.waitLog(t, e2eWait, "started the next generation")
	if m := regexp.MustCompile(`pid=(\d+)`).FindStringSubmatch(line); m != nil {
		pid, _ := strconv.Atoi(m[1])
		t.Cleanup(func() { syscall.Kill(pid, syscall.SIGKILL) })
	}
	connect(3 * time.Second)
	px.waitLog(t, e2eWait, "handed over to the next generation")
	alive := e2eAlive(held)
	t.Logf("VIP upgrade: %d of %d connects failed %v, %d of %d held devices dropped", failed, total, samples, len(held)-alive, len(held))
	if failed != 0 || alive != len(held) {
		t.Errorf("VIP upgrade lost %d connects and %d held devices; want none", failed, len(held)-alive)
	}
	// The old generation exits once its devices leave; the VIP then
	// reaches the new generation's listeners through its own program.
	for _, h := range held {
		h.c.Close()
	}
	px.waitLog(t, e2eWait, "shardgate proxy stopped")
	e2eWaitFor(t, "the old generation exits", e2eWait, func() (bool, string) {
		err := syscall.Kill(px.pid(), 0)
		return err == syscall.ESRCH, fmt.Sprint(err)
	})
	after := 0
	for i := range 50 {
		if err := e2eRawConnect(fmt.Sprintf("10.99.0.%d:1883", 1+i%14), fmt.Sprintf("e2e-vipupg-after-%d", i)); err != nil {
			t.Errorf("device %d to the VIP after the old generation exited: %v", i, err)
			continue
		}
		after++
	}
	t.Logf("after the old generation exited: %d of 50 devices through the VIP", after)
}
