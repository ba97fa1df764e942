package broker

import (
	"context"
	"fmt"
	"log/slog"
	"strings"
	"time"

	"github.com/mochi-mqtt/server/v2/packets"
	"github.com/vmihailenco/msgpack/v5"
)

// RedisOptions configures the Redis side of a broker fleet (RedisBus and
// RedisSessions). Every instance of a fleet must use the same KeyPrefix.
// Redis 6.2 or later (SET … GET in a script); tested with 7.0. Every
// multi-key script touches the keys of one hash tag, so a Redis Cluster
// serves them too.
type RedisOptions struct {
	// KeyPrefix starts every key and channel name, so that several fleets
	// (or test runs) can share one Redis. Default "sg".
	KeyPrefix string
	// Timeout bounds each Redis call, on the connection path and off it.
	// Default 1 s.
	Timeout time.Duration
	// Heartbeat is how often a bus member renews its liveness key and
	// rechecks the fleet's route table; an instance whose key has not been
	// renewed for 3 heartbeats is dead, and its routes are removed.
	// Default 2 s.
	Heartbeat time.Duration
	// Log receives errors and notable events. Default: discard.
	Log *slog.Logger
}

// Defaults of RedisOptions.
const (
	DefaultKeyPrefix      = "sg"
	DefaultRedisTimeout   = time.Second
	DefaultRedisHeartbeat = 2 * time.Second
)

func (o RedisOptions) withDefaults() RedisOptions {
	if o.KeyPrefix == "" {
		o.KeyPrefix = DefaultKeyPrefix
	}
	if o.Timeout <= 0 {
		o.Timeout = DefaultRedisTimeout
	}
	if o.Heartbeat <= 0 {
		o.Heartbeat = DefaultRedisHeartbeat
	}
	if o.Log == nil {
		o.Log = slog.New(slog.DiscardHandler)
	}
	return o
}

// keyspace names every Redis key and channel of a fleet.
//
// A client's keys share the hash tag {c:<client id>}, and an instance's keys
// the tag {i:<instance id>}, so that each group sits in one Redis Cluster
// slot and the scripts that touch a group run there. A client id holding
// "}" ends its tag early; its keys still share one tag, which is all that
// matters. Keys and channels that concern the whole fleet (the instance
// registry, retained messages, route events) have no tag.
type keyspace struct{ prefix string }

// clientKeys returns the keys of one client's session, in the order the
// session scripts take them: the session hash (owner, generation, expiry,
// disconnect time), the subscriptions (filter → subscription), the queue of
// in-flight and queued messages (packet id → message), and their order
// (packet id scored by a per-session sequence).
func (k keyspace) clientKeys(clientID string) []string {
	tag := k.prefix + ":{c:" + clientID + "}:"
	return []string{tag + "session", tag + "subs", tag + "queue", tag + "order"}
}

// instanceKeys returns one instance's keys: its liveness key (with a TTL),
// its route set (the filters it has subscribers for) and the route set's
// version.
func (k keyspace) instanceKeys(instance string) []string {
	tag := k.prefix + ":{i:" + instance + "}:"
	return []string{tag + "alive", tag + "routes", tag + "rv"}
}

func (k keyspace) instances() string      { return k.prefix + ":instances" }
func (k keyspace) retained() string       { return k.prefix + ":retained" }
func (k keyspace) routeChannel() string   { return k.prefix + ":routes" }
func (k keyspace) takeoverPrefix() string { return k.prefix + ":takeover:" }
func (k keyspace) busChannel(instance string) string {
	return k.prefix + ":bus:" + instance
}

// validInstanceID reports whether id can name an instance: route events
// are lines of text, so it may hold no control characters.
func validInstanceID(id string) error {
	if id == "" {
		return fmt.Errorf("broker: instance id is empty")
	}
	if strings.ContainsFunc(id, func(r rune) bool { return r < 0x20 || r == 0x7f }) {
		return fmt.Errorf("broker: instance id %q holds a control character", id)
	}
	return nil
}

// callCtx returns a context bounded by the Redis timeout.
func callCtx(timeout time.Duration) (context.Context, context.CancelFunc) {
	return context.WithTimeout(context.Background(), timeout)
}

// wireMessage is a PUBLISH (or a QoS 2 state: PUBREC, PUBREL) as stored in
// Redis and carried between instances, msgpack-encoded with short field
// names. It keeps what a message needs to be delivered again: MQTT 5
// properties that travel with a message, the packet id of a stored message
// (QoS 2: the same id must be used again [MQTT-4.3.3-1]), and the expiry
// time.
type wireMessage struct {
	Type        byte            `msgpack:"y,omitempty"`
	QoS         byte            `msgpack:"q,omitempty"`
	Retain      bool            `msgpack:"r,omitempty"`
	PacketID    uint16          `msgpack:"i,omitempty"`
	Topic       string          `msgpack:"t,omitempty"`
	Payload     []byte          `msgpack:"p,omitempty"`
	Origin      string          `msgpack:"o,omitempty"`
	Created     int64           `msgpack:"c,omitempty"`
	Expiry      int64           `msgpack:"e,omitempty"`
	Reason      byte            `msgpack:"rc,omitempty"`
	Version     byte            `msgpack:"v,omitempty"`
	Format      *byte           `msgpack:"pf,omitempty"`
	MsgExpiry   uint32          `msgpack:"me,omitempty"`
	ContentType string          `msgpack:"ct,omitempty"`
	Response    string          `msgpack:"rt,omitempty"`
	Correlation []byte          `msgpack:"cd,omitempty"`
	SubIDs      []int           `msgpack:"si,omitempty"`
	User        []wireUserProps `msgpack:"u,omitempty"`
}

type wireUserProps struct {
	Key string `msgpack:"k"`
	Val string `msgpack:"v"`
}

func toWire(pk packets.Packet) wireMessage {
	w := wireMessage{
		Type:        pk.FixedHeader.Type,
		QoS:         pk.FixedHeader.Qos,
		Retain:      pk.FixedHeader.Retain,
		PacketID:    pk.PacketID,
		Topic:       pk.TopicName,
		Payload:     pk.Payload,
		Origin:      pk.Origin,
		Created:     pk.Created,
		Expiry:      pk.Expiry,
		Reason:      pk.ReasonCode,
		Version:     pk.ProtocolVersion,
		MsgExpiry:   pk.Properties.MessageExpiryInterval,
		ContentType: pk.Properties.ContentType,
		Response:    pk.Properties.ResponseTopic,
		Correlation: pk.Properties.CorrelationData,
		SubIDs:      pk.Properties.SubscriptionIdentifier,
	}
	if pk.Properties.PayloadFormatFlag {
		f := pk.Properties.PayloadFormat
		w.Format = &f
	}
	for _, u := range pk.Properties.User {
		w.User = append(w.User, wireUserProps{Key: u.Key, Val: u.Val})
	}
	return w
}

func (w wireMessage) packet() packets.Packet {
	pk := packets.Packet{
		FixedHeader: packets.FixedHeader{
			Type:   w.Type,
			Qos:    w.QoS,
			Retain: w.Retain,
		},
		PacketID:        w.PacketID,
		TopicName:       w.Topic,
		Payload:         w.Payload,
		Origin:          w.Origin,
		Created:         w.Created,
		Expiry:          w.Expiry,
		ReasonCode:      w.Reason,
		ProtocolVersion: w.Version,
		Properties: packets.Properties{
			MessageExpiryInterval:  w.MsgExpiry,
			ContentType:            w.ContentType,
			ResponseTopic:          w.Response,
			CorrelationData:        w.Correlation,
			SubscriptionIdentifier: w.SubIDs,
		},
	}
	if w.Format != nil {
		pk.Properties.PayloadFormat, pk.Properties.PayloadFormatFlag = *w.Format, true
	}
	for _, u := range w.User {
		pk.Properties.User = append(pk.Properties.User, packets.UserProperty{Key: u.Key, Val: u.Val})
	}
	return pk
}

func encodeMessage(pk packets.Packet) ([]byte, error) {
	return msgpack.Marshal(toWire(pk))
}

func decodeMessage(b []byte) (packets.Packet, error) {
	var w wireMessage
	if err := msgpack.Unmarshal(b, &w); err != nil {
		return packets.Packet{}, fmt.Errorf("decode message: %w", err)
	}
	return w.packet(), nil
}

// wireSubscription is a granted subscription as stored in Redis.
type wireSubscription struct {
	Filter         string `msgpack:"f"`
	QoS            byte   `msgpack:"q,omitempty"`
	NoLocal        bool   `msgpack:"nl,omitempty"`
	RetainAsPub    bool   `msgpack:"rap,omitempty"`
	RetainHandling byte   `msgpack:"rh,omitempty"`
	Identifier     int    `msgpack:"id,omitempty"`
}

func encodeSubscription(sub packets.Subscription) ([]byte, error) {
	return msgpack.Marshal(wireSubscription{
		Filter:         sub.Filter,
		QoS:            sub.Qos,
		NoLocal:        sub.NoLocal,
		RetainAsPub:    sub.RetainAsPublished,
		RetainHandling: sub.RetainHandling,
		Identifier:     sub.Identifier,
	})
}

func decodeSubscription(b []byte) (packets.Subscription, error) {
	var w wireSubscription
	if err := msgpack.Unmarshal(b, &w); err != nil {
		return packets.Subscription{}, fmt.Errorf("decode subscription: %w", err)
	}
	return packets.Subscription{
		Filter:            w.Filter,
		Qos:               w.QoS,
		NoLocal:           w.NoLocal,
		RetainAsPublished: w.RetainAsPub,
		RetainHandling:    w.RetainHandling,
		Identifier:        w.Identifier,
	}, nil
}

// expired reports whether a message's MQTT 5 Message Expiry Interval has
// passed [MQTT-3.3.2-5].
func expired(pk packets.Packet, now int64) bool {
	return pk.Expiry > 0 && pk.Expiry < now
}
