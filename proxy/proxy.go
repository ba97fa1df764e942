// Package proxy is shardgate's connection engine: it accepts devices, reads
// their MQTT CONNECT, routes the client ID to a broker shard, admits, dials
// the broker, replays the CONNECT and relays bytes both ways.
//
// The relay is an event loop per core over raw nonblocking sockets and
// level-triggered epoll (DESIGN.md, "A connection's life in the proxy"): no
// goroutine per connection, no buffer per idle connection. A connection is a
// small record in an fd-indexed table; the loop reads into one shared buffer
// and lends a buffer to a connection only while its peer cannot take bytes.
package proxy

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net/netip"
	"os"
	"runtime"
	"sync"
	"sync/atomic"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"golang.org/x/sys/unix"

	"github.com/shardgate/shardgate/backend"
	"github.com/shardgate/shardgate/ebpf"
)

// Options are what New needs.
type Options struct {
	// Config must have its defaults filled in (SetDefaults; LoadConfig
	// does it); New validates it.
	Config *Config
	// Router holds the current backend snapshot; the loops read it per
	// connect.
	Router *backend.Router
	// Registry receives the proxy's metrics. Nil: they are not registered.
	Registry prometheus.Registerer
	// Log receives the proxy's logs. Nil: slog.Default().
	Log *slog.Logger
	// Worker, when set, makes this proxy one worker process of a
	// supervisor (shardgate proxy --workers N): it inserts its listeners
	// into the supervisor's steering generation under its worker index,
	// publishes its connection count for least-loaded steering, and
	// draws admission tokens from the host-wide buckets. Nil: a proxy of
	// its own.
	Worker *WorkerOptions
	// Busy, when set, is called by a loop that found work queued behind
	// its thread: a full batch of events in one wakeup, or an accept
	// batch that did not empty its listener's queue. It must not block
	// (procs.Governor.Hot).
	Busy func()
}

// WorkerOptions describe a worker process's place under its supervisor.
type WorkerOptions struct {
	// Index is the worker's number, 0 to Count-1; its listeners take
	// steering slots Index×event_loops onwards.
	Index, Count int
	// Generation is the steering generation the supervisor activates
	// once every worker has inserted its listeners (a restarted worker
	// joins the active one).
	Generation uint32
	// Admission holds the per-shard buckets shared by every worker of the
	// host. Nil: this process's own.
	Admission *AdmissionRegion
}

// loadPublishEvery is how often a worker writes its connection count for
// the steering program while the count moves. The program also counts its
// own choices between writes, so a write only corrects for closes and
// handshakes that failed. After loadQuietWrites writes of the same count
// the worker writes every loadPublishIdle instead: an idle worker then
// wakes once a second, not fifty times (each wakeup also wakes the
// runtime's monitor thread, which was most of an idle worker's CPU). New
// connections need no faster write (the program counts them itself), and
// the first count that differs brings the fast pace back.
const (
	loadPublishEvery = 20 * time.Millisecond
	loadPublishIdle  = time.Second
	loadQuietWrites  = 50
)

// Proxy states, in Proxy.state.
const (
	stateRunning  int32 = iota
	stateDraining       // not accepting; connections finish on their own
	stateForce          // close everything now
)

// settings are the parts of the Config the loops read per connection,
// converted once (durations to ticks) and never changed, so a caller that
// edits its Config later cannot race with the loops.
type settings struct {
	connectTicks uint32  // connect.timeout
	dialTicks    uint32  // dial.timeout
	maxIdleTicks uint32  // keepalive.max_idle, for keepalive 0; 0 = never
	kaFactor     float64 // keepalive.factor
	maxConnect   int     // connect.max_size
	maxClientID  int     // connect.max_client_id_length
	emptyReject  bool    // empty_client_id: reject
	proxyV2      bool    // proxy_protocol.send: v2
	drainBroker  bool    // drain.disconnect_broker
	drainDevice5 bool    // drain.disconnect_device_v5
	closeWait    uint32  // dial.close_wait in ticks; 0 = pass the FIN at once
}

func newSettings(cfg *Config, d *Dialer) settings {
	return settings{
		connectTicks: max(ticksFor(cfg.Connect.Timeout.D()), 1),
		dialTicks:    max(ticksFor(d.Timeout()), 1),
		maxIdleTicks: ticksFor(cfg.Keepalive.MaxIdle.D()),
		closeWait:    ticksFor(cfg.CloseWait()),
		kaFactor:     cfg.Keepalive.Factor,
		maxConnect:   int(cfg.Connect.MaxSize),
		maxClientID:  cfg.Connect.MaxClientIDLength,
		emptyReject:  cfg.EmptyClientID == "reject",
		proxyV2:      cfg.ProxyProtocol.Send == "v2",
		drainBroker:  cfg.Drain.DisconnectBroker == nil || *cfg.Drain.DisconnectBroker,
		drainDevice5: cfg.Drain.DisconnectDeviceV5 == nil || *cfg.Drain.DisconnectDeviceV5,
	}
}

// Proxy is the running connection engine. Create it with New, then Start.
type Proxy struct {
	cfg       *Config
	set       settings
	router    *backend.Router
	log       *slog.Logger
	metrics   *Metrics
	dialer    *Dialer
	admission *Admission
	admitLog  *SampledLog // refusals by admission
	dialLog   *SampledLog // backend dial failures
	acceptLog *SampledLog // accept errors

	// table maps an fd to its connection. fds are process-wide numbers,
	// so one table serves every loop; an entry is written and read only by
	// the loop that owns the fd (the atomics keep the race detector and
	// the memory model happy when a number moves from one loop to another
	// through close and accept).
	table []atomic.Pointer[conn]

	loops []*loop
	addrs []netip.AddrPort

	// steer is the eBPF steering per listen address (index as addrs), nil
	// without it (reuseport.pin_dir off, or no privileges: plain
	// SO_REUSEPORT). gen is this process's generation once Start ran;
	// prevPIDs the processes of the generations it took over from.
	steer     []*ebpf.Steering
	gen       uint32
	prevPIDs  []int
	steerDone sync.Once
	worker    *WorkerOptions
	busy      func()        // Options.Busy; nil: nobody asks
	loadStop  chan struct{} // closed to stop publishing the worker's load
	loadFDs   []int         // the worker's steered listeners, for their queues
	loadDone  chan struct{}

	// vipFD is the first VIP listener (-1: no VIP configured), the one in
	// the SK_LOOKUP program's SOCKMAP; the kernel spreads its connections
	// over the VIP listeners of all loops (one SO_REUSEPORT group).
	// vip is the attached program once Start ran, nil without it.
	vipFD   int
	vipAddr netip.AddrPort
	vip     atomic.Pointer[ebpf.VIP]
	reg     prometheus.Registerer

	state   atomic.Int32
	start   sync.Once
	started atomic.Bool
	wakeMu  sync.Mutex // guards the loops' wake fds against close

	// Drains (drain.go): the running ones, read by the loops each turn;
	// the relaying connections of every instance seen.
	drains  atomic.Pointer[[]*drain]
	drainMu sync.Mutex // serialises changes of drains
	drainWG sync.WaitGroup
	// drainsClosed (under drainMu): waitDrains began, no drain starts.
	drainsClosed bool
	instMu       sync.Mutex
	insts        map[string]*instLive
}

// New validates the options, creates the metrics, and binds every listener
// of every loop, so an address in use fails here, named.
func New(o Options) (*Proxy, error) {
	if o.Config == nil {
		return nil, errors.New("proxy: no config")
	}
	if o.Router == nil {
		return nil, errors.New("proxy: no router")
	}
	cfg := o.Config
	if err := cfg.Validate(); err != nil {
		return nil, err
	}
	log := o.Log
	if log == nil {
		log = slog.Default()
	}
	dialer, err := NewDialer(DialConfig{SourceAddrs: cfg.SourceAddrs(), Timeout: cfg.Dial.Timeout.D(),
		QuickAck: cfg.Dial.SmartConnect != nil && !*cfg.Dial.SmartConnect})
	if err != nil {
		return nil, fmt.Errorf("config: dial: %w", err)
	}
	acfg := cfg.AdmissionConfig()
	if err := acfg.Validate(); err != nil {
		return nil, fmt.Errorf("config: %w", err)
	}
	m, err := NewMetrics(o.Registry)
	if err != nil {
		return nil, err
	}
	var rl unix.Rlimit
	if err := unix.Getrlimit(unix.RLIMIT_NOFILE, &rl); err != nil {
		return nil, fmt.Errorf("proxy: getrlimit: %w", err)
	}
	p := &Proxy{
		cfg:       cfg,
		set:       newSettings(cfg, dialer),
		router:    o.Router,
		log:       log,
		metrics:   m,
		dialer:    dialer,
		admission: newAdmissionFor(o.Worker, acfg, max(cfg.Shards, o.Router.Load().Shards())),
		admitLog:  NewSampledLog(log, cfg.Admission.LogInterval.D()),
		dialLog:   NewSampledLog(log, cfg.Admission.LogInterval.D()),
		acceptLog: NewSampledLog(log, cfg.Admission.LogInterval.D()),
		table:     make([]atomic.Pointer[conn], min(rl.Cur, 1<<24)),
		insts:     make(map[string]*instLive),
		vipFD:     -1,
		reg:       o.Registry,
		worker:    o.Worker,
		busy:      o.Busy,
	}
	if w := o.Worker; w != nil && (w.Count < 1 || w.Count > ebpf.MaxWorkers || w.Index < 0 || w.Index >= w.Count) {
		return nil, fmt.Errorf("proxy: worker %d of %d, want 0 to count-1, count 1 to %d", w.Index, w.Count, ebpf.MaxWorkers)
	}
	loops := cfg.EventLoops
	if loops <= 0 {
		loops = runtime.NumCPU()
	}
	for i := range loops {
		l, err := newLoop(p, i)
		if err != nil {
			p.closeLoops()
			return nil, err
		}
		p.loops = append(p.loops, l)
	}
	// The first loop binds each address (resolving port 0); the others
	// join it with SO_REUSEPORT on the resolved port.
	for _, a := range cfg.ListenAddrs() {
		bound := a
		for i, l := range p.loops {
			fd, got, err := listenSocket(bound, cfg.DeferAccept())
			if err != nil {
				p.closeLoops()
				return nil, fmt.Errorf("proxy: %w", err)
			}
			if i == 0 {
				bound = got
				p.addrs = append(p.addrs, got)
			}
			if err := l.addListener(listener{fd: fd, addr: got}); err != nil {
				unix.Close(fd)
				p.closeLoops()
				return nil, fmt.Errorf("proxy: %w", err)
			}
		}
	}
	if cfg.VIP.Enabled() {
		_, _, vaddr, _ := cfg.VIP.Parsed()
		for i, l := range p.loops {
			fd, got, err := listenSocket(vaddr, cfg.DeferAccept())
			if err != nil {
				p.closeLoops()
				return nil, fmt.Errorf("proxy: vip.listen: %w", err)
			}
			if i == 0 {
				vaddr, p.vipFD, p.vipAddr = got, fd, got
			}
			if err := l.addListener(listener{fd: fd, addr: got}); err != nil {
				unix.Close(fd)
				p.closeLoops()
				return nil, fmt.Errorf("proxy: vip.listen: %w", err)
			}
		}
	}
	if cfg.Reuseport.PinDir != "off" {
		p.openSteering(cfg.Reuseport.PinDir, o.Registry)
	}
	return p, nil
}

// attachVIP attaches the SK_LOOKUP program that sends the configured VIP
// prefixes and ports to the VIP listeners. It is attached last, so it takes
// the VIP from an older generation's program (BPF_SK_LOOKUP_F_REPLACE).
// Without privileges or kernel support the VIP is not served, said once in
// the log; the listen addresses are unaffected.
func (p *Proxy) attachVIP() string {
	if p.vipFD < 0 {
		return "off"
	}
	prefixes, ports, _, _ := p.cfg.VIP.Parsed()
	v, err := ebpf.AttachVIP("", prefixes, ports, p.vipFD)
	if err != nil {
		p.log.Warn("VIP not served: SK_LOOKUP dispatch not enabled; only the listen addresses accept connections",
			"vip", p.cfg.VIP.Prefixes, "ports", p.cfg.VIP.Ports, "err", err)
		return "off"
	}
	p.vip.Store(v)
	if p.reg != nil {
		if err := p.reg.Register(v.Collector()); err != nil {
			p.log.Warn("VIP counters not exported", "err", err)
		}
	}
	return fmt.Sprintf("%v ports %v via %v", p.cfg.VIP.Prefixes, p.cfg.VIP.Ports, p.vipAddr)
}

// closeVIP detaches the VIP program: new VIP connections are refused (or
// reach an older generation's program).
func (p *Proxy) closeVIP() {
	if v := p.vip.Swap(nil); v != nil {
		v.Close()
	}
}

// openSteering opens (or creates) the pinned eBPF steering of every listen
// address. Any failure (no privileges, no bpffs, an old kernel) leaves the
// proxy on the kernel's SO_REUSEPORT hash, said once in the log.
func (p *Proxy) openSteering(base string, reg prometheus.Registerer) {
	ebpf.PruneStale(base)
	var ss []*ebpf.Steering
	for _, a := range p.addrs {
		s, err := ebpf.OpenSteering(ebpf.PinDirFor(base, a))
		if err != nil {
			for _, s := range ss {
				s.Close()
			}
			p.log.Warn("eBPF reuseport steering not enabled: no generation handover, queued connections are reset at restart; plain SO_REUSEPORT (kernel hash)",
				"pin_dir", base, "err", err)
			return
		}
		ss = append(ss, s)
	}
	p.steer = ss
	// A worker's supervisor exports the program's counters once for all:
	// summed over workers they would count every selection N times.
	if reg != nil && p.worker == nil {
		if err := reg.Register(ebpf.NewCollector(ss...)); err != nil {
			p.log.Warn("reuseport counters not exported", "err", err)
		}
	}
}

// activateSteering makes this process's listeners the active generation of
// each address: from here on every new connection, and every connection
// queued on a closing listener of an older generation, comes here. It
// returns how steering is done, for the log.
func (p *Proxy) activateSteering() string {
	if p.steer == nil {
		return "kernel hash"
	}
	if p.worker != nil {
		return p.insertWorker()
	}
	var gen uint32
	prev := map[int]bool{}
	for _, s := range p.steer {
		g, err := s.Active()
		if err != nil {
			p.log.Warn("eBPF reuseport steering: reading the active generation", "err", err)
		}
		gen = max(gen, g.Gen)
		if g.PID != 0 && g.PID != os.Getpid() && g.Listeners > 0 {
			prev[g.PID] = true
		}
	}
	gen++
	for i, s := range p.steer {
		fds := p.listenerFDs(p.addrs[i])
		err := s.Attach(fds[0])
		if err == nil {
			err = s.Insert(gen, fds)
		}
		if err == nil {
			err = s.Activate(gen)
		}
		if err != nil {
			// Addresses activated before this one stay steered to
			// this generation; this one keeps the kernel's hash.
			p.log.Warn("eBPF reuseport steering not enabled: plain SO_REUSEPORT (kernel hash)", "listen", p.addrs[i], "err", err)
			return "kernel hash"
		}
	}
	p.gen = gen
	for pid := range prev {
		p.prevPIDs = append(p.prevPIDs, pid)
	}
	return fmt.Sprintf("ebpf generation %d", gen)
}

// insertWorker puts this worker's listeners into the supervisor's
// generation under its worker index, and marks it empty, so the program
// sends it new connections at once if the generation is active (a
// restarted worker) or once the supervisor activates it.
func (p *Proxy) insertWorker() string {
	w := p.worker
	for i, s := range p.steer {
		fds := p.listenerFDs(p.addrs[i])
		first := w.Index * len(fds)
		err := s.Attach(fds[0])
		if err == nil {
			err = s.InsertWorker(w.Generation, w.Index, first, fds)
		}
		if err == nil {
			err = s.SetLoad(w.Index, 0)
		}
		if err != nil {
			p.log.Warn("eBPF reuseport steering not enabled for this worker: plain SO_REUSEPORT (kernel hash)", "listen", p.addrs[i], "worker", w.Index, "err", err)
			return "kernel hash"
		}
	}
	p.gen = w.Generation
	for _, a := range p.addrs {
		p.loadFDs = append(p.loadFDs, p.listenerFDs(a)...)
	}
	p.loadStop, p.loadDone = make(chan struct{}), make(chan struct{})
	go p.publishLoad()
	return fmt.Sprintf("ebpf generation %d, worker %d of %d, least loaded", w.Generation, w.Index, w.Count)
}

// publishLoad writes the worker's connection count for the steering
// program until the worker stops accepting (handover or shutdown).
func (p *Proxy) publishLoad() {
	defer close(p.loadDone)
	t := time.NewTimer(loadPublishEvery)
	defer t.Stop()
	last, same := -1, 0
	for {
		select {
		case <-p.loadStop:
			return
		case <-t.C:
		}
		if p.state.Load() != stateRunning {
			// Handed over or stopping: the next generation's worker
			// of the same index owns this count now.
			return
		}
		// The connections waiting in this worker's accept queues are
		// its load too: the program counted them when it chose this
		// worker, and in a reconnect storm the queues hold thousands.
		n := p.Active() + queued(p.loadFDs)
		for _, s := range p.steer {
			if err := s.SetLoad(p.worker.Index, n); err != nil {
				p.acceptLog.Log(context.Background(), slog.LevelWarn, "steering load", "eBPF steering: worker load not written", "err", err)
			}
		}
		if n != last {
			last, same = n, 0
		} else {
			same++
		}
		t.Reset(loadPublishPace(same))
	}
}

// loadPublishPace is the wait before the next load write after same
// writes of an unchanged count.
func loadPublishPace(same int) time.Duration {
	if same >= loadQuietWrites {
		return loadPublishIdle
	}
	return loadPublishEvery
}

// queued is how many connections wait in the accept queues of the
// listening sockets fds: for a listener, TCP_INFO's tcpi_unacked is its
// accept queue length.
func queued(fds []int) int {
	n := 0
	for _, fd := range fds {
		if ti, err := unix.GetsockoptTCPInfo(fd, unix.IPPROTO_TCP, unix.TCP_INFO); err == nil {
			n += int(ti.Unacked)
		}
	}
	return n
}

// stopLoad stops publishLoad, if it runs.
func (p *Proxy) stopLoad() {
	if p.loadStop != nil {
		close(p.loadStop)
		<-p.loadDone
		p.loadStop = nil
	}
}

// listenerFDs returns the listening sockets of addr, one per loop.
func (p *Proxy) listenerFDs(addr netip.AddrPort) []int {
	var fds []int
	for _, l := range p.loops {
		for _, ln := range l.listeners {
			if ln.addr == addr && ln.fd >= 0 {
				fds = append(fds, ln.fd)
			}
		}
	}
	return fds
}

// Generation returns this process's steering generation (0: no eBPF
// steering) and the processes of the older generations it took every new
// connection from, to be told to stop accepting (shardgate proxy --upgrade).
func (p *Proxy) Generation() (uint32, []int) {
	return p.gen, append([]int(nil), p.prevPIDs...)
}

// closeSteering closes the steering handles once the listeners are closed.
// If this process is still the active generation (nobody took over: a plain
// stop), or none was ever activated, it removes the pins too, so stopped
// proxies leave nothing in bpffs.
func (p *Proxy) closeSteering() {
	p.steerDone.Do(func() {
		p.stopLoad()
		for _, s := range p.steer {
			// A worker never removes them: its supervisor owns the
			// generation and restarts workers into it.
			if g, err := s.Active(); err == nil && p.worker == nil && (g.Gen == 0 || g.PID == os.Getpid() && g.Gen == p.gen && p.gen != 0) {
				os.RemoveAll(s.PinDir())
			}
			s.Close()
		}
	})
}

// closeLoops closes the fds of loops that never ran.
func (p *Proxy) closeLoops() {
	for _, l := range p.loops {
		l.closeFDs()
	}
	p.closeWake()
	p.closeSteering()
	p.closeVIP()
}

// Start runs the event loops. It returns at once.
func (p *Proxy) Start() {
	p.start.Do(func() {
		if p.state.Load() != stateRunning {
			return
		}
		p.started.Store(true)
		steering := p.activateSteering()
		vip := p.attachVIP()
		for _, l := range p.loops {
			go l.run()
		}
		p.log.Info("event loops running", "loops", len(p.loops), "listen", p.addrs,
			"reuseport", steering, "vip", vip)
	})
}

// Addrs returns the listen addresses, with port 0 resolved.
func (p *Proxy) Addrs() []netip.AddrPort { return append([]netip.AddrPort(nil), p.addrs...) }

// Active returns the number of connections the proxy holds, relaying or
// still in their handshake.
func (p *Proxy) Active() int {
	n := int64(0)
	for _, l := range p.loops {
		n += l.active.Load()
	}
	return int(n)
}

// Metrics returns the proxy's metrics.
func (p *Proxy) Metrics() *Metrics { return p.metrics }

// Admission returns the proxy's admission control, for reconfiguration on
// reload (Admission.Reconfigure).
func (p *Proxy) Admission() *Admission { return p.admission }

// Router returns the router the proxy routes with.
func (p *Proxy) Router() *backend.Router { return p.router }

// Shutdown stops accepting at once, lets connected devices finish until ctx
// is done, then closes the rest. It returns when every loop has exited: nil
// if every connection ended on its own, else ctx's error. Calling it again
// waits for the same end.
func (p *Proxy) Shutdown(ctx context.Context) error {
	p.state.CompareAndSwap(stateRunning, stateDraining)
	p.start.Do(func() {}) // a later Start does nothing
	if !p.started.Load() {
		p.closeLoops()
		p.waitDrains()
		return nil
	}
	p.wakeAll()
	done := make(chan struct{})
	go func() {
		for _, l := range p.loops {
			<-l.done
		}
		close(done)
	}()
	select {
	case <-done:
		p.waitDrains()
		p.closeWake()
		p.closeSteering()
		p.closeVIP()
		return nil
	case <-ctx.Done():
	}
	p.state.Store(stateForce)
	p.wakeAll()
	<-done
	p.waitDrains()
	p.closeWake()
	p.closeSteering()
	p.closeVIP()
	return ctx.Err()
}

// wakeAll interrupts every loop's epoll_wait.
func (p *Proxy) wakeAll() {
	one := []byte{1, 0, 0, 0, 0, 0, 0, 0}
	p.wakeMu.Lock()
	defer p.wakeMu.Unlock()
	for _, l := range p.loops {
		if l.wake >= 0 {
			unix.Write(l.wake, one)
		}
	}
}

// closeWake closes the loops' eventfds once they have exited. They are not
// closed by the loops themselves, so wakeAll never writes to a number that
// was closed and reused.
func (p *Proxy) closeWake() {
	p.wakeMu.Lock()
	defer p.wakeMu.Unlock()
	for _, l := range p.loops {
		if l.wake >= 0 {
			unix.Close(l.wake)
			l.wake = -1
		}
	}
}

// newAdmissionFor is a worker's host-wide admission, or this process's own.
func newAdmissionFor(w *WorkerOptions, cfg AdmissionConfig, shards int) *Admission {
	if w != nil && w.Admission != nil {
		return NewSharedAdmission(cfg, shards, w.Admission)
	}
	return NewAdmission(cfg, shards)
}
