"""Whatever moment kills the agent while it sends from the hold ring, the restarted agent sends every record
on exactly once, in the ring's order: an abort's unpark() (the VM's parked packets into its tap, another VM's
records on to where they go, interleaved in the ring) and the source drain's ring (SourceDrain.ring_only, what
a restarted source runs). The ring is the real one, filled by the program; the packets are counted where they
land, in the lab's VM and fabric namespaces (srmig.testbed.lab). The VM is dual-stack and so is the other VM:
IPv4 records (the VM's, into its tap as IPv4 frames; the other's, next header 4) interleave with IPv6 ones.
The drain's pump (srmig.ctl.pump: the records sent by a BPF_PROG_RUN, counted in its pinned mark) keeps the
same guarantees, both ways it sends (tc, and live frames where the kernel runs them), killed before, inside
and as each of its runs returns."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import subprocess
import sys
import time

import pytest

from srmig.bpf import libbpf, loader
from srmig.bpf.abi import VmState
from srmig.ctl import senders
from srmig.ctl.drain import SourceDrain, unpark
from srmig.ctl.pump import Pump
from srmig.testbed import lab as L
from srmig.testbed.packets import h_encaps, inner, inner4

pytestmark = [pytest.mark.bpf, pytest.mark.netns]

SRC = "fc00:0:1::1"
SYS_SENDMMSG = 307  # x86-64
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The ring of each case: the VM's parked packets ("v" IPv6, "w" IPv4), with runs of another VM's records (a
# drain's, advanced to D's End.SBUF: "o" IPv6 inside, "p" IPv4) between them, so that unpark() switches sender
# at each run and sends several batches a run.
UNPARK_RUNS = [("v", 40), ("w", 30), ("o", 5), ("w", 40), ("v", 30), ("p", 3)]
DRAIN_RUNS = [("o", 50), ("p", 50), ("o", 48)]
# The pump's: runs to two destinations through one next hop ("q": another End.SBUF, IPv6 inside), so that it
# switches DA (and batch) at each run.
PUMP_RUNS = [("o", 70), ("q", 30), ("p", 50), ("o", 20), ("q", 1), ("o", 60)]
OTHER_SBUF = "fc00:0:3::b"  # routed through the fabric peer as D_SBUF is
SEQ = re.compile(rb"K(\d+)([vwopq])(\d+)\.")
VM_PARKED4, VM_HOLD4 = L.V4_OF[L.VM_PARKED], L.V4_OF[L.VM_HOLD]


@pytest.fixture(scope="module")
def lab():
    with L.TestRunLab() as lab:
        yield lab


@pytest.fixture
def receivers(lab):
    """Packet sockets where the records land: the VM's end of its link (unpark's frames) and the fabric
    peer (what is routed on towards D); a clean ring and states before the test, plain queues after."""
    socks = {}
    with contextlib.ExitStack() as stack:
        for kind, (role, ifname, proto) in {"v": ("vm", "eth0", 0x86DD), "w": ("vm", "eth0", 0x0800),
                                            "o": ("fab", "up0", 0x86DD), "p": ("fab", "up0", 0x86DD),
                                            "q": ("fab", "up0", 0x86DD)}.items():
            with lab.topo.inside(role):
                s = stack.enter_context(socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(proto)))
                s.bind((ifname, 0))
            s.setsockopt(socket.SOL_SOCKET, 33, 16 << 20)  # SO_RCVBUFFORCE: a case's records at once
            socks[kind] = s
        try:
            yield socks
        finally:
            with lab.topo.inside("lab"):
                for dev in ("vm0", "fab0"):
                    subprocess.run(["tc", "qdisc", "del", "dev", dev, "root"], capture_output=True)
            _reset(lab)


def _reset(lab) -> None:
    """The lab's states for filling the ring (unpark and the drain change them), and an empty ring."""
    for vm in (L.VM_PARKED, VM_PARKED4):
        lab.dp.set_vm(vm, VmState.RUNNING, park=True)
    for vm in (L.VM_HOLD, VM_HOLD4):
        lab.dp.set_vm(vm, VmState.HOLD, next_sid=L.D_DX6)
    with lab.dp.hold_ring(lambda rec: None) as ring:
        for _ in range(100):
            if not ring.poll(0):
                break


def _fill(lab, case: int, runs: list[tuple[str, int]], size: int = 0) -> dict[str, int]:
    """Let the program park `runs` in the ring, in order: "v"/"w" the VM's IPv6/IPv4 (End.DX6-map, parking),
    "o"/"p" another VM's (End.S, holding), "q" as "o" to another End.SBUF. Payloads K<case><kind><seq>. (padded
    to `size`); returns how many of each kind."""
    _reset(lab)
    seq = {"v": 0, "w": 0, "o": 0, "p": 0, "q": 0}
    with lab.topo.inside("lab"):
        for kind, n in runs:
            for _ in range(n):
                payload = f"K{case}{kind}{seq[kind]}.".encode().ljust(size, b"-")
                segments = ([L.SID_DX6] if kind in "vw" else [L.SID_S, OTHER_SBUF] if kind == "q" else
                            [L.SID_S, L.D_SBUF])
                vm = {"v": L.VM_PARKED, "w": VM_PARKED4, "o": L.VM_HOLD, "p": VM_HOLD4, "q": L.VM_HOLD}[kind]
                packet = inner(vm, payload=payload) if kind in "voq" else inner4(vm, payload=payload)
                run = libbpf.prog_test_run(lab.prog_fd, bytes(h_encaps(segments, packet, dst_mac=L.FAB_MAC)),
                                           ingress_ifindex=lab.fab_ifindex)
                assert run.action == "XDP_DROP"  # parked
                seq[kind] += 1
    return seq


def _flush(socks: dict) -> None:
    for s in socks.values():
        s.setblocking(False)
        with contextlib.suppress(BlockingIOError):
            for _ in range(100_000):
                s.recv(65535)


def _arrived(socks: dict, case: int, expect: dict[str, int]) -> dict[str, list[int]]:
    """The sequence numbers of case `case` as they arrived, per kind: until `expect` of each came (or none
    for 3 s), then whatever else comes within 0.2 s (a duplicate would)."""
    got: dict[str, list[int]] = {k: [] for k in socks}
    for kind, s in socks.items():
        for _ in range(1_000_000):
            s.settimeout(3.0 if len(got[kind]) < expect.get(kind, 0) else 0.2)
            try:
                frame = s.recv(65535)
            except TimeoutError:
                break
            m = SEQ.search(frame)
            if m and int(m[1]) == case and m[2].decode() == kind:
                got[kind].append(int(m[3]))
    return got


def _once_in_order(got: dict[str, list[int]], expect: dict[str, int]) -> dict[str, str]:
    """Per kind, what arrived against `expect` of it, numbered from 0: "once, in order" or what is wrong."""
    out = {}
    for kind, seqs in got.items():
        n = expect.get(kind, 0)
        lost, twice = n - len(set(seqs) & set(range(n))), len(seqs) - len(set(seqs))
        out[kind] = ("once, in order" if seqs == list(range(n)) else
                     f"{lost} lost, {twice} twice, {'in order' if seqs == sorted(seqs) else 'reordered'}")
    return out


ONCE = {kind: "once, in order" for kind in "vwopq"}


class Killed(BaseException):
    """The agent killed: nothing of it runs past this point (not an Exception: no handler catches it)."""


class KillAt:
    """senders' libc, with the agent killed at its `at`-th sendmmsg(2): "before" it enters the kernel (the
    sent log begun), or "at-return": the kernel has sent, and a kill that landed during the call takes
    effect as it returns. The sendmmsg itself is the real one."""

    def __init__(self, real, at: int | None = None, when: str = "before"):
        self.real, self.at, self.when = real, at, when
        self.calls = 0
        self.sent = 0  # packets the kernel accepted before the kill

    def sendmmsg(self, fd, msgs, vlen, flags):
        self.calls += 1
        if self.calls == self.at and self.when == "before":
            raise Killed
        rc = self.real.sendmmsg(fd, msgs, vlen, flags)
        self.sent += max(rc, 0)
        if self.calls == self.at:
            raise Killed
        return rc


def _run(lab, path: str, pump: Pump | None = None) -> tuple[int, int | None]:
    """The path once, in the lab's namespace: how many it sent from the ring, and how many it found sent.
    `pump`: the drain's ring through it."""
    with lab.topo.inside("lab"):
        if path == "unpark":
            return unpark(lab.dp, L.VM_PARKED, "vm0", addresses=[VM_PARKED4]), None
        rep = SourceDrain(lab.dp, L.VM_HOLD, SRC, [L.D_SBUF], L.D_SBUF, addresses=[VM_HOLD4], pump=pump).ring_only()
        return rep.from_ring, rep.ring_sent_before


@pytest.mark.parametrize("path", ["unpark", "drain"])
def test_killed_at_any_send_the_restarted_agent_sends_each_record_once(lab, receivers, monkeypatch, path):
    """Kill the path at each of its sendmmsg(2) calls, just before the call and as it returns; the restarted
    path (the same, run again) sends the rest: every record arrives once, in the ring's order, and the
    restart says how many the killed one had sent."""
    runs = UNPARK_RUNS if path == "unpark" else DRAIN_RUNS
    real = senders._libc
    _flush(receivers)
    counting = KillAt(real)
    monkeypatch.setattr(senders, "_libc", counting)
    expect = _fill(lab, 0, runs)
    assert _run(lab, path)[0] == sum(expect.values())
    assert _once_in_order(_arrived(receivers, 0, expect), expect) == ONCE
    case, calls = 0, counting.calls
    for at in range(1, calls + 1):
        for when in ("before", "at-return"):
            case += 1
            expect = _fill(lab, case, runs)
            kill = KillAt(real, at, when)
            monkeypatch.setattr(senders, "_libc", kill)
            with pytest.raises(Killed):
                _run(lab, path)
            monkeypatch.setattr(senders, "_libc", real)
            sent, sent_before = _run(lab, path)
            where = f"killed {when} sendmmsg #{at}, {kill.sent} sent"
            assert _once_in_order(_arrived(receivers, case, expect), expect) == ONCE, where
            assert sent == sum(expect.values()) - kill.sent, where
            if path == "drain":
                assert sent_before == kill.sent, where
    assert calls >= (6 if path == "unpark" else 3)  # several batches, and for unpark several runs


# The agent in a process of its own: unpark() or the drain's ring, in the lab's namespace on its pinned maps,
# until killed.
AGENT = r"""
import sys
from pathlib import Path
from srmig import netlink
from srmig.ctl.drain import SourceDrain, unpark
from srmig.ctl.maps import Dataplane
ns, path, pin_dir, vm, tap, src, sid = sys.argv[1:]
with netlink.inside(ns):
    dp = Dataplane(Path(pin_dir))
    print("ready", flush=True)
    if path == "unpark":
        unpark(dp, vm, tap)
    else:
        SourceDrain(dp, vm, src, [sid], sid).ring_only()
"""


def _in_sendmmsg(pid: int) -> bool:
    """`pid` waits inside sendmmsg(2) (/proc/PID/syscall names the call a blocked task is in)."""
    try:
        with open(f"/proc/{pid}/syscall") as f:
            return f.read().split()[0] == str(SYS_SENDMMSG)
    except (OSError, IndexError):
        return False


@pytest.mark.parametrize("path, egress", [("unpark", "vm0"), ("drain", "fab0")])
def test_a_kill_that_cuts_a_blocked_send_short_loses_and_duplicates_nothing(lab, receivers, path, egress):
    """A real SIGKILL while the agent's sendmmsg(2) waits for socket buffer space (the egress held by a
    qdisc that sends nothing): the call returns what it had sent as the kill wakes it, and the agent dies.
    The kernel had written down each message it sent in the ring's sent log; the restarted agent sends the
    rest, and every record arrives once, in order."""
    runs = [("v" if path == "unpark" else "o", 300)]
    _flush(receivers)
    expect = _fill(lab, 1000, runs, size=1200)  # ~90 of them fill a socket's default send buffer
    with lab.topo.inside("lab"):
        # rate 8 bit/s after one 2000 B burst: the qdisc keeps every frame, each charged to the sender's socket.
        subprocess.run(["tc", "qdisc", "add", "dev", egress, "root", "tbf", "rate", "8bit", "burst", "2000",
                        "limit", "10000000"], check=True)
    agent = subprocess.Popen([sys.executable, "-c", AGENT, lab.topo.ns("lab"), path, str(lab.pin_dir),
                              L.VM_PARKED if path == "unpark" else L.VM_HOLD, "vm0", SRC, L.D_SBUF],
                             stdout=subprocess.PIPE, text=True, cwd=ROOT)
    try:
        assert agent.stdout.readline().strip() == "ready"
        for _ in range(2000):  # bounded: the agent reaches the full buffer within a few hundred frames
            if _in_sendmmsg(agent.pid) or agent.poll() is not None:
                break
            time.sleep(0.005)
        blocked = _in_sendmmsg(agent.pid)
    finally:
        agent.send_signal(signal.SIGKILL)
        agent.wait()
        agent.stdout.close()
    assert blocked, f"the agent never waited in sendmmsg (exit {agent.returncode})"
    with lab.topo.inside("lab"):
        # The qdisc sends what it kept (a frame of no case's, sent after the change, wakes it), then the
        # restarted agent's.
        subprocess.run(["tc", "qdisc", "change", "dev", egress, "root", "tbf", "rate", "10gbit", "burst", "1mb",
                        "limit", "10000000"], check=True)
        with socket.socket(socket.AF_PACKET, socket.SOCK_RAW, 0) as kick:
            kick.bind((egress, 0))
            kick.send(bytes(6) + bytes.fromhex("020000000001" "86dd") + bytes(40))
    sent, sent_before = _run(lab, path)
    assert _once_in_order(_arrived(receivers, 1000, expect), expect) == ONCE
    n = expect["v" if path == "unpark" else "o"]
    assert 0 < n - sent < n  # the killed agent had sent some, not all
    if path == "drain":
        assert sent_before == n - sent


# The drain's pump -----------------------------------------------------------------------------------------

PUMP_SLOTS = 32  # records per BPF_PROG_RUN: several batches a case


@pytest.fixture(scope="module")
def pumps(lab):
    """The drain's pump on the lab's ring, each way it sends: tc, and live frames where the kernel runs them
    (XDP_TX out of fab0: its peer takes XDP frames with GRO on). Small batches."""
    lab.topo.run("fab", "ethtool", "-K", "up0", "gro", "on")
    made = {}
    try:
        with lab.topo.inside("lab"):
            for mode in ("tc", "live"):
                made[mode] = Pump(lab.pin_dir, mode, slots=PUMP_SLOTS)
            try:  # no slot to send (end = 0): the program drops the frame
                libbpf.prog_test_run_live(made["live"].xdp_fd, bytes(54), 1, lab.fab_ifindex)
            except OSError as e:
                made["live"] = f"live frames refused here ({e})"
        yield made
    finally:
        for p in made.values():
            if isinstance(p, Pump):
                p.close()


def _pump(pumps, mode: str) -> Pump:
    if isinstance(pumps[mode], str):
        pytest.skip(pumps[mode])
    return pumps[mode]


@pytest.mark.parametrize("mode", ["tc", "live"])
@pytest.mark.parametrize("name, runs", [
    ("one destination, IPv6 and IPv4 inside", DRAIN_RUNS),
    ("two destinations, a run of one", PUMP_RUNS),
    ("a dozen batches", [("o", 12 * PUMP_SLOTS + 5)]),
])
def test_the_pump_sends_the_ring_once_in_order(lab, receivers, pumps, mode, name, runs):
    """The ring through the pump: every record arrives once, in the ring's order, and the drain counts each;
    the pump sent them (its batches), none went the old way."""
    pump = _pump(pumps, mode)
    _flush(receivers)
    expect = _fill(lab, 2000, runs)
    with lab.topo.inside("lab"):
        rep = SourceDrain(lab.dp, L.VM_HOLD, SRC, [L.D_SBUF], L.D_SBUF, addresses=[VM_HOLD4], pump=pump).ring_only()
    assert _once_in_order(_arrived(receivers, 2000, expect), expect) == ONCE
    assert rep.from_ring == sum(expect.values()) and rep.send_dropped == 0
    assert rep.timings["pump_batches"] >= sum(expect.values()) // PUMP_SLOTS
    assert rep.timings["pump"] == f"{mode}: asked for" and "pump_refused" not in rep.timings


class KillRun:
    """The pump's BPF_PROG_RUN, with the agent killed at its `at`-th: "before" it enters the kernel (the sent
    log and the mark begun), "inside" (the kernel ran half the batch's programs, then saw the kill between
    two runs and returned, as it does: -EINTR), or "at-return" (the whole batch sent). The runs are real."""

    def __init__(self, pump: Pump, at: int | None = None, when: str = "before"):
        self.real, self.pump, self.at, self.when = pump._run, pump, at, when
        self.calls = 0
        self.sent = 0  # records the pump sent before the kill
        self.last = 0  # of those, the killed run's (the batch the restart finds in the mark)

    def __call__(self, n: int, ifindex: int) -> None:
        self.calls += 1
        if self.calls == self.at:
            if self.when == "inside":  # n // 2 programs run: the mark as the kernel leaves it (end still n)
                self.real(max(1, n // 2), ifindex)
            elif self.when == "at-return":
                self.real(n, ifindex)
            self.last = self.pump.mark.lookup(self.pump._key).sent
            self.sent += self.last
            raise Killed
        self.real(n, ifindex)
        self.sent += self.pump.mark.lookup(self.pump._key).sent


@pytest.mark.parametrize("mode", ["tc", "live"])
def test_killed_at_any_pump_run_the_restarted_agent_sends_each_record_once(lab, receivers, pumps, monkeypatch,
                                                                             mode):
    """Kill the drain at each of its pump's BPF_PROG_RUNs, before, inside and as it returns; the restarted
    agent (with the pump, or without one: its mark is pinned, the sent log read as always) sends the rest:
    every record arrives once, in the ring's order, and the restart says how many the killed one had sent."""
    pump = _pump(pumps, mode)
    _flush(receivers)
    counting = KillRun(pump)
    monkeypatch.setattr(pump, "_run", counting)
    expect = _fill(lab, 3000, PUMP_RUNS)
    assert _run(lab, "drain", pump)[0] == sum(expect.values())
    assert _once_in_order(_arrived(receivers, 3000, expect), expect) == ONCE
    case, calls = 3000, counting.calls
    assert calls >= 8  # several batches a run, and a new batch at each change of destination
    for at in range(1, calls + 1):
        for when in ("before", "inside", "at-return"):
            case += 1
            expect = _fill(lab, case, PUMP_RUNS)
            kill = KillRun(pump, at, when)
            monkeypatch.setattr(pump, "_run", kill)
            with pytest.raises(Killed):
                _run(lab, "drain", pump)
            monkeypatch.setattr(pump, "_run", kill.real)
            sent, sent_before = _run(lab, "drain", pump if case % 2 else None)
            where = f"killed {when} run #{at}, {kill.sent} sent, restarted {'with' if case % 2 else 'without'} a pump"
            assert _once_in_order(_arrived(receivers, case, expect), expect) == ONCE, where
            assert sent == sum(expect.values()) - kill.sent, where
            assert sent_before == kill.last, where


@pytest.fixture(scope="module")
def small_ring_lab():
    """A lab whose hold ring holds ~100 of the tests' records: filled to the brim, and wrapping round its
    end, in a few rounds."""
    with L.TestRunLab(loader.Limits(hold_ring_pages=4), tag=f"{os.getpid()}-sr") as lab_:
        yield lab_


def test_the_pump_sends_a_full_ring_once_in_order_round_after_round(small_ring_lab):
    """Fill the ring until the program drops for want of room, send it through the pump (the one chosen at
    run time, in batches smaller than the ring), again and again: the records wrap round the ring's end.
    Each round, every record the ring took arrives once, in order, and nothing else of the round does."""
    lab = small_ring_lab
    with lab.topo.inside("fab"):
        rx = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(0x86DD))
    with rx:
        rx.bind(("up0", 0))
        with lab.topo.inside("lab"):
            pump = Pump(lab.pin_dir, slots=16)
        try:
            for case in range(4000, 4004):
                full0 = lab.dp.stats()["drops"].get("hold_full", 0)
                offered = _fill(lab, case, [("o", 150)])["o"]
                took = offered - (lab.dp.stats()["drops"].get("hold_full", 0) - full0)
                assert 0 < took < offered  # the ring was full
                sent, _ = _run(lab, "drain", pump)
                expect = {"o": took}
                got = _arrived({"o": rx}, case, expect)
                assert _once_in_order(got, expect) == {"o": "once, in order"}, case
                assert sent == took
            assert pump.why.startswith("tc:"), pump.why  # tc first, where both run
        finally:
            pump.close()


# The agent with the drain's pump, in a process of its own, until killed.
PUMP_AGENT = r"""
import sys
from pathlib import Path
from srmig import netlink
from srmig.ctl.drain import SourceDrain
from srmig.ctl.maps import Dataplane
from srmig.ctl.pump import Pump
ns, pin_dir, vm, sid = sys.argv[1:]
with netlink.inside(ns):
    dp = Dataplane(Path(pin_dir))
    pump = Pump(pin_dir, "tc")
    print("ready", flush=True)
    sys.stdin.readline()
    SourceDrain(dp, vm, "fc00:0:1::1", [sid], sid, pump=pump).ring_only()
"""
def _in_prog_run(pid: int) -> bool:
    """`pid` is inside BPF_PROG_RUN of a tc program, off the CPU (its kernel stack, which /proc shows of a task
    not running; /proc/PID/syscall says "running" of any runnable task, a preempted one too)."""
    try:
        with open(f"/proc/{pid}/stack") as f:
            return "bpf_prog_test_run_skb" in f.read()
    except OSError:
        return False


def test_a_real_kill_inside_the_pumps_run_loses_and_duplicates_nothing(lab, receivers, pumps):
    """A real SIGKILL while the agent's pump is inside BPF_PROG_RUN (seen in /proc/PID/stack): the kernel
    stops between two program runs and the agent dies with the batch's count in the pinned mark; the
    restarted agent (without a pump: the mark alone) sends the rest, every record once, in order."""
    _flush(receivers)
    n = 6000
    expect = _fill(lab, 5000, [("o", n)], size=600)  # two batches, each several ms inside BPF_PROG_RUN
    # The agent and this test on one CPU: a task's kernel stack is seen only while it is off the CPU, and
    # the pump's run gives the CPU up (cond_resched between two program runs) when this test wants it.
    cpu = min(os.sched_getaffinity(0))
    agent = subprocess.Popen([sys.executable, "-c", PUMP_AGENT, lab.topo.ns("lab"), str(lab.pin_dir), L.VM_HOLD,
                              L.D_SBUF], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=ROOT,
                             preexec_fn=lambda: os.sched_setaffinity(0, {cpu}))
    inside, cpus = False, os.sched_getaffinity(0)
    try:
        assert agent.stdout.readline().strip() == "ready"
        os.sched_setaffinity(0, {cpu})
        agent.stdin.write("go\n")
        agent.stdin.flush()
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and agent.poll() is None:  # bounded: 10 s
            if _in_prog_run(agent.pid):
                inside = True
                break
    finally:
        os.sched_setaffinity(0, cpus)
        agent.send_signal(signal.SIGKILL)
        agent.wait()
        agent.stdout.close()
        agent.stdin.close()
    assert inside, f"never saw the agent inside BPF_PROG_RUN (exit {agent.returncode})"
    sent, sent_before = _run(lab, "drain")
    assert _once_in_order(_arrived(receivers, 5000, expect), expect) == ONCE
    assert 0 < n - sent < n  # the killed agent had sent some, not all
