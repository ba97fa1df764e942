package health

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net/netip"
	"sync"
	"time"

	consulapi "github.com/hashicorp/consul/api"
)

// RegisterConfig is a service registering itself with its local Consul agent
// with an HTTP check (the proxy's `register` section).
type RegisterConfig struct {
	// Consul is the agent's client configuration. Default
	// consulapi.DefaultConfig().
	Consul *consulapi.Config
	// Service name and ID on the agent. Both required.
	Service, ID string
	// Address announced. An unspecified IP announces the agent's own
	// address.
	Address netip.AddrPort
	// CheckURL is polled by the agent (HTTP GET; 2xx passing, 429 warning).
	CheckURL string
	// CheckInterval default 5s; CheckTimeout default 2s.
	CheckInterval, CheckTimeout time.Duration
	// Meta is the service meta. Default none.
	Meta map[string]string
	// ResyncInterval is how often the keeper checks the agent still has the
	// service (an agent restarted without state forgets it). Default 10s.
	ResyncInterval time.Duration
	// Log default slog.Default().
	Log *slog.Logger
}

// Registration is a service kept registered until Deregister.
type Registration struct {
	cfg    RegisterConfig
	client *consulapi.Client
	reg    *consulapi.AgentServiceRegistration
	stop   context.CancelFunc
	done   chan struct{}
	once   sync.Once
}

// Register registers the service and keeps it registered until Deregister.
// ctx bounds the first registration.
func Register(ctx context.Context, cfg RegisterConfig) (*Registration, error) {
	if cfg.Service == "" || cfg.ID == "" || cfg.CheckURL == "" {
		return nil, errors.New("health: Register needs Service, ID and CheckURL")
	}
	if cfg.Consul == nil {
		cfg.Consul = consulapi.DefaultConfig()
	}
	if cfg.CheckInterval <= 0 {
		cfg.CheckInterval = 5 * time.Second
	}
	if cfg.CheckTimeout <= 0 {
		cfg.CheckTimeout = min(2*time.Second, cfg.CheckInterval)
	}
	if cfg.ResyncInterval <= 0 {
		cfg.ResyncInterval = 10 * time.Second
	}
	if cfg.Log == nil {
		cfg.Log = slog.Default()
	}
	client, err := consulapi.NewClient(cfg.Consul)
	if err != nil {
		return nil, fmt.Errorf("consul client: %w", err)
	}
	addr := ""
	if a := cfg.Address.Addr(); a.IsValid() && !a.IsUnspecified() {
		addr = a.Unmap().String() // empty: Consul announces the agent's address
	}
	r := &Registration{cfg: cfg, client: client, done: make(chan struct{}), reg: &consulapi.AgentServiceRegistration{
		ID: cfg.ID, Name: cfg.Service, Address: addr, Port: int(cfg.Address.Port()), Meta: cfg.Meta,
		Check: &consulapi.AgentServiceCheck{
			CheckID: cfg.ID + "-readyz", Name: cfg.Service + " /readyz",
			HTTP: cfg.CheckURL, Interval: cfg.CheckInterval.String(), Timeout: cfg.CheckTimeout.String(),
		},
	}}
	if err := r.register(ctx); err != nil {
		return nil, err
	}
	cfg.Log.Info("registered with consul", "service", cfg.Service, "id", cfg.ID, "check", cfg.CheckURL)
	kctx, stop := context.WithCancel(context.Background())
	r.stop = stop
	go r.keepRegistered(kctx)
	return r, nil
}

func (r *Registration) register(ctx context.Context) error {
	opts := consulapi.ServiceRegisterOpts{}.WithContext(ctx)
	if err := r.client.Agent().ServiceRegisterOpts(r.reg, opts); err != nil {
		return fmt.Errorf("consul register %s at %s: %w", r.cfg.ID, r.cfg.Consul.Address, err)
	}
	return nil
}

// keepRegistered registers the service again when the agent lost it.
func (r *Registration) keepRegistered(ctx context.Context) {
	defer close(r.done)
	for sleep(ctx, jitter(r.cfg.ResyncInterval)+r.cfg.ResyncInterval/2) {
		qctx, cancel := context.WithTimeout(ctx, 5*time.Second)
		svc, _, err := r.client.Agent().Service(r.cfg.ID, (&consulapi.QueryOptions{}).WithContext(qctx))
		cancel()
		if ctx.Err() != nil {
			return
		}
		if err == nil && svc != nil {
			continue
		}
		rctx, cancel := context.WithTimeout(ctx, 5*time.Second)
		if err := r.register(rctx); err != nil {
			r.cfg.Log.Warn("consul registration lost; retrying", "err", err)
		} else {
			r.cfg.Log.Info("registered with consul again (the agent had lost the service)", "id", r.cfg.ID)
		}
		cancel()
	}
}

// Deregister stops the keeper and removes the service from the agent.
func (r *Registration) Deregister(ctx context.Context) error {
	var err error
	r.once.Do(func() {
		r.stop()
		<-r.done
		opts := (&consulapi.QueryOptions{}).WithContext(ctx)
		if e := r.client.Agent().ServiceDeregisterOpts(r.cfg.ID, opts); e != nil {
			err = fmt.Errorf("consul deregister %s: %w", r.cfg.ID, e)
		}
	})
	return err
}
