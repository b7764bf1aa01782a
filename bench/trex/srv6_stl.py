"""TRex STL profile: SRv6 traffic for every srmig branch, written with the TRex STL API.

Load it in TRex (`start -f bench/trex/srv6_stl.py -t branch=end_s_forward,size=imix,flows=1000`) or with
`STLProfile.load_py(path, branch=..., size=..., flows=...)`. Tunables:

- branch: end_s_deliver | end_s_forward | end_sbuf | end_dx6_map (which SID and which VM state the packets
  hit; addresses are those of srmig.testbed.lab, so the same packets run through the real program in tests)
- size:   78 (inner frame of 78 bytes = 64-byte IPv6 packet, plus outer IPv6 + SRH), imix (inner IPv6
          packets of 64/570/1500-encap bytes, 7:4:1) or 1500 (1500-byte outer IPv6 packet, the veth/Ethernet MTU)
- flows:  how many inner sources (field engine: the last 16 bits of the inner source count up; a second
          variable counting down is written into the payload so the inner UDP checksum stays valid)

This file imports the TRex client and therefore its bundled scapy 2.4.3: run it in its own process
(bench/trex/dump.py, bench/trex/run.py), never inside srmig.
"""

from trex.stl.api import (STLPktBuilder, STLProfile, STLStream, STLTXCont, STLVM, Ether, IPv6,
                          IPv6ExtHdrSegmentRouting, UDP, Raw)

# srmig.testbed.lab's host H (the DUT) and its neighbours.
SID_DX6 = "fc00:0:1::d6"
SID_S = "fc00:0:1::5"
SID_SBUF = "fc00:0:1::b"
D_SBUF = "fc00:0:2::b"
VM_RUNNING = "2001:db8:100::10"
VM_AWAY = "2001:db8:100::20"
VM_INCOMING = "2001:db8:100::40"
DUT_MAC = "02:00:00:00:0f:01"
SRC_MAC = "02:00:00:00:00:aa"
INGRESS = "2001:db8:9::1"
INNER_SRC = "2001:db8:9::"  # the field engine writes the last 16 bits

# branch: (segments in travel order, SL, inner destination)
BRANCHES = {
    "end_s_deliver": ([SID_S, D_SBUF], 1, VM_RUNNING),
    "end_s_forward": ([SID_S, D_SBUF], 1, VM_AWAY),
    "end_sbuf": ([D_SBUF, SID_SBUF], 0, VM_INCOMING),
    "end_dx6_map": ([SID_DX6], 0, VM_RUNNING),
}
SIZES = ("78", "imix", "1500")
IMIX = ((64, 7), (570, 4), (None, 1))  # inner IPv6 packet bytes (None: the most that fits 1500), weight


def encap(branch: str, inner_ip_len: int | None = None, outer_ip_len: int | None = None):
    """Ether / outer IPv6 / SRH / inner IPv6 / UDP / payload, sized by the inner or the outer IPv6 length."""
    segs, sl, vm = BRANCHES[branch]
    outer = (Ether(src=SRC_MAC, dst=DUT_MAC) / IPv6(src=INGRESS, dst=segs[len(segs) - 1 - sl], hlim=64)
             / IPv6ExtHdrSegmentRouting(addresses=list(reversed(segs)), segleft=sl, lastentry=len(segs) - 1))
    encap_len = 40 + 8 + 16 * len(segs)
    if inner_ip_len is None:
        inner_ip_len = outer_ip_len - encap_len
    payload = max(2, inner_ip_len - 40 - 8)
    # The field engine's first values: source ...:1, payload 0xfffe (see field_engine); scapy computes the
    # UDP checksum over exactly these bytes, and the engine keeps their sum constant.
    pkt = (outer / IPv6(src=INNER_SRC + "1", dst=vm, hlim=64) / UDP(sport=4000, dport=5000)
           / Raw(b"\xff\xfe" + b"s" * (payload - 2)))
    return pkt, 14 + encap_len  # the packet, and where the inner IPv6 header starts


def field_engine(inner_at: int, flows: int) -> STLVM:
    vm = STLVM()
    if flows > 1:
        flows = min(flows, 0xFFFE)
        vm.var(name="src", min_value=1, max_value=flows, size=2, op="inc", step=1)
        # Counts down as src counts up: src + comp stays 0xffff, so the UDP checksum stays valid.
        vm.var(name="comp", min_value=0xFFFF - flows, max_value=0xFFFE, size=2, op="dec", step=1)
        vm.write(fv_name="src", pkt_offset=inner_at + 8 + 14)        # last 16 bits of the inner source
        vm.write(fv_name="comp", pkt_offset=inner_at + 40 + 8)       # first 2 payload bytes
    return vm


class SRv6Profile:
    def streams(self, branch: str = "end_s_forward", size: str = "78", flows: int = 1000, pps: float = 1000):
        if branch not in BRANCHES:
            raise ValueError(f"branch {branch!r}: expected one of {', '.join(BRANCHES)}")
        size = str(size)
        if size == "78":
            mix = [(64, None, 1)]
        elif size == "1500":
            mix = [(None, 1500, 1)]
        elif size == "imix":
            mix = [(ln, None if ln else 1500, w) for ln, w in IMIX]
        else:
            raise ValueError(f"size {size!r}: expected one of {', '.join(SIZES)}")
        total = sum(w for _, _, w in mix)
        out = []
        for i, (inner_len, outer_len, weight) in enumerate(mix):
            pkt, inner_at = encap(branch, inner_len, outer_len)
            out.append(STLStream(
                name=f"{branch}-{size}-{i}",
                packet=STLPktBuilder(pkt=pkt, vm=field_engine(inner_at, int(flows))),
                mode=STLTXCont(pps=pps * weight / total)))
        return out

    def get_streams(self, direction=0, port_id=0, **tunables):
        return self.streams(**{k: v for k, v in tunables.items() if k in ("branch", "size", "flows", "pps")})


def register():
    return SRv6Profile()
