package proxy

import (
	"errors"
	"fmt"
	"math"
	"net/netip"
	"os"
	"runtime"
	"strconv"
	"strings"
	"time"

	"github.com/shardgate/shardgate/backend"
	"github.com/shardgate/shardgate/health"
	"github.com/shardgate/shardgate/internal/yamlconf"
)

// Config is the proxy's YAML configuration. The zero value of every field
// means "use the default"; Defaults fills them in and Validate checks them, so
// the rest of the proxy reads plain values. Every field and its default is
// documented in the README ("Configuration").
type Config struct {
	// Listen lists the device-facing addresses (IPv4 or IPv6 IP:port).
	// Default: ["0.0.0.0:1883"].
	Listen []string `yaml:"listen"`
	// Admin is the admin HTTP address (metrics, health, API). Default
	// "127.0.0.1:9883". "off" disables it.
	Admin string `yaml:"admin"`
	// EventLoops is the number of relay event loops (one listener socket per
	// loop per address, SO_REUSEPORT). Default: the number of CPUs.
	EventLoops int `yaml:"event_loops"`
	// Threads is how many threads run the process's Go code at once
	// (GOMAXPROCS): "auto" (the default) runs the loops on one thread while
	// it keeps up and on every CPU when it does not (internal/procs); a
	// number fixes it. The GOMAXPROCS environment variable, when set, wins.
	Threads string `yaml:"threads"`
	// Shards is the logical shard count of the routing contract. It must
	// match the brokers' `shards` meta. Required when any backend has a shard.
	Shards int `yaml:"shards"`
	// NoInstance decides what happens to a device whose shard has no healthy
	// instance: "spill" (default: rendezvous hash over all healthy instances)
	// or "reject" (CONNACK server unavailable).
	NoInstance string `yaml:"no_instance"`
	// EmptyClientID decides how a CONNECT with a zero-length client ID is
	// routed: "source" (default: by a hash of the source address) or
	// "reject" (CONNACK identifier rejected).
	EmptyClientID string `yaml:"empty_client_id"`

	Backends BackendsConfig `yaml:"backends"`
	// Health configures the active checks of static backends: type
	// (tcp, mqtt, none; default tcp), interval (2s), timeout (1s), rise
	// (2), fall (3). Defaults and validation are backend.HealthConfig's.
	Health        backend.HealthConfig `yaml:"health"`
	Connect       ConnectConfig        `yaml:"connect"`
	Admission     AdmissionSettings    `yaml:"admission"`
	Dial          DialSettings         `yaml:"dial"`
	Keepalive     KeepaliveConfig      `yaml:"keepalive"`
	ProxyProtocol ProxyProtocolConfig  `yaml:"proxy_protocol"`
	Shutdown      ShutdownConfig       `yaml:"shutdown"`
	Reuseport     ReuseportConfig      `yaml:"reuseport"`
	VIP           VIPConfig            `yaml:"vip"`
	Drain         DrainConfig          `yaml:"drain"`
	Upgrade       UpgradeConfig        `yaml:"upgrade"`
	Register      RegisterConfig       `yaml:"register"`
	Log           LogConfig            `yaml:"log"`
}

// BackendsConfig names where the broker instances come from.
type BackendsConfig struct {
	// Static lists broker instances: id (unique), address (IP:port, never
	// a host name: no DNS on the hot path), shard (0-based; omitted: no
	// shard) and priority (lower preferred, default 0).
	Static []backend.StaticInstance `yaml:"static"`
	// Consul, when its address or service is set, replaces static: the
	// instances are the healthy (passing or warning) ones of a Consul
	// service. Exactly one of static and consul is used.
	Consul *ConsulBackends `yaml:"consul"`
}

// ConsulBackends is `backends.consul`: where the proxy watches the brokers.
type ConsulBackends struct {
	// Address of the Consul HTTP API. Default "127.0.0.1:8500".
	Address string `yaml:"address"`
	// Scheme is http (default) or https.
	Scheme string `yaml:"scheme"`
	// Datacenter to query. Default: the agent's.
	Datacenter string `yaml:"datacenter"`
	// Service is the broker service name. Default "mqtt-broker".
	Service string `yaml:"service"`
	// Tag keeps only instances carrying it. Default: all.
	Tag string `yaml:"tag"`
	// Token is the ACL token (needs service:read and node:read). Default
	// none.
	Token string `yaml:"token"`
	// TLS: ca_file, cert_file, key_file, insecure_skip_verify.
	TLS health.TLSConfig `yaml:"tls"`
	// PanicThreshold: when the healthy fraction of the service's instances
	// falls below it, every known instance takes devices. Default 0: off.
	PanicThreshold float64 `yaml:"panic_threshold"`
	// WaitTime is the blocking query's wait. Default 60s.
	WaitTime Duration `yaml:"wait_time"`
}

// DeferAccept is connect.defer_accept as a duration (0: off).
func (c *Config) DeferAccept() time.Duration {
	if c.Connect.DeferAccept == nil {
		return DefaultDeferAccept
	}
	return c.Connect.DeferAccept.D()
}

// CloseWait is dial.close_wait as a duration (0: off).
func (c *Config) CloseWait() time.Duration {
	if c.Dial.CloseWait == nil {
		return DefaultCloseWait
	}
	return c.Dial.CloseWait.D()
}

// UsesConsul reports whether the backends come from Consul.
func (c *Config) UsesConsul() bool { return c.Backends.Consul != nil }

// ConsulConfig is the watcher configuration `backends.consul` describes.
func (c *Config) ConsulConfig() health.ConsulConfig {
	pol, _ := backend.ParsePolicy(c.NoInstance)
	b := c.Backends.Consul
	if b == nil {
		b = &ConsulBackends{}
	}
	return health.ConsulConfig{
		Address: b.Address, Scheme: b.Scheme, Datacenter: b.Datacenter, Service: b.Service,
		Tag: b.Tag, Token: b.Token, TLS: b.TLS, Shards: c.Shards, NoInstance: pol,
		PanicThreshold: b.PanicThreshold, WaitTime: b.WaitTime.D(),
	}
}

// StaticConfig is the backend source configuration this config describes.
func (c *Config) StaticConfig() backend.StaticConfig {
	pol, _ := backend.ParsePolicy(c.NoInstance)
	return backend.StaticConfig{Shards: c.Shards, NoInstance: pol, Instances: c.Backends.Static, Health: c.Health}
}

// StaticSnapshot builds a snapshot of the static backends with every
// instance taken as healthy: what `shardgate route --config` computes
// offline, without health checks.
func StaticSnapshot(c *Config) (*backend.Snapshot, error) {
	sc := c.StaticConfig()
	if err := sc.Validate(); err != nil {
		return nil, err
	}
	ins := make([]backend.Instance, 0, len(sc.Instances))
	for _, b := range sc.Instances {
		shard := -1
		if b.Shard != nil {
			shard = *b.Shard
		}
		ins = append(ins, backend.Instance{ID: b.ID, Addr: netip.MustParseAddrPort(b.Address), Shard: shard, Priority: b.Priority, Healthy: true})
	}
	return backend.NewSnapshot(sc.Shards, ins, backend.SnapshotOptions{NoInstance: sc.NoInstance}), nil
}

// ConnectConfig bounds the CONNECT peek.
type ConnectConfig struct {
	// Timeout is the deadline for the whole CONNECT packet, from accept.
	// Default 10s.
	Timeout Duration `yaml:"timeout"`
	// MaxSize caps the CONNECT packet, checked against the remaining length
	// before the body is read. Default 64KiB.
	MaxSize ByteSize `yaml:"max_size"`
	// MaxClientIDLength refuses longer client IDs (CONNACK identifier
	// rejected). Default 65535 (no limit beyond MQTT's own).
	MaxClientIDLength int `yaml:"max_client_id_length"`
	// DeferAccept has the kernel hand a new connection to the proxy only
	// once its CONNECT bytes have arrived (TCP_DEFER_ACCEPT, whole
	// seconds); a client silent that long is handed over anyway and the
	// timeout above applies from then. Default 1s; 0s turns it off.
	DeferAccept *Duration `yaml:"defer_accept"`
}

// AdmissionSettings configures admission control.
type AdmissionSettings struct {
	// Rate is new devices per second per shard (token bucket). Default 0:
	// unlimited. With --workers N the buckets live in memory shared by all
	// workers, so the rate holds for the host, as with one process.
	Rate float64 `yaml:"rate"`
	// Burst is the bucket size. Default max(1, rate).
	Burst int `yaml:"burst"`
	// PerSourceMax caps concurrent connections from one source address.
	// Default 0: unlimited. Counted per process: with --workers N a
	// source can hold up to N × per_source_max connections on the host.
	PerSourceMax int `yaml:"per_source_max"`
	// LogInterval is the least time between two log lines about refused
	// devices of one reason. Default 10s.
	LogInterval Duration `yaml:"log_interval"`
}

// DialSettings configures the connection to the broker.
type DialSettings struct {
	// Timeout for the TCP connect to the broker. Default 5s.
	Timeout Duration `yaml:"timeout"`
	// SourceAddresses is a pool of local IPs the proxy binds outgoing
	// connections to (IP_BIND_ADDRESS_NO_PORT), each bringing its own
	// ephemeral port range. Default: none (the kernel chooses).
	SourceAddresses []string `yaml:"source_addresses"`
	// SmartConnect holds back the last ACK of the handshake with a broker
	// so that it leaves with the replayed CONNECT (TCP_QUICKACK off before
	// connect): one segment fewer per connect. Default true.
	SmartConnect *bool `yaml:"smart_connect"`
	// CloseWait is how long, after a device's DISCONNECT and FIN, the proxy
	// waits for the broker to close first (a broker closes the connection
	// on DISCONNECT) before it passes the FIN on itself. The side that
	// closes first keeps the connection's TIME_WAIT for a minute: this way
	// it is the broker's listening port, not one of the proxy's ephemeral
	// ports towards the broker, which churning devices would otherwise
	// use up (~28k per source address and broker). Default 2s; 0s passes
	// the FIN at once.
	CloseWait *Duration `yaml:"close_wait"`
}

// KeepaliveConfig configures idle enforcement.
type KeepaliveConfig struct {
	// Factor multiplies a device's keepalive: a connection silent (no byte
	// from the device) for longer is closed. Default 1.5 [MQTT-3.1.2-24].
	// The keepalive is the CONNECT's, or for MQTT 5 the broker's Server
	// Keep Alive when its CONNACK carries one [MQTT-3.2.2-21]; a CONNACK
	// the proxy cannot read leaves the longest keepalive MQTT allows, so a
	// device is never cut early (the broker still enforces its own).
	Factor float64 `yaml:"factor"`
	// MaxIdle closes connections whose CONNECT keepalive is 0 (disabled)
	// after this much silence from the device. Default 0: never.
	MaxIdle Duration `yaml:"max_idle"`
}

// ProxyProtocolConfig configures the PROXY protocol header sent to brokers.
type ProxyProtocolConfig struct {
	// Send is "" (default: none) or "v2".
	Send string `yaml:"send"`
}

// ShutdownConfig configures SIGTERM.
type ShutdownConfig struct {
	// Grace is how long the proxy lets devices finish after it stopped
	// accepting, before it closes the rest. Default 30s.
	Grace Duration `yaml:"grace"`
}

// ReuseportConfig configures the eBPF steering of new connections between
// proxy generations (package ebpf).
type ReuseportConfig struct {
	// PinDir is the bpffs directory under which each listen address pins
	// its program and maps; the next proxy generation (shardgate proxy
	// --upgrade, SIGUSR2) finds them there. Default /sys/fs/bpf/shardgate.
	// "off": plain SO_REUSEPORT (the kernel's hash), no handover.
	PinDir string `yaml:"pin_dir"`
}

// VIPConfig configures the optional SK_LOOKUP dispatch (package ebpf,
// AttachVIP): TCP connections to any address in Prefixes on any port in
// Ports reach the proxy without a socket bound to each address. The
// addresses must be local to the host (assigned, or an AnyIP route such as
// `ip route add local 10.99.0.0/28 dev lo`).
type VIPConfig struct {
	// Prefixes are the VIP addresses, IPv4 or IPv6 CIDR prefixes
	// ("10.99.0.0/28", "192.0.2.7/32"). Empty: no VIP.
	Prefixes []string `yaml:"prefixes"`
	// Ports are ports ("1883") or inclusive ranges ("8000-8010").
	Ports []string `yaml:"ports"`
	// Listen is where the VIP's own listeners are bound (one per event
	// loop, SO_REUSEPORT among themselves, outside the reuseport steering:
	// a socket cannot be in its map and the VIP's SOCKMAP at once). Default
	// 127.0.0.1:0. A fixed port lets the queued VIP connections of a closing
	// generation migrate to the next one's listeners.
	Listen string `yaml:"listen"`
}

// Enabled says whether a VIP is configured.
func (v VIPConfig) Enabled() bool { return len(v.Prefixes) > 0 }

// Parsed returns the VIP's prefixes, port ranges and listen address.
func (v VIPConfig) Parsed() ([]netip.Prefix, [][2]uint16, netip.AddrPort, error) {
	var errs []error
	var prefixes []netip.Prefix
	for i, s := range v.Prefixes {
		p, err := netip.ParsePrefix(s)
		if err != nil {
			errs = append(errs, fmt.Errorf("vip.prefixes[%d]: %q is not a CIDR prefix", i, s))
			continue
		}
		prefixes = append(prefixes, p)
	}
	var ports [][2]uint16
	for i, s := range v.Ports {
		first, last, isRange := strings.Cut(s, "-")
		if !isRange {
			last = first
		}
		a, err1 := strconv.ParseUint(strings.TrimSpace(first), 10, 16)
		b, err2 := strconv.ParseUint(strings.TrimSpace(last), 10, 16)
		if err1 != nil || err2 != nil || a == 0 || b < a {
			errs = append(errs, fmt.Errorf("vip.ports[%d]: %q is not a port or a range first-last (1..65535)", i, s))
			continue
		}
		ports = append(ports, [2]uint16{uint16(a), uint16(b)})
	}
	if len(v.Prefixes) > 0 && len(v.Ports) == 0 {
		errs = append(errs, errors.New("vip.ports: empty, with vip.prefixes set"))
	}
	listen := v.Listen
	if listen == "" {
		listen = "127.0.0.1:0"
	}
	addr, err := netip.ParseAddrPort(listen)
	if err != nil {
		errs = append(errs, fmt.Errorf("vip.listen: %q is not IP:port", v.Listen))
	}
	return prefixes, ports, addr, errors.Join(errs...)
}

// DrainConfig configures the drain of live connections off an instance
// that left the healthy set (DESIGN.md, "Health and draining").
type DrainConfig struct {
	// Rate is the fraction of the instance's connections at the start of
	// the drain moved per second. Default 0.05 (5%/s: a drain takes ~20 s).
	Rate float64 `yaml:"rate"`
	// MinRate is the least connections moved per second. Default 1.
	MinRate float64 `yaml:"min_rate"`
	// DisconnectBroker sends the broker a normal DISCONNECT (E0 00) on the
	// device's behalf, at a packet boundary, so the broker does not fire
	// the will of a device that is only moving. Default true.
	DisconnectBroker *bool `yaml:"disconnect_broker"`
	// DisconnectDeviceV5 sends MQTT 5 devices DISCONNECT 0x9C (use another
	// server) at a packet boundary before the close. Default true.
	DisconnectDeviceV5 *bool `yaml:"disconnect_device_v5"`
}

// UpgradeConfig configures what a generation that handed over (shardgate
// proxy --upgrade, SIGUSR2) does with its connected devices.
type UpgradeConfig struct {
	// HandoffDelay is how long after it stopped accepting the old
	// generation starts moving all its remaining devices to the next one,
	// at the drain pace (drain.rate, drain.min_rate, with the drain's
	// DISCONNECTs, so no will fires); it exits when none remain. It must be
	// below shutdown.grace, which still closes whatever is left. Default 0:
	// no handoff, devices stay until they end or shutdown.grace.
	HandoffDelay Duration `yaml:"handoff_delay"`
}

// RegisterConfig is `register`: the proxy registering itself in Consul,
// with an HTTP check on its own /readyz, deregistered on shutdown.
type RegisterConfig struct {
	// Enabled turns registration on. Default false.
	Enabled bool `yaml:"enabled"`
	// ConsulAddress is the local agent's HTTP API. Default
	// backends.consul.address, else "127.0.0.1:8500". Scheme, token and
	// TLS are backends.consul's.
	ConsulAddress string `yaml:"consul_address"`
	// Service is the service name. Default "shardgate-proxy".
	Service string `yaml:"service"`
	// ID is the service ID on the agent. Default service + "-" + the port of
	// the first listen address.
	ID string `yaml:"id"`
	// Address is the device-facing IP:port announced. Default the first
	// listen address (an unspecified IP announces the agent's address).
	Address string `yaml:"address"`
	// CheckInterval is how often the agent checks /readyz. Default 5s.
	CheckInterval Duration `yaml:"check_interval"`
}

// DefaultRegisterService is the service name of a registered proxy.
const DefaultRegisterService = "shardgate-proxy"

// LogConfig configures logging.
type LogConfig struct {
	// Level is debug, info (default), warn or error.
	Level string `yaml:"level"`
	// Format is "text" (default) or "json".
	Format string `yaml:"format"`
}

// Defaults, in one place.
const (
	DefaultListen            = "0.0.0.0:1883"
	DefaultAdmin             = "127.0.0.1:9883"
	DefaultConnectTimeout    = 10 * time.Second
	DefaultDeferAccept       = time.Second
	DefaultConnectMaxSize    = 64 << 10
	DefaultMaxClientIDLength = 65535
	DefaultDialTimeout       = 5 * time.Second
	DefaultCloseWait         = 2 * time.Second
	DefaultKeepaliveFactor   = 1.5
	DefaultShutdownGrace     = 30 * time.Second
	DefaultReuseportPinDir   = "/sys/fs/bpf/shardgate"
	DefaultAdmissionLog      = 10 * time.Second
	DefaultDrainRate         = 0.05
	DefaultDrainMinRate      = 1.0
)

// LoadConfig reads, defaults and validates a YAML file. Unknown fields are
// errors, so a misspelt option fails at start instead of being ignored.
func LoadConfig(path string) (*Config, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return nil, err
	}
	return ParseConfig(b)
}

// ParseConfig decodes, defaults and validates YAML bytes.
func ParseConfig(b []byte) (*Config, error) {
	var c Config
	if err := yamlconf.Decode(b, &c); err != nil {
		return nil, fmt.Errorf("config: %w", err)
	}
	c.SetDefaults()
	if err := c.Validate(); err != nil {
		return nil, err
	}
	return &c, nil
}

// SetDefaults replaces zero values by their defaults.
func (c *Config) SetDefaults() {
	if len(c.Listen) == 0 {
		c.Listen = []string{DefaultListen}
	}
	if c.Admin == "" {
		c.Admin = DefaultAdmin
	}
	if c.EventLoops == 0 {
		c.EventLoops = runtime.NumCPU()
	}
	if c.Threads == "" {
		c.Threads = "auto"
	}
	if c.NoInstance == "" {
		c.NoInstance = "spill"
	}
	if c.EmptyClientID == "" {
		c.EmptyClientID = "source"
	}
	if c.Connect.Timeout == 0 {
		c.Connect.Timeout = Duration(DefaultConnectTimeout)
	}
	if c.Connect.MaxSize == 0 {
		c.Connect.MaxSize = DefaultConnectMaxSize
	}
	if c.Connect.MaxClientIDLength == 0 {
		c.Connect.MaxClientIDLength = DefaultMaxClientIDLength
	}
	if c.Connect.DeferAccept == nil {
		d := Duration(DefaultDeferAccept)
		c.Connect.DeferAccept = &d
	}
	if c.Dial.CloseWait == nil {
		d := Duration(DefaultCloseWait)
		c.Dial.CloseWait = &d
	}
	if c.Admission.Burst == 0 && c.Admission.Rate > 0 {
		c.Admission.Burst = max(1, int(c.Admission.Rate))
	}
	if c.Admission.LogInterval == 0 {
		c.Admission.LogInterval = Duration(DefaultAdmissionLog)
	}
	if c.Dial.Timeout == 0 {
		c.Dial.Timeout = Duration(DefaultDialTimeout)
	}
	if c.Keepalive.Factor == 0 {
		c.Keepalive.Factor = DefaultKeepaliveFactor
	}
	if c.Shutdown.Grace == 0 {
		c.Shutdown.Grace = Duration(DefaultShutdownGrace)
	}
	if c.Reuseport.PinDir == "" {
		c.Reuseport.PinDir = DefaultReuseportPinDir
	}
	if c.Drain.Rate == 0 {
		c.Drain.Rate = DefaultDrainRate
	}
	if c.Drain.MinRate == 0 {
		c.Drain.MinRate = DefaultDrainMinRate
	}
	if c.Drain.DisconnectBroker == nil {
		c.Drain.DisconnectBroker = ptrTrue()
	}
	if c.Drain.DisconnectDeviceV5 == nil {
		c.Drain.DisconnectDeviceV5 = ptrTrue()
	}
	if c.Backends.Consul != nil {
		if c.Backends.Consul.Address == "" {
			c.Backends.Consul.Address = "127.0.0.1:8500"
		}
		if c.Backends.Consul.Service == "" {
			c.Backends.Consul.Service = health.DefaultService
		}
		if c.Backends.Consul.WaitTime == 0 {
			c.Backends.Consul.WaitTime = Duration(health.DefaultWaitTime)
		}
	}
	if c.Register.Enabled {
		if c.Register.ConsulAddress == "" {
			c.Register.ConsulAddress = "127.0.0.1:8500"
			if c.Backends.Consul != nil {
				c.Register.ConsulAddress = c.Backends.Consul.Address
			}
		}
		if c.Register.Service == "" {
			c.Register.Service = DefaultRegisterService
		}
		if c.Register.Address == "" && len(c.Listen) > 0 {
			c.Register.Address = c.Listen[0]
		}
		if c.Register.ID == "" {
			if ap, err := netip.ParseAddrPort(c.Register.Address); err == nil {
				c.Register.ID = c.Register.Service + "-" + strconv.Itoa(int(ap.Port()))
			}
		}
		if c.Register.CheckInterval == 0 {
			c.Register.CheckInterval = Duration(5 * time.Second)
		}
	}
	if c.Log.Level == "" {
		c.Log.Level = "info"
	}
	if c.Log.Format == "" {
		c.Log.Format = "text"
	}
}

// Validate checks a defaulted config; errors name the field.
func (c *Config) Validate() error {
	var errs []error
	bad := func(field, format string, args ...any) {
		errs = append(errs, fmt.Errorf("%s: %s", field, fmt.Sprintf(format, args...)))
	}
	for i, l := range c.Listen {
		if _, err := netip.ParseAddrPort(l); err != nil {
			bad(fmt.Sprintf("listen[%d]", i), "%q is not IP:port", l)
		}
	}
	if c.Reuseport.PinDir != "off" && !strings.HasPrefix(c.Reuseport.PinDir, "/") {
		bad("reuseport.pin_dir", "%q is not an absolute path (or \"off\")", c.Reuseport.PinDir)
	}
	if c.VIP.Enabled() || len(c.VIP.Ports) > 0 || c.VIP.Listen != "" {
		if !c.VIP.Enabled() {
			bad("vip.prefixes", "empty, with vip.ports or vip.listen set")
		}
		if _, _, _, err := c.VIP.Parsed(); err != nil {
			errs = append(errs, err)
		}
	}
	if c.Admin != "off" {
		if _, err := netip.ParseAddrPort(c.Admin); err != nil {
			bad("admin", "%q is not IP:port (or \"off\")", c.Admin)
		}
	}
	if c.EventLoops < 0 || c.EventLoops > 1024 {
		bad("event_loops", "%d is out of range 1..1024", c.EventLoops)
	}
	if c.Threads != "" && c.Threads != "auto" {
		if n, err := strconv.Atoi(c.Threads); err != nil || n < 1 || n > 1024 {
			bad("threads", "%q is neither \"auto\" nor a number 1..1024", c.Threads)
		}
	}
	if c.Shards < 0 {
		bad("shards", "%d is negative", c.Shards)
	}
	if c.NoInstance != "spill" && c.NoInstance != "reject" {
		bad("no_instance", "%q is neither spill nor reject", c.NoInstance)
	}
	if c.EmptyClientID != "source" && c.EmptyClientID != "reject" {
		bad("empty_client_id", "%q is neither source nor reject", c.EmptyClientID)
	}
	if c.UsesConsul() {
		if len(c.Backends.Static) > 0 {
			bad("backends", "static and consul are exclusive: use one")
		}
		if err := c.ConsulConfig().Validate(); err != nil {
			errs = append(errs, fmt.Errorf("backends.consul.%w", err))
		}
	} else if err := c.StaticConfig().Validate(); err != nil {
		errs = append(errs, err)
	}
	if c.Register.Enabled {
		if c.Admin == "off" {
			bad("register.enabled", "needs the admin server (its /readyz is the check); admin is off")
		}
		if _, err := netip.ParseAddrPort(c.Register.Address); err != nil {
			bad("register.address", "%q is not IP:port", c.Register.Address)
		}
		if c.Register.ID == "" || strings.ContainsFunc(c.Register.ID, func(r rune) bool { return r == '/' || r < 0x20 || r == 0x7f }) {
			bad("register.id", "%q is empty or holds a / or a control character", c.Register.ID)
		}
		if c.Register.CheckInterval.D() < time.Second {
			bad("register.check_interval", "%s is below 1s (Consul's minimum)", c.Register.CheckInterval.D())
		}
	}
	if c.Connect.MaxSize < 16 || c.Connect.MaxSize > 256<<20 {
		bad("connect.max_size", "%d is outside 16 B..256 MiB", c.Connect.MaxSize)
	}
	if c.Connect.MaxClientIDLength < 1 || c.Connect.MaxClientIDLength > 65535 {
		bad("connect.max_client_id_length", "%d is outside 1..65535", c.Connect.MaxClientIDLength)
	}
	if d := c.DeferAccept(); d < 0 || d > time.Hour {
		bad("connect.defer_accept", "%v is outside 0s..1h", d)
	}
	if d := c.CloseWait(); d < 0 || d > time.Minute {
		bad("dial.close_wait", "%v is outside 0s..1m", d)
	}
	if r := c.Admission.Rate; math.IsNaN(r) || math.IsInf(r, 0) || r < 0 {
		bad("admission.rate", "%v is not a finite number >= 0", r)
	}
	if c.Admission.Burst < 0 {
		bad("admission.burst", "%d is negative", c.Admission.Burst)
	}
	if m := c.Admission.PerSourceMax; m < 0 || m > math.MaxInt32 {
		bad("admission.per_source_max", "%d is outside 0..%d", m, math.MaxInt32)
	}
	for i, s := range c.Dial.SourceAddresses {
		if _, err := netip.ParseAddr(s); err != nil {
			bad(fmt.Sprintf("dial.source_addresses[%d]", i), "%q is not an IP", s)
		}
	}
	for _, d := range []struct {
		field string
		v     Duration
	}{
		{"connect.timeout", c.Connect.Timeout},
		{"admission.log_interval", c.Admission.LogInterval},
		{"dial.timeout", c.Dial.Timeout},
		{"keepalive.max_idle", c.Keepalive.MaxIdle},
		{"shutdown.grace", c.Shutdown.Grace},
		{"upgrade.handoff_delay", c.Upgrade.HandoffDelay},
	} {
		if d.v < 0 {
			bad(d.field, "%s is negative", d.v.D())
		}
	}
	if c.Upgrade.HandoffDelay > 0 && c.Upgrade.HandoffDelay >= c.Shutdown.Grace {
		bad("upgrade.handoff_delay", "%s is not below shutdown.grace (%s): the handoff would never start", c.Upgrade.HandoffDelay.D(), c.Shutdown.Grace.D())
	}
	if c.Keepalive.Factor < 1 {
		bad("keepalive.factor", "%g is below 1", c.Keepalive.Factor)
	}
	if c.ProxyProtocol.Send != "" && c.ProxyProtocol.Send != "v2" {
		bad("proxy_protocol.send", "%q is not v2", c.ProxyProtocol.Send)
	}
	if r := c.Drain.Rate; math.IsNaN(r) || r <= 0 || r > 1 {
		bad("drain.rate", "%v is outside (0, 1] (a fraction per second)", r)
	}
	if r := c.Drain.MinRate; math.IsNaN(r) || math.IsInf(r, 0) || r <= 0 {
		bad("drain.min_rate", "%v is not a finite number > 0", r)
	}
	switch c.Log.Level {
	case "debug", "info", "warn", "error":
	default:
		bad("log.level", "%q is not debug, info, warn or error", c.Log.Level)
	}
	if c.Log.Format != "text" && c.Log.Format != "json" {
		bad("log.format", "%q is neither text nor json", c.Log.Format)
	}
	if err := errors.Join(errs...); err != nil {
		return fmt.Errorf("config: %w", err)
	}
	return nil
}

func ptrTrue() *bool { t := true; return &t }

// AdmissionConfig is the admission settings this config describes.
func (c *Config) AdmissionConfig() AdmissionConfig {
	return AdmissionConfig{Rate: c.Admission.Rate, Burst: c.Admission.Burst, PerSourceMax: c.Admission.PerSourceMax}
}

// ListenAddrs returns the parsed listen addresses (valid after Validate).
func (c *Config) ListenAddrs() []netip.AddrPort {
	out := make([]netip.AddrPort, 0, len(c.Listen))
	for _, l := range c.Listen {
		out = append(out, netip.MustParseAddrPort(l))
	}
	return out
}

// SourceAddrs returns the parsed dial source pool (valid after Validate).
func (c *Config) SourceAddrs() []netip.Addr {
	out := make([]netip.Addr, 0, len(c.Dial.SourceAddresses))
	for _, s := range c.Dial.SourceAddresses {
		out = append(out, netip.MustParseAddr(s))
	}
	return out
}

// Duration is a time.Duration written as "10s", "1m30s" in YAML.
type Duration = yamlconf.Duration

// ByteSize is a size written as 65536, "64KiB" or "1MiB" in YAML.
type ByteSize = yamlconf.ByteSize
