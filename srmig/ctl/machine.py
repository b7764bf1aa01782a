"""The migration state machine: pure logic, no I/O. Events in (translated from libvirt or QMP), actions out.

One `Migration` per VM in flight. It follows the phases of docs/design.md (srmig.ctl.phases) and turns every transition
into the actions that bring the source's map, the destination's map and the ingresses' segment lists to
`plan(phase)`. Events may come twice or out of order (two daemons, reconnects, a replayed journal):
- a phase never goes backwards;
- a duplicate produces no action;
- a later event implies the earlier ones: RESUMED without SUSPENDED still flips the source to AWAY.
The executor (agent) applies actions in order; every action is idempotent, so replaying them is safe.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from srmig.ctl.phases import HostSids, Phase, plan
from srmig.bpf.abi import VmState


class Ev(enum.Enum):
    BEGIN = "begin"          # hook `migrate begin` on D, or STARTED_MIGRATED on D
    SUSPENDED = "suspended"  # SUSPENDED_MIGRATED / SUSPENDED_POSTCOPY on S: stop-and-copy
    RESUMED = "resumed"      # RESUMED_MIGRATED / RESUMED_POSTCOPY on D
    STOPPED = "stopped"      # STOPPED_MIGRATED on S: the source is gone, cut over
    FAILED = "failed"        # job failed/cancelled, or the source resumed: abort
    GRACE_OVER = "grace-over"  # timer: the source stops forwarding stragglers


# What each phase is reached by, in order; the order is how "later implies earlier" is decided.
ORDER = [Phase.STEADY, Phase.PROVISION, Phase.STOP_AND_COPY, Phase.RESUMED, Phase.CUT_OVER]
BY_EVENT = {Ev.BEGIN: Phase.PROVISION, Ev.SUSPENDED: Phase.STOP_AND_COPY, Ev.RESUMED: Phase.RESUMED,
            Ev.STOPPED: Phase.CUT_OVER}


@dataclass(frozen=True)
class SetVm:
    host: str
    vm: str
    state: VmState
    next_sid: str | None = None
    shadow: bool = False
    park: bool = False  # RUNNING: park what arrives (an abort, until the destination returned what it held)


@dataclass(frozen=True)
class DelVm:
    host: str
    vm: str


@dataclass(frozen=True)
class Drain:
    """Stop-and-copy on the source: HOLD, drain the tap queue and the swallowed frame, then AWAY."""

    host: str
    vm: str
    next_sid: str


@dataclass(frozen=True)
class KeepTap:
    """Hold a duplicate of this host's QEMU tap fd, so the tap's queue outlives that QEMU. On the destination:
    an aborted QEMU's queue is what it held, returned to the source. On the source: the drain still finds the
    queue when libvirt ended the source QEMU before the agent could drain it (its libvirtd restarting, the
    agent heard of the pause only through the destination's resume)."""

    host: str
    vm: str


@dataclass(frozen=True)
class ReturnHeld:
    """Abort: send what the destination held (its tap queue) back along `segments` to the source."""

    host: str
    vm: str
    segments: tuple[str, ...]


@dataclass(frozen=True)
class Unpark:
    """Abort, on the source, once the destination's ReturnHeld has arrived: deliver what was parked meanwhile,
    in order, then deliver directly."""

    host: str
    vm: str


@dataclass(frozen=True)
class Publish:
    """The VM's segment list for every ingress, with a version; the agent waits for acks when `ack`."""

    vm: str
    segments: tuple[str, ...]
    version: int
    ack: bool = False


@dataclass(frozen=True)
class StartGrace:
    vm: str
    seconds: float


Action = SetVm | DelVm | Drain | KeepTap | ReturnHeld | Unpark | Publish | StartGrace


@dataclass
class Migration:
    vm: str
    src: HostSids
    dst: HostSids
    transit: tuple[str, ...] = ()
    phase: Phase = Phase.STEADY
    version: int = 0
    done: bool = False
    history: list[tuple[Ev, Phase]] = field(default_factory=list)


class Machine:
    """All migrations of one agent's view. `handle` returns the actions for one event."""

    def __init__(self, grace_s: float = 2.0, drain: bool = True):
        self.grace_s = grace_s
        self.drain = drain
        self.migrations: dict[str, Migration] = {}

    def start(self, vm: str, src: HostSids, dst: HostSids, transit: tuple[str, ...] = ()) -> Migration:
        """Register a migration (from the hook or STARTED_MIGRATED); BEGIN then provisions it."""
        m = self.migrations.get(vm)
        if m is None or m.done:
            m = Migration(vm, src, dst, tuple(transit))
            self.migrations[vm] = m
        return m

    def handle(self, vm: str, ev: Ev) -> list[Action]:
        m = self.migrations.get(vm)
        if m is None or m.done:
            return []  # an event for a migration we do not know, or that is over: nothing to undo
        m.history.append((ev, m.phase))
        if ev is Ev.FAILED:
            return self._abort(m)
        if ev is Ev.GRACE_OVER:
            if m.phase is not Phase.CUT_OVER:
                return []
            m.done = True
            return [DelVm(m.src.name, vm)]
        target = BY_EVENT[ev]
        if ORDER.index(target) <= ORDER.index(m.phase):
            return []  # duplicate or late: never go backwards
        actions: list[Action] = []
        # Walk every phase up to the target, so a missed event still gets its actions.
        for phase in ORDER[ORDER.index(m.phase) + 1:ORDER.index(target) + 1]:
            actions += self._enter(m, phase)
            m.phase = phase
        return actions

    def _publish(self, m: Migration, segments, ack=False) -> Publish:
        m.version += 1
        return Publish(m.vm, tuple(segments), m.version, ack)

    def _enter(self, m: Migration, phase: Phase) -> list[Action]:
        p = plan(phase, m.src, m.dst, list(m.transit))
        vm, s, d = m.vm, m.src.name, m.dst.name
        if phase is Phase.PROVISION:
            # Destination first, then the source (shadowing from now on), then the ingresses, acked:
            # stop-and-copy must not start before every ingress uses the new list.
            return [SetVm(d, vm, p.dest), KeepTap(d, vm), KeepTap(s, vm), SetVm(s, vm, p.source, shadow=True),
                    self._publish(m, p.segments, ack=True)]
        if phase is Phase.STOP_AND_COPY:
            if self.drain:
                return [Drain(s, vm, p.source_next_sid)]
            return [SetVm(s, vm, p.source, next_sid=p.source_next_sid)]
        if phase is Phase.RESUMED:
            return [SetVm(d, vm, p.dest)]
        if phase is Phase.CUT_OVER:
            return [self._publish(m, p.segments), SetVm(s, vm, p.source, next_sid=p.source_next_sid),
                    StartGrace(vm, self.grace_s)]
        return []

    def _abort(self, m: Migration) -> list[Action]:
        if m.phase in (Phase.STEADY, Phase.CUT_OVER):
            return []  # nothing begun, or already done: the source is gone, no way back
        p = plan(Phase.ABORT, m.src, m.dst, list(m.transit))
        forwarded = m.phase in (Phase.STOP_AND_COPY, Phase.RESUMED)  # the source sent D packets to hold
        m.phase = Phase.ABORT
        m.done = True
        # The source takes the VM back first, parking what arrives if D holds older packets; D returns those
        # to the source's End.SBUF, which delivers while End.S and End.DX6-map park; then the source
        # delivers what it parked, in order; then the ingresses; then D forgets the VM.
        back = [ReturnHeld(m.dst.name, m.vm, (m.src.sbuf,))]
        if forwarded:
            back.append(Unpark(m.src.name, m.vm))
        return [SetVm(m.src.name, m.vm, p.source, park=forwarded), *back,
                self._publish(m, p.segments), DelVm(m.dst.name, m.vm)]
