package mqttwire

import (
	"encoding/binary"
	"fmt"
	"strconv"
	"strings"
)

// annotateConnect writes a CONNECT as a golden file: a header comment
// naming the client, then one line per field with its hex bytes and what
// they are, in the style of hand-written fixtures. It walks the packet on
// its own (it is only ever given packets ParseConnect accepted).
func annotateConnect(desc string, pkt []byte) string {
	var sb strings.Builder
	fmt.Fprintf(&sb, "# Captured from a real client: %s\n", desc)
	fmt.Fprintf(&sb, "# First packet on the connection, %d bytes. Format: hex bytes, '#' comments.\n", len(pkt))
	line := func(b []byte, format string, args ...any) {
		h := fmt.Sprintf("% x", b)
		fmt.Fprintf(&sb, "%-48s # %s\n", h, fmt.Sprintf(format, args...))
	}
	off := 1
	for pkt[off]&0x80 != 0 {
		off++
	}
	off++
	line(pkt[:off], "CONNECT, remaining length %d", len(pkt)-off)
	str := func(what string) []byte {
		n := int(binary.BigEndian.Uint16(pkt[off:]))
		s := pkt[off+2 : off+2+n]
		line(pkt[off:off+2+n], "%s %s", what, strconv.Quote(string(s)))
		off += 2 + n
		return s
	}
	bin := func(what string) {
		n := int(binary.BigEndian.Uint16(pkt[off:]))
		line(pkt[off:off+2+n], "%s (%d bytes)", what, n)
		off += 2 + n
	}
	str("protocol name")
	level := pkt[off] &^ bridgeBit
	line(pkt[off:off+1], "protocol level %d", pkt[off])
	off++
	flags := pkt[off]
	var names []string
	for _, f := range []struct {
		bit  byte
		name string
	}{{flagUsername, "user name"}, {flagPassword, "password"}, {flagWillRetain, "will retain"},
		{flagWill, "will"}, {flagCleanStart, "clean start"}} {
		if flags&f.bit != 0 {
			names = append(names, f.name)
		}
	}
	if q := (flags & flagWillQoS) >> 3; q != 0 {
		names = append(names, fmt.Sprintf("will QoS %d", q))
	}
	if len(names) == 0 {
		names = []string{"none"}
	}
	line(pkt[off:off+1], "connect flags: %s", strings.Join(names, ", "))
	off++
	line(pkt[off:off+2], "keepalive %d s", binary.BigEndian.Uint16(pkt[off:]))
	off += 2
	props := func(what string) {
		n, w, _ := uvarint(pkt[off:])
		line(pkt[off:off+w], "%s length %d", what, n)
		off += w
		end := off + int(n)
		for off < end {
			id := pkt[off]
			start := off
			off++
			var desc string
			switch id {
			case propSessionExpiry, propMaximumPacketSize, propWillDelay, propMessageExpiry:
				desc = fmt.Sprintf("%d", binary.BigEndian.Uint32(pkt[off:]))
				off += 4
			case propReceiveMaximum, propTopicAliasMaximum:
				desc = fmt.Sprintf("%d", binary.BigEndian.Uint16(pkt[off:]))
				off += 2
			case propRequestResponse, propRequestProblem, propPayloadFormat:
				desc = fmt.Sprintf("%d", pkt[off])
				off++
			case propUserProperty:
				k := binary.BigEndian.Uint16(pkt[off:])
				key := pkt[off+2 : off+2+int(k)]
				off += 2 + int(k)
				v := binary.BigEndian.Uint16(pkt[off:])
				val := pkt[off+2 : off+2+int(v)]
				off += 2 + int(v)
				desc = strconv.Quote(string(key)) + "=" + strconv.Quote(string(val))
			default: // strings and binary data
				l := binary.BigEndian.Uint16(pkt[off:])
				desc = strconv.Quote(string(pkt[off+2 : off+2+int(l)]))
				off += 2 + int(l)
			}
			line(pkt[start:off], "  property %#02x %s: %s", id, propertyNames[id], desc)
		}
	}
	if level == Level5 {
		props("properties")
	}
	str("client id")
	if flags&flagWill != 0 {
		if level == Level5 {
			props("will properties")
		}
		str("will topic")
		bin("will payload")
	}
	if flags&flagUsername != 0 && off < len(pkt) {
		str("user name")
	}
	if flags&flagPassword != 0 && off < len(pkt) {
		bin("password")
	}
	return sb.String()
}

var propertyNames = map[byte]string{
	propPayloadFormat:     "payload format indicator",
	propMessageExpiry:     "message expiry interval",
	propContentType:       "content type",
	propResponseTopic:     "response topic",
	propCorrelationData:   "correlation data",
	propSessionExpiry:     "session expiry interval",
	propAuthMethod:        "authentication method",
	propAuthData:          "authentication data",
	propRequestProblem:    "request problem information",
	propWillDelay:         "will delay interval",
	propRequestResponse:   "request response information",
	propReceiveMaximum:    "receive maximum",
	propTopicAliasMaximum: "topic alias maximum",
	propUserProperty:      "user property",
	propMaximumPacketSize: "maximum packet size",
}
