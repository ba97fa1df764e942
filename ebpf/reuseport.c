//go:build ignore

// SK_REUSEPORT program for generation handover: every new connection (and
// every request migrating off a closing listener) goes to a listener of the
// ACTIVE generation. With workers (`proxy --workers N`), each listener slot
// names the worker process that owns it and the program picks, among the
// active generation's slots, one of the worker whose connection count is
// lowest (ties broken by the connection hash): a restarted, empty worker
// fills first. The program adds each of its choices to that worker's count,
// so a burst of connections between two updates from user space spreads
// instead of piling onto one worker. See steering.go and workers.go.

#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>

// Keep in sync with steering.go.
#define MAX_PER_GEN 128
#define GENS 2
#define MAX_WORKERS 64
// A worker whose load is this or more takes nothing (dead, being
// restarted). A range, not one value: the program's own increment (see
// select_active) can race with user space marking the worker dead, and
// LOAD_DEAD+1 must still read as dead, never wrap to an empty worker.
#define LOAD_DEAD 0x80000000

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

// slot_worker: worker index + 1 of the listener in each sockarray slot; 0
// means no worker (a single-process proxy): the hash alone picks.
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, MAX_PER_GEN * GENS);
	__type(key, __u32);
	__type(value, __u32);
} slot_worker SEC(".maps");

// worker_load: each worker's connections. The worker overwrites its entry
// with its true count once per loop tick (one word, not per packet), and
// the program adds 1 for every connection it steers there in between: the
// tick corrects the closes, the increments keep a burst spreading.
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, MAX_WORKERS);
	__type(key, __u32);
	__type(value, __u32);
} worker_load SEC(".maps");

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

struct scan {
	__u32 base, n, hash;
	__u32 best, best_load, best_worker;
};

static long scan_slot(__u32 i, void *data)
{
	struct scan *sc = data;
	if (sc->n == 0)
		return 1;
	__u32 idx = sc->base + (sc->hash + i) % sc->n;
	__u32 *w = bpf_map_lookup_elem(&slot_worker, &idx);
	if (!w || *w == 0 || *w > MAX_WORKERS)
		return 0;
	__u32 k = *w - 1;
	__u32 *load = bpf_map_lookup_elem(&worker_load, &k);
	if (load && *load < sc->best_load) {
		sc->best_load = *load;
		sc->best = idx;
		sc->best_worker = k;
	}
	return 0;
}

SEC("sk_reuseport/migrate")
int select_active(struct sk_reuseport_md *ctx)
{
	__u32 zero = 0;
	int migrating = ctx->migrating_sk != 0;
	struct active_gen *a = bpf_map_lookup_elem(&active, &zero);

	if (a && a->count > 0 && a->count <= MAX_PER_GEN && a->base <= MAX_PER_GEN * (GENS - 1)) {
		__u32 base = a->base, n = a->count;
		// Least-loaded: scan the slots from the hashed one, keeping the
		// first of the lowest load, so equal loads still spread by hash.
		// bpf_loop (5.17+): the verifier checks the body once instead
		// of unrolling 128 iterations, which kept program load (the
		// proxy's start) ~250 ms longer.
		struct scan sc = { .base = base, .n = n, .hash = ctx->hash, .best_load = LOAD_DEAD };
		bpf_loop(n, scan_slot, &sc, 0);
		__u32 best = sc.best;
		if (sc.best_load < LOAD_DEAD &&
		    bpf_sk_select_reuseport(ctx, &listeners, &best, 0) == 0) {
			// Count the choice now: user space writes the true
			// counts only once per tick, and until then every
			// connection of a burst (a reconnect storm) would see
			// the same counts and go to the same worker. The next
			// tick overwrites this with the real count, which also
			// forgets the connections that closed meanwhile. An
			// atomic add (several CPUs steer at once), and none on a
			// dead worker or one about to look dead.
			__u32 k = sc.best_worker;
			__u32 *load = bpf_map_lookup_elem(&worker_load, &k);
			if (load && *load < LOAD_DEAD - 1)
				__sync_fetch_and_add(load, 1);
			count(migrating ? CNT_MIGRATIONS : CNT_SELECTIONS);
			return SK_PASS;
		}
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
