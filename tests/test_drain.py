"""The source drain's building blocks on a real tap whose owner, like a paused QEMU, never reads it."""

from __future__ import annotations

import ipaddress
import os
import re
import socket
import struct
import subprocess
import sys
import threading
import time

import pytest
from scapy.layers.inet import IP, IPOption_RR
from scapy.layers.inet6 import ICMPv6MLReport2, ICMPv6ND_NS, IPv6, IPv6ExtHdrSegmentRouting, UDP
from scapy.layers.l2 import ARP

from srmig import netlink
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


@pytest.mark.netns
@pytest.mark.parametrize("bulk", [True, False], ids=["bulk", "frame_by_frame"])
def test_tap_queue_read_in_bulk_is_the_queue_in_order(topology, paused_tap, bulk):
    """The bulk reader (srmig.ctl.tapread, a read loop in C) and the os.read() loop return the same: every
    frame, whole, in the queue's order, without the vnet header; `limit` frames and the rest on the next
    read. 300 frames of growing size take the bulk reader five calls (64 reads of room each)."""
    from srmig.ctl import tapread

    with topology.inside("S"):
        s = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
    with s:
        for i in range(300):
            s.sendto(f"probe-{i}.".encode().ljust(10 + 4 * i, b"x"), (VM, 5000))
    time.sleep(0.1)
    fd = tap.take_fd(paused_tap.pid, tap.tap_fds_of(paused_tap.pid, "vmtap")[0])
    try:
        skip = tap.vnet_hdr_len(fd)
        if bulk:
            if (mod := tapread.reader()) is None:
                pytest.skip("no C compiler: the bulk reader cannot be built here")
            first, rest = tapread.read_frames(mod, fd, skip, 250), tapread.read_frames(mod, fd, skip, 10**6)
        else:
            first, rest = tap.read_queued_each(fd, skip, 250), tap.read_queued_each(fd, skip)
        assert tap.read_queued_each(fd, skip) == []
    finally:
        os.close(fd)
    assert len(first) == 250
    udp = [IPv6(f[14:]) for f in first + rest if f[12:14] == b"\x86\xdd"]
    payloads = [bytes(p[UDP].payload) for p in udp if p.haslayer(UDP)]
    assert payloads == [f"probe-{i}.".encode().ljust(10 + 4 * i, b"x") for i in range(300)]


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
    # a VM that routes prefixes: any address inside is the VM's, next to them not
    ("ipv6 inside a prefix", frame(0x86DD, bytes(IPv6(dst="2001:db8:99::7") / UDP())), [VM, "2001:db8:99::/64"],
     True),
    ("ipv6 next to a prefix", frame(0x86DD, bytes(IPv6(dst="2001:db8:99:1::7") / UDP())),
     [VM, "2001:db8:99::/64"], False),
    ("ipv4 inside a prefix", frame(0x0800, bytes(IP(dst="10.99.0.7") / UDP())), [VM, "10.99.0.0/24"], True),
    ("ipv4 next to a prefix", frame(0x0800, bytes(IP(dst="10.99.1.7") / UDP())), [VM, "10.99.0.0/24"], False),
    ("ipv6 to an ipv4 prefix's mapped address", frame(0x86DD, bytes(IPv6(dst="::ffff:10.99.0.7") / UDP())),
     [VM, "10.99.0.0/24"], False),
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
        encap.VmPackets(["198.51.100.1/24"])  # host bits set: neither an address nor a prefix
    vm = encap.VmPackets([VM, "198.51.100.0/24", VM4])  # a prefix has no entry of its own: not a key
    assert (vm.addresses, vm.prefixes) == ([VM, VM4], ["198.51.100.0/24"])
    assert set(vm.keys.values()) == {VM, VM4}


def restored_after_looks(queue: tap.TapKeeper, most: int = 10) -> int:
    """restore_queue_len(vmtap, 1000) every RATE_WINDOW_S until it restores; how many looks that took (AssertionError
    after `most`). Before each, the test reads what S's own stack sends to the tap meanwhile (MLD), as QEMU would."""
    for looks in range(1, most + 1):
        time.sleep(tap.RATE_WINDOW_S)
        queue.frames()
        if tap.restore_queue_len("vmtap", 1000, queue):
            return looks
    raise AssertionError(f"not restored after {most} looks")


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
        assert restored_after_looks(queue) >= 2  # the first look only takes the count read so far; none since
        assert tap.tap_queue_len("vmtap") == 1000

        # 3000 taken between two looks, in milliseconds: faster than 1000 frames last for RESTORE_GAP_S
        tap.tap_queue_len("vmtap", 10000)
        queue.frames()
        assert tap.restore_queue_len("vmtap", 1000, queue) is False
        send_probes(topology, 3000)
        assert probes(queue.frames()) == 3000
        time.sleep(tap.RATE_WINDOW_S)
        assert tap.restore_queue_len("vmtap", 1000, queue) is False
        assert tap.tap_queue_len("vmtap") == 10000
        assert restored_after_looks(queue) <= 2  # once a look saw next to none taken since the one before
        assert tap.tap_queue_len("vmtap") == 1000

        # What the wait saves: the same backlog, the length restored at once.
        tap.tap_queue_len("vmtap", 10000)
        send_probes(topology, 3000)
        tap.tap_queue_len("vmtap", 1000)
        left = queue.frames()
        assert len(left) == 1000 and probes(left) >= 990  # the other ~2000 are gone (S's MLD may take a slot)


@pytest.mark.netns
def test_queue_length_stays_long_while_frames_come_faster_than_the_old_length_holds(topology, paused_tap):
    """A window's end on a busy VM: its QEMU keeps up, so the tap polls empty, but ~15,000 frames/s arrive. The
    old length (1000) lasts 67 ms of them: a QEMU off the CPU longer than that (here 0.2 s, as a loaded 2-core
    host starved it in the demo) loses frames from a short queue, and, when the write lands in the stall, the
    kernel frees all but 1000 of what waits, uncounted. So the queue stays long while the rate says so, and the
    stall costs nothing: every frame is read, none dropped."""
    with topology.inside("S"):
        assert tap.tap_queue_len("vmtap", 10000) == 1000
        tx = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
    sent, read, stalled, done = [0], [], threading.Event(), threading.Event()

    def send():  # 75 every 5 ms, 1.2 s
        with tx:
            for _ in range(240):
                for _ in range(75):
                    tx.sendto(f"probe-{sent[0]}".encode(), (VM, 5000))
                    sent[0] += 1
                time.sleep(0.005)
        done.set()

    with tap.TapKeeper(paused_tap.pid, "vmtap") as queue, topology.inside("S"):
        def reader():  # QEMU: reads what the tap holds every millisecond, but while stalled
            while not (done.is_set() and queue.empty()):
                if not stalled.is_set():
                    read.extend(f for f in queue.frames() if b"probe-" in f)
                time.sleep(0.001)
        threads = [threading.Thread(target=fn, daemon=True) for fn in (send, reader)]
        for t in threads:
            t.start()
        restored = []
        for _ in range(30):  # the window has ended: the executor's polls, 0.3 s of them
            time.sleep(0.01)  # (a look at the rate every RATE_WINDOW_S)
            restored.append(tap.restore_queue_len("vmtap", 1000, queue))
        stalled.set()
        time.sleep(0.2)
        stalled.clear()
        for t in threads:
            t.join(10)
        with topology.ipr("S") as ipr:
            dropped = netlink.link_stats(netlink.ifindex("vmtap", ipr), ipr)["tx_dropped"]
        qlen = tap.tap_queue_len("vmtap")
    assert (len(read), dropped) == (sent[0], 0)
    assert [f[14 + 40 + 8:] for f in read] == [f"probe-{i}".encode() for i in range(sent[0])]  # Ethernet, IPv6, UDP
    assert not any(restored) and qlen == 10000


class _NoRing:
    """A dataplane whose shadow ring is never polled: the records are put in the log by hand."""

    def shadow_reader(self):
        return None


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


def test_swallowed_frames_an_exact_count_takes_the_whole_run():
    """A count that cannot be high (a restarted agent's from the records, no drain having read the tap
    before it: Executor._drain) takes the whole run QEMU read after the stop, however long and however old
    its first frame: no window (`window_ns=None`). The run must still end at the first frame left in the
    queue (no STOP was heard) and be all in the log."""
    # 2000 frames/s; no agent held the VM at the pause and QEMU read 271 frames (135 ms) it never gave the
    # guest before it stopped reading; 30 frames wait in its tap queue.
    times = [900 + 0.5 * i for i in range(600)]
    log, packets = _shadow(times)
    first = 500
    assert log.swallowed_frames(271, packets[first], 0) == ([], "one delivered 135.5 ms before QEMU stopped "
                                                                 "reading")
    assert log.swallowed_frames(271, packets[first], 0, None) == (packets[first - 271:first], None)
    assert log.swallowed_frames(271, None, 0, None) == ([], "no bound on when QEMU stopped reading")
    assert log.swallowed_frames(271, None, 1200 * MS, None) == ([], "no frame left in the queue to end the "
                                                                    "run at")
    assert log.swallowed_frames(501, packets[first], 0, None) == ([], "500 of them in the shadow log")


# --- Both families through a paused tap and the program's hold ring, in veth namespaces --------------------
#
#   I (an ingress: H.Encaps'd frames) --i0/h_in--> H (srmig XDP on h_in; tap vmtap, its owner paused) --h_out/d0--> D
#
# H (the topology's role "S", where paused_tap puts the tap) is the source of a drain, the destination of an
# abort's return, the source of an unpark. D stands for the host across the fabric (fc00:0:2::/48): what H
# sends there is captured on d0.

H_ADDR = "2001:db8:b::1"      # H's address: the outer source of what the agent sends
H_END_S = "fc00:0:1::5"
H_DX6 = "fc00:0:1::d6"
H_SBUF = "fc00:0:1::b"
D_SBUF = "fc00:0:2::b"
D_DX6 = "fc00:0:2::d6"
OTHER = "2001:db8:100::30"    # another VM of H's, in HOLD towards D (its records share the ring)
OUTER_SRC = "2001:db8:9::1"   # the ingress's outer source


@pytest.fixture
def srv6_host(topology, paused_tap):
    """I -- H -- D with srmig's XDP on H's h_in and H's tap vmtap (a paused QEMU's) routed to the dual-stack
    VM (VM, VM4); yields (topology, H's dataplane, the tap's owner)."""
    from srmig.bpf.abi import Behaviour
    from srmig.testbed import netns
    from srmig.testbed.lab import xdp_on

    t = topology
    t.add_host("I")
    t.add_host("D")
    netns.sysctl(t.ns("S"), "net.ipv4.ip_forward", 1)  # the program's IPv4 FIB lookup forwards only then
    t.link("I", "i0", "S", "h_in", "2001:db8:a::1/64", "2001:db8:a::2/64", static_neigh=True)
    t.link("S", "h_out", "D", "d0", H_ADDR + "/64", "2001:db8:b::2/64", static_neigh=True)
    t.route("S", "fc00:0:2::/48", gateway="2001:db8:b::2")
    with t.ipr("S") as ipr:
        idx = ipr.link_lookup(ifname="vmtap")[0]
        ipr.route("replace", dst=VM4 + "/32", oif=idx, family=2)
        ipr.neigh("replace", dst=VM4, lladdr=VM_MAC, ifindex=idx, state=0x80, family=2)
    with xdp_on(t, "S", "h_in", "generic") as dp:
        for sid, beh in ((H_END_S, Behaviour.END_S), (H_DX6, Behaviour.END_DX6_MAP), (H_SBUF, Behaviour.END_SBUF)):
            dp.add_sid(sid, beh)
        yield t, dp, paused_tap


MARK = re.compile(rb"([A-Z])-(\d+)\.\Z")  # a stream's payload, at the end of its packets


def _stream(tag: str, families: str, vm6: str = VM, vm4: str = VM4) -> list[tuple[str, int, bytes]]:
    """(marker, family, inner packet) for each letter of `families` ("6" or "4"), payloads <tag>-<i>."""
    out = []
    for i, f in enumerate(families):
        mark = f"{tag}-{i}"
        ip = IPv6(src=SRC6, dst=vm6) if f == "6" else IP(src=SRC4, dst=vm4)
        out.append((mark, int(f), bytes(ip / UDP(dport=5000) / f"{mark}.".encode())))
    return out


def _ingress_send(topo, h_mac: str, segments: list[str], stream: list[tuple[str, int, bytes]]) -> None:
    """I sends `stream` H.Encaps'd along `segments` (scapy's encapsulation, not the code under test) to H's
    h_in, from one CPU (a veth receives on the sender's CPU: one keeps the order), then a moment to land."""
    from scapy.layers.l2 import Ether

    frames = []
    for _m, fam, inner_pkt in stream:
        srh = IPv6ExtHdrSegmentRouting(addresses=segments[::-1], segleft=len(segments) - 1,
                                       lastentry=len(segments) - 1, nh=41 if fam == 6 else 4)
        frames.append(bytes(Ether(dst=h_mac) / IPv6(src=OUTER_SRC, dst=segments[0]) / srh) + inner_pkt)
    cpus = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {min(cpus)})
    try:
        _send_raw(topo, "I", "i0", frames)
    finally:
        os.sched_setaffinity(0, cpus)
    time.sleep(0.1)


def _send_raw(topo, ns: str, ifname: str, frames: list[bytes]) -> None:
    """`frames` out of `ifname` in namespace `ns`, as they are, in order (a packet socket)."""
    with topo.inside(ns):
        s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, 0)
    with s:
        s.bind((ifname, 0))
        for f in frames:
            s.send(f)


def _into_tap(topo, frames: list[bytes]) -> None:
    """H's own frames into the tap's queue (what its stack sends the VM: ARP, ND...)."""
    _send_raw(topo, "S", "vmtap", frames)


@pytest.fixture
def at_d(srv6_host):
    """A packet socket on D's d0: what H sends across the fabric."""
    topo = srv6_host[0]
    with topo.inside("D"):
        s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(0x86DD))
    with s:
        s.bind(("d0", 0))
        s.setsockopt(socket.SOL_SOCKET, 33, 8 << 20)  # SO_RCVBUFFORCE
        yield s


def _arrived(sock, expect: int) -> list[tuple[str, str, str, int, int, bytes]]:
    """The SRv6 packets of a stream that reached D, in arrival order: (marker, outer source, outer DA,
    segments left, SRH next header, inner packet); until `expect` came (3 s without one: given up), then
    0.2 s more (a duplicate would come)."""
    got = []
    for _ in range(100_000):
        sock.settimeout(3.0 if len(got) < expect else 0.2)
        try:
            f = sock.recv(65535)
        except TimeoutError:
            break
        srh = IPv6(f[14:]).getlayer(IPv6ExtHdrSegmentRouting)
        if srh is None or not (m := MARK.search(f)):
            continue
        outer = IPv6(f[14:])
        got.append((f"{m[1].decode()}-{int(m[2])}", outer.src, outer.dst, srh.segleft, srh.nh,
                    f[14 + 40 + 8 + 16 * len(srh.addresses):]))
    return got


def _tap_frames(holder) -> list[bytes]:
    with tap.TapKeeper(holder.pid, "vmtap") as q:
        return q.frames()


JUNK = [frame(0x0806, ARP_REQ), frame(0x86DD, ND_NS),  # H's own ARP and NUD for the VM, and an IPv4 packet to
        frame(0x0800, bytes(IP(src=SRC4, dst="198.51.100.11") / UDP(dport=5000) / b"J-0."))]  # another address


def _entries(dp) -> list[tuple]:
    return [(e.state, e.next_sid, e.ring_first, e.park) for e in map(dp.get_vm, (VM, VM4))]


@pytest.mark.bpf
@pytest.mark.netns
@pytest.mark.parametrize("ring", ["python", "pump-tc", "pump-live"])
def test_drain_carries_both_families_in_one_stream_in_order(srv6_host, at_d, ring):
    """The source drain of a dual-stack VM: the paused tap's queue (IPv6 and IPv4 frames interleaved, with
    H's own ARP and ND for the VM and a packet to another address among them), then what the program parked
    in the hold ring meanwhile (both families), then what it forwards once AWAY. D receives the VM's
    packets whole and in the order they reached H, each with its family's next header (41, 4) and its inner
    packet byte for byte; nothing else. The ring sent from Python, or through the drain's pump (batches of
    16), each way it sends."""
    from srmig.bpf.abi import VmState
    from srmig.ctl.drain import SourceDrain
    from srmig.ctl.pump import Pump

    topo, dp, holder = srv6_host
    pump = None
    if ring != "python":
        with topo.inside("S"):
            pump = Pump(dp.pin_dir, ring.removeprefix("pump-"), slots=16)
            why = pump.live_refused(topo.ifindex("S", "h_out")) if ring == "pump-live" else None
        if why:
            pump.close()
            pytest.skip(why)
        topo.run("D", "ethtool", "-K", "d0", "gro", "on")  # live frames' XDP_TX: a veth peer needs NAPI
    try:
        _drain_both_families(topo, dp, holder, at_d, pump)
    finally:
        if pump is not None:
            pump.close()
            topo.run("D", "ethtool", "-K", "d0", "gro", "off")


def _drain_both_families(topo, dp, holder, at_d, pump) -> None:
    from srmig.bpf.abi import VmState
    from srmig.ctl.drain import SourceDrain

    h_mac, path = topo.mac("S", "h_in"), [H_END_S, D_SBUF]  # an ingress's list while the VM migrates
    for a in (VM, VM4):
        dp.set_vm(a, VmState.RUNNING)
    queued, parked, after = _stream("A", "6446464666444466" * 4), _stream("B", "4664" * 10), _stream("C", "6446" * 5)

    _into_tap(topo, JUNK[:2])
    _ingress_send(topo, h_mac, path, queued[:32])  # End.S, running: delivered into the paused tap
    _into_tap(topo, JUNK[2:])
    _ingress_send(topo, h_mac, path, queued[32:])
    for a in (VM, VM4):  # the drain's first step, taken early, so that B waits in the ring for certain
        dp.set_vm(a, VmState.HOLD, next_sid=D_DX6)
    _ingress_send(topo, h_mac, path, parked)
    with topo.inside("S"), tap.TapKeeper(holder.pid, "vmtap") as queue:
        rep = SourceDrain(dp, VM, H_ADDR, [D_SBUF], D_DX6, addresses=[VM4], pump=pump).run(queue)
    _ingress_send(topo, h_mac, path, after)  # AWAY: End.S forwards to D directly

    want = queued + parked + after
    got = _arrived(at_d, len(want))
    assert [g[0] for g in got] == [m for m, _, _ in want], "once each, in order, nothing else"
    for (mark, fam, inner), (_, src, dst, sl, nh, got_inner) in zip(want, got):
        # The tap's frames are H.Encaps'd again by the agent (from H); the ring's and the later ones are the
        # ingress's own packets, advanced by the program.
        assert (src, dst, sl) == (H_ADDR if mark[0] == "A" else OUTER_SRC, D_SBUF, 0), mark
        assert (nh, got_inner) == (41 if fam == 6 else 4, inner), mark
    assert (rep.from_tap, rep.from_tap_ipv4, rep.from_ring) == (64, 32, 40)
    assert rep.not_vm >= len(JUNK) and rep.send_dropped == 0 and rep.timings["ring_after_flip"] == 0
    assert _entries(dp) == [(VmState.AWAY, D_DX6, False, False)] * 2
    if pump is not None:  # the ring's 40 went through it, 16 a batch
        assert rep.timings["pump_batches"] >= 3 and "pump_refused" not in rep.timings, rep.timings


@pytest.mark.bpf
@pytest.mark.netns
def test_drain_carries_a_vms_prefixes_in_the_same_stream(srv6_host, at_d):
    """A VM that routes a prefix of each family (vm_prefixes, pointing at its id): the drain carries what its
    tap held for addresses inside them and what the program parked for them, in order with the VM's own
    addresses' packets, each with its family's next header; the prefixes follow the id's entry (AWAY after
    the flip) without a write of their own."""
    from srmig.bpf.abi import VmState
    from srmig.ctl.drain import SourceDrain

    topo, dp, holder = srv6_host
    p6, p4, in6, in4 = "2001:db8:1ff::/64", "10.99.0.0/24", "2001:db8:1ff::7", "10.99.0.7"
    with topo.ipr("S") as ipr:  # routed via the VM, as an operator's subnet behind it
        idx = ipr.link_lookup(ifname="vmtap")[0]
        ipr.route("replace", dst=p6, gateway=VM, oif=idx, flags=4, family=10)  # RTNH_F_ONLINK
        ipr.route("replace", dst=p4, gateway=VM4, oif=idx, flags=4, family=2)
        ipr.neigh("replace", dst=VM, lladdr=VM_MAC, ifindex=idx, state=0x80, family=10)
    h_mac, path = topo.mac("S", "h_in"), [H_END_S, D_SBUF]
    for a in (VM, VM4):
        dp.set_vm(a, VmState.RUNNING)
    dp.set_vm_prefix(p6, VM)
    dp.set_vm_prefix(p4, VM)
    queued = _stream("A", "64" * 8, vm6=in6, vm4=in4) + _stream("E", "46" * 4)
    parked, after = _stream("B", "6446" * 3, vm6=in6, vm4=in4), _stream("C", "46" * 3, vm6=in6, vm4=in4)
    _ingress_send(topo, h_mac, path, queued)  # End.S, running: delivered into the paused tap
    for a in (VM, VM4):
        dp.set_vm(a, VmState.HOLD, next_sid=D_DX6)
    _ingress_send(topo, h_mac, path, parked)
    with topo.inside("S"), tap.TapKeeper(holder.pid, "vmtap") as queue:
        rep = SourceDrain(dp, VM, H_ADDR, [D_SBUF], D_DX6, addresses=[VM4, p6, p4]).run(queue)
    _ingress_send(topo, h_mac, path, after)

    want = queued + parked + after
    got = _arrived(at_d, len(want))
    assert [g[0] for g in got] == [m for m, _, _ in want], "once each, in order, nothing else"
    for (mark, fam, inner), (_, src, dst, sl, nh, got_inner) in zip(want, got):
        assert (src, dst, sl) == (H_ADDR if mark[0] in "AE" else OUTER_SRC, D_SBUF, 0), mark
        assert (nh, got_inner) == (41 if fam == 6 else 4, inner), mark
    assert (rep.from_tap, rep.from_ring) == (len(queued), len(parked))
    assert _entries(dp) == [(VmState.AWAY, D_DX6, False, False)] * 2
    assert dp.get_vm(p6).state is VmState.AWAY and dp.get_vm(p4).of == VM


@pytest.mark.bpf
@pytest.mark.netns
def test_abort_returns_both_families_the_tap_held_in_order(srv6_host, at_d):
    """An abort on the destination (here H): what End.SBUF held in the VM's tap queue for both of its
    addresses goes back to the source's End.DX6-map in the queue's order, IPv4 with next header 4, less
    the frame the source QEMU delivers itself (an IPv4 one here) and anything not the VM's."""
    from srmig.bpf.abi import VmState
    from srmig.ctl.drain import return_held

    topo, dp, holder = srv6_host
    for a in (VM, VM4):
        dp.set_vm(a, VmState.INCOMING)
    held = _stream("R", "4466464" * 6)
    _ingress_send(topo, topo.mac("S", "h_in"), [H_SBUF], held[:20])  # the drain's, to H's End.SBUF
    _into_tap(topo, JUNK)
    _ingress_send(topo, topo.mac("S", "h_in"), [H_SBUF], held[20:])
    skip = [held[4][2]]
    assert held[4][1] == 4
    with topo.inside("S"), tap.TapKeeper(holder.pid, "vmtap") as queue:
        sent = return_held(queue, H_ADDR, [D_DX6], skip, addresses=[VM, VM4])

    want = [h for h in held if h[2] not in skip]
    got = _arrived(at_d, len(want))
    assert sent == len(want) == 41
    assert [g[0] for g in got] == [m for m, _, _ in want]
    for (mark, fam, inner), (_, src, dst, sl, nh, got_inner) in zip(want, got):
        assert (src, dst, sl, nh, got_inner) == (H_ADDR, D_DX6, 0, 41 if fam == 6 else 4, inner), mark


@pytest.mark.bpf
@pytest.mark.netns
@pytest.mark.parametrize("arp_entry", [True, False], ids=["neighbours-known", "ipv4-neighbour-unknown"])
def test_unpark_gives_the_vm_both_families_in_ring_order(srv6_host, at_d, arp_entry):
    """An abort on the source (H): the program parked both of the VM's families in the hold ring, with
    another VM's held records between them. unpark() puts the VM's into its tap in the ring's order, each
    with its family's Ethernet type, to the VM's MAC, inner packets unchanged; the other VM's go on to D.
    Without an ARP entry for the VM's IPv4 address its packets are handed to the kernel (a raw IPv4 socket),
    which resolves the VM's MAC first: then each family keeps its own order. Every record of the VM names its
    id (the IPv4 address points at it): the MACs are those of each packet's own destination."""
    from srmig.bpf.abi import VmState
    from srmig.ctl.drain import _macs_to, one_step, unpark

    topo, dp, holder = srv6_host
    one_step(dp, VM, [VM4]).set_vm(VM, VmState.RUNNING, park=True)  # VM4 points at the id: records name VM
    dp.set_vm(OTHER, VmState.HOLD, next_sid=D_DX6)
    h_mac = topo.mac("S", "h_in")
    parked, others = _stream("P", "46644664" * 5), _stream("O", "66", vm6=OTHER)
    _ingress_send(topo, h_mac, [H_DX6], parked[:20])  # End.DX6-map parks the VM's, whole
    _ingress_send(topo, h_mac, [H_END_S, D_SBUF], others)  # End.S holds the other's, advanced
    _ingress_send(topo, h_mac, [H_DX6], parked[20:])
    _tap_frames(holder)  # what H's stack sent the tap meanwhile, if anything
    if not arp_entry:
        with topo.ipr("S") as ipr:
            ipr.neigh("del", dst=VM4, ifindex=ipr.link_lookup(ifname="vmtap")[0], family=2)
    with topo.inside("S"):
        # The VM's MAC for each address, from its neighbour entry (ND, ARP): without one, the kernel's way.
        assert set(_macs_to([VM, VM4], "vmtap")) == ({VM, VM4} if arp_entry else {VM})
        given = unpark(dp, VM, "vmtap", addresses=[VM4])
    if not arp_entry:  # the VM answers ARP (here: the entry comes back), the kernel sends what waited
        with topo.ipr("S") as ipr:
            ipr.neigh("replace", dst=VM4, lladdr=VM_MAC, ifindex=ipr.link_lookup(ifname="vmtap")[0],
                      state=0x80, family=2)
        time.sleep(0.1)

    assert given == len(parked) + len(others)  # every record sent, the VM's and the other's
    tap_mac = bytes.fromhex(topo.mac("S", "vmtap").replace(":", ""))
    frames = [f for f in _tap_frames(holder) if MARK.search(f)]
    got = {m.group(0)[:-1].decode(): f for f in frames if (m := MARK.search(f))}
    order = [MARK.search(f).group(0)[:-1].decode() for f in frames]
    if arp_entry:
        assert order == [m for m, _, _ in parked]
    else:
        for fam in (6, 4):
            assert [m for m in order if got[m][12:14] == (b"\x86\xdd" if fam == 6 else b"\x08\x00")] == \
                [m for m, f, _ in parked if f == fam]
        assert sorted(order) == sorted(m for m, _, _ in parked)
    for mark, fam, inner in parked:
        f = got[mark]
        assert (f[:6], f[6:12], f[12:14], f[14:]) == (bytes.fromhex(VM_MAC.replace(":", "")), tap_mac,
                                                      b"\x86\xdd" if fam == 6 else b"\x08\x00", inner), mark
    assert [(g[0], g[2], g[4]) for g in _arrived(at_d, 2)] == [("O-0", D_SBUF, 41), ("O-1", D_SBUF, 41)]
    assert _entries(dp) == [(VmState.RUNNING, None, False, False)] * 2


class _Counted:
    """What SwallowCheck.swallowed() answers, asked of QEMU over QMP in the agent: `n` frames read, not given
    to the guest. The frames themselves are the real ones, read off the tap below."""

    def __init__(self, n: int):
        self.n = n

    def swallowed(self) -> int:
        return self.n


@pytest.mark.bpf
@pytest.mark.netns
def test_drain_resends_a_swallowed_ipv4_frame_first(srv6_host, at_d):
    """QEMU read three frames after the shadow flag went on and gave the guest two: the third, an IPv4
    frame, it swallowed. The drain finds it in the shadow log (both families delivered, in order) by the
    first of the VM's frames left in the queue, whatever its family (IPv4 here, with IPv6 ones after it),
    and sends it first, with next header 4."""
    from srmig.bpf.abi import VmState
    from srmig.ctl.drain import SourceDrain

    topo, dp, holder = srv6_host
    for a in (VM, VM4):
        dp.set_vm(a, VmState.RUNNING, shadow=True)
    _tap_frames(holder)  # what H's stack sent the tap so far
    shadow = swallow.ShadowLog(dp).start()
    stream = _stream("S", "6644646")
    try:
        _ingress_send(topo, topo.mac("S", "h_in"), [H_END_S, D_SBUF], stream)
        stopped_ns = time.monotonic_ns()
        with topo.inside("S"), tap.TapKeeper(holder.pid, "vmtap") as queue:
            read = []
            for _ in range(100):  # QEMU reads the VM's first three (and whatever H's stack sent meanwhile)
                read += [f for f in tap.read_queued(queue.fds[0], limit=1) if MARK.search(f)]
                if len(read) == 3:
                    break
            assert [MARK.search(f)[0] for f in read] == [b"S-0.", b"S-1.", b"S-2."]
            drain = SourceDrain(dp, VM, H_ADDR, [D_SBUF], D_DX6, addresses=[VM4])
            rep = drain.run(queue, check=_Counted(1), shadow=shadow, stopped_at_ns=stopped_ns)
    finally:
        shadow.close()

    assert (rep.swallowed, rep.resent_swallowed, rep.swallow_miss, rep.from_tap) == (1, 1, None, 4)
    assert drain.resent_swallowed == [stream[2][2]]
    want = [stream[2], *stream[3:]]
    got = _arrived(at_d, len(want))
    assert [g[0] for g in got] == [m for m, _, _ in want]
    assert [(g[4], g[5]) for g in got] == [(41 if fam == 6 else 4, inner) for _, fam, inner in want]
