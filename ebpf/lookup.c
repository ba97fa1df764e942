//go:build ignore

// SK_LOOKUP program for VIP dispatch: a TCP connection to any address in a
// configured set of prefixes, on any port in a configured set of ports, goes
// to one listening socket (bound anywhere) without a socket bound to each
// address. Modelled on cloudflare/tubular's dispatcher. See lookup.go.

#include <linux/bpf.h>
#include <linux/in.h>
#include <bpf/bpf_helpers.h>

// Keep in sync with lookup.go.
#define MAX_PREFIXES 1024

enum {
	VIP_MATCHED,      // assigned to the listener
	VIP_NOT_VIP,      // destination outside the set: left to the kernel
	VIP_NO_SOCKET,    // in the set, but no listener in the sockmap
	VIP_ASSIGN_ERROR, // in the set, bpf_sk_assign refused the listener
	VIP_CNT_MAX,
};

// lookup_key: an LPM trie key over IPv6 addresses; IPv4 is stored mapped
// (::ffff:a.b.c.d), so an IPv4 /n prefix has prefixlen 96+n.
struct lookup_key {
	__u32 prefixlen;
	__u8 addr[16];
};

struct {
	__uint(type, BPF_MAP_TYPE_LPM_TRIE);
	__uint(max_entries, MAX_PREFIXES);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, struct lookup_key);
	__type(value, __u8);
} vip_prefixes SEC(".maps");

// vip_ports: a bitmap of the 65536 ports, 64 per entry.
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 65536 / 64);
	__type(key, __u32);
	__type(value, __u64);
} vip_ports SEC(".maps");

// vip_socket: the listener (key 0).
struct {
	__uint(type, BPF_MAP_TYPE_SOCKMAP);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, __u64);
} vip_socket SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, VIP_CNT_MAX);
	__type(key, __u32);
	__type(value, __u64);
} vip_counters SEC(".maps");

static __always_inline void count(__u32 which)
{
	__u64 *n = bpf_map_lookup_elem(&vip_counters, &which);
	if (n)
		(*n)++;
}

SEC("sk_lookup")
int vip_lookup(struct bpf_sk_lookup *ctx)
{
	if (ctx->protocol != IPPROTO_TCP)
		return SK_PASS;

	__u32 port = ctx->local_port; // host byte order
	__u32 word = port >> 6;
	__u64 *bits = bpf_map_lookup_elem(&vip_ports, &word);
	if (!bits || !(*bits & (1ULL << (port & 63)))) {
		count(VIP_NOT_VIP);
		return SK_PASS;
	}

	struct lookup_key key = {};
	if (ctx->family == 2 /* AF_INET */) {
		key.prefixlen = 96 + 32;
		key.addr[10] = 0xff;
		key.addr[11] = 0xff;
		__builtin_memcpy(&key.addr[12], &ctx->local_ip4, 4);
	} else if (ctx->family == 10 /* AF_INET6 */) {
		key.prefixlen = 128;
		__u32 ip6[4] = {ctx->local_ip6[0], ctx->local_ip6[1], ctx->local_ip6[2], ctx->local_ip6[3]};
		__builtin_memcpy(key.addr, ip6, 16);
	} else {
		return SK_PASS;
	}
	if (!bpf_map_lookup_elem(&vip_prefixes, &key)) {
		count(VIP_NOT_VIP);
		return SK_PASS;
	}

	__u32 zero = 0;
	struct bpf_sock *sk = bpf_map_lookup_elem(&vip_socket, &zero);
	if (!sk) {
		count(VIP_NO_SOCKET);
		return SK_PASS;
	}
	// REPLACE: when two generations have a VIP program attached, the one
	// attached last (the newer process) wins.
	long err = bpf_sk_assign(ctx, sk, BPF_SK_LOOKUP_F_REPLACE);
	bpf_sk_release(sk);
	if (err) {
		count(VIP_ASSIGN_ERROR);
		return SK_PASS;
	}
	count(VIP_MATCHED);
	return SK_PASS;
}

char __license[] SEC("license") = "Dual BSD/GPL";
