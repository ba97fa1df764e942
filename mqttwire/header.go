package mqttwire

// Packet types: the high nibble of a fixed header's first byte (MQTT 3.1.1
// §2.2.1, MQTT 5 §2.1.2).
const (
	CONNECT     byte = 1
	CONNACK     byte = 2
	PUBLISH     byte = 3
	PUBACK      byte = 4
	PUBREC      byte = 5
	PUBREL      byte = 6
	PUBCOMP     byte = 7
	SUBSCRIBE   byte = 8
	SUBACK      byte = 9
	UNSUBSCRIBE byte = 10
	UNSUBACK    byte = 11
	PINGREQ     byte = 12
	PINGRESP    byte = 13
	DISCONNECT  byte = 14
	AUTH        byte = 15 // MQTT 5 only
)

// Protocol levels (the byte after the protocol name).
const (
	Level31  byte = 3 // MQTT 3.1, protocol name "MQIsdp"
	Level311 byte = 4 // MQTT 3.1.1, protocol name "MQTT"
	Level5   byte = 5 // MQTT 5.0, protocol name "MQTT"
)

// MaxRemainingLength is the largest value of the four-byte remaining-length
// field (MQTT 3.1.1 §2.2.3): 268,435,455 bytes.
const MaxRemainingLength = 1<<28 - 1

// MaxFixedHeader is the longest fixed header: one type byte and four length
// bytes.
const MaxFixedHeader = 5

// FixedHeader decodes byte 0 and the variable-length remaining length of the
// packet at the start of b. It returns the packet type (high nibble), the
// flags (low nibble) and the total length of the packet, header included,
// once the length field is complete. It returns ErrNeedMore while b is too
// short to hold the length field, and ErrMalformedLength for a fifth length
// byte.
func FixedHeader(b []byte) (typ byte, flags byte, total int, err error) {
	if len(b) == 0 {
		return 0, 0, 0, ErrNeedMore
	}
	rl, n, err := uvarint(b[1:])
	if err != nil {
		return b[0] >> 4, b[0] & 0x0f, 0, err
	}
	return b[0] >> 4, b[0] & 0x0f, 1 + n + int(rl), nil
}

// uvarint decodes a variable byte integer (MQTT 5 §1.5.5, the encoding of
// the remaining length in every version) of at most four bytes. It returns
// the value and the number of bytes it took.
func uvarint(b []byte) (v uint32, n int, err error) {
	for i := 0; i < 4; i++ {
		if i >= len(b) {
			return 0, 0, ErrNeedMore
		}
		c := b[i]
		v |= uint32(c&0x7f) << (7 * i)
		if c&0x80 == 0 {
			return v, i + 1, nil
		}
	}
	return 0, 0, ErrMalformedLength
}

// appendUvarint appends v as a variable byte integer. v must be at most
// MaxRemainingLength.
func appendUvarint(dst []byte, v uint32) []byte {
	for {
		c := byte(v & 0x7f)
		v >>= 7
		if v == 0 {
			return append(dst, c)
		}
		dst = append(dst, c|0x80)
	}
}

// uvarintLen is the number of bytes appendUvarint writes for v.
func uvarintLen(v uint32) int {
	switch {
	case v < 1<<7:
		return 1
	case v < 1<<14:
		return 2
	case v < 1<<21:
		return 3
	default:
		return 4
	}
}
