package mqttwire

import "encoding/binary"

// MQTT 3.1 / 3.1.1 CONNACK return codes (MQTT 3.1.1 §3.2.2.3).
const (
	ConnackAccepted             byte = 0x00
	ConnackUnacceptableProtocol byte = 0x01
	ConnackIdentifierRejected   byte = 0x02
	ConnackServerUnavailable    byte = 0x03
	ConnackBadUsernamePassword  byte = 0x04
	ConnackNotAuthorized        byte = 0x05
)

// ReturnCode311 maps an MQTT 5 reason code to the MQTT 3.1/3.1.1 CONNACK
// return code a server of that dialect would send. Reasons with no
// equivalent (malformed packet, protocol error, server busy, quota, use
// another server, ...) become 0x03 server unavailable: the client backs off
// and retries, which is what a refusal by the proxy wants.
func ReturnCode311(reason ReasonCode) byte {
	switch reason {
	case Success:
		return ConnackAccepted
	case UnsupportedProtocolVersion:
		return ConnackUnacceptableProtocol
	case ClientIdentifierNotValid:
		return ConnackIdentifierRejected
	case BadUserNameOrPassword:
		return ConnackBadUsernamePassword
	case NotAuthorized, BadAuthenticationMethod:
		return ConnackNotAuthorized
	default:
		return ConnackServerUnavailable
	}
}

// AppendConnack appends a CONNACK in the dialect of level. For Level5 it
// writes reason as the reason code and an empty property list; for any other
// level (3, 4, or a level the proxy does not support, which 3.1.1 clients
// expect answered with return code 0x01) it writes the 3.1.1 form with
// ReturnCode311(reason). Session present is only ever set on success
// [MQTT-3.2.2-4] [MQTT-3.2.2-6], and never for 3.1, where the byte is
// reserved.
func AppendConnack(dst []byte, level byte, sessionPresent bool, reason ReasonCode) []byte {
	var ack byte
	if sessionPresent && reason == Success && level != Level31 {
		ack = 0x01
	}
	if level == Level5 {
		return append(dst, CONNACK<<4, 3, ack, byte(reason), 0)
	}
	return append(dst, CONNACK<<4, 2, ack, ReturnCode311(reason))
}

// AppendDisconnect appends a DISCONNECT. For 3.1/3.1.1 it is the two bytes
// 0xE0 0x00 (reason is dropped; 3.1.1 defines DISCONNECT only from client to
// server, brokers still send it and clients close on it). For 5.0 it carries
// the reason code, or is the two-byte form for Success (§3.14.2.1: reason and
// properties may be omitted when the reason is 0x00).
func AppendDisconnect(dst []byte, level byte, reason ReasonCode) []byte {
	if level != Level5 || reason == Success {
		return append(dst, DISCONNECT<<4, 0)
	}
	return append(dst, DISCONNECT<<4, 1, byte(reason))
}

// ConnectOptions describe a CONNECT built by AppendConnect. The zero value is
// a 3.1.1 CONNECT with an empty client ID and CleanStart=false, which a
// server refuses: set at least ClientID or CleanStart.
type ConnectOptions struct {
	Level      byte   // protocol level; 0 means Level311
	ClientID   string // UTF-8, no U+0000
	CleanStart bool   // CleanSession (3.1, 3.1.1) / Clean Start (5.0)
	KeepAlive  uint16 // seconds; 0 disables keepalive
	Username   string // sent when not empty
	Password   string // sent when not empty
	// SessionExpiry is the MQTT 5 Session Expiry Interval in seconds, sent
	// as property 0x11 when not 0; ignored for other levels.
	SessionExpiry uint32
}

// AppendConnect appends a CONNECT built from o. Strings longer than 65535
// bytes are the caller's error and are truncated by the two-byte length.
func AppendConnect(dst []byte, o ConnectOptions) []byte {
	level := o.Level
	if level == 0 {
		level = Level311
	}
	name := nameMQTT
	if level == Level31 {
		name = nameMQIsdp
	}
	var flags byte
	if o.CleanStart {
		flags |= flagCleanStart
	}
	if o.Username != "" {
		flags |= flagUsername
	}
	if o.Password != "" {
		flags |= flagPassword
	}
	var props uint32 // MQTT 5 property bytes
	if level == Level5 && o.SessionExpiry != 0 {
		props = 5
	}
	rl := uint32(len(name)) + 1 + 1 + 2 + 2 + uint32(len(o.ClientID))
	if level == Level5 {
		rl += uint32(uvarintLen(props)) + props
	}
	if o.Username != "" {
		rl += 2 + uint32(len(o.Username))
	}
	if o.Password != "" {
		rl += 2 + uint32(len(o.Password))
	}

	dst = append(dst, CONNECT<<4)
	dst = appendUvarint(dst, rl)
	dst = append(dst, name...)
	dst = append(dst, level, flags)
	dst = binary.BigEndian.AppendUint16(dst, o.KeepAlive)
	if level == Level5 {
		dst = appendUvarint(dst, props)
		if props != 0 {
			dst = append(dst, propSessionExpiry)
			dst = binary.BigEndian.AppendUint32(dst, o.SessionExpiry)
		}
	}
	dst = appendString(dst, o.ClientID)
	if o.Username != "" {
		dst = appendString(dst, o.Username)
	}
	if o.Password != "" {
		dst = appendString(dst, o.Password)
	}
	return dst
}

func appendString(dst []byte, s string) []byte {
	dst = binary.BigEndian.AppendUint16(dst, uint16(len(s)))
	return append(dst, s...)
}

// MaxConnackSize caps the CONNACK ParseConnack waits for. A CONNACK is 4
// bytes in 3.1.1 and a few dozen in 5.0 (properties such as a reason string
// or user properties); a claim beyond 64 KiB is refused with ErrTooLarge so a
// probe reading into a fixed buffer never waits for it.
const MaxConnackSize = 64 << 10

// ParseConnack parses a CONNACK at the start of b, sent in answer to a
// CONNECT of the given level. It returns the session-present flag, the
// return code (3.1/3.1.1) or reason code (5.0), and n, the length of the
// packet. ErrNeedMore while b holds less than the whole packet; *Error if b
// does not start with a well-formed CONNACK.
func ParseConnack(b []byte, level byte) (sessionPresent bool, code byte, n int, err error) {
	// The first byte decides, whatever follows it: a prefix never
	// answers differently from the whole.
	if len(b) > 0 && b[0] != CONNACK<<4 {
		return false, 0, 0, errConnackType
	}
	_, _, total, err := FixedHeader(b)
	if err != nil {
		return false, 0, 0, err
	}
	if total > MaxConnackSize {
		return false, 0, 0, ErrTooLarge
	}
	_, w, _ := uvarint(b[1:])
	hdr := 1 + w
	rl := total - hdr
	switch {
	case level != Level5 && rl != 2:
		return false, 0, 0, errConnackLength
	case level == Level5 && rl < 2:
		return false, 0, 0, errConnackLength
	}
	if len(b) < total {
		return false, 0, 0, ErrNeedMore
	}
	ack, code := b[hdr], b[hdr+1]
	// Bits 7-1 are reserved [MQTT-3.2.2-1]; in 3.1 the whole byte is
	// reserved and not interpreted.
	if level != Level31 {
		if ack&^0x01 != 0 {
			return false, 0, 0, errConnackFlags
		}
		sessionPresent = ack&0x01 != 0
	}
	if level == Level5 && rl > 2 {
		// The property length must describe exactly the rest of the packet.
		pl, pw, perr := uvarint(b[hdr+2 : total])
		if perr != nil || uint64(pw)+uint64(pl) != uint64(rl-2) {
			return false, 0, 0, errConnackLength
		}
	}
	return sessionPresent, code, total, nil
}
