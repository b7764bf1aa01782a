"""Every row of DESIGN.md's behaviour table and the RFC 8754/8986 error cases, through the real XDP program
with BPF_PROG_TEST_RUN: {description, input packet, expected action, expected verdict/drop reason,
expected output packet}. The FIB the program consults is the lab namespace's (srmig/testbed/lab.py)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import pytest
from scapy.layers.inet import IP, UDP
from scapy.layers.inet6 import IPv6, IPv6ExtHdrSegmentRouting
from scapy.layers.l2 import Ether

from srmig.dataplane.libbpf import XDP_DROP, XDP_PASS, XDP_REDIRECT
from srmig.testbed import lab as L
from srmig.testbed.packets import INGRESS_MAC, h_encaps, inner

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

CASES = [
    # DESIGN.md behaviour table, row by row.
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
    Case("unknown VM at End.S: drop", encaps(S_PATH, L.VM_UNKNOWN), XDP_DROP, "drop", "unknown_vm"),
    Case("unknown VM at End.DX6-map: drop", encaps([L.SID_DX6], L.VM_UNKNOWN), XDP_DROP, "drop", "unknown_vm"),
    # Other combinations and transit.
    Case("End.S, VM incoming: no action for that state", encaps(S_PATH, L.VM_INCOMING), XDP_DROP, "drop",
         "vm_state"),
    Case("End.SBUF, VM away: no action for that state", encaps([L.D_SBUF, L.SID_SBUF], L.VM_AWAY, sl=0),
         XDP_DROP, "drop", "vm_state"),
    Case("End.DX6-map, VM hold: no action for that state", encaps([L.SID_DX6], L.VM_HOLD), XDP_DROP, "drop",
         "vm_state"),
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
    Case("inner not IPv6 at delivery", lambda: bytes(Ether(dst=L.FAB_MAC) / IPv6(dst=L.SID_DX6) /
         IPv6ExtHdrSegmentRouting(addresses=[L.SID_DX6], segleft=0) / IP(dst="192.0.2.1") / UDP()),
         XDP_DROP, "drop", "inner_not_ipv6"),
    Case("truncated inner header", lambda: encaps([L.SID_DX6], L.VM_RUNNING)()[:SRH_OFF + 24 + 20], XDP_DROP,
         "drop", "truncated"),
]


@pytest.fixture(scope="module")
def lab():
    with L.TestRunLab() as lab:
        yield lab


@pytest.mark.parametrize("case", CASES, ids=[c.desc for c in CASES])
def test_behaviour(lab, case: Case):
    records = []
    with lab.dp.hold_ring(records.append) as ring:
        ring.poll(0)  # earlier cases' records are theirs
        records.clear()
        before = lab.dp.stats()
        result = lab.run(case.packet())
        after = lab.dp.stats()
        ring.poll(0)

    assert result.action == {XDP_DROP: "XDP_DROP", XDP_PASS: "XDP_PASS", XDP_REDIRECT: "XDP_REDIRECT"}[case.action]
    delta = {k: after["verdicts"][k] - before["verdicts"][k] for k in after["verdicts"]}
    assert delta == {k: int(k == case.verdict) for k in delta}, "exactly one verdict counted"
    drops = {k: after["drops"][k] - before["drops"][k] for k in after["drops"]}
    assert drops == {k: int(k == case.reason) for k in drops}, "drop counted under its reason, and only then"
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


def test_hold_ring_keeps_order(lab):
    """Packets parked in HOLD come out of the ring in arrival order, whole."""
    packets = [bytes(h_encaps(S_PATH, inner(L.VM_HOLD, payload=f"seq-{i}".encode()), dst_mac=L.FAB_MAC))
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
    assert all(r.vm == L.VM_HOLD for r in records)


def test_shadow_copies_what_is_delivered(lab):
    """With the shadow flag, every packet delivered to the VM is also copied, decapsulated, to the shadow
    ring; the delivery itself is unchanged. Without it, nothing is copied."""
    from srmig.dataplane.abi import VmState

    pkt = encaps(S_PATH, L.VM_RUNNING)()
    records = []
    with lab.dp.shadow_ring(records.append) as ring:
        ring.poll(0)
        records.clear()
        lab.dp.set_vm(L.VM_RUNNING, VmState.RUNNING, shadow=True)
        try:
            out = lab.run(pkt)
        finally:
            lab.dp.set_vm(L.VM_RUNNING, VmState.RUNNING)
        assert lab.run(pkt).action == "XDP_REDIRECT"  # flag off again: no copy
        ring.poll(0)
    assert out.action == "XDP_REDIRECT" and out.data == delivered(L.VM_RUNNING)()
    assert [r.packet for r in records] == [bytes(inner(L.VM_RUNNING))]
    assert records[0].vm == L.VM_RUNNING
