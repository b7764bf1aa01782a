/* srmig ingress: H.Encaps (RFC 8986 5.1) in BPF, on the egress path of the ingress's fabric interface (tc
 * clsact egress, direct action), so srmig needs no SRv6 in the kernel.
 *
 * An IPv6 or IPv4 packet whose destination is a VM in encap_table (IPv4 keyed IPv4-mapped, srmig_abi.h) leaves
 * inside an outer IPv6 header (source and first SID from the entry, hop limit from the entry, traffic class
 * copied from the inner packet, flow label from the inner flow's hash for ECMP) and the SRH userspace built
 * for the VM's segment list, whose next header names the inner family (41 IPv6, 4 IPv4: RFC 8986 5.1). The
 * inner packet is untouched. Locally originated and forwarded packets alike pass here, TCP super-packets
 * (GSO/TSO) included: bpf_skb_adjust_room(..., BPF_F_ADJ_ROOM_ENCAP_L3_IPV6) marks them for software
 * segmentation after the encapsulation (IPv6 + SRH + IPv6 or IPv4 + TCP) and shrinks their segment size by
 * the bytes it adds.
 *
 * After H.Encaps the packet is sent towards its new destination, the first SID (route_outer(): a FIB lookup,
 * as the kernel's seg6 encap does with its dst), not to the next hop the kernel chose for the VM's address.
 *
 * parse (inner_ipv6() / inner_ipv4()) -> encap_table lookup (else encap_prefixes, then encap_table) ->
 * h_encaps() -> route_outer() -> one exit that counts. Map sizes come from userspace (SRMIG_MAX_VMS,
 * SRMIG_MAX_VM_PREFIXES).
 */
#include <uapi/linux/bpf.h>
#include <uapi/linux/if_ether.h>
#include <uapi/linux/in6.h>
#include <uapi/linux/ip.h>
#include <uapi/linux/ipv6.h>
#include <uapi/linux/pkt_cls.h>
#include <linux/stddef.h>

#include "srmig_abi.h"

#ifndef SRMIG_MAX_VMS
#define SRMIG_MAX_VMS 65536
#endif
#ifndef SRMIG_MAX_VM_PREFIXES
#define SRMIG_MAX_VM_PREFIXES 16384
#endif
#define BPF_F_NO_PREALLOC_ 1
#define ETH_P_IPV6_BE 0xDD86 /* htons(ETH_P_IPV6) */
#define ETH_P_IP_BE 0x0008   /* htons(ETH_P_IP) */
#define IPPROTO_ROUTING_ 43
#define IPPROTO_IPV6_ 41
#define IPPROTO_IPIP_ 4

/* Not preallocated: memory follows the VMs present. */
BPF_F_TABLE("hash", struct srmig_encap_key, struct srmig_encap_value, encap_table, SRMIG_MAX_VMS,
	    BPF_F_NO_PREALLOC_);
BPF_F_TABLE("percpu_hash", struct srmig_encap_key, struct srmig_encap_vm_stats, encap_vm_stats, SRMIG_MAX_VMS,
	    BPF_F_NO_PREALLOC_);
BPF_PERCPU_ARRAY(encap_stats, __u64, SRMIG_ENCAP_MAX);
/* The prefixes VMs route (srmig_abi.h), to the encap_table key of the prefix's own entry (its network address:
 * an entry of the prefix's family, whose SRH next header fits its packets); only walked when encap_table
 * misses. */
BPF_LPM_TRIE(encap_prefixes, struct srmig_vm_prefix_key, struct srmig_encap_key, SRMIG_MAX_VM_PREFIXES);

_Static_assert(SRMIG_ENCAP_SRH_MAX == 8 + 16 * SRMIG_ENCAP_MAX_SEGS, "SRH room for the longest list");
_Static_assert(sizeof(((struct srmig_encap_value *)0)->srh) == SRMIG_ENCAP_SRH_MAX, "srh[] holds the longest SRH");

/* bpf_skb_store_bytes needs a length the verifier can bound: one constant per list length (a store of a
 * variable length, or a loop over the segments, was rejected by the verifier). */
#define STORE_SRH(entries)                                                                                   \
	case 8 + 16 * (entries):                                                                             \
		return bpf_skb_store_bytes(skb, off, e->srh, 8 + 16 * (entries), 0)

static __always_inline int store_srh(struct __sk_buff *skb, __u32 off, struct srmig_encap_value *e)
{
	switch (e->srh_len) {
	case 0:
		return 0;
	STORE_SRH(1);
	STORE_SRH(2);
	STORE_SRH(3);
	STORE_SRH(4);
	STORE_SRH(5);
	STORE_SRH(6);
	default:
		return -1;
	}
}

/* What H.Encaps takes from the inner packet. */
struct inner {
	__u8 tclass;     /* IPv6 traffic class, or IPv4 TOS byte (DSCP + ECN): copied to the outer header */
	__u8 nexthdr;    /* its protocol number, the SRH's next header: IPPROTO_IPV6_ or IPPROTO_IPIP_ */
	__u8 well_formed; /* 0: not encapsulated, dropped as SRMIG_ENCAP_DROP_MALFORMED */
};

/* The IPv6 packet's destination as the encap_table key. Returns 0, or -1 when it is no VM's: shorter than an
 * IPv6 header (the kernel judges it), or to an IPv4-mapped address, which are IPv4 VMs' keys and never on
 * the wire (RFC 4291 2.5.5.2), so an IPv6 packet must not take an IPv4 VM's list. */
static __always_inline int inner_ipv6(struct __sk_buff *skb, struct srmig_encap_key *key, struct inner *in)
{
	struct ipv6hdr ip6h;
	const __u32 *w = (const __u32 *)key->addr;

	if (bpf_skb_load_bytes(skb, ETH_HLEN, &ip6h, sizeof(ip6h)))
		return -1;
	__builtin_memcpy(key->addr, &ip6h.daddr, 16);
	if (w[0] == 0 && w[1] == 0 && w[2] == 0xFFFF0000) /* 00 00 ff ff read little-endian */
		return -1;
	in->tclass = (bpf_ntohl(*(const __be32 *)&ip6h) >> 20) & 0xff;
	in->nexthdr = IPPROTO_IPV6_;
	in->well_formed = 1;
	return 0;
}

/* The IPv4 packet's destination as the encap_table key, ::ffff:a.b.c.d (srmig_abi.h). Returns 0, or -1 when
 * it is shorter than an IPv4 header (the kernel judges it). Only a well-formed header is encapsulated
 * (RFC 791 3.1: version 4, IHL >= 5 words, total length covering the header and within the frame); judged
 * after the lookup, so a malformed packet to no VM of ours passes as it would without srmig. The checksum is
 * neither checked nor changed: H.Encaps leaves the inner packet alone, its receiver judges it. */
static __always_inline int inner_ipv4(struct __sk_buff *skb, struct srmig_encap_key *key, struct inner *in)
{
	struct iphdr iph;
	__u32 *w = (__u32 *)key->addr;
	__u32 avail = skb->len - ETH_HLEN;
	__u32 tot_len;

	if (bpf_skb_load_bytes(skb, ETH_HLEN, &iph, sizeof(iph)))
		return -1;
	w[0] = 0;
	w[1] = 0;
	w[2] = 0xFFFF0000; /* bytes 00 00 ff ff read little-endian, as srmig.c's v4_mapped() */
	w[3] = iph.daddr;
	in->tclass = iph.tos;
	in->nexthdr = IPPROTO_IPIP_;
	tot_len = bpf_ntohs(iph.tot_len);
	/* BIG TCP (Linux 6.3): a GSO packet above 64 KiB carries total length 0; the kernel's iph_totlen() reads
	 * the skb's length instead, and so do we. */
	if (tot_len == 0 && skb->gso_size)
		tot_len = avail;
	in->well_formed = iph.version == 4 && iph.ihl >= 5 && tot_len >= (__u32)iph.ihl * 4 && tot_len <= avail;
	return 0;
}

/* Traffic class copied from the inner header (RFC 2473 6.5 style; ECN copied as RFC 6040's normal mode
 * does), flow label from the flow's hash (RFC 6437: a function of the inner 5-tuple, so ECMP in the fabric
 * keeps a flow on one path). Returns the first 32 bits of the outer header, network byte order. */
static __always_inline __be32 outer_vtcfl(struct __sk_buff *skb, const struct inner *in)
{
	__u32 hash = bpf_get_hash_recalc(skb);
	__u32 label = (hash ^ (hash >> 20)) & 0xfffff;

	return bpf_htonl((6U << 28) | ((__u32)in->tclass << 20) | label);
}

/* RFC 8986 5.1 H.Encaps: push an outer IPv6 header and the SRH in front of the packet's IPv6 or IPv4 header.
 * The outer hop limit is the entry's, whatever the inner hop limit or TTL (RFC 2473 6.3: the tunnel is a
 * hop of its own; the kernel already decremented a forwarded packet's). Returns SRMIG_ENCAP_DONE or the
 * reason it could not. */
static __always_inline __u32 h_encaps(struct __sk_buff *skb, const struct inner *in, struct srmig_encap_value *e)
{
	__u32 srh_len = e->srh_len;
	__u32 grow = sizeof(struct ipv6hdr) + srh_len;
	__u32 mtu_len = 0;
	struct ipv6hdr outer;

	if (srh_len > SRMIG_ENCAP_SRH_MAX)
		return SRMIG_ENCAP_DROP_BAD_ENTRY;
	/* The SRH's next header is written by userspace from the key's family; a packet of the other family
	 * cannot reach this entry (inner_ipv6() refuses IPv4-mapped destinations), and this keeps it so. */
	if (srh_len && e->srh[0] != in->nexthdr)
		return SRMIG_ENCAP_DROP_BAD_ENTRY;
	/* bpf_skb_adjust_room does not check the MTU: a non-GSO packet that would no longer fit is dropped here,
	 * counted, rather than silently by the device. A GSO super-packet passes: its segment size shrinks. */
	if (bpf_check_mtu(skb, 0, &mtu_len, (__s32)grow, 0) != BPF_MTU_CHK_RET_SUCCESS)
		return SRMIG_ENCAP_DROP_TOO_BIG;

	__builtin_memset(&outer, 0, sizeof(outer));
	*(__be32 *)&outer = outer_vtcfl(skb, in);
	/* Computed before growing: the inner packet and the SRH. (GSO rewrites it per segment.) */
	outer.payload_len = bpf_htons(skb->len - ETH_HLEN + srh_len);
	outer.nexthdr = srh_len ? IPPROTO_ROUTING_ : in->nexthdr;
	outer.hop_limit = e->hop_limit;
	__builtin_memcpy(&outer.saddr, e->src, 16);
	__builtin_memcpy(&outer.daddr, e->first_sid, 16);

	/* For an IPv4 packet this also turns skb->protocol into IPv6 (ENCAP_L3_IPV6 names the new outer L3). */
	if (bpf_skb_adjust_room(skb, (__s32)grow, BPF_ADJ_ROOM_MAC, BPF_F_ADJ_ROOM_ENCAP_L3_IPV6))
		return SRMIG_ENCAP_DROP_ROOM;
	/* The Ethernet header the kernel built for an IPv4 packet still says IPv4: route_outer() rewrites it
	 * when the FIB resolves the first SID, and this keeps it right when it does not. */
	if (in->nexthdr == IPPROTO_IPIP_) {
		__be16 proto = ETH_P_IPV6_BE;

		if (bpf_skb_store_bytes(skb, offsetof(struct ethhdr, h_proto), &proto, sizeof(proto), 0))
			return SRMIG_ENCAP_DROP_STORE;
	}
	/* IPv6 has no header checksum, and a CHECKSUM_PARTIAL offset counts from the buffer's start: nothing to
	 * fix up after these writes. */
	if (bpf_skb_store_bytes(skb, ETH_HLEN, &outer, sizeof(outer), 0))
		return SRMIG_ENCAP_DROP_STORE;
	if (store_srh(skb, ETH_HLEN + sizeof(outer), e))
		return SRMIG_ENCAP_DROP_STORE;
	return SRMIG_ENCAP_DONE;
}

/* bcc 0.26 declares bpf_redirect_neigh with three arguments; the kernel's (>= 5.13) takes four. */
static long (*redirect_neigh)(__u32 ifindex, void *params, int plen, __u64 flags) =
	(void *)BPF_FUNC_redirect_neigh;

/* Send the encapsulated packet towards its outer destination: the kernel routed it by the VM's address,
 * and the next hop towards the first SID may be another one (several hosts on one segment) or another
 * interface. Returns the tc action. A destination the FIB cannot resolve keeps the VM route's next hop. */
static __always_inline int route_outer(struct __sk_buff *skb)
{
	struct bpf_fib_lookup fib = {};
	struct ethhdr eth;
	int rc;

	if (bpf_skb_load_bytes(skb, ETH_HLEN + offsetof(struct ipv6hdr, saddr), fib.ipv6_src, 32))
		return TC_ACT_OK;
	fib.family = 10; /* AF_INET6 */
	fib.ifindex = skb->ifindex;
	/* tot_len 0: the FIB checks the packet against the egress device's MTU itself (GSO packets pass). */
	rc = bpf_fib_lookup(skb, &fib, sizeof(fib), BPF_FIB_LOOKUP_OUTPUT);
	if (rc == BPF_FIB_LKUP_RET_NO_NEIGH)
		return redirect_neigh(fib.ifindex, NULL, 0, 0); /* the kernel resolves the neighbour */
	if (rc != BPF_FIB_LKUP_RET_SUCCESS)
		return TC_ACT_OK;
	__builtin_memcpy(eth.h_dest, fib.dmac, ETH_ALEN);
	__builtin_memcpy(eth.h_source, fib.smac, ETH_ALEN);
	eth.h_proto = ETH_P_IPV6_BE;
	if (bpf_skb_store_bytes(skb, 0, &eth, sizeof(eth), 0))
		return TC_ACT_OK;
	if (fib.ifindex == skb->ifindex)
		return TC_ACT_OK; /* on its way out of this interface already */
	return bpf_redirect(fib.ifindex, 0);
}

static __always_inline void count(__u32 counter, struct srmig_encap_vm_stats *vs, __u32 bytes)
{
	__u64 *n = encap_stats.lookup(&counter);

	if (n)
		*n += 1;
	if (!vs)
		return;
	if (counter == SRMIG_ENCAP_DONE) {
		vs->packets++;
		vs->bytes += bytes;
	} else {
		vs->dropped++;
	}
}

int srmig_encap(struct __sk_buff *skb)
{
	struct srmig_encap_vm_stats *vs = NULL;
	struct srmig_encap_value *e;
	struct srmig_encap_key key;
	struct inner in;
	__u32 counter = SRMIG_ENCAP_PASS;
	__u32 bytes = skb->len - ETH_HLEN;

	if (skb->protocol == ETH_P_IPV6_BE) {
		if (inner_ipv6(skb, &key, &in))
			goto out;
	} else if (skb->protocol == ETH_P_IP_BE) {
		if (inner_ipv4(skb, &key, &in))
			goto out;
	} else {
		goto out; /* ARP, VLAN...: not ours */
	}
	e = encap_table.lookup(&key);
	if (!e) {
		/* Not one of the addresses: one of the prefixes, whose entry then stands for the key. */
		struct srmig_vm_prefix_key pk = { .prefixlen = 128 };
		struct srmig_encap_key *owner;

		__builtin_memcpy(pk.addr, key.addr, 16);
		owner = encap_prefixes.lookup(&pk);
		if (!owner)
			goto out; /* not to a VM we steer (or already encapsulated: its DA is a SID) */
		key = *owner;
		e = encap_table.lookup(&key);
		if (!e)
			goto out; /* the prefix being written or removed: as without it */
	}
	vs = encap_vm_stats.lookup(&key);
	counter = in.well_formed ? h_encaps(skb, &in, e) : SRMIG_ENCAP_DROP_MALFORMED;
	if (counter == SRMIG_ENCAP_DONE) {
		count(counter, vs, bytes);
		return route_outer(skb);
	}
out:
	count(counter, vs, bytes);
	return counter == SRMIG_ENCAP_PASS ? TC_ACT_OK : TC_ACT_SHOT;
}
