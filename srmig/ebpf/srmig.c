/* srmig XDP program: SRv6 endpoint behaviours for zero-loss VM live migration.
 *
 * parse -> SID lookup -> dispatch on behaviour (and on the VM's migration state) -> one exit that counts.
 * Behaviours and states: see docs/design.md ("Endpoint behaviours") and srmig_abi.h. Map sizes come from
 * userspace as -D defines (SRMIG_MAX_SIDS, SRMIG_MAX_VMS, SRMIG_MAX_VM_PREFIXES, SRMIG_HOLD_RING_PAGES,
 * SRMIG_MAX_DOMAIN_PREFIXES).
 */
#include <uapi/linux/bpf.h>
#include <uapi/linux/if_ether.h>
#include <uapi/linux/in6.h>
#include <uapi/linux/ipv6.h>
#include <uapi/linux/ip.h>

#include "srmig_abi.h"

#ifndef bpf_ntohs
#define bpf_ntohs(x) __builtin_bswap16(x)
#endif


#ifndef SRMIG_MAX_SIDS
#define SRMIG_MAX_SIDS 256
#endif
#ifndef SRMIG_MAX_VMS
#define SRMIG_MAX_VMS 65536
#endif
#ifndef SRMIG_HOLD_RING_PAGES
#define SRMIG_HOLD_RING_PAGES 4096 /* 16 MiB: ~8000 records of up to 2 KiB */
#endif
#ifndef SRMIG_SHADOW_RING_PAGES
#define SRMIG_SHADOW_RING_PAGES 1024 /* 4 MiB: the last ~2000 packets delivered to migrating VMs (the agent
                                     * leaves the last 512 in it: srmig.ctl.swallow.ShadowLog) */
#endif
#ifndef SRMIG_MAX_VM_PREFIXES
#define SRMIG_MAX_VM_PREFIXES 16384
#endif
#ifndef SRMIG_MAX_DOMAIN_PREFIXES
#define SRMIG_MAX_DOMAIN_PREFIXES 256
#endif
#define BPF_F_NO_PREALLOC_ 1

BPF_HASH(sid_table, struct srmig_sid_key, struct srmig_sid_value, SRMIG_MAX_SIDS);
/* Not preallocated: memory follows the VMs actually present, and 10^6 VMs stay possible. */
BPF_F_TABLE("hash", struct srmig_vm_key, struct srmig_vm_value, vm_table, SRMIG_MAX_VMS, BPF_F_NO_PREALLOC_);
/* The prefixes VMs route, to the VM's id (srmig_abi.h); only walked when vm_table misses. */
BPF_LPM_TRIE(vm_prefixes, struct srmig_vm_prefix_key, struct srmig_vm_key, SRMIG_MAX_VM_PREFIXES);
BPF_PERCPU_ARRAY(sid_stats, struct srmig_sid_stats, SRMIG_MAX_SIDS);
BPF_PERCPU_ARRAY(drop_stats, __u64, SRMIG_DROP_MAX);
BPF_PERCPU_ARRAY(verdict_stats, __u64, SRMIG_VERDICT_MAX);
BPF_PERCPU_ARRAY(inner_stats, __u64, SRMIG_INNER_MAX * SRMIG_VERDICT_MAX); /* see enum srmig_inner_family */
BPF_ARRAY(meta, __u32, SRMIG_META_MAX); /* see enum srmig_meta */
/* The SR domain's source prefixes (value unused); consulted only while meta counts at least one. */
BPF_LPM_TRIE(sr_domain, struct srmig_domain_key, __u32, SRMIG_MAX_DOMAIN_PREFIXES);
/* The hold ring: BPF_RINGBUF_OUTPUT(hold_ring, SRMIG_HOLD_RING_PAGES) spelled out, plus a `peek` member,
 * because bcc 0.26 has no map.ringbuf_query(). bcc rewrites hold_ring.peek(flags) to
 * bpf_map_peek_elem(<the map>, flags), which the macro below turns into bpf_ringbuf_query(<the map>, flags)
 * when the rewritten source is compiled (nothing else here calls bpf_map_peek_elem). */
struct hold_ring_table_t {
	int key;
	u32 leaf;
	int (*ringbuf_output)(void *, u64, u64);
	void *(*ringbuf_reserve)(u64);
	void (*ringbuf_discard)(void *, u64);
	void (*ringbuf_submit)(void *, u64);
	u64 (*peek)(u64);
	u32 max_entries;
};
__attribute__((section("maps/ringbuf"))) struct hold_ring_table_t hold_ring = {
	.max_entries = SRMIG_HOLD_RING_PAGES * PAGE_SIZE
};
#define bpf_map_peek_elem(map, flags) bpf_ringbuf_query(map, flags)
BPF_RINGBUF_OUTPUT(shadow_ring, SRMIG_SHADOW_RING_PAGES);

#include "cache.h"

/* Next hops per CPU: a 2-way set-associative cache in a per-CPU array (the verifier inlines its lookup; a
 * hash map costs a helper call and a jhash, ~50 ns a packet here). A set holds the last two destinations
 * that hashed to it, so a scan of many destinations cannot fill it, only evict. */
BPF_PERCPU_ARRAY(nh_cache, struct nh_cache, SRMIG_NH_SLOTS);
/* Copies of sid_table and vm_table entries per CPU (struct table_copy, cache.h): see sid_lookup(). */
BPF_PERCPU_ARRAY(sid_copies, struct table_copy, SRMIG_SID_COPIES);
BPF_PERCPU_ARRAY(vm_copies, struct table_copy, SRMIG_VM_COPIES);

#include "srv6.h"

/* Map accesses stay in this file: bcc rewrites `map.lookup()` calls in the main source only. */
static __always_inline int nh_apply(struct ethhdr *eth, const __u8 *dmac, const __u8 *smac, __u32 ifindex)
{
	__builtin_memcpy(eth->h_dest, dmac, ETH_ALEN);
	__builtin_memcpy(eth->h_source, smac, ETH_ALEN);
	return bpf_redirect(ifindex, 0);
}

/* The IPv4-mapped IPv6 address ::ffff:a.b.c.d of `v4` (network byte order): how vm_table and the next-hop
 * cache key an IPv4 address (srmig_abi.h). */
static __always_inline void v4_mapped(__u8 *out, __be32 v4)
{
	__u32 *w = (__u32 *)out;

	w[0] = 0;
	w[1] = 0;
	w[2] = 0xFFFF0000; /* bytes 00 00 ff ff read little-endian: the host order bpf_ntohs already assumes */
	w[3] = v4;
}

static __always_inline int is_v4_mapped(const struct in6_addr *a)
{
	const __u32 *w = a->in6_u.u6_addr32;

	return w[0] == 0 && w[1] == 0 && w[2] == 0xFFFF0000;
}

/* Send the frame at ctx->data (Ethernet + IPv6, or Ethernet + IPv4 after an IPv4 delivery's decap) on towards
 * its destination: FIB lookup in the packet's family, MAC rewrite, redirect. What the FIB cannot finish here
 * (neighbour not resolved yet, a local address, a packet too big for the egress MTU, a route with an
 * lwtunnel) goes to the kernel, which knows how to. Neither family's TTL / hop limit is touched here: the
 * behaviours decrement the outer hop limit where they forward, and a delivered inner packet keeps its own
 * (as the kernel's End.DX6 and End.DX4 do: the decapsulating node is not a hop of the inner packet, and the
 * inner IPv4 checksum stays valid untouched). */
static __always_inline int fib_redirect(struct xdp_md *ctx, __u32 *reason)
{
	void *data = (void *)(long)ctx->data;
	void *data_end = (void *)(long)ctx->data_end;
	struct ethhdr *eth = data;
	struct ipv6hdr *ip6h = data + sizeof(*eth);
	struct iphdr *iph = data + sizeof(*eth);
	struct bpf_fib_lookup fib = {};
	struct in6_addr dst;
	__u32 tot_len, family;
	int rc, never_fwd;

	if ((void *)(eth + 1) > data_end) {
		*reason = SRMIG_DROP_TRUNCATED;
		return XDP_DROP;
	}
	if (eth->h_proto == ETH_P_IP_BE) {
		if ((void *)(iph + 1) > data_end) {
			*reason = SRMIG_DROP_TRUNCATED;
			return XDP_DROP;
		}
		family = AF_INET_;
		v4_mapped((__u8 *)&dst, iph->daddr);
		tot_len = bpf_ntohs(iph->tot_len);
		never_fwd = 0; /* the IPv4 FIB lookup does not judge the source */
	} else {
		if ((void *)(ip6h + 1) > data_end) {
			*reason = SRMIG_DROP_TRUNCATED;
			return XDP_DROP;
		}
		family = AF_INET6_;
		dst = ip6h->daddr;
		tot_len = bpf_ntohs(ip6h->payload_len) + sizeof(*ip6h);
		never_fwd = never_forwarded_source(&ip6h->saddr);
	}
	__u32 gen_key = SRMIG_META_NH_GENERATION;
	__u32 *gen = meta.lookup(&gen_key);
	__u32 generation = gen ? *gen : 0;
	__u32 set = set_of(&dst, SRMIG_NH_SLOTS), other = set + 1;
	struct nh_cache *way0 = nh_cache.lookup(&set);
	struct nh_cache *way1 = nh_cache.lookup(&other);
	struct nh_cache *nh = NULL;

	if (!way0 || !way1)
		return XDP_PASS; /* never: both indexes are in range */
	if (way0->expires_ns && way0->family == family && same_addr(&way0->dst, &dst))
		nh = way0;
	else if (way1->expires_ns && way1->family == family && same_addr(&way1->dst, &dst))
		nh = way1;
	if (nh && nh->generation == generation && tot_len <= nh->ok_len && !never_fwd && nh_fresh(nh))
		return nh_apply(eth, nh->dmac, nh->smac, nh->ifindex);

	fib.tot_len = tot_len;
	fib.ifindex = ctx->ingress_ifindex;
	if (family == AF_INET_) {
		if ((void *)(iph + 1) > data_end)
			return XDP_PASS; /* never: checked above; the verifier wants it again */
		fib.family = AF_INET_;
		fib.tos = iph->tos;
		fib.l4_protocol = iph->protocol;
		fib.ipv4_src = iph->saddr;
		fib.ipv4_dst = iph->daddr;
	} else {
		if ((void *)(ip6h + 1) > data_end)
			return XDP_PASS; /* never: as above */
		fib.family = AF_INET6_;
		fib.flowinfo = *(__be32 *)ip6h & IPV6_FLOWINFO_MASK_;
		fib.l4_protocol = ip6h->nexthdr;
		__builtin_memcpy(fib.ipv6_src, &ip6h->saddr, 16);
		__builtin_memcpy(fib.ipv6_dst, &ip6h->daddr, 16);
	}

	rc = bpf_fib_lookup(ctx, &fib, sizeof(fib), 0);
	switch (rc) {
	case BPF_FIB_LKUP_RET_SUCCESS: {
		/* Replace this destination's entry, else an empty way, else the one that expires first. */
		struct nh_cache *slot = nh ? nh : !way0->expires_ns ? way0 : !way1->expires_ns ? way1 :
					way0->expires_ns <= way1->expires_ns ? way0 : way1;

		slot->dst = dst;
		slot->expires_ns = bpf_ktime_get_ns() + SRMIG_NH_TTL_NS - SRMIG_NH_TICK_NS;
		slot->valid_jiffies = bpf_jiffies64();
		slot->ifindex = fib.ifindex;
		slot->generation = generation;
		slot->ok_len = tot_len;
		slot->family = family;
		__builtin_memcpy(slot->dmac, fib.dmac, ETH_ALEN);
		__builtin_memcpy(slot->smac, fib.smac, ETH_ALEN);
		return nh_apply(eth, fib.dmac, fib.smac, fib.ifindex);
	}
	case BPF_FIB_LKUP_RET_NO_NEIGH:
	case BPF_FIB_LKUP_RET_NOT_FWDED:
	case BPF_FIB_LKUP_RET_FRAG_NEEDED:
	case BPF_FIB_LKUP_RET_UNSUPP_LWT:
		return XDP_PASS;
	default:
		*reason = SRMIG_DROP_NO_ROUTE;
		return XDP_DROP;
	}
}

/* Where one packet stands while a behaviour works on it. */
struct pkt {
	struct ipv6hdr *ip6h;   /* outer IPv6 header */
	struct srh *srh;        /* NULL when the packet has none (reduced encapsulation) */
	void *inner;            /* inner IPv6 or IPv4 header */
	__u16 inner_proto;      /* its ethertype, network byte order: ETH_P_IPV6_BE or ETH_P_IP_BE (0: not read) */
	__u32 outer_len;        /* bytes from the outer IPv6 header to the inner one */
	__u32 verdict;
	__u32 reason;
};

static __always_inline __u8 segments_left(struct pkt *p)
{
	return p->srh ? p->srh->segments_left : 0;
}

/* Copy the packet from its IPv6 (or, a shadow copy, inner IPv4) header on into `rec`'s payload. Returns its length, 0 when it cannot. */
static __always_inline __u32 copy_packet(struct xdp_md *ctx, struct srmig_hold_record *rec,
					 struct srmig_vm_key *vm)
{
	void *data = (void *)(long)ctx->data;
	void *data_end = (void *)(long)ctx->data_end;
	__u32 off = sizeof(struct ethhdr);
	__u32 len = data_end - data - off;

	if (len >= SRMIG_HOLD_SNAPLEN)
		return 0;
	/* The verifier needs 1 <= len <= buffer; the empty asm keeps clang from folding the mask away. */
	asm volatile("" : "+r"(len));
	len &= SRMIG_HOLD_SNAPLEN - 1;
	if (len < sizeof(struct iphdr) || bpf_xdp_load_bytes(ctx, off, (void *)(rec + 1), len))
		return 0;
	rec->timestamp_ns = bpf_ktime_get_ns();
	__builtin_memcpy(rec->vm, vm->addr, 16);
	rec->len = len;
	rec->orig_len = len;
	return len;
}

/* Best effort: a full shadow ring only means that frame cannot be re-sent. */
static __always_inline void shadow_copy(struct xdp_md *ctx, struct srmig_vm_key *vm)
{
	struct srmig_hold_record *rec = shadow_ring.ringbuf_reserve(sizeof(*rec) + SRMIG_HOLD_SNAPLEN);

	if (!rec)
		return;
	if (copy_packet(ctx, rec, vm))
		shadow_ring.ringbuf_submit(rec, 0);
	else
		shadow_ring.ringbuf_discard(rec, 0);
}

/* Deliver: decapsulate, forward the inner packet to the VM (RFC 8986 4.5 End.DX6, 4.6 End.DX4 for an inner
 * IPv4 packet; SL must be 0 unless the behaviour ignores the remaining segments, as End.S does while the VM
 * runs here). */
static __always_inline int deliver(struct xdp_md *ctx, struct pkt *p, __u32 verdict, struct srmig_vm_key *vm,
				   struct srmig_vm_value *st)
{
	p->verdict = verdict;
	p->reason = decap(ctx, p->outer_len, p->inner_proto);
	if (p->reason)
		return XDP_DROP;
	if (st->flags & SRMIG_VM_F_SHADOW)
		shadow_copy(ctx, vm);
	return fib_redirect(ctx, &p->reason);
}

static __always_inline int forward(struct xdp_md *ctx, struct pkt *p)
{
	p->verdict = SRMIG_VERDICT_FORWARD;
	return fib_redirect(ctx, &p->reason);
}

/* Park the packet (advanced, or as it came: SRMIG_VM_F_PARK) in the hold ring for the agent to send on
 * later, in order. */
static __always_inline int hold_in_ring(struct xdp_md *ctx, struct pkt *p, struct srmig_vm_key *vm)
{
	void *data = (void *)(long)ctx->data;
	void *data_end = (void *)(long)ctx->data_end;
	struct srmig_hold_record *rec;

	p->verdict = SRMIG_VERDICT_HOLD;
	if (data_end - data - sizeof(struct ethhdr) >= SRMIG_HOLD_SNAPLEN) { /* jumbo: counted, never truncated */
		p->reason = SRMIG_DROP_HOLD_FULL;
		return XDP_DROP;
	}
	rec = hold_ring.ringbuf_reserve(sizeof(*rec) + SRMIG_HOLD_SNAPLEN);
	if (!rec) {
		p->reason = SRMIG_DROP_HOLD_FULL;
		return XDP_DROP;
	}
	if (!copy_packet(ctx, rec, vm)) {
		hold_ring.ringbuf_discard(rec, 0);
		p->reason = SRMIG_DROP_TRUNCATED;
		return XDP_DROP;
	}
	hold_ring.ringbuf_submit(rec, 0);
	return XDP_DROP; /* the frame itself is done with: its copy is in the ring */
}

/* AWAY right after the drain's flip: packets parked before it are still being sent on by the agent (it
 * consumes a record only once it has sent it), so a newer packet queues behind them instead of overtaking. */
static __always_inline int behind_ring(struct srmig_vm_value *st)
{
	return (st->flags & SRMIG_VM_F_RING_FIRST) && hold_ring.peek(BPF_RB_AVAIL_DATA) > 0;
}

/* RUNNING after an abort: packets for the VM wait in the hold ring while the destination returns the older
 * ones it held (SRMIG_VM_F_PARK), then behind those still parked (SRMIG_VM_F_RING_FIRST). */
static __always_inline int parks(struct srmig_vm_value *st)
{
	return (st->flags & SRMIG_VM_F_PARK) || behind_ring(st);
}

/* Destination side before resume: the incoming QEMU does not read its tap, so the tap queue is the buffer
 * (measured lossless, see docs/platform.md); the hold ring when the VM entry asks for it (no tap yet). */
static __always_inline int hold_for_vm(struct xdp_md *ctx, struct pkt *p, struct srmig_vm_key *vm,
				       struct srmig_vm_value *st)
{
	if (st->flags & SRMIG_VM_F_HOLD_RING)
		return hold_in_ring(ctx, p, vm);
	return deliver(ctx, p, SRMIG_VERDICT_HOLD, vm, st);
}

/* End.S (migration source). */
static __always_inline int end_s(struct xdp_md *ctx, struct pkt *p, struct srmig_vm_key *vm,
				 struct srmig_vm_value *st)
{
	int rc;

	if (segments_left(p) == 0) { /* End.S always carries the destination's SID after itself */
		p->reason = SRMIG_DROP_SL_ZERO;
		return XDP_DROP;
	}
	switch (st->state) {
	case SRMIG_VM_RUNNING:
		if (parks(st))
			return hold_in_ring(ctx, p, vm);
		return deliver(ctx, p, SRMIG_VERDICT_DELIVER, vm, st);
	case SRMIG_VM_HOLD:
		p->reason = advance_nextseg(p->ip6h, p->srh, (void *)(long)ctx->data_end);
		if (p->reason)
			return XDP_DROP;
		return hold_in_ring(ctx, p, vm);
	case SRMIG_VM_AWAY:
		p->reason = advance_nextseg(p->ip6h, p->srh, (void *)(long)ctx->data_end);
		if (p->reason)
			return XDP_DROP;
		if (behind_ring(st))
			return hold_in_ring(ctx, p, vm);
		return forward(ctx, p);
	default:
		p->reason = SRMIG_DROP_VM_STATE;
		return XDP_DROP;
	}
}

/* End.SBUF (migration destination). */
static __always_inline int end_sbuf(struct xdp_md *ctx, struct pkt *p, struct srmig_vm_key *vm,
				    struct srmig_vm_value *st)
{
	if (segments_left(p) != 0) {
		p->reason = SRMIG_DROP_SL_NONZERO;
		return XDP_DROP;
	}
	switch (st->state) {
	case SRMIG_VM_RUNNING:
		return deliver(ctx, p, SRMIG_VERDICT_DELIVER, vm, st);
	case SRMIG_VM_INCOMING:
		return hold_for_vm(ctx, p, vm, st);
	default:
		p->reason = SRMIG_DROP_VM_STATE;
		return XDP_DROP;
	}
}

/* End.DX6-map (steady state): what End.SBUF does (deliver when running; hold when incoming, because the
 * ingress cut over before our resume), and when the VM is away, send stragglers on to where it went. While
 * the source drains (HOLD: an ingress that has not switched yet still sends here), rewrite the same way but
 * park in the hold ring, behind the drained queue, like End.S does. */
static __always_inline int end_dx6(struct xdp_md *ctx, struct pkt *p, struct srmig_vm_key *vm,
				   struct srmig_vm_value *st)
{
	if (st->state == SRMIG_VM_RUNNING && segments_left(p) == 0 && parks(st))
		return hold_in_ring(ctx, p, vm);
	if ((st->state != SRMIG_VM_AWAY && st->state != SRMIG_VM_HOLD) || segments_left(p) != 0)
		return end_sbuf(ctx, p, vm, st);
	/* Rewrite the active segment and the DA to the recorded SID, so the SRH stays consistent. */
	if (p->ip6h->hop_limit <= 1) {
		p->reason = SRMIG_DROP_HOP_LIMIT;
		return XDP_DROP;
	}
	__builtin_memcpy(&p->ip6h->daddr, st->next_sid, 16);
	if (p->srh) {
		struct in6_addr *seg0 = p->srh->segments;

		if ((void *)(seg0 + 1) > (void *)(long)ctx->data_end) {
			p->reason = SRMIG_DROP_TRUNCATED;
			return XDP_DROP;
		}
		__builtin_memcpy(seg0, st->next_sid, 16);
	}
	p->ip6h->hop_limit--;
	if (st->state == SRMIG_VM_HOLD || behind_ring(st))
		return hold_in_ring(ctx, p, vm);
	return forward(ctx, p);
}

/* RFC 8986 4.1 End (transit): advance to the next segment, send it on. */
static __always_inline int end(struct xdp_md *ctx, struct pkt *p)
{
	p->reason = advance_nextseg(p->ip6h, p->srh, (void *)(long)ctx->data_end);
	if (p->reason)
		return XDP_DROP;
	return forward(ctx, p);
}

/* The SID table's entry for `sid`, from this CPU's copy when it was made at `generation`, else from the table
 * (and copied, present or absent). NULL: not one of our SIDs. The two lookups below differ only in their maps:
 * bcc rewrites map calls where they are written, so each is spelled out. */
static __always_inline struct srmig_sid_value *sid_lookup(const struct in6_addr *sid, __u32 generation)
{
	__u32 set = set_of(sid, SRMIG_SID_COPIES), other = set + 1;
	struct table_copy *w0 = sid_copies.lookup(&set), *w1 = sid_copies.lookup(&other), *c;
	struct srmig_sid_key key;
	struct srmig_sid_value *entry;

	if (!w0 || !w1)
		return NULL; /* never: both indexes are in range */
	if (generation & 1) { /* a write in progress: the table itself, no copy (cache.h) */
		__builtin_memcpy(key.addr, sid, 16);
		return sid_table.lookup(&key);
	}
	c = copy_find(w0, w1, sid, generation);
	if (!c) {
		__builtin_memcpy(key.addr, sid, 16);
		entry = sid_table.lookup(&key);
		c = copy_fill(w0, w1, key.addr, generation, entry != NULL);
		if (entry)
			c->sid = *entry;
	}
	return c->found == COPY_PRESENT ? &c->sid : NULL;
}

/* vm_table had no entry for `vm`: the VM whose prefix holds it (vm_prefixes), by that VM's id, written to
 * `id`. NULL: no prefix holds it, or its VM has no entry (being written or deleted: unknown, as without it). */
static __always_inline struct srmig_vm_value *vm_by_prefix(const struct srmig_vm_key *vm, struct srmig_vm_key *id)
{
	struct srmig_vm_prefix_key key = { .prefixlen = 128 };
	struct srmig_vm_key *owner;

	__builtin_memcpy(key.addr, vm->addr, 16);
	owner = vm_prefixes.lookup(&key);
	if (!owner)
		return NULL;
	*id = *owner;
	return vm_table.lookup(id);
}

/* The VM table's entry for `vm`, the same way: the exact entry first (every address a VM lists), then the
 * prefixes (vm_by_prefix); the copy remembers either answer for the packet's address, so a prefix's address
 * pays the trie walk once per generation and CPU, like an exact miss. `vm` becomes the key whose entry applies
 * (the VM's id for a prefix's address): the hold and shadow rings name the VM by it. NULL: not a VM we know. */
static __always_inline struct srmig_vm_value *vm_lookup(struct srmig_vm_key *vm, __u32 generation)
{
	__u32 set = set_of(vm->addr, SRMIG_VM_COPIES), other = set + 1;
	struct table_copy *w0 = vm_copies.lookup(&set), *w1 = vm_copies.lookup(&other), *c;
	struct srmig_vm_value *entry;
	struct srmig_vm_key id = *vm;

	if (!w0 || !w1)
		return NULL; /* never: both indexes are in range */
	if (generation & 1) { /* a write in progress: the tables themselves, no copy (cache.h) */
		entry = vm_table.lookup(vm);
		if (!entry) {
			entry = vm_by_prefix(vm, &id);
			*vm = id;
		}
		return entry;
	}
	c = copy_find(w0, w1, vm->addr, generation);
	if (!c) {
		entry = vm_table.lookup(vm);
		if (!entry)
			entry = vm_by_prefix(vm, &id);
		c = copy_fill(w0, w1, vm->addr, generation, entry != NULL);
		if (entry) {
			c->vm = *entry;
			__builtin_memcpy(c->vm_id, id.addr, 16);
		}
	}
	if (c->found != COPY_PRESENT)
		return NULL;
	__builtin_memcpy(vm->addr, c->vm_id, 16);
	return &c->vm;
}

/* RFC 8754 5.1: an SR domain's nodes drop packets addressed to their SIDs that come from outside it. Off
 * (every source accepted) while userspace counts no prefix: one array read, no trie walk. An empty trie
 * with a non-zero count drops everything: fail closed. */
static __always_inline int outside_domain(struct ipv6hdr *ip6h)
{
	__u32 key = SRMIG_META_DOMAIN_PREFIXES;
	__u32 *prefixes = meta.lookup(&key);
	struct srmig_domain_key src = { .prefixlen = 128 };

	if (!prefixes || *prefixes == 0)
		return 0;
	__builtin_memcpy(src.addr, &ip6h->saddr, 16);
	return sr_domain.lookup(&src) == NULL;
}

static __always_inline void count(struct pkt *p, __u32 slot, __u32 bytes, int is_ours)
{
	__u32 idx = p->verdict;
	__u64 *v = verdict_stats.lookup(&idx);
	struct srmig_sid_stats *s;

	if (v)
		*v += 1;
	if (p->inner_proto) {
		idx = (p->inner_proto == ETH_P_IP_BE ? SRMIG_INNER_IPV4 : SRMIG_INNER_IPV6) * SRMIG_VERDICT_MAX +
		      p->verdict;
		v = inner_stats.lookup(&idx);
		if (v)
			*v += 1;
	}
	if (p->reason) { /* set exactly when the verdict is a drop (see the exit of srmig_xdp) */
		idx = p->reason;
		v = drop_stats.lookup(&idx);
		if (v)
			*v += 1;
	}
	if (!is_ours)
		return;
	s = sid_stats.lookup(&slot);
	if (!s)
		return;
	s->packets++;
	s->bytes += bytes;
	switch (p->verdict) {
	case SRMIG_VERDICT_DELIVER: s->delivered++; break;
	case SRMIG_VERDICT_FORWARD: s->forwarded++; break;
	case SRMIG_VERDICT_HOLD: s->held++; break;
	default: s->dropped++; break;
	}
}

/* The table generation, read once per packet before any lookup: a packet that starts after userspace's
 * write sees it (cache.h: odd while a write is in progress, when no copy is used). */
static __always_inline __u32 table_generation(void)
{
	__u32 key = SRMIG_META_TABLE_GENERATION;
	__u32 *gen = meta.lookup(&key);

	return gen ? *gen : 0;
}

/* The outer headers of a packet addressed to one of our SIDs: its source, its length, its extension headers
 * and its SRH. Returns a drop reason (0: fine); the cursor is left on the upper layer, `*nexthdr` its
 * protocol. */
static __always_inline __u32 check_outer(struct hdr_cursor *nh, void *data_end, struct pkt *p, int *nexthdr)
{
	__u32 reason;

	/* Before anything else of ours: a packet from outside the SR domain triggers nothing (no hold, no
	 * forward), whatever its SRH says. Its outer source is in the 40 bytes already checked. */
	if (outside_domain(p->ip6h))
		return SRMIG_DROP_OUTSIDE_DOMAIN;
	/* A payload length that claims more than the frame holds is malformed (RFC 8200 3): never forward it.
	 * (Shorter is fine: Ethernet pads small frames.) */
	if (sizeof(*p->ip6h) + bpf_ntohs(p->ip6h->payload_len) > (__u32)(data_end - (void *)p->ip6h))
		return SRMIG_DROP_TRUNCATED;
	*nexthdr = skip_ipv6_opts(nh, data_end, *nexthdr);
	if (*nexthdr < 0)
		return SRMIG_DROP_TRUNCATED;
	if (*nexthdr == IPPROTO_ROUTING_) {
		reason = get_and_validate_srh(nh, data_end, &p->srh);
		if (reason)
			return reason;
		*nexthdr = p->srh->nexthdr;
	}
	return 0;
}

/* The per-VM behaviours need the inner packet: its DA names the VM, written into `vm` as the vm_table key
 * (srmig_abi.h: IPv4 as IPv4-mapped). One SID serves both families, as End.DT46 does (RFC 8986 4.8). Returns
 * a drop reason (0: fine). */
static __always_inline __u32 parse_inner(struct hdr_cursor *nh, void *data_end, struct pkt *p, int nexthdr,
					 struct srmig_vm_key *vm)
{
	p->inner = nh->pos;
	p->outer_len = nh->pos - (void *)p->ip6h;
	if (nexthdr == IPPROTO_IPV6_) {
		struct ipv6hdr *ip6h = nh->pos;

		p->inner_proto = ETH_P_IPV6_BE;
		if ((void *)(ip6h + 1) > data_end ||
		    sizeof(*ip6h) + bpf_ntohs(ip6h->payload_len) > (__u32)(data_end - (void *)ip6h))
			return SRMIG_DROP_TRUNCATED;
		/* IPv4-mapped keys are IPv4 VMs': an IPv6 packet to one is for no VM (srmig_abi.h). */
		if (is_v4_mapped(&ip6h->daddr))
			return SRMIG_DROP_UNKNOWN_VM;
		__builtin_memcpy(vm->addr, &ip6h->daddr, 16);
		return 0;
	}
	if (nexthdr == IPPROTO_IPIP_) {
		struct iphdr *iph = nh->pos;
		__u32 tot_len;

		p->inner_proto = ETH_P_IP_BE;
		if ((void *)(iph + 1) > data_end)
			return SRMIG_DROP_TRUNCATED;
		/* RFC 791 3.1; the checksum is left to the VM, as the kernel's End.DX4 does (it is not changed
		 * either: the TTL is not decremented, see fib_redirect). */
		tot_len = bpf_ntohs(iph->tot_len);
		if (iph->version != 4 || iph->ihl < 5 || tot_len < ((__u32)iph->ihl << 2))
			return SRMIG_DROP_INNER_MALFORMED;
		if (tot_len > (__u32)(data_end - (void *)iph))
			return SRMIG_DROP_TRUNCATED;
		v4_mapped(vm->addr, iph->daddr);
		return 0;
	}
	return SRMIG_DROP_INNER_NOT_IPV6; /* neither IPv6 nor IPv4 */
}

static __always_inline int per_vm(struct xdp_md *ctx, struct pkt *p, __u32 behaviour, struct srmig_vm_key *vm_key,
				  struct srmig_vm_value *vm)
{
	switch (behaviour) {
	case SRMIG_BEH_END_S:
		return end_s(ctx, p, vm_key, vm);
	case SRMIG_BEH_END_SBUF:
		return end_sbuf(ctx, p, vm_key, vm);
	case SRMIG_BEH_END_DX6_MAP:
		return end_dx6(ctx, p, vm_key, vm);
	default:
		p->reason = SRMIG_DROP_UNKNOWN_BEHAVIOUR;
		return XDP_DROP;
	}
}

/* parse -> SID lookup -> checks -> behaviour -> one counting exit. */
int srmig_xdp(struct xdp_md *ctx)
{
	void *data_end = (void *)(long)ctx->data_end;
	struct hdr_cursor nh = { .pos = (void *)(long)ctx->data };
	__u32 bytes = data_end - nh.pos;
	struct pkt p = { .verdict = SRMIG_VERDICT_PASS };
	struct srmig_sid_value *sid;
	struct srmig_vm_key vm_key;
	struct srmig_vm_value *vm;
	struct ethhdr *eth;
	__u32 generation, slot = 0;
	int is_ours = 0, action = XDP_PASS, nexthdr;

	if (parse_ethhdr(&nh, data_end, &eth) != ETH_P_IPV6_BE)
		goto out; /* IPv4, ARP, VLAN...: not ours */
	nexthdr = parse_ipv6hdr(&nh, data_end, &p.ip6h);
	if (nexthdr < 0)
		goto out; /* truncated IPv6 we never claimed: the kernel judges it */
	generation = table_generation();
	sid = sid_lookup(&p.ip6h->daddr, generation);
	if (!sid)
		goto out; /* not one of our SIDs: untouched */
	is_ours = 1;
	slot = sid->stats_slot;
	action = XDP_DROP;
	p.verdict = SRMIG_VERDICT_DROP;
	p.reason = check_outer(&nh, data_end, &p, &nexthdr);
	if (p.reason)
		goto out;
	if (sid->behaviour == SRMIG_BEH_END) {
		action = end(ctx, &p);
		goto out;
	}
	p.reason = parse_inner(&nh, data_end, &p, nexthdr, &vm_key);
	if (p.reason)
		goto out;
	vm = vm_lookup(&vm_key, generation);
	if (!vm) {
		p.reason = SRMIG_DROP_UNKNOWN_VM;
		goto out;
	}
	action = per_vm(ctx, &p, sid->behaviour, &vm_key, vm);
out:
	/* A behaviour that gave up (XDP_DROP with a reason) is a drop, whatever it was trying to do; a hold in
	 * the ring also returns XDP_DROP, but without a reason, and stays a hold. */
	if (p.reason) {
		p.verdict = SRMIG_VERDICT_DROP;
		action = XDP_DROP;
	}
	count(&p, slot, bytes, is_ours);
	return action;
}
