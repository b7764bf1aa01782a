"""The VM records the agents share: the schema over the embedded backend (no root), and 100 concurrent
migrations through two agent workers that exchange them through a watch on the database."""

from __future__ import annotations

import pytest


@pytest.fixture
def vmdb(tmp_path):
    from srmig.ctl import statedb
    from srmig.ctl.vmdb import VmDb

    kv = statedb.open_db("embedded", path=str(tmp_path / "state.db"))
    yield VmDb(kv)
    kv.close()


def test_publish_versions_and_dedupe(vmdb):
    assert vmdb.publish("2001:db8::10", "S", ["fc00:0:1::d6"], "steady") == 1
    assert vmdb.publish("2001:db8::10", "S", ["fc00:0:1::d6"], "steady") == 1  # nothing changed
    v = vmdb.publish("2001:db8::10", "S", ["fc00:0:1::5", "fc00:0:2::b"], "provision", "m1", 1)
    assert v == 2
    # The other end executes the same Publish: written once.
    assert vmdb.publish("2001:db8::10", "S", ["fc00:0:1::5", "fc00:0:2::b"], "provision", "m1", 1) == 2
    assert vmdb.publish("2001:db8::10", "D", ["fc00:0:2::d6"], "cut-over", "m1", 2) == 3
    # A late duplicate of an older step never overwrites a newer one.
    assert vmdb.publish("2001:db8::10", "S", ["fc00:0:1::5", "fc00:0:2::b"], "provision", "m1", 1) == 3
    rec = vmdb.vm("2001:db8::10")
    assert rec.host == "D" and rec.segments == ("fc00:0:2::d6",) and rec.version == 3


def test_wait_acks(vmdb):
    import threading

    lease = vmdb.kv.lease(30)
    vmdb.register_ingress("C1", lease)
    vmdb.register_ingress("C2", lease)
    v = vmdb.publish("2001:db8::10", "S", ["fc00:0:1::d6"], "steady")
    vmdb.ack("2001:db8::10", "C1", v)
    assert vmdb.wait_acks("2001:db8::10", v, 0.2) == ["C2"]
    threading.Timer(0.1, vmdb.ack, ("2001:db8::10", "C2", v)).start()
    assert vmdb.wait_acks("2001:db8::10", v, 5) == []
    lease.revoke()
    assert vmdb.wait_acks("2001:db8::10", v + 1, 0.1) == []  # no ingress registered: nobody to wait for


@pytest.mark.bpf
def test_hundred_concurrent_migrations(tmp_path):
    """100 VMs migrate S -> D at once through two agent workers (each with its own namespace, program and
    maps) exchanging events through a watch on the database: every VM ends running on D, in D's map and in
    the database, and gone from S's map after the grace period (bench.agent.load, without the timing)."""
    from bench import agent as bench_agent

    out = bench_agent.load(tmp_path, 100, None, grace_s=0.1)
    assert out["wrong_end_state"] == 0 and out["left_on_source"] == 0, out
