/* The XDP redirect stub: the floor for any XDP forwarder on this path. It parses nothing and redirects
 * every frame to the egress interface userspace wrote into `egress` (bench/local.py). srmig End.S forward
 * does everything this does plus parse, two lookups, the SRH step, the FIB step and the MAC rewrite. */
#include <uapi/linux/bpf.h>

BPF_ARRAY(egress, u32, 1);

int xdp_redirect_stub(struct xdp_md *ctx)
{
	u32 key = 0;
	u32 *ifindex = egress.lookup(&key);

	if (!ifindex || !*ifindex)
		return XDP_ABORTED;
	return bpf_redirect(*ifindex, 0);
}
