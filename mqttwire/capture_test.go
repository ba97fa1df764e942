package mqttwire

import (
	"context"
	"encoding/binary"
	"encoding/hex"
	"errors"
	"flag"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"strings"
	"testing"
	"time"

	paho5 "github.com/eclipse/paho.golang/paho"
	paho "github.com/eclipse/paho.mqtt.golang"

	"github.com/shardgate/shardgate/internal/servertest"
)

// Fixtures captured from real clients. TestCapturedGolden parses the
// committed bytes in testdata/captured; TestCaptureLive runs the clients
// again against a plain TCP listener and checks that what they send today
// parses to the same fields. Regenerate the files with
//
//	go test ./mqttwire/ -run TestCaptureLive -update

var update = flag.Bool("update", false, "rewrite testdata/captured from live clients")

// mosquittoPub is Debian's MQTT client (mosquitto-clients), run from $PATH.
const mosquittoPub = "mosquitto_pub"

// capturedClient is one real client invocation and the fields its CONNECT
// must parse to (Len is checked against the captured length instead).
type capturedClient struct {
	file string // testdata/captured/<file>.hex
	desc string // the client and its settings, written into the file
	run  func(addr string) error
	want Connect
}

func mosquitto(args ...string) func(string) error {
	return func(addr string) error {
		host, port, _ := net.SplitHostPort(addr)
		all := append([]string{"-h", host, "-p", port, "-t", "shardgate/test", "-m", "hello"}, args...)
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		out, err := exec.CommandContext(ctx, mosquittoPub, all...).CombinedOutput()
		if err != nil {
			return fmt.Errorf("mosquitto_pub %s: %v: %s", strings.Join(args, " "), err, out)
		}
		return nil
	}
}

// pahoV3 connects with github.com/eclipse/paho.mqtt.golang (MQTT 3.1 and
// 3.1.1) and disconnects once the CONNACK is in.
func pahoV3(configure func(*paho.ClientOptions)) func(string) error {
	return func(addr string) error {
		o := paho.NewClientOptions().AddBroker("tcp://" + addr)
		o.SetAutoReconnect(false)
		o.SetConnectRetry(false)
		o.SetConnectTimeout(5 * time.Second)
		configure(o)
		c := paho.NewClient(o)
		tok := c.Connect()
		if !tok.WaitTimeout(10 * time.Second) {
			return errors.New("paho.mqtt.golang: connect timed out")
		}
		if err := tok.Error(); err != nil {
			return fmt.Errorf("paho.mqtt.golang: %w", err)
		}
		c.Disconnect(100)
		return nil
	}
}

// pahoV5 connects with github.com/eclipse/paho.golang (MQTT 5).
func pahoV5(cp *paho5.Connect) func(string) error {
	return func(addr string) error {
		conn, err := net.DialTimeout("tcp", addr, 5*time.Second)
		if err != nil {
			return err
		}
		c := paho5.NewClient(paho5.ClientConfig{Conn: conn})
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		ack, err := c.Connect(ctx, cp)
		if err != nil {
			return fmt.Errorf("paho.golang: %w", err)
		}
		if ack.ReasonCode != 0 {
			return fmt.Errorf("paho.golang: CONNACK %#x", ack.ReasonCode)
		}
		return c.Disconnect(&paho5.Disconnect{})
	}
}

func u32(v uint32) *uint32 { return &v }
func u16(v uint16) *uint16 { return &v }

var capturedClients = []capturedClient{
	{
		file: "mosquitto_pub-v31-long-id",
		desc: "mosquitto_pub -V mqttv31 -i mosquitto-pub-v31-client-id-over-23 -k 30",
		run:  mosquitto("-V", "mqttv31", "-i", "mosquitto-pub-v31-client-id-over-23", "-k", "30"),
		want: Connect{ProtocolName: "MQIsdp", Level: 3, Flags: 0x02, CleanStart: true, KeepAlive: 30, ClientID: "mosquitto-pub-v31-client-id-over-23"},
	},
	{
		file: "mosquitto_pub-v311-persistent",
		desc: "mosquitto_pub -V mqttv311 -i mosq-persist -c -k 120",
		run:  mosquitto("-V", "mqttv311", "-i", "mosq-persist", "-c", "-k", "120"),
		want: Connect{ProtocolName: "MQTT", Level: 4, Flags: 0x00, KeepAlive: 120, ClientID: "mosq-persist"},
	},
	{
		file: "mosquitto_pub-v311-user-will",
		desc: "mosquitto_pub -V mqttv311 -i mosq-v311 -u device-user -P device-secret --will-topic devices/mosq-v311/state --will-payload offline --will-qos 1 --will-retain -k 45",
		run: mosquitto("-V", "mqttv311", "-i", "mosq-v311", "-u", "device-user", "-P", "device-secret",
			"--will-topic", "devices/mosq-v311/state", "--will-payload", "offline", "--will-qos", "1", "--will-retain", "-k", "45"),
		want: Connect{ProtocolName: "MQTT", Level: 4, Flags: 0xee, CleanStart: true, KeepAlive: 45, ClientID: "mosq-v311",
			HasUsername: true, HasPassword: true, HasWill: true, Username: "device-user"},
	},
	{
		// -c adds its own session expiry property, so -D connect
		// session-expiry-interval goes without it (with both, mosquitto_pub
		// refuses: "Duplicate property in property list").
		file: "mosquitto_pub-v5-session-expiry",
		desc: "mosquitto_pub -V mqttv5 -i mosq-v5 -D connect session-expiry-interval 3600 -k 20",
		run:  mosquitto("-V", "mqttv5", "-i", "mosq-v5", "-D", "connect", "session-expiry-interval", "3600", "-k", "20"),
		want: Connect{ProtocolName: "MQTT", Level: 5, Flags: 0x02, CleanStart: true, KeepAlive: 20, ClientID: "mosq-v5", SessionExpiry: 3600},
	},
	{
		file: "mosquitto_pub-v5-persistent",
		desc: "mosquitto_pub -V mqttv5 -i mosq-v5-persist -c -x 86400 -k 90",
		run:  mosquitto("-V", "mqttv5", "-i", "mosq-v5-persist", "-c", "-x", "86400", "-k", "90"),
		want: Connect{ProtocolName: "MQTT", Level: 5, Flags: 0x00, KeepAlive: 90, ClientID: "mosq-v5-persist", SessionExpiry: 86400},
	},
	{
		file: "mosquitto_pub-v5-properties-will",
		desc: "mosquitto_pub -V mqttv5 -i mosq-v5-will -u u5 -P p5 --will-topic lwt/v5 --will-payload bye --will-qos 2 -D connect receive-maximum 10 -D connect user-property site lab -D will will-delay-interval 30 -D will content-type text/plain -k 60",
		run: mosquitto("-V", "mqttv5", "-i", "mosq-v5-will", "-u", "u5", "-P", "p5",
			"--will-topic", "lwt/v5", "--will-payload", "bye", "--will-qos", "2",
			"-D", "connect", "receive-maximum", "10", "-D", "connect", "user-property", "site", "lab",
			"-D", "will", "will-delay-interval", "30", "-D", "will", "content-type", "text/plain", "-k", "60"),
		want: Connect{ProtocolName: "MQTT", Level: 5, Flags: 0xd6, CleanStart: true, KeepAlive: 60, ClientID: "mosq-v5-will",
			HasUsername: true, HasPassword: true, HasWill: true, Username: "u5"},
	},
	{
		file: "paho.mqtt.golang-v31",
		desc: "paho.mqtt.golang v1.5.1: ProtocolVersion 3, ClientID paho-v31, CleanSession true, KeepAlive 30s, Username/Password",
		run: pahoV3(func(o *paho.ClientOptions) {
			o.SetProtocolVersion(3)
			o.SetClientID("paho-v31")
			o.SetCleanSession(true)
			o.SetKeepAlive(30 * time.Second)
			o.SetUsername("paho-user")
			o.SetPassword("paho-pass")
		}),
		want: Connect{ProtocolName: "MQIsdp", Level: 3, Flags: 0xc2, CleanStart: true, KeepAlive: 30, ClientID: "paho-v31",
			HasUsername: true, HasPassword: true, Username: "paho-user"},
	},
	{
		file: "paho.mqtt.golang-v311-persistent-will",
		desc: "paho.mqtt.golang v1.5.1: ProtocolVersion 4, ClientID paho-v311, CleanSession false, KeepAlive 60s, Will lwt/paho \"off\" QoS 1 retained",
		run: pahoV3(func(o *paho.ClientOptions) {
			o.SetProtocolVersion(4)
			o.SetClientID("paho-v311")
			o.SetCleanSession(false)
			o.SetKeepAlive(60 * time.Second)
			o.SetWill("lwt/paho", "off", 1, true)
		}),
		want: Connect{ProtocolName: "MQTT", Level: 4, Flags: 0x2c, KeepAlive: 60, ClientID: "paho-v311", HasWill: true},
	},
	{
		file: "paho.golang-v5-session",
		desc: "paho.golang v0.23.0: ClientID paho-v5, CleanStart false, KeepAlive 30, Username/Password, SessionExpiryInterval 7200, ReceiveMaximum 50, Will with delay 5 and user property",
		run: pahoV5(&paho5.Connect{
			ClientID:     "paho-v5",
			KeepAlive:    30,
			Username:     "v5-user",
			UsernameFlag: true,
			Password:     []byte("v5-pass"),
			PasswordFlag: true,
			Properties: &paho5.ConnectProperties{
				SessionExpiryInterval: u32(7200),
				ReceiveMaximum:        u16(50),
			},
			WillMessage: &paho5.WillMessage{Topic: "lwt/paho-v5", Payload: []byte("gone"), QoS: 1},
			WillProperties: &paho5.WillProperties{
				WillDelayInterval: u32(5),
				User:              paho5.UserProperties{{Key: "reason", Value: "lost"}},
			},
		}),
		want: Connect{ProtocolName: "MQTT", Level: 5, Flags: 0xcc, KeepAlive: 30, ClientID: "paho-v5",
			HasUsername: true, HasPassword: true, HasWill: true, Username: "v5-user", SessionExpiry: 7200},
	},
	{
		file: "paho.golang-v5-clean",
		desc: "paho.golang v0.23.0: ClientID paho-v5-clean, CleanStart true, KeepAlive 0, no properties",
		run:  pahoV5(&paho5.Connect{ClientID: "paho-v5-clean", CleanStart: true}),
		want: Connect{ProtocolName: "MQTT", Level: 5, Flags: 0x02, CleanStart: true, ClientID: "paho-v5-clean"},
	},
}

// captureFirstPacket runs a client against a fresh plain TCP listener on
// 127.0.0.1 and returns the first packet it sends. The listener reads the
// packet by its fixed header alone (not with the parser under test),
// accepts it with a CONNACK so the client proceeds normally, and drains the
// connection until the client closes it.
func captureFirstPacket(t *testing.T, run func(addr string) error) []byte {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	type result struct {
		pkt []byte
		err error
	}
	got := make(chan result, 1)
	go func() {
		conn, err := ln.Accept()
		if err != nil {
			got <- result{err: err}
			return
		}
		defer conn.Close()
		conn.SetDeadline(time.Now().Add(15 * time.Second))
		pkt, err := readPacket(conn)
		got <- result{pkt, err}
		if err != nil {
			return
		}
		conn.Write(AppendConnack(nil, packetLevel(pkt), false, Success))
		io.Copy(io.Discard, conn)
	}()
	runErr := make(chan error, 1)
	go func() { runErr <- run(ln.Addr().String()) }()
	var r result
	select {
	case r = <-got:
	case err := <-runErr:
		// The client gave up before sending a packet (a bad flag, say).
		t.Fatalf("client exited before sending a packet: %v", err)
	case <-time.After(20 * time.Second):
		t.Fatal("no packet from the client")
	}
	if r.err != nil {
		t.Fatalf("reading the first packet: %v", r.err)
	}
	if err := <-runErr; err != nil {
		t.Fatalf("client: %v", err)
	}
	return r.pkt
}

// readPacket reads one whole MQTT packet by its fixed header.
func readPacket(r io.Reader) ([]byte, error) {
	pkt := make([]byte, 1, 256)
	if _, err := io.ReadFull(r, pkt); err != nil {
		return nil, err
	}
	var rl, shift uint
	for i := 0; ; i++ {
		var c [1]byte
		if _, err := io.ReadFull(r, c[:]); err != nil {
			return nil, err
		}
		pkt = append(pkt, c[0])
		rl |= uint(c[0]&0x7f) << shift
		shift += 7
		if c[0]&0x80 == 0 {
			break
		}
		if i == 3 {
			return nil, errors.New("remaining length over 4 bytes")
		}
	}
	body := make([]byte, rl)
	if _, err := io.ReadFull(r, body); err != nil {
		return nil, err
	}
	return append(pkt, body...), nil
}

// packetLevel reads the protocol level of a CONNECT by position, so the
// CONNACK is in the client's dialect.
func packetLevel(pkt []byte) byte {
	i := 1
	for i < len(pkt) && pkt[i]&0x80 != 0 {
		i++
	}
	i++
	if i+2 > len(pkt) {
		return Level311
	}
	n := int(binary.BigEndian.Uint16(pkt[i:]))
	if i+2+n >= len(pkt) {
		return Level311
	}
	return pkt[i+2+n] &^ bridgeBit
}

func TestCaptureLive(t *testing.T) {
	if testing.Short() {
		t.Skip("live capture from real MQTT clients: not in -short")
	}
	for _, cc := range capturedClients {
		t.Run(cc.file, func(t *testing.T) {
			if strings.HasPrefix(cc.file, "mosquitto_pub") {
				servertest.RequireBinary(t, mosquittoPub, "mosquitto-clients")
			}
			pkt := captureFirstPacket(t, cc.run)
			c, err := ParseConnect(pkt, 64<<10)
			if err != nil {
				t.Fatalf("% x: %v", pkt, err)
			}
			checkCaptured(t, cc, pkt, c)
			path := goldenPath(cc.file)
			if *update {
				if err := os.WriteFile(path, []byte(annotateConnect(cc.desc, pkt)), 0o644); err != nil {
					t.Fatal(err)
				}
				return
			}
			if golden, err := readHexFile(path); err == nil && string(golden) != string(pkt) {
				// The fields still match; the client's encoding changed
				// (a new version). Worth a look and an -update.
				t.Logf("live bytes differ from %s:\nlive   % x\ngolden % x", path, pkt, golden)
			}
		})
	}
}

func TestCapturedGolden(t *testing.T) {
	byFile := map[string]capturedClient{}
	for _, cc := range capturedClients {
		byFile[cc.file] = cc
	}
	files, err := filepath.Glob(filepath.Join("testdata", "captured", "*.hex"))
	if err != nil {
		t.Fatal(err)
	}
	if len(files) < len(capturedClients) {
		t.Fatalf("%d golden files for %d captured clients: run go test ./mqttwire/ -run TestCaptureLive -update", len(files), len(capturedClients))
	}
	sort.Strings(files)
	for _, path := range files {
		name := strings.TrimSuffix(filepath.Base(path), ".hex")
		t.Run(name, func(t *testing.T) {
			cc, ok := byFile[name]
			if !ok {
				t.Fatalf("%s has no entry in capturedClients", path)
			}
			pkt, err := readHexFile(path)
			if err != nil {
				t.Fatal(err)
			}
			c, err := ParseConnect(pkt, 64<<10)
			if err != nil {
				t.Fatalf("% x: %v", pkt, err)
			}
			checkCaptured(t, cc, pkt, c)
			// Every prefix is a valid beginning: the parser asks for more.
			for i := range pkt {
				if _, err := ParseConnect(pkt[:i], 64<<10); err != ErrNeedMore {
					t.Fatalf("prefix of %d bytes: %v", i, err)
				}
			}
		})
	}
}

func checkCaptured(t *testing.T, cc capturedClient, pkt []byte, c Connect) {
	t.Helper()
	want := cc.want
	want.Len = len(pkt)
	if c != want {
		t.Fatalf("% x\ngot  %+v\nwant %+v", pkt, c, want)
	}
}

func goldenPath(file string) string { return filepath.Join("testdata", "captured", file+".hex") }

// readHexFile reads a golden file: hex byte pairs, with '#' starting a
// comment to the end of the line.
func readHexFile(path string) ([]byte, error) {
	data, err := os.ReadFile(path)
	if err != nil {
		return nil, err
	}
	var sb strings.Builder
	for _, line := range strings.Split(string(data), "\n") {
		if i := strings.IndexByte(line, '#'); i >= 0 {
			line = line[:i]
		}
		sb.WriteString(strings.Join(strings.Fields(line), ""))
	}
	return hex.DecodeString(sb.String())
}
