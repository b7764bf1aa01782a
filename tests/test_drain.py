"""The source drain's building blocks on a real tap whose owner, like a paused QEMU, never reads it."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time

import pytest
from scapy.layers.inet6 import IPv6, IPv6ExtHdrSegmentRouting, UDP

from srmig.ctl import drain

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
    tap_fds = drain.tap_fds_of(paused_tap.pid, "vmtap")
    assert len(tap_fds) == 1
    fd = drain.take_fd(paused_tap.pid, tap_fds[0])
    try:
        assert drain.vnet_hdr_len(fd) in (10, 12)
        frames = drain.read_queued(fd)
        assert drain.read_queued(fd) == []  # all of it the first time
    finally:
        os.close(fd)
    payloads = [bytes(IPv6(f[14:])[UDP].payload) for f in frames if f[12:14] == b"\x86\xdd"
                and IPv6(f[14:]).haslayer(UDP)]
    assert payloads == [f"probe-{i}".encode() for i in range(200)]


def test_encapsulate_is_h_encaps():
    inner = bytes(IPv6(src="2001:db8:c::1", dst=VM) / UDP(dport=7) / b"x")
    frame = bytes.fromhex("525400123456" "02005e000001" "86dd") + inner
    pkt = IPv6(drain.encapsulate(frame, "2001:db8:a::2", ["fc00:0:3::e", "fc00:0:2::b"]))
    assert pkt.dst == "fc00:0:3::e" and pkt.src == "2001:db8:a::2" and pkt.nh == 43
    srh = pkt[IPv6ExtHdrSegmentRouting]
    assert srh.addresses == ["fc00:0:2::b", "fc00:0:3::e"] and srh.segleft == 1 and srh.lastentry == 1
    assert bytes(srh.payload) == inner
    assert drain.encapsulate(bytes(14 + 40), "::1", ["::2"]) is None  # not IPv6: ethertype 0


@pytest.mark.netns
def test_queue_length_restored_only_once_the_tap_is_read(topology, paused_tap):
    """A migration window's end: the tap's long queue goes back to its old length only once what it holds
    has been read; shortening it at once frees, uncounted, every frame beyond the new length."""
    def probes(frames: list[bytes]) -> int:
        return sum(b"probe-" in f for f in frames)

    with topology.inside("S"):
        assert drain.tap_queue_len("vmtap", 10000) == 1000
    send_probes(topology, 3000)
    with drain.TapKeeper(paused_tap.pid, "vmtap") as queue, topology.inside("S"):
        assert not queue.empty()
        assert drain.restore_queue_len("vmtap", 1000, queue) is False
        assert drain.tap_queue_len("vmtap") == 10000
        assert probes(queue.frames()) == 3000  # the resumed QEMU reads them
        assert queue.empty()
        assert drain.restore_queue_len("vmtap", 1000, queue) is True
        assert drain.tap_queue_len("vmtap") == 1000

        # What the wait saves: the same backlog, the length restored at once.
        drain.tap_queue_len("vmtap", 10000)
        send_probes(topology, 3000)
        drain.tap_queue_len("vmtap", 1000)
        left = queue.frames()
        assert len(left) == 1000 and probes(left) >= 990  # the other ~2000 are gone (S's MLD may take a slot)
