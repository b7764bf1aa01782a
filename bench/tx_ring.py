"""TxRingSender: frames out of an interface through a PACKET_TX_RING, for bench/flush.py, which measures it
against the product's PacketSender (srmig/ctl/senders.py). The product does not use it: its ring's setup
costs more than it saves on the packets an abort gives back (srmig.ctl.drain.unpark)."""

from __future__ import annotations

import errno
import fcntl
import socket
import struct
import time
from array import array

from srmig.ctl.senders import PACKET_QDISC_BYPASS, RETRIES, RETRY_FIRST_S, SOL_PACKET, TRANSIENT, _Counted

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
