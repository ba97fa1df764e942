package main

// End-to-end proof of draining: an SRE drains a broker with the ordinary
// `consul maint` command, and the proxy, watching Consul, moves its devices
// to the shard's standby with their sessions.

import (
	"fmt"
	"os/exec"
	"strings"
	"sync"
	"testing"
	"time"

	mqtt3 "github.com/eclipse/paho.mqtt.golang"

	"github.com/shardgate/shardgate/backend"
	"github.com/shardgate/shardgate/internal/consultest"
	"github.com/shardgate/shardgate/internal/servertest"
)

// e2eMovingDevice is a paho 3.1.1 device with a persistent session and a
// will that reconnects, with its own loop, whenever its connection is lost,
// and records whether each reconnect found its session.
type e2eMovingDevice struct {
	id, topic string
	c         mqtt3.Client

	mu        sync.Mutex
	connects  int // successful CONNACKs
	noSession int // reconnects whose CONNACK said session present = 0
	got       []string
	lastErr   error
	stopped   bool
}

// e2eStartMovingDevice connects and subscribes the device; stop ends it.
// It may run outside the test's goroutine: it reports errors, never fails
// the test itself.
func e2eStartMovingDevice(addr, id string) (d *e2eMovingDevice, stop func(), err error) {
	d = &e2eMovingDevice{id: id, topic: "dev/" + id}
	lost := make(chan struct{}, 1)
	opts := mqtt3.NewClientOptions().AddBroker("tcp://"+addr).SetClientID(id).
		SetProtocolVersion(4).SetCleanSession(false).
		SetAutoReconnect(false).SetConnectRetry(false).
		SetConnectTimeout(5*time.Second).SetKeepAlive(30*time.Second).
		SetOrderMatters(false).
		SetWill("will/"+id, "gone", 1, false).
		SetDefaultPublishHandler(func(_ mqtt3.Client, m mqtt3.Message) {
			d.mu.Lock()
			d.got = append(d.got, string(m.Payload()))
			d.mu.Unlock()
		}).
		SetConnectionLostHandler(func(mqtt3.Client, error) {
			select {
			case lost <- struct{}{}:
			default:
			}
		})
	d.c = mqtt3.NewClient(opts)
	if err := d.connect(); err != nil {
		return nil, nil, fmt.Errorf("connect %s: %w", id, err)
	}
	if tok := d.c.Subscribe(d.topic, 1, nil); !tok.WaitTimeout(e2eWait) || tok.Error() != nil {
		d.c.Disconnect(50)
		return nil, nil, fmt.Errorf("subscribe %s: %v", id, tok.Error())
	}
	done := make(chan struct{})
	go d.reconnectLoop(lost, done)
	stop = func() {
		d.mu.Lock()
		d.stopped = true
		d.mu.Unlock()
		close(done)
		if d.c.IsConnectionOpen() {
			d.c.Disconnect(50)
		}
	}
	return d, stop, nil
}

func (d *e2eMovingDevice) connect() error {
	tok := d.c.Connect()
	if !tok.WaitTimeout(e2eWait) {
		return fmt.Errorf("CONNECT timed out")
	}
	if err := tok.Error(); err != nil {
		return err
	}
	ct := tok.(*mqtt3.ConnectToken)
	d.mu.Lock()
	defer d.mu.Unlock()
	if d.connects > 0 && !ct.SessionPresent() {
		d.noSession++
	}
	d.connects++
	return nil
}

// reconnectLoop is the device's own reconnect: on connection lost, connect
// again (through the proxy, which picks the instance) until it works.
func (d *e2eMovingDevice) reconnectLoop(lost <-chan struct{}, done <-chan struct{}) {
	for {
		select {
		case <-done:
			return
		case <-lost:
		}
		for {
			d.mu.Lock()
			stopped := d.stopped
			d.mu.Unlock()
			if stopped {
				return
			}
			err := d.connect()
			if err == nil {
				break
			}
			d.mu.Lock()
			d.lastErr = err
			d.mu.Unlock()
			time.Sleep(100 * time.Millisecond)
		}
	}
}

func (d *e2eMovingDevice) received(payload string) bool {
	d.mu.Lock()
	defer d.mu.Unlock()
	for _, p := range d.got {
		if p == payload {
			return true
		}
	}
	return false
}

// TestE2EConsulMaintDrainsToStandby is the drain's proof with real processes:
// three `shardgate broker` instances (shard 0's primary and standby, shard
// 1) share a redis-server and register in a real Consul agent; a `shardgate
// proxy` watches the agent. 200 devices of shard 0 with persistent sessions
// and wills land on the primary. `consul maint -enable` on the primary
// (the real CLI): no new device reaches it afterwards, the proxy moves all
// 200 to the standby at its drain pace, each finds its session there and
// receives the QoS 1 message published to it while it was moving, and the
// primary fires none of their wills.
func TestE2EConsulMaintDrainsToStandby(t *testing.T) {
	t.Parallel()
	bin := buildShardgate(t)
	consulBin, err := consultest.Binary()
	if err != nil {
		if testing.Short() {
			t.Skip(err)
		}
		t.Fatal(err)
	}
	agent := consultest.Start(t, consultest.Options{})
	rs := servertest.Redis(t, servertest.RedisOptions{})
	common := e2eBrokerOpts{shards: 2, redis: rs.String(), keyPrefix: "dr", consul: agent.Addr()}
	start := func(id string, shard, priority int) *e2eBroker {
		o := common
		o.id, o.shard, o.priority = id, shard, priority
		return e2eStartBroker(t, bin, o)
	}
	primary, standby, other := start("s0-a", 0, 0), start("s0-b", 0, 1), start("s1", 1, 0)
	node := agent.NodeName()
	idA, idB, idS1 := node+"/s0-a", node+"/s0-b", node+"/s1"

	px := e2eConsulProxy(t, bin, agent, 2, "drain: {rate: 0.5}\n")
	e2eWaitFor(t, "the proxy sees 3 healthy instances from Consul", 20*time.Second, func() (bool, string) {
		h := px.backends(t).healthy()
		return h[idA] && h[idB] && h[idS1], fmt.Sprint(h)
	})
	active := func(id string) float64 {
		for k, v := range px.metrics(t) {
			if strings.HasPrefix(k, "shardgate_connections_active{") && strings.Contains(k, `instance="`+id+`"`) {
				return v
			}
		}
		return 0
	}

	// A shard-1 device watches the wills and publishes to the devices.
	pubID := e2eIDOnShard(t, px, "dr-pub", 1)
	var wmu sync.Mutex
	var wills []string
	pub := e2eConnectPersistent(t, px.mqtt, pubID, func(m mqtt3.Message) {
		wmu.Lock()
		wills = append(wills, m.Topic())
		wmu.Unlock()
	})
	if tok := pub.Subscribe("will/#", 1, nil); !tok.WaitTimeout(e2eWait) || tok.Error() != nil {
		t.Fatalf("subscribe will/#: %v", tok.Error())
	}
	if c := other.clientsSettled(t, 1); c != 1 {
		t.Fatalf("the publisher is not on shard 1's instance: its clients_connected = %v", c)
	}

	const n = 200
	var ids []string
	for i := 0; len(ids) < n; i++ {
		id := fmt.Sprintf("dr-dev-%d", i)
		if backend.ShardOf([]byte(id), 2) == 0 {
			ids = append(ids, id)
		}
	}
	devs := make([]*e2eMovingDevice, n)
	stops := make([]func(), n)
	errs := make([]error, n)
	for lo := 0; lo < n; lo += 20 {
		var wg sync.WaitGroup
		for i := lo; i < min(lo+20, n); i++ {
			wg.Add(1)
			go func() {
				defer wg.Done()
				devs[i], stops[i], errs[i] = e2eStartMovingDevice(px.mqtt, ids[i])
			}()
		}
		wg.Wait()
	}
	for _, stop := range stops {
		if stop != nil {
			t.Cleanup(stop)
		}
	}
	for _, err := range errs {
		if err != nil {
			t.Fatal(err)
		}
	}
	e2eWaitFor(t, "200 devices on the primary", e2eWait, func() (bool, string) {
		a, c := active(idA), primary.clients(t)
		return a == n && c == n, fmt.Sprintf("proxy connections_active %v, primary clients %v", a, c)
	})

	// The SRE's command.
	maint := time.Now()
	out, err := exec.Command(consulBin, "maint", "-enable", "-service=s0-a", "-reason=e2e drain", "-http-addr="+agent.Addr()).CombinedOutput()
	if err != nil {
		t.Fatalf("consul maint -enable: %v\n%s", err, out)
	}
	e2eWaitFor(t, "the proxy sees the primary out of the healthy set", 5*time.Second, func() (bool, string) {
		h := px.backends(t).healthy()
		return !h[idA] && h[idB], fmt.Sprint(h)
	})
	t.Logf("the proxy saw the maintenance %s after consul maint", time.Since(maint).Round(time.Millisecond))

	// While the devices move, one QoS 1 message to each device's topic.
	for i, id := range ids {
		if tok := pub.Publish("dev/"+id, 1, false, "moved-"+id); !tok.WaitTimeout(e2eWait) || tok.Error() != nil {
			t.Fatalf("publish %d: %v", i, tok.Error())
		}
		time.Sleep(2 * time.Millisecond)
	}

	// No new device reaches the primary: a new device goes to the standby,
	// and the primary's count only falls from here on.
	fresh := e2eIDOnShard(t, px, "dr-fresh", 0)
	if a := px.routeAddr(t, fresh); a != standby.mqtt {
		t.Errorf("after the maintenance /api/v1/route sends a new device to %q, want the standby %s", a, standby.mqtt)
	}
	// It counts in the standby's total at the end.
	fd := e2eMustConnect(t, px.mqtt, fresh, 4)
	if err := fd.Subscribe("fresh/"+fresh, 1); err != nil {
		t.Fatalf("subscribe: %v", err)
	}
	e2eRoundTrip(t, fd, "fresh/"+fresh, "hello")

	last := active(idA)
	e2eWaitFor(t, "all 200 devices on the standby", 60*time.Second, func() (bool, string) {
		a, b := active(idA), active(idB)
		if a > last {
			t.Errorf("connections_active of the primary rose from %v to %v during its drain", last, a)
		}
		last = a
		c := primary.clients(t)
		return a == 0 && b == n+1 && c == 0, fmt.Sprintf("proxy: primary %v, standby %v; primary clients %v; drain_remaining %v",
			a, b, c, px.metrics(t)[`shardgate_drain_remaining{instance="`+idA+`"}`])
	})
	t.Logf("drain of %d devices done %s after consul maint", n, time.Since(maint).Round(time.Millisecond))
	if c := standby.clients(t); c != n+1 {
		t.Errorf("standby clients_connected = %v, want %d", c, n+1)
	}

	e2eWaitFor(t, "every device received the message published while it moved", 20*time.Second, func() (bool, string) {
		missing := 0
		for _, d := range devs {
			if !d.received("moved-" + d.id) {
				missing++
			}
		}
		return missing == 0, fmt.Sprintf("%d of %d missing", missing, n)
	})
	for _, d := range devs {
		d.mu.Lock()
		if d.connects != 2 || d.noSession != 0 {
			t.Errorf("device %s: %d CONNACKs (want 2: the first, the move), %d reconnects without its session (last error %v)",
				d.id, d.connects, d.noSession, d.lastErr)
		}
		d.mu.Unlock()
	}
	time.Sleep(500 * time.Millisecond) // a will would have arrived by now
	wmu.Lock()
	if len(wills) != 0 {
		t.Errorf("the primary fired %d wills of devices that only moved: %v", len(wills), wills)
	}
	wmu.Unlock()
}
