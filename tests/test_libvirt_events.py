"""libvirt events -> machine events -> actions.

No root: every recorded sequence (tests/fixtures/libvirt/*.json, real events of two libvirt 9.0 daemons,
re-recorded by `python -m srmig.testbed.libvirtd record`) is replayed through translate() and the Machine.
The `libvirt` tier brings up two private libvirtd daemons in namespaces, migrates the guest live once and
checks the same on the events it records.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from srmig.ctl.libvirt_events import translate
from srmig.ctl.machine import DelVm, Drain, Ev, KeepTap, Machine, Publish, ReturnHeld, SetVm, StartGrace, Unpark
from srmig.ctl.phases import HostSids, Phase
from srmig.bpf.abi import VmState

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "libvirt"
S = HostSids("S", dx6="fc00:0:1::d6", end_s="fc00:0:1::5", sbuf="fc00:0:1::b")
D = HostSids("D", dx6="fc00:0:2::d6", end_s="fc00:0:2::5", sbuf="fc00:0:2::b")
VM = "2001:db8:100::10"

PROVISION = [SetVm("D", VM, VmState.INCOMING), KeepTap("D", VM), KeepTap("S", VM),
             SetVm("S", VM, VmState.RUNNING, shadow=True),
             Publish(VM, (S.end_s, D.sbuf), 1, ack=True)]
PAUSE = [Drain("S", VM, D.dx6)]
RESUME = [SetVm("D", VM, VmState.RUNNING)]
CUT_OVER = [Publish(VM, (D.dx6,), 2), SetVm("S", VM, VmState.AWAY, next_sid=D.dx6), StartGrace(VM, 2.0)]
ABORT = [SetVm("S", VM, VmState.RUNNING), ReturnHeld("D", VM, (S.sbuf,)), Publish(VM, (S.dx6,), 2),
         DelVm("D", VM)]
# after the pause the source parks until D's held packets are back (at its End.SBUF), then delivers in order
ABORT_PARKED = [SetVm("S", VM, VmState.RUNNING, park=True), ReturnHeld("D", VM, (S.sbuf,)), Unpark("S", VM),
                Publish(VM, (S.dx6,), 2), DelVm("D", VM)]

E = Ev
# fixture -> (machine events translate() yields, in order; actions the machine takes)
EXPECTED = {
    "precopy": ([E.BEGIN, E.SUSPENDED, E.RESUMED, E.STOPPED], PROVISION + PAUSE + RESUME + CUT_OVER),
    # SUSPENDED/MIGRATED then SUSPENDED/POSTCOPY on S; RESUMED/POSTCOPY then RESUMED/MIGRATED on D
    "postcopy": ([E.BEGIN, E.SUSPENDED, E.SUSPENDED, E.RESUMED, E.RESUMED, E.STOPPED],
                 PROVISION + PAUSE + RESUME + CUT_OVER),
    # abortJob before the pause: only D's STOPPED/FAILED says so
    "abort": ([E.BEGIN, E.FAILED], PROVISION + ABORT),
    # D's QEMU killed at the pause: S RESUMED/UNPAUSED, then D STOPPED/FAILED (a duplicate for the machine)
    "abort-kill-dest": ([E.BEGIN, E.SUSPENDED, E.FAILED, E.FAILED], PROVISION + PAUSE + ABORT_PARKED),
}


def load(name: str) -> list[dict]:
    return json.loads((FIXTURES / f"{name}.json").read_text())


def replay(events: list[dict]) -> tuple[list[Ev], list, Machine]:
    m = Machine(grace_s=2.0)
    m.start(VM, S, D)
    evs, actions = [], []
    for e in events:
        ev = translate(e["daemon"], e)
        if ev is not None:
            evs.append(ev)
            actions += m.handle(VM, ev)
    return evs, actions, m


def check_success(actions: list, m: Machine) -> None:
    """Reaches cut-over with exactly one Drain, the ingress published twice (migration path, then D)."""
    assert m.migrations[VM].phase is Phase.CUT_OVER
    assert [a for a in actions if isinstance(a, Drain)] == PAUSE
    pubs = [a for a in actions if isinstance(a, Publish)]
    assert [(p.segments, p.version, p.ack) for p in pubs] == [((S.end_s, D.sbuf), 1, True), ((D.dx6,), 2, False)]
    # D runs the VM before the ingress moves to it; the source forwards stragglers afterwards
    assert actions.index(SetVm("D", VM, VmState.RUNNING)) < actions.index(pubs[1])
    assert m.handle(VM, Ev.GRACE_OVER) == [DelVm("S", VM)]


def check_abort(actions: list, m: Machine) -> None:
    """Ends with the source RUNNING, the ingress back on S, the destination's entry deleted."""
    assert m.migrations[VM].phase is Phase.ABORT and m.migrations[VM].done
    assert actions[-len(ABORT):] == ABORT or actions[-len(ABORT_PARKED):] == ABORT_PARKED
    assert [a for a in actions if isinstance(a, Drain)] in ([], PAUSE)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_fixture_replay(name):
    events = load(name)
    evs, actions, m = replay(events)
    exp_evs, exp_actions = EXPECTED[name]
    assert evs == exp_evs
    assert actions == exp_actions
    if name.startswith("abort"):
        check_abort(actions, m)
    else:
        check_success(actions, m)


def test_every_fixture_is_covered_and_well_formed():
    names = {p.stem for p in FIXTURES.glob("*.json")}
    assert names == set(EXPECTED)
    for name in names:
        events = load(name)
        ts = [e["t"] for e in events]
        assert ts == sorted(ts), name
        for e in events:
            assert e["daemon"] in ("S", "D")
            assert e["event"] in ("lifecycle", "job-completed", "migration-iteration")
            assert isinstance(e["type"], str) and isinstance(e["detail"], str)


def test_recorded_timing_is_plausible():
    """The order the phases table relies on: D's QEMU exists before the pause; the pause comes before D
    resumes; the source is stopped last; a successful job reports its downtime."""
    for name in ("precopy", "postcopy"):
        ev = load(name)

        def first(daemon, typ, detail=None, kind="lifecycle"):
            return next(e["t"] for e in ev if e["daemon"] == daemon and e["event"] == kind and e["type"] == typ
                        and (detail is None or e["detail"] == detail))
        assert first("D", "STARTED", "MIGRATED") < first("S", "SUSPENDED") < first("D", "RESUMED") \
            < first("S", "STOPPED", "MIGRATED")
        job = next(e for e in ev if e["event"] == "job-completed")
        assert job["daemon"] == "S" and 0 <= job["params"]["downtime"] < 1000


def lc(typ, detail, daemon="S"):
    return {"daemon": daemon, "t": 0.0, "event": "lifecycle", "type": typ, "detail": detail}


@pytest.mark.parametrize("role,event,expected", [
    ("D", lc("STARTED", "MIGRATED"), Ev.BEGIN),
    ("S", lc("STARTED", "MIGRATED"), None),
    ("D", lc("STARTED", "BOOTED"), None),
    ("S", lc("SUSPENDED", "MIGRATED"), Ev.SUSPENDED),
    ("S", lc("SUSPENDED", "POSTCOPY"), Ev.SUSPENDED),
    ("S", lc("SUSPENDED", "PAUSED"), None),
    ("D", lc("SUSPENDED", "MIGRATED"), None),
    ("D", lc("RESUMED", "MIGRATED"), Ev.RESUMED),
    ("D", lc("RESUMED", "POSTCOPY"), Ev.RESUMED),
    ("D", lc("RESUMED", "UNPAUSED"), None),
    ("S", lc("RESUMED", "UNPAUSED"), Ev.FAILED),
    ("S", lc("RESUMED", "MIGRATED"), Ev.FAILED),
    ("S", lc("STOPPED", "MIGRATED"), Ev.STOPPED),
    ("S", lc("STOPPED", "DESTROYED"), None),
    ("D", lc("STOPPED", "FAILED"), Ev.FAILED),
    ("D", lc("STOPPED", "DESTROYED"), Ev.FAILED),
    ("D", lc("STOPPED", "MIGRATED"), None),
    ("S", {"event": "job-completed", "type": "COMPLETED", "detail": "MIGRATION_OUT"}, None),
    ("S", {"event": "migration-iteration", "type": "ITERATION", "detail": "2"}, None),
    ("S", {"event": "job-failed", "type": "CANCELLED", "detail": "canceled by client"}, Ev.FAILED),
])
def test_translate(role, event, expected):
    assert translate(role, event) is expected


def test_translate_rejects_unknown_role():
    with pytest.raises(ValueError):
        translate("X", lc("STARTED", "MIGRATED"))


@pytest.mark.libvirt
def test_live_migration_between_two_daemons():
    """Two private libvirtd in namespaces S and D, the guest booted on S, one p2p live migration over the
    management link; the recorded events drive the machine to cut-over, and the guest answers on D.

    The agent's link to S's daemon (LibvirtLink) also hears QEMU's own STOP of the pause, with QEMU's time:
    after the migration started, before the link heard libvirt's SUSPENDED, and close to it."""
    import time  # noqa: PLC0415

    import libvirt  # noqa: PLC0415

    from srmig.ctl.libvirt_link import LibvirtLink  # noqa: PLC0415
    from srmig.ctl.work import Lifecycle  # noqa: PLC0415
    from srmig.testbed import libvirtd  # noqa: PLC0415
    from srmig.testbed.netns import Topology  # noqa: PLC0415

    checks = {}

    def on_dest(rec, sconn, dconn):
        checks["ping_d"] = libvirtd.guest_ping(libvirtd_d, "srmig-vm", timeout=10)
        dom = dconn.lookupByName("srmig-vm")
        checks["state_d"] = dom.state()
        checks["tap_s"] = topo.run("S", "ip", "link", "show", "vmtap", check=False).returncode

    with Topology() as topo:
        topo.add_host("S")
        topo.add_host("D")
        topo.link("S", "mg0", "D", "mg0", "fd00:99::1/64", "fd00:99::2/64")
        with libvirtd.daemons(topo) as ds:
            libvirtd_d = ds["D"]
            heard = []
            # Each item the link enqueues, with the QEMU STOPs it had recorded by then.
            link = LibvirtLink(ds["S"].uri, lambda item: heard.append((item, dict(link.qemu_stops))))
            link.start()
            try:
                deadline = time.monotonic() + 10
                while link.state != "connected" and time.monotonic() < deadline:
                    time.sleep(0.01)
                t_start = time.monotonic_ns()
                rec = libvirtd.record("precopy", topo, ds, timeout=60, keep=on_dest)
            finally:
                link.close()
    assert rec.error == ""
    assert rec.running_on == "D"
    assert rec.migration_s < 30
    assert checks["state_d"] == [libvirt.VIR_DOMAIN_RUNNING, libvirt.VIR_DOMAIN_RUNNING_MIGRATED]
    assert checks["ping_d"] < 5
    assert checks["tap_s"] == 0  # managed='no': the source's tap survives (a migration back needs it)
    evs, actions, m = replay(rec.events)
    assert evs == [E.BEGIN, E.SUSPENDED, E.RESUMED, E.STOPPED]
    assert actions == PROVISION + PAUSE + RESUME + CUT_OVER
    check_success(actions, m)
    suspended = [(item.t_ns, stops) for item, stops in heard
                 if isinstance(item, Lifecycle) and (item.domain, item.type) == ("srmig-vm", "SUSPENDED")]
    assert suspended, heard
    t_heard, stops_then = suspended[0]
    stop = link.qemu_stopped_ns("srmig-vm", t_heard)
    assert stop is not None, link.qemu_stops
    assert stops_then.get("srmig-vm") == stop, "QEMU's STOP should be recorded before SUSPENDED is heard"
    assert t_start < stop <= t_heard, (t_start, stop, t_heard)
    assert t_heard - stop < 1e9, "QEMU's STOP time should be the pause's, not another clock's"
    print(f"[qemu STOP] SUSPENDED heard {(t_heard - stop) / 1e6:.2f} ms after QEMU stopped")
