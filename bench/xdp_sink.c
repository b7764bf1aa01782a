/* The benchmark's sink: counts every frame that reaches it (per CPU) and drops it, so the receiving side
 * costs as little as possible and the count is exact (bench/local.py reads `rx`).
 *
 * xdp_sink_classify (attached only to check what arrives, never while measuring: it reads the frame) also
 * counts the frames that carry an SRH (IPv6, next header 43, routing type 4) in rx[1]: the encap paths'
 * frames must be SRv6 at the sink, the plain forwarding path's must not. */
#include <uapi/linux/bpf.h>
#include <uapi/linux/if_ether.h>
#include <uapi/linux/ipv6.h>

#define ETH_P_IPV6_BE 0xDD86 /* htons(ETH_P_IPV6) */
#define IPPROTO_ROUTING_ 43
#define SRH_TYPE 4

BPF_PERCPU_ARRAY(rx, u64, 2); /* [0] every frame, [1] SRv6 frames (xdp_sink_classify only) */

static __always_inline void bump(u32 key)
{
	u64 *count = rx.lookup(&key);

	if (count)
		*count += 1;
}

int xdp_sink(struct xdp_md *ctx)
{
	bump(0);
	return XDP_DROP;
}

int xdp_sink_classify(struct xdp_md *ctx)
{
	void *data = (void *)(long)ctx->data;
	void *data_end = (void *)(long)ctx->data_end;
	struct ethhdr *eth = data;
	struct ipv6hdr *ip6h = (void *)(eth + 1);
	u8 *srh = (void *)(ip6h + 1);

	bump(0);
	if (srh + 3 > (u8 *)data_end)
		return XDP_DROP;
	if (eth->h_proto == ETH_P_IPV6_BE && ip6h->nexthdr == IPPROTO_ROUTING_ && srh[2] == SRH_TYPE)
		bump(1);
	return XDP_DROP;
}
