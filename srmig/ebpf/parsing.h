/* Header parsers over a cursor, in the xdp-tutorial manner: each returns the next protocol (or -1 when the
 * header runs past data_end) and moves the cursor past the header. One bounds-check idiom throughout:
 * `if ((void *)(p + 1) > data_end)`. BPF-only: nothing here is seen by userspace. */
#ifndef SRMIG_PARSING_H
#define SRMIG_PARSING_H

#define ETH_P_IPV6_BE 0xDD86 /* htons(0x86DD), usable in a switch without a function call */
#define ETH_P_IP_BE 0x0008   /* htons(0x0800) */
#define IPPROTO_HOPOPTS_ 0
#define IPPROTO_ROUTING_ 43
#define IPPROTO_DSTOPTS_ 60
#define IPPROTO_IPV6_ 41
#define IPPROTO_IPIP_ 4 /* an IPv4 packet as the SRH's next header (RFC 8986 4.6 End.DX4) */
#define SRMIG_MAX_EXT_HDRS 2 /* Hop-by-Hop and Destination Options may precede the SRH (RFC 8200 4.1) */
#define SRH_TYPE_SEGMENT_ROUTING 4 /* RFC 8754 2 */

struct hdr_cursor {
	void *pos;
};

/* RFC 8754 2: the Segment Routing Header. */
struct srh {
	__u8 nexthdr;
	__u8 hdrlen; /* in 8-octet units, not counting the first 8 */
	__u8 type;
	__u8 segments_left;
	__u8 last_entry;
	__u8 flags;
	__u16 tag;
	struct in6_addr segments[0];
};

struct ipv6_opt_hdr_ {
	__u8 nexthdr;
	__u8 hdrlen;
};

static __always_inline int parse_ethhdr(struct hdr_cursor *nh, void *data_end, struct ethhdr **ethhdr)
{
	struct ethhdr *eth = nh->pos;

	if ((void *)(eth + 1) > data_end)
		return -1;
	nh->pos = eth + 1;
	*ethhdr = eth;
	return eth->h_proto; /* network byte order */
}

static __always_inline int parse_ipv6hdr(struct hdr_cursor *nh, void *data_end, struct ipv6hdr **ip6hdr)
{
	struct ipv6hdr *ip6h = nh->pos;

	if ((void *)(ip6h + 1) > data_end)
		return -1;
	nh->pos = ip6h + 1;
	*ip6hdr = ip6h;
	return ip6h->nexthdr;
}

/* Skip Hop-by-Hop and Destination Options headers; returns the first other next-header value. */
static __always_inline int skip_ipv6_opts(struct hdr_cursor *nh, void *data_end, int nexthdr)
{
#pragma unroll
	for (int i = 0; i < SRMIG_MAX_EXT_HDRS; i++) {
		struct ipv6_opt_hdr_ *opt = nh->pos;

		if (nexthdr != IPPROTO_HOPOPTS_ && nexthdr != IPPROTO_DSTOPTS_)
			return nexthdr;
		if ((void *)(opt + 1) > data_end)
			return -1;
		nh->pos = (void *)opt + ((opt->hdrlen + 1) << 3);
		nexthdr = opt->nexthdr;
	}
	return nexthdr;
}

#endif
