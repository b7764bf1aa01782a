/* The drain benchmark's sink (bench/drain.py): writes down the sequence number of every numbered frame that
 * reaches it, in arrival order, and drops it. Userspace reads the log through the map's mmap and counts
 * lost, duplicated and reordered packets exactly: no sampling, no per-packet work in Python while the load
 * runs.
 *
 * A numbered frame is IPv6 / UDP to port SEQ_PORT, its 8-byte big-endian number first in the UDP payload
 * (the generator writes it there: bench/xdp_clone_gen.c's xdp_clone_stamp). Anything else (ND, MLD) is
 * counted in `other` and dropped. Frames may arrive on two CPUs at once (the fabric's NAPI and the drain's
 * own sends): the slot is taken with one atomic add, so each frame has its own, in the order they passed
 * that point. A full log counts the rest in `overflow`. */
#include <uapi/linux/bpf.h>
#include <uapi/linux/if_ether.h>
#include <uapi/linux/ipv6.h>
#include <uapi/linux/udp.h>

#ifndef SEQ_LOG_ENTRIES
#define SEQ_LOG_ENTRIES (1 << 22)
#endif
#define SEQ_PORT_BE 0x3930 /* htons(12345) */
#define ETH_P_IPV6_BE 0xDD86
#define IPPROTO_UDP_ 17

struct seq_count {
	u64 logged;   /* slots taken: the log holds min(logged, SEQ_LOG_ENTRIES) numbers */
	u64 other;
	u64 overflow;
};

/* u64 values: an array map lays its values out 8 bytes apart, and userspace reads them so (mmap). */
BPF_F_TABLE("array", u32, u64, seq_log, SEQ_LOG_ENTRIES, BPF_F_MMAPABLE);
BPF_ARRAY(seq_count, struct seq_count, 1);

int xdp_seq_sink(struct xdp_md *ctx)
{
	void *data = (void *)(long)ctx->data;
	void *data_end = (void *)(long)ctx->data_end;
	struct ethhdr *eth = data;
	struct ipv6hdr *ip6h = (void *)(eth + 1);
	struct udphdr *udp = (void *)(ip6h + 1);
	u8 *num = (void *)(udp + 1);
	u32 zero = 0, slot;
	struct seq_count *c = seq_count.lookup(&zero);
	u64 *entry, seq = 0;
	u64 at;

	if (!c)
		return XDP_DROP;
	if (num + 8 > (u8 *)data_end || eth->h_proto != ETH_P_IPV6_BE || ip6h->nexthdr != IPPROTO_UDP_ ||
	    udp->dest != SEQ_PORT_BE) {
		__sync_fetch_and_add(&c->other, 1);
		return XDP_DROP;
	}
	at = __sync_fetch_and_add(&c->logged, 1);
	if (at >= SEQ_LOG_ENTRIES) {
		__sync_fetch_and_add(&c->overflow, 1);
		return XDP_DROP;
	}
	slot = at;
	entry = seq_log.lookup(&slot);
	if (entry) {
#pragma unroll
		for (int i = 0; i < 8; i++)
			seq = seq << 8 | num[i];
		*entry = seq;
	}
	return XDP_DROP;
}
