package backend

import (
	"context"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"net"
	"net/netip"
	"time"
)

// prober checks one instance once; nil means it passed.
type prober interface {
	probe(ctx context.Context, addr netip.AddrPort) error
}

var (
	_ prober = tcpProbe{}
	_ prober = mqttProbe{}
)

func newProber(h HealthConfig) prober {
	if h.Type == HealthMQTT {
		return mqttProbe{timeout: h.Timeout}
	}
	return tcpProbe{timeout: h.Timeout}
}

// probeLoop checks one instance until ctx is done. The first check runs at
// once (a starting proxy waits for it); then the loop sleeps a random part of
// the interval so that many instances are not checked in lockstep, and
// checks every interval.
func probeLoop(ctx context.Context, s *Static, c *check, p prober, interval time.Duration) {
	defer s.wg.Done()
	if err := p.probe(ctx, c.addr); ctx.Err() == nil {
		s.record(c, err)
	}
	if !sleepCtx(ctx, rand.N(interval)) {
		return
	}
	tick := time.NewTicker(interval)
	defer tick.Stop()
	for {
		err := p.probe(ctx, c.addr)
		if ctx.Err() != nil {
			return // our own shutdown, not the instance's failure
		}
		s.record(c, err)
		select {
		case <-ctx.Done():
			return
		case <-tick.C:
		}
	}
}

func sleepCtx(ctx context.Context, d time.Duration) bool {
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-ctx.Done():
		return false
	case <-t.C:
		return true
	}
}

// dialProbe connects to addr within timeout. Plain TCP: MPTCP off, like the
// proxy's own backend connections.
func dialProbe(ctx context.Context, addr netip.AddrPort, timeout time.Duration) (net.Conn, error) {
	d := net.Dialer{Timeout: timeout}
	d.SetMultipathTCP(false)
	return d.DialContext(ctx, "tcp", addr.String())
}

// tcpProbe passes when a TCP connection is established within the timeout.
type tcpProbe struct{ timeout time.Duration }

func (p tcpProbe) probe(ctx context.Context, addr netip.AddrPort) error {
	conn, err := dialProbe(ctx, addr, p.timeout)
	if err != nil {
		return err
	}
	return conn.Close()
}

// mqttProbe passes when the broker accepts an MQTT 3.1.1 CONNECT with a
// CONNACK return code 0 within the timeout; it then disconnects cleanly, so
// the broker publishes no will and keeps no session.
type mqttProbe struct{ timeout time.Duration }

// healthConnectHead is an MQTT 3.1.1 CONNECT up to the client ID bytes
// (MQTT 3.1.1 §3.1); healthIDLen bytes of client ID follow.
var healthConnectHead = [...]byte{
	0x10,                           // fixed header: CONNECT, flags 0 [MQTT-2.2.2-2]
	10 + 2 + healthIDLen,           // remaining length 45: variable header 10 + ID length 2 + ID 33 (one byte: < 128)
	0x00, 0x04, 'M', 'Q', 'T', 'T', // protocol name "MQTT" [MQTT-3.1.2-1]
	0x04,       // protocol level 4 = 3.1.1 [MQTT-3.1.2-2]
	0x02,       // connect flags: clean session only; no will, user name, password; reserved bit 0 [MQTT-3.1.2-3]
	0x00, 0x3C, // keep alive 60 s: the probe disconnects at once, but brokers (mochi) log a warning for 0
	0x00, healthIDLen, // client ID length 33
}

const (
	healthIDPrefix = "shardgate-health-" // 17 bytes, then 16 hex digits
	healthIDLen    = byte(len(healthIDPrefix) + 16)
)

// healthDisconnect is an MQTT 3.1.1 DISCONNECT: type 14, remaining length 0
// (§3.14). Sent before closing, it tells the broker not to publish a will
// [MQTT-3.14.4-3].
var healthDisconnect = [...]byte{0xE0, 0x00}

// appendHealthConnect appends the probe's CONNECT with a random client ID,
// so that concurrent probes from several proxies never take over each
// other's session [MQTT-3.1.4-2].
func appendHealthConnect(dst []byte, r uint64) []byte {
	dst = append(dst, healthConnectHead[:]...)
	dst = append(dst, healthIDPrefix...)
	return fmt.Appendf(dst, "%016x", r)
}

// connackReturnCodes are the MQTT 3.1.1 CONNACK return codes (§3.2.2.3).
var connackReturnCodes = [...]string{
	0: "accepted",
	1: "unacceptable protocol version",
	2: "identifier rejected",
	3: "server unavailable",
	4: "bad user name or password",
	5: "not authorized",
}

func (p mqttProbe) probe(ctx context.Context, addr netip.AddrPort) error {
	ctx, cancel := context.WithTimeout(ctx, p.timeout)
	defer cancel()
	conn, err := dialProbe(ctx, addr, p.timeout)
	if err != nil {
		return err
	}
	defer conn.Close()
	// One deadline for the whole exchange, and an early one when ctx ends.
	deadline, _ := ctx.Deadline()
	conn.SetDeadline(deadline)
	stop := context.AfterFunc(ctx, func() { conn.SetDeadline(time.Now()) })
	defer stop()

	var buf [64]byte
	if _, err := conn.Write(appendHealthConnect(buf[:0], rand.Uint64())); err != nil {
		return fmt.Errorf("mqtt: send CONNECT: %w", err)
	}
	// CONNACK: 0x20, remaining length 2, acknowledge flags, return code
	// (§3.2). The session-present bit must be 0 after a clean session
	// [MQTT-3.2.2-1]; other flag bits are reserved.
	ack := buf[:4]
	if _, err := io.ReadFull(conn, ack); err != nil {
		if errors.Is(err, io.EOF) || errors.Is(err, io.ErrUnexpectedEOF) {
			return fmt.Errorf("mqtt: connection closed before CONNACK (%w)", err)
		}
		return fmt.Errorf("mqtt: read CONNACK: %w", err)
	}
	if ack[0] != 0x20 || ack[1] != 0x02 {
		return fmt.Errorf("mqtt: expected CONNACK 20 02, got % x", ack[:2])
	}
	if rc := ack[3]; rc != 0 {
		name := "reserved"
		if int(rc) < len(connackReturnCodes) {
			name = connackReturnCodes[rc]
		}
		return fmt.Errorf("mqtt: CONNACK return code 0x%02x (%s)", rc, name)
	}
	// The broker is up; a failed DISCONNECT does not change that.
	conn.Write(healthDisconnect[:])
	return nil
}
