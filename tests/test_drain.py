"""The source drain's building blocks on a real tap whose owner, like a paused QEMU, never reads it."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time

import pytest
from scapy.layers.inet6 import IPv6, IPv6ExtHdrSegmentRouting, UDP

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


def test_encapsulate_is_h_encaps():
    inner = bytes(IPv6(src="2001:db8:c::1", dst=VM) / UDP(dport=7) / b"x")
    frame = bytes.fromhex("525400123456" "02005e000001" "86dd") + inner
    pkt = IPv6(encap.encapsulate(frame, "2001:db8:a::2", ["fc00:0:3::e", "fc00:0:2::b"]))
    assert pkt.dst == "fc00:0:3::e" and pkt.src == "2001:db8:a::2" and pkt.nh == 43
    srh = pkt[IPv6ExtHdrSegmentRouting]
    assert srh.addresses == ["fc00:0:2::b", "fc00:0:3::e"] and srh.segleft == 1 and srh.lastentry == 1
    assert bytes(srh.payload) == inner
    assert encap.encapsulate(bytes(14 + 40), "::1", ["::2"]) is None  # not IPv6: ethertype 0


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
