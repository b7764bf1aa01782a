/* Issue 20 part 1, measured (bench/drain.py, DrainLab.send_cost): how fast BPF_PROG_RUN with live frames
 * could send the drain's packets, where the kernel allows it. Userspace writes the packets, whole Ethernet
 * frames, into `slots` (an mmap'd array); each run of this program takes the next slot, makes the frame
 * that long, copies the slot in and returns XDP_TX: the kernel sends it out of the ingress interface given
 * to BPF_PROG_RUN (S's fabric veth) as an XDP frame, no skb, no socket. One CPU runs it (the calling
 * thread), so `next` needs no atomic. Not the product's: a measurement of what such a path costs. */
#include <uapi/linux/bpf.h>

#define SLOT_BYTES 256
#ifndef INJECT_SLOTS
#define INJECT_SLOTS 65536
#endif

struct slot {
	u32 len;
	u8 data[SLOT_BYTES];
};

BPF_F_TABLE("array", u32, struct slot, slots, INJECT_SLOTS, BPF_F_MMAPABLE);
BPF_ARRAY(inject_next, u32, 1);

int xdp_drain_inject(struct xdp_md *ctx)
{
	u32 zero = 0, i, len;
	u32 *next = inject_next.lookup(&zero);
	struct slot *s;
	int cur;

	if (!next)
		return XDP_ABORTED;
	i = *next;
	*next = i + 1;
	s = slots.lookup(&i);
	if (!s)
		return XDP_ABORTED;
	len = s->len;
	if (len < 14 || len > SLOT_BYTES)
		return XDP_DROP;
	cur = (int)bpf_xdp_get_buff_len(ctx); /* pkt_end - pkt: refused by the verifier */
	if (bpf_xdp_adjust_tail(ctx, (int)len - cur))
		return XDP_ABORTED;
	/* The same len, in a form the verifier bounds to 1..SLOT_BYTES (clang turns the check above into a
	 * compare on a copy of the register the helper then gets unbounded). */
	len = ((len - 1) & (SLOT_BYTES - 1)) + 1;
	if (bpf_xdp_store_bytes(ctx, 0, s->data, len))
		return XDP_ABORTED;
	return XDP_TX;
}
