package proxy

import (
	"errors"
	"math"
	"net/netip"
	"time"
	"unsafe"

	"github.com/prometheus/client_golang/prometheus"
	"golang.org/x/sys/unix"

	"github.com/shardgate/shardgate/backend"
	"github.com/shardgate/shardgate/mqttwire"
)

// A connection flows through these stages (conn.state), each a method of
// loop below: accept → peek → route → admit → dial → replay → relay → close.
// Refused devices take a side exit through linger.
const (
	stClosed  uint8 = iota
	stPeek          // reading the CONNECT from the device, under the CONNECT deadline
	stDial          // connecting to the broker; the device is not watched
	stReplay        // writing the peeked bytes (and a PROXY header) to the broker
	stRelay         // moving bytes both ways
	stLinger        // refused: CONNACK sent, reading until the device closes
	stDrained       // moved by a drain: DISCONNECTs sent, reading until both peers close
)

// conn flags.
const (
	fAdmitted uint8 = 1 << iota // Admission.Admit said yes: Release on close
	fCounted                    // counted in connections_active
	fUpEOF                      // the device sent FIN
	fDownEOF                    // the broker sent FIN
	fUpShut                     // FIN passed on to the broker (shutdown SHUT_WR)
	fDownShut                   // FIN passed on to the device
	fConnack                    // MQTT 5: the broker's CONNACK is still to be read (watchConnack)
	fDrain                      // chosen by a drain: relay up to the next packet boundaries, then drainFinish
)

// epoll interest of one fd, as kept in conn.devEv / conn.bkEv, with evReg
// set while the fd is in the epoll set. An fd with nothing to wait for is
// removed (EPOLL_CTL_DEL), except after its FIN (see setInterest): a new
// edge would otherwise wake the loop for bytes it does not mean to read.
// Registrations are edge-triggered, so every read that fills the loop's
// buffer is followed by another (loop.readAgain): no new edge reports the
// bytes left behind.
const (
	evIn  uint8 = 1
	evOut uint8 = 2
	evReg uint8 = 4
)

// conn is one proxied device: the device's socket and, from the dial stage on,
// the broker's. Both fds map to the same conn in the proxy's fd table. It is
// owned by one loop and touched only by it. It holds no buffer while idle:
// up/down are lent only while a peer cannot take bytes, hs only until the
// CONNECT is replayed (and, rarely, while an MQTT 5 broker's CONNACK arrives
// in pieces).
type conn struct {
	timer // first field: connOf converts a fired *timer back

	dev, bk int32 // bk is -1 until the dial stage
	owner   uint16
	state   uint8
	flags   uint8
	devEv   uint8
	bkEv    uint8
	level   uint8 // MQTT protocol level of the CONNECT

	// lastDev is the loop tick in which the device last sent a byte;
	// kaTicks the silence allowed (0: unlimited). The keepalive timer is
	// not moved on every read: when it fires early it re-arms itself at
	// idleDue.
	lastDev uint32
	kaTicks uint32

	upF, downF mqttwire.Framer // packet boundaries device→broker, broker→device

	up, down *pend // bytes read but not yet written, by direction

	hs    *handshake   // peek, dial and replay state; nil once relaying, but see collectConnack
	gauge *activeGauge // connections_active series, set when relaying

	src netip.Addr // device address, for Admission.Release
}

// connOf returns the conn whose embedded timer t is. conn embeds timer as its
// first field, so both share an address.
func connOf(t *timer) *conn { return (*conn)(unsafe.Pointer(t)) }

// handshake is what a connection needs from accept until its CONNECT has been
// replayed; it is dropped then, so a relaying connection does not carry it.
// A relaying MQTT 5 connection whose broker's CONNACK ends beyond one read
// borrows one again for the CONNACK's bytes (collectConnack).
type handshake struct {
	peek     []byte // everything read from the device so far, replayed as is; or the CONNACK so far
	off      int    // bytes of peek already written to the broker
	hdr      int    // length of the PROXY header at the start of peek, once added
	connLen  int    // length of the CONNECT at the start of the device's bytes
	accepted time.Time
	dialed   time.Time
	srcPort  uint16
	inst     *backend.Instance
	shard    int
}

// pend is a relay buffer lent to one direction of a connection whose
// destination could not take everything at once.
type pend struct {
	buf      []byte
	off, end int
}

// activeGauge is one connections_active series of a loop, looked up once
// per connect, with the loop's own count of the series' connections and the
// instance's count over all loops (for drains).
type activeGauge struct {
	g    prometheus.Gauge
	inst *instLive
	n    int // this loop's relaying connections of the series
}

// lingerTicks is how long a refused device gets to read its CONNACK and close
// before the proxy closes: closing with unread input would send a RST, which
// may destroy the CONNACK before the device read it.
const lingerTicks = 20

// maxTicks caps every duration the loop turns into ticks (3.4 years): a
// deadline a tick past it, compared with the wheel's position as an int32
// difference, still lies in the future.
const maxTicks = math.MaxInt32 / 2

// ticksFor converts a duration to whole ticks, rounding up.
func ticksFor(d time.Duration) uint32 {
	if d <= 0 {
		return 0
	}
	t := (d + tickDuration - 1) / tickDuration
	return uint32(min(t, maxTicks))
}

// ---- accept --------------------------------------------------------------

// accept takes a new device socket into the peek stage.
func (l *loop) accept(fd int, src netip.AddrPort) {
	if fd >= len(l.p.table) {
		// Cannot happen while RLIMIT_NOFILE is what it was at New.
		sysClose(fd)
		l.p.metrics.AcceptsShed.Inc()
		return
	}
	c := &conn{dev: int32(fd), bk: -1, owner: l.id, state: stPeek, src: src.Addr()}
	c.hs = l.newHandshake()
	c.hs.accepted, c.hs.srcPort = time.Now(), src.Port()
	l.p.table[fd].Store(c)
	l.active.Add(1)
	// One deadline for the whole CONNECT, from accept: a device dribbling
	// a byte at a time cannot hold the slot longer. Counted from the end
	// of the current tick, as idleDue does: counted from l.now, which
	// began up to a tick ago, the device was cut up to a tick early.
	l.wheel.add(&c.timer, l.now+1+l.p.set.connectTicks)
	// A device sends its CONNECT right after the handshake, so by the time
	// the loop accepts, the CONNECT has often arrived: read it now, and
	// the device joins the epoll set only if it has to be waited for (or,
	// once relaying, in relayStart). A miss costs one read that fails.
	l.peek(c, false)
	if c.state == stPeek {
		l.setInterest(c, true, evIn)
	}
}

// ---- peek ----------------------------------------------------------------

// peek reads from the device until its CONNECT is complete. rdhup: epoll
// reported the device's FIN.
func (l *loop) peek(c *conn, rdhup bool) {
	n, err := sysRead(int(c.dev), l.buf)
	switch {
	case err == unix.EAGAIN || err == unix.EINTR:
		return
	case err != nil || n == 0:
		l.reject(c, reasonClosedEarly)
		return
	}
	l.readAgain(c, true, n, rdhup)
	hs := c.hs
	hs.peek = append(hs.peek, l.buf[:n]...)
	cn, err := mqttwire.ParseConnect(hs.peek, l.p.set.maxConnect)
	if err != nil {
		l.peekFailed(c, cn.Level, err)
		return
	}
	hs.connLen = cn.Len
	c.level = cn.Level
	c.kaTicks = l.kaTicksFor(cn.KeepAlive)
	l.route(c, &cn)
}

// kaTicksFor is the silence allowed to a device whose keepalive is secs
// seconds: [MQTT-3.1.2-24] the server disconnects a client silent for one
// and a half times its keepalive (keepalive.factor); keepalive 0 is
// keepalive.max_idle (default unlimited, 0).
func (l *loop) kaTicksFor(secs uint16) uint32 {
	if secs == 0 {
		return l.p.set.maxIdleTicks
	}
	d := float64(secs) * float64(time.Second) * l.p.set.kaFactor
	if d >= float64(maxTicks)*float64(tickDuration) {
		return maxTicks // a factor so large the Duration would overflow
	}
	return ticksFor(time.Duration(d))
}

// peekFailed refuses a device whose first bytes are not an acceptable
// CONNECT. Where MQTT defines a CONNACK for the fault it is sent in the
// device's dialect; a malformed packet is closed without one
// [MQTT-4.8.0-1]. level is what ParseConnect read of the refused packet's
// protocol level (0 when it got no further).
func (l *loop) peekFailed(c *conn, level byte, err error) {
	if err == mqttwire.ErrNeedMore {
		return
	}
	if err == mqttwire.ErrNotMQTT {
		l.reject(c, reasonNotMQTT)
		return
	}
	var me *mqttwire.Error
	switch {
	case err == mqttwire.ErrTooLarge:
		l.reject(c, reasonTooLarge)
	case !errors.As(err, &me):
		l.reject(c, reasonMalformed)
	case me.Reason == mqttwire.UnsupportedProtocolVersion:
		// [MQTT-3.1.2-2] answer 0x01 unacceptable protocol level; the
		// device's own level is unknown, so the 3.1.1 form is sent.
		l.refuse(c, mqttwire.Level311, mqttwire.UnsupportedProtocolVersion, reasonUnsupported)
	case me.Reason == mqttwire.ClientIdentifierNotValid:
		// [MQTT-3.1.3-9] identifier rejected.
		if level == 0 {
			level = mqttwire.Level311
		}
		l.refuse(c, level, mqttwire.ClientIdentifierNotValid, reasonClientIDInvalid)
	default:
		l.reject(c, reasonMalformed)
	}
}

// ---- route ---------------------------------------------------------------

// route maps the client ID to a shard and instance.
func (l *loop) route(c *conn, cn *mqttwire.Connect) {
	snap := l.p.router.Load()
	var (
		r  backend.Route
		ok bool
	)
	switch {
	case cn.ClientID == "" && l.p.set.emptyReject:
		l.refuse(c, c.level, mqttwire.ClientIdentifierNotValid, reasonClientIDInvalid)
		return
	case cn.ClientID == "":
		// A zero-length ID (3.1.1 clean session, or 5.0 asking for an
		// assigned one) routes by source address, so a device keeps its
		// broker across reconnects from the same address.
		r, ok = snap.RouteAddr(c.src)
	case len(cn.ClientID) > l.p.set.maxClientID:
		l.refuse(c, c.level, mqttwire.ClientIdentifierNotValid, reasonClientIDInvalid)
		return
	default:
		r, ok = snap.RouteString(cn.ClientID)
	}
	if !ok || r.Instance == nil {
		l.refuse(c, c.level, mqttwire.ServerUnavailable, reasonNoInstance)
		return
	}
	c.hs.inst, c.hs.shard = r.Instance, r.Shard
	l.admit(c)
}

// ---- admit ---------------------------------------------------------------

// admit applies the shard's token bucket and the per-source limit.
func (l *loop) admit(c *conn) {
	ok, reason := l.p.admission.Admit(c.hs.shard, c.src)
	if !ok {
		if ok, n := l.p.admitLog.Allow(reason); ok {
			l.p.log.Warn("device refused by admission", "reason", reason,
				"src", c.src, "shard", c.hs.shard, "suppressed", n)
		}
		l.refuse(c, c.level, mqttwire.ServerBusy, reason)
		return
	}
	c.flags |= fAdmitted
	l.dial(c)
}

// ---- dial ----------------------------------------------------------------

// dial starts the nonblocking connect to the instance.
func (l *loop) dial(c *conn) {
	hs := c.hs
	hs.dialed = time.Now()
	fd, inProgress, err := l.p.dialer.Start(hs.inst.Addr)
	if err == nil && fd >= len(l.p.table) {
		sysClose(fd)
		err = unix.EMFILE
	}
	if err != nil {
		l.dialFailed(c, err)
		return
	}
	c.bk = int32(fd)
	l.p.table[fd].Store(c)
	c.state = stDial
	// The device is not read while dialling: what it sends waits in its
	// socket buffer and a hang-up is seen once the relay starts. It stays
	// in the epoll set, though: nearly every device sends nothing more
	// before its CONNACK, and taking it out and back would cost two
	// epoll_ctl calls per connect. One that does speak is taken out then
	// (dispatch).
	// From the end of the current tick, like the CONNECT deadline.
	l.wheel.reset(&c.timer, l.now+1+l.p.set.dialTicks)
	if !inProgress {
		l.dialDone(c, unix.EPOLLOUT)
		return
	}
	// Over loopback (and to any broker near enough) the handshake has
	// usually completed within connect(2), and the replay can be written
	// at once. A socket still connecting refuses the write with EAGAIN,
	// and replayWrite then waits for EPOLLOUT, which also reports a
	// failed connect (as EPOLLERR, the write then failing).
	l.replay(c)
}

// dialDone runs when the broker socket became writable or failed. A failed
// connect sets the socket's error, which epoll reports as EPOLLERR (with
// EPOLLHUP once the socket is closed), so EPOLLOUT alone is success and
// SO_ERROR is read only to name a failure; a failure after the wakeup
// surfaces in the replay's write.
func (l *loop) dialDone(c *conn, ev uint32) {
	if ev&(unix.EPOLLERR|unix.EPOLLHUP) != 0 {
		err := Finish(int(c.bk))
		if err == nil {
			err = unix.ECONNRESET // hung up without an error: not connected
		}
		l.dialFailed(c, err)
		return
	}
	l.replay(c)
}

// dialFailed drops the broker socket and answers server unavailable.
func (l *loop) dialFailed(c *conn, err error) {
	if ok, n := l.p.dialLog.Allow("dial"); ok {
		l.p.log.Warn("backend dial failed", "instance", c.hs.inst.ID, "address", c.hs.inst.Addr,
			"err", err, "suppressed", n)
	}
	l.dropFD(c, false)
	c.bk = -1
	l.refuse(c, c.level, mqttwire.ServerUnavailable, reasonDialFailed)
}

// ---- replay --------------------------------------------------------------

// replay writes the optional PROXY v2 header and every byte read from the
// device, unchanged, to the broker.
func (l *loop) replay(c *conn) {
	hs := c.hs
	c.state = stReplay
	if l.p.set.proxyV2 {
		var local netip.AddrPort
		if sa, err := unix.Getsockname(int(c.dev)); err == nil {
			local = addrPortOf(sa)
		}
		b := make([]byte, 0, ProxyV2MaxLen+len(hs.peek))
		b = AppendProxyV2(b, netip.AddrPortFrom(c.src, hs.srcPort), local)
		hs.hdr = len(b)
		hs.peek = append(b, hs.peek...)
	}
	l.replayWrite(c)
}

// replayWrite continues the replay; a partial write waits for EPOLLOUT.
func (l *loop) replayWrite(c *conn) {
	hs := c.hs
	n, err := sysWrite(int(c.bk), hs.peek[hs.off:])
	if err != nil && err != unix.EAGAIN && err != unix.EINTR {
		l.dialFailed(c, err)
		return
	}
	if n > 0 && hs.off == 0 {
		// The first byte taken: the connect is known to have completed.
		l.p.metrics.BackendDial.Observe(time.Since(hs.dialed).Seconds())
	}
	hs.off += max(n, 0)
	if hs.off < len(hs.peek) {
		l.setInterest(c, false, evOut)
		return
	}
	l.relayStart(c)
}

// ---- relay ---------------------------------------------------------------

// relayStart hands the connection over to the relay and forgets the
// handshake.
func (l *loop) relayStart(c *conn) {
	hs := c.hs
	m := l.p.metrics
	m.Handoff.Observe(time.Since(hs.accepted).Seconds())
	m.connOK.Inc()
	dev := hs.peek[hs.hdr:]
	l.bytesUp += uint64(len(dev))
	// The CONNECT is one packet; whatever the device sent after it is
	// framed like any later byte.
	k, err := c.upF.Feed(dev[hs.connLen:])
	l.pktUp += uint64(k) + 1
	c.gauge = l.activeGaugeFor(hs.shard, hs.inst.ID)
	c.gauge.g.Inc()
	c.gauge.n++
	c.gauge.inst.n.Add(1)
	c.flags |= fCounted
	l.freeHandshake(c.hs)
	c.hs = nil
	c.state = stRelay
	c.lastDev = l.now
	if err != nil {
		l.closeConn(c)
		return
	}
	if c.level == mqttwire.Level5 {
		c.flags |= fConnack
	}
	l.armKeepalive(c)
	l.syncInterest(c)
}

// armKeepalive sets the keepalive timer of a relaying connection from its
// device's last byte, or disarms it when the silence allowed is unlimited.
func (l *loop) armKeepalive(c *conn) {
	if c.flags&fDrain != 0 {
		return // the timer bounds the drain's wait for a boundary
	}
	if c.kaTicks == 0 {
		l.wheel.remove(&c.timer)
		return
	}
	l.wheel.reset(&c.timer, c.idleDue())
}

// idleDue is the tick at which the device's silence exceeds kaTicks. lastDev
// is the tick in which its last byte was read, up to a whole tick after that
// tick began, so the allowance counts from the tick's end: counted from
// lastDev itself, a device was cut up to one tick before 1.5 × its keepalive
// had passed, which [MQTT-3.1.2-24] does not allow.
func (c *conn) idleDue() uint32 { return c.lastDev + 1 + c.kaTicks }

// relay handles an epoll event on either socket of a relaying connection.
// HUP and ERR wake whichever operation is waited for; the read or write then
// reports what happened.
func (l *loop) relay(c *conn, isDev bool, ev uint32) {
	mask := c.bkEv
	if isDev {
		mask = c.devEv
	}
	wake := ev&(unix.EPOLLERR|unix.EPOLLHUP) != 0
	if mask&evOut != 0 && (wake || ev&unix.EPOLLOUT != 0) {
		// This fd is the destination of the other direction's pending
		// bytes: to the device, the downstream ones.
		l.flush(c, !isDev)
		if c.state != stRelay {
			return
		}
	}
	if mask&evIn != 0 && (wake || ev&unix.EPOLLIN != 0) {
		l.relayRead(c, isDev, ev&unix.EPOLLRDHUP != 0)
		if c.state != stRelay {
			return
		}
	}
	if c.flags&fDrain != 0 {
		l.drainStep(c)
		return
	}
	l.syncInterest(c)
}

// relayRead reads once from one side into the loop's buffer and writes it to
// the other side. What the destination cannot take is copied to a lent
// buffer and the source is paused until it is flushed (backpressure: at most
// one buffer per direction). rdhup says epoll saw the source's FIN before
// the read: a read that then leaves room in the buffer has taken every byte
// before the FIN, so the FIN is handled now instead of by one more read
// that would return 0.
func (l *loop) relayRead(c *conn, fromDev bool, rdhup bool) {
	src, dst := c.dev, c.bk
	if !fromDev {
		src, dst = dst, src
	}
	n, err := sysRead(int(src), l.buf)
	switch {
	case err == unix.EAGAIN || err == unix.EINTR:
		return
	case err != nil:
		l.closeConn(c)
		return
	case n == 0:
		l.relayEOF(c, fromDev)
		return
	}
	// The FIN of a short read is taken below, except while draining.
	l.readAgain(c, fromDev, n, rdhup && (n == len(l.buf) || c.flags&fDrain != 0))
	b := l.buf[:n]
	if c.flags&fDrain != 0 {
		if b = drainCut(c, fromDev, b); len(b) == 0 {
			return
		}
		n = len(b)
	}
	var k int
	if fromDev {
		c.lastDev = l.now
		l.bytesUp += uint64(n)
		k, err = c.upF.Feed(b)
		l.pktUp += uint64(k)
	} else {
		l.bytesDown += uint64(n)
		if c.flags&fConnack != 0 {
			l.watchConnack(c, b)
		}
		k, err = c.downF.Feed(b)
		l.pktDown += uint64(k)
	}
	if err != nil {
		// A remaining length of five bytes: the stream cannot be framed
		// and the receiver would close anyway [MQTT-4.8.0-1].
		l.closeConn(c)
		return
	}
	w, err := sysWrite(int(dst), b)
	if err != nil && err != unix.EAGAIN && err != unix.EINTR {
		l.closeConn(c)
		return
	}
	w = max(w, 0)
	if w < n {
		p := l.lend()
		p.end = copy(p.buf, b[w:])
		if fromDev {
			c.up = p
		} else {
			c.down = p
		}
	}
	// A connection being drained cut b at a packet boundary and reads
	// its FIN the usual way.
	if rdhup && n < len(l.buf) && c.flags&fDrain == 0 {
		l.relayEOF(c, fromDev)
	}
}

// flush writes pending bytes of one direction (up: to the broker). When the
// buffer is empty it goes back to the loop, and a FIN seen meanwhile is
// passed on.
func (l *loop) flush(c *conn, up bool) {
	p, dst := c.down, c.dev
	if up {
		p, dst = c.up, c.bk
	}
	if p == nil {
		return
	}
	n, err := sysWrite(int(dst), p.buf[p.off:p.end])
	if err != nil && err != unix.EAGAIN && err != unix.EINTR {
		l.closeConn(c)
		return
	}
	p.off += max(n, 0)
	if p.off < p.end {
		return
	}
	l.giveBack(p)
	if up {
		c.up = nil
		if c.flags&fUpEOF != 0 {
			l.passFIN(c, true)
		}
	} else {
		c.down = nil
		if c.flags&fDownEOF != 0 {
			l.passFIN(c, false)
		}
	}
}

// relayEOF handles a FIN from one side: stop reading it (level-triggered
// epoll would report the EOF forever) and pass the FIN on once the pending
// bytes of that direction are written.
func (l *loop) relayEOF(c *conn, fromDev bool) {
	if fromDev {
		c.flags |= fUpEOF
		if c.up == nil {
			l.passFIN(c, true)
		}
	} else {
		c.flags |= fDownEOF
		if c.down == nil {
			l.passFIN(c, false)
		}
	}
}

// passFIN half-closes the destination of one direction; when both directions
// are done the connection is closed. The last FIN is sent by the close
// itself, without a shutdown: both peers' FINs have been read then, so
// nothing unread is left to turn the close into a reset.
func (l *loop) passFIN(c *conn, up bool) {
	dst, flag, other := c.dev, fDownShut, fUpShut
	if up {
		dst, flag, other = c.bk, fUpShut, fDownShut
	}
	if c.flags&other != 0 || !up && c.closeWaiting() {
		// Both peers have sent their FIN (in close_wait the device's
		// is still to pass on, and the close sends it).
		c.flags |= fUpShut | fDownShut
		l.closeConn(c)
		return
	}
	if up && c.flags&flag == 0 && l.p.set.closeWait > 0 &&
		c.upF.AtBoundary() && c.upF.LastType() == mqttwire.DISCONNECT {
		// The device said goodbye, so the broker closes now, and the
		// side that closes first keeps the connection's TIME_WAIT:
		// let it be the broker's, not one of the proxy's ports
		// towards it. The broker's FIN closes the connection (the
		// branch above); if it has not come within close_wait, the
		// timer passes the device's on (closeWaitOver).
		l.wheel.reset(&c.timer, l.now+1+l.p.set.closeWait)
		return
	}
	if c.flags&flag == 0 {
		c.flags |= flag
		if err := sysShutdown(int(dst), unix.SHUT_WR); err != nil {
			l.closeConn(c)
			return
		}
	}
	if c.flags&(fUpShut|fDownShut) == fUpShut|fDownShut {
		l.closeConn(c)
	}
}

// closeWaiting reports whether the device has sent its FIN after a
// DISCONNECT and the proxy holds it back while the broker closes (passFIN):
// otherwise a device FIN with nothing pending upstream is passed on at once.
func (c *conn) closeWaiting() bool {
	return c.flags&(fUpEOF|fUpShut) == fUpEOF && c.up == nil
}

// closeWaitOver passes on the device's FIN that close_wait held back: the
// broker did not close in that time. The connection goes on as any
// half-closed one, under its keepalive timer (none for keepalive 0).
func (l *loop) closeWaitOver(c *conn) {
	c.flags |= fUpShut
	if err := sysShutdown(int(c.bk), unix.SHUT_WR); err != nil {
		l.closeConn(c)
		return
	}
	l.armKeepalive(c)
}

// syncInterest sets both fds' epoll interest from the relay state: read a
// side unless it sent FIN or its direction has bytes pending; wait for
// writability where bytes are pending.
func (l *loop) syncInterest(c *conn) {
	var dev, bk uint8
	if c.flags&fUpEOF == 0 && c.up == nil {
		dev |= evIn
	}
	if c.down != nil {
		dev |= evOut
	}
	if c.flags&fDownEOF == 0 && c.down == nil {
		bk |= evIn
	}
	if c.up != nil {
		bk |= evOut
	}
	if c.flags&fDrain != 0 {
		// Being moved: read each side only up to its next packet
		// boundary (drainCut); at the boundary it waits for drainFinish.
		if c.upF.AtBoundary() {
			dev &^= evIn
		}
		if c.downF.AtBoundary() {
			bk &^= evIn
		}
	}
	if l.setInterest(c, true, dev) {
		l.setInterest(c, false, bk)
	}
}

// ---- server keep alive -----------------------------------------------------

// errNoConnack: an MQTT 5 broker's first packet was neither AUTH nor CONNACK.
var errNoConnack = errors.New("broker's first packet is not a CONNACK")

// watchConnack reads the first bytes an MQTT 5 broker sends, before they are
// framed, for its CONNACK: a Server Keep Alive there replaces the keepalive
// the device sent [MQTT-3.2.2-21], and the proxy enforces the one the device
// now uses. AUTH packets of an enhanced authentication (§4.12) may come
// first and are skipped. The CONNACK is parsed where it lies in the loop's
// buffer, which is the whole of it on nearly every connection; only when a
// read ends inside it are its bytes collected, at most MaxConnackSize.
func (l *loop) watchConnack(c *conn, b []byte) {
	if c.hs != nil {
		l.collectConnack(c, b)
		return
	}
	f := c.downF // the framing before b
	for len(b) > 0 {
		if !f.AtBoundary() {
			// The rest of an AUTH packet.
			k := f.Split(b)
			f.Feed(b[:k])
			b = b[k:]
			continue
		}
		switch b[0] >> 4 {
		case mqttwire.AUTH:
			f.Feed(b[:1])
			b = b[1:]
		case mqttwire.CONNACK:
			p, err := mqttwire.ParseConnackProperties(b)
			if err == mqttwire.ErrNeedMore {
				c.hs = l.newHandshake()
				l.collectConnack(c, b)
				return
			}
			l.serverKeepAlive(c, p, err)
			return
		default:
			// [MQTT-3.2.0-1] a server's first packet is CONNACK.
			l.serverKeepAlive(c, mqttwire.ConnackProperties{}, errNoConnack)
			return
		}
	}
}

// collectConnack appends the next bytes of a CONNACK that did not end within
// one read to c.hs.peek, no more than the packet needs, and parses it once
// it is whole.
func (l *loop) collectConnack(c *conn, b []byte) {
	acc := c.hs.peek
	for len(b) > 0 {
		need := mqttwire.MaxFixedHeader - len(acc) // until the length is known
		if _, _, total, err := mqttwire.FixedHeader(acc); err == nil {
			need = total - len(acc)
		}
		k := min(len(b), max(need, 1))
		acc = append(acc, b[:k]...)
		b = b[k:]
		p, err := mqttwire.ParseConnackProperties(acc)
		if err != mqttwire.ErrNeedMore {
			c.hs.peek = acc
			l.serverKeepAlive(c, p, err)
			return
		}
	}
	c.hs.peek = acc
}

// serverKeepAlive ends the watch for the CONNACK and sets the silence
// allowed from what it said: the Server Keep Alive of an accepting CONNACK
// replaces the device's keepalive, 0 turning it off (keepalive.max_idle).
// A broker whose answer cannot be read may have set any keepalive, so then
// the device gets the longest it could have been given: the proxy never
// cuts a device the broker keeps (and the broker still enforces its own).
func (l *loop) serverKeepAlive(c *conn, p mqttwire.ConnackProperties, err error) {
	c.flags &^= fConnack
	if c.hs != nil {
		l.freeHandshake(c.hs)
		c.hs = nil
	}
	switch {
	case err != nil:
		c.kaTicks = longer(c.kaTicks, l.kaTicksFor(math.MaxUint16))
	case p.Reason != mqttwire.Success || !p.HasServerKeepAlive:
		return
	default:
		c.kaTicks = l.kaTicksFor(p.ServerKeepAlive)
	}
	l.armKeepalive(c)
}

// longer returns the longer of two allowances of silence, 0 being unlimited.
func longer(a, b uint32) uint32 {
	if a == 0 || b == 0 {
		return 0
	}
	return max(a, b)
}

// ---- refuse / linger -------------------------------------------------------

// refuse answers a device with a CONNACK carrying reason in its dialect,
// half-closes, and lingers until the device closes.
func (l *loop) refuse(c *conn, level byte, reason mqttwire.ReasonCode, metric string) {
	l.p.metrics.reject(metric)
	l.releaseAdmission(c)
	var ack [8]byte
	b := mqttwire.AppendConnack(ack[:0], level, false, reason)
	// A CONNACK is 4 or 5 bytes: a fresh socket's send buffer takes it.
	if _, err := sysWrite(int(c.dev), b); err != nil {
		l.closeConn(c)
		return
	}
	if err := sysShutdown(int(c.dev), unix.SHUT_WR); err != nil {
		l.closeConn(c)
		return
	}
	c.state = stLinger
	if !l.setInterest(c, true, evIn) {
		return
	}
	l.wheel.reset(&c.timer, l.now+lingerTicks)
}

// linger discards what a refused device still sends until it closes.
func (l *loop) linger(c *conn, rdhup bool) {
	n, err := sysRead(int(c.dev), l.buf)
	if err == unix.EAGAIN || err == unix.EINTR {
		return
	}
	if err != nil || n == 0 {
		l.closeConn(c)
		return
	}
	l.readAgain(c, true, n, rdhup)
}

// reject counts a refused handshake and closes without an answer.
func (l *loop) reject(c *conn, reason string) {
	l.p.metrics.reject(reason)
	l.closeConn(c)
}

// ---- timers ----------------------------------------------------------------

// expire handles a connection's timer: the CONNECT deadline, the dial
// timeout, the keepalive allowance or the end of a linger.
func (l *loop) expire(t *timer) {
	c := connOf(t)
	switch c.state {
	case stPeek:
		l.reject(c, reasonTimeout)
	case stDial, stReplay:
		l.dialFailed(c, unix.ETIMEDOUT)
	case stRelay:
		if c.flags&fDrain != 0 {
			// No packet boundary within drainBoundaryTicks.
			l.closeConn(c)
			return
		}
		if c.closeWaiting() {
			l.closeWaitOver(c)
			return
		}
		if due := c.idleDue(); int32(due-l.now) > 0 {
			// The device spoke since the timer was set.
			l.wheel.add(t, due)
			return
		}
		if c.flags&fUpEOF == 0 {
			// A device that closed its side is not idle.
			l.idleCloses++
		}
		l.closeConn(c)
	case stLinger, stDrained:
		l.closeConn(c)
	}
}

// ---- close -----------------------------------------------------------------

// closeConn forgets a connection: counts, releases admission, returns
// buffers, and queues both fds for close after the current event batch (so a
// later event of the batch cannot meet a reused fd number).
func (l *loop) closeConn(c *conn) {
	if c.state == stClosed {
		return
	}
	l.wheel.remove(&c.timer)
	l.dropFD(c, true)
	if c.bk >= 0 {
		l.dropFD(c, false)
	}
	if c.up != nil {
		l.giveBack(c.up)
		c.up = nil
	}
	if c.down != nil {
		l.giveBack(c.down)
		c.down = nil
	}
	l.releaseAdmission(c)
	if c.flags&fCounted != 0 {
		c.gauge.g.Dec()
		c.gauge.n--
		c.gauge.inst.n.Add(-1)
		c.flags &^= fCounted
	}
	if c.hs != nil {
		l.freeHandshake(c.hs)
		c.hs = nil
	}
	c.state = stClosed
	l.active.Add(-1)
}

// releaseAdmission returns the device's admission slot once.
func (l *loop) releaseAdmission(c *conn) {
	if c.flags&fAdmitted != 0 {
		c.flags &^= fAdmitted
		l.p.admission.Release(c.src)
	}
}

// dropFD removes one of the connection's fds from the table and queues it
// for close. The close takes it out of the epoll set (the proxy holds no
// other descriptor of its socket), which spares an EPOLL_CTL_DEL per fd;
// events of the current batch are dropped by the table lookup in dispatch.
func (l *loop) dropFD(c *conn, dev bool) {
	fd := c.bk
	if dev {
		fd = c.dev
	}
	if fd < 0 {
		return
	}
	if dev {
		c.devEv = 0
	} else {
		c.bkEv = 0
	}
	l.p.table[fd].Store(nil)
	l.closing = append(l.closing, int(fd))
}

// setInterest registers, changes or removes one fd's epoll interest. On
// failure the connection is closed and false returned. Connection fds are
// edge-triggered, so a side whose FIN has been read stays registered with
// nothing to wait for: no further EPOLLIN edge can come, and the rare
// EPOLLERR, EPOLLHUP or EPOLLOUT edge left is reported once and ignored by
// relay. That spares the EPOLL_CTL_DEL a level-triggered fd needs there
// (its EOF would be reported on every wait), one per connection.
func (l *loop) setInterest(c *conn, dev bool, want uint8) bool {
	fd, cur, eof := c.bk, &c.bkEv, c.flags&fDownEOF != 0
	if dev {
		fd, cur, eof = c.dev, &c.devEv, c.flags&fUpEOF != 0
	}
	have, reg := *cur&^evReg, *cur&evReg != 0
	if have == want {
		return true // an fd with interest is registered
	}
	var op int
	switch {
	case want == 0 && eof:
		*cur = evReg
		return true
	case want == 0:
		op = unix.EPOLL_CTL_DEL
	case !reg:
		op = unix.EPOLL_CTL_ADD
	default:
		// A MOD, like an ADD, reports what is ready at once: an edge
		// that came while the fd was not read is not lost.
		op = unix.EPOLL_CTL_MOD
	}
	ev := unix.EpollEvent{Events: unix.EPOLLET, Fd: fd}
	if want&evIn != 0 {
		// EPOLLRDHUP: a FIN that comes with the last bytes is known
		// without a second read (relayRead).
		ev.Events |= unix.EPOLLIN | unix.EPOLLRDHUP
	}
	if want&evOut != 0 {
		ev.Events |= unix.EPOLLOUT
	}
	if err := sysEpollCtl(l.epfd, op, int(fd), &ev); err != nil {
		l.p.log.Error("epoll_ctl", "fd", fd, "op", op, "err", err)
		*cur = 0 // not registered, whatever it was
		l.closeConn(c)
		return false
	}
	*cur = want
	if want != 0 {
		*cur |= evReg
	}
	return true
}
