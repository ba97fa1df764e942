package broker

import (
	"bytes"
	"context"
	"log/slog"
	"os/exec"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/shardgate/shardgate/internal/servertest"
)

// Stock Mosquitto command-line clients (Debian's mosquitto-clients), as a
// demo user runs them: a subscriber on one shard receives what a publisher
// on another shard sends, in MQTT 3.1.1 and 5.0.
func TestMosquittoClients(t *testing.T) {
	subBin := servertest.RequireBinary(t, "mosquitto_sub", "mosquitto-clients")
	pubBin := servertest.RequireBinary(t, "mosquitto_pub", "mosquitto-clients")
	e := startFleet(t, 3)
	addrs := e.Addrs()

	for _, version := range []string{"mqttv311", "mqttv5"} {
		t.Run(version, func(t *testing.T) {
			ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
			defer cancel()
			topic := "demo/" + version
			sub := exec.CommandContext(ctx, subBin, "-V", version,
				"-h", addrs[2].Addr().String(), "-p", strconv.Itoa(int(addrs[2].Port())),
				"-t", "demo/#", "-C", "1", "-v")
			var out bytes.Buffer
			sub.Stdout, sub.Stderr = &out, &out
			if err := sub.Start(); err != nil {
				t.Fatal(err)
			}
			waitUntil(t, "mosquitto_sub subscribed", func() bool { return e.bus.Routes("embedded-2") == 1 })

			pub := exec.CommandContext(ctx, pubBin, "-V", version,
				"-h", addrs[0].Addr().String(), "-p", strconv.Itoa(int(addrs[0].Port())),
				"-t", topic, "-m", "hello from shard 0", "-q", "1")
			if b, err := pub.CombinedOutput(); err != nil {
				t.Fatalf("mosquitto_pub: %v: %s", err, b)
			}
			if err := sub.Wait(); err != nil {
				t.Fatalf("mosquitto_sub: %v: %s", err, out.String())
			}
			if got, want := strings.TrimSpace(out.String()), topic+" hello from shard 0"; got != want {
				t.Errorf("mosquitto_sub printed %q, want %q", got, want)
			}
			waitUntil(t, "route withdrawn", func() bool { return e.bus.Routes("embedded-2") == 0 })
		})
	}
}

// The fleet logs one line per shard at Info; the engine's own start-up
// chatter goes to Debug.
func TestStartupLogs(t *testing.T) {
	var buf bytes.Buffer
	e, err := StartEmbedded(context.Background(), EmbeddedConfig{
		Shards: 2,
		Log:    slog.New(slog.NewTextHandler(&buf, &slog.HandlerOptions{Level: slog.LevelInfo})),
	})
	if err != nil {
		t.Fatal(err)
	}
	if err := e.Close(); err != nil {
		t.Fatal(err)
	}
	logs := buf.String()
	if n := strings.Count(logs, "broker shard listening"); n != 2 {
		t.Errorf("%d 'broker shard listening' lines, want 2:\n%s", n, logs)
	}
	if strings.Contains(logs, "mochi") {
		t.Errorf("engine Info logs leaked at Info:\n%s", logs)
	}
}
