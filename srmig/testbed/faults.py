"""Faults injected into `srmig demo --libvirt` runs: `--fault NAME[@PHASE]` runs one cell, `--fault-matrix`
every meaningful one (docs/fault-matrix.md).

A fault (FAULTS) is something that dies during a live migration: an agent, a libvirtd, the destination's
QEMU, etcd's leader. A phase (PHASES) is a moment of the migration, detected from what libvirt shows this
process (its lifecycle and iteration events, the domains' states, the incoming QEMU's pid file) and, for
stop-and-copy, from the source agent's own status. Each cell waits for its phase, records what libvirt
says just before the injection, injects the fault (and its recovery: an agent back 1 s later as systemd's
RestartSec=1 would start it, libvirtd started again at once, etcd back 2 s later), and decides afterwards
from the events whether the fault landed in its phase (`fault_landed`): the phase's end (the next event,
e.g. RESUMED on D for the pause) must not have been seen before the injection.

The older `during` hooks of tests/test_agent_faults.py live here too (kill_dest_at_pause, ...).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from srmig.testbed import libvirtd as lv
from srmig.testbed.libvirt_demo import DOMAIN, GRACE_S, STATE_NAMES, VM_ADDR

AGENT_DOWN_S = 1.0    # a SIGKILLed agent is started again this much later (systemd: Restart=always, RestartSec=1)
ETCD_DOWN_S = 2.0     # a SIGKILLed etcd member is started again this much later
PHASE_TIMEOUT_S = 30  # the longest wait for a phase; a migration on a busy machine takes ~1.5-5 s
ATTEMPTS = 3          # runs of a cell at most while its fault misses its phase (as tests/agent_runs.run_until)
PROBE_CAP_S = 30      # a fault run probes until the fault is over and the ingress settled, at most this long

# libvirt's domain states (libvirt.VIR_DOMAIN_*), named here so the registry needs no libvirt to list
RUNNING, PAUSED, SHUTOFF, CRASHED = 1, 3, 5, 6


# --- the phases -------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Phase:
    name: str
    title: str      # the matrix's column header
    doc: str        # when the fault is injected, and when it counts as landed
    wait: Callable  # wait(cell) -> bool: True at the phase, False if it never came (nothing injected)
    landed: Callable  # landed(cell) -> None if the injection landed in the phase, else why not (one line)
    reads: tuple = ("S", "D")  # the domains whose state is read just before the injection (none at the
                               # pause: its wait saw S paused, and every call there delays the injection)


def _wait_provision(cell) -> bool:
    """The incoming QEMU exists on D (its pid file): the destination's begin hook has answered."""
    pid = cell.ds["D"].host_path(f"/run/libvirt/qemu/{DOMAIN}.pid")
    return cell.poll(pid.exists, 0.002)


def _landed_provision(cell) -> str | None:
    if cell.pre.get("S") != RUNNING:
        return f"the source was {cell.state_name('S')}, not running"
    return cell.not_before("D", "STARTED", "the incoming QEMU had started (STARTED on D)")


def _wait_precopy(cell) -> bool:
    """libvirt started the memory copy: its first iteration on S (STARTED on D comes before the source has
    connected to the incoming QEMU: a destination QEMU killed then fails the connection, not the copy)."""
    return cell.poll(lambda: cell.seen("S", "ITERATION"), 0.002)


def _landed_precopy(cell) -> str | None:
    if cell.pre.get("S") != RUNNING:
        return f"the source was {cell.state_name('S')}, not running"
    return cell.not_before("S", "SUSPENDED", "the source had paused (SUSPENDED on S)")


def _wait_pause(cell) -> bool:
    """The source domain is paused (polled every 0.5 ms, as the stop-and-copy's first moments)."""
    if wait_paused(cell.dom, PHASE_TIMEOUT_S):
        cell.pre["S"] = PAUSED
        return True
    return False


def _landed_pause(cell) -> str | None:
    if cell.pre.get("S") != PAUSED:
        return f"the source was {cell.state_name('S')}, not paused"
    return cell.not_before("D", "RESUMED", "the VM had resumed on D (RESUMED on D)")


def _wait_stop_and_copy(cell) -> bool:
    """The source is paused and its agent has reacted to the pause (its map says AWAY: drained, forwarding
    to D); given up when the VM resumes on D first. The map is read here, not asked of the agent: its status
    answers after the work queued before it, tens of ms after the flip, and this small guest's stop-and-copy
    lasts ~100 ms (asking, the injection missed it in 6 of 9 runs)."""
    from srmig.ctl.maps import Dataplane
    from srmig.testbed.netns import inside

    with inside(cell.tb.ns("S")):   # the pins are the namespace's; the fds outlive the switch
        dp = Dataplane()
    try:
        if not wait_paused(cell.dom, PHASE_TIMEOUT_S):
            return False

        def drained() -> bool:
            if cell.seen("D", "RESUMED"):
                raise _Missed
            return any(e.vm == VM_ADDR and e.state.name == "AWAY" for e in dp.list_vms())

        return cell.poll(drained, 0.0005)
    finally:
        dp.close()


def _landed_stop_and_copy(cell) -> str | None:
    if cell.pre.get("S") != PAUSED:
        return f"the source was {cell.state_name('S')}, not paused"
    if cell.pre.get("D") != PAUSED:
        return f"the incoming domain was {cell.state_name('D')}, not paused"
    return cell.not_before("D", "RESUMED", "the VM had resumed on D (RESUMED on D)")


def _wait_after_resume(cell) -> bool:
    """The VM runs on D (libvirt's Finish resumed it) while the source's QEMU is still there."""
    return cell.poll(lambda: cell.dest_state() == RUNNING, 0.002)


def _landed_after_resume(cell) -> str | None:
    if cell.pre.get("D") != RUNNING:
        return f"the VM on D was {cell.state_name('D')}, not running"
    if cell.pre.get("S") in (None, SHUTOFF, CRASHED):
        return f"the source was {cell.state_name('S')}: already gone"
    return cell.not_before("S", "STOPPED", "the source had stopped (STOPPED on S: cut-over)")


def _wait_grace(cell) -> bool:
    """libvirt ended the source's QEMU (STOPPED on S: the cut-over; the grace period follows)."""
    return cell.poll(lambda: cell.seen("S", "STOPPED") or not _active(cell.dom), 0.002)


def _landed_grace(cell) -> str | None:
    t = cell.event_t("S", "STOPPED", "MIGRATED")
    if t is None:
        return "the source never stopped migrated (no STOPPED/MIGRATED on S): no grace period"
    if cell.t_inject - t > GRACE_S:
        return f"injected {cell.t_inject - t:.2f} s after STOPPED on S, past the {GRACE_S:g} s grace period"
    return None


PHASES: dict[str, Phase] = {p.name: p for p in (
    Phase("provision", "provision (begin hook)",
          "the destination's begin hook has answered and its incoming QEMU exists (pid file), before QEMU "
          "started (no STARTED on D yet)", _wait_provision, _landed_provision),
    Phase("pre-copy", "pre-copy",
          "libvirt copies memory (its first iteration on S heard), the source running, before SUSPENDED on S",
          _wait_precopy, _landed_precopy),
    Phase("pause", "the pause",
          "the moment the source is seen paused (polled every 0.5 ms), before RESUMED on D",
          _wait_pause, _landed_pause, reads=()),
    Phase("stop-and-copy", "stop-and-copy to resume",
          "the source paused and its agent drained (its map AWAY), the incoming domain still paused, before "
          "RESUMED on D", _wait_stop_and_copy, _landed_stop_and_copy),
    Phase("after-resume", "after resume, before cut-over",
          "the VM runs on D, the source's QEMU not yet ended (STOPPED on S is the cut-over)",
          _wait_after_resume, _landed_after_resume),
    Phase("grace", "grace period",
          f"after STOPPED on S, within the source's grace period ({GRACE_S:g} s)", _wait_grace, _landed_grace),
)}


# --- the faults -------------------------------------------------------------------------------------------

@dataclass(frozen=True, eq=False)   # hashed by identity: one object per fault
class Fault:
    name: str
    doc: str
    default: str                     # the phase of `--fault NAME`
    inject: Callable                 # inject(cell) -> {note: monotonic time}: the fault and its recovery
    na: dict = field(default_factory=dict)   # phase -> why the cell is not meaningful
    db: str | None = None            # the state database the fault needs
    waits: dict = field(default_factory=dict)  # phase -> the phase whose wait() starts this injection

    def phases(self) -> list[str]:
        return [p for p in PHASES if p not in self.na]


def _agent_kill(role: str):
    def inject(cell) -> dict:
        t = time.monotonic()
        cell.agents.kill(role)   # SIGKILL
        time.sleep(AGENT_DOWN_S)
        cell.agents.start(role, *cell.agents.args[role])
        return {"at": t, "started": time.monotonic()}
    return inject


def _libvirtd(role: str, sig: int):
    def inject(cell) -> dict:
        t = time.monotonic()
        cell.ds[role].restart(sig=sig)   # started again at once (systemd: Restart=on-failure / restart)
        return {"at": t, "up": time.monotonic()}
    return inject


def _dest_qemu_kill(cell) -> dict:
    """SIGKILL the incoming QEMU: the migration fails and libvirt resumes the source (an abort). In
    stop-and-copy the source's QEMU is frozen (SIGSTOP) from the pause until D holds a packet, as a big VM's
    stop-and-copy would last (kill_dest_at_pause): without it libvirt resumes this small guest on S 10-15 ms
    after the pause, before D holds anything, and the abort returns nothing."""
    if cell.phase != "stop-and-copy":
        t = time.monotonic()
        os.kill(lv.qemu_pid(cell.ds["D"], DOMAIN), signal.SIGKILL)
        return {"at": t}
    src = lv.qemu_pid(cell.ds["S"], DOMAIN)
    frozen = time.monotonic()
    os.kill(src, signal.SIGSTOP)
    try:
        with contextlib.suppress(TimeoutError, RuntimeError):
            cell.agents.wait("D", lambda s: s["dataplane"]["verdicts"]["hold"] > 0, 5, "a held packet")
        cell.pre["D"] = cell.dest_state()   # the kill is the injection: D must still be paused then
        t = time.monotonic()
        os.kill(lv.qemu_pid(cell.ds["D"], DOMAIN), signal.SIGKILL)
    finally:
        os.kill(src, signal.SIGCONT)
    return {"at": t, "source_frozen": frozen, "source_thawed": time.monotonic()}


def _etcd_leader_kill(cell) -> dict:
    """SIGKILL etcd's leader, start it again ETCD_DOWN_S later (same data dir and ports). The testbed's etcd
    (srmig.testbed.etcd.EtcdServer) has one member: the leader is that member, and the database is down
    for the outage (no other member takes over)."""
    etcd = cell.tb.etcd
    t = time.monotonic()
    if hasattr(etcd, "kill_leader"):   # a cluster (srmig.testbed.etcd.EtcdCluster): another member takes over
        killed = etcd.kill_leader()
        time.sleep(ETCD_DOWN_S)
        etcd.restart(killed)
    else:
        etcd.stop(kill=True)
        time.sleep(ETCD_DOWN_S)
        etcd.start()
    return {"at": t, "up": time.monotonic()}


_AFTER_QEMU_IS_THE_VM = ("after the resume the destination's QEMU is the VM: killing it kills the guest, "
                         "which no migration scheme survives; it is no longer an abort")
FAULTS: dict[str, Fault] = {f.name: f for f in (
    Fault("source-agent-kill", "SIGKILL the source's srmig agent, started again 1 s later", "pause",
          _agent_kill("S")),
    Fault("dest-agent-kill", "SIGKILL the destination's srmig agent, started again 1 s later", "pause",
          _agent_kill("D")),
    Fault("ingress-agent-kill", "SIGKILL the ingress's srmig agent, started again 1 s later", "pause",
          _agent_kill("C")),
    Fault("source-libvirtd-restart", "restart the source's libvirtd (SIGTERM, then start: systemctl restart)",
          "pause", _libvirtd("S", signal.SIGTERM)),
    Fault("source-libvirtd-kill", "SIGKILL the source's libvirtd, started again at once (a crash)", "pause",
          _libvirtd("S", signal.SIGKILL)),
    Fault("dest-libvirtd-restart", "restart the destination's libvirtd (SIGTERM, then start)", "pause",
          _libvirtd("D", signal.SIGTERM)),
    Fault("dest-libvirtd-kill", "SIGKILL the destination's libvirtd, started again at once (a crash)", "pause",
          _libvirtd("D", signal.SIGKILL)),
    Fault("dest-qemu-kill", "SIGKILL the destination's QEMU: the migration aborts, the VM stays on S (in "
          "stop-and-copy the source's QEMU is frozen until D holds packets, as a big VM's would last)",
          "stop-and-copy", _dest_qemu_kill,
          na={"after-resume": _AFTER_QEMU_IS_THE_VM, "grace": _AFTER_QEMU_IS_THE_VM},
          waits={"stop-and-copy": "pause"}),
    Fault("etcd-leader-kill", "SIGKILL etcd's leader (the testbed's etcd has one member), started again 2 s "
          "later; needs --db etcd (implied)", "pause", _etcd_leader_kill, db="etcd"),
)}


def parse(spec: str) -> tuple[Fault, str]:
    """`NAME[@PHASE]` -> (fault, phase); ValueError (one line, listing the valid names) otherwise."""
    name, _, phase = spec.partition("@")
    fault = FAULTS.get(name)
    if fault is None:
        raise ValueError(f"unknown fault {name!r}: expected one of {', '.join(FAULTS)} "
                         f"(or 'list'), optionally @PHASE")
    phase = phase or fault.default
    if phase in fault.na:
        raise ValueError(f"{name}@{phase} is not meaningful: {fault.na[phase]}; phases of {name}: "
                         f"{', '.join(fault.phases())}")
    if phase not in PHASES:
        raise ValueError(f"unknown phase {phase!r} for {name}: expected one of {', '.join(fault.phases())}")
    return fault, phase


def listing() -> str:
    """What `--fault list` prints: every fault, its phases (the default starred) and the phases' meaning."""
    import textwrap

    def item(name: str, text: str, sub: str = "") -> list[str]:
        return textwrap.wrap(text, 110, break_on_hyphens=False, initial_indent=f"  {name:24} {sub}", subsequent_indent=" " * 27 + " " * len(sub))

    lines = ["faults (srmig demo --libvirt --fault NAME[@PHASE]; * marks the default phase):"]
    for f in FAULTS.values():
        lines += item(f.name, f.doc)
        lines += item("", " ".join(p + ("*" if p == f.default else "") for p in f.phases()), "  phases: ")
        for p, why in f.na.items():
            lines += item("", why, f"  not {p}: ")
    lines.append("phases (the fault is injected when ...):")
    for p in PHASES.values():
        lines += item(p.name, p.doc)
    return "\n".join(lines)


# --- one cell ---------------------------------------------------------------------------------------------

class _Missed(Exception):
    """The phase went by before its moment was seen."""


class Cell:
    """One fault injected in one phase of one run: `before`, `during` and `after` for libvirt_demo.run(),
    and what landed() decides from libvirt's events afterwards."""

    def __init__(self, fault: Fault, phase: str):
        self.fault, self.phase = fault, phase
        self.stop = threading.Event()
        self.pre: dict = {}           # role -> the domain's libvirt state just before the injection
        self.t_inject: float | None = None
        self.notes: dict = {}         # what inject() returned (monotonic times)
        self.reached = False
        self.error: str | None = None  # the injection's own failure, if any
        self.rec = None
        self.conns: list = []
        self.tb = self.ds = self.agents = self.dom = self.dconn = None
        self.why: str | None = None    # why the fault did not land (None: it landed)
        self.events: list[dict] = []

    # libvirt_demo.run()'s hooks
    def before(self, tb, ds, agents) -> None:
        from srmig.ctl.libvirt_events import EventRecorder

        self.stop.clear()
        self.tb, self.ds, self.agents = tb, ds, agents
        self.rec = EventRecorder(t0=0.0)  # t: time.monotonic(), the probe's clock
        for role in ("S", "D"):
            conn = ds[role].connect()
            self.conns.append(conn)
            self.rec.watch(role, conn)

    def during(self, tb, ds, agents, dom) -> None:
        self.dom = dom
        self.dconn = ds["D"].connect()   # polled by the phases (the watch's connection only listens)
        try:
            phase = PHASES[self.fault.waits.get(self.phase, self.phase)]
            try:
                self.reached = phase.wait(self)
            except _Missed:
                self.reached = False
            except Exception as e:  # noqa: BLE001 - reported with the run
                self.error = f"waiting for the {phase.name}: {type(e).__name__}: {e}"
                self.reached = False
            if self.reached:
                for role in phase.reads:
                    self.pre[role] = _state(self.dom) if role == "S" else self.dest_state()
                self.t_inject = time.monotonic()
                try:
                    self.notes = self.fault.inject(self)
                except Exception as e:  # noqa: BLE001 - reported with the run
                    self.error = f"{type(e).__name__}: {e}"
                self.t_inject = self.notes.pop("at", self.t_inject)
                tb.fault = {k: v for k, v in {"injected": self.t_inject, **self.notes}.items()
                            if isinstance(v, float)}
            self._settle()
        finally:
            with contextlib.suppress(Exception):
                self.dconn.close()
            self.stop.set()

    def _settle(self) -> None:
        """Until the migration call returned and the ingress applied the VM's latest location (bounded),
        then the source's grace period and a little more: the probe outlasts the fault and its recovery."""
        mig = getattr(self.tb, "migration", None)
        if mig is not None:
            mig.join(PHASE_TIMEOUT_S * 2)

        def applied(s) -> bool:
            loc = {r["vm"]: r for r in s.get("locations", [])}.get(VM_ADDR)
            return bool(loc and s.get("ingress") and s["ingress"]["applied"].get(VM_ADDR) == loc["version"])

        with contextlib.suppress(TimeoutError, RuntimeError):
            self.agents.wait("C", applied, 20, "the ingress settled")
        time.sleep(GRACE_S + 0.5)

    def after(self, tb, ds, agents) -> None:
        self.rec.close()
        for conn in self.conns:
            with contextlib.suppress(Exception):
                conn.close()
        self.events = list(self.rec.events)
        if self.error:
            self.why = f"the injection failed: {self.error}"
        elif not self.reached or self.t_inject is None:
            self.why = f"the {self.phase} was not seen (missed, or never came): nothing injected"
        else:
            self.why = PHASES[self.phase].landed(self)

    # what the phases ask
    def poll(self, ready, every: float) -> bool:
        """Until ready() (True), the migration call returns or PHASE_TIMEOUT_S pass (False)."""
        mig = getattr(self.tb, "migration", None)
        deadline = time.monotonic() + PHASE_TIMEOUT_S
        while time.monotonic() < deadline:
            if ready():
                return True
            if mig is not None and not mig.is_alive() and not ready():
                # the call returned: what comes after it (the source gone) is still seen by ready()
                return False
            time.sleep(every)
        return False

    def _events(self) -> list[dict]:
        self.rec.poll()
        return self.rec.events

    def seen(self, daemon: str, typ: str) -> bool:
        return self.event_t(daemon, typ) is not None

    def event_t(self, daemon: str, typ: str, detail: str | None = None) -> float | None:
        """When this process heard `daemon`'s first event of type `typ` (monotonic), None: not (yet)."""
        for e in self._events():
            if e["daemon"] == daemon and e.get("type") == typ and (detail is None or e.get("detail") == detail):
                return float(e["t"])
        return None

    def not_before(self, daemon: str, typ: str, what: str) -> str | None:
        t = self.event_t(daemon, typ)
        if t is not None and t <= self.t_inject:
            return f"{what} {(self.t_inject - t) * 1000:.1f} ms before the injection"
        return None

    def dest_state(self) -> int | None:
        d = _incoming(self.dconn) if self.dconn is not None else None
        return None if d is None else _state(d)

    def state_name(self, role: str) -> str:
        s = self.pre.get(role)
        return "absent" if s is None else STATE_NAMES.get(s, str(s))

    # the outcome
    @property
    def landed(self) -> bool:
        return self.why is None

    def info(self) -> dict:
        """fault, phase, fault_landed and how (times in ms on the probe's clock: `t0` its first send)."""
        return {"fault": self.fault.name, "phase": self.phase, "fault_landed": self.landed,
                "fault_missed_why": self.why,
                "fault_pre_states": {r: STATE_NAMES.get(s) if s is not None else None for r, s in self.pre.items()}}

    def event_marks(self, t0: float) -> dict:
        """The migration's libvirt events as heard, ms on the probe's clock."""
        out = {}
        for e in self.events:
            key = f"{e['daemon']} {e.get('type')}"
            if e["event"] == "lifecycle" and key not in out:
                out[key] = round((float(e["t"]) - t0) * 1000, 1)
        return out


def _state(dom) -> int | None:
    """The domain's libvirt state now, None if libvirt cannot say (gone, or its daemon down)."""
    with contextlib.suppress(Exception):
        return dom.state()[0]
    return None


def _active(dom) -> bool:
    with contextlib.suppress(Exception):
        return bool(dom.isActive())
    return False


def run_cell(fault: Fault, phase: str, rate: int = 2000, db: str | None = None, xdp_mode: str = "generic",
             attempts: int = ATTEMPTS, count: int | None = None, say=lambda m: None, show=print,
             note=lambda m: print(m, file=sys.stderr)):
    """One cell: libvirt_demo.run() with `fault` injected in `phase`, again (at most `attempts` runs) while
    the fault missed its phase (`note`d). Returns the last run's Result, with res.cell (the Cell) and
    res.attempts; res.to_dict() carries fault, phase, fault_landed."""
    from srmig.ctl.libvirt_events import ensure_event_loop
    from srmig.testbed import libvirt_demo

    ensure_event_loop()  # before the watch's connections
    db = db or fault.db or "embedded"
    if fault.db and db != fault.db:
        raise ValueError(f"{fault.name} needs --db {fault.db}")
    for n in range(1, attempts + 1):
        cell = Cell(fault, phase)
        say(f"{fault.name}@{phase}: run {n}/{attempts}")
        res = libvirt_demo.run(rate, count or rate * PROBE_CAP_S, db, xdp_mode, say=say, before=cell.before,
                               during=cell.during, after=cell.after, stop=cell.stop, show=show)
        res.cell, res.attempts = cell, n
        res.fault_info = {**cell.info(), "fault_attempts": n,
                          "fault_ms": res.faults, "libvirt_events_ms": cell.event_marks(res.report.t0 or 0.0)}
        if cell.landed:
            break
        note(f"{fault.name}@{phase}: run {n} of {attempts} at most missed its phase: {cell.why}")
    return res


# --- the matrix ---------------------------------------------------------------------------------------------

def cells(only: list[str] | None = None) -> list[tuple[Fault, str]]:
    """Every meaningful (fault, phase), or those `only` names: NAME (its row) or NAME@PHASE (one cell)."""
    if not only:
        return [(f, p) for f in FAULTS.values() for p in f.phases()]
    out = []
    for spec in only:
        if "@" in spec:
            out.append(parse(spec))
        else:
            out += [(f, p) for f, p in cells() if f.name == parse(spec)[0].name]
    return list(dict.fromkeys(out))


def _commit() -> str | None:
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=5,
                             cwd=Path(__file__).resolve().parent)
        return out.stdout.strip() or None
    return None


def load(json_path: Path) -> dict:
    if json_path.exists():
        return json.loads(json_path.read_text())
    return {"cells": {}}


def matrix(out_md: str, runs: int = 1, only: list[str] | None = None, fresh: bool = False, rate: int = 2000,
           xdp_mode: str = "generic", attempts: int = ATTEMPTS, say=lambda m: None,
           note=lambda m: print(m, file=sys.stderr)) -> tuple[int, int]:
    """Run every selected cell until it has `runs` runs recorded in OUT.json (next to OUT.md), merging into
    what is there (so an interrupted matrix goes on where it stopped; `fresh`: the selected cells' runs are
    discarded first), and write the table after every run. Returns (runs recorded, runs whose testbed failed:
    nothing recorded, tried again once more at most)."""
    md = Path(out_md)
    js = md.with_suffix(".json")
    data = load(js)
    data["command"] = COMMAND
    todo = cells(only)
    if fresh:
        for f, p in todo:
            data["cells"].pop(f"{f.name}@{p}", None)
    made, failed = 0, 0
    for f, p in todo:
        key = f"{f.name}@{p}"
        tries = 0
        while len(data["cells"].get(key, [])) < runs and tries < runs + 1:
            tries += 1
            say(f"[{key}] run {len(data['cells'].get(key, [])) + 1}/{runs}")
            try:
                res = run_cell(f, p, rate=rate, xdp_mode=xdp_mode, attempts=attempts, say=say, show=None, note=note)
            except Exception as e:  # noqa: BLE001 - the testbed failed, not the cell: left "not run yet"
                failed += 1
                note(f"[{key}] the run failed, nothing recorded: {type(e).__name__}: {str(e)[:300]}")
                continue
            d = res.to_dict()
            rec = {k: d.get(k) for k in ("sent", "lost", "lost_net", "duplicated", "reordered", "fault_landed",
                                          "fault_attempts", "fault_missed_why", "vm_on", "domains", "migration_s", "db")}
            rec.update(error=(d["error"] or "")[:200] or None, rate=rate, commit=_commit(),
                       when=time.strftime("%Y-%m-%d %H:%M", time.gmtime()))
            data["cells"].setdefault(key, []).append(rec)
            made += 1
            js.write_text(json.dumps(data, indent=1, sort_keys=True) + "\n")
            md.write_text(render(data, js.name))
            note(f"[{key}] lost {d['lost_net']} duplicated {d['duplicated']} reordered {d['reordered']} "
                 f"landed {d['fault_landed']} (run {d['fault_attempts']}), the VM on {d['vm_on']}")
    js.write_text(json.dumps(data, indent=1, sort_keys=True) + "\n")
    md.write_text(render(data, js.name))
    return made, failed


COMMAND = "srmig demo --libvirt --fault-matrix docs/fault-matrix.md"


def _span(values: list[int]) -> str:
    lo, hi = min(values), max(values)
    return str(lo) if lo == hi else f"{lo}–{hi}"


def cell_text(runs: list[dict]) -> str:
    """`lost / duplicated / reordered` over a cell's runs (ranges when they differ), ×N for N runs;
    † when the last attempt's fault still missed its phase, ↩ when the VM stayed on S (an abort), ‖ when it
    ran on both hosts at the end, ✗ when it ran nowhere."""
    text = " / ".join(_span([r[k] for r in runs]) for k in ("lost_net", "duplicated", "reordered"))
    if len(runs) > 1:
        text += f" ×{len(runs)}"
    if any(not r.get("fault_landed") for r in runs):
        text += " †"
    if any(r.get("vm_on") == "S" for r in runs):
        text += " ↩"
    if any(r.get("vm_on") == "S+D" for r in runs):
        text += " ‖"
    if any(r.get("vm_on") is None for r in runs):
        text += " ✗"
    return text


def render(data: dict, json_name: str) -> str:
    """The markdown of docs/fault-matrix.md from the JSON (nothing typed by hand)."""
    recorded = data.get("cells", {})
    lines = [
        "# Every fault in every phase",
        "",
        "<!-- generated by srmig/testbed/faults.py (render); edit that, not this file -->",
        "",
        f"Generated by `{data.get('command', COMMAND)}` from [{json_name}]({json_name}), which keeps every run. "
        "It is incremental: it runs only the cells with fewer runs than `--runs N` (default 1), so an interrupted "
        "run goes on where it stopped, and `--only NAME[@PHASE],...` selects rows or cells (`--fresh` discards "
        "their runs first). `srmig demo --libvirt --fault NAME@PHASE` runs one cell and prints it.",
        "",
        "Each run is one libvirt live migration of the test guest under 2000 probes/s (the setup of "
        "[faults.md](faults.md)), the fault injected in the phase and recovered from (an agent back 1 s later, "
        "libvirtd started again at once, etcd back 2 s later). A cell reads **lost / duplicated / reordered**; "
        "lost is `lost_net` (less what the guest's own counters say it received and left unanswered). A cell "
        f"whose fault missed its phase is run again, {ATTEMPTS} runs at most; the figures are the last run's.",
        "",
        "Marks: ×N: N runs (ranges over them); †: the fault never landed in its phase (the figures are from a "
        "run whose fault landed elsewhere, or was not injected); ↩: the migration aborted and the VM stayed on "
        "S; ‖: the VM ran on both hosts at the end (a split brain: libvirt resumed the source while the "
        "destination's ran); ✗: the VM ran nowhere at the end; —: not meaningful (below); *not run yet*: no run "
        "recorded.",
        "",
        "| fault | " + " | ".join(p.title for p in PHASES.values()) + " |",
        "|---|" + "---|" * len(PHASES),
    ]
    for f in FAULTS.values():
        row = []
        for p in PHASES:
            if p in f.na:
                row.append("—")
            elif runs := recorded.get(f"{f.name}@{p}"):
                row.append(cell_text(runs))
            else:
                row.append("*not run yet*")
        lines.append(f"| `{f.name}` | " + " | ".join(row) + " |")
    lines += ["", "## The faults", ""]
    lines += [f"- `{f.name}`: {f.doc}." for f in FAULTS.values()]
    lines += ["", "Not meaningful:", ""]
    lines += [f"- `{f.name}@{p}`: {why}." for f in FAULTS.values() for p, why in f.na.items()]
    lines += ["", "## The phases", "",
              "Detected from libvirt's events and the domains' states as this process sees them; a fault landed "
              "in its phase when the event that ends the phase had not been heard before the injection.", ""]
    lines += [f"- `{p.name}` ({p.title}): {p.doc}." for p in PHASES.values()]
    missed = [(k, r) for k, runs in recorded.items() for r in runs if not r.get("fault_landed")]
    if missed:
        lines += ["", "## Runs whose fault missed its phase", ""]
        lines += [f"- `{k}` ({r.get('when')}): {r.get('fault_missed_why')}" for k, r in missed]
    errors = sorted({(k, r["error"]) for k, runs in recorded.items() for r in runs if r.get("error")})
    if errors:
        lines += ["", "## The migration call's errors", "",
                  "What `virDomainMigrateToURI3` raised (expected for an abort, and when the source's libvirtd "
                  "goes away under it):", ""]
        lines += [f"- `{k}`: {e}" for k, e in errors]
    return "\n".join(lines) + "\n"


# --- the `during` hooks of tests/test_agent_faults.py -----------------------------------------------------

def wait_paused(dom, timeout: float = 30) -> bool:
    """Until the domain is paused (stop-and-copy began), polled every 0.5 ms, bounded. False if the pause was
    missed (the domain left the source first: on a busy machine a poll can take longer than the pause) or
    never came: the caller then injects nothing."""
    import libvirt  # noqa: PLC0415

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            state = dom.state()[0]
        except libvirt.libvirtError as e:
            if e.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN:
                return False
            state = None
        if state == libvirt.VIR_DOMAIN_PAUSED:
            return True
        if state in (libvirt.VIR_DOMAIN_SHUTOFF, libvirt.VIR_DOMAIN_CRASHED):
            return False
        time.sleep(0.0005)
    return False


def kill_dest_at_pause(tb, ds, agents, dom, timeout: float = 30, held_within_s: float = 5) -> None:
    """Abort after stop-and-copy began, once the destination holds something: at the pause, SIGSTOP the
    source's QEMU (a long stop-and-copy, as a big VM's would be) until the destination's agent has held a
    packet (the source drained and forwarded to it; at most `held_within_s`), then SIGKILL the destination's
    QEMU and SIGCONT the source's: its migration fails and libvirt resumes it. Without the freeze libvirt
    resumed the source 10-15 ms after the pause, and under one busy loop the starved source agent had not
    forwarded anything by then (3 runs of 3): the abort returned nothing, so it proved nothing.
    tb.dest_killed says when (monotonic): the source frozen, the destination killed, the source thawed."""
    if not wait_paused(dom, timeout):
        return
    src = lv.qemu_pid(ds["S"], DOMAIN)
    frozen = time.monotonic()
    os.kill(src, signal.SIGSTOP)
    try:
        with contextlib.suppress(TimeoutError):
            agents.wait("D", lambda s: s["dataplane"]["verdicts"]["hold"] > 0, held_within_s, "a held packet")
        os.kill(lv.qemu_pid(ds["D"], DOMAIN), signal.SIGKILL)
        killed = time.monotonic()
    finally:
        os.kill(src, signal.SIGCONT)
    tb.dest_killed = {"source_frozen": frozen, "killed": killed, "source_thawed": time.monotonic()}


def freeze_ingress(tb, ds, agents) -> None:
    """`before`: the ingress agent stops answering (SIGSTOP) before the migration: it will be late."""
    agents.procs["C"].send_signal(signal.SIGSTOP)


def _wait_left_source(dom, poll_s: float, timeout: float) -> None:
    """Until the domain has left the source (libvirt ended its QEMU), polled every `poll_s`, bounded."""
    import libvirt  # noqa: PLC0415

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if not dom.isActive():
                return
        except libvirt.libvirtError:
            return
        time.sleep(poll_s)


def thaw_ingress_after_migration(tb, ds, agents, dom, timeout: float = 30) -> None:
    """`during`: once the domain has left the source, let the ingress agent run again."""
    _wait_left_source(dom, 0.05, timeout)
    agents.procs["C"].send_signal(signal.SIGCONT)


def stall_source_agent_over_pause(tb, ds, agents, dom, timeout: float = 30) -> None:
    """`during`: the source's agent stops (SIGSTOP) in pre-copy, once it has provisioned the migration, and
    runs again (SIGCONT) only once libvirt ended the source's QEMU: an agent starved of CPU through the
    whole stop-and-copy. It hears of the pause after the QEMU whose tap queue it must drain is gone.
    tb.agent_stall says when (monotonic)."""
    agents.wait("S", lambda s: any(v["vm"] == VM_ADDR and v["phase"] == "provision" for v in s["vms"]),
                timeout, "the source's migration provisioned")
    proc = agents.procs["S"]
    t_stop = time.monotonic()
    proc.send_signal(signal.SIGSTOP)
    try:
        _wait_left_source(dom, 0.005, timeout)
    finally:
        proc.send_signal(signal.SIGCONT)
    tb.agent_stall = {"stopped": t_stop, "continued": time.monotonic()}


def restart_agent_at_pause(role: str, down_s: float = 1.0):
    """`during`: SIGKILL the agent of `role` as soon as the source is paused, start it again `down_s` later
    (systemd's Restart=always, RestartSec=1)."""
    def during(tb, ds, agents, dom, timeout: float = 30):
        if wait_paused(dom, timeout):
            _kill_and_restart(tb, agents, role, down_s, dom)
    return during


def _incoming(conn):
    """The guest's domain on the destination's connection, or None (listed: a failed lookup logs an error)."""
    with contextlib.suppress(Exception):
        return next((d for d in conn.listAllDomains(0) if d.name() == DOMAIN), None)
    return None


def _has_incoming(conn) -> bool:
    return _incoming(conn) is not None


def _source_state(dom) -> int | None:
    """The source domain's libvirt state now, None if libvirt cannot say (for a test to check the phase a
    fault hit)."""
    return _state(dom)


def _kill_and_restart(tb, agents, role: str, down_s: float, dom) -> None:
    """SIGKILL the agent of `role`, start it again `down_s` later; tb.agent_fault says when, and the source
    domain's libvirt state at the kill (for the test to check the phase it hit)."""
    state = _source_state(dom)
    t_kill = time.monotonic()
    agents.kill(role)
    time.sleep(down_s)
    agents.start(role, *agents.args[role])
    tb.agent_fault = {"role": role, "killed": t_kill, "started": time.monotonic(), "source_state": state}


def _wait_on_dest(ds, ready, poll_s: float, timeout: float) -> None:
    """Poll D's libvirtd (a connection of our own) until `ready(conn)` holds, at most `timeout` s."""
    import libvirt  # noqa: PLC0415

    conn = ds["D"].connect()
    try:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with contextlib.suppress(libvirt.libvirtError):
                if ready(conn):
                    return
            time.sleep(poll_s)
    finally:
        conn.close()


def _restart_agent_when(role: str, ready, down_s: float, poll_s: float):
    """`during`: SIGKILL the agent of `role` once `ready(conn)` holds on D's libvirtd (polled every
    `poll_s`), start it again `down_s` later."""
    def during(tb, ds, agents, dom, timeout: float = 30):
        _wait_on_dest(ds, ready, poll_s, timeout)
        _kill_and_restart(tb, agents, role, down_s, dom)
    return during


def restart_dest_agent_in_precopy(down_s: float = 1.0):
    """`during`: SIGKILL the destination's agent once its libvirtd has the incoming domain (its begin hook has
    answered: QEMU starts after it), i.e. during pre-copy; start it again `down_s` later."""
    return _restart_agent_when("D", _has_incoming, down_s, 0.005)


def restart_source_agent_after_resume(down_s: float = 1.0):
    """`during`: SIGKILL the source's agent as soon as the domain runs on the destination (libvirt's Finish
    resumed it; the source's cut-over and grace period are still to come); start it again `down_s` later."""
    def running(conn) -> bool:
        d = _incoming(conn)
        return d is not None and d.state()[0] == RUNNING

    return _restart_agent_when("S", running, down_s, 0.002)


def _restart_source_libvirtd(tb, ds, dom, sig: int) -> None:
    """Restart the source's libvirtd (Libvirtd.restart: any thread) after signal `sig`; tb.libvirtd_fault
    says when, and the source domain's libvirt state just before (for the test to check the phase it hit)."""
    state = _source_state(dom)
    t_down = time.monotonic()
    ds["S"].restart(sig=sig)
    tb.libvirtd_fault = {"down": t_down, "up": time.monotonic(), "source_state": state}


def restart_source_libvirtd_at_pause(sig: int = signal.SIGTERM, qemu_stopped_s: float = 0):
    """`during`: restart the source's libvirtd (after `sig`) as soon as the source is paused. `qemu_stopped_s`:
    SIGSTOP the source's QEMU first, SIGCONT it that much later: the new daemon's recovery of the migration
    job waits for QEMU's monitor meanwhile (a slow recovery), so the agent reconnects before it is over."""
    def during(tb, ds, agents, dom, timeout: float = 30):
        if not wait_paused(dom, timeout):
            return
        if qemu_stopped_s:
            pid = lv.qemu_pid(ds["S"], DOMAIN)
            os.kill(pid, signal.SIGSTOP)
            threading.Timer(qemu_stopped_s, os.kill, (pid, signal.SIGCONT)).start()
        _restart_source_libvirtd(tb, ds, dom, sig)
    return during


def restart_source_libvirtd_in_precopy(sig: int = signal.SIGTERM):
    """`during`: restart the source's libvirtd (after `sig`) once the destination's has the incoming domain
    (pre-copy)."""
    def during(tb, ds, agents, dom, timeout: float = 30):
        _wait_on_dest(ds, _has_incoming, 0.005, timeout)
        _restart_source_libvirtd(tb, ds, dom, sig)
    return during


def etcd_down_at_pause(down_s: float = 2.0):
    """`during` (db="etcd"): SIGKILL the etcd member as soon as the source is paused, start it again (same
    data dir and ports) `down_s` later."""
    def during(tb, ds, agents, dom, timeout: float = 30):
        if not wait_paused(dom, timeout):
            return
        state = _source_state(dom)
        t_down = time.monotonic()
        tb.etcd.stop(kill=True)
        time.sleep(down_s)
        tb.etcd.start()
        tb.etcd_outage = (t_down, time.monotonic())  # monotonic, the probe's clock
        tb.etcd_fault = {"down": t_down, "up": tb.etcd_outage[1], "source_state": state}
    return during
