"""Every row of the behaviour table (docs/design.md) and the RFC 8754/8986 error cases, through the real XDP program
with BPF_PROG_TEST_RUN: {description, input packet, SR domain, expected action, expected verdict/drop reason,
expected output packet}. The FIB the program consults is the lab namespace's (srmig/testbed/lab.py).

Every row whose packets carry an inner IPv6 packet to a lab VM has an IPv4 twin (V4_CASES, generated: the same
packets with the inner packet replaced by the IPv4 one to the VM's IPv4 address, same expectations), so each
behaviour x state is proven for both families; IPV4_CASES adds what only IPv4 has (RFC 791 header checks)."""

from __future__ import annotations

import contextlib
import ipaddress
import json
import os
import re
from dataclasses import dataclass
from typing import Callable

import pytest
from scapy.layers.inet import IP, UDP
from scapy.layers.inet6 import IPv6, IPv6ExtHdrSegmentRouting
from scapy.layers.l2 import Ether

from srmig.bpf.libbpf import XDP_DROP, XDP_PASS, XDP_REDIRECT
from srmig.testbed import lab as L
from srmig.testbed.packets import INGRESS_MAC, h_encaps, inner, inner4

pytestmark = [pytest.mark.bpf, pytest.mark.netns]


@dataclass
class Case:
    desc: str
    packet: Callable[[], bytes]
    action: int
    verdict: str                      # deliver / forward / hold / drop / pass
    reason: str | None = None         # drop reason when verdict == drop
    expect: Callable[[], bytes] | None = None  # exact output frame; None: not checked (drops)
    ring: Callable[[], bytes] | None = None    # exact hold-ring record payload
    domain: tuple[str, ...] = ()              # SR domain prefixes configured for the case; (): check off


def delivered(vm: str, **kw) -> Callable[[], bytes]:
    """What a VM receives: the inner packet untouched, from the anycast gateway MAC to the VM's MAC."""
    return lambda: bytes(Ether(src=L.GW_MAC, dst=L.VM_MAC) / inner(vm, **kw))


def encaps(segments, vm, **kw) -> Callable[[], bytes]:
    return lambda: bytes(h_encaps(segments, inner(vm), dst_mac=L.FAB_MAC, **kw))


def _forwarded(segments, vm, sl, hlim) -> bytes:
    """The same encapsulation after an End step: SL and DA advanced, hop limit decremented, MACs of the hop."""
    pkt = h_encaps(segments, inner(vm), sl=sl, hlim=hlim, dst_mac=L.FAB_PEER_MAC)
    pkt[Ether].src = L.FAB_MAC
    return bytes(pkt)


def held(segments, vm, sl, hlim=63) -> Callable[[], bytes]:
    """A hold-ring record: the advanced packet from its IPv6 header on."""
    return lambda: bytes(h_encaps(segments, inner(vm), sl=sl, hlim=hlim)[IPv6])


def corrupt(build: Callable[[], bytes], offset: int, value: int) -> Callable[[], bytes]:
    def f():
        b = bytearray(build())
        b[offset] = value
        return bytes(b)
    return f


SRH_OFF = 14 + 40  # Ethernet + outer IPv6
S_PATH = [L.SID_S, L.D_SBUF]
# RFC 8754 5.1. h_encaps' default outer source 2001:db8:9::1 is inside DOMAIN; OUTSIDE is not, by one bit of
# the /48; the host prefix accepts exactly one address.
DOMAIN = ("2001:db8:9::/48", "fc00::/16")
OUTSIDE = "2001:db8:8::1"
HOST_DOMAIN = ("2001:db8:8::1/128",)

CASES = [
    # The behaviour table of docs/design.md, row by row.
    Case("End.DX6-map, VM running: deliver", encaps([L.SID_DX6], L.VM_RUNNING), XDP_REDIRECT, "deliver",
         expect=delivered(L.VM_RUNNING)),
    Case("End.DX6-map, VM away: rewrite towards the recorded SID", encaps([L.SID_DX6], L.VM_AWAY),
         XDP_REDIRECT, "forward", expect=lambda: _forwarded([L.D_DX6], L.VM_AWAY, 0, 63)),
    Case("End.S, VM running: deliver locally, ignore remaining segments", encaps(S_PATH, L.VM_RUNNING),
         XDP_REDIRECT, "deliver", expect=delivered(L.VM_RUNNING)),
    Case("End.S, VM hold: advance and park in the hold ring", encaps(S_PATH, L.VM_HOLD), XDP_DROP, "hold",
         ring=held(S_PATH, L.VM_HOLD, sl=0)),
    Case("End.S, VM away: advance to the destination's End.SBUF", encaps(S_PATH, L.VM_AWAY), XDP_REDIRECT,
         "forward", expect=lambda: _forwarded(S_PATH, L.VM_AWAY, 0, 63)),
    Case("End.SBUF, VM incoming: hold in the VM's (unread) tap queue", encaps([L.D_SBUF, L.SID_SBUF],
         L.VM_INCOMING, sl=0), XDP_REDIRECT, "hold", expect=delivered(L.VM_INCOMING)),
    Case("End.SBUF, VM incoming with hold ring: park in the ring", encaps([L.D_SBUF, L.SID_SBUF],
         L.VM_INCOMING_RING, sl=0), XDP_DROP, "hold",
         ring=held([L.D_SBUF, L.SID_SBUF], L.VM_INCOMING_RING, sl=0, hlim=64)),
    Case("End.SBUF, VM running: deliver", encaps([L.D_SBUF, L.SID_SBUF], L.VM_RUNNING, sl=0), XDP_REDIRECT,
         "deliver", expect=delivered(L.VM_RUNNING)),
    Case("End.S, VM running but parked (abort): the packet as it came, in the hold ring",
         encaps(S_PATH, L.VM_PARKED), XDP_DROP, "hold",
         ring=lambda: bytes(h_encaps(S_PATH, inner(L.VM_PARKED))[IPv6])),
    Case("End.DX6-map, VM running but parked (abort): the packet as it came, in the hold ring",
         encaps([L.SID_DX6], L.VM_PARKED), XDP_DROP, "hold",
         ring=lambda: bytes(h_encaps([L.SID_DX6], inner(L.VM_PARKED))[IPv6])),
    Case("End.SBUF, VM running but parked (abort): deliver, the destination's returns go first",
         encaps([L.D_SBUF, L.SID_SBUF], L.VM_PARKED, sl=0), XDP_REDIRECT, "deliver",
         expect=delivered(L.VM_PARKED)),
    Case("unknown VM at End.S: drop", encaps(S_PATH, L.VM_UNKNOWN), XDP_DROP, "drop", "unknown_vm"),
    Case("unknown VM at End.DX6-map: drop", encaps([L.SID_DX6], L.VM_UNKNOWN), XDP_DROP, "drop", "unknown_vm"),
    # Other combinations and transit.
    Case("End.S, VM incoming: no action for that state", encaps(S_PATH, L.VM_INCOMING), XDP_DROP, "drop",
         "vm_state"),
    Case("End.SBUF, VM away: no action for that state", encaps([L.D_SBUF, L.SID_SBUF], L.VM_AWAY, sl=0),
         XDP_DROP, "drop", "vm_state"),
    Case("End.DX6-map, VM hold (an ingress not switched yet): rewrite towards the recorded SID, park in the "
         "hold ring", encaps([L.SID_DX6], L.VM_HOLD), XDP_DROP, "hold", ring=held([L.D_DX6], L.VM_HOLD, sl=0)),
    Case("End.DX6-map, VM incoming: hold like End.SBUF", encaps([L.SID_DX6], L.VM_INCOMING), XDP_REDIRECT,
         "hold", expect=delivered(L.VM_INCOMING)),
    Case("End (transit): next segment", encaps([L.SID_END, L.D_SBUF], L.VM_UNKNOWN), XDP_REDIRECT, "forward",
         expect=lambda: _forwarded([L.SID_END, L.D_SBUF], L.VM_UNKNOWN, 0, 63)),
    Case("End.DX6-map without SRH (reduced encapsulation): deliver",
         encaps([L.SID_DX6], L.VM_RUNNING, srh=False), XDP_REDIRECT, "deliver", expect=delivered(L.VM_RUNNING)),
    Case("Hop-by-Hop before the SRH: skipped, decapsulated with the rest",
         encaps(S_PATH, L.VM_RUNNING, hop_by_hop=True), XDP_REDIRECT, "deliver", expect=delivered(L.VM_RUNNING)),
    Case("delivery, neighbour not resolved: decapsulated, to the kernel", encaps(S_PATH, L.VM_NO_NEIGH),
         XDP_PASS, "deliver", expect=lambda: bytes(Ether(src=INGRESS_MAC, dst=L.FAB_MAC) / inner(L.VM_NO_NEIGH))),
    Case("delivery, unreachable route: drop", encaps(S_PATH, L.VM_UNREACHABLE), XDP_DROP, "drop", "no_route"),
    Case("outer hop limit 1 at delivery: delivered (decapsulation does not forward the outer packet)",
         encaps(S_PATH, L.VM_RUNNING, hlim=1), XDP_REDIRECT, "deliver", expect=delivered(L.VM_RUNNING)),
    # Not ours: untouched.
    Case("IPv4: untouched", lambda: bytes(Ether(dst=L.FAB_MAC) / IP(dst="192.0.2.1") / UDP()), XDP_PASS, "pass",
         expect=lambda: bytes(Ether(dst=L.FAB_MAC) / IP(dst="192.0.2.1") / UDP())),
    Case("IPv6 without SRH, not a SID: untouched", lambda: bytes(Ether(dst=L.FAB_MAC) / inner(L.VM_RUNNING)),
         XDP_PASS, "pass", expect=lambda: bytes(Ether(dst=L.FAB_MAC) / inner(L.VM_RUNNING))),
    Case("SRv6 to a SID that is not ours: untouched", encaps([L.NOT_OURS, L.D_SBUF], L.VM_RUNNING), XDP_PASS,
         "pass", expect=encaps([L.NOT_OURS, L.D_SBUF], L.VM_RUNNING)),
    # RFC 8754 / 8986 error cases.
    Case("SL > LastEntry+1", encaps(S_PATH, L.VM_AWAY, sl=3), XDP_DROP, "drop", "sl_range"),
    Case("truncated SRH", lambda: encaps(S_PATH, L.VM_AWAY)()[:SRH_OFF + 8 + 20], XDP_DROP, "drop", "truncated"),
    Case("HdrExtLen inconsistent with LastEntry", encaps(S_PATH, L.VM_AWAY, last_entry=2), XDP_DROP, "drop",
         "srh_len"),
    Case("routing header type 0, not an SRH", corrupt(encaps(S_PATH, L.VM_AWAY), SRH_OFF + 2, 0), XDP_DROP,
         "drop", "srh_type"),
    Case("SL = 0 at End.S", encaps([L.D_SBUF, L.SID_S], L.VM_AWAY, sl=0), XDP_DROP, "drop", "sl_zero"),
    Case("SL = 0 at End", encaps([L.D_SBUF, L.SID_END], L.VM_AWAY, sl=0), XDP_DROP, "drop", "sl_zero"),
    Case("SL != 0 at End.SBUF", encaps([L.SID_SBUF, L.D_SBUF], L.VM_RUNNING), XDP_DROP, "drop", "sl_nonzero"),
    Case("hop limit 1 at End.S forwarding", encaps(S_PATH, L.VM_AWAY, hlim=1), XDP_DROP, "drop", "hop_limit"),
    Case("hop limit 1 at End", encaps([L.SID_END, L.D_SBUF], L.VM_AWAY, hlim=1), XDP_DROP, "drop", "hop_limit"),
    Case("hop limit 1 at End.DX6-map rewrite", encaps([L.SID_DX6], L.VM_AWAY, hlim=1), XDP_DROP, "drop",
         "hop_limit"),
    Case("inner neither IPv6 nor IPv4 at delivery", lambda: bytes(Ether(dst=L.FAB_MAC) / IPv6(dst=L.SID_DX6) /
         IPv6ExtHdrSegmentRouting(addresses=[L.SID_DX6], segleft=0, nh=17) / UDP()),
         XDP_DROP, "drop", "inner_not_ipv6"),
    Case("inner IPv6 to an IPv4-mapped address (an IPv4 VM's key): no VM", encaps([L.SID_DX6],
         "::ffff:" + L.V4_OF[L.VM_RUNNING]), XDP_DROP, "drop", "unknown_vm"),
    Case("truncated inner header", lambda: encaps([L.SID_DX6], L.VM_RUNNING)()[:SRH_OFF + 24 + 20], XDP_DROP,
         "drop", "truncated"),
    # RFC 8754 5.1 SR domain: off while no prefix is configured (every row above), else checked first.
    Case("SR domain off: a source from anywhere is accepted", encaps([L.SID_DX6], L.VM_RUNNING, src=OUTSIDE),
         XDP_REDIRECT, "deliver", expect=delivered(L.VM_RUNNING)),
    Case("inside the SR domain, End.DX6-map: deliver", encaps([L.SID_DX6], L.VM_RUNNING), XDP_REDIRECT,
         "deliver", expect=delivered(L.VM_RUNNING), domain=DOMAIN),
    Case("inside the SR domain, End.S away: forward", encaps(S_PATH, L.VM_AWAY), XDP_REDIRECT, "forward",
         expect=lambda: _forwarded(S_PATH, L.VM_AWAY, 0, 63), domain=DOMAIN),
    Case("inside the SR domain, End.S hold: park in the ring", encaps(S_PATH, L.VM_HOLD), XDP_DROP, "hold",
         ring=held(S_PATH, L.VM_HOLD, sl=0), domain=DOMAIN),
    Case("inside the SR domain, End.SBUF incoming: hold", encaps([L.D_SBUF, L.SID_SBUF], L.VM_INCOMING, sl=0),
         XDP_REDIRECT, "hold", expect=delivered(L.VM_INCOMING), domain=DOMAIN),
    Case("inside the SR domain, End: forward", encaps([L.SID_END, L.D_SBUF], L.VM_UNKNOWN), XDP_REDIRECT,
         "forward", expect=lambda: _forwarded([L.SID_END, L.D_SBUF], L.VM_UNKNOWN, 0, 63), domain=DOMAIN),
    Case("outside the SR domain, End.DX6-map: drop", encaps([L.SID_DX6], L.VM_RUNNING, src=OUTSIDE), XDP_DROP,
         "drop", "outside_domain", domain=DOMAIN),
    Case("outside the SR domain, End.S away: drop, not forwarded", encaps(S_PATH, L.VM_AWAY, src=OUTSIDE),
         XDP_DROP, "drop", "outside_domain", domain=DOMAIN),
    Case("outside the SR domain, End.S hold: drop, nothing parked", encaps(S_PATH, L.VM_HOLD, src=OUTSIDE),
         XDP_DROP, "drop", "outside_domain", domain=DOMAIN),
    Case("outside the SR domain, End.SBUF incoming: drop, not held",
         encaps([L.D_SBUF, L.SID_SBUF], L.VM_INCOMING, sl=0, src=OUTSIDE), XDP_DROP, "drop", "outside_domain",
         domain=DOMAIN),
    Case("outside the SR domain, End: drop, not forwarded", encaps([L.SID_END, L.D_SBUF], L.VM_UNKNOWN,
         src=OUTSIDE), XDP_DROP, "drop", "outside_domain", domain=DOMAIN),
    Case("outside the SR domain, malformed SRH: the domain is checked first",
         encaps(S_PATH, L.VM_AWAY, sl=3, src=OUTSIDE), XDP_DROP, "drop", "outside_domain", domain=DOMAIN),
    Case("outside the SR domain, link-local source: drop (not handed to the kernel)",
         encaps([L.SID_DX6], L.VM_RUNNING, src="fe80::1"), XDP_DROP, "drop", "outside_domain", domain=DOMAIN),
    Case("outside the SR domain, not our SID: untouched", encaps([L.NOT_OURS, L.D_SBUF], L.VM_RUNNING,
         src=OUTSIDE), XDP_PASS, "pass", expect=encaps([L.NOT_OURS, L.D_SBUF], L.VM_RUNNING, src=OUTSIDE),
         domain=DOMAIN),
    Case("SR domain host prefix: that address is inside", encaps([L.SID_DX6], L.VM_RUNNING, src=OUTSIDE),
         XDP_REDIRECT, "deliver", expect=delivered(L.VM_RUNNING), domain=HOST_DOMAIN),
    Case("SR domain host prefix: its neighbour is outside", encaps([L.SID_DX6], L.VM_RUNNING,
         src="2001:db8:8::2"), XDP_DROP, "drop", "outside_domain", domain=HOST_DOMAIN),
]


def _inner_packet_to(b: bytes, ether: bool, dsts) -> tuple:
    """(the parsed frame or hold-ring record, its first IPv6 layer with a UDP packet to one of `dsts`, or
    None)."""
    pkt = Ether(b) if ether else IPv6(b)
    layer = pkt
    while layer and not (isinstance(layer, IPv6) and layer.dst in dsts and UDP in layer):
        layer = layer.payload
    return pkt, (layer or None)


def v4_twin(b: bytes, ether: bool = True, v4_of: dict[str, str] = L.V4_OF) -> bytes | None:
    """The same frame (or hold-ring record, from the IPv6 header on: ether=False) with its inner IPv6 packet to a
    lab VM replaced by the IPv4 packet to the VM's IPv4 address (`v4_of`; same payload, TTL = hop limit); None
    when it has no such inner packet. Everything around it is kept as it was, lengths and next headers
    updated."""
    v4_of = {str(ipaddress.IPv6Address(k)): v for k, v in v4_of.items()}
    pkt, layer = _inner_packet_to(b, ether, v4_of)
    if layer is None:
        return None
    new = inner4(v4_of[layer.dst], payload=bytes(layer[UDP].payload), ttl=layer.hlim)
    under = layer.underlayer
    if under is None:
        return None
    under.remove_payload()
    under.add_payload(new)
    if isinstance(under, Ether):
        under.type = 0x0800
    else:
        under.nh = 4
    if isinstance(pkt, IPv6) or IPv6 in pkt:
        del pkt[IPv6].plen
    return bytes(pkt)


def _v4_cases(cases: list[Case]) -> list[Case]:
    out = []
    for c in cases:
        if v4_twin(c.packet()) is None:
            continue
        out.append(Case(
            "[IPv4] " + c.desc, lambda c=c: v4_twin(c.packet()), c.action, c.verdict, c.reason,
            expect=c.expect and (lambda c=c: v4_twin(c.expect())),
            ring=c.ring and (lambda c=c: v4_twin(c.ring(), ether=False)), domain=c.domain))
    return out


def prefix_twin(b: bytes, ether: bool = True) -> bytes | None:
    """The same frame (or hold-ring record) with its inner IPv6 packet to a lab VM sent to an address inside the
    VM's IPv6 prefix instead (L.IN_PREFIX); None when it has no such inner packet or the VM routes no prefix."""
    to = {str(ipaddress.IPv6Address(k)): v[0] for k, v in L.IN_PREFIX.items()}
    pkt, layer = _inner_packet_to(b, ether, to)
    if layer is None:
        return None
    layer.dst = to[layer.dst]
    del layer[UDP].chksum  # the pseudo-header changed
    return bytes(pkt)


# The VM-lookup rows (a verdict, or the VM's state refusing the behaviour) sent to an address inside one of the
# VM's prefixes, IPv6 and IPv4: vm_table misses, vm_prefixes names the VM, and its entry decides as for its
# own address. The IPv4 prefixes belong to the same VMs (IPv6 ids): one entry moves both families.
def _prefix_cases(cases: list[Case]) -> list[Case]:
    v4_in_prefix = {vm: v4 for vm, (_, v4) in L.IN_PREFIX.items()}
    out = []
    for c in cases:
        if not (c.verdict in ("deliver", "forward", "hold") or c.reason == "vm_state") or \
                prefix_twin(c.packet()) is None:
            continue
        out.append(Case(
            "[prefix] " + c.desc, lambda c=c: prefix_twin(c.packet()), c.action, c.verdict, c.reason,
            expect=c.expect and (lambda c=c: prefix_twin(c.expect())),
            ring=c.ring and (lambda c=c: prefix_twin(c.ring(), ether=False)), domain=c.domain))
        out.append(Case(
            "[IPv4] [prefix] " + c.desc, lambda c=c: v4_twin(c.packet(), v4_of=v4_in_prefix), c.action,
            c.verdict, c.reason, expect=c.expect and (lambda c=c: v4_twin(c.expect(), v4_of=v4_in_prefix)),
            ring=c.ring and (lambda c=c: v4_twin(c.ring(), ether=False, v4_of=v4_in_prefix)), domain=c.domain))
    return out


PREFIX_CASES = [
    Case("[prefix] outside every prefix, next to one: no VM", encaps([L.SID_DX6], "2001:db8:110:1::5"), XDP_DROP,
         "drop", "unknown_vm"),
    Case("[IPv4] [prefix] outside every prefix, next to one: no VM", lambda: encaps4([L.SID_DX6], "10.10.11.5")(),
         XDP_DROP, "drop", "unknown_vm"),
    Case("[prefix] a prefix of a VM with no entry: no VM", encaps([L.SID_DX6], L.IN_PREFIX[L.VM_UNKNOWN][0]),
         XDP_DROP, "drop", "unknown_vm"),
    Case("[IPv4] [prefix] a prefix of a VM with no entry: no VM",
         lambda: encaps4([L.SID_DX6], L.IN_PREFIX[L.VM_UNKNOWN][1])(), XDP_DROP, "drop", "unknown_vm"),
    Case("[prefix] the prefix's network address: the VM's too", encaps([L.SID_DX6], "2001:db8:110::"),
         XDP_REDIRECT, "deliver", expect=delivered("2001:db8:110::")),
    Case("[prefix] an IPv6 packet to an IPv4 prefix's mapped address: no VM", encaps([L.SID_DX6],
         "::ffff:10.10.10.5"), XDP_DROP, "drop", "unknown_vm"),
]

V4_INNER_OFF = SRH_OFF + 8 + 16  # the inner header behind a one-segment SRH


def encaps4(segments, vm, **kw) -> Callable[[], bytes]:
    return lambda: bytes(h_encaps(segments, inner4(vm, **kw), dst_mac=L.FAB_MAC))


def tot_len(build: Callable[[], bytes], value: int | Callable[[int], int]) -> Callable[[], bytes]:
    """The inner IPv4 total length set to `value` (or value(frame length))."""
    def f():
        b = bytearray(build())
        v = value(len(b)) if callable(value) else value
        b[V4_INNER_OFF + 2:V4_INNER_OFF + 4] = v.to_bytes(2, "big")
        return bytes(b)
    return f


V4_RUNNING = L.V4_OF[L.VM_RUNNING]
IPV4_CASES = [
    # RFC 791 3.1 checks on the inner IPv4 header (RFC 8986 4.6 End.DX4), at a SID that decapsulates.
    Case("[IPv4] inner version not 4 behind next header 4: drop", corrupt(encaps4([L.SID_DX6], V4_RUNNING),
         V4_INNER_OFF, 0x65), XDP_DROP, "drop", "inner_malformed"),
    Case("[IPv4] inner IHL < 5: drop", corrupt(encaps4([L.SID_DX6], V4_RUNNING), V4_INNER_OFF, 0x44), XDP_DROP,
         "drop", "inner_malformed"),
    Case("[IPv4] inner total length < IHL * 4: drop", tot_len(encaps4([L.SID_DX6], V4_RUNNING), 19), XDP_DROP,
         "drop", "inner_malformed"),
    Case("[IPv4] inner total length past the frame: drop", tot_len(encaps4([L.SID_DX6], V4_RUNNING),
         lambda n: n - V4_INNER_OFF + 1), XDP_DROP, "drop", "truncated"),
    Case("[IPv4] inner header cut short (fewer than 20 bytes)", lambda: encaps4([L.SID_DX6], V4_RUNNING)()[
         :V4_INNER_OFF + 19], XDP_DROP, "drop", "truncated"),
    Case("[IPv4] malformed inner at End.S away: dropped, not forwarded", lambda: bytes(
         bytearray(encaps4(S_PATH, L.V4_OF[L.VM_AWAY])())[:V4_INNER_OFF + 16] + b"\x44" +
         encaps4(S_PATH, L.V4_OF[L.VM_AWAY])()[V4_INNER_OFF + 17:]), XDP_DROP, "drop", "inner_malformed"),
    # TTL: not decremented at delivery (as the kernel's End.DX4; IPv6's hop limit alike), the checksum intact.
    Case("[IPv4] inner TTL 1 at delivery: delivered as it is", encaps4([L.SID_DX6], V4_RUNNING, ttl=1),
         XDP_REDIRECT, "deliver", expect=lambda: bytes(Ether(src=L.GW_MAC, dst=L.VM_MAC) / inner4(V4_RUNNING, ttl=1))),
    Case("[IPv4] inner total length shorter than the frame (Ethernet padding): delivered with the padding",
         lambda: encaps4([L.SID_DX6], V4_RUNNING)() + bytes(6), XDP_REDIRECT, "deliver",
         expect=lambda: bytes(Ether(src=L.GW_MAC, dst=L.VM_MAC) / inner4(V4_RUNNING)) + bytes(6)),
]

V4_CASES = _v4_cases(CASES)
PREFIX_CASES += _prefix_cases(CASES)
ALL_CASES = CASES + V4_CASES + IPV4_CASES + PREFIX_CASES


@contextlib.contextmanager
def sr_domain(dp, prefixes):
    """The SR domain is `prefixes` for the body, empty (check off) again afterwards."""
    for p in prefixes:
        dp.add_domain(p)
    try:
        yield
    finally:
        for p in dp.list_domains():
            dp.del_domain(p)


@pytest.fixture(scope="module")
def lab():
    with L.TestRunLab() as lab:
        yield lab


def test_every_ipv6_behaviour_row_has_an_ipv4_twin():
    """The generator keeps up with the table: every row that reaches a VM (or End) with an inner IPv6 packet
    to a lab VM is generated for IPv4 too, and, when the VM routes prefixes, for an address inside each."""
    twins = {c.desc.removeprefix("[IPv4] ") for c in V4_CASES}
    for c in CASES:
        if c.verdict in ("deliver", "forward", "hold") and "IPv4" not in c.desc:
            assert c.desc in twins, c.desc
    assert len(V4_CASES) >= 40
    prefixed = {c.desc.removeprefix("[IPv4] ").removeprefix("[prefix] ") for c in PREFIX_CASES}
    for c in CASES:
        if c.verdict in ("deliver", "forward", "hold") and prefix_twin(c.packet()) is not None:
            assert c.desc in prefixed, c.desc
    assert sum(c.desc.startswith("[IPv4] [prefix]") for c in PREFIX_CASES) >= 15


@pytest.mark.parametrize("case", ALL_CASES, ids=[c.desc for c in ALL_CASES])
def test_behaviour(lab, case: Case):
    records = []
    with lab.dp.hold_ring(records.append) as ring:
        ring.poll(0)  # earlier cases' records are theirs
        records.clear()
        with sr_domain(lab.dp, case.domain):
            before = lab.dp.stats()
            result = lab.run(case.packet())
            after = lab.dp.stats()
        ring.poll(0)

    assert result.action == {XDP_DROP: "XDP_DROP", XDP_PASS: "XDP_PASS", XDP_REDIRECT: "XDP_REDIRECT"}[case.action]
    delta = {k: after["verdicts"][k] - before["verdicts"][k] for k in after["verdicts"]}
    assert delta == {k: int(k == case.verdict) for k in delta}, "exactly one verdict counted"
    drops = {k: after["drops"][k] - before["drops"][k] for k in after["drops"]}
    assert drops == {k: int(k == case.reason) for k in drops}, "drop counted under its reason, and only then"
    # Per inner family: at most one count, under the case's family and verdict; always one for a packet a
    # per-VM behaviour delivered or held (End forwards without reading the inner packet).
    inner = {(fam, k): after["inner"][fam][k] - before["inner"][fam][k]
             for fam in after["inner"] for k in after["inner"][fam]}
    family = "ipv4" if case.desc.startswith("[IPv4]") else "ipv6"
    moved = {key: n for key, n in inner.items() if n}
    assert moved in ({}, {(family, case.verdict): 1}), moved
    if case.verdict in ("deliver", "hold"):
        assert moved == {(family, case.verdict): 1}
    if case.expect is not None:
        got, want = result.data, case.expect()
        assert got == want, f"output differs:\n got  {Ether(got)!r}\n want {Ether(want)!r}"
    if case.ring is not None:
        assert [r.packet for r in records] == [case.ring()]
    else:
        assert records == []
    if case.verdict != "pass":  # per-SID counters move for our SIDs only
        moved = [s for s, b in zip(after["sids"], before["sids"]) if s["stats"]["packets"] != b["stats"]["packets"]]
        assert len(moved) == 1
        field = {"deliver": "delivered", "forward": "forwarded", "hold": "held", "drop": "dropped"}[case.verdict]
        old = next(b for b in before["sids"] if b["sid"] == moved[0]["sid"])
        assert moved[0]["stats"][field] == old["stats"][field] + 1


@pytest.mark.parametrize("family", [6, 4])
def test_hold_ring_keeps_order(lab, family):
    """Packets parked in HOLD come out of the ring in arrival order, whole, named by the VM's address."""
    vm, build = (L.VM_HOLD, inner) if family == 6 else (L.V4_OF[L.VM_HOLD], inner4)
    packets = [bytes(h_encaps(S_PATH, build(vm, payload=f"seq-{i}".encode()), dst_mac=L.FAB_MAC))
               for i in range(50)]
    records = []
    with lab.dp.hold_ring(records.append) as ring:
        ring.poll(0)
        records.clear()
        for p in packets:
            assert lab.run(p).action == "XDP_DROP"
        while ring.poll(0):
            pass
    payloads = [bytes(IPv6(r.packet)[UDP].payload) for r in records]
    assert payloads == [f"seq-{i}".encode() for i in range(50)]
    assert all(r.vm == vm for r in records)


def test_ring_first_parks_behind_unsent_records(lab):
    """AWAY with SRMIG_VM_F_RING_FIRST (the source drain's flip): a packet parks while the hold ring holds a
    record not yet consumed (read but not committed counts as not consumed), and is forwarded once the ring
    is empty; without the flag, AWAY forwards whatever the ring holds. Same at End.DX6-map."""
    from srmig.ctl.drain import hold_ring_reader, read_hold_packets
    from srmig.bpf.abi import VmState

    vm = "2001:db8:100::77"
    to_s = [bytes(h_encaps(S_PATH, inner(vm, payload=f"s-{i}".encode()), dst_mac=L.FAB_MAC)) for i in range(8)]
    to_dx6 = bytes(h_encaps([L.SID_DX6], inner(vm, payload=b"dx6"), dst_mac=L.FAB_MAC))

    def payloads(packets):
        return [bytes(IPv6(p)[UDP].payload) for p in packets]

    with hold_ring_reader(lab.dp) as ring:
        read_hold_packets(ring)  # earlier tests' records
        try:
            lab.dp.set_vm(vm, VmState.AWAY, next_sid=L.D_DX6, ring_first=True)
            assert lab.dp.get_vm(vm).ring_first
            assert lab.run(to_s[0]).action == "XDP_REDIRECT", "empty ring: forwarded directly"
            lab.dp.set_vm(vm, VmState.HOLD, next_sid=L.D_DX6)
            assert lab.run(to_s[1]).action == "XDP_DROP"  # parked in HOLD
            lab.dp.set_vm(vm, VmState.AWAY, next_sid=L.D_DX6, ring_first=True)
            assert lab.run(to_s[2]).action == "XDP_DROP", "behind s-1"
            assert payloads(read_hold_packets(ring, commit=False)) == [b"s-1", b"s-2"]
            assert not ring.empty()
            assert lab.run(to_s[3]).action == "XDP_DROP", "read, not yet committed: still behind"
            assert lab.run(to_dx6).action == "XDP_DROP", "End.DX6-map stragglers too"
            ring.commit()
            assert lab.run(to_s[4]).action == "XDP_DROP", "s-3 is still in the ring"
            assert payloads(read_hold_packets(ring)) == [b"s-3", b"dx6", b"s-4"]
            assert ring.empty()
            assert lab.run(to_s[5]).action == "XDP_REDIRECT", "ring sent empty: forwarded directly"
            lab.dp.set_vm(vm, VmState.HOLD, next_sid=L.D_DX6)
            assert lab.run(to_s[6]).action == "XDP_DROP"
            lab.dp.set_vm(vm, VmState.AWAY, next_sid=L.D_DX6)
            assert lab.run(to_s[7]).action == "XDP_REDIRECT", "no flag: the ring does not hold AWAY back"
            assert payloads(read_hold_packets(ring)) == [b"s-6"]
        finally:
            lab.dp.del_vm(vm)
            read_hold_packets(ring)


@pytest.mark.parametrize("family", [6, 4])
def test_shadow_copies_what_is_delivered(lab, family):
    """With the shadow flag, every packet delivered to the VM is also copied, decapsulated, to the shadow
    ring; the delivery itself is unchanged. Without it, nothing is copied. An IPv4 VM's copy is its IPv4
    packet, named by its IPv4 address (a short one too: 28 bytes, less than an IPv6 header)."""
    from srmig.bpf.abi import VmState

    vm = L.VM_RUNNING if family == 6 else V4_RUNNING
    build = inner if family == 6 else inner4
    packets = [bytes(h_encaps(S_PATH, build(vm), dst_mac=L.FAB_MAC))]
    if family == 4:
        packets.append(bytes(h_encaps(S_PATH, build(vm, payload=b""), dst_mac=L.FAB_MAC)))
    records = []
    with lab.dp.shadow_ring(records.append) as ring:
        ring.poll(0)
        records.clear()
        lab.dp.set_vm(vm, VmState.RUNNING, shadow=True)
        try:
            outs = [lab.run(p) for p in packets]
        finally:
            lab.dp.set_vm(vm, VmState.RUNNING)
        assert lab.run(packets[0]).action == "XDP_REDIRECT"  # flag off again: no copy
        ring.poll(0)
    assert [o.action for o in outs] == ["XDP_REDIRECT"] * len(packets)
    assert outs[0].data == bytes(Ether(src=L.GW_MAC, dst=L.VM_MAC) / build(vm))
    want = [bytes(build(vm))] + ([bytes(build(vm, payload=b""))] if family == 4 else [])
    assert [r.packet for r in records] == want
    assert all(r.vm == vm for r in records)


def test_shadow_log_leaves_recent_records_to_the_agent_after_it(lab):
    """The agent reads the shadow ring but consumes it late (ShadowLog.LAG_NS, LAG_MAX): killed, it leaves
    the frames delivered last in the pinned ring, and a log opened by the agent after it reads them again
    (the frames QEMU swallowed at the pause are among them). close() consumes everything: the next window's
    log starts empty."""
    from srmig.bpf.abi import VmState
    from srmig.ctl.swallow import ShadowLog

    vm = L.VM_RUNNING
    ShadowLog(lab.dp).close()  # whatever an earlier test left
    payloads = [f"shadow-{i}".encode() for i in range(20)]
    lab.dp.set_vm(vm, VmState.RUNNING, shadow=True)
    try:
        for p in payloads:
            assert lab.run(bytes(h_encaps(S_PATH, inner(vm, payload=p), dst_mac=L.FAB_MAC))).action == "XDP_REDIRECT"
    finally:
        lab.dp.set_vm(vm, VmState.RUNNING)
    want = [bytes(inner(vm, payload=p)) for p in payloads]

    first = ShadowLog(lab.dp)
    first.flush()
    assert [r.packet for r in first.records] == want
    first._reader.close()  # killed: nothing more consumed
    second = ShadowLog(lab.dp)
    second._lag_max = 5
    second.flush()
    assert [r.packet for r in second.records] == want, "the agent before it consumed none of them"
    second._reader.close()
    third = ShadowLog(lab.dp)
    third.flush()
    assert [r.packet for r in third.records] == want[-5:], "the second consumed all but its last 5"
    third.close()
    fourth = ShadowLog(lab.dp)
    fourth.flush()
    assert list(fourth.records) == []
    fourth.close()


def _verdict(lab, packet: bytes) -> str:
    """The verdict (or drop reason) the program counted for this packet."""
    before = lab.dp.stats()
    lab.run(packet)
    after = lab.dp.stats()
    moved = [k for k in after["drops"] if after["drops"][k] != before["drops"][k]]
    moved += [k for k in after["verdicts"] if after["verdicts"][k] != before["verdicts"][k] and k != "drop"]
    assert len(moved) == 1, moved
    return moved[0]


def test_table_copies_follow_every_write(lab):
    """The program answers SID and VM lookups from per-CPU copies of sid_table and vm_table entries (struct
    table_copy in srmig.c), trusted only at the table generation they were made at, which every Dataplane
    write bumps: each write is seen by the next packet, absent keys included (a VM or SID added after a packet
    missed it). A write to the map alone, without the bump, is not seen while a copy stands: that is the copy
    on the packet's path, and why every writer must go through Dataplane."""
    from srmig.ctl.maps import ffi
    from srmig.bpf.abi import Behaviour, VmState

    vm, sid = "2001:db8:100::78", "fc00:0:1::55"
    to_s = encaps(S_PATH, vm)()
    to_new_sid = encaps([sid, L.D_SBUF], vm)()
    cpus = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {min(cpus)})  # per-CPU copies: every run on the same CPU
    try:
        assert _verdict(lab, to_s) == "unknown_vm"
        lab.dp.set_vm(vm, VmState.AWAY, next_sid=L.D_DX6)
        assert _verdict(lab, to_s) == "forward"
        lab.dp.set_vm(vm, VmState.HOLD, next_sid=L.D_DX6)
        assert _verdict(lab, to_s) == "hold"
        lab.dp.set_vm(vm, VmState.AWAY, next_sid=L.D_DX6)
        assert _verdict(lab, to_s) == "forward"
        # Behind the Dataplane's back: HOLD written to the map alone.
        value = ffi.new("struct srmig_vm_value *", {"state": int(VmState.HOLD)})
        ffi.memmove(value.next_sid, ipaddress.IPv6Address(L.D_DX6).packed, 16)
        lab.dp.vms.update(lab.dp._vm_key(vm), value)
        assert _verdict(lab, to_s) == "forward", "the copy stands until the generation moves"
        lab.dp._tables_changed()
        assert _verdict(lab, to_s) == "hold"
        assert _verdict(lab, to_new_sid) == "pass"
        lab.dp.add_sid(sid, Behaviour.END_S)
        assert _verdict(lab, to_new_sid) == "hold"
        lab.dp.del_sid(sid)
        assert _verdict(lab, to_new_sid) == "pass"
        lab.dp.del_vm(vm)
        assert _verdict(lab, to_s) == "unknown_vm"
        lab.dp.set_vms_bulk([(ipaddress.IPv6Address(vm).packed, VmState.AWAY)])  # one bump for the lot
        assert _verdict(lab, to_s) == "forward"
    finally:
        os.sched_setaffinity(0, cpus)
        lab.dp.del_sid(sid)
        lab.dp.del_vm(vm)
        with lab.dp.hold_ring(lambda r: None) as ring:
            ring.poll(0)


def test_generation_bumps_never_collide(lab):
    """Writers bump the table generation concurrently (threads here; the agent and a CLI call in real life),
    alone or around a write (odd, then even), and no bump is lost: a generation written twice could make an
    outdated copy current again."""
    import threading

    from srmig.ctl.maps import Dataplane, ffi
    from srmig.bpf import abi

    key = ffi.new("uint32_t *", abi.META_TABLE_GENERATION)
    dps = [Dataplane(lab.dp.pin_dir) for _ in range(4)]
    try:
        def writes(d):
            for _ in range(150):
                d._tables_changed()  # the next even generation
                with d._writing():   # the next odd one, then the next even one
                    pass

        lab.dp._tables_changed()
        start = lab.dp.meta.lookup(key)
        threads = [threading.Thread(target=writes, args=(d,)) for d in dps]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        for d in dps:
            d.close()
    assert lab.dp.meta.lookup(key) == (start + 4 * 150 * (2 + 2)) & 0xFFFFFFFF


def _domain_count(dp) -> int:
    from srmig.ctl.maps import META_DOMAIN_PREFIXES, ffi

    return dp.meta.lookup(ffi.new("uint32_t *", META_DOMAIN_PREFIXES))


def test_sr_domain_operations(lab):
    """add/del/list are idempotent, normalise what they are given, refuse what is not an IPv6 prefix, and
    keep the count the program reads (its on/off switch) equal to the trie's size."""
    dp = lab.dp
    assert dp.list_domains() == [] and _domain_count(dp) == 0
    try:
        assert dp.add_domain("FC00:0::/16") == "fc00::/16"
        assert dp.add_domain("fc00::/16") == "fc00::/16"  # idempotent
        assert dp.add_domain("2001:db8:9::1") == "2001:db8:9::1/128"  # a bare address is a host prefix
        assert dp.add_domain("::/0") == "::/0"
        assert dp.list_domains() == ["::/0", "2001:db8:9::1/128", "fc00::/16"] and _domain_count(dp) == 3
        assert dp.del_domain("::/0") is True
        assert dp.del_domain("::/0") is False  # idempotent
        assert _domain_count(dp) == 2
        for bad, why in (("nope", "not an IPv6 prefix"), ("fc00::/129", "not an IPv6 prefix"),
                         ("192.0.2.0/24", "is IPv4"), ("fc00::1/16", "host bits set (did you mean fc00::/16?)")):
            with pytest.raises(ValueError, match=re.escape(why)):
                dp.add_domain(bad)
            with pytest.raises(ValueError):
                dp.del_domain(bad)
        assert _domain_count(dp) == 2
    finally:
        for p in dp.list_domains():
            dp.del_domain(p)
    assert dp.list_domains() == [] and _domain_count(dp) == 0


def test_sr_domain_full(lab):
    """The trie holds Limits.max_domain_prefixes; one more is a clear error, and the count stays right."""
    from srmig.bpf.loader import Limits

    dp = lab.dp
    n = Limits().max_domain_prefixes
    try:
        for i in range(n):
            dp.add_domain(f"2001:db8:{i:x}::/48")
        assert _domain_count(dp) == n
        with pytest.raises(ValueError, match=f"SR domain full \\({n} prefixes\\)"):
            dp.add_domain("fc00::/16")
        assert len(dp.list_domains()) == n
    finally:
        for p in dp.list_domains():
            dp.del_domain(p)
    assert _domain_count(dp) == 0


def test_cli_domain(lab, capsys):
    """`srmig domain add|del|list` on the lab's namespace, table and --json, errors on one line."""
    from srmig.cli import main

    ns = lab.topo.ns("lab")

    def srmig(*args) -> str:
        assert main(["--netns", ns, "domain", *args]) == 0
        return capsys.readouterr().out

    try:
        assert json.loads(srmig("add", "fc00::/16", "--json")) == {"prefix": "fc00::/16", "prefixes": 1}
        srmig("add", "2001:db8:9::/48")
        assert json.loads(srmig("list", "--json")) == [{"prefix": "2001:db8:9::/48"}, {"prefix": "fc00::/16"}]
        assert srmig("list").split() == ["PREFIX", "2001:db8:9::/48", "fc00::/16"]
        assert main(["--netns", ns, "domain", "add", "fc00::1/16"]) == 1
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "host bits set (did you mean fc00::/16?)" in err
        assert json.loads(srmig("del", "fc00::/16", "--json")) == {"prefix": "fc00::/16", "deleted": True}
        assert json.loads(srmig("del", "fc00::/16", "--json")) == {"prefix": "fc00::/16", "deleted": False}
        assert lab.dp.list_domains() == ["2001:db8:9::/48"] and _domain_count(lab.dp) == 1
    finally:
        for p in lab.dp.list_domains():
            lab.dp.del_domain(p)
    assert "SR domain check is off" in srmig("list")


def test_ipv4_vm_addresses(lab):
    """An IPv4 VM is set, read, listed and deleted by its IPv4 address; the map holds its IPv4-mapped address
    (srmig_abi.h), which is not an IPv6 VM of the same name."""
    from srmig.bpf.abi import VmState
    from srmig.ctl.maps import ffi

    dp = lab.dp
    vm = "192.0.2.10"
    try:
        entry = dp.set_vm(vm, VmState.AWAY, next_sid=L.D_DX6)
        assert entry.vm == vm and entry.next_sid == L.D_DX6
        assert dp.get_vm(vm).state == VmState.AWAY
        assert dp.get_vm("::ffff:192.0.2.10").vm == vm  # the key itself, spelled as IPv6
        keys = [bytes(ffi.buffer(k.addr, 16)) for k in dp.vms.keys()]
        assert ipaddress.IPv6Address("::ffff:192.0.2.10").packed in keys
        listed = [e.vm for e in dp.list_vms()]
        assert vm in listed and V4_RUNNING in listed and L.VM_RUNNING in listed
        assert listed.index(V4_RUNNING) < listed.index(L.VM_RUNNING)  # IPv4 first, each family in order
        with pytest.raises(ValueError, match="not an IPv6 or IPv4 address"):
            dp.set_vm("192.0.2.300", VmState.RUNNING)
        assert dp.del_vm(vm) is True and dp.get_vm(vm) is None
    finally:
        dp.del_vm(vm)


def test_counters_per_family_as_printed(lab):
    """`srmig stats` and `srmig status` print the verdicts per inner family: a delivered IPv4 packet moves the
    ipv4 line's count, an IPv6 one the ipv6 line's."""
    from srmig.ctl.status import dataplane_lines

    def printed() -> dict[str, dict[str, int]]:
        out = {}
        for line in dataplane_lines(lab.dp.stats()):
            name, _, rest = line.partition(":")
            out[name] = dict((k, int(v)) for k, v in (w.split("=") for w in rest.split() if "=" in w))
        return out

    for family in ("ipv4", "ipv6"):
        case = next(c for c in ALL_CASES if c.verdict == "deliver" and not c.domain
                    and c.desc.startswith("[IPv4]") == (family == "ipv4"))
        before = printed()
        assert lab.run(case.packet()).retval == case.action
        after = printed()
        assert after[family].get("deliver", 0) == before[family].get("deliver", 0) + 1, (case.desc, after)
        other = "ipv6" if family == "ipv4" else "ipv4"
        assert after[other] == before[other]
        assert after["verdicts"]["deliver"] == before["verdicts"]["deliver"] + 1


def test_prefix_follows_its_vm(lab):
    """A prefix's addresses take the entry of the VM it points at, whatever that entry says next (one write of
    the id moves them); the prefix's own writes are seen by the next packet (a copy of "no such VM" made
    before the prefix existed goes); an exact entry inside a prefix wins over it; hold-ring records of a
    prefix's packets name the VM by its id. VmAddressSet writes and deletes the prefixes a VM lists."""
    from srmig.bpf.abi import VmState
    from srmig.ctl.drain import hold_ring_reader, read_hold_packets
    from srmig.ctl.maps import VmAddressSet

    vm, p6, p4 = "2001:db8:100::79", "2001:db8:179::/64", "10.10.79.0/24"
    to6 = encaps(S_PATH, "2001:db8:179::9")()
    to4 = encaps4(S_PATH, "10.10.79.9")()
    cpus = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {min(cpus)})  # per-CPU copies: every run on the same CPU
    dp = lab.dp
    try:
        with hold_ring_reader(dp) as ring:
            read_hold_packets(ring)
            dp.set_vm(vm, VmState.AWAY, next_sid=L.D_DX6)
            assert _verdict(lab, to6) == "unknown_vm" and _verdict(lab, to4) == "unknown_vm"
            assert dp.set_vm_prefix("2001:db8:179:0::/64", vm) == p6 and dp.set_vm_prefix(p4, vm) == p4
            assert _verdict(lab, to6) == "forward" and _verdict(lab, to4) == "forward"
            dp.set_vm(vm, VmState.HOLD, next_sid=L.D_DX6)
            assert _verdict(lab, to6) == "hold" and _verdict(lab, to4) == "hold"
            got = dp.get_vm(p4)
            assert got.vm == p4 and got.of == vm and got.state is VmState.HOLD
            assert {(e.vm, e.of) for e in dp.list_vms() if e.of} >= {(p6, vm), (p4, vm)}
            dp.set_vm("2001:db8:179::9", VmState.AWAY, next_sid=L.D_DX6)  # exact first
            assert _verdict(lab, to6) == "forward" and _verdict(lab, to4) == "hold"
            dp.del_vm("2001:db8:179::9")
            assert dp.del_vm(p6) is True and dp.del_vm_prefix(p4) is True and dp.del_vm(p6) is False
            assert _verdict(lab, to6) == "unknown_vm" and _verdict(lab, to4) == "unknown_vm"
            with pytest.raises(ValueError, match="is a prefix"):
                dp.set_vm(p6, VmState.RUNNING)
            with pytest.raises(ValueError, match="host bits"):
                dp.set_vm_prefix("10.10.79.1/24", vm)
            both = VmAddressSet(dp, lambda v: (vm, p6, p4))
            both.set_vm(vm, VmState.AWAY, next_sid=L.D_DX6)
            assert set(dp.list_vm_prefixes()) >= {(p6, vm), (p4, vm)}
            assert _verdict(lab, to6) == "forward" and _verdict(lab, to4) == "forward"
            both.del_vm(vm)
            assert p6 not in dict(dp.list_vm_prefixes()) and p4 not in dict(dp.list_vm_prefixes())
            assert _verdict(lab, to6) == "unknown_vm" and _verdict(lab, to4) == "unknown_vm"
    finally:
        os.sched_setaffinity(0, cpus)
        for p in (p6, p4):
            dp.del_vm_prefix(p)
        for a in (vm, "2001:db8:179::9"):
            dp.del_vm(a)
        with dp.hold_ring(lambda r: None) as ring:
            ring.poll(0)


# A dual-stack VM whose id is its first address: two more addresses (one per family) and a prefix. The packets
# are one to each address and one into the prefix, each through S's End.S.
ONE_VM = ("2001:db8:100::7a", "2001:db8:17a::5", "10.10.122.5", "10.10.123.0/24")
ONE_VM_DST = {"id": ("2001:db8:100::7a", 6), "v6": ("2001:db8:17a::5", 6), "v4": ("10.10.122.5", 4),
              "prefix": ("10.10.123.9", 4)}
STEP_VERDICT = {"away": "forward", "hold": "hold"}


class _Watched:
    """A map of the Dataplane's whose every update and delete calls `after(key updated or None)` once the
    kernel has it: the moments between one map write and the next, where an intermediate state would be
    seen."""

    def __init__(self, m, after: Callable[[], None]):
        self.m, self.after, self.writes = m, after, 0

    def __getattr__(self, name):
        return getattr(self.m, name)

    def update(self, key, *a, **kw):
        out = self.m.update(key, *a, **kw)
        self.writes += 1
        self.after(bytes(key.addr))
        return out

    def delete(self, key, *a, **kw):
        out = self.m.delete(key, *a, **kw)
        self.writes += 1
        self.after(None)
        return out


@contextlib.contextmanager
def _one_vm(lab):
    """ONE_VM's packets, on one CPU (the per-CPU copies are this CPU's), its entries removed after."""
    from srmig.ctl.maps import VmAddressSet

    packets = {k: (encaps if fam == 6 else encaps4)(S_PATH, a)() for k, (a, fam) in ONE_VM_DST.items()}
    cpus = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {min(cpus)})
    try:
        yield VmAddressSet(lab.dp, lambda vm: ONE_VM), packets
    finally:
        os.sched_setaffinity(0, cpus)
        for a in ONE_VM:
            lab.dp.del_vm(a)
        with lab.dp.hold_ring(lambda r: None) as ring:
            ring.poll(0)


@pytest.mark.parametrize("state", ["away", "hold"])
def test_one_write_moves_every_address(lab, state):
    """Only the VM's id has a vm_table entry: every other address (IPv6, IPv4) and the prefix point at it, so
    one write of the id's entry, and no other map write, gives every address of both families the new
    verdict, with the per-CPU copies of every one warm before it."""
    from srmig.bpf.abi import VmState

    with _one_vm(lab) as (vms, packets):
        vms.set_vm(ONE_VM[0], VmState.RUNNING)  # the pointers: written once
        assert {(e.vm, e.of) for e in lab.dp.list_vms()} >= {(ONE_VM[0], None), *((a, ONE_VM[0]) for a in ONE_VM[1:])}
        other = "hold" if state == "away" else "away"
        vms.set_vm(ONE_VM[0], VmState[other.upper()], next_sid=L.D_DX6)
        assert {k: _verdict(lab, p) for k, p in packets.items()} == dict.fromkeys(packets, STEP_VERDICT[other])
        vm_writes = lab.dp.vms = _Watched(lab.dp.vms, lambda key: None)
        trie_writes = lab.dp.vm_prefixes = _Watched(lab.dp.vm_prefixes, lambda key: None)
        try:
            vms.set_vm(ONE_VM[0], VmState[state.upper()], next_sid=L.D_DX6)
        finally:
            lab.dp.vms, lab.dp.vm_prefixes = vm_writes.m, trie_writes.m
        # (the deletes of the other addresses' own entries, of nothing, and the id's write)
        assert (vm_writes.writes, trie_writes.writes) == (1 + 2, 0)
        assert {k: _verdict(lab, p) for k, p in packets.items()} == dict.fromkeys(packets, STEP_VERDICT[state])


@pytest.mark.parametrize("warm", ["none", "half", "all"])
def test_no_address_is_seen_between_states(lab, warm):
    """Between any two map writes of a VM's migration steps, every address of the VM gets the same verdict,
    the old one until the id's entry is written and the new one from the next packet on: after each write
    (each map update or delete, as the kernel has it) a packet to each address is run, with the per-CPU
    copies of `warm` of them made before the step. From the layout of an older srmig (an entry per address)
    on, through a loop of steps back and forth. Fails when the addresses are written one by one (the first
    written moves alone), when a copy made before the write is used after it, or when a warm copy outlives
    the write while the others are looked up cold."""
    from srmig.bpf.abi import VmState
    from srmig.ctl.maps import _vm_addr

    seen, mixed = [], []
    with _one_vm(lab) as (vms, packets):
        keys = list(packets)
        warmed = {"none": [], "half": keys[::2], "all": keys}[warm]
        want = {"now": "away"}

        def look(updated=None):
            if updated == _vm_addr(ONE_VM[0]):
                want["now"] = want["next"]
            got = {k: _verdict(lab, packets[k]) for k in keys}
            seen.append(got)
            if got != dict.fromkeys(keys, STEP_VERDICT[want["now"]]):
                mixed.append((want["now"], got))

        for a in ONE_VM[:3]:  # an entry per address, the prefix pointed at the id: an older srmig's
            lab.dp.set_vm(a, VmState.AWAY, next_sid=L.D_DX6)
        lab.dp.set_vm_prefix(ONE_VM[3], ONE_VM[0])
        real = lab.dp.vms, lab.dp.vm_prefixes
        try:
            for step in ["hold", "away"] * 5:
                lab.dp._tables_changed()  # no copy but those of `warmed`
                for k in warmed:
                    _verdict(lab, packets[k])
                want["next"] = step
                lab.dp.vms, lab.dp.vm_prefixes = _Watched(real[0], look), _Watched(real[1], look)
                try:
                    vms.set_vm(ONE_VM[0], VmState[step.upper()], next_sid=L.D_DX6)
                finally:
                    lab.dp.vms, lab.dp.vm_prefixes = real
                assert want["now"] == step
                look()
        finally:
            lab.dp.vms, lab.dp.vm_prefixes = real
    assert not mixed, mixed[:3]
    assert len(seen) > 10 * 2  # (a look after every write, and one after every step)


def test_copies_are_not_used_while_a_write_is_in_progress(lab):
    """Inside the Dataplane's write bracket (the table generation odd) the program reads the tables, not its
    copies: a write behind the copy's back is seen by the very next packet; after the bracket, copies again
    (a write behind their back is not seen until the generation moves)."""
    from srmig.bpf.abi import VmState
    from srmig.ctl.maps import ffi

    vm = "2001:db8:100::7b"
    to_s = encaps(S_PATH, vm)()
    value = ffi.new("struct srmig_vm_value *", {"state": int(VmState.HOLD)})
    ffi.memmove(value.next_sid, ipaddress.IPv6Address(L.D_DX6).packed, 16)
    cpus = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {min(cpus)})
    try:
        lab.dp.set_vm(vm, VmState.AWAY, next_sid=L.D_DX6)
        assert _verdict(lab, to_s) == "forward"  # a copy now
        with lab.dp._writing():
            assert _generation(lab) % 2 == 1
            lab.dp.vms.update(lab.dp._vm_key(vm), value)
            assert _verdict(lab, to_s) == "hold"
            value.state = int(VmState.AWAY)
            lab.dp.vms.update(lab.dp._vm_key(vm), value)
            assert _verdict(lab, to_s) == "forward"
        assert _generation(lab) % 2 == 0
        assert _verdict(lab, to_s) == "forward"
        value.state = int(VmState.HOLD)
        lab.dp.vms.update(lab.dp._vm_key(vm), value)
        assert _verdict(lab, to_s) == "forward", "the copy made after the bracket stands"
        lab.dp._tables_changed()
        assert _verdict(lab, to_s) == "hold"
    finally:
        os.sched_setaffinity(0, cpus)
        lab.dp.del_vm(vm)
        with lab.dp.hold_ring(lambda r: None) as ring:
            ring.poll(0)


def _generation(lab) -> int:
    from srmig.bpf import abi
    from srmig.ctl.maps import ffi

    return lab.dp.meta.lookup(ffi.new("uint32_t *", abi.META_TABLE_GENERATION))


@pytest.mark.parametrize("family", [6, 4])
def test_hold_ring_names_a_prefix_packet_by_its_vm(lab, family):
    """A packet to an address of a VM's prefix, parked in the hold ring, is named by the VM's id: the vm_table
    key whose entry applied, the one the drain knows the VM by."""
    i = 0 if family == 6 else 1
    addr = L.IN_PREFIX[L.VM_HOLD][i]
    build = inner if family == 6 else inner4
    records = []
    with lab.dp.hold_ring(records.append) as ring:
        ring.poll(0)
        records.clear()
        assert lab.run(bytes(h_encaps(S_PATH, build(addr), dst_mac=L.FAB_MAC))).action == "XDP_DROP"
        ring.poll(0)
    assert [r.vm for r in records] == [L.VM_HOLD]
    assert (IPv6(records[0].packet)[IPv6].payload.payload[IP if family == 4 else IPv6].dst == addr)
