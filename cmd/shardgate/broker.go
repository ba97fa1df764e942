package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"log/slog"
	"net"
	"os"
	"os/signal"
	"sync/atomic"
	"syscall"
	"time"

	mqtt "github.com/mochi-mqtt/server/v2"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"github.com/redis/go-redis/v9"

	"github.com/shardgate/shardgate/broker"
)

func runBroker(args []string) error {
	fs := flag.NewFlagSet("broker", flag.ContinueOnError)
	cfgPath := fs.String("config", "broker.yaml", "broker configuration file (YAML)")
	check := fs.Bool("check", false, "validate the configuration and exit")
	if err := fs.Parse(args); err != nil {
		return err
	}
	cfg, err := broker.LoadConfig(*cfgPath)
	if err != nil {
		return err
	}
	if *check {
		fmt.Printf("%s: ok\n", *cfgPath)
		return nil
	}
	log := newLogger(cfg.Log.Level, cfg.Log.Format)
	slog.SetDefault(log)
	return serveBroker(cfg, log)
}

// serveBroker runs one broker instance until SIGTERM or SIGINT, then shuts
// it down in the order the proxies need (DESIGN.md, "Health and
// draining"): maintenance in Consul, so every proxy drains the instance;
// no new connections; a grace period for the proxies to move the devices;
// DISCONNECT 0x8B to whoever is left; close; deregister.
func serveBroker(cfg *broker.FileConfig, log *slog.Logger) error {
	log = log.With("instance", cfg.InstanceID, "shard", cfg.Shard)
	reg := prometheus.NewRegistry()
	reg.MustRegister(collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))

	// The admin server comes first, so /readyz says "starting" (503) from
	// the moment the process is up.
	var running atomic.Pointer[broker.Instance]
	var admin *broker.Admin
	if cfg.Admin != "off" {
		var err error
		admin, err = broker.NewAdmin(broker.AdminOptions{
			Addr: cfg.Admin, Gatherer: reg, Log: log,
			Degraded: func() error {
				if inst := running.Load(); inst != nil {
					return inst.RedisError()
				}
				return nil
			},
		})
		if err != nil {
			return err
		}
		go func() {
			if err := admin.Serve(); err != nil {
				log.Error("admin server stopped", "err", err)
			}
		}()
		defer func() {
			ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
			_ = admin.Shutdown(ctx)
			cancel()
		}()
	}

	// go-redis logs each failed reconnect of its pub/sub connections on
	// its own logger; the instance reports a Redis fault once, at error
	// level, so those lines go to debug.
	redis.SetLogger(redisLogger{log})
	rdb, err := cfg.RedisClient()
	if err != nil {
		return err
	}
	defer rdb.Close()

	var hooks []mqtt.Hook
	hooks = append(hooks, broker.AssignedIDHook(cfg.Shard, cfg.Shards))
	auth, err := broker.NewAuth(broker.AuthConfig{
		CredentialsFile: cfg.Auth.CredentialsFile,
		ACLFile:         cfg.Auth.ACLFile,
		AllowAnonymous:  cfg.Auth.AllowAnonymous,
		Log:             log,
	})
	if err != nil {
		return err
	}

	// The listener is bound here so that it can be wrapped for the PROXY
	// protocol; Go makes listeners MPTCP by default, and the broker's peer
	// is the proxy over plain TCP (DESIGN.md, known pitfalls).
	var lc net.ListenConfig
	lc.SetMultipathTCP(false)
	ln, err := lc.Listen(context.Background(), "tcp", cfg.Listen)
	if err != nil {
		return fmt.Errorf("listen on %s: %w", cfg.Listen, err)
	}
	bound := ln.Addr().(*net.TCPAddr).AddrPort()
	if trusted := cfg.TrustedPrefixes(); len(trusted) > 0 {
		ln = broker.ProxyProtocolListener(ln, trusted)
		log.Info("PROXY protocol accepted from trusted sources", "trusted", cfg.ProxyProtocol.Trusted)
	}

	sctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	inst, err := broker.Start(sctx, broker.Config{
		InstanceID:     cfg.InstanceID,
		Shard:          cfg.Shard,
		Shards:         cfg.Shards,
		Listener:       ln,
		Redis:          rdb,
		RedisKeyPrefix: cfg.Redis.KeyPrefix,
		RedisTimeout:   cfg.Redis.Timeout.D(),
		Heartbeat:      cfg.Redis.Heartbeat.D(),
		Auth:           auth,
		Hooks:          hooks,
		Log:            log,
	})
	cancel()
	if err != nil {
		_ = ln.Close()
		return err
	}
	reg.MustRegister(inst)
	running.Store(inst)

	var consul *broker.Registration
	if cfg.Consul.Enabled {
		rctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		consul, err = broker.Register(rctx, broker.RegistrationConfig{
			Consul:                  cfg.ConsulAPIConfig(),
			Service:                 cfg.Consul.Service,
			ServiceID:               cfg.Consul.ServiceID,
			Address:                 cfg.AnnounceAddr(bound),
			Shard:                   cfg.Shard,
			Shards:                  cfg.Shards,
			Priority:                cfg.Priority,
			Tags:                    cfg.Consul.Tags,
			CheckURL:                "http://" + admin.Addr().String() + "/readyz",
			CheckInterval:           cfg.Consul.CheckInterval.D(),
			CheckTimeout:            cfg.Consul.CheckTimeout.D(),
			FailuresBeforeCritical:  cfg.Consul.FailuresBeforeCritical,
			SuccessBeforePassing:    cfg.Consul.SuccessBeforePassing,
			DeregisterCriticalAfter: cfg.Consul.DeregisterCriticalAfter.D(),
			Log:                     log,
		})
		cancel()
		if err != nil {
			_ = inst.Close()
			return fmt.Errorf("consul: %w", err)
		}
		log.Info("registered in consul", "service", cfg.Consul.Service, "service_id", consul.ServiceID(), "address", cfg.AnnounceAddr(bound).String())
	}
	if admin != nil {
		admin.SetPhase(broker.PhaseServing)
	}
	log.Info("shardgate broker started", "listen", inst.Addr().String(), "admin", cfg.Admin, "shards", cfg.Shards, "priority", cfg.Priority, "redis", redisName(cfg))
	if cfg.Consul.Enabled && cfg.Shutdown.Grace.D() < 20*time.Second {
		log.Warn("shutdown.grace is shorter than the proxies' default drain (20s): devices still connected at its end are disconnected, not moved", "grace", cfg.Shutdown.Grace.D())
	}

	sigs := make(chan os.Signal, 2)
	signal.Notify(sigs, syscall.SIGTERM, syscall.SIGINT)
	defer signal.Stop(sigs)
	sig := <-sigs
	return shutdownBroker(cfg, log, sig, inst, admin, consul)
}

// shutdownBroker runs the SIGTERM sequence, logging each step.
func shutdownBroker(cfg *broker.FileConfig, log *slog.Logger, sig os.Signal, inst *broker.Instance, admin *broker.Admin, consul *broker.Registration) error {
	log.Info("stopping", "signal", sig.String(), "clients", inst.ClientsConnected(), "grace", cfg.Shutdown.Grace.D())
	if admin != nil {
		admin.SetPhase(broker.PhaseStopping)
	}
	if consul != nil {
		if err := consul.Maintenance(true, "shardgate broker shutting down"); err != nil {
			log.Error("step 1: consul maintenance failed; proxies learn of the shutdown from the failing check", "err", err)
		} else {
			log.Info("step 1: service in maintenance: proxies drain this instance")
		}
	} else {
		log.Info("step 1: no consul registration: /readyz says stopping")
	}
	inst.StopAccepting()
	log.Info("step 2: no new connections")

	grace := cfg.Shutdown.Grace.D()
	deadline := time.Now().Add(grace)
	t := time.NewTicker(100 * time.Millisecond)
	for inst.ClientsConnected() > 0 && time.Now().Before(deadline) {
		<-t.C
	}
	t.Stop()
	if n := inst.ClientsConnected(); n > 0 {
		log.Warn("step 3: grace period over; disconnecting the remaining devices", "clients", n, "grace", grace)
	} else {
		log.Info("step 3: every device has left")
	}

	err := inst.Shutdown()
	log.Info("step 4: instance closed (MQTT 5 devices got DISCONNECT 0x8B, 3.1.1 ones were closed)")
	if consul != nil {
		if derr := consul.Deregister(); derr != nil {
			log.Error("step 5: consul deregistration failed", "err", derr)
			err = errors.Join(err, derr)
		} else {
			log.Info("step 5: deregistered from consul")
		}
	}
	log.Info("shardgate broker stopped")
	return err
}

// redisLogger sends go-redis's internal log lines to slog at debug level.
type redisLogger struct{ log *slog.Logger }

func (l redisLogger) Printf(ctx context.Context, format string, v ...any) {
	l.log.DebugContext(ctx, "redis client: "+fmt.Sprintf(format, v...))
}

func redisName(cfg *broker.FileConfig) string {
	if len(cfg.Redis.ClusterAddresses) > 0 {
		return fmt.Sprintf("cluster %v", cfg.Redis.ClusterAddresses)
	}
	return cfg.Redis.Address
}
