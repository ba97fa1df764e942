package proxy

import (
	"bufio"
	"bytes"
	"fmt"
	"io"
	"os"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus/testutil"

	"github.com/shardgate/shardgate/backend"
	"github.com/shardgate/shardgate/internal/servertest"
	"github.com/shardgate/shardgate/mqttwire"
)

// timeWaits counts the TCP sockets in TIME_WAIT on either end of
// connections to port: held by the connecting side (remote port = port: the
// proxy's ports towards a broker) and by the listening side (local port =
// port: the broker's).
func timeWaits(t *testing.T, port uint16) (connecting, listening int) {
	t.Helper()
	for _, f := range []string{"/proc/net/tcp", "/proc/net/tcp6"} {
		fh, err := os.Open(f)
		if err != nil {
			continue
		}
		sc := bufio.NewScanner(fh)
		sc.Scan() // header
		for sc.Scan() {
			fs := strings.Fields(sc.Text())
			if len(fs) < 4 || fs[3] != "06" { // TCP_TIME_WAIT
				continue
			}
			portOf := func(a string) uint16 {
				i := strings.LastIndexByte(a, ':')
				v, _ := strconv.ParseUint(a[i+1:], 16, 16)
				return uint16(v)
			}
			if portOf(fs[2]) == port {
				connecting++
			}
			if portOf(fs[1]) == port {
				listening++
			}
		}
		fh.Close()
	}
	return connecting, listening
}

// TestCloseWaitLeavesTimeWaitToBroker: devices that say DISCONNECT and
// close through the proxy. With dial.close_wait (the default) the proxy
// waits for Mosquitto to close first, so every TIME_WAIT is on the broker's
// port and none holds one of the proxy's ports towards it; with 0s the
// proxy passes the FIN at once and keeps them.
func TestCloseWaitLeavesTimeWaitToBroker(t *testing.T) {
	const devices = 40
	for _, tc := range []struct {
		name string
		wait time.Duration
	}{{"close_wait 2s", 2 * time.Second}, {"close_wait 0s", 0}} {
		t.Run(tc.name, func(t *testing.T) {
			b := servertest.Mosquitto(t, servertest.MosquittoOptions{}).Addr()
			px := startProxy(t, proxySetup{
				instances: []backend.Instance{inst("mosq", b, -1)},
				config: func(c *Config) {
					d := Duration(tc.wait)
					c.Dial.CloseWait = &d
				},
			})
			conn0, lis0 := timeWaits(t, b.Port())
			for i := range devices {
				c, _ := paho3(t, px.addr, mqttwire.Level311, fmt.Sprintf("cw-%d", i), true)
				c.Disconnect(250) // sends DISCONNECT, then closes
			}
			deadline := time.Now().Add(5 * time.Second)
			for px.Active() != 0 && time.Now().Before(deadline) {
				time.Sleep(10 * time.Millisecond)
			}
			if n := px.Active(); n != 0 {
				t.Fatalf("%d connections still open after every device disconnected", n)
			}
			conn1, lis1 := timeWaits(t, b.Port())
			proxySide, brokerSide := conn1-conn0, lis1-lis0
			t.Logf("%d devices: TIME_WAIT on the proxy's ports towards the broker %d, on the broker's port %d", devices, proxySide, brokerSide)
			if tc.wait > 0 && (proxySide != 0 || brokerSide < devices) {
				t.Errorf("with close_wait: %d TIME_WAITs on the proxy's side, %d on the broker's; want 0 and %d", proxySide, brokerSide, devices)
			}
			if tc.wait == 0 && proxySide == 0 {
				// The proxy passes the FIN at once, so it closes
				// first unless the broker has already closed.
				t.Errorf("without close_wait: no TIME_WAIT on the proxy's side of %d connections", devices)
			}
			if v := testutil.ToFloat64(px.metrics.IdleCloses); v != 0 {
				t.Errorf("idle closes %v: a device that closed is not idle", v)
			}
		})
	}
}

// TestCloseWaitBrokerThatStaysOpen: a broker that does not close after the
// device's DISCONNECT gets the FIN once close_wait has passed; a FIN
// without a DISCONNECT before it is passed on at once.
func TestCloseWaitBrokerThatStaysOpen(t *testing.T) {
	const wait = 2 * time.Second
	p, b := oneRawBackend(t, func(c *Config) {
		d := Duration(wait)
		c.Dial.CloseWait = &d
	})
	for _, tc := range []struct {
		name string
		tail []byte // what the device sends before its FIN
		held bool   // whether the proxy holds the broker side open for close_wait
	}{
		{"DISCONNECT", mqttwire.AppendDisconnect(nil, mqttwire.Level311, 0), true},
		{"PINGREQ", []byte{0xC0, 0x00}, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			dev := dialProxy(t, p.addr)
			// Keepalive 0: no timer of its own closes the half-closed
			// connection afterwards.
			connect := connectPacket(mqttwire.Level311, "cw-open-"+tc.name, 0)
			if _, err := dev.Write(connect); err != nil {
				t.Fatal(err)
			}
			bk := b.accept(t)
			got := make([]byte, len(connect)+len(tc.tail))
			_ = bk.SetReadDeadline(time.Now().Add(5 * time.Second))
			if _, err := io.ReadFull(bk, got[:len(connect)]); err != nil {
				t.Fatal(err)
			}
			if _, err := bk.Write([]byte{0x20, 0x02, 0x00, 0x00}); err != nil {
				t.Fatal(err)
			}
			if _, err := io.ReadFull(dev, make([]byte, 4)); err != nil {
				t.Fatalf("CONNACK: %v", err)
			}
			if _, err := dev.Write(tc.tail); err != nil {
				t.Fatal(err)
			}
			start := time.Now()
			_ = dev.CloseWrite()
			if _, err := io.ReadFull(bk, got[len(connect):]); err != nil {
				t.Fatal(err)
			}
			// The broker's read returns at the proxy's FIN.
			if n, err := bk.Read(make([]byte, 1)); n != 0 || err != io.EOF {
				t.Fatalf("broker read %d, %v; want EOF", n, err)
			}
			took := time.Since(start)
			t.Logf("FIN after %s reached the broker %v after the device's", tc.name, took.Round(time.Millisecond))
			if tc.held && took < wait-tickDuration {
				t.Errorf("FIN after DISCONNECT passed after %v, want close_wait (%v)", took, wait)
			}
			if !tc.held && took >= wait-tickDuration {
				t.Errorf("FIN without DISCONNECT passed after %v, want at once", took)
			}
			// Half-closed as any: what the broker still sends reaches
			// the device, however long it takes.
			time.Sleep(3 * tickDuration)
			if _, err := bk.Write([]byte{0xd0, 0x00}); err != nil {
				t.Fatal(err)
			}
			_ = bk.CloseWrite()
			_ = dev.SetReadDeadline(time.Now().Add(5 * time.Second))
			if b, err := io.ReadAll(dev); err != nil || !bytes.Equal(b, []byte{0xd0, 0x00}) {
				t.Errorf("the device read % x, %v after its FIN; want d0 00 and EOF", b, err)
			}
		})
	}
}
