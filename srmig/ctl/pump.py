"""The drain's pump: the hold ring's records to the fabric with no Python step and no syscall per packet.

Per batch of up to `slots` records:
1. A loop in C (cffi, built and cached like srmig.ctl.tapread's) walks the ring's mmap'd pages from the
   consumer position, as libbpf's consumer does (8-byte header: BUSY stops, DISCARD is stepped over), and
   copies each record's packet, behind the next hop's Ethernet header, into a slot of pump_slots (an mmap'd
   BPF_F_MMAPABLE array, srmig/ebpf/pump.c). It stops at a record for another destination, one that does
   not fit a slot (SRMIG_PUMP_FRAME_MAX), a record still being written, or the end; those go the old way
   (FabricSender), in their place in the ring's order.
2. One BPF_PROG_RUN sends slots 0..n-1 in order, one program run each: a plain skb run of the tc program,
   whose bpf_clone_redirect sends each slot through the link's qdisc and says whether the link took it
   (every kernel), or with live frames (XDP_TX out of the fabric link, no skb on this host; some kernels
   refuse it) when the tc run is refused or asked for. Chosen at the first batch, with a one-line reason
   (`Pump.why`). tc comes first by measurement: a live-frames call costs a fixed RCU grace period (_choose).
3. The records sent are consumed; the program counted them in pump_mark, pinned next to the ring.

The sent mark: before a batch, the ring's sent log (srmig.ctl.senders.SentLog) is begun at the batch's ring
position with nothing sent, then pump_mark is written with that position and sent = 0. The program counts
each slot as it sends it, inside the call, which a kill does not cut short mid-batch. So an agent killed
anywhere leaves the sent log's start and a mark that says, for that start, exactly how many records went:
`sent_in_mark()` reads it for skip_sent (srmig.ctl.drain), which consumes them without sending them again.

The program is compiled with bcc (seconds): make the Pump before the drain needs it (Pump.prepare).
"""

from __future__ import annotations

import errno
import logging
import mmap
import os
import threading
from pathlib import Path

from srmig.bpf import abi, libbpf, loader
from srmig.ctl import tapread

log = logging.getLogger(__name__)

SOURCE_FILE = abi.EBPF_DIR / "pump.c"
MARK_PIN = "pump_mark"      # pump_mark's pin, in the dataplane's pin directory (next to hold_ring)
SLOTS = 4096                # records per batch: one BPF_PROG_RUN
FRAME_MAX = abi.PUMP_FRAME_MAX  # bytes of Ethernet frame a slot holds
SLOT_BYTES = (abi.ffi.sizeof("struct srmig_pump_slot") + 7) // 8 * 8  # an array's values lie 8 bytes apart
LIVE_BATCH = 64             # live frames sent per flush (the kernel's default; a veth peer's ring holds 256)
ETH_HLEN = 14

# What stopped a walk (the C's `why`).
EMPTY, BUSY, FULL, OTHER_DA, OLD_WAY = range(5)

CDEF = """
    long srmig_pump_fill(const unsigned char *ring, unsigned long page, unsigned long mask, uint64_t cons,
                         unsigned long head, const unsigned char *eth, const unsigned char *da,
                         unsigned char *slots, unsigned long slot_bytes, unsigned long frame_max,
                         long max_slots, uint64_t *ends, uint64_t *walked, unsigned char *next_da, int *why);
"""
# `ring`: the producer page, the data pages `page` bytes after it (mapped twice: a record that wraps is
# contiguous). From ring position `cons`, copies each record's packet (the record from byte `head` on, an
# IPv6 packet) whose destination is `da`, behind the 14 bytes of `eth`, into slot n (u32 length, u32 pad,
# the frame), while n < max_slots; ends[n] is the ring position just past it. *walked: where it stopped
# (past discarded records too). *why: EMPTY (reached the producer), BUSY (a record still being written),
# FULL, OTHER_DA (the next record's destination is not `da`: in next_da), OLD_WAY (the next record does not
# fit a slot, or is too short to be an IPv6 packet). Returns n.
SOURCE = r"""
#include <stdint.h>
#include <string.h>

#define RB_BUSY (1u << 31)
#define RB_DISCARD (1u << 30)
#define RB_HDR 8
enum { EMPTY, BUSY, FULL, OTHER_DA, OLD_WAY };

long srmig_pump_fill(const unsigned char *ring, unsigned long page, unsigned long mask, uint64_t cons,
                     unsigned long head, const unsigned char *eth, const unsigned char *da,
                     unsigned char *slots, unsigned long slot_bytes, unsigned long frame_max,
                     long max_slots, uint64_t *ends, uint64_t *walked, unsigned char *next_da, int *why)
{
    const unsigned char *data = ring + page;
    /* acquire: the records before the producer position are published (libbpf's ringbuf_process_ring) */
    uint64_t prod = __atomic_load_n((const uint64_t *)ring, __ATOMIC_ACQUIRE);
    long n = 0;

    *why = EMPTY;
    while (cons < prod) {
        const unsigned char *rec = data + (cons & mask);
        uint32_t hdr = __atomic_load_n((const uint32_t *)rec, __ATOMIC_ACQUIRE);
        uint32_t len = hdr & ~(RB_BUSY | RB_DISCARD);
        uint64_t next = cons + ((len + RB_HDR + 7) & ~7ull);
        const unsigned char *pkt = rec + RB_HDR + head;
        unsigned long plen;

        if (hdr & RB_BUSY) {
            *why = BUSY;
            break;
        }
        if (hdr & RB_DISCARD) {
            cons = next;
            continue;
        }
        if (len < head + 40) {
            *why = OLD_WAY;
            break;
        }
        plen = len - head;
        if (memcmp(pkt + 24, da, 16)) {  /* the IPv6 destination */
            memcpy(next_da, pkt + 24, 16);
            *why = OTHER_DA;
            break;
        }
        if (plen + 14 > frame_max) {
            *why = OLD_WAY;
            break;
        }
        if (n >= max_slots) {
            *why = FULL;
            break;
        }
        {
            unsigned char *slot = slots + (unsigned long)n * slot_bytes;
            uint32_t flen = (uint32_t)(plen + 14);

            memcpy(slot, &flen, 4);
            memcpy(slot + 8, eth, 14);
            memcpy(slot + 8 + 14, pkt, plen);
        }
        cons = next;
        ends[n++] = cons;
    }
    *walked = cons;
    return n;
}
"""

_lock = threading.Lock()
_walker = None
_walker_error: str | None = None


def walker():
    """The compiled walk (its `ffi`, `lib.srmig_pump_fill`), built once per host into the cache; raises
    RuntimeError when it cannot be built here (no C compiler)."""
    global _walker, _walker_error
    with _lock:
        if _walker is None and _walker_error is None:
            try:
                _walker = tapread.build_module("_srmig_pump", CDEF, SOURCE)
            except Exception as e:  # a missing compiler shows as several exception types (cffi, setuptools)
                _walker_error = str(e).splitlines()[0] if str(e) else type(e).__name__
        if _walker is None:
            raise RuntimeError(f"the pump's ring walk is not built: {_walker_error}")
        return _walker


def mark_pin(pin_dir) -> Path:
    return Path(pin_dir) / MARK_PIN


def sent_in_mark(pin_dir, start: int) -> int:
    """How many records of the batch that began at ring position `start` the pump sent, by the pinned mark
    (0 when there is no mark, or it counts another batch)."""
    try:
        fd = libbpf.obj_get(str(mark_pin(pin_dir)))
    except OSError:
        return 0
    m = libbpf.Map(fd, "uint32_t", "struct srmig_pump_mark")
    try:
        v = m.lookup(libbpf.ffi.new("uint32_t *", 0))
        return int(v.sent) if v is not None and v.batch == start else 0
    finally:
        m.close()


WHY = {"tc": "tc: bpf_clone_redirect from a tc BPF_PROG_RUN, through the link's qdisc",
       "live": "live: BPF_PROG_RUN with live frames, XDP_TX out of the fabric link"}


class PumpError(RuntimeError):
    """The pump cannot run here (its program does not load, or no C compiler): the drain sends the old way."""


class Pump:
    """One batch at a time: fill() copies records from the ring into the slots, send() sends them. `mode`:
    "live" or "tc" to force one (tests, the benchmark), None: tc, else live frames (`why` says which and
    why, once the first batch has run: _choose)."""

    def __init__(self, pin_dir, mode: str | None = None, slots: int = SLOTS):
        if mode not in (None, "live", "tc"):
            raise ValueError(f"pump mode {mode!r}: live, tc or None")
        self.walk = walker()
        self.slots = slots
        self.pin_dir = Path(pin_dir)
        defines = (f'SRMIG_PUMP_MARK_PIN="{mark_pin(pin_dir)}"', f"SRMIG_PUMP_SLOTS={slots}")
        try:
            self.bpf, self.tc_fd = loader.compile_program(SOURCE_FILE, "pump_tc", prog_type="SCHED_CLS",
                                                          defines=defines)
        except loader.LoaderError as e:
            raise PumpError(str(e)) from e
        try:
            import bcc  # noqa: PLC0415 (loaded by compile_program already)

            self.xdp_fd = self.bpf.load_func(b"pump_xdp", bcc.BPF.XDP).fd
            self._slots = mmap.mmap(self.bpf[b"pump_slots"].map_fd, slots * SLOT_BYTES, mmap.MAP_SHARED,
                                    mmap.PROT_READ | mmap.PROT_WRITE)
        except Exception:
            self.bpf.cleanup()
            raise
        self.mark = libbpf.Map(self.bpf[b"pump_mark"].map_fd, "uint32_t", "struct srmig_pump_mark")
        self._key = libbpf.ffi.new("uint32_t *", 0)
        self._value = libbpf.ffi.new("struct srmig_pump_mark *")
        ffi = self.walk.ffi
        with ffi.from_buffer(self._slots) as buf:
            self._slots_addr = int(ffi.cast("uintptr_t", buf))
        self._slots_ptr = ffi.cast("unsigned char *", self._slots_addr)
        self._ends = ffi.new("uint64_t[]", slots)
        self._walked = ffi.new("uint64_t *")
        self._next_da = ffi.new("unsigned char[16]")
        self._why = ffi.new("int *")
        self.forced = mode
        self.mode: str | None = mode
        self.why = f"{mode}: asked for" if mode else "not chosen yet"
        self._opts = libbpf.ffi.new("struct bpf_test_run_opts *")
        self._trigger = libbpf.ffi.new("char[]", bytes(64))  # the tc run's skb: rewritten to each slot

    @classmethod
    def prepare(cls, pin_dir, mode: str | None = None) -> Pump | None:
        """A Pump, or None with the reason logged (the drain then sends the old way)."""
        try:
            return cls(pin_dir, mode)
        except (PumpError, RuntimeError, OSError) as e:
            log.warning("drain pump unavailable (%s): the hold ring is sent from Python", e)
            return None

    # one batch ----------------------------------------------------------------------------------------

    def fill(self, ring: libbpf.RingReader, start: int, head: int, da: bytes, eth: bytes) -> tuple[int, int, int]:
        """Copy into the slots the records from ring position `start` on for destination `da`, each behind
        `eth`; returns (n, walked, why): the records copied, where the walk stopped, why (module constants;
        OTHER_DA: `next_da` says the next record's destination)."""
        addr, page, mask = ring.layout
        ffi = self.walk.ffi
        n = self.walk.lib.srmig_pump_fill(ffi.cast("const unsigned char *", addr), page, mask, start, head, eth,
                                          da, self._slots_ptr, SLOT_BYTES, FRAME_MAX, self.slots, self._ends,
                                          self._walked, self._next_da, self._why)
        return n, self._walked[0], self._why[0]

    @property
    def next_da(self) -> bytes:
        return bytes(self.walk.ffi.buffer(self._next_da, 16))

    def end(self, i: int) -> int:
        """The ring position just past slot i's record (the last fill())."""
        return self._ends[i]

    def frame(self, i: int) -> bytes:
        """Slot i's frame (the last fill()): tests, and the rest of a batch stopped short."""
        off = i * SLOT_BYTES
        n = int.from_bytes(self._slots[off:off + 4], "little")
        return self._slots[off + 8:off + 8 + n]

    def send(self, batch: int, n: int, ifindex: int) -> tuple[int, int]:
        """Send slots 0..n-1 out of link `ifindex`, in order, one BPF_PROG_RUN; `batch`: the ring position of
        slot 0's record, which the mark counts for. The caller has begun the ring's sent log at `batch`
        first. Returns (sent, err): the slots sent, from slot 0 (the mark's count), and what stopped the rest
        (0: nothing)."""
        v = self._value
        v.batch, v.sent, v.end, v.ifindex, v.err = batch, 0, n, ifindex, 0
        self.mark.update(self._key, v)
        if self.mode is None:
            self._choose(n, ifindex)
        else:
            self._run(n, ifindex)
        got = self.mark.lookup(self._key)
        return int(got.sent), int(got.err)

    def _run(self, n: int, ifindex: int) -> None:
        """n runs of the chosen program: one BPF_PROG_RUN."""
        if self.mode == "live":
            libbpf.prog_test_run_live(self.xdp_fd, bytes(ETH_HLEN + 40), n, ifindex, LIVE_BATCH)
        else:
            self._run_tc(n)

    def _run_tc(self, n: int) -> None:
        opts = self._opts
        opts.sz = libbpf.ffi.sizeof("struct bpf_test_run_opts")
        opts.data_in = self._trigger
        opts.data_size_in = 64
        # 0: no output wanted (the kernel writes the last run's length back here, and a later call whose frame
        # is longer than that would fail with ENOSPC after running)
        opts.data_size_out = 0
        opts.repeat = n
        rc = libbpf.lib().bpf_prog_test_run_opts(self.tc_fd, opts)
        if rc < 0 and rc != -errno.EINTR:
            raise OSError(-rc, f"bpf_prog_test_run_opts(pump_tc): {os.strerror(-rc)}")

    def _choose(self, n: int, ifindex: int) -> None:
        """The first batch: the tc program, else live frames, else PumpError (the drain sends the old way).
        tc first even where live frames run: a live-frames BPF_PROG_RUN costs a fixed ~20 ms here (its
        page pool's teardown waits for an RCU grace period; longer under load), more than a drain's batch of
        4096 takes through tc (~2 us a frame), and a frame the link's driver refuses it drops uncounted."""
        refused = []
        for mode in ("tc", "live"):
            self.mode = mode
            try:
                self._run(n, ifindex)
            except OSError as e:
                if self.mark.lookup(self._key).sent:  # ran part of the batch, then failed: not a refusal
                    raise
                refused.append(f"{mode} refused ({errno.errorcode.get(e.errno, e.errno)})")
                continue
            self.why = "; ".join(refused + [WHY[mode]])
            log.info("drain pump: %s", self.why)
            return
        self.mode = None
        raise PumpError("; ".join(refused))

    def live_refused(self, ifindex: int) -> str | None:
        """Why this kernel refuses live frames here (one run, nothing to send: the frame is dropped), or None."""
        v = self._value
        v.batch, v.sent, v.end, v.ifindex, v.err = 0, 0, 0, ifindex, 0
        self.mark.update(self._key, v)
        try:
            libbpf.prog_test_run_live(self.xdp_fd, bytes(ETH_HLEN + 40), 1, ifindex)
        except OSError as e:
            return f"live frames refused ({errno.errorcode.get(e.errno, e.errno)})"
        return None

    def close(self) -> None:
        if self.bpf is None:
            return
        self._slots.close()
        self.bpf.cleanup()
        self.bpf = None
