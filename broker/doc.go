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
// `shardgate demo`. A networked deployment (Start: one instance of one
// shard per process) fills the same interfaces with Redis: RedisBus (a
// per-instance route table, per-instance pub/sub channels, retained
// messages in one hash) and RedisSessions (ownership with generations, and
// the state of persistent sessions, written by the broker's own hook and
// loaded on demand when a device connects to an instance that does not
// hold its session, so a shard's standby takes over without loss).
package broker
