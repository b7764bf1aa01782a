"""This host's part of a migration: the state machine's actions (srmig.ctl.machine) applied to the maps, the
VM's tap and its QEMU. The agent and the testbed's srmig strategy both run it, so the demo runs the
agent's code.

What it does per action, on this host only (actions for another host are skipped, Publish and StartGrace
belong to the owner: they speak to the database):
- SetVm / DelVm: the map entry; the migration window opens (the tap's queue made long, the shadow log
  started) and closes (the queue restored once the resumed QEMU has read it, docs/drain.md);
- KeepTap: a duplicate of QEMU's tap fds, so the tap's queue outlives that QEMU; also handed to the fd store
  (srmig.ctl.fdstore), so it outlives the agent too: a restarted agent drains or returns what waits in it;
- Drain: the source drain (srmig.ctl.drain.SourceDrain) from the kept tap queue or QEMU's;
- ReturnHeld: an aborted destination sends what its tap held back to the source;
- Unpark: the source delivers what it parked, once the destination's returned packets are in (`unpark()`,
  called by the owner when the destination says how many, or by itself after RETURN_WAIT_S).

Not thread-safe: the owner calls it, and runs what it hands to `Owner.later`, from one thread at a time.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field

from srmig.bpf.abi import VmState
from srmig.ctl import fdstore
from srmig.ctl.drain import DrainReport, SourceDrain, return_held, sid_delivered, unpark, wait_delivered
from srmig.ctl.maps import VmAddressSet
from srmig.ctl.machine import DelVm, Drain, KeepTap, Migration, ReturnHeld, SetVm, Unpark
from srmig.ctl.swallow import Arrival, ArrivedCheck, RecordedCheck, ShadowLog, SwallowCheck, incoming_counts
from srmig.ctl.tap import RESTORE_GAP_S, TapKeeper, restore_queue_len, tap_name, tap_queue_len

log = logging.getLogger("srmig.executor")
RETURN_WAIT_S = 1.0  # abort: the longest the source parks, waiting for the destination to return what it held
# A window's end: the longest its tap keeps the long queue while frames wait in it, or arrive too fast for the old
# length to be safe (srmig.ctl.tap.restore_queue_len)
QUEUE_RESTORE_MAX_S = 10.0
QUEUE_POLL_S = 0.01  # meanwhile, how often the queue is looked at


def _nothing(*_args):
    return None


@dataclass
class Owner:
    """What the executor needs from whoever runs it (the agent, or the testbed): the narrow interface."""

    name: str                  # this host: actions for other hosts are skipped
    dp: object                 # srmig.ctl.maps.Dataplane of this host
    address: str               # this host's address: the outer source of what it sends
    drain: bool                # drain the tap queue and recover the swallowed frame (False: forward only)
    tap_queue: int             # the tap's queue length during a migration window
    qemu_pid: Callable[[VmLocal], int | None]           # the VM's QEMU here, None if there is none
    later: Callable[..., None]  # later(seconds, fn, *args): fn(*args) on the owner's thread, then
    qemu_stopped_ns: Callable[[VmLocal], int | None] = _nothing  # QEMU's own STOP time of this pause
    on_map_write: Callable[[], None] = _nothing          # (the agent's event -> map latency)
    on_returned: Callable[[str], None] = _nothing        # an aborted destination returned its hold
    enter: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext  # this host's netns
    fds: fdstore.FdStore = field(default_factory=fdstore.NoStore)  # where kept tap fds outlive the agent
    addresses: Callable[[str], tuple[str, ...]] = lambda vm: (vm,)  # a VM's addresses, its id first
    arrived_check: Callable[[VmLocal], ArrivedCheck | None] = _nothing  # the count from loc.arrival


@dataclass
class VmLocal:
    """This host's resources for one VM (and its migration)."""

    vm: str = ""
    migration: str | None = None        # the migration these resources serve
    domain: str | None = None
    tap: str | None = None
    shadow: ShadowLog | None = None     # source, window: what the program shadowed to the ring
    keeper: TapKeeper | None = None     # KeepTap: QEMU's tap fds, duplicated
    check: SwallowCheck | None = None   # source: the swallowed-frame baseline (the owner takes it)
    arrival: Arrival | None = None      # the VM arrived here by migration: the count without a baseline
    drain: SourceDrain | None = None
    report: DrainReport | None = None   # the last drain's
    old_qlen: int | None = None         # the tap's queue length before the window (restored after it)
    window: int = 0                     # migration windows opened on this tap: a late restore gives way
    restoring: TapKeeper | None = None  # the fds a pending restore watches
    stopped_ns: int = 0                 # source: when its pause was heard (time.monotonic_ns)
    keep_wanted: bool = False
    returned: int | None = None  # destination, abort: packets sent back (None: not yet)
    unpark: str | None = None    # source, abort: the migration whose parked packets wait for D's return
    unparked: int = 0            # source, abort: parked packets delivered
    sbuf_base: int = 0           # source, abort: End.SBUF deliveries when parking began
    peer_resent: list = field(default_factory=list)  # frames the source re-sent for its swallowing QEMU
    # The swallowed-frame count across a restart of the source's agent (swallow.RecordedCheck):
    swallow_base: int | None = None  # source: the baseline, as written in its migration record
    swallow_mcast: int | None = None  # source: the host's IPv6 multicast on the tap the baseline goes with
    peer_rx_used: int | None = None  # source: the RX used index D's QEMU resumed with (D's record)
    tx_at_start: int | None = None   # destination: its tap's tx_packets when its incoming QEMU started
    delivered_at_start: int | None = None  # destination: what its program had delivered to taps by then
    mcast_at_start: int | None = None      # destination: the IPv6 multicast its host had sent on the tap then
    rx_used: int | None = None       # destination: the RX used index its QEMU resumed with


class Executor:
    def __init__(self, owner: Owner):
        self.owner = owner
        # Every map write for a VM is one write of its id's entry, which all its addresses and prefixes follow
        # (the drain and the unpark are given them: they take the VM's frames to any, and write the same way).
        self.dp = VmAddressSet(owner.dp, owner.addresses)
        self.vms: dict[str, VmLocal] = {}

    def _addresses(self, vm: str) -> list[str]:
        """The VM's addresses for the drain and the unpark: they take the VM's frames to any of them, and
        write the id's entry the VmAddressSet's way (srmig.ctl.drain.one_step)."""
        return list(self.owner.addresses(vm))

    def vm(self, vm: str) -> VmLocal:
        return self.vms.setdefault(vm, VmLocal(vm=vm))

    def execute(self, m: Migration, actions, mid: str, replay: bool = False) -> None:
        """Apply the actions meant for this host, in order. `mid`: the migration's id. `replay`: the steps
        were applied before a restart; a Drain then only sets the map (the QEMU it drained is gone)."""
        o, loc = self.owner, self.vm(m.vm)
        loc.migration = mid or loc.migration
        with o.enter():
            for a in actions:
                if getattr(a, "host", None) != o.name:
                    continue
                if isinstance(a, SetVm):
                    self._set_vm(m, loc, a)
                elif isinstance(a, DelVm):
                    self.dp.del_vm(a.vm)
                    o.on_map_write()
                    self._end_window(loc)
                elif isinstance(a, Drain):
                    if replay:  # a drain cut short by the restart left the tap's fds stored
                        stored = self._stored(loc)
                        if not stored:  # drained before the restart: the map write alone
                            self.dp.set_vm(a.vm, VmState.AWAY, next_sid=a.next_sid)
                            continue
                        if loc.keeper is None:
                            loc.keeper = TapKeeper.of_fds(loc.tap or "", stored)
                        else:  # a replayed KeepTap took the same queue again
                            for fd in stored:
                                os.close(fd)
                    self._drain(m, loc, a)
                elif isinstance(a, KeepTap):
                    loc.keep_wanted = True
                    self._keep_tap(m.vm, loc)
                elif isinstance(a, ReturnHeld):
                    self._return_held(m, loc, a)
                elif isinstance(a, Unpark):
                    # Once D says how many it returned (the owner calls unpark()), or after RETURN_WAIT_S.
                    loc.unpark = mid
                    o.later(RETURN_WAIT_S, self.unpark, m, mid, None)

    def _set_vm(self, m: Migration, loc: VmLocal, a: SetVm) -> None:
        if a.state is VmState.INCOMING or a.shadow:
            self._long_queue(loc)
        if a.park:  # D returns to our End.SBUF: Unpark waits until that many more were delivered
            loc.sbuf_base = sid_delivered(self.dp, m.src.sbuf)
        shadow = a.shadow and self.owner.drain
        if shadow and loc.shadow is None:
            loc.shadow = ShadowLog(self.dp).start()  # before the flag: miss nothing
        self.dp.set_vm(a.vm, a.state, next_sid=a.next_sid, shadow=shadow, park=a.park)
        self.owner.on_map_write()
        if a.park:  # D returns what it held: the window stays open until it and what parks are in
            self._long_queue(loc)
        elif a.state is VmState.RUNNING and not a.shadow:  # resumed here, or abort before the pause
            self._end_window(loc)

    def keep_tap(self, vm: str) -> None:
        """KeepTap once QEMU exists (the hook runs before the destination's QEMU starts: STARTED retries)."""
        if vm in self.vms:
            with self.owner.enter():
                self._keep_tap(vm, self.vms[vm])

    def _keep_tap(self, vm: str, loc: VmLocal) -> None:
        if not loc.keep_wanted or loc.keeper is not None or loc.tap is None:
            return
        pid = self.owner.qemu_pid(loc)
        if pid is None:
            return  # QEMU not started yet: STARTED/MIGRATED tries again
        try:
            loc.keeper = TapKeeper(pid, loc.tap)
        except OSError as e:
            log.debug("%s: tap not held yet: %s", vm, e)
            return
        try:
            self.owner.fds.put(self._name(loc), loc.keeper.fds)
            log.debug("%s: tap %s fds kept in the fd store as %s", vm, loc.tap, self._name(loc))
        except OSError as e:
            log.warning("%s: kept tap fds not stored (%s): they die with the agent", vm, e)

    def _name(self, loc: VmLocal) -> str:
        return fdstore.tap_name(self.owner.name, loc.vm, loc.migration or "")

    def incoming_counts(self, vm: str) -> tuple[int, int, int] | None:
        """The incoming QEMU has started here: swallow.incoming_counts of its tap, None without its fds."""
        loc = self.vms.get(vm)
        if loc is None or loc.keeper is None or not loc.tap:
            return None
        with self.owner.enter():
            return incoming_counts(loc.tap, loc.keeper)

    def _stored(self, loc: VmLocal) -> list[int]:
        """The tap fds the fd store kept for this migration (ours now), [] if none."""
        try:
            fds = self.owner.fds.take(self._name(loc))
            log.debug("%s: %d tap fds taken from the fd store as %s", loc.vm, len(fds), self._name(loc))
            return fds
        except OSError as e:
            log.warning("%s: the fd store does not answer (%s)", loc.vm, e)
            return []

    def _forget_stored(self, loc: VmLocal) -> None:
        """The window is over: the store need not keep this migration's tap fds any more."""
        try:
            self.owner.fds.drop(self._name(loc))
        except OSError as e:
            log.debug("%s: fd store: %s", loc.vm, e)

    def _tap_queue(self, loc: VmLocal) -> TapKeeper | None:
        """The tap's queue (now the caller's): the fds kept since the migration began (KeepTap), by us or,
        before our restart, in the fd store; else taken from QEMU now; None if there is none of these (QEMU
        gone, or ending as we look)."""
        queue, loc.keeper = loc.keeper, None
        if queue is None and (stored := self._stored(loc)):  # (a restarted agent may not know the tap's name:
            queue = TapKeeper.of_fds(loc.tap or "", stored)     # its domain left with the migration)
        if queue is None and loc.tap and (pid := self.owner.qemu_pid(loc)) is not None:
            with contextlib.suppress(OSError):
                queue = TapKeeper(pid, loc.tap)
        return queue

    # --- the migration window: the tap's long queue --------------------------------------------------

    def _long_queue(self, loc: VmLocal) -> None:
        """The window opens (or is extended): the tap's queue long, set again even if it is already (a
        restarted libvirtd resets it when it reconnects to QEMU)."""
        if not loc.tap:
            return
        loc.window += 1  # a restore still waiting for an earlier window's backlog gives up
        old = tap_queue_len(loc.tap, self.owner.tap_queue)
        if loc.old_qlen is None:
            loc.old_qlen = old

    def _end_window(self, loc: VmLocal) -> None:
        """The window closes: the shadow log and the kept tap fds go; the queue length is restored once what
        the tap holds has been read and what arrives could not overflow the old length meanwhile
        (QUEUE_RESTORE_MAX_S at most)."""
        if loc.shadow is not None:
            with contextlib.suppress(Exception):
                loc.shadow.close()
            loc.shadow = None
        if loc.old_qlen is not None:
            queue = self._tap_queue(loc)
        else:
            queue, loc.keeper = loc.keeper, None
        self._forget_stored(loc)
        self._restore_queue(loc, loc.window, queue, time.monotonic() + QUEUE_RESTORE_MAX_S)

    def _restore_queue(self, loc: VmLocal, window: int, queue: TapKeeper | None, deadline: float) -> None:
        with self.owner.enter():
            if loc.old_qlen is not None and loc.tap and window == loc.window:
                try:
                    if restore_queue_len(loc.tap, loc.old_qlen, queue):
                        loc.old_qlen = None
                    elif time.monotonic() < deadline:
                        loc.restoring = queue
                        self.owner.later(QUEUE_POLL_S, self._restore_queue, loc, window, queue, deadline)
                        return
                    else:  # shortening it now could free what waits; the next window's end restores it
                        log.warning("tap %s: frames still queued, or arriving faster than its old queue of %d holds "
                                    "for %.2f s, %.0f s after the window: its queue stays long", loc.tap, loc.old_qlen,
                                    RESTORE_GAP_S, QUEUE_RESTORE_MAX_S)
                except Exception as e:  # noqa: BLE001 - the tap went meanwhile
                    log.debug("tap %s: queue length not restored: %s", loc.tap, e)
                    loc.old_qlen = None
            if loc.restoring is queue:
                loc.restoring = None
            if queue is not None:
                queue.close()

    # --- stop-and-copy: the drain --------------------------------------------------------------------

    def _drain(self, m: Migration, loc: VmLocal, a: Drain) -> None:
        segments = [*m.transit, m.dst.sbuf]
        address = self.owner.address
        queue = self._tap_queue(loc)
        if queue is None:
            # QEMU is gone (we restarted after libvirt's confirm): its tap queue with it. The hold ring is the
            # program's and outlives us: what it parked while a drain we were killed in held the VM goes
            # first (the drain's steps 3-4), then the rest is forwarded directly.
            rep = SourceDrain(self.dp.dp, a.vm, address, segments, a.next_sid, self._addresses(a.vm)).ring_only()
            self.owner.on_map_write()
            log.warning("%s: no QEMU tap queue; forwarding without a drain (%d from the ring, %d the killed "
                        "drain had sent)", m.vm, rep.from_ring, rep.ring_sent_before)
            return
        gone = "" if self.owner.qemu_pid(loc) else " (QEMU gone)"  # the queue is what we, or the store, kept
        drain = loc.drain = SourceDrain(self.dp.dp, a.vm, address, segments, a.next_sid, self._addresses(a.vm))
        self.owner.on_map_write()  # the drain's first step is the map write (HOLD)
        counted = loc.check
        if counted is None and loc.swallow_base is not None and loc.peer_rx_used is not None and queue.fds:
            # We restarted after the pause: our baseline is gone with the agent before us, and QEMU perhaps
            # too; the record kept the one, the destination's QEMU the RX used index it stopped at.
            with contextlib.suppress(OSError):
                counted = RecordedCheck(tap_name(queue.fds[0]), loc.swallow_base, loc.peer_rx_used,
                                        loc.swallow_mcast)
        if counted is None and loc.arrival is not None and loc.tap and self.owner.qemu_pid(loc):
            # No baseline (it needs a moment without traffic, which a VM probed without a pause since it
            # arrived never gives): the arrival's counts instead.
            counted = self.owner.arrived_check(loc)
        check = BoundedCheck(counted) if counted is not None else None
        # A count from the records that cannot be high re-sends the whole run QEMU read after the stop, not
        # MAX_SWALLOWED frames at most, none older than SWALLOW_WINDOW_NS (under load the paused QEMU, which
        # no agent held, read 119-271 frames it never gave the guest). Cannot be high: its reference is exact
        # but for what only makes it low (swallow.RecordedCheck with the multicast count, `swallow_mcast`),
        # and no drain before us read the tap (our map entry never left RUNNING: a drain's first step is
        # HOLD), whose reads tx_packets would count as QEMU's. The run must end at the first frame left in
        # the queue and be all in the shadow log (what the ring kept: ShadowLog.LAG_MAX).
        limits = {}
        entry = self.dp.get_vm(a.vm)
        if isinstance(counted, RecordedCheck) and counted.mcast is not None and entry is not None and \
                entry.state is VmState.RUNNING:
            limits = {"max_swallowed": ShadowLog.LAG_MAX, "window_ns": None}
        heard, qemu = loc.stopped_ns, self.owner.qemu_stopped_ns(loc) if loc.stopped_ns else None
        stopped_how = "STOP as heard" if qemu is None else \
            f"SUSPENDED heard {(heard - qemu) / 1e6:.1f} ms after QEMU's STOP"
        try:
            with queue:
                rep = loc.report = drain.run(queue, check=check, shadow=loc.shadow,
                                             stopped_at_ns=heard if qemu is None else qemu, **limits)
            self._forget_stored(loc)  # drained: a restart need not do it again
            # The drain read the tap: a pair taken before it no longer holds (an abort resumes this QEMU), and
            # the RX used index at the pause goes into our record: the destination's QEMU resumes with it
            # (swallow.Arrival there).
            loc.check = loc.arrival = None
            if isinstance(counted, (SwallowCheck, ArrivedCheck)) and counted.used is not None:
                loc.rx_used = counted.used
            if isinstance(counted, RecordedCheck):
                log.debug("%s: swallowed counted from the records: tap tx %s, D's RX used %d, baseline %d, %s",
                          m.vm, counted.tx, counted.used, counted.base, counted.parts)
            if isinstance(counted, ArrivedCheck):
                log.debug("%s: swallowed counted from the arrival: %s", m.vm, counted.parts)
            log.info("%s: drained %d from the tap%s, %d from the ring, %d swallowed re-sent (swallowed %s, "
                     "baseline %s, shadow %s; %s)%s", m.vm, rep.from_tap, gone, rep.from_ring, rep.resent_swallowed,
                     rep.swallowed, ("recorded, exact" if limits else "recorded") if isinstance(counted, RecordedCheck)
                     else
                     "arrival" if isinstance(counted, ArrivedCheck) else counted is not None,
                     loc.shadow is not None, stopped_how,
                     (f"; not re-sent: {rep.swallow_miss}" if rep.swallow_miss else "")
                     + (f"; {rep.ring_sent_before} from the ring sent before a restart" if rep.ring_sent_before
                        else ""))
        except OSError as e:
            log.error("%s: drain failed (%s); forwarding", m.vm, e)
            self.dp.set_vm(a.vm, VmState.AWAY, next_sid=a.next_sid)

    # --- abort ---------------------------------------------------------------------------------------

    def _return_held(self, m: Migration, loc: VmLocal, a: ReturnHeld) -> None:
        # The source QEMU delivers, when it resumes, the one frame it keeps in its own net queue: the newest
        # of those the drain re-sent. The others it had dropped: return them.
        skip = loc.peer_resent[-1:]
        # Every IP packet of the tap's queue, whichever of the VM's addresses (no `addresses`): the queue is
        # this VM's alone and held only what the source sent for it.
        loc.returned = 0 if loc.keeper is None else return_held(loc.keeper, self.owner.address,
                                                                 list(a.segments), skip)
        log.info("%s: returned %d held packets to %s", m.vm, loc.returned, m.src.name)
        self.owner.on_returned(m.vm)  # the source delivers what it parked once those are in

    def fenced_tap(self, vm: str) -> TapKeeper | None:
        """The tap fds of our copy of `vm`, taken before it is fenced (a destroyed QEMU takes its tap queue
        with it unless we hold them); None if there is no QEMU or tap."""
        loc = self.vms.get(vm)
        pid = self.owner.qemu_pid(loc) if loc and loc.tap else None
        if pid is None:
            return None
        try:
            return TapKeeper(pid, loc.tap)
        except OSError as e:
            log.warning("%s: the tap of the copy to fence not held: %s", vm, e)
            return None

    def return_fenced(self, m: Migration, vm: str, queue: TapKeeper | None) -> int:
        """Our copy of `vm` was just fenced (HostRole.fence): what its tap still holds, never read by it, goes
        to the source, which runs the VM (late, so reordered; nothing it has seen). What the copy had already
        taken into its RX ring goes with it. Returns how many."""
        if queue is None:
            return 0
        with self.owner.enter(), queue:
            try:
                return return_held(queue, self.owner.address, [m.src.sbuf])
            except OSError as e:
                log.warning("%s: what the fenced copy's tap holds not returned: %s", vm, e)
                return 0

    def unpark(self, m: Migration, mid: str, returned: int | None) -> None:
        """Abort on the source: D's held packets are back (`returned` of them, to our End.SBUF; None: D
        never said, given up after RETURN_WAIT_S): deliver what we parked meanwhile, in order."""
        loc = self.vms.get(m.vm)
        if loc is None or loc.unpark != mid or not mid:
            return
        loc.unpark = None
        with self.owner.enter():
            t0 = time.monotonic()
            missing = wait_delivered(self.dp, m.src.sbuf, loc.sbuf_base + returned) if returned else 0
            t_wait = time.monotonic()
            try:
                loc.unparked = unpark(self.dp.dp, m.vm, loc.tap, addresses=self._addresses(m.vm))
            except OSError as e:
                log.error("%s: delivering the parked packets failed (%s); delivering directly", m.vm, e)
                self.dp.set_vm(m.vm, VmState.RUNNING)
                return
            finally:
                self._end_window(loc)  # its long queue kept until QEMU has read what we just gave it
        log.info("%s: %s (%d not arrived after %.0f ms); delivered %d packets parked meanwhile in %.0f ms",
                 m.vm, f"{returned} returned by {m.dst.name}" if returned is not None else
                 f"no word from {m.dst.name} in {RETURN_WAIT_S} s", missing, (t_wait - t0) * 1000, loc.unparked,
                 (time.monotonic() - t_wait) * 1000)

    def close(self) -> None:
        """Release what the executor holds; the maps stay (the program forwards while no agent runs)."""
        for loc in self.vms.values():
            for res in (loc.shadow, loc.keeper, loc.restoring):
                if res is not None:
                    with contextlib.suppress(Exception):
                        res.close()
            loc.shadow = loc.keeper = loc.restoring = None


class BoundedCheck:
    """SwallowCheck.swallowed() bounded in time: during stop-and-copy QEMU may answer late (its migration
    thread holds the big lock while saving devices) or the domain may already be gone. Then the count is
    unknown (None): the drain goes on without re-sending the swallowed frame (at most one or two packets,
    counted as not recovered) rather than hold everything while waiting.

    Waiting loses nothing: the program parks the newer packets in the hold ring meanwhile, sent right after
    (only a drain late enough for the destination to cut over without us reorders them). Under one busy loop
    on 2 cores the count took 10-67 ms, and once 124 ms: 0.1 s timed out there and the swallowed probe was
    lost. 0.3 s leaves room for that."""

    TIMEOUT_S = 0.3

    def __init__(self, check: SwallowCheck):
        self.check = check
        if hasattr(check, "less_queued"):  # (ArrivedCheck, RecordedCheck: the count's second half, no I/O)
            self.less_queued = check.less_queued

    def swallowed(self) -> int | None:
        fut: Future = Future()

        def ask():
            try:
                fut.set_result(self.check.swallowed())
            except Exception as e:  # noqa: BLE001
                fut.set_exception(e)
        threading.Thread(target=ask, daemon=True, name="swallow-check").start()
        try:
            return fut.result(self.TIMEOUT_S)
        except Exception as e:  # noqa: BLE001 - timeout or libvirt error
            log.warning("swallowed-frame count unknown (%s): not recovered", type(e).__name__)
            return None
