package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"log/slog"
	"os"
	"os/signal"
	"strconv"
	"syscall"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"

	"github.com/shardgate/shardgate/backend"
	"github.com/shardgate/shardgate/proxy"
)

func runProxy(args []string) error {
	fs := flag.NewFlagSet("proxy", flag.ContinueOnError)
	cfgPath := fs.String("config", "proxy.yaml", "proxy configuration file (YAML)")
	check := fs.Bool("check", false, "validate the configuration and exit")
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
	slog.SetDefault(log)
	return serveProxy(cfg, log, func() (*proxy.Config, error) { return proxy.LoadConfig(*cfgPath) })
}

// serveProxy runs a proxy with static backends until SIGTERM or SIGINT.
// SIGHUP calls reload and applies what can change without a restart: the
// backends and their health checks. reload may be nil (no reloading).
// extra collectors are served on /metrics beside the proxy's own.
func serveProxy(cfg *proxy.Config, log *slog.Logger, reload func() (*proxy.Config, error), extra ...prometheus.Collector) error {
	reg := prometheus.NewRegistry()
	reg.MustRegister(collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))
	reg.MustRegister(extra...)

	sc := cfg.StaticConfig()
	sc.Logger = log
	src, err := backend.NewStatic(sc)
	if err != nil {
		return err
	}
	router := backend.NewRouter(nil)
	px, err := proxy.New(proxy.Options{Config: cfg, Router: router, Registry: reg, Log: log})
	if err != nil {
		return err
	}
	ctx, stop := context.WithCancel(context.Background())
	defer stop()

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
	if cfg.Admin != "off" {
		admin, err = proxy.NewAdmin(proxy.AdminOptions{
			Addr: cfg.Admin, Router: router, Gatherer: reg, Log: log,
			Ready: func() error {
				s := router.Load()
				switch {
				case s == nil:
					return errors.New("no backend snapshot yet (first health checks running)")
				case healthyCount(s) == 0:
					return errors.New("no healthy backend instance")
				}
				return nil
			},
			Backends: func() any {
				l := proxy.SnapshotListing(router.Load())
				return struct {
					proxy.BackendListing
					Checks []backend.InstanceStatus `json:"checks"`
				}{l, src.Status()}
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
	px.Start()
	log.Info("shardgate proxy started", "listen", px.Addrs(), "admin", cfg.Admin, "event_loops", cfg.EventLoops, "shards", cfg.Shards, "backends", len(cfg.Backends.Static))

	sigs := make(chan os.Signal, 4)
	signal.Notify(sigs, syscall.SIGTERM, syscall.SIGINT, syscall.SIGHUP)
	defer signal.Stop(sigs)
	for {
		select {
		case err := <-srcDone:
			if err != nil {
				log.Error("backend source stopped", "err", err)
			}
			srcDone = nil
		case sig := <-sigs:
			if sig == syscall.SIGHUP {
				reloadProxy(reload, src, px, log)
				continue
			}
			log.Info("stopping: no new devices; waiting for connected devices", "signal", sig.String(), "grace", cfg.Shutdown.Grace.D(), "active", px.Active())
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
	sc := next.StaticConfig()
	sc.Logger = log
	if err := src.Reconfigure(sc); err != nil {
		log.Error("SIGHUP: backends not reloaded", "err", err)
		return
	}
	px.Admission().Reconfigure(next.AdmissionConfig(), next.Shards)
	log.Info("SIGHUP: backends, health checks and admission reloaded", "backends", len(next.Backends.Static))
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
