package backend

import (
	"context"
	"sync/atomic"
)

// Router holds the current snapshot. The hot path is r.Load().Route(id): one
// atomic load, no lock; a source swaps in a new snapshot with Store.
type Router struct {
	cur atomic.Pointer[Snapshot]
}

// NewRouter returns a router holding s (which may be nil: everything is
// refused until the first Store).
func NewRouter(s *Snapshot) *Router {
	r := &Router{}
	r.cur.Store(s)
	return r
}

// Load returns the current snapshot, nil before the first one.
func (r *Router) Load() *Snapshot { return r.cur.Load() }

// Store makes s the current snapshot. Connections routed before keep the
// snapshot they loaded.
func (r *Router) Store(s *Snapshot) { r.cur.Store(s) }

// Route routes with the current snapshot.
func (r *Router) Route(clientID []byte) (Route, bool) { return r.cur.Load().Route(clientID) }

// Source produces snapshots: the static configuration with active health
// checks here, Consul elsewhere.
type Source interface {
	// Run calls update with a new snapshot whenever the backend set or its
	// health changes (never twice in a row with an equal snapshot), from one
	// goroutine at a time, until ctx is done. It returns nil once ctx is
	// done, or the error that stopped it.
	Run(ctx context.Context, update func(*Snapshot)) error
}
