"""srmig's H.Encaps (srmig/ebpf/encap.c, tc clsact egress): the headers it builds, byte for byte through
BPF_PROG_TEST_RUN, for inner IPv6 and IPv4 (SRH next header 4), then real traffic (ICMP of both families and
a TCP bulk transfer) from an ingress namespace through srmig's End.DX6-map to a dual-stack VM namespace, on
veths, and through the kernel's own SRH decapsulation (an SRv6 peer on any kernel):

    I (ingress: H.Encaps on i0) --- D (srmig XDP, End.DX6-map) --- VM (2001:db8:100::10, 10.0.100.10)

The fabric between I and D is IPv6 only: I routes the VM's IPv4 /32 via D's IPv6 address, D routes I's IPv4
address the same way.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import socket
import struct
import subprocess
import sys
import threading
import time

import pytest

from srmig import netlink
from srmig.ctl import ingress
from srmig.ctl.ingress import BpfEncap
from srmig.bpf import libbpf, loader
from srmig.bpf.abi import Behaviour, VmState
from srmig.testbed.lab import encap_on, steer, xdp_on
from srmig.testbed.netns import sysctl

SRMIG = [sys.executable, "-m", "srmig"]

VM = "2001:db8:100::10"
VM4 = "10.0.100.10"           # the same VM's IPv4 address
D_VM4 = "10.0.100.1"          # D's IPv4 address towards the VM (the VM's gateway)
I_ADDR4 = "10.0.1.1"          # I's IPv4 address (on its lo): the source of its IPv4 pings
I_ADDR, D_LINK = "2001:db8:1::1", "2001:db8:1::2"
D_DX6 = "fc00:0:2::d6"
S_END_S, T_END = "fc00:0:1::5", "fc00:0:3::e"

TC_ACT_OK, TC_ACT_SHOT = 0, 2


# -- the SRH, pure --------------------------------------------------------------------------------------------

def _a(x: str) -> bytes:
    return socket.inet_pton(socket.AF_INET6, x)


@pytest.mark.parametrize("segments, reduced, nh, expected", [
    ([D_DX6], False, 41, bytes([41, 2, 4, 0, 0, 0, 0, 0]) + _a(D_DX6)),
    ([S_END_S, T_END, D_DX6], False, 41, bytes([41, 6, 4, 2, 2, 0, 0, 0]) + _a(D_DX6) + _a(T_END) + _a(S_END_S)),
    # H.Encaps.Red (RFC 8986 5.2): the first SID only in the DA; SL still counts it.
    ([S_END_S, T_END, D_DX6], True, 41, bytes([41, 4, 4, 2, 1, 0, 0, 0]) + _a(D_DX6) + _a(T_END)),
    ([D_DX6], True, 41, b""),
    # An inner IPv4 packet: next header 4 (RFC 8986 5.1), the rest alike.
    ([S_END_S, T_END, D_DX6], False, 4, bytes([4, 6, 4, 2, 2, 0, 0, 0]) + _a(D_DX6) + _a(T_END) + _a(S_END_S)),
    ([S_END_S, T_END, D_DX6], True, 4, bytes([4, 4, 4, 2, 1, 0, 0, 0]) + _a(D_DX6) + _a(T_END)),
], ids=["one", "three", "three-reduced", "one-reduced", "three-ipv4", "three-reduced-ipv4"])
def test_srh_built_and_read_back(segments, reduced, nh, expected):
    srh = ingress.build_srh(segments, reduced, nh)
    assert srh == expected
    assert ingress.parse_srh(srh, segments[0]) == (segments, reduced or len(segments) == 1 and not srh)


@pytest.mark.parametrize("segments, message", [
    ([], "at least one SID"),
    ([D_DX6] * (ingress.MAX_SEGMENTS + 1), f"at most {ingress.MAX_SEGMENTS}"),
    (["fc00::1", "nope"], "not an IPv6 address"),
])
def test_bad_segment_lists_are_refused(segments, message):
    with pytest.raises(ValueError, match=message):
        ingress.build_srh(segments)


@pytest.mark.parametrize("addresses, expected", [
    ([VM], [VM]),
    ([VM4, "2001:DB8:100:0::10"], [VM4, VM]),           # normalised, in the order given
    ([VM, VM4, VM], [VM, VM4]),                          # each once
    (["::ffff:10.0.100.10"], [VM4]),                     # the IPv4-mapped form is the IPv4 address
    ([], ValueError("at least one address")),
    ([VM, "10.0.100.300"], ValueError("not an IPv6 or IPv4 address")),
])
def test_a_vms_addresses_are_checked_together(addresses, expected):
    if isinstance(expected, Exception):
        with pytest.raises(ValueError, match=str(expected)):
            ingress.check_addresses(addresses)
    else:
        assert ingress.check_addresses(addresses) == expected


# -- the program, byte for byte -------------------------------------------------------------------------------

ETH = bytes.fromhex("020000000002" "020000000001" "86dd")
ETH4 = ETH[:12] + b"\x08\x00"


def _checksum(header: bytes) -> int:
    total = sum(struct.unpack(f"!{len(header) // 2}H", header))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def _ipv4(src: str, dst: str, payload: bytes, proto: int = 1, ttl: int = 64, tos: int = 0,
          options: bytes = b"") -> bytes:
    """An IPv4 packet with a correct header checksum (RFC 791), `options` padded by the caller to 4 bytes."""
    ihl = 5 + len(options) // 4
    head = struct.pack("!BBHHHBBH4s4s", 0x40 | ihl, tos, 4 * ihl + len(payload), 0x1234, 0x4000, ttl, proto, 0,
                       socket.inet_aton(src), socket.inet_aton(dst)) + options
    return head[:10] + struct.pack("!H", _checksum(head)) + head[12:] + payload


def _ipv6(src: str, dst: str, payload: bytes, nh: int = 58, hlim: int = 64, tclass: int = 0, flow: int = 0) -> bytes:
    first = (6 << 28) | (tclass << 20) | flow
    return struct.pack("!IHBB", first, len(payload), nh, hlim) + _a(src) + _a(dst) + payload


def _echo(n: int = 32) -> bytes:
    return bytes([128, 0, 0, 0, 0, 1, 0, 1]) + bytes(i & 0xFF for i in range(n))


@pytest.fixture(scope="module")
def encap_prog():
    """The H.Encaps program in a namespace of its own (test runs need no attachment)."""
    from srmig.testbed.netns import Topology

    with Topology() as topo:
        topo.add_host("P")
        topo.link("P", "p0", "P", "p1")  # something to attach to, so the pins are the ones a user gets
        with encap_on(topo, "P", "p0", source=I_ADDR) as encap:
            fd = libbpf.obj_get(str(encap.pin_dir / loader.PROG))
            try:
                yield encap, fd
            finally:
                os.close(fd)


# (VM address, the frame sent to it, the inner packet's protocol number = the SRH's next header, its traffic
# class or TOS): the inner TTL 7 shows the outer hop limit is the ingress's own, not copied.
INNERS = {
    "ipv6": (VM, lambda: ETH + _ipv6("2001:db8:c::1", VM, _echo(), tclass=0xb8, flow=0x12345, hlim=7), 41, 0xB8),
    "ipv4": (VM4, lambda: ETH4 + _ipv4("192.0.2.1", VM4, _echo(), ttl=7, tos=0xB9), 4, 0xB9),  # EF + ECT(1)
    "ipv4-options": (VM4, lambda: ETH4 + _ipv4("192.0.2.1", VM4, _echo(), tos=0x10, options=bytes([7, 7, 4, 0]) +
                                                  bytes(4)), 4, 0x10),  # IHL 7 (a record route option)
}


@pytest.mark.bpf
@pytest.mark.netns
@pytest.mark.parametrize("family", list(INNERS))
@pytest.mark.parametrize("segments, reduced", [([D_DX6], False), ([S_END_S, T_END, D_DX6], False),
                                               ([S_END_S, T_END, D_DX6], True), ([D_DX6], True)],
                         ids=["one", "three", "three-reduced", "one-reduced"])
def test_headers_are_h_encaps(encap_prog, segments, reduced, family):
    """RFC 8986 5.1: Ethernet type IPv6, outer IPv6 (our source, DA = first SID, traffic class copied from
    the inner traffic class or TOS, hop limit 64, payload length = SRH + inner) + SRH whose next header is the
    inner packet's (41, or 4 for IPv4; the outer next header itself without an SRH), then the inner packet
    untouched (an IPv4 one keeps its TTL and checksum)."""
    encap, fd = encap_prog
    vm, frame_in, inner_nh, tclass = INNERS[family]
    encap.set(vm, segments, reduced=reduced)
    try:
        sent = frame_in()
        inner = sent[14:]
        out = libbpf.prog_test_run(fd, sent)
        assert out.retval == TC_ACT_OK
        srh = ingress.build_srh(segments, reduced, inner_nh)
        frame = out.data
        assert frame[:14] == ETH
        first, plen, nh, hlim = struct.unpack("!IHBB", frame[14:22])
        assert first >> 28 == 6 and (first >> 20) & 0xFF == tclass
        assert (plen, nh, hlim) == (len(srh) + len(inner), 43 if srh else inner_nh, 64)
        assert frame[22:38] == _a(I_ADDR) and frame[38:54] == _a(segments[0])
        assert frame[54:54 + len(srh)] == srh and (not srh or srh[0] == inner_nh)
        assert frame[54 + len(srh):] == inner
    finally:
        encap.clear(vm)


def _tot_len(value) -> bytes:
    """IPv4 to VM4 with its total length set to `value` (or value(length))."""
    pkt = bytearray(_ipv4("192.0.2.1", VM4, _echo()))
    pkt[2:4] = struct.pack("!H", value(len(pkt)) if callable(value) else value)
    return ETH4 + bytes(pkt)


def _first_byte(b: int, n: int = 32) -> bytes:
    """IPv4 to VM4 (total length 20 + 8 + n) with its version / IHL byte set to `b`."""
    pkt = bytearray(_ipv4("192.0.2.1", VM4, _echo(n)))
    pkt[0] = b
    return ETH4 + bytes(pkt)


# (description, frame, tc action, the outcome counted, whether the VM's own `dropped` counts it). Only a
# well-formed IPv4 header is encapsulated (RFC 791 3.1), and only a packet to a steered VM is judged at all.
# (A frame shorter than an IPv4 header, which the program passes to the kernel, cannot be shown here: the
# kernel's test run refuses it with EINVAL.)
IPV4_CHECKS = [
    ("version 6 in an IPv4 frame", lambda: _first_byte(0x65), TC_ACT_SHOT, "drop_malformed", True),
    ("IHL 4 (< 5 words)", lambda: _first_byte(0x44), TC_ACT_SHOT, "drop_malformed", True),
    ("IHL 15, total length 36 (< 60)", lambda: _first_byte(0x4F, 8), TC_ACT_SHOT, "drop_malformed", True),
    ("IHL 6, total length 60: well formed", lambda: _first_byte(0x46), TC_ACT_OK, "done", False),
    ("total length 19 (< IHL * 4)", lambda: _tot_len(19), TC_ACT_SHOT, "drop_malformed", True),
    ("total length past the frame", lambda: _tot_len(lambda n: n + 1), TC_ACT_SHOT, "drop_malformed", True),
    ("total length 0, not GSO", lambda: _tot_len(0), TC_ACT_SHOT, "drop_malformed", True),
    ("total length short of the frame (trailing bytes): encapsulated as it is", lambda: _tot_len(lambda n: n - 4),
     TC_ACT_OK, "done", False),
    ("malformed, to no VM of ours: untouched", lambda: ETH4 + bytes([0x44]) + _ipv4("192.0.2.1", "10.9.9.9",
                                                                                     _echo())[1:],
     TC_ACT_OK, "pass", False),
    ("IPv6 to the IPv4 VM's IPv4-mapped key: no VM's (RFC 4291 2.5.5.2)",
     lambda: ETH + _ipv6("2001:db8:c::1", "::ffff:" + VM4, _echo()), TC_ACT_OK, "pass", False),
]


@pytest.mark.bpf
@pytest.mark.netns
@pytest.mark.parametrize("desc, frame, action, outcome, vm_dropped", IPV4_CHECKS, ids=[c[0] for c in IPV4_CHECKS])
def test_ipv4_header_checks(encap_prog, desc, frame, action, outcome, vm_dropped):
    encap, fd = encap_prog
    encap.set(VM4, [D_DX6])
    try:
        before = encap.stats()
        sent = frame()
        out = libbpf.prog_test_run(fd, sent)
        after = encap.stats()
        assert out.retval == action
        if outcome == "done":
            assert out.data[14 + 40 + 24:] == sent[14:]
        elif action == TC_ACT_OK:
            assert out.data == sent  # not encapsulated, not changed
        # Every outcome but `pass` exactly (P's own ND and MLD, out of p0, may pass meanwhile).
        moved = {k: v - before["counters"][k] for k, v in after["counters"].items() if v != before["counters"][k]}
        assert moved.pop("pass", 0) >= (outcome == "pass")
        assert moved == ({} if outcome == "pass" else {outcome: 1})
        assert after["vms"][VM4]["dropped"] - before["vms"][VM4]["dropped"] == int(vm_dropped)
        assert after["families"]["4"]["dropped"] - before["families"]["4"]["dropped"] == int(vm_dropped)
    finally:
        encap.clear(VM4)


@pytest.mark.bpf
@pytest.mark.netns
def test_an_entry_of_the_other_family_is_refused(encap_prog):
    """The program never trusts the entry's SRH next header blindly: an IPv4 packet meeting an SRH that says
    IPv6 (an entry written wrong) is dropped as drop_bad_entry, not sent with a lying next header."""
    encap, fd = encap_prog
    encap.set(VM4, [D_DX6])
    try:
        key = encap._key(VM4)
        value = encap.table.lookup(key)
        value.srh[0] = 41
        encap.table.update(key, libbpf.ffi.addressof(value))
        before = encap.stats()["counters"]["drop_bad_entry"]
        out = libbpf.prog_test_run(fd, ETH4 + _ipv4("192.0.2.1", VM4, _echo()))
        assert out.retval == TC_ACT_SHOT
        assert encap.stats()["counters"]["drop_bad_entry"] == before + 1
    finally:
        encap.clear(VM4)


LISTS = [[D_DX6], [S_END_S, T_END, D_DX6], [T_END, D_DX6]]


@pytest.mark.bpf
@pytest.mark.netns
@pytest.mark.parametrize("first, then", [(LISTS[0], LISTS[1]), (LISTS[1], LISTS[2]), (LISTS[2], LISTS[0])],
                         ids=["one-to-three", "three-to-two", "two-to-one"])
def test_a_vms_addresses_switch_together(encap_prog, first, then):
    """set_many: the IPv6 and the IPv4 address of one VM take one list, and switch to the next one in one
    call; each family's packets carry it with its own next header; counters survive the switch."""
    encap, fd = encap_prog
    frames = {VM: ETH + _ipv6("2001:db8:c::1", VM, _echo()), VM4: ETH4 + _ipv4("192.0.2.1", VM4, _echo())}

    def carried() -> dict[str, tuple[bytes, bytes]]:
        out = {}
        for vm, frame in frames.items():
            data = libbpf.prog_test_run(fd, frame).data
            srh_len = 8 * (data[55] + 1)
            out[vm] = (data[38:54], data[54:54 + srh_len])
        return out

    try:
        encap.set_many([VM, VM4], first)
        assert carried() == {VM: (_a(first[0]), ingress.build_srh(first)),
                             VM4: (_a(first[0]), ingress.build_srh(first, next_header=4))}
        encap.set_many([VM4, VM], then)
        assert carried() == {VM: (_a(then[0]), ingress.build_srh(then)),
                             VM4: (_a(then[0]), ingress.build_srh(then, next_header=4))}
        entries = {e.vm: e for e in encap.entries()}
        assert list(entries) == [VM4, VM]  # IPv4 first, each printed in its own family
        assert {vm: (e.segments, e.stats["packets"]) for vm, e in entries.items()} == {VM: (then, 2), VM4: (then, 2)}
        assert encap.stats()["families"]["4"]["packets"] == 2 and encap.stats()["families"]["6"]["packets"] == 2
    finally:
        assert encap.clear_many([VM, VM4]) == {VM: True, VM4: True}
    assert encap.entries() == [] and encap.clear_many([VM4]) == {VM4: False}


@pytest.mark.bpf
@pytest.mark.netns
def test_a_vms_prefixes_take_its_list(encap_prog):
    """A VM that routes subnets (encap_prefixes): a packet to any address of its IPv6 or IPv4 prefix takes the
    VM's list with its own family's next header, switches with the VM's addresses in one set_many, is counted
    under the prefix; an address next to the prefix is not steered; an exact entry inside a prefix wins (the
    exact lookup comes first); cleared, the prefix's packets pass untouched."""
    encap, fd = encap_prog
    p6, p4 = "2001:db8:99::/64", "10.99.0.0/24"
    frames = {p6: ETH + _ipv6("2001:db8:c::1", "2001:db8:99::7", _echo()),
              p4: ETH4 + _ipv4("192.0.2.1", "10.99.0.7", _echo())}
    outside = [ETH + _ipv6("2001:db8:c::1", "2001:db8:99:1::7", _echo()), ETH4 + _ipv4("192.0.2.1", "10.99.1.7",
                                                                                     _echo())]

    def carried() -> dict[str, tuple[bytes, bytes]]:
        out = {}
        for vm, frame in frames.items():
            data = libbpf.prog_test_run(fd, frame).data
            srh_len = 8 * (data[55] + 1)
            assert data[54 + srh_len:] == frame[14:], "the inner packet untouched"
            out[vm] = (data[38:54], data[54:54 + srh_len])
        return out

    try:
        encap.set_many([VM, "2001:DB8:99:0::/64", p4], LISTS[0])
        assert carried() == {p6: (_a(LISTS[0][0]), ingress.build_srh(LISTS[0])),
                             p4: (_a(LISTS[0][0]), ingress.build_srh(LISTS[0], next_header=4))}
        encap.set_many([VM, p6, p4], LISTS[1])
        assert carried() == {p6: (_a(LISTS[1][0]), ingress.build_srh(LISTS[1])),
                             p4: (_a(LISTS[1][0]), ingress.build_srh(LISTS[1], next_header=4))}
        for pkt in outside:
            assert libbpf.prog_test_run(fd, pkt).data == pkt
        entries = {e.vm: e for e in encap.entries()}
        assert list(entries) == [p4, p6, VM]  # by address: 2001:db8:99:: before 2001:db8:100::
        assert {vm: (e.segments, e.stats["packets"]) for vm, e in entries.items()} == {
            VM: (LISTS[1], 0), p6: (LISTS[1], 2), p4: (LISTS[1], 2)}
        encap.set("2001:db8:99::7", LISTS[2])  # another entry inside the prefix: exact first
        assert libbpf.prog_test_run(fd, frames[p6]).data[38:54] == _a(LISTS[2][0])
        encap.clear("2001:db8:99::7")
        with pytest.raises(ValueError, match="host bits"):
            encap.set("10.99.0.1/24", LISTS[0])
    finally:
        assert encap.clear_many([VM, p6, p4]) == {VM: True, p6: True, p4: True}
    for pkt in frames.values():
        assert libbpf.prog_test_run(fd, pkt).data == pkt
    assert encap.entries() == [] and list(encap.prefixes.keys()) == []


@pytest.mark.bpf
@pytest.mark.netns
def test_a_bad_address_writes_nothing(encap_prog):
    """set_many checks every address first: one bad address leaves the others as they were."""
    encap, fd = encap_prog
    encap.set_many([VM], [D_DX6])
    try:
        with pytest.raises(ValueError, match="not an IPv6 or IPv4 address"):
            encap.set_many([VM4, VM, "vm.example"], [T_END, D_DX6])
        assert [(e.vm, e.segments) for e in encap.entries()] == [(VM, [D_DX6])]
    finally:
        encap.clear_many([VM, VM4])


@pytest.mark.bpf
@pytest.mark.netns
def test_flow_label_follows_the_flow(encap_prog):
    """ECMP: packets of one flow get one outer flow label, other flows (mostly) others."""
    encap, fd = encap_prog
    encap.set(VM, [D_DX6])
    try:
        def label(sport: int) -> int:
            udp = struct.pack("!HHHH", sport, 9, 8 + 4, 0) + b"abcd"
            frame = libbpf.prog_test_run(fd, ETH + _ipv6("2001:db8:c::1", VM, udp, nh=17)).data
            return struct.unpack("!I", frame[14:18])[0] & 0xFFFFF

        assert label(1000) == label(1000)
        assert len({label(p) for p in range(1000, 1016)}) > 8
    finally:
        encap.clear(VM)


@pytest.mark.bpf
@pytest.mark.netns
def test_not_steered_is_untouched_and_counted(encap_prog):
    encap, fd = encap_prog
    before = encap.stats()["counters"]
    for pkt in (ETH + _ipv6("2001:db8:c::1", "2001:db8:200::1", _echo()),  # not a VM we steer
                ETH4 + _ipv4("192.0.2.1", "10.0.200.1", _echo()),         # nor this IPv4 one
                ETH[:12] + b"\x08\x06" + bytes(28)):                    # ARP
        out = libbpf.prog_test_run(fd, pkt)
        assert (out.retval, out.data) == (TC_ACT_OK, pkt)
    after = encap.stats()["counters"]
    assert after["pass"] - before["pass"] == 3 and after["done"] == before["done"]


# -- real traffic ---------------------------------------------------------------------------------------------

def build(topo, mode: str) -> None:
    for role in ("I", "D", "VM"):
        topo.add_host(role)
    topo.link("I", "i0", "D", "d_in", I_ADDR + "/64", D_LINK + "/64", static_neigh=True)
    topo.link("D", "d_vm", "VM", "eth0", "2001:db8:100::1/64", VM + "/64", static_neigh=True)
    for role, ifname in (("D", "d_vm"), ("VM", "eth0"), ("I", "i0"), ("D", "d_in")):
        topo.run(role, "ethtool", "-K", ifname, "gro", "on")  # native XDP redirects need NAPI on the peer
    if mode == "native":
        # A native XDP redirect between veths loses CHECKSUM_PARTIAL: TCP from I would never establish while
        # I offloads its checksum (a veth effect: a NIC delivers full checksums).
        topo.run("I", "ethtool", "-K", "i0", "tx", "off")
    topo.route("I", "fc00::/16", gateway=D_LINK)
    topo.route("VM", "::/0", gateway="2001:db8:100::1")
    # The VM's IPv4 side. The fabric stays IPv6 only: D sends replies to I's IPv4 address via I's IPv6 one.
    sysctl(topo.ns("D"), "net.ipv4.ip_forward", 1)
    for role, ifname, addr, plen in (("D", "d_vm", D_VM4, 24), ("VM", "eth0", VM4, 24), ("I", "lo", I_ADDR4, 32)):
        with topo.ipr(role) as ipr:
            ipr.addr("add", index=netlink.ifindex(ifname, ipr), address=addr, prefixlen=plen)
    topo.neigh("D", "d_vm", VM4, topo.mac("VM", "eth0"))
    topo.neigh("VM", "eth0", D_VM4, topo.mac("D", "d_vm"))
    topo.route("VM", "0.0.0.0/0", gateway=D_VM4)
    topo.route("D", I_ADDR4 + "/32", via={"family": socket.AF_INET6, "addr": I_ADDR}, oif="d_in")


def ping(topo, count=5, size=56, vm=VM) -> int:
    """Echo requests from I to `vm` (IPv6, or IPv4 from I's IPv4 address); the replies received."""
    family = ["-4", "-I", I_ADDR4] if ingress.is_ipv4(vm) else ["-6"]
    r = topo.run("I", "ping", *family, "-c", str(count), "-i", "0.05", "-W", "2", "-s", str(size), vm,
                 check=False, timeout=20)
    for line in r.stdout.splitlines():
        if "received" in line:
            return int(line.split(",")[1].split()[0])
    raise AssertionError(f"ping printed no summary: {r.stdout} {r.stderr}")


@pytest.fixture
def path(topology, request):
    """I --H.Encaps--> D (End.DX6-map, VM running, both its addresses) --> VM; I steers both addresses;
    yields (topology, encap, D's dataplane)."""
    mode = getattr(request, "param", "generic")
    build(topology, mode)
    with xdp_on(topology, "D", "d_in", mode) as d_dp, encap_on(topology, "I", "i0", source=I_ADDR) as encap:
        d_dp.add_sid(D_DX6, Behaviour.END_DX6_MAP)
        for vm in (VM, VM4):
            d_dp.set_vm(vm, VmState.RUNNING)
        steer(topology, "I", encap, VM, [D_DX6], D_LINK, "i0")
        steer(topology, "I", encap, VM4, [D_DX6], D_LINK, "i0")
        yield topology, encap, d_dp


def _delivered(dp) -> int:
    return next(s.stats["delivered"] for s in dp.list_sids() if s.sid == D_DX6)


@pytest.mark.bpf
@pytest.mark.netns
@pytest.mark.parametrize("vm", [VM, VM4], ids=["ipv6", "ipv4"])
@pytest.mark.parametrize("path", ["generic", "native"], indirect=True)
def test_ping_through_the_encap(path, vm):
    topo, encap, d_dp = path
    before = _delivered(d_dp)
    assert ping(topo, vm=vm) == 5
    stats = encap.stats()
    assert stats["vms"][vm]["packets"] >= 5 and stats["vms"][vm]["dropped"] == 0
    assert _delivered(d_dp) - before >= 5
    # Bigger than the route's MTU: the kernel fragments the inner packet before H.Encaps, every fragment fits.
    assert ping(topo, count=3, size=1400, vm=vm) == 3
    assert encap.stats()["counters"]["drop_too_big"] == 0
    assert encap.stats()["families"]["6" if vm == VM else "4"]["packets"] >= 5 + 3 * 2


@pytest.mark.bpf
@pytest.mark.netns
@pytest.mark.parametrize("prefix, inside", [("2001:db8:99::/64", "2001:db8:99::7"), ("10.99.0.0/24", "10.99.0.7")],
                         ids=["ipv6", "ipv4"])
def test_ping_a_vms_prefix_through_the_encap(path, prefix, inside):
    """A subnet the VM routes (here an address of it on the VM's lo): I steers the prefix (encap_prefixes, a
    route to the prefix), D finds the VM through vm_prefixes and delivers to it; the replies come back."""
    topo, encap, d_dp = path
    with topo.ipr("VM") as ipr:
        ipr.addr("add", index=netlink.ifindex("lo", ipr), address=inside, prefixlen=32 if "." in inside else 128)
    topo.route("D", prefix, gateway=VM4 if "." in inside else VM, oif="d_vm")  # routed via the VM
    d_dp.set_vm_prefix(prefix, VM)
    steer(topo, "I", encap, prefix, [D_DX6], D_LINK, "i0")
    before = _delivered(d_dp)
    assert ping(topo, vm=inside) == 5
    assert encap.stats()["vms"][prefix]["packets"] >= 5 and _delivered(d_dp) - before >= 5
    with topo.ipr("I") as ipr:
        assert netlink.del_route(prefix, ipr)  # the route steering it was the prefix itself


def tcp_bulk(topo, nbytes: int, timeout_s: float = 30.0, vm: str = VM) -> tuple[int, str, float]:
    """Send `nbytes` from I to a TCP server on `vm` in the VM namespace; returns (bytes received, their sha256,
    seconds). Bounded in bytes and time; both sockets are closed whatever happens."""
    family = socket.AF_INET if ingress.is_ipv4(vm) else socket.AF_INET6
    with topo.inside("VM"):
        srv = socket.socket(family, socket.SOCK_STREAM)
    with topo.inside("I"):
        cli = socket.socket(family, socket.SOCK_STREAM)
    srv.settimeout(timeout_s)
    cli.settimeout(timeout_s)
    got = {"n": 0, "h": hashlib.sha256(), "err": None}

    def serve():
        try:
            conn, _ = srv.accept()
            with conn:
                conn.settimeout(timeout_s)
                while chunk := conn.recv(1 << 16):
                    got["n"] += len(chunk)
                    got["h"].update(chunk)
        except OSError as e:
            got["err"] = e

    try:
        srv.bind((vm, 5201))
        srv.listen(1)
        t = threading.Thread(target=serve, daemon=True)
        t.start()
        block = bytes(range(256)) * 256  # 64 KiB
        sent = hashlib.sha256()
        t0 = time.monotonic()
        cli.connect((vm, 5201))
        left = nbytes
        while left > 0 and time.monotonic() - t0 < timeout_s:
            part = block[:min(left, len(block))]
            cli.sendall(part)
            sent.update(part)
            left -= len(part)
        cli.shutdown(socket.SHUT_WR)
        t.join(timeout_s)
        elapsed = time.monotonic() - t0
        assert got["err"] is None, got["err"]
        assert got["h"].hexdigest() == sent.hexdigest(), "the bytes that arrived are not the bytes sent"
        return got["n"], got["h"].hexdigest(), elapsed
    finally:
        cli.close()
        srv.close()


@pytest.mark.bpf
@pytest.mark.netns
@pytest.mark.parametrize("vm", [VM, VM4], ids=["ipv6", "ipv4"])
@pytest.mark.parametrize("path", ["generic", "native"], indirect=True)
def test_tcp_bulk_transfer_through_the_encap(path, vm):
    """TCP with GSO/TSO super-packets: adjust_room's ENCAP_L3_IPV6 shrinks their segment size, software GSO
    segments IPv6 + SRH + IPv6 (or IPv4) + TCP; every byte arrives, in order."""
    topo, encap, d_dp = path
    nbytes = 32 << 20
    n, _, _ = tcp_bulk(topo, nbytes, vm=vm)
    assert n == nbytes
    stats = encap.stats()
    assert stats["counters"]["done"] > 0 and stats["vms"][vm]["dropped"] == 0
    assert stats["vms"][vm]["bytes"] >= nbytes  # inner bytes, TCP/IP headers included
    # Super-packets were encapsulated whole (measured: 30-50 KB on average), not MTU-sized segments.
    assert stats["vms"][vm]["bytes"] > 1500 * stats["vms"][vm]["packets"]
    assert {k: v for k, v in d_dp.stats()["drops"].items() if v} == {}


@pytest.mark.bpf
@pytest.mark.netns
def test_switching_the_list_keeps_the_counters_and_moves_the_traffic(path):
    """Both addresses of the VM switch in one set_many: both families lose their path together, and find
    it again together."""
    topo, encap, d_dp = path
    assert (ping(topo, count=3), ping(topo, count=3, vm=VM4)) == (3, 3)
    encap.set_many([VM, VM4], [T_END, D_DX6])  # T_END is nobody's: the packets go to I's route for fc00::/16
    entries = encap.entries()
    assert [(e.vm, e.segments) for e in entries] == [(VM4, [T_END, D_DX6]), (VM, [T_END, D_DX6])]
    assert all(e.stats["packets"] >= 3 for e in entries)
    before = _delivered(d_dp)
    # D owns no T_END: its kernel drops them, no SID of ours delivers
    assert (ping(topo, count=3), ping(topo, count=3, vm=VM4)) == (0, 0)
    assert _delivered(d_dp) == before
    encap.set_many([VM4, VM], [D_DX6])
    assert (ping(topo, count=3), ping(topo, count=3, vm=VM4)) == (3, 3)


# Frames a packet socket sends past the routes: (VM, ethertype + packet, the drop counted).
REFUSED = {
    # adjust_room does not check the MTU: a packet of exactly the link MTU has no room for 64 more bytes.
    "ipv6 too big": (VM, b"\x86\xdd" + _ipv6(I_ADDR, VM, _echo(1500 - 40 - 8)), "drop_too_big"),
    "ipv4 too big": (VM4, b"\x08\x00" + _ipv4(I_ADDR4, VM4, _echo(1500 - 20 - 8)), "drop_too_big"),
    "ipv4 malformed (IHL 4)": (VM4, b"\x08\x00\x44" + _ipv4(I_ADDR4, VM4, _echo())[1:], "drop_malformed"),
}


@pytest.mark.bpf
@pytest.mark.netns
@pytest.mark.parametrize("case", list(REFUSED))
def test_a_refused_frame_is_dropped_and_counted(path, case):
    """A frame the program cannot encapsulate (too big for the link once encapsulated, or an IPv4 header that
    is not well formed) is dropped by the program and counted, not silently by the device, and not sent on
    unencapsulated. Sent with a packet socket, past the routes."""
    topo, encap, d_dp = path
    vm, packet, outcome = REFUSED[case]
    frame = (bytes.fromhex(topo.mac("D", "d_in").replace(":", "")) + bytes.fromhex(topo.mac("I", "i0").replace(":", ""))
             + packet)
    with topo.inside("I"):
        s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW)
    try:
        s.bind(("i0", 0))
        before = encap.stats()
        with pytest.raises(OSError) as refused:  # the program's TC_ACT_SHOT reaches a local sender
            s.send(frame)
        assert refused.value.errno == errno.ENOBUFS
    finally:
        s.close()
    after = encap.stats()
    # (pass may move meanwhile: the namespace's own ND and MLD go out of i0 too)
    assert after["counters"][outcome] == before["counters"][outcome] + 1
    assert after["counters"]["done"] == before["counters"]["done"]
    assert after["vms"][vm]["dropped"] == before["vms"][vm]["dropped"] + 1


@pytest.mark.bpf
@pytest.mark.netns
def test_reduced_encapsulation_is_delivered(path):
    """H.Encaps.Red with a single SID: no SRH at all (the outer next header says IPv6 or IPv4); srmig's
    End.DX6-map delivers both."""
    topo, encap, d_dp = path
    encap.set_many([VM, VM4], [D_DX6], reduced=True)
    assert all(e.reduced for e in encap.entries())
    assert (ping(topo, count=3), ping(topo, count=3, vm=VM4)) == (3, 3)


@pytest.mark.bpf
@pytest.mark.netns
@pytest.mark.parametrize("vm", [VM, VM4], ids=["ipv6", "ipv4"])
def test_the_kernel_decapsulates_what_the_encap_builds(topology, vm):
    """The Linux kernel as the SRv6 peer, on any kernel (no lwtunnels needed): an SRH with Segments Left 0
    at one of D's own addresses, next header 41 or 4, is decapsulated by the kernel's SRH receive path
    (seg6_enabled), which forwards the inner IPv6 or IPv4 packet to the VM. No srmig XDP on D."""
    build(topology, "generic")
    d_sid = "fc00:0:2::4"
    with topology.ipr("D") as ipr:
        ipr.addr("add", index=netlink.ifindex("lo", ipr), address=d_sid, prefixlen=128)
    with encap_on(topology, "I", "i0", source=I_ADDR) as encap:
        steer(topology, "I", encap, vm, [d_sid], D_LINK, "i0")
        assert ping(topology, count=3, vm=vm) == 3
        assert encap.stats()["vms"][vm]["packets"] == 3


@pytest.mark.bpf
@pytest.mark.netns
def test_kernel_encap_routes_for_ipv4_and_ipv6(topology):
    """KernelEncap.set_many: an IPv4 /32 and an IPv6 /128 route with `encap seg6 mode encap` along one list,
    where the kernel has SRv6 lwtunnels; where it has none (this project's CI kernel) the kernel refuses the
    IPv4 one, the first asked for, with EOPNOTSUPP and no route is left, as for IPv6 (test_netlink)."""
    from srmig import check

    build(topology, "generic")
    segments = [S_END_S, D_DX6]
    with topology.ipr("I") as ipr:
        enc = ingress.KernelEncap(D_LINK, netlink.ifindex("i0", ipr), ipr)
        try:
            if not check.kernel_srv6()[0]:
                with pytest.raises(netlink.NetlinkError) as e:
                    enc.set_many([VM4, VM], segments)
                assert netlink.error_code(e.value) == errno.EOPNOTSUPP, e.value
                assert topology.run("I", "ip", "-4", "route", "show", VM4).stdout == ""
                return
            enc.set_many([VM4, VM], segments)
            for fam, vm in (("-4", VM4), ("-6", VM)):
                shown = topology.run("I", "ip", fam, "route", "show", vm).stdout
                assert f"encap seg6 mode encap segs 2 [ {S_END_S} {D_DX6} ]" in shown, shown
        finally:
            enc.clear_many([VM4, VM])


@pytest.mark.bpf
@pytest.mark.netns
def test_cli_end_to_end(topology):
    """What a user types on an ingress, with --json output, and its one-line errors."""
    build(topology, "generic")
    ns = topology.ns("I")

    def srmig(*args, ok=True):
        r = subprocess.run([*SRMIG, "--netns", ns, "ingress", *args], capture_output=True, text=True, timeout=60)
        if ok:
            assert r.returncode == 0, r.stderr
            return json.loads(r.stdout) if "--json" in args else r.stdout
        return r

    try:
        assert srmig("load", "i0", "--json")["interface"] == "i0"
        assert srmig("load", "i0", "--json")["compiled"] is False  # idempotent: the pinned program
        out = srmig("set", VM, S_END_S, T_END, D_DX6, "--via", D_LINK, "--dev", "i0", "--json")
        assert out["segments"] == [S_END_S, T_END, D_DX6] and out["source"] == I_ADDR
        with topology.ipr("I") as ipr:
            (route,) = ipr.route("get", dst=VM, family=10)
            assert route.get_attr("RTA_METRICS").get_attr("RTAX_MTU") == 1500 - ingress.MAX_OVERHEAD
        # An IPv4 VM: its /32 via the IPv6 next hop, with the same MTU.
        out = srmig("set", VM4, D_DX6, "--via", D_LINK, "--dev", "i0", "--json")
        assert (out["vm"], out["segments"]) == (VM4, [D_DX6])
        with topology.ipr("I") as ipr:
            (route,) = ipr.route("get", dst=VM4, family=socket.AF_INET)
            assert route.get_attr("RTA_VIA") == {"family": socket.AF_INET6, "addr": D_LINK}
            assert route.get_attr("RTA_METRICS").get_attr("RTAX_MTU") == 1500 - ingress.MAX_OVERHEAD
        # A subnet a VM routes: its entry and its route, under the prefix.
        out = srmig("set", "10.99.0.0/24", D_DX6, "--via", D_LINK, "--dev", "i0", "--json")
        assert (out["vm"], out["segments"]) == ("10.99.0.0/24", [D_DX6])
        with topology.ipr("I") as ipr:
            assert [r.get_attr("RTA_VIA") for r in ipr.route("get", dst="10.99.0.7", family=socket.AF_INET)] == [
                {"family": socket.AF_INET6, "addr": D_LINK}]
        assert srmig("del", "10.99.0.0/24", "--dev", "i0", "--json") == {"vm": "10.99.0.0/24", "deleted": True,
                                                                        "route_deleted": True}
        assert [e["vm"] for e in srmig("list", "--json")] == [VM4, VM]
        assert "encapsulated" in srmig("stats")
        assert set(srmig("stats", "--json")["families"]) == {"4", "6"}
        bad = srmig("set", VM, *([D_DX6] * 7), ok=False)
        assert bad.returncode == 1 and bad.stderr.count("\n") == 1 and "at most 6" in bad.stderr
        bad = srmig("set", "not-a-vm", D_DX6, ok=False)
        assert bad.returncode == 1 and "not an IPv6 or IPv4 address" in bad.stderr
        assert srmig("del", VM4, "--dev", "i0", "--json") == {"vm": VM4, "deleted": True, "route_deleted": True}
        assert srmig("del", VM, "--dev", "i0", "--json") == {"vm": VM, "deleted": True, "route_deleted": True}
        assert srmig("del", VM, "--json")["deleted"] is False  # idempotent
    finally:
        out = srmig("unload", "i0", "--json")
    assert out["pins_removed"] is True
    r = srmig("list", ok=False)
    assert r.returncode == 1 and "srmig ingress load" in r.stderr


@pytest.mark.bpf
@pytest.mark.netns
def test_the_encapsulated_packet_follows_the_route_to_its_first_sid(topology):
    """The kernel routed the packet by the VM's address (here out of i1, to Z, which knows nothing); after
    H.Encaps it must go where the first SID is routed (out of i0, to D), as the kernel's seg6 encap does.
    D runs native XDP here: a veth does not run generic XDP on a frame a BPF program redirected into its
    peer (the kernel skips "reinjected" skbs); a frame off a real wire is a new skb."""
    build(topology, "native")
    topology.add_host("Z")
    topology.link("I", "i1", "Z", "z0", "2001:db8:9::1/64", "2001:db8:9::2/64", static_neigh=True)
    topology.run("I", "ethtool", "-K", "i1", "tx", "off")
    topology.route("D", "2001:db8:9::/64", gateway=I_ADDR)  # replies to the ping's source, i1's address
    with xdp_on(topology, "D", "d_in", "native") as d_dp, encap_on(topology, "I", "i1", source=I_ADDR) as encap:
        d_dp.add_sid(D_DX6, Behaviour.END_DX6_MAP)
        d_dp.set_vm(VM, VmState.RUNNING)
        steer(topology, "I", encap, VM, [D_DX6], "2001:db8:9::2", "i1")
        assert ping(topology, count=3) == 3
        assert _delivered(d_dp) >= 3
