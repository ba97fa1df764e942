// Package mqttwire is the small MQTT wire codec shardgate needs on the
// connection path: it reads the first packet a device sends (CONNECT) well
// enough to route the connection by client ID, writes the few packets the
// proxy itself sends (CONNACK refusals, DISCONNECT), reads the Server Keep
// Alive an MQTT 5 broker may put in its CONNACK (ParseConnackProperties),
// builds CONNECT packets for health probes and the load generator, and
// tracks packet boundaries in a relayed byte stream without decoding or
// copying it.
//
// # Three answers
//
// ParseConnect is a matcher over a growing prefix of the connection's bytes,
// and like every matcher it gives one of three answers:
//
//   - matched: a Connect and a nil error; Connect.Len is the length of the
//     packet, and any bytes beyond it belong to the next packet;
//   - not this protocol: ErrNotMQTT, as early as the bytes allow (an HTTP
//     request is refused on its first byte, a TLS ClientHello after three);
//   - need more bytes: ErrNeedMore; read more and call again with the longer
//     prefix (the parser keeps no state between calls).
//
// A fourth outcome is a packet that is MQTT but that a server must refuse:
// it is an *Error carrying the MQTT 5 reason code the CONNACK should carry
// (0x81 malformed packet, 0x82 protocol error, 0x84 unsupported protocol
// version, 0x85 client identifier not valid, 0x95 packet too large).
// AppendConnack maps the reason to the 3.1/3.1.1 return code when the device
// speaks an older dialect.
//
// # Size cap
//
// The remaining-length field can claim up to 268,435,455 bytes (MQTT 3.1.1
// §2.2.3, MQTT 5 §1.5.5). ParseConnect checks the claimed total against the
// caller's cap as soon as the length field is decoded, before any of the body
// is needed, and returns ErrTooLarge; a peer can therefore never make the
// caller buffer more than the cap.
//
// # Dialects and spec clauses
//
// MQTT 3.1 (protocol name "MQIsdp", level 3), 3.1.1 ("MQTT", level 4) and 5.0
// ("MQTT", level 5, with CONNECT and will properties) are accepted. The
// checks are those a server must make on CONNECT: the fixed-header flags
// [MQTT-2.2.2-2] (a first byte 0x11..0x1F is a malformed CONNECT when the
// protocol name follows, and ErrNotMQTT otherwise: a TLS record starts with
// 0x16), the reserved connect flag [MQTT-3.1.2-3], the will flags
// [MQTT-3.1.2-11] to [MQTT-3.1.2-15], password without user name in 3.1.1
// [MQTT-3.1.2-22], well-formed UTF-8 without U+0000 in every string
// [MQTT-1.5.3-1] [MQTT-1.5.3-2] (MQTT 5: [MQTT-1.5.4-1] [MQTT-1.5.4-2]), a
// zero-length client ID only with CleanSession=1 in 3.1.1 [MQTT-3.1.3-8], and
// in 5.0 the property identifiers valid for CONNECT and for the will, each
// single-valued property at most once (§3.1.2.11, §3.1.3.2). Policy that
// belongs to the broker (topic syntax of the will, authentication) is left to
// the broker, which receives the peeked bytes unchanged.
//
// Nothing here allocates on the connection path except the ClientID and
// Username strings that ParseConnect copies out of the buffer.
package mqttwire
