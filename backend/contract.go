package backend

import (
	"net/netip"

	"github.com/cespare/xxhash/v2"
)

// ContractVersion names the routing contract this package implements. Any
// change to the functions in this file, or to the instance selection in
// Snapshot.Route, moves devices between brokers across the whole fleet, so it
// needs a new version, new known-answer vectors and a new section in
// docs/routing-contract.md.
const ContractVersion = "v1"

// jumpMultiplier is the 64-bit linear congruential generator of the jump
// consistent hash paper (Lamping & Veach 2014, "A Fast, Minimal Memory,
// Consistent Hash Algorithm", figure 1).
const jumpMultiplier = 2862933555777941757

// KeyHash is the first half of contract v1: XXH64 with seed 0 of the raw key
// bytes (the client ID exactly as it appears in CONNECT, no normalisation).
func KeyHash(key []byte) uint64 {
	return xxhash.Sum64(key)
}

// JumpHash maps h to a bucket in [0, buckets) with the jump consistent hash,
// exactly as published: the arithmetic is IEEE 754 binary64, which is part of
// the contract (an all-integer variant differs on rare inputs). Growing
// buckets from n to n+1 moves about 1/(n+1) of keys, all of them into the new
// bucket. buckets < 1 returns -1.
func JumpHash(h uint64, buckets int) int {
	b, j := int64(-1), int64(0)
	for j < int64(buckets) {
		b = j
		h = h*jumpMultiplier + 1
		j = int64(float64(b+1) * (float64(int64(1)<<31) / float64((h>>33)+1)))
	}
	return int(b)
}

// ShardOf is the client ID → logical shard half of contract v1:
// JumpHash(KeyHash(clientID), shards). shards < 1 returns -1.
func ShardOf(clientID []byte, shards int) int {
	return JumpHash(KeyHash(clientID), shards)
}

// SourceKey is the routing key of a device that sent an empty client ID and
// is routed by its source address: the 4 bytes of an IPv4 address or the 16
// bytes of an IPv6 address, in network order. An IPv4-mapped IPv6 address
// (::ffff:a.b.c.d) is unmapped first, so a device has the same key on a
// dual-stack listener as on an IPv4 one; the IPv6 zone is ignored. The key
// goes through the contract in place of the client ID. An invalid (zero)
// address gives an empty key.
func SourceKey(addr netip.Addr) []byte {
	return AppendSourceKey(nil, addr)
}

// AppendSourceKey appends SourceKey(addr) to dst, for callers that keep a
// buffer.
func AppendSourceKey(dst []byte, addr netip.Addr) []byte {
	if !addr.IsValid() {
		return dst
	}
	addr = addr.Unmap()
	if addr.Is4() {
		b := addr.As4()
		return append(dst, b[:]...)
	}
	b := addr.As16()
	return append(dst, b[:]...)
}

// rendezvousPrefix returns the XXH64 state after instanceID + "\x00", the
// constant part of every rendezvous weight of one instance. Copying the state
// and feeding it the key is the same as hashing the concatenation.
func rendezvousPrefix(instanceID string) xxhash.Digest {
	var d xxhash.Digest
	d.Reset()
	d.WriteString(instanceID)
	d.Write([]byte{0})
	return d
}

// RendezvousWeight is the weight of an instance for a key in the rendezvous
// (highest random weight) hash of contract v1: XXH64, seed 0, of the
// instance ID, one zero byte, then the key. The instance with the highest
// weight wins; equal weights go to the smallest instance ID.
func RendezvousWeight(instanceID string, key []byte) uint64 {
	d := rendezvousPrefix(instanceID)
	d.Write(key)
	return d.Sum64()
}
