"""A pure-Python reference model of the srmig XDP program, for differential fuzzing (tests/test_fuzz.py).

Written from the "Endpoint behaviours" table of docs/design.md, RFC 8754 (SRH, 4.3.1.1 checks, 5.1 SR domain),
RFC 8986 (End 4.1, End.DX6 4.5, End.DX4 4.6: an inner IPv4 packet is handled as an inner IPv6 one), RFC 791
and RFC 8200, over a data description of the lab (srmig/testbed/lab.py): SIDs,
VM states, the prefixes VMs route, routes, neighbours and the SR domain. It parses with `struct` only. Where
the specs leave freedom (order of checks, which reason a packet is counted under), it follows the C program's
documented choice; each such place says "C's choice".

    model(packet, cfg) -> Result(action, output, verdict, reason)
    model_ex(packet, cfg) -> (Result, hold_record_or_None)
"""

from __future__ import annotations

import ipaddress
import struct
from dataclasses import dataclass, field
from typing import NamedTuple

ETH_P_IPV6 = 0x86DD
ETH_P_IP = 0x0800
NH_HOPOPTS, NH_ROUTING, NH_DSTOPTS, NH_IPV6, NH_IPV4 = 0, 43, 60, 41, 4
MAX_EXT_HDRS = 2
HOLD_SNAPLEN = 2048

END, DX6_MAP, END_S, END_SBUF = "End", "End.DX6-map", "End.S", "End.SBUF"
RUNNING, HOLD, AWAY, INCOMING = "running", "hold", "away", "incoming"


class Result(NamedTuple):
    action: str            # XDP_PASS | XDP_DROP | XDP_REDIRECT
    output: bytes | None   # the frame after the program (None when dropped)
    verdict: str           # pass | deliver | forward | hold | drop
    reason: str | None     # drop reason (srmig_abi.h names, lower case) when verdict == drop


@dataclass
class Vm:
    state: str
    hold_ring: bool = False
    next_sid: bytes = bytes(16)
    park: bool = False  # RUNNING: End.S and End.DX6-map park the packet as it came (an abort)


@dataclass
class Route:
    """A route as the FIB lookup sees it. kind: "neigh" (resolved: dmac/smac), "no_neigh", "unreachable",
    "local" (local/anycast/multicast: not forwarded)."""
    prefix: ipaddress.IPv6Network | ipaddress.IPv4Network
    kind: str
    dmac: bytes = b""
    smac: bytes = b""
    mtu: int = 1500
    dev: str = "fab0"


@dataclass
class LabConfig:
    sids: dict[bytes, str]
    vms: dict[bytes, Vm]  # keyed as vm_table is: 16 bytes, IPv4 VMs IPv4-mapped
    routes: list[Route] = field(default_factory=list)
    domain: list[ipaddress.IPv6Network] = field(default_factory=list)  # SR domain prefixes; empty: no check
    # vm_prefixes: prefixes VMs route, keyed as vm_table is (IPv4 ones IPv4-mapped, /96 + length), to the VM's
    # id, a vms key. No two overlap (userspace keeps them apart): the longest match is the only one.
    prefixes: list[tuple[ipaddress.IPv6Network, bytes]] = field(default_factory=list)

    def vm(self, key: bytes) -> Vm | None:
        """vm_table's entry for `key`, else that of the VM whose prefix holds it (srmig_abi.h)."""
        if key in self.vms:
            return self.vms[key]
        a = ipaddress.IPv6Address(key)
        best = max((p for p in self.prefixes if a in p[0]), key=lambda p: p[0].prefixlen, default=None)
        return None if best is None else self.vms.get(best[1])

    def in_domain(self, src: bytes) -> bool:
        a = ipaddress.IPv6Address(src)
        return any(a in net for net in self.domain)

    def lookup(self, dst: bytes) -> Route | None:
        cache = self.__dict__.setdefault("_cache", {})
        if dst not in cache:
            cache[dst] = self._lookup(dst)
        return cache[dst]

    def _lookup(self, dst: bytes) -> Route | None:
        """`dst`: 16 bytes (IPv6) or 4 (IPv4); each family has its own routes."""
        a = ipaddress.ip_address(dst)
        best = None
        for r in self.routes:
            if r.prefix.version == a.version and a in r.prefix and (best is None or r.prefix.prefixlen > best.prefix.prefixlen):
                best = r
        return best


def _a(text: str) -> bytes:
    return ipaddress.IPv6Address(text).packed


def _v4key(v4: bytes) -> bytes:
    """The vm_table key of an IPv4 address: ::ffff:a.b.c.d (srmig_abi.h)."""
    return bytes(10) + b"\xff\xff" + bytes(v4)


def _vm_key(text: str) -> bytes:
    a = ipaddress.ip_address(text)
    return a.packed if a.version == 6 else _v4key(a.packed)


def _mac(text: str) -> bytes:
    return bytes(int(x, 16) for x in text.split(":"))


def lab_config(domain: list[str] = ()) -> LabConfig:
    """srmig/testbed/lab.py's TestRunLab, as data; `domain`: the SR domain prefixes configured in it."""
    from srmig.testbed import lab as L

    def net(t):
        return ipaddress.IPv6Network(t)

    fab = (_mac(L.FAB_PEER_MAC), _mac(L.FAB_MAC))
    vm = (_mac(L.VM_MAC), _mac(L.GW_MAC))
    routes = [
        Route(net("fc00:0:2::/48"), "neigh", *fab),
        Route(net("fc00:0:3::/48"), "neigh", *fab),
        Route(net("2001:db8:f::/64"), "no_neigh"),              # connected fab0: only the peer is known
        Route(net(L.FAB_PEER + "/128"), "neigh", *fab),
        Route(net("2001:db8:f::1/128"), "local"),               # our own address (local table)
        Route(net("2001:db8:f::/128"), "local"),                # subnet-router anycast
        Route(net("ff00::/8"), "local"),                        # multicast: not forwarded
        Route(net("fe80::/10"), "unknown"),                     # link-local: neighbours learnt by ND, avoid
        Route(net("::1/128"), "local", dev="lo"),
    ]
    for v in (L.VM_RUNNING, L.VM_AWAY, L.VM_HOLD, L.VM_INCOMING, L.VM_INCOMING_RING, L.VM_PARKED):
        routes.append(Route(net(v + "/128"), "neigh", *vm, dev="vm0"))
        routes.append(Route(ipaddress.IPv4Network(L.V4_OF[v] + "/32"), "neigh", *vm, dev="vm0"))
    for v in (L.VM_NO_NEIGH, L.V4_OF[L.VM_NO_NEIGH]):
        routes.append(Route(ipaddress.ip_network(v), "no_neigh", dev="vm0"))
    for v in (L.VM_UNREACHABLE, L.V4_OF[L.VM_UNREACHABLE]):
        routes.append(Route(ipaddress.ip_network(v), "unreachable", dev="lo"))
    for v, (p6, p4) in L.PREFIX_OF.items():  # routed via the VM (lab.py): its neighbour's MAC
        if v != L.VM_UNKNOWN:
            routes.append(Route(net(p6), "neigh", *vm, dev="vm0"))
            routes.append(Route(ipaddress.IPv4Network(p4), "neigh", *vm, dev="vm0"))
    # IPv4 has no other route in the lab: any other destination is not forwarded (NOT_FWDED, to the kernel).
    vms = {
        L.VM_RUNNING: Vm(RUNNING),
        L.VM_AWAY: Vm(AWAY, next_sid=_a(L.D_DX6)),
        L.VM_HOLD: Vm(HOLD, next_sid=_a(L.D_DX6)),
        L.VM_INCOMING: Vm(INCOMING),
        L.VM_INCOMING_RING: Vm(INCOMING, hold_ring=True),
        L.VM_PARKED: Vm(RUNNING, park=True),
        L.VM_NO_NEIGH: Vm(RUNNING),
        L.VM_UNREACHABLE: Vm(RUNNING),
    }
    return LabConfig(
        sids={_a(L.SID_END): END, _a(L.SID_DX6): DX6_MAP, _a(L.SID_S): END_S, _a(L.SID_SBUF): END_SBUF},
        # Every VM twice, by its IPv6 and its IPv4 address, in the same state (lab.py's V4_OF).
        vms={_vm_key(a): v for vm, v in vms.items() for a in (vm, L.V4_OF[vm])},
        routes=routes,
        domain=[ipaddress.IPv6Network(p) for p in domain],
        prefixes=[(_prefix_key(p), _vm_key(v)) for v, ps in L.PREFIX_OF.items() for p in ps],
    )


def _prefix_key(text: str) -> ipaddress.IPv6Network:
    """A VM prefix as vm_prefixes keys it: IPv4 a.b.c.d/n as ::ffff:a.b.c.d/(96 + n)."""
    n = ipaddress.ip_network(text)
    if n.version == 6:
        return n
    return ipaddress.IPv6Network((_v4key(n.network_address.packed), 96 + n.prefixlen))


class _Drop(Exception):
    def __init__(self, reason: str):
        self.reason = reason


_LOOPBACK = bytes(15) + b"\x01"


def _fib_refuses_src(addr: bytes) -> bool:
    return addr[0] == 0xFF or (addr[0] == 0xFE and addr[1] & 0xC0 == 0x80) or addr == _LOOPBACK


def _send(frame: bytearray, cfg: LabConfig, verdict: str) -> tuple[Result, None]:
    """Forward the frame (Ethernet + IPv6, or + IPv4 after an IPv4 delivery) towards its DA like bpf_fib_lookup +
    bpf_redirect would. The program's next-hop cache is transparent: same answer as the FIB. Neither TTL nor
    hop limit changes here (a delivered inner packet keeps its own, as the kernel's End.DX6 / End.DX4 do)."""
    if struct.unpack_from("!H", frame, 12)[0] == ETH_P_IP:
        # The IPv4 lookup does not judge the source; its MTU check uses the header's total length.
        dst = bytes(frame[14 + 16:14 + 20])
        tot_len = struct.unpack_from("!H", frame, 14 + 2)[0]
    else:
        src, dst = bytes(frame[14 + 8:14 + 24]), bytes(frame[14 + 24:14 + 40])
        # bpf_fib_lookup (input lookup) refuses a multicast, link-local or loopback source whatever the route,
        # even an unreachable one: NOT_FWDED, to the kernel (measured on the lab; RFC 4291 2.5.3, 2.5.6, 2.7).
        if _fib_refuses_src(src):
            return Result("XDP_PASS", bytes(frame), verdict, None), None
        # bpf_fib_lookup's MTU check uses tot_len from the header (struct bpf_fib_lookup.tot_len is 16 bits).
        tot_len = (struct.unpack_from("!H", frame, 14 + 4)[0] + 40) & 0xFFFF
    r = cfg.lookup(dst)
    if r is None or r.kind == "local":
        return Result("XDP_PASS", bytes(frame), verdict, None), None          # NOT_FWDED
    if r.kind == "unreachable":
        return Result("XDP_DROP", None, "drop", "no_route"), None
    if r.kind == "unknown":
        raise ValueError("destination with an unpredictable neighbour table")
    if tot_len > r.mtu or r.kind == "no_neigh":
        return Result("XDP_PASS", bytes(frame), verdict, None), None          # FRAG_NEEDED / NO_NEIGH
    frame[0:6] = r.dmac
    frame[6:12] = r.smac
    return Result("XDP_REDIRECT", bytes(frame), verdict, None), None


def model(packet: bytes, cfg: LabConfig) -> Result:
    return model_ex(packet, cfg)[0]


def model_ex(packet: bytes, cfg: LabConfig) -> tuple[Result, bytes | None]:
    """Also returns the hold-ring record's packet (from the IPv6 header on) when the packet is parked."""
    untouched = Result("XDP_PASS", packet, "pass", None), None
    n = len(packet)
    if n < 14 or struct.unpack_from("!H", packet, 12)[0] != ETH_P_IPV6:
        return untouched
    if n < 14 + 40:
        return untouched  # a truncated IPv6 header is the kernel's business (C's choice: never claimed)
    da = packet[14 + 24:14 + 40]
    beh = cfg.sids.get(da)
    if beh is None:
        return untouched  # not one of our SIDs
    try:
        return _ours(bytearray(packet), beh, cfg)
    except _Drop as d:
        return Result("XDP_DROP", None, "drop", d.reason), None


def _advance(f: bytearray, srh: int | None) -> None:
    """RFC 8986 4.1 End S02-S14 (validity already checked at parse time, C's choice: all SRHs validated
    up front, then SL == 0, then hop limit)."""
    if srh is None or f[srh + 3] == 0:
        raise _Drop("sl_zero")
    if f[14 + 7] <= 1:
        raise _Drop("hop_limit")
    sl = f[srh + 3] - 1
    f[srh + 3] = sl
    f[14 + 24:14 + 40] = f[srh + 8 + 16 * sl:srh + 8 + 16 * sl + 16]
    f[14 + 7] -= 1


def _ours(f: bytearray, beh: str, cfg: LabConfig):
    n = len(f)
    # RFC 8754 5.1: a source outside the SR domain triggers nothing at our SIDs. C's choice: checked first,
    # before the payload length and every SRH check (the outer source is in the 40 bytes already read).
    if cfg.domain and not cfg.in_domain(bytes(f[14 + 8:14 + 24])):
        raise _Drop("outside_domain")
    # RFC 8200 3: a payload length claiming more than the frame holds is malformed (never forwarded).
    if 40 + struct.unpack_from("!H", f, 14 + 4)[0] > n - 14:
        raise _Drop("truncated")
    pos = 14 + 40
    nh = f[14 + 6]
    # RFC 8200 4.1: Hop-by-Hop / Destination Options may precede the routing header. C's choice: at most two
    # of them, in any order; only their first two bytes are checked here, the rest falls to later checks.
    for _ in range(MAX_EXT_HDRS):
        if nh not in (NH_HOPOPTS, NH_DSTOPTS):
            break
        if pos + 2 > n:
            raise _Drop("truncated")
        nh, pos = f[pos], pos + (f[pos + 1] + 1) * 8
    srh = None
    if nh == NH_ROUTING:
        # RFC 8754 4.3.1.1. C's choice: checked for every SL (RFC 8754 only checks when SL > 0), and a
        # routing header of another type is dropped even with SL == 0 (RFC 8200 4.4 would ignore it).
        if pos + 8 > n:
            raise _Drop("truncated")
        nxt, hlen, rtype, sl, le = f[pos:pos + 5]
        if rtype != 4:
            raise _Drop("srh_type")
        if (le + 1) * 2 > hlen:
            raise _Drop("srh_len")
        if pos + 8 + hlen * 8 > n:
            raise _Drop("truncated")
        if sl > le + 1:
            raise _Drop("sl_range")
        srh, nh, pos = pos, nxt, pos + 8 + hlen * 8
    sl = f[srh + 3] if srh is not None else 0

    if beh == END:
        # C's choice: End ignores the upper layer; without an SRH (or SL == 0) it counts sl_zero.
        _advance(f, srh)
        return _send(f, cfg, "forward")

    # Per-VM behaviours: the inner packet names the VM (RFC 8986 4.5 / 4.6: upper layer IPv6 or IPv4; one SID
    # serves both, as End.DT46 does).
    inner = pos
    if nh == NH_IPV6:
        if pos + 40 > n or 40 + struct.unpack_from("!H", f, pos + 4)[0] > n - pos:
            raise _Drop("truncated")
        vm_addr = bytes(f[inner + 24:inner + 40])
        if vm_addr[:12] == bytes(10) + b"\xff\xff":
            raise _Drop("unknown_vm")  # IPv4-mapped: IPv4 VMs' keys, never an IPv6 packet's VM (srmig_abi.h)
        ethertype = ETH_P_IPV6
    elif nh == NH_IPV4:
        if pos + 20 > n:
            raise _Drop("truncated")
        # RFC 791 3.1. C's choice: version, IHL and total length >= IHL*4 are inner_malformed; a total length
        # past the frame is truncated (as for IPv6). The checksum is not checked (left to the VM) nor changed.
        ihl, tot_len = f[pos] & 0xF, struct.unpack_from("!H", f, pos + 2)[0]
        if f[pos] >> 4 != 4 or ihl < 5 or tot_len < ihl * 4:
            raise _Drop("inner_malformed")
        if tot_len > n - pos:
            raise _Drop("truncated")
        vm_addr = _v4key(f[inner + 16:inner + 20])
        ethertype = ETH_P_IP
    else:
        raise _Drop("inner_not_ipv6")  # neither IPv6 nor IPv4 (the reason keeps its old name)
    vm = cfg.vm(vm_addr)
    if vm is None:
        raise _Drop("unknown_vm")

    def deliver(verdict: str):
        # Encapsulated-mode decap: Ethernet header kept, outer IPv6 + its extension headers removed.
        out = bytearray(f[:12]) + struct.pack("!H", ethertype) + f[inner:]
        return _send(out, cfg, verdict)

    def ring(frame: bytearray):
        if len(frame) - 14 >= HOLD_SNAPLEN:
            raise _Drop("hold_full")  # jumbo: counted, never truncated
        return Result("XDP_DROP", None, "hold", None), bytes(frame[14:])

    def sbuf():
        # RFC 8986 4.5 End.DX6 S01: SL must be 0 at a decapsulating behaviour.
        if sl != 0:
            raise _Drop("sl_nonzero")
        if vm.state == RUNNING:
            return deliver("deliver")
        if vm.state == INCOMING:
            return ring(f) if vm.hold_ring else deliver("hold")
        raise _Drop("vm_state")

    if beh == END_S:
        # C's choice: SL == 0 is refused first, even when the VM runs here and would be delivered.
        if sl == 0:
            raise _Drop("sl_zero")
        if vm.state == RUNNING:
            # an abort's park: the packet as it came, behind what the destination returns
            return ring(f) if vm.park else deliver("deliver")  # ignore remaining segments
        if vm.state == HOLD:
            _advance(f, srh)
            return ring(f)
        if vm.state == AWAY:
            _advance(f, srh)
            return _send(f, cfg, "forward")
        raise _Drop("vm_state")
    if beh == END_SBUF:
        return sbuf()
    if beh == DX6_MAP:
        # C's choice: AWAY with SL != 0 falls to the End.SBUF rules (sl_nonzero); AWAY (and HOLD) with SL == 0 rewrites
        # DA and Segment List[0] to the recorded SID (hop limit checked and decremented, RFC 8986 4.1 S03).
        if vm.state == RUNNING and vm.park and sl == 0:
            return ring(f)  # an abort's park, as at End.S; End.SBUF delivers (the destination's returns)
        if vm.state not in (AWAY, HOLD) or sl != 0:
            return sbuf()
        if f[14 + 7] <= 1:
            raise _Drop("hop_limit")
        f[14 + 24:14 + 40] = vm.next_sid
        if srh is not None:
            f[srh + 8:srh + 24] = vm.next_sid
        f[14 + 7] -= 1
        if vm.state == HOLD:  # the source is draining: behind the drained queue, like End.S
            return ring(f)
        return _send(f, cfg, "forward")
    raise _Drop("unknown_behaviour")
