"""Recover the packets a paused QEMU will never read: its tap queue.

After QEMU pauses (stop-and-copy), frames already delivered to the VM's tap sit in a queue that QEMU no
longer reads and that dies with the source QEMU. QEMU's tap fd can be taken with pidfd_getfd(2) while it is
paused. Reading it returns those frames in order, each behind a virtio-net header. They are
re-encapsulated towards the destination's End.SBUF, so they reach the VM after it resumes, ahead of
anything newer (see `SourceDrain`).
"""

from __future__ import annotations

import errno
import fcntl
import ipaddress
import os
import socket
import struct
import time
from dataclasses import dataclass, field
from pathlib import Path

from cffi import FFI

from srmig.dataplane.abi import VmState

_ffi = FFI()
_ffi.cdef("long syscall(long number, ...);")
_libc = _ffi.dlopen(None)
SYS_pidfd_open = 434
SYS_pidfd_getfd = 438
TUNGETIFF = 0x800454D2
TUNGETVNETHDRSZ = 0x800454D7
IFF_VNET_HDR = 0x4000


def _syscall(nr: int, *args: int) -> int:
    rc = _libc.syscall(nr, *[_ffi.cast("long", a) for a in args])
    if rc < 0:
        err = _ffi.errno
        raise OSError(err, f"syscall {nr}: {os.strerror(err)}")
    return rc


def tap_fds_of(pid: int, ifname: str) -> list[int]:
    """The fd numbers, in process `pid`, attached to tap `ifname` (fdinfo says `iff: NAME`)."""
    out = []
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            if os.readlink(f"/proc/{pid}/fd/{fd}") != "/dev/net/tun":
                continue
            info = Path(f"/proc/{pid}/fdinfo/{fd}").read_text()
        except OSError:
            continue
        for line in info.splitlines():
            if line.startswith("iff:") and line.split(None, 1)[1].strip() == ifname:
                out.append(int(fd))
    return sorted(out)


def take_fd(pid: int, fd: int) -> int:
    """A duplicate, in this process, of process `pid`'s file descriptor `fd` (needs ptrace rights: root)."""
    pidfd = _syscall(SYS_pidfd_open, pid, 0)
    try:
        return _syscall(SYS_pidfd_getfd, pidfd, fd, 0)
    finally:
        os.close(pidfd)


def vnet_hdr_len(fd: int) -> int:
    flags = struct.unpack("16sH", fcntl.ioctl(fd, TUNGETIFF, b"\0" * 18)[:18])[1]
    if not flags & IFF_VNET_HDR:
        return 0
    return struct.unpack("i", fcntl.ioctl(fd, TUNGETVNETHDRSZ, b"\0" * 4))[0]


def read_queued(fd: int, limit: int = 100_000) -> list[bytes]:
    """Every frame queued on the tap, oldest first, without their virtio-net headers. QEMU's fd is
    non-blocking (QEMU sets it so), so an empty queue answers EAGAIN; we never change the shared flags."""
    skip = vnet_hdr_len(fd)
    frames = []
    while len(frames) < limit:
        try:
            buf = os.read(fd, 65536)
        except BlockingIOError:
            break
        except OSError as e:
            if e.errno == errno.EAGAIN:
                break
            raise
        if not buf:
            break
        frames.append(buf[skip:])
    return frames


def encapsulate(frame: bytes, src: str, segments: list[str]) -> bytes | None:
    """H.Encaps of the IPv6 packet inside Ethernet frame `frame` with `segments` (travel order); None for a
    frame that is not IPv6 (ND or ARP for the VM has no place on the path)."""
    if len(frame) < 14 + 40 or frame[12:14] != b"\x86\xdd":
        return None
    inner = frame[14:]
    segs = [ipaddress.IPv6Address(s).packed for s in reversed(segments)]
    srh = struct.pack("!BBBBBBH", 41, 2 * len(segs), 4, len(segs) - 1, len(segs) - 1, 0, 0) + b"".join(segs)
    payload = srh + inner
    outer = struct.pack("!IHBB", 6 << 28, len(payload), 43, 64)
    outer += ipaddress.IPv6Address(src).packed + ipaddress.IPv6Address(segments[0]).packed
    return outer + payload


class RawSender:
    """Sends complete IPv6 packets (IPPROTO_RAW implies IPV6_HDRINCL); the kernel routes them by their DA."""

    def __init__(self):
        self.sock = socket.socket(socket.AF_INET6, socket.SOCK_RAW, socket.IPPROTO_RAW)

    def send(self, packet: bytes) -> None:
        dst = str(ipaddress.IPv6Address(packet[24:40]))
        self.sock.sendto(packet, (dst, 0))

    def close(self) -> None:
        self.sock.close()


@dataclass
class DrainReport:
    from_tap: int = 0          # frames recovered from the paused QEMU's tap queue
    from_ring: int = 0         # packets the program parked in the hold ring while we drained
    not_ipv6: int = 0          # tap frames that were not IPv6 (not forwarded)
    hold_ms: float = 0.0       # time spent in HOLD
    timings: dict = field(default_factory=dict)


class SourceDrain:
    """Stop-and-copy on the source, in the order that keeps packets in order:

    1. VM state HOLD: the program parks every newer packet in the hold ring (already advanced to D).
    2. Drain QEMU's tap queue (the oldest packets), send each to D's End.SBUF.
    3. Send what the ring holds (newer), then AWAY: from now on the program forwards directly.
    4. Drain the ring once more for packets that were being held while the state flipped.
    """

    def __init__(self, dataplane, vm: str, src_addr: str, dest_segments: list[str], next_sid: str):
        self.dp = dataplane
        self.vm = vm
        self.src = src_addr
        self.segments = dest_segments
        self.next_sid = next_sid

    def run(self, qemu_pid: int, tap: str, settle_s: float = 0.002) -> DrainReport:
        rep = DrainReport()
        sender = RawSender()
        t0 = time.monotonic()
        ring = self.dp.hold_ring(lambda rec: self._ring_send(sender, rep, rec))
        try:
            self.dp.set_vm(self.vm, VmState.HOLD, next_sid=self.next_sid)
            fds = [take_fd(qemu_pid, fd) for fd in tap_fds_of(qemu_pid, tap)]
            try:
                for fd in fds:
                    for frame in read_queued(fd):
                        pkt = encapsulate(frame, self.src, self.segments)
                        if pkt is None:
                            rep.not_ipv6 += 1
                            continue
                        sender.send(pkt)
                        rep.from_tap += 1
            finally:
                for fd in fds:
                    os.close(fd)
            ring.poll(0)
            self.dp.set_vm(self.vm, VmState.AWAY, next_sid=self.next_sid)
            rep.hold_ms = (time.monotonic() - t0) * 1000
            # A program run that read HOLD just before the flip may still be writing its record.
            deadline = time.monotonic() + settle_s
            while time.monotonic() < deadline:
                ring.poll(0)
            ring.poll(0)
        finally:
            ring.close()
            sender.close()
        return rep

    @staticmethod
    def _ring_send(sender: RawSender, rep: DrainReport, rec) -> None:
        sender.send(rec.packet)
        rep.from_ring += 1
