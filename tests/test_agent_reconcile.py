"""Reconciliation and replay in the real agent (srmig.ctl.reconcile, HostRole's migration records): libvirt's
test driver (test:///default, inside this process), the embedded state database in tmp_path and real maps (a
private namespace's srmig program, srmig.testbed.lab). The agent is built as bench/agent.py does, around the
lab's Dataplane and without its servers; its worker runs on a thread, and the database link and the libvirt
link are the agent's own (DbUp replays the records and starts libvirt's link, whose LibvirtUp reconciles)."""

from __future__ import annotations


import pytest

from srmig.bpf import abi
from srmig.bpf.abi import VmState
import time

from srmig.ctl import records, reconcile, statedb, status, work
from srmig.ctl.agent import Agent
from srmig.ctl.libvirt_link import metadata_xml
from srmig.ctl.machine import Ev
from srmig.ctl.maps import ffi
from srmig.ctl.phases import HostSids, Phase
from srmig.ctl.vmdb import VmDb
from srmig.testbed import lab as L

import agent_lab  # tests/ is on sys.path (rootdir conftest)
from agent_lab import applied, on_worker, running, unreachable

lab, maps, conn = agent_lab.lab, agent_lab.maps, agent_lab.conn  # fixtures

libvirt = pytest.importorskip("libvirt", reason="libvirt-python not installed")
pytestmark = [pytest.mark.bpf, pytest.mark.netns]

# This host is S, its SIDs the lab's (locator + d6/5/b); its peer D.
CFG = """[host]
name = "S"
fabric = "lo"
locator = "fc00:0:1::/48"
address = "2001:db8:f::1"
sr_domain = ["2001:db8:f::/64"]
libvirt_uri = "test:///default"
qemu_run_dir = "{tmp}"
grace_s = 0.1
[db]
path = "{tmp}/state.db"
[hook]
socket = "{tmp}/agent.sock"
[metrics]
listen = ""
"""
D = HostSids("D", "fc00:0:2::d6", "fc00:0:2::5", "fc00:0:2::b")
VM = "2001:db8:100::10"
MID = "mig-1"


def record(vm: str, src: str, dst: str, domain: str, events: list[str]) -> dict:
    """A migrations/<host>/<vm> record, shaped as HostRole._record writes it."""
    return {"id": MID, "vm": vm, "domain": domain, "src": src, "dst": dst, "transit": [], "events": events,
            "resent": [], "returned": None}


def generation(dp) -> int:
    """The program's table generation: bumped by every write to its SID or VM table."""
    return dp.meta.lookup(ffi.new("uint32_t *", abi.META_TABLE_GENERATION))


def domain_xml(name: str, *addresses: str) -> str:
    meta = f"<metadata>{metadata_xml(*addresses)}</metadata>" if addresses else ""
    return f"<domain type='test'><name>{name}</name><memory>8192</memory><os><type>hvm</type></os>{meta}</domain>"


def define(conn, name: str, *addresses: str):
    """A running test-driver domain, managed by srmig when it has addresses (the first its id)."""
    dom = conn.defineXML(domain_xml(name, *addresses))
    dom.create()
    return dom


def make_agent(lab, tmp_path, libvirt_factory) -> Agent:
    return agent_lab.make_agent(lab, tmp_path, libvirt_factory, CFG, "test_agent_reconcile")


class RecoveringLibvirtd:
    """The test driver seen through a restarted libvirtd that recovers `name`'s outgoing migration: the
    domain, paused, says PAUSED/MIGRATION (the test driver cannot migrate: its pauses say PAUSED/USER), and
    its resume comes without a lifecycle event. Everything else is the test driver's own."""

    def __init__(self, conn, name: str):
        self._conn, self._name = conn, name

    def __getattr__(self, attr):
        return getattr(self._conn, attr)

    def listAllDomains(self, flags=0):  # noqa: N802 - libvirt's name
        return [_PausedByMigration(d) if d.name() == self._name else d for d in self._conn.listAllDomains(flags)]

    def domainEventRegisterAny(self, dom, event_id, cb, opaque):  # noqa: N802 - libvirt's name
        def others_only(conn, d, *args):
            if d.name() != self._name:
                cb(conn, d, *args)
        return self._conn.domainEventRegisterAny(dom, event_id, others_only, opaque)


class _PausedByMigration:
    def __init__(self, dom):
        self._dom = dom

    def __getattr__(self, attr):
        return getattr(self._dom, attr)

    def state(self, flags=0):
        state, reason = self._dom.state(flags)
        return (state, libvirt.VIR_DOMAIN_PAUSED_MIGRATION) if state == libvirt.VIR_DOMAIN_PAUSED else (state, reason)


@pytest.fixture
def db(tmp_path):
    """The database the agent will use, its peer D registered."""
    kv = statedb.open_db("embedded", path=str(tmp_path / "state.db"))
    vmdb = VmDb(kv)
    vmdb.put_host(D, "2001:db8:f::2", ())
    yield vmdb
    kv.close()


def test_running_domain_is_delivered_here_and_published(lab, maps, conn, db, tmp_path):
    """A managed domain runs, the map and the database know nothing of it (a cold start): reconciliation
    delivers it here and publishes its End.DX6 SID; a domain without srmig metadata is not ours; a second
    reconciliation finds nothing to fix."""
    define(conn, "srmig-rec-managed", VM)
    define(conn, "srmig-rec-plain")
    a = make_agent(lab, tmp_path, libvirt.open)
    ups = applied(a, work.LibvirtUp)
    with running(a, lab):
        ups.get(timeout=10)
        a.dbl.write(lambda: None).result(10)  # what reconciliation queued for the database is in
        assert [(e.vm, e.state, e.shadow) for e in maps.list_vms()] == [(VM, VmState.RUNNING, False)]
        rec = db.vm(VM)
        assert (rec.host, rec.segments) == ("S", (L.SID_DX6,)) and a.host.sids.dx6 == L.SID_DX6
        assert set(a.host.domains) == {"srmig-rec-managed"}
        gen = generation(maps)
        again = on_worker(a, reconcile.reconcile, a.host, conn)
        a.dbl.write(lambda: None).result(10)
        assert (again["vms"], again["fixed"]) == (1, 0)
        assert generation(maps) == gen and db.vm(VM).version == rec.version


def test_map_entries_nothing_explains_are_removed(lab, maps, conn, db, tmp_path):
    """Entries for VMs libvirt does not have: one in no migration is deleted; an AWAY one (it forwards
    stragglers) stays until a Forget a grace period later; one of a migration in flight stays."""
    gone, away, incoming = "2001:db8:100::71", "2001:db8:100::72", "2001:db8:100::73"
    maps.set_vm(gone, VmState.RUNNING)
    maps.set_vm(away, VmState.AWAY, next_sid=D.dx6)
    db.put_migration(incoming, "D", record(incoming, "D", "S", "srmig-rec-incoming", ["begin"]))  # D -> here
    a = make_agent(lab, tmp_path, libvirt.open)
    ups = applied(a, work.LibvirtUp)
    forgets = applied(a, work.Forget, before=lambda item: maps.get_vm(item.vm),
                      after=lambda item: maps.get_vm(item.vm))
    with running(a, lab):
        ups.get(timeout=10)
        assert maps.get_vm(gone) is None
        assert maps.get_vm(incoming).state is VmState.INCOMING
        item, before, after = forgets.get(timeout=10)
        assert item == work.Forget(away)
        assert (before.state, before.next_sid) == (VmState.AWAY, D.dx6), "kept by reconciliation"
        assert after is None, "deleted once its grace period is over"
        assert maps.get_vm(incoming).state is VmState.INCOMING and forgets.empty()


def test_replay_after_a_restart_applies_only_the_last_map_write(lab, maps, db, tmp_path):
    """The source restarts after the pause (its drain done, its record saying so) and the destination's
    resume: replaying its own record, the agent writes the map once, the last step's state. Replaying each
    step would take the map back in time meanwhile (provision: deliver to a QEMU that is gone) and run a drain
    of a tap queue that is gone. libvirt is unreachable here: the replay alone."""
    db.put_migration(VM, "S", record(VM, "S", "D", "srmig-rec-vm", ["begin", "suspended"]))
    db.put_migration(VM, "D", record(VM, "S", "D", "srmig-rec-vm", ["begin", "resumed"]))
    maps.set_vm(VM, VmState.AWAY, next_sid=D.dx6)  # what the drain left before the restart
    gen = generation(maps)
    a = make_agent(lab, tmp_path, unreachable)
    ups = applied(a, work.DbUp)
    with running(a, lab):
        ups.get(timeout=10)
        e = maps.get_vm(VM)
        assert (e.state, e.next_sid, e.shadow, e.ring_first) == (VmState.AWAY, D.dx6, False, False)
        assert generation(maps) == gen + 2, "one map write (its two bumps): neither the provision state nor a drain"
        assert a.host.machine.migrations[VM].phase is Phase.RESUMED
        assert a.host.executor.vms[VM].drain is None


def test_source_paused_by_its_migration_is_rechecked_until_it_runs(lab, maps, conn, db, tmp_path):
    """The source restarts mid-migration and finds its domain paused by the migration that libvirtd (restarted
    too) recovers: it drains (the pause nobody heard) and polls the domain, which resumes without an event.
    The next recheck says the migration failed: the VM is back on the source, the ingresses too."""
    name = "srmig-rec-paused"
    db.put_migration(VM, "S", record(VM, "S", "D", name, ["begin"]))
    db.put_migration(VM, "D", record(VM, "S", "D", name, ["begin"]))
    dom = define(conn, name, VM)
    dom.suspend()
    a = make_agent(lab, tmp_path, lambda uri: RecoveringLibvirtd(libvirt.open(uri), name))
    ups = applied(a, work.LibvirtUp)
    rechecks = applied(a, work.Recheck, after=lambda item: Ev.FAILED in a.host.track(item.vm).seen)
    with running(a, lab):
        ups.get(timeout=10)
        m = a.host.machine.migrations[VM]
        e = maps.get_vm(VM)
        assert (m.phase, e.state, e.next_sid) == (Phase.STOP_AND_COPY, VmState.AWAY, D.dx6)
        polls = [rechecks.get(timeout=10) for _ in range(2)]
        assert polls == [(work.Recheck(VM, MID), None, False)] * 2, "paused: polled again, nothing decided"
        dom.resume()
        for _ in range(100):
            item, _, failed = rechecks.get(timeout=10)
            if failed:
                break
        assert failed and item == work.Recheck(VM, MID)
        assert (m.phase, m.done) == (Phase.ABORT, True)
        assert maps.get_vm(VM).state is VmState.RUNNING
        a.dbl.write(lambda: None).result(10)
        assert db.migrations()[0][VM]["S"]["events"][-2:] == ["suspended", "failed"]
        rec = db.vm(VM)
        assert (rec.host, rec.segments, rec.phase) == ("S", (L.SID_DX6,), "abort")


@pytest.mark.parametrize("action", ["pause", "destroy"])
def test_destination_copy_running_after_the_source_failed_is_fenced(lab, maps, conn, db, tmp_path, action):
    """A split brain: the VM migrated from D to here and resumed here, then the source's record says the
    migration failed (libvirt resumed D's copy: its libvirtd lost track of ours when ours restarted). Our
    copy, still running, is paused (host.fence's default) or destroyed once our libvirt answers
    (reconciliation), not published as running here; the status says so. Once per migration: a paused copy
    the operator resumes stays running."""
    name = "srmig-rec-fenced"
    db.put_migration(VM, "D", record(VM, "D", "S", name, ["begin", "suspended", "failed"]))  # the source's
    db.put_migration(VM, "S", record(VM, "D", "S", name, ["begin", "resumed"]))              # ours
    dom = define(conn, name, VM)
    cfg = CFG if action == "pause" else CFG.replace("grace_s = 0.1\n", 'grace_s = 0.1\nfence = "destroy"\n')
    a = agent_lab.make_agent(lab, tmp_path, libvirt.open, cfg, "test_agent_reconcile")
    assert a.cfg.host.fence == action
    ups = applied(a, work.LibvirtUp)
    try:
        with running(a, lab):
            ups.get(timeout=10)
            want = libvirt.VIR_DOMAIN_PAUSED if action == "pause" else libvirt.VIR_DOMAIN_SHUTOFF
            assert dom.state()[0] == want
            m = a.host.machine.migrations[VM]
            assert (m.phase, m.done) == (Phase.ABORT, True)
            f = a.host.fenced[VM]
            assert (f["domain"], f["migration"], f["source"], f["action"], f["done"]) == (name, MID, "D", action,
                                                                                         True)
            a.dbl.write(lambda: None).result(10)
            assert db.vm(VM).host == "D", "the VM lives on the source: not published here"
            assert maps.get_vm(VM) is None or maps.get_vm(VM).state is not VmState.RUNNING
            st = on_worker(a, status.agent_status, a)
            assert list(st["fenced"]) == [VM] and st["fenced"][VM]["done"]
            if action == "pause":
                dom.resume()  # the operator's choice: this copy lives
                on_worker(a, reconcile.reconcile, a.host, conn)
                assert dom.state()[0] == libvirt.VIR_DOMAIN_RUNNING, "fenced once per migration"
    finally:
        if dom.isActive():
            dom.destroy()
        dom.undefine()


def test_incoming_domain_gone_in_precopy_fails_the_migration(lab, maps, conn, db, tmp_path):
    """This host is the destination; its incoming QEMU started (STARTED/MIGRATED), then went in pre-copy
    without an event (its libvirtd killed: the new one ends the incoming QEMU). The next reconciliation
    says the migration failed: the window ends here at once (the source runs the VM and sent us nothing, so
    nothing waits for its word), our record says "failed", the entry goes. Before, the window stayed open
    and the kept tap fds kept every later QEMU from opening the tap."""
    db.put_migration(VM, "D", record(VM, "D", "S", "srmig-rec-gone", []))  # the source's record
    a = make_agent(lab, tmp_path, libvirt.open)
    ups = applied(a, work.LibvirtUp)
    with running(a, lab):
        ups.get(timeout=10)
        on_worker(a, a.host.local_event, VM, Ev.BEGIN, time.monotonic_ns(), "STARTED/MIGRATED")
        a.host.track(VM).started = True  # (what on_lifecycle sets for STARTED on the destination)
        assert maps.get_vm(VM).state is VmState.INCOMING
        on_worker(a, reconcile.reconcile, a.host, conn)  # the domain is not in libvirt
        m = a.host.machine.migrations[VM]
        assert (m.phase, m.done) == (Phase.ABORT, True)
        assert a.host.track(VM).deferred == []
        assert maps.get_vm(VM) is None
        a.dbl.write(lambda: None).result(10)
        assert db.migrations()[0][VM]["S"]["events"] == ["begin", "failed"]


# --- a VM is a set of addresses: dual-stack VMs ------------------------------------------------------------

# A dual-stack VM: its id (the first address), another IPv6 address, an IPv4 one (the VM map keys it as
# ::ffff:10.0.0.10, srmig_abi.h).
DUAL = (VM, "2001:db8:200::10", "10.0.0.10")


def states(dp, addresses) -> dict:
    return {a: (e.state, e.next_sid, e.shadow) if (e := dp.get_vm(a)) else None for a in addresses}


def srmig_status(a, capsys) -> str:
    """`srmig status` as printed, asked of the agent over its socket."""
    from srmig.cli import main
    from srmig.ctl import hooksrv

    server = hooksrv.serve(a, a.cfg.hook.socket)
    try:
        capsys.readouterr()
        assert main(["status", "--socket", a.cfg.hook.socket]) == 0
        return capsys.readouterr().out
    finally:
        server.close()


def test_dual_stack_vm_every_address_written_and_removed_together(lab, maps, conn, db, tmp_path, capsys):
    """A running dual-stack domain: reconciliation delivers each of its addresses here (the id's entry, the
    others pointed at it) and publishes them all with its segment list; a second reconciliation finds nothing
    to fix; once the domain is gone, the next one removes every entry and pointer it had."""
    dom = define(conn, "srmig-rec-dual", *DUAL)
    a = make_agent(lab, tmp_path, libvirt.open)
    ups = applied(a, work.LibvirtUp)
    with running(a, lab):
        ups.get(timeout=10)
        a.dbl.write(lambda: None).result(10)
        assert states(maps, DUAL) == dict.fromkeys(DUAL, (VmState.RUNNING, None, False))
        assert {e.vm for e in maps.list_vms()} == set(DUAL)
        rec = db.vm(VM)
        assert (rec.host, rec.segments, rec.addresses) == ("S", (L.SID_DX6,), DUAL)
        gen = generation(maps)
        again = on_worker(a, reconcile.reconcile, a.host, conn)
        a.dbl.write(lambda: None).result(10)
        assert (again["vms"], again["fixed"]) == (1, 0)
        assert generation(maps) == gen and db.vm(VM).version == rec.version
        st = on_worker(a, status.agent_status, a)
        assert [(v["vm"], v["addresses"], v["state"], v["detached"]) for v in st["vms"]] == \
            [(VM, list(DUAL), "running", None)]
        assert st["locations"][0]["addresses"] == list(DUAL)
        shown = srmig_status(a, capsys)
        assert f"\n    + {DUAL[1]}\n    + {DUAL[2]}\n" in shown, shown
        assert f"(also {DUAL[1]}, {DUAL[2]})" in shown, shown
        # One entry, the id's, the others pointing at it; an address given an entry of its own behind the
        # agent's back no longer follows the id: status says so, and the next step of the VM repairs it.
        assert [(p, vm) for p, vm in maps.list_vm_prefixes()] == [(DUAL[2], VM), (DUAL[1], VM)]
        maps.set_vm(DUAL[1], VmState.HOLD)
        st = on_worker(a, status.agent_status, a)
        assert [(v["vm"], v["detached"]) for v in st["vms"]] == [(VM, [DUAL[1]])]
        assert "+ 2001:db8:200::10  (map: not following the id)" in srmig_status(a, capsys)
        on_worker(a, a.host.dp.set_vm, VM, VmState.RUNNING)
        assert states(maps, DUAL) == dict.fromkeys(DUAL, (VmState.RUNNING, None, False))
        assert on_worker(a, status.agent_status, a)["vms"][0]["detached"] is None
        dom.destroy()
        dom.undefine()
        out = on_worker(a, reconcile.reconcile, a.host, conn)
        assert (out["vms"], out["fixed"]) == (0, 1)
        assert maps.list_vms() == [] and maps.list_vm_prefixes() == []


def started(lifecycle, name: str) -> None:
    """Wait until the worker has applied libvirt's STARTED event of domain `name` (lifecycle: applied(a,
    work.Lifecycle))."""
    for _ in range(20):
        item, _, _ = lifecycle.get(timeout=10)
        if (item.domain, item.type) == (name, "STARTED"):
            return
    raise AssertionError(f"{name}: no STARTED applied")


def test_address_list_changed_between_two_runs(lab, maps, conn, db, tmp_path):
    """The VM starts again with one address fewer and one more: the dropped address's entry goes, the new
    one is delivered, and the record lists the new set in one new version. An address it dropped that
    another VM took meanwhile stays that VM's."""
    a = make_agent(lab, tmp_path, libvirt.open)
    ups = applied(a, work.LibvirtUp)
    lifecycle = applied(a, work.Lifecycle)

    with running(a, lab):
        ups.get(timeout=10)
        dom = conn.createXML(domain_xml("srmig-rec-change", *DUAL), 0)
        started(lifecycle, "srmig-rec-change")
        a.dbl.write(lambda: None).result(10)
        assert {e.vm for e in maps.list_vms()} == set(DUAL)
        v1 = db.vm(VM).version
        dom.destroy()
        again = (VM, DUAL[2], "2001:db8:200::11")
        conn.createXML(domain_xml("srmig-rec-change", *again), 0)
        started(lifecycle, "srmig-rec-change")
        a.dbl.write(lambda: None).result(10)
        assert {e.vm: e.state for e in maps.list_vms()} == dict.fromkeys(again, VmState.RUNNING)
        rec = db.vm(VM)
        assert (rec.addresses, rec.version) == (again, v1 + 1)
        # Stopped, it lets its addresses go: another VM takes one, and the first one's next start (with its
        # id alone) removes only the entry nobody took.
        conn.lookupByName("srmig-rec-change").destroy()
        other = "2001:db8:100::77"
        conn.createXML(domain_xml("srmig-rec-other", other, DUAL[2]), 0)
        started(lifecycle, "srmig-rec-other")
        conn.createXML(domain_xml("srmig-rec-change", VM), 0)
        started(lifecycle, "srmig-rec-change")
        a.dbl.write(lambda: None).result(10)
        assert {e.vm: e.state for e in maps.list_vms()} == dict.fromkeys((VM, other, DUAL[2]), VmState.RUNNING)
        assert db.vm(other).addresses == (other, DUAL[2]) and db.vm(VM).addresses == (VM,)


def test_migration_moves_every_address_in_each_step(lab, maps, db, tmp_path):
    """The source restarts after its drain, libvirt unreachable: the VM's addresses come from its vms/
    record, and the replay's one map write (AWAY towards D) covers each of them, whatever state each was
    left in. The cut-over publishes D's SID for all of them (one version), and once the grace period is
    over every entry goes at once."""
    db.publish(VM, "S", [L.SID_DX6], Phase.STEADY.value, addresses=DUAL)
    db.put_migration(VM, "S", record(VM, "S", "D", "srmig-rec-vm", ["begin", "suspended"]))
    db.put_migration(VM, "D", record(VM, "S", "D", "srmig-rec-vm", ["begin", "resumed"]))
    maps.set_vm(VM, VmState.AWAY, next_sid=D.dx6)     # the drain's, before the restart
    maps.set_vm(DUAL[1], VmState.HOLD, next_sid=D.dx6)
    maps.set_vm(DUAL[2], VmState.RUNNING, shadow=True)
    a = make_agent(lab, tmp_path, unreachable)
    ups = applied(a, work.DbUp)
    graces = applied(a, work.GraceOver, before=lambda item: states(maps, DUAL),
                     after=lambda item: states(maps, DUAL))
    with running(a, lab):
        ups.get(timeout=10)
        assert states(maps, DUAL) == dict.fromkeys(DUAL, (VmState.AWAY, D.dx6, False))
        on_worker(a, a.host.local_event, VM, Ev.STOPPED, time.monotonic_ns(), "test: the source QEMU is gone")
        item, before, after = graces.get(timeout=10)
        assert item.vm == VM
        assert before == dict.fromkeys(DUAL, (VmState.AWAY, D.dx6, False)), "forwarding stragglers until then"
        assert after == dict.fromkeys(DUAL), "all gone together"
        a.dbl.write(lambda: None).result(10)
        rec = db.vm(VM)
        assert (rec.host, rec.segments, rec.phase, rec.addresses) == ("D", (D.dx6,), "cut-over", DUAL)


def test_destination_provisions_every_address(lab, maps, db, tmp_path):
    """`migrate begin` of a dual-stack domain here (its source D in the database): each of its addresses is
    INCOMING before the hook is answered, and the new segment list is published for all of them."""
    db.publish(VM, "D", [D.dx6], Phase.STEADY.value, addresses=DUAL)
    a = make_agent(lab, tmp_path, unreachable)
    ups = applied(a, work.DbUp)
    with running(a, lab):
        ups.get(timeout=10)
        answer = a.call(work.HookBegin(domain_xml("srmig-rec-in", *DUAL)), timeout=10)
        assert answer["managed"] and answer["addresses"] == list(DUAL)
        assert {x: e[0] for x, e in states(maps, DUAL).items()} == dict.fromkeys(DUAL, VmState.INCOMING)
        rec = db.vm(VM)
        assert (rec.phase, rec.addresses, rec.version) == ("provision", DUAL, answer["version"])
        # Another VM arriving with one of its addresses: refused at the hook, nothing provisioned for it.
        other = "2001:db8:100::99"
        db.publish(other, "D", [D.dx6], Phase.STEADY.value)
        with pytest.raises(records.Rejected, match=f"address {DUAL[2]} is already VM {VM}'s"):
            a.call(work.HookBegin(domain_xml("srmig-rec-in2", other, DUAL[2])), timeout=10)
        assert maps.get_vm(other) is None and maps.get_vm(DUAL[2]).state is VmState.INCOMING
        assert "srmig-rec-in2" in on_worker(a, status.agent_status, a)["rejected_domains"]


def test_bad_or_taken_addresses_leave_the_domain_unmanaged(lab, maps, conn, db, tmp_path, capsys):
    """A domain listing a prefix that holds another VM's address, or an address another VM has (a domain here,
    another host's record), is
    one rejection and a status entry, and srmig leaves it alone (no entry for any of its addresses); the
    agent carries on. Once the domain that had the address is gone, the next reconciliation manages the one
    that wanted it, and removes the gone one's entries."""
    vm_a, vm_b, vm_c, vm_e, vm_w = (f"2001:db8:100::{i:x}" for i in (0xa, 0xb, 0xc, 0xe, 0xf))
    shared, taken = "10.0.0.20", "2001:db8:300::1"
    db.kv.put(f"vms/{vm_w}", {"vm": vm_w, "host": "D", "segments": [D.dx6], "version": 1,
                              "addresses": [vm_w, taken]})
    dom_a = define(conn, "srmig-rec-a", vm_a, shared)
    define(conn, "srmig-rec-c", vm_c, taken)
    define(conn, "srmig-rec-e", vm_e, "2001:db8:300::/64")  # a prefix holding vm_w's address
    a = make_agent(lab, tmp_path, libvirt.open)
    ups = applied(a, work.LibvirtUp)
    lifecycle = applied(a, work.Lifecycle)
    before = records.REJECTED.counts()["domain_xml"]
    with running(a, lab):
        ups.get(timeout=10)
        conn.createXML(domain_xml("srmig-rec-b", vm_b, shared), 0)
        started(lifecycle, "srmig-rec-b")
        assert records.REJECTED.counts()["domain_xml"] == before + 3
        assert {e.vm: e.state for e in maps.list_vms()} == dict.fromkeys([vm_a, shared], VmState.RUNNING)
        st = on_worker(a, status.agent_status, a)
        why = st["rejected_domains"]
        assert set(why) == {"srmig-rec-b", "srmig-rec-c", "srmig-rec-e"}
        assert f"address {shared} is already VM {vm_a}'s (domain 'srmig-rec-a')" in why["srmig-rec-b"]
        assert f"address {taken} is already VM {vm_w}'s (vms/{vm_w})" in why["srmig-rec-c"]
        assert f"2001:db8:300::/64 overlaps {taken}, VM {vm_w}'s (vms/{vm_w})" in why["srmig-rec-e"]
        assert db.vm(vm_b) is None and db.vm(vm_c) is None and db.vm(vm_e) is None
        shown = srmig_status(a, capsys)
        assert f"  not managed: domain srmig-rec-b: domain 'srmig-rec-b': address {shared} is already" in shown
        dom_a.destroy()
        dom_a.undefine()
        out = on_worker(a, reconcile.reconcile, a.host, conn)
        a.dbl.write(lambda: None).result(10)
        assert {e.vm: e.state for e in maps.list_vms()} == dict.fromkeys([vm_b, shared], VmState.RUNNING)
        assert db.vm(vm_b).addresses == (vm_b, shared)
        assert set(on_worker(a, status.agent_status, a)["rejected_domains"]) == {"srmig-rec-c", "srmig-rec-e"}
        assert out["vms"] == 1


def test_a_vm_routing_a_prefix_is_managed_whole(lab, maps, conn, db, tmp_path, capsys):
    """A domain listing prefixes after its address: its address's entry and each prefix (pointing at the id)
    are written together, the record lists them all, status shows them in the VM's row; a second domain whose
    prefix overlaps the first's is one rejection and leaves the first's entries as they were. Reconciliation
    removes a gone VM's prefixes with its entry, and a prefix whose VM has no entry."""
    vm_p, vm_q = "2001:db8:100::d", "2001:db8:100::e"
    prefixes = ("10.7.0.0/24", "2001:db8:707::/64")
    define(conn, "srmig-rec-p", vm_p, *prefixes)
    gone = "2001:db8:100::77"  # a VM no longer here: its entry and prefix, and a prefix of no VM's at all
    maps.set_vm(gone, VmState.RUNNING)
    maps.set_vm_prefix("10.8.0.0/24", gone)
    away = "2001:db8:100::79"  # a VM moved away, forwarding stragglers: its prefix waits with it
    maps.set_vm(away, VmState.AWAY, next_sid=D.dx6)
    maps.set_vm_prefix("10.8.2.0/24", away)
    maps.set_vm_prefix("10.8.1.0/24", "2001:db8:100::78")
    a = make_agent(lab, tmp_path, libvirt.open)
    ups = applied(a, work.LibvirtUp)
    lifecycle = applied(a, work.Lifecycle)
    before = records.REJECTED.counts()["domain_xml"]
    with running(a, lab):
        ups.get(timeout=10)
        conn.createXML(domain_xml("srmig-rec-q", vm_q, "10.7.0.128/25"), 0)  # after p: p has its prefix
        started(lifecycle, "srmig-rec-q")
        a.dbl.write(lambda: None).result(10)
        assert {e.vm: (e.state, e.of) for e in maps.list_vms()} == {
            vm_p: (VmState.RUNNING, None), **{p: (VmState.RUNNING, vm_p) for p in prefixes},
            away: (VmState.AWAY, None), "10.8.2.0/24": (VmState.AWAY, away)}
        assert maps.list_vm_prefixes() == [("10.7.0.0/24", vm_p), ("10.8.2.0/24", away),
                                           ("2001:db8:707::/64", vm_p)], "reconciliation removed the others"
        on_worker(a, reconcile.forget, a.host, work.Forget(away))  # its grace period over
        assert maps.get_vm(away) is None and ("10.8.2.0/24", away) not in maps.list_vm_prefixes()
        assert db.vm(vm_p).addresses == (vm_p, *prefixes) and db.vm(vm_q) is None
        assert records.REJECTED.counts()["domain_xml"] == before + 1
        st = on_worker(a, status.agent_status, a)
        assert "10.7.0.128/25 overlaps 10.7.0.0/24, VM 2001:db8:100::d's" in st["rejected_domains"]["srmig-rec-q"]
        row = next(r for r in st["vms"] if r["vm"] == vm_p)
        assert row["addresses"] == [vm_p, *prefixes] and row["state"] == "running" and not row["detached"]
        assert [r["vm"] for r in st["vms"]] == [vm_p]  # one row for the VM, its prefixes in it


def test_cli_vm_sets_each_address(lab, maps, capsys):
    """`srmig vm set|del ADDR,ADDR...`: the first address's entry, the others pointed at it, in one command;
    one address as before."""
    import json

    from srmig.cli import main

    ns = lab.topo.ns("lab")

    def srmig(*args):
        assert main(["--netns", ns, "vm", *args, "--json"]) == 0
        return json.loads(capsys.readouterr().out)

    out = srmig("set", ",".join(DUAL), "away", "--next-sid", D.dx6)
    assert [(e["vm"], e["state"], e["next_sid"]) for e in out] == [(x, "away", D.dx6) for x in DUAL]
    assert states(maps, DUAL) == dict.fromkeys(DUAL, (VmState.AWAY, D.dx6, False))
    # Only the first has an entry, the others point at it: setting the first alone moves them all.
    assert maps.list_vm_prefixes() == sorted([(x, DUAL[0]) for x in DUAL[1:]], key=lambda p: ":" in p[0])
    assert srmig("set", DUAL[0], "hold", "--next-sid", D.dx6)["state"] == "hold"
    assert states(maps, DUAL) == dict.fromkeys(DUAL, (VmState.HOLD, D.dx6, False))
    assert {(e["vm"], e.get("of")) for e in srmig("list")} == {(DUAL[0], None), *((x, DUAL[0]) for x in DUAL[1:])}
    assert srmig("set", VM, "running")["state"] == "running"  # one address: one entry, as before
    assert srmig("del", ",".join(DUAL)) == [{"vm": x, "deleted": True} for x in DUAL]
    assert maps.list_vms() == []
    # A VM that routes prefixes: each points at the first address, and shows its entry
    out = srmig("set", f"{VM},10.9.0.0/24,2001:db8:909::/64", "hold", "--next-sid", D.dx6)
    assert [(e["vm"], e["state"], e.get("of")) for e in out] == [
        (VM, "hold", None), ("10.9.0.0/24", "hold", VM), ("2001:db8:909::/64", "hold", VM)]
    assert maps.list_vm_prefixes() == [("10.9.0.0/24", VM), ("2001:db8:909::/64", VM)]
    assert {e["vm"]: e["state"] for e in srmig("list")} == {VM: "hold", "10.9.0.0/24": "hold",
                                                           "2001:db8:909::/64": "hold"}
    assert main(["--netns", ns, "vm", "set", "10.9.0.0/24,2001:db8:1::1", "running"]) == 1
    assert "is a prefix: list the VM's address first" in capsys.readouterr().err
    assert srmig("del", f"10.9.0.0/24,2001:db8:909::/64,{VM}") == [
        {"vm": "10.9.0.0/24", "deleted": True}, {"vm": "2001:db8:909::/64", "deleted": True},
        {"vm": VM, "deleted": True}]
    assert maps.list_vms() == [] and maps.list_vm_prefixes() == []


# `srmig vm set` by hand against what the map already has (VM 2001:db8:100::10 with 10.0.0.10 and 10.9.0.0/24,
# VM 10.0.0.30 with an entry of its own): what is refused, and the one line (records.taken(), the agent's rule).
CLI_TAKEN = [
    ("2001:db8:100::20,2001:db8:100::10", "address 2001:db8:100::10 is already VM 2001:db8:100::10's"),
    ("2001:db8:100::20,10.0.0.10", "address 10.0.0.10 is already VM 2001:db8:100::10's"),
    ("10.0.0.10", "address 10.0.0.10 is already VM 2001:db8:100::10's"),  # another VM's pointer, alone
    ("2001:db8:100::20,10.0.0.30", "address 10.0.0.30 is already VM 10.0.0.30's"),
    ("10.9.0.5", "10.9.0.5 overlaps 10.9.0.0/24, VM 2001:db8:100::10's"),
    ("2001:db8:100::20,10.9.0.128/25", "10.9.0.128/25 overlaps 10.9.0.0/24, VM 2001:db8:100::10's"),
    ("2001:db8:100::20,10.0.0.8/29", "10.0.0.8/29 overlaps 10.0.0.10, VM 2001:db8:100::10's"),
    ("10.0.0.20,2001:db8:100::/64", "2001:db8:100::/64 overlaps 2001:db8:100::10, VM 2001:db8:100::10's"),
    ("2001:db8:100::20,10.0.0.0/16", "10.0.0.0/16 overlaps"),  # (the first it finds)
    # the metadata's own rules, the same for a list typed by hand
    ("127.0.0.1", "127.0.0.1 cannot be a VM's"),
    ("2001:db8:100::20,2001:db8:100::20", "2001:db8:100::20 listed twice"),
    ("2001:db8:100::20,10.1.0.5,10.1.0.0/24", "10.1.0.5 and 10.1.0.0/24 overlap"),
    ("10.9.0.0/24", "is a prefix: list the VM's address first"),
]


def test_cli_vm_set_refuses_another_vms_address_or_prefix(lab, maps, capsys):
    """`srmig vm set` refuses an address or prefix another VM in the map has or overlaps, with one line naming
    that VM, exit 1 and the map as it was; the VM's own addresses again, and addresses next to another VM's
    prefix, are no overlap. `srmig vm del` of a VM's id frees all of its addresses."""
    import json

    from srmig.cli import main

    ns = lab.topo.ns("lab")
    maps.set_vm("10.0.0.30", VmState.RUNNING)  # (a VM set alone: one entry of its own)
    assert main(["--netns", ns, "vm", "set", f"{VM},10.0.0.10,10.9.0.0/24", "running"]) == 0
    capsys.readouterr()
    before = (maps.list_vms(), maps.list_vm_prefixes())
    for vm, why in CLI_TAKEN:
        assert main(["--netns", ns, "vm", "set", vm, "hold"]) == 1, vm
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and why in err, (vm, err)
        assert (maps.list_vms(), maps.list_vm_prefixes()) == before, vm
    # Not an overlap: the VM's own list again (with fewer), a neighbour of its prefix, an unrelated VM.
    for vm in (f"{VM},10.0.0.10,10.9.0.0/24", f"{VM},10.9.0.0/24", "2001:db8:100::20,10.9.1.0/24,10.0.0.11"):
        assert main(["--netns", ns, "vm", "set", vm, "hold"]) == 0, vm
    assert maps.get_vm("10.9.1.7").of == "2001:db8:100::20" and maps.get_vm("10.9.0.7").of == VM
    # Forgotten by its id, a VM leaves no pointer behind, and its addresses are free again.
    capsys.readouterr()
    assert main(["--netns", ns, "vm", "del", VM, "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == [
        {"vm": VM, "deleted": True}, {"vm": "10.0.0.10", "deleted": True, "of": VM},
        {"vm": "10.9.0.0/24", "deleted": True, "of": VM}]
    assert all(owner != VM for _, owner in maps.list_vm_prefixes())
    assert main(["--netns", ns, "vm", "set", "2001:db8:100::30,10.0.0.10,10.9.0.0/24", "running"]) == 0
    # A pointer at an id with no entry (an older srmig's `vm del`) finds no VM: nobody's, so taken over.
    maps.set_vm_prefix("10.0.0.40", "2001:db8:100::99")
    assert main(["--netns", ns, "vm", "set", "2001:db8:100::40,10.0.0.40", "running"]) == 0
    assert maps.get_vm("10.0.0.40").of == "2001:db8:100::40"
