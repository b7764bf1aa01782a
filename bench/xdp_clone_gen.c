/* The clone generator (bench/local.py --generator clone): several Mpps on kernels that refuse
 * BPF_PROG_RUN live frames, with no userspace in the per-frame path.
 *
 *     seed frames ---> (lp0) ====== (lp1) [xdp_clone_gen] ---- broadcast ----> (g0) ------> (d_in) DUT
 *     (packet socket,     ^                   |  fan_N: N x g0 + lp0 (last)
 *      once per run)      +--- the seed, -----+
 *                             looping
 *
 * A few seed frames (one per distinct frame of the sequence: one, or IMIX's twelve) are written once into
 * veth lp0. On its peer lp1 this program redirects each seed with BPF_F_BROADCAST into a devmap that holds
 * g0 N times and lp0 last: the kernel clones the frame N times (xdpf_clone: a page and a copy each) and
 * sends the clones out of g0 with ndo_xdp_xmit, so the DUT's d_in receives XDP frames as from a NIC (the
 * way live frames arrive, and unlike clones of an skb, which a native-XDP veth would copy once more on the
 * DUT's core); the original, last in the map, goes back out of lp0 into lp1 and comes round again. The loop
 * runs in lp1's NAPI poll (threaded, on the generator's CPU): one program run per N frames.
 *
 * Why fan maps of 1, 2, 4, 8, 16 and 32: a broadcast sends to every entry, so the count is chosen by the
 * map. A group of up to GROUP_MAX frames leaves as the largest power of two not above what is due; at the
 * end of a run the last frames leave in smaller groups: a run sends exactly `limit` frames.
 *
 * Order: each seed carries its number in the XDP metadata (4 bytes in front of the frame, which survive the
 * loop: veth keeps an xdp_frame's metadata; the clones carry them too, and the DUT's programs never read
 * them), given on its first pass in the order the seeds were written; a seed sends only on its turn
 * (groups % seeds), so the frames leave as the sequence, GROUP_MAX of each in a row, paced or not. (Counting
 * arrivals instead fails: the first seed comes round before the last is written.)
 *
 * Pacing, as in xdp_live_gen.c: a group is due when the clock passes next_ps; a seed that comes round
 * early only loops (a plain redirect to lp0), so the generator spins on its own CPU like a NIC's
 * coalescing timer and the DUT gets groups of `group` frames back to back. A generator that fell behind
 * catches up by at most BURST frames and forgets the rest of its backlog.
 *
 * Why the loop always ends by itself: after `limit` frames, at stop_ns (userspace always sets one) or when
 * userspace sets `stop`, each seed is dropped as it comes round; `retired` counts them, so userspace knows
 * when no seed is left and the next run may start.
 *
 * Flows: the seed's last two bytes of the inner source are rewritten before each group (0..flows-1), so
 * every frame of a group carries the same flow and consecutive groups differ (trafgen's dinc varies it
 * per frame; the DUT's per-flow state sees as many flows either way). */
#include <uapi/linux/bpf.h>

#define GROUP_MAX 32
#define BURST 128
#define FLOW_OFF_MAX 255

struct clone_cfg {
	u64 interval_ps; /* time between frames; 0: as fast as possible */
	u64 limit;       /* frames to send */
	u64 stop_ns;     /* bpf_ktime_get_ns() from which nothing is sent and seeds retire */
	u32 group;       /* frames per group, 1..GROUP_MAX */
	u32 flows;
	u32 flow_off;    /* offset of the inner source's last 2 bytes */
	u32 loop_ifindex; /* lp0: where a seed goes to come round again */
	u32 stop;        /* userspace: retire every seed now */
	u32 seeds;       /* seeds in the loop: they come round in the order they were written */
};

/* One writer: every seed is handled by lp1's one NAPI instance. */
struct clone_state {
	u64 sent;
	u64 next_ps;  /* when the next group is due, bpf_ktime_get_ns() x 1000 */
	u64 groups;
	u64 retired;  /* seeds dropped at the end of a run */
	u64 failed;   /* broadcasts the helper refused: the seed is dropped and the run stops short */
	u64 seen;     /* seeds numbered so far (in their metadata, on their first pass) */
	u64 strays;   /* frames that came to the loop beyond the run's seeds, dropped */
};

BPF_ARRAY(cfg, struct clone_cfg, 1);
BPF_ARRAY(state, struct clone_state, 1);
/* A devmap entry as the kernel reads it (struct bpf_devmap_val): the interface, and the fd of a program to
 * run on each frame as it leaves there (BPF_XDP_DEVMAP; 0: none). */
struct fan_val {
	u32 ifindex;
	int prog_fd;
};

/* fan_N: entries 0..N-1 = g0, entry N = lp0 (userspace fills them; the original frame goes to the last). */
BPF_XDP_REDIRECT_MAP("devmap", struct fan_val, fan1, 2);
BPF_XDP_REDIRECT_MAP("devmap", struct fan_val, fan2, 3);
BPF_XDP_REDIRECT_MAP("devmap", struct fan_val, fan4, 5);
BPF_XDP_REDIRECT_MAP("devmap", struct fan_val, fan8, 9);
BPF_XDP_REDIRECT_MAP("devmap", struct fan_val, fan16, 17);
BPF_XDP_REDIRECT_MAP("devmap", struct fan_val, fan32, 33);

/* Sequence numbers (the drain benchmark, bench/drain.py: loss, duplicates and order counted exactly). A
 * broadcast's clones are copies of one frame, so no number written into the seed can tell them apart:
 * xdp_clone_stamp runs on each clone as it leaves out of g0 (the devmap entries' egress program) and writes
 * the next number, big-endian, at `off`. The clones of one CPU's bulk queue leave in the order they are
 * numbered; the loop runs on one CPU. */
struct stamp_cfg {
	u64 next;  /* the number the next frame gets; userspace sets 0 before a run */
	u32 off;   /* where the 8 bytes go, from the frame's start */
	u32 pad;
};

BPF_ARRAY(stamp, struct stamp_cfg, 1);

#define STAMP_OFF_MAX 1023

int xdp_clone_stamp(struct xdp_md *ctx)
{
	void *data = (void *)(long)ctx->data;
	void *data_end = (void *)(long)ctx->data_end;
	u32 zero = 0;
	struct stamp_cfg *s = stamp.lookup(&zero);
	u64 seq;
	u8 *p;

	if (!s)
		return XDP_DROP;
	p = data + (s->off & STAMP_OFF_MAX);
	if (p + 8 > (u8 *)data_end)
		return XDP_DROP;
	seq = __sync_fetch_and_add(&s->next, 1);
	p[0] = seq >> 56;
	p[1] = seq >> 48;
	p[2] = seq >> 40;
	p[3] = seq >> 32;
	p[4] = seq >> 24;
	p[5] = seq >> 16;
	p[6] = seq >> 8;
	p[7] = seq;
	return XDP_PASS;
}

int xdp_clone_gen(struct xdp_md *ctx)
{
	u32 zero = 0, flow, off;
	struct clone_cfg *c = cfg.lookup(&zero);
	struct clone_state *st = state.lookup(&zero);
	void *data = (void *)(long)ctx->data;
	void *data_end = (void *)(long)ctx->data_end;
	void *meta = (void *)(long)ctx->data_meta;
	u64 now, now_ps, due, n, left;
	u32 *seed;
	u8 *p;
	int rc;

	if (!c || !st)
		return XDP_ABORTED;
	if (meta == data) {
		/* A seed's first pass (from the packet socket: no metadata yet). Seeds come first in the order
		 * they were written: number them so. Anything beyond the run's seeds is not ours (the loop veth
		 * has IPv6 off, so the kernel sends nothing there, but a frame that got there anyway must not
		 * become a seed): drop it. */
		if (st->seen >= c->seeds) {
			st->strays++;
			return XDP_DROP;
		}
		if (bpf_xdp_adjust_meta(ctx, -(int)sizeof(u32)))
			return XDP_ABORTED;
		data = (void *)(long)ctx->data;
		data_end = (void *)(long)ctx->data_end;
		seed = (void *)(long)ctx->data_meta;
		if ((void *)(seed + 1) > data)
			return XDP_ABORTED;
		*seed = (u32)st->seen++;
	} else {
		seed = meta;
		if ((void *)(seed + 1) > data)
			return XDP_ABORTED;
	}
	now = bpf_ktime_get_ns();
	if (c->stop || st->sent >= c->limit || now >= c->stop_ns) {
		st->retired++;
		return XDP_DROP;
	}
	/* Groups leave in the sequence's order: a seed sends only on its turn (IMIX stays 7:4:1, in order, when
	 * pacing makes seeds pass without sending). */
	if (c->seeds > 1 && *seed != st->groups % c->seeds)
		return bpf_redirect(c->loop_ifindex, 0);
	left = c->limit - st->sent;
	due = c->group ? c->group : 1;
	if (due > GROUP_MAX)
		due = GROUP_MAX;
	if (c->interval_ps) {
		now_ps = now * 1000;
		if (now_ps < st->next_ps)
			return bpf_redirect(c->loop_ifindex, 0); /* ahead of the clock: round again */
		if (st->next_ps + BURST * c->interval_ps < now_ps)
			st->next_ps = now_ps - BURST * c->interval_ps;
	}
	if (due > left)
		due = left;
	n = due >= 32 ? 32 : due >= 16 ? 16 : due >= 8 ? 8 : due >= 4 ? 4 : due >= 2 ? 2 : 1;

	if (c->flows > 1) {
		flow = (u32)(st->groups % c->flows);
		off = c->flow_off & FLOW_OFF_MAX;
		p = data + off;
		if (p + 2 > (u8 *)data_end)
			return XDP_ABORTED;
		p[0] = flow >> 8; /* network byte order */
		p[1] = flow & 0xff;
	}
	switch (n) {
	case 32: rc = fan32.redirect_map(0, BPF_F_BROADCAST); break;
	case 16: rc = fan16.redirect_map(0, BPF_F_BROADCAST); break;
	case 8: rc = fan8.redirect_map(0, BPF_F_BROADCAST); break;
	case 4: rc = fan4.redirect_map(0, BPF_F_BROADCAST); break;
	case 2: rc = fan2.redirect_map(0, BPF_F_BROADCAST); break;
	default: rc = fan1.redirect_map(0, BPF_F_BROADCAST); break;
	}
	if (rc != XDP_REDIRECT) {
		st->failed++;
		return XDP_DROP;
	}
	st->sent += n;
	st->groups++;
	if (c->interval_ps)
		st->next_ps += n * c->interval_ps;
	return XDP_REDIRECT;
}
