package broker

import (
	"net"
	"strconv"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	mqtt "github.com/mochi-mqtt/server/v2"
)

// TestDisconnectListenerClientsUnderChurn closes a listener's clients while
// other clients keep leaving (Clients.Delete wants the write lock). A
// snapshot that read-locks the clients map twice deadlocks here within a
// few hundred rounds; disconnectListenerClients must finish every round.
func TestDisconnectListenerClientsUnderChurn(t *testing.T) {
	testChurnedDisconnect(t, disconnectListenerClients)
}

func testChurnedDisconnect(t *testing.T, disconnect func(*mqtt.Server, string)) {
	t.Helper()
	srv := mqtt.New(&mqtt.Options{InlineClient: false})
	// On a deadlock the churn goroutine cannot end: the test fails
	// without waiting for it.
	var stop atomic.Bool
	var wg sync.WaitGroup
	wg.Add(1)
	go func() {
		defer wg.Done()
		for !stop.Load() {
			srv.Clients.Delete("gone")
		}
	}()

	done := make(chan int)
	go func() {
		rounds := 0
		defer func() { done <- rounds }()
		for i := 0; i < 2000 && !stop.Load(); i++ {
			a, b := net.Pipe()
			cl := srv.NewClient(a, "shard0", "dev"+strconv.Itoa(i), false)
			srv.Clients.Add(cl)
			go func() { _, _ = b.Read(make([]byte, 64)); _ = b.Close() }()
			disconnect(srv, "shard0")
			if !cl.Closed() {
				t.Errorf("round %d: the listener's client was not stopped", i)
				return
			}
			srv.Clients.Delete(cl.ID)
			rounds++
		}
	}()
	select {
	case n := <-done:
		stop.Store(true)
		wg.Wait()
		if n != 2000 {
			t.Fatalf("%d of 2000 rounds", n)
		}
	case <-time.After(20 * time.Second):
		stop.Store(true)
		t.Fatal("disconnecting the listener's clients deadlocked against Clients.Delete")
	}
}
