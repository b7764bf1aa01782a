"""Recover the packets a paused QEMU will never read: its tap queue, and the one frame it swallows.

After QEMU pauses (stop-and-copy), frames already delivered to the VM's tap sit in a queue that QEMU no
longer reads and that dies with the source QEMU. QEMU's tap fd can be taken with pidfd_getfd(2) while it is
paused. Reading it returns those frames in order, each behind a virtio-net header. They are
re-encapsulated towards the destination's End.SBUF, so they reach the VM after it resumes, ahead of
anything newer (see `SourceDrain`).

The swallowed frame: after the pause QEMU 7.2's tap_send() still reads one frame, parks it in its own net
queue (not migrated) and stops polling. We find it by arithmetic: frames QEMU read from the tap (the tap's
tx_packets) minus frames it put in the guest's RX ring (the virtio used index, over QMP), against the same
difference at a baseline taken before the pause. The content comes from the shadow ring, where the XDP
program copies every frame it delivers to a VM flagged `shadow` during the migration window.
"""

from __future__ import annotations

import errno
import fcntl
import ipaddress
import os
import select
import socket
import struct
import threading
import time
from array import array
from collections import deque
from dataclasses import dataclass, field
from itertools import accumulate
from pathlib import Path
from typing import Callable

from cffi import FFI

from srmig.dataplane import libbpf
from srmig.dataplane.abi import VmState

_ffi = FFI()
_ffi.cdef("""
    long syscall(long number, ...);
    struct iovec { void *iov_base; size_t iov_len; };
    struct msghdr { void *msg_name; uint32_t msg_namelen; struct iovec *msg_iov; size_t msg_iovlen;
                    void *msg_control; size_t msg_controllen; int msg_flags; };
    struct mmsghdr { struct msghdr msg_hdr; unsigned int msg_len; };
    int sendmmsg(int sockfd, struct mmsghdr *msgvec, unsigned int vlen, int flags);
""")
_libc = _ffi.dlopen(None)
SYS_pidfd_open = 434
SYS_pidfd_getfd = 438
MAX_SWALLOWED = 4                # more than this means the count is off: re-send nothing
SWALLOW_WINDOW_NS = 50_000_000   # a swallowed frame reached the tap at most this long before QEMU stopped
                                 # reading it (ShadowLog.swallowed_frames: bounded by QEMU's STOP, and by
                                 # the first frame QEMU left in the queue)
RETURN_ARRIVAL_S = 0.05         # an abort: how long the source waits for the destination's returned packets
                                 # to arrive (counted at its End.SBUF) while none arrives, before it delivers
RETURN_ARRIVAL_MAX_S = 1.0       # what it parked; and at most, while they keep arriving
UNPARK_MAX_S = 1.0               # an abort: the longest the program parks behind the ring while the agent
                                 # gives the VM what it parked (a starved agent: reordered past this, not lost)
RING_FIRST_MAX_S = 0.25          # the longest the program parks behind the ring after the flip (a ring that
                                 # fills faster than we send never empties: then forward, and count)
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
    return encapsulate_packet(frame[14:], src, segments)


def encapsulate_packet(inner: bytes, src: str, segments: list[str]) -> bytes:
    """RFC 8986 5.1 H.Encaps of IPv6 packet `inner`: outer IPv6 from `src` + SRH with `segments`."""
    segs = [ipaddress.IPv6Address(s).packed for s in reversed(segments)]
    srh = struct.pack("!BBBBBBH", 41, 2 * len(segs), 4, len(segs) - 1, len(segs) - 1, 0, 0) + b"".join(segs)
    payload = srh + inner
    outer = struct.pack("!IHBB", 6 << 28, len(payload), 43, 64)
    outer += ipaddress.IPv6Address(src).packed + ipaddress.IPv6Address(segments[0]).packed
    return outer + payload


def tap_tx_packets(ifname: str) -> int:
    """Frames read from the tap by its owner (tun counts a frame as transmitted when the reader takes it)."""
    from pyroute2 import IPRoute

    with IPRoute() as ipr:
        link = ipr.get_links(ipr.link_lookup(ifname=ifname)[0])[0]
        return link.get_attr("IFLA_STATS64")["tx_packets"]


class SwallowCheck:
    """Counts the frames QEMU read but did not give the guest, relative to a baseline.

    `rx_used()` returns the virtio-net RX queue's used index (16 bits, wraps), e.g. from QMP
    x-query-virtio-queue-status. Call `baseline()` while the VM runs, `swallowed()` once it is paused.
    """

    def __init__(self, tap: str, rx_used: Callable[[], int]):
        self.tap = tap
        self.rx_used = rx_used
        self.base: int | None = None

    def _diff(self, tries: int = 200) -> int | None:
        for _ in range(tries):
            before = tap_tx_packets(self.tap)
            used = self.rx_used()
            if tap_tx_packets(self.tap) == before:  # nothing was read meanwhile: a consistent pair
                return (before - used) & 0xFFFF
            time.sleep(0.0005)
        return None

    def baseline(self, tries: int = 200) -> bool:
        """Needs a moment when no frame reaches the tap for the length of one QMP query (a quiet VM, or
        traffic steered elsewhere); the difference then holds until the pause."""
        self.base = self._diff(tries)
        return self.base is not None

    def swallowed(self) -> int | None:
        """Frames read but not delivered since the baseline (0 or 1 expected), None when unknown."""
        if self.base is None:
            return None
        now = self._diff()
        return None if now is None else (now - self.base) & 0xFFFF


class ShadowLog:
    """Keeps the last `keep` frames delivered to the VM (from the shadow ring), in delivery order. The
    swallowed frames are found by the first frame left in the tap queue, so the log must still hold it when
    a late drain reads the queue: 4096 frames are 2 s at 2000 packets/s (a starved agent heard the pause up
    to 186 ms late), at most ~6 MiB of 1500-byte frames per migrating VM, for the window only."""

    def __init__(self, dataplane, keep: int = 4096):
        self.records: deque = deque(maxlen=keep)
        self._ring = dataplane.shadow_ring(self.records.append)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="shadow-log", daemon=True)

    def start(self) -> ShadowLog:
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.is_set():
            self._ring.poll(20)

    def flush(self) -> None:
        """Stop the background reader and take what is left; records are then complete up to now."""
        if self._thread.is_alive():
            self._stop.set()
            self._thread.join(2)
        if self._ring is not None:
            self._ring.poll(0)

    def close(self) -> None:
        self.flush()
        if self._ring is not None:
            self._ring.close()
            self._ring = None

    def swallowed_frames(self, count: int, first_queued: bytes | None, stopped_at_ns: int,
                         window_ns: int = SWALLOW_WINDOW_NS) -> tuple[list[bytes], str | None]:
        """(The `count` frames delivered just before `first_queued` (the first frame left in the tap queue;
        None: the queue was empty, so the last ones delivered), oldest first; None) or, when they cannot be
        told for sure, ([], why): not all in the log, or one delivered more than `window_ns`
        before QEMU stopped reading its tap. A frame QEMU swallows reached the tap just before that moment;
        an older one, picked by a count that is off, was given to the guest: re-sent, it would arrive twice.

        The moment QEMU stopped reading is bounded from above by `stopped_at_ns` (QEMU's own STOP time, or
        when the agent heard SUSPENDED if libvirt did not pass QEMU's event on: Agent._stopped_ns) and by the
        delivery of `first_queued` (QEMU never read it); the earlier bound is taken. The agent hears
        SUSPENDED late when it is starved of CPU (measured under a busy loop: 63 and 186 ms after the first
        frame QEMU left), which on its own pushed the frames QEMU had just swallowed out of the window."""
        recs = list(self.records)
        idx = len(recs)
        stop_ns = stopped_at_ns
        if first_queued is not None:
            for i, rec in enumerate(recs):
                if rec.packet == first_queued:
                    idx = i
                    break
            else:
                return [], f"the first queued frame is not in the shadow log ({len(recs)} records)"
            stop_ns = min(stop_ns, recs[idx].timestamp_ns)
        picked = recs[max(0, idx - count):idx]
        if len(picked) != count:
            return [], f"{len(picked)} of them in the shadow log"
        if (age := stop_ns - min(r.timestamp_ns for r in picked)) > window_ns:
            return [], f"one delivered {age / 1e6:.1f} ms before QEMU stopped reading"
        return [r.packet for r in picked], None


class TapKeeper:
    """A duplicate of a QEMU's tap fds, taken while QEMU lives. The tap queue then survives QEMU's death
    (the kernel purges it only when the last fd closes): what the destination held can be returned to the
    source when a migration aborts, and the source's drain finds its queue even if QEMU is gone by then."""

    def __init__(self, qemu_pid: int, tap: str):
        self.tap = tap
        self.fds = [take_fd(qemu_pid, fd) for fd in tap_fds_of(qemu_pid, tap)]
        if not self.fds:
            raise OSError(errno.ENOENT, f"process {qemu_pid} has no fd on tap {tap}")

    def frames(self) -> list[bytes]:
        return [frame for fd in self.fds for frame in read_queued(fd)]

    def close(self) -> None:
        for fd in self.fds:
            os.close(fd)
        self.fds = []

    def empty(self) -> bool:
        """Whether the tap's queue holds no frame now (the tap polls readable while it holds one)."""
        poller = select.poll()
        for fd in self.fds:
            poller.register(fd, select.POLLIN)
        return not any(ev & select.POLLIN for _, ev in poller.poll(0))

    def __enter__(self) -> TapKeeper:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def tap_queue_len(tap: str, qlen: int | None = None) -> int | None:
    """The tap's queue length (the ring its frames wait in for QEMU), set to `qlen` if given; returns the
    length it had, None if there is no such tap."""
    from pyroute2 import IPRoute  # noqa: PLC0415

    with IPRoute() as ipr:
        idx = ipr.link_lookup(ifname=tap)
        if not idx:
            return None
        old = ipr.get_links(idx[0])[0].get_attr("IFLA_TXQLEN")
        if qlen is not None and qlen != old:
            ipr.link("set", index=idx[0], txqlen=qlen)
        return old


def restore_queue_len(tap: str, qlen: int, queue: TapKeeper | None) -> bool:
    """End of a migration window: the tap's queue length back to `qlen`, but only once its queue is empty
    (`queue`: its fds; None: cannot tell, restore now). The kernel shortens the ring by freeing the frames
    that do not fit, without counting them: a backlog the resumed QEMU has not read yet would be lost.
    Returns False while frames are queued (try again later)."""
    if queue is not None and queue.fds and not queue.empty():
        return False
    tap_queue_len(tap, qlen)
    return True


def return_held(keeper: TapKeeper, src_addr: str, segments: list[str], skip: list[bytes] = ()) -> int:
    """Send every frame the destination's tap queue held back along `segments` (the source's
    End.DX6-map), in order, in sendmmsg batches; returns how many were sent (the kernel accepted).
    `skip`: inner packets not to return, once each: the frames the drain re-sent because the source QEMU
    had swallowed them, which that QEMU delivers itself when it resumes after an abort."""
    skip = list(skip)
    packets = []
    for frame in keeper.frames():
        if frame[14:] in skip:
            skip.remove(frame[14:])
            continue
        pkt = encapsulate(frame, src_addr, segments)
        if pkt is not None:
            packets.append(pkt)
    sender = RawSender()
    try:
        return sender.send_many(packets)
    finally:
        sender.close()


SENDMMSG_BATCH = 1024       # messages per sendmmsg(2) call
RETRIES = 12                # tries of one message that hits ENOBUFS/EAGAIN before the rest is given up
RETRY_FIRST_S = 20e-6       # the first wait; doubling, so RETRIES waits add up to about 80 ms
TRANSIENT = (errno.ENOBUFS, errno.EAGAIN, errno.EWOULDBLOCK)
SOL_IPV6 = 41
IPV6_RECVERR = 25
SOL_PACKET = 263
PACKET_QDISC_BYPASS = 20
# _Mmsg writes pointers and lengths as u64 words: right on 64-bit Linux (x86-64, like the rest of srmig).
_MMSG_WORDS = _ffi.sizeof("struct mmsghdr") // 8  # x86-64: 8
_NAME_W = _ffi.offsetof("struct mmsghdr", "msg_hdr", "msg_name") // 8


class _Mmsg:
    """Reusable sendmmsg(2) vectors for up to SENDMMSG_BATCH messages of one iovec each.

    A batch is joined into one buffer and the per-message words (buffer address, length, destination) are
    written as strided u64 slices: a few Python operations per batch (~0.1 us a packet) instead of several
    cffi attribute writes per packet."""

    def __init__(self, namelen: int):
        if _ffi.sizeof("void *") != 8 or _ffi.sizeof("size_t") != 8:
            raise NotImplementedError("sendmmsg batching is written for 64-bit Linux")
        n = SENDMMSG_BATCH
        self.iov = _ffi.new("struct iovec[]", n)
        self.msgs = _ffi.new("struct mmsghdr[]", n)
        for i in range(n):
            self.msgs[i].msg_hdr.msg_iov = self.iov + i
            self.msgs[i].msg_hdr.msg_iovlen = 1
            self.msgs[i].msg_hdr.msg_namelen = namelen
        self._iov_q = memoryview(_ffi.buffer(self.iov)).cast("Q")
        self._msg_q = memoryview(_ffi.buffer(self.msgs)).cast("Q")

    def fill(self, packets: list[bytes], names: array | None):
        """Point the first len(packets) messages at `packets` (and `names`, u64 sockaddr addresses);
        returns what must stay alive until they are sent."""
        n = len(packets)
        buf = _ffi.from_buffer(b"".join(packets))
        lens = array("Q", map(len, packets))
        starts = array("Q", accumulate(lens, initial=int(_ffi.cast("uintptr_t", buf))))
        self._iov_q[0:2 * n:2] = starts[:n]
        self._iov_q[1:2 * n:2] = lens
        if names is not None:
            self._msg_q[_NAME_W:_MMSG_WORDS * n:_MMSG_WORDS] = names
        return buf


class _Counted:
    """What a sender did not send: `dropped`, and by errno name in `errors`, never silently."""

    def __init__(self):
        self.dropped = 0
        self.errors: dict[str, int] = {}

    def _drop(self, err: int, count: int) -> None:
        self.dropped += count
        name = errno.errorcode.get(err, str(err))
        self.errors[name] = self.errors.get(name, 0) + count


class _BatchSender(_Counted):
    """send_many() over a socket: sendmmsg(2) in batches, in order. A message that fails with ENOBUFS or
    EAGAIN (a full queue on the way) is retried with a doubling wait, RETRIES times at most; past that the
    rest of the call is given up. A message failing twice in a row with another error (EMSGSIZE, no route)
    is skipped. Everything not sent is counted in `dropped` and by errno name in `errors`, never silently."""

    sock: socket.socket
    _namelen = 0

    def __init__(self):
        super().__init__()
        self._mm: _Mmsg | None = None

    def _names(self, packets: list[bytes]) -> array | None:
        return None


    def send_many(self, packets: list[bytes], handing: Callable[[int], None] | None = None) -> int:
        """Send `packets` in order; returns how many the kernel accepted (the rest is in `dropped`).
        `handing(k)`: called right before each sendmmsg(2) with k = how many of `packets` are then sent,
        skipped, or in that call, and again when a retry waits, with k = how many are done. A process killed
        in the call dies once it returns (a send that must wait for buffer space returns early: then the
        rest was counted as handed on)."""
        if self._mm is None:
            self._mm = _Mmsg(self._namelen)
        mm, fd, sent = self._mm, self.sock.fileno(), 0
        for i in range(0, len(packets), SENDMMSG_BATCH):
            batch = packets[i:i + SENDMMSG_BATCH]
            keep = mm.fill(batch, self._names(batch))  # noqa: F841 - the buffer the iovecs point into
            n, k, tries, last_err = len(batch), 0, 0, 0  # k: messages done (sent or skipped)
            while k < n:
                if handing is not None:
                    handing(i + n)
                rc = _libc.sendmmsg(fd, mm.msgs + k, n - k, 0)
                if rc > 0:
                    k += rc
                    sent += rc
                    tries, last_err = 0, 0
                    continue
                err = _ffi.errno
                if err == errno.EINTR:
                    continue
                if err in TRANSIENT:
                    if tries >= RETRIES:  # the queue does not drain: give the rest up, counted
                        self._drop(err, len(packets) - i - k)
                        return sent
                    if handing is not None:
                        handing(i + k)
                    time.sleep(RETRY_FIRST_S * (1 << tries))
                    tries += 1
                elif err == last_err:  # failed twice: this packet cannot be sent
                    self._drop(err, 1)
                    k += 1
                    last_err = 0
                else:  # once more: the error may be a stale one reported on the next send
                    last_err = err
        return sent


class RawSender(_BatchSender):
    """Sends complete IPv6 packets (IPPROTO_RAW implies IPV6_HDRINCL); the kernel routes them by their DA.

    IPV6_RECVERR: without it a raw socket reports a full queue (ENOBUFS) as success (rawv6_send_hdrinc),
    and send_many could neither retry nor count it."""

    _namelen = 28  # struct sockaddr_in6

    def __init__(self):
        super().__init__()
        self.sock = socket.socket(socket.AF_INET6, socket.SOCK_RAW, socket.IPPROTO_RAW)
        self.sock.setsockopt(SOL_IPV6, IPV6_RECVERR, 1)
        self._sockaddrs: dict[bytes, object] = {}  # DA -> struct sockaddr_in6 (kept alive)
        self._addr_of: dict[bytes, int] = {}

    def send(self, packet: bytes) -> None:
        dst = str(ipaddress.IPv6Address(packet[24:40]))
        self.sock.sendto(packet, (dst, 0))

    def _sockaddr(self, da: bytes) -> int:
        sa = _ffi.new("char[]", struct.pack("=HHI16sI", socket.AF_INET6, 0, 0, da, 0))
        self._sockaddrs[da] = sa
        self._addr_of[da] = addr = int(_ffi.cast("uintptr_t", sa))
        return addr

    def _names(self, packets: list[bytes]) -> array:
        # The route lookup uses the destination address given, not the header's: pass each packet's DA.
        get = self._addr_of.get
        return array("Q", [get(p[24:40]) or self._sockaddr(p[24:40]) for p in packets])

    def close(self) -> None:
        self.sock.close()


class PacketSender(_BatchSender):
    """Sends whole Ethernet frames out of interface `ifname` (AF_PACKET), no routing: a way to put frames
    straight into a VM's tap queue, ready at once (TxRingSender sends a large buffer faster, bench/flush.py,
    but its ring takes up to tens of ms to set up). Bound with protocol 0, so it never receives.
    `qdisc_bypass` (PACKET_QDISC_BYPASS) hands each frame to the driver directly; on a tap that measured
    slower (tun never stops its queue, so its qdisc is passed through anyway, while the bypass runs tun's
    per-frame queue selection: see TxRingSender), and without it the host's tc setup still applies. A tap
    reports nothing when its queue is full (tun drops and counts tx_dropped): its txqueuelen must hold what
    is sent."""

    def __init__(self, ifname: str, qdisc_bypass: bool = False):
        super().__init__()
        self.sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, 0)
        if qdisc_bypass:
            self.sock.setsockopt(SOL_PACKET, PACKET_QDISC_BYPASS, 1)
        self.sock.bind((ifname, 0))

    def send(self, frame: bytes) -> None:
        self.sock.send(frame)

    def close(self) -> None:
        self.sock.close()


PACKET_TX_RING = 13
PACKET_LOSS = 14
PACKET_VNET_HDR = 15
PACKET_VERSION = 10
TPACKET_V2 = 1
TP_STATUS_AVAILABLE, TP_STATUS_SEND_REQUEST, TP_STATUS_WRONG_FORMAT = 0, 1, 4
SIOCGIFMTU = 0x8921
TX_RING_MAX_BYTES = 8 << 20  # TxRingSender's ring at most (2048 slots of 2 KiB at MTU 1500: 4 MiB)
_TP2_HDR = 32    # TPACKET_ALIGN(sizeof(struct tpacket2_hdr)): a slot's frame data (here its vnet header) follows
_VNET = 10       # struct virtio_net_hdr


class TxRingSender(_Counted):
    """Sends whole Ethernet frames out of interface `ifname` through a PACKET_TX_RING (TPACKET_V2): frames are
    written into the mmap'ed ring, then one send() hands up to `slots` of them to the kernel, which walks the
    ring and transmits each (bench/flush.py: faster than PacketSender's sendmmsg into a tap, less kernel work
    per frame). Not PACKET_QDISC_BYPASS by default: the bypass calls the driver's queue selection for every
    frame, and tun's hashes each frame's flow (~14 % of the kernel's time here), where the qdisc path skips
    it on a single-queue device; a tap's qdisc never holds a frame (tun never stops its queue), so the
    bypass saves nothing. Without it, 128-byte frames: 0.60-0.63 against 0.55-0.56 Mpps (medians of 8
    interleaved rounds, pfifo_fast and noqueue); 1024 bytes: within this machine's noise. Same interface and
    the same accounting as PacketSender: in order; ENOBUFS/EAGAIN retried with a doubling wait, RETRIES
    times, then the rest given up; a frame the kernel would refuse (longer than the MTU, shorter than an
    Ethernet header) skipped in place, and one it does refuse (TP_STATUS_WRONG_FORMAT) too; everything not
    sent counted in `dropped` and by errno name in `errors`.

    PACKET_VNET_HDR: each slot carries a virtio-net header whose hdr_len is the frame's length, so the
    kernel copies the whole frame into the skb. Without it the skb points into the ring's pages and tun,
    which must not hold user pages (skb_orphan_frags_rx), copies each frame into a fresh page: ~1.5x the
    kernel time per frame. A tap reports nothing when its queue is full: its txqueuelen must hold what is sent.

    The per-frame Python work is one slice assignment; the slot headers (tp_len, the vnet hdr_len, tp_status)
    are written as strided memoryview slices, a few operations per ring fill. The ring (`slots` x a slot
    sized for the interface's MTU, 2 KiB at 1500) is set up by the constructor: setsockopt(PACKET_TX_RING)
    took 0.1-30 ms here, bimodal (an RCU grace period, synchronize_net, it seems): for a large buffer, not
    for a few frames that must go out at once."""

    def __init__(self, ifname: str, slots: int = 2048, qdisc_bypass: bool = False):
        super().__init__()
        self.ifname = ifname
        self._ring = None
        self.sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, 0)
        try:
            ifr = fcntl.ioctl(self.sock, SIOCGIFMTU, struct.pack("16si12x", ifname.encode(), 0))
            self.mtu = struct.unpack_from("i", ifr, 16)[0]
            # A slot: its tpacket2_hdr, the vnet header, a frame of MTU + Ethernet header + a VLAN tag.
            fs = self.frame_size = 1 << (_TP2_HDR + _VNET + self.mtu + 18 - 1).bit_length()
            block = max(fs, 1 << 16)
            slots = max(1, min(slots, TX_RING_MAX_BYTES // fs))  # a jumbo MTU: fewer slots, not more memory
            blocks = -(-slots // (block // fs))
            self.slots = blocks * (block // fs)
            self._req = struct.pack("IIII", block, blocks, fs, self.slots)
            self.sock.setsockopt(SOL_PACKET, PACKET_VERSION, TPACKET_V2)
            if qdisc_bypass:
                self.sock.setsockopt(SOL_PACKET, PACKET_QDISC_BYPASS, 1)
            self.sock.setsockopt(SOL_PACKET, PACKET_VNET_HDR, 1)
            self.sock.bind((ifname, 0))
            self._map()
        except BaseException:
            self.close()
            raise

    def _map(self) -> None:
        import mmap

        self.sock.setsockopt(SOL_PACKET, PACKET_TX_RING, self._req)
        block, blocks = struct.unpack_from("II", self._req)
        self._ring = mmap.mmap(self.sock.fileno(), block * blocks, mmap.MAP_SHARED,
                               mmap.PROT_READ | mmap.PROT_WRITE)
        mv = memoryview(self._ring)
        self._mv, self._u32, self._u16 = mv, mv.cast("I"), mv.cast("H")
        self._head = 0  # the slot the kernel sends next (it advances its own head in step with ours)

    def _unmap(self) -> None:
        if self._ring is not None:
            for view in (self._u32, self._u16, self._mv):
                view.release()
            self._ring.close()
            self._ring = None

    def _put(self, frames: list[bytes], lens: array, first: int) -> None:
        """Write `frames` (`lens`: their lengths, u32) into slots first, first+1, ... (no wrap) and mark them
        SEND_REQUEST. Every header field is one strided slice per fill (~30 ns a frame); what is left per
        frame is the copy of its bytes (~110 ns)."""
        n, fs, mv = len(frames), self.frame_size, self._mv
        w, h = fs // 4, fs // 2
        self._u32[first * w + 1:(first + n) * w:w] = array("I", [x + _VNET for x in lens])  # tp_len
        # The vnet header's hdr_len (u16 at +2): the low halves of the u32 lengths (little-endian x86).
        self._u16[first * h + (_TP2_HDR + 2) // 2:(first + n) * h:h] = memoryview(lens).cast("B").cast("H")[::2]
        start = first * fs + _TP2_HDR + _VNET
        for off, f, ln in zip(range(start, start + n * fs, fs), frames, lens):
            mv[off:off + ln] = f
        self._u32[first * w:(first + n) * w:w] = array("I", [TP_STATUS_SEND_REQUEST]) * n

    def send_many(self, frames: list[bytes]) -> int:
        """Send `frames` in order; returns how many the kernel accepted (the rest is in `dropped`)."""
        if not frames:
            return 0
        lens = array("I", map(len, frames))
        if max(lens) > self.mtu + 14 or min(lens) < 14:
            frames = self._valid(frames)
            lens = array("I", map(len, frames))
        sent, i = 0, 0
        while i < len(frames):
            head, n = self._head, min(self.slots, len(frames) - i)
            first = min(n, self.slots - head)
            self._put(frames[i:i + first], lens[i:i + first], head)
            if n > first:
                self._put(frames[i + first:i + n], lens[i + first:i + n], 0)
            done, err = self._flush(head, head + n)
            sent += done
            i += done
            if done == n:
                continue
            if self._status((head + done) % self.slots) == TP_STATUS_WRONG_FORMAT:
                # Refused (it passed _valid, so for a reason we do not know) and the kernel's head stays on
                # it: nothing behind it would ever be sent. Skip it, counted, on a new ring.
                self._drop(err or errno.EINVAL, 1)
                i += 1
                self._reopen()
                continue
            # The queue does not drain, or the interface refuses everything: give the rest up, counted.
            self._give_up(head + done, head + n)
            self._drop(err, len(frames) - i)
            return sent
        return sent

    def _valid(self, frames: list[bytes]) -> list[bytes]:
        """`frames` without those the kernel refuses, counted as sendmmsg would be: EMSGSIZE longer than the
        MTU allows (it does not check with a vnet header: a TX ring frame may fill its slot, for GSO),
        EINVAL shorter than an Ethernet header (it would stop the ring there: WRONG_FORMAT)."""
        limit, ok = self.mtu + 14, []
        for f in frames:
            if len(f) > limit and not (len(f) <= limit + 4 and f[12:14] == b"\x81\x00"):
                self._drop(errno.EMSGSIZE, 1)
            elif len(f) < 14:
                self._drop(errno.EINVAL, 1)
            else:
                ok.append(f)
        return ok

    def _flush(self, pos: int, end: int) -> tuple[int, int]:
        """send() until slots pos..end-1 (unwrapped, requested) are all sent, or one is refused, or the
        kernel stops taking them (ENOBUFS/EAGAIN past RETRIES, another error twice with no progress).
        Returns (how many were sent, the last error) and leaves self._head on the first slot not sent."""
        start, tries, err, last_err = pos, 0, 0, 0
        while pos < end:
            err = 0
            try:
                self.sock.send(b"")  # blocking: returns once every requested slot is sent (or one failed)
            except OSError as e:
                err = e.errno
            before, pos = pos, self._first_busy(pos, end)  # the kernel sends in ring order
            if pos > before:
                tries, last_err = 0, 0
            if pos == end or self._status(pos % self.slots) == TP_STATUS_WRONG_FORMAT:
                break
            if err in TRANSIENT or not err:  # a full queue: the kernel requested that slot again
                if tries >= RETRIES:
                    err = err or errno.ENOBUFS
                    break
                time.sleep(RETRY_FIRST_S * (1 << tries))
                tries += 1
            elif err == last_err and pos == before:
                break
            else:  # once more: the error may be a stale one reported on the next send
                last_err = err
        self._head = pos % self.slots
        return pos - start, err

    def _first_busy(self, pos: int, end: int) -> int:
        """The first of slots pos..end-1 (unwrapped) not AVAILABLE, else end: a strided read of the
        statuses and a bytes scan, not a Python loop per slot."""
        w, slots = self.frame_size // 4, self.slots
        while pos < end:
            a = pos % slots
            b = min(a + end - pos, slots)
            status = self._u32[a * w:b * w:w].tobytes()
            zeros = len(status) - len(status.lstrip(b"\0"))
            if zeros < len(status):
                return pos + zeros // 4
            pos += b - a
        return end

    def _status(self, slot: int) -> int:
        return self._u32[slot * (self.frame_size // 4)]

    def _give_up(self, pos: int, end: int) -> None:
        """Take slots pos..end-1 back unsent; the kernel's head stays on pos, where the next fill starts."""
        for p in range(pos, end):
            self._u32[(p % self.slots) * (self.frame_size // 4)] = TP_STATUS_AVAILABLE

    def _reopen(self) -> None:
        """A new ring on the same socket (a new one would be in this thread's namespace, maybe not the
        interface's): the kernel's head starts again at slot 0."""
        self._unmap()
        self.sock.setsockopt(SOL_PACKET, PACKET_TX_RING, bytes(16))  # no blocks: frees the ring
        self._map()

    def close(self) -> None:
        self._unmap()
        self.sock.close()


_HOLD_HEAD = libbpf.ffi.sizeof("struct srmig_hold_record")
_HOLD_LEN = libbpf.ffi.offsetof("struct srmig_hold_record", "len")
_HOLD_VM = libbpf.ffi.offsetof("struct srmig_hold_record", "vm")


def hold_ring_reader(dp) -> libbpf.RingReader:
    """A bulk reader of `dp`'s hold ring (its pin), for read_hold_packets()."""
    return libbpf.RingReader(libbpf.obj_get(str(Path(dp.pin_dir) / "hold_ring")), owns_fd=True)


def read_hold_packets(ring: libbpf.RingReader, limit: int = 1 << 30, commit: bool = True,
                      ends: list[int] | None = None) -> list[bytes]:
    """The packets parked in the hold ring, oldest first, consumed (with `commit=False`, once
    `ring.commit()` is called): each record's packet only, cut out of the ring without a callback per record
    (about 7x the rate of Dataplane.hold_ring's consumer). `ends`: RingReader.read's."""
    return ring.read(limit, start=_HOLD_HEAD, commit=commit, ends=ends,
                     length=lambda data, off: struct.unpack_from("<I", data, off + _HOLD_LEN)[0])


def decapsulate(packet: bytes) -> bytes | None:
    """The inner IPv6 packet of an SRv6 encapsulation (outer IPv6, an optional SRH); None without one."""
    if len(packet) < 40 or packet[0] >> 4 != 6:
        return None
    nh, off = packet[6], 40
    if nh == 43 and len(packet) >= off + 8:
        nh, off = packet[off], off + 8 * (packet[off + 1] + 1)
    if nh != 41 or len(packet) < off + 40:
        return None
    return packet[off:]


def _ethernet_to(vm: str, tap: str) -> bytes | None:
    """The Ethernet header the program's delivery puts on a packet for `vm` on `tap`: to the VM's MAC (the
    tap's neighbour entry), from the tap's; None when the neighbour is unknown."""
    from pyroute2 import IPRoute

    with IPRoute() as ipr:
        idx = ipr.link_lookup(ifname=tap)
        if not idx:
            return None
        src = ipr.get_links(idx[0])[0].get_attr("IFLA_ADDRESS")
        for n in ipr.get_neighbours(family=socket.AF_INET6, ifindex=idx[0]):
            if n.get_attr("NDA_DST") == vm and n.get_attr("NDA_LLADDR"):
                mac = n.get_attr("NDA_LLADDR")
                return bytes.fromhex(mac.replace(":", "")) + bytes.fromhex(src.replace(":", "")) + b"\x86\xdd"
    return None


def sid_delivered(dp, sid: str) -> int:
    """Packets delivered so far by `sid` (its per-SID counter)."""
    return next((e.stats["delivered"] for e in dp.list_sids() if e.sid == sid), 0)


def wait_delivered(dp, sid: str, at_least: int, stall_s: float = RETURN_ARRIVAL_S,
                   max_s: float = RETURN_ARRIVAL_MAX_S) -> int:
    """An abort: wait until `sid` (the source's End.SBUF) has delivered `at_least` packets, i.e. what the
    destination returned has landed, before the source delivers what it parked. Bounded: gives up after
    `stall_s` without a new delivery (on a busy machine they trickle in), or `max_s` in all. Returns how
    many had not arrived then (0: all)."""
    t0 = last_progress = time.monotonic()
    seen = sid_delivered(dp, sid)
    while seen < at_least:
        now = time.monotonic()
        if now - last_progress > stall_s or now - t0 > max_s:
            break
        time.sleep(0.001)
        if (n := sid_delivered(dp, sid)) != seen:
            seen, last_progress = n, time.monotonic()
    return max(0, at_least - seen)


def unpark(dp, vm: str, tap: str | None, max_s: float = UNPARK_MAX_S) -> int:
    """An abort, once the destination has returned the older packets it held: give the VM what the program
    parked meanwhile (SRMIG_VM_F_PARK: whole, as it came in), oldest first, straight into its tap queue;
    then plain RUNNING. While we send, newer packets still park behind them (SRMIG_VM_F_RING_FIRST: a batch
    is consumed only once sent), so none overtakes. Records of other VMs (already advanced: a drain's) are
    sent on as they are. Returns how many packets the VM was given."""
    eth = _ethernet_to(vm, tap) if tap else None
    vm_key = ipaddress.IPv6Address(vm).packed
    ring = hold_ring_reader(dp)
    ring.skip_sent()  # what a drain killed mid-send had forwarded already (its records are a drain's)
    # Not TxRingSender: its ring's setup (0.1-30 ms, an RCU grace period) comes before the first frame and
    # costs more than its faster sends save up to ~10^4 parked packets (measured, 128 B frames).
    to_tap = PacketSender(tap) if eth else None
    raw = RawSender()
    given = 0

    def give(commit: bool) -> int:
        """Read what the ring holds, send it, then consume it; returns how many records were read."""
        nonlocal given
        records = ring.read(start=_HOLD_VM, commit=commit,
                            length=lambda data, off: _HOLD_HEAD - _HOLD_VM + struct.unpack_from(
                                "<I", data, off + _HOLD_LEN)[0])
        frames, others = [], []
        for rec in records:
            packet = rec[_HOLD_HEAD - _HOLD_VM:]
            inner = decapsulate(packet) if rec[:16] == vm_key else None
            if inner is None:
                others.append(packet)
            elif eth:
                frames.append(eth + inner)
            else:
                others.append(inner)  # no neighbour entry: the kernel routes it to the tap
        if frames:
            given += to_tap.send_many(frames)
        if others:
            given += raw.send_many(others)
        ring.commit()
        return len(records)

    try:
        dp.set_vm(vm, VmState.RUNNING, ring_first=True)
        deadline = time.monotonic() + max_s
        while time.monotonic() <= deadline:
            if not give(commit=False) and ring.empty():
                break
        dp.set_vm(vm, VmState.RUNNING)
        # A program run that read the flag just before it was cleared may still be writing its record.
        time.sleep(0.002)
        give(commit=True)
    finally:
        ring.close()
        raw.close()
        if to_tap is not None:
            to_tap.close()
    return given


@dataclass
class DrainReport:
    from_tap: int = 0          # frames recovered from the paused QEMU's tap queue
    from_ring: int = 0         # packets the program parked in the hold ring while we drained
    swallowed: int | None = None  # frames QEMU read but never gave the guest (None: not checked)
    resent_swallowed: int = 0  # of those, re-sent from the shadow log
    ring_sent_before: int = 0  # records a drain killed mid-send had handed on (consumed, not sent again)
    swallow_miss: str | None = None  # why they were not (ShadowLog.swallowed_frames)
    not_ipv6: int = 0          # tap frames that were not IPv6 (not forwarded)
    send_dropped: int = 0      # of the packets above, how many the kernel refused to send (by errno below)
    send_errors: dict = field(default_factory=dict)
    hold_ms: float = 0.0       # time spent in HOLD
    # before_flip_ms: HOLD until the flip to AWAY behind the ring; behind_ring_ms: from the flip until the
    # ring was sent empty; ring_after_flip: packets found in the ring once the program forwards directly
    # again, the only ones that can arrive behind newer packets (expected 0).
    timings: dict = field(default_factory=dict)


class SourceDrain:
    """Stop-and-copy on the source, in the order that keeps packets in order:

    1. VM state HOLD: the program parks every newer packet in the hold ring (already advanced to D).
    2. Drain QEMU's tap queue (the oldest packets), send them to D's End.SBUF (one sendmmsg list).
    3. AWAY behind the ring (SRMIG_VM_F_RING_FIRST): the program parks a packet while the ring holds any
       record we have not consumed, and forwards directly once it holds none. We send the ring's packets
       batch by batch and consume each batch only once it is sent, until the ring is empty.
    4. Plain AWAY, then read the ring once more for a packet parked while the flag was being cleared.
    """

    def __init__(self, dataplane, vm: str, src_addr: str, dest_segments: list[str], next_sid: str):
        self.dp = dataplane
        self.vm = vm
        self.src = src_addr
        self.segments = dest_segments
        self.next_sid = next_sid
        self.resent_swallowed: list[bytes] = []  # inner packets re-sent for the source QEMU
    def run(self, queue: TapKeeper, settle_s: float = 0.002, check: SwallowCheck | None = None,
            shadow: ShadowLog | None = None, stopped_at_ns: int = 0) -> DrainReport:
        """`queue`: the paused QEMU's tap fds (taken now, or kept since before the pause: then QEMU may be
        gone already). `check` and `shadow` (both or neither) also recover the frame QEMU swallowed at the
        pause; `stopped_at_ns` (time.monotonic_ns of QEMU's STOP) helps bound how old that frame can be
        (ShadowLog.swallowed_frames)."""
        rep = DrainReport()
        sender = RawSender()
        t0 = time.monotonic()
        ring = hold_ring_reader(self.dp)
        try:
            self.dp.set_vm(self.vm, VmState.HOLD, next_sid=self.next_sid)
            if check is not None:
                rep.swallowed = check.swallowed()  # before we read: our reads count as tx too
            queued = queue.frames()
            older: list[bytes] = []  # everything ahead of the ring, oldest first, sent as one list
            if shadow is not None and rep.swallowed and rep.swallowed <= MAX_SWALLOWED:
                shadow.flush()
                first = next((f[14:] for f in queued if f[12:14] == b"\x86\xdd"), None)
                # QEMU keeps one frame it read after the pause, and one it could not place in a full RX
                # ring: both reached the tap shortly before it stopped reading, never long before.
                frames, rep.swallow_miss = shadow.swallowed_frames(rep.swallowed, first, stopped_at_ns)
                for frame in frames:
                    older.append(encapsulate_packet(frame, self.src, self.segments))
                    self.resent_swallowed.append(frame)
                    rep.resent_swallowed += 1
            for frame in queued:
                pkt = encapsulate(frame, self.src, self.segments)
                if pkt is None:
                    rep.not_ipv6 += 1
                    continue
                older.append(pkt)
                rep.from_tap += 1
            sender.send_many(older)
            rep.hold_ms = rep.timings["before_flip_ms"] = round((time.monotonic() - t0) * 1000, 3)
            self.away_behind_ring(sender, rep, ring, settle_s)
        finally:
            ring.close()
            sender.close()
            rep.send_dropped, rep.send_errors = sender.dropped, dict(sender.errors)
        return rep

    def ring_only(self) -> DrainReport:
        """Steps 3-4 alone: what an agent restarted after a drain it was killed in does (QEMU gone with its
        tap queue; the hold ring is the program's and outlives the agent: what it parked goes first)."""
        rep, sender, ring = DrainReport(), RawSender(), hold_ring_reader(self.dp)
        try:
            self.away_behind_ring(sender, rep, ring)
        finally:
            ring.close()
            sender.close()
            rep.send_dropped, rep.send_errors = sender.dropped, dict(sender.errors)
        return rep

    def away_behind_ring(self, sender: RawSender, rep: DrainReport, ring: libbpf.RingReader,
                         settle_s: float = 0.002) -> None:
        """Steps 3-4: AWAY behind the ring, send what it holds batch by batch, each consumed once sent, until
        it is empty; then plain AWAY, and send what a program run parked while the flag was being cleared.
        First, what a drain killed before its commit had handed to the kernel (the ring's sent mark) is
        consumed without being sent again."""
        rep.ring_sent_before = ring.skip_sent()
        self.dp.set_vm(self.vm, VmState.AWAY, next_sid=self.next_sid, ring_first=True)
        t_flip = time.monotonic()
        deadline = t_flip + RING_FIRST_MAX_S
        while not ring.empty() and time.monotonic() < deadline:
            ends: list[int] = []
            packets = read_hold_packets(ring, commit=False, ends=ends)
            if packets:
                # Sent before consumed, so that newer packets keep parking behind them; marked as they go
                # to the kernel, so that an agent killed before the commit does not send them twice.
                sender.send_many(packets, handing=lambda k: ring.mark_sent(ends[k - 1]))
                rep.from_ring += len(packets)
            ring.commit()  # only now may the program forward newer packets directly
        self.dp.set_vm(self.vm, VmState.AWAY, next_sid=self.next_sid)
        rep.timings["behind_ring_ms"] = round((time.monotonic() - t_flip) * 1000, 3)
        before = rep.from_ring
        deadline = time.monotonic() + settle_s
        while time.monotonic() < deadline:
            self._ring_send(sender, rep, ring)
        self._ring_send(sender, rep, ring)
        rep.timings["ring_after_flip"] = rep.from_ring - before

    @staticmethod
    def _ring_send(sender: RawSender, rep: DrainReport, ring: libbpf.RingReader, rounds: int = 1000) -> None:
        """Send what the ring holds, and what it received meanwhile, until a read finds it empty."""
        for _ in range(rounds):
            packets = read_hold_packets(ring)
            if not packets:
                return
            sender.send_many(packets)
            rep.from_ring += len(packets)
