/* The test guest's XDP echo responder (srmig/testbed/echo_xdp.py compiles it with bcc and wraps the
 * instructions in the ELF object the guest's iproute2 loads): an ICMPv6 Echo Request or ICMP Echo on eth0
 * goes back out of eth0 as the Echo Reply (XDP_TX), before the guest's stack sees it. Anything else:
 * XDP_PASS.
 *
 * The guest runs this function alone: no maps, no helper or function calls (echo_xdp.py refuses
 * instructions with any), so every static function here is always inlined. */
#include <uapi/linux/bpf.h>
#include <uapi/linux/if_ether.h>
#include <uapi/linux/in.h>
#include <uapi/linux/ip.h>
#include <uapi/linux/ipv6.h>

#define ETH_P_IPV6_BE 0xDD86 /* htons(0x86DD): the frame's EtherType as a little-endian load sees it */
#define ETH_P_IP_BE 0x0008   /* htons(0x0800) */
#define ICMP_ECHO_ 8           /* RFC 792 */
#define ICMP_ECHOREPLY_ 0
#define ICMPV6_ECHO_REQUEST_ 128 /* RFC 4443 4.1, 4.2 */
#define ICMPV6_ECHO_REPLY_ 129

/* The ICMP and ICMPv6 echo header (RFC 792, RFC 4443 4.1): the same layout for both. */
struct echo_hdr {
	__u8 type;
	__u8 code;
	__u16 checksum;
	__u16 id;
	__u16 sequence;
};

/* RFC 1624 eqn. 3: HC' = ~(~HC + ~m + m'), for one changed 16-bit word. The words are used as loaded: a
 * one's complement sum does not depend on byte order, as long as every word is in the same one. */
static __always_inline void csum_replace(__u16 *sum, __u16 old, __u16 new)
{
	__u32 c = (__u16)~*sum + (__u16)~old + new;

	c = (c & 0xffff) + (c >> 16); /* three 16-bit words: two folds take every carry back in */
	c = (c & 0xffff) + (c >> 16);
	*sum = ~c;
}

/* The echo becomes its reply: type changed, checksum updated. The swapped addresses (below) leave the
 * checksum alone: the pseudo-header of ICMPv6 (RFC 4443 2.3) sums source and destination, in either order. */
static __always_inline void echo_reply(struct echo_hdr *echo, __u8 type)
{
	__u16 *word = (__u16 *)echo; /* type and code, the word the checksum saw */
	__u16 old = *word;

	echo->type = type;
	csum_replace(&echo->checksum, old, *word);
}

static __always_inline void swap_macs(struct ethhdr *eth)
{
	unsigned char tmp[ETH_ALEN];

	__builtin_memcpy(tmp, eth->h_source, ETH_ALEN);
	__builtin_memcpy(eth->h_source, eth->h_dest, ETH_ALEN);
	__builtin_memcpy(eth->h_dest, tmp, ETH_ALEN);
}

/* IPv6 without extension headers (the probe sends none; RFC 8200 4 would have them walked) and ICMPv6 128.
 * The hop limit is left as it arrived. */
static __always_inline int echo_v6(struct ethhdr *eth, void *data_end)
{
	struct ipv6hdr *ip6h = (void *)(eth + 1);
	struct echo_hdr *echo = (void *)(ip6h + 1);
	struct in6_addr tmp;

	if ((void *)(echo + 1) > data_end)
		return XDP_PASS;
	if (ip6h->nexthdr != IPPROTO_ICMPV6 || echo->type != ICMPV6_ECHO_REQUEST_)
		return XDP_PASS;
	swap_macs(eth);
	tmp = ip6h->saddr;
	ip6h->saddr = ip6h->daddr;
	ip6h->daddr = tmp;
	echo_reply(echo, ICMPV6_ECHO_REPLY_);
	return XDP_TX;
}

/* IPv4 with IHL 5 (no options) and ICMP 8. Swapping the addresses keeps the IPv4 header's sum, so its
 * checksum stays; the TTL is left as it arrived. */
static __always_inline int echo_v4(struct ethhdr *eth, void *data_end)
{
	struct iphdr *iph = (void *)(eth + 1);
	struct echo_hdr *echo = (void *)(iph + 1);
	__be32 tmp;

	if ((void *)(echo + 1) > data_end)
		return XDP_PASS;
	if (iph->version != 4 || iph->ihl != 5 || iph->protocol != IPPROTO_ICMP || echo->type != ICMP_ECHO_)
		return XDP_PASS;
	swap_macs(eth);
	tmp = iph->saddr;
	iph->saddr = iph->daddr;
	iph->daddr = tmp;
	echo_reply(echo, ICMP_ECHOREPLY_);
	return XDP_TX;
}

int srmig_echo(struct xdp_md *ctx)
{
	void *data = (void *)(long)ctx->data;
	void *data_end = (void *)(long)ctx->data_end;
	struct ethhdr *eth = data;

	if ((void *)(eth + 1) > data_end)
		return XDP_PASS;
	switch (eth->h_proto) {
	case ETH_P_IPV6_BE:
		return echo_v6(eth, data_end);
	case ETH_P_IP_BE:
		return echo_v4(eth, data_end);
	}
	return XDP_PASS;
}
