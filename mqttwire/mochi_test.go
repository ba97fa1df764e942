package mqttwire

import (
	"path/filepath"
	"testing"

	"github.com/mochi-mqtt/server/v2/packets"
)

// TestAgainstMochiDecoder decodes every CONNECT this package accepts with
// the decoder of mochi-mqtt/server (the broker engine shardgate embeds) and
// compares the fields both read. Two packets are left out on purpose: the
// MQTT 3.1 user name or password flag without its field (accepted here as Mosquitto does,
// refused by mochi) and the Mosquitto bridge level bit (mochi has no bridge
// mode). FuzzParseConnect makes the same comparison on every input it
// accepts.
func TestAgainstMochiDecoder(t *testing.T) {
	type sample struct {
		name string
		raw  []byte
	}
	var samples []sample
	for _, tc := range connectFixtures {
		if tc.err == nil && tc.reason == 0 {
			samples = append(samples, sample{tc.name, tc.raw})
		}
	}
	files, _ := filepath.Glob(filepath.Join("testdata", "captured", "*.hex"))
	for _, path := range files {
		b, err := readHexFile(path)
		if err != nil {
			t.Fatal(err)
		}
		samples = append(samples, sample{filepath.Base(path), b})
	}
	for _, s := range samples {
		c, err := ParseConnect(s.raw, 0)
		if err != nil {
			t.Fatalf("%s: %v", s.name, err)
		}
		if !inMochiDialect(c) {
			continue
		}
		t.Run(s.name, func(t *testing.T) { compareMochi(t, s.raw, c) })
	}
}

// inMochiDialect reports whether a CONNECT this package accepted is one
// mochi's decoder is expected to read the same way.
func inMochiDialect(c Connect) bool {
	return !c.Bridge && !(c.Flags&flagUsername != 0 && !c.HasUsername) &&
		!(c.Flags&flagPassword != 0 && !c.HasPassword)
}

// compareMochi decodes raw, which ParseConnect accepted as c, with mochi's
// decoder and fails on any field the two read differently.
func compareMochi(t *testing.T, raw []byte, c Connect) {
	t.Helper()
	var pk packets.Packet
	if err := pk.FixedHeader.Decode(raw[0]); err != nil {
		t.Fatal(err)
	}
	_, w, _ := uvarint(raw[1:])
	if err := pk.ConnectDecode(raw[1+w : c.Len]); err != nil {
		t.Fatalf("% x: ours %+v, mochi: %v", raw[:c.Len], c, err)
	}
	m := pk.Connect
	var expiry uint32
	if c.Level == Level5 {
		expiry = pk.Properties.SessionExpiryInterval
	}
	if string(m.ProtocolName) != c.ProtocolName || pk.ProtocolVersion != c.Level ||
		m.ClientIdentifier != c.ClientID || m.Keepalive != c.KeepAlive || m.Clean != c.CleanStart ||
		m.WillFlag != c.HasWill || m.UsernameFlag != c.HasUsername || m.PasswordFlag != c.HasPassword ||
		string(m.Username) != c.Username || expiry != c.SessionExpiry {
		t.Fatalf("% x\nmochi %+v (version %d, expiry %d)\nours  %+v", raw[:c.Len], m, pk.ProtocolVersion, expiry, c)
	}
}
