package broker

import (
	"context"
	"log/slog"
	"net"
	"net/netip"
	"os"
	"slices"
	"sync"
	"testing"
	"time"

	paho5 "github.com/eclipse/paho.golang/paho"
	paho3 "github.com/eclipse/paho.mqtt.golang"
)

const waitFor = 5 * time.Second

// startFleet starts an embedded fleet on loopback and closes it at the end
// of the test.
func startFleet(t *testing.T, shards int) *Embedded {
	t.Helper()
	e, err := StartEmbedded(context.Background(), EmbeddedConfig{
		Shards: shards,
		Log:    slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelWarn})),
	})
	if err != nil {
		t.Fatalf("StartEmbedded: %v", err)
	}
	t.Cleanup(func() {
		if err := e.Close(); err != nil {
			t.Errorf("Close: %v", err)
		}
	})
	return e
}

// message is what a test client received.
type message struct {
	Topic   string
	Payload string
	QoS     byte
	Retain  bool
	Props   *paho5.PublishProperties // MQTT 5 only
}

// sink collects the messages a client receives.
type sink struct {
	mu   sync.Mutex
	msgs []message
	more chan struct{}
}

func newSink() *sink { return &sink{more: make(chan struct{}, 1)} }

func (s *sink) add(m message) {
	s.mu.Lock()
	s.msgs = append(s.msgs, m)
	s.mu.Unlock()
	select {
	case s.more <- struct{}{}:
	default:
	}
}

func (s *sink) all() []message {
	s.mu.Lock()
	defer s.mu.Unlock()
	return slices.Clone(s.msgs)
}

// wait returns the messages once there are at least n, failing the test
// after waitFor.
func (s *sink) wait(t *testing.T, n int) []message {
	t.Helper()
	deadline := time.After(waitFor)
	for {
		if m := s.all(); len(m) >= n {
			return m
		}
		select {
		case <-s.more:
		case <-deadline:
			t.Fatalf("received %d messages, want %d: %+v", len(s.all()), n, s.all())
		}
	}
}

// exactly waits for n messages, then a while longer to catch duplicates.
func (s *sink) exactly(t *testing.T, n int) []message {
	t.Helper()
	s.wait(t, n)
	time.Sleep(200 * time.Millisecond)
	m := s.all()
	if len(m) != n {
		t.Fatalf("received %d messages, want exactly %d: %+v", len(m), n, m)
	}
	return m
}

// client311 connects an MQTT 3.1.1 client (paho.mqtt.golang).
func client311(t *testing.T, addr netip.AddrPort, id string, clean bool, s *sink) paho3.Client {
	t.Helper()
	opts := paho3.NewClientOptions().
		AddBroker("tcp://" + addr.String()).
		SetClientID(id).
		SetProtocolVersion(4).
		SetCleanSession(clean).
		SetAutoReconnect(false).
		SetConnectTimeout(waitFor)
	if s != nil {
		opts.SetDefaultPublishHandler(func(_ paho3.Client, m paho3.Message) {
			s.add(message{Topic: m.Topic(), Payload: string(m.Payload()), QoS: m.Qos(), Retain: m.Retained()})
		})
	}
	c := paho3.NewClient(opts)
	if tok := c.Connect(); !tok.WaitTimeout(waitFor) || tok.Error() != nil {
		t.Fatalf("connect %s to %s: %v", id, addr, tok.Error())
	}
	t.Cleanup(func() {
		if c.IsConnectionOpen() {
			c.Disconnect(100)
		}
	})
	return c
}

func subscribe311(t *testing.T, c paho3.Client, filter string, qos byte) {
	t.Helper()
	// nil handler: messages go to the default handler, the sink.
	if tok := c.Subscribe(filter, qos, nil); !tok.WaitTimeout(waitFor) || tok.Error() != nil {
		t.Fatalf("subscribe %q: %v", filter, tok.Error())
	}
}

func publish311(t *testing.T, c paho3.Client, topic string, qos byte, retain bool, payload string) {
	t.Helper()
	if tok := c.Publish(topic, qos, retain, payload); !tok.WaitTimeout(waitFor) || tok.Error() != nil {
		t.Fatalf("publish %q: %v", topic, tok.Error())
	}
}

// client5 connects an MQTT 5 client (paho.golang) over its own connection,
// which the test may close to drop the client without DISCONNECT.
func client5(t *testing.T, addr netip.AddrPort, cp *paho5.Connect, s *sink, opts ...func(*paho5.ClientConfig)) (*paho5.Client, net.Conn, *paho5.Connack) {
	t.Helper()
	conn, err := net.Dial("tcp", addr.String())
	if err != nil {
		t.Fatalf("dial %s: %v", addr, err)
	}
	cfg := paho5.ClientConfig{ClientID: cp.ClientID, Conn: conn}
	if s != nil {
		cfg.OnPublishReceived = []func(paho5.PublishReceived) (bool, error){
			func(pr paho5.PublishReceived) (bool, error) {
				p := pr.Packet
				s.add(message{Topic: p.Topic, Payload: string(p.Payload), QoS: p.QoS, Retain: p.Retain, Props: p.Properties})
				return true, nil
			},
		}
	}
	for _, o := range opts {
		o(&cfg)
	}
	c := paho5.NewClient(cfg)
	ctx, cancel := context.WithTimeout(context.Background(), waitFor)
	defer cancel()
	ca, err := c.Connect(ctx, cp)
	if err != nil {
		_ = conn.Close()
		t.Fatalf("connect %s to %s: %v", cp.ClientID, addr, err)
	}
	if ca.ReasonCode != 0 {
		_ = conn.Close()
		t.Fatalf("connect %s to %s: reason 0x%02x", cp.ClientID, addr, ca.ReasonCode)
	}
	t.Cleanup(func() {
		_ = c.Disconnect(&paho5.Disconnect{})
		_ = conn.Close()
		select {
		case <-c.Done():
		case <-time.After(waitFor):
		}
	})
	return c, conn, ca
}

func subscribe5(t *testing.T, c *paho5.Client, filter string, qos byte) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), waitFor)
	defer cancel()
	sa, err := c.Subscribe(ctx, &paho5.Subscribe{Subscriptions: []paho5.SubscribeOptions{{Topic: filter, QoS: qos}}})
	if err != nil {
		t.Fatalf("subscribe %q: %v", filter, err)
	}
	if len(sa.Reasons) != 1 || sa.Reasons[0] >= 0x80 {
		t.Fatalf("subscribe %q: reasons %v", filter, sa.Reasons)
	}
}

func publish5(t *testing.T, c *paho5.Client, p *paho5.Publish) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), waitFor)
	defer cancel()
	if _, err := c.Publish(ctx, p); err != nil {
		t.Fatalf("publish %q: %v", p.Topic, err)
	}
}

// payloads returns the payloads of msgs, sorted.
func payloads(msgs []message) []string {
	out := make([]string, len(msgs))
	for i, m := range msgs {
		out[i] = m.Payload
	}
	slices.Sort(out)
	return out
}
