package mqttwire

import "bytes"

// connectFixture is an annotated CONNECT (or not-CONNECT) byte string and
// what ParseConnect must answer for it: want for a match, err for
// ErrNeedMore / ErrNotMQTT / ErrTooLarge, reason for any other refusal.
type connectFixture struct {
	name   string
	raw    []byte
	max    int // size cap; 0 means 64 KiB
	want   Connect
	err    error
	reason ReasonCode
}

// longID is a client ID whose CONNECT needs a two-byte remaining length.
var longID = bytes.Repeat([]byte{'x'}, 200)

func concat(parts ...[]byte) []byte { return bytes.Join(parts, nil) }

// connectFixtures are hand-written, one per behaviour; the packets captured
// from real clients are in testdata/captured.
var connectFixtures = []connectFixture{
	// ---- matched ----
	{
		name: "v311 minimal clean session",
		raw: []byte{
			0x10, 0x0f, // CONNECT, remaining length 15
			0x00, 0x04, 'M', 'Q', 'T', 'T', // protocol name
			0x04,       // level 4 (3.1.1)
			0x02,       // flags: clean session
			0x00, 0x3c, // keepalive 60
			0x00, 0x03, 'a', 'b', 'c', // client id "abc"
		},
		want: Connect{ProtocolName: "MQTT", Level: 4, Flags: 0x02, CleanStart: true, KeepAlive: 60, ClientID: "abc", Len: 17},
	},
	{
		name: "v311 will user password",
		raw: []byte{
			0x10, 0x21, // CONNECT, remaining length 33
			0x00, 0x04, 'M', 'Q', 'T', 'T', // protocol name
			0x04,       // level 4
			0xee,       // flags: user, password, will retain, will QoS 1, will, clean
			0x00, 0x0a, // keepalive 10
			0x00, 0x04, 'd', 'e', 'v', '1', // client id
			0x00, 0x03, 'l', 'w', 't', // will topic
			0x00, 0x03, 'b', 'y', 'e', // will payload
			0x00, 0x01, 'u', // user name
			0x00, 0x02, 'p', 'w', // password
		},
		want: Connect{ProtocolName: "MQTT", Level: 4, Flags: 0xee, CleanStart: true, KeepAlive: 10, ClientID: "dev1",
			HasUsername: true, HasPassword: true, HasWill: true, Username: "u", Len: 35},
	},
	{
		name: "v311 empty client id with clean session",
		raw: []byte{
			0x10, 0x0c, // CONNECT, remaining length 12
			0x00, 0x04, 'M', 'Q', 'T', 'T', // protocol name
			0x04,       // level 4
			0x02,       // flags: clean session
			0x00, 0x00, // keepalive 0
			0x00, 0x00, // client id "" (server assigns) [MQTT-3.1.3-6]
		},
		want: Connect{ProtocolName: "MQTT", Level: 4, Flags: 0x02, CleanStart: true, Len: 14},
	},
	{
		name: "v311 followed by the next packet",
		raw: []byte{
			0x10, 0x0f, // CONNECT, remaining length 15
			0x00, 0x04, 'M', 'Q', 'T', 'T', // protocol name
			0x04,       // level 4
			0x00,       // flags: none (persistent session)
			0x00, 0x3c, // keepalive 60
			0x00, 0x03, 'a', 'b', 'c', // client id
			0xc0, 0x00, // PINGREQ: not part of the CONNECT
		},
		want: Connect{ProtocolName: "MQTT", Level: 4, KeepAlive: 60, ClientID: "abc", Len: 17},
	},
	{
		name: "v311 two-byte remaining length",
		raw: concat([]byte{
			0x10, 0xd4, 0x01, // CONNECT, remaining length 212 (0x54 + 1*128)
			0x00, 0x04, 'M', 'Q', 'T', 'T', // protocol name
			0x04,       // level 4
			0x02,       // flags: clean session
			0x00, 0x3c, // keepalive 60
			0x00, 0xc8, // client id length 200
		}, longID),
		want: Connect{ProtocolName: "MQTT", Level: 4, Flags: 0x02, CleanStart: true, KeepAlive: 60, ClientID: string(longID), Len: 215},
	},
	{
		name: "v311 non-minimal remaining length",
		raw: []byte{
			0x10, 0x8f, 0x00, // CONNECT, remaining length 15 in two bytes (3.1.1 does not forbid it)
			0x00, 0x04, 'M', 'Q', 'T', 'T', // protocol name
			0x04,       // level 4
			0x02,       // flags: clean session
			0x00, 0x3c, // keepalive 60
			0x00, 0x03, 'a', 'b', 'c', // client id
		},
		want: Connect{ProtocolName: "MQTT", Level: 4, Flags: 0x02, CleanStart: true, KeepAlive: 60, ClientID: "abc", Len: 18},
	},
	{
		name: "v311 UTF-8 client id",
		raw: []byte{
			0x10, 0x12, // CONNECT, remaining length 18
			0x00, 0x04, 'M', 'Q', 'T', 'T', // protocol name
			0x04,       // level 4
			0x02,       // flags: clean session
			0x00, 0x3c, // keepalive 60
			0x00, 0x06, 0xc3, 0xa9, 0xe2, 0x82, 0xac, 'x', // client id "é€x"
		},
		want: Connect{ProtocolName: "MQTT", Level: 4, Flags: 0x02, CleanStart: true, KeepAlive: 60, ClientID: "é€x", Len: 20},
	},
	{
		name: "v31 client id longer than 23 bytes",
		raw: concat([]byte{
			0x10, 0x2e, // CONNECT, remaining length 46
			0x00, 0x06, 'M', 'Q', 'I', 's', 'd', 'p', // protocol name
			0x03,       // level 3 (3.1)
			0x02,       // flags: clean session
			0x00, 0x0a, // keepalive 10
			0x00, 0x20, // client id length 32 (3.1 says at most 23; brokers accept more)
		}, []byte("a-client-id-longer-than-23-bytes")),
		want: Connect{ProtocolName: "MQIsdp", Level: 3, Flags: 0x02, CleanStart: true, KeepAlive: 10, ClientID: "a-client-id-longer-than-23-bytes", Len: 48},
	},
	{
		name: "v31 reserved flag bit ignored",
		raw: []byte{
			0x10, 0x11, // CONNECT, remaining length 17
			0x00, 0x06, 'M', 'Q', 'I', 's', 'd', 'p', // protocol name
			0x03,       // level 3
			0x03,       // flags: clean session, bit 0 (not checked in 3.1)
			0x00, 0x0a, // keepalive 10
			0x00, 0x03, 'o', 'l', 'd', // client id
		},
		want: Connect{ProtocolName: "MQIsdp", Level: 3, Flags: 0x03, CleanStart: true, KeepAlive: 10, ClientID: "old", Len: 19},
	},
	{
		name: "v31 user name flag without field",
		raw: []byte{
			0x10, 0x11, // CONNECT, remaining length 17
			0x00, 0x06, 'M', 'Q', 'I', 's', 'd', 'p', // protocol name
			0x03,       // level 3
			0xc2,       // flags: user, password, clean session — fields absent (Mosquitto ignores the flags in 3.1)
			0x00, 0x0a, // keepalive 10
			0x00, 0x03, 'o', 'l', 'd', // client id
		},
		want: Connect{ProtocolName: "MQIsdp", Level: 3, Flags: 0xc2, CleanStart: true, KeepAlive: 10, ClientID: "old", Len: 19},
	},
	{
		name: "v31 password without user name",
		raw: []byte{
			0x10, 0x13, // CONNECT, remaining length 19
			0x00, 0x06, 'M', 'Q', 'I', 's', 'd', 'p', // protocol name
			0x03,       // level 3
			0x42,       // flags: password, clean session (3.1.1's [MQTT-3.1.2-22] does not apply)
			0x00, 0x0a, // keepalive 10
			0x00, 0x01, 'o', // client id
			0x00, 0x02, 'p', 'w', // password
		},
		want: Connect{ProtocolName: "MQIsdp", Level: 3, Flags: 0x42, CleanStart: true, KeepAlive: 10, ClientID: "o", HasPassword: true, Len: 21},
	},
	{
		name: "v311 mosquitto bridge level 0x84",
		raw: []byte{
			0x10, 0x0f, // CONNECT, remaining length 15
			0x00, 0x04, 'M', 'Q', 'T', 'T', // protocol name
			0x84,       // level 4 with the bridge bit (Mosquitto try_private)
			0x02,       // flags: clean session
			0x00, 0x3c, // keepalive 60
			0x00, 0x03, 'b', 'r', 'g', // client id
		},
		want: Connect{ProtocolName: "MQTT", Level: 4, Flags: 0x02, CleanStart: true, KeepAlive: 60, ClientID: "brg", Len: 17, Bridge: true},
	},
	{
		name: "v5 session expiry receive maximum user property",
		raw: []byte{
			0x10, 0x21, // CONNECT, remaining length 33
			0x00, 0x04, 'M', 'Q', 'T', 'T', // protocol name
			0x05,       // level 5
			0x00,       // flags: clean start 0
			0x00, 0x1e, // keepalive 30
			0x0f,                         // property length 15
			0x11, 0x00, 0x00, 0x0e, 0x10, // session expiry interval 3600
			0x21, 0x00, 0x14, // receive maximum 20
			0x26, 0x00, 0x01, 'k', 0x00, 0x01, 'v', // user property k=v
			0x00, 0x05, 'v', '5', 'd', 'e', 'v', // client id
		},
		want: Connect{ProtocolName: "MQTT", Level: 5, KeepAlive: 30, ClientID: "v5dev", SessionExpiry: 3600, Len: 35},
	},
	{
		name: "v5 every connect property",
		raw: []byte{
			0x10, 0x3c, // CONNECT, remaining length 60
			0x00, 0x04, 'M', 'Q', 'T', 'T', // protocol name
			0x05,       // level 5
			0x02,       // flags: clean start
			0x00, 0x00, // keepalive 0
			0x2d,                         // property length 45
			0x11, 0xff, 0xff, 0xff, 0xff, // session expiry interval: never
			0x21, 0xff, 0xff, // receive maximum 65535
			0x27, 0x00, 0x01, 0x00, 0x00, // maximum packet size 65536
			0x22, 0x00, 0x0a, // topic alias maximum 10
			0x19, 0x01, // request response information 1
			0x17, 0x00, // request problem information 0
			0x26, 0x00, 0x01, 'a', 0x00, 0x00, // user property a=""
			0x26, 0x00, 0x01, 'a', 0x00, 0x01, 'b', // user property a=b (repeats allowed)
			0x15, 0x00, 0x04, 'S', 'C', 'R', 'M', // authentication method
			0x16, 0x00, 0x02, 0x01, 0x02, // authentication data
			0x00, 0x02, 'i', 'd', // client id
		},
		want: Connect{ProtocolName: "MQTT", Level: 5, Flags: 0x02, CleanStart: true, ClientID: "id", SessionExpiry: 0xffffffff, Len: 62},
	},
	{
		name: "v5 will with will properties",
		raw: []byte{
			0x10, 0x26, // CONNECT, remaining length 38
			0x00, 0x04, 'M', 'Q', 'T', 'T', // protocol name
			0x05,       // level 5
			0x06,       // flags: will, clean start
			0x00, 0x3c, // keepalive 60
			0x00,                 // property length 0
			0x00, 0x02, 'w', '5', // client id
			0x0e,                         // will property length 14
			0x18, 0x00, 0x00, 0x00, 0x05, // will delay interval 5
			0x01, 0x01, // payload format indicator: UTF-8
			0x03, 0x00, 0x04, 't', 'e', 'x', 't', // content type
			0x00, 0x03, 'w', '/', 't', // will topic
			0x00, 0x01, 'x', // will payload
		},
		want: Connect{ProtocolName: "MQTT", Level: 5, Flags: 0x06, CleanStart: true, KeepAlive: 60, ClientID: "w5", HasWill: true, Len: 40},
	},
	{
		name: "v5 password without user name",
		raw: []byte{
			0x10, 0x11, // CONNECT, remaining length 17
			0x00, 0x04, 'M', 'Q', 'T', 'T', // protocol name
			0x05,       // level 5
			0x42,       // flags: password, clean start (allowed in 5.0, §3.1.2.9)
			0x00, 0x3c, // keepalive 60
			0x00,            // property length 0
			0x00, 0x01, 'p', // client id
			0x00, 0x01, 's', // password
		},
		want: Connect{ProtocolName: "MQTT", Level: 5, Flags: 0x42, CleanStart: true, KeepAlive: 60, ClientID: "p", HasPassword: true, Len: 19},
	},
	{
		name: "v5 empty client id without clean start",
		raw: []byte{
			0x10, 0x0d, // CONNECT, remaining length 13
			0x00, 0x04, 'M', 'Q', 'T', 'T', // protocol name
			0x05,       // level 5
			0x00,       // flags: none (5.0 lets the server assign an id either way)
			0x00, 0x3c, // keepalive 60
			0x00,       // property length 0
			0x00, 0x00, // client id ""
		},
		want: Connect{ProtocolName: "MQTT", Level: 5, KeepAlive: 60, Len: 15},
	},
	{
		name: "exactly at the size cap",
		max:  17,
		raw: []byte{
			0x10, 0x0f, // CONNECT, remaining length 15: total 17
			0x00, 0x04, 'M', 'Q', 'T', 'T', // protocol name
			0x04,       // level 4
			0x02,       // flags: clean session
			0x00, 0x3c, // keepalive 60
			0x00, 0x03, 'a', 'b', 'c', // client id
		},
		want: Connect{ProtocolName: "MQTT", Level: 4, Flags: 0x02, CleanStart: true, KeepAlive: 60, ClientID: "abc", Len: 17},
	},

	// ---- need more bytes ----
	{name: "empty input", raw: nil, err: ErrNeedMore},
	{name: "type byte only", raw: []byte{0x10}, err: ErrNeedMore},
	{
		name: "length continues",
		raw:  []byte{0x10, 0xd8}, // CONNECT, first of two length bytes
		err:  ErrNeedMore,
	},
	{
		name: "protocol name prefix",
		raw: []byte{
			0x10, 0x0f, // CONNECT, remaining length 15
			0x00, 0x04, 'M', 'Q', // protocol name, cut
		},
		err: ErrNeedMore,
	},
	{
		name: "body cut before client id",
		raw: []byte{
			0x10, 0x0f, // CONNECT, remaining length 15
			0x00, 0x04, 'M', 'Q', 'T', 'T', // protocol name
			0x04,       // level 4
			0x02,       // flags
			0x00, 0x3c, // keepalive 60
		},
		err: ErrNeedMore,
	},

	// ---- not MQTT ----
	{name: "HTTP request", raw: []byte("GET / HTTP/1.1\r\nHost: x\r\n\r\n"), err: ErrNotMQTT},
	{name: "HTTP first byte", raw: []byte("G"), err: ErrNotMQTT},
	{name: "PROXY v1 header", raw: []byte("PROXY TCP4 "), err: ErrNotMQTT},
	{name: "PROXY v2 signature", raw: []byte("\r\n\r\n\x00\r\nQUIT\n"), err: ErrNotMQTT},
	{
		name: "TLS ClientHello",
		raw: []byte{
			0x16,       // handshake record: looks like CONNECT with flags 6
			0x03, 0x01, // version: read as remaining length 3, then 0x01
			0x02, 0x00, // record length: not a protocol name length of 4 or 6
			0x01, // ClientHello
		},
		err: ErrNotMQTT,
	},
	{name: "CONNACK first", raw: []byte{0x20, 0x02, 0x00, 0x00}, err: ErrNotMQTT},
	{
		name: "unknown protocol name",
		raw: []byte{
			0x10, 0x0f, // CONNECT, remaining length 15
			0x00, 0x04, 'A', 'M', 'Q', 'P', // protocol name "AMQP"
			0x04, 0x02, 0x00, 0x3c, 0x00, 0x03, 'a', 'b', 'c',
		},
		err: ErrNotMQTT,
	},
	{
		name: "protocol name refused on its first wrong byte",
		raw: []byte{
			0x10, 0x0f, // CONNECT, remaining length 15
			0x00, 0x04, 'X', // protocol name starts with 'X'
		},
		err: ErrNotMQTT,
	},
	{
		name: "protocol name length 5",
		raw:  []byte{0x10, 0x0f, 0x00, 0x05}, // name length neither 4 nor 6
		err:  ErrNotMQTT,
	},
	{
		name: "fixed-header flags and no MQTT name",
		raw: []byte{
			0x1f, 0x04, // type 1 with flags 0xf, remaining length 4
			0x00, 0x04, 'M', 'Q', // cut by the packet's own length
		},
		err: ErrNotMQTT,
	},

	// ---- too large ----
	{
		name: "200 MB claimed, refused from the length field",
		raw: []byte{
			0x10, 0x80, 0x80, 0x80, 0x64, // CONNECT, remaining length 209,715,200
		},
		err: ErrTooLarge,
	},
	{
		name: "200 MB claimed, refused before the last length byte",
		raw: []byte{
			0x10, 0xff, 0xff, 0xff, // CONNECT, length ≥ 2,097,151 so far
		},
		err: ErrTooLarge,
	},
	{
		name: "one byte over the cap",
		max:  16,
		raw: []byte{
			0x10, 0x0f, // CONNECT, remaining length 15: total 17 > 16
		},
		err: ErrTooLarge,
	},

	// ---- refused: malformed, protocol error, unsupported, bad client id ----
	{
		name:   "fifth remaining-length byte",
		max:    -1, // no cap: the length field itself is at fault
		raw:    []byte{0x10, 0xff, 0xff, 0xff, 0xff, 0x01},
		reason: MalformedPacket,
	},
	{
		name: "fixed-header flags not zero",
		raw: []byte{
			0x12, 0x0f, // CONNECT with flags 0x2 [MQTT-2.2.2-2]
			0x00, 0x04, 'M', 'Q', 'T', 'T', // protocol name
			0x04, 0x02, 0x00, 0x3c, 0x00, 0x03, 'a', 'b', 'c',
		},
		reason: MalformedPacket,
	},
	{
		name: "level 6",
		raw: []byte{
			0x10, 0x0f, // CONNECT, remaining length 15
			0x00, 0x04, 'M', 'Q', 'T', 'T', // protocol name
			0x06, // level 6: unsupported
			0x02, 0x00, 0x3c, 0x00, 0x03, 'a', 'b', 'c',
		},
		reason: UnsupportedProtocolVersion,
	},
	{
		name: "MQTT name with level 3",
		raw: []byte{
			0x10, 0x0f, // CONNECT, remaining length 15
			0x00, 0x04, 'M', 'Q', 'T', 'T', // protocol name "MQTT"
			0x03, // level 3 belongs to "MQIsdp"
			0x02, 0x00, 0x3c, 0x00, 0x03, 'a', 'b', 'c',
		},
		reason: UnsupportedProtocolVersion,
	},
	{
		name: "MQIsdp name with level 4",
		raw: []byte{
			0x10, 0x11, // CONNECT, remaining length 17
			0x00, 0x06, 'M', 'Q', 'I', 's', 'd', 'p', // protocol name "MQIsdp"
			0x04, // level 4 belongs to "MQTT"
			0x02, 0x00, 0x3c, 0x00, 0x03, 'a', 'b', 'c',
		},
		reason: UnsupportedProtocolVersion,
	},
	{
		name: "unsupported level cut short",
		raw: []byte{
			0x10, 0x07, // CONNECT, remaining length 7
			0x00, 0x04, 'M', 'Q', 'T', 'T', // protocol name
			0x07, // level 7; nothing else is needed to refuse it
		},
		reason: UnsupportedProtocolVersion,
	},
	{
		name: "reserved connect flag",
		raw: []byte{
			0x10, 0x0f, // CONNECT, remaining length 15
			0x00, 0x04, 'M', 'Q', 'T', 'T', // protocol name
			0x04,       // level 4
			0x03,       // flags: clean session + reserved bit 0 [MQTT-3.1.2-3]
			0x00, 0x3c, // keepalive
			0x00, 0x03, 'a', 'b', 'c', // client id
		},
		reason: MalformedPacket,
	},
	{
		name: "v5 reserved connect flag",
		raw: []byte{
			0x10, 0x10, // CONNECT, remaining length 16
			0x00, 0x04, 'M', 'Q', 'T', 'T', // protocol name
			0x05,       // level 5
			0x01,       // flags: reserved bit 0 [MQTT-3.1.2-3]
			0x00, 0x3c, // keepalive
			0x00,                      // property length 0
			0x00, 0x03, 'a', 'b', 'c', // client id
		},
		reason: MalformedPacket,
	},
	{
		name: "will QoS 3",
		raw: []byte{
			0x10, 0x17, // CONNECT, remaining length 23
			0x00, 0x04, 'M', 'Q', 'T', 'T', // protocol name
			0x04,       // level 4
			0x1e,       // flags: will QoS 3, will, clean [MQTT-3.1.2-14]
			0x00, 0x3c, // keepalive
			0x00, 0x03, 'a', 'b', 'c', // client id
			0x00, 0x01, 't', // will topic
			0x00, 0x03, 'b', 'y', 'e', // will payload
		},
		reason: MalformedPacket,
	},
	{
		name: "will QoS without will flag",
		raw: []byte{
			0x10, 0x0f, // CONNECT, remaining length 15
			0x00, 0x04, 'M', 'Q', 'T', 'T', // protocol name
			0x04,       // level 4
			0x0a,       // flags: will QoS 1, clean; no will [MQTT-3.1.2-13]
			0x00, 0x3c, // keepalive
			0x00, 0x03, 'a', 'b', 'c', // client id
		},
		reason: ProtocolError,
	},
	{
		name: "will retain without will flag",
		raw: []byte{
			0x10, 0x0f, // CONNECT, remaining length 15
			0x00, 0x04, 'M', 'Q', 'T', 'T', // protocol name
			0x04,       // level 4
			0x22,       // flags: will retain, clean; no will [MQTT-3.1.2-15]
			0x00, 0x3c, // keepalive
			0x00, 0x03, 'a', 'b', 'c', // client id
		},
		reason: ProtocolError,
	},
	{
		name: "v311 password without user name",
		raw: []byte{
			0x10, 0x13, // CONNECT, remaining length 19
			0x00, 0x04, 'M', 'Q', 'T', 'T', // protocol name
			0x04,       // level 4
			0x42,       // flags: password, clean; no user name [MQTT-3.1.2-22]
			0x00, 0x3c, // keepalive
			0x00, 0x03, 'a', 'b', 'c', // client id
			0x00, 0x02, 'p', 'w', // password
		},
		reason: ProtocolError,
	},
	{
		name: "client id not UTF-8",
		raw: []byte{
			0x10, 0x0f, // CONNECT, remaining length 15
			0x00, 0x04, 'M', 'Q', 'T', 'T', // protocol name
			0x04, 0x02, 0x00, 0x3c, // level, flags, keepalive
			0x00, 0x03, 'a', 0xff, 'c', // client id with byte 0xff [MQTT-1.5.3-1]
		},
		reason: ClientIdentifierNotValid,
	},
	{
		name: "client id with U+0000",
		raw: []byte{
			0x10, 0x0f, // CONNECT, remaining length 15
			0x00, 0x04, 'M', 'Q', 'T', 'T', // protocol name
			0x04, 0x02, 0x00, 0x3c, // level, flags, keepalive
			0x00, 0x03, 'a', 0x00, 'c', // client id with U+0000 [MQTT-1.5.3-2]
		},
		reason: ClientIdentifierNotValid,
	},
	{
		name: "client id with a UTF-16 surrogate",
		raw: []byte{
			0x10, 0x0f, // CONNECT, remaining length 15
			0x00, 0x04, 'M', 'Q', 'T', 'T', // protocol name
			0x04, 0x02, 0x00, 0x3c, // level, flags, keepalive
			0x00, 0x03, 0xed, 0xa0, 0x80, // U+D800 encoded: not well-formed [MQTT-1.5.3-1]
		},
		reason: ClientIdentifierNotValid,
	},
	{
		name: "client id with overlong U+0000",
		raw: []byte{
			0x10, 0x0e, // CONNECT, remaining length 14
			0x00, 0x04, 'M', 'Q', 'T', 'T', // protocol name
			0x04, 0x02, 0x00, 0x3c, // level, flags, keepalive
			0x00, 0x02, 0xc0, 0x80, // modified-UTF-8 NUL: overlong, not well-formed
		},
		reason: ClientIdentifierNotValid,
	},
	{
		name: "v311 empty client id without clean session",
		raw: []byte{
			0x10, 0x0c, // CONNECT, remaining length 12
			0x00, 0x04, 'M', 'Q', 'T', 'T', // protocol name
			0x04,       // level 4
			0x00,       // flags: clean session 0
			0x00, 0x3c, // keepalive
			0x00, 0x00, // client id "" [MQTT-3.1.3-8]
		},
		reason: ClientIdentifierNotValid,
	},
	{
		name: "v31 empty client id",
		raw: []byte{
			0x10, 0x0e, // CONNECT, remaining length 14
			0x00, 0x06, 'M', 'Q', 'I', 's', 'd', 'p', // protocol name
			0x03,       // level 3
			0x02,       // flags: clean session
			0x00, 0x3c, // keepalive
			0x00, 0x00, // client id "": 3.1 needs 1 or more characters
		},
		reason: ClientIdentifierNotValid,
	},
	{
		name: "user name not UTF-8",
		raw: []byte{
			0x10, 0x10, // CONNECT, remaining length 16
			0x00, 0x04, 'M', 'Q', 'T', 'T', // protocol name
			0x04, 0x82, 0x00, 0x3c, // level, flags: user name + clean, keepalive
			0x00, 0x01, 'a', // client id
			0x00, 0x01, 0x80, // user name: a lone continuation byte
		},
		reason: MalformedPacket,
	},
	{
		name: "will topic with U+0000",
		raw: []byte{
			0x10, 0x12, // CONNECT, remaining length 18
			0x00, 0x04, 'M', 'Q', 'T', 'T', // protocol name
			0x04, 0x06, 0x00, 0x3c, // level, flags: will + clean, keepalive
			0x00, 0x01, 'a', // client id
			0x00, 0x01, 0x00, // will topic "\x00"
			0x00, 0x00, // will payload
		},
		reason: MalformedPacket,
	},
	{
		name: "will payload missing",
		raw: []byte{
			0x10, 0x10, // CONNECT, remaining length 16
			0x00, 0x04, 'M', 'Q', 'T', 'T', // protocol name
			0x04, 0x06, 0x00, 0x3c, // level, flags: will + clean, keepalive
			0x00, 0x01, 'a', // client id
			0x00, 0x01, 't', // will topic, then nothing
		},
		reason: MalformedPacket,
	},
	{
		name: "client id longer than the packet",
		raw: []byte{
			0x10, 0x0f, // CONNECT, remaining length 15
			0x00, 0x04, 'M', 'Q', 'T', 'T', // protocol name
			0x04, 0x02, 0x00, 0x3c, // level, flags, keepalive
			0x00, 0x09, 'a', 'b', 'c', // client id claims 9 bytes, 3 in the packet
			'd', 'e', 'f', 'g', 'h', 'i', // bytes after the packet do not count
		},
		reason: MalformedPacket,
	},
	{
		name: "packet ends inside the protocol name",
		raw: []byte{
			0x10, 0x04, // CONNECT, remaining length 4
			0x00, 0x04, 'M', 'Q', // protocol name cut by the packet's length
		},
		reason: MalformedPacket,
	},
	{
		name: "bytes after the payload",
		raw: []byte{
			0x10, 0x10, // CONNECT, remaining length 16
			0x00, 0x04, 'M', 'Q', 'T', 'T', // protocol name
			0x04, 0x02, 0x00, 0x3c, // level, flags, keepalive
			0x00, 0x03, 'a', 'b', 'c', // client id
			0x00, // an extra byte inside the packet
		},
		reason: MalformedPacket,
	},
	{
		name: "v5 unknown property",
		raw: []byte{
			0x10, 0x12, // CONNECT, remaining length 18
			0x00, 0x04, 'M', 'Q', 'T', 'T', // protocol name
			0x05, 0x02, 0x00, 0x3c, // level 5, flags, keepalive
			0x02,       // property length 2
			0x01, 0x01, // payload format indicator: a will property, not valid in CONNECT
			0x00, 0x03, 'a', 'b', 'c', // client id
		},
		reason: MalformedPacket,
	},
	{
		name: "v5 duplicate session expiry",
		raw: []byte{
			0x10, 0x1a, // CONNECT, remaining length 26
			0x00, 0x04, 'M', 'Q', 'T', 'T', // protocol name
			0x05, 0x02, 0x00, 0x3c, // level 5, flags, keepalive
			0x0a,                         // property length 10
			0x11, 0x00, 0x00, 0x00, 0x0a, // session expiry 10
			0x11, 0x00, 0x00, 0x00, 0x14, // session expiry 20: twice (§3.1.2.11.2)
			0x00, 0x03, 'a', 'b', 'c', // client id
		},
		reason: ProtocolError,
	},
	{
		name: "v5 receive maximum 0",
		raw: []byte{
			0x10, 0x13, // CONNECT, remaining length 19
			0x00, 0x04, 'M', 'Q', 'T', 'T', // protocol name
			0x05, 0x02, 0x00, 0x3c, // level 5, flags, keepalive
			0x03,             // property length 3
			0x21, 0x00, 0x00, // receive maximum 0 (§3.1.2.11.3)
			0x00, 0x03, 'a', 'b', 'c', // client id
		},
		reason: ProtocolError,
	},
	{
		name: "v5 maximum packet size 0",
		raw: []byte{
			0x10, 0x15, // CONNECT, remaining length 21
			0x00, 0x04, 'M', 'Q', 'T', 'T', // protocol name
			0x05, 0x02, 0x00, 0x3c, // level 5, flags, keepalive
			0x05,                         // property length 5
			0x27, 0x00, 0x00, 0x00, 0x00, // maximum packet size 0 (§3.1.2.11.4)
			0x00, 0x03, 'a', 'b', 'c', // client id
		},
		reason: ProtocolError,
	},
	{
		name: "v5 request problem information 2",
		raw: []byte{
			0x10, 0x12, // CONNECT, remaining length 18
			0x00, 0x04, 'M', 'Q', 'T', 'T', // protocol name
			0x05, 0x02, 0x00, 0x3c, // level 5, flags, keepalive
			0x02,       // property length 2
			0x17, 0x02, // request problem information 2 (§3.1.2.11.7)
			0x00, 0x03, 'a', 'b', 'c', // client id
		},
		reason: ProtocolError,
	},
	{
		name: "v5 authentication data without method",
		raw: []byte{
			0x10, 0x14, // CONNECT, remaining length 20
			0x00, 0x04, 'M', 'Q', 'T', 'T', // protocol name
			0x05, 0x02, 0x00, 0x3c, // level 5, flags, keepalive
			0x04,                   // property length 4
			0x16, 0x00, 0x01, 0x2a, // authentication data (§3.1.2.11.10)
			0x00, 0x03, 'a', 'b', 'c', // client id
		},
		reason: ProtocolError,
	},
	{
		name: "v5 property length beyond the packet",
		raw: []byte{
			0x10, 0x10, // CONNECT, remaining length 16
			0x00, 0x04, 'M', 'Q', 'T', 'T', // protocol name
			0x05, 0x02, 0x00, 0x3c, // level 5, flags, keepalive
			0x40,                      // property length 64
			0x00, 0x03, 'a', 'b', 'c', // client id
		},
		reason: MalformedPacket,
	},
	{
		name: "v5 property length with a fifth byte",
		raw: []byte{
			0x10, 0x14, // CONNECT, remaining length 20
			0x00, 0x04, 'M', 'Q', 'T', 'T', // protocol name
			0x05, 0x02, 0x00, 0x3c, // level 5, flags, keepalive
			0x80, 0x80, 0x80, 0x80, 0x00, // property length: five bytes
			0x00, 0x03, 'a', 'b', 'c', // client id
		},
		reason: MalformedPacket,
	},
	{
		name: "v5 property value cut",
		raw: []byte{
			0x10, 0x13, // CONNECT, remaining length 19
			0x00, 0x04, 'M', 'Q', 'T', 'T', // protocol name
			0x05, 0x02, 0x00, 0x3c, // level 5, flags, keepalive
			0x03,             // property length 3
			0x11, 0x00, 0x00, // session expiry needs 4 bytes
			0x00, 0x03, 'a', 'b', 'c', // client id
		},
		reason: MalformedPacket,
	},
	{
		name: "v5 user property not UTF-8",
		raw: []byte{
			0x10, 0x17, // CONNECT, remaining length 23
			0x00, 0x04, 'M', 'Q', 'T', 'T', // protocol name
			0x05, 0x02, 0x00, 0x3c, // level 5, flags, keepalive
			0x07,                                    // property length 7
			0x26, 0x00, 0x01, 'k', 0x00, 0x01, 0xfe, // user property value 0xfe
			0x00, 0x03, 'a', 'b', 'c', // client id
		},
		reason: MalformedPacket,
	},
	{
		name: "v5 duplicate will delay",
		raw: []byte{
			0x10, 0x1f, // CONNECT, remaining length 31
			0x00, 0x04, 'M', 'Q', 'T', 'T', // protocol name
			0x05, 0x06, 0x00, 0x3c, // level 5, flags: will + clean, keepalive
			0x00,            // property length 0
			0x00, 0x01, 'a', // client id
			0x0a,                         // will property length 10
			0x18, 0x00, 0x00, 0x00, 0x01, // will delay 1
			0x18, 0x00, 0x00, 0x00, 0x02, // will delay 2: twice
			0x00, 0x01, 't', // will topic
			0x00, 0x01, 'x', // will payload
		},
		reason: ProtocolError,
	},
	{
		name: "v5 session expiry among the will properties",
		raw: []byte{
			0x10, 0x1a, // CONNECT, remaining length 26
			0x00, 0x04, 'M', 'Q', 'T', 'T', // protocol name
			0x05, 0x06, 0x00, 0x3c, // level 5, flags: will + clean, keepalive
			0x00,            // property length 0
			0x00, 0x01, 'a', // client id
			0x05,                         // will property length 5
			0x11, 0x00, 0x00, 0x00, 0x01, // session expiry: not a will property
			0x00, 0x01, 't', // will topic
			0x00, 0x01, 'x', // will payload
		},
		reason: MalformedPacket,
	},
	{
		name: "v5 will payload format 2",
		raw: []byte{
			0x10, 0x17, // CONNECT, remaining length 23
			0x00, 0x04, 'M', 'Q', 'T', 'T', // protocol name
			0x05, 0x06, 0x00, 0x3c, // level 5, flags: will + clean, keepalive
			0x00,            // property length 0
			0x00, 0x01, 'a', // client id
			0x02,       // will property length 2
			0x01, 0x02, // payload format indicator 2: only 0 and 1 exist
			0x00, 0x01, 't', // will topic
			0x00, 0x01, 'x', // will payload
		},
		reason: ProtocolError,
	},
}
