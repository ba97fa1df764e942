package main

import (
	"bufio"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/shardgate/shardgate/internal/adminsock"
)

// scaleEnv is one run's brokers and `shardgate proxy --workers`, all
// children that die with this process (Pdeathsig) and with stop.
type scaleEnv struct {
	benchProcs
	brokers []int // mosquitto pids, by shard
	ports   []int // their ports on 127.0.0.1
	proxy   *exec.Cmd
	cfgPath string
	listen  string // the proxy's MQTT address
	admin   string // the supervisor's admin address
	workers int
	loops   int
	sources []string  // dial.source_addresses
	up      time.Time // when every worker served
}

// startScaleEnv starts b Mosquitto brokers, one shard each, with their
// open-files soft limit raised to the hard one (Go restores the limit this
// process started with in its children, often 1024).
func startScaleEnv(mq string, b int) (_ *scaleEnv, err error) {
	procs, err := newBenchProcs("shardgate-scale-")
	if err != nil {
		return nil, err
	}
	e := &scaleEnv{benchProcs: procs}
	defer func() {
		if err != nil {
			e.stop()
		}
	}()
	for i := range b {
		cmd, addr, err := e.startMosquitto(mq, i)
		if err != nil {
			return nil, err
		}
		e.brokers = append(e.brokers, cmd.Process.Pid)
		e.ports = append(e.ports, int(addr.Port()))
	}
	return e, nil
}

// stop ends the proxy with SIGTERM first, so its workers close their
// devices and unpin their steering, then kills whatever is left.
func (e *scaleEnv) stop() {
	if e.proxy != nil {
		_ = e.proxy.Process.Signal(syscall.SIGTERM)
		done := make(chan struct{})
		go func() { _ = e.proxy.Wait(); close(done) }()
		select {
		case <-done:
		case <-time.After(15 * time.Second):
		}
	}
	e.stopAll(e.proxy)
}

// proxyConfig is the YAML of the proxy in front of the brokers; rate > 0
// turns per-shard admission on at rate devices/s, burst = rate.
func (e *scaleEnv) proxyConfig(rate float64) string {
	var c strings.Builder
	fmt.Fprintf(&c, "listen: [%q]\nadmin: %q\nshards: %d\nevent_loops: %d\n", e.listen, e.admin, len(e.brokers), e.loops)
	c.WriteString("health: {type: tcp, interval: 1s}\nlog: {level: warn}\nshutdown: {grace: 2s}\n")
	if rate > 0 {
		fmt.Fprintf(&c, "admission: {rate: %g, burst: %d}\n", rate, max(1, int(rate)))
	}
	if len(e.sources) > 0 {
		fmt.Fprintf(&c, "dial: {source_addresses: [%s]}\n", quoteList(e.sources))
	}
	c.WriteString("backends:\n  static:\n")
	for i, port := range e.ports {
		fmt.Fprintf(&c, "    - {id: mosquitto-%d, address: \"127.0.0.1:%d\", shard: %d}\n", i, port, i)
	}
	return c.String()
}

func quoteList(ss []string) string {
	q := make([]string, len(ss))
	for i, s := range ss {
		q[i] = strconv.Quote(s)
	}
	return strings.Join(q, ", ")
}

// startProxy runs `shardgate proxy --workers` on the brokers and waits
// until every worker serves.
func (e *scaleEnv) startProxy(workers, loops int, sources []string, rate float64) error {
	e.workers, e.loops, e.sources = workers, loops, sources
	e.listen = fmt.Sprintf("127.0.0.1:%d", freePort())
	e.admin = fmt.Sprintf("127.0.0.1:%d", freePort())
	e.cfgPath = filepath.Join(e.dir, "proxy.yaml")
	if err := os.WriteFile(e.cfgPath, []byte(e.proxyConfig(rate)), 0o644); err != nil {
		return err
	}
	self, err := os.Executable()
	if err != nil {
		return err
	}
	px, err := e.start(os.Stderr, self, "proxy", "--config", e.cfgPath, "--workers", strconv.Itoa(workers))
	if err != nil {
		return err
	}
	e.proxy = px
	if err := waitReady(e.admin, 30*time.Second); err != nil {
		return fmt.Errorf("proxy: %w", err)
	}
	deadline := time.Now().Add(30 * time.Second)
	for {
		st, err := e.status()
		if err == nil && len(st.Workers) == workers {
			break
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("proxy: %d workers serving after 30s, want %d (%v)", len(st.Workers), workers, err)
		}
		time.Sleep(100 * time.Millisecond)
	}
	e.up = time.Now()
	// The health checks must have seen every broker before devices come.
	for deadline := time.Now().Add(10 * time.Second); ; time.Sleep(100 * time.Millisecond) {
		c, err := connectMQTT(e.listen, "scale-probe")
		if err == nil {
			c.Close()
			break
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("proxy does not connect devices: %w", err)
		}
	}
	return nil
}

// setAdmission rewrites the proxy's admission and reloads it (SIGHUP, which
// the supervisor forwards to every worker): no device is dropped.
func (e *scaleEnv) setAdmission(rate float64) error {
	if err := os.WriteFile(e.cfgPath, []byte(e.proxyConfig(rate)), 0o644); err != nil {
		return err
	}
	return e.proxy.Process.Signal(syscall.SIGHUP)
}

type scaleStatus struct {
	adminsock.Status
	Workers []adminsock.Status `json:"workers"`
}

var scaleHTTP = &http.Client{Transport: &http.Transport{DisableKeepAlives: true}, Timeout: 30 * time.Second}

func (e *scaleEnv) status() (scaleStatus, error) {
	var st scaleStatus
	resp, err := scaleHTTP.Get("http://" + e.admin + "/api/v1/status")
	if err != nil {
		return st, err
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		return st, fmt.Errorf("status: %s", resp.Status)
	}
	return st, json.NewDecoder(resp.Body).Decode(&st)
}

// pids are the proxy's processes: the supervisor and its workers.
func (e *scaleEnv) pids() ([]int, error) {
	st, err := e.status()
	if err != nil {
		return nil, err
	}
	out := []int{e.proxy.Process.Pid}
	for _, w := range st.Workers {
		out = append(out, w.PID)
	}
	return out, nil
}

// waitConnections polls the supervisor until its workers hold want
// devices (at least, or at most with below), or within passes.
func (e *scaleEnv) waitConnections(want int, below bool, within time.Duration) (int, error) {
	deadline := time.Now().Add(within)
	for {
		st, err := e.status()
		if err == nil && ((!below && st.Connections >= want) || (below && st.Connections <= want)) {
			return st.Connections, nil
		}
		if time.Now().After(deadline) {
			return st.Connections, fmt.Errorf("proxy holds %d devices after %s, want %d (%v)", st.Connections, within, want, err)
		}
		time.Sleep(100 * time.Millisecond)
	}
}

// scaleMetric reads one sample of the supervisor's summed /metrics.
func (e *scaleEnv) scaleMetric(series string) (float64, error) {
	resp, err := scaleHTTP.Get("http://" + e.admin + "/metrics")
	if err != nil {
		return 0, err
	}
	defer resp.Body.Close()
	sc := bufio.NewScanner(resp.Body)
	sc.Buffer(make([]byte, 64<<10), 1<<20)
	for sc.Scan() {
		if v, ok := strings.CutPrefix(sc.Text(), series+" "); ok {
			return strconv.ParseFloat(v, 64)
		}
	}
	return 0, sc.Err()
}

// memSample is the proxy's processes and the kernel's socket memory at one
// moment.
type memSample struct {
	RSS, Anon int64 // bytes, supervisor + workers
	Fds       int
	// SockstatMem is /proc/net/sockstat TCP mem (pages × page size): the
	// memory charged to TCP socket buffers, host-wide.
	SockstatMem int64
	// Slab is the kernel objects a TCP socket held by an epoll user costs
	// (tcp_sock, socket inode, file, dentry, epoll item), host-wide, from
	// /proc/slabinfo active objects × object size; 0 if unreadable.
	Slab      int64
	TCPInuse  int
	Processes int
}

// sampleScale forces a GC in every proxy process (each worker through its
// admin socket), waits for the heaps to settle and reads /proc.
func (e *scaleEnv) sampleScale(settle time.Duration) (memSample, error) {
	var s memSample
	pids, err := e.pids()
	if err != nil {
		return s, err
	}
	if err := forceGC(e.admin); err != nil {
		return s, err
	}
	for _, pid := range pids[1:] {
		resp, err := adminsock.Client(pid, 60*time.Second).Get(adminsock.URL + "/debug/pprof/heap?gc=1")
		if err != nil {
			return s, fmt.Errorf("GC in worker %d: %w", pid, err)
		}
		_, _ = io.Copy(io.Discard, resp.Body)
		resp.Body.Close()
	}
	time.Sleep(settle)
	for _, pid := range pids {
		rss, anon, err := procMem(pid)
		if err != nil {
			return s, err
		}
		fds, err := procFds(pid)
		if err != nil {
			return s, err
		}
		s.RSS, s.Anon, s.Fds = s.RSS+rss, s.Anon+anon, s.Fds+fds
	}
	s.Processes = len(pids)
	s.TCPInuse, s.SockstatMem = sockstatTCP()
	s.Slab = socketSlab()
	return s, nil
}

// sockstatTCP reads "TCP: inuse N ... mem P" from /proc/net/sockstat.
func sockstatTCP() (inuse int, mem int64) {
	raw, err := os.ReadFile("/proc/net/sockstat")
	if err != nil {
		return 0, 0
	}
	for _, line := range strings.Split(string(raw), "\n") {
		rest, ok := strings.CutPrefix(line, "TCP: ")
		if !ok {
			continue
		}
		f := strings.Fields(rest)
		for i := 0; i+1 < len(f); i += 2 {
			v, _ := strconv.ParseInt(f[i+1], 10, 64)
			switch f[i] {
			case "inuse":
				inuse = int(v)
			case "mem":
				mem = v * int64(os.Getpagesize())
			}
		}
	}
	return inuse, mem
}

// socketSlabCaches are the slab caches that grow by one object per TCP
// socket an epoll user holds: the socket, its inode, its file and dentry,
// and its epoll registration.
var socketSlabCaches = []string{"TCP", "sock_inode_cache", "filp", "dentry", "eventpoll_epi", "eventpoll_pwq"}

func socketSlab() int64 {
	raw, err := os.ReadFile("/proc/slabinfo")
	if err != nil {
		return 0
	}
	var sum int64
	for _, line := range strings.Split(string(raw), "\n") {
		f := strings.Fields(line)
		if len(f) < 4 {
			continue
		}
		for _, name := range socketSlabCaches {
			if f[0] == name {
				active, _ := strconv.ParseInt(f[1], 10, 64)
				size, _ := strconv.ParseInt(f[3], 10, 64)
				sum += active * size
			}
		}
	}
	return sum
}

// cpuSeries samples the CPU of groups of processes every interval, so a
// window (a storm's start to its last CONNACK) can be cut out afterwards.
type cpuSeries struct {
	at   []time.Time
	cpu  [][]time.Duration // per sample, per group
	stop chan struct{}
	done chan struct{}
}

func sampleCPU(interval time.Duration, groups ...[]int) *cpuSeries {
	s := &cpuSeries{stop: make(chan struct{}), done: make(chan struct{})}
	take := func() {
		row := make([]time.Duration, len(groups))
		for i, g := range groups {
			for _, pid := range g {
				if d, err := procCPU(pid); err == nil {
					row[i] += d
				}
			}
		}
		s.at = append(s.at, time.Now())
		s.cpu = append(s.cpu, row)
	}
	take()
	go func() {
		defer close(s.done)
		t := time.NewTicker(interval)
		defer t.Stop()
		for {
			select {
			case <-t.C:
				take()
			case <-s.stop:
				take()
				return
			}
		}
	}()
	return s
}

func (s *cpuSeries) end() {
	close(s.stop)
	<-s.done
}

// between is each group's CPU from the last sample at or before from to the
// first sample at or after to.
func (s *cpuSeries) between(from, to time.Time) []time.Duration {
	a, b := 0, len(s.at)-1
	for i, t := range s.at {
		if !t.After(from) {
			a = i
		}
	}
	for i := len(s.at) - 1; i >= 0; i-- {
		if !s.at[i].Before(to) {
			b = i
		}
	}
	out := make([]time.Duration, len(s.cpu[0]))
	for g := range out {
		out[g] = s.cpu[b][g] - s.cpu[a][g]
	}
	return out
}
