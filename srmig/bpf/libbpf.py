"""What bcc lacks, taken from libbpf.so.1 through cffi: pinning, map access by fd (so a CLI call needs no
compiler), BPF_PROG_TEST_RUN, the ring buffer consumer, and program info.

libbpf 1.x returns -errno from every call; `_check` turns that into OSError with the call's name.
"""

from __future__ import annotations

import errno
import functools
import mmap
import os
import struct
from dataclasses import dataclass
from typing import Callable, Iterator

from cffi import FFI

from srmig.bpf import abi

ffi = FFI()
ffi.include(abi.ffi)
ffi.cdef(
    """
    int bpf_obj_pin(int fd, const char *pathname);
    int bpf_obj_get(const char *pathname);
    int bpf_map_update_elem(int fd, const void *key, const void *value, uint64_t flags);
    int bpf_map_lookup_elem(int fd, const void *key, void *value);
    int bpf_map_delete_elem(int fd, const void *key);
    int bpf_map_get_next_key(int fd, const void *key, void *next_key);
    int bpf_obj_get_info_by_fd(int bpf_fd, void *info, uint32_t *info_len);
    int libbpf_num_possible_cpus(void);

    struct bpf_test_run_opts {
        size_t sz;
        const void *data_in;
        void *data_out;
        uint32_t data_size_in;
        uint32_t data_size_out;
        const void *ctx_in;
        void *ctx_out;
        uint32_t ctx_size_in;
        uint32_t ctx_size_out;
        uint32_t retval;
        int repeat;
        uint32_t duration;
        uint32_t flags;
        uint32_t cpu;
        uint32_t batch_size;
    };
    int bpf_prog_test_run_opts(int prog_fd, struct bpf_test_run_opts *opts);

    struct xdp_md {
        uint32_t data;
        uint32_t data_end;
        uint32_t data_meta;
        uint32_t ingress_ifindex;
        uint32_t rx_queue_index;
        uint32_t egress_ifindex;
    };

    /* The first fields of struct bpf_prog_info / bpf_map_info; the kernel fills what fits. */
    struct prog_info_head { uint32_t type; uint32_t id; uint8_t tag[8]; };
    struct map_info_head { uint32_t type; uint32_t id; uint32_t key_size; uint32_t value_size;
                           uint32_t max_entries; uint32_t map_flags; char name[16]; };

    struct ring_buffer;
    typedef int (*ring_buffer_sample_fn)(void *ctx, void *data, size_t size);
    struct ring_buffer *ring_buffer__new(int map_fd, ring_buffer_sample_fn sample_cb, void *ctx,
                                         const void *opts);
    int ring_buffer__poll(struct ring_buffer *rb, int timeout_ms);
    int ring_buffer__consume(struct ring_buffer *rb);
    void ring_buffer__free(struct ring_buffer *rb);
    """
)

BPF_ANY = 0
BPF_NOEXIST = 1
BPF_F_TEST_XDP_LIVE_FRAMES = 2
XDP_ABORTED, XDP_DROP, XDP_PASS, XDP_TX, XDP_REDIRECT = range(5)
XDP_ACTIONS = {XDP_ABORTED: "XDP_ABORTED", XDP_DROP: "XDP_DROP", XDP_PASS: "XDP_PASS", XDP_TX: "XDP_TX",
               XDP_REDIRECT: "XDP_REDIRECT"}


@functools.cache
def lib():
    try:
        return ffi.dlopen("libbpf.so.1")
    except OSError as e:
        raise RuntimeError("libbpf.so.1 not found: apt-get install libbpf1 (or ./run setup)") from e


def _check(name: str, rc: int) -> int:
    if rc < 0:
        raise OSError(-rc, f"{name}: {os.strerror(-rc)}")
    return rc


def obj_pin(fd: int, path: str) -> None:
    _check(f"bpf_obj_pin({path})", lib().bpf_obj_pin(fd, path.encode()))


def obj_get(path: str) -> int:
    return _check(f"bpf_obj_get({path})", lib().bpf_obj_get(path.encode()))


@functools.cache
def possible_cpus() -> int:
    return _check("libbpf_num_possible_cpus", lib().libbpf_num_possible_cpus())


def prog_id(fd: int) -> int:
    info = ffi.new("struct prog_info_head *")
    size = ffi.new("uint32_t *", ffi.sizeof(info[0]))
    _check("bpf_obj_get_info_by_fd", lib().bpf_obj_get_info_by_fd(fd, info, size))
    return info.id


@dataclass
class MapInfo:
    type: int
    id: int
    key_size: int
    value_size: int
    max_entries: int
    name: str


def map_info(fd: int) -> MapInfo:
    info = ffi.new("struct map_info_head *")
    size = ffi.new("uint32_t *", ffi.sizeof(info[0]))
    _check("bpf_obj_get_info_by_fd", lib().bpf_obj_get_info_by_fd(fd, info, size))
    return MapInfo(info.type, info.id, info.key_size, info.value_size, info.max_entries,
                   ffi.string(info.name).decode())


class Map:
    """A BPF map by fd, keys and values as cffi types from the ABI header ("struct srmig_vm_key")."""

    def __init__(self, fd: int, key_type: str, value_type: str, percpu: bool = False):
        self.fd = fd
        self.key_type = key_type
        self.value_type = value_type
        self.percpu = percpu
        vsize = ffi.sizeof(value_type)
        # Per-CPU values come back as one slot per possible CPU, each rounded up to 8 bytes.
        self._slot = (vsize + 7) // 8 * 8
        self._ncpu = possible_cpus() if percpu else 1

    def new_key(self, **fields):
        return ffi.new(self.key_type + " *", fields or None)

    def _value_buf(self):
        return ffi.new("char[]", self._slot * self._ncpu)

    def _values(self, buf) -> list:
        return [ffi.cast(self.value_type + " *", buf + i * self._slot)[0] for i in range(self._ncpu)]

    def lookup(self, key):
        """The value (a list of per-CPU values for per-CPU maps), or None when absent."""
        buf = self._value_buf()
        rc = lib().bpf_map_lookup_elem(self.fd, key, buf)
        if rc == -errno.ENOENT:
            return None
        _check("bpf_map_lookup_elem", rc)
        values = self._values(buf)
        return values if self.percpu else values[0]

    def update(self, key, value, flags: int = BPF_ANY) -> None:
        if self.percpu:
            buf = self._value_buf()
            for i in range(self._ncpu):
                ffi.memmove(buf + i * self._slot, value, ffi.sizeof(self.value_type))
            value = buf
        _check("bpf_map_update_elem", lib().bpf_map_update_elem(self.fd, key, value, flags))

    def delete(self, key) -> bool:
        """Delete; False when it was not there (ENOENT is success for an idempotent delete)."""
        rc = lib().bpf_map_delete_elem(self.fd, key)
        if rc == -errno.ENOENT:
            return False
        _check("bpf_map_delete_elem", rc)
        return True

    def keys(self) -> Iterator:
        key = ffi.NULL
        while True:
            nxt = ffi.new(self.key_type + " *")
            rc = lib().bpf_map_get_next_key(self.fd, key, nxt)
            if rc == -errno.ENOENT:
                return
            _check("bpf_map_get_next_key", rc)
            yield nxt
            key = nxt

    def items(self) -> Iterator[tuple]:
        for key in self.keys():
            value = self.lookup(key)
            if value is not None:  # deleted between get_next_key and lookup
                yield key, value

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


class PinnedMaps:
    """Maps opened from a directory of pins, closed together (`with`, or close())."""

    def __init__(self, pin_dir):
        self.pin_dir = pin_dir
        self._fds: list[int] = []

    def _map(self, name: str, key_type: str, value_type: str, percpu: bool = False) -> Map:
        fd = obj_get(str(self.pin_dir / name))
        self._fds.append(fd)
        return Map(fd, key_type, value_type, percpu=percpu)

    def close(self) -> None:
        for fd in self._fds:
            os.close(fd)
        self._fds.clear()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


@dataclass
class TestRun:
    retval: int
    data: bytes
    duration_ns: int

    @property
    def action(self) -> str:
        return XDP_ACTIONS.get(self.retval, str(self.retval))


def prog_test_run(prog_fd: int, packet: bytes, repeat: int = 1, ingress_ifindex: int = 0,
                  flags: int = 0) -> TestRun:
    """BPF_PROG_TEST_RUN on an XDP program. `repeat` reuses one buffer: a program that rewrites the packet
    sees its own output from the second iteration on, so time rewriting branches with repeat=1."""
    data_in = ffi.from_buffer(packet)
    out = ffi.new("char[]", len(packet) + 512)
    opts = ffi.new("struct bpf_test_run_opts *")
    opts.sz = ffi.sizeof("struct bpf_test_run_opts")
    opts.data_in = data_in
    opts.data_size_in = len(packet)
    opts.data_out = out
    opts.data_size_out = len(out)
    opts.repeat = repeat
    opts.flags = flags
    if ingress_ifindex:
        ctx = ffi.new("struct xdp_md *")
        ctx.data_end = len(packet)
        ctx.ingress_ifindex = ingress_ifindex
        opts.ctx_in = ctx
        opts.ctx_size_in = ffi.sizeof("struct xdp_md")
    _check("bpf_prog_test_run_opts", lib().bpf_prog_test_run_opts(prog_fd, opts))
    return TestRun(opts.retval, bytes(ffi.buffer(out, opts.data_size_out)), opts.duration)


class RingBuffer:
    """Consumer of a BPF ring buffer: `poll()` calls `on_record(bytes)` for each record, in ring order."""

    def __init__(self, map_fd: int, on_record: Callable[[bytes], None], owns_fd: bool = False):
        @ffi.callback("int(void *, void *, size_t)")
        def _cb(_ctx, data, size):
            try:
                on_record(bytes(ffi.buffer(data, size)))
            except Exception as e:  # an exception must not unwind through C
                self._error = e
                return -1
            return 0

        self._error: Exception | None = None
        self._cb = _cb  # keep the callback alive as long as the ring
        rb = lib().ring_buffer__new(map_fd, _cb, ffi.NULL, ffi.NULL)
        if rb == ffi.NULL:
            raise OSError(ffi.errno, f"ring_buffer__new: {os.strerror(ffi.errno)}")
        self._rb = rb
        self._fd = map_fd if owns_fd else -1

    def poll(self, timeout_ms: int = 0) -> int:
        """Consume what is ready (waiting up to timeout_ms for the first record); returns records read."""
        n = lib().ring_buffer__poll(self._rb, timeout_ms)
        if self._error:
            err, self._error = self._error, None
            raise err
        if n == -errno.EINTR:
            return 0
        return _check("ring_buffer__poll", n)

    def close(self) -> None:
        if self._rb is not None:
            lib().ring_buffer__free(self._rb)
            self._rb = None
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __enter__(self) -> RingBuffer:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


BPF_RINGBUF_BUSY_BIT = 1 << 31
BPF_RINGBUF_DISCARD_BIT = 1 << 30
BPF_RINGBUF_HDR_SZ = 8


class RingReader:
    """A BPF ring buffer read in bulk straight from its mmap: `read()` returns every ready record (or a
    slice of each) as a list, in ring order, without a Python callback per record. libbpf's callback
    consumer costs ~6-8 us a record from Python; libbpf 1.1 has no bulk API (ring__consume_n is 1.4+).

    The protocol of libbpf's ringbuf_process_ring(): the consumer position is the first page (ours to
    write), the producer position the second, then the data pages, mapped twice in a row so that a record
    that wraps is contiguous. Each record has an 8-byte header: length with BUSY (not yet submitted) and
    DISCARD bits, then the sample, rounded up to 8 bytes. The acquire/release ordering libbpf asks for
    holds by itself on x86-64 (loads are not reordered with loads, nor stores with earlier loads).

    The consumer page is the consumer's: the kernel maps it writable to userspace and keeps only the
    consumer position in it, so nothing it trusts. The rest of that page (`spare`) lives as long as the ring
    (a pinned map), not the process: a consumer that reads, sends, then commits keeps there what it has
    sent, for the consumer after it when it was killed in between (srmig.ctl.senders.SentLog), and that
    consumer skips it (`skip`)."""

    def __init__(self, map_fd: int, owns_fd: bool = False):
        size = map_info(map_fd).max_entries  # the data area: a power of two of pages
        page = mmap.PAGESIZE
        self._mask = size - 1
        self._page = page
        self._cons = mmap.mmap(map_fd, page, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE, offset=0)
        try:
            self._data = mmap.mmap(map_fd, page + 2 * size, mmap.MAP_SHARED, mmap.PROT_READ, offset=page)
        except BaseException:
            self._cons.close()
            raise
        self._fd = map_fd if owns_fd else -1
        self._ahead: int | None = None  # read position past the consumer's (read(commit=False))
        # The page's address, taken without keeping a buffer exported (mmap.close() refuses while one is).
        with ffi.from_buffer(self._cons) as cons:
            self._cons_addr = int(ffi.cast("uintptr_t", cons))
        with ffi.from_buffer(self._data) as prod:
            self._data_addr = int(ffi.cast("uintptr_t", prod))

    def read(self, limit: int = 1 << 30, start: int = 0, length: Callable[[bytes, int], int] | None = None,
             commit: bool = True, until: int | None = None, ends: list[int] | None = None) -> list[bytes]:
        """Consume up to `limit` ready records, oldest first, each as bytes: the whole sample, or from
        `start` on, `length(data, offset_of_sample)` bytes long (to cut a payload out of a record without
        copying the rest). Stops at the first record still being written, and at ring position `until`.
        `commit=False`: the records stay in the ring (the producer still sees them) until `commit()`; the
        next read goes on after them. `ends`: gets the ring position just past each record returned."""
        data, page, mask = self._data, self._page, self._mask
        unpack = struct.unpack_from
        cons = unpack("<Q", self._cons, 0)[0] if self._ahead is None else self._ahead
        prod = unpack("<Q", data, 0)[0] if until is None else min(until, unpack("<Q", data, 0)[0])
        out: list[bytes] = []
        append = out.append
        flags = BPF_RINGBUF_BUSY_BIT | BPF_RINGBUF_DISCARD_BIT
        end_at = ends.append if ends is not None else None
        while cons < prod and len(out) < limit:
            off = page + (cons & mask)
            hdr = unpack("<I", data, off)[0]
            if hdr & BPF_RINGBUF_BUSY_BIT:
                break
            n = hdr & ~flags
            cons += (n + BPF_RINGBUF_HDR_SZ + 7) & ~7
            if hdr & BPF_RINGBUF_DISCARD_BIT:
                continue
            s = off + BPF_RINGBUF_HDR_SZ
            if length is None:  # the whole sample from `start`: the common case, kept to a few operations
                append(data[s + start:s + n])
            else:
                append(data[s + start:s + start + min(length(data, s), n - start)])
            if end_at is not None:
                end_at(cons)
            if commit and not len(out) & 255:  # give the producer its space back as we go
                self._cons[0:8] = cons.to_bytes(8, "little")
        if commit:
            self._cons[0:8] = cons.to_bytes(8, "little")
            self._ahead = None
        else:
            self._ahead = cons
        return out

    def commit(self, until: int | None = None) -> None:
        """Consume what `read(commit=False)` returned; `until`: only the records before that ring position
        (one of read()'s `ends`), the rest stay in the ring and the next read still goes on after them."""
        if self._ahead is None:
            return
        if until is None or until >= self._ahead:
            self._cons[0:8] = self._ahead.to_bytes(8, "little")
            self._ahead = None
        elif until > struct.unpack_from("<Q", self._cons, 0)[0]:
            self._cons[0:8] = until.to_bytes(8, "little")

    @property
    def size(self) -> int:
        """The data area's bytes."""
        return self._mask + 1

    @property
    def position(self) -> int:
        """The ring position the next read starts at."""
        return struct.unpack_from("<Q", self._cons, 0)[0] if self._ahead is None else self._ahead

    @property
    def spare(self) -> tuple[int, int]:
        """(address, size) of the consumer page after its 8 bytes of consumer position: the kernel ignores
        them, they live as long as the ring. Valid until close()."""
        return self._cons_addr + 8, self._page - 8

    @property
    def layout(self) -> tuple[int, int, int]:
        """(address, page, mask) for a reader in C (srmig.ctl.pump): the producer page's address, the data
        pages one `page` after it (mapped twice in a row), a ring position's offset in them `& mask`. Valid
        until close()."""
        return self._data_addr, self._page, self._mask

    @property
    def produced(self) -> int:
        """The producer position: the ring position past the last record reserved so far."""
        return struct.unpack_from("<Q", self._data, 0)[0]

    def advance(self, position: int) -> None:
        """Consume everything before ring `position` (a record's end, read by a reader in C): the producer
        gets that space back, and the next read starts there."""
        if self._ahead is not None:
            raise RuntimeError("advance() with records read and not committed")
        if position > struct.unpack_from("<Q", self._cons, 0)[0]:
            self._cons[0:8] = position.to_bytes(8, "little")

    def skip(self, until: int, then: int = 0) -> int:
        """Consume, without reading them, the records before ring position `until` and `then` records after
        it; returns how many. An `until` behind the consumer position is an old one: nothing to skip."""
        if self._ahead is not None:
            raise RuntimeError("skip() with records read and not committed")
        if until < struct.unpack_from("<Q", self._cons, 0)[0]:
            return 0
        n = len(self.read(until=until, length=lambda data, off: 0))
        return n + len(self.read(limit=then, length=lambda data, off: 0))

    def empty(self) -> bool:
        """Nothing in the ring: no record reserved, being written, or not consumed (bpf_ringbuf_query's
        BPF_RB_AVAIL_DATA is 0)."""
        return struct.unpack_from("<Q", self._data, 0)[0] == struct.unpack_from("<Q", self._cons, 0)[0]

    def close(self) -> None:
        for m in (getattr(self, "_data", None), getattr(self, "_cons", None)):
            if m is not None:
                m.close()
        self._data = self._cons = None
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __enter__(self) -> RingReader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


BPF_TEST_RUN_LIVE_BATCH_MAX = 256  # the kernel's cap on batch_size (net/bpf/test_run.c)


@dataclass
class LiveRun:
    frames: int        # program runs, one frame each
    duration_ns: int   # the kernel's mean time per frame: program, transmit, page recycling


def prog_test_run_live(prog_fd: int, packet: bytes, repeat: int, ingress_ifindex: int,
                       batch_size: int = 0) -> LiveRun:
    """BPF_PROG_RUN of an XDP program with BPF_F_TEST_XDP_LIVE_FRAMES (kernel >= 5.18): the program runs
    `repeat` times, each time on its own copy of `packet` as if received on `ingress_ifindex` (an interface
    of the calling thread's network namespace), and the kernel carries out each verdict: XDP_TX goes out
    of that interface (as a redirect to it: the driver needs ndo_xdp_xmit; a veth's peer needs NAPI, i.e.
    GRO on or an XDP program), XDP_REDIRECT goes where the program sent it, XDP_PASS enters the stack.

    Semantics that differ from prog_test_run (Documentation/bpf/bpf_prog_run.rst): nothing comes back (the
    kernel rejects data_out and ctx_out); a frame that cannot be sent (a full receive ring) is dropped
    silently, so count at the receiver; frames are sent at the end of each batch of `batch_size` (0: the
    kernel's 64, at most 256); pages are recycled WITHOUT rewriting their content, so a frame modified by
    the program or by whoever received it may come back modified. Runs on the calling thread's CPU."""
    if repeat < 1:
        raise ValueError("repeat must be >= 1")
    if not 0 <= batch_size <= BPF_TEST_RUN_LIVE_BATCH_MAX:
        raise ValueError(f"batch_size must be in [0, {BPF_TEST_RUN_LIVE_BATCH_MAX}]")
    data_in = ffi.from_buffer(packet)
    ctx = ffi.new("struct xdp_md *")
    ctx.data_end = len(packet)
    ctx.ingress_ifindex = ingress_ifindex
    opts = ffi.new("struct bpf_test_run_opts *")
    opts.sz = ffi.sizeof("struct bpf_test_run_opts")
    opts.data_in = data_in
    opts.data_size_in = len(packet)
    opts.ctx_in = ctx
    opts.ctx_size_in = ffi.sizeof("struct xdp_md")
    opts.repeat = repeat
    opts.flags = BPF_F_TEST_XDP_LIVE_FRAMES
    opts.batch_size = batch_size
    _check("bpf_prog_test_run_opts(live frames)", lib().bpf_prog_test_run_opts(prog_fd, opts))
    return LiveRun(repeat, opts.duration)
