package proxy

import (
	"context"
	"log/slog"
	"net"
	"net/netip"
	"os"
	"sync/atomic"
	"testing"
	"time"

	"github.com/shardgate/shardgate/backend"
)

// TestBusyOnAcceptBacklog: a loop that finds more devices queued on its
// listener than one accept batch takes says so through Options.Busy (the
// thread governor goes to every CPU on it); one that empties the queue in a
// batch does not.
func TestBusyOnAcceptBacklog(t *testing.T) {
	for _, tc := range []struct {
		devices  int
		wantBusy bool
	}{{acceptBatch / 4, false}, {3 * acceptBatch, true}} {
		// Nothing is dialled: the devices never send a CONNECT.
		bk := netip.MustParseAddrPort("127.0.0.1:9")
		cfg := &Config{Listen: []string{"127.0.0.1:0"}, EventLoops: 1}
		cfg.Backends.Static = []backend.StaticInstance{{ID: "b0", Address: bk.String()}}
		cfg.SetDefaults()
		off := Duration(0)
		cfg.Connect.DeferAccept = &off // queued as soon as the handshake is done
		var busy atomic.Int64
		p, err := New(Options{
			Config: cfg,
			Router: backend.NewRouter(backend.NewSnapshot(0, []backend.Instance{inst("b0", bk, -1)}, backend.SnapshotOptions{})),
			Log:    slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelError})),
			Busy:   func() { busy.Add(1) },
		})
		if err != nil {
			t.Fatal(err)
		}
		// The listener is open from New: the devices wait in its queue
		// until Start runs the loop.
		var conns []net.Conn
		for range tc.devices {
			c, err := net.Dial("tcp", p.Addrs()[0].String())
			if err != nil {
				t.Fatal(err)
			}
			conns = append(conns, c)
		}
		p.Start()
		eventually(t, "every device accepted", func() bool { return p.Active() == tc.devices })
		if got := busy.Load() > 0; got != tc.wantBusy {
			t.Errorf("%d queued devices: Busy called %d times, want called: %v", tc.devices, busy.Load(), tc.wantBusy)
		}
		for _, c := range conns {
			c.Close()
		}
		ctx, cancel := context.WithTimeout(context.Background(), 200*time.Millisecond)
		p.Shutdown(ctx)
		cancel()
	}
}
