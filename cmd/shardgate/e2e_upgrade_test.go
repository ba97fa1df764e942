package main

import (
	"fmt"
	"io"
	"net"
	"os"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/shardgate/shardgate/mqttwire"
)

// e2ePrivileged skips a test that needs root and eBPF, or fails it when
// SHARDGATE_REQUIRE_PRIVILEGED=1 (.ci/run sets it).
func e2ePrivileged(t *testing.T, format string, args ...any) {
	t.Helper()
	if os.Getenv("SHARDGATE_REQUIRE_PRIVILEGED") == "1" {
		t.Fatalf("SHARDGATE_REQUIRE_PRIVILEGED=1: "+format, args...)
	}
	t.Skipf("needs root, bpffs and SK_REUSEPORT eBPF: "+format, args...)
}

// e2eUpgradeProxy starts a proxy whose steering is pinned under a directory
// of this test's own (removed at its end), so tests never share steering.
func e2eUpgradeProxy(t *testing.T, bin string, cfg e2eFleet, pinDir string) *e2eProxy {
	t.Helper()
	px := &e2eProxy{mqtt: cfg.listen, admin: cfg.admin, cfgPath: filepath.Join(t.TempDir(), "proxy.yaml")}
	px.writeConfig(t, cfg.yaml()+fmt.Sprintf("reuseport: {pin_dir: %q}\n", pinDir))
	px.e2eProcess = e2eStart(t, "shardgate proxy", bin, "proxy", "--config", px.cfgPath)
	px.waitAdmin(t)
	px.waitReady(t)
	return px
}

func e2eUpgradePinDir(t *testing.T) string {
	dir := fmt.Sprintf("/sys/fs/bpf/shardgate-e2e-%d-%d", os.Getpid(), time.Now().UnixNano())
	t.Cleanup(func() { os.RemoveAll(dir) })
	return dir
}

// e2eHeld is a device that connected (CONNACK accepted) and stays.
type e2eHeld struct{ c net.Conn }

func e2eHoldDevices(t *testing.T, addr, prefix string, n int) []e2eHeld {
	t.Helper()
	held := make([]e2eHeld, 0, n)
	for i := 0; i < n; i++ {
		c, err := net.DialTimeout("tcp", addr, 2*time.Second)
		if err != nil {
			t.Fatalf("held device %d: %v", i, err)
		}
		t.Cleanup(func() { c.Close() })
		_ = c.SetDeadline(time.Now().Add(3 * time.Second))
		if _, err := c.Write(mqttwire.AppendConnect(nil, mqttwire.ConnectOptions{Level: mqttwire.Level311, ClientID: fmt.Sprintf("%s-%d", prefix, i), CleanStart: true, KeepAlive: 120})); err != nil {
			t.Fatal(err)
		}
		b := make([]byte, 4)
		if _, err := io.ReadFull(c, b); err != nil || b[0] != 0x20 || b[3] != 0 {
			t.Fatalf("held device %d: CONNACK % x, %v", i, b, err)
		}
		held = append(held, e2eHeld{c})
	}
	return held
}

// alive counts the held devices that still get a PINGRESP to a PINGREQ.
func e2eAlive(held []e2eHeld) int {
	n := 0
	for _, h := range held {
		_ = h.c.SetDeadline(time.Now().Add(3 * time.Second))
		if _, err := h.c.Write([]byte{0xC0, 0}); err != nil {
			continue
		}
		b := make([]byte, 2)
		if _, err := io.ReadFull(h.c, b); err == nil && b[0] == 0xD0 {
			n++
		}
	}
	return n
}

// e2eConnectStream connects rate devices a second for d (rate × d in all), each waiting for
// its CONNACK then disconnecting, and returns the number that failed and a
// few of their errors. during runs once, after lead.
func e2eConnectStream(addr, prefix string, rate int, d, lead time.Duration, during func()) (total, failed int, samples []string) {
	var (
		wg    sync.WaitGroup
		nFail atomic.Int64
		mu    sync.Mutex
	)
	tick := time.NewTicker(time.Second / time.Duration(rate))
	defer tick.Stop()
	start := time.Now()
	fired := false
	// A count, not a duration: a tick dropped while the loop was late
	// still becomes a connect.
	n := int(d.Seconds() * float64(rate))
	for i := 0; i < n; i++ {
		<-tick.C
		if !fired && time.Since(start) >= lead {
			fired = true
			go during()
		}
		total++
		wg.Add(1)
		go func(i int) {
			defer wg.Done()
			if err := e2eRawConnect(addr, fmt.Sprintf("%s-%d", prefix, i)); err != nil {
				nFail.Add(1)
				mu.Lock()
				if len(samples) < 5 {
					samples = append(samples, err.Error())
				}
				mu.Unlock()
			}
		}(i)
	}
	wg.Wait()
	return total, int(nFail.Load()), samples
}

// The upgrade tests' load, the issue's: a stream of 500 MQTT connects a
// second for 20 s (10000), the restart 5 s in, plus 2000 held devices. The
// pair runs in parallel in ~23 s, so the suite runs it at full scale.
var e2eUpgradeLoad = struct {
	rate    int
	dur, at time.Duration
	held    int
}{rate: 500, dur: 20 * time.Second, at: 5 * time.Second, held: 2000}

const e2eUpgradeGrace = "60s"

func TestE2EUpgradeHandover(t *testing.T) {
	t.Parallel()
	bin := buildShardgate(t)
	ms := e2eBrokers(t, 2)
	cfg := e2eFleetOf(t, ms)
	cfg.grace = e2eUpgradeGrace
	old := e2eUpgradeProxy(t, bin, cfg, e2eUpgradePinDir(t))
	if line := old.waitLog(t, e2eWait, "event loops running"); !strings.Contains(line, "ebpf generation 1") {
		e2ePrivileged(t, "the proxy runs without eBPF steering: %s", line)
	}
	load := e2eUpgradeLoad
	held := e2eHoldDevices(t, old.mqtt, "e2e-upg-held", load.held)

	var newPID atomic.Int64
	total, failed, samples := e2eConnectStream(old.mqtt, "e2e-upg", load.rate, load.dur, load.at, func() {
		old.signal(t, syscall.SIGUSR2)
	})
	line := old.waitLog(t, e2eWait, "started the next generation")
	if m := regexp.MustCompile(`pid=(\d+)`).FindStringSubmatch(line); m != nil {
		pid, _ := strconv.Atoi(m[1])
		newPID.Store(int64(pid))
		t.Cleanup(func() { syscall.Kill(pid, syscall.SIGKILL) })
	}
	old.waitLog(t, e2eWait, "upgrade: took every new connection", "generation=2")
	old.waitLog(t, e2eWait, "handed over to the next generation")
	alive := e2eAlive(held)
	t.Logf("handover: %d of %d connects failed (%v), %d of %d held devices dropped", failed, total, samples, len(held)-alive, len(held))
	if failed != 0 || alive != len(held) {
		t.Errorf("handover lost %d connects and %d held devices; want none", failed, len(held)-alive)
	}
	if old.exited() {
		t.Fatalf("the old generation exited with %d held devices", len(held))
	}
	// The new generation serves devices and the admin port on its own.
	if err := e2eRawConnect(old.mqtt, "e2e-upg-after"); err != nil {
		t.Errorf("connect after the handover: %v", err)
	}
	if code, _, err := e2eGet(old.admin, "/readyz"); err != nil || code != 200 {
		t.Errorf("admin /readyz after the handover: %d, %v", code, err)
	}
	// ... and reports the devices the old generation still relays, read
	// from its private admin socket.
	e2eWaitFor(t, "the new generation reports the old one's devices", e2eWait, func() (bool, string) {
		m := old.metrics(t)
		v := m["shardgate_previous_generation_connections"]
		return v == float64(len(held)) && m["shardgate_previous_generation_processes"] == 1, fmt.Sprint(v)
	})
	// The old generation exits once its last device leaves.
	for _, h := range held {
		h.c.Close()
	}
	// Not old.waitExit: the new generation inherited the old one's output
	// pipe, so the old process's Wait lasts as long as the new one. Its
	// exit shows as its pid gone (reaped) after its last log line.
	old.waitLog(t, e2eWait, "shardgate proxy stopped")
	e2eWaitFor(t, "the old generation exits", e2eWait, func() (bool, string) {
		err := syscall.Kill(old.pid(), 0)
		return err == syscall.ESRCH, fmt.Sprint(err)
	})
	if pid := int(newPID.Load()); pid == 0 || syscall.Kill(pid, 0) != nil {
		t.Fatalf("the new generation (pid %d) is not running", pid)
	}
	if err := e2eRawConnect(old.mqtt, "e2e-upg-last"); err != nil {
		t.Errorf("connect after the old generation exited: %v", err)
	}
}

// TestE2EUpgradeVersusRestart does the same restart by plain close and
// rebind (SIGTERM with a 1 s grace, wait for the exit, start a new process),
// to show what the handover saves: connects refused in the gap and held
// devices cut at the grace. It reports the counts; only the held devices'
// loss (certain with a 1 s grace) is asserted.
func TestE2EUpgradeVersusRestart(t *testing.T) {
	t.Parallel()
	bin := buildShardgate(t)
	ms := e2eBrokers(t, 2)
	cfg := e2eFleetOf(t, ms)
	cfg.grace = "1s"
	pins := e2eUpgradePinDir(t)
	old := e2eUpgradeProxy(t, bin, cfg, pins)
	load := e2eUpgradeLoad
	held := e2eHoldDevices(t, old.mqtt, "e2e-rst-held", load.held)

	restarted := make(chan *e2eProxy, 1)
	total, failed, samples := e2eConnectStream(old.mqtt, "e2e-rst", load.rate, load.dur, load.at, func() {
		old.signal(t, syscall.SIGTERM)
		<-old.done
		px := &e2eProxy{mqtt: old.mqtt, admin: old.admin, cfgPath: old.cfgPath}
		px.e2eProcess = e2eStart(t, "shardgate proxy (restarted)", bin, "proxy", "--config", px.cfgPath)
		restarted <- px
	})
	px := <-restarted
	px.waitReady(t)
	alive := e2eAlive(held)
	t.Logf("close-and-rebind restart: %d of %d connects failed (%v), %d of %d held devices dropped", failed, total, samples, len(held)-alive, len(held))
	if alive == len(held) {
		t.Errorf("the restart kept all %d held devices past a 1 s grace: this comparison measures nothing", len(held))
	}
}

// e2eReconnectingDevice holds a connection through addr and, each time it
// is cut, records when on cuts and connects again (every 50 ms until one
// succeeds), until stop is closed.
func e2eReconnectingDevice(addr, id string, cuts chan<- time.Time, stop <-chan struct{}) {
	for {
		c, err := net.DialTimeout("tcp", addr, 2*time.Second)
		if err == nil {
			_ = c.SetDeadline(time.Now().Add(3 * time.Second))
			_, err = c.Write(mqttwire.AppendConnect(nil, mqttwire.ConnectOptions{Level: mqttwire.Level311, ClientID: id, CleanStart: true, KeepAlive: 120}))
			b := make([]byte, 4)
			if err == nil {
				_, err = io.ReadFull(c, b)
			}
			if err == nil && b[0] == 0x20 && b[3] == 0 {
				_ = c.SetDeadline(time.Time{})
				go func() { <-stop; c.Close() }()
				_, _ = io.Copy(io.Discard, c) // until the proxy cuts it
				select {
				case <-stop:
					return
				default:
				}
				cuts <- time.Now()
				continue
			}
			c.Close()
		}
		select {
		case <-stop:
			return
		case <-time.After(50 * time.Millisecond):
		}
	}
}

// TestE2EUpgradeHandoff: with upgrade.handoff_delay, the old generation
// relays its devices for that long after the handover, then moves all of
// them at the drain pace: 40 devices that reconnect to the same address
// when cut each land on the new generation, over seconds rather than at
// once, and the old process exits with none left, long before its grace.
func TestE2EUpgradeHandoff(t *testing.T) {
	t.Parallel()
	bin := buildShardgate(t)
	ms := e2eBrokers(t, 2)
	cfg := e2eFleetOf(t, ms)
	cfg.grace = "60s"
	old := &e2eProxy{mqtt: cfg.listen, admin: cfg.admin, cfgPath: filepath.Join(t.TempDir(), "proxy.yaml")}
	old.writeConfig(t, cfg.yaml()+fmt.Sprintf("reuseport: {pin_dir: %q}\nupgrade: {handoff_delay: 1s}\ndrain: {rate: 0.25}\n", e2eUpgradePinDir(t)))
	old.e2eProcess = e2eStart(t, "shardgate proxy", bin, "proxy", "--config", old.cfgPath)
	old.waitAdmin(t)
	old.waitReady(t)
	if line := old.waitLog(t, e2eWait, "event loops running"); !strings.Contains(line, "ebpf generation 1") {
		e2ePrivileged(t, "the proxy runs without eBPF steering: %s", line)
	}
	const n = 40
	cuts := make(chan time.Time, 4*n)
	stop := make(chan struct{})
	var wg sync.WaitGroup
	t.Cleanup(func() { close(stop); wg.Wait() })
	for i := range n {
		wg.Add(1)
		go func() { defer wg.Done(); e2eReconnectingDevice(old.mqtt, fmt.Sprintf("e2e-handoff-%d", i), cuts, stop) }()
	}
	active := func() (float64, string) {
		sum := 0.0
		for k, v := range old.metrics(t) {
			if strings.HasPrefix(k, "shardgate_connections_active{") {
				sum += v
			}
		}
		return sum, fmt.Sprint(sum)
	}
	e2eWaitFor(t, "40 devices on the old generation", e2eWait, func() (bool, string) { a, s := active(); return a == n, s })

	old.signal(t, syscall.SIGUSR2)
	line := old.waitLog(t, e2eWait, "started the next generation")
	if m := regexp.MustCompile(`pid=(\d+)`).FindStringSubmatch(line); m != nil {
		pid, _ := strconv.Atoi(m[1])
		t.Cleanup(func() { syscall.Kill(pid, syscall.SIGKILL) })
	}
	old.waitLog(t, e2eWait, "handed over to the next generation", "handoff_delay=1s")
	handedOver := time.Now()
	old.waitLog(t, e2eWait, "shardgate proxy stopped")
	exited := time.Since(handedOver)
	var times []time.Time
	for len(cuts) > 0 {
		times = append(times, <-cuts)
	}
	if len(times) != n {
		t.Fatalf("%d devices were cut by the old generation, want each of %d once", len(times), n)
	}
	first, last := times[0].Sub(handedOver), times[len(times)-1].Sub(handedOver)
	t.Logf("handoff of %d devices: first cut %v, last %v after the handover; old generation stopped after %v", n, first, last, exited)
	if first < 800*time.Millisecond {
		t.Errorf("first device cut %v after the handover, before handoff_delay (1s)", first)
	}
	// ~20 per instance at 0.25 × 20 = 5/s: the last ~4 s into the handoff.
	if spread := last - first; spread < 2*time.Second || spread > 10*time.Second {
		t.Errorf("devices cut over %v, want the drain pace (~4 s)", spread)
	}
	if exited > 20*time.Second {
		t.Errorf("the old generation stopped %v after the handover, want soon after its last device", exited)
	}
	// Every device reconnected, to the new generation (the admin port is
	// its own now).
	e2eWaitFor(t, "40 devices on the new generation", e2eWait, func() (bool, string) { a, s := active(); return a == n, s })
}

// SIGUSR2 passes the running proxy's arguments on with --upgrade exactly
// once, however this generation was started.
func TestWithoutUpgrade(t *testing.T) {
	got := withoutUpgrade([]string{"--config", "p.yaml", "--upgrade", "-upgrade=true"})
	if strings.Join(got, " ") != "--config p.yaml" {
		t.Errorf("withoutUpgrade = %q", got)
	}
}
