/* srmig ABI: everything userspace sees of the XDP program (map keys and values, enums, drop reasons).
 *
 * srmig/bpf/abi.py feeds the region between BEGIN ABI and END ABI to cffi, so Python uses these very
 * declarations; tests/test_abi.py compiles them with the C compiler and compares sizes and offsets.
 * Keep the region to plain structs, enums and integer #defines.
 * Numbering is append-only: never renumber, never reuse a retired value.
 */
#ifndef SRMIG_ABI_H
#define SRMIG_ABI_H

/* BEGIN ABI */
#define SRMIG_ABI_VERSION 10 /* 2: shadow ring, SRMIG_VM_F_SHADOW; 3: meta slots, next-hop cache;
                             * 4: SR domain (sr_domain map, SRMIG_META_DOMAIN_PREFIXES, OUTSIDE_DOMAIN);
                             * 5: SRMIG_VM_F_RING_FIRST, SRMIG_VM_F_PARK;
                             * 6: SRMIG_META_TABLE_GENERATION (lookup caches);
                             * 7: the ingress's H.Encaps program (encap_table, encap_stats, encap_vm_stats);
                             * 8: inner IPv4 (vm_table keys IPv4-mapped, SRMIG_DROP_INNER_MALFORMED,
                             *    inner_stats);
                             * 9: VM prefixes (vm_prefixes, encap_prefixes: LPM tries to a VM's id);
                             * 10: hold and shadow ring records sized to the packet */

/* Slots of the meta array map. */
enum srmig_meta {
	SRMIG_META_ABI_VERSION = 0,   /* written by the loader */
	SRMIG_META_NH_GENERATION = 1, /* bump after a route or neighbour change: cached next hops expire */
	SRMIG_META_DOMAIN_PREFIXES = 2, /* prefixes in sr_domain, kept by userspace: 0 = no SR domain check */
	SRMIG_META_TABLE_GENERATION = 3, /* bumped to an odd value before every write to sid_table, vm_table or
					  * vm_prefixes and to the next even one after it: the program's per-CPU
					  * copies of their entries are trusted only at this generation, and
					  * neither used nor made while it is odd (cache.h) */
	SRMIG_META_MAX = 4,
};

/* SRv6 endpoint behaviours (RFC 8986 names; End.S / End.SBUF are srmig's migration behaviours). */
enum srmig_behaviour {
	SRMIG_BEH_END = 1,         /* RFC 8986 4.1 End: transit, advance to the next segment */
	SRMIG_BEH_END_DX6_MAP = 2, /* steady state: deliver to the VM named by the inner DA, or follow it when away */
	SRMIG_BEH_END_S = 3,       /* migration source: deliver while the VM runs here, else advance */
	SRMIG_BEH_END_SBUF = 4,    /* migration destination: hold until the VM resumes, then deliver */
};

/* Migration state of one VM on this host, keyed by the VM's address (the inner destination, IPv6 or IPv4). */
enum srmig_vm_state {
	SRMIG_VM_RUNNING = 1,  /* the VM runs here: deliver */
	SRMIG_VM_HOLD = 2,     /* paused here, its tap queue being drained: newer packets go to the hold ring */
	SRMIG_VM_AWAY = 3,     /* moved away: End.S advances, End.DX6-map rewrites towards next_sid */
	SRMIG_VM_INCOMING = 4, /* arriving here, not resumed yet: End.SBUF holds in the VM's tap queue */
};

/* Why a packet was dropped. Index into the drop_stats map. */
enum srmig_drop_reason {
	SRMIG_DROP_NONE = 0,
	SRMIG_DROP_TRUNCATED = 1,      /* a header, or a payload length, runs past the end of the packet */
	SRMIG_DROP_SRH_TYPE = 2,       /* routing header of a type other than 4 at one of our SIDs, even with SL == 0
					* (RFC 8200 4.4 would ignore it: our SIDs accept SRv6 only) */
	SRMIG_DROP_SRH_LEN = 3,        /* HdrExtLen too small for LastEntry+1 segments (RFC 8754 2, 4.3.1.1) */
	SRMIG_DROP_SL_RANGE = 4,       /* Segments Left > Last Entry + 1 (RFC 8754 4.3.1.1) */
	SRMIG_DROP_SL_ZERO = 5,        /* SL == 0 where a next segment is required (End, End.S advancing) */
	SRMIG_DROP_SL_NONZERO = 6,     /* SL != 0 at a decapsulating behaviour (RFC 8986 4.5 End.DX6 S01) */
	SRMIG_DROP_HOP_LIMIT = 7,      /* Hop Limit <= 1 when forwarding (RFC 8986 4.1 S03) */
	SRMIG_DROP_INNER_NOT_IPV6 = 8, /* upper-layer header is neither IPv6 nor IPv4 (RFC 8986 4.5, 4.6) at a
					* per-VM behaviour (name kept from before inner IPv4: the value is stable) */
	SRMIG_DROP_UNKNOWN_VM = 9,     /* inner DA is not a VM in the state map */
	SRMIG_DROP_VM_STATE = 10,      /* the VM's state has no action for this behaviour */
	SRMIG_DROP_NO_ROUTE = 11,      /* FIB lookup: unreachable, blackhole, prohibit, forwarding disabled */
	SRMIG_DROP_HOLD_FULL = 12,     /* hold ring buffer full */
	SRMIG_DROP_HEADROOM = 13,      /* bpf_xdp_adjust_head failed */
	SRMIG_DROP_UNKNOWN_BEHAVIOUR = 14, /* SID table entry with a behaviour this program does not know */
	SRMIG_DROP_OUTSIDE_DOMAIN = 15, /* to one of our SIDs from a source outside the SR domain (RFC 8754 5.1) */
	SRMIG_DROP_INNER_MALFORMED = 16, /* inner IPv4 header: version != 4, IHL < 5 or total length < IHL * 4
					  * (RFC 791 3.1); a total length past the frame is TRUNCATED, as for IPv6 */
	SRMIG_DROP_MAX = 17,           /* number of slots in drop_stats; grows when a reason is appended */
};

/* What happened to a packet. Index into the verdict_stats map. */
enum srmig_verdict {
	SRMIG_VERDICT_PASS = 0,      /* not for us (not IPv6, no SID of ours): handed to the kernel untouched */
	SRMIG_VERDICT_DELIVER = 1,   /* decapsulated and sent to the VM (redirect, or via the kernel) */
	SRMIG_VERDICT_FORWARD = 2,   /* advanced or rewritten and sent on towards the next SID */
	SRMIG_VERDICT_HOLD = 3,      /* parked: in the VM's (paused) tap queue or in the hold ring */
	SRMIG_VERDICT_DROP = 4,      /* dropped; drop_stats says why */
	SRMIG_VERDICT_MAX = 5,
};

/* The family of a packet's inner packet, for the packets a per-VM behaviour reads it of (every SID but End's).
 * inner_stats, a per-CPU array of SRMIG_INNER_MAX * SRMIG_VERDICT_MAX counters, counts them per family and
 * verdict at index family * SRMIG_VERDICT_MAX + verdict; a drop's reason is in drop_stats (inner_malformed
 * is IPv4's alone). */
enum srmig_inner_family {
	SRMIG_INNER_IPV6 = 0,
	SRMIG_INNER_IPV4 = 1,
	SRMIG_INNER_MAX = 2,
};

/* sid_table: key = the SID (IPv6 address, network byte order). */
struct srmig_sid_key {
	__u8 addr[16];
};

struct srmig_sid_value {
	__u32 behaviour;  /* enum srmig_behaviour */
	__u32 stats_slot; /* index into sid_stats, chosen by userspace, < SRMIG_MAX_SIDS */
};

/* vm_table: key = the VM's address (the inner destination), network byte order, 16 bytes for both families: an
 * IPv6 address as it is, an IPv4 address as its IPv4-mapped IPv6 address ::ffff:a.b.c.d (RFC 4291 2.5.5.2).
 * One map, one lookup: the inner header's family picks the encoding, and no VM's IPv6 address is
 * IPv4-mapped (an IPv6 packet to ::ffff:0:0/96 never reaches a VM, RFC 4291 2.5.5.2). */
struct srmig_vm_key {
	__u8 addr[16];
};

/* vm_prefixes: LPM trie of the prefixes VMs route (a VM that routes a subnet), consulted when vm_table has no
 * entry for the inner destination: the longest prefix holding it gives the VM's id, an address of the VM that
 * vm_table has, and that entry applies (state, flags, next SID: one entry moves all of the VM's addresses and
 * prefixes). Addresses as in vm_table: an IPv4 prefix a.b.c.d/len is ::ffff:a.b.c.d/(96 + len). A VM's
 * addresses other than its id are here too, as full-length keys (/128; IPv4 ::ffff:a.b.c.d/128) with no
 * vm_table entry of their own: then one write of the id's entry moves every address and prefix of the VM at
 * once. Userspace keeps prefixes of different VMs from overlapping, so the longest match is the only one. */
struct srmig_vm_prefix_key {
	__u32 prefixlen; /* LPM trie key layout: prefix length in bits first */
	__u8 addr[16];   /* network byte order, host bits zero */
};

struct srmig_vm_value {
	__u32 state;        /* enum srmig_vm_state */
	__u32 flags;        /* SRMIG_VM_F_* */
	__u8 next_sid[16];  /* where End.DX6-map sends stragglers once AWAY (the new host's End.DX6-map SID) */
};

#define SRMIG_VM_F_HOLD_RING 1 /* INCOMING: park packets in the hold ring instead of the VM's tap queue */
#define SRMIG_VM_F_SHADOW 2    /* migration window: copy every packet delivered to the VM into the shadow
				* ring, so the agent can re-send the one frame a pausing QEMU swallows */
#define SRMIG_VM_F_RING_FIRST 4 /* AWAY: while the hold ring holds records not yet consumed, park behind
				* them instead of forwarding (RUNNING: instead of delivering). Set by the source's
				* drain at the HOLD -> AWAY flip, and on abort when the parked packets are
				* delivered, and cleared once the ring is sent empty: no packet forwarded or
				* delivered directly overtakes one parked before. */
#define SRMIG_VM_F_PARK 8       /* RUNNING, on an abort, until the destination has returned what it held: End.S
				* and End.DX6-map park the packet as it came (not advanced) in the hold ring;
				* End.SBUF, where the destination returns its held packets, delivers them. */

/* sr_domain: LPM trie of the SR domain's source prefixes (RFC 8754 5.1). A packet to one of our SIDs whose
 * outer source matches none is dropped, while meta[SRMIG_META_DOMAIN_PREFIXES] != 0. */
struct srmig_domain_key {
	__u32 prefixlen; /* LPM trie key layout: prefix length in bits first */
	__u8 addr[16];   /* network byte order, host bits zero */
};

/* sid_stats: per-CPU array indexed by stats_slot. */
struct srmig_sid_stats {
	__u64 packets;
	__u64 bytes;
	__u64 delivered;
	__u64 forwarded;
	__u64 held;
	__u64 dropped;
};

/* A record in the hold ring (BPF ring buffer): this header, then `len` bytes of the packet starting at
 * its IPv6 header, already advanced (DA = next SID), ready to be sent again as is.
 * The shadow ring uses the same record; its packet is the inner one, as delivered to the VM (an IPv6 or an
 * IPv4 packet: its first nibble says which). `vm` is the vm_table key (IPv4 VMs IPv4-mapped).
 * A record is this header and `len` bytes, no more (since ABI 10; before, SRMIG_HOLD_SNAPLEN bytes whatever
 * `len`): the packet is the rest of the record, which the drain reads without reading `len`. */
struct srmig_hold_record {
	__u64 timestamp_ns; /* bpf_ktime_get_ns() when held */
	__u8 vm[16];        /* the VM it is for: the vm_table key whose entry applied (a VM's id when the
			     * packet's inner destination matched one of its prefixes in vm_prefixes) */
	__u32 len;          /* bytes of packet that follow (<= SRMIG_HOLD_SNAPLEN) */
	__u32 orig_len;     /* the packet's full length; > len means truncated (counted as HOLD_FULL) */
};

#define SRMIG_HOLD_SNAPLEN 2048

/* The ingress's H.Encaps (RFC 8986 5.1), srmig/ebpf/encap.c on tc egress: every IPv6 or IPv4 packet whose
 * destination is a VM in encap_table leaves inside an outer IPv6 header + SRH built from the VM's entry. */
#define SRMIG_ENCAP_MAX_SEGS 6 /* segments in one list (travel order S::5, transit..., D::b fits easily) */
#define SRMIG_ENCAP_SRH_MAX 104 /* 8 + 16 * SRMIG_ENCAP_MAX_SEGS (cffi takes literals only) */

/* encap_table (and encap_vm_stats): key = the VM's address, the inner destination, network byte order: an IPv6
 * address as it is, an IPv4 address a.b.c.d as the IPv4-mapped ::ffff:a.b.c.d, as in vm_table. An IPv6
 * packet to an IPv4-mapped destination takes no entry. */
struct srmig_encap_key {
	__u8 addr[16];
};

/* encap_prefixes: LPM trie (struct srmig_vm_prefix_key, the same spelling) to an encap_table key, consulted when
 * encap_table has no entry for the destination: the prefix's own entry, under its network address (an entry of
 * the prefix's family: its SRH's next header must fit the packets; its counters in encap_vm_stats there too).
 * So a VM's segment list serves every address of the prefixes it routes. */

/* Userspace builds the headers once per segment list, so one map write switches a VM's list atomically and
 * the program only copies bytes. */
struct srmig_encap_value {
	__u8 src[16];       /* outer source: this ingress's address */
	__u8 first_sid[16]; /* outer destination: the first segment of the list */
	__u32 srh_len;      /* bytes of srh[] to insert: 8 + 16 * entries, or 0 (no SRH: a one-SID list
			     * encapsulated in reduced mode, H.Encaps.Red) */
	__u8 hop_limit;     /* of the outer header */
	__u8 pad[3];
	__u8 srh[104]; /* SRMIG_ENCAP_SRH_MAX: the SRH as sent: next header 41 (an IPv6 key) or 4 (an IPv4-mapped
				      * key; the program drops as BAD_ENTRY a packet of the other family), type 4,
				      * SL = Last Entry = entries - 1 (or SL = entries, H.Encaps.Red), segments in SRH
				      * order (last first) */
};

/* encap_vm_stats: per-CPU hash, one entry per VM in encap_table (userspace creates and deletes it). */
struct srmig_encap_vm_stats {
	__u64 packets; /* encapsulated */
	__u64 bytes;   /* encapsulated, inner length */
	__u64 dropped; /* for this VM, any reason in encap_stats */
};

/* What the encap program did with a packet. Index into the encap_stats per-CPU array. Append-only. */
enum srmig_encap_counter {
	SRMIG_ENCAP_PASS = 0,           /* not IPv6 or IPv4 to a VM in encap_table: left as it is */
	SRMIG_ENCAP_DONE = 1,           /* encapsulated */
	SRMIG_ENCAP_DROP_TOO_BIG = 2,   /* would exceed the egress MTU once encapsulated (and is not GSO): the
					 * route to the VM must carry mtu = link MTU - (40 + srh_len) */
	SRMIG_ENCAP_DROP_ROOM = 3,      /* bpf_skb_adjust_room refused to make room for the headers */
	SRMIG_ENCAP_DROP_STORE = 4,     /* writing the headers failed */
	SRMIG_ENCAP_DROP_BAD_ENTRY = 5, /* an encap_table entry whose srh_len the program cannot write, or
					 * whose SRH next header is not the packet's family */
	SRMIG_ENCAP_DROP_MALFORMED = 6, /* IPv4 to a VM whose header is not well formed (version 4, IHL >= 5,
					 * IHL * 4 <= total length <= the bytes there): never encapsulated */
	SRMIG_ENCAP_MAX = 7,
};
/* The drain's pump (srmig/ebpf/pump.c, srmig/ctl/pump.py): the hold ring's records, copied by userspace
 * into pump_slots (an mmap'd array, one frame a slot, from slot 0), are sent by one BPF_PROG_RUN per batch,
 * one slot per program run, in slot order. Its own program and maps, not the XDP program's. */
#define SRMIG_PUMP_FRAME_MAX 2048 /* bytes of Ethernet frame a slot holds; a power of two (the programs
				   * bound the copy's length with a mask) */
struct srmig_pump_slot {
	__u32 len;    /* bytes of frame[] to send: an Ethernet frame, 14 <= len <= SRMIG_PUMP_FRAME_MAX */
	__u32 pad;
	__u8 frame[2048]; /* SRMIG_PUMP_FRAME_MAX */
};

/* pump_mark: one entry, pinned next to the hold ring (it outlives the agent, like the ring's sent log).
 * Written by userspace before each batch (batch, end, ifindex; sent = err = 0), then only by the program. */
struct srmig_pump_mark {
	__u64 batch;   /* ring position of the batch's first record (the sent log's start): says which batch
			* `sent` counts, so a stale mark never counts for a later batch */
	__u32 sent;    /* slots sent so far, from slot 0: the next slot to send */
	__u32 end;     /* slots in the batch */
	__u32 ifindex; /* the tc pump: where bpf_clone_redirect sends (the live-frames pump: the ingress
			* interface given to BPF_PROG_RUN) */
	__s32 err;     /* the tc pump: what stopped the batch short (a negative errno, or the qdisc's
			* NET_XMIT_DROP), 0: nothing; nothing is sent after it */
};
/* END ABI */

#endif
