package proxy

import (
	"errors"
	"fmt"
	"net/netip"
	"os"
	"strconv"
	"sync/atomic"
	"syscall"
	"time"
	"unsafe"

	"golang.org/x/sys/unix"
)

const (
	// relayBufSize is the loop's read buffer, shared by all its
	// connections, and the size of a lent backpressure buffer.
	relayBufSize = 64 << 10
	// maxEvents is how many epoll events one wakeup takes.
	maxEvents = 256
	// acceptBatch bounds the accepts per listener per wakeup, so a storm
	// of new devices does not starve the connections already relaying;
	// the listener is level-triggered and reports the rest next turn.
	acceptBatch = 64
	// maxFreeBufs bounds the lent buffers a loop keeps for reuse.
	maxFreeBufs = 64
	// maxFreeHandshakes bounds the handshake records a loop keeps for
	// reuse, and keptPeek the peek buffer size kept with one: a connect
	// storm then allocates almost nothing per device.
	maxFreeHandshakes = 256
	keptPeek          = 1 << 10
)

// Kinds of epoll registrations, kept in EpollEvent.Pad. Connection fds carry
// kindConn and are looked up in the fd table; a listener carries
// kindListener+its index.
const (
	kindConn     int32 = 0
	kindWake     int32 = 1
	kindListener int32 = 2
)

// loop is one event loop: an epoll set over its own listener sockets and the
// connections they accepted. Everything in it is touched by its goroutine
// only, except active (read by Proxy.Active) and the wake eventfd.
type loop struct {
	p    *Proxy
	id   uint16
	epfd int
	// poll is epfd registered with the Go runtime's network poller: the
	// loop parks on it instead of blocking in epoll_wait (see wait).
	poll     *os.File
	pollRaw  syscall.RawConn
	pollFn   func(uintptr) bool // l.pollOnce, bound once
	nready   int                // what pollOnce found
	pollErr  error
	deadline time.Time // poll's read deadline as last set; zero: none
	wake     int       // eventfd: Shutdown writes it to get the loop's attention
	spare    int       // an fd on /dev/null, given up to accept-and-close on EMFILE

	listeners []listener
	ready     []bool // listeners reported readable in this batch
	// paused counts listeners taken out of epoll because the loop could
	// neither accept nor shed (see pauseListener); they are put back at
	// tick resumeAt.
	paused   int
	resumeAt uint32

	buf    []byte
	events []unix.EpollEvent
	wheel  *wheel
	start  time.Time
	now    uint32 // current tick

	closing []int // fds to close after the current batch
	// again holds the reads that may have left bytes or a FIN behind:
	// their fds are edge-triggered, so each is read once more after the
	// batch (readAgain); againSpare is the other half of the double buffer.
	again, againSpare []againRead
	free              []*pend
	freeHS            []*handshake

	active atomic.Int64 // connections owned (handshaking and relaying)
	gauges map[gaugeKey]*activeGauge

	drainState map[*drain]*loopDrain // this loop's progress through each drain
	drainMore  bool                  // a drain scan stopped at its chunk: come back at once

	// Hot counters, added to Metrics once per tick.
	bytesUp, bytesDown uint64
	pktUp, pktDown     uint64
	idleCloses         uint64
	lent, lentFlushed  int64
	flushedAt          uint32

	done chan struct{}
}

// againRead is one side of a connection to read again without an epoll
// event; rdhup: epoll reported the side's FIN behind the bytes left.
type againRead struct {
	c     *conn
	dev   bool
	rdhup bool
}

type gaugeKey struct {
	shard int
	id    string
}

// newLoop creates a loop with its epoll set and wake eventfd; the listeners
// are added by the caller.
func newLoop(p *Proxy, id int) (*loop, error) {
	l := &loop{
		p:      p,
		id:     uint16(id),
		epfd:   -1,
		wake:   -1,
		spare:  -1,
		buf:    make([]byte, relayBufSize),
		events: make([]unix.EpollEvent, maxEvents),
		start:  time.Now(),
		gauges: make(map[gaugeKey]*activeGauge),
		done:   make(chan struct{}),

		drainState: make(map[*drain]*loopDrain),
	}
	l.wheel = newWheel(0)
	var err error
	if l.epfd, err = unix.EpollCreate1(unix.EPOLL_CLOEXEC); err != nil {
		return nil, fmt.Errorf("event loop %d: epoll_create: %w", id, err)
	}
	// A nonblocking epoll fd can be registered with the runtime's own
	// epoll set; it reads ready while it has events to report.
	if err := unix.SetNonblock(l.epfd, true); err != nil {
		l.closeFDs()
		return nil, fmt.Errorf("event loop %d: epoll fd nonblocking: %w", id, err)
	}
	l.poll = os.NewFile(uintptr(l.epfd), "epoll")
	if l.pollRaw, err = l.poll.SyscallConn(); err != nil {
		l.closeFDs()
		return nil, fmt.Errorf("event loop %d: epoll fd: %w", id, err)
	}
	l.pollFn = l.pollOnce
	if l.wake, err = unix.Eventfd(0, unix.EFD_NONBLOCK|unix.EFD_CLOEXEC); err != nil {
		l.wake = -1
		l.closeFDs()
		return nil, fmt.Errorf("event loop %d: eventfd: %w", id, err)
	}
	ev := unix.EpollEvent{Events: unix.EPOLLIN, Fd: int32(l.wake), Pad: kindWake}
	if err := unix.EpollCtl(l.epfd, unix.EPOLL_CTL_ADD, l.wake, &ev); err != nil {
		unix.Close(l.wake)
		l.closeFDs()
		return nil, fmt.Errorf("event loop %d: epoll_ctl eventfd: %w", id, err)
	}
	if l.spare, err = unix.Open("/dev/null", unix.O_RDONLY|unix.O_CLOEXEC, 0); err != nil {
		l.spare = -1
		unix.Close(l.wake)
		l.closeFDs()
		return nil, fmt.Errorf("event loop %d: open spare fd: %w", id, err)
	}
	return l, nil
}

// addListener registers a listener socket with the loop.
func (l *loop) addListener(ln listener) error {
	ev := unix.EpollEvent{Events: unix.EPOLLIN, Fd: int32(ln.fd), Pad: kindListener + int32(len(l.listeners))}
	if err := unix.EpollCtl(l.epfd, unix.EPOLL_CTL_ADD, ln.fd, &ev); err != nil {
		return fmt.Errorf("listen %s: epoll_ctl: %w", ln.addr, err)
	}
	l.listeners = append(l.listeners, ln)
	l.ready = append(l.ready, false)
	return nil
}

// closeFDs closes the loop's own fds (not connections), except the wake
// eventfd, which the Proxy closes once the loop has exited.
func (l *loop) closeFDs() {
	l.closeListeners()
	if l.poll != nil {
		l.poll.Close() // closes epfd
		l.poll, l.epfd = nil, -1
	}
	for _, fd := range []*int{&l.epfd, &l.spare} {
		if *fd >= 0 {
			unix.Close(*fd)
			*fd = -1
		}
	}
}

// closeListeners stops accepting. Connections still in the kernel's accept
// queue of this socket are reset (or, with the other loops' sockets still
// open, not: the kernel only queues on open ones).
func (l *loop) closeListeners() {
	l.paused = 0
	for i := range l.listeners {
		l.listeners[i].paused = false
		if l.listeners[i].fd >= 0 {
			if l.epfd >= 0 {
				unix.EpollCtl(l.epfd, unix.EPOLL_CTL_DEL, l.listeners[i].fd, nil)
			}
			unix.Close(l.listeners[i].fd)
			l.listeners[i].fd = -1
		}
	}
}

// tick returns the current tick number.
func (l *loop) tick() uint32 { return uint32(time.Since(l.start) / tickDuration) }

// run is the loop's goroutine: wait, dispatch the batch, fire timers, close
// what the batch closed, accept, flush counters; until shut down.
func (l *loop) run() {
	defer close(l.done)
	defer l.closeFDs()
	stopping := false
	for {
		n, err := l.wait()
		if err != nil && err != unix.EINTR {
			l.p.log.Error("event loop stopped", "loop", l.id, "err", err)
			l.closeAll()
			l.finishBatch()
			l.flushCounters()
			return
		}
		l.now = l.tick()
		// A full batch: events queued while the loop's thread was busy.
		// (Not fewer: at 20k msg/s on one thread a burst of 64 comes now
		// and then and takes a millisecond; a storm shows first as
		// accept batches that do not empty their queue.)
		if n == len(l.events) && l.p.busy != nil {
			l.p.busy()
		}
		for i := 0; i < n; i++ {
			ev := &l.events[i]
			switch {
			case ev.Pad == kindConn:
				l.dispatch(ev.Fd, ev.Events)
			case ev.Pad == kindWake:
				var b [8]byte
				unix.Read(l.wake, b[:])
			default:
				l.ready[ev.Pad-kindListener] = true
			}
		}
		l.readAgainTurn()
		l.wheel.advance(l.now, l.expire)
		l.finishBatch()
		// Accept after the batch, never in it: a new fd may reuse the
		// number of one closed in the batch whose events are still
		// queued behind.
		if l.paused > 0 && int32(l.now-l.resumeAt) >= 0 {
			l.resumeListeners()
		}
		for i, r := range l.ready {
			if r {
				l.ready[i] = false
				if l.acceptFrom(i) && l.p.busy != nil {
					l.p.busy()
				}
			}
		}
		l.drainMore = false
		if ds := l.p.drains.Load(); ds != nil && len(*ds) > 0 {
			l.drainTurn(*ds)
			l.finishBatch()
		}
		if l.now != l.flushedAt {
			l.flushCounters()
		}
		switch l.p.state.Load() {
		case stateRunning:
		case stateDraining:
			if !stopping {
				stopping = true
				l.closeListeners()
			}
			if l.active.Load() == 0 {
				// Accepts of this turn may have queued closes (a
				// failed EPOLL_CTL_ADD) after the batch was finished.
				l.finishBatch()
				l.flushCounters()
				return
			}
		default: // stateForce
			l.closeListeners()
			l.closeAll()
			l.finishBatch()
			l.flushCounters()
			return
		}
	}
}

// wait returns the next batch of events. It asks epoll without blocking
// and, when nothing is ready, parks the goroutine on the epoll fd in the
// runtime's network poller until it is readable or the next tick is due.
// A loop blocked in epoll_wait itself would be a goroutine in a blocking
// system call: the runtime's monitor thread then wakes every 20 µs to take
// its P away, and the loop pays to get one back on each return; parked, it
// costs the runtime what any idle network connection does.
func (l *loop) wait() (int, error) {
	if l.drainMore || len(l.again) > 0 {
		return epollWaitNow(l.epfd, l.events)
	}
	var due time.Time // zero: no deadline, the wake eventfd interrupts
	if l.wheel.n != 0 || l.dirty() || l.paused != 0 {
		due = l.start.Add(time.Duration(l.wheel.cur) * tickDuration)
	}
	if due != l.deadline {
		if err := l.poll.SetReadDeadline(due); err != nil {
			return 0, err
		}
		l.deadline = due
	}
	l.nready, l.pollErr = 0, nil
	// Read calls pollOnce first and parks only when it found nothing.
	if err := l.pollRaw.Read(l.pollFn); err != nil {
		if errors.Is(err, os.ErrDeadlineExceeded) {
			return 0, nil
		}
		return 0, err
	}
	return l.nready, l.pollErr
}

// pollOnce is the body of wait's park: done once epoll has events or fails.
func (l *loop) pollOnce(uintptr) bool {
	l.nready, l.pollErr = epollWaitNow(l.epfd, l.events)
	return l.nready > 0 || (l.pollErr != nil && l.pollErr != unix.EINTR)
}

// The loop's system calls on its nonblocking sockets and epoll set. None of
// them can sleep, so they are raw: they skip the runtime's bookkeeping for a
// call that might (entersyscall/exitsyscall). With it, a call that does the
// loopback peer's TCP work in its own context (a write, connect, shutdown or
// close delivers there and then) could outlast 20 µs and have the runtime's
// monitor thread hand the loop's P to another thread, waking every 20 µs
// while it found such calls.

func sysRead(fd int, b []byte) (int, error) {
	var p unsafe.Pointer
	if len(b) > 0 {
		p = unsafe.Pointer(&b[0])
	}
	r, _, e := unix.RawSyscall(unix.SYS_READ, uintptr(fd), uintptr(p), uintptr(len(b)))
	if e != 0 {
		return -1, e
	}
	return int(r), nil
}

func sysWrite(fd int, b []byte) (int, error) {
	var p unsafe.Pointer
	if len(b) > 0 {
		p = unsafe.Pointer(&b[0])
	}
	r, _, e := unix.RawSyscall(unix.SYS_WRITE, uintptr(fd), uintptr(p), uintptr(len(b)))
	if e != 0 {
		return -1, e
	}
	return int(r), nil
}

// sysClose closes fd. A TCP socket without SO_LINGER does not wait for its
// FIN or its unsent bytes: the kernel finishes in the background.
func sysClose(fd int) error {
	if _, _, e := unix.RawSyscall(unix.SYS_CLOSE, uintptr(fd), 0, 0); e != 0 {
		return e
	}
	return nil
}

func sysShutdown(fd int, how int) error {
	if _, _, e := unix.RawSyscall(unix.SYS_SHUTDOWN, uintptr(fd), uintptr(how), 0); e != 0 {
		return e
	}
	return nil
}

func sysEpollCtl(epfd, op, fd int, ev *unix.EpollEvent) error {
	_, _, e := unix.RawSyscall6(unix.SYS_EPOLL_CTL, uintptr(epfd), uintptr(op), uintptr(fd),
		uintptr(unsafe.Pointer(ev)), 0, 0)
	if e != 0 {
		return e
	}
	return nil
}

// sysAccept4 accepts a connection and returns its peer's address, read from
// the raw sockaddr (no unix.Sockaddr is allocated per device).
func sysAccept4(fd int, flags int) (int, netip.AddrPort, error) {
	var rsa unix.RawSockaddrAny
	n := uint32(unix.SizeofSockaddrAny)
	r, _, e := unix.RawSyscall6(unix.SYS_ACCEPT4, uintptr(fd), uintptr(unsafe.Pointer(&rsa)),
		uintptr(unsafe.Pointer(&n)), uintptr(flags), 0, 0)
	if e != 0 {
		return -1, netip.AddrPort{}, e
	}
	return int(r), addrPortOfRaw(&rsa), nil
}

// epollWaitNow is epoll_wait with a zero timeout. It never blocks, so it
// goes without the runtime's entry and exit bookkeeping of a system call
// that might.
func epollWaitNow(epfd int, events []unix.EpollEvent) (int, error) {
	r, _, e := unix.RawSyscall6(unix.SYS_EPOLL_WAIT, uintptr(epfd),
		uintptr(unsafe.Pointer(&events[0])), uintptr(len(events)), 0, 0, 0)
	if e != 0 {
		return 0, e
	}
	return int(r), nil
}

// dispatch routes an event on a connection fd to its stage.
func (l *loop) dispatch(fd int32, ev uint32) {
	if fd < 0 || int(fd) >= len(l.p.table) {
		return
	}
	c := l.p.table[fd].Load()
	if c == nil || c.owner != l.id {
		// Closed earlier in this batch.
		return
	}
	isDev := fd == c.dev
	rdhup := ev&unix.EPOLLRDHUP != 0
	switch c.state {
	case stPeek:
		if isDev {
			l.peek(c, rdhup)
		}
	case stDial, stReplay:
		switch {
		case isDev:
			// The device spoke (or hung up) before its CONNACK: not
			// read until the relay starts, so out of the epoll set
			// until then (see dial).
			l.setInterest(c, true, 0)
		case c.state == stDial:
			l.dialDone(c, ev)
		default:
			l.replayWrite(c)
		}
	case stRelay:
		l.relay(c, isDev, ev)
	case stLinger:
		if isDev {
			l.linger(c, rdhup)
		}
	case stDrained:
		l.drainedRead(c, isDev, rdhup)
	}
}

// readAgain notes that a read of n bytes from one side of c may have left
// something behind that no new edge of its edge-triggered fd will report:
// more bytes, when the read filled the loop's buffer, or the FIN, when epoll
// reported one with the bytes (rdhup) and the caller has not taken it. The
// side is read once more after the batch.
func (l *loop) readAgain(c *conn, dev bool, n int, rdhup bool) {
	if (n == len(l.buf) || rdhup) && c.state != stClosed {
		l.again = append(l.again, againRead{c, dev, rdhup})
	}
}

// readAgainTurn dispatches the reads noted by readAgain so far in this turn
// as if epoll had reported them; those it notes now wait for the next turn,
// so one fast sender cannot hold the loop.
func (l *loop) readAgainTurn() {
	if len(l.again) == 0 {
		return
	}
	batch := l.again
	l.again = l.againSpare[:0]
	for i := range batch {
		a := &batch[i]
		fd := a.c.bk
		if a.dev {
			fd = a.c.dev
		}
		// A connection closed since has no fds; conns are not reused.
		if a.c.state != stClosed && fd >= 0 {
			ev := uint32(unix.EPOLLIN)
			if a.rdhup {
				ev |= unix.EPOLLRDHUP
			}
			l.dispatch(fd, ev)
		}
		a.c = nil
	}
	l.againSpare = batch[:0]
}

// finishBatch closes the fds of connections closed during the batch.
func (l *loop) finishBatch() {
	for _, fd := range l.closing {
		sysClose(fd)
	}
	l.closing = l.closing[:0]
}

// acceptFrom accepts up to acceptBatch devices from listener i. It reports
// whether it took the whole batch, leaving devices perhaps still queued.
func (l *loop) acceptFrom(i int) bool {
	ln := &l.listeners[i]
	for range acceptBatch {
		if ln.fd < 0 {
			return false
		}
		fd, src, err := sysAccept4(ln.fd, unix.SOCK_NONBLOCK|unix.SOCK_CLOEXEC)
		switch err {
		case nil:
			l.accept(fd, src)
		case unix.EAGAIN:
			return false
		case unix.EINTR, unix.ECONNABORTED:
		case unix.EMFILE, unix.ENFILE:
			if !l.shed(ln) {
				l.pauseListener(i)
				return false
			}
		default:
			// ENOBUFS, ENOMEM, EPERM...: the connection stays queued
			// and the listener readable.
			if ok, _ := l.p.acceptLog.Allow("accept"); ok {
				l.p.log.Error("accept", "listen", ln.addr, "err", err)
			}
			l.pauseListener(i)
			return false
		}
	}
	return true
}

// shed accepts one pending connection and closes it at once, using the spare
// fd: with no fd left the listener stays readable and a level-triggered loop
// would spin on it. It reports whether a connection was shed. A spare lost
// earlier (its reopen failed: another thread took the number freed) is
// taken back first if fds have been freed since.
func (l *loop) shed(ln *listener) bool {
	if l.spare < 0 {
		l.spare, _ = unix.Open("/dev/null", unix.O_RDONLY|unix.O_CLOEXEC, 0)
	}
	if l.spare < 0 {
		return false
	}
	unix.Close(l.spare)
	l.spare = -1
	fd, _, err := unix.Accept4(ln.fd, unix.SOCK_CLOEXEC)
	if err == nil {
		unix.Close(fd)
		l.p.metrics.AcceptsShed.Inc()
	}
	l.spare, _ = unix.Open("/dev/null", unix.O_RDONLY|unix.O_CLOEXEC, 0)
	if ok, _ := l.p.acceptLog.Allow("shed"); ok {
		l.p.log.Error("out of file descriptors: shedding new connections", "listen", ln.addr)
	}
	return err == nil
}

// pauseListener takes listener i out of epoll until the next tick: it is
// readable with a connection the loop can neither accept nor shed, and a
// level-triggered loop would otherwise spin on it (HAProxy pauses its
// listeners the same way on EMFILE).
func (l *loop) pauseListener(i int) {
	ln := &l.listeners[i]
	if ln.paused || ln.fd < 0 {
		return
	}
	if err := unix.EpollCtl(l.epfd, unix.EPOLL_CTL_DEL, ln.fd, nil); err != nil {
		return
	}
	ln.paused = true
	l.paused++
	l.resumeAt = l.now + 1
}

// resumeListeners puts paused listeners back into epoll; connections
// waiting in their queues are reported at once (level-triggered).
func (l *loop) resumeListeners() {
	for i := range l.listeners {
		ln := &l.listeners[i]
		if !ln.paused {
			continue
		}
		ev := unix.EpollEvent{Events: unix.EPOLLIN, Fd: int32(ln.fd), Pad: kindListener + int32(i)}
		if err := unix.EpollCtl(l.epfd, unix.EPOLL_CTL_ADD, ln.fd, &ev); err != nil {
			// Try again next tick.
			l.resumeAt = l.now + 1
			continue
		}
		ln.paused = false
		l.paused--
	}
}

// closeAll closes every connection of this loop (forced shutdown).
func (l *loop) closeAll() {
	for i := range l.p.table {
		if c := l.p.table[i].Load(); c != nil && c.owner == l.id {
			if c.state == stPeek || c.state == stDial || c.state == stReplay {
				l.p.metrics.reject(reasonShutdown)
			}
			l.closeConn(c)
		}
	}
}

// lend returns a relay buffer for a direction under backpressure.
func (l *loop) lend() *pend {
	l.lent++
	if n := len(l.free); n > 0 {
		p := l.free[n-1]
		l.free = l.free[:n-1]
		return p
	}
	return &pend{buf: make([]byte, relayBufSize)}
}

// giveBack returns a lent buffer.
func (l *loop) giveBack(p *pend) {
	l.lent--
	p.off, p.end = 0, 0
	if len(l.free) < maxFreeBufs {
		l.free = append(l.free, p)
	}
}

// newHandshake returns a cleared handshake record.
func (l *loop) newHandshake() *handshake {
	if n := len(l.freeHS); n > 0 {
		hs := l.freeHS[n-1]
		l.freeHS = l.freeHS[:n-1]
		return hs
	}
	return &handshake{}
}

// freeHandshake keeps a handshake record (and a small peek buffer) for the
// next connection.
func (l *loop) freeHandshake(hs *handshake) {
	if len(l.freeHS) >= maxFreeHandshakes {
		return
	}
	peek := hs.peek[:0]
	if cap(peek) > keptPeek {
		peek = nil
	}
	*hs = handshake{peek: peek}
	l.freeHS = append(l.freeHS, hs)
}

// activeGaugeFor returns the connections_active series of an instance.
func (l *loop) activeGaugeFor(shard int, id string) *activeGauge {
	k := gaugeKey{shard, id}
	g := l.gauges[k]
	if g == nil {
		g = &activeGauge{
			g:    l.p.metrics.ConnectionsActive.WithLabelValues(strconv.Itoa(shard), id),
			inst: l.p.instLiveFor(id),
		}
		l.gauges[k] = g
	}
	return g
}

func (l *loop) dirty() bool {
	return l.bytesUp|l.bytesDown|l.pktUp|l.pktDown|l.idleCloses != 0 || l.lent != l.lentFlushed
}

// flushCounters adds the loop's counters to the Prometheus metrics.
func (l *loop) flushCounters() {
	l.flushedAt = l.now
	if !l.dirty() {
		return
	}
	m := l.p.metrics
	if l.bytesUp != 0 {
		m.up.Add(float64(l.bytesUp))
	}
	if l.bytesDown != 0 {
		m.down.Add(float64(l.bytesDown))
	}
	if l.pktUp != 0 {
		m.pktUp.Add(float64(l.pktUp))
	}
	if l.pktDown != 0 {
		m.pktDown.Add(float64(l.pktDown))
	}
	if l.idleCloses != 0 {
		m.IdleCloses.Add(float64(l.idleCloses))
	}
	if l.lent != l.lentFlushed {
		m.RelayBuffers.Add(float64(l.lent - l.lentFlushed))
		l.lentFlushed = l.lent
	}
	l.bytesUp, l.bytesDown, l.pktUp, l.pktDown, l.idleCloses = 0, 0, 0, 0, 0
}
