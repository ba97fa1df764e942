package loadgen

import (
	"bufio"
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"sync"
	"sync/atomic"
	"time"

	"github.com/shardgate/shardgate/mqttwire"
)

// DeviceOptions describe one simulated device. The zero value (plus a
// ClientID) is an MQTT 3.1.1 device with keepalive off and a persistent
// session.
type DeviceOptions struct {
	// Level is the protocol level: mqttwire.Level311 (default, also for 0)
	// or mqttwire.Level5.
	Level byte
	// ClientID is sent in CONNECT.
	ClientID string
	// KeepAlive in seconds; the device sends PINGREQ at this pace (one
	// process-wide pinger serves every device). Default 0: no keepalive.
	KeepAlive uint16
	// Clean is CleanSession (3.1.1) / Clean Start (5.0). Default false.
	Clean bool
	// Local is the source IP to dial from. Default (zero): any. Several
	// 127.0.0.x sources spread the ephemeral ports of a large fleet.
	Local netip.Addr
	// Timeout bounds dial + CONNACK, and each wait for an acknowledgement.
	// Default 10s.
	Timeout time.Duration
	// OnMessage, when set, receives every PUBLISH on the reader goroutine
	// instead of Messages(): a fleet that only counts or times deliveries
	// needs no goroutine of its own per device. It must not block.
	OnMessage func(Message)
	// OnLost, when set, is called once (on the reader goroutine) when the
	// connection ends without Close, with what ended it (io.EOF: the peer
	// closed).
	OnLost func(error)
}

func (o DeviceOptions) level() byte {
	if o.Level == 0 {
		return mqttwire.Level311
	}
	return o.Level
}

func (o DeviceOptions) timeout() time.Duration {
	if o.Timeout <= 0 {
		return 10 * time.Second
	}
	return o.Timeout
}

// ConnectResult is the outcome of one CONNECT.
type ConnectResult struct {
	Latency time.Duration // dial start → CONNACK
	Code    byte          // CONNACK return code (3.1.1) or reason code (5.0)
	Refused bool          // CONNACK refused (Code != 0)
}

// Message is a PUBLISH the device received.
type Message struct {
	Topic   string
	Payload []byte
	QoS     byte
	At      time.Time // when the reader decoded it
}

// ErrRefused is returned (wrapped) by Connect when the CONNACK refuses.
var ErrRefused = errors.New("loadgen: CONNACK refused")

// ErrLost is returned by a call that needs the connection after it ended.
var ErrLost = errors.New("loadgen: connection lost")

// Device is one connected MQTT client on a raw socket: one reader goroutine
// and nothing else of its own (keepalive pings come from a shared pinger).
// Its methods are safe for concurrent use.
type Device struct {
	conn      net.Conn
	r         *bufio.Reader
	level     byte
	id        string
	timeout   time.Duration
	keepAlive time.Duration
	onMessage func(Message)
	onLost    func(error)

	wmu sync.Mutex // serializes writes of whole packets

	mu      sync.Mutex
	pending map[uint16]chan byte // packet identifier → ack reason codes
	nextPID uint16
	msgs    chan Message

	// For the account of a lost connection: when it connected, last
	// received a packet, last sent a PINGREQ (unix ns).
	connectedAt        int64
	lastRecv, lastPing atomic.Int64

	closing atomic.Bool
	closeCh chan struct{} // closed by Close: unblocks a reader delivering to Messages
	lost    chan struct{} // closed when the connection ends without Close
	done    chan struct{} // closed when the reader returns
}

// Connect dials target, sends CONNECT and waits for the CONNACK. A refused
// CONNACK returns a nil Device, the result (Refused, Code) and an error
// wrapping ErrRefused; a dial or protocol failure returns an error and a
// zero result.
func Connect(ctx context.Context, target string, o DeviceOptions) (*Device, ConnectResult, error) {
	var res ConnectResult
	timeout := o.timeout()
	ctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	d := net.Dialer{Control: dialControl}
	if o.Local.IsValid() {
		d.LocalAddr = &net.TCPAddr{IP: o.Local.AsSlice()}
	}
	start := time.Now()
	conn, err := d.DialContext(ctx, "tcp", target)
	if err != nil {
		return nil, res, fmt.Errorf("%s: dial %s: %w", o.ClientID, target, err)
	}
	deadline, _ := ctx.Deadline()
	_ = conn.SetDeadline(deadline)
	level := o.level()
	pkt := mqttwire.AppendConnect(nil, mqttwire.ConnectOptions{Level: level, ClientID: o.ClientID, CleanStart: o.Clean, KeepAlive: o.KeepAlive})
	if _, err := conn.Write(pkt); err != nil {
		conn.Close()
		return nil, res, fmt.Errorf("%s: write CONNECT: %w", o.ClientID, err)
	}
	// A small reader: an idle device should cost little more than its
	// socket; bodies of larger packets are read into their own buffers.
	r := bufio.NewReaderSize(conn, 256)
	b0, body, err := readPacket(r)
	if err != nil {
		conn.Close()
		return nil, res, fmt.Errorf("%s: read CONNACK: %w", o.ClientID, err)
	}
	if b0 != mqttwire.CONNACK<<4 || len(body) < 2 {
		conn.Close()
		return nil, res, fmt.Errorf("%s: expected CONNACK, got packet type %d (%d bytes)", o.ClientID, b0>>4, len(body))
	}
	res.Latency = time.Since(start)
	res.Code = body[1]
	if res.Code != 0 {
		res.Refused = true
		conn.Close()
		return nil, res, fmt.Errorf("%s: %w with code 0x%02x", o.ClientID, ErrRefused, res.Code)
	}
	_ = conn.SetDeadline(time.Time{})
	dev := &Device{
		conn: conn, r: r, level: level, id: o.ClientID, timeout: timeout,
		keepAlive: time.Duration(o.KeepAlive) * time.Second,
		onMessage: o.OnMessage, onLost: o.OnLost,
		closeCh: make(chan struct{}), lost: make(chan struct{}), done: make(chan struct{}),
		connectedAt: time.Now().UnixNano(),
	}
	go dev.readLoop()
	if dev.keepAlive > 0 {
		thePinger.add(dev, time.Now().Add(dev.keepAlive))
	}
	return dev, res, nil
}

// ID is the device's client ID.
func (d *Device) ID() string { return d.id }

// LocalAddr is the device's source address.
func (d *Device) LocalAddr() net.Addr { return d.conn.LocalAddr() }

// Messages is the channel of received PUBLISH packets (buffered; the reader
// waits when it is full). Unused when OnMessage is set.
func (d *Device) Messages() <-chan Message { return d.messages() }

func (d *Device) messages() chan Message {
	d.mu.Lock()
	defer d.mu.Unlock()
	if d.msgs == nil {
		d.msgs = make(chan Message, 256)
	}
	return d.msgs
}

// Lost is closed when the connection ends without Close (broker or proxy
// closed it, reset, protocol error).
func (d *Device) Lost() <-chan struct{} { return d.lost }

// Subscribe subscribes to one topic filter and waits for the SUBACK.
func (d *Device) Subscribe(topic string, qos byte) error {
	if d.onMessage == nil {
		d.messages() // exists before the first PUBLISH can arrive
	}
	pid, ch := d.register()
	if err := d.write(appendSubscribe(nil, d.level, pid, topic, qos)); err != nil {
		d.unregister(pid)
		return err
	}
	code, err := d.wait(pid, ch, "SUBACK")
	if err != nil {
		return err
	}
	if code >= 0x80 {
		return fmt.Errorf("%s: subscribe %q refused: SUBACK 0x%02x", d.id, topic, code)
	}
	return nil
}

// Publish sends a PUBLISH. QoS 0 returns once written; QoS 1 waits for the
// PUBACK; QoS 2 waits for PUBREC, sends PUBREL and waits for PUBCOMP.
func (d *Device) Publish(topic string, qos byte, payload []byte) error {
	if qos == 0 {
		return d.write(appendPublish(nil, d.level, topic, 0, 0, payload))
	}
	if qos > 2 {
		return fmt.Errorf("loadgen: QoS %d", qos)
	}
	pid, ch := d.register()
	if err := d.write(appendPublish(nil, d.level, topic, qos, pid, payload)); err != nil {
		d.unregister(pid)
		return err
	}
	first := "PUBACK"
	if qos == 2 {
		first = "PUBREC"
	}
	code, err := d.wait(pid, ch, first)
	if err != nil {
		return err
	}
	if code >= 0x80 {
		return fmt.Errorf("%s: publish %q refused: %s 0x%02x", d.id, topic, first, code)
	}
	if qos == 1 {
		return nil
	}
	// [MQTT-4.3.3-1]: the sender answers PUBREC with PUBREL of the same
	// identifier, which stays in use until PUBCOMP.
	if err := d.write(appendAck(nil, mqttwire.PUBREL, pid)); err != nil {
		d.unregister(pid)
		return err
	}
	code, err = d.wait(pid, ch, "PUBCOMP")
	if err != nil {
		return err
	}
	if code >= 0x80 {
		return fmt.Errorf("%s: publish %q: PUBCOMP 0x%02x", d.id, topic, code)
	}
	return nil
}

// Close sends DISCONNECT, closes the connection and waits for the reader.
// Lost is not closed by it. Closing a lost device returns nil.
func (d *Device) Close() error {
	if d.closing.Swap(true) {
		<-d.done
		return nil
	}
	close(d.closeCh)
	err := d.write(mqttwire.AppendDisconnect(nil, d.level, mqttwire.Success))
	// The broker may close first on DISCONNECT, and the reader then closes
	// the socket: already closed is a clean end.
	if cerr := d.conn.Close(); err == nil && !errors.Is(cerr, net.ErrClosed) {
		err = cerr
	}
	<-d.done
	select {
	case <-d.lost:
		return nil
	default:
	}
	if err != nil {
		return fmt.Errorf("%s: close: %w", d.id, err)
	}
	return nil
}

func (d *Device) write(pkt []byte) error {
	d.wmu.Lock()
	defer d.wmu.Unlock()
	_ = d.conn.SetWriteDeadline(time.Now().Add(d.timeout))
	if _, err := d.conn.Write(pkt); err != nil {
		select {
		case <-d.done:
			return fmt.Errorf("%s: %w", d.id, ErrLost)
		default:
		}
		return fmt.Errorf("%s: write: %w", d.id, err)
	}
	return nil
}

// register reserves a packet identifier (never 0 [MQTT-2.3.1-1], never one
// still in flight) and the channel its acknowledgements arrive on.
func (d *Device) register() (uint16, chan byte) {
	ch := make(chan byte, 2)
	d.mu.Lock()
	defer d.mu.Unlock()
	if d.pending == nil {
		d.pending = make(map[uint16]chan byte)
	}
	for {
		d.nextPID++
		if d.nextPID == 0 {
			continue
		}
		if _, busy := d.pending[d.nextPID]; !busy {
			break
		}
	}
	d.pending[d.nextPID] = ch
	return d.nextPID, ch
}

func (d *Device) unregister(pid uint16) {
	d.mu.Lock()
	delete(d.pending, pid)
	d.mu.Unlock()
}

func (d *Device) wait(pid uint16, ch chan byte, what string) (byte, error) {
	t := time.NewTimer(d.timeout)
	defer t.Stop()
	select {
	case code := <-ch:
		return code, nil
	case <-d.done:
		d.unregister(pid)
		return 0, fmt.Errorf("%s: waiting for %s: %w", d.id, what, ErrLost)
	case <-t.C:
		d.unregister(pid)
		return 0, fmt.Errorf("%s: no %s within %s", d.id, what, d.timeout)
	}
}

// resolve hands an acknowledgement to its waiter; final acks free the
// identifier.
func (d *Device) resolve(pid uint16, code byte, final bool) {
	d.mu.Lock()
	ch, ok := d.pending[pid]
	if ok && final {
		delete(d.pending, pid)
	}
	d.mu.Unlock()
	if ok {
		select {
		case ch <- code:
		default:
		}
	}
}

// readLoop is the device's only goroutine: it answers the broker's
// PUBLISH flows, resolves acknowledgements and delivers messages, until the
// connection ends.
func (d *Device) readLoop() {
	defer close(d.done)
	err := d.readPackets()
	if !d.closing.Load() {
		close(d.lost)
		if d.onLost != nil {
			d.onLost(d.lostError(err))
		}
	}
	d.conn.Close()
}

// lostError wraps what ended the connection with its timeline, which
// tells a missed keepalive (no packet for 1.5 × keepalive after a PINGREQ)
// from a close out of the blue.
func (d *Device) lostError(err error) error {
	now := time.Now().UnixNano()
	ago := func(ns int64) string {
		if ns == 0 {
			return "never"
		}
		return time.Duration(now-ns).Round(time.Millisecond).String() + " ago"
	}
	return fmt.Errorf("%w (connected %s, last packet in %s, last PINGREQ %s)", err, ago(d.connectedAt), ago(d.lastRecv.Load()), ago(d.lastPing.Load()))
}

func (d *Device) readPackets() error {
	for {
		b0, body, err := readPacket(d.r)
		if err != nil {
			return err
		}
		d.lastRecv.Store(time.Now().UnixNano())
		typ := b0 >> 4
		switch typ {
		case mqttwire.PUBLISH:
			topic, qos, pid, payload, err := parsePublish(d.level, b0&0x0f, body)
			if err != nil {
				return err
			}
			m := Message{Topic: topic, Payload: payload, QoS: qos, At: time.Now()}
			switch qos {
			case 1:
				if err := d.write(appendAck(nil, mqttwire.PUBACK, pid)); err != nil {
					return err
				}
			case 2:
				if err := d.write(appendAck(nil, mqttwire.PUBREC, pid)); err != nil {
					return err
				}
			}
			if d.onMessage != nil {
				d.onMessage(m)
				continue
			}
			select {
			case d.messages() <- m:
			case <-d.closeCh:
				return nil
			}
		case mqttwire.PUBREL:
			if len(body) < 2 {
				return errors.New("short PUBREL")
			}
			if err := d.write(appendAck(nil, mqttwire.PUBCOMP, binary.BigEndian.Uint16(body))); err != nil {
				return err
			}
		case mqttwire.PUBACK, mqttwire.PUBREC, mqttwire.PUBCOMP, mqttwire.SUBACK:
			if len(body) < 2 {
				return fmt.Errorf("short ack of type %d", typ)
			}
			code := ackCode(d.level, typ, body)
			final := typ != mqttwire.PUBREC || code >= 0x80
			d.resolve(binary.BigEndian.Uint16(body), code, final)
		case mqttwire.PINGRESP, mqttwire.UNSUBACK:
		case mqttwire.DISCONNECT:
			return errors.New("DISCONNECT from the server")
		default:
			return fmt.Errorf("unexpected packet type %d", typ)
		}
	}
}

// pinger sends every device's PINGREQ from one goroutine: devices sit in
// one-second buckets of a wheel keyed by when they are due, so a fleet of
// 100k devices costs one timer, not 100k.
type pinger struct {
	mu      sync.Mutex
	due     map[int64][]*Device // unix second → devices due then
	started bool
}

var thePinger pinger

func (p *pinger) add(d *Device, at time.Time) {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.due == nil {
		p.due = make(map[int64][]*Device)
	}
	s := at.Unix()
	p.due[s] = append(p.due[s], d)
	if !p.started {
		p.started = true
		go p.run()
	}
}

func (p *pinger) run() {
	t := time.NewTicker(250 * time.Millisecond)
	defer t.Stop()
	last := time.Now().Unix() - 1
	for now := range t.C {
		sec := now.Unix()
		for s := last + 1; s <= sec; s++ {
			p.mu.Lock()
			batch := p.due[s]
			delete(p.due, s)
			p.mu.Unlock()
			for _, d := range batch {
				p.ping(d, now)
			}
		}
		last = sec
	}
}

func (p *pinger) ping(d *Device, now time.Time) {
	select {
	case <-d.done:
		return // closed or lost: drop it from the wheel
	default:
	}
	// A write that fails ends the device through its reader (the socket
	// is broken); the pinger only schedules the next one.
	if d.write(pingreq) == nil {
		d.lastPing.Store(now.UnixNano())
	}
	p.add(d, now.Add(d.keepAlive))
}
