package broker

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"math"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/mochi-mqtt/server/v2/packets"
	"github.com/redis/go-redis/v9"
)

// RedisSessions is the SessionStore of a networked fleet, and the store of
// the sessions' state, so that a session moves with its device from one
// instance to another (a drain to the shard's standby, a dead active
// instance, a routing change).
//
// Ownership. A client's session hash records the instance that holds the
// session and a generation, incremented by every claim. A claim notifies
// the previous holder on its takeover channel, with the new generation; the
// holder ends its copy unless it has claimed the session again since. Every
// write of session state names the generation it belongs to and is refused
// by Redis (atomically, in a script) once another claim has happened: an
// instance that lost a session can no longer change it, whatever the timing
// of the notification.
//
// State. Only granted subscriptions are stored (the hook writes what the
// SUBACK granted), with the queued and in-flight QoS 1/2 messages in the
// order they were queued, the session expiry interval and the time the
// device disconnected, so that a session expires on time whichever instance
// loads it. A disconnected session's keys carry a Redis TTL at its expiry,
// so a session nobody comes back for leaves nothing behind; one that ends
// (clean session, expiry) is deleted at once.
type RedisSessions struct {
	rdb     redis.UniversalClient
	keys    keyspace
	timeout time.Duration
	log     *slog.Logger

	mu      sync.Mutex
	claims  map[string]map[string]int64 // instance → client id → generation of its claim
	watches map[string]*takeoverWatch   // instance → its takeover subscription
}

var _ SessionStore = (*RedisSessions)(nil)

// NewRedisSessions returns a store on rdb. The caller owns rdb; Close the
// store's watches (the cancel functions Watch returns) before closing it.
func NewRedisSessions(rdb redis.UniversalClient, opts RedisOptions) *RedisSessions {
	opts = opts.withDefaults()
	return &RedisSessions{
		rdb:     rdb,
		keys:    keyspace{opts.KeyPrefix},
		timeout: opts.Timeout,
		log:     opts.Log,
		claims:  make(map[string]map[string]int64),
		watches: make(map[string]*takeoverWatch),
	}
}

// errFenced is returned by a state write that Redis refused because another
// claim has happened since the writer's: the session has moved on.
var errFenced = errors.New("broker: session claimed by another connection")

// claimScript makes ARGV[1] the holder of the session, increments the
// generation, and notifies the previous holder on its takeover channel
// (ARGV[2] .. holder) with "<generation>:<client id>".
var claimScript = redis.NewScript(`
local prev = redis.call('HGET', KEYS[1], 'owner')
redis.call('HSET', KEYS[1], 'owner', ARGV[1])
local gen = redis.call('HINCRBY', KEYS[1], 'gen', 1)
if prev and prev ~= ARGV[1] then
  redis.call('PUBLISH', ARGV[2] .. prev, gen .. ':' .. ARGV[3])
end
return {prev or '', gen}
`)

// Claim implements SessionStore. It returns once the previous holder has
// been notified (a Redis PUBLISH); the previous holder ends its copy
// asynchronously, and can no longer write the session's state from the
// moment Claim returns.
func (s *RedisSessions) Claim(ctx context.Context, clientID, instance string) (string, error) {
	s.setClaim(instance, clientID, 0)
	res, err := claimScript.Run(ctx, s.rdb, s.keys.clientKeys(clientID)[:1],
		instance, s.keys.takeoverPrefix(), clientID).Slice()
	if err != nil {
		return "", fmt.Errorf("claim session %q: %w", clientID, err)
	}
	prev, _ := res[0].(string)
	gen, _ := res[1].(int64)
	s.setClaim(instance, clientID, gen)
	if prev == instance {
		prev = ""
	}
	return prev, nil
}

// setClaim records the generation of instance's claim on clientID; 0
// forgets it.
func (s *RedisSessions) setClaim(instance, clientID string, gen int64) {
	s.mu.Lock()
	defer s.mu.Unlock()
	m := s.claims[instance]
	if gen == 0 {
		delete(m, clientID)
		return
	}
	if m == nil {
		m = make(map[string]int64)
		s.claims[instance] = m
	}
	m[clientID] = gen
}

// generation returns the generation of instance's current claim on
// clientID, and whether it has one.
func (s *RedisSessions) generation(instance, clientID string) (int64, bool) {
	s.mu.Lock()
	defer s.mu.Unlock()
	gen, ok := s.claims[instance][clientID]
	return gen, ok
}

// releaseScript deletes the session if ARGV[1] holds it with generation
// ARGV[2] ("" matches any generation).
var releaseScript = redis.NewScript(`
if redis.call('HGET', KEYS[1], 'owner') ~= ARGV[1] then return 0 end
if ARGV[2] ~= '' and redis.call('HGET', KEYS[1], 'gen') ~= ARGV[2] then return 0 end
redis.call('DEL', KEYS[1], KEYS[2], KEYS[3], KEYS[4])
return 1
`)

// Release implements SessionStore: the session has ended (clean session,
// Session Expiry Interval 0 at disconnect, or expiry), so its state is
// deleted, unless another connection has claimed it since.
func (s *RedisSessions) Release(ctx context.Context, clientID, instance string) error {
	gen, ok := s.generation(instance, clientID)
	s.setClaim(instance, clientID, 0)
	g := ""
	if ok {
		g = strconv.FormatInt(gen, 10)
	}
	if err := releaseScript.Run(ctx, s.rdb, s.keys.clientKeys(clientID), instance, g).Err(); err != nil {
		return fmt.Errorf("release session %q: %w", clientID, err)
	}
	return nil
}

// takeoverWatch is one instance's subscription to its takeover channel.
type takeoverWatch struct {
	ps   *redis.PubSub
	done chan struct{}
}

// Watch implements SessionStore. The subscription is made before Watch
// returns when Redis answers in time; otherwise go-redis keeps trying in
// the background.
func (s *RedisSessions) Watch(instance string, taken func(clientID string)) func() {
	ctx, cancel := callCtx(s.timeout)
	ps := s.rdb.Subscribe(ctx, s.keys.takeoverPrefix()+instance)
	if _, err := ps.Receive(ctx); err != nil {
		s.log.Warn("subscribe to takeover channel", "instance", instance, "error", err)
	}
	cancel()
	w := &takeoverWatch{ps: ps, done: make(chan struct{})}
	s.mu.Lock()
	if old := s.watches[instance]; old != nil {
		_ = old.ps.Close()
	}
	s.watches[instance] = w
	s.mu.Unlock()
	go s.takeoverLoop(instance, w, taken)
	return func() {
		_ = ps.Close()
		<-w.done
		s.mu.Lock()
		if s.watches[instance] == w {
			delete(s.watches, instance)
		}
		s.mu.Unlock()
	}
}

// takeoverLoop runs taken for each claim of a session that instance holds.
func (s *RedisSessions) takeoverLoop(instance string, w *takeoverWatch, taken func(string)) {
	defer close(w.done)
	for msg := range w.ps.Channel(redis.WithChannelSize(1024)) {
		genStr, clientID, ok := strings.Cut(msg.Payload, ":")
		gen, err := strconv.ParseInt(genStr, 10, 64)
		if !ok || err != nil {
			s.log.Warn("malformed takeover notification", "instance", instance, "payload", msg.Payload)
			continue
		}
		s.mu.Lock()
		mine, held := s.claims[instance][clientID]
		stale := held && mine > gen // this instance has claimed the session again since
		if !stale {
			delete(s.claims[instance], clientID)
		}
		s.mu.Unlock()
		if !stale {
			taken(clientID)
		}
	}
}

// storedSession is a session loaded from Redis.
type storedSession struct {
	// Present: a session existed and had not expired [MQTT-3.2.2-3].
	Present  bool
	Subs     []packets.Subscription
	Messages []packets.Packet // in the order they were queued
	Order    []uint16         // the packet ids of the stored messages, in that order
}

// openScript runs when a client connects, after its claim. It decides
// whether the stored session survives (not expired, no clean start), marks
// the session connected with its new expiry interval, and returns the
// subscriptions, the message order and the messages (only the order when
// not loading).
//
// KEYS: session, subs, queue, order. ARGV: generation, clean (1/0),
// persistent (1/0), expiry interval in s, now in ms, load (1/0).
var openScript = redis.NewScript(`
if redis.call('HGET', KEYS[1], 'gen') ~= ARGV[1] then return false end
local exp = redis.call('HGET', KEYS[1], 'exp')
local disc = tonumber(redis.call('HGET', KEYS[1], 'disc') or '0')
local present = exp ~= false
if present and disc > 0 and disc + tonumber(exp) * 1000 < tonumber(ARGV[5]) then
  present = false
end
if ARGV[2] == '1' or not present then
  redis.call('DEL', KEYS[2], KEYS[3], KEYS[4])
  present = false
end
redis.call('HDEL', KEYS[1], 'disc', 'until')
if ARGV[3] == '1' then
  redis.call('HSET', KEYS[1], 'exp', ARGV[4])
else
  redis.call('HDEL', KEYS[1], 'exp')
end
for i = 1, 4 do redis.call('PERSIST', KEYS[i]) end
if not present then return {0} end
if ARGV[6] ~= '1' then return {1, {}, redis.call('ZRANGE', KEYS[4], 0, -1), {}} end
return {1, redis.call('HGETALL', KEYS[2]), redis.call('ZRANGE', KEYS[4], 0, -1), redis.call('HGETALL', KEYS[3])}
`)

// openOptions says how a connecting client treats its stored session.
type openOptions struct {
	Clean      bool   // CleanSession / Clean Start: discard the stored session [MQTT-3.1.2-4]
	Persistent bool   // the new session outlives the connection
	Expiry     uint32 // its Session Expiry Interval, s
	Load       bool   // return the stored state (false: the instance has it in memory)
}

// open marks clientID's session connected on instance and returns what
// survives of the stored one.
func (s *RedisSessions) open(ctx context.Context, instance, clientID string, o openOptions) (*storedSession, error) {
	gen, ok := s.generation(instance, clientID)
	if !ok {
		return nil, errFenced
	}
	res, err := openScript.Run(ctx, s.rdb, s.keys.clientKeys(clientID),
		gen, flag(o.Clean), flag(o.Persistent), o.Expiry, time.Now().UnixMilli(), flag(o.Load)).Slice()
	if errors.Is(err, redis.Nil) {
		return nil, errFenced
	}
	if err != nil {
		return nil, fmt.Errorf("open session %q: %w", clientID, err)
	}
	out := &storedSession{Present: res[0].(int64) == 1}
	if !out.Present || len(res) < 4 {
		return out, nil
	}

	subs, _ := res[1].([]any)
	for i := 1; i < len(subs); i += 2 {
		b, _ := subs[i].(string)
		sub, err := decodeSubscription([]byte(b))
		if err != nil {
			s.log.Warn("skip stored subscription", "client", clientID, "error", err)
			continue
		}
		out.Subs = append(out.Subs, sub)
	}

	order, _ := res[2].([]any)
	queue, _ := res[3].([]any)
	byID := make(map[string]string, len(queue)/2)
	for i := 1; i < len(queue); i += 2 {
		id, _ := queue[i-1].(string)
		b, _ := queue[i].(string)
		byID[id] = b
	}
	now := time.Now().Unix()
	for _, v := range order {
		id, _ := v.(string)
		if n, err := strconv.ParseUint(id, 10, 16); err == nil {
			out.Order = append(out.Order, uint16(n))
		}
		b, ok := byID[id]
		if !ok {
			continue
		}
		pk, err := decodeMessage([]byte(b))
		if err != nil {
			s.log.Warn("skip stored message", "client", clientID, "packet_id", id, "error", err)
			continue
		}
		if pk.FixedHeader.Type == packets.Publish && expired(pk, now) {
			continue // [MQTT-3.3.2-5]
		}
		out.Messages = append(out.Messages, pk)
	}
	return out, nil
}

func flag(b bool) string {
	if b {
		return "1"
	}
	return "0"
}

// saveSubsScript stores subscriptions. KEYS: session, subs. ARGV:
// generation, then filter and encoded subscription pairs.
var saveSubsScript = redis.NewScript(`
if redis.call('HGET', KEYS[1], 'gen') ~= ARGV[1] then return false end
for i = 2, #ARGV, 2 do redis.call('HSET', KEYS[2], ARGV[i], ARGV[i+1]) end
return 1
`)

// saveSubs stores granted subscriptions of clientID's session.
func (s *RedisSessions) saveSubs(ctx context.Context, instance, clientID string, subs []packets.Subscription) error {
	gen, ok := s.generation(instance, clientID)
	if !ok {
		return errFenced
	}
	args := []any{gen}
	for _, sub := range subs {
		b, err := encodeSubscription(sub)
		if err != nil {
			return err
		}
		args = append(args, sub.Filter, b)
	}
	return s.fenced(saveSubsScript.Run(ctx, s.rdb, s.keys.clientKeys(clientID)[:2], args...).Err(), "save subscriptions", clientID)
}

// dropSubsScript removes subscriptions. KEYS: session, subs. ARGV:
// generation, then filters.
var dropSubsScript = redis.NewScript(`
if redis.call('HGET', KEYS[1], 'gen') ~= ARGV[1] then return false end
for i = 2, #ARGV do redis.call('HDEL', KEYS[2], ARGV[i]) end
return 1
`)

// dropSubs removes subscriptions from clientID's session.
func (s *RedisSessions) dropSubs(ctx context.Context, instance, clientID string, filters []string) error {
	gen, ok := s.generation(instance, clientID)
	if !ok {
		return errFenced
	}
	args := []any{gen}
	for _, f := range filters {
		args = append(args, f)
	}
	return s.fenced(dropSubsScript.Run(ctx, s.rdb, s.keys.clientKeys(clientID)[:2], args...).Err(), "drop subscriptions", clientID)
}

// saveMessageScript stores a queued or in-flight message under its packet
// id. A new id takes the next place in the session's order; a stored id
// (PUBLISH → PUBREL) keeps its place. A disconnected session's expiry
// (the 'until' field) applies to the queue keys, which may be new.
//
// KEYS: session, queue, order. ARGV: generation, packet id, message.
var saveMessageScript = redis.NewScript(`
if redis.call('HGET', KEYS[1], 'gen') ~= ARGV[1] then return false end
if redis.call('ZSCORE', KEYS[3], ARGV[2]) == false then
  local seq = redis.call('HINCRBY', KEYS[1], 'seq', 1)
  redis.call('ZADD', KEYS[3], seq, ARGV[2])
end
redis.call('HSET', KEYS[2], ARGV[2], ARGV[3])
local untl = redis.call('HGET', KEYS[1], 'until')
if untl then
  redis.call('PEXPIREAT', KEYS[2], untl)
  redis.call('PEXPIREAT', KEYS[3], untl)
end
return 1
`)

// saveMessage stores a queued or in-flight message of clientID's session.
func (s *RedisSessions) saveMessage(ctx context.Context, instance, clientID string, pk packets.Packet) error {
	gen, ok := s.generation(instance, clientID)
	if !ok {
		return errFenced
	}
	b, err := encodeMessage(pk)
	if err != nil {
		return err
	}
	keys := s.keys.clientKeys(clientID)
	err = saveMessageScript.Run(ctx, s.rdb, []string{keys[0], keys[2], keys[3]}, gen, pk.PacketID, b).Err()
	return s.fenced(err, "save message", clientID)
}

// dropMessageScript removes a message. KEYS: session, queue, order. ARGV:
// generation, packet id.
var dropMessageScript = redis.NewScript(`
if redis.call('HGET', KEYS[1], 'gen') ~= ARGV[1] then return false end
redis.call('HDEL', KEYS[2], ARGV[2])
redis.call('ZREM', KEYS[3], ARGV[2])
return 1
`)

// dropMessage removes a message whose QoS flow has completed or was
// abandoned.
func (s *RedisSessions) dropMessage(ctx context.Context, instance, clientID string, id uint16) error {
	gen, ok := s.generation(instance, clientID)
	if !ok {
		return errFenced
	}
	keys := s.keys.clientKeys(clientID)
	err := dropMessageScript.Run(ctx, s.rdb, []string{keys[0], keys[2], keys[3]}, gen, id).Err()
	return s.fenced(err, "drop message", clientID)
}

// disconnectScript records the disconnect time and expiry interval of a
// session that outlives its connection, and sets its keys to expire with
// it. KEYS: session, subs, queue, order. ARGV: generation, now in ms,
// expiry interval in s, expiry time in ms ("" never).
var disconnectScript = redis.NewScript(`
if redis.call('HGET', KEYS[1], 'gen') ~= ARGV[1] then return false end
redis.call('HSET', KEYS[1], 'disc', ARGV[2], 'exp', ARGV[3])
if ARGV[4] ~= '' then
  redis.call('HSET', KEYS[1], 'until', ARGV[4])
  for i = 1, 4 do redis.call('PEXPIREAT', KEYS[i], ARGV[4]) end
end
return 1
`)

// foreverExpiry is the Session Expiry Interval that never expires (MQTT 5.0
// §3.1.2.11.2), which mochi also gives 3.1.1 persistent sessions.
const foreverExpiry = math.MaxUint32

// disconnected records that clientID's persistent session lost its
// connection at 'at' and expires expiry seconds later.
func (s *RedisSessions) disconnected(ctx context.Context, instance, clientID string, at time.Time, expiry uint32) error {
	gen, ok := s.generation(instance, clientID)
	if !ok {
		return errFenced
	}
	until := ""
	if expiry != foreverExpiry {
		until = strconv.FormatInt(at.UnixMilli()+int64(expiry)*1000, 10)
	}
	err := disconnectScript.Run(ctx, s.rdb, s.keys.clientKeys(clientID), gen, at.UnixMilli(), expiry, until).Err()
	return s.fenced(err, "record disconnect", clientID)
}

// fenced turns a script's nil answer (generation mismatch) into errFenced
// and wraps other errors.
func (s *RedisSessions) fenced(err error, what, clientID string) error {
	switch {
	case err == nil:
		return nil
	case errors.Is(err, redis.Nil):
		return errFenced
	default:
		return fmt.Errorf("%s of %q: %w", what, clientID, err)
	}
}
