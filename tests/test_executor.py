"""The executor (srmig.ctl.executor) on real maps: two private namespaces with the srmig program loaded
(srmig.testbed.lab), a real tap whose owner never reads it standing in for QEMU (tests/test_drain.py), packets
parked by the program itself in its hold ring. No QEMU, no agent: the owner is built here, and its `later`
keeps what the executor schedules so that the test runs it."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import time

import pytest
from scapy.layers.inet6 import IPv6

import test_drain  # tests/ is on sys.path (rootdir conftest, no package)
from srmig.bpf import abi
from srmig.bpf.abi import VmState
from srmig.ctl import executor as X
from srmig.ctl import fdstore
from srmig.ctl.drain import hold_ring_reader, read_hold_packets
from srmig.ctl.machine import DelVm, Drain, Ev, KeepTap, Machine, SetVm
from srmig.ctl.maps import ffi
from srmig.ctl.phases import HostSids, Phase, plan
from srmig.ctl.tap import RATE_WINDOW_S, TapKeeper, tap_queue_len
from srmig.testbed import lab as L
from srmig.testbed.packets import h_encaps, inner

pytestmark = [pytest.mark.bpf, pytest.mark.netns]

paused_tap = test_drain.paused_tap  # host S of `topology`, tap `vmtap` held by a process that never reads it
VM = test_drain.VM                  # routed to vmtap there; the lab's VM_RUNNING (routed to its vm0)
S = HostSids("S", L.SID_DX6, L.SID_S, L.SID_SBUF)
D = HostSids("D", L.D_DX6, "fc00:0:2::5", L.D_SBUF)
TAP_QUEUE = 5000  # the window's length (a tap starts at 1000)


class Later:
    """Owner.later: keeps what the executor schedules; the test runs it when it chooses (no timers)."""

    def __init__(self):
        self.calls: list[tuple] = []

    def __call__(self, seconds, fn, *args):
        self.calls.append((seconds, fn, args))

    def run_all(self) -> int:
        calls, self.calls = self.calls, []
        for _s, fn, args in calls:
            fn(*args)
        return len(calls)


def executor(name: str, dp, enter, qemu_pid: int | None = None, tap: str | None = None, fds=None):
    """An executor for host `name` on `dp`, working in the namespace `enter()` switches to; with the calls it
    schedules and the map writes it reports."""
    later, writes = Later(), []
    ex = X.Executor(X.Owner(name=name, dp=dp, address="2001:db8:f::1", drain=True, tap_queue=TAP_QUEUE,
                            qemu_pid=lambda loc: qemu_pid, later=later, on_map_write=lambda: writes.append(1),
                            enter=enter, fds=fds or fdstore.NoStore()))
    ex.vm(VM).tap = tap
    return ex, later, writes


def generation(dp) -> int:
    """The program's table generation: bumped by every write to its SID or VM table."""
    return dp.meta.lookup(ffi.new("uint32_t *", abi.META_TABLE_GENERATION))


def qlen(topology) -> int:
    with topology.inside("S"):
        return tap_queue_len("vmtap")


def probes(frames: list[bytes]) -> int:
    return sum(b"probe-" in f for f in frames)


@contextlib.contextmanager
def capture(topo, role: str, ifname: str):
    """An IPv6 packet socket on `ifname` of `role` (a namespace of the test)."""
    with topo.inside(role):
        s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(0x86DD))
        s.bind((ifname, 0))
    s.settimeout(5)
    with s:
        yield s


def received(sock, marker: bytes) -> bytes | None:
    """The first frame carrying `marker` (others, such as MLD, are skipped); None if none comes."""
    for _ in range(100):
        try:
            frame = sock.recv(65535)
        except TimeoutError:
            return None
        if marker in frame:
            return frame
    return None


@pytest.fixture(scope="module")
def labs():
    """Hosts S and D: each its own namespace, program and maps."""
    lab_d = L.TestRunLab()
    lab_d.topo.tag = f"{os.getpid()}-d"  # a second lab in this process: namespace names of its own
    with L.TestRunLab() as lab_s, lab_d:
        yield lab_s, lab_d


@pytest.fixture
def lab(labs):
    """S's lab with no entry for VM and an empty hold ring, before and after the test."""
    def clean():
        for a in labs:
            a.dp.del_vm(VM)
            with hold_ring_reader(a.dp) as ring:
                read_hold_packets(ring)
    clean()
    yield labs[0]
    clean()


def test_provision_writes_the_plan_on_each_host_and_skips_the_other(labs, lab):
    lab_s, lab_d = labs
    machine = Machine()
    m = machine.start(VM, S, D)
    actions = machine.handle(VM, Ev.BEGIN)
    want = plan(Phase.PROVISION, S, D)
    ex_s, _, writes_s = executor("S", lab_s.dp, contextlib.nullcontext)
    ex_d, _, writes_d = executor("D", lab_d.dp, contextlib.nullcontext)
    try:
        ex_d.execute(m, actions, "m1")
        assert lab_s.dp.get_vm(VM) is None, "S's actions are not D's"
        e = lab_d.dp.get_vm(VM)
        assert (e.state, e.shadow, e.park) == (want.dest, False, False) and want.dest is VmState.INCOMING
        gen_d = generation(lab_d.dp)
        ex_s.execute(m, actions, "m1")
        e = lab_s.dp.get_vm(VM)
        assert (e.state, e.shadow, e.park) == (want.source, True, False) and want.source is VmState.RUNNING
        assert ex_s.vms[VM].shadow is not None, "S logs what it delivers from now on"
        assert generation(lab_d.dp) == gen_d, "D's maps untouched by S's executor"
        assert writes_s == writes_d == [1]
    finally:
        ex_s.close()
        ex_d.close()


def restored(later, paused_tap, tries: int = 20) -> bool:
    """Run the pending restore's polls, RATE_WINDOW_S apart, until it is done (True) or `tries` are (False),
    reading meanwhile as the resumed QEMU would what the namespace's own stack sends to the tap (MLD, RS)."""
    for _ in range(tries):
        with TapKeeper(paused_tap.pid, "vmtap") as qemu:
            qemu.frames()
        later.run_all()
        if not later.calls:
            return True
        time.sleep(RATE_WINDOW_S)
    return False


def test_tap_queue_window_restored_only_once_read(lab, topology, paused_tap):
    ex, later, _ = executor("S", lab.dp, lambda: topology.inside("S"), paused_tap.pid, "vmtap")
    m, loc = Machine().start(VM, S, D), ex.vm(VM)
    before = qlen(topology)
    try:
        ex.execute(m, [SetVm("S", VM, VmState.RUNNING, shadow=True)], "m1")  # the window opens
        assert qlen(topology) == TAP_QUEUE
        test_drain.send_probes(topology, 3 * before)  # more than the old length holds
        ex.execute(m, [SetVm("S", VM, VmState.RUNNING)], "m1")  # the window closes: frames still queued
        assert [(s, fn) for s, fn, _ in later.calls] == [(X.QUEUE_POLL_S, ex._restore_queue)]
        assert later.run_all() == 1 and len(later.calls) == 1, "still queued: polled again"
        assert qlen(topology) == TAP_QUEUE and loc.restoring is not None
        with TapKeeper(paused_tap.pid, "vmtap") as qemu:
            assert probes(qemu.frames()) == 3 * before, "none freed by a shortened queue"  # QEMU resumed reads
        assert later.run_all() == 1 and len(later.calls) == 1, "the first look at the rate"
        assert qlen(topology) == TAP_QUEUE
        assert restored(later, paused_tap) and qlen(topology) == before
        assert qlen(topology) == before and loc.old_qlen is None and loc.restoring is None

        # A late restore of an earlier window gives way to the next window.
        ex.execute(m, [SetVm("S", VM, VmState.RUNNING, shadow=True)], "m2")
        test_drain.send_probes(topology, 100)
        ex.execute(m, [DelVm("S", VM)], "m2")
        assert lab.dp.get_vm(VM) is None
        [(_, _, (_, _, queue, _))] = later.calls
        ex.execute(m, [SetVm("S", VM, VmState.RUNNING, shadow=True)], "m3")
        later.run_all()
        assert later.calls == [] and queue.fds == [] and qlen(topology) == TAP_QUEUE and loc.old_qlen == before

        # Past its deadline, a restore gives up: no more polling, its fds closed, the backlog kept, and the
        # old length remembered: the next window's end restores it.
        ex.execute(m, [SetVm("S", VM, VmState.RUNNING)], "m3")
        [(_, restore, (loc_, window, queue, _))] = later.calls
        later.calls.clear()
        restore(loc_, window, queue, time.monotonic() - 1)
        assert later.calls == [] and queue.fds == [] and loc.restoring is None and loc.old_qlen == before
        assert qlen(topology) == TAP_QUEUE
        with TapKeeper(paused_tap.pid, "vmtap") as qemu:
            assert probes(qemu.frames()) == 100
        ex.execute(m, [SetVm("S", VM, VmState.RUNNING, shadow=True)], "m4")
        ex.execute(m, [SetVm("S", VM, VmState.RUNNING)], "m4")
        assert restored(later, paused_tap)
        assert qlen(topology) == before and loc.old_qlen is None
    finally:
        ex.close()


def test_replayed_drain_only_sets_away(lab, topology, paused_tap):
    """KeepTap, then the Drain of a replay (applied before a restart): the map goes AWAY, the tap is not
    read (the QEMU it drained is gone; what a live one holds is not the drain's)."""
    ex, _, _ = executor("S", lab.dp, lambda: topology.inside("S"), paused_tap.pid, "vmtap")
    m = Machine().start(VM, S, D)
    try:
        ex.execute(m, [KeepTap("S", VM)], "m1")
        kept = ex.vms[VM].keeper
        assert kept is not None and kept.fds
        test_drain.send_probes(topology, 50)
        ex.execute(m, [Drain("S", VM, D.dx6)], "m1", replay=True)
        e = lab.dp.get_vm(VM)
        assert (e.state, e.next_sid, e.ring_first, e.shadow) == (VmState.AWAY, D.dx6, False, False)
        assert ex.vms[VM].keeper is kept and ex.vms[VM].drain is None
        assert probes(kept.frames()) == 50
    finally:
        ex.close()


def test_drain_without_a_tap_queue_forwards_the_hold_ring(lab):
    """A restart mid-drain: QEMU and its tap queue are gone, the program still parks in HOLD. The drain sends
    what the ring holds on to D, then the entry is AWAY."""
    ex, _, writes = executor("S", lab.dp, lambda: lab.topo.inside("lab"))
    m = Machine().start(VM, S, D)
    lab.dp.set_vm(VM, VmState.HOLD, next_sid=D.dx6)
    pkt = bytes(h_encaps([L.SID_DX6], inner(VM, payload=b"parked-in-hold"), dst_mac=L.FAB_MAC))
    assert lab.run(pkt).action == "XDP_DROP"
    try:
        with capture(lab.topo, "fab", "up0") as fab:
            ex.execute(m, [Drain("S", VM, D.dx6)], "m1")
            frame = received(fab, b"parked-in-hold")
        assert frame is not None and IPv6(frame[14:]).dst == D.dx6
        with hold_ring_reader(lab.dp) as ring:
            assert ring.empty()
        e = lab.dp.get_vm(VM)
        assert (e.state, e.next_sid, e.ring_first) == (VmState.AWAY, D.dx6, False)
        assert writes == [1]
    finally:
        ex.close()


def test_unpark_waits_for_its_migration_or_the_fallback(lab):
    """An abort after the pause: S takes the VM back parking, and delivers what parked once D says how many
    it returned (for this migration only) or RETURN_WAIT_S later."""
    ex, later, _ = executor("S", lab.dp, lambda: lab.topo.inside("lab"))
    machine = Machine()
    m = machine.start(VM, S, D)
    machine.handle(VM, Ev.BEGIN)
    machine.handle(VM, Ev.SUSPENDED)
    try:
        ex.execute(m, machine.handle(VM, Ev.FAILED), "m1")
        e = lab.dp.get_vm(VM)
        assert (e.state, e.park) == (VmState.RUNNING, True)
        assert later.calls == [(X.RETURN_WAIT_S, ex.unpark, (m, "m1", None))]
        pkt = bytes(h_encaps([L.SID_DX6], inner(VM, payload=b"parked-on-abort"), dst_mac=L.FAB_MAC))
        assert lab.run(pkt).action == "XDP_DROP"

        ex.unpark(m, "an-older-migration", 0)
        assert lab.dp.get_vm(VM).park and ex.vms[VM].unpark == "m1"
        with hold_ring_reader(lab.dp) as ring:
            assert not ring.empty()

        with capture(lab.topo, "vm", "eth0") as vm:
            assert later.run_all() == 1  # D never said: the fallback
            frame = received(vm, b"parked-on-abort")
        assert frame is not None and IPv6(frame[14:]).dst == VM
        e = lab.dp.get_vm(VM)
        assert (e.state, e.park, e.ring_first) == (VmState.RUNNING, False, False)
        assert ex.vms[VM].unparked == 1 and ex.vms[VM].unpark is None
    finally:
        ex.close()


def test_close_releases_the_kept_tap_fds(lab, topology, paused_tap):
    ex, _, _ = executor("S", lab.dp, lambda: topology.inside("S"), paused_tap.pid, "vmtap")
    m, loc = Machine().start(VM, S, D), ex.vm(VM)
    ex.execute(m, [KeepTap("S", VM), SetVm("S", VM, VmState.RUNNING, shadow=True)], "m1")
    test_drain.send_probes(topology, 10)
    ex.execute(m, [SetVm("S", VM, VmState.RUNNING)], "m1")  # its restore waits on the kept fds
    ex.execute(m, [KeepTap("S", VM)], "m1")                  # and a new migration keeps new ones
    fds = loc.restoring.fds + loc.keeper.fds
    assert len(fds) == 2 and all(os.readlink(f"/proc/self/fd/{fd}") == "/dev/net/tun" for fd in fds)
    ex.close()
    for fd in fds:
        with pytest.raises(OSError):
            os.fstat(fd)
    assert loc.keeper is None and loc.restoring is None


def test_a_restarted_agent_drains_the_tap_the_store_kept(lab, topology, paused_tap, tmp_path):
    """The source's agent dies after KeepTap (its fds close, nothing is dropped from the store) and the paused
    QEMU goes at the end of the migration. The restarted agent replays its Drain: the fds the store kept
    are taken back and the tap's queue is drained to D, whole and in order; then the store forgets them."""
    topology.add_host("T")
    topology.link("S", "s0", "T", "t0", "2001:db8:a::2/64", "2001:db8:a::1/64", static_neigh=True)
    topology.route("S", "fc00::/16", gateway="2001:db8:a::1")
    store = fdstore.KeeperStore(str(tmp_path / "fdkeeper.sock"), idle_s=30)
    keeper_pid = store.keeper_pid()
    m = Machine().start(VM, S, D)
    try:
        ex, _, _ = executor("S", lab.dp, lambda: topology.inside("S"), paused_tap.pid, "vmtap", fds=store)
        ex.execute(m, [KeepTap("S", VM)], "m1")
        assert store.names() == {fdstore.tap_name("S", VM, "m1"): 1}
        test_drain.send_probes(topology, 30)
        ex.vms[VM].keeper.close()  # the agent is SIGKILLed: its fds close, the store's stay
        paused_tap.kill()
        paused_tap.wait()  # QEMU ends with the migration: the tap lives on in the store alone

        again, _, _ = executor("S", lab.dp, lambda: topology.inside("S"), None, "vmtap", fds=store)
        with capture(topology, "T", "t0") as t:
            again.execute(m, [Drain("S", VM, D.dx6)], "m1", replay=True)
            got = [received(t, f"probe-{i}".encode()) for i in range(30)]
        assert all(f is not None and IPv6(f[14:]).dst == D.sbuf for f in got), "every queued probe, in order"
        assert again.vms[VM].report.from_tap >= 30  # (and what the stack sent the tap: MLD, RS)
        assert lab.dp.get_vm(VM).state is VmState.AWAY
        assert store.names() == {}, "drained: the store need not keep them"
    finally:
        store.close()
        os.kill(keeper_pid, signal.SIGKILL)


srv6_host, at_d = test_drain.srv6_host, test_drain.at_d  # H (here S) between an ingress I and D; D's capture


def test_every_address_of_a_dual_stack_vm_moves_in_each_step(srv6_host, at_d):
    """A dual-stack VM (its id VM, and VM4) through the executor, its owner telling the addresses: each map
    write of a step is written for both (RUNNING, then the drain's HOLD and AWAY), and the drain takes both
    families' frames from the paused tap, then forwards what comes after: D receives them once each, in
    order. Then GRACE_OVER's DelVm removes both entries."""
    topo, dp, holder = srv6_host
    h_s = HostSids("S", test_drain.H_DX6, test_drain.H_END_S, test_drain.H_SBUF)
    h_d = HostSids("D", test_drain.D_DX6, "fc00:0:2::5", test_drain.D_SBUF)
    both = (VM, test_drain.VM4)
    ex = X.Executor(X.Owner(name="S", dp=dp, address=test_drain.H_ADDR, drain=True, tap_queue=TAP_QUEUE,
                            qemu_pid=lambda loc: holder.pid, later=Later(), enter=lambda: topo.inside("S"),
                            addresses=lambda vm: both if vm == VM else (vm,)))
    ex.vm(VM).tap = "vmtap"
    m = Machine().start(VM, h_s, h_d)
    path = [test_drain.H_END_S, test_drain.D_SBUF]  # the ingresses' list during the migration
    queued, after = test_drain._stream("A", "64466446" * 2), test_drain._stream("C", "4664")
    try:
        ex.execute(m, [SetVm("S", VM, VmState.RUNNING)], "m1")
        assert [dp.get_vm(a).state for a in both] == [VmState.RUNNING] * 2
        test_drain._ingress_send(topo, topo.mac("S", "h_in"), path, queued)  # into the paused VM's tap
        ex.execute(m, [Drain("S", VM, h_d.dx6)], "m1")
        test_drain._ingress_send(topo, topo.mac("S", "h_in"), path, after)   # AWAY: straight to D
        want = queued + after
        got = test_drain._arrived(at_d, len(want))
        assert [g[0] for g in got] == [mark for mark, _, _ in want], "once each, in order"
        assert [(g[4], g[5]) for g in got] == [(41 if fam == 6 else 4, pkt) for _, fam, pkt in want]
        rep = ex.vms[VM].report
        assert (rep.from_tap, rep.from_tap_ipv4) == (16, 8)
        assert [(e.state, e.next_sid) for e in map(dp.get_vm, both)] == [(VmState.AWAY, h_d.dx6)] * 2
        ex.execute(m, [DelVm("S", VM)], "m1")
        assert [dp.get_vm(a) for a in both] == [None, None]
    finally:
        ex.close()
        for a in both:
            dp.del_vm(a)
