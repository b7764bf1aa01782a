"""The soak (srmig/testbed/soak.py): the guest migrated back and forth on one testbed, a fault in some of the
migrations, and the agents' resources compared before and after."""

from __future__ import annotations

import pytest

from srmig.testbed import soak


def snap(pinned=10, keeper=0, **agents) -> dict:
    return {"agents": {r: {"pid": pid, "fds": fds, "rss_kb": rss} for r, (pid, fds, rss) in agents.items()},
            "pinned": pinned, "fd_keeper_holds": keeper}


@pytest.mark.parametrize("warm,end,expected", [
    (snap(S=(1, 20, 50000)), snap(S=(1, 20 + soak.FD_SLACK, 50000 + soak.RSS_SLACK_KB)), []),
    (snap(S=(1, 20, 50000)), snap(S=(1, 21 + soak.FD_SLACK, 50000)), ["agent S: 20 -> 25 open fds"]),
    (snap(S=(1, 20, 50000)), snap(S=(1, 20, 50001 + soak.RSS_SLACK_KB)), ["agent S: 50000 -> 66385 kB resident"]),
    (snap(S=(1, 20, 50000)), snap(S=(2, 90, 99999)), []),   # restarted by a fault: another process
    (snap(), snap(pinned=11), ["pinned BPF objects: 10 -> 11"]),
    (snap(), snap(keeper=2), ["the fd keeper still holds 2 tap fds"]),
])
def test_what_counts_as_a_leak(warm, end, expected):
    assert soak.leaks(snap(), warm, end) == expected


@pytest.mark.libvirt
def test_a_short_soak_with_a_fault():
    """Three migrations: S -> D with the source's agent SIGKILLed at the pause, D -> S plain, S -> D with the
    same fault again (the fd keeper serves the second restart as the first). Each ends with the VM on its
    destination, nothing duplicated, nothing lost but the frame the pausing QEMU may swallow when the agent
    dies (its count died with it: docs/faults.md); D's and C's agents hold no more fds or memory at the end
    than after the first migration, the pins are those of the start, and the fd keeper holds nothing."""
    rep = soak.soak(3, seed=1, fault_share=1.0, faulted=["source-agent-kill@pause"])
    assert rep["error"] is None, rep
    legs = rep["legs"]
    assert [(leg["src"], leg["dst"], leg["vm_on"]) for leg in legs] == [("S", "D", "D"), ("D", "S", "S"),
                                                                     ("S", "D", "D")], legs
    assert [leg["fault"] for leg in legs] == ["source-agent-kill@pause", None, "source-agent-kill@pause"]
    assert all(leg["duplicated"] == 0 for leg in legs), legs
    assert legs[0]["lost_net"] <= 2 and legs[1]["lost_net"] == 0 and legs[2]["lost_net"] <= 2, legs
    assert rep["leaks"] == [], rep["resources"]
    assert set(rep["resources"]["end"]["agents"]) == {"S", "D", "C"}
