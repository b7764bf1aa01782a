"""`srmig demo --libvirt --fault NAME[@PHASE]` and `--fault-matrix`: the registry of faults and phases
(srmig/testbed/faults.py), the CLI's parsing and one-line errors, how a cell decides that its fault landed,
the matrix's bookkeeping and table, without a VM; and one real cell through the CLI (libvirt)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

ROOT = Path(__file__).resolve().parents[1]
SRMIG = [sys.executable, "-m", "srmig"]


def srmig(*argv: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([*SRMIG, *argv], cwd=ROOT, capture_output=True, text=True, timeout=timeout)


# --- the registry -----------------------------------------------------------------------------------------

def test_registry_covers_every_fault_and_phase_of_the_issue():
    from srmig.testbed import faults

    assert list(faults.PHASES) == ["provision", "pre-copy", "pause", "stop-and-copy", "after-resume", "grace"]
    assert set(faults.FAULTS) == {
        "source-agent-kill", "dest-agent-kill", "ingress-agent-kill", "source-libvirtd-restart",
        "source-libvirtd-kill", "dest-libvirtd-restart", "dest-libvirtd-kill", "dest-qemu-kill",
        "etcd-leader-kill"}
    for f in faults.FAULTS.values():
        assert f.default in f.phases(), f.name
        assert set(f.na) <= set(faults.PHASES) and all(why for why in f.na.values()), f.name
        assert set(f.waits) <= set(faults.PHASES) and set(f.waits.values()) <= set(faults.PHASES), f.name
    # the only cells that are not meaningful: killing the destination's QEMU once it is the VM
    assert [(f.name, p) for f in faults.FAULTS.values() for p in f.na] == [
        ("dest-qemu-kill", "after-resume"), ("dest-qemu-kill", "grace")]
    assert len(faults.cells()) == 9 * 6 - 2
    assert faults.FAULTS["etcd-leader-kill"].db == "etcd"


@pytest.mark.parametrize("spec,fault,phase", [
    ("source-agent-kill", "source-agent-kill", "pause"),
    ("dest-qemu-kill", "dest-qemu-kill", "stop-and-copy"),      # its own default
    ("ingress-agent-kill@grace", "ingress-agent-kill", "grace"),
    ("dest-libvirtd-kill@pre-copy", "dest-libvirtd-kill", "pre-copy"),
    ("etcd-leader-kill@provision", "etcd-leader-kill", "provision"),
])
def test_parse_names_and_default_phases(spec, fault, phase):
    from srmig.testbed import faults

    f, p = faults.parse(spec)
    assert (f.name, p) == (fault, phase)


@pytest.mark.parametrize("spec,says", [
    ("nope", ["unknown fault 'nope'", "source-agent-kill", "etcd-leader-kill"]),
    ("source-agent-kill@precopy", ["unknown phase 'precopy'", "pre-copy", "stop-and-copy", "grace"]),
    ("dest-qemu-kill@grace", ["not meaningful", "kills the guest", "provision, pre-copy, pause, stop-and-copy"]),
    ("@pause", ["unknown fault ''"]),
])
def test_parse_errors_are_one_line_listing_the_valid_names(spec, says):
    from srmig.testbed import faults

    with pytest.raises(ValueError) as e:
        faults.parse(spec)
    assert "\n" not in str(e.value)
    for s in says:
        assert s in str(e.value)


def test_cells_select_rows_and_cells():
    from srmig.testbed import faults

    row = faults.cells(["dest-qemu-kill"])
    assert [p for _, p in row] == ["provision", "pre-copy", "pause", "stop-and-copy"]
    picked = faults.cells(["ingress-agent-kill@grace", "dest-qemu-kill@pause", "ingress-agent-kill@grace"])
    assert [(f.name, p) for f, p in picked] == [("ingress-agent-kill", "grace"), ("dest-qemu-kill", "pause")]
    with pytest.raises(ValueError, match="unknown fault"):
        faults.cells(["bogus"])


# --- fault_landed, from the events as heard ---------------------------------------------------------------

class _Recorder:
    """EventRecorder's interface over a fixed list of events (t: monotonic, as the recorder stamps them)."""

    def __init__(self, events):
        self.events = [{"event": "lifecycle", **e} for e in events]

    def poll(self):
        return []

    def close(self):
        pass


def _cell(fault: str, phase: str, t_inject: float, pre: dict, events: list[dict]):
    from srmig.testbed import faults

    cell = faults.Cell(*faults.parse(f"{fault}@{phase}"))
    cell.rec, cell.t_inject, cell.pre, cell.reached = _Recorder(events), t_inject, pre, True
    cell.why = faults.PHASES[phase].landed(cell)
    return cell


# The recorded precopy migration (tests/fixtures/libvirt/precopy.json), seconds
PRECOPY = [{"daemon": "D", "t": 0.7415, "type": "STARTED", "detail": "MIGRATED"},
           {"daemon": "S", "t": 0.7583, "type": "ITERATION", "detail": "1"},
           {"daemon": "S", "t": 1.111, "type": "SUSPENDED", "detail": "MIGRATED"},
           {"daemon": "D", "t": 1.2169, "type": "RESUMED", "detail": "MIGRATED"},
           {"daemon": "S", "t": 1.4476, "type": "STOPPED", "detail": "MIGRATED"}]
RUN, PAUSE = 1, 3


@pytest.mark.parametrize("phase,t,pre,landed,why", [
    ("provision", 0.5, {"S": RUN, "D": PAUSE}, True, None),
    ("provision", 0.8, {"S": RUN, "D": PAUSE}, False, "STARTED on D"),
    ("provision", 0.5, {"S": PAUSE, "D": PAUSE}, False, "not running"),
    ("pre-copy", 0.9, {"S": RUN, "D": PAUSE}, True, None),
    ("pre-copy", 1.15, {"S": RUN, "D": PAUSE}, False, "SUSPENDED on S"),
    ("pause", 1.112, {"S": PAUSE}, True, None),
    ("pause", 1.3, {"S": PAUSE}, False, "RESUMED on D"),
    ("stop-and-copy", 1.15, {"S": PAUSE, "D": PAUSE}, True, None),
    ("stop-and-copy", 1.15, {"S": PAUSE, "D": RUN}, False, "incoming domain was running"),
    ("stop-and-copy", 1.22, {"S": PAUSE, "D": PAUSE}, False, "RESUMED on D"),
    ("after-resume", 1.3, {"S": PAUSE, "D": RUN}, True, None),
    ("after-resume", 1.5, {"S": PAUSE, "D": RUN}, False, "STOPPED on S"),
    ("after-resume", 1.3, {"S": None, "D": RUN}, False, "already gone"),
    ("grace", 1.6, {}, True, None),
    ("grace", 2.6, {}, False, "past the 1 s grace period"),
])
def test_landed_from_the_events_heard_before_the_injection(phase, t, pre, landed, why):
    cell = _cell("dest-agent-kill", phase, t, pre, PRECOPY)
    assert cell.landed is landed, cell.why
    if why:
        assert why in cell.why
    assert cell.info()["fault_landed"] is landed


def test_grace_needs_the_source_stopped_migrated():
    cell = _cell("source-agent-kill", "grace", 1.6, {}, PRECOPY[:-1])  # aborted: S never stopped
    assert not cell.landed and "no grace period" in cell.why


def test_nothing_injected_is_not_landed():
    from srmig.testbed import faults

    cell = faults.Cell(*faults.parse("ingress-agent-kill@pause"))
    cell.rec, cell.conns = _Recorder(PRECOPY), []
    cell.after(None, None, None)
    assert not cell.landed and "nothing injected" in cell.why


# --- exit status ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("d,status", [
    ({"lost_net": 0, "duplicated": 0, "vm_on": "D", "error": None, "fault": None}, 0),
    ({"lost_net": 1, "duplicated": 0, "vm_on": "D", "error": None, "fault": None}, 1),
    ({"lost_net": 0, "duplicated": 0, "vm_on": "S", "error": "migration failed", "fault": None}, 1),
    ({"lost_net": 0, "duplicated": 0, "vm_on": "S", "error": "aborted", "fault": "dest-qemu-kill",
      "fault_landed": True}, 0),
    ({"lost_net": 0, "duplicated": 2, "vm_on": "D", "error": None, "fault": "x", "fault_landed": True}, 1),
    ({"lost_net": 0, "duplicated": 0, "vm_on": None, "error": None, "fault": "x", "fault_landed": True}, 1),
    ({"lost_net": 0, "duplicated": 0, "vm_on": "S+D", "error": "x", "fault": "x", "fault_landed": True}, 1),
    ({"lost_net": 9, "duplicated": 0, "vm_on": "D", "error": None, "fault": "x", "fault_landed": False}, 3),
])
def test_exit_status(d, status):
    from srmig.testbed import libvirt_demo

    assert libvirt_demo.exit_status(d) == status


# --- the CLI ----------------------------------------------------------------------------------------------

def test_fault_list_names_every_fault_phase_and_default():
    from srmig.testbed import faults

    out = srmig("demo", "--fault", "list")
    assert out.returncode == 0, out.stderr
    for f in faults.FAULTS.values():
        assert f.name in out.stdout
        assert f"{f.default}*" in out.stdout
    for p in faults.PHASES:
        assert f"\n  {p} " in out.stdout
    assert "not grace: after the resume" in out.stdout


@pytest.mark.parametrize("argv,says", [
    (["--libvirt", "--fault", "bogus"], "unknown fault 'bogus': expected one of source-agent-kill"),
    (["--libvirt", "--fault", "dest-agent-kill@later"], "unknown phase 'later' for dest-agent-kill"),
    (["--libvirt", "--fault", "dest-qemu-kill@after-resume"], "dest-qemu-kill@after-resume is not meaningful"),
    (["--libvirt", "--fault", "etcd-leader-kill", "--db", "embedded"], "etcd-leader-kill needs --db etcd"),
    (["--libvirt", "--only", "dest-agent-kill"], "--only: only with --fault-matrix OUT.md"),
    (["--fault", "dest-agent-kill", "--fault-matrix", "x.md"], "one or the other"),
    (["--fault-matrix", "x.md", "--only", "nope@pause"], "unknown fault 'nope'"),
    (["--fault-matrix", "x.md", "--db", "etcd"], "picks the database per fault"),
    (["--libvirt", "--fault", "dest-agent-kill", "--attempts", "0"], "--attempts: at least 1"),
    (["--libvirt", "--fault", "dest-agent-kill", "--family", "4"], "--family: not with --fault"),
    (["--soak", "2", "--family", "both"], "--family: not with --fault, --fault-matrix or --soak"),
    (["--libvirt", "--guest-echo", "kernel"], "--guest-echo: the namespace demo only"),
])
def test_bad_arguments_are_one_line_exit_2_and_run_nothing(argv, says):
    out = srmig("demo", *argv)
    assert out.returncode == 2, (out.stdout, out.stderr)
    assert out.stderr.strip().count("\n") == 0 and says in out.stderr, out.stderr
    assert not Path(ROOT / "x.md").exists() and not Path(ROOT / "x.json").exists()


def test_help_teaches_faults_and_exit_status():
    out = srmig("demo", "--help")
    assert out.returncode == 0, out.stderr
    for s in ("--fault NAME[@PHASE]", "--fault list", "--fault-matrix OUT.md", "--runs N", "--only",
              "--attempts N", "exit status", "fault_landed", "missed its phase"):
        assert s in out.stdout, s


# --- the matrix's bookkeeping, without a VM ---------------------------------------------------------------

def _fake_run_cell(calls: list, landed_at: set):
    """run_cell's stand-in: a Result-like object whose to_dict() says which cell ran."""
    def run_cell(fault, phase, **kw):
        calls.append(f"{fault.name}@{phase}")
        d = {"sent": 100, "lost": 0, "lost_net": len(calls) % 3, "duplicated": 0, "reordered": 1,
             "fault_landed": f"{fault.name}@{phase}" not in landed_at, "fault_attempts": 1,
             "fault_missed_why": None, "vm_on": "S" if fault.name == "dest-qemu-kill" else "D",
             "migration_s": 1.5, "db": fault.db or "embedded", "error": None}
        return SimpleNamespace(to_dict=lambda: d)
    return run_cell


def test_matrix_is_incremental_and_writes_table_and_json(tmp_path, monkeypatch):
    from srmig.testbed import faults

    calls: list = []
    monkeypatch.setattr(faults, "run_cell", _fake_run_cell(calls, {"dest-qemu-kill@pause"}))
    md = tmp_path / "m.md"
    assert faults.matrix(str(md), only=["dest-qemu-kill"]) == (4, 0)
    assert calls == ["dest-qemu-kill@provision", "dest-qemu-kill@pre-copy", "dest-qemu-kill@pause",
                     "dest-qemu-kill@stop-and-copy"]
    data = json.loads((tmp_path / "m.json").read_text())
    assert set(data["cells"]) == set(calls) and data["command"] == faults.COMMAND
    # again: nothing left to run; two runs per cell: one more each, merged
    assert faults.matrix(str(md), only=["dest-qemu-kill"]) == (0, 0)
    assert faults.matrix(str(md), runs=2, only=["dest-qemu-kill@pause", "ingress-agent-kill@grace"]) == (3, 0)
    data = json.loads((tmp_path / "m.json").read_text())
    assert len(data["cells"]["dest-qemu-kill@pause"]) == 2 and len(data["cells"]["ingress-agent-kill@grace"]) == 2
    assert len(data["cells"]["dest-qemu-kill@provision"]) == 1
    # --fresh: the selected cells' runs discarded first
    assert faults.matrix(str(md), only=["dest-qemu-kill@pause"], fresh=True) == (1, 0)
    assert len(json.loads((tmp_path / "m.json").read_text())["cells"]["dest-qemu-kill@pause"]) == 1

    table = md.read_text()
    rows = {ln.split("|")[1].strip(): [c.strip() for c in ln.split("|")[2:-1]]
            for ln in table.splitlines() if ln.startswith("| `")}
    assert set(rows) == {f"`{f}`" for f in faults.FAULTS}
    assert all(len(r) == len(faults.PHASES) for r in rows.values())
    q = rows["`dest-qemu-kill`"]
    assert q[4:] == ["—", "—"] and q[2].endswith("† ↩") and q[3].endswith("↩")   # n/a; missed; aborted
    assert rows["`ingress-agent-kill`"][5].endswith("×2") and rows["`ingress-agent-kill`"][0] == "*not run yet*"
    assert faults.COMMAND in table and "m.json" in table


def test_matrix_keeps_going_when_a_testbed_fails(tmp_path, monkeypatch):
    from srmig.testbed import faults

    def broken(fault, phase, **kw):
        raise RuntimeError("the guest on S does not answer through the ingress")

    monkeypatch.setattr(faults, "run_cell", broken)
    made, failed = faults.matrix(str(tmp_path / "m.md"), only=["dest-agent-kill@pause", "dest-agent-kill@grace"])
    assert (made, failed) == (0, 4)   # each tried twice, nothing recorded
    assert "*not run yet*" in (tmp_path / "m.md").read_text()


@pytest.mark.parametrize("runs,text", [
    ([{"lost_net": 0, "duplicated": 0, "reordered": 0, "fault_landed": True, "vm_on": "D"}], "0 / 0 / 0"),
    ([{"lost_net": 0, "duplicated": 0, "reordered": 3, "fault_landed": True, "vm_on": "D"},
      {"lost_net": 2, "duplicated": 0, "reordered": 1, "fault_landed": True, "vm_on": "D"}], "0–2 / 0 / 1–3 ×2"),
    ([{"lost_net": 1, "duplicated": 0, "reordered": 0, "fault_landed": False, "vm_on": "S"}], "1 / 0 / 0 † ↩"),
    ([{"lost_net": 900, "duplicated": 0, "reordered": 0, "fault_landed": True, "vm_on": None}], "900 / 0 / 0 ✗"),
    ([{"lost_net": 0, "duplicated": 18, "reordered": 124, "fault_landed": True, "vm_on": "S+D"}], "0 / 18 / 124 ‖"),
])
def test_cell_text(runs, text):
    from srmig.testbed import faults

    assert faults.cell_text(runs) == text


def test_committed_matrix_is_what_render_makes_of_its_json():
    """docs/fault-matrix.md is generated: rendering docs/fault-matrix.json again gives it byte for byte."""
    from srmig.testbed import faults

    md, js = ROOT / "docs" / "fault-matrix.md", ROOT / "docs" / "fault-matrix.json"
    if not js.exists():
        pytest.skip("no docs/fault-matrix.json yet")
    assert md.read_text() == faults.render(json.loads(js.read_text()), js.name)


# --- one real cell ----------------------------------------------------------------------------------------

@pytest.mark.libvirt
def test_one_cell_through_the_cli(tmp_path):
    """`srmig demo --libvirt --fault dest-agent-kill@pause --json FILE`: the destination's agent SIGKILLed as
    the source pauses, back 1 s later (tests/test_agent_faults.py: <= 2 lost, the source's swallowed-frame
    recovery, 0 duplicated). The fault landed at the pause as libvirt's events tell (the CLI runs the cell
    again, 3 runs at most, while it did not); the usual keys and the fault's are in the JSON."""
    out_json = tmp_path / "cell.json"
    out = srmig("demo", "--libvirt", "--fault", "dest-agent-kill@pause", "--json", str(out_json), timeout=600)
    assert out.returncode in (0, 1), (out.returncode, out.stdout, out.stderr[-4000:])
    d = json.loads(out_json.read_text())
    for key in ("sent", "lost", "lost_net", "duplicated", "reordered", "fault", "phase", "fault_landed", "vm_on"):
        assert key in d, key
    assert (d["fault"], d["phase"], d["fault_landed"]) == ("dest-agent-kill", "pause", True), d
    assert d["fault_pre_states"]["S"] == "paused" and "fault.injected" in d["fault_ms"], d
    assert d["libvirt_events_ms"]["D RESUMED"] > d["fault_ms"]["fault.injected"], d
    assert d["duplicated"] == 0 and d["lost_net"] <= 2, (d, out.stderr[-4000:])
    assert d["vm_on"] == "D" and d["error"] is None, d
    assert out.returncode == (1 if d["lost_net"] else 0)
    assert "fault dest-agent-kill@pause" in out.stdout and "landed" in out.stdout
