"""The phases of one migration (docs/design.md, "Phases"), as data: what each phase wants on the source's map, the
destination's map and every ingress. Pure logic, no I/O; the testbed's srmig strategy and the agent both
apply it, so there is one definition of "what srmig does when"."""

from __future__ import annotations

import enum
from dataclasses import dataclass

from srmig.bpf.abi import VmState


class Phase(enum.Enum):
    STEADY = "steady"                # VM runs on S, nothing in flight
    PROVISION = "provision"          # migration begun: path S -> D installed before stop-and-copy
    STOP_AND_COPY = "stop-and-copy"  # VM paused on S (source tap being drained: HOLD, then AWAY)
    RESUMED = "resumed"              # VM runs on D; ingress still on the migration path
    CUT_OVER = "cut-over"            # ingress back to a one-SID list, on D; S forwards stragglers
    ABORT = "abort"                  # migration failed: back to S


@dataclass(frozen=True)
class HostSids:
    """The SIDs one host instantiates in its locator."""

    name: str
    dx6: str   # End.DX6-map
    end_s: str  # End.S
    sbuf: str  # End.SBUF


@dataclass(frozen=True)
class Plan:
    source: VmState | None    # None: no entry on that host
    dest: VmState | None
    segments: list[str]       # the ingress's segment list, travel order
    source_next_sid: str | None = None


def plan(phase: Phase, src: HostSids, dst: HostSids, transit: list[str] | None = None,
         drained: bool = True) -> Plan:
    """The desired state in `phase`. `transit` SIDs sit between S and D on the migration path.
    `drained` is False in stop-and-copy until the source tap queue has been emptied (HOLD keeps order)."""
    mid = list(transit or [])
    if phase is Phase.STEADY:
        return Plan(VmState.RUNNING, None, [src.dx6])
    if phase is Phase.PROVISION:
        return Plan(VmState.RUNNING, VmState.INCOMING, [src.end_s, *mid, dst.sbuf])
    if phase is Phase.STOP_AND_COPY:
        return Plan(VmState.AWAY if drained else VmState.HOLD, VmState.INCOMING, [src.end_s, *mid, dst.sbuf],
                    source_next_sid=dst.dx6)
    if phase is Phase.RESUMED:
        return Plan(VmState.AWAY, VmState.RUNNING, [src.end_s, *mid, dst.sbuf], source_next_sid=dst.dx6)
    if phase is Phase.CUT_OVER:
        return Plan(VmState.AWAY, VmState.RUNNING, [dst.dx6], source_next_sid=dst.dx6)
    if phase is Phase.ABORT:
        return Plan(VmState.RUNNING, None, [src.dx6])
    raise ValueError(phase)
