/* SRv6 steps shared by the behaviours, one small function each (as net/ipv6/seg6_local.c and cilium's
 * srv6.h do). Every function that changes the packet length re-loads data/data_end afterwards. */
#ifndef SRMIG_SRV6_H
#define SRMIG_SRV6_H

#include "parsing.h"

#define AF_INET_ 2
#define AF_INET6_ 10
#define IPV6_FLOWINFO_MASK_ 0xFFFFFF0F /* traffic class + flow label in network byte order */

/* RFC 8754 4.3.1.1 checks on the SRH at `nh->pos`. Returns SRMIG_DROP_NONE or the reason; on success *out
 * points at the SRH and the cursor is past it (at the upper-layer header). */
static __always_inline __u32 get_and_validate_srh(struct hdr_cursor *nh, void *data_end, struct srh **out)
{
	struct srh *srh = nh->pos;

	if ((void *)(srh + 1) > data_end)
		return SRMIG_DROP_TRUNCATED;
	if (srh->type != SRH_TYPE_SEGMENT_ROUTING)
		return SRMIG_DROP_SRH_TYPE;
	/* Each segment is 16 octets = 2 units of HdrExtLen; TLVs may follow the list (RFC 8754 2). */
	if (((__u32)srh->last_entry + 1) * 2 > srh->hdrlen)
		return SRMIG_DROP_SRH_LEN;
	if ((void *)srh + 8 + ((__u32)srh->hdrlen << 3) > data_end)
		return SRMIG_DROP_TRUNCATED;
	if (srh->segments_left > (__u32)srh->last_entry + 1)
		return SRMIG_DROP_SL_RANGE;
	nh->pos = (void *)srh + 8 + ((__u32)srh->hdrlen << 3);
	*out = srh;
	return SRMIG_DROP_NONE;
}

/* RFC 8986 4.1 End, S02-S15 minus the FIB lookup: Hop Limit check and decrement, SL-1, DA = Segment List[SL]. */
static __always_inline __u32 advance_nextseg(struct ipv6hdr *ip6h, struct srh *srh, void *data_end)
{
	struct in6_addr *seg;
	__u32 sl;

	if (!srh || srh->segments_left == 0)
		return SRMIG_DROP_SL_ZERO;
	if (ip6h->hop_limit <= 1)
		return SRMIG_DROP_HOP_LIMIT;
	sl = srh->segments_left - 1;
	seg = (void *)(srh + 1) + (sl << 4);
	if ((void *)(seg + 1) > data_end)
		return SRMIG_DROP_TRUNCATED;
	srh->segments_left = sl;
	ip6h->daddr = *seg;
	ip6h->hop_limit--;
	return SRMIG_DROP_NONE;
}

/* Encapsulated-mode delivery (End.DX6 / End.DX4-like, RFC 8986 4.5 S02, 4.6 S02): remove the outer IPv6
 * header and its extension headers (`outer_len` bytes after Ethernet), keep the Ethernet header with the
 * inner packet's ethertype (`h_proto`, network byte order). Returns SRMIG_DROP_NONE or the reason; the inner
 * packet then starts after the Ethernet header. */
static __always_inline __u32 decap(struct xdp_md *ctx, __u32 outer_len, __u16 h_proto)
{
	void *data = (void *)(long)ctx->data;
	void *data_end = (void *)(long)ctx->data_end;
	struct ethhdr *eth = data;
	struct ethhdr eth_copy;

	if ((void *)(eth + 1) > data_end)
		return SRMIG_DROP_TRUNCATED;
	eth_copy = *eth;
	if (bpf_xdp_adjust_head(ctx, (int)outer_len))
		return SRMIG_DROP_HEADROOM;
	data = (void *)(long)ctx->data;
	data_end = (void *)(long)ctx->data_end;
	eth = data;
	if ((void *)(eth + 1) > data_end)
		return SRMIG_DROP_TRUNCATED;
	eth_copy.h_proto = h_proto;
	*eth = eth_copy;
	return SRMIG_DROP_NONE;
}

#endif
