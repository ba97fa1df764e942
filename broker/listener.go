package broker

import (
	"errors"
	"log/slog"
	"net"
	"sync"
	"time"

	mqtt "github.com/mochi-mqtt/server/v2"
	"github.com/mochi-mqtt/server/v2/listeners"
	"github.com/mochi-mqtt/server/v2/packets"
)

// closeWriteTimeout bounds the DISCONNECT written to each client at close.
const closeWriteTimeout = time.Second

// listener serves an already bound net.Listener to mochi, so the caller
// knows the real address (port 0) before serving, and tracks its
// connections: Close closes every one of them, so no connection goroutine
// outlives the server, even one that has not finished its CONNECT.
type listener struct {
	id  string
	ln  net.Listener
	log *slog.Logger
	srv *mqtt.Server // set when the listener is added to its server

	mu     sync.Mutex
	conns  map[net.Conn]struct{}
	closed bool
	wg     sync.WaitGroup // the accept loop and one per connection
}

var _ listeners.Listener = (*listener)(nil)

func newListener(id string, ln net.Listener, log *slog.Logger) *listener {
	return &listener{id: id, ln: ln, log: log, conns: make(map[net.Conn]struct{})}
}

// ID implements listeners.Listener.
func (l *listener) ID() string { return l.id }

// Address implements listeners.Listener.
func (l *listener) Address() string { return l.ln.Addr().String() }

// Protocol implements listeners.Listener.
func (l *listener) Protocol() string { return "tcp" }

// Init implements listeners.Listener; the socket is bound already.
func (l *listener) Init(*slog.Logger) error { return nil }

// Serve implements listeners.Listener: the accept loop.
func (l *listener) Serve(establish listeners.EstablishFn) {
	l.mu.Lock()
	if l.closed {
		l.mu.Unlock()
		return
	}
	l.wg.Add(1)
	l.mu.Unlock()
	defer l.wg.Done()

	var backoff time.Duration
	for {
		conn, err := l.ln.Accept()
		if err != nil {
			if errors.Is(err, net.ErrClosed) {
				return
			}
			// EMFILE and the like: wait and retry rather than spin
			// (net/http's policy).
			backoff = min(max(2*backoff, 5*time.Millisecond), time.Second)
			l.log.Warn("accept", "error", err, "retry_in", backoff)
			time.Sleep(backoff)
			continue
		}
		backoff = 0
		if !l.track(conn) {
			_ = conn.Close()
			return
		}
		go l.serveConn(establish, conn)
	}
}

// serveConn runs one connection through mochi.
func (l *listener) serveConn(establish listeners.EstablishFn, conn net.Conn) {
	defer l.wg.Done()
	defer l.untrack(conn)
	if err := establish(l.id, conn); err != nil {
		// A device that goes away without DISCONNECT ends here too:
		// routine, not a warning.
		l.log.Debug("connection ended", "remote", conn.RemoteAddr().String(), "error", err)
	}
}

func (l *listener) track(conn net.Conn) bool {
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.closed {
		return false
	}
	l.conns[conn] = struct{}{}
	l.wg.Add(1)
	return true
}

func (l *listener) untrack(conn net.Conn) {
	l.mu.Lock()
	delete(l.conns, conn)
	l.mu.Unlock()
	_ = conn.Close()
}

// Close implements listeners.Listener: stop accepting, let mochi disconnect
// its clients (closeClients), close whatever connection is left, and wait
// for every connection goroutine. mochi counts its clients in a WaitGroup
// that each connection goroutine adds itself to; waiting here means no Add
// can race with mochi's Wait that follows.
func (l *listener) Close(closeClients listeners.CloseFn) {
	l.mu.Lock()
	if l.closed {
		l.mu.Unlock()
		return
	}
	l.closed = true
	_ = l.ln.Close()
	// mochi writes DISCONNECT to each client synchronously; a device that
	// has stopped reading must not hold the shutdown up for long.
	deadline := time.Now().Add(closeWriteTimeout)
	for conn := range l.conns {
		_ = conn.SetWriteDeadline(deadline)
	}
	l.mu.Unlock()

	if l.srv != nil {
		disconnectListenerClients(l.srv, l.id)
	} else {
		closeClients(l.id)
	}

	l.mu.Lock()
	for conn := range l.conns {
		_ = conn.Close()
	}
	l.mu.Unlock()
	l.wg.Wait()
}

// disconnectListenerClients sends every client of the listener DISCONNECT
// (server shutting down) and stops it. It replaces mochi's own
// closeListenerClients, whose Clients.GetByListener read-locks the clients
// map twice: a client leaving in between (Clients.Delete waiting for the
// write lock) blocks the second read lock behind it, and the shutdown and
// every disconnecting client wait for each other forever. GetAll takes the
// lock once and returns a copy.
func disconnectListenerClients(srv *mqtt.Server, id string) {
	for _, cl := range srv.Clients.GetAll() {
		if cl.Net.Listener == id && !cl.Closed() {
			_ = srv.DisconnectClient(cl, packets.ErrServerShuttingDown)
		}
	}
}

// wait returns when the accept loop and every connection goroutine have
// ended.
func (l *listener) wait() { l.wg.Wait() }
