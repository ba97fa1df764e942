package proxy

import (
	"net"
	"net/netip"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// A worker's published load counts the connections waiting in its accept
// queues: queued reads them from the kernel.
func TestQueuedCountsAcceptQueue(t *testing.T) {
	fd, addr, err := listenSocket(netip.MustParseAddrPort("127.0.0.1:0"), 0)
	if err != nil {
		t.Fatal(err)
	}
	defer unix.Close(fd)
	if n := queued([]int{fd}); n != 0 {
		t.Fatalf("queued = %d before any connection, want 0", n)
	}
	for i := range 7 {
		c, err := net.DialTimeout("tcp", addr.String(), time.Second)
		if err != nil {
			t.Fatalf("connect %d: %v", i, err)
		}
		defer c.Close()
	}
	deadline := time.Now().Add(2 * time.Second)
	n := 0
	for time.Now().Before(deadline) {
		if n = queued([]int{fd, fd}); n == 14 {
			return
		}
		time.Sleep(5 * time.Millisecond)
	}
	t.Fatalf("queued over the listener twice = %d, want 14 (7 waiting connections each)", n)
}

// TestLoadPublishPace: a worker writes its load every 20 ms while it moves
// and once a second after a second of the same count.
func TestLoadPublishPace(t *testing.T) {
	for _, tc := range []struct {
		same int
		want time.Duration
	}{
		{0, 20 * time.Millisecond},
		{loadQuietWrites - 1, 20 * time.Millisecond},
		{loadQuietWrites, time.Second},
		{10 * loadQuietWrites, time.Second},
	} {
		if got := loadPublishPace(tc.same); got != tc.want {
			t.Errorf("after %d unchanged writes: next in %v, want %v", tc.same, got, tc.want)
		}
	}
}
