// Package broker is shardgate's sharded MQTT broker: an MQTT 3.1.1 and 5.0
// engine per shard (mochi-mqtt/server v2) made into one fleet by the
// project's own parts:
//
//   - a cross-shard Bus: each instance announces a route for every topic
//     filter it has local subscribers for; a publish is delivered locally,
//     then forwarded once to each other instance with a matching route (no
//     route, no traffic), injected there through an inline bridge client so
//     MQTT 5 properties survive and nothing is forwarded twice. Retained
//     messages are stored on every instance in one fleet-wide order; a
//     shared subscription group gets each message once fleet-wide;
//   - a SessionStore that keeps one session per client id across the
//     fleet: connecting to a second instance takes the session over and
//     closes the first connection [MQTT-3.1.4-3].
//
// The embedded mode (StartEmbedded) runs several shards in one process with
// the in-process implementations, LocalBus and MemorySessions, for
// `shardgate demo`. A networked deployment fills the same interfaces with
// Redis.
package broker
