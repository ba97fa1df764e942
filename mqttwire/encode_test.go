package mqttwire

import (
	"bytes"
	"errors"
	"fmt"
	"testing"
)

func TestAppendConnack(t *testing.T) {
	cases := []struct {
		level   byte
		present bool
		reason  ReasonCode
		want    []byte
	}{
		// 3.1.1: fixed header 0x20 0x02, acknowledge flags, return code.
		{Level311, false, Success, []byte{0x20, 0x02, 0x00, 0x00}},
		{Level311, true, Success, []byte{0x20, 0x02, 0x01, 0x00}},
		{Level311, true, ServerBusy, []byte{0x20, 0x02, 0x00, 0x03}}, // [MQTT-3.2.2-4] no session present on refusal
		{Level311, false, UnsupportedProtocolVersion, []byte{0x20, 0x02, 0x00, 0x01}},
		{Level311, false, ClientIdentifierNotValid, []byte{0x20, 0x02, 0x00, 0x02}},
		{Level311, false, BadUserNameOrPassword, []byte{0x20, 0x02, 0x00, 0x04}},
		{Level311, false, NotAuthorized, []byte{0x20, 0x02, 0x00, 0x05}},
		{Level311, false, BadAuthenticationMethod, []byte{0x20, 0x02, 0x00, 0x05}},
		// 3.1: the acknowledge byte is reserved.
		{Level31, true, Success, []byte{0x20, 0x02, 0x00, 0x00}},
		{Level31, false, ServerUnavailable, []byte{0x20, 0x02, 0x00, 0x03}},
		// A level the proxy does not support is answered in the 3.1.1 form.
		{7, false, UnsupportedProtocolVersion, []byte{0x20, 0x02, 0x00, 0x01}},
		// 5.0: fixed header 0x20 0x03, flags, reason code, property length 0.
		{Level5, false, Success, []byte{0x20, 0x03, 0x00, 0x00, 0x00}},
		{Level5, true, Success, []byte{0x20, 0x03, 0x01, 0x00, 0x00}},
		{Level5, true, ServerUnavailable, []byte{0x20, 0x03, 0x00, 0x88, 0x00}}, // [MQTT-3.2.2-6]
		{Level5, false, ServerBusy, []byte{0x20, 0x03, 0x00, 0x89, 0x00}},
		{Level5, false, UseAnotherServer, []byte{0x20, 0x03, 0x00, 0x9c, 0x00}},
	}
	for _, tc := range cases {
		t.Run(fmt.Sprintf("level%d/%#x/present=%v", tc.level, byte(tc.reason), tc.present), func(t *testing.T) {
			got := AppendConnack([]byte{0xaa}, tc.level, tc.present, tc.reason)
			if !bytes.Equal(got, append([]byte{0xaa}, tc.want...)) {
				t.Fatalf("got % x, want aa % x", got, tc.want)
			}
		})
	}
}

func TestReturnCode311(t *testing.T) {
	want := map[ReasonCode]byte{
		Success: 0, UnsupportedProtocolVersion: 1, ClientIdentifierNotValid: 2,
		BadUserNameOrPassword: 4, NotAuthorized: 5, BadAuthenticationMethod: 5,
	}
	for _, r := range []ReasonCode{UnspecifiedError, MalformedPacket, ProtocolError,
		ImplementationSpecificError, ServerUnavailable, ServerBusy, Banned, PacketTooLarge,
		QuotaExceeded, UseAnotherServer, ServerMoved, ConnectionRateExceeded} {
		want[r] = 3
	}
	for r, code := range want {
		if got := ReturnCode311(r); got != code {
			t.Errorf("ReturnCode311(%#x) = %d, want %d", byte(r), got, code)
		}
	}
}

func TestAppendDisconnect(t *testing.T) {
	cases := []struct {
		level  byte
		reason ReasonCode
		want   []byte
	}{
		{Level31, ServerShuttingDown, []byte{0xe0, 0x00}},
		{Level311, ServerShuttingDown, []byte{0xe0, 0x00}},
		{Level5, Success, []byte{0xe0, 0x00}},
		{Level5, ServerShuttingDown, []byte{0xe0, 0x01, 0x8b}},
		{Level5, UseAnotherServer, []byte{0xe0, 0x01, 0x9c}},
	}
	for _, tc := range cases {
		if got := AppendDisconnect(nil, tc.level, tc.reason); !bytes.Equal(got, tc.want) {
			t.Errorf("AppendDisconnect(%d, %#x) = % x, want % x", tc.level, byte(tc.reason), got, tc.want)
		}
	}
}

func TestAppendConnect(t *testing.T) {
	cases := []struct {
		name string
		o    ConnectOptions
		want []byte
	}{
		{
			name: "zero level is 3.1.1",
			o:    ConnectOptions{ClientID: "abc", CleanStart: true, KeepAlive: 60},
			want: []byte{
				0x10, 0x0f, // CONNECT, remaining length 15
				0x00, 0x04, 'M', 'Q', 'T', 'T', 0x04, // "MQTT" level 4
				0x02,       // clean session
				0x00, 0x3c, // keepalive 60
				0x00, 0x03, 'a', 'b', 'c', // client id
			},
		},
		{
			name: "3.1 with credentials",
			o:    ConnectOptions{Level: Level31, ClientID: "c", KeepAlive: 5, Username: "u", Password: "pw"},
			want: []byte{
				0x10, 0x16, // CONNECT, remaining length 22
				0x00, 0x06, 'M', 'Q', 'I', 's', 'd', 'p', 0x03, // "MQIsdp" level 3
				0xc0,       // user name, password
				0x00, 0x05, // keepalive 5
				0x00, 0x01, 'c', // client id
				0x00, 0x01, 'u', // user name
				0x00, 0x02, 'p', 'w', // password
			},
		},
		{
			name: "5.0 session expiry",
			o:    ConnectOptions{Level: Level5, ClientID: "d", SessionExpiry: 3600},
			want: []byte{
				0x10, 0x13, // CONNECT, remaining length 19
				0x00, 0x04, 'M', 'Q', 'T', 'T', 0x05, // "MQTT" level 5
				0x00,       // flags
				0x00, 0x00, // keepalive 0
				0x05, 0x11, 0x00, 0x00, 0x0e, 0x10, // properties: session expiry 3600
				0x00, 0x01, 'd', // client id
			},
		},
		{
			name: "5.0 no properties",
			o:    ConnectOptions{Level: Level5, ClientID: "d", CleanStart: true},
			want: []byte{
				0x10, 0x0e, // CONNECT, remaining length 14
				0x00, 0x04, 'M', 'Q', 'T', 'T', 0x05, // "MQTT" level 5
				0x02,       // clean start
				0x00, 0x00, // keepalive 0
				0x00,            // property length 0
				0x00, 0x01, 'd', // client id
			},
		},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			got := AppendConnect(nil, tc.o)
			if !bytes.Equal(got, tc.want) {
				t.Fatalf("got  % x\nwant % x", got, tc.want)
			}
			c, err := ParseConnect(got, len(got))
			if err != nil {
				t.Fatal(err)
			}
			checkRoundTrip(t, tc.o, c)
		})
	}
}

func TestAppendConnectLongLength(t *testing.T) {
	id := string(bytes.Repeat([]byte{'z'}, 20000)) // three-byte remaining length
	b := AppendConnect(nil, ConnectOptions{Level: Level5, ClientID: id, CleanStart: true})
	c, err := ParseConnect(b, len(b))
	if err != nil || c.ClientID != id || c.Len != len(b) {
		t.Fatalf("len %d: %v %d", len(b), err, c.Len)
	}
	if _, err := ParseConnect(b, len(b)-1); err != ErrTooLarge {
		t.Fatalf("cap one below: %v", err)
	}
}

// checkRoundTrip compares a parsed CONNECT with the options it was built from.
func checkRoundTrip(t *testing.T, o ConnectOptions, c Connect) {
	t.Helper()
	level := o.Level
	if level == 0 {
		level = Level311
	}
	want := o.SessionExpiry
	if level != Level5 {
		want = 0
	}
	if c.Level != level || c.ClientID != o.ClientID || c.CleanStart != o.CleanStart ||
		c.KeepAlive != o.KeepAlive || c.Username != o.Username || c.HasUsername != (o.Username != "") ||
		c.HasPassword != (o.Password != "") || c.SessionExpiry != want || c.HasWill {
		t.Fatalf("round trip: options %+v, parsed %+v", o, c)
	}
}

func TestParseConnack(t *testing.T) {
	cases := []struct {
		name    string
		raw     []byte
		level   byte
		present bool
		code    byte
		n       int
		err     error
	}{
		{name: "3.1.1 accepted", raw: []byte{0x20, 0x02, 0x00, 0x00}, level: Level311, n: 4},
		{name: "3.1.1 session present", raw: []byte{0x20, 0x02, 0x01, 0x00, 0x30}, level: Level311, present: true, n: 4},
		{name: "3.1.1 refused", raw: []byte{0x20, 0x02, 0x00, 0x05}, level: Level311, code: 5, n: 4},
		{name: "3.1 reserved byte ignored", raw: []byte{0x20, 0x02, 0x01, 0x02}, level: Level31, code: 2, n: 4},
		{name: "5.0 empty properties", raw: []byte{0x20, 0x03, 0x00, 0x00, 0x00}, level: Level5, n: 5},
		{name: "5.0 no property length", raw: []byte{0x20, 0x02, 0x00, 0x87}, level: Level5, code: 0x87, n: 4},
		{
			name: "5.0 property length beyond the packet",
			raw: []byte{
				0x20, 0x0a, // CONNACK, remaining length 10
				0x01, 0x00, // session present, success
				0x09,                         // property length 9: more than the packet holds
				0x11, 0x00, 0x00, 0x00, 0x3c, // session expiry 60
				0x21, 0x00, // receive maximum, cut
			},
			level: Level5, err: errConnackLength,
		},
		{
			name: "5.0 with assigned client id",
			raw: []byte{
				0x20, 0x09, // CONNACK, remaining length 9
				0x01, 0x00, // session present, success
				0x06,                            // property length 6
				0x12, 0x00, 0x03, 'a', 'b', 'c', // assigned client identifier
			},
			level: Level5, present: true, n: 11,
		},
		{name: "empty", raw: nil, level: Level311, err: ErrNeedMore},
		{name: "header only", raw: []byte{0x20}, level: Level311, err: ErrNeedMore},
		{name: "body cut", raw: []byte{0x20, 0x02, 0x00}, level: Level311, err: ErrNeedMore},
		{name: "not a CONNACK", raw: []byte{0x30}, level: Level311, err: errConnackType},
		{
			// Refused on its first byte, as any prefix of it is: not
			// for the malformed length behind it.
			name:  "not a CONNACK, with a malformed length",
			raw:   []byte{0x30, 0x98, 0x98, 0x98, 0x98, 0x30},
			level: Level5, err: errConnackType,
		},
		{name: "CONNACK with flags", raw: []byte{0x21, 0x02, 0x00, 0x00}, level: Level311, err: errConnackType},
		{name: "3.1.1 length 3", raw: []byte{0x20, 0x03, 0x00, 0x00, 0x00}, level: Level311, err: errConnackLength},
		{name: "3.1.1 reserved flags", raw: []byte{0x20, 0x02, 0x02, 0x00}, level: Level311, err: errConnackFlags},
		{name: "too large", raw: []byte{0x20, 0xff, 0xff, 0x7f}, level: Level5, err: ErrTooLarge},
		{name: "fifth length byte", raw: []byte{0x20, 0xff, 0xff, 0xff, 0xff, 0x7f}, level: Level5, err: ErrMalformedLength},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			present, code, n, err := ParseConnack(tc.raw, tc.level)
			if !errors.Is(err, tc.err) {
				t.Fatalf("err = %v, want %v", err, tc.err)
			}
			if err == nil && (present != tc.present || code != tc.code || n != tc.n) {
				t.Fatalf("got (%v, %#x, %d), want (%v, %#x, %d)", present, code, n, tc.present, tc.code, tc.n)
			}
		})
	}
	// Every CONNACK AppendConnack writes parses back.
	for _, level := range []byte{Level31, Level311, Level5} {
		for _, r := range []ReasonCode{Success, ServerBusy, ClientIdentifierNotValid} {
			b := AppendConnack(nil, level, true, r)
			present, code, n, err := ParseConnack(b, level)
			want := byte(r)
			if level != Level5 {
				want = ReturnCode311(r)
			}
			if err != nil || n != len(b) || code != want || present != (r == Success && level != Level31) {
				t.Errorf("level %d reason %#x: % x → %v %#x %d %v", level, byte(r), b, present, code, n, err)
			}
		}
	}
}

func TestErrorMessage(t *testing.T) {
	if got, want := ErrTooLarge.Error(), "mqttwire: packet larger than the size cap (reason 0x95)"; got != want {
		t.Fatalf("%q, want %q", got, want)
	}
	var e *Error
	if !errors.As(fmt.Errorf("peek: %w", errClientIDNull), &e) || e.Reason != ClientIdentifierNotValid {
		t.Fatal("errors.As through wrapping")
	}
}
