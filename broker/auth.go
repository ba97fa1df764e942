package broker

import (
	"bufio"
	"crypto/rand"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"strings"

	mqtt "github.com/mochi-mqtt/server/v2"
	"github.com/mochi-mqtt/server/v2/packets"
	"golang.org/x/crypto/bcrypt"
)

// AuthConfig configures NewAuth. The file formats are described in
// docs/broker.md, "Authentication and ACLs".
type AuthConfig struct {
	// CredentialsFile holds one "username:bcrypt-hash" per line; blank
	// lines and lines starting with # are skipped. Default: no users, so
	// only anonymous clients can connect (AllowAnonymous).
	CredentialsFile string
	// ACLFile holds the topic rules. When set, whatever no rule allows is
	// denied. Default: every client that connects may publish and
	// subscribe to every topic.
	ACLFile string
	// AllowAnonymous lets clients that send neither a username nor a
	// password connect. Default false.
	AllowAnonymous bool
	// Log receives failed logins (never a password, at most its length).
	// Default: discard.
	Log *slog.Logger
}

// maxPasswordLen is bcrypt's limit: it ignores bytes past the 72nd, so a
// longer password would match every password sharing its first 72 bytes.
const maxPasswordLen = 72

// authHook is the hook NewAuth returns. It is immutable after NewAuth, so
// its checks need no lock.
type authHook struct {
	mqtt.HookBase
	users     map[string][]byte // username → bcrypt hash
	dummy     []byte            // hash compared for unknown users, so their answer takes as long
	anonymous bool
	acl       *aclRules // nil: allow every topic
	log       *slog.Logger
}

var _ mqtt.Hook = (*authHook)(nil)

// NewAuth reads the credentials and ACL files and returns the hook that
// authenticates clients (OnConnectAuthenticate) and checks their topics
// (OnACLCheck), for Config.Auth.
//
// A client that sends a username must give the password whose bcrypt hash
// the credentials file holds for it; one that sends neither is anonymous,
// and connects only with AllowAnonymous. A refused client gets CONNACK
// 0x86 (MQTT 5) or return code 5, not authorized (3.1.1: mochi maps it so,
// as Mosquitto answers).
func NewAuth(cfg AuthConfig) (mqtt.Hook, error) {
	h := &authHook{anonymous: cfg.AllowAnonymous, log: cfg.Log, users: map[string][]byte{}}
	if h.log == nil {
		h.log = slog.New(slog.DiscardHandler)
	}
	if cfg.CredentialsFile == "" && !cfg.AllowAnonymous {
		return nil, errors.New("broker: auth: no credentials file and anonymous clients not allowed: no client could connect")
	}
	cost := bcrypt.DefaultCost
	if cfg.CredentialsFile != "" {
		users, maxCost, err := readCredentials(cfg.CredentialsFile)
		if err != nil {
			return nil, err
		}
		h.users = users
		if maxCost > 0 {
			cost = maxCost
		}
	}
	// The dummy hash has the users' (highest) cost, so that checking an
	// unknown user costs what checking a known one does.
	secret := make([]byte, 32)
	_, _ = rand.Read(secret)
	dummy, err := bcrypt.GenerateFromPassword(secret, cost)
	if err != nil {
		return nil, fmt.Errorf("broker: auth: %w", err)
	}
	h.dummy = dummy
	if cfg.ACLFile != "" {
		if h.acl, err = readACL(cfg.ACLFile); err != nil {
			return nil, err
		}
	}
	return h, nil
}

// readCredentials parses a credentials file: "username:bcrypt-hash" lines.
// A bcrypt hash holds no ':', so the last one separates the two and a
// username may contain ':'.
func readCredentials(path string) (map[string][]byte, int, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, 0, fmt.Errorf("broker: auth: credentials: %w", err)
	}
	defer f.Close()
	users := make(map[string][]byte)
	maxCost := 0
	sc := bufio.NewScanner(f)
	for ln := 1; sc.Scan(); ln++ {
		line := strings.TrimSpace(sc.Text())
		if line == "" || strings.HasPrefix(line, "#") {
			continue
		}
		i := strings.LastIndexByte(line, ':')
		if i <= 0 {
			return nil, 0, fmt.Errorf("broker: auth: %s:%d: want username:bcrypt-hash", path, ln)
		}
		user, hash := line[:i], []byte(line[i+1:])
		// Cost parses the hash, so a mangled one is caught here rather than
		// at every login of its user.
		cost, err := bcrypt.Cost(hash)
		if err != nil {
			return nil, 0, fmt.Errorf("broker: auth: %s:%d: user %q: not a bcrypt hash: %w", path, ln, user, err)
		}
		if _, dup := users[user]; dup {
			return nil, 0, fmt.Errorf("broker: auth: %s:%d: user %q listed twice", path, ln, user)
		}
		users[user] = hash
		maxCost = max(maxCost, cost)
	}
	if err := sc.Err(); err != nil {
		return nil, 0, fmt.Errorf("broker: auth: credentials %s: %w", path, err)
	}
	return users, maxCost, nil
}

// ID implements mqtt.Hook.
func (h *authHook) ID() string { return "shardgate-auth" }

// Provides implements mqtt.Hook.
func (h *authHook) Provides(b byte) bool {
	return b == mqtt.OnConnectAuthenticate || b == mqtt.OnACLCheck
}

// OnConnectAuthenticate implements mqtt.Hook.
func (h *authHook) OnConnectAuthenticate(cl *mqtt.Client, pk packets.Packet) bool {
	user, pass := pk.Connect.Username, pk.Connect.Password
	hasUser := pk.Connect.UsernameFlag || len(user) > 0
	hasPass := pk.Connect.PasswordFlag || len(pass) > 0
	switch {
	case !hasUser && !hasPass:
		if !h.anonymous {
			h.refused(cl, "anonymous clients not allowed", pk)
			return false
		}
	case !hasUser:
		// MQTT 5 allows a password without a username (5.0 §3.1.2.9);
		// there is no user to check it against.
		h.refused(cl, "password without username", pk)
		return false
	default:
		hash, known := h.users[string(user)]
		if !known {
			hash = h.dummy
		}
		// Compare even for an unknown user or an overlong password, so
		// that the time taken does not tell which usernames exist.
		match := bcrypt.CompareHashAndPassword(hash, pass) == nil
		if !known || !match || len(pass) > maxPasswordLen {
			h.refused(cl, "bad username or password", pk)
			return false
		}
	}
	// mochi does not check the will topic against the ACL; a client must
	// not publish, through its will, where it may not publish itself.
	if pk.Connect.WillFlag && !h.allowed(cl, pk.Connect.WillTopic, true) {
		h.refused(cl, "will topic not allowed", pk)
		return false
	}
	return true
}

// refused logs a refused connection, with the password's length only.
func (h *authHook) refused(cl *mqtt.Client, why string, pk packets.Packet) {
	h.log.Info("client refused", "reason", why, "client", cl.ID, "remote", cl.Net.Remote,
		"username", string(pk.Connect.Username), "password_len", len(pk.Connect.Password))
}

// OnACLCheck implements mqtt.Hook. write is a PUBLISH's topic; otherwise
// topic is a SUBSCRIBE's filter, or the topic of a message about to be
// delivered to the client (mochi checks both).
func (h *authHook) OnACLCheck(cl *mqtt.Client, topic string, write bool) bool {
	// The embedding program's and the bus's inline clients are the broker
	// itself.
	if cl.Net.Inline {
		return true
	}
	return h.allowed(cl, topic, write)
}

// allowed checks topic against the ACL; ParseConnect has set the client's
// id and username by the time any hook runs.
func (h *authHook) allowed(cl *mqtt.Client, topic string, write bool) bool {
	if h.acl == nil {
		return true
	}
	return h.acl.allowed(cl.ID, cl.Properties.Username, topic, write)
}

// aclSection says which clients a rule is for.
type aclSection int

const (
	sectionAll       aclSection = iota // every client
	sectionUser                        // the clients logged in as one username
	sectionAnonymous                   // clients without a username
)

// aclRule is one "allow|deny read|write|readwrite <filter>" line.
type aclRule struct {
	section     aclSection
	user        string // sectionUser's username
	allow       bool
	read, write bool
	levels      []string   // the filter's levels, %c and %u unexpanded
	templated   []template // which placeholders each level holds
	holds       template   // every placeholder the filter holds
}

// template says which placeholders a rule's level holds.
type template uint8

const (
	holdsClient   template = 1 << iota // %c
	holdsUsername                      // %u
)

// aclRules is a parsed ACL file: rules in file order, first match wins,
// and no match denies.
type aclRules struct{ rules []aclRule }

// readACL parses an ACL file (format in docs/broker.md).
func readACL(path string) (*aclRules, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, fmt.Errorf("broker: auth: ACL: %w", err)
	}
	defer f.Close()
	acl, err := parseACL(f)
	if err != nil {
		return nil, fmt.Errorf("broker: auth: %s:%w", path, err)
	}
	return acl, nil
}

// parseACL parses an ACL file's text; errors start with the line number.
func parseACL(r io.Reader) (*aclRules, error) {
	acl := new(aclRules)
	section, user := sectionAll, ""
	sc := bufio.NewScanner(r)
	for ln := 1; sc.Scan(); ln++ {
		line := strings.TrimSpace(sc.Text())
		if line == "" || strings.HasPrefix(line, "#") {
			continue
		}
		word, rest, _ := strings.Cut(line, " ")
		rest = strings.TrimSpace(rest)
		switch word {
		case "all", "anonymous":
			if rest != "" {
				return nil, fmt.Errorf("%d: %q takes no argument", ln, word)
			}
			section, user = sectionAll, ""
			if word == "anonymous" {
				section = sectionAnonymous
			}
			continue
		case "user":
			if rest == "" {
				return nil, fmt.Errorf("%d: user: want a username", ln)
			}
			section, user = sectionUser, rest
			continue
		case "allow", "deny":
		default:
			return nil, fmt.Errorf("%d: %q: want allow, deny, user, anonymous or all", ln, word)
		}
		access, filter, _ := strings.Cut(rest, " ")
		filter = strings.TrimSpace(filter)
		rule := aclRule{section: section, user: user, allow: word == "allow"}
		switch access {
		case "read":
			rule.read = true
		case "write":
			rule.write = true
		case "readwrite":
			rule.read, rule.write = true, true
		default:
			return nil, fmt.Errorf("%d: %q: want read, write or readwrite", ln, access)
		}
		if err := validRuleFilter(filter); err != nil {
			return nil, fmt.Errorf("%d: filter %q: %w", ln, filter, err)
		}
		rule.levels = strings.Split(filter, "/")
		rule.templated = make([]template, len(rule.levels))
		for i, l := range rule.levels {
			if strings.Contains(l, "%c") {
				rule.templated[i] |= holdsClient
			}
			if strings.Contains(l, "%u") {
				rule.templated[i] |= holdsUsername
			}
			rule.holds |= rule.templated[i]
		}
		acl.rules = append(acl.rules, rule)
	}
	if err := sc.Err(); err != nil {
		return nil, err
	}
	return acl, nil
}

// validRuleFilter checks a rule's filter as MQTT checks a subscription's
// [MQTT-4.7.1-1] [MQTT-4.7.1-2], with %c and %u standing for one level's
// text.
func validRuleFilter(filter string) error {
	if filter == "" {
		return errors.New("empty")
	}
	if strings.ContainsRune(filter, 0) {
		return errors.New("holds U+0000")
	}
	levels := strings.Split(filter, "/")
	for i, l := range levels {
		if strings.Contains(l, "#") && (l != "#" || i != len(levels)-1) {
			return errors.New("# must be a whole level, the last")
		}
		if strings.Contains(l, "+") && l != "+" {
			return errors.New("+ must be a whole level")
		}
	}
	return nil
}

// allowed reports whether the client (id, username; none for anonymous)
// may write (publish to) or read (subscribe to, receive from) topic: a
// PUBLISH's topic name, a SUBSCRIBE's filter, or the topic of a message
// being delivered.
func (a *aclRules) allowed(id string, username []byte, topic string, write bool) bool {
	anonymous := len(username) == 0
	user := string(username)
	// A shared subscription is checked on its filter: the group name is
	// no part of what the client reads [MQTT-4.8.2-1].
	if !write && strings.HasPrefix(topic, "$share/") {
		if _, f, ok := strings.Cut(topic[len("$share/"):], "/"); ok {
			topic = f
		}
	}
	want := strings.Split(topic, "/")
	x := expansion{id: id, user: user}
	if !plainLevel(id) {
		x.bad |= holdsClient
	}
	if !plainLevel(user) {
		x.bad |= holdsUsername
	}
	for i := range a.rules {
		r := &a.rules[i]
		switch {
		case r.section == sectionUser && (anonymous || r.user != user),
			r.section == sectionAnonymous && !anonymous,
			write && !r.write,
			!write && !r.read:
			continue
		}
		// A client id or username that is not one plain level ("+", "#",
		// "a/b", none) would widen the pattern it is put into: an allow
		// rule does not apply to such a client; in a deny rule its levels
		// match any one level (covers), so the rule denies at least what
		// it would deny a well-named client.
		if r.allow && r.holds&x.bad != 0 {
			continue
		}
		if r.covers(want, x) {
			return r.allow
		}
	}
	return false
}

// expansion puts a client's id and username into a rule's levels.
type expansion struct {
	id, user string
	bad      template // the placeholders whose value is not one plain level
}

// expand returns level with %c and %u replaced, in one pass, so that a
// "%u" inside the client id stays text.
func (x expansion) expand(level string) string {
	var b strings.Builder
	for {
		i := strings.IndexByte(level, '%')
		if i < 0 || i == len(level)-1 {
			b.WriteString(level)
			return b.String()
		}
		b.WriteString(level[:i])
		switch level[i+1] {
		case 'c':
			b.WriteString(x.id)
		case 'u':
			b.WriteString(x.user)
		default:
			b.WriteString(level[i : i+2])
		}
		level = level[i+2:]
	}
}

// plainLevel reports whether s can stand in a topic level as text only.
func plainLevel(s string) bool {
	return s != "" && !strings.ContainsAny(s, "+#/\x00")
}

// covers reports whether every topic that filter (split into levels)
// matches, the rule's filter matches too; for a topic name (no wildcards)
// that is plain MQTT matching. Wildcards at the first level do not match
// topics starting with "$" [MQTT-4.7.2-1].
func (r *aclRule) covers(filter []string, x expansion) bool {
	dollar := len(filter) > 0 && strings.HasPrefix(filter[0], "$")
	for i := 0; ; i++ {
		if i == len(r.levels) {
			return i == len(filter)
		}
		rl := r.levels[i]
		switch t := r.templated[i]; {
		case t&x.bad != 0:
			rl = "+"
		case t != 0:
			rl = x.expand(rl)
		}
		if rl == "#" {
			// "a/#" also matches "a" [MQTT-4.7.1-2].
			return !(i == 0 && dollar)
		}
		if i == len(filter) {
			return false
		}
		fl := filter[i]
		switch {
		case fl == "#":
			return false
		case rl == "+":
			if i == 0 && dollar {
				return false
			}
		case fl != rl:
			return false
		}
	}
}
