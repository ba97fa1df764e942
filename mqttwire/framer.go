package mqttwire

// Framer tracks MQTT packet boundaries in one direction of a byte stream. It
// reads fixed headers and remaining lengths only: it neither decodes nor
// copies payloads, and it never allocates. Its zero value is at a boundary
// (before the first byte of a packet). It is 8 bytes, so a relay can keep one
// per direction in its per-connection record.
type Framer struct {
	// remaining is the length accumulated so far while in a length field,
	// then the body bytes still to come.
	remaining uint32
	// state: stateBoundary, 1..4 = the number of the next remaining-length
	// byte, stateBody, or stateBroken after a malformed length.
	state uint8
	// last is the type nibble of the last packet whose first byte was seen.
	last uint8
	_    [2]byte
}

const (
	stateBoundary uint8 = 0
	stateBody     uint8 = 5
	stateBroken   uint8 = 6
)

// Feed consumes the next bytes of the stream and returns the number of
// packets that completed within b. A remaining length with a continuation
// bit on its fourth byte is ErrMalformedLength; the stream cannot be framed
// after it and every later Feed fails too.
func (f *Framer) Feed(b []byte) (packets int, err error) {
	for i := 0; i < len(b); {
		switch f.state {
		case stateBoundary:
			f.last = b[i] >> 4
			f.remaining = 0
			f.state = 1
			i++
		case stateBody:
			n := uint32(len(b) - i)
			if n < f.remaining {
				f.remaining -= n
				return packets, nil
			}
			i += int(f.remaining)
			f.remaining = 0
			f.state = stateBoundary
			packets++
		case stateBroken:
			return packets, errFramerBroken
		default: // remaining-length byte f.state
			c := b[i]
			i++
			f.remaining |= uint32(c&0x7f) << (7 * (f.state - 1))
			switch {
			case c&0x80 == 0 && f.remaining == 0:
				f.state = stateBoundary
				packets++
			case c&0x80 == 0:
				f.state = stateBody
			case f.state == 4:
				f.state = stateBroken
				return packets, ErrMalformedLength
			default:
				f.state++
			}
		}
	}
	return packets, nil
}

// AtBoundary reports whether the stream is between packets, where another
// packet may be injected.
func (f *Framer) AtBoundary() bool { return f.state == stateBoundary }

// LastType returns the type nibble of the last packet whose first byte was
// fed (0 before any).
func (f *Framer) LastType() byte { return f.last }

// Split returns the offset in b at which the packet in progress ends, without
// changing f: 0 if f is at a boundary, len(b) if the packet does not end
// within b (or the stream is broken). Feeding b[:Split(b)] leaves f at a
// boundary when the packet ends in b, so a packet can be injected between
// b[:off] and b[off:].
func (f *Framer) Split(b []byte) int {
	g := *f
	if g.state == stateBoundary {
		return 0
	}
	for i := 0; i < len(b); {
		switch g.state {
		case stateBody:
			if uint64(len(b)-i) < uint64(g.remaining) {
				return len(b)
			}
			return i + int(g.remaining)
		case stateBroken:
			return len(b)
		default:
			c := b[i]
			i++
			g.remaining |= uint32(c&0x7f) << (7 * (g.state - 1))
			switch {
			case c&0x80 == 0 && g.remaining == 0:
				return i
			case c&0x80 == 0:
				g.state = stateBody
			case g.state == 4:
				return len(b)
			default:
				g.state++
			}
		}
	}
	return len(b)
}
