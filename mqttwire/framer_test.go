package mqttwire

import (
	"bytes"
	"testing"
	"unsafe"
)

// stream is a relay's view of a session: several packets back to back.
var stream = concat(
	AppendConnect(nil, ConnectOptions{ClientID: "dev", CleanStart: true, KeepAlive: 30}),
	[]byte{0xc0, 0x00}, // PINGREQ: zero remaining length
	[]byte{
		0x30, 0x07, // PUBLISH QoS 0, remaining length 7
		0x00, 0x01, 't', // topic
		'p', 'a', 'y', 'l', // payload
	},
	concat([]byte{0x32, 0x83, 0x01}, []byte{0x00, 0x01, 't', 0x00, 0x01}, bytes.Repeat([]byte{'x'}, 126)), // PUBLISH QoS 1, remaining length 131 in two bytes
	[]byte{0xe0, 0x00}, // DISCONNECT
)

const streamPackets = 5

func TestFramerSize(t *testing.T) {
	if s := unsafe.Sizeof(Framer{}); s != 8 {
		t.Fatalf("Framer is %d bytes, want 8", s)
	}
	var f Framer
	if !f.AtBoundary() {
		t.Fatal("zero value not at a boundary")
	}
}

func TestFramerWhole(t *testing.T) {
	var f Framer
	n, err := f.Feed(stream)
	if err != nil || n != streamPackets || !f.AtBoundary() || f.LastType() != DISCONNECT {
		t.Fatalf("n=%d err=%v boundary=%v last=%d", n, err, f.AtBoundary(), f.LastType())
	}
}

func TestFramerByteByByte(t *testing.T) {
	var f Framer
	total := 0
	var boundaries []int
	for i := range stream {
		n, err := f.Feed(stream[i : i+1])
		if err != nil {
			t.Fatal(err)
		}
		total += n
		if f.AtBoundary() {
			boundaries = append(boundaries, i+1)
		}
	}
	if total != streamPackets {
		t.Fatalf("%d packets", total)
	}
	// The boundaries found one byte at a time are the packet ends.
	var want []int
	for off := 0; off < len(stream); {
		_, _, n, err := FixedHeader(stream[off:])
		if err != nil {
			t.Fatal(err)
		}
		off += n
		want = append(want, off)
	}
	if !equalInts(boundaries, want) {
		t.Fatalf("boundaries %v, want %v", boundaries, want)
	}
}

func TestFramerSplit(t *testing.T) {
	var f Framer
	if got := f.Split(stream); got != 0 {
		t.Fatalf("Split at a boundary = %d, want 0", got)
	}
	// Feed the CONNECT's first 3 bytes: the packet ends 17-3 bytes later.
	first := len(AppendConnect(nil, ConnectOptions{ClientID: "dev", CleanStart: true, KeepAlive: 30}))
	f.Feed(stream[:3])
	before := f
	rest := stream[3:]
	off := f.Split(rest)
	if off != first-3 {
		t.Fatalf("Split = %d, want %d", off, first-3)
	}
	if f != before {
		t.Fatal("Split changed the framer")
	}
	if got := f.Split(rest[:off-1]); got != off-1 {
		t.Fatalf("Split of a short buffer = %d, want its length %d", got, off-1)
	}
	n, _ := f.Feed(rest[:off])
	if n != 1 || !f.AtBoundary() {
		t.Fatalf("feeding up to the split: n=%d boundary=%v", n, f.AtBoundary())
	}
	// Inside a length field: the PINGREQ's length byte ends it.
	f.Feed(rest[off : off+1])
	if got := f.Split(rest[off+1:]); got != 1 {
		t.Fatalf("Split inside PINGREQ header = %d, want 1", got)
	}
}

func TestFramerMalformed(t *testing.T) {
	var f Framer
	n, err := f.Feed([]byte{0xc0, 0x00, 0x30, 0xff, 0xff, 0xff, 0xff, 0x01})
	if n != 1 || err != ErrMalformedLength {
		t.Fatalf("n=%d err=%v", n, err)
	}
	if _, err := f.Feed([]byte{0xc0, 0x00}); err == nil || f.AtBoundary() {
		t.Fatal("framer recovered after a malformed length")
	}
	if got := f.Split([]byte{1, 2, 3}); got != 3 {
		t.Fatalf("Split on a broken stream = %d", got)
	}
	// Four length bytes are fine.
	f = Framer{}
	b := []byte{0x30, 0xff, 0xff, 0xff, 0x7f}
	if n, err := f.Feed(b); n != 0 || err != nil || f.AtBoundary() {
		t.Fatalf("n=%d err=%v", n, err)
	}
}

func TestFramerNoAlloc(t *testing.T) {
	var f Framer
	allocs := testing.AllocsPerRun(100, func() {
		f.Feed(stream)
		f.Split(stream)
	})
	if allocs != 0 {
		t.Fatalf("%v allocations", allocs)
	}
}

func TestFixedHeader(t *testing.T) {
	cases := []struct {
		raw   []byte
		typ   byte
		flags byte
		total int
		err   error
	}{
		{nil, 0, 0, 0, ErrNeedMore},
		{[]byte{0x30}, 3, 0, 0, ErrNeedMore},
		{[]byte{0xc0, 0x00}, PINGREQ, 0, 2, nil},
		{[]byte{0x3d, 0x05}, PUBLISH, 0xd, 7, nil},
		{[]byte{0x82, 0x80, 0x01}, SUBSCRIBE, 2, 131, nil},
		{[]byte{0x30, 0xff, 0xff, 0xff, 0x7f}, PUBLISH, 0, 5 + MaxRemainingLength, nil},
		{[]byte{0x30, 0xff, 0xff, 0xff}, PUBLISH, 0, 0, ErrNeedMore},
		{[]byte{0x30, 0xff, 0xff, 0xff, 0xff}, PUBLISH, 0, 0, ErrMalformedLength},
	}
	for _, tc := range cases {
		typ, flags, total, err := FixedHeader(tc.raw)
		if err != tc.err || (err == nil && (typ != tc.typ || flags != tc.flags || total != tc.total)) {
			t.Errorf("% x: (%d, %#x, %d, %v), want (%d, %#x, %d, %v)", tc.raw, typ, flags, total, err, tc.typ, tc.flags, tc.total, tc.err)
		}
	}
}

func equalInts(a, b []int) bool {
	if len(a) != len(b) {
		return false
	}
	for i := range a {
		if a[i] != b[i] {
			return false
		}
	}
	return true
}
