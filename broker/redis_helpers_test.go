package broker

import (
	"context"
	"fmt"
	"log/slog"
	"net/netip"
	"os"
	"sync/atomic"
	"testing"
	"time"

	paho3 "github.com/eclipse/paho.mqtt.golang"
	"github.com/redis/go-redis/v9"

	"github.com/shardgate/shardgate/internal/servertest"
)

// redisClient starts a real redis-server (Debian's) for the test and returns
// a client of it, failing the test (skipping it with -short) when
// redis-server is not installed.
func redisClient(t *testing.T) *redis.Client {
	t.Helper()
	srv := servertest.Redis(t, servertest.RedisOptions{})
	c := redis.NewClient(&redis.Options{Addr: srv.String()})
	t.Cleanup(func() { _ = c.Close() })
	return c
}

var prefixSeq atomic.Uint64

// redisFleet starts broker instances that share a test's key prefix.
type redisFleet struct {
	t      *testing.T
	rdb    *redis.Client
	prefix string
	keys   keyspace
}

func newRedisFleet(t *testing.T) *redisFleet {
	t.Helper()
	rdb := redisClient(t)
	prefix := fmt.Sprintf("t%d", prefixSeq.Add(1))
	return &redisFleet{t: t, rdb: rdb, prefix: prefix, keys: keyspace{prefix}}
}

// testHeartbeat keeps dead-instance detection within a test's patience.
const testHeartbeat = 100 * time.Millisecond

// start starts an instance on loopback; the test's cleanup closes it.
func (f *redisFleet) start(id string, shard, shards int, opts ...func(*Config)) *Instance {
	f.t.Helper()
	cfg := Config{
		InstanceID:     id,
		Shard:          shard,
		Shards:         shards,
		Listen:         "127.0.0.1:0",
		Redis:          f.rdb,
		RedisKeyPrefix: f.prefix,
		Heartbeat:      testHeartbeat,
		Log:            slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelWarn})).With("test", f.t.Name()),
	}
	for _, o := range opts {
		o(&cfg)
	}
	inst, err := Start(context.Background(), cfg)
	if err != nil {
		f.t.Fatalf("Start %s: %v", id, err)
	}
	f.t.Cleanup(func() {
		if err := inst.Close(); err != nil {
			f.t.Errorf("Close %s: %v", id, err)
		}
	})
	return inst
}

// waitRoute waits until every instance in on sees that instance routes
// filter: route announcements reach other instances asynchronously.
func waitRoute(t *testing.T, instance, filter string, on ...*Instance) {
	t.Helper()
	waitUntil(t, fmt.Sprintf("route %s → %s seen by %d instances", filter, instance, len(on)), func() bool {
		for _, i := range on {
			if !i.bus.hasRoute(instance, filter) {
				return false
			}
		}
		return true
	})
}

// connect311 connects an MQTT 3.1.1 client and returns whether the CONNACK
// said session present.
func connect311(t *testing.T, addr netip.AddrPort, id string, clean bool, s *sink) (paho3.Client, bool) {
	t.Helper()
	opts := paho3.NewClientOptions().
		AddBroker("tcp://" + addr.String()).
		SetClientID(id).
		SetProtocolVersion(4).
		SetCleanSession(clean).
		SetAutoReconnect(false).
		SetConnectTimeout(waitFor)
	if s != nil {
		opts.SetDefaultPublishHandler(func(_ paho3.Client, m paho3.Message) {
			s.add(message{Topic: m.Topic(), Payload: string(m.Payload()), QoS: m.Qos(), Retain: m.Retained()})
		})
	}
	c := paho3.NewClient(opts)
	tok := c.Connect()
	if !tok.WaitTimeout(waitFor) || tok.Error() != nil {
		t.Fatalf("connect %s to %s: %v", id, addr, tok.Error())
	}
	t.Cleanup(func() {
		if c.IsConnectionOpen() {
			c.Disconnect(100)
		}
	})
	return c, tok.(*paho3.ConnectToken).SessionPresent()
}

// ordered returns the payloads of msgs in the order received.
func ordered(msgs []message) []string {
	out := make([]string, len(msgs))
	for i, m := range msgs {
		out[i] = m.Payload
	}
	return out
}
