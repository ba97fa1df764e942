package broker

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"net/http/pprof"
	"net/netip"
	"sync/atomic"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/promhttp"
)

// Phase is where a broker process is in its life, as /readyz reports it.
type Phase int32

const (
	// PhaseStarting: the admin server is up, the instance not yet serving.
	PhaseStarting Phase = iota
	// PhaseServing: the instance serves devices.
	PhaseServing
	// PhaseStopping: SIGTERM received; the proxies are moving the devices.
	PhaseStopping
)

func (p Phase) String() string {
	switch p {
	case PhaseStarting:
		return "starting"
	case PhaseServing:
		return "serving"
	case PhaseStopping:
		return "stopping"
	}
	return "unknown"
}

// AdminOptions configures the admin HTTP server of `shardgate broker`.
type AdminOptions struct {
	// Addr is IP:port to listen on (port 0: a free port, see Addr).
	Addr string
	// Gatherer serves /metrics.
	Gatherer prometheus.Gatherer
	// Degraded, while serving, reports a fault the instance works around
	// (Redis failing: Instance.RedisError); nil means none.
	Degraded func() error
	Log      *slog.Logger
}

// Admin is the broker's admin HTTP server: /metrics, /healthz, /readyz and
// /debug/pprof/. It is meant for 127.0.0.1 (the default address): it has no
// authentication.
//
// /readyz is the Consul check, and its status codes are the contract
// with the proxies: 200 "ok" while serving; 429 "warning: …" while serving
// with a degraded fault (Redis down: Consul counts a warning as passing,
// so no proxy moves the shard's devices for a fault a move cannot cure);
// 503 while starting or stopping.
type Admin struct {
	o     AdminOptions
	srv   *http.Server
	ln    net.Listener
	phase atomic.Int32
}

// NewAdmin binds the admin address; the phase starts as PhaseStarting.
func NewAdmin(o AdminOptions) (*Admin, error) {
	if o.Log == nil {
		o.Log = slog.New(slog.DiscardHandler)
	}
	if o.Gatherer == nil {
		o.Gatherer = prometheus.NewRegistry()
	}
	ln, err := net.Listen("tcp", o.Addr)
	if err != nil {
		return nil, fmt.Errorf("admin: %w", err)
	}
	a := &Admin{o: o, ln: ln}
	mux := http.NewServeMux()
	mux.Handle("GET /metrics", promhttp.HandlerFor(o.Gatherer, promhttp.HandlerOpts{ErrorLog: slog.NewLogLogger(o.Log.Handler(), slog.LevelError)}))
	mux.HandleFunc("GET /healthz", func(w http.ResponseWriter, _ *http.Request) {
		w.Header().Set("Content-Type", "text/plain; charset=utf-8")
		fmt.Fprintln(w, "ok")
	})
	mux.HandleFunc("GET /readyz", a.readyz)
	mux.HandleFunc("/debug/pprof/", pprof.Index)
	mux.HandleFunc("/debug/pprof/cmdline", pprof.Cmdline)
	mux.HandleFunc("/debug/pprof/profile", pprof.Profile)
	mux.HandleFunc("/debug/pprof/symbol", pprof.Symbol)
	mux.HandleFunc("/debug/pprof/trace", pprof.Trace)
	a.srv = &http.Server{Handler: mux, ReadHeaderTimeout: 5 * time.Second}
	return a, nil
}

// Addr is the bound address.
func (a *Admin) Addr() netip.AddrPort { return a.ln.Addr().(*net.TCPAddr).AddrPort() }

// SetPhase changes what /readyz reports.
func (a *Admin) SetPhase(p Phase) { a.phase.Store(int32(p)) }

// Phase returns the current phase.
func (a *Admin) Phase() Phase { return Phase(a.phase.Load()) }

// Serve serves until Shutdown; run it on its own goroutine.
func (a *Admin) Serve() error {
	if err := a.srv.Serve(a.ln); !errors.Is(err, http.ErrServerClosed) {
		return err
	}
	return nil
}

// Shutdown stops the server.
func (a *Admin) Shutdown(ctx context.Context) error { return a.srv.Shutdown(ctx) }

// Readiness returns /readyz's status code and body.
func (a *Admin) Readiness() (int, string) {
	switch p := a.Phase(); p {
	case PhaseServing:
		if a.o.Degraded != nil {
			if err := a.o.Degraded(); err != nil {
				return http.StatusTooManyRequests, "warning: " + err.Error()
			}
		}
		return http.StatusOK, "ok"
	default:
		return http.StatusServiceUnavailable, p.String()
	}
}

func (a *Admin) readyz(w http.ResponseWriter, _ *http.Request) {
	code, body := a.Readiness()
	w.Header().Set("Content-Type", "text/plain; charset=utf-8")
	w.WriteHeader(code)
	fmt.Fprintln(w, body)
}
