/* The per-CPU lookup caches of srmig.c, their layouts and pure helpers: copies of sid_table and vm_table
 * entries trusted at one table generation, and remembered FIB results. BPF-only; the maps that hold them are
 * declared in srmig.c, and every map access stays there (bcc rewrites `map.lookup()` in the main source only).
 * Needs srmig_abi.h and the uapi headers before it. */
#ifndef SRMIG_CACHE_H
#define SRMIG_CACHE_H

/* A FIB result remembered per destination and CPU, for at most SRMIG_NH_TTL_NS (or until userspace
 * bumps the generation in meta[SRMIG_META_NH_GENERATION] after a route or neighbour change): one
 * bpf_fib_lookup costs ~500 ns on these machines, ten times everything else a packet needs. */
struct nh_cache {
	struct in6_addr dst; /* the destination this slot holds; expires_ns == 0: empty */
	__u64 expires_ns;    /* bpf_ktime_get_ns() deadline, SRMIG_NH_TICK_NS short of the TTL */
	__u64 valid_jiffies; /* the tick in which expires_ns was last checked against the clock */
	__u32 ifindex;
	__u32 generation;
	__u8 dmac[ETH_ALEN];
	__u8 smac[ETH_ALEN];
	__u32 ok_len; /* the FIB passed a packet this long (its MTU check): longer ones take the slow path */
	__u32 family; /* AF_INET6_ or AF_INET_: dst of an IPv4 destination is IPv4-mapped, and an IPv6 packet to
		       * that mapped address must not take the IPv4 next hop */
};

#ifndef SRMIG_NH_TTL_NS
#define SRMIG_NH_TTL_NS 100000000ULL /* 100 ms */
#endif
/* Longer than one tick at any HZ (>= 100): see nh_fresh(). */
#define SRMIG_NH_TICK_NS 10000000ULL
#define SRMIG_NH_SLOTS 4096 /* a power of two; 2-way sets */

/* Copies of sid_table and vm_table entries, per CPU: a hash map lookup with a 16-byte key costs ~35 ns here
 * (jhash, bucket walk, key compare) and a packet for a VM needs two, where a 2-way cache in a per-CPU array
 * is inlined by the verifier. A copy is trusted only at the generation it was made at, and a packet reads
 * meta[SRMIG_META_TABLE_GENERATION] once, before any lookup it may copy. Userspace brackets every write to
 * sid_table, vm_table or vm_prefixes with two bumps (srmig/ctl/maps.py): to an odd generation before it, to
 * the next even one after; while it is odd, packets read the tables and make no copy. So the tables alone
 * answer from before a write until copies are made again after it: a packet that starts after the write
 * sees it, as it would without the cache (one in flight during it may see either, as with RCU), and one
 * write that moves several addresses (a VM's id, which its other addresses point at) moves them for the
 * next packet to any of them, never a warm copy of one behind a cold lookup of another. */
struct table_copy {
	__u8 key[16];
	__u32 generation;
	__u32 found; /* COPY_EMPTY, COPY_ABSENT (the table has no such key), COPY_PRESENT (value below) */
	union {
		struct srmig_sid_value sid;
		struct srmig_vm_value vm;
	};
	__u8 vm_id[16]; /* vm_copies: the vm_table key of that entry (the VM's id for an address of its prefix) */
};
#define COPY_EMPTY 0
#define COPY_ABSENT 1
#define COPY_PRESENT 2
#define SRMIG_SID_COPIES 1024 /* powers of two; 2-way sets */
#define SRMIG_VM_COPIES 4096

/* Sources the kernel's FIB lookup never forwards from (RFC 4291 2.5.3, 2.5.6, 2.7: loopback, link-local,
 * multicast): such packets always take the full lookup, which hands them to the kernel; a next hop cached
 * for their destination must not let them through. */
static __always_inline int never_forwarded_source(const struct in6_addr *a)
{
	const __u32 *w = a->in6_u.u6_addr32;

	if (a->in6_u.u6_addr8[0] == 0xff)
		return 1;
	if (a->in6_u.u6_addr8[0] == 0xfe && (a->in6_u.u6_addr8[1] & 0xc0) == 0x80)
		return 1;
	return w[0] == 0 && w[1] == 0 && w[2] == 0 && w[3] == __builtin_bswap32(1);
}

/* The first slot of the 2-way set for address `a` in a table of `slots` (a power of two) slots. */
static __always_inline __u32 set_of(const void *a, __u32 slots)
{
	const __u32 *w = a;
	__u32 h = w[0] ^ w[1] ^ w[2] ^ w[3];

	h ^= h >> 16;
	h *= 0x45d9f3b;
	h ^= h >> 16;
	return h & (slots - 2);
}

static __always_inline int same_addr(const struct in6_addr *a, const struct in6_addr *b)
{
	const __u64 *x = (const __u64 *)a, *y = (const __u64 *)b;

	return x[0] == y[0] && x[1] == y[1];
}

/* The way of a 2-way set holding `key` at generation `gen`, or NULL. */
static __always_inline struct table_copy *copy_find(struct table_copy *w0, struct table_copy *w1, const void *key,
						    __u32 gen)
{
	if (w0->found && w0->generation == gen && same_addr(key, (const void *)w0->key))
		return w0;
	if (w1->found && w1->generation == gen && same_addr(key, (const void *)w1->key))
		return w1;
	return NULL;
}

/* The way to copy a fresh lookup into: an empty or outdated one, else way 1 after way 0 moved there (the
 * newest copy in way 0). Returns it with its key and generation set. */
static __always_inline struct table_copy *copy_fill(struct table_copy *w0, struct table_copy *w1, const void *key,
						    __u32 gen, int present)
{
	struct table_copy *c = w0;

	if (w0->found && w0->generation == gen) {
		if (w1->found && w1->generation == gen)
			*w1 = *w0;
		else
			c = w1;
	}
	__builtin_memcpy(c->key, key, 16);
	c->generation = gen;
	c->found = present ? COPY_PRESENT : COPY_ABSENT;
	return c;
}

/* Not expired. bpf_ktime_get_ns() costs ~40 ns here and bpf_jiffies64() next to nothing (the JIT inlines
 * it), so the clock is read at most once per tick and entry: within the tick of a check that passed, less
 * than SRMIG_NH_TICK_NS has gone by since, and expires_ns is that much short of the TTL. */
static __always_inline int nh_fresh(struct nh_cache *nh)
{
	__u64 tick = bpf_jiffies64();

	if (nh->valid_jiffies == tick)
		return 1;
	if (nh->expires_ns <= bpf_ktime_get_ns())
		return 0;
	nh->valid_jiffies = tick;
	return 1;
}

#endif
