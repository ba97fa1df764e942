package mqttwire

// ConnackProperties is what a relay needs from a broker's MQTT 5 CONNACK:
// the answer, and the Server Keep Alive that replaces the keepalive the
// client sent in its CONNECT [MQTT-3.2.2-21].
type ConnackProperties struct {
	SessionPresent bool
	Reason         ReasonCode
	// ServerKeepAlive is the Server Keep Alive property (0x13) in seconds,
	// valid when HasServerKeepAlive; 0 turns the keepalive off
	// (§3.2.2.3.14, §3.1.2.10).
	ServerKeepAlive    uint16
	HasServerKeepAlive bool
	// Len is the length of the packet, fixed header included. Bytes of the
	// input beyond it belong to the packets that follow.
	Len int
}

// MQTT 5 property identifiers that only a CONNACK carries (§3.2.2.3), next
// to those it shares with CONNECT (connect.go).
const (
	propAssignedClientID     = 0x12
	propServerKeepAlive      = 0x13
	propResponseInfo         = 0x1A
	propServerReference      = 0x1C
	propReasonString         = 0x1F
	propMaximumQoS           = 0x24
	propRetainAvailable      = 0x25
	propWildcardSubAvailable = 0x28
	propSubIDAvailable       = 0x29
	propSharedSubAvailable   = 0x2A
)

// ParseConnackProperties parses the MQTT 5 CONNACK at the start of b,
// properties included. b may hold only a prefix of the packet, or bytes
// beyond it; like ParseConnect it keeps no state between calls.
//
// It returns ErrNeedMore while b holds less than the whole packet (a claimed
// length above MaxConnackSize is ErrTooLarge as soon as the length field is
// read, so a caller collecting a CONNACK in pieces never holds more), and an
// *Error for anything but a well-formed CONNACK: a packet of another type,
// a bad length or reserved flag, a property length that does not describe
// exactly the rest of the packet, a property not valid in CONNACK
// (malformed), a single-valued property twice or a value out of range
// (protocol error), a string that is not well-formed UTF-8 or holds U+0000.
// It never allocates.
func ParseConnackProperties(b []byte) (ConnackProperties, error) {
	present, code, total, err := ParseConnack(b, Level5)
	if err != nil {
		return ConnackProperties{}, err
	}
	p := ConnackProperties{SessionPresent: present, Reason: ReasonCode(code), Len: total}
	_, w, _ := uvarint(b[1:])
	body := b[1+w : total]
	if len(body) == 2 {
		// No property length at all: no properties (ParseConnack
		// accepts the short form).
		return p, nil
	}
	// ParseConnack checked that the property length covers exactly the
	// rest of the packet.
	_, pw, _ := uvarint(body[2:])
	if err := parseConnackProps(body[2+pw:], &p); err != nil {
		return ConnackProperties{}, err
	}
	return p, nil
}

// parseConnackProps checks the CONNACK properties (§3.2.2.3.2 to
// §3.2.2.3.18) and keeps the Server Keep Alive. Each property other than
// User Property may appear once.
func parseConnackProps(b []byte, p *ConnackProperties) error {
	var seen uint64
	r := reader{b: b}
	for r.off < len(r.b) {
		id, _ := r.byte()
		if id < 64 && id != propUserProperty {
			if seen&(1<<id) != 0 {
				return errPropDuplicate
			}
			seen |= 1 << id
		}
		switch id {
		case propServerKeepAlive:
			v, ok := r.u16()
			if !ok {
				return errPropLength
			}
			p.ServerKeepAlive, p.HasServerKeepAlive = v, true
		case propSessionExpiry:
			if _, ok := r.u32(); !ok {
				return errPropLength
			}
		case propReceiveMaximum:
			v, ok := r.u16()
			if !ok {
				return errPropLength
			}
			if v == 0 { // §3.2.2.3.3
				return errPropValue
			}
		case propMaximumPacketSize:
			v, ok := r.u32()
			if !ok {
				return errPropLength
			}
			if v == 0 { // §3.2.2.3.6
				return errPropValue
			}
		case propTopicAliasMaximum:
			if _, ok := r.u16(); !ok {
				return errPropLength
			}
		case propMaximumQoS, propRetainAvailable, propWildcardSubAvailable,
			propSubIDAvailable, propSharedSubAvailable:
			v, ok := r.byte()
			if !ok {
				return errPropLength
			}
			if v > 1 { // §3.2.2.3.4, .5, .11, .12, .13
				return errPropValue
			}
		case propAssignedClientID, propReasonString, propResponseInfo,
			propServerReference, propAuthMethod:
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
		case propUserProperty:
			if err := r.stringPair(); err != nil {
				return err
			}
		default:
			return errPropNotConnack
		}
	}
	return nil
}
