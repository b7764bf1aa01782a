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

import threading
import time
from collections import deque
from typing import Callable

from srmig.ctl.tap import tap_tx_packets

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
        when the agent heard SUSPENDED if libvirt did not pass QEMU's event on: Executor._drain) and by the
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
