"""The source drain's building blocks on a real tap whose owner, like a paused QEMU, never reads it."""

from __future__ import annotations

import ipaddress
import os
import socket
import struct
import subprocess
import sys
import time

import pytest
from scapy.layers.inet import IP, IPOption_RR
from scapy.layers.inet6 import ICMPv6MLReport2, ICMPv6ND_NS, IPv6, IPv6ExtHdrSegmentRouting, UDP
from scapy.layers.l2 import ARP

from srmig.ctl import encap, swallow, tap

VM = "2001:db8:100::10"
VM_MAC = "52:54:00:12:34:56"

# A stand-in for a paused QEMU: opens the tap the way QEMU does (IFF_TAP|IFF_NO_PI|IFF_VNET_HDR,
# non-blocking), says so, then never reads it.
HOLDER = r"""
import fcntl, os, struct, sys, time
fd = os.open("/dev/net/tun", os.O_RDWR | os.O_NONBLOCK)
fcntl.ioctl(fd, 0x400454CA, struct.pack("16sH", sys.argv[1].encode(), 0x0002 | 0x1000 | 0x4000))
print("ready", flush=True)
time.sleep(60)
"""


@pytest.fixture
def paused_tap(topology):
    """Host S with tap `vmtap` held by a process that never reads it (a paused QEMU), routed to VM; yields
    that process."""
    topology.add_host("S")
    holder = subprocess.Popen(["ip", "netns", "exec", topology.ns("S"), sys.executable, "-c", HOLDER, "vmtap"],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "ready"
        with topology.ipr("S") as ipr:
            idx = ipr.link_lookup(ifname="vmtap")[0]
            ipr.link("set", index=idx, state="up")
            ipr.route("replace", dst=VM + "/128", oif=idx, family=10)
            ipr.neigh("replace", dst=VM, lladdr=VM_MAC, ifindex=idx, state=0x80, family=10)
        yield holder
    finally:
        holder.kill()
        holder.wait()


def send_probes(topology, n: int) -> None:
    """`n` UDP datagrams `probe-<i>` from S's stack to the VM (through the tap), then a moment to land."""
    with topology.inside("S"):
        s = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
    with s:
        for i in range(n):
            s.sendto(f"probe-{i}".encode(), (VM, 5000))
    time.sleep(0.1)


@pytest.mark.netns
def test_paused_owner_tap_queue_is_recovered_in_order(topology, paused_tap):
    send_probes(topology, 200)
    tap_fds = tap.tap_fds_of(paused_tap.pid, "vmtap")
    assert len(tap_fds) == 1
    fd = tap.take_fd(paused_tap.pid, tap_fds[0])
    try:
        assert tap.vnet_hdr_len(fd) in (10, 12)
        frames = tap.read_queued(fd)
        assert tap.read_queued(fd) == []  # all of it the first time
    finally:
        os.close(fd)
    payloads = [bytes(IPv6(f[14:])[UDP].payload) for f in frames if f[12:14] == b"\x86\xdd"
                and IPv6(f[14:]).haslayer(UDP)]
    assert payloads == [f"probe-{i}".encode() for i in range(200)]


# --- H.Encaps and which frames are the VM's: pure logic, both families (srmig.ctl.encap) ------------------

VM4 = "198.51.100.10"      # the VM's IPv4 address (dual-stack: VM and VM4)
SEGS = ["fc00:0:3::e", "fc00:0:2::b"]
SRC6, SRC4 = "2001:db8:c::1", "192.0.2.1"
ETH = bytes.fromhex("525400123456" "02005e000001")  # to the VM's MAC, from the tap's
V6 = bytes(IPv6(src=SRC6, dst=VM) / UDP(dport=7) / b"six")
V4 = bytes(IP(src=SRC4, dst=VM4, ttl=1) / UDP(dport=7) / b"four")      # TTL 1: never decremented here
V4_OPTS = bytes(IP(src=SRC4, dst=VM4, options=[IPOption_RR()]) / UDP(dport=7) / b"opts")  # IHL > 5
ND_NS = bytes(IPv6(src="fe80::1", dst=VM, hlim=255) / ICMPv6ND_NS(tgt=VM))  # NUD: unicast to the VM
MLD = bytes(IPv6(src="fe80::1", dst="ff02::16", hlim=1) / ICMPv6MLReport2())
ARP_REQ = bytes(ARP(op=1, psrc="198.51.100.1", pdst=VM4))


def frame(ethertype: int, packet: bytes) -> bytes:
    return ETH + ethertype.to_bytes(2, "big") + packet


@pytest.mark.parametrize("name, frame_, nh", [
    ("ipv6", frame(0x86DD, V6), 41),
    ("ipv4", frame(0x0800, V4), 4),
    ("ipv4 with options", frame(0x0800, V4_OPTS), 4),
    ("arp", frame(0x0806, ARP_REQ), None),
    ("ipv4 in an ipv6 ethertype", frame(0x86DD, V4), None),
    ("ipv6 in an ipv4 ethertype", frame(0x0800, V6), None),
    ("ipv4 shorter than its header", frame(0x0800, V4[:19]), None),
    ("ipv6 shorter than its header", frame(0x86DD, V6[:39]), None),
    ("runt", frame(0x86DD, b""), None),
])
def test_encapsulate_is_h_encaps_of_either_family(name, frame_, nh):
    """RFC 8986 5.1 H.Encaps: outer IPv6 to the first segment, an SRH with the segments reversed, SL and
    last entry at the end, next header 41 (IPv6) or 4 (IPv4, as End.DX4 expects), the inner packet
    untouched; anything but an IP packet of the Ethernet type's family is not carried."""
    pkt = encap.encapsulate(frame_, "2001:db8:a::2", SEGS)
    if nh is None:
        assert pkt is None
        return
    inner = frame_[14:]
    outer = IPv6(pkt)
    assert (outer.src, outer.dst, outer.nh, outer.plen) == ("2001:db8:a::2", SEGS[0], 43, len(pkt) - 40)
    srh = outer[IPv6ExtHdrSegmentRouting]
    assert (srh.addresses, srh.segleft, srh.lastentry, srh.nh) == (SEGS[::-1], 1, 1, nh)
    assert pkt.endswith(inner) and len(pkt) == 40 + 8 + 16 * len(SEGS) + len(inner)
    assert encap.decapsulate(pkt) == inner and encap.family(encap.decapsulate(pkt)) == inner[0] >> 4


def _outer(nh: int, payload: bytes, srh: bool = True) -> bytes:
    """An SRv6 packet around `payload` with next header `nh` (after an SRH of one segment, or none)."""
    ext = struct.pack("!BBBBBBH", nh, 2, 4, 0, 0, 0, 0) + bytes(16) if srh else b""
    first = 43 if srh else nh
    return struct.pack("!IHBB", 6 << 28, len(ext) + len(payload), first, 64) + bytes(32) + ext + payload


@pytest.mark.parametrize("name, packet, inner", [
    ("srh, inner ipv6", _outer(41, V6), V6),
    ("srh, inner ipv4", _outer(4, V4), V4),
    ("reduced (no srh), inner ipv6", _outer(41, V6, srh=False), V6),
    ("reduced (no srh), inner ipv4", _outer(4, V4, srh=False), V4),
    ("next header 4, an ipv6 packet", _outer(4, V6), None),
    ("next header 41, an ipv4 packet", _outer(41, V4), None),
    ("next header udp", _outer(17, V4), None),
    ("inner ipv4 truncated", _outer(4, V4[:12]), None),
    ("outer ipv4", V4, None),
])
def test_decapsulate_returns_the_inner_packet_of_either_family(name, packet, inner):
    assert encap.decapsulate(packet) == inner
    if inner is not None:
        assert encap.family(encap.decapsulate(packet)) == (4 if inner is V4 else 6)


@pytest.mark.parametrize("name, frame_, addresses, carried", [
    ("ipv6 to the vm", frame(0x86DD, V6), [VM, VM4], True),
    ("ipv4 to the vm", frame(0x0800, V4), [VM, VM4], True),
    ("ipv4 to the vm, ipv6-only list", frame(0x0800, V4), [VM], False),
    ("ipv4 to another address", frame(0x0800, bytes(IP(dst="198.51.100.11") / UDP())), [VM, VM4], False),
    ("ipv6 to the vm's ipv4-mapped address", frame(0x86DD, bytes(IPv6(dst="::ffff:" + VM4) / UDP())),
     [VM, VM4], False),
    ("nd to the vm (nud)", frame(0x86DD, ND_NS), [VM, VM4], False),
    ("mld", frame(0x86DD, MLD), [VM, VM4], False),
    ("arp for the vm", frame(0x0806, ARP_REQ), [VM, VM4], False),
    ("ipv6, addresses unknown", frame(0x86DD, V6), None, True),
    ("ipv4, addresses unknown", frame(0x0800, V4), None, True),
    ("nd, addresses unknown", frame(0x86DD, ND_NS), None, False),
    ("arp, addresses unknown", frame(0x0806, ARP_REQ), None, False),
])
def test_the_vms_frames_are_ip_to_one_of_its_addresses(name, frame_, addresses, carried):
    vm = encap.VmPackets(addresses)
    assert vm.packet(frame_) == (frame_[14:] if carried else None)


def test_vm_keys_are_the_programs():
    """Hold records name the VM by its vm_table key: IPv4 as its IPv4-mapped address (srmig_abi.h)."""
    vm = encap.VmPackets([VM, VM4, VM])  # a repeated address counts once
    assert vm.addresses == [VM, VM4]
    assert vm.keys == {ipaddress.IPv6Address(VM).packed: VM,
                       ipaddress.IPv6Address("::ffff:" + VM4).packed: VM4}
    with pytest.raises(ValueError):
        encap.VmPackets(["198.51.100.0/24"])


@pytest.mark.netns
def test_queue_length_restored_only_once_the_tap_is_read(topology, paused_tap):
    """A migration window's end: the tap's long queue goes back to its old length only once what it holds
    has been read; shortening it at once frees, uncounted, every frame beyond the new length."""
    def probes(frames: list[bytes]) -> int:
        return sum(b"probe-" in f for f in frames)

    with topology.inside("S"):
        assert tap.tap_queue_len("vmtap", 10000) == 1000
    send_probes(topology, 3000)
    with tap.TapKeeper(paused_tap.pid, "vmtap") as queue, topology.inside("S"):
        assert not queue.empty()
        assert tap.restore_queue_len("vmtap", 1000, queue) is False
        assert tap.tap_queue_len("vmtap") == 10000
        assert probes(queue.frames()) == 3000  # the resumed QEMU reads them
        assert queue.empty()
        assert tap.restore_queue_len("vmtap", 1000, queue) is True
        assert tap.tap_queue_len("vmtap") == 1000

        # What the wait saves: the same backlog, the length restored at once.
        tap.tap_queue_len("vmtap", 10000)
        send_probes(topology, 3000)
        tap.tap_queue_len("vmtap", 1000)
        left = queue.frames()
        assert len(left) == 1000 and probes(left) >= 990  # the other ~2000 are gone (S's MLD may take a slot)


class _NoRing:
    """A dataplane whose shadow ring is never polled: the records are put in the log by hand."""

    def shadow_ring(self, on_record):
        return type("Ring", (), {"poll": lambda self, ms: None, "close": lambda self: None})()


def _shadow(times_ms: list[float]) -> tuple[swallow.ShadowLog, list[bytes]]:
    """A shadow log of one frame delivered at each of `times_ms` (ms on the monotonic clock), in order."""
    from srmig.ctl.maps import HoldRecord

    log = swallow.ShadowLog(_NoRing())
    packets = [f"frame-{i}".encode() for i in range(len(times_ms))]
    log.records.extend(HoldRecord(VM, int(t * 1e6), p) for t, p in zip(times_ms, packets))
    return log, packets


MS = 1_000_000


def test_swallowed_frames_window_anchors_on_the_first_frame_qemu_never_read():
    """The frames QEMU swallowed are the ones delivered just before the first frame left in its tap queue,
    and they reached the tap at most SWALLOW_WINDOW_NS before QEMU stopped reading. That moment is bounded
    from above both by `stopped_at_ns` (QEMU's STOP, or the agent hearing it) and by the first queued frame's
    delivery; the earlier of the two is the tighter bound. A starved agent hears STOP late: the window must
    not follow."""
    # 2000 frames/s; QEMU stops reading at 1000.2 ms: the frames from 1000.5 ms on stay in its tap queue, the
    # two before them (999.5, 1000.0 ms) it read and never gave the guest.
    times = [990 + 0.5 * i for i in range(40)]           # 990.0 .. 1009.5 ms
    log, packets = _shadow(times)
    first = times.index(1000.5)
    for heard_ms in (1001, 1200, 5000):                    # STOP heard at once, 200 ms late, 4 s late
        assert log.swallowed_frames(2, packets[first], heard_ms * MS) == (packets[first - 2:first], None), heard_ms
    # Before, the window hung on the STOP event alone: heard 200 ms late, the swallowed frames looked 150 ms
    # too old and were not re-sent (lost under a busy loop).

    # A stale count with quiet traffic: the last frame before the queued one was delivered (and given to the
    # guest) long before QEMU stopped reading. Neither anchor admits it, however late STOP is heard.
    log, packets = _shadow([100.0, 1000.5, 1001.0])
    for heard_ms in (1001, 1200, 5000):
        assert log.swallowed_frames(1, packets[1], heard_ms * MS) == ([], "one delivered 900.5 ms before QEMU "
                                                                        "stopped reading")

    # Quiet traffic, STOP heard at once: QEMU read one frame just after the pause (1000.2 ms) and kept it; the
    # next frame came 300 ms later. The STOP event is then the tighter bound and the frame is recovered.
    log, packets = _shadow([700.0, 1000.2, 1300.0])
    assert log.swallowed_frames(1, packets[2], 1001 * MS) == ([packets[1]], None)
    assert log.swallowed_frames(2, packets[2], 1001 * MS)[0] == []   # 700 ms: delivered to the guest

    # An empty tap queue: the last frames delivered, bounded by the STOP event only.
    log, packets = _shadow([990.0, 999.5, 1000.2])
    assert log.swallowed_frames(1, None, 1001 * MS) == ([packets[2]], None)
    assert log.swallowed_frames(1, None, 1200 * MS) == ([], "one delivered 199.8 ms before QEMU stopped reading")

    # Cannot be told for sure: the first queued frame is not in the log, or fewer frames than counted.
    log, packets = _shadow([999.0, 999.5, 1000.0])
    assert log.swallowed_frames(1, b"never delivered", 1001 * MS) == (
        [], "the first queued frame is not in the shadow log (3 records)")
    assert log.swallowed_frames(2, packets[1], 1001 * MS) == ([], "1 of them in the shadow log")
