/* The benchmark's sink: counts every frame that reaches it (per CPU) and drops it, so the receiving side
 * costs as little as possible and the count is exact (bench/local.py reads `rx`). */
#include <uapi/linux/bpf.h>

BPF_PERCPU_ARRAY(rx, u64, 1);

int xdp_sink(struct xdp_md *ctx)
{
	u32 key = 0;
	u64 *count = rx.lookup(&key);

	if (count)
		*count += 1;
	return XDP_DROP;
}
