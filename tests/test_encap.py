"""srmig's H.Encaps (srmig/ebpf/encap.c, tc clsact egress): the headers it builds, byte for byte through
BPF_PROG_TEST_RUN, then real traffic (ICMPv6 and a TCP bulk transfer) from an ingress namespace through
srmig's End.DX6-map to a VM namespace, on veths:

    I (ingress: H.Encaps on i0) --- D (srmig XDP, End.DX6-map) --- VM
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

from srmig.ctl import ingress
from srmig.ctl.ingress import BpfEncap
from srmig.bpf import libbpf, loader
from srmig.bpf.abi import Behaviour, VmState
from srmig.testbed.lab import encap_on, steer, xdp_on

SRMIG = [sys.executable, "-m", "srmig"]

VM = "2001:db8:100::10"
I_ADDR, D_LINK = "2001:db8:1::1", "2001:db8:1::2"
D_DX6 = "fc00:0:2::d6"
S_END_S, T_END = "fc00:0:1::5", "fc00:0:3::e"

TC_ACT_OK, TC_ACT_SHOT = 0, 2


# -- the SRH, pure --------------------------------------------------------------------------------------------

def _a(x: str) -> bytes:
    return socket.inet_pton(socket.AF_INET6, x)


@pytest.mark.parametrize("segments, reduced, expected", [
    ([D_DX6], False, bytes([41, 2, 4, 0, 0, 0, 0, 0]) + _a(D_DX6)),
    ([S_END_S, T_END, D_DX6], False, bytes([41, 6, 4, 2, 2, 0, 0, 0]) + _a(D_DX6) + _a(T_END) + _a(S_END_S)),
    # H.Encaps.Red (RFC 8986 5.2): the first SID only in the DA; SL still counts it.
    ([S_END_S, T_END, D_DX6], True, bytes([41, 4, 4, 2, 1, 0, 0, 0]) + _a(D_DX6) + _a(T_END)),
    ([D_DX6], True, b""),
], ids=["one", "three", "three-reduced", "one-reduced"])
def test_srh_built_and_read_back(segments, reduced, expected):
    srh = ingress.build_srh(segments, reduced)
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


# -- the program, byte for byte -------------------------------------------------------------------------------

ETH = bytes.fromhex("020000000002" "020000000001" "86dd")


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


@pytest.mark.bpf
@pytest.mark.netns
@pytest.mark.parametrize("segments, reduced", [([D_DX6], False), ([S_END_S, T_END, D_DX6], False),
                                               ([S_END_S, T_END, D_DX6], True), ([D_DX6], True)],
                         ids=["one", "three", "three-reduced", "one-reduced"])
def test_headers_are_h_encaps(encap_prog, segments, reduced):
    """RFC 8986 5.1: outer IPv6 (our source, DA = first SID, traffic class copied, hop limit 64, payload
    length = SRH + inner) + SRH, then the inner packet untouched."""
    encap, fd = encap_prog
    encap.set(VM, segments, reduced=reduced)
    try:
        inner = _ipv6("2001:db8:c::1", VM, _echo(), tclass=0xb8, flow=0x12345)
        out = libbpf.prog_test_run(fd, ETH + inner)
        assert out.retval == TC_ACT_OK
        srh = ingress.build_srh(segments, reduced)
        frame = out.data
        assert frame[:14] == ETH
        first, plen, nh, hlim = struct.unpack("!IHBB", frame[14:22])
        assert first >> 28 == 6 and (first >> 20) & 0xFF == 0xB8
        assert (plen, nh, hlim) == (len(srh) + len(inner), 43 if srh else 41, 64)
        assert frame[22:38] == _a(I_ADDR) and frame[38:54] == _a(segments[0])
        assert frame[54:54 + len(srh)] == srh
        assert frame[54 + len(srh):] == inner
    finally:
        encap.clear(VM)


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
                ETH[:12] + b"\x08\x00" + bytes(40)):                          # IPv4
        out = libbpf.prog_test_run(fd, pkt)
        assert (out.retval, out.data) == (TC_ACT_OK, pkt)
    after = encap.stats()["counters"]
    assert after["pass"] - before["pass"] == 2 and after["done"] == before["done"]


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


def ping(topo, count=5, size=56) -> int:
    r = topo.run("I", "ping", "-6", "-c", str(count), "-i", "0.05", "-W", "2", "-s", str(size), VM, check=False,
                 timeout=20)
    for line in r.stdout.splitlines():
        if "received" in line:
            return int(line.split(",")[1].split()[0])
    raise AssertionError(f"ping printed no summary: {r.stdout} {r.stderr}")


@pytest.fixture
def path(topology, request):
    """I --H.Encaps--> D (End.DX6-map, VM running) --> VM; yields (topology, encap, D's dataplane)."""
    mode = getattr(request, "param", "generic")
    build(topology, mode)
    with xdp_on(topology, "D", "d_in", mode) as d_dp, encap_on(topology, "I", "i0", source=I_ADDR) as encap:
        d_dp.add_sid(D_DX6, Behaviour.END_DX6_MAP)
        d_dp.set_vm(VM, VmState.RUNNING)
        steer(topology, "I", encap, VM, [D_DX6], D_LINK, "i0")
        yield topology, encap, d_dp


def _delivered(dp) -> int:
    return next(s.stats["delivered"] for s in dp.list_sids() if s.sid == D_DX6)


@pytest.mark.bpf
@pytest.mark.netns
@pytest.mark.parametrize("path", ["generic", "native"], indirect=True)
def test_ping_through_the_encap(path):
    topo, encap, d_dp = path
    assert ping(topo) == 5
    stats = encap.stats()
    assert stats["vms"][VM]["packets"] >= 5 and stats["vms"][VM]["dropped"] == 0
    assert _delivered(d_dp) >= 5
    # Bigger than the route's MTU: the kernel fragments the inner packet before H.Encaps, every fragment fits.
    assert ping(topo, count=3, size=1400) == 3
    assert encap.stats()["counters"]["drop_too_big"] == 0


def tcp_bulk(topo, nbytes: int, timeout_s: float = 30.0) -> tuple[int, str, float]:
    """Send `nbytes` from I to a TCP server in the VM namespace; returns (bytes received, their sha256,
    seconds). Bounded in bytes and time; both sockets are closed whatever happens."""
    with topo.inside("VM"):
        srv = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
    with topo.inside("I"):
        cli = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
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
        srv.bind((VM, 5201))
        srv.listen(1)
        t = threading.Thread(target=serve, daemon=True)
        t.start()
        block = bytes(range(256)) * 256  # 64 KiB
        sent = hashlib.sha256()
        t0 = time.monotonic()
        cli.connect((VM, 5201))
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
@pytest.mark.parametrize("path", ["generic", "native"], indirect=True)
def test_tcp_bulk_transfer_through_the_encap(path):
    """TCP with GSO/TSO super-packets: adjust_room's ENCAP_L3_IPV6 shrinks their segment size, software GSO
    segments IPv6 + SRH + IPv6 + TCP; every byte arrives, in order."""
    topo, encap, d_dp = path
    nbytes = 32 << 20
    n, _, _ = tcp_bulk(topo, nbytes)
    assert n == nbytes
    stats = encap.stats()
    assert stats["counters"]["done"] > 0 and stats["vms"][VM]["dropped"] == 0
    assert stats["vms"][VM]["bytes"] >= nbytes  # inner bytes, TCP/IP headers included
    assert {k: v for k, v in d_dp.stats()["drops"].items() if v} == {}


@pytest.mark.bpf
@pytest.mark.netns
def test_switching_the_list_keeps_the_counters_and_moves_the_traffic(path):
    topo, encap, d_dp = path
    assert ping(topo, count=3) == 3
    encap.set(VM, [T_END, D_DX6])  # T_END is nobody's: the packets go to I's route for fc00::/16, D passes them
    (entry,) = encap.entries()
    assert entry.segments == [T_END, D_DX6] and entry.stats["packets"] >= 3
    before = _delivered(d_dp)
    assert ping(topo, count=3) == 0  # D owns no T_END: its kernel drops them, no SID of ours delivers
    assert _delivered(d_dp) == before
    encap.set(VM, [D_DX6])
    assert ping(topo, count=3) == 3


@pytest.mark.bpf
@pytest.mark.netns
def test_a_frame_too_big_for_the_link_is_dropped_and_counted(path):
    """adjust_room does not check the MTU: a frame that would no longer fit is dropped by the program and
    counted (drop_too_big), not silently by the device. Sent with a packet socket, past the route's MTU."""
    topo, encap, d_dp = path
    payload = _echo(1500 - 40 - 8)  # an IPv6 packet of exactly the link MTU: no room for 64 more bytes
    frame = (bytes.fromhex(topo.mac("D", "d_in").replace(":", "")) + bytes.fromhex(topo.mac("I", "i0").replace(":", ""))
             + b"\x86\xdd" + _ipv6(I_ADDR, VM, payload))
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
    assert after["counters"]["drop_too_big"] == before["counters"]["drop_too_big"] + 1
    assert after["vms"][VM]["dropped"] == before["vms"][VM]["dropped"] + 1


@pytest.mark.bpf
@pytest.mark.netns
def test_reduced_encapsulation_is_delivered(path):
    """H.Encaps.Red with a single SID: no SRH at all; srmig's End.DX6-map delivers it."""
    topo, encap, d_dp = path
    encap.set(VM, [D_DX6], reduced=True)
    assert encap.entries()[0].reduced
    assert ping(topo, count=3) == 3


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
        assert [e["vm"] for e in srmig("list", "--json")] == [VM]
        assert "encapsulated" in srmig("stats")
        bad = srmig("set", VM, *([D_DX6] * 7), ok=False)
        assert bad.returncode == 1 and bad.stderr.count("\n") == 1 and "at most 6" in bad.stderr
        bad = srmig("set", "not-a-vm", D_DX6, ok=False)
        assert bad.returncode == 1 and "not an IPv6 address" in bad.stderr
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
