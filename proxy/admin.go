package proxy

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"net/http/pprof"
	"net/netip"
	"sync"
	"syscall"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/promhttp"
	"golang.org/x/sys/unix"

	"github.com/shardgate/shardgate/backend"
)

// RouteAnswer is the JSON object of `shardgate route` and /api/v1/route, fixed
// by the routing contract: {"contract":"v1","client_id":…,"shard":…,
// "instance":…,"address":…}. Instance and Address are null when the device
// would be refused.
type RouteAnswer struct {
	Contract string  `json:"contract"`
	ClientID string  `json:"client_id"`
	Shard    int     `json:"shard"`
	Instance *string `json:"instance"`
	Address  *string `json:"address"`
}

// Answer routes clientID with s and describes the result. A nil snapshot
// routes nothing.
func Answer(s *backend.Snapshot, clientID string) RouteAnswer {
	a := RouteAnswer{Contract: backend.ContractVersion, ClientID: clientID, Shard: -1}
	if s == nil {
		return a
	}
	r, ok := s.RouteString(clientID)
	a.Shard = r.Shard
	if ok && r.Instance != nil {
		id, addr := r.Instance.ID, r.Instance.Addr.String()
		a.Instance, a.Address = &id, &addr
	}
	return a
}

// AdminOptions configures the admin HTTP server.
type AdminOptions struct {
	// Addr is IP:port to listen on. Empty: no TCP listener (a worker
	// process, served only on Listeners).
	Addr string
	// Listeners are further listeners served the same handlers, such as
	// the process's private admin socket (internal/adminsock). The Admin
	// closes them on Shutdown.
	Listeners []net.Listener
	// Router is read for /api/v1/route and /api/v1/backends.
	Router *backend.Router
	// API, when set, answers /api/v1/route and /api/v1/backends instead
	// of Router (a workers' supervisor passes them to a worker).
	API http.Handler
	// Status, when set, answers /api/v1/status: what this process is
	// (role, generation, devices held).
	Status func() any
	// Gatherer serves /metrics.
	Gatherer prometheus.Gatherer
	// Ready reports why the proxy is not ready to take devices (nil: ready).
	Ready func() error
	// ReadyDetail, when set, adds a line to /readyz whatever the answer:
	// say "consul unreachable since …, routing on last snapshot" while the
	// proxy still routes (200). Empty: nothing added.
	ReadyDetail func() string
	// Backends, when set, returns the backend listing for /api/v1/backends
	// (instances with their health-check state). Default: the snapshot's
	// instances.
	Backends func() any
	Log      *slog.Logger
}

// Admin is the admin HTTP server: /metrics, /healthz, /readyz,
// /api/v1/route, /api/v1/backends and /debug/pprof/. It is meant for
// 127.0.0.1 (the default address): it has no authentication.
type Admin struct {
	o   AdminOptions
	srv *http.Server
	ln  net.Listener // the TCP listener; nil without one

	mu     sync.Mutex
	closed bool // the TCP listener was closed on purpose (CloseTCP)
}

// NewAdmin binds the admin address.
func NewAdmin(o AdminOptions) (*Admin, error) {
	if o.Log == nil {
		o.Log = slog.Default()
	}
	// SO_REUSEPORT: during an upgrade (shardgate proxy --upgrade) the new
	// generation binds the same admin address before the old one closes
	// its own, so scrapes and probes never meet a closed port.
	lc := net.ListenConfig{Control: func(_, _ string, c syscall.RawConn) error {
		var serr error
		if err := c.Control(func(fd uintptr) {
			serr = syscall.SetsockoptInt(int(fd), syscall.SOL_SOCKET, unix.SO_REUSEPORT, 1)
		}); err != nil {
			return err
		}
		return serr
	}}
	a := &Admin{o: o}
	if o.Addr != "" {
		ln, err := lc.Listen(context.Background(), "tcp", o.Addr)
		if err != nil {
			return nil, fmt.Errorf("admin: %w", err)
		}
		a.ln = ln
	}
	mux := http.NewServeMux()
	mux.Handle("GET /metrics", promhttp.HandlerFor(o.Gatherer, promhttp.HandlerOpts{ErrorLog: slog.NewLogLogger(o.Log.Handler(), slog.LevelError)}))
	mux.HandleFunc("GET /healthz", func(w http.ResponseWriter, _ *http.Request) {
		w.Header().Set("Content-Type", "text/plain; charset=utf-8")
		fmt.Fprintln(w, "ok")
	})
	mux.HandleFunc("GET /readyz", a.readyz)
	if o.API != nil {
		mux.Handle("GET /api/v1/route", o.API)
		mux.Handle("GET /api/v1/backends", o.API)
	} else {
		mux.HandleFunc("GET /api/v1/route", a.route)
		mux.HandleFunc("GET /api/v1/backends", a.backends)
	}
	if o.Status != nil {
		mux.HandleFunc("GET /api/v1/status", func(w http.ResponseWriter, _ *http.Request) { writeJSON(w, o.Status()) })
	}
	mux.HandleFunc("/debug/pprof/", pprof.Index)
	mux.HandleFunc("/debug/pprof/cmdline", pprof.Cmdline)
	mux.HandleFunc("/debug/pprof/profile", pprof.Profile)
	mux.HandleFunc("/debug/pprof/symbol", pprof.Symbol)
	mux.HandleFunc("/debug/pprof/trace", pprof.Trace)
	a.srv = &http.Server{Handler: mux, ReadHeaderTimeout: 5 * time.Second}
	return a, nil
}

// Addr is the bound TCP address (the zero value without one).
func (a *Admin) Addr() netip.AddrPort {
	if a.ln == nil {
		return netip.AddrPort{}
	}
	return a.ln.Addr().(*net.TCPAddr).AddrPort()
}

// Serve serves every listener until Shutdown; run it on its own goroutine.
// It returns the first listener's unexpected error.
func (a *Admin) Serve() error {
	lns := append([]net.Listener(nil), a.o.Listeners...)
	if a.ln != nil {
		lns = append(lns, a.ln)
	}
	errs := make(chan error, len(lns))
	for _, ln := range lns {
		go func() {
			err := a.srv.Serve(ln)
			a.mu.Lock()
			closed := a.closed && ln == a.ln
			a.mu.Unlock()
			if errors.Is(err, http.ErrServerClosed) || closed {
				err = nil
			}
			errs <- err
		}()
	}
	var first error
	for range lns {
		if err := <-errs; err != nil && first == nil {
			first = err
		}
	}
	return first
}

// CloseTCP closes the TCP listener and ends keep-alive: a proxy generation
// that handed over leaves the admin port to the next one and keeps its
// private socket. Idle connections are closed at once and busy ones after
// their request, so a scraper that keeps its connection open moves to the
// next generation at its next scrape.
func (a *Admin) CloseTCP() {
	a.mu.Lock()
	a.closed = true
	a.mu.Unlock()
	if a.ln != nil {
		a.ln.Close()
	}
	a.srv.SetKeepAlivesEnabled(false)
}

// Shutdown stops the server.
func (a *Admin) Shutdown(ctx context.Context) error { return a.srv.Shutdown(ctx) }

func (a *Admin) readyz(w http.ResponseWriter, _ *http.Request) {
	w.Header().Set("Content-Type", "text/plain; charset=utf-8")
	detail := ""
	if a.o.ReadyDetail != nil {
		detail = a.o.ReadyDetail()
	}
	if a.o.Ready != nil {
		if err := a.o.Ready(); err != nil {
			w.WriteHeader(http.StatusServiceUnavailable)
			fmt.Fprintf(w, "not ready: %v\n", err)
			if detail != "" {
				fmt.Fprintln(w, detail)
			}
			return
		}
	}
	fmt.Fprintln(w, "ready")
	if detail != "" {
		fmt.Fprintln(w, detail)
	}
}

func (a *Admin) route(w http.ResponseWriter, r *http.Request) {
	q := r.URL.Query()
	if !q.Has("client_id") {
		http.Error(w, "client_id query parameter required", http.StatusBadRequest)
		return
	}
	writeJSON(w, Answer(a.o.Router.Load(), q.Get("client_id")))
}

func (a *Admin) backends(w http.ResponseWriter, _ *http.Request) {
	if a.o.Backends != nil {
		writeJSON(w, a.o.Backends())
		return
	}
	writeJSON(w, SnapshotListing(a.o.Router.Load()))
}

// BackendListing is the /api/v1/backends answer when no source adds its own
// detail.
type BackendListing struct {
	Contract  string            `json:"contract"`
	Shards    int               `json:"shards"`
	Instances []InstanceListing `json:"instances"`
}

// InstanceListing is one instance in BackendListing.
type InstanceListing struct {
	ID       string `json:"id"`
	Address  string `json:"address"`
	Shard    int    `json:"shard"`
	Priority int    `json:"priority"`
	Healthy  bool   `json:"healthy"`
	// Active is true for the instance that takes its shard's new devices.
	Active bool `json:"active"`
}

// SnapshotListing lists the instances of s.
func SnapshotListing(s *backend.Snapshot) BackendListing {
	l := BackendListing{Contract: backend.ContractVersion, Instances: []InstanceListing{}}
	if s == nil {
		return l
	}
	l.Shards = s.Shards()
	for _, in := range s.Instances() {
		act, ok := s.Active(in.Shard)
		l.Instances = append(l.Instances, InstanceListing{
			ID: in.ID, Address: in.Addr.String(), Shard: in.Shard,
			Priority: in.Priority, Healthy: in.Healthy,
			Active: ok && act.ID == in.ID,
		})
	}
	return l
}

func writeJSON(w http.ResponseWriter, v any) {
	w.Header().Set("Content-Type", "application/json")
	enc := json.NewEncoder(w)
	enc.SetIndent("", "  ")
	_ = enc.Encode(v)
}
