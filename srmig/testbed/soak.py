"""`srmig demo --libvirt --soak N`: the guest migrated back and forth N times on one testbed under probe traffic,
a random single fault (srmig.testbed.faults) in a random phase of some of the migrations, and the agents'
resources read before and after: a leak shows as fds, memory or pinned BPF objects that grow with the
migrations, which one migration per run cannot show.

Faults go only into migrations from S to D: the fault registry names its targets by the roles of the first
migration (the source's agent is S's). A migration back, from D to S, runs without one. A fault that aborts
the migration (dest-qemu-kill) leaves the VM on S, so the next migration goes to D again.

Leaks are judged between the end of the first migration (agents warm: the first migration creates what
every later one reuses) and the end of the last, for each agent that was not restarted in between (a fault
that kills one starts a new process); the pinned objects and the fd keeper are judged over the whole soak."""

from __future__ import annotations

import contextlib
import os
import random
import time
from dataclasses import dataclass, field
from pathlib import Path

from srmig.ctl import fdstore
from srmig.testbed import faults, libvirt_demo

FD_SLACK = 4          # fds an agent may gain between the first migration and the last (a reconnect's socket)
RSS_SLACK_KB = 16384  # resident memory it may gain (the allocator's high-water marks move)


@dataclass
class Leg:
    n: int
    src: str
    dst: str
    fault: str | None          # NAME@PHASE, None for a plain migration
    result: dict = field(default_factory=dict)  # libvirt_demo.Result.to_dict()

    def line(self) -> str:
        d = self.result
        how = ""
        if self.fault:
            how = f"  fault {self.fault} ({'landed' if d.get('fault_landed') else 'missed its phase'})"
        err = f"  error: {d['error']}" if d.get("error") else ""
        return (f"{self.src} -> {self.dst}{how}  sent {d['sent']} lost {d['lost_net']} dup {d['duplicated']} "
                f"reordered {d['reordered']}  migration {d['migration_s']:.2f} s  VM on {d['vm_on']}{err}")


def resources(env) -> dict:
    """Each agent's pid, open fds and resident memory (kB); the pinned BPF objects; what the fd keeper holds."""
    tb, _ds, agents, _work = env
    out: dict = {"agents": {}}
    for role, proc in agents.procs.items():
        pid = proc.pid
        with contextlib.suppress(OSError):
            rss = next(int(line.split()[1]) for line in Path(f"/proc/{pid}/status").read_text().splitlines()
                       if line.startswith("VmRSS:"))
            out["agents"][role] = {"pid": pid, "fds": len(os.listdir(f"/proc/{pid}/fd")), "rss_kb": rss}
    out["pinned"] = sum(len(files) for d in _pin_dirs(tb) for _root, _dirs, files in os.walk(d))
    try:
        store = fdstore.KeeperStore(fdstore.keeper_socket(agents.sockets["S"]), start=False)
        out["fd_keeper_holds"] = sum(store.names().values())
        store.close()
    except OSError:
        out["fd_keeper_holds"] = 0  # no keeper (it exits when idle): it holds nothing
    return out


def _pin_dirs(tb) -> list[Path]:
    """The testbed's pin directories (srmig.bpf.loader: one per network namespace, the XDP program's and the
    ingress encap's), not those of whatever else runs on the machine."""
    from srmig.bpf import loader  # noqa: PLC0415
    from srmig.testbed.netns import inside  # noqa: PLC0415

    dirs = []
    for role in ("S", "D", "C"):
        with inside(tb.ns(role)):
            dirs += [loader.pin_dir(), loader.encap_pin_dir()]
    return dirs


def leaks(start: dict, warm: dict, end: dict) -> list[str]:
    """One line per resource that grew: fds and memory of each agent alive from `warm` to `end`, the pinned
    objects from `start` to `end`, and anything the fd keeper still holds at the `end`."""
    found = []
    for role, e in end["agents"].items():
        w = warm["agents"].get(role)
        if w is None or w["pid"] != e["pid"]:
            continue  # restarted by a fault: a new process
        if e["fds"] > w["fds"] + FD_SLACK:
            found.append(f"agent {role}: {w['fds']} -> {e['fds']} open fds")
        if e["rss_kb"] > w["rss_kb"] + RSS_SLACK_KB:
            found.append(f"agent {role}: {w['rss_kb']} -> {e['rss_kb']} kB resident")
    if end["pinned"] != start["pinned"]:
        found.append(f"pinned BPF objects: {start['pinned']} -> {end['pinned']}")
    if end["fd_keeper_holds"]:
        found.append(f"the fd keeper still holds {end['fd_keeper_holds']} tap fds")
    return found


def _wait_ready(env) -> None:
    """Both hosts' agents connected to their libvirtd and database (a fault may have restarted either)."""
    _tb, _ds, agents, _work = env
    for role in ("S", "D"):
        agents.wait(role, lambda s: s["db"]["state"] == "connected" and s["libvirt"]
                    and s["libvirt"]["state"] == "connected", 30, "database and libvirt connected")


def soak(n: int, rate: int = 2000, db: str = "embedded", xdp_mode: str = "generic", seed: int | None = None,
         fault_share: float = 0.5, faulted: list[str] | None = None, say=lambda m: None,
         leg_done=lambda leg: None) -> dict:
    """N migrations; a fault in about `fault_share` of those from S to D (`faulted`: the NAME@PHASE cells to
    draw from, default every cell the database allows). Returns the report (see main())."""
    from srmig.ctl.libvirt_events import ensure_event_loop  # noqa: PLC0415

    ensure_event_loop()
    seed = random.randrange(1 << 30) if seed is None else seed
    rng = random.Random(seed)
    pool = [(f, p) for f, p in faults.cells(faulted) if f.db in (None, db)]
    legs: list[Leg] = []
    snaps: dict = {}
    error = None
    # Nobody is there to end a fenced copy: the destination destroys it (a paused one would keep the domain
    # there, and every later migration to that host would fail).
    with libvirt_demo.setup(db, xdp_mode, say, fence="destroy") as env:
        snaps["start"] = resources(env)
        where = "S"
        for i in range(1, n + 1):
            src, dst = where, "D" if where == "S" else "S"
            cell = None
            if src == "S" and pool and rng.random() < fault_share:
                cell = faults.Cell(*rng.choice(pool))
            leg = Leg(i, src, dst, f"{cell.fault.name}@{cell.phase}" if cell else None)
            say(f"migration {i}/{n}: {src} -> {dst}" + (f", fault {leg.fault}" if cell else ""))
            try:
                _wait_ready(env)
                if cell:
                    res = libvirt_demo.migrate(env, src, dst, rate, rate * faults.PROBE_CAP_S, db, say,
                                               before=cell.before, during=cell.during, after=cell.after,
                                               stop=cell.stop, show=None)
                    res.fault_info = cell.info()
                else:
                    res = libvirt_demo.migrate(env, src, dst, rate, rate * 3, db, say, show=None)
            except Exception as e:  # noqa: BLE001 - the soak stops and says why
                error = f"migration {i} ({src} -> {dst}): {type(e).__name__}: {e}"
                break
            leg.result = res.to_dict()
            if leg.result["lost_net"] or leg.result["duplicated"] or leg.result["vm_on"] not in ("S", "D"):
                leg.result["diagnosis"] = res.diagnosis_text  # where the probes or the VM went
            legs.append(leg)
            leg_done(leg)
            if i == 1:
                snaps["warm"] = resources(env)
            if leg.result["vm_on"] not in ("S", "D"):
                error = (f"migration {i}: the VM runs on {libvirt_demo.VM_ON.get(leg.result['vm_on'])} (domains "
                         f"{leg.result['domains']}, migration error {leg.result['error']})")
                break
            where = leg.result["vm_on"]
        time.sleep(libvirt_demo.GRACE_S)  # the last source's grace period: what it kept goes
        snaps["end"] = resources(env)
    snaps.setdefault("warm", snaps["end"])
    totals = {k: sum(leg.result[k] for leg in legs) for k in ("sent", "lost", "lost_net", "duplicated", "reordered")}
    found = leaks(snaps["start"], snaps["warm"], snaps["end"])
    return {"migrations": n, "done": len(legs), "seed": seed, "rate": rate, "db": db, "totals": totals,
            "faults": sum(1 for leg in legs if leg.fault),
            "legs": [{**leg.result, "src": leg.src, "dst": leg.dst, "fault": leg.fault} for leg in legs],
            "resources": snaps, "leaks": found, "error": error}


def exit_status(report: dict) -> int:
    """0: every migration done, nothing lost (lost_net) or duplicated, no leak; 1 otherwise."""
    t = report["totals"]
    bad = report["error"] or report["leaks"] or t["lost_net"] or t["duplicated"]
    return 1 if bad or report["done"] < report["migrations"] else 0


def main(n: int, rate: int, db: str | None, json_path: str | None, xdp_mode: str = "generic",
         seed: int | None = None, faulted: list[str] | None = None) -> int:
    """`srmig demo --libvirt --soak N`: a line per migration as it ends, the totals and the resources before
    and after; JSON if asked ('-': on stdout, the lines then on stderr); exit_status()."""
    import sys  # noqa: PLC0415

    from srmig.testbed.demo import Progress  # noqa: PLC0415

    libvirt_demo.quiet_libvirt()
    out = sys.stderr if json_path == "-" else sys.stdout
    say = Progress(True)
    t0 = time.monotonic()

    def leg_done(leg: Leg) -> None:
        say.done()
        print(f"  {leg.n:3d}/{n}  {leg.line()}", file=out, flush=True)

    rep = soak(n, rate, db or "embedded", xdp_mode, seed, faulted=faulted, say=say, leg_done=leg_done)
    say.done()
    t = rep["totals"]
    print(f"soak: {rep['done']} of {n} migrations ({rep['faults']} with a fault, seed {rep['seed']}), {rate} "
          f"probes/s: sent {t['sent']} lost {t['lost_net']} duplicated {t['duplicated']} reordered "
          f"{t['reordered']} ({time.monotonic() - t0:.0f} s)", file=out)
    for when in ("start", "warm", "end"):
        r = rep["resources"][when]
        agents = "  ".join(f"{role} {a['fds']} fds {a['rss_kb'] // 1024} MB" for role, a in sorted(r["agents"].items()))
        print(f"  {when:5s}  {agents}  pinned {r['pinned']}  fd keeper holds {r['fd_keeper_holds']}", file=out)
    for line in rep["leaks"]:
        print(f"  LEAK: {line}", file=out)
    if rep["error"]:
        print(f"  stopped: {rep['error']}", file=out)
    libvirt_demo.write_json(rep, json_path, out)
    return exit_status(rep)
