package broker

import (
	"bufio"
	"bytes"
	"context"
	"errors"
	"io"
	"net"
	"net/netip"
	"os"
	"strconv"
	"testing"
	"time"

	"github.com/mochi-mqtt/server/v2/packets"
)

// rawClient is an MQTT 5 client that sends exactly the packets a test
// tells it to, so a test can stop a QoS 2 flow half way (paho completes
// every flow by itself). Packets are encoded and decoded with mochi's
// codec.
type rawClient struct {
	t    *testing.T
	conn net.Conn
	r    *bufio.Reader
}

func rawConnect(t *testing.T, addr netip.AddrPort, id string, expiry uint32) (*rawClient, packets.Packet) {
	t.Helper()
	conn, err := net.Dial("tcp", addr.String())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = conn.Close() })
	c := &rawClient{t: t, conn: conn, r: bufio.NewReader(conn)}
	c.write(packets.Packet{
		FixedHeader:     packets.FixedHeader{Type: packets.Connect},
		ProtocolVersion: 5,
		Connect: packets.ConnectParams{
			ProtocolName:     []byte("MQTT"),
			ClientIdentifier: id,
			Keepalive:        30,
		},
		Properties: packets.Properties{SessionExpiryInterval: expiry, SessionExpiryIntervalFlag: true},
	})
	ack := c.read(waitFor)
	if ack.FixedHeader.Type != packets.Connack || ack.ReasonCode != 0 {
		t.Fatalf("connect %s: got %+v", id, ack)
	}
	return c, ack
}

func (c *rawClient) write(pk packets.Packet) {
	c.t.Helper()
	pk.ProtocolVersion = 5
	var buf bytes.Buffer
	var err error
	switch pk.FixedHeader.Type {
	case packets.Connect:
		err = pk.ConnectEncode(&buf)
	case packets.Subscribe:
		err = pk.SubscribeEncode(&buf)
	case packets.Pubrec:
		err = pk.PubrecEncode(&buf)
	case packets.Pubcomp:
		err = pk.PubcompEncode(&buf)
	default:
		c.t.Fatalf("rawClient cannot send packet type %d", pk.FixedHeader.Type)
	}
	if err == nil {
		_, err = c.conn.Write(buf.Bytes())
	}
	if err != nil {
		c.t.Fatalf("write packet type %d: %v", pk.FixedHeader.Type, err)
	}
}

// read returns the next packet; a zero packet when none comes within d.
func (c *rawClient) read(d time.Duration) packets.Packet {
	c.t.Helper()
	_ = c.conn.SetReadDeadline(time.Now().Add(d))
	b, err := c.r.ReadByte()
	if errors.Is(err, os.ErrDeadlineExceeded) {
		return packets.Packet{}
	}
	if err != nil {
		c.t.Fatalf("read: %v", err)
	}
	var fh packets.FixedHeader
	if err := fh.Decode(b); err != nil {
		c.t.Fatal(err)
	}
	if fh.Remaining, _, err = packets.DecodeLength(c.r); err != nil {
		c.t.Fatal(err)
	}
	body := make([]byte, fh.Remaining)
	if _, err := io.ReadFull(c.r, body); err != nil {
		c.t.Fatal(err)
	}
	pk := packets.Packet{FixedHeader: fh, ProtocolVersion: 5}
	switch fh.Type {
	case packets.Connack:
		err = pk.ConnackDecode(body)
	case packets.Suback:
		err = pk.SubackDecode(body)
	case packets.Publish:
		err = pk.PublishDecode(body)
	case packets.Pubrel:
		err = pk.PubrelDecode(body)
	case packets.Disconnect:
		err = pk.DisconnectDecode(body)
	default:
		c.t.Fatalf("rawClient got unexpected packet type %d", fh.Type)
	}
	if err != nil {
		c.t.Fatalf("decode packet type %d: %v", fh.Type, err)
	}
	return pk
}

// A QoS 2 message to a device whose active instance dies half way through
// the flow is delivered exactly once by the standby: with the same packet
// id and DUP set if the device had not acknowledged the PUBLISH
// [MQTT-4.3.3-1]; as a PUBREL, never the PUBLISH again, if the device had
// sent PUBREC [MQTT-4.3.3-5] (a device that has sent PUBREC has delivered
// the message onwards, and a second PUBLISH would be a new message).
func TestQoS2ExactlyOnceAcrossTakeover(t *testing.T) {
	for _, tc := range []struct {
		name      string
		sendRec   bool
		wantType  byte
		wantStore byte
	}{
		{"before PUBREC", false, packets.Publish, packets.Publish},
		{"after PUBREC", true, packets.Pubrel, packets.Pubrel},
	} {
		t.Run(tc.name, func(t *testing.T) {
			f := newRedisFleet(t)
			active, standby, other := f.start("s0-a", 0, 2), f.start("s0-b", 0, 2), f.start("s1", 1, 2)
			const id, topic = "q2", "q/2"

			dev, _ := rawConnect(t, active.Addr(), id, 3600)
			dev.write(packets.Packet{
				FixedHeader: packets.FixedHeader{Type: packets.Subscribe, Qos: 1},
				PacketID:    1,
				Filters:     packets.Subscriptions{{Filter: topic, Qos: 2}},
			})
			if ack := dev.read(waitFor); ack.FixedHeader.Type != packets.Suback || ack.ReasonCodes[0] != 2 {
				t.Fatalf("SUBACK %+v", ack)
			}
			waitRoute(t, "s0-a", topic, other)

			pub := client311(t, other.Addr(), "pub", true, nil)
			publish311(t, pub, topic, 2, false, "once")
			first := dev.read(waitFor)
			if first.FixedHeader.Type != packets.Publish || first.FixedHeader.Qos != 2 || string(first.Payload) != "once" {
				t.Fatalf("got %+v, want the QoS 2 PUBLISH", first)
			}
			queue := f.keys.clientKeys(id)[2]
			if tc.sendRec {
				dev.write(packets.Packet{FixedHeader: packets.FixedHeader{Type: packets.Pubrec}, PacketID: first.PacketID})
				if rel := dev.read(waitFor); rel.FixedHeader.Type != packets.Pubrel || rel.PacketID != first.PacketID {
					t.Fatalf("got %+v, want PUBREL %d", rel, first.PacketID)
				}
			}
			waitUntil(t, "QoS 2 state in Redis", func() bool {
				b, err := f.rdb.HGet(context.Background(), queue, itoa(first.PacketID)).Bytes()
				if err != nil {
					return false
				}
				pk, err := decodeMessage(b)
				return err == nil && pk.FixedHeader.Type == tc.wantStore
			})
			_ = dev.conn.Close() // the device drops, then its instance dies
			waitUntil(t, "disconnect recorded", func() bool {
				return f.rdb.HExists(context.Background(), f.keys.clientKeys(id)[0], "disc").Val()
			})
			if err := active.Close(); err != nil {
				t.Fatal(err)
			}

			dev2, ack := rawConnect(t, standby.Addr(), id, 3600)
			if !ack.SessionPresent {
				t.Error("session present = 0 on the standby")
			}
			again := dev2.read(waitFor)
			if again.FixedHeader.Type != tc.wantType || again.PacketID != first.PacketID {
				t.Fatalf("standby sent type %d id %d, want type %d id %d", again.FixedHeader.Type, again.PacketID, tc.wantType, first.PacketID)
			}
			if tc.wantType == packets.Publish {
				if !again.FixedHeader.Dup || string(again.Payload) != "once" {
					t.Errorf("resent PUBLISH %+v, want DUP=1 and the same payload", again)
				}
				dev2.write(packets.Packet{FixedHeader: packets.FixedHeader{Type: packets.Pubrec}, PacketID: again.PacketID})
				if rel := dev2.read(waitFor); rel.FixedHeader.Type != packets.Pubrel {
					t.Fatalf("got %+v, want PUBREL", rel)
				}
			}
			dev2.write(packets.Packet{FixedHeader: packets.FixedHeader{Type: packets.Pubcomp}, PacketID: first.PacketID})
			if extra := dev2.read(300 * time.Millisecond); extra.FixedHeader.Type != 0 {
				t.Errorf("standby sent %+v after the flow completed", extra)
			}
			waitUntil(t, "QoS 2 flow removed from Redis", func() bool {
				return f.rdb.HLen(context.Background(), queue).Val() == 0
			})
		})
	}
}

func itoa(id uint16) string { return strconv.Itoa(int(id)) }
