package mqttwire

import (
	"bytes"
	"encoding/binary"
	"unicode/utf8"
)

// Connect is the routing-relevant view of a CONNECT packet. Its strings do
// not alias the input buffer: ClientID and Username are copies.
type Connect struct {
	ProtocolName string // "MQTT" or "MQIsdp"
	Level        byte   // Level31, Level311 or Level5 (bridge bit cleared, see Bridge)
	Flags        byte   // raw connect flags (MQTT 3.1.1 §3.1.2.3)
	CleanStart   bool   // CleanSession (3.1, 3.1.1) or Clean Start (5.0)
	KeepAlive    uint16 // seconds; 0 = no keepalive
	ClientID     string
	HasUsername  bool // a user name field is present
	HasPassword  bool // a password field is present
	HasWill      bool
	Username     string
	// SessionExpiry is the MQTT 5 Session Expiry Interval (property 0x11)
	// in seconds, 0 if absent or in 3.1/3.1.1.
	SessionExpiry uint32
	// Len is the total length of the packet, fixed header included. Bytes
	// of the input beyond Len belong to the packets that follow.
	Len int
	// Bridge reports that the protocol level had bit 0x80 set, as Mosquitto
	// bridges send with try_private (the default); Level has the bit
	// cleared.
	Bridge bool
}

// Connect flag bits (MQTT 3.1.1 §3.1.2.3, MQTT 5 §3.1.2.3).
const (
	flagReserved   = 0x01
	flagCleanStart = 0x02
	flagWill       = 0x04
	flagWillQoS    = 0x18
	flagWillRetain = 0x20
	flagPassword   = 0x40
	flagUsername   = 0x80
)

// bridgeBit is set on the protocol level by Mosquitto bridges ("try_private").
const bridgeBit = 0x80

const (
	nameMQTT   = "\x00\x04MQTT"
	nameMQIsdp = "\x00\x06MQIsdp"
)

// Answers of matchName.
const (
	nameNo       = iota // neither protocol name
	nameMore            // a prefix of one of them: need more bytes
	nameIsMQTT          // "MQTT"
	nameIsMQIsdp        // "MQIsdp"
)

// matchName compares the start of a CONNECT's variable header with the two
// protocol names MQTT has used, on however many bytes there are, so that a
// stranger is told apart as early as possible.
func matchName(b []byte) int {
	for _, c := range [...]struct {
		name string
		ans  int
	}{{nameMQTT, nameIsMQTT}, {nameMQIsdp, nameIsMQIsdp}} {
		n := min(len(b), len(c.name))
		if string(b[:n]) != c.name[:n] {
			continue
		}
		if n == len(c.name) {
			return c.ans
		}
		return nameMore
	}
	return nameNo
}

// ParseConnect parses the first packet of a connection; b starts at its
// byte 0 and may hold only a prefix of the packet, or bytes beyond it.
//
// maxSize caps the total packet length (fixed header included); it is
// checked against the remaining-length field before any of the body is
// needed, and a longer packet is ErrTooLarge. maxSize <= 0 means no cap
// beyond the protocol's own (MaxRemainingLength).
//
// It returns ErrNeedMore until the whole packet is in b; ErrNotMQTT if b does
// not start with a CONNECT fixed header or the protocol name is not
// "MQTT"/"MQIsdp"; *Error for a CONNECT that must be refused. See the package
// documentation for the checks made. It allocates only the ClientID and
// Username strings.
//
// With an *Error found in a whole CONNECT, the returned Connect keeps what
// was read before the fault, so the refusal can be sent in the device's
// dialect: ProtocolName and Len always, Level (and Flags, KeepAlive, ...)
// once the level is known to be supported (Level 0 otherwise), never
// ClientID or Username. With any other error it is the zero Connect.
func ParseConnect(b []byte, maxSize int) (Connect, error) {
	if len(b) == 0 {
		return Connect{}, ErrNeedMore
	}
	if b[0]>>4 != CONNECT {
		return Connect{}, ErrNotMQTT
	}
	if maxSize <= 0 {
		maxSize = MaxFixedHeader + MaxRemainingLength
	}
	badFlags := b[0]&0x0f != 0
	rl, n, err := uvarint(b[1:])
	switch {
	case err == ErrNeedMore:
		// The length bytes so far give a lower bound of the claimed
		// length (3.1.1 allows the bytes still to come to be zeros), so a
		// claim above the cap is refused without waiting for the rest.
		if !badFlags && len(b)+1+int(partialUvarint(b[1:])) > maxSize {
			return Connect{}, ErrTooLarge
		}
		return Connect{}, ErrNeedMore
	case err != nil:
		switch {
		case badFlags:
			return Connect{}, ErrNotMQTT
		case 1+4+int(partialUvarint(b[1:])) > maxSize:
			// Already refused as too large on a prefix; stay consistent.
			return Connect{}, ErrTooLarge
		}
		return Connect{}, err
	}
	hdr := 1 + n
	total := hdr + int(rl)
	if !badFlags && total > maxSize {
		return Connect{}, ErrTooLarge
	}
	// Only the bytes of this packet count: what follows it is another one.
	avail := b[hdr:min(len(b), total)]
	complete := len(b) >= total
	name := matchName(avail)
	if name == nameNo || (badFlags && name == nameMore && complete) {
		return Connect{}, ErrNotMQTT
	}
	if name == nameMore {
		if complete {
			return Connect{}, errShort
		}
		return Connect{}, ErrNeedMore
	}
	if badFlags {
		// A CONNECT by its name, with flags that must be 0 [MQTT-2.2.2-2].
		return Connect{}, errConnectFlags
	}
	if !complete {
		return Connect{}, ErrNeedMore
	}
	c, err := parseConnectBody(b[hdr:total], name)
	c.Len = total
	return c, err
}

// partialUvarint is the value of the bytes of an incomplete variable byte
// integer read so far.
func partialUvarint(b []byte) uint32 {
	var v uint32
	for i := 0; i < len(b) && i < 4; i++ {
		v |= uint32(b[i]&0x7f) << (7 * i)
	}
	return v
}

// parseConnectBody parses the variable header and payload of a CONNECT whose
// protocol name has been matched.
func parseConnectBody(p []byte, name int) (Connect, error) {
	var c Connect
	r := reader{b: p}
	if name == nameIsMQTT {
		c.ProtocolName = "MQTT"
		r.off = len(nameMQTT)
	} else {
		c.ProtocolName = "MQIsdp"
		r.off = len(nameMQIsdp)
	}
	level, ok := r.byte()
	if !ok {
		return c, errShort
	}
	if level&bridgeBit != 0 {
		c.Bridge = true
		level &^= bridgeBit
	}
	// The name fixes the dialect: "MQIsdp" is only 3.1, "MQTT" only 3.1.1
	// and 5.0 [MQTT-3.1.2-2].
	switch {
	case name == nameIsMQIsdp && level == Level31:
	case name == nameIsMQTT && (level == Level311 || level == Level5):
	default:
		return c, errLevel
	}
	c.Level = level
	flags, ok := r.byte()
	if !ok {
		return c, errShort
	}
	c.Flags = flags
	// MQTT 3.1 names bit 0 "reserved" without requiring a value; Mosquitto
	// checks it only for 3.1.1 and 5.0, and so do we.
	if flags&flagReserved != 0 && level != Level31 {
		return c, errReserved
	}
	c.CleanStart = flags&flagCleanStart != 0
	c.HasWill = flags&flagWill != 0
	switch {
	case flags&flagWillQoS == flagWillQoS:
		return c, errWillQoS3
	case !c.HasWill && flags&flagWillQoS != 0:
		return c, errWillQoSNoWill
	case !c.HasWill && flags&flagWillRetain != 0:
		return c, errWillRetainNoWill
	}
	// MQTT 5 allows a password without a user name (§3.1.2.9); 3.1.1 does
	// not. MQTT 3.1 clients are treated as Mosquitto treats them: leniently.
	if level == Level311 && flags&flagPassword != 0 && flags&flagUsername == 0 {
		return c, errPasswordNoUser
	}
	if c.KeepAlive, ok = r.u16(); !ok {
		return c, errShort
	}
	if level == Level5 {
		props, err := r.properties()
		if err != nil {
			return c, err
		}
		if err := parseConnectProperties(props, &c); err != nil {
			return c, err
		}
	}

	id, ok := r.bytes16()
	if !ok {
		return c, errShort
	}
	if !utf8.Valid(id) {
		return c, errClientIDUTF8
	}
	if bytes.IndexByte(id, 0) >= 0 {
		return c, errClientIDNull
	}
	if len(id) == 0 {
		switch level {
		case Level31:
			// MQTT 3.1 §3.1: the client ID is 1 to 23 characters; the
			// upper bound is widely ignored and not enforced here, the
			// lower one is (Mosquitto answers "identifier rejected").
			return c, errClientIDEmpty31
		case Level311:
			if !c.CleanStart {
				return c, errClientIDEmpty // [MQTT-3.1.3-8]
			}
		}
	}

	if c.HasWill {
		if level == Level5 {
			props, err := r.properties()
			if err != nil {
				return c, err
			}
			if err := checkWillProperties(props); err != nil {
				return c, err
			}
		}
		topic, ok := r.bytes16()
		if !ok {
			return c, errShort
		}
		if err := checkString(topic); err != nil {
			return c, err
		}
		if _, ok := r.bytes16(); !ok {
			return c, errWillPayloadMissing
		}
	}

	var user []byte
	if flags&flagUsername != 0 {
		u, ok := r.bytes16()
		switch {
		case ok:
			if err := checkString(u); err != nil {
				return c, err
			}
			user, c.HasUsername = u, true
		case level == Level31 && r.off == len(r.b):
			// 3.1 clients exist that set the flag and send no field;
			// Mosquitto ignores the flag for them.
		default:
			return c, errShort
		}
	}
	if flags&flagPassword != 0 {
		_, ok := r.bytes16()
		switch {
		case ok:
			c.HasPassword = true
		case level == Level31 && r.off == len(r.b):
		default:
			return c, errShort
		}
	}
	if r.off != len(r.b) {
		return c, errTrailing
	}
	// Copy only after every check passed: a refused packet costs nothing.
	c.ClientID = string(id)
	if len(user) > 0 {
		c.Username = string(user)
	}
	return c, nil
}

// checkString validates an MQTT UTF-8 string: well-formed UTF-8
// [MQTT-1.5.3-1] (Go's decoder also refuses the surrogates U+D800..U+DFFF
// and overlong forms) and no U+0000 [MQTT-1.5.3-2]. In well-formed UTF-8 a
// zero byte is always U+0000.
func checkString(s []byte) error {
	if !utf8.Valid(s) {
		return errStringUTF8
	}
	if bytes.IndexByte(s, 0) >= 0 {
		return errStringNull
	}
	return nil
}

// MQTT 5 property identifiers valid in CONNECT (§3.1.2.11) and in the will
// properties (§3.1.3.2).
const (
	propPayloadFormat     = 0x01
	propMessageExpiry     = 0x02
	propContentType       = 0x03
	propResponseTopic     = 0x08
	propCorrelationData   = 0x09
	propSessionExpiry     = 0x11
	propAuthMethod        = 0x15
	propAuthData          = 0x16
	propRequestProblem    = 0x17
	propWillDelay         = 0x18
	propRequestResponse   = 0x19
	propReceiveMaximum    = 0x21
	propTopicAliasMaximum = 0x22
	propUserProperty      = 0x26
	propMaximumPacketSize = 0x27
)

// parseConnectProperties checks the CONNECT properties and keeps the Session
// Expiry Interval. Each property other than User Property may appear once;
// a second one is a Protocol Error (§3.1.2.11.2 to §3.1.2.11.10).
func parseConnectProperties(p []byte, c *Connect) error {
	var seen uint64
	hasAuthData := false
	r := reader{b: p}
	for r.off < len(r.b) {
		id, _ := r.byte()
		if id < 64 && id != propUserProperty {
			if seen&(1<<id) != 0 {
				return errPropDuplicate
			}
			seen |= 1 << id
		}
		switch id {
		case propSessionExpiry:
			v, ok := r.u32()
			if !ok {
				return errPropLength
			}
			c.SessionExpiry = v
		case propReceiveMaximum:
			v, ok := r.u16()
			if !ok {
				return errPropLength
			}
			if v == 0 { // §3.1.2.11.3
				return errPropValue
			}
		case propMaximumPacketSize:
			v, ok := r.u32()
			if !ok {
				return errPropLength
			}
			if v == 0 { // §3.1.2.11.4
				return errPropValue
			}
		case propTopicAliasMaximum:
			if _, ok := r.u16(); !ok {
				return errPropLength
			}
		case propRequestResponse, propRequestProblem:
			v, ok := r.byte()
			if !ok {
				return errPropLength
			}
			if v > 1 { // §3.1.2.11.6, §3.1.2.11.7
				return errPropValue
			}
		case propUserProperty:
			if err := r.stringPair(); err != nil {
				return err
			}
		case propAuthMethod:
			s, ok := r.bytes16()
			if !ok {
				return errPropLength
			}
			if err := checkString(s); err != nil {
				return err
			}
		case propAuthData:
			if _, ok := r.bytes16(); !ok {
				return errPropLength
			}
			hasAuthData = true
		default:
			return errPropUnknown
		}
	}
	if hasAuthData && seen&(1<<propAuthMethod) == 0 { // §3.1.2.11.10
		return errAuthDataNoMethod
	}
	return nil
}

// checkWillProperties checks the will properties (§3.1.3.2).
func checkWillProperties(p []byte) error {
	var seen uint64
	r := reader{b: p}
	for r.off < len(r.b) {
		id, _ := r.byte()
		if id < 64 && id != propUserProperty {
			if seen&(1<<id) != 0 {
				return errPropDuplicate
			}
			seen |= 1 << id
		}
		switch id {
		case propWillDelay, propMessageExpiry:
			if _, ok := r.u32(); !ok {
				return errPropLength
			}
		case propPayloadFormat:
			v, ok := r.byte()
			if !ok {
				return errPropLength
			}
			if v > 1 { // §3.1.3.2.3: 0 unspecified bytes, 1 UTF-8
				return errPropValue
			}
		case propContentType, propResponseTopic:
			s, ok := r.bytes16()
			if !ok {
				return errPropLength
			}
			if err := checkString(s); err != nil {
				return err
			}
		case propCorrelationData:
			if _, ok := r.bytes16(); !ok {
				return errPropLength
			}
		case propUserProperty:
			if err := r.stringPair(); err != nil {
				return err
			}
		default:
			return errPropUnknown
		}
	}
	return nil
}

// reader walks a complete packet body. Running off its end means the packet
// is shorter than its fields say.
type reader struct {
	b   []byte
	off int
}

func (r *reader) byte() (byte, bool) {
	if r.off >= len(r.b) {
		return 0, false
	}
	c := r.b[r.off]
	r.off++
	return c, true
}

func (r *reader) u16() (uint16, bool) {
	if len(r.b)-r.off < 2 {
		return 0, false
	}
	v := binary.BigEndian.Uint16(r.b[r.off:])
	r.off += 2
	return v, true
}

func (r *reader) u32() (uint32, bool) {
	if len(r.b)-r.off < 4 {
		return 0, false
	}
	v := binary.BigEndian.Uint32(r.b[r.off:])
	r.off += 4
	return v, true
}

// bytes16 reads a two-byte length and that many bytes (UTF-8 string or
// binary data, MQTT 3.1.1 §1.5.3, MQTT 5 §1.5.6).
func (r *reader) bytes16() ([]byte, bool) {
	if len(r.b)-r.off < 2 {
		return nil, false
	}
	n := int(binary.BigEndian.Uint16(r.b[r.off:]))
	if len(r.b)-r.off-2 < n {
		return nil, false
	}
	s := r.b[r.off+2 : r.off+2+n]
	r.off += 2 + n
	return s, true
}

// stringPair reads a User Property (two UTF-8 strings).
func (r *reader) stringPair() error {
	for range 2 {
		s, ok := r.bytes16()
		if !ok {
			return errPropLength
		}
		if err := checkString(s); err != nil {
			return err
		}
	}
	return nil
}

// properties reads an MQTT 5 property length and returns the property bytes
// (§2.2.2.1).
func (r *reader) properties() ([]byte, error) {
	n, w, err := uvarint(r.b[r.off:])
	if err == ErrNeedMore {
		return nil, errPropLength
	}
	if err != nil {
		return nil, err
	}
	r.off += w
	if uint64(n) > uint64(len(r.b)-r.off) {
		return nil, errPropLength
	}
	p := r.b[r.off : r.off+int(n)]
	r.off += int(n)
	return p, nil
}
