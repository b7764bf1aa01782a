"""Many packets out in order, fast, and nothing lost silently: sendmmsg(2) in batches over a raw IPv6
socket (RawSender: routed by each packet's DA) or an AF_PACKET one (PacketSender: Ethernet frames straight
out of an interface, e.g. into a VM's tap queue). What the kernel does not take is retried or counted."""

from __future__ import annotations

import errno
import ipaddress
import socket
import struct
import time
from array import array
from itertools import accumulate
from typing import Callable

from cffi import FFI

_ffi = FFI()
_ffi.cdef("""
    struct iovec { void *iov_base; size_t iov_len; };
    struct msghdr { void *msg_name; uint32_t msg_namelen; struct iovec *msg_iov; size_t msg_iovlen;
                    void *msg_control; size_t msg_controllen; int msg_flags; };
    struct mmsghdr { struct msghdr msg_hdr; unsigned int msg_len; };
    int sendmmsg(int sockfd, struct mmsghdr *msgvec, unsigned int vlen, int flags);
""")
_libc = _ffi.dlopen(None)

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
    straight into a VM's tap queue, ready at once (TxRingSender, bench/tx_ring.py, sends a large buffer faster,
    bench/flush.py, but its ring takes up to tens of ms to set up). Bound with protocol 0, so it never
    receives. `qdisc_bypass` (PACKET_QDISC_BYPASS) hands each frame to the driver directly; on a tap that
    measured slower (tun never stops its queue, so its qdisc is passed through anyway, while the bypass runs
    tun's per-frame queue selection: see TxRingSender), and without it the host's tc setup still applies. A
    tap reports nothing when its queue is full (tun drops and counts tx_dropped): its txqueuelen must hold
    what is sent."""

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
