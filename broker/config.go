package broker

import (
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"strconv"
	"strings"
	"time"

	consulapi "github.com/hashicorp/consul/api"
	"github.com/redis/go-redis/v9"

	"github.com/shardgate/shardgate/internal/yamlconf"
)

// FileConfig is the YAML configuration of `shardgate broker`: one instance
// of one shard. The zero value of every field means "use the default";
// SetDefaults fills them in and Validate checks them, with errors that name
// the field. Unknown fields are refused. docs/broker.md ("Configuration")
// documents every field and its default.
type FileConfig struct {
	// InstanceID names the instance fleet-wide; unique and stable across
	// restarts. Default: the host name + "-" + shard.
	InstanceID string `yaml:"instance_id"`
	// Listen is the MQTT listen address. Default ":1883".
	Listen string `yaml:"listen"`
	// Admin is the admin HTTP address (/metrics, /healthz, /readyz).
	// Default "127.0.0.1:9884"; "off" disables it (not with consul).
	Admin string `yaml:"admin"`
	// Shard is the shard this instance serves, 0-based. Default 0.
	Shard int `yaml:"shard"`
	// Shards is the fleet's shard count (the proxies' `shards`). Default 1.
	Shards int `yaml:"shards"`
	// Priority orders a shard's instances: lower is preferred (the active
	// one), higher ones are standbys. Default 0.
	Priority int `yaml:"priority"`

	Redis         RedisFileConfig     `yaml:"redis"`
	Consul        ConsulFileConfig    `yaml:"consul"`
	Auth          AuthFileConfig      `yaml:"auth"`
	ProxyProtocol ProxyProtocolConfig `yaml:"proxy_protocol"`
	Shutdown      ShutdownConfig      `yaml:"shutdown"`
	Log           LogConfig           `yaml:"log"`
}

// RedisFileConfig is the fleet's Redis.
type RedisFileConfig struct {
	// Address is host:port of a single Redis. Default "127.0.0.1:6379".
	Address string `yaml:"address"`
	// ClusterAddresses, when set, are seed nodes of a Redis Cluster
	// (host:port each); Address must then be empty and DB 0.
	ClusterAddresses []string `yaml:"cluster_addresses"`
	// Username and Password authenticate (Redis 6 ACL); default none.
	Username string `yaml:"username"`
	Password string `yaml:"password"`
	// DB is the database number (single Redis only). Default 0.
	DB  int       `yaml:"db"`
	TLS TLSConfig `yaml:"tls"`
	// Timeout bounds every Redis call, and the dial. Default 1s.
	Timeout Duration `yaml:"timeout"`
	// KeyPrefix starts every key and channel; the same on every instance
	// of a fleet. Default "sg".
	KeyPrefix string `yaml:"key_prefix"`
	// Heartbeat is how often the instance renews its liveness and checks
	// Redis; 3 missed heartbeats make an instance dead to the others.
	// Default 2s.
	Heartbeat Duration `yaml:"heartbeat"`
}

// ConsulFileConfig is the registration in the local Consul agent.
type ConsulFileConfig struct {
	// Enabled registers the instance. Default false.
	Enabled bool `yaml:"enabled"`
	// Address of the agent's HTTP API, host:port. Default "127.0.0.1:8500".
	Address string `yaml:"address"`
	// Scheme is "http" (default) or "https".
	Scheme     string `yaml:"scheme"`
	Datacenter string `yaml:"datacenter"`
	// Token is the ACL token; default none.
	Token string    `yaml:"token"`
	TLS   TLSConfig `yaml:"tls"`
	// Service is the service name the proxies watch. Default "mqtt-broker".
	Service string `yaml:"service"`
	// ServiceID is the service ID on the agent. Default: instance_id.
	ServiceID string `yaml:"service_id"`
	// AnnounceAddress is the MQTT address (IP:port) registered for the
	// proxies to dial. Default: the listen address, with the host's first
	// non-loopback IP when the listen IP is unspecified.
	AnnounceAddress string   `yaml:"announce_address"`
	Tags            []string `yaml:"tags"`
	// CheckInterval and CheckTimeout of the HTTP check on /readyz.
	// Defaults 2s and 1s.
	CheckInterval Duration `yaml:"check_interval"`
	CheckTimeout  Duration `yaml:"check_timeout"`
	// FailuresBeforeCritical and SuccessBeforePassing are the check's
	// hysteresis, the same for every proxy. Defaults 3 and 2.
	FailuresBeforeCritical int `yaml:"failures_before_critical"`
	SuccessBeforePassing   int `yaml:"success_before_passing"`
	// DeregisterCriticalAfter removes a service critical for this long.
	// Default 0: never.
	DeregisterCriticalAfter Duration `yaml:"deregister_critical_after"`
}

// AuthFileConfig configures authentication and topic ACLs (AuthConfig).
type AuthFileConfig struct {
	// CredentialsFile holds "username:bcrypt-hash" lines. Default none.
	CredentialsFile string `yaml:"credentials_file"`
	// ACLFile holds topic ACL rules (docs/broker.md). Default none: every
	// topic allowed to whoever may connect.
	ACLFile string `yaml:"acl_file"`
	// AllowAnonymous lets clients connect without a username. Default
	// false.
	AllowAnonymous bool `yaml:"allow_anonymous"`
}

// ProxyProtocolConfig configures PROXY protocol headers (v1 and v2) on the
// MQTT listener.
type ProxyProtocolConfig struct {
	// Trusted lists the CIDRs (or IPs) whose connections may carry a PROXY
	// header, normally the proxies. A header from anyone else is refused.
	// Default none: PROXY protocol off.
	Trusted []string `yaml:"trusted"`
}

// ShutdownConfig configures SIGTERM.
type ShutdownConfig struct {
	// Grace is how long the instance, once in maintenance and no longer
	// accepting, waits for the proxies to move its devices before it
	// disconnects the rest. It should be at least the proxies' detection
	// time plus their drain time (20s at the default pace of 5% per
	// second). Default 30s.
	Grace Duration `yaml:"grace"`
}

// LogConfig configures logging.
type LogConfig struct {
	// Level is debug, info (default), warn or error.
	Level string `yaml:"level"`
	// Format is "text" (default) or "json".
	Format string `yaml:"format"`
}

// TLSConfig is a TLS client configuration.
type TLSConfig struct {
	// Enabled turns TLS on. Default false.
	Enabled bool `yaml:"enabled"`
	// CAFile verifies the server; default: the system roots.
	CAFile string `yaml:"ca_file"`
	// CertFile and KeyFile are a client certificate; default none.
	CertFile string `yaml:"cert_file"`
	KeyFile  string `yaml:"key_file"`
	// ServerName overrides the name verified; default: the host dialled.
	ServerName         string `yaml:"server_name"`
	InsecureSkipVerify bool   `yaml:"insecure_skip_verify"`
}

// Defaults of FileConfig, in one place.
const (
	DefaultAdmin                  = "127.0.0.1:9884"
	DefaultRedisAddress           = "127.0.0.1:6379"
	DefaultConsulAddress          = "127.0.0.1:8500"
	DefaultCheckInterval          = 2 * time.Second
	DefaultCheckTimeout           = time.Second
	DefaultFailuresBeforeCritical = 3
	DefaultSuccessBeforePassing   = 2
	DefaultShutdownGrace          = 30 * time.Second
	// defaultService is the registration contract's service name.
	defaultService = "mqtt-broker"
)

// LoadConfig reads, defaults and validates a YAML file.
func LoadConfig(path string) (*FileConfig, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return nil, err
	}
	return ParseConfig(b)
}

// ParseConfig decodes, defaults and validates YAML bytes. Unknown fields
// are errors, so a misspelt option fails at start instead of being ignored.
func ParseConfig(b []byte) (*FileConfig, error) {
	var c FileConfig
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
func (c *FileConfig) SetDefaults() {
	if c.Shards == 0 {
		c.Shards = 1
	}
	if c.InstanceID == "" {
		host, err := os.Hostname()
		if err != nil || host == "" {
			host = "broker"
		}
		c.InstanceID = host + "-" + strconv.Itoa(c.Shard)
	}
	if c.Listen == "" {
		c.Listen = DefaultListen
	}
	if c.Admin == "" {
		c.Admin = DefaultAdmin
	}
	r := &c.Redis
	if r.Address == "" && len(r.ClusterAddresses) == 0 {
		r.Address = DefaultRedisAddress
	}
	if r.Timeout == 0 {
		r.Timeout = Duration(DefaultRedisTimeout)
	}
	if r.KeyPrefix == "" {
		r.KeyPrefix = DefaultKeyPrefix
	}
	if r.Heartbeat == 0 {
		r.Heartbeat = Duration(DefaultRedisHeartbeat)
	}
	k := &c.Consul
	if k.Address == "" {
		k.Address = DefaultConsulAddress
	}
	if k.Scheme == "" {
		k.Scheme = "http"
		if k.TLS.Enabled {
			k.Scheme = "https"
		}
	}
	if k.Service == "" {
		k.Service = defaultService
	}
	if k.ServiceID == "" {
		k.ServiceID = c.InstanceID
	}
	if k.CheckInterval == 0 {
		k.CheckInterval = Duration(DefaultCheckInterval)
	}
	if k.CheckTimeout == 0 {
		k.CheckTimeout = Duration(DefaultCheckTimeout)
	}
	if k.FailuresBeforeCritical == 0 {
		k.FailuresBeforeCritical = DefaultFailuresBeforeCritical
	}
	if k.SuccessBeforePassing == 0 {
		k.SuccessBeforePassing = DefaultSuccessBeforePassing
	}
	if c.Shutdown.Grace == 0 {
		c.Shutdown.Grace = Duration(DefaultShutdownGrace)
	}
	if c.Log.Level == "" {
		c.Log.Level = "info"
	}
	if c.Log.Format == "" {
		c.Log.Format = "text"
	}
}

// Validate checks a defaulted config; errors name the field.
func (c *FileConfig) Validate() error {
	var errs []error
	bad := func(field, format string, args ...any) {
		errs = append(errs, fmt.Errorf("%s: %s", field, fmt.Sprintf(format, args...)))
	}
	if err := validInstanceID(c.InstanceID); err != nil {
		bad("instance_id", "%v", strings.TrimPrefix(err.Error(), "broker: "))
	}
	if _, _, err := net.SplitHostPort(c.Listen); err != nil {
		bad("listen", "%q is not host:port", c.Listen)
	}
	if c.Admin != "off" {
		if _, err := netip.ParseAddrPort(c.Admin); err != nil {
			bad("admin", "%q is not IP:port (or \"off\")", c.Admin)
		}
	}
	if c.Shards < 1 {
		bad("shards", "%d is below 1", c.Shards)
	} else if c.Shard < 0 || c.Shard >= c.Shards {
		bad("shard", "%d is not in [0, %d)", c.Shard, c.Shards)
	}
	if c.Priority < 0 {
		bad("priority", "%d is negative", c.Priority)
	}

	r := c.Redis
	if len(r.ClusterAddresses) > 0 {
		if r.Address != "" {
			bad("redis.address", "set together with redis.cluster_addresses")
		}
		if r.DB != 0 {
			bad("redis.db", "a Redis Cluster has only db 0")
		}
		for i, a := range r.ClusterAddresses {
			if _, _, err := net.SplitHostPort(a); err != nil {
				bad(fmt.Sprintf("redis.cluster_addresses[%d]", i), "%q is not host:port", a)
			}
		}
	} else if _, _, err := net.SplitHostPort(r.Address); err != nil {
		bad("redis.address", "%q is not host:port", r.Address)
	}
	if r.DB < 0 {
		bad("redis.db", "%d is negative", r.DB)
	}
	if strings.ContainsAny(r.KeyPrefix, "{} \t\r\n") {
		bad("redis.key_prefix", "%q holds braces or white space", r.KeyPrefix)
	}

	k := c.Consul
	if k.Enabled {
		if c.Admin == "off" {
			bad("admin", "off, but consul's health check needs /readyz")
		}
		if _, _, err := net.SplitHostPort(k.Address); err != nil {
			bad("consul.address", "%q is not host:port", k.Address)
		}
		if k.Scheme != "http" && k.Scheme != "https" {
			bad("consul.scheme", "%q is neither http nor https", k.Scheme)
		}
		if k.AnnounceAddress != "" {
			if _, err := netip.ParseAddrPort(k.AnnounceAddress); err != nil {
				bad("consul.announce_address", "%q is not IP:port", k.AnnounceAddress)
			}
		}
		if k.FailuresBeforeCritical < 0 {
			bad("consul.failures_before_critical", "%d is negative", k.FailuresBeforeCritical)
		}
		if k.SuccessBeforePassing < 0 {
			bad("consul.success_before_passing", "%d is negative", k.SuccessBeforePassing)
		}
	}
	if c.Auth.CredentialsFile == "" && !c.Auth.AllowAnonymous {
		bad("auth", "neither credentials_file nor allow_anonymous: no client could connect")
	}
	for i, t := range c.ProxyProtocol.Trusted {
		if _, err := parsePrefix(t); err != nil {
			bad(fmt.Sprintf("proxy_protocol.trusted[%d]", i), "%q is not a CIDR or an IP", t)
		}
	}
	for _, d := range []struct {
		field    string
		v        Duration
		positive bool
	}{
		{"redis.timeout", r.Timeout, true},
		{"redis.heartbeat", r.Heartbeat, true},
		{"consul.check_interval", k.CheckInterval, true},
		{"consul.check_timeout", k.CheckTimeout, true},
		{"consul.deregister_critical_after", k.DeregisterCriticalAfter, false},
		{"shutdown.grace", c.Shutdown.Grace, false},
	} {
		if d.v < 0 || (d.positive && d.v == 0) {
			bad(d.field, "%s is not positive", d.v.D())
		}
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

// parsePrefix accepts a CIDR or a single IP (a /32 or /128).
func parsePrefix(s string) (netip.Prefix, error) {
	if p, err := netip.ParsePrefix(s); err == nil {
		return p.Masked(), nil
	}
	a, err := netip.ParseAddr(s)
	if err != nil {
		return netip.Prefix{}, err
	}
	return netip.PrefixFrom(a.Unmap(), a.Unmap().BitLen()), nil
}

// TrustedPrefixes returns proxy_protocol.trusted parsed (valid after
// Validate).
func (c *FileConfig) TrustedPrefixes() []netip.Prefix {
	out := make([]netip.Prefix, 0, len(c.ProxyProtocol.Trusted))
	for _, t := range c.ProxyProtocol.Trusted {
		if p, err := parsePrefix(t); err == nil {
			out = append(out, p)
		}
	}
	return out
}

// RedisClient builds the Redis client the config describes: every call,
// the dial included, bounded by redis.timeout, and few quick retries, so a
// Redis that is down costs an engine call at most the timeout.
func (c *FileConfig) RedisClient() (redis.UniversalClient, error) {
	r := c.Redis
	tlsConf, err := r.TLS.config()
	if err != nil {
		return nil, fmt.Errorf("redis.tls: %w", err)
	}
	t := r.Timeout.D()
	opts := &redis.UniversalOptions{
		Addrs:           r.ClusterAddresses,
		Username:        r.Username,
		Password:        r.Password,
		DB:              r.DB,
		TLSConfig:       tlsConf,
		DialTimeout:     t,
		ReadTimeout:     t,
		WriteTimeout:    t,
		PoolTimeout:     t,
		MaxRetries:      2,
		MinRetryBackoff: 8 * time.Millisecond,
		MaxRetryBackoff: 64 * time.Millisecond,
	}
	if len(r.ClusterAddresses) > 0 {
		return redis.NewClusterClient(opts.Cluster()), nil
	}
	opts.Addrs = []string{r.Address}
	return redis.NewClient(opts.Simple()), nil
}

// ConsulAPIConfig is the Consul client configuration the config describes.
func (c *FileConfig) ConsulAPIConfig() *consulapi.Config {
	k := c.Consul
	cc := consulapi.DefaultNonPooledConfig()
	cc.Address = k.Address
	cc.Scheme = k.Scheme
	cc.Datacenter = k.Datacenter
	cc.Token = k.Token
	if k.TLS.Enabled {
		cc.TLSConfig = consulapi.TLSConfig{
			Address:            k.TLS.ServerName,
			CAFile:             k.TLS.CAFile,
			CertFile:           k.TLS.CertFile,
			KeyFile:            k.TLS.KeyFile,
			InsecureSkipVerify: k.TLS.InsecureSkipVerify,
		}
	}
	return cc
}

// AnnounceAddr is the MQTT address to register in Consul:
// consul.announce_address, else the listen address bound (bound, with a
// real port when listen asks for port 0), with the host's first
// non-loopback IP when its IP is unspecified.
func (c *FileConfig) AnnounceAddr(bound netip.AddrPort) netip.AddrPort {
	if a, err := netip.ParseAddrPort(c.Consul.AnnounceAddress); err == nil {
		return a
	}
	if ip := bound.Addr(); ip.IsValid() && !ip.IsUnspecified() {
		return netip.AddrPortFrom(ip.Unmap(), bound.Port())
	}
	return netip.AddrPortFrom(hostIP(), bound.Port())
}

// hostIP returns the first global unicast IPv4 (else IPv6) address of the
// host's interfaces, 127.0.0.1 if it has none.
func hostIP() netip.Addr {
	addrs, _ := net.InterfaceAddrs()
	var v6 netip.Addr
	for _, a := range addrs {
		pn, ok := a.(*net.IPNet)
		if !ok {
			continue
		}
		ip, ok := netip.AddrFromSlice(pn.IP)
		if !ok || !ip.IsGlobalUnicast() {
			continue
		}
		ip = ip.Unmap()
		if ip.Is4() {
			return ip
		}
		if !v6.IsValid() {
			v6 = ip
		}
	}
	if v6.IsValid() {
		return v6
	}
	return netip.AddrFrom4([4]byte{127, 0, 0, 1})
}

func (t TLSConfig) config() (*tls.Config, error) {
	if !t.Enabled {
		return nil, nil
	}
	c := &tls.Config{ServerName: t.ServerName, InsecureSkipVerify: t.InsecureSkipVerify, MinVersion: tls.VersionTLS12}
	if t.CAFile != "" {
		pem, err := os.ReadFile(t.CAFile)
		if err != nil {
			return nil, err
		}
		pool := x509.NewCertPool()
		if !pool.AppendCertsFromPEM(pem) {
			return nil, fmt.Errorf("%s: no PEM certificate", t.CAFile)
		}
		c.RootCAs = pool
	}
	if t.CertFile != "" || t.KeyFile != "" {
		cert, err := tls.LoadX509KeyPair(t.CertFile, t.KeyFile)
		if err != nil {
			return nil, err
		}
		c.Certificates = []tls.Certificate{cert}
	}
	return c, nil
}

// Duration is a time.Duration written as "10s", "1m30s" in YAML.
type Duration = yamlconf.Duration
