package broker

import (
	"context"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	paho5 "github.com/eclipse/paho.golang/paho"
	paho3 "github.com/eclipse/paho.mqtt.golang"
	mqtt "github.com/mochi-mqtt/server/v2"
	"github.com/mochi-mqtt/server/v2/packets"
	"golang.org/x/crypto/bcrypt"
)

// writeFile writes a test's file and returns its path.
func writeFile(t *testing.T, name, text string) string {
	t.Helper()
	p := filepath.Join(t.TempDir(), name)
	if err := os.WriteFile(p, []byte(text), 0o600); err != nil {
		t.Fatal(err)
	}
	return p
}

// credentials returns a credentials file's text for user → password, with
// the cheapest bcrypt cost so tests stay fast.
func credentials(t *testing.T, users map[string]string) string {
	t.Helper()
	var b strings.Builder
	b.WriteString("# test users\n\n")
	for u, p := range users {
		h, err := bcrypt.GenerateFromPassword([]byte(p), bcrypt.MinCost)
		if err != nil {
			t.Fatal(err)
		}
		b.WriteString(u + ":" + string(h) + "\n")
	}
	return b.String()
}

func newTestAuth(t *testing.T, users map[string]string, acl string, anonymous bool) mqtt.Hook {
	t.Helper()
	cfg := AuthConfig{AllowAnonymous: anonymous}
	if users != nil {
		cfg.CredentialsFile = writeFile(t, "passwd", credentials(t, users))
	}
	if acl != "" {
		cfg.ACLFile = writeFile(t, "acl", acl)
	}
	h, err := NewAuth(cfg)
	if err != nil {
		t.Fatalf("NewAuth: %v", err)
	}
	return h
}

func TestNewAuthFileErrors(t *testing.T) {
	hash, _ := bcrypt.GenerateFromPassword([]byte("pw"), bcrypt.MinCost)
	for _, tc := range []struct {
		name, creds, acl string
		anonymous        bool
		want             string
	}{
		{name: "nobody can connect", want: "no client could connect"},
		{name: "no colon", creds: "alice\n", want: "passwd:1: want username:bcrypt-hash"},
		{name: "empty username", creds: ":" + string(hash), want: "passwd:1: want username"},
		{name: "not bcrypt", creds: "# c\nalice:secret\n", want: `passwd:2: user "alice": not a bcrypt hash`},
		{name: "duplicate", creds: "a:" + string(hash) + "\na:" + string(hash), want: `passwd:2: user "a" listed twice`},
		{name: "unknown word", anonymous: true, acl: "permit read a\n", want: `acl:1: "permit"`},
		{name: "bad access", anonymous: true, acl: "allow publish a\n", want: `acl:1: "publish": want read, write or readwrite`},
		{name: "empty filter", anonymous: true, acl: "allow read\n", want: "acl:1: filter \"\": empty"},
		{name: "hash not last", anonymous: true, acl: "\n\nallow read a/#/b\n", want: "acl:3: filter \"a/#/b\": # must be a whole level"},
		{name: "partial plus", anonymous: true, acl: "deny write a/b+\n", want: "+ must be a whole level"},
		{name: "user without name", anonymous: true, acl: "user\n", want: "acl:1: user: want a username"},
		{name: "anonymous with argument", anonymous: true, acl: "anonymous x\n", want: `acl:1: "anonymous" takes no argument`},
	} {
		t.Run(tc.name, func(t *testing.T) {
			cfg := AuthConfig{AllowAnonymous: tc.anonymous}
			if tc.creds != "" {
				cfg.CredentialsFile = writeFile(t, "passwd", tc.creds)
			}
			if tc.acl != "" {
				cfg.ACLFile = writeFile(t, "acl", tc.acl)
			}
			_, err := NewAuth(cfg)
			if err == nil || !strings.Contains(err.Error(), tc.want) {
				t.Errorf("NewAuth: %v, want an error containing %q", err, tc.want)
			}
		})
	}
}

// connectPacket is a CONNECT as mochi hands it to hooks.
func connectPacket(user, pass string) packets.Packet {
	var pk packets.Packet
	pk.Connect.Username = []byte(user)
	pk.Connect.UsernameFlag = user != ""
	pk.Connect.Password = []byte(pass)
	pk.Connect.PasswordFlag = pass != ""
	return pk
}

func TestAuthenticate(t *testing.T) {
	long := strings.Repeat("p", maxPasswordLen)
	users := map[string]string{"alice": "wonderland", "b:ob": "builder", "long": long}
	for _, anon := range []bool{false, true} {
		h := newTestAuth(t, users, "", anon)
		for _, tc := range []struct {
			user, pass string
			want       bool
		}{
			{"alice", "wonderland", true},
			{"alice", "Wonderland", false},
			{"alice", "", false},
			{"b:ob", "builder", true}, // the last ':' separates the hash
			{"mallory", "wonderland", false},
			{"", "wonderland", false}, // a password needs a username to check it against
			{"", "", anon},
			{"long", long, true},
			// bcrypt ignores bytes past the 72nd: a longer password must
			// not pass for the stored one.
			{"long", long + "x", false},
		} {
			cl := &mqtt.Client{ID: "dev"}
			if got := h.OnConnectAuthenticate(cl, connectPacket(tc.user, tc.pass)); got != tc.want {
				t.Errorf("anonymous allowed %v: user %q password %q: %v, want %v", anon, tc.user, tc.pass, got, tc.want)
			}
		}
	}
}

// An unknown user's password is compared with a dummy hash of the users'
// cost, so the answer takes as long as for a known user.
func TestAuthenticateUnknownUserTakesAsLong(t *testing.T) {
	h, err := bcrypt.GenerateFromPassword([]byte("pw"), 10)
	if err != nil {
		t.Fatal(err)
	}
	a, err := NewAuth(AuthConfig{CredentialsFile: writeFile(t, "passwd", "alice:"+string(h)+"\n")})
	if err != nil {
		t.Fatal(err)
	}
	if cost, _ := bcrypt.Cost(a.(*authHook).dummy); cost != 10 {
		t.Errorf("dummy hash cost %d, want the users' 10", cost)
	}
	timeOf := func(user string) time.Duration {
		best := time.Hour
		for range 3 {
			start := time.Now()
			a.OnConnectAuthenticate(&mqtt.Client{}, connectPacket(user, "wrong"))
			best = min(best, time.Since(start))
		}
		return best
	}
	known, unknown := timeOf("alice"), timeOf("nobody")
	if unknown < known/2 {
		t.Errorf("unknown user refused in %v, known user in %v: timing tells users apart", unknown, known)
	}
}

func TestACLAllowed(t *testing.T) {
	acl, err := parseACL(strings.NewReader(`
# every device: its own subtree, by client id and by username
allow readwrite devices/%c/#
deny  read      users/%u/private/#
allow readwrite users/%u/#
deny  read      secret/#
allow read      $SYS/broker/uptime

user admin
allow readwrite #

anonymous
allow read public/#
deny  write #

all
allow read shared/+/status
allow write telemetry/%c
`))
	if err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct {
		id, user, topic string
		write           bool
		want            bool
	}{
		{"d1", "", "devices/d1/temp", true, true},
		{"d1", "", "devices/d1", true, true},       // "a/#" matches "a"
		{"d1", "", "devices/d1/#", false, true},    // subscription inside the subtree
		{"d1", "", "devices/+/temp", false, false}, // reaches other devices' topics
		{"d1", "", "devices/d2/temp", true, false}, // another device's topic
		{"d1", "", "devices/#", false, false},      // wider than the rule
		{"d1", "", "$share/g/devices/d1/x", false, true},
		{"d1", "", "$share/g/devices/d2/x", false, false},
		{"d+", "", "devices/d+/temp", false, false}, // id would widen the pattern
		{"#", "", "devices/x", true, false},
		{"a/b", "", "devices/a/b/c", true, false},
		{"d\x00", "", "devices/d\x00/x", true, false},
		{"%u", "u1", "devices/%u/x", true, true}, // %u inside an id stays text
		{"%u", "u1", "devices/u1/x", true, false},

		{"d1", "u1", "users/u1/inbox", false, true},
		{"d1", "u1", "users/u1/private/x", false, false}, // deny before allow
		{"d1", "u1", "users/u1/private/x", true, true},   // the deny is read only
		{"d1", "u+", "users/u+/x", true, false},
		{"d1", "", "users//x", true, false}, // anonymous has no %u

		// A username that would widen a pattern: the allow rule does not
		// apply, and in the deny rule it stands for any one level.
		{"d1", "a/b", "users/a/b/inbox", false, false},
		{"d1", "a/b", "users/x/private/y", false, false},
		{"d1", "a/b", "users/x/y", false, false},

		{"d1", "u1", "secret/x", false, false},
		{"d1", "admin", "secret/x", false, false}, // the deny comes first
		{"d1", "admin", "anything/at/all", true, true},
		{"d1", "admin", "$SYS/broker/load", false, false}, // # does not reach $ topics
		{"d1", "u1", "$SYS/broker/uptime", false, true},

		{"d1", "", "public/news", false, true},
		{"d1", "", "public/news", true, false},
		{"d1", "u1", "public/news", false, false}, // the anonymous section only
		{"d1", "u1", "shared/x/status", false, true},
		{"d1", "u1", "shared/+/status", false, true},
		{"d1", "u1", "shared/#", false, false},
		{"d1", "u1", "telemetry/d1", true, true},
		{"d1", "", "telemetry/d1", true, false}, // anonymous: deny write # first
		{"d1", "u1", "nothing/here", true, false},
	} {
		if got := acl.allowed(tc.id, []byte(tc.user), tc.topic, tc.write); got != tc.want {
			t.Errorf("client %q user %q %s %q: %v, want %v", tc.id, tc.user, map[bool]string{true: "write", false: "read"}[tc.write], tc.topic, got, tc.want)
		}
	}
}

func TestACLCovers(t *testing.T) {
	for _, tc := range []struct {
		rule, filter string
		want         bool
	}{
		{"#", "a", true},
		{"#", "a/b/#", true},
		{"#", "$SYS/x", false},
		{"+/#", "$SYS/x", false},
		{"$SYS/#", "$SYS/x", true},
		{"a/+", "a/b", true},
		{"a/+", "a/+", true},
		{"a/+", "a/#", false},
		{"a/+", "a", false},
		{"a/+", "a/b/c", false},
		{"a/#", "a", true},
		{"a/#", "a/+/c", true},
		{"a/b", "a/+", false},
		{"a/b", "a/b", true},
		{"a/b", "a/b/c", false},
		{"a//b", "a//b", true},
		{"+", "+", true},
		{"+", "$x", false},
	} {
		acl, err := parseACL(strings.NewReader("allow read " + tc.rule))
		if err != nil {
			t.Fatal(err)
		}
		if got := acl.allowed("c", nil, tc.filter, false); got != tc.want {
			t.Errorf("rule %q covers %q: %v, want %v", tc.rule, tc.filter, got, tc.want)
		}
	}
}

// dial311 connects an MQTT 3.1.1 client with a username and password and
// returns the CONNACK's return code, as paho.mqtt.golang reports it.
func dial311(t *testing.T, addr netip.AddrPort, id, user, pass string, s *sink) (paho3.Client, byte) {
	t.Helper()
	opts := paho3.NewClientOptions().
		AddBroker("tcp://" + addr.String()).
		SetClientID(id).
		SetUsername(user).
		SetPassword(pass).
		SetProtocolVersion(4).
		SetCleanSession(false).
		SetAutoReconnect(false).
		SetConnectTimeout(waitFor)
	if s != nil {
		opts.SetDefaultPublishHandler(func(_ paho3.Client, m paho3.Message) {
			s.add(message{Topic: m.Topic(), Payload: string(m.Payload()), QoS: m.Qos(), Retain: m.Retained()})
		})
	}
	c := paho3.NewClient(opts)
	tok := c.Connect()
	if !tok.WaitTimeout(waitFor) {
		t.Fatalf("connect %s: no CONNACK", id)
	}
	t.Cleanup(func() {
		if c.IsConnectionOpen() {
			c.Disconnect(100)
		}
	})
	return c, tok.(*paho3.ConnectToken).ReturnCode()
}

// dial5 sends an MQTT 5 CONNECT and returns the CONNACK, whatever its
// reason code.
func dial5(t *testing.T, addr netip.AddrPort, cp *paho5.Connect) *paho5.Connack {
	t.Helper()
	conn, err := net.Dial("tcp", addr.String())
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	c := paho5.NewClient(paho5.ClientConfig{ClientID: cp.ClientID, Conn: conn})
	ctx, cancel := context.WithTimeout(context.Background(), waitFor)
	defer cancel()
	ca, err := c.Connect(ctx, cp)
	if ca == nil {
		t.Fatalf("connect %s: %v", cp.ClientID, err)
	}
	if ca.ReasonCode == 0 {
		_ = c.Disconnect(&paho5.Disconnect{})
	}
	return ca
}

const testACL = `
allow readwrite devices/%c/#
allow read      broadcast/#
user ops
allow readwrite #
`

// A real client with a wrong password gets the refusal MQTT defines for
// its version: 0x86 in MQTT 5, return code 5 (not authorized) in 3.1.1,
// which is mochi's mapping and also Mosquitto's answer.
func TestAuthRefusesOverTheWire(t *testing.T) {
	f := newRedisFleet(t)
	auth := newTestAuth(t, map[string]string{"dev": "s3cret", "ops": "ops"}, testACL, false)
	inst := f.start("s0", 0, 1, func(c *Config) { c.Auth = auth })

	for _, tc := range []struct{ user, pass string }{{"dev", "wrong"}, {"nobody", "s3cret"}, {"", ""}} {
		if _, rc := dial311(t, inst.Addr(), "d1", tc.user, tc.pass, nil); rc != packets.Err3NotAuthorized.Code {
			t.Errorf("3.1.1 user %q: return code %d, want 5", tc.user, rc)
		}
		ca := dial5(t, inst.Addr(), &paho5.Connect{ClientID: "d1", KeepAlive: 30, Username: tc.user, UsernameFlag: tc.user != "", Password: []byte(tc.pass), PasswordFlag: tc.pass != ""})
		if ca.ReasonCode != 0x86 {
			t.Errorf("5.0 user %q: CONNACK 0x%02x, want 0x86", tc.user, ca.ReasonCode)
		}
	}
	if _, rc := dial311(t, inst.Addr(), "d1", "dev", "s3cret", nil); rc != 0 {
		t.Errorf("3.1.1 good password: return code %d", rc)
	}
	ca := dial5(t, inst.Addr(), &paho5.Connect{ClientID: "d1", KeepAlive: 30, Username: "dev", UsernameFlag: true, Password: []byte("s3cret"), PasswordFlag: true})
	if ca.ReasonCode != 0 {
		t.Errorf("5.0 good password: CONNACK 0x%02x", ca.ReasonCode)
	}

	// A will on a topic the client may not publish to is refused too:
	// mochi would otherwise publish it without an ACL check.
	ca = dial5(t, inst.Addr(), &paho5.Connect{ClientID: "d1", KeepAlive: 30, Username: "dev", UsernameFlag: true, Password: []byte("s3cret"), PasswordFlag: true,
		WillMessage: &paho5.WillMessage{Topic: "devices/d2/status", Payload: []byte("gone")}})
	if ca.ReasonCode != 0x86 {
		t.Errorf("will on another device's topic: CONNACK 0x%02x, want 0x86", ca.ReasonCode)
	}
}

// A refused subscription gets SUBACK 0x87 (5.0) or 0x80 (3.1.1), is never
// stored in Redis, and so a standby that loads the session does not make
// it live. A refused QoS 1 publish gets PUBACK 0x87 (5.0) and reaches
// nobody.
func TestACLOverTheWire(t *testing.T) {
	f := newRedisFleet(t)
	users := map[string]string{"dev": "s3cret", "ops": "ops"}
	auth := newTestAuth(t, users, testACL, false)
	active := f.start("s0-a", 0, 1, func(c *Config) { c.Auth = auth })
	standby := f.start("s0-b", 0, 1, func(c *Config) { c.Auth = newTestAuth(t, users, testACL, false) })

	// ops reads everything, to see what gets through.
	opsSink := newSink()
	ops, rc := dial311(t, active.Addr(), "ops1", "ops", "ops", opsSink)
	if rc != 0 {
		t.Fatalf("ops: return code %d", rc)
	}
	subscribe311(t, ops, "#", 1)

	// 3.1.1: SUBACK 0x80 for the refused filter.
	d1, rc := dial311(t, active.Addr(), "d1", "dev", "s3cret", nil)
	if rc != 0 {
		t.Fatalf("d1: return code %d", rc)
	}
	tok := d1.SubscribeMultiple(map[string]byte{"devices/d1/cmd": 1, "devices/d2/cmd": 1}, nil)
	if !tok.WaitTimeout(waitFor) || tok.Error() != nil {
		t.Fatalf("subscribe: %v", tok.Error())
	}
	if codes := tok.(*paho3.SubscribeToken).Result(); codes["devices/d1/cmd"] != 1 || codes["devices/d2/cmd"] != 0x80 {
		t.Errorf("3.1.1 SUBACK %v, want devices/d1/cmd granted QoS 1, devices/d2/cmd 0x80", codes)
	}

	// 5.0: SUBACK 0x87 for the refused filter, PUBACK 0x87 for a refused
	// publish.
	d2Sink := newSink()
	d2, _, _ := client5(t, active.Addr(), &paho5.Connect{ClientID: "d2", KeepAlive: 30, CleanStart: true,
		Username: "dev", UsernameFlag: true, Password: []byte("s3cret"), PasswordFlag: true,
		Properties: &paho5.ConnectProperties{SessionExpiryInterval: ptr(uint32(300))}}, d2Sink)
	ctx, cancel := context.WithTimeout(context.Background(), waitFor)
	defer cancel()
	sa, err := d2.Subscribe(ctx, &paho5.Subscribe{Subscriptions: []paho5.SubscribeOptions{
		{Topic: "devices/d2/#", QoS: 1}, {Topic: "devices/#", QoS: 1}, {Topic: "broadcast/#", QoS: 1},
	}})
	if sa == nil {
		t.Fatalf("subscribe: %v", err)
	}
	if !slices.Equal(sa.Reasons, []byte{1, 0x87, 1}) {
		t.Errorf("5.0 SUBACK %#v, want [1 0x87 1]", sa.Reasons)
	}
	pr, err := d2.Publish(ctx, &paho5.Publish{Topic: "devices/d1/cmd", QoS: 1, Payload: []byte("forged")})
	if pr == nil || pr.ReasonCode != 0x87 {
		t.Errorf("refused publish: PUBACK %+v (%v), want reason 0x87", pr, err)
	}
	publish5(t, d2, &paho5.Publish{Topic: "devices/d2/state", QoS: 1, Payload: []byte("mine")})
	if got := ordered(opsSink.exactly(t, 1)); !slices.Equal(got, []string{"mine"}) {
		t.Errorf("ops received %v, want only [mine]", got)
	}

	// Only granted filters are in Redis.
	for id, want := range map[string][]string{"d1": {"devices/d1/cmd"}, "d2": {"broadcast/#", "devices/d2/#"}} {
		subs, err := f.rdb.HKeys(context.Background(), f.keys.clientKeys(id)[1]).Result()
		if err != nil {
			t.Fatal(err)
		}
		slices.Sort(subs)
		if !slices.Equal(subs, want) {
			t.Errorf("Redis stores %s's subscriptions %v, want %v", id, subs, want)
		}
	}

	// The standby takes d2's session over; what the active refused stays
	// refused there, even for a message ops may publish anywhere.
	_ = d2.Disconnect(&paho5.Disconnect{})
	if err := active.Close(); err != nil {
		t.Fatal(err)
	}
	s := newSink()
	_, _, ca := client5(t, standby.Addr(), &paho5.Connect{ClientID: "d2", KeepAlive: 30,
		Username: "dev", UsernameFlag: true, Password: []byte("s3cret"), PasswordFlag: true,
		Properties: &paho5.ConnectProperties{SessionExpiryInterval: ptr(uint32(300))}}, s)
	if !ca.SessionPresent {
		t.Fatal("session present = 0 on the standby")
	}
	ops2, rc := dial311(t, standby.Addr(), "ops2", "ops", "ops", nil)
	if rc != 0 {
		t.Fatalf("ops2: return code %d", rc)
	}
	publish311(t, ops2, "devices/d9/x", 1, false, "other device")
	publish311(t, ops2, "devices/d2/x", 1, false, "own")
	if got := ordered(s.exactly(t, 1)); !slices.Equal(got, []string{"own"}) {
		t.Errorf("d2 received %v on the standby, want only [own]", got)
	}
}

func ptr[T any](v T) *T { return &v }

func TestACLExpand(t *testing.T) {
	x := expansion{id: "d%u1", user: "bob"}
	for in, want := range map[string]string{
		"%c":        "d%u1", // one pass: the id's %u stays text
		"%u-%c":     "bob-d%u1",
		"100%":      "100%",
		"%x%c":      "%xd%u1",
		"plain":     "plain",
		"%%c":       "%%c",
		"a%ub%uc%c": "abobbbobcd%u1",
	} {
		if got := x.expand(in); got != want {
			t.Errorf("expand(%q) = %q, want %q", in, got, want)
		}
	}
}

// Whatever a client calls itself and whatever it asks for, a %c rule
// grants only its own subtree, and only to an id that is one plain level.
func FuzzACLOwnSubtree(f *testing.F) {
	acl, err := parseACL(strings.NewReader("deny write devices/%c/config\nallow readwrite devices/%c/#\n"))
	if err != nil {
		f.Fatal(err)
	}
	for _, s := range [][2]string{
		{"d1", "devices/d1/x"}, {"+", "devices/+/x"}, {"#", "devices/#"}, {"a/b", "devices/a/b/c"},
		{"d1", "$share/g/devices/d1/#"}, {"", "devices//x"}, {"d1", "devices/d1/config"}, {"%c", "devices/%c"},
	} {
		f.Add(s[0], s[1], false)
		f.Add(s[0], s[1], true)
	}
	f.Fuzz(func(t *testing.T, id, topic string, write bool) {
		if !acl.allowed(id, nil, topic, write) {
			return
		}
		if !plainLevel(id) {
			t.Fatalf("id %q (not a plain level) allowed %q", id, topic)
		}
		if !write {
			if _, f, ok := strings.Cut(strings.TrimPrefix(topic, "$share/"), "/"); ok && strings.HasPrefix(topic, "$share/") {
				topic = f
			}
		}
		own := "devices/" + id
		if topic != own && !strings.HasPrefix(topic, own+"/") {
			t.Fatalf("id %q allowed %q outside %s", id, topic, own)
		}
		if write && topic == own+"/config" {
			t.Fatalf("id %q allowed to write its config", id)
		}
	})
}
