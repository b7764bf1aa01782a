"""The frame QEMU swallows at the pause (docs/drain.md, "The frame QEMU swallows"), counted and found again.

After the pause QEMU 7.2's tap_send() still reads one frame, parks it in its own net queue (not migrated)
and stops polling. We find it by arithmetic: frames QEMU read from the tap (the tap's tx_packets) minus
frames it put in the guest's RX ring (the virtio used index, over QMP), against the same difference at a
baseline taken before the pause. The content comes from the shadow ring, where the XDP program copies every
frame it delivers to a VM flagged `shadow` during the migration window: the inner packet as delivered, IPv6
or IPv4 (a dual-stack VM's two families in one log, in delivery order), matched byte for byte against the
tap's frames whatever their family.
"""

from __future__ import annotations

import struct
import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import Callable

from srmig.bpf import abi
from srmig.ctl.maps import HoldRecord, _vm_str
from srmig.ctl.senders import PacketSender
from srmig.ctl.tap import tap_mcast_sent, tap_tx_packets

_SHADOW_HEAD = struct.Struct("<Q16sII")  # struct srmig_hold_record: timestamp_ns, vm, len, orig_len
MAX_SWALLOWED = 4                # more than this means the count is off: re-send nothing
SWALLOW_WINDOW_NS = 50_000_000   # a swallowed frame reached the tap at most this long before QEMU stopped
                                 # reading it (ShadowLog.swallowed_frames: bounded by QEMU's STOP, and by
                                 # the first frame QEMU left in the queue)


class SwallowCheck:
    """Counts the frames QEMU read but did not give the guest, relative to a baseline.

    `rx_used()` returns the virtio-net RX queue's used index (16 bits, wraps), e.g. from QMP
    x-query-virtio-queue-status. Call `baseline()` while the VM runs, `swallowed()` once it is paused.
    """

    def __init__(self, tap: str, rx_used: Callable[[], int]):
        self.tap = tap
        self.rx_used = rx_used
        self.base: int | None = None
        self.tx: int | None = None    # the tap's tx_packets of the last consistent pair
        self.used: int | None = None  # and the RX used index (at the pause: the one the destination resumes with)
        self.mcast: int | None = None  # the host's IPv6 multicast on the tap, read just before the baseline

    def difference(self, tries: int = 200) -> int | None:
        """(tx_packets - RX used index) & 0xFFFF, taken as a consistent pair; None if none was."""
        return self._diff(tries)

    def _diff(self, tries: int = 200) -> int | None:
        for _ in range(tries):
            before = tap_tx_packets(self.tap)
            used = self.rx_used()
            if tap_tx_packets(self.tap) == before:  # nothing was read meanwhile: a consistent pair
                self.tx, self.used = before, used & 0xFFFF
                return (before - used) & 0xFFFF
            time.sleep(0.0005)
        return None

    def baseline(self, tries: int = 200) -> bool:
        """Needs a moment when no frame reaches the tap for the length of one QMP query (a quiet VM, or
        traffic steered elsewhere); the difference then holds until the pause."""
        # (before the pair: a report sent in between is then counted as not yet read, which can only make a
        # later RecordedCheck low)
        self.mcast = tap_mcast_sent(self.tap)
        self.base = self._diff(tries)
        return self.base is not None

    def swallowed(self) -> int | None:
        """Frames read but not delivered since the baseline (0 or 1 expected), None when unknown."""
        if self.base is None:
            return None
        now = self._diff()
        return None if now is None else (now - self.base) & 0xFFFF


@dataclass(frozen=True)
class Arrival:
    """What the count needs of a VM that arrived here by migration: the IPv6 multicast frames this host had
    sent on the tap (tap.tap_mcast_sent) and the tap's tx_packets when the incoming QEMU started (it reads
    nothing until it resumes; what the stack had queued by then is taken out: Executor.incoming_counts), and
    the RX used index it resumed with (the source's at its pause: the device's state migrates; in either
    end's record). `migration`: whose."""

    migration: str
    tx: int
    mcast: int
    used: int


def incoming_counts(tap: str, keeper) -> tuple[int, int, int]:
    """An incoming QEMU has started on `tap` (`keeper`: tap.TapKeeper of its fds) and reads nothing until it
    resumes: (the IPv6 multicast this host had sent on the tap, the tap's tx_packets, frames taken out), for
    Arrival. In between, what this host's stack already put in the queue is taken out: its MLD reports at
    the tap's carrier coming up, sent before anyone could count them (measured: 1-2 between libvirt's begin
    hook and STARTED), which QEMU would read and filter after the multicast count: the count one or two
    high. In that order, a report sent meanwhile is counted and taken out: the count one low, never high.
    Any other frame (none expected: nothing is delivered to a destination before stop-and-copy) goes back
    into the queue (our reads count in tx_packets: it is read after them)."""
    mcast = tap_mcast_sent(tap)
    frames = keeper.frames()
    others = [f for f in frames if f[:2] != b"\x33\x33"]  # IPv6 multicast MACs (RFC 2464 7)
    if others:
        sender = PacketSender(tap)
        try:
            sender.send_many(others)
        finally:
            sender.close()
    return mcast, tap_tx_packets(tap), len(frames) - len(others)


class ArrivedCheck:
    """The count for a VM that arrived here by migration: no baseline, so no quiet moment needed.

    Since the incoming QEMU started, it read R frames from the tap (tx_packets), put G in the guest's RX
    ring (the used index since the resume; it read nothing before) and kept the swallowed ones; the rest it
    filtered: frames for no address of the guest's, which only this host's own stack puts in the tap (its
    MLD reports: the program's frames are unicast to the guest). So swallowed = R - G - F, where F is at most
    the host's IPv6 multicast frames on the tap since then (M, its per-device counter) less those still in
    the queue. F = that bound: a multicast frame the guest did take (all-nodes) then makes the count low, a
    frame lost, never one sent twice. Nothing here moves once QEMU is paused: no moment of the VM's traffic
    needs catching. The pair (tx_packets, RX used index) is still taken with nothing read in between, which
    after the pause the first try gives.

    Call swallowed() after the hold and before reading the queue, then less_queued() with what it held."""

    def __init__(self, tap: str, rx_used: Callable[[], int], arrival: Arrival):
        self.tap, self.arrival = tap, arrival
        self._pair = SwallowCheck(tap, rx_used)
        self.tx: int | None = None
        self.used: int | None = None
        self.parts: dict = {}  # the count's terms, for the drain's log line

    def swallowed(self, tries: int = 20) -> int | None:
        """R - G - M, None when no consistent pair came (less_queued() gives back the multicast still queued)."""
        a = self.arrival
        if self._pair.difference(tries) is None:
            return None
        self.tx, self.used = self._pair.tx, self._pair.used
        r, g, m = self.tx - a.tx, (self.used - a.used) & 0xFFFF, tap_mcast_sent(self.tap) - a.mcast
        self.parts = {"R": r, "G": g, "M": m}
        if m < 0:
            return None  # (a counter reset: the tap was made again)
        return (r - g - m) & 0xFFFF  # (16 bits: G wraps with the ring's index)

    def less_queued(self, count: int, frames: list[bytes]) -> int:
        """The count once the queue was read (`frames`, the VM's and others); more than MAX_SWALLOWED: off
        (the drain re-sends nothing then)."""
        self.parts["Mq"] = queued = _queued_mcast(frames)
        return (count + queued) & 0xFFFF


def _queued_mcast(frames: list[bytes]) -> int:
    """The host's multicast still in the tap's queue: counted in M, never read by QEMU."""
    return sum(1 for f in frames if f[:2] == b"\x33\x33")  # IPv6 multicast MACs (RFC 2464 7)


class RecordedCheck:
    """The count for an agent restarted after the pause: the baseline the agent before it wrote in the
    migration's record (`base`, tx_packets less the RX used index while nothing was parked: a quiet
    SwallowCheck's, or an Arrival's), and the RX used index the destination's QEMU resumed with (`used`: the
    source's at the pause, migrated with the device; the destination's record). The source QEMU may be gone,
    the tap is not while we hold its fds: its tx_packets still counts what QEMU read. `mcast`: the host's
    IPv6 multicast on the tap the base goes with (None: a record without it): what QEMU read of the
    multicast sent since it filtered, as in ArrivedCheck."""

    def __init__(self, tap: str, base: int, used: int, mcast: int | None = None):
        self.tap, self.base, self.used, self.mcast = tap, base, used, mcast
        self.tx: int | None = None  # the tap's tx_packets at the count
        self.parts: dict = {}

    def swallowed(self) -> int | None:
        self.tx = tap_tx_packets(self.tap)
        m = 0 if self.mcast is None else tap_mcast_sent(self.tap) - self.mcast
        self.parts = {"M": m}
        if m < 0:
            return None
        return ((((self.tx - self.used) & 0xFFFF) - self.base) - m) & 0xFFFF

    def less_queued(self, count: int, frames: list[bytes]) -> int:
        if self.mcast is None:
            return count
        self.parts["Mq"] = queued = _queued_mcast(frames)
        return (count + queued) & 0xFFFF


class ShadowLog:
    """Keeps the last `keep` frames delivered to the VM (from the shadow ring), in delivery order. The
    swallowed frames are found by the first frame left in the tap queue, so the log must still hold it when
    a late drain reads the queue: 4096 frames are 2 s at 2000 packets/s (a starved agent heard the pause up
    to 186 ms late), at most ~6 MiB of 1500-byte frames per migrating VM, for the window only.

    The ring is consumed late: the records of the last LAG_NS (LAG_MAX at most) stay in it, read but not
    consumed, until close(). The ring is pinned, so when the agent is killed at the pause the frames QEMU
    swallowed are still there for the restarted agent's log (their count: SwallowCheck.recorded)."""

    LAG_NS = 300_000_000  # the kill may land when the pause is heard, up to ~190 ms after QEMU stopped
                          # (a starved agent), plus SWALLOW_WINDOW_NS: measured, 100 ms lost the frame once
    LAG_MAX = 512         # records (2096 bytes each: 1/4 of the 4 MiB ring, the rest for what arrives while
                          # no agent reads)

    def __init__(self, dataplane, keep: int = 4096):
        self.records: deque = deque(maxlen=keep)
        self._reader = dataplane.shadow_reader()
        # A quarter of the ring at most: a ring pinned by an older program (1 MiB, ~500 records) is kept
        # across an upgrade, and one the lag filled would take no more copies.
        self._lag_max = self.LAG_MAX if self._reader is None else \
            min(self.LAG_MAX, self._reader.size // (4 * (_SHADOW_HEAD.size + abi.HOLD_SNAPLEN + 8)))
        self._ends: deque = deque()  # (timestamp_ns, ring position past it) of the records not consumed
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="shadow-log", daemon=True)

    def start(self) -> ShadowLog:
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(0.02):
            self._read()

    def _read(self, everything: bool = False) -> None:
        if self._reader is None:
            return
        ends: list[int] = []
        for raw, end in zip(self._reader.read(commit=False, ends=ends), ends):
            ts, vm, n, _ = _SHADOW_HEAD.unpack_from(raw)
            self.records.append(HoldRecord(_vm_str(vm), ts, raw[_SHADOW_HEAD.size:_SHADOW_HEAD.size + n]))
            self._ends.append((ts, end))
        if everything:
            self._reader.commit()
            self._ends.clear()
            return
        until = None
        newest = self._ends[-1][0] if self._ends else 0
        while self._ends and (len(self._ends) > self._lag_max or newest - self._ends[0][0] > self.LAG_NS):
            until = self._ends.popleft()[1]
        if until is not None:
            self._reader.commit(until)

    def flush(self) -> None:
        """Stop the background reader and take what is left; records are then complete up to now."""
        if self._thread.is_alive():
            self._stop.set()
            self._thread.join(2)
        self._read()

    def close(self) -> None:
        """The window is over: everything consumed (a log started later must not find these)."""
        if self._thread.is_alive():
            self._stop.set()
            self._thread.join(2)
        if self._reader is not None:
            self._read(everything=True)
            self._reader.close()
            self._reader = None

    def swallowed_frames(self, count: int, first_queued: bytes | None, stopped_at_ns: int,
                         window_ns: int | None = SWALLOW_WINDOW_NS) -> tuple[list[bytes], str | None]:
        """(The `count` frames delivered just before `first_queued` (the first frame left in the tap queue;
        None: the queue was empty, so the last ones delivered), oldest first; None) or, when they cannot be
        told for sure, ([], why): not all in the log, or one delivered more than `window_ns`
        before QEMU stopped reading its tap. A frame QEMU swallows reached the tap just before that moment;
        an older one, picked by a count that is off, was given to the guest: re-sent, it would arrive twice.

        The moment QEMU stopped reading is bounded from above by `stopped_at_ns` (QEMU's own STOP time, or
        when the agent heard SUSPENDED if libvirt did not pass QEMU's event on: Executor._drain) and by the
        delivery of `first_queued` (QEMU never read it); the earlier bound is taken. The agent hears
        SUSPENDED late when it is starved of CPU (measured under a busy loop: 63 and 186 ms after the first
        frame QEMU left), which on its own pushed the frames QEMU had just swallowed out of the window."""
        recs = list(self.records)
        idx = len(recs)
        if not stopped_at_ns and first_queued is None:  # (a restarted agent heard no STOP)
            return [], "no bound on when QEMU stopped reading"
        if window_ns is None and first_queued is None:  # (an exact count: the run must end at that frame)
            return [], "no frame left in the queue to end the run at"
        stop_ns = stopped_at_ns or 1 << 63
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
        if window_ns is not None and (age := stop_ns - min(r.timestamp_ns for r in picked)) > window_ns:
            return [], f"one delivered {age / 1e6:.1f} ms before QEMU stopped reading"
        return [r.packet for r in picked], None
