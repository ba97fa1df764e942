package loadgen

import (
	"bufio"
	"encoding/binary"
	"errors"
	"fmt"
	"io"

	"github.com/shardgate/shardgate/mqttwire"
)

// The few packets a device sends besides CONNECT (which mqttwire builds):
// PUBLISH, SUBSCRIBE, the QoS acknowledgements, PINGREQ and DISCONNECT.
// MQTT 5 adds a property length after the packet identifier of PUBLISH and
// SUBSCRIBE; the acknowledgements may omit reason and properties when the
// reason is Success (MQTT 5 §3.4.2.1, §3.5.2.1, §3.6.2.1, §3.7.2.1).

var pingreq = []byte{mqttwire.PINGREQ << 4, 0}

// maxPacket caps what a device reads: a broker never sends the load
// generator anything near it, and a corrupted length must not make it
// allocate 256 MiB.
const maxPacket = 1 << 20

var errPacketTooLarge = errors.New("loadgen: packet larger than 1 MiB")

func appendVarint(dst []byte, v int) []byte {
	for {
		b := byte(v & 0x7f)
		v >>= 7
		if v > 0 {
			b |= 0x80
		}
		dst = append(dst, b)
		if v == 0 {
			return dst
		}
	}
}

// appendPublish appends a PUBLISH; pid is ignored for QoS 0 [MQTT-2.3.1-5].
func appendPublish(dst []byte, level byte, topic string, qos byte, pid uint16, payload []byte) []byte {
	rl := 2 + len(topic) + len(payload)
	if qos > 0 {
		rl += 2
	}
	if level == mqttwire.Level5 {
		rl++ // property length 0
	}
	dst = append(dst, mqttwire.PUBLISH<<4|qos<<1)
	dst = appendVarint(dst, rl)
	dst = binary.BigEndian.AppendUint16(dst, uint16(len(topic)))
	dst = append(dst, topic...)
	if qos > 0 {
		dst = binary.BigEndian.AppendUint16(dst, pid)
	}
	if level == mqttwire.Level5 {
		dst = append(dst, 0)
	}
	return append(dst, payload...)
}

// appendSubscribe appends a SUBSCRIBE of one filter; its fixed-header flags
// are 0b0010 [MQTT-3.8.1-1].
func appendSubscribe(dst []byte, level byte, pid uint16, filter string, qos byte) []byte {
	rl := 2 + 2 + len(filter) + 1
	if level == mqttwire.Level5 {
		rl++
	}
	dst = append(dst, mqttwire.SUBSCRIBE<<4|0x02)
	dst = appendVarint(dst, rl)
	dst = binary.BigEndian.AppendUint16(dst, pid)
	if level == mqttwire.Level5 {
		dst = append(dst, 0)
	}
	dst = binary.BigEndian.AppendUint16(dst, uint16(len(filter)))
	dst = append(dst, filter...)
	return append(dst, qos)
}

// appendAck appends a PUBACK, PUBREC, PUBREL or PUBCOMP; PUBREL's flags
// are 0b0010 [MQTT-3.6.1-1].
func appendAck(dst []byte, typ byte, pid uint16) []byte {
	b0 := typ << 4
	if typ == mqttwire.PUBREL {
		b0 |= 0x02
	}
	dst = append(dst, b0, 2)
	return binary.BigEndian.AppendUint16(dst, pid)
}

// readPacket reads one packet: its first byte and its body (everything
// after the remaining length). The body is freshly allocated, so a PUBLISH
// payload can be handed on without a copy.
func readPacket(r *bufio.Reader) (b0 byte, body []byte, err error) {
	b0, err = r.ReadByte()
	if err != nil {
		return 0, nil, err
	}
	rl, shift := 0, 0
	for i := 0; ; i++ {
		if i == 4 {
			return 0, nil, mqttwire.ErrMalformedLength
		}
		c, err := r.ReadByte()
		if err != nil {
			return 0, nil, unexpectedEOF(err)
		}
		rl |= int(c&0x7f) << shift
		shift += 7
		if c&0x80 == 0 {
			break
		}
	}
	if rl > maxPacket {
		return 0, nil, errPacketTooLarge
	}
	if rl == 0 {
		return b0, nil, nil
	}
	body = make([]byte, rl)
	if _, err := io.ReadFull(r, body); err != nil {
		return 0, nil, unexpectedEOF(err)
	}
	return b0, body, nil
}

func unexpectedEOF(err error) error {
	if err == io.EOF {
		return io.ErrUnexpectedEOF
	}
	return err
}

// parsePublish splits an incoming PUBLISH body.
func parsePublish(level, flags byte, body []byte) (topic string, qos byte, pid uint16, payload []byte, err error) {
	qos = flags >> 1 & 0x03
	if qos == 3 {
		return "", 0, 0, nil, errors.New("PUBLISH with QoS 3")
	}
	if len(body) < 2 {
		return "", 0, 0, nil, errors.New("short PUBLISH")
	}
	n := int(binary.BigEndian.Uint16(body))
	p := 2 + n
	if len(body) < p {
		return "", 0, 0, nil, errors.New("short PUBLISH topic")
	}
	topic = string(body[2:p])
	if qos > 0 {
		if len(body) < p+2 {
			return "", 0, 0, nil, errors.New("short PUBLISH packet identifier")
		}
		pid = binary.BigEndian.Uint16(body[p:])
		p += 2
	}
	if level == mqttwire.Level5 {
		pl, w, err := readVarint(body[p:])
		if err != nil || len(body) < p+w+pl {
			return "", 0, 0, nil, errors.New("bad PUBLISH properties")
		}
		p += w + pl
	}
	return topic, qos, pid, body[p:], nil
}

func readVarint(b []byte) (v, n int, err error) {
	shift := 0
	for i := 0; i < 4 && i < len(b); i++ {
		v |= int(b[i]&0x7f) << shift
		shift += 7
		if b[i]&0x80 == 0 {
			return v, i + 1, nil
		}
	}
	return 0, 0, fmt.Errorf("bad variable byte integer")
}

// ackCode is the reason code of a PUBACK/PUBREC/PUBCOMP body, or of a
// SUBACK's first (only) return code: 0 when an MQTT 5 ack omits it.
func ackCode(level, typ byte, body []byte) byte {
	if typ == mqttwire.SUBACK {
		p := 2
		if level == mqttwire.Level5 {
			pl, w, err := readVarint(body[p:])
			if err != nil {
				return 0x80
			}
			p += w + pl
		}
		if len(body) <= p {
			return 0x80
		}
		return body[p]
	}
	if len(body) > 2 {
		return body[2]
	}
	return 0
}
