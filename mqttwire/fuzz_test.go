package mqttwire

import (
	"encoding/binary"
	"math/rand/v2"
	"path/filepath"
	"testing"
)

// fuzzSeeds are every hand-written fixture, every captured CONNECT and the
// framing stream.
func fuzzSeeds(f *testing.F) [][]byte {
	var seeds [][]byte
	for _, tc := range connectFixtures {
		seeds = append(seeds, tc.raw)
	}
	files, _ := filepath.Glob(filepath.Join("testdata", "captured", "*.hex"))
	for _, path := range files {
		b, err := readHexFile(path)
		if err != nil {
			f.Fatal(err)
		}
		seeds = append(seeds, b)
	}
	return append(seeds, stream)
}

func FuzzParseConnect(f *testing.F) {
	for _, s := range fuzzSeeds(f) {
		f.Add(s, uint16(0))
		f.Add(s, uint16(len(s)))
	}
	f.Fuzz(func(t *testing.T, b []byte, capBytes uint16) {
		maxSize := int(capBytes) // 0: no cap
		c, err := ParseConnect(b, maxSize)
		if err == nil {
			if c.Len <= 0 || c.Len > len(b) || (maxSize > 0 && c.Len > maxSize) {
				t.Fatalf("Len %d, input %d, cap %d", c.Len, len(b), maxSize)
			}
		} else if _, ok := err.(*Error); ok {
			if c.ClientID != "" || c.Username != "" || (c.Len != 0 && c.Len > len(b)) {
				t.Fatalf("refused CONNECT carries %+v", c)
			}
		} else if err != ErrNeedMore && err != ErrNotMQTT {
			t.Fatalf("unexpected error type %T: %v", err, err)
		} else if c != (Connect{}) {
			t.Fatalf("%v with %+v", err, c)
		}

		// Bytes after a packet do not change the answer about it.
		if _, _, total, herr := FixedHeader(b); herr == nil && total < len(b) {
			c2, err2 := ParseConnect(b[:total], maxSize)
			if err2 != err || c2 != c {
				t.Fatalf("whole input (%+v, %v), its first packet (%+v, %v)", c, err, c2, err2)
			}
		}

		// A prefix never contradicts the answer for the whole: it is the
		// same answer or a request for more bytes.
		for i := 0; i < len(b) && i < 300; i++ {
			cp, errp := ParseConnect(b[:i], maxSize)
			if errp == ErrNeedMore {
				continue
			}
			if errp != err || cp != c {
				t.Fatalf("prefix %d answers (%+v, %v), whole input (%+v, %v)", i, cp, errp, c, err)
			}
		}

		// The broker engine's decoder reads an accepted CONNECT the same way.
		if err == nil && inMochiDialect(c) {
			compareMochi(t, b, c)
		}

		// Re-encode what was understood and parse it again. A will, a
		// user name flag with an empty name, and properties other than
		// the session expiry have no ConnectOptions field.
		if err != nil || c.HasWill || (c.HasUsername && c.Username == "") {
			return
		}
		o := ConnectOptions{Level: c.Level, ClientID: c.ClientID, CleanStart: c.CleanStart,
			KeepAlive: c.KeepAlive, Username: c.Username, SessionExpiry: c.SessionExpiry}
		if c.HasPassword {
			o.Password = "x"
		}
		re := AppendConnect(nil, o)
		c2, err := ParseConnect(re, 0)
		if err != nil {
			t.Fatalf("re-encoded % x: %v", re, err)
		}
		checkRoundTrip(t, o, c2)
		if c2.Level != c.Level || c2.ClientID != c.ClientID || c2.CleanStart != c.CleanStart ||
			c2.KeepAlive != c.KeepAlive || c2.Username != c.Username || c2.HasUsername != c.HasUsername ||
			c2.HasPassword != c.HasPassword || c2.SessionExpiry != c.SessionExpiry || c2.ProtocolName != c.ProtocolName {
			t.Fatalf("parsed %+v, re-encoded and parsed %+v", c, c2)
		}
	})
}

// referenceCount frames b with FixedHeader alone: the number of whole
// packets, and whether a malformed length field starts within b.
func referenceCount(b []byte) (packets int, malformed bool) {
	for off := 0; off < len(b); {
		_, _, total, err := FixedHeader(b[off:])
		if err == ErrMalformedLength {
			return packets, true
		}
		if err != nil || total > len(b)-off {
			return packets, false
		}
		packets++
		off += total
	}
	return packets, false
}

func FuzzFramer(f *testing.F) {
	for _, s := range fuzzSeeds(f) {
		f.Add(s, uint64(1))
	}
	f.Add([]byte{0x30, 0xff, 0xff, 0xff, 0xff, 0x01}, uint64(7))
	f.Fuzz(func(t *testing.T, b []byte, seed uint64) {
		var whole Framer
		n, err := whole.Feed(b)
		ref, malformed := referenceCount(b)
		if (err != nil) != malformed || n != ref {
			t.Fatalf("Feed: %d packets, err %v; reference: %d packets, malformed %v", n, err, ref, malformed)
		}

		// The same bytes in random chunks: same count, same end state.
		rng := rand.New(rand.NewPCG(seed, uint64(len(b))))
		var parts Framer
		sum := 0
		var perr error
		for rest := b; len(rest) > 0 && perr == nil; {
			k := 1 + rng.IntN(len(rest))
			chunk := rest[:k]
			rest = rest[k:]

			// Split agrees with Feed, and does not change the framer.
			before := parts
			off := parts.Split(chunk)
			if parts != before {
				t.Fatal("Split changed the framer")
			}
			probe := parts
			pn, probeErr := probe.Feed(chunk[:off])
			switch {
			case before.AtBoundary():
				if off != 0 {
					t.Fatalf("Split at a boundary = %d", off)
				}
			case probeErr != nil:
				if off != len(chunk) {
					t.Fatalf("Split = %d on a stream that fails", off)
				}
			case off < len(chunk) && (pn != 1 || !probe.AtBoundary()):
				t.Fatalf("feeding to Split = %d of %d: %d packets, boundary %v", off, len(chunk), pn, probe.AtBoundary())
			case off == len(chunk) && probe.AtBoundary() != (pn == 1):
				t.Fatalf("feeding a whole chunk of %d: %d packets, boundary %v", off, pn, probe.AtBoundary())
			}

			var cn int
			cn, perr = parts.Feed(chunk)
			sum += cn
		}
		if sum != n || (perr != nil) != (err != nil) || parts != whole {
			t.Fatalf("chunked: %d packets, err %v, state %+v; whole: %d, %v, %+v", sum, perr, parts, n, err, whole)
		}
	})
}

// TestFuzzHelpers pins the reference framer the fuzzer trusts.
func TestFuzzHelpers(t *testing.T) {
	if n, bad := referenceCount(stream); n != streamPackets || bad {
		t.Fatalf("%d %v", n, bad)
	}
	big := binary.BigEndian.AppendUint16(nil, 1)
	if n, bad := referenceCount(big); n != 0 || bad {
		t.Fatalf("%d %v", n, bad)
	}
}

// FuzzConnackProperties feeds ParseConnackProperties, which the relay runs
// on every MQTT 5 broker's first bytes: it must never panic, never claim
// more bytes than it was given, agree with ParseConnack on the packet, give
// the same answer for any prefix (or ask for more) and whatever follows the
// packet, and read an accepted CONNACK as the broker engine's decoder does.
func FuzzConnackProperties(f *testing.F) {
	for _, tc := range connackFixtures {
		f.Add(tc.raw)
	}
	if b, err := readHexFile(capturedConnack); err == nil {
		f.Add(b)
	}
	for _, r := range []ReasonCode{Success, ServerBusy, NotAuthorized} {
		f.Add(AppendConnack(nil, Level5, true, r))
	}
	f.Fuzz(func(t *testing.T, b []byte) {
		p, err := ParseConnackProperties(b)
		switch e := err.(type) {
		case nil:
			if p.Len <= 0 || p.Len > len(b) || p.Len > MaxConnackSize {
				t.Fatalf("Len %d, input %d", p.Len, len(b))
			}
			present, code, n, cerr := ParseConnack(b, Level5)
			if cerr != nil || present != p.SessionPresent || ReasonCode(code) != p.Reason || n != p.Len {
				t.Fatalf("ParseConnack (%v, %#x, %d, %v), ours %+v", present, code, n, cerr, p)
			}
			if !p.HasServerKeepAlive && p.ServerKeepAlive != 0 {
				t.Fatalf("keepalive %d without the property", p.ServerKeepAlive)
			}
		case *Error:
			if p != (ConnackProperties{}) {
				t.Fatalf("%v with %+v", e, p)
			}
		default:
			if err != ErrNeedMore || p != (ConnackProperties{}) {
				t.Fatalf("unexpected (%+v, %T %v)", p, err, err)
			}
		}

		// Bytes after a packet do not change the answer about it.
		if _, _, total, herr := FixedHeader(b); herr == nil && total < len(b) {
			p2, err2 := ParseConnackProperties(b[:total])
			if err2 != err || p2 != p {
				t.Fatalf("whole input (%+v, %v), its first packet (%+v, %v)", p, err, p2, err2)
			}
		}

		// A prefix is the same answer or a request for more bytes.
		for i := 0; i < len(b) && i < 300; i++ {
			pp, errp := ParseConnackProperties(b[:i])
			if errp == ErrNeedMore {
				continue
			}
			if errp != err || pp != p {
				t.Fatalf("prefix %d answers (%+v, %v), whole input (%+v, %v)", i, pp, errp, p, err)
			}
		}

		if err == nil {
			compareMochiConnack(t, b, p)
		}
	})
}
