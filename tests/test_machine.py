"""The migration state machine, pure logic: event sequences in, actions out. Each row names a sequence (as
libvirt or QMP deliver them: in order, duplicated, out of order, aborted, post-copy) and the actions
expected, in order."""

from __future__ import annotations

import pytest

from srmig.ctl.machine import DelVm, Drain, Ev, KeepTap, Machine, Publish, ReturnHeld, SetVm, StartGrace, Unpark
from srmig.ctl.phases import HostSids
from srmig.bpf.abi import VmState

S = HostSids("S", dx6="fc00:0:1::d6", end_s="fc00:0:1::5", sbuf="fc00:0:1::b")
D = HostSids("D", dx6="fc00:0:2::d6", end_s="fc00:0:2::5", sbuf="fc00:0:2::b")
VM = "2001:db8:100::10"
T = ("fc00:0:3::e",)

PROVISION = [SetVm("D", VM, VmState.INCOMING), KeepTap("D", VM), KeepTap("S", VM),
             SetVm("S", VM, VmState.RUNNING, shadow=True),
             Publish(VM, ("fc00:0:1::5", "fc00:0:3::e", "fc00:0:2::b"), 1, ack=True)]
PAUSE = [Drain("S", VM, "fc00:0:2::d6")]
RESUME = [SetVm("D", VM, VmState.RUNNING)]
CUT_OVER = [Publish(VM, ("fc00:0:2::d6",), 2), SetVm("S", VM, VmState.AWAY, next_sid="fc00:0:2::d6"),
            StartGrace(VM, 2.0)]
ABORT = [SetVm("S", VM, VmState.RUNNING), ReturnHeld("D", VM, ("fc00:0:1::b",)),
         Publish(VM, ("fc00:0:1::d6",), 2), DelVm("D", VM)]
# After the pause the source forwarded to D: it parks until D's held packets are back, then delivers in order.
ABORT_PARKED = [SetVm("S", VM, VmState.RUNNING, park=True), ReturnHeld("D", VM, ("fc00:0:1::b",)),
                Unpark("S", VM), Publish(VM, ("fc00:0:1::d6",), 2), DelVm("D", VM)]

E = Ev
CASES = [
    ("pre-copy, in order", [E.BEGIN, E.SUSPENDED, E.RESUMED, E.STOPPED, E.GRACE_OVER],
     PROVISION + PAUSE + RESUME + CUT_OVER + [DelVm("S", VM)]),
    ("post-copy: SUSPENDED_POSTCOPY, RESUMED_POSTCOPY map to the same events",
     [E.BEGIN, E.SUSPENDED, E.RESUMED, E.STOPPED], PROVISION + PAUSE + RESUME + CUT_OVER),
    ("every event twice", [E.BEGIN, E.BEGIN, E.SUSPENDED, E.SUSPENDED, E.RESUMED, E.RESUMED, E.STOPPED, E.STOPPED],
     PROVISION + PAUSE + RESUME + CUT_OVER),
    ("RESUMED before SUSPENDED (two daemons): the pause is implied, the late event ignored",
     [E.BEGIN, E.RESUMED, E.SUSPENDED, E.STOPPED], PROVISION + PAUSE + RESUME + CUT_OVER),
    ("only STOPPED seen (agent restarted mid-migration): every phase walked in order",
     [E.BEGIN, E.STOPPED], PROVISION + PAUSE + RESUME + CUT_OVER),
    ("abort before the pause", [E.BEGIN, E.FAILED], PROVISION + ABORT),
    ("abort after the pause: the source takes the VM back", [E.BEGIN, E.SUSPENDED, E.FAILED],
     PROVISION + PAUSE + ABORT_PARKED),
    ("events after an abort do nothing", [E.BEGIN, E.FAILED, E.SUSPENDED, E.RESUMED], PROVISION + ABORT),
    ("failure after cut-over is too late to abort", [E.BEGIN, E.SUSPENDED, E.RESUMED, E.STOPPED, E.FAILED],
     PROVISION + PAUSE + RESUME + CUT_OVER),
    ("grace period before cut-over does nothing", [E.BEGIN, E.GRACE_OVER, E.SUSPENDED], PROVISION + PAUSE),
    ("events for an unknown VM do nothing", [], []),
]


@pytest.mark.parametrize("desc,events,expected", CASES, ids=[c[0] for c in CASES])
def test_sequence(desc, events, expected):
    m = Machine(grace_s=2.0)
    m.start(VM, S, D, T)
    actions = [a for ev in events for a in m.handle(VM, ev)]
    assert actions == expected


def test_without_drain_the_pause_flips_to_away():
    m = Machine(drain=False)
    m.start(VM, S, D, T)
    m.handle(VM, Ev.BEGIN)
    assert m.handle(VM, Ev.SUSPENDED) == [SetVm("S", VM, VmState.AWAY, next_sid="fc00:0:2::d6")]


def test_unknown_vm_is_ignored():
    assert Machine().handle("2001:db8::99", Ev.SUSPENDED) == []


def test_many_concurrent_migrations_stay_apart():
    """100 VMs migrating at once, their events interleaved: each gets exactly its own actions."""
    m = Machine()
    vms = [f"2001:db8:100::{i:x}" for i in range(1, 101)]
    for vm in vms:
        m.start(vm, S, D, T)
    per_vm: dict[str, list] = {vm: [] for vm in vms}
    for ev in (Ev.BEGIN, Ev.SUSPENDED, Ev.RESUMED, Ev.STOPPED):
        for vm in reversed(vms) if ev is Ev.RESUMED else vms:
            per_vm[vm] += m.handle(vm, ev)
    for vm in vms:
        assert [type(a).__name__ for a in per_vm[vm]] == [
            "SetVm", "KeepTap", "KeepTap", "SetVm", "Publish", "Drain", "SetVm", "Publish", "SetVm", "StartGrace"]
        assert all(getattr(a, "vm", vm) == vm for a in per_vm[vm])


def test_a_new_migration_after_one_ended():
    m = Machine()
    m.start(VM, S, D, T)
    for ev in (Ev.BEGIN, Ev.SUSPENDED, Ev.RESUMED, Ev.STOPPED, Ev.GRACE_OVER):
        m.handle(VM, ev)
    m.start(VM, D, S, T)  # and back again
    assert m.handle(VM, Ev.BEGIN)[0] == SetVm("S", VM, VmState.INCOMING)
