// Package backend is shardgate's routing contract and its backend sets.
//
// A device is routed in two steps, both pure functions of data every proxy
// shares, so that every proxy sends a client ID to the same broker:
//
//  1. client ID → logical shard: ShardOf, XXH64 (seed 0) of the client-ID
//     bytes, then jump consistent hash over the configured shard count;
//  2. shard → instance: the healthy instance of that shard with the lowest
//     Priority, ties broken by the smallest ID; a shard with no healthy
//     instance either rejects or spills by rendezvous hash (Policy).
//
// Without shard meta every instance is its own shard and devices are spread
// by rendezvous hashing over the healthy instances. The contract is versioned
// (ContractVersion) and written down in docs/routing-contract.md, precisely
// enough for another program to compute it; testdata/contract-v1.json pins it.
//
// A Snapshot is an immutable backend set with its routing tables; a Router
// holds the current one behind an atomic pointer, so the connection hot path
// (Router.Load().Route) never takes a lock and never allocates. A Source
// (Static here; Consul elsewhere) produces snapshots.
//
// This package imports nothing else from shardgate.
package backend
