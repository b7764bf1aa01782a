/* The drain's pump: the hold ring's records sent to the fabric without a syscall or a Python step per packet
 * (srmig/ctl/pump.py, docs/drain.md). Userspace copies a batch of records, each already an Ethernet frame to
 * the next hop, into pump_slots (mmap'd) from slot 0, writes pump_mark (batch, end, ifindex), then runs one of
 * these programs once per slot with one BPF_PROG_RUN (`repeat` = the batch's slots). Each run sends slot
 * `sent` and only then counts it, so pump_mark.sent says which records of the batch went out, also to an
 * agent killed during the call and restarted (the mark is pinned next to the ring).
 *
 * Two ways out, chosen at run time by userspace:
 * - pump_xdp, with BPF_F_TEST_XDP_LIVE_FRAMES: the frame is rewritten to the slot and XDP_TX sends it out of
 *   the interface given to BPF_PROG_RUN (the fabric link), as an XDP frame: no skb on this host. Some kernels
 *   refuse live frames (EPERM, even to root).
 * - pump_tc, a plain skb BPF_PROG_RUN (every kernel): the trigger skb is rewritten to the slot and
 *   bpf_clone_redirect sends a clone of it out of pump_mark.ifindex, through the link's qdisc, synchronously:
 *   its return says whether the link took it, and a refusal stops the batch (err) for userspace to send
 *   the rest the old way.
 * One CPU runs a BPF_PROG_RUN's repeats (the calling thread's), so the mark needs no atomics. */
#include <uapi/linux/bpf.h>
#include <uapi/linux/pkt_cls.h>
#include <uapi/linux/errno.h>
#include "srmig_abi.h"

#ifndef SRMIG_PUMP_SLOTS
#define SRMIG_PUMP_SLOTS 4096
#endif
#ifndef SRMIG_PUMP_MARK_PIN
#error "SRMIG_PUMP_MARK_PIN: the pump mark's pin path"
#endif
#define ETH_HLEN 14
#define NET_XMIT_CN 2 /* include/linux/netdevice.h: queued, another packet dropped (net_xmit_eval: success) */

BPF_F_TABLE("array", u32, struct srmig_pump_slot, pump_slots, SRMIG_PUMP_SLOTS, BPF_F_MMAPABLE);
/* Pinned where userspace says (bcc reuses the pin when it exists): a restarted agent reads the mark of the
 * batch it was killed in, and a pump compiled anew writes the same map. */
BPF_TABLE_PINNED("array", u32, struct srmig_pump_mark, pump_mark, 1, SRMIG_PUMP_MARK_PIN);

/* The slot the mark points at, or NULL when the batch is done (or stopped), or when the slot's length is no
 * frame's (the batch then stops with -EINVAL). */
static __always_inline struct srmig_pump_slot *next_slot(struct srmig_pump_mark *m)
{
	struct srmig_pump_slot *s;
	u32 i = m->sent;

	if (i >= m->end || m->err)
		return NULL;
	s = pump_slots.lookup(&i);
	if (s && (s->len < ETH_HLEN || s->len > SRMIG_PUMP_FRAME_MAX)) {
		m->err = -EINVAL;
		return NULL;
	}
	return s;
}

/* The slot's length bounded to 1..SRMIG_PUMP_FRAME_MAX in a form the verifier follows (clang turns a plain
 * range check into a compare on a copy of the register the helper then gets unbounded). */
static __always_inline u32 bounded_len(u32 len)
{
	return ((len - 1) & (SRMIG_PUMP_FRAME_MAX - 1)) + 1;
}

int pump_xdp(struct xdp_md *ctx)
{
	u32 zero = 0, len;
	struct srmig_pump_mark *m = pump_mark.lookup(&zero);
	struct srmig_pump_slot *s;
	int cur;

	if (!m)
		return XDP_ABORTED;
	s = next_slot(m);
	if (!s)
		return XDP_DROP; /* more runs than slots: nothing to send */
	len = s->len;
	cur = (int)bpf_xdp_get_buff_len(ctx); /* pkt_end - pkt: refused by the verifier */
	if (bpf_xdp_adjust_tail(ctx, (int)len - cur)) {
		m->err = -EMSGSIZE;
		return XDP_DROP;
	}
	if (bpf_xdp_store_bytes(ctx, 0, s->frame, bounded_len(len))) {
		m->err = -EFAULT;
		return XDP_DROP;
	}
	/* Counted as it leaves: live frames are sent at the end of each batch of runs, inside the same call,
	 * which a kill does not cut short (it is seen between batches). */
	m->sent++;
	return XDP_TX;
}

int pump_tc(struct __sk_buff *skb)
{
	u32 zero = 0, len;
	struct srmig_pump_mark *m = pump_mark.lookup(&zero);
	struct srmig_pump_slot *s;
	long rc;

	if (!m)
		return TC_ACT_SHOT;
	s = next_slot(m);
	if (!s)
		return TC_ACT_SHOT;
	len = s->len;
	if (bpf_skb_change_tail(skb, len, 0)) {
		m->err = -EMSGSIZE;
		return TC_ACT_SHOT;
	}
	/* The whole frame, Ethernet header too: BPF_PROG_RUN's skb starts at its MAC header (a tc program's). */
	if (bpf_skb_store_bytes(skb, 0, s->frame, bounded_len(len), 0)) {
		m->err = -EFAULT;
		return TC_ACT_SHOT;
	}
	/* Egress of the link, now: dev_queue_xmit's verdict comes back (NET_XMIT_DROP: the qdisc dropped it). */
	rc = bpf_clone_redirect(skb, m->ifindex, 0);
	if (rc && rc != NET_XMIT_CN) {
		m->err = (s32)rc;
		return TC_ACT_SHOT;
	}
	m->sent++;
	return TC_ACT_OK;
}
