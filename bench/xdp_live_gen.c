/* The live-frames generator (bench/local.py --generator live): run by BPF_PROG_RUN with
 * BPF_F_TEST_XDP_LIVE_FRAMES, ingress_ifindex = the generator's veth, it returns XDP_TX, which the kernel
 * turns into a redirect out of that veth (ndo_xdp_xmit): the frames arrive on the DUT's veth as XDP frames,
 * the way a NIC would hand them over, and the kernel's generator loop is not capped like trafgen's sendto.
 *
 * Why it rewrites the headers of every frame: in live mode the kernel fills each page with the frame given
 * to BPF_PROG_RUN only once and recycles pages as they come back (from the sink's XDP_DROP, through the
 * DUT), without rewriting them (Documentation/bpf/bpf_prog_run.rst). The DUT rewrites the headers it
 * processes (End.S: SL and DA; decapsulation: a new Ethernet header over the SRH; hop limits), so a
 * recycled page would carry the DUT's output. Copying the first HDR_BYTES from a template restores every
 * byte any path changes.
 *
 * Why templates and a sequence: one BPF_PROG_RUN has one frame. For IMIX, userspace passes the longest
 * frame; each frame sent is cut to template seq[i % seq_len]'s length. Flows: the last two bytes of the
 * inner source count 0..flows-1, like trafgen's dinc.
 *
 * Why the pacing is here: every BPF_PROG_RUN with repeat > 1 costs ~20 ms of set-up and tear-down on this
 * kernel (it registers the program with the XDP dispatcher and back), so userspace cannot pace with many
 * small runs. One run with a huge repeat count spins instead: a run ahead of the clock (interval_ps per
 * frame) returns XDP_DROP, which only recycles the page. After `limit` frames, or at stop_ns, every run
 * drops, and userspace interrupts the syscall with a signal (it returns EINTR). A generator that fell
 * behind (preempted on a shared machine) catches up in a burst of at most BURST frames, half a veth ring,
 * and forgets the rest of its backlog.
 *
 * Why frames leave in groups (`group`, e.g. 32): one frame at a time, each frame would wake the DUT's NAPI
 * thread on its own (the kernel flushes after every batch of runs, and a paced batch holds one frame); at
 * 100 kpps the wake-ups alone fill the DUT's core. A NIC coalesces interrupts; here a group of frames goes
 * back to back when the clock says the whole group is due, so the load is smooth at the scale of a ring
 * (256 frames) and the DUT polls many frames per wake-up.
 */
#include <uapi/linux/bpf.h>

#define HDR_BYTES 136 /* Ethernet 14 + outer IPv6 40 + SRH with 2 SIDs 40 + inner IPv6 40 = 134, rounded */
#define TMPL_MAX 4
#define SEQ_MAX 16
#define BURST 128

struct gen_tmpl {
	u32 len;      /* frame length */
	u32 flow_off; /* offset of the inner source's last 2 bytes */
	u8 hdr[HDR_BYTES];
};

struct gen_cfg {
	u32 seq_len;
	u32 flows;
	u64 interval_ps; /* time between frames; 0: as fast as possible */
	u64 limit;       /* frames to send */
	u64 stop_ns;     /* bpf_ktime_get_ns() from which nothing is sent; 0: no deadline */
	u32 group;       /* frames sent back to back once due (>= 1) */
	u32 pad;
};

/* One writer: a BPF_PROG_RUN runs its repetitions one after the other on one thread. */
struct gen_state {
	u64 sent;
	u64 next_ps;  /* when the next group is due, bpf_ktime_get_ns() x 1000 */
	u64 in_group; /* frames of the current group still to send */
};

BPF_ARRAY(tmpls, struct gen_tmpl, TMPL_MAX);
BPF_ARRAY(seq, u32, SEQ_MAX);
BPF_ARRAY(cfg, struct gen_cfg, 1);
BPF_ARRAY(state, struct gen_state, 1);

int xdp_live_gen(struct xdp_md *ctx)
{
	u32 zero = 0, pos, k, flow;
	struct gen_cfg *c = cfg.lookup(&zero);
	struct gen_state *st = state.lookup(&zero);
	struct gen_tmpl *t;
	u32 *slot;
	void *data, *data_end;
	u8 *p;
	u64 i, now = 0, now_ps, backlog;
	int delta;

	if (!c || !st || !c->seq_len)
		return XDP_ABORTED;
	if (st->sent >= c->limit)
		return XDP_DROP;
	if (c->stop_ns || c->interval_ps)
		now = bpf_ktime_get_ns();
	if (c->stop_ns && now >= c->stop_ns)
		return XDP_DROP;
	if (c->interval_ps) {
		if (!st->in_group) {
			now_ps = now * 1000;
			if (now_ps < st->next_ps)
				return XDP_DROP; /* ahead of the clock: no frame from this run */
			backlog = BURST * c->interval_ps;
			if (st->next_ps + backlog < now_ps)
				st->next_ps = now_ps - backlog;
			st->in_group = c->group ? c->group : 1;
			st->next_ps += st->in_group * c->interval_ps;
		}
		st->in_group--;
	}
	i = st->sent++;

	pos = (u32)(i % c->seq_len);
	slot = seq.lookup(&pos);
	if (!slot)
		return XDP_ABORTED;
	k = *slot;
	t = tmpls.lookup(&k);
	if (!t)
		return XDP_ABORTED;

	/* The frame we were given is the longest template, at least HDR_BYTES long (userspace pads it): the
	 * header goes in first, then the frame is cut to this template's length, which may be shorter than
	 * HDR_BYTES (a plain 78-byte IPv6 frame for the encap paths). */
	data = (void *)(long)ctx->data;
	data_end = (void *)(long)ctx->data_end;
	if (data + HDR_BYTES > data_end)
		return XDP_ABORTED;
	__builtin_memcpy(data, t->hdr, HDR_BYTES);

	if (c->flows > 1) {
		flow = (u32)(i % c->flows);
		p = data + (t->flow_off & 0xff);
		if (p + 2 > (u8 *)data_end)
			return XDP_ABORTED;
		p[0] = flow >> 8; /* network byte order */
		p[1] = flow & 0xff;
	}
	delta = (int)t->len - (int)(data_end - data);
	if (delta && bpf_xdp_adjust_tail(ctx, delta))
		return XDP_ABORTED;
	return XDP_TX;
}
