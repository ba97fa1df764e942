package mqttwire

import (
	"errors"
	"strconv"
)

// ErrNeedMore means the bytes so far are a valid prefix but not a whole
// answer: read more and call again with the longer prefix. It is not a
// failure.
var ErrNeedMore = errors.New("mqttwire: need more bytes")

// ErrNotMQTT means the bytes are not the start of an MQTT CONNECT: the first
// byte is not a CONNECT fixed header, or the protocol name is neither "MQTT"
// nor "MQIsdp". Another matcher (or a plain close) should handle the
// connection.
var ErrNotMQTT = errors.New("mqttwire: not an MQTT CONNECT")

// ReasonCode is an MQTT 5 reason code (MQTT 5 §2.4). The proxy refuses a
// device with one, mapped to a 3.1.1 return code for older dialects by
// AppendConnack.
type ReasonCode byte

// Reason codes used on CONNACK and DISCONNECT (MQTT 5 §3.2.2.2, §3.14.2.1).
const (
	Success                     ReasonCode = 0x00
	UnspecifiedError            ReasonCode = 0x80
	MalformedPacket             ReasonCode = 0x81
	ProtocolError               ReasonCode = 0x82
	ImplementationSpecificError ReasonCode = 0x83
	UnsupportedProtocolVersion  ReasonCode = 0x84
	ClientIdentifierNotValid    ReasonCode = 0x85
	BadUserNameOrPassword       ReasonCode = 0x86
	NotAuthorized               ReasonCode = 0x87
	ServerUnavailable           ReasonCode = 0x88
	ServerBusy                  ReasonCode = 0x89
	Banned                      ReasonCode = 0x8A
	ServerShuttingDown          ReasonCode = 0x8B
	BadAuthenticationMethod     ReasonCode = 0x8C
	KeepAliveTimeout            ReasonCode = 0x8D
	SessionTakenOver            ReasonCode = 0x8E
	PacketTooLarge              ReasonCode = 0x95
	QuotaExceeded               ReasonCode = 0x97
	PayloadFormatInvalid        ReasonCode = 0x99
	UseAnotherServer            ReasonCode = 0x9C
	ServerMoved                 ReasonCode = 0x9D
	ConnectionRateExceeded      ReasonCode = 0x9F
)

// Error is a packet that is MQTT but must be refused. Reason is the MQTT 5
// reason code for the CONNACK (or DISCONNECT); Msg says what was wrong.
// Callers test for it with errors.As.
type Error struct {
	Reason ReasonCode
	Msg    string
}

func (e *Error) Error() string {
	return "mqttwire: " + e.Msg + " (reason 0x" + strconv.FormatUint(uint64(e.Reason), 16) + ")"
}

// ErrTooLarge: the remaining-length field claims a packet longer than the
// caller's cap. Reported before the body is read.
var ErrTooLarge = &Error{Reason: PacketTooLarge, Msg: "packet larger than the size cap"}

// ErrMalformedLength: a variable byte integer with a continuation bit on its
// fourth byte (MQTT 3.1.1 §2.2.3, MQTT 5 §1.5.5: at most four bytes).
var ErrMalformedLength = &Error{Reason: MalformedPacket, Msg: "remaining length longer than 4 bytes"}

// The errors ParseConnect returns are preallocated so that refusing a device
// costs no allocation.
var (
	errConnectFlags       = &Error{MalformedPacket, "CONNECT fixed-header flags not 0 [MQTT-2.2.2-2]"}
	errShort              = &Error{MalformedPacket, "CONNECT shorter than its fields"}
	errTrailing           = &Error{MalformedPacket, "bytes after the CONNECT payload"}
	errLevel              = &Error{UnsupportedProtocolVersion, "unsupported protocol level"}
	errReserved           = &Error{MalformedPacket, "reserved connect flag set [MQTT-3.1.2-3]"}
	errWillQoS3           = &Error{MalformedPacket, "will QoS 3 [MQTT-3.1.2-14]"}
	errWillQoSNoWill      = &Error{ProtocolError, "will QoS without will flag [MQTT-3.1.2-13]"}
	errWillRetainNoWill   = &Error{ProtocolError, "will retain without will flag [MQTT-3.1.2-15]"}
	errPasswordNoUser     = &Error{ProtocolError, "password without user name [MQTT-3.1.2-22]"}
	errClientIDUTF8       = &Error{ClientIdentifierNotValid, "client ID is not well-formed UTF-8 [MQTT-1.5.3-1]"}
	errClientIDNull       = &Error{ClientIdentifierNotValid, "client ID contains U+0000 [MQTT-1.5.3-2]"}
	errClientIDEmpty      = &Error{ClientIdentifierNotValid, "empty client ID needs CleanSession=1 [MQTT-3.1.3-8]"}
	errClientIDEmpty31    = &Error{ClientIdentifierNotValid, "empty client ID in MQTT 3.1"}
	errStringUTF8         = &Error{MalformedPacket, "string is not well-formed UTF-8 [MQTT-1.5.3-1]"}
	errStringNull         = &Error{MalformedPacket, "string contains U+0000 [MQTT-1.5.3-2]"}
	errPropLength         = &Error{MalformedPacket, "property length does not fit the packet"}
	errPropUnknown        = &Error{MalformedPacket, "property not valid in CONNECT (MQTT 5 §2.2.2.2)"}
	errPropNotConnack     = &Error{MalformedPacket, "property not valid in CONNACK (MQTT 5 §2.2.2.2)"}
	errPropDuplicate      = &Error{ProtocolError, "property included more than once"}
	errPropValue          = &Error{ProtocolError, "property value out of range"}
	errAuthDataNoMethod   = &Error{ProtocolError, "authentication data without authentication method"}
	errConnackType        = &Error{MalformedPacket, "expected a CONNACK"}
	errConnackLength      = &Error{MalformedPacket, "CONNACK length not valid"}
	errConnackFlags       = &Error{MalformedPacket, "CONNACK reserved flags set [MQTT-3.2.2-1]"}
	errFramerBroken       = &Error{MalformedPacket, "stream already failed on a malformed length"}
	errWillPayloadMissing = &Error{MalformedPacket, "will payload missing"}
)
