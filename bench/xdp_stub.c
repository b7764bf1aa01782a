/* The XDP_PASS stub: the baseline every benchmark in the same run is measured against. */
#include <uapi/linux/bpf.h>

int xdp_stub(struct xdp_md *ctx)
{
	return XDP_PASS;
}
