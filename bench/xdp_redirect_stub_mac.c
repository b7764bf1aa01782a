/* The redirect stub that also swaps the frame's Ethernet addresses, as the kernel's samples/bpf
 * xdp_redirect_map does: the floor of an XDP forwarder that reads and writes the frame's first cache line,
 * as every real one must (bench/xdp_redirect_stub.c never touches the frame). With the live generator
 * writing each frame's headers on the other core, that first read is a cross-core cache miss: srmig pays
 * it, the bare stub does not (bench/local.py reports End.S against both). */
#include <uapi/linux/bpf.h>
#include <linux/if_ether.h>

BPF_ARRAY(egress, u32, 1);

int xdp_redirect_stub_mac(struct xdp_md *ctx)
{
	void *data = (void *)(long)ctx->data;
	void *data_end = (void *)(long)ctx->data_end;
	struct ethhdr *eth = data;
	u8 tmp[ETH_ALEN];
	u32 key = 0;
	u32 *ifindex = egress.lookup(&key);

	if (!ifindex || !*ifindex)
		return XDP_ABORTED;
	if (data + sizeof(*eth) > data_end)
		return XDP_DROP;
	__builtin_memcpy(tmp, eth->h_source, ETH_ALEN);
	__builtin_memcpy(eth->h_source, eth->h_dest, ETH_ALEN);
	__builtin_memcpy(eth->h_dest, tmp, ETH_ALEN);
	return bpf_redirect(*ifindex, 0);
}
