"""An AF_XDP socket that only transmits, in copy mode (XDP_COPY): the drain benchmark's measurement of what
AF_XDP TX costs on a veth (issue 20 part 1, bench/drain.py's send_cost). Not the product's.

The frames are written into the UMEM (one 2 KiB chunk each), their descriptors into the TX ring, and a
zero-length send() wakes the kernel, which in copy mode builds an skb per frame and hands it to the driver
(xsk_generic_xmit, no qdisc), at most 32 frames per wake-up. Completions are reaped as they come: a chunk is
written again only once the kernel has completed it. The rings' layout comes from XDP_MMAP_OFFSETS
(<linux/if_xdp.h>)."""

from __future__ import annotations

import ctypes
import errno
import mmap
import socket
import struct
import time
from array import array

AF_XDP = 44
SOL_XDP = 283
XDP_MMAP_OFFSETS, XDP_TX_RING, XDP_UMEM_REG, XDP_UMEM_FILL_RING, XDP_UMEM_COMPLETION_RING = 1, 3, 4, 5, 6
XDP_COPY = 1 << 1
XDP_PGOFF_TX_RING = 0x80000000
XDP_UMEM_PGOFF_COMPLETION_RING = 0x180000000
CHUNK = 2048
DESC = 16  # struct xdp_desc: u64 addr, u32 len, u32 options

_libc = ctypes.CDLL(None, use_errno=True)


class AfXdpTxSender:
    """send_many(frames) in order out of queue 0 of `ifname` (this thread's namespace); returns how many the
    kernel completed. Each frame at most CHUNK bytes."""

    def __init__(self, ifname: str, slots: int = 4096):
        self.slots = slots
        self.sock = socket.socket(AF_XDP, socket.SOCK_RAW, 0)
        try:
            self._setup(socket.if_nametoindex(ifname))
        except BaseException:
            self.close()
            raise

    def _setup(self, ifindex: int) -> None:
        s, n = self.sock, self.slots
        self.umem = mmap.mmap(-1, n * CHUNK, mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        self._umem_addr = ctypes.addressof(ctypes.c_char.from_buffer(self.umem))
        # struct xdp_umem_reg: addr, len, chunk_size, headroom, flags (and tx_metadata_len on newer kernels)
        s.setsockopt(SOL_XDP, XDP_UMEM_REG, struct.pack("=QQIIII", self._umem_addr, n * CHUNK, CHUNK, 0, 0, 0))
        s.setsockopt(SOL_XDP, XDP_UMEM_FILL_RING, struct.pack("=I", 64))  # bind needs one; never filled (no RX)
        s.setsockopt(SOL_XDP, XDP_UMEM_COMPLETION_RING, struct.pack("=I", n))
        s.setsockopt(SOL_XDP, XDP_TX_RING, struct.pack("=I", n))
        off = struct.unpack("=16Q", s.getsockopt(SOL_XDP, XDP_MMAP_OFFSETS, 128))
        tx, cr = off[4:8], off[12:16]  # rx, tx, fill, completion: producer, consumer, desc, flags each
        self.tx_map = mmap.mmap(s.fileno(), tx[2] + n * DESC, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE,
                                offset=XDP_PGOFF_TX_RING)
        self.cr_map = mmap.mmap(s.fileno(), cr[2] + n * 8, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE,
                                offset=XDP_UMEM_PGOFF_COMPLETION_RING)
        self._tx_prod, self._tx_desc = tx[0], tx[2]
        self._cr_prod, self._cr_cons = cr[0], cr[1]
        self._descs = memoryview(self.tx_map)[tx[2]:tx[2] + n * DESC].cast("Q")
        sxdp = struct.pack("=HHIII", AF_XDP, XDP_COPY, ifindex, 0, 0)
        if _libc.bind(s.fileno(), ctypes.c_char_p(sxdp), len(sxdp)) != 0:
            e = ctypes.get_errno()
            raise OSError(e, f"AF_XDP bind: {errno.errorcode.get(e, e)}")
        self.prod = self.done = 0

    def _u32(self, m: mmap.mmap, at: int, value: int | None = None) -> int:
        if value is not None:
            struct.pack_into("=I", m, at, value & 0xFFFFFFFF)
            return value
        return struct.unpack_from("=I", m, at)[0]

    def _reap(self) -> None:
        prod = self._u32(self.cr_map, self._cr_prod)
        done = (prod - self.done) & 0xFFFFFFFF
        if done:
            self.done += done
            self._u32(self.cr_map, self._cr_cons, self.done)

    def _kick(self) -> None:
        try:
            self.sock.send(b"", socket.MSG_DONTWAIT)
        except (BlockingIOError, InterruptedError):
            pass  # EAGAIN: the kernel sent a batch (32) and wants another wake-up
        except OSError as e:
            if e.errno != errno.ENOBUFS:
                raise

    def send_many(self, frames: list[bytes], timeout_s: float = 5.0) -> int:
        n, i, start = self.slots, 0, self.done
        deadline = time.monotonic() + timeout_s
        while i < len(frames) or self.done - start < len(frames):
            self._reap()
            free = n - (self.prod - self.done)
            at = self.prod % n
            k = min(free, n - at, len(frames) - i)  # never across the ring's end
            if k > 0:
                batch = frames[i:i + k]
                self.umem[at * CHUNK:(at + k) * CHUNK] = b"".join(f.ljust(CHUNK, b"\0") for f in batch)
                self._descs[2 * at:2 * (at + k):2] = array("Q", range(at * CHUNK, (at + k) * CHUNK, CHUNK))
                self._descs[2 * at + 1:2 * (at + k):2] = array("Q", map(len, batch))  # len, options 0
                self.prod += k
                self._u32(self.tx_map, self._tx_prod, self.prod)
                i += k
            self._kick()
            if time.monotonic() > deadline:
                break
        return self.done - start

    def close(self) -> None:
        for name in ("_descs", "tx_map", "cr_map", "umem"):
            obj = getattr(self, name, None)
            if obj is not None:
                obj.release() if isinstance(obj, memoryview) else obj.close()
        self.sock.close()
