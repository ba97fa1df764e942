package mqttwire

import (
	"testing"
)

var benchConnects = []struct {
	name string
	file string
}{
	{"v311-user-will", "mosquitto_pub-v311-user-will"},
	{"v5-properties-will", "paho.golang-v5-session"},
	{"v31", "mosquitto_pub-v31-long-id"},
}

func BenchmarkParseConnect(b *testing.B) {
	for _, bc := range benchConnects {
		pkt, err := readHexFile(goldenPath(bc.file))
		if err != nil {
			b.Fatal(err)
		}
		b.Run(bc.name, func(b *testing.B) {
			b.ReportAllocs()
			b.SetBytes(int64(len(pkt)))
			for b.Loop() {
				if _, err := ParseConnect(pkt, 64<<10); err != nil {
					b.Fatal(err)
				}
			}
		})
	}
	http := []byte("GET / HTTP/1.1\r\n")
	b.Run("not-mqtt", func(b *testing.B) {
		b.ReportAllocs()
		for b.Loop() {
			ParseConnect(http, 64<<10)
		}
	})
}

func BenchmarkFramerFeed(b *testing.B) {
	b.ReportAllocs()
	b.SetBytes(int64(len(stream)))
	var f Framer
	for b.Loop() {
		f.Feed(stream)
	}
}

// TestParseConnectAllocs holds ParseConnect to its budget: one allocation
// per copied string (client ID, user name), none for a refusal.
func TestParseConnectAllocs(t *testing.T) {
	for _, tc := range connectFixtures {
		// Go keeps one-byte strings in a static table: no allocation.
		want := 0.0
		if len(tc.want.ClientID) > 1 {
			want++
		}
		if len(tc.want.Username) > 1 {
			want++
		}
		got := testing.AllocsPerRun(50, func() { ParseConnect(tc.raw, 64<<10) })
		if got != want {
			t.Errorf("%s: %v allocations, want %v", tc.name, got, want)
		}
	}
}
