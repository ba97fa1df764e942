package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/http/httputil"
	"net/url"
	"os"
	"os/exec"
	"os/signal"
	"runtime"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	dto "github.com/prometheus/client_model/go"

	"github.com/shardgate/shardgate/ebpf"
	"github.com/shardgate/shardgate/internal/adminsock"
	"github.com/shardgate/shardgate/internal/metricsagg"
	"github.com/shardgate/shardgate/proxy"
)

// The environment and file descriptors a supervisor hands its workers.
const (
	envWorker     = "SHARDGATE_WORKER"      // "index/count"
	envGeneration = "SHARDGATE_GENERATION"  // steering generation to join
	envLoops      = "SHARDGATE_EVENT_LOOPS" // event loops of this worker
	workerReadyFD = 3                       // pipe: one byte once serving
	workerAdmFD   = 4                       // memfd: host-wide admission buckets
)

// Worker restart pacing: a worker that keeps dying is restarted less and
// less often, up to workerBackoffMax; one that lived workerStable is
// restarted at once again.
const (
	workerBackoffMin = 100 * time.Millisecond
	workerBackoffMax = 10 * time.Second
	workerStable     = 30 * time.Second
	workerReadyWait  = 60 * time.Second
)

// viewFamilies are metrics every worker computes from the same inputs (its
// own copy of the backend health or Consul view): summing them over the
// workers would multiply them, so the supervisor shows one worker's.
var viewFamilies = map[string]bool{
	"shardgate_instances_healthy":               true,
	"shardgate_consul_state":                    true,
	"shardgate_consul_panic":                    true,
	"shardgate_consul_refused_instances_total":  true,
	"shardgate_previous_generation_connections": true,
	"shardgate_previous_generation_processes":   true,
}

// workerEnv is what a worker process learns from its supervisor.
type workerEnv struct {
	index, count int
	gen          uint32
	loops        int
	ready        *os.File
	region       *proxy.AdmissionRegion
}

// workerFromEnv reads the worker's place from the environment, nil when
// this process is not a worker.
func workerFromEnv() (*workerEnv, error) {
	v, ok := os.LookupEnv(envWorker)
	if !ok {
		return nil, nil
	}
	w := &workerEnv{}
	i, n, ok := strings.Cut(v, "/")
	var err1, err2, err3, err4 error
	w.index, err1 = strconv.Atoi(i)
	w.count, err2 = strconv.Atoi(n)
	g, err3 := strconv.ParseUint(os.Getenv(envGeneration), 10, 32)
	w.gen = uint32(g)
	w.loops, err4 = strconv.Atoi(os.Getenv(envLoops))
	if !ok || errors.Join(err1, err2, err3, err4) != nil {
		return nil, fmt.Errorf("worker: bad %s=%q %s=%q %s=%q (set by shardgate proxy --workers)", envWorker, v, envGeneration, os.Getenv(envGeneration), envLoops, os.Getenv(envLoops))
	}
	w.ready = os.NewFile(workerReadyFD, "ready")
	adm := os.NewFile(workerAdmFD, "admission")
	if w.ready == nil || adm == nil {
		return nil, errors.New("worker: started without the supervisor's descriptors")
	}
	r, err := proxy.OpenAdmissionRegion(adm)
	adm.Close()
	if err != nil {
		return nil, fmt.Errorf("worker: %w", err)
	}
	w.region = r
	return w, nil
}

// signalReady tells the supervisor the worker's listeners are in the
// steering and its loops run.
func (w *workerEnv) signalReady() {
	if w.ready != nil {
		w.ready.Write([]byte{'R'})
		w.ready.Close()
		w.ready = nil
	}
}

// workerProc is one running worker process.
type workerProc struct {
	index   int
	pid     int
	started time.Time
	done    chan struct{} // closed when it exited
}

type workerExit struct {
	w   *workerProc
	err error
}

// supervisor runs the worker processes of one proxy generation
// (shardgate proxy --workers N) and serves the admin port for them.
type supervisor struct {
	cfg   *proxy.Config
	log   *slog.Logger
	n     int
	loops int // event loops per worker
	exe   string
	args  []string

	steer  []*ebpf.Steering
	gen    uint32
	prev   []int
	region *proxy.AdmissionRegion

	mu      sync.Mutex
	workers []*workerProc // by index; nil while restarting
	exits   chan workerExit
	spawns  chan spawnReq

	handedOver atomic.Bool
	stopping   atomic.Bool

	carry    *metricsagg.Carry
	sum      *metricsagg.Gatherer // additive families, every worker
	view     *metricsagg.Gatherer // viewFamilies, one worker
	restarts *prometheus.CounterVec
}

// spawnReq runs exec.Cmd.Start on the supervisor's spawning thread (see
// spawner).
type spawnReq struct {
	cmd *exec.Cmd
	err chan error
}

// spawner starts worker processes from one locked OS thread that never
// exits: a worker's parent-death signal fires when the thread that forked
// it ends, not the process, and Go retires idle threads.
func (s *supervisor) spawner() {
	runtime.LockOSThread()
	for r := range s.spawns {
		r.err <- r.cmd.Start()
	}
}

// runSupervisor runs n workers of cfg until SIGTERM/SIGINT, or until a
// newer generation took over and they finished.
func runSupervisor(cfg *proxy.Config, args []string, n int, log *slog.Logger, up *upgrader) error {
	if n < 1 || n > ebpf.MaxWorkers {
		return fmt.Errorf("--workers %d: want 1 to %d", n, ebpf.MaxWorkers)
	}
	for _, a := range cfg.ListenAddrs() {
		if a.Port() == 0 {
			return fmt.Errorf("listen: %v: --workers needs fixed ports (every worker binds the same address)", a)
		}
	}
	if cfg.VIP.Enabled() {
		if _, _, vaddr, _ := cfg.VIP.Parsed(); vaddr.Port() == 0 {
			return fmt.Errorf("vip.listen: %v: --workers needs a fixed port", vaddr)
		}
	}
	// event_loops is the host's total: the workers share them out.
	loops := max(1, cfg.EventLoops/n)
	if n*loops > ebpf.MaxListenersPerGen {
		return fmt.Errorf("--workers %d × %d event loops each: at most %d listeners per address", n, loops, ebpf.MaxListenersPerGen)
	}
	exe, err := os.Executable()
	if err != nil {
		return err
	}
	s := &supervisor{
		cfg: cfg, log: log, n: n, loops: loops,
		exe:     strings.TrimSuffix(exe, " (deleted)"),
		args:    up.args,
		workers: make([]*workerProc, n),
		exits:   make(chan workerExit, n),
		spawns:  make(chan spawnReq),
		carry:   &metricsagg.Carry{},
		restarts: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "shardgate_worker_restarts_total",
			Help: "Worker processes restarted after they died, by worker.",
		}, []string{"worker"}),
	}
	s.sum = metricsagg.NewGatherer(func(name string) bool {
		return strings.HasPrefix(name, "shardgate_") && !viewFamilies[name]
	}, s.carry)
	s.view = metricsagg.NewGatherer(func(name string) bool { return viewFamilies[name] }, nil)
	go s.spawner()
	defer close(s.spawns)

	if s.region, err = proxy.NewAdmissionRegion(cfg.Shards); err != nil {
		return err
	}
	defer s.region.Close()
	steering := s.openSteering()
	defer s.closeSteering()

	reg := prometheus.NewRegistry()
	reg.MustRegister(collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))
	reg.MustRegister(s.restarts, &workersCollector{s: s},
		prometheus.NewCounterFunc(prometheus.CounterOpts{
			Name: "shardgate_worker_scrape_errors_total",
			Help: "Scrapes of a worker's metrics that failed; its last counts were used.",
		}, func() float64 { return float64(s.sum.Errors() + s.view.Errors()) }))
	if s.steer != nil {
		reg.MustRegister(ebpf.NewCollector(s.steer...))
	}
	reg.MustRegister(&prevGenCollector{pids: func() []int { return s.prev }})

	var admin *proxy.Admin
	if cfg.Admin != "off" {
		if admin, err = s.newAdmin(reg); err != nil {
			return err
		}
		go func() {
			if err := admin.Serve(); err != nil {
				log.Error("admin server stopped", "err", err)
			}
		}()
		defer func() {
			actx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
			_ = admin.Shutdown(actx)
			cancel()
		}()
	}

	sigs := make(chan os.Signal, 4)
	signal.Notify(sigs, syscall.SIGTERM, syscall.SIGINT, syscall.SIGHUP, syscall.SIGUSR1, syscall.SIGUSR2)
	defer signal.Stop(sigs)

	// Start every worker; each inserts its listeners into generation gen
	// and says so. None takes a connection before the activation below.
	for i := range n {
		if err := s.start(i); err != nil {
			s.stopAll(syscall.SIGKILL)
			s.waitAll(5 * time.Second)
			return fmt.Errorf("worker %d: %w", i, err)
		}
	}
	if up.takeover {
		waitWorkersReady(s, 30*time.Second, log)
	}
	s.activate()
	takeOverFrom(up, s.gen, s.prev, log)
	if !up.takeover {
		sdNotify("READY=1", log)
	}
	log.Info("shardgate proxy started", "workers", n, "event_loops_per_worker", loops, "listen", cfg.Listen,
		"admin", cfg.Admin, "reuseport", steering, "shards", cfg.Shards, "backends", backendsDesc(cfg))

	deregister := func() {}
	if cfg.Register.Enabled && admin != nil {
		if deregister, err = registerOnce(cfg, admin, log); err != nil {
			s.stopAll(syscall.SIGTERM)
			s.waitAll(cfg.Shutdown.Grace.D() + 5*time.Second)
			return err
		}
		defer func() { deregister() }()
	}

	backoff := make([]time.Duration, n)
	restart := make(chan int, n)
	// A restart's spawn runs beside this loop (it may take up to
	// workerReadyWait), so signals are handled meanwhile; its worker
	// joins when it serves, and is told at once of a stop, handover or
	// reload that came in between.
	respawned := make(chan spawned, n)
	pending, hups := 0, 0
	done := func() bool { return s.running() == 0 && pending == 0 }
	for {
		select {
		case ex := <-s.exits:
			s.mu.Lock()
			serving := s.workers[ex.w.index] == ex.w
			if serving {
				s.workers[ex.w.index] = nil
			}
			s.mu.Unlock()
			s.retire(ex.w)
			if s.stopping.Load() || s.handedOver.Load() {
				if done() {
					log.Info("shardgate proxy stopped: every worker exited")
					return nil
				}
				continue
			}
			if !serving {
				// It died before it served: start reported that,
				// and scheduled the next try.
				continue
			}
			for _, st := range s.steer {
				if err := st.SetDead(ex.w.index); err != nil {
					log.Warn("eBPF steering: worker not marked dead", "worker", ex.w.index, "err", err)
				}
			}
			if time.Since(ex.w.started) >= workerStable {
				backoff[ex.w.index] = 0
			}
			d := backoff[ex.w.index]
			backoff[ex.w.index] = min(max(2*d, workerBackoffMin), workerBackoffMax)
			log.Error("worker died; restarting it (only its devices reconnect)", "worker", ex.w.index, "pid", ex.w.pid, "err", ex.err, "after", d)
			i := ex.w.index
			time.AfterFunc(d, func() { restart <- i })
		case i := <-restart:
			if s.stopping.Load() || s.handedOver.Load() {
				continue
			}
			s.restarts.WithLabelValues(strconv.Itoa(i)).Inc()
			pending++
			go func(h int) {
				wp, err := s.spawn(i)
				respawned <- spawned{index: i, wp: wp, err: err, hups: h}
			}(hups)
		case sp := <-respawned:
			pending--
			i := sp.index
			if sp.err == nil {
				select {
				case <-sp.wp.done:
					sp.err = errors.New("worker exited right after it said it serves")
				default:
				}
			}
			if sp.err == nil {
				s.register(sp.wp)
				switch {
				case s.handedOver.Load():
					s.signal(sp.wp, syscall.SIGUSR1)
				case s.stopping.Load():
					s.signal(sp.wp, syscall.SIGTERM)
				case sp.hups != hups:
					s.signal(sp.wp, syscall.SIGHUP)
				}
				continue
			}
			if s.stopping.Load() || s.handedOver.Load() {
				if done() {
					log.Info("shardgate proxy stopped: every worker exited")
					return nil
				}
				continue
			}
			log.Error("worker restart failed; trying again", "worker", i, "err", sp.err)
			d := backoff[i]
			backoff[i] = min(max(2*d, workerBackoffMin), workerBackoffMax)
			time.AfterFunc(d, func() { restart <- i })
		case sig := <-sigs:
			switch sig {
			case syscall.SIGHUP:
				log.Info("SIGHUP: reloading every worker")
				hups++
				s.signalAll(syscall.SIGHUP)
			case syscall.SIGUSR2:
				up.startNext(log)
			case syscall.SIGUSR1:
				// The next generation takes every new connection and
				// owns the registration and the admin port now.
				if s.handedOver.Swap(true) {
					continue
				}
				if admin != nil {
					admin.CloseTCP()
				}
				deregister = func() {}
				log.Info("handed over to the next generation: workers stop accepting and finish their devices", "active", s.active())
				s.signalAll(syscall.SIGUSR1)
				if done() {
					return nil
				}
			default:
				if s.stopping.Swap(true) {
					continue
				}
				deregister()
				log.Info("stopping: workers stop accepting and wait for connected devices", "signal", sig.String(), "grace", cfg.Shutdown.Grace.D(), "active", s.active())
				s.signalAll(syscall.SIGTERM)
				if done() {
					return nil
				}
				// A worker that outlives its grace by far is stuck.
				time.AfterFunc(cfg.Shutdown.Grace.D()+10*time.Second, func() { s.stopAll(syscall.SIGKILL) })
			}
		}
	}
}

// openSteering opens the steering of every listen address and picks this
// generation's number. Without it the workers share new connections by the
// kernel's hash.
func (s *supervisor) openSteering() string {
	if s.cfg.Reuseport.PinDir == "off" {
		return "kernel hash (reuseport.pin_dir off)"
	}
	base := s.cfg.Reuseport.PinDir
	ebpf.PruneStale(base)
	prev := map[int]bool{}
	for _, a := range s.cfg.ListenAddrs() {
		st, err := ebpf.OpenSteering(ebpf.PinDirFor(base, a))
		if err != nil {
			s.closeSteering()
			s.steer = nil
			s.log.Warn("eBPF reuseport steering not enabled: workers share new connections by the kernel's hash (no least-loaded steering, no generation handover)", "pin_dir", base, "err", err)
			return "kernel hash"
		}
		s.steer = append(s.steer, st)
		g, err := st.Active()
		if err != nil {
			s.log.Warn("eBPF reuseport steering: reading the active generation", "err", err)
		}
		s.gen = max(s.gen, g.Gen)
		if g.PID != 0 && g.PID != os.Getpid() && g.Listeners > 0 {
			prev[g.PID] = true
		}
	}
	s.gen++
	for pid := range prev {
		s.prev = append(s.prev, pid)
	}
	return fmt.Sprintf("ebpf generation %d, least-loaded over %d workers", s.gen, s.n)
}

// activate makes the workers' generation the active one: every new
// connection goes to them from here on.
func (s *supervisor) activate() {
	for i, st := range s.steer {
		if err := st.ActivateSlots(s.gen, s.n*s.loops); err != nil {
			s.log.Warn("eBPF reuseport steering not activated: the previous generation keeps new connections", "listen", s.cfg.Listen[i], "err", err)
		}
	}
}

// closeSteering closes the steering handles; if this generation is still
// the active one (nobody took over), it removes the pins, as a
// single-process proxy does.
func (s *supervisor) closeSteering() {
	for _, st := range s.steer {
		if g, err := st.Active(); err == nil && g.PID == os.Getpid() && g.Gen == s.gen {
			os.RemoveAll(st.PinDir())
		}
		st.Close()
	}
}

// start starts worker i and waits until it serves.
func (s *supervisor) start(i int) error {
	wp, err := s.spawn(i)
	if err != nil {
		return err
	}
	s.register(wp)
	return nil
}

// spawn starts worker i and waits until it says it serves; it does not
// make it one of the supervisor's workers (register does). It runs outside
// the supervisor's loop for a restart, so signals are handled meanwhile.
func (s *supervisor) spawn(i int) (*workerProc, error) {
	r, w, err := os.Pipe()
	if err != nil {
		return nil, err
	}
	defer r.Close()
	cmd := exec.Command(s.exe, append([]string{"proxy"}, s.args...)...)
	cmd.Env = append(envWithout(os.Environ(), "NOTIFY_SOCKET", envWorker, envGeneration, envLoops),
		fmt.Sprintf("%s=%d/%d", envWorker, i, s.n),
		fmt.Sprintf("%s=%d", envGeneration, s.gen),
		fmt.Sprintf("%s=%d", envLoops, s.loops))
	cmd.Stdout, cmd.Stderr = os.Stdout, os.Stderr
	cmd.ExtraFiles = []*os.File{w, s.region.File()} // workerReadyFD, workerAdmFD
	// A supervisor killed outright takes its workers with it: a new one
	// could not manage them.
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGTERM}
	req := spawnReq{cmd: cmd, err: make(chan error, 1)}
	s.spawns <- req
	err = <-req.err
	w.Close()
	if err != nil {
		return nil, err
	}
	wp := &workerProc{index: i, pid: cmd.Process.Pid, started: time.Now(), done: make(chan struct{})}
	go func() {
		err := cmd.Wait()
		close(wp.done)
		s.exits <- workerExit{wp, err}
	}()
	r.SetReadDeadline(time.Now().Add(workerReadyWait))
	var b [1]byte
	if _, err := io.ReadFull(r, b[:]); err != nil {
		cmd.Process.Kill()
		return nil, fmt.Errorf("worker did not start (see its log): %w", err)
	}
	return wp, nil
}

// register makes a spawned worker one of the supervisor's: signalled,
// scraped and restarted from now on.
func (s *supervisor) register(wp *workerProc) {
	s.mu.Lock()
	s.workers[wp.index] = wp
	s.mu.Unlock()
	s.setSources()
	s.log.Info("worker serving", "worker", wp.index, "pid", wp.pid, "generation", s.gen)
}

// spawned is the outcome of a restart's spawn.
type spawned struct {
	index int
	wp    *workerProc
	err   error
	hups  int // SIGHUPs the supervisor had passed on when the spawn began
}

// retire folds a dead worker's counters into the carry, so the summed
// counters never go backwards.
func (s *supervisor) retire(w *workerProc) {
	s.carry.Retire(sourceName(w))
	s.setSources()
}

func sourceName(w *workerProc) string { return fmt.Sprintf("worker-%d-%d", w.index, w.pid) }

// setSources points the metric gatherers at the live workers.
func (s *supervisor) setSources() {
	sum := map[string]func(context.Context) ([]*dto.MetricFamily, error){}
	view := map[string]func(context.Context) ([]*dto.MetricFamily, error){}
	for _, w := range s.live() {
		fetch := func(ctx context.Context) ([]*dto.MetricFamily, error) { return adminsock.Gather(ctx, w.pid) }
		sum[sourceName(w)] = fetch
		if len(view) == 0 {
			view[sourceName(w)] = fetch
		}
	}
	s.sum.SetSources(sum)
	s.view.SetSources(view)
}

// live returns the running workers, by index.
func (s *supervisor) live() []*workerProc {
	s.mu.Lock()
	defer s.mu.Unlock()
	var out []*workerProc
	for _, w := range s.workers {
		if w != nil {
			out = append(out, w)
		}
	}
	return out
}

func (s *supervisor) running() int { return len(s.live()) }

func (s *supervisor) signalAll(sig syscall.Signal) {
	for _, w := range s.live() {
		s.signal(w, sig)
	}
}

func (s *supervisor) signal(w *workerProc, sig syscall.Signal) {
	if err := syscall.Kill(w.pid, sig); err != nil && !errors.Is(err, syscall.ESRCH) {
		s.log.Warn("signal to worker", "worker", w.index, "pid", w.pid, "signal", sig.String(), "err", err)
	}
}

func (s *supervisor) stopAll(sig syscall.Signal) { s.signalAll(sig) }

// waitAll waits for the running workers to exit, at most d.
func (s *supervisor) waitAll(d time.Duration) {
	t := time.After(d)
	for _, w := range s.live() {
		select {
		case <-w.done:
		case <-t:
			return
		}
	}
}

// statuses asks every live worker what it holds, by worker index.
func (s *supervisor) statuses() map[int]adminsock.Status {
	ws := s.live()
	pids := make([]int, len(ws))
	for i, w := range ws {
		pids[i] = w.pid
	}
	byPID := fetchStatuses(pids)
	out := make(map[int]adminsock.Status, len(ws))
	for _, w := range ws {
		if st, ok := byPID[w.pid]; ok {
			out[w.index] = st
		}
	}
	return out
}

// active is the devices every worker holds.
func (s *supervisor) active() int {
	n := 0
	for _, st := range s.statuses() {
		n += st.Connections
	}
	return n
}

// newAdmin serves the admin port for the workers: its own metrics plus the
// workers' summed, readiness when a worker is ready, the routing API from
// a worker (they all route alike).
func (s *supervisor) newAdmin(reg *prometheus.Registry) (*proxy.Admin, error) {
	var lns []net.Listener
	if ln, err := adminsock.Listen(); err == nil {
		lns = append(lns, ln)
	} else {
		s.log.Warn("private admin socket not served: a next generation cannot report this one's devices", "err", err)
	}
	api := &httputil.ReverseProxy{
		Rewrite: func(r *httputil.ProxyRequest) {
			u, _ := url.Parse(adminsock.URL)
			r.SetURL(u)
		},
		Transport: workerTransport{s},
	}
	return proxy.NewAdmin(proxy.AdminOptions{
		Addr:      s.cfg.Admin,
		Listeners: lns,
		Gatherer:  prometheus.Gatherers{reg, s.sum, s.view},
		API:       api,
		Log:       s.log,
		Ready: func() error {
			ws := s.live()
			if len(ws) == 0 {
				return errors.New("no worker running")
			}
			var last error
			for _, w := range ws {
				if last = workerReady(w.pid); last == nil {
					return nil
				}
			}
			return fmt.Errorf("no worker ready (%d running): %v", len(ws), last)
		},
		Status: func() any {
			st := s.statuses()
			conns := 0
			ws := []adminsock.Status{}
			for i := range s.n {
				if v, ok := st[i]; ok {
					conns += v.Connections
					ws = append(ws, v)
				}
			}
			return struct {
				adminsock.Status
				Workers []adminsock.Status `json:"workers"`
			}{adminsock.Status{PID: os.Getpid(), Role: "supervisor", Generation: s.gen, Worker: -1,
				Connections: conns, HandedOver: s.handedOver.Load()}, ws}
		},
	})
}

// workerReady is nil when the worker's /readyz answers 200.
func workerReady(pid int) error {
	c := adminsock.Client(pid, time.Second)
	resp, err := c.Get(adminsock.URL + "/readyz")
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	body, _ := io.ReadAll(io.LimitReader(resp.Body, 512))
	if resp.StatusCode != http.StatusOK {
		return errors.New(strings.TrimSpace(string(body)))
	}
	return nil
}

// waitWorkersReady waits until a worker can route (a generation taking
// over takes every new connection at once: not before it can route them).
func waitWorkersReady(s *supervisor, d time.Duration, log *slog.Logger) {
	deadline := time.Now().Add(d)
	for time.Now().Before(deadline) {
		for _, w := range s.live() {
			if workerReady(w.pid) == nil {
				return
			}
		}
		time.Sleep(20 * time.Millisecond)
	}
	log.Warn("upgrade: no worker ready yet; taking over anyway", "waited", d)
}

// workerTransport sends admin API requests to a live worker's socket.
type workerTransport struct{ s *supervisor }

func (t workerTransport) RoundTrip(r *http.Request) (*http.Response, error) {
	ws := t.s.live()
	if len(ws) == 0 {
		return nil, errors.New("no worker running")
	}
	return adminsock.Client(ws[0].pid, 5*time.Second).Transport.RoundTrip(r)
}

// workersCollector reports each worker's devices and the running count.
type workersCollector struct{ s *supervisor }

var (
	descWorkerConns = prometheus.NewDesc("shardgate_worker_connections",
		"Devices held by each worker process (relaying or in handshake).", []string{"worker"}, nil)
	descWorkers = prometheus.NewDesc("shardgate_workers_running",
		"Worker processes running.", nil, nil)
)

func (c *workersCollector) Describe(ch chan<- *prometheus.Desc) {
	ch <- descWorkerConns
	ch <- descWorkers
}

func (c *workersCollector) Collect(ch chan<- prometheus.Metric) {
	for i, st := range c.s.statuses() {
		ch <- prometheus.MustNewConstMetric(descWorkerConns, prometheus.GaugeValue, float64(st.Connections), strconv.Itoa(i))
	}
	ch <- prometheus.MustNewConstMetric(descWorkers, prometheus.GaugeValue, float64(c.s.running()))
}

// envWithout returns env minus the variables named.
func envWithout(env []string, names ...string) []string {
	out := env[:0:0]
	for _, kv := range env {
		k, _, _ := strings.Cut(kv, "=")
		drop := false
		for _, n := range names {
			drop = drop || k == n
		}
		if !drop {
			out = append(out, kv)
		}
	}
	return out
}
