package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"log/slog"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"os/signal"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"

	"github.com/shardgate/shardgate/backend"
	"github.com/shardgate/shardgate/health"
	"github.com/shardgate/shardgate/internal/adminsock"
	"github.com/shardgate/shardgate/proxy"
)

func runProxy(args []string) error {
	fs := flag.NewFlagSet("proxy", flag.ContinueOnError)
	cfgPath := fs.String("config", "proxy.yaml", "proxy configuration file (YAML)")
	check := fs.Bool("check", false, "validate the configuration and exit")
	workers := fs.Int("workers", 0, "run this many worker processes under a supervisor that serves the admin port: new connections go to the least-loaded worker (eBPF steering), a worker that dies is restarted and only its devices reconnect; event_loops is shared out among them. 0: one process")
	upgrade := fs.Bool("upgrade", false, "take over from the running proxy of this configuration: take every new connection, then tell it to stop accepting (it relays its connected devices until they end, upgrade.handoff_delay or shutdown.grace); needs the eBPF steering (reuseport.pin_dir)")
	if err := fs.Parse(args); err != nil {
		return err
	}
	cfg, err := proxy.LoadConfig(*cfgPath)
	if err != nil {
		return err
	}
	if *check {
		fmt.Printf("%s: ok\n", *cfgPath)
		return nil
	}
	log := newLogger(cfg.Log.Level, cfg.Log.Format)
	wk, err := workerFromEnv()
	if err != nil {
		return err
	}
	reload := func() (*proxy.Config, error) { return proxy.LoadConfig(*cfgPath) }
	if wk != nil {
		// A worker of a supervisor: it serves the admin API on its
		// private socket only, and upgrades go through the supervisor.
		log = log.With("worker", wk.index)
		slog.SetDefault(log)
		cfg.EventLoops = wk.loops
		return serveProxy(cfg, log, reload, nil, wk)
	}
	slog.SetDefault(log)
	up := &upgrader{args: withoutUpgrade(args), takeover: *upgrade}
	if *workers > 0 {
		return runSupervisor(cfg, up.args, *workers, log, up)
	}
	return serveProxy(cfg, log, reload, up, nil)
}

// upgrader is what a proxy process needs for generation handover.
type upgrader struct {
	args     []string // this process's `proxy` arguments, minus --upgrade
	takeover bool     // started with --upgrade
}

// withoutUpgrade drops --upgrade from args, so SIGUSR2 can add it once.
func withoutUpgrade(args []string) []string {
	var out []string
	for _, a := range args {
		if a != "--upgrade" && a != "-upgrade" && a != "--upgrade=true" && a != "-upgrade=true" {
			out = append(out, a)
		}
	}
	return out
}

// startNext starts the next generation: this binary (as it is on disk now,
// so a replaced binary is the upgrade) with the same arguments plus
// --upgrade. It takes over on its own and tells this process to stop
// (SIGUSR1) once it serves.
func (u *upgrader) startNext(log *slog.Logger) {
	exe, err := os.Executable()
	if err != nil {
		log.Error("SIGUSR2: upgrade not started", "err", err)
		return
	}
	// os.Executable of a replaced binary names the deleted file.
	exe = strings.TrimSuffix(exe, " (deleted)")
	cmd := exec.Command(exe, append([]string{"proxy"}, append(u.args, "--upgrade")...)...)
	cmd.Stdin, cmd.Stdout, cmd.Stderr = nil, os.Stdout, os.Stderr
	if err := cmd.Start(); err != nil {
		log.Error("SIGUSR2: upgrade not started", "err", err)
		return
	}
	log.Info("SIGUSR2: started the next generation; it takes over once it serves", "pid", cmd.Process.Pid, "binary", exe)
	go cmd.Wait() // reap it if it fails early; it outlives this process otherwise
}

// waitRoutable waits until the router has a snapshot with a healthy
// instance, or max.
func waitRoutable(router *backend.Router, max time.Duration, log *slog.Logger) {
	deadline := time.Now().Add(max)
	for time.Now().Before(deadline) {
		if s := router.Load(); s != nil && healthyCount(s) > 0 {
			return
		}
		time.Sleep(10 * time.Millisecond)
	}
	log.Warn("upgrade: no healthy backend yet; taking over anyway", "waited", max)
}

// sdNotify sends state to systemd's notify socket, if there is one.
func sdNotify(state string, log *slog.Logger) {
	sock := os.Getenv("NOTIFY_SOCKET")
	if sock == "" {
		return
	}
	c, err := net.DialUnix("unixgram", nil, &net.UnixAddr{Name: sock, Net: "unixgram"})
	if err != nil {
		log.Warn("sd_notify", "err", err)
		return
	}
	defer c.Close()
	if _, err := c.Write([]byte(state)); err != nil {
		log.Warn("sd_notify", "err", err)
	}
}

// serveProxy runs a proxy with static backends until SIGTERM or SIGINT.
// SIGHUP calls reload and applies what can change without a restart: the
// backends and their health checks. reload may be nil (no reloading).
// With up, SIGUSR2 starts the next generation (shardgate proxy --upgrade)
// and SIGUSR1, which that generation sends, hands over: stop accepting,
// close the admin listener, relay the connected devices until they end or
// shutdown.grace, exit. up may be nil (no upgrades). extra collectors are
// served on /metrics beside the proxy's own.
func serveProxy(cfg *proxy.Config, log *slog.Logger, reload func() (*proxy.Config, error), up *upgrader, wk *workerEnv, extra ...prometheus.Collector) (err error) {
	reg := prometheus.NewRegistry()
	reg.MustRegister(collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))
	reg.MustRegister(extra...)

	var (
		src    backend.Source
		static *backend.Static
		consul *health.Consul
	)
	if cfg.UsesConsul() {
		cc := cfg.ConsulConfig()
		cc.Log = log.With("source", "consul")
		if consul, err = health.NewConsul(cc); err != nil {
			return err
		}
		reg.MustRegister(consul.Collector())
		src = consul
	} else {
		sc := cfg.StaticConfig()
		sc.Logger = log
		if static, err = backend.NewStatic(sc); err != nil {
			return err
		}
		src = static
	}
	router := backend.NewRouter(nil)
	opts := proxy.Options{Config: cfg, Router: router, Registry: reg, Log: log}
	role := "proxy"
	if wk != nil {
		role = "worker"
		opts.Worker = &proxy.WorkerOptions{Index: wk.index, Count: wk.count, Generation: wk.gen, Admission: wk.region}
	}
	gov := startThreads(cfg.Threads, log, reg)
	if gov != nil {
		opts.Busy = gov.Hot
	}
	px, err := proxy.New(opts)
	if err != nil {
		return err
	}
	var handedOver atomic.Bool
	if wk == nil {
		// The devices of the generations this one took over from, read
		// from their private admin sockets (a worker's supervisor does
		// this for all its workers).
		reg.MustRegister(&prevGenCollector{pids: func() []int { _, prev := px.Generation(); return prev }})
	}
	ctx, stop := context.WithCancel(context.Background())
	defer stop()
	if gov != nil {
		go gov.Run(ctx.Done())
	}

	srcDone := make(chan error, 1)
	go func() {
		srcDone <- src.Run(ctx, func(s *backend.Snapshot) {
			prev := router.Load()
			router.Store(s)
			// New devices already avoid an instance that left the healthy
			// set; the proxy now moves its live ones at the drain pace.
			px.OnSnapshot(prev, s)
			reportHealthy(px.Metrics().InstancesHealthy, s)
			log.Info("backends updated", "instances", s.Len(), "healthy", healthyCount(s))
		})
	}()

	var admin *proxy.Admin
	if cfg.Admin != "off" || wk != nil {
		addr := cfg.Admin
		var lns []net.Listener
		ln, lerr := adminsock.Listen()
		switch {
		case lerr == nil:
			lns = append(lns, ln)
		case wk != nil:
			px.Shutdown(canceled())
			return fmt.Errorf("worker admin socket: %w", lerr)
		default:
			log.Warn("private admin socket not served: a next generation cannot report this one's devices", "err", lerr)
		}
		if wk != nil {
			addr = "" // the supervisor serves the admin port
		}
		admin, err = proxy.NewAdmin(proxy.AdminOptions{
			Addr: addr, Listeners: lns, Router: router, Gatherer: reg, Log: log,
			Status: func() any {
				gen, _ := px.Generation()
				st := adminsock.Status{PID: os.Getpid(), Role: role, Generation: gen, Worker: -1,
					Connections: px.Active(), HandedOver: handedOver.Load()}
				if wk != nil {
					st.Worker = wk.index
				}
				return st
			},
			Ready: func() error {
				s := router.Load()
				switch {
				case s == nil && consul != nil:
					_, _, cerr := consul.Detail()
					if cerr != nil {
						return fmt.Errorf("no backend snapshot yet (consul: %v)", cerr)
					}
					return errors.New("no backend snapshot yet (waiting for consul's first answer)")
				case s == nil:
					return errors.New("no backend snapshot yet (first health checks running)")
				case healthyCount(s) == 0:
					return errors.New("no healthy backend instance")
				}
				return nil
			},
			ReadyDetail: func() string {
				if consul == nil {
					return ""
				}
				state, since, cerr := consul.Detail()
				if state == health.StateStale {
					return fmt.Sprintf("consul unreachable since %s (%v), routing on last snapshot", since.UTC().Format(time.RFC3339), cerr)
				}
				return ""
			},
			Backends: func() any {
				l := proxy.SnapshotListing(router.Load())
				if static == nil {
					return struct {
						proxy.BackendListing
						Consul health.State `json:"consul"`
					}{l, consul.State()}
				}
				return struct {
					proxy.BackendListing
					Checks []backend.InstanceStatus `json:"checks"`
				}{l, static.Status()}
			},
		})
		if err != nil {
			px.Shutdown(canceled())
			return err
		}
		go func() {
			if err := admin.Serve(); err != nil {
				log.Error("admin server stopped", "err", err)
			}
		}()
	}
	if up != nil && up.takeover {
		// The next generation takes every new connection as soon as it
		// starts: not before it can route them.
		waitRoutable(router, 30*time.Second, log)
	}
	px.Start()
	if up != nil {
		gen, prev := px.Generation()
		takeOverFrom(up, gen, prev, log)
	}
	if wk != nil {
		wk.signalReady()
	} else if up == nil || !up.takeover {
		sdNotify("READY=1", log)
	}
	log.Info("shardgate proxy started", "listen", px.Addrs(), "admin", cfg.Admin, "event_loops", cfg.EventLoops, "threads", cfg.Threads, "shards", cfg.Shards, "backends", backendsDesc(cfg))

	// deregister removes the proxy from Consul first thing on shutdown, so
	// whatever discovers proxies there stops sending devices while the
	// connected ones finish; it runs once.
	deregister := func() {}
	if cfg.Register.Enabled && wk == nil {
		if deregister, err = registerOnce(cfg, admin, log); err != nil {
			stop()
			px.Shutdown(canceled())
			if admin != nil {
				_ = admin.Shutdown(canceled())
			}
			return err
		}
		defer func() { deregister() }() // the one current at return
	}

	sigs := make(chan os.Signal, 4)
	signal.Notify(sigs, syscall.SIGTERM, syscall.SIGINT, syscall.SIGHUP, syscall.SIGUSR1, syscall.SIGUSR2)
	defer signal.Stop(sigs)
	for {
		select {
		case err := <-srcDone:
			if err != nil {
				log.Error("backend source stopped", "err", err)
			}
			srcDone = nil
		case sig := <-sigs:
			switch {
			case sig == syscall.SIGHUP:
				reloadProxy(reload, static, px, log)
				continue
			case sig == syscall.SIGUSR2 && up != nil:
				up.startNext(log)
				continue
			case sig == syscall.SIGUSR2:
				log.Warn("SIGUSR2: this proxy cannot be upgraded in place")
				continue
			case sig == syscall.SIGUSR1:
				// Handed over: the next generation already takes every
				// new connection and keeps the Consul registration; the
				// closing listeners' queued connections migrate to it.
				// The connected devices stay until they end, or, with
				// upgrade.handoff_delay, move to it at the drain pace
				// after that delay.
				// The private socket stays: the next generation
				// reads this one's remaining devices through it.
				handedOver.Store(true)
				if admin != nil {
					admin.CloseTCP()
				}
				deregister = func() {} // the registration is the next generation's now
				if d := cfg.Upgrade.HandoffDelay.D(); d > 0 {
					handoff := time.AfterFunc(d, func() {
						n := px.HandOff()
						log.Info("handing the connected devices off to the next generation at the drain pace", "connections", n)
					})
					defer handoff.Stop()
					log.Info("handed over to the next generation: no new devices; relaying connected devices, handed off after the delay", "handoff_delay", d, "grace", cfg.Shutdown.Grace.D(), "active", px.Active())
				} else {
					log.Info("handed over to the next generation: no new devices; relaying connected devices until they end", "grace", cfg.Shutdown.Grace.D(), "active", px.Active())
				}
			default:
				deregister()
				log.Info("stopping: no new devices; waiting for connected devices", "signal", sig.String(), "grace", cfg.Shutdown.Grace.D(), "active", px.Active())
			}
			sctx, cancel := context.WithTimeout(context.Background(), cfg.Shutdown.Grace.D())
			err := px.Shutdown(sctx)
			cancel()
			if errors.Is(err, context.DeadlineExceeded) {
				// The grace period is a promise kept, not a failure: the
				// devices still connected were closed as configured.
				log.Warn("grace period over: remaining devices closed", "grace", cfg.Shutdown.Grace.D())
				err = nil
			}
			stop()
			if admin != nil {
				actx, acancel := context.WithTimeout(context.Background(), 2*time.Second)
				_ = admin.Shutdown(actx)
				acancel()
			}
			log.Info("shardgate proxy stopped")
			return err
		}
	}
}

// reloadProxy applies a re-read configuration's backends, health checks and
// admission limits.
// Other fields need a restart.
func reloadProxy(reload func() (*proxy.Config, error), src *backend.Static, px *proxy.Proxy, log *slog.Logger) {
	if reload == nil {
		log.Warn("SIGHUP: this proxy has no configuration file to reload")
		return
	}
	next, err := reload()
	if err != nil {
		log.Error("SIGHUP: configuration not reloaded", "err", err)
		return
	}
	if src == nil || next.UsesConsul() {
		// Consul is the source of the backends: nothing to reload there.
		px.Admission().Reconfigure(next.AdmissionConfig(), next.Shards)
		log.Info("SIGHUP: admission reloaded (backends come from consul; changing the source needs a restart)")
		return
	}
	sc := next.StaticConfig()
	sc.Logger = log
	if err := src.Reconfigure(sc); err != nil {
		log.Error("SIGHUP: backends not reloaded", "err", err)
		return
	}
	px.Admission().Reconfigure(next.AdmissionConfig(), next.Shards)
	log.Info("SIGHUP: backends, health checks and admission reloaded", "backends", len(next.Backends.Static))
}

func backendsDesc(cfg *proxy.Config) string {
	if cfg.UsesConsul() {
		return "consul " + cfg.Backends.Consul.Address + " service " + cfg.Backends.Consul.Service
	}
	return strconv.Itoa(len(cfg.Backends.Static)) + " static"
}

// registerProxy registers the proxy with the local Consul agent, its check
// an HTTP GET on its own /readyz.
func registerProxy(cfg *proxy.Config, admin *proxy.Admin, log *slog.Logger) (*health.Registration, error) {
	cc := cfg.ConsulConfig().APIConfig()
	cc.Address = cfg.Register.ConsulAddress
	addr, err := netip.ParseAddrPort(cfg.Register.Address)
	if err != nil {
		return nil, fmt.Errorf("register.address: %w", err)
	}
	check := "http://" + admin.Addr().String() + "/readyz"
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	return health.Register(ctx, health.RegisterConfig{
		Consul: cc, Service: cfg.Register.Service, ID: cfg.Register.ID, Address: addr,
		CheckURL: check, CheckInterval: cfg.Register.CheckInterval.D(),
		Meta: map[string]string{"shards": strconv.Itoa(cfg.Shards), "contract": backend.ContractVersion},
		Log:  log.With("consul_service", cfg.Register.ID),
	})
}

// registerOnce registers the proxy (registerProxy) and returns the
// function that deregisters it, once however often it is called.
func registerOnce(cfg *proxy.Config, admin *proxy.Admin, log *slog.Logger) (func(), error) {
	registration, err := registerProxy(cfg, admin, log)
	if err != nil {
		return nil, err
	}
	var once sync.Once
	return func() {
		once.Do(func() {
			dctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
			defer cancel()
			if err := registration.Deregister(dctx); err != nil {
				log.Warn("consul deregistration failed", "err", err)
			} else {
				log.Info("deregistered from consul", "id", cfg.Register.ID)
			}
		})
	}, nil
}

func healthyCount(s *backend.Snapshot) int {
	n := 0
	for _, in := range s.Instances() {
		if in.Healthy {
			n++
		}
	}
	return n
}

// reportHealthy sets shardgate_instances_healthy{shard} from a snapshot;
// shard "none" counts the instances without shard meta.
func reportHealthy(g *prometheus.GaugeVec, s *backend.Snapshot) {
	g.Reset()
	for sh := 0; sh < s.Shards(); sh++ {
		g.WithLabelValues(strconv.Itoa(sh)).Set(float64(s.HealthyCount(sh)))
	}
	if n := s.HealthyCount(-1); n > 0 || !s.Sharded() {
		g.WithLabelValues("none").Set(float64(n))
	}
}

func canceled() context.Context {
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	return ctx
}
