package mqttwire

import (
	"errors"
	"net"
	"path/filepath"
	"testing"
	"time"

	"github.com/mochi-mqtt/server/v2/packets"

	"github.com/shardgate/shardgate/internal/servertest"
)

// connackFixture is an annotated MQTT 5 CONNACK (or not) and what
// ParseConnackProperties must answer: want for a well-formed packet, err
// otherwise (ErrNeedMore, ErrTooLarge, ErrMalformedLength or one *Error).
type connackFixture struct {
	name string
	raw  []byte
	want ConnackProperties
	err  error
}

// capturedConnack is the file of a CONNACK captured from Mosquitto 2.0.11
// with max_keepalive 10 (TestConnackCaptureLive checks it against a live
// one).
var capturedConnack = filepath.Join("testdata", "connack", "mosquitto-2.0.11-max_keepalive-10.hex")

var connackFixtures = []connackFixture{
	// ---- well-formed ----
	{
		name: "server keep alive 1",
		raw: []byte{
			0x20, 0x06, // CONNACK, remaining length 6
			0x00,             // acknowledge flags: no session
			0x00,             // reason: success
			0x03,             // property length 3
			0x13, 0x00, 0x01, // server keep alive 1 s
		},
		want: ConnackProperties{ServerKeepAlive: 1, HasServerKeepAlive: true, Len: 8},
	},
	{
		name: "server keep alive 0 turns the keepalive off",
		raw: []byte{
			0x20, 0x06, // CONNACK, remaining length 6
			0x00, 0x00, // no session, success
			0x03,             // property length 3
			0x13, 0x00, 0x00, // server keep alive 0 [MQTT-3.1.2-21] §3.1.2.10
		},
		want: ConnackProperties{HasServerKeepAlive: true, Len: 8},
	},
	{
		name: "no server keep alive",
		raw: []byte{
			0x20, 0x03, // CONNACK, remaining length 3
			0x01, 0x00, // session present, success
			0x00, // property length 0
		},
		want: ConnackProperties{SessionPresent: true, Len: 5},
	},
	{
		name: "short form without property length",
		raw: []byte{
			0x20, 0x02, // CONNACK, remaining length 2
			0x00, 0x88, // no session, server unavailable
		},
		want: ConnackProperties{Reason: ServerUnavailable, Len: 4},
	},
	{
		name: "every CONNACK property, server keep alive last",
		raw: concat(
			[]byte{0x20, 0x55},                                // CONNACK, remaining length 85
			[]byte{0x01, 0x00},                                // session present, success
			[]byte{0x52},                                      // property length 82
			[]byte{0x11, 0x00, 0x00, 0x0e, 0x10},              // session expiry 3600
			[]byte{0x21, 0x00, 0x10},                          // receive maximum 16
			[]byte{0x24, 0x01},                                // maximum QoS 1
			[]byte{0x25, 0x00},                                // retain not available
			[]byte{0x27, 0x00, 0x01, 0x00, 0x00},              // maximum packet size 65536
			[]byte{0x12, 0x00, 0x02, 'i', 'd'},                // assigned client identifier "id"
			[]byte{0x22, 0x00, 0x05},                          // topic alias maximum 5
			[]byte{0x1f, 0x00, 0x02, 'o', 'k'},                // reason string "ok"
			[]byte{0x26, 0x00, 0x01, 'k', 0x00, 0x01, 'v'},    // user property k=v
			[]byte{0x26, 0x00, 0x01, 'k', 0x00, 0x01, 'w'},    // user property again: allowed
			[]byte{0x28, 0x01},                                // wildcard subscriptions available
			[]byte{0x29, 0x00},                                // subscription identifiers not available
			[]byte{0x2a, 0x01},                                // shared subscriptions available
			[]byte{0x1a, 0x00, 0x04, 'r', 'e', 's', 'p'},      // response information "resp"
			[]byte{0x1c, 0x00, 0x05, 'o', 't', 'h', 'e', 'r'}, // server reference "other"
			[]byte{0x15, 0x00, 0x05, 'S', 'C', 'R', 'A', 'M'}, // authentication method "SCRAM"
			[]byte{0x16, 0x00, 0x03, 0x00, 0xff, 0x01},        // authentication data (binary)
			[]byte{0x13, 0x02, 0x58},                          // server keep alive 600 s
		),
		want: ConnackProperties{SessionPresent: true, ServerKeepAlive: 600, HasServerKeepAlive: true, Len: 87},
	},
	{
		name: "refusal with a reason string",
		raw: []byte{
			0x20, 0x08, // CONNACK, remaining length 8
			0x00, 0x87, // no session, not authorized
			0x05,                       // property length 5
			0x1f, 0x00, 0x02, 'n', 'o', // reason string "no"
		},
		want: ConnackProperties{Reason: NotAuthorized, Len: 10},
	},
	{
		name: "followed by the next packet",
		raw: []byte{
			0x20, 0x06, // CONNACK, remaining length 6
			0x00, 0x00, // no session, success
			0x03,             // property length 3
			0x13, 0x00, 0x1e, // server keep alive 30 s
			0x30, 0x03, 0x00, 0x01, 't', // PUBLISH: not part of the CONNACK
		},
		want: ConnackProperties{ServerKeepAlive: 30, HasServerKeepAlive: true, Len: 8},
	},

	// ---- need more bytes, too large ----
	{name: "empty", raw: nil, err: ErrNeedMore},
	{name: "remaining length cut", raw: []byte{0x20, 0x80}, err: ErrNeedMore},
	{
		name: "cut inside server keep alive",
		raw: []byte{
			0x20, 0x06, // CONNACK, remaining length 6
			0x00, 0x00, // no session, success
			0x03,       // property length 3
			0x13, 0x00, // server keep alive, second byte still to come
		},
		err: ErrNeedMore,
	},
	{
		name: "claims more than MaxConnackSize",
		raw:  []byte{0x20, 0x81, 0x80, 0x04}, // remaining length 65537, nothing else needed to refuse
		err:  ErrTooLarge,
	},
	{name: "fifth length byte", raw: []byte{0x20, 0x80, 0x80, 0x80, 0x80, 0x01}, err: ErrMalformedLength},

	// ---- refused ----
	{name: "AUTH, not CONNACK", raw: []byte{0xf0, 0x00}, err: errConnackType},
	{name: "CONNACK flags not 0", raw: []byte{0x21, 0x03, 0x00, 0x00, 0x00}, err: errConnackType},
	{name: "reserved acknowledge flags", raw: []byte{0x20, 0x03, 0x02, 0x00, 0x00}, err: errConnackFlags},
	{name: "remaining length 1", raw: []byte{0x20, 0x01, 0x00}, err: errConnackLength},
	{
		name: "property length short of the packet",
		raw: []byte{
			0x20, 0x06, // CONNACK, remaining length 6
			0x00, 0x00, // no session, success
			0x02,             // property length 2: the packet has 3 more bytes
			0x13, 0x00, 0x01, // server keep alive 1
		},
		err: errConnackLength,
	},
	{
		name: "server keep alive cut by the packet",
		raw: []byte{
			0x20, 0x05, // CONNACK, remaining length 5
			0x00, 0x00, // no session, success
			0x02,       // property length 2
			0x13, 0x00, // server keep alive needs two bytes
		},
		err: errPropLength,
	},
	{
		name: "server keep alive twice",
		raw: []byte{
			0x20, 0x09, // CONNACK, remaining length 9
			0x00, 0x00, // no session, success
			0x06,             // property length 6
			0x13, 0x00, 0x01, // server keep alive 1
			0x13, 0x00, 0x3c, // and 60: a protocol error (§2.2.2.2)
		},
		err: errPropDuplicate,
	},
	{
		name: "property of CONNECT only",
		raw: []byte{
			0x20, 0x05, // CONNACK, remaining length 5
			0x00, 0x00, // no session, success
			0x02,       // property length 2
			0x17, 0x01, // request problem information: not valid in CONNACK
		},
		err: errPropNotConnack,
	},
	{
		name: "receive maximum 0",
		raw:  []byte{0x20, 0x06, 0x00, 0x00, 0x03, 0x21, 0x00, 0x00}, // §3.2.2.3.3
		err:  errPropValue,
	},
	{
		name: "maximum QoS 2",
		raw:  []byte{0x20, 0x05, 0x00, 0x00, 0x02, 0x24, 0x02}, // §3.2.2.3.4: 0 or 1
		err:  errPropValue,
	},
	{
		name: "maximum packet size 0",
		raw:  []byte{0x20, 0x08, 0x00, 0x00, 0x05, 0x27, 0x00, 0x00, 0x00, 0x00}, // §3.2.2.3.6
		err:  errPropValue,
	},
	{
		name: "reason string not UTF-8",
		raw:  []byte{0x20, 0x07, 0x00, 0x80, 0x04, 0x1f, 0x00, 0x01, 0xff}, // [MQTT-1.5.4-1]
		err:  errStringUTF8,
	},
	{
		name: "user property holds U+0000",
		raw:  []byte{0x20, 0x0a, 0x00, 0x00, 0x07, 0x26, 0x00, 0x01, 'k', 0x00, 0x01, 0x00}, // [MQTT-1.5.4-2]
		err:  errStringNull,
	},
}

func TestParseConnackProperties(t *testing.T) {
	captured, err := readHexFile(capturedConnack)
	if err != nil {
		t.Fatal(err)
	}
	cases := append([]connackFixture{{
		name: "captured from Mosquitto 2.0.11, max_keepalive 10, CONNECT keepalive 60",
		raw:  captured,
		want: ConnackProperties{ServerKeepAlive: 10, HasServerKeepAlive: true, Len: len(captured)},
	}}, connackFixtures...)
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			got, err := ParseConnackProperties(tc.raw)
			if !errors.Is(err, tc.err) {
				t.Fatalf("% x: err = %v, want %v", tc.raw, err, tc.err)
			}
			if err != nil {
				if got != (ConnackProperties{}) {
					t.Fatalf("error %v with %+v", err, got)
				}
				return
			}
			if got != tc.want {
				t.Fatalf("% x\ngot  %+v\nwant %+v", tc.raw, got, tc.want)
			}
			for i := range got.Len {
				if _, err := ParseConnackProperties(tc.raw[:i]); err != ErrNeedMore {
					t.Fatalf("prefix of %d bytes: %v", i, err)
				}
			}
			compareMochiConnack(t, tc.raw, got)
		})
	}
}

// The relay parses every MQTT 5 CONNACK it passes on: that costs nothing.
func TestParseConnackPropertiesAllocs(t *testing.T) {
	var raw []byte
	for _, tc := range connackFixtures {
		if tc.err == nil && len(tc.raw) > len(raw) {
			raw = tc.raw
		}
	}
	if n := testing.AllocsPerRun(100, func() { ParseConnackProperties(raw) }); n != 0 {
		t.Fatalf("%v allocations per CONNACK", n)
	}
}

// compareMochiConnack decodes raw, which ParseConnackProperties accepted as
// p, with the decoder of the broker engine and fails on any difference.
func compareMochiConnack(t *testing.T, raw []byte, p ConnackProperties) {
	t.Helper()
	pk := packets.Packet{ProtocolVersion: 5}
	if err := pk.FixedHeader.Decode(raw[0]); err != nil {
		t.Fatal(err)
	}
	_, w, _ := uvarint(raw[1:])
	body := raw[1+w : p.Len]
	if len(body) == 2 {
		// mochi needs the property length; the short form has none.
		body = append(body[:2:2], 0)
	}
	if err := pk.ConnackDecode(body); err != nil {
		t.Fatalf("% x: ours %+v, mochi: %v", raw[:p.Len], p, err)
	}
	m := pk.Properties
	if pk.SessionPresent != p.SessionPresent || ReasonCode(pk.ReasonCode) != p.Reason ||
		m.ServerKeepAliveFlag != p.HasServerKeepAlive || m.ServerKeepAlive != p.ServerKeepAlive {
		t.Fatalf("% x\nmochi present %v reason %#x keepalive %v %d\nours  %+v", raw[:p.Len],
			pk.SessionPresent, pk.ReasonCode, m.ServerKeepAliveFlag, m.ServerKeepAlive, p)
	}
}

// TestConnackCaptureLive asks a real Mosquitto with max_keepalive 10 for a
// CONNACK on a CONNECT with keepalive 60 and checks it reads like the
// committed capture: Server Keep Alive 10.
func TestConnackCaptureLive(t *testing.T) {
	if testing.Short() {
		t.Skip("live capture from a real broker: not in -short")
	}
	// Mosquitto 2.0 refuses max_keepalive below 10.
	broker := servertest.Mosquitto(t, servertest.MosquittoOptions{Config: []string{"max_keepalive 10"}})
	c, err := net.Dial("tcp", broker.String())
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	c.Write(AppendConnect(nil, ConnectOptions{Level: Level5, ClientID: "k", CleanStart: true, KeepAlive: 60}))
	c.SetReadDeadline(time.Now().Add(5 * time.Second))
	var live []byte
	buf := make([]byte, 256)
	for {
		n, err := c.Read(buf)
		live = append(live, buf[:n]...)
		p, perr := ParseConnackProperties(live)
		if perr == ErrNeedMore && err == nil {
			continue
		}
		if perr != nil {
			t.Fatalf("% x: %v (read: %v)", live, perr, err)
		}
		if !p.HasServerKeepAlive || p.ServerKeepAlive != 10 || p.Reason != Success {
			t.Fatalf("% x: %+v, want Server Keep Alive 10", live, p)
		}
		break
	}
	golden, err := readHexFile(capturedConnack)
	if err != nil {
		t.Fatal(err)
	}
	if string(golden) != string(live) {
		t.Logf("live bytes differ from %s (another Mosquitto version?):\nlive   % x\ngolden % x", capturedConnack, live, golden)
	}
}
