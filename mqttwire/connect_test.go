package mqttwire

import (
	"errors"
	"testing"
)

func TestParseConnectFixtures(t *testing.T) {
	for _, tc := range connectFixtures {
		t.Run(tc.name, func(t *testing.T) {
			max := tc.max
			if max == 0 {
				max = 64 << 10
			}
			got, err := ParseConnect(tc.raw, max)
			checkParse(t, got, err, tc)
		})
	}
}

func checkParse(t *testing.T, got Connect, err error, tc connectFixture) {
	t.Helper()
	switch {
	case tc.err != nil:
		if err != tc.err {
			t.Fatalf("err = %v, want %v", err, tc.err)
		}
	case tc.reason != 0:
		var e *Error
		if !errors.As(err, &e) {
			t.Fatalf("err = %v, want *Error with reason %#x", err, tc.reason)
		}
		if e.Reason != tc.reason {
			t.Fatalf("reason = %#x (%v), want %#x", e.Reason, e, tc.reason)
		}
	default:
		if err != nil {
			t.Fatalf("err = %v", err)
		}
		if got != tc.want {
			t.Fatalf("got  %+v\nwant %+v", got, tc.want)
		}
	}
}

// TestParseConnectErrorKeepsLevel: a refusal needs the device's dialect, so
// an *Error from a whole CONNECT comes with the level read before the fault.
func TestParseConnectErrorKeepsLevel(t *testing.T) {
	want := map[string]byte{
		"client id not UTF-8":                        Level311,
		"v31 empty client id":                        Level31,
		"v5 duplicate session expiry":                Level5,
		"v5 reserved connect flag":                   Level5,
		"level 6":                                    0,
		"v311 empty client id without clean session": Level311,
	}
	for _, tc := range connectFixtures {
		level, ok := want[tc.name]
		if !ok {
			continue
		}
		delete(want, tc.name)
		c, err := ParseConnect(tc.raw, 0)
		if _, isErr := err.(*Error); !isErr || c.Level != level || c.Len != len(tc.raw) || c.ClientID != "" {
			t.Errorf("%s: %+v, %v; want level %d", tc.name, c, err, level)
		}
	}
	if len(want) != 0 {
		t.Fatalf("fixtures not found: %v", want)
	}
}
