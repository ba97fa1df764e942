package main

// Helpers of the end-to-end tests (e2e_*_test.go): they run the shardgate
// binary as a process, in front of real Mosquitto brokers, and talk to it
// with real MQTT clients (paho.mqtt.golang for 3.1 and 3.1.1, paho.golang
// for 5.0) and over its admin HTTP API.

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/url"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/eclipse/paho.golang/paho"
	mqtt3 "github.com/eclipse/paho.mqtt.golang"

	"github.com/shardgate/shardgate/internal/servertest"
	"github.com/shardgate/shardgate/mqttwire"
	"github.com/shardgate/shardgate/proxy"
)

// e2eWait bounds every poll of the end-to-end tests: long enough for a
// loaded 2-core machine, short enough to fail fast.
const e2eWait = 10 * time.Second

// waitFor polls cond every 25ms until it holds or timeout passes; then the
// test fails with what and cond's last description of the state.
func e2eWaitFor(t *testing.T, what string, timeout time.Duration, cond func() (bool, string)) {
	t.Helper()
	deadline := time.Now().Add(timeout)
	for {
		ok, state := cond()
		if ok {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("after %s: %s; last state: %s", timeout, what, state)
		}
		time.Sleep(25 * time.Millisecond)
	}
}

// ---- processes --------------------------------------------------------------

// lockedBuffer collects a child's output while it runs.
type e2eBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (b *e2eBuffer) Write(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.b.Write(p)
}

func (b *e2eBuffer) String() string {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.b.String()
}

// process is a child started by a test and killed by its cleanup.
type e2eProcess struct {
	name  string
	cmd   *exec.Cmd
	out   *e2eBuffer
	done  chan struct{}    // closed once it exited
	state *os.ProcessState // valid after done
}

func e2eStart(t *testing.T, name, bin string, args ...string) *e2eProcess {
	t.Helper()
	cmd := exec.Command(bin, args...)
	out := &e2eBuffer{}
	cmd.Stdout, cmd.Stderr = out, out
	if err := cmd.Start(); err != nil {
		t.Fatalf("start %s: %v", name, err)
	}
	p := &e2eProcess{name: name, cmd: cmd, out: out, done: make(chan struct{})}
	go func() {
		_ = cmd.Wait()
		p.state = cmd.ProcessState
		close(p.done)
	}()
	t.Cleanup(func() {
		p.kill()
		if t.Failed() {
			t.Logf("---- output of %s (pid %d):\n%s", name, cmd.Process.Pid, out.String())
		}
	})
	return p
}

func (p *e2eProcess) pid() int { return p.cmd.Process.Pid }

func (p *e2eProcess) exited() bool {
	select {
	case <-p.done:
		return true
	default:
		return false
	}
}

// kill sends SIGKILL unless the process already exited, and reaps it.
func (p *e2eProcess) kill() {
	if !p.exited() {
		_ = p.cmd.Process.Kill()
	}
	<-p.done
}

func (p *e2eProcess) signal(t *testing.T, sig syscall.Signal) {
	t.Helper()
	if err := p.cmd.Process.Signal(sig); err != nil {
		t.Fatalf("signal %v to %s: %v", sig, p.name, err)
	}
}

// waitExit waits up to timeout for the process to exit and returns its exit
// code.
func (p *e2eProcess) waitExit(t *testing.T, timeout time.Duration) int {
	t.Helper()
	select {
	case <-p.done:
		return p.state.ExitCode()
	case <-time.After(timeout):
		t.Fatalf("%s still running after %s", p.name, timeout)
		return -1
	}
}

// waitLog waits until the process's output contains every one of subs on
// one line, and returns that line.
func (p *e2eProcess) waitLog(t *testing.T, timeout time.Duration, subs ...string) string {
	t.Helper()
	var found string
	e2eWaitFor(t, fmt.Sprintf("%s logs a line with %q", p.name, subs), timeout, func() (bool, string) {
		sc := bufio.NewScanner(strings.NewReader(p.out.String()))
		sc.Buffer(make([]byte, 64<<10), 1<<20)
		for sc.Scan() {
			line := sc.Text()
			all := true
			for _, s := range subs {
				if !strings.Contains(line, s) {
					all = false
					break
				}
			}
			if all {
				found = line
				return true, ""
			}
		}
		return false, "not in the output yet"
	})
	return found
}

// ---- brokers ----------------------------------------------------------------

// e2eBrokers starts n real Mosquitto brokers on loopback, one per shard.
func e2eBrokers(t *testing.T, n int) []*servertest.MosquittoServer {
	t.Helper()
	ms := make([]*servertest.MosquittoServer, n)
	for i := range ms {
		ms[i] = servertest.Mosquitto(t, servertest.MosquittoOptions{})
	}
	return ms
}

// ---- proxy ------------------------------------------------------------------

// backendEntry is one `backends.static` item.
type e2eBackend struct {
	id       string
	addr     string
	shard    int
	priority int
}

// fleetConfig writes a proxy YAML configuration.
type e2eFleet struct {
	listen, admin string
	shards        int
	noInstance    string // "" = default (spill)
	grace         string // "" = default (30s)
	backends      []e2eBackend
}

func (c e2eFleet) yaml() string {
	var y strings.Builder
	fmt.Fprintf(&y, "listen: [%q]\nadmin: %q\nevent_loops: 2\nshards: %d\n", c.listen, c.admin, c.shards)
	if c.noInstance != "" {
		fmt.Fprintf(&y, "no_instance: %s\n", c.noInstance)
	}
	if c.grace != "" {
		fmt.Fprintf(&y, "shutdown: {grace: %s}\n", c.grace)
	}
	y.WriteString("health: {type: mqtt, interval: 100ms, timeout: 100ms, rise: 1, fall: 1}\n")
	y.WriteString("backends:\n  static:\n")
	for _, b := range c.backends {
		fmt.Fprintf(&y, "    - {id: %s, address: %q, shard: %d, priority: %d}\n", b.id, b.addr, b.shard, b.priority)
	}
	return y.String()
}

// fleetOf is the configuration of one mosquitto per shard: instance
// "m<shard>" serves shard <shard>.
func e2eFleetOf(t *testing.T, ms []*servertest.MosquittoServer) e2eFleet {
	c := e2eFleet{listen: servertest.FreePort(t).String(), admin: servertest.FreePort(t).String(), shards: len(ms)}
	for i, m := range ms {
		c.backends = append(c.backends, e2eBackend{id: "m" + strconv.Itoa(i), addr: m.String(), shard: i})
	}
	return c
}

// proxyProc is a running `shardgate proxy`.
type e2eProxy struct {
	*e2eProcess
	mqtt, admin string // device-facing and admin addresses
	cfgPath     string
}

// startProxy writes cfg and runs `shardgate proxy --config` on it, and waits
// until the admin server answers.
func e2eStartProxy(t *testing.T, bin string, cfg e2eFleet) *e2eProxy {
	t.Helper()
	px := &e2eProxy{mqtt: cfg.listen, admin: cfg.admin, cfgPath: filepath.Join(t.TempDir(), "proxy.yaml")}
	px.writeConfig(t, cfg.yaml())
	px.e2eProcess = e2eStart(t, "shardgate proxy", bin, "proxy", "--config", px.cfgPath)
	px.waitAdmin(t)
	return px
}

func (px *e2eProxy) writeConfig(t *testing.T, y string) {
	t.Helper()
	// Write and rename, so a SIGHUP never reads a half-written file.
	tmp := px.cfgPath + ".tmp"
	if err := os.WriteFile(tmp, []byte(y), 0o644); err != nil {
		t.Fatal(err)
	}
	if err := os.Rename(tmp, px.cfgPath); err != nil {
		t.Fatal(err)
	}
}

func (px *e2eProxy) waitAdmin(t *testing.T) {
	t.Helper()
	e2eWaitFor(t, "admin /healthz answers 200", e2eWait, func() (bool, string) {
		if px.exited() {
			t.Fatalf("%s exited with %v:\n%s", px.name, px.state, px.out.String())
		}
		code, body, err := e2eGet(px.admin, "/healthz")
		return err == nil && code == 200, fmt.Sprint(code, " ", string(body), " ", err)
	})
}

// waitReady waits until /readyz answers 200 (a snapshot with a healthy
// instance).
func (px *e2eProxy) waitReady(t *testing.T) {
	t.Helper()
	e2eWaitFor(t, "/readyz answers 200", e2eWait, func() (bool, string) {
		code, body, err := e2eGet(px.admin, "/readyz")
		return err == nil && code == 200, fmt.Sprint(code, " ", strings.TrimSpace(string(body)), " ", err)
	})
}

func e2eGet(addr, path string) (int, []byte, error) {
	c := http.Client{Timeout: 3 * time.Second}
	resp, err := c.Get("http://" + addr + path)
	if err != nil {
		return 0, nil, err
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	return resp.StatusCode, b, err
}

func e2eGetJSON(t *testing.T, addr, path string, v any) {
	t.Helper()
	code, body, err := e2eGet(addr, path)
	if err != nil || code != 200 {
		t.Fatalf("GET %s: %d %v\n%s", path, code, err, body)
	}
	if err := json.Unmarshal(body, v); err != nil {
		t.Fatalf("GET %s: %v\n%s", path, err, body)
	}
}

// backendsAnswer is what /api/v1/backends says (the fields the tests read).
type e2eBackends struct {
	Contract  string `json:"contract"`
	Shards    int    `json:"shards"`
	Instances []struct {
		ID       string `json:"id"`
		Address  string `json:"address"`
		Shard    int    `json:"shard"`
		Priority int    `json:"priority"`
		Healthy  bool   `json:"healthy"`
		Active   bool   `json:"active"`
	} `json:"instances"`
	Checks []struct {
		ID        string `json:"id"`
		State     string `json:"state"`
		Healthy   bool   `json:"healthy"`
		LastError string `json:"last_error"`
	} `json:"checks"`
}

func (px *e2eProxy) backends(t *testing.T) e2eBackends {
	t.Helper()
	var b e2eBackends
	e2eGetJSON(t, px.admin, "/api/v1/backends", &b)
	return b
}

// healthy returns instance ID → healthy, from the routing snapshot.
func (b e2eBackends) healthy() map[string]bool {
	m := map[string]bool{}
	for _, in := range b.Instances {
		m[in.ID] = in.Healthy
	}
	return m
}

func (px *e2eProxy) route(t *testing.T, id string) proxy.RouteAnswer {
	t.Helper()
	var a proxy.RouteAnswer
	e2eGetJSON(t, px.admin, "/api/v1/route?client_id="+url.QueryEscape(id), &a)
	return a
}

// routeAddr is the address /api/v1/route names for id ("" when refused).
func (px *e2eProxy) routeAddr(t *testing.T, id string) string {
	t.Helper()
	a := px.route(t, id)
	if a.Address == nil {
		return ""
	}
	return *a.Address
}

// metrics scrapes /metrics and returns each sample by its name and labels
// as written, e.g. `shardgate_connects_total{result="ok"}`.
func (px *e2eProxy) metrics(t *testing.T) map[string]float64 {
	t.Helper()
	code, body, err := e2eGet(px.admin, "/metrics")
	if err != nil || code != 200 {
		t.Fatalf("GET /metrics: %d %v", code, err)
	}
	return e2eParseMetrics(t, body)
}

// parseMetrics reads the Prometheus text format: `name{labels} value
// [timestamp]` lines; comments skipped.
func e2eParseMetrics(t *testing.T, body []byte) map[string]float64 {
	t.Helper()
	m := map[string]float64{}
	for _, line := range strings.Split(string(body), "\n") {
		if line == "" || strings.HasPrefix(line, "#") {
			continue
		}
		// Label values may hold spaces; the value follows the last '}'
		// or, without labels, the first space.
		key, rest := line, ""
		if i := strings.LastIndexByte(line, '}'); i >= 0 {
			key, rest = line[:i+1], strings.TrimSpace(line[i+1:])
		} else if i := strings.IndexByte(line, ' '); i >= 0 {
			key, rest = line[:i], strings.TrimSpace(line[i+1:])
		}
		fields := strings.Fields(rest)
		if len(fields) == 0 {
			t.Fatalf("metrics line without a value: %q", line)
		}
		v, err := strconv.ParseFloat(fields[0], 64)
		if err != nil {
			t.Fatalf("metrics line %q: %v", line, err)
		}
		m[key] = v
	}
	return m
}

// ---- MQTT devices -----------------------------------------------------------

// message is a PUBLISH a device received.
type e2eMessage struct {
	Topic   string
	Payload string
	QoS     byte
	Retain  bool
}

// device is a real MQTT client of one protocol level.
type e2eDevice interface {
	Subscribe(topic string, qos byte) error
	Publish(topic string, qos byte, retain bool, payload string) error
	// Messages delivers received PUBLISHes.
	Messages() <-chan e2eMessage
	// Lost is closed once the connection is gone without Disconnect.
	Lost() <-chan struct{}
	Disconnect()
}

// refusedError is a CONNACK refusing the device: for 3.1/3.1.1 the return
// code, for 5.0 the reason code.
type e2eRefused struct {
	level byte
	code  byte
}

func (e *e2eRefused) Error() string {
	return fmt.Sprintf("CONNACK (level %d) refused the device: code 0x%02x", e.level, e.code)
}

// connectDevice connects a clean-session device with client ID id at MQTT
// level 3 (3.1), 4 (3.1.1) or 5 (5.0) to addr. A CONNACK refusing it is a
// *refusedError.
func e2eConnect(addr, id string, level byte) (e2eDevice, error) {
	if level == mqttwire.Level5 {
		return e2eConnectV5(addr, id)
	}
	return e2eConnectV3(addr, id, level)
}

func e2eMustConnect(t *testing.T, addr, id string, level byte) e2eDevice {
	t.Helper()
	d, err := e2eConnect(addr, id, level)
	if err != nil {
		t.Fatalf("connect %q (level %d) to %s: %v", id, level, addr, err)
	}
	t.Cleanup(d.Disconnect)
	return d
}

// v3Device is a paho.mqtt.golang client (MQTT 3.1 or 3.1.1).
type e2eV3 struct {
	c    mqtt3.Client
	msgs chan e2eMessage
	lost chan struct{}
}

func e2eConnectV3(addr, id string, level byte) (*e2eV3, error) {
	d := &e2eV3{msgs: make(chan e2eMessage, 256), lost: make(chan struct{})}
	var once sync.Once
	opts := mqtt3.NewClientOptions().
		AddBroker("tcp://" + addr).
		SetClientID(id).
		SetProtocolVersion(uint(level)). // explicit: no fallback from 3.1.1 to 3.1
		SetCleanSession(true).
		SetKeepAlive(30 * time.Second).
		SetConnectTimeout(5 * time.Second).
		SetAutoReconnect(false).
		SetConnectRetry(false).
		SetOrderMatters(false).
		SetDefaultPublishHandler(func(_ mqtt3.Client, m mqtt3.Message) { d.deliver(m) }).
		SetConnectionLostHandler(func(mqtt3.Client, error) { once.Do(func() { close(d.lost) }) })
	d.c = mqtt3.NewClient(opts)
	tok := d.c.Connect()
	if !tok.WaitTimeout(10 * time.Second) {
		return nil, errors.New("CONNECT timed out")
	}
	if err := tok.Error(); err != nil {
		if rc := tok.(*mqtt3.ConnectToken).ReturnCode(); rc > 0 && rc < 0x80 {
			return nil, &e2eRefused{level: level, code: rc}
		}
		return nil, err
	}
	return d, nil
}

func (d *e2eV3) deliver(m mqtt3.Message) {
	d.msgs <- e2eMessage{Topic: m.Topic(), Payload: string(m.Payload()), QoS: m.Qos(), Retain: m.Retained()}
}

func (d *e2eV3) Subscribe(topic string, qos byte) error {
	tok := d.c.Subscribe(topic, qos, func(_ mqtt3.Client, m mqtt3.Message) { d.deliver(m) })
	if !tok.WaitTimeout(5 * time.Second) {
		return errors.New("SUBSCRIBE timed out")
	}
	return tok.Error()
}

func (d *e2eV3) Publish(topic string, qos byte, retain bool, payload string) error {
	tok := d.c.Publish(topic, qos, retain, payload)
	if !tok.WaitTimeout(5 * time.Second) {
		return errors.New("PUBLISH timed out")
	}
	return tok.Error()
}

func (d *e2eV3) Messages() <-chan e2eMessage { return d.msgs }
func (d *e2eV3) Lost() <-chan struct{}       { return d.lost }
func (d *e2eV3) Disconnect() {
	if d.c.IsConnected() {
		d.c.Disconnect(100)
	}
}

// v5Device is a paho.golang client (MQTT 5.0).
type e2eV5 struct {
	c    *paho.Client
	msgs chan e2eMessage
	lost chan struct{}
	once sync.Once
	mu   sync.Mutex
	bye  bool // Disconnect called
}

func e2eConnectV5(addr, id string) (*e2eV5, error) {
	conn, err := net.DialTimeout("tcp", addr, 5*time.Second)
	if err != nil {
		return nil, err
	}
	d := &e2eV5{msgs: make(chan e2eMessage, 256), lost: make(chan struct{})}
	d.c = paho.NewClient(paho.ClientConfig{
		Conn: conn,
		OnPublishReceived: []func(paho.PublishReceived) (bool, error){func(pr paho.PublishReceived) (bool, error) {
			p := pr.Packet
			d.msgs <- e2eMessage{Topic: p.Topic, Payload: string(p.Payload), QoS: p.QoS, Retain: p.Retain}
			return true, nil
		}},
		OnClientError:      func(error) { d.gone() },
		OnServerDisconnect: func(*paho.Disconnect) { d.gone() },
	})
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	ca, err := d.c.Connect(ctx, &paho.Connect{ClientID: id, CleanStart: true, KeepAlive: 30})
	if err != nil {
		conn.Close()
		if ca != nil && ca.ReasonCode >= 0x80 {
			return nil, &e2eRefused{level: mqttwire.Level5, code: ca.ReasonCode}
		}
		return nil, err
	}
	go func() {
		<-d.c.Done()
		d.gone()
	}()
	return d, nil
}

// gone marks the connection lost unless the test disconnected it.
func (d *e2eV5) gone() {
	d.mu.Lock()
	bye := d.bye
	d.mu.Unlock()
	if !bye {
		d.once.Do(func() { close(d.lost) })
	}
}

func (d *e2eV5) Subscribe(topic string, qos byte) error {
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	sa, err := d.c.Subscribe(ctx, &paho.Subscribe{Subscriptions: []paho.SubscribeOptions{{Topic: topic, QoS: qos}}})
	if err != nil {
		return err
	}
	if len(sa.Reasons) != 1 || sa.Reasons[0] >= 0x80 {
		return fmt.Errorf("SUBACK reasons %v", sa.Reasons)
	}
	return nil
}

func (d *e2eV5) Publish(topic string, qos byte, retain bool, payload string) error {
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	pr, err := d.c.Publish(ctx, &paho.Publish{Topic: topic, QoS: qos, Retain: retain, Payload: []byte(payload)})
	if err != nil {
		return err
	}
	if pr != nil && pr.ReasonCode >= 0x80 {
		return fmt.Errorf("PUBACK reason 0x%02x", pr.ReasonCode)
	}
	return nil
}

func (d *e2eV5) Messages() <-chan e2eMessage { return d.msgs }
func (d *e2eV5) Lost() <-chan struct{}       { return d.lost }
func (d *e2eV5) Disconnect() {
	d.mu.Lock()
	already := d.bye
	d.bye = true
	d.mu.Unlock()
	if !already {
		_ = d.c.Disconnect(&paho.Disconnect{ReasonCode: 0})
	}
}

// expectMessage waits for a message on topic with payload (others are
// skipped).
func e2eExpect(t *testing.T, d e2eDevice, topic, payload string, timeout time.Duration) e2eMessage {
	t.Helper()
	deadline := time.After(timeout)
	for {
		select {
		case m := <-d.Messages():
			if m.Topic == topic && m.Payload == payload {
				return m
			}
		case <-deadline:
			t.Fatalf("no message %q on %q within %s", payload, topic, timeout)
			return e2eMessage{}
		}
	}
}

// roundTrip proves a connected device works end to end: it publishes to
// its own subscribed topic and receives the message back.
func e2eRoundTrip(t *testing.T, d e2eDevice, topic, payload string) {
	t.Helper()
	if err := d.Publish(topic, 1, false, payload); err != nil {
		t.Fatalf("publish %q: %v", topic, err)
	}
	e2eExpect(t, d, topic, payload, 5*time.Second)
}

// rawConnect dials addr and sends a 3.1.1 CONNECT. It returns nil only when
// a CONNACK accepting the device came back.
func e2eRawConnect(addr, id string) error {
	c, err := net.DialTimeout("tcp", addr, 2*time.Second)
	if err != nil {
		return err
	}
	defer c.Close()
	_ = c.SetDeadline(time.Now().Add(3 * time.Second))
	if _, err := c.Write(mqttwire.AppendConnect(nil, mqttwire.ConnectOptions{Level: mqttwire.Level311, ClientID: id, CleanStart: true, KeepAlive: 30})); err != nil {
		return err
	}
	b := make([]byte, 4)
	if _, err := io.ReadFull(c, b); err != nil {
		return err
	}
	if b[0] != 0x20 || b[3] != 0 {
		return fmt.Errorf("CONNACK % x", b)
	}
	return nil
}
