"""Helpers of the libvirt runs in test_agent_faults.py: run again until a fault lands in its phase, an agent
killed at the pause, where the ingress and the agents ended, what the daemons run, and what the source's
drain could not re-send."""

from __future__ import annotations

import contextlib
import re
import time


def run_until(landed, attempts: int = 3, **kw):
    """libvirt_demo.run(**kw), again (at most `attempts` runs in all) until `landed(result)`: the fault hit
    the phase the test is about. libvirt does not wait for the test: on a busy machine a fault meant for the
    pause can land past the migration's point of no return, or an abort can end before the source forwarded
    anything. The test checks the last run, so it still fails if none landed."""
    from srmig.testbed import libvirt_demo

    for n in range(1, attempts + 1):
        res = libvirt_demo.run(**kw)
        if landed(res):
            break
        print(f"[run {n}/{attempts}] the fault did not land where the test needs it")
    return res


def agent_killed_at_pause(role: str, rate: int = 2000):
    """One libvirt run under `rate` probes/s in which the agent of `role` is SIGKILLed at the pause and
    started again 1 s later (run_until: again while the kill missed the pause); checks that the migration
    completed and that the kill hit the source paused; res.source_log is the source agent's log. res.faults
    also has "agent_fault.paused" and
    "agent_fault.resumed": libvirt's SUSPENDED on S and RESUMED on D, as this process heard them (ms on the
    probe's clock; both events take the same way here, so their difference is pause -> resume)."""
    import libvirt

    from srmig.ctl.libvirt_events import EventRecorder, ensure_event_loop
    from srmig.testbed import faults, libvirt_demo

    ensure_event_loop()  # before the connections whose events we want
    seen, watch, logs = {}, {}, {}

    def before(tb, ds, agents):
        watch["rec"] = EventRecorder(t0=0.0)  # t: time.monotonic(), the probe's clock
        watch["conns"] = [ds[r].connect() for r in ("S", "D")]
        for r, conn in zip(("S", "D"), watch["conns"]):
            watch["rec"].watch(r, conn)

    def after(tb, ds, agents):
        if role == "S":  # the restarted source drains what its tap kept (the fd keeper): its log says so
            deadline = time.monotonic() + 15
            while "drained" not in agents.log("S", 1 << 20).rpartition("agent S up")[2] and \
                    time.monotonic() < deadline:
                time.sleep(0.1)
        logs["S"] = agents.log("S", 1 << 20)
        watch["rec"].close()
        for conn in watch["conns"]:
            conn.close()
        seen.clear()
        if fault := getattr(tb, "agent_fault", None):  # none: the pause was missed, nothing injected
            for name, daemon, typ in (("paused", "S", "SUSPENDED"), ("resumed", "D", "RESUMED")):
                t = next((e["t"] for e in watch["rec"].events if (e["daemon"], e.get("type")) == (daemon, typ)), None)
                if t is not None:
                    fault[name] = float(t)
            seen.update(fault)
        if role == "D":
            # The restarted agent answers `status` before it has reconciled with libvirt, which on a busy
            # machine takes seconds: wait for it (bounded), then the test checks what it reports.
            with contextlib.suppress(TimeoutError):
                agents.wait("D", lambda s: any(v["vm"] == libvirt_demo.VM_ADDR and v["state"] == "running"
                                               for v in s["vms"]), 15, "the restarted agent reconciled")

    def landed(res) -> bool:
        return seen.get("source_state") == libvirt.VIR_DOMAIN_PAUSED

    res = run_until(landed, rate=rate, count=8000, before=before, during=faults.restart_agent_at_pause(role),
                     after=after)
    assert res.error is None, res.error
    assert landed(res), "the kill should hit the source paused"
    res.source_log = logs.get("S", "")  # the source agent's log, both lives
    return res


def ingress_on(res, host: str) -> None:
    """The ingress's location for the VM is `host` (its End.DX6-map SID alone), and that version is applied."""
    from srmig.testbed import libvirt_demo

    c = res.agents["C"]
    loc = {r["vm"]: r for r in c["locations"]}[libvirt_demo.VM_ADDR]
    assert loc["host"] == host and loc["segments"] == [{"S": "fc00:0:1::d6", "D": "fc00:0:2::d6"}[host]], loc
    assert c["ingress"]["applied"].get(libvirt_demo.VM_ADDR) == loc["version"], c["ingress"]


def ingress_knows_d(status: dict) -> bool:
    """An agent's status says that the VM is on D (the ingress learnt the cut-over)."""
    from srmig.testbed import libvirt_demo

    return {r["vm"]: r["host"] for r in status.get("locations", [])}.get(libvirt_demo.VM_ADDR) == "D"


def database_fault_through_cut_over(inject, landed_attr: str, stop):
    """A `during` for a database fault: `inject` it (it sets `tb.<landed_attr>` once it landed), then keep the
    probe going until the ingress learnt the cut-over and 1.5 s more (the source's grace period), so that the
    probe outlasts the fault and what follows it however long the migration took; then `stop` the probe."""
    import time

    def during(tb, ds, agents, dom):
        try:
            inject(tb, ds, agents, dom)
            if getattr(tb, landed_attr, None) is not None:
                with contextlib.suppress(TimeoutError):  # the caller's after() asserts it
                    agents.wait("C", ingress_knows_d, 20, "the ingress learns that the VM is on D")
                time.sleep(1.5)
        finally:
            stop.set()

    return during


def database_settled(agents) -> None:
    """After a database fault: every agent connected with no write pending, and the ingress knows the VM is on D."""
    for role in ("S", "D", "C"):  # the lease is refreshed every LEASE_TTL_S / 3
        agents.wait(role, lambda s: s["db"]["state"] == "connected" and not s["db"]["pending_writes"], 10,
                    "the database connected, nothing pending")
    agents.wait("C", ingress_knows_d, 10, "the ingress learns that the VM is on D")


def converged(res) -> None:
    """The ingress ends on D with that version applied; the source forgot the VM after its grace period."""
    from srmig.testbed import libvirt_demo

    ingress_on(res, "D")
    assert all(v["state"] is None for v in res.agents["S"]["vms"] if v["vm"] == libvirt_demo.VM_ADDR), res.agents["S"]
    assert {v["vm"]: v["state"] for v in res.agents["D"]["vms"]}[libvirt_demo.VM_ADDR] == "running"


def domains(ds) -> dict:
    """{role: {domain name: libvirt state}} on each daemon."""
    out = {}
    for role, daemon in ds.items():
        conn = daemon.connect()
        try:
            out[role] = {d.name(): d.state()[0] for d in conn.listAllDomains(0)}
        finally:
            conn.close()
    return out


def unrecovered_swallowed(log: str) -> int:
    """Frames the source's drain log says its QEMU swallowed at the pause and it did not re-send: swallowed
    minus re-sent, and 2 (the most a pausing QEMU holds) where the count was unknown (its query timed out)."""
    n = 0
    for resent, swallowed in re.findall(r"(\d+) swallowed re-sent \(swallowed (\d+|None)", log):
        n += 2 if swallowed == "None" else max(0, int(swallowed) - int(resent))
    return n
