package proxy

import (
	"math"
	"sync"
	"sync/atomic"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"golang.org/x/sys/unix"

	"github.com/shardgate/shardgate/backend"
	"github.com/shardgate/shardgate/mqttwire"
)

// Draining (DESIGN.md, "Health and draining"). When an instance leaves the
// healthy set the router already sends new devices elsewhere; the proxy then
// moves the instance's live connections at a pace: each second max(min_rate,
// rate × the count at the drain's start). A pacer goroutine per drain turns
// the pace into tokens; each event loop spends tokens on connections it owns
// (a connection is touched by its loop only). To move one, the loop waits
// for both directions to reach a packet boundary with nothing pending, then
// sends the broker a normal DISCONNECT (no will fires for a device that is
// only moving) and an MQTT 5 device DISCONNECT 0x9C (use another server),
// half-closes both and reads them out until they close.
//
// Per connection this costs one flag bit: a loop finds the instance's
// connections by scanning the fd table from a cursor, which over a whole
// drain is one pass over the table per loop, since no new connection of a
// drained instance appears behind the cursor (the router sends new devices
// elsewhere). A loop that owns none of the instance's connections does not
// scan at all (activeGauge.n counts them per loop).

// drainPacerInterval is how often a pacer hands out tokens and updates
// drain_remaining.
const drainPacerInterval = 100 * time.Millisecond

// drainBoundaryTicks bounds the wait of a connection chosen for the move for
// a packet boundary in both directions: a device stalled halfway through a
// packet is closed without the DISCONNECTs after it.
const drainBoundaryTicks = 100 // 10 s

// drainRescanTicks is how long a loop that found no connection to move waits
// before it scans again (for connections still in their handshake when the
// drain began).
const drainRescanTicks = 10 // 1 s

// instLive counts one instance's relaying connections over all loops, for
// the count at a drain's start and drain_remaining.
type instLive struct {
	id      string
	n       atomic.Int64
	drained prometheus.Counter // drained_total{instance}
}

// drain is one instance's drain in progress.
type drain struct {
	inst      *instLive
	start     int64   // relaying connections when the drain began
	pace      float64 // connections per second
	tokens    atomic.Int64
	stop      chan struct{}
	stopOnce  sync.Once
	remaining prometheus.Gauge
}

// drainScanChunk bounds the fd-table entries one loop turn scans for a
// drain (~0.25 ms), so a large table does not stall the relay; the scan
// goes on in the next turn. A variable for the tests.
var drainScanChunk = 64 << 10

// loopDrain is a loop's own progress through one drain.
type loopDrain struct {
	cursor    int    // next fd of the table to look at
	scanned   int    // entries looked at since the last one found
	idleUntil uint32 // tick before which the loop does not scan again
}

// instLiveFor returns the live count of an instance, created on first use.
func (p *Proxy) instLiveFor(id string) *instLive {
	p.instMu.Lock()
	defer p.instMu.Unlock()
	in := p.insts[id]
	if in == nil {
		in = &instLive{id: id, drained: p.metrics.Drained.WithLabelValues(id)}
		p.insts[id] = in
	}
	return in
}

// OnSnapshot starts the drain of every instance healthy in old and absent
// from, or unhealthy in, next, and stops the drain of every instance healthy
// in next (its remaining connections stay; nothing is moved back). Call it
// after storing next in the router, so new devices already go elsewhere.
func (p *Proxy) OnSnapshot(old, next *backend.Snapshot) {
	now := healthySet(next)
	for _, in := range old.Instances() {
		if in.Healthy && !now[in.ID] {
			p.startDrain(in.ID)
		}
	}
	for id := range now {
		p.stopDrain(id)
	}
}

func healthySet(s *backend.Snapshot) map[string]bool {
	m := make(map[string]bool)
	for _, in := range s.Instances() {
		if in.Healthy {
			m[in.ID] = true
		}
	}
	return m
}

// startDrain begins moving an instance's connections, unless a drain of it
// is already running.
func (p *Proxy) startDrain(id string) { p.beginDrain(id, false) }

// HandOff moves every connection the proxy still relays at the drain pace:
// a drain of every instance, DISCONNECTs at packet boundaries as for any
// drain (upgrade.handoff_delay). It is for a generation that handed over:
// call it after Shutdown began, once the next generation takes every new
// connection, so each moved device reconnects there; Shutdown then returns
// when the last one has left. It returns the number of connections it set
// out to move; after Shutdown returned it does nothing.
func (p *Proxy) HandOff() int64 {
	p.instMu.Lock()
	ids := make([]string, 0, len(p.insts))
	for id := range p.insts {
		ids = append(ids, id)
	}
	p.instMu.Unlock()
	var n int64
	for _, id := range ids {
		n += p.beginDrain(id, true)
	}
	return n
}

// beginDrain starts a drain of an instance and returns its connections at
// the start (0 if none started). Only a handoff starts one while the proxy
// is shutting down (not accepting: a moved device cannot come back here).
func (p *Proxy) beginDrain(id string, handoff bool) int64 {
	inst := p.instLiveFor(id)
	p.drainMu.Lock()
	defer p.drainMu.Unlock()
	if st := p.state.Load(); p.drainsClosed || st == stateForce || (st != stateRunning && !handoff) {
		// Shutting down without a handoff: every connection is closing
		// anyway. After waitDrains began, drainWG may be waited on.
		return 0
	}
	cur := p.drainList()
	for _, d := range cur {
		if d.inst == inst && !d.stopped() {
			return 0
		}
	}
	n := inst.n.Load()
	d := &drain{
		inst:      inst,
		start:     n,
		pace:      math.Max(p.cfg.Drain.MinRate, p.cfg.Drain.Rate*float64(n)),
		stop:      make(chan struct{}),
		remaining: p.metrics.DrainRemaining.WithLabelValues(id),
	}
	d.remaining.Set(float64(n))
	next := append(append([]*drain(nil), cur...), d)
	p.drains.Store(&next)
	if handoff {
		p.log.Info("handing off to the next generation", "instance", id, "connections", n, "per_second", d.pace)
	} else {
		p.log.Info("draining instance", "instance", id, "connections", n, "per_second", d.pace)
	}
	p.drainWG.Add(1)
	go p.drainPacer(d)
	return n
}

// stopDrain stops an instance's drain, if one runs.
func (p *Proxy) stopDrain(id string) {
	p.drainMu.Lock()
	defer p.drainMu.Unlock()
	for _, d := range p.drainList() {
		if d.inst.id == id && !d.stopped() {
			d.stopOnce.Do(func() { close(d.stop) })
			p.log.Info("instance healthy again: drain stopped", "instance", id, "remaining", d.inst.n.Load())
		}
	}
}

func (p *Proxy) drainList() []*drain {
	if l := p.drains.Load(); l != nil {
		return *l
	}
	return nil
}

func (d *drain) stopped() bool {
	select {
	case <-d.stop:
		return true
	default:
		return false
	}
}

// waitDrains waits for the pacers to end, once the loops have exited.
// Closing the drains under drainMu orders it after any beginDrain that
// started one, and stops any later one, so no drainWG.Add races with the
// Wait.
func (p *Proxy) waitDrains() {
	p.drainMu.Lock()
	p.drainsClosed = true
	p.drainMu.Unlock()
	p.drainWG.Wait()
}

// removeDrain takes a finished drain off the list the loops read.
func (p *Proxy) removeDrain(d *drain) {
	p.drainMu.Lock()
	defer p.drainMu.Unlock()
	cur := p.drainList()
	next := make([]*drain, 0, len(cur))
	for _, x := range cur {
		if x != d {
			next = append(next, x)
		}
	}
	p.drains.Store(&next)
}

// drainPacer hands out a drain's tokens at its pace, wakes the loops to
// spend them, and ends the drain when the instance has no connection left,
// when it is healthy again, or when the proxy shuts down.
func (p *Proxy) drainPacer(d *drain) {
	defer p.drainWG.Done()
	defer p.removeDrain(d)
	defer d.remaining.Set(0)
	t := time.NewTicker(drainPacerInterval)
	defer t.Stop()
	burst := int64(math.Max(1, math.Ceil(d.pace*drainPacerInterval.Seconds())))
	began, last := time.Now(), time.Now()
	acc := 0.0
	for {
		select {
		case <-d.stop:
			return
		case now := <-t.C:
			acc += d.pace * now.Sub(last).Seconds()
			last = now
		}
		switch p.state.Load() {
		case stateForce:
			return
		case stateDraining:
			if p.Active() == 0 {
				return
			}
		}
		rem := d.inst.n.Load()
		d.remaining.Set(float64(max(rem, 0)))
		if rem <= 0 {
			p.log.Info("instance drained", "instance", d.inst.id, "connections", d.start,
				"seconds", time.Since(began).Seconds())
			return
		}
		if whole := int64(acc); whole > 0 {
			acc -= float64(whole)
			// Tokens no loop could spend (connections still in their
			// handshake) do not pile up into a burst.
			if v := d.tokens.Add(whole); v > burst {
				d.tokens.Add(burst - v)
			}
			p.wakeAll()
		}
	}
}

// takeToken spends one of a drain's tokens, if any is left.
func (d *drain) takeToken() bool {
	for {
		v := d.tokens.Load()
		if v <= 0 {
			return false
		}
		if d.tokens.CompareAndSwap(v, v-1) {
			return true
		}
	}
}

// ---- the loop's side -------------------------------------------------------

// drainTurn spends the tokens of the running drains on this loop's
// connections. It runs once per loop turn while a drain runs.
func (l *loop) drainTurn(ds []*drain) {
	if len(l.drainState) > len(ds) {
		for d := range l.drainState {
			if !containsDrain(ds, d) {
				delete(l.drainState, d)
			}
		}
	}
	for _, d := range ds {
		if d.tokens.Load() <= 0 || d.stopped() {
			continue
		}
		st := l.drainState[d]
		if st == nil {
			st = &loopDrain{idleUntil: l.now}
			l.drainState[d] = st
		}
		if int32(l.now-st.idleUntil) < 0 {
			continue
		}
		if l.ownCount(d.inst) == 0 {
			st.idleUntil = l.now + drainRescanTicks
			continue
		}
		for budget := drainScanChunk; d.tokens.Load() > 0; {
			c := l.nextToDrain(d.inst, st, &budget)
			if c == nil {
				if st.scanned >= len(l.p.table) {
					// A whole round without one: wait a while.
					st.scanned = 0
					st.idleUntil = l.now + drainRescanTicks
				} else {
					l.drainMore = true // the chunk ran out
				}
				break
			}
			if !d.takeToken() {
				break
			}
			l.drainConn(c)
		}
	}
}

func containsDrain(ds []*drain, d *drain) bool {
	for _, x := range ds {
		if x == d {
			return true
		}
	}
	return false
}

// ownCount is the number of this loop's relaying connections to inst.
func (l *loop) ownCount(inst *instLive) int {
	n := 0
	for _, g := range l.gauges {
		if g.inst == inst {
			n += g.n
		}
	}
	return n
}

// nextToDrain returns this loop's next relaying connection to inst not yet
// being moved, scanning the fd table from the cursor, at most *budget
// entries and once round; nil when none was found within them.
func (l *loop) nextToDrain(inst *instLive, st *loopDrain, budget *int) *conn {
	t := l.p.table
	for *budget > 0 && st.scanned < len(t) {
		*budget--
		st.scanned++
		fd := st.cursor
		st.cursor++
		if st.cursor >= len(t) {
			st.cursor = 0
		}
		c := t[fd].Load()
		if c != nil && c.owner == l.id && int(c.dev) == fd && c.state == stRelay &&
			c.flags&fDrain == 0 && c.gauge != nil && c.gauge.inst == inst {
			st.scanned = 0
			return c
		}
	}
	return nil
}

// drainConn chooses a connection for the move: from now on each direction
// is read only up to its next packet boundary, and once both are there with
// nothing pending, drainFinish sends the DISCONNECTs.
func (l *loop) drainConn(c *conn) {
	c.flags |= fDrain
	c.gauge.inst.drained.Inc()
	l.wheel.reset(&c.timer, l.now+drainBoundaryTicks)
	l.drainStep(c)
}

// drainStep finishes the move of a connection once both directions are at a
// packet boundary with nothing pending (a direction that sent FIN counts as
// done), else updates its interest to read up to the boundaries.
func (l *loop) drainStep(c *conn) {
	if c.state != stRelay {
		return
	}
	upReady := c.up == nil && (c.upF.AtBoundary() || c.flags&fUpEOF != 0)
	downReady := c.down == nil && (c.downF.AtBoundary() || c.flags&fDownEOF != 0)
	if upReady && downReady {
		l.drainFinish(c)
		return
	}
	l.syncInterest(c)
}

// drainCut returns the part of b, just read by a connection being moved,
// that completes the packet in progress in its direction; the bytes after
// it are dropped (the device sends them again to its next broker).
func drainCut(c *conn, fromDev bool, b []byte) []byte {
	f := &c.downF
	if fromDev {
		f = &c.upF
	}
	return b[:f.Split(b)]
}

// drainFinish sends the DISCONNECTs at the boundaries reached, half-closes
// both sockets and reads them out until both peers close (closing with
// unread input would send a RST, which may destroy the DISCONNECT before it
// is read).
func (l *loop) drainFinish(c *conn) {
	// c.up and c.down are nil, so the last writes were taken whole and the
	// sockets' send buffers have room for a 2- or 3-byte packet; a write
	// that fails anyway leaves just the close, as for a lost device.
	var b [4]byte
	if l.p.set.drainBroker && c.flags&fUpShut == 0 {
		// A normal disconnection, E0 00 at every level: the broker
		// discards the will ([MQTT-3.1.2-10], 5.0 §3.14.4); 0x04 would
		// fire it.
		unix.Write(int(c.bk), mqttwire.AppendDisconnect(b[:0], mqttwire.Level311, mqttwire.Success))
	}
	// An MQTT 5 device whose CONNACK has not been relayed yet gets no
	// DISCONNECT: a server's first packet is CONNACK [MQTT-3.2.0-1].
	if c.level == mqttwire.Level5 && l.p.set.drainDevice5 && c.flags&(fDownShut|fConnack) == 0 {
		unix.Write(int(c.dev), mqttwire.AppendDisconnect(b[:0], mqttwire.Level5, mqttwire.UseAnotherServer))
	}
	if c.flags&fUpShut == 0 {
		unix.Shutdown(int(c.bk), unix.SHUT_WR)
	}
	if c.flags&fDownShut == 0 {
		unix.Shutdown(int(c.dev), unix.SHUT_WR)
	}
	c.flags |= fUpShut | fDownShut
	c.state = stDrained
	dev, bk := evIn, evIn
	if c.flags&fUpEOF != 0 {
		dev = 0
	}
	if c.flags&fDownEOF != 0 {
		bk = 0
	}
	if dev == 0 && bk == 0 {
		l.closeConn(c)
		return
	}
	if !l.setInterest(c, true, dev) || !l.setInterest(c, false, bk) {
		return
	}
	l.wheel.reset(&c.timer, l.now+lingerTicks)
}

// drainedRead discards what a moved connection's peers still send, and
// closes once both have closed.
func (l *loop) drainedRead(c *conn, isDev, rdhup bool) {
	fd := c.bk
	if isDev {
		fd = c.dev
	}
	n, err := unix.Read(int(fd), l.buf)
	switch {
	case err == unix.EAGAIN || err == unix.EINTR:
		return
	case err != nil:
		l.closeConn(c)
		return
	case n > 0:
		l.readAgain(c, isDev, n, rdhup)
		return
	}
	if isDev {
		c.flags |= fUpEOF
	} else {
		c.flags |= fDownEOF
	}
	if c.flags&(fUpEOF|fDownEOF) == fUpEOF|fDownEOF {
		l.closeConn(c)
		return
	}
	l.setInterest(c, isDev, 0)
}
