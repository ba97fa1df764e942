package main

import (
	"fmt"
	"net"
	"syscall"
	"testing"
	"time"

	"github.com/shardgate/shardgate/mqttwire"
)

// e2eConnectedDevices connects n devices through px, each subscribed to its
// own topic and checked with a round trip.
func e2eConnectedDevices(t *testing.T, px *e2eProxy, prefix string, n int) ([]e2eDevice, []string) {
	t.Helper()
	levels := []byte{mqttwire.Level311, mqttwire.Level5, mqttwire.Level31}
	devs := make([]e2eDevice, n)
	topics := make([]string, n)
	for i := range devs {
		id := fmt.Sprintf("%s-%d", prefix, i)
		topics[i] = "dev/" + id
		devs[i] = e2eMustConnect(t, px.mqtt, id, levels[i%len(levels)])
		if err := devs[i].Subscribe(topics[i], 1); err != nil {
			t.Fatal(err)
		}
		e2eRoundTrip(t, devs[i], topics[i], "before")
	}
	return devs, topics
}

// TestE2ESigtermDrains sends SIGTERM to a proxy holding five devices, with
// shutdown.grace 30s: new devices are refused at once, the connected ones
// keep publishing and receiving, and the process exits 0 as soon as the
// last one disconnects, long before the grace period ends.
func TestE2ESigtermDrains(t *testing.T) {
	t.Parallel()
	bin := buildShardgate(t)
	ms := e2eBrokers(t, 3)
	cfg := e2eFleetOf(t, ms)
	cfg.grace = "30s"
	px := e2eStartProxy(t, bin, cfg)
	px.waitReady(t)
	devs, topics := e2eConnectedDevices(t, px, "e2e-drain", 5)
	if err := e2eRawConnect(px.mqtt, "e2e-drain-ok"); err != nil {
		t.Fatalf("a new device before SIGTERM: %v", err)
	}

	sigterm := time.Now()
	px.signal(t, syscall.SIGTERM)
	// New devices are refused: the listeners are closed (connection
	// refused), or a connection that raced the signal is closed without a
	// CONNACK accepting it.
	e2eWaitFor(t, "a new device is refused after SIGTERM", time.Second, func() (bool, string) {
		err := e2eRawConnect(px.mqtt, "e2e-drain-late")
		return err != nil, fmt.Sprint(err)
	})
	t.Logf("new devices refused %s after SIGTERM", time.Since(sigterm).Round(time.Millisecond))
	for i := 0; i < 3; i++ {
		if c, err := net.DialTimeout("tcp", px.mqtt, time.Second); err == nil {
			c.Close()
			t.Fatalf("TCP connect to the draining proxy succeeded (attempt %d): its listeners should be closed", i)
		}
	}

	// The connected devices keep working while the proxy drains.
	for round := 0; round < 2; round++ {
		for i, d := range devs {
			e2eRoundTrip(t, d, topics[i], fmt.Sprintf("draining %d", round))
		}
	}
	for len(devs) > 1 {
		devs[0].Disconnect()
		devs, topics = devs[1:], topics[1:]
		time.Sleep(50 * time.Millisecond)
		if px.exited() {
			t.Fatalf("the proxy exited with %d devices still connected", len(devs))
		}
		e2eRoundTrip(t, devs[0], topics[0], "still here")
	}
	last := time.Now()
	devs[0].Disconnect()
	code := px.waitExit(t, 5*time.Second)
	t.Logf("exited %s after the last device left, %s after SIGTERM", time.Since(last).Round(time.Millisecond), time.Since(sigterm).Round(time.Millisecond))
	if code != 0 {
		t.Errorf("exit code %d after a complete drain, want 0", code)
	}
	if d := time.Since(sigterm); d > 15*time.Second {
		t.Errorf("exited %s after SIGTERM: it waited for the grace period, not for the devices", d)
	}
	px.waitLog(t, time.Second, "shardgate proxy stopped")
}

// TestE2ESigtermGraceExpires sends SIGTERM to a proxy with shutdown.grace
// 1s whose devices stay connected: the process exits after about a second
// and the devices see their connections close.
func TestE2ESigtermGraceExpires(t *testing.T) {
	t.Parallel()
	bin := buildShardgate(t)
	ms := e2eBrokers(t, 1)
	cfg := e2eFleetOf(t, ms)
	cfg.grace = "1s"
	px := e2eStartProxy(t, bin, cfg)
	px.waitReady(t)
	devs, _ := e2eConnectedDevices(t, px, "e2e-grace", 3)

	sigterm := time.Now()
	px.signal(t, syscall.SIGTERM)
	code := px.waitExit(t, 8*time.Second)
	took := time.Since(sigterm)
	t.Logf("exited with code %d %s after SIGTERM", code, took.Round(time.Millisecond))
	if code != 0 {
		t.Errorf("exit code %d after the grace period: closing the remaining devices is the configured behaviour, want 0", code)
	}
	if took < 900*time.Millisecond || took > 4*time.Second {
		t.Errorf("exited %s after SIGTERM, want about the 1s grace", took)
	}
	for i, d := range devs {
		select {
		case <-d.Lost():
		case <-time.After(3 * time.Second):
			t.Errorf("device %d still looks connected after the proxy exited", i)
		}
	}
}
