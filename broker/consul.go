package broker

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"math/rand/v2"
	"net/http"
	"net/netip"
	"net/url"
	"strconv"
	"strings"
	"sync"
	"time"

	consulapi "github.com/hashicorp/consul/api"
)

// registrationService is the default Consul service name brokers register
// under and proxies watch (the registration contract in DESIGN.md).
const registrationService = "mqtt-broker"

// Meta keys of the registration contract: the proxies route by them.
const (
	MetaShard    = "shard"    // the shard the instance serves, 0-based
	MetaShards   = "shards"   // the fleet's shard count, so a proxy set up for another count can refuse
	MetaPriority = "priority" // lower is preferred among a shard's healthy instances
)

// agentTimeout bounds each call to the local agent outside the initial
// registration (whose context the caller gives): Maintenance runs on the
// SIGTERM path, and a hung agent must not hold the shutdown.
const agentTimeout = 10 * time.Second

// The keeper's backoff while the agent is unreachable or refuses the
// registration. It starts below the resync interval on purpose: an agent
// restart takes a second or two, and until the service is back every proxy
// watching that agent's catalog sees no instance here.
const (
	keeperBackoffMin = 250 * time.Millisecond
	keeperBackoffMax = 15 * time.Second
)

// ErrDeregistered is returned by Maintenance after Deregister.
var ErrDeregistered = errors.New("broker: consul registration ended")

// RegistrationConfig is a broker instance's Consul registration, under the
// contract the proxies read (DESIGN.md, "Contracts between the parts").
type RegistrationConfig struct {
	// Consul is the client configuration of the local agent: address,
	// datacenter, token, TLS. Default consulapi.DefaultConfig(), which
	// reads the CONSUL_HTTP_* environment variables.
	Consul *consulapi.Config
	// Service is the service name. Default "mqtt-broker".
	Service string
	// ServiceID is the service's id on the agent; the instance identity is
	// the agent's node name + "/" + ServiceID. It must be stable across
	// restarts and unique on the node; no "/" or control characters.
	// Default Service-Shard-Port ("mqtt-broker-0-1883"), so an active and a
	// standby instance of one shard can share a node.
	ServiceID string
	// Address is the MQTT address announced to the proxies, by IP (they
	// dial it without DNS). Its port is required. An unspecified or zero
	// IP announces the agent's own address (its gossip address).
	Address netip.AddrPort
	// Shard is the shard served, 0-based, below Shards. Default 0.
	Shard int
	// Shards is the fleet's shard count. Default 1.
	Shards int
	// Priority orders a shard's instances, lower preferred. Default 0.
	Priority int
	// Tags are the service's tags. Default none.
	Tags []string
	// CheckURL is the health check: HTTP GET on the broker's /readyz, say
	// http://127.0.0.1:9884/readyz. Consul reads 2xx as passing, 429 as
	// warning, anything else as critical. A warning instance stays in the
	// proxies' healthy set (a Redis fault must not move every device of the
	// shard): they leave out only instances with a critical check, since
	// the health endpoint's ?passing filter would drop warning too.
	// Required.
	CheckURL string
	// CheckInterval is how often the agent runs the check. Default 2 s
	// (Consul refuses less than 1 s and uses 1 s instead).
	CheckInterval time.Duration
	// CheckTimeout bounds one check. Default 1 s.
	CheckTimeout time.Duration
	// FailuresBeforeCritical is how many failed checks in a row make the
	// instance critical, so one slow answer does not drain a shard; it also
	// applies to warning. Default 3.
	FailuresBeforeCritical int
	// SuccessBeforePassing is how many passing checks in a row bring an
	// instance (back) into service, so a flapping one is not. Default 2.
	SuccessBeforePassing int
	// DeregisterCriticalAfter, when positive, has Consul remove the service
	// after its check has been critical that long (the keeper then
	// registers it again while the broker runs). Default 0: never.
	DeregisterCriticalAfter time.Duration
	// ResyncInterval is how often the keeper asks the agent whether it still
	// has the service, ±20% jitter. Default 3 s.
	ResyncInterval time.Duration
	// Log receives the registration's logs. Default: discard.
	Log *slog.Logger
}

func (c RegistrationConfig) withDefaults() (RegistrationConfig, error) {
	if c.Consul == nil {
		c.Consul = consulapi.DefaultConfig()
	}
	if c.Service == "" {
		c.Service = registrationService
	}
	if c.Shards == 0 {
		c.Shards = 1
	}
	if c.Shards < 0 {
		return c, fmt.Errorf("broker: RegistrationConfig.Shards: %d is negative", c.Shards)
	}
	if c.Shard < 0 || c.Shard >= c.Shards {
		return c, fmt.Errorf("broker: RegistrationConfig.Shard: %d is not in [0, %d)", c.Shard, c.Shards)
	}
	if c.Address.Port() == 0 {
		return c, fmt.Errorf("broker: RegistrationConfig.Address: %q has no port", c.Address)
	}
	if c.ServiceID == "" {
		c.ServiceID = c.Service + "-" + strconv.Itoa(c.Shard) + "-" + strconv.Itoa(int(c.Address.Port()))
	}
	if strings.ContainsFunc(c.ServiceID, func(r rune) bool { return r == '/' || r < 0x20 || r == 0x7f }) {
		// The id is a path segment of the agent's API, and the instance
		// identity joins it to the node name with "/".
		return c, fmt.Errorf("broker: RegistrationConfig.ServiceID: %q holds a / or a control character", c.ServiceID)
	}
	if c.CheckURL == "" {
		return c, errors.New("broker: RegistrationConfig.CheckURL: required (the broker's /readyz)")
	}
	if u, err := url.Parse(c.CheckURL); err != nil || (u.Scheme != "http" && u.Scheme != "https") || u.Host == "" {
		return c, fmt.Errorf("broker: RegistrationConfig.CheckURL: %q is not an http(s) URL", c.CheckURL)
	}
	if c.CheckInterval <= 0 {
		c.CheckInterval = 2 * time.Second
	}
	if c.CheckTimeout <= 0 {
		c.CheckTimeout = time.Second
	}
	if c.FailuresBeforeCritical <= 0 {
		c.FailuresBeforeCritical = 3
	}
	if c.SuccessBeforePassing <= 0 {
		c.SuccessBeforePassing = 2
	}
	if c.DeregisterCriticalAfter < 0 {
		return c, fmt.Errorf("broker: RegistrationConfig.DeregisterCriticalAfter: %v is negative", c.DeregisterCriticalAfter)
	}
	if c.ResyncInterval <= 0 {
		c.ResyncInterval = 3 * time.Second
	}
	if c.Log == nil {
		c.Log = slog.New(slog.DiscardHandler)
	}
	return c, nil
}

// Registration is a broker instance registered with its local Consul agent,
// kept registered until Deregister.
type Registration struct {
	cfg    RegistrationConfig
	client *consulapi.Client
	reg    *consulapi.AgentServiceRegistration
	node   string
	log    *slog.Logger

	// mu serializes the agent calls that change the registration, so a
	// Maintenance call and the keeper's re-registration cannot interleave
	// (a re-registration that raced a Maintenance(true) could otherwise
	// leave the service out of maintenance).
	mu sync.Mutex
	// maint and reason are the maintenance state the broker asked for; the
	// keeper applies them again whenever it registers the service again,
	// because an agent that forgot the service forgot its maintenance too.
	maint  bool
	reason string
	// maintPending is set while the asked-for state has not reached the
	// agent (it was unreachable); the keeper retries it.
	maintPending bool
	ended        bool

	stop     context.CancelFunc
	done     chan struct{}
	deregOne sync.Once
	deregErr error
}

// Register registers the service with the local agent (an agent
// registration, so `consul maint -service=ID` works) and keeps it
// registered: a keeper checks every few seconds that the agent still has
// it and registers it again if not (an agent restarted without its state),
// re-applying maintenance if it was on. ctx bounds the initial
// registration only; the keeper runs until Deregister.
//
// A new registration's check starts critical, so proxies send devices to
// the instance only after its first passing check (Consul counts the first
// result as enough; SuccessBeforePassing applies once it has failed).
func Register(ctx context.Context, cfg RegistrationConfig) (*Registration, error) {
	cfg, err := cfg.withDefaults()
	if err != nil {
		return nil, err
	}
	client, err := consulapi.NewClient(cfg.Consul)
	if err != nil {
		return nil, fmt.Errorf("broker: consul client: %w", err)
	}
	// Agent().Self takes no context; the raw query does, so a hung agent
	// cannot hold the broker's start past ctx.
	var self struct {
		Config struct{ NodeName string }
		Member struct{ Addr string }
	}
	if _, err := client.Raw().Query("/v1/agent/self", &self, (&consulapi.QueryOptions{}).WithContext(ctx)); err != nil {
		return nil, fmt.Errorf("broker: consul agent at %s: %w", cfg.Consul.Address, err)
	}
	node := self.Config.NodeName
	if node == "" {
		return nil, fmt.Errorf("broker: consul agent at %s reports no node name", cfg.Consul.Address)
	}
	addr := cfg.Address.Addr().Unmap()
	if !addr.IsValid() || addr.IsUnspecified() {
		// The broker listens on every address; announce the one the agent
		// gossips on, which is this host's address in the cluster.
		if addr, err = netip.ParseAddr(self.Member.Addr); err != nil {
			return nil, fmt.Errorf("broker: announce address: %s is unspecified and the agent's address %q is not an IP", cfg.Address, self.Member.Addr)
		}
	}

	r := &Registration{
		cfg:    cfg,
		client: client,
		reg:    registration(cfg, addr),
		node:   node,
		log:    cfg.Log.With("consul_service", cfg.ServiceID),
		done:   make(chan struct{}),
	}
	if err := r.register(ctx); err != nil {
		return nil, err
	}
	r.log.Info("registered with consul", "node", node, "service", cfg.Service,
		"address", netip.AddrPortFrom(addr, cfg.Address.Port()).String(), "check", cfg.CheckURL)

	keepCtx, stop := context.WithCancel(context.Background())
	r.stop = stop
	go r.keepRegistered(keepCtx)
	return r, nil
}

// registration is the agent registration of the contract.
func registration(cfg RegistrationConfig, addr netip.Addr) *consulapi.AgentServiceRegistration {
	check := &consulapi.AgentServiceCheck{
		CheckID:                "service:" + cfg.ServiceID,
		Name:                   "MQTT broker readiness",
		HTTP:                   cfg.CheckURL,
		Method:                 http.MethodGet,
		Interval:               cfg.CheckInterval.String(),
		Timeout:                cfg.CheckTimeout.String(),
		FailuresBeforeCritical: cfg.FailuresBeforeCritical,
		// Warning is the broker's own word (a 429 from /readyz: Redis is
		// failing); a failing /readyz goes straight to critical at the
		// threshold, so a warning never means anything else.
		FailuresBeforeWarning: cfg.FailuresBeforeCritical,
		SuccessBeforePassing:  cfg.SuccessBeforePassing,
	}
	if cfg.DeregisterCriticalAfter > 0 {
		check.DeregisterCriticalServiceAfter = cfg.DeregisterCriticalAfter.String()
	}
	return &consulapi.AgentServiceRegistration{
		ID:      cfg.ServiceID,
		Name:    cfg.Service,
		Tags:    append([]string(nil), cfg.Tags...),
		Address: addr.String(),
		Port:    int(cfg.Address.Port()),
		Meta: map[string]string{
			MetaShard:    strconv.Itoa(cfg.Shard),
			MetaShards:   strconv.Itoa(cfg.Shards),
			MetaPriority: strconv.Itoa(cfg.Priority),
		},
		Check: check,
	}
}

// ServiceID returns the service's id on the agent.
func (r *Registration) ServiceID() string { return r.cfg.ServiceID }

// InstanceID returns the instance identity of the contract: the agent's
// node name + "/" + the service id.
func (r *Registration) InstanceID() string { return r.node + "/" + r.cfg.ServiceID }

// register (re-)registers the service, replacing any checks a previous
// registration under the same id left, then applies the maintenance state
// the broker asked for. The caller holds r.mu, or is Register.
func (r *Registration) register(ctx context.Context) error {
	opts := consulapi.ServiceRegisterOpts{ReplaceExistingChecks: true}.WithContext(ctx)
	if err := r.client.Agent().ServiceRegisterOpts(r.reg, opts); err != nil {
		return fmt.Errorf("broker: consul register %s: %w", r.cfg.ServiceID, err)
	}
	// Between the two calls the service is registered but not in
	// maintenance. No proxy routes to it meanwhile: its new check is
	// critical until it first runs, which the agent staggers over the
	// check interval.
	if r.maint {
		r.maintPending = true
		if err := r.applyMaintenance(ctx); err != nil {
			return err
		}
		r.maintPending = false
	}
	return nil
}

// applyMaintenance sends the asked-for maintenance state to the agent. The
// caller holds r.mu.
func (r *Registration) applyMaintenance(ctx context.Context) error {
	q := (&consulapi.QueryOptions{}).WithContext(ctx)
	var err error
	if r.maint {
		err = r.client.Agent().EnableServiceMaintenanceOpts(r.cfg.ServiceID, r.reason, q)
	} else {
		err = r.client.Agent().DisableServiceMaintenanceOpts(r.cfg.ServiceID, q)
	}
	if err != nil {
		return fmt.Errorf("broker: consul maintenance %t for %s: %w", r.maint, r.cfg.ServiceID, err)
	}
	return nil
}

// Maintenance puts the service into maintenance (on) or takes it out. In
// maintenance the health endpoint leaves the instance out of passing
// results, so every proxy drains it; the broker itself keeps serving. The
// state is remembered: the keeper applies it again if the agent forgets
// the service, and retries it if the agent could not be reached (the
// error is returned all the same).
func (r *Registration) Maintenance(on bool, reason string) error {
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.ended {
		return ErrDeregistered
	}
	r.maint, r.reason = on, reason
	ctx, cancel := context.WithTimeout(context.Background(), agentTimeout)
	defer cancel()
	if err := r.applyMaintenance(ctx); err != nil {
		r.maintPending = true
		return err
	}
	r.maintPending = false
	r.log.Info("consul maintenance", "on", on, "reason", reason)
	return nil
}

// Deregister stops the keeper and removes the service from the agent.
// Later calls return the first call's result.
func (r *Registration) Deregister() error {
	r.deregOne.Do(func() {
		r.stop()
		<-r.done
		r.mu.Lock()
		r.ended = true
		r.mu.Unlock()
		ctx, cancel := context.WithTimeout(context.Background(), agentTimeout)
		defer cancel()
		q := (&consulapi.QueryOptions{}).WithContext(ctx)
		if err := r.client.Agent().ServiceDeregisterOpts(r.cfg.ServiceID, q); err != nil {
			r.deregErr = fmt.Errorf("broker: consul deregister %s: %w", r.cfg.ServiceID, err)
			return
		}
		r.log.Info("deregistered from consul")
	})
	return r.deregErr
}

// keepRegistered is the keeper: every ResyncInterval (jittered, so a host's
// brokers do not ask in step) it asks the agent for the service, registers
// it again if the agent no longer has it, and retries a maintenance state
// the agent missed. Errors back off exponentially with jitter, capped, and
// are logged once per outage.
func (r *Registration) keepRegistered(ctx context.Context) {
	defer close(r.done)
	var failures int
	for {
		t := time.NewTimer(jitter(keeperWait(r.cfg.ResyncInterval, failures)))
		select {
		case <-ctx.Done():
			t.Stop()
			return
		case <-t.C:
		}

		err := r.resync(ctx)
		if ctx.Err() != nil {
			return
		}
		switch {
		case err != nil && failures == 0:
			r.log.Warn("consul registration: agent unreachable or refusing; retrying", "error", err)
			failures++
		case err != nil:
			r.log.Debug("consul registration: still failing", "error", err, "attempt", failures+1)
			failures++
		case failures > 0:
			r.log.Info("consul registration: agent reachable again", "failed_attempts", failures)
			failures = 0
		}
	}
}

// keeperWait is the keeper's pause before its next look: the resync
// interval while all is well, else an exponential backoff from
// keeperBackoffMin, capped at keeperBackoffMax, after failures failed looks
// in a row. Never zero: a failing agent is never asked in a hot loop.
func keeperWait(interval time.Duration, failures int) time.Duration {
	if failures <= 0 {
		return interval
	}
	return min(keeperBackoffMax, keeperBackoffMin<<min(failures-1, 16))
}

// resync is one look of the keeper.
func (r *Registration) resync(ctx context.Context) error {
	ctx, cancel := context.WithTimeout(ctx, agentTimeout)
	defer cancel()
	q := (&consulapi.QueryOptions{}).WithContext(ctx)
	_, _, err := r.client.Agent().Service(r.cfg.ServiceID, q)
	var se consulapi.StatusError
	missing := errors.As(err, &se) && se.Code == http.StatusNotFound
	if err != nil && !missing {
		return fmt.Errorf("broker: consul service %s: %w", r.cfg.ServiceID, err)
	}

	r.mu.Lock()
	defer r.mu.Unlock()
	if missing {
		r.log.Warn("consul agent forgot the service; registering it again", "maintenance", r.maint)
		return r.register(ctx)
	}
	if r.maintPending {
		if err := r.applyMaintenance(ctx); err != nil {
			return err
		}
		r.maintPending = false
		r.log.Info("consul maintenance applied after a retry", "on", r.maint, "reason", r.reason)
	}
	return nil
}

// jitter spreads d over [0.8d, 1.2d).
func jitter(d time.Duration) time.Duration {
	return d*4/5 + rand.N(d*2/5+1)
}
