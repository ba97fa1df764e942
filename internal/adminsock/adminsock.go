// Package adminsock is every shardgate proxy process's private admin
// socket: an abstract unix socket named after the process's PID, serving
// the same admin HTTP handler as the TCP admin address.
//
// A workers' supervisor scrapes its workers through it (workers have no TCP
// admin address), and a new proxy generation reads the old generation's
// remaining devices through it once the old one has given up its TCP admin
// port.
//
// Abstract sockets live in the network namespace, not the file system:
// they vanish with the process, need no clean-up, and have no file
// permissions. Listen makes up for the missing permissions by checking each
// peer's credentials.
package adminsock

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"mime"
	"net"
	"net/http"
	"os"
	"slices"
	"strconv"
	"strings"
	"sync/atomic"
	"syscall"
	"time"

	dto "github.com/prometheus/client_model/go"
	"github.com/prometheus/common/expfmt"
	"github.com/prometheus/common/model"
	"golang.org/x/sys/unix"
)

// URL is the base URL to use with Client. The host is ignored: Client
// dials the socket whatever the URL says.
const URL = "http://shardgate-admin"

// Limits on what Gather and FetchStatus read, so a confused peer cannot
// make the caller buffer without bound.
const (
	maxMetricsBytes = 64 << 20
	maxStatusBytes  = 1 << 20
)

// Name is pid's admin socket name in the abstract namespace, without the
// leading '@': "shardgate-admin-<pid>".
func Name(pid int) string {
	return "shardgate-admin-" + strconv.Itoa(pid)
}

// addr is the name Go's net package takes for an abstract unix socket: a
// leading '@' stands for the NUL byte.
func addr(pid int) string { return "@" + Name(pid) }

// Listen listens on the calling process's abstract admin socket. Abstract
// sockets have no file permissions, so every accepted connection's peer
// credentials (SO_PEERCRED) are checked: connections from a uid other than
// root or the process's own uid are closed at once (never returned by
// Accept).
//
// The concrete type is *Listener, which counts refused peers.
func Listen() (net.Listener, error) {
	return ListenPID(os.Getpid())
}

// ListenPID is Listen for a given pid's name (tests).
func ListenPID(pid int) (net.Listener, error) {
	ln, err := net.ListenUnix("unix", &net.UnixAddr{Name: addr(pid), Net: "unix"})
	if err != nil {
		return nil, fmt.Errorf("admin socket %s: %w", addr(pid), err)
	}
	return &Listener{ln: ln, uid: uint32(os.Geteuid())}, nil
}

// Listener is the admin socket's listener: it hands Accept only
// connections from root or from the uid it runs as.
type Listener struct {
	ln      *net.UnixListener
	uid     uint32 // the effective uid, which is what SO_PEERCRED reports for peers too
	refused atomic.Uint64
}

var _ net.Listener = (*Listener)(nil)

// Accept waits for the next connection from an allowed peer. Connections
// from other uids, or whose credentials cannot be read, are closed and
// Accept waits on: the check is a single getsockopt, so a refused peer
// never holds up the ones behind it.
func (l *Listener) Accept() (net.Conn, error) {
	for {
		c, err := l.ln.AcceptUnix()
		if err != nil {
			return nil, err
		}
		if err := l.admit(c); err != nil {
			c.Close()
			l.refused.Add(1)
			continue
		}
		return c, nil
	}
}

// admit reads the peer's credentials, as the kernel recorded them at
// connect time, and allows root and our own uid.
func (l *Listener) admit(c *net.UnixConn) error {
	rc, err := c.SyscallConn()
	if err != nil {
		return err
	}
	var cred *unix.Ucred
	var credErr error
	if err := rc.Control(func(fd uintptr) {
		cred, credErr = unix.GetsockoptUcred(int(fd), unix.SOL_SOCKET, unix.SO_PEERCRED)
	}); err != nil {
		return err
	}
	if credErr != nil {
		return fmt.Errorf("SO_PEERCRED: %w", credErr)
	}
	if cred.Uid != 0 && cred.Uid != l.uid {
		return fmt.Errorf("peer pid %d uid %d not allowed", cred.Pid, cred.Uid)
	}
	return nil
}

// Refused is how many connections Accept has closed for their peer's
// credentials.
func (l *Listener) Refused() uint64 { return l.refused.Load() }

// Close stops listening; the abstract name is free again at once.
func (l *Listener) Close() error { return l.ln.Close() }

// Addr is the socket's address ("@shardgate-admin-<pid>").
func (l *Listener) Addr() net.Addr { return l.ln.Addr() }

// Client returns an http.Client whose requests, whatever their URL host,
// go to pid's admin socket; timeout bounds each request (zero: no bound
// beyond the request's context).
//
// Each request uses a connection of its own, closed after it: a local
// connect costs microseconds, and callers may make a Client per request
// without leaving idle connections (and their server goroutines) behind.
func Client(pid int, timeout time.Duration) *http.Client {
	name := addr(pid)
	var d net.Dialer
	return &http.Client{Timeout: timeout, Transport: &http.Transport{
		// Proxy stays nil: an HTTP_PROXY in the environment must not
		// send admin requests anywhere but the socket.
		DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
			return d.DialContext(ctx, "unix", name)
		},
		DisableKeepAlives: true,
		// Compressing over a local socket costs CPU and saves nothing.
		DisableCompression: true,
	}}
}

// get GETs path from pid's admin socket and checks for 200 OK.
func get(ctx context.Context, pid int, path, accept string) (*http.Response, error) {
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, URL+path, nil)
	if err != nil {
		return nil, err
	}
	req.Header.Set("Accept", accept)
	resp, err := Client(pid, 0).Do(req)
	if errors.Is(err, syscall.ECONNREFUSED) {
		// Nobody listens on an abstract name: it is freed the moment
		// its process closes it or exits.
		return nil, fmt.Errorf("admin socket of pid %d: %w: %w", pid, ErrNotListening, err)
	}
	if err != nil {
		return nil, fmt.Errorf("admin socket of pid %d: %w", pid, err)
	}
	if resp.StatusCode != http.StatusOK {
		body, _ := io.ReadAll(io.LimitReader(resp.Body, 512))
		resp.Body.Close()
		return nil, fmt.Errorf("admin socket of pid %d: GET %s: %s: %s", pid, path, resp.Status, strings.TrimSpace(string(body)))
	}
	return resp, nil
}

// textFormat asks promhttp for the classic text format, the one format
// both ends agree on without content negotiation surprises.
const textFormat = "text/plain;version=0.0.4"

// Gather GETs pid's /metrics and parses the Prometheus text format into
// metric families, sorted by name. Histograms keep the explicit +Inf
// bucket the text format carries.
func Gather(ctx context.Context, pid int) ([]*dto.MetricFamily, error) {
	resp, err := get(ctx, pid, "/metrics", textFormat)
	if err != nil {
		return nil, err
	}
	defer resp.Body.Close()
	if mt, _, _ := mime.ParseMediaType(resp.Header.Get("Content-Type")); mt != "text/plain" {
		return nil, fmt.Errorf("admin socket of pid %d: /metrics answered %q, want text/plain", pid, resp.Header.Get("Content-Type"))
	}
	// UTF-8 validation accepts every name the legacy scheme does and
	// whatever else a newer client_golang may expose; the zero
	// TextParser would refuse everything.
	p := expfmt.NewTextParser(model.UTF8Validation)
	byName, err := p.TextToMetricFamilies(http.MaxBytesReader(nil, resp.Body, maxMetricsBytes))
	if err != nil {
		return nil, fmt.Errorf("admin socket of pid %d: /metrics: %w", pid, err)
	}
	fams := make([]*dto.MetricFamily, 0, len(byName))
	for _, mf := range byName {
		fams = append(fams, mf)
	}
	slices.SortFunc(fams, func(a, b *dto.MetricFamily) int { return strings.Compare(a.GetName(), b.GetName()) })
	return fams, nil
}

// Status is what GET /api/v1/status answers on every proxy process's admin.
type Status struct {
	PID         int    `json:"pid"`
	Role        string `json:"role"`        // "proxy", "supervisor", "worker"
	Generation  uint32 `json:"generation"`  // eBPF steering generation, 0 without
	Worker      int    `json:"worker"`      // worker index, -1 when not a worker
	Connections int    `json:"connections"` // devices held now (relaying or in handshake)
	HandedOver  bool   `json:"handed_over"` // a newer generation took over; this one only finishes its devices
}

// FetchStatus GETs pid's /api/v1/status.
func FetchStatus(ctx context.Context, pid int) (Status, error) {
	resp, err := get(ctx, pid, "/api/v1/status", "application/json")
	if err != nil {
		return Status{}, err
	}
	defer resp.Body.Close()
	var st Status
	dec := json.NewDecoder(http.MaxBytesReader(nil, resp.Body, maxStatusBytes))
	if err := dec.Decode(&st); err != nil {
		return Status{}, fmt.Errorf("admin socket of pid %d: /api/v1/status: %w", pid, err)
	}
	return st, nil
}

// ErrNotListening is returned, wrapped, by Gather and FetchStatus when
// nothing listens on the pid's admin socket: the process is gone, closed
// its admin, or is not a shardgate proxy. Callers tell that apart from a
// process that answered badly with errors.Is.
var ErrNotListening = errors.New("no admin socket")
