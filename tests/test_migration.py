"""A real QEMU guest really migrating S -> D under probe traffic, on the namespace testbed.

The reactive baseline must lose probes: that proves the harness can see loss. srmig must lose none,
duplicate none and reorder none. That includes the frame QEMU itself swallows at the pause: QEMU 7.2's
tap_send() reads one frame after the VM stopped and keeps it in its own net queue, which is not migrated.
srmig re-sends it from its shadow log. `srmig-no-drain` shows what is lost without the drain.

Loss is counted as the probe sees it less what the guest's own counters say it received and left unanswered
(Run.unanswered: under load its kernel drops replies it cannot send yet); the probe's `lost` alone would
charge the guest's reply path to the network.
"""

from __future__ import annotations

import pytest

from srmig.testbed import demo
from srmig.testbed.strategies import make

pytestmark = [pytest.mark.vm, pytest.mark.bpf, pytest.mark.netns]

RATE = 2000
COUNT = 6000


@pytest.fixture(scope="module")
def runs():
    return {name: demo.run_one(make(name), RATE, COUNT) for name in ("reactive", "srmig")}


def test_reactive_loses_probes(runs):
    r = runs["reactive"].report
    assert r.sent == COUNT
    assert r.lost - runs["reactive"].unanswered() >= 10, \
        "the baseline must lose what arrives at S between pause and switch"
    assert r.blackout_ms >= 5


def test_srmig_loses_nothing(runs):
    run = runs["srmig"]
    r = run.report
    assert r.sent == COUNT
    assert (r.lost - run.unanswered(), r.duplicated, r.reordered) == (0, 0, 0), (run.to_dict(), run.drain)
    # QEMU's own downtime (its stop to the end of its migration, in whole ms) lies within the migration, and the
    # probe saw it: a stopped guest answers nothing, so no reply reached the probe for at least that long.
    # QEMU 7.2 reports "completed" before it fills in its times: a query in between reads 0 for both (1 run in 6).
    assert run.downtime_ms is not None and run.total_ms is not None, run.to_dict()
    if run.total_ms:
        assert 0 < run.downtime_ms < run.total_ms, run.to_dict()
        assert r.max_rx_gap_ms >= run.downtime_ms - 1, (r.max_rx_gap_ms, run.to_dict())
    else:
        assert run.downtime_ms == 0, run.to_dict()
    # The recovery really ran: QEMU's counters were read and every frame it kept was re-sent.
    assert run.drain["swallowed"] is not None
    assert run.drain["resent_swallowed"] == run.drain["swallowed"]


def test_srmig_delivers_every_probe_to_the_guest(runs):
    """The guest's own ICMPv6 counter (read on D after the move) agrees with the probe's view."""
    run = runs["srmig"]
    got = run.guest.get("Icmp6InEchos")
    assert got is not None
    assert got == run.report.sent - (run.report.lost - run.unanswered())


def test_srmig_with_a_slow_agent_loses_nothing():
    """Every reaction 50 ms late (docs/design.md, window 2, made wide): the paused QEMU's tap queue now holds ~100
    probes when the agent acts; the drain still delivers all of them, in order."""
    run = demo.run_one(make("srmig"), RATE, COUNT, event_delay_s=0.05)
    r = run.report
    assert (r.lost - run.unanswered(), r.duplicated, r.reordered) == (0, 0, 0), (run.to_dict(), run.drain)
    assert run.drain["from_tap"] >= 20, "the delay must leave probes in the tap queue, or this proves nothing"


def test_srmig_abort_after_stop_and_copy_returns_what_d_held():
    """The destination QEMU dies after stop-and-copy (the source waits at pre-switchover, then cancels): what
    D held in its tap queue (kept alive by the agent's duplicate fd) goes back to S's End.SBUF, while S parks
    what arrives meanwhile (SRMIG_VM_F_PARK) and delivers it afterwards, in order (Unpark). Nothing
    duplicated, and nothing lost but, at most, the one frame the source QEMU swallowed at the pause: D skips
    it when returning (the source QEMU delivers the frame it holds when it resumes), and in about 1 run in
    15 under load QEMU had dropped it instead (CI, measured). Nothing reordered, except when QEMU swallowed
    two frames: it keeps the newer and delivers it at the resume, before D's copy of the older one is back
    (one reordered probe, physics of QEMU's queue)."""
    strategy = make("srmig")
    run = demo.run_abort(strategy, RATE, COUNT)
    r = run.report
    assert run.guest["status"] == "running"
    assert strategy.returned > 0, "D must have held something, or this proves nothing"
    assert strategy.unparked > 0, "S must have parked what arrived while D returned, or this proves nothing"
    lost = r.lost - run.unanswered()
    assert r.duplicated == 0 and lost <= min(1, run.drain["resent_swallowed"]), (run.to_dict(), run.drain)
    assert r.reordered <= max(0, run.drain["resent_swallowed"] - 1), (r.reordered_seqs, run.drain)
    assert run.guest["Icmp6InEchos"] >= COUNT - r.lost
