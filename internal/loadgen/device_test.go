package loadgen

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/netip"
	"testing"
	"time"

	"github.com/shardgate/shardgate/internal/servertest"
	"github.com/shardgate/shardgate/mqttwire"
)

func mustConnect(t *testing.T, target string, o DeviceOptions) *Device {
	t.Helper()
	d, res, err := Connect(context.Background(), target, o)
	if err != nil {
		t.Fatalf("connect %s: %v", o.ClientID, err)
	}
	if res.Refused || res.Code != 0 || res.Latency <= 0 {
		t.Fatalf("connect %s: result %+v", o.ClientID, res)
	}
	t.Cleanup(func() { _ = d.Close() })
	return d
}

// TestRoundTrip publishes from one device to another at every QoS, in
// both dialects, through a real Mosquitto: the subscriber must get the
// payload at the QoS it was sent with, and the publisher's QoS 1/2 flow
// must complete.
func TestRoundTrip(t *testing.T) {
	m := servertest.Mosquitto(t, servertest.MosquittoOptions{})
	for _, level := range []byte{mqttwire.Level311, mqttwire.Level5} {
		for qos := byte(0); qos <= 2; qos++ {
			name := fmt.Sprintf("level%d-qos%d", level, qos)
			t.Run(name, func(t *testing.T) {
				sub := mustConnect(t, m.String(), DeviceOptions{Level: level, ClientID: name + "-sub", Clean: true})
				pub := mustConnect(t, m.String(), DeviceOptions{Level: level, ClientID: name + "-pub", Clean: true})
				topic := "rt/" + name
				if err := sub.Subscribe(topic, 2); err != nil {
					t.Fatal(err)
				}
				for i := range 3 {
					payload := []byte(fmt.Sprintf("%s #%d", name, i))
					if err := pub.Publish(topic, qos, payload); err != nil {
						t.Fatal(err)
					}
					select {
					case msg := <-sub.Messages():
						if msg.Topic != topic || !bytes.Equal(msg.Payload, payload) || msg.QoS != qos || msg.At.IsZero() {
							t.Fatalf("got %+v, want %q on %q at QoS %d", msg, payload, topic, qos)
						}
					case <-time.After(5 * time.Second):
						t.Fatalf("message %d not delivered", i)
					}
				}
			})
		}
	}
}

// TestSubscriberAcksQoS2 has a device publish at QoS 2 to itself through a
// broker that keeps one message in flight per client: the device must
// complete each inbound flow (PUBREC, then PUBCOMP on PUBREL) or the next
// message is never sent, while its own outbound flow runs on the same
// socket.
func TestSubscriberAcksQoS2(t *testing.T) {
	m := servertest.Mosquitto(t, servertest.MosquittoOptions{Config: []string{"max_inflight_messages 1"}})
	d := mustConnect(t, m.String(), DeviceOptions{ClientID: "self", Clean: true})
	if err := d.Subscribe("self/t", 2); err != nil {
		t.Fatal(err)
	}
	for i := range 20 {
		if err := d.Publish("self/t", 2, []byte{byte(i)}); err != nil {
			t.Fatal(err)
		}
	}
	for i := range 20 {
		select {
		case msg := <-d.Messages():
			if msg.Payload[0] != byte(i) {
				t.Fatalf("message %d: payload %v", i, msg.Payload)
			}
		case <-time.After(5 * time.Second):
			t.Fatalf("message %d not delivered: the QoS 2 flow stalled", i)
		}
	}
}

func TestRefused(t *testing.T) {
	m := servertest.Mosquitto(t, servertest.MosquittoOptions{DenyAnonymous: true})
	d, res, err := Connect(context.Background(), m.String(), DeviceOptions{ClientID: "anon", Clean: true})
	if d != nil || !errors.Is(err, ErrRefused) || !res.Refused || res.Code != mqttwire.ConnackNotAuthorized {
		t.Fatalf("got device %v, result %+v, error %v; want refused with 0x05", d, res, err)
	}
}

// TestLostOnBrokerKill: Lost fires (and OnLost runs) for a device whose
// broker dies, and not for one the test closed.
func TestLostOnBrokerKill(t *testing.T) {
	m := servertest.Mosquitto(t, servertest.MosquittoOptions{})
	onLost := make(chan error, 1)
	live := mustConnect(t, m.String(), DeviceOptions{ClientID: "live", OnLost: func(err error) { onLost <- err }})
	closed := mustConnect(t, m.String(), DeviceOptions{ClientID: "closed"})
	if err := closed.Close(); err != nil {
		t.Fatal(err)
	}
	m.Kill()
	select {
	case <-live.Lost():
	case <-time.After(5 * time.Second):
		t.Fatal("Lost not closed after the broker was killed")
	}
	select {
	case err := <-onLost:
		if err == nil {
			t.Fatal("OnLost without the reason")
		}
	case <-time.After(time.Second):
		t.Fatal("OnLost not called")
	}
	select {
	case <-closed.Lost():
		t.Fatal("Lost closed for a device closed by Close")
	default:
	}
	if err := live.Publish("x", 1, nil); !errors.Is(err, ErrLost) {
		t.Fatalf("publish on a lost device: %v, want ErrLost", err)
	}
}

// TestKeepalivePings holds a device with keepalive 1s past several times
// the broker's limit (1.5 × keepalive); a raw connection with the same
// keepalive and no pings, the control, is closed by the broker.
func TestKeepalivePings(t *testing.T) {
	m := servertest.Mosquitto(t, servertest.MosquittoOptions{})
	d := mustConnect(t, m.String(), DeviceOptions{ClientID: "pinging", KeepAlive: 1})

	raw, err := net.Dial("tcp", m.String())
	if err != nil {
		t.Fatal(err)
	}
	defer raw.Close()
	if _, err := raw.Write(mqttwire.AppendConnect(nil, mqttwire.ConnectOptions{ClientID: "silent", CleanStart: true, KeepAlive: 1})); err != nil {
		t.Fatal(err)
	}
	_ = raw.SetReadDeadline(time.Now().Add(10 * time.Second))
	if _, err := io.ReadAll(raw); err != nil {
		t.Fatalf("silent device not closed by the broker: %v", err)
	}
	// The silent device was closed after ≥1.5s; the pinging one must
	// outlive a few more periods.
	select {
	case <-d.Lost():
		t.Fatal("the pinging device was disconnected")
	case <-time.After(3 * time.Second):
	}
}

func TestLocalAddress(t *testing.T) {
	m := servertest.Mosquitto(t, servertest.MosquittoOptions{})
	for _, ip := range []string{"127.0.0.2", "127.0.0.3"} {
		d := mustConnect(t, m.String(), DeviceOptions{ClientID: "from-" + ip, Local: netip.MustParseAddr(ip)})
		if got := d.LocalAddr().(*net.TCPAddr).IP.String(); got != ip {
			t.Fatalf("dialed from %s, want %s", got, ip)
		}
	}
}
