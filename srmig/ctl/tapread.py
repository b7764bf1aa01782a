"""A paused QEMU's tap queue read in bulk: one call into C reads frame after frame until the queue is empty.

A tap hands out one frame per read(2), and no call of the kernel's returns several (vhost-net's batched
ptr_ring reads are the kernel's own). What can go is Python's share per frame: os.read() allocates a
64 KiB bytes object and shrinks it, and the loop around it costs as much again. read_frames() below loops
in C, reading each frame into one large buffer behind the one before; Python then only cuts the frames
out. Measured on the drain benchmark's tap (docs/benchmarks.md, "Reading the paused QEMU's tap"): 1.1-1.7
us a frame, against 1.9-4.2 us for the os.read() loop (best of 5, three runs); the read(2) calls alone
took 0.9 us.

The C is built with cffi (the project's one FFI) in API mode, once per host, into a private cache
(`~/.cache/srmig`, or $SRMIG_CACHE_DIR), when a tap is first kept (TapKeeper: at provisioning, long before a
pause); never in the drain itself. Without a C compiler, `reader()` is None and srmig.ctl.tap reads with
the os.read() loop, as before: same frames, same order.
"""

from __future__ import annotations

import errno
import hashlib
import importlib.util
import logging
import os
import sys
import tempfile
import threading
from pathlib import Path

log = logging.getLogger(__name__)

CDEF = """
    long srmig_read_frames(int fd, unsigned char *buf, long cap, long frame_max, unsigned int *lens,
                           long max_frames, int *err);
"""
# Reads whole frames from `fd` (non-blocking) into buf, one after the other, while another frame of
# frame_max bytes fits; each frame's length in lens. Stops at max_frames, at an empty queue (*err =
# EAGAIN) or another error (*err = errno; EINTR is retried), or at end of file (*err = 0). Returns the
# number of frames read: the queue's order is the buffer's.
SOURCE = r"""
#include <errno.h>
#include <unistd.h>

long srmig_read_frames(int fd, unsigned char *buf, long cap, long frame_max, unsigned int *lens,
                       long max_frames, int *err)
{
    long n = 0, off = 0;

    *err = 0;
    while (n < max_frames && cap - off >= frame_max) {
        ssize_t r = read(fd, buf + off, (size_t)frame_max);

        if (r < 0) {
            if (errno == EINTR)
                continue;
            *err = errno;
            break;
        }
        if (r == 0)
            break;
        lens[n++] = (unsigned int)r;
        off += r;
    }
    return n;
}
"""

FRAME_MAX = 65536               # one read(2): a tap frame with a vnet header (a GSO frame up to 64 KiB)
BLOCK = 4 << 20                 # bytes read per call: many small frames, or at least 64 of the largest
BLOCK_FRAMES = 1 << 15          # frames per call at most

_lock = threading.Lock()
_module = None
_tried = False


def _cache_dir() -> Path:
    return Path(os.environ.get("SRMIG_CACHE_DIR") or Path.home() / ".cache" / "srmig")


def _name(prefix: str, cdef: str, source: str) -> str:
    tag = hashlib.sha256((cdef + source + sys.version).encode()).hexdigest()[:12]
    return f"{prefix}_{tag}"


def _load(name: str, path: Path):
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _build(cache: Path, name: str, cdef: str, source: str) -> Path:
    """Compile into a private temporary directory, then move the library into `cache` (atomic: two agents
    building at once each put a whole one there)."""
    from cffi import FFI  # noqa: PLC0415

    cache.mkdir(mode=0o700, parents=True, exist_ok=True)
    ffi = FFI()
    ffi.cdef(cdef)
    ffi.set_source(name, source)
    with tempfile.TemporaryDirectory(dir=cache) as tmp:
        built = Path(ffi.compile(tmpdir=tmp, verbose=False))
        final = cache / built.name
        os.replace(built, final)
    return final


def build_module(prefix: str, cdef: str, source: str):
    """A cffi API-mode module of `source` (declared by `cdef`), loaded from the cache, or built into it first
    (named by a hash of both and of Python's version). Raises what the build raises (no C compiler)."""
    cache, name = _cache_dir(), _name(prefix, cdef, source)
    found = sorted(cache.glob(name + ".*.so")) if cache.is_dir() else []
    if found and found[0].stat().st_uid == os.getuid():
        return _load(name, found[0])
    return _load(name, _build(cache, name, cdef, source))


def reader():
    """The compiled module (its `ffi` and `lib.srmig_read_frames`), built on the first call; None when it
    cannot be built here (no C compiler): callers read frame by frame instead."""
    global _module, _tried
    with _lock:
        if _tried:
            return _module
        _tried = True
        try:
            _module = build_module("_srmig_tapread", CDEF, SOURCE)
        except Exception as e:  # a missing compiler shows as several exception types (cffi, setuptools)
            log.warning("tap queue: bulk reader not built (%s); reading frame by frame", e)
            _module = None
        return _module


def built():
    """The module if reader() has built or loaded it already, else None: never builds (the drain's path)."""
    return _module


def read_frames(mod, fd: int, skip: int, limit: int) -> list[bytes]:
    """Every frame queued on `fd`, oldest first, up to `limit`, each without its first `skip` bytes (the
    virtio-net header)."""
    ffi, lib = mod.ffi, mod.lib
    alloc = ffi.new_allocator(should_clear_after_alloc=False)  # 4 MiB not zeroed: read() fills it
    buf = alloc("unsigned char[]", BLOCK)
    lens = alloc("unsigned int[]", BLOCK_FRAMES)
    err = ffi.new("int *")
    raw = ffi.buffer(buf, BLOCK)
    frames: list[bytes] = []
    while len(frames) < limit:
        n = lib.srmig_read_frames(fd, buf, BLOCK, FRAME_MAX, lens, min(BLOCK_FRAMES, limit - len(frames)), err)
        off = 0
        for length in ffi.unpack(lens, n):
            frames.append(raw[off + skip:off + length])
            off += length
        if err[0] not in (0, errno.EAGAIN):
            raise OSError(err[0], os.strerror(err[0]))
        if err[0] == errno.EAGAIN or n == 0:
            break
    return frames
