//go:build ignore

// SK_REUSEPORT program for generation handover: every new connection (and
// every request migrating off a closing listener) goes to a listener of the
// ACTIVE generation. See steering.go.

#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>

// Keep in sync with steering.go.
#define MAX_PER_GEN 128
#define GENS 2

enum { CNT_SELECTIONS, CNT_MIGRATIONS, CNT_FALLBACKS, CNT_MAX };

// active_gen: which generation takes new connections, where its listeners
// sit in the sockarray (base .. base+count-1), and the process that owns
// them (user space only: the next generation tells it to stop accepting).
struct active_gen {
	__u32 gen;
	__u32 base;
	__u32 count;
	__u32 pid;
};

struct {
	__uint(type, BPF_MAP_TYPE_REUSEPORT_SOCKARRAY);
	__uint(max_entries, MAX_PER_GEN * GENS);
	__type(key, __u32);
	__type(value, __u64);
} listeners SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct active_gen);
} active SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, CNT_MAX);
	__type(key, __u32);
	__type(value, __u64);
} counters SEC(".maps");

static __always_inline void count(__u32 which)
{
	__u64 *c = bpf_map_lookup_elem(&counters, &which);
	if (c)
		(*c)++;
}

SEC("sk_reuseport/migrate")
int select_active(struct sk_reuseport_md *ctx)
{
	__u32 zero = 0;
	int migrating = ctx->migrating_sk != 0;
	struct active_gen *a = bpf_map_lookup_elem(&active, &zero);

	if (a && a->count > 0 && a->count <= MAX_PER_GEN && a->base <= MAX_PER_GEN * (GENS - 1)) {
		__u32 base = a->base, n = a->count;
		// Try the hashed slot, then the next ones: a listener of the
		// active generation that closed leaves its slot empty.
		for (__u32 i = 0; i < MAX_PER_GEN; i++) {
			if (i >= n)
				break;
			__u32 idx = base + (ctx->hash + i) % n;
			if (bpf_sk_select_reuseport(ctx, &listeners, &idx, 0) == 0) {
				count(migrating ? CNT_MIGRATIONS : CNT_SELECTIONS);
				return SK_PASS;
			}
		}
	}
	// No active generation (or none of its listeners is left): the
	// kernel's own reuseport hash picks, as without this program.
	count(CNT_FALLBACKS);
	return SK_PASS;
}

char _license[] SEC("license") = "Dual BSD/GPL";
