"""`srmig demo --libvirt`: the production path end to end on one machine.

The namespace testbed (client C, transit T, hosts S and D), a private libvirtd in S and D with srmig's qemu
hook, and three `srmig agent` processes configured by the same provisioning scripts the Vagrant demo uses
(vagrant/provision/host.sh and ingress.sh): S and D (host role), C (ingress role), sharing one VM state
database (embedded, or etcd). The guest is defined on S with srmig metadata; while C probes it, libvirt
live-migrates it to D (peer-to-peer, what `virsh migrate --live --p2p` does). Nothing but libvirt's events
and hook drive srmig here.

The guest is dual-stack when IPv4 is probed (`families`, as in `srmig demo`): its metadata lists both of its
addresses (the IPv6 one first: the VM's id), host.sh gives each host's tap the IPv4 anycast gateway too, and the
probe sends ICMPv6 and ICMP echo through the same migration, counted per family (srmig.testbed.demo's
family_dict and table). The fault cells and the soak probe IPv6 alone, on an IPv6-only guest, as before.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from srmig.ctl import fdstore
from srmig.ctl import hook as hook_mod
from srmig.ctl.agent import metadata_xml
from srmig.ctl.hooksrv import request
from srmig.testbed import demo
from srmig.testbed import libvirtd as lv
from srmig.testbed import probe as probe_mod
from srmig.testbed.qemu import GUEST_MAC
from srmig.testbed.testbed import MGMT, T_END, VM_ADDR, VM_ADDR4, VM_ADDRS, VM_PREFIXLEN4, Testbed

PROVISION = Path(__file__).resolve().parents[2] / "vagrant" / "provision"
DOMAIN = "srmig-vm"
# probes/s per family; measured: under libvirt's QEMU the TCG guest falls behind at 10 kpps on 2 busy cores
DEFAULT_RATE = 2000
# Probing long enough to outlast the migration: a dual-stack run's took 3.1 s on a busy 2-core machine (its
# probes, over 3 s, stopped before libvirt's migration call returned: the cut-over is then not measured).
DEFAULT_DURATION_S = 5
DEFAULT_FAMILIES = demo.DEFAULT_FAMILIES  # `srmig demo --libvirt`: both; run() and migrate(): IPv6 alone
HOSTS = {"S": {"fabric": "s0", "locator": "fc00:0:1::/48", "address": "2001:db8:a::2"},
         "D": {"fabric": "d0", "locator": "fc00:0:2::/48", "address": "2001:db8:b::2"}}
METRICS = "127.0.0.1:9477"   # Prometheus, inside each host's namespace
SR_DOMAIN = "2001:db8:a::/64 2001:db8:b::/64 2001:db8:c::/64"  # sources allowed to reach srmig SIDs
GRACE_S = 1.0   # the source's grace period (agent config grace_s): it forwards stragglers that long after cut-over


@dataclass
class Result:
    reports: dict[str, probe_mod.ProbeReport]  # per family probed ("6", "4"), in the order probed
    migration_s: float
    db: str
    agents: dict = field(default_factory=dict)   # role -> final status
    error: str | None = None
    metrics: dict = field(default_factory=dict)  # role -> Prometheus text
    guest: dict = field(default_factory=dict)    # the guest's own counters over the run (GUEST_COUNTERS)
    faults: dict = field(default_factory=dict)   # what a `during` injected, when (ms from the first probe)
    wall_t0: float = 0.0                         # the first probe's send on the wall clock (the logs')
    domains: dict = field(default_factory=dict)  # role -> the domain's libvirt (state, reason) there, at the end
    guest_tail: str = ""                         # when the guest did not answer: its console's and QEMU's tails
    fault_info: dict = field(default_factory=dict)  # srmig.testbed.faults: fault, phase, fault_landed, ...
    diagnosis_text: str = ""                     # diagnosis() at the end of run()
    notes: dict = field(default_factory=dict)    # family -> why its numbers mean less (srmig.testbed.demo)
    downtime_ms: float | None = None             # libvirt's (the destination's completed job), None: unknown

    @property
    def report(self) -> probe_mod.ProbeReport:
        """The IPv6 report (the first family's without IPv6)."""
        return self.as_run().report

    def as_run(self) -> demo.Run:
        """The run as `srmig demo` has one (its per-family numbers and table)."""
        return demo.Run("srmig", self.reports, self.downtime_ms, self.migration_s * 1000, self.guest,
                        notes=self.notes)

    def unanswered(self, family: str | None = None) -> int:
        """Lost probes of `family` (default: the one `report` is) the guest received and left unanswered
        (srmig.testbed.guest.unanswered)."""
        return self.as_run().unanswered(family)

    def family_dict(self, family: str) -> dict:
        """One family's numbers (srmig.testbed.demo.family_dict) and its lost_net: lost but for what the
        guest itself left unanswered (unanswered())."""
        d = self.as_run().family_dict(family)
        return {**d, "lost_net": d["lost"] - d["guest_unanswered"]}

    def to_dict(self) -> dict:
        """Today's keys over every family probed (srmig.testbed.demo.across_families: counts summed, blackout
        and round trips the worst family's), and `families`: {family: family_dict(family)}."""
        fams = {f: self.family_dict(f) for f in self.reports}
        total = demo.across_families(fams)
        return {**total, "lost_net": total["lost"] - total["guest_unanswered"],
                "migration_s": round(self.migration_s, 3), "downtime_ms": self.downtime_ms, "db": self.db,
                "error": self.error,
                # the first 20 lost and duplicated sequence numbers of the first family (a diagnosis)
                "lost_seqs": self.report.lost_seqs, "duplicated_seqs": self.report.duplicated_seqs,
                "event_to_map_ms": {k: v.get("event_to_map_ms") for k, v in self.agents.items()
                                    if v.get("event_to_map_ms")},
                "marks_ms": {k: round(v, 3) for k, v in self.report.marks.items()}, "guest": self.guest,
                "vm_on": self.vm_on(),
                "domains": {role: None if st is None else STATE_NAMES.get(st[0], str(st[0]))
                            for role, st in self.domains.items()},
                "families": fams,
                # a fault run (srmig.testbed.faults.run_cell) sets these, and says how it landed
                "fault": None, "phase": None, "fault_landed": None, **self.fault_info}

    def vm_on(self) -> str | None:
        """Where the guest runs at the end: "S", "D", "S+D" (on both: libvirt resumed the source while the
        destination's ran, a split brain), or None (nowhere, or not known)."""
        running = [role for role, st in self.domains.items() if st and st[0] == 1]  # VIR_DOMAIN_RUNNING
        return "+".join(running) or None

    def diagnosis(self, logs: dict[str, str]) -> str:
        """What a failed assertion needs to say where packets went: the runs of lost probes (first sequence
        number, length, send time in ms), the marks and faults on the same clock, the guest's counters, and
        the agents' log lines above DEBUG (on the wall clock: `t0` is the first probe's send, on it)."""
        wall_t0 = time.strftime("%H:%M:%S", time.localtime(self.wall_t0)) + f".{int(self.wall_t0 % 1 * 1000):03d}"
        lines = [f"[libvirt run] t0 {wall_t0}"]
        for family, r in self.reports.items():
            runs: list[list[int]] = []
            for q in r.lost_seqs:
                if runs and q == runs[-1][0] + runs[-1][1]:
                    runs[-1][1] += 1
                else:
                    runs.append([q, 1])
            lines.append(f"[libvirt run] {demo.FAMILY_NAMES[family]} lost {r.lost} dup {r.duplicated} reordered "
                         f"{r.reordered}; lost runs (seq, n, ms): "
                         f"{[(q, n, round(q * r.interval_ms, 1)) for q, n in runs]}")
        lines.append(f"[libvirt run] marks {self.to_dict()['marks_ms']} faults {self.faults} guest {self.guest} "
                     f"domains {self.domains} notes {self.notes}")
        if self.guest_tail:
            lines += [f"[guest] {ln}" for ln in self.guest_tail.splitlines()]
        for role, text in logs.items():
            lines += [f"[agent {role}] {ln}" for ln in text.splitlines() if " DEBUG " not in ln][-25:]
        return "\n".join(lines)


class Agents:
    """The agent processes: started with `python -m srmig --netns NS agent`, stopped (SIGTERM, then SIGKILL)
    on exit; their logs stay in the work dir."""

    def __init__(self, work: Path):
        self.work = work
        self.procs: dict[str, subprocess.Popen] = {}
        self.sockets: dict[str, str] = {}
        self.args: dict[str, tuple] = {}   # role -> (netns, config, socket): what restart() needs

    def start(self, role: str, ns: str, config: Path, socket: str) -> None:
        self.args[role] = (ns, config, socket)
        log = open(self.work / f"agent-{role}.log", "ab")
        self.procs[role] = subprocess.Popen(
            [sys.executable, "-m", "srmig", "--netns", ns, "agent", "--config", str(config), "-v"],
            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        self.sockets[role] = socket

    def kill(self, role: str, sig: int = signal.SIGKILL) -> None:
        p = self.procs[role]
        p.send_signal(sig)
        p.wait(10)

    def restart(self, role: str) -> None:
        if self.procs[role].poll() is None:
            self.kill(role, signal.SIGTERM)
        self.start(role, *self.args[role])

    def status(self, role: str, timeout: float = 5) -> dict:
        return request(self.sockets[role], {"op": "status"}, timeout)

    def wait(self, role: str, pred, timeout: float, what: str) -> dict:
        deadline = time.monotonic() + timeout
        last: object = None
        while True:
            proc = self.procs[role]
            if proc.poll() is not None:
                raise RuntimeError(f"agent {role} exited ({proc.returncode}): {self.log(role)}")
            try:
                last = self.status(role)
                if last.get("ok") and pred(last):
                    return last
            except (OSError, ValueError) as e:
                last = e
            if time.monotonic() > deadline:
                raise TimeoutError(f"agent {role}: {what} not within {timeout} s (last status: {last}); "
                                   f"log: {self.log(role)}")
            time.sleep(0.05)

    def log(self, role: str, n: int = 3000) -> str:
        with contextlib.suppress(OSError):
            return (self.work / f"agent-{role}.log").read_text()[-n:]
        return ""

    def close(self) -> None:
        for p in self.procs.values():
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in self.procs.values():
            try:
                p.wait(5)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(5)


def end_fd_keeper(path: str) -> None:
    """The fd keeper the agents started on `path` (it would idle for a minute, holding the run's taps)."""
    with contextlib.suppress(OSError):
        store = fdstore.KeeperStore(path, start=False)
        pid = store.keeper_pid()
        store.close()
        os.kill(pid, signal.SIGKILL)


def provision(script: str, ns: str, env: dict) -> None:
    full = {**os.environ, **{k: str(v) for k, v in env.items()}}
    out = subprocess.run(["ip", "netns", "exec", ns, "sh", str(PROVISION / script)], env=full,
                         capture_output=True, text=True, timeout=30)
    if out.returncode != 0:
        raise RuntimeError(f"{script} in {ns} failed: {out.stderr.strip() or out.stdout.strip()}")


@contextlib.contextmanager
def setup(db: str = "embedded", xdp_mode: str = "generic", say=lambda m: None, work: Path | None = None,
          families: tuple[str, ...] = ("6",), fence: str = "pause"):
    """The testbed, daemons, database and agents, the guest running on S; yields (tb, daemons, agents, work).
    With "4" in `families` the guest is dual-stack: its IPv4 address in its metadata (after the IPv6 one, the
    VM's id), on its kernel command line and on each host's tap (host.sh). `fence`: the host agents'
    host.fence (what a destination does with its copy of a split brain)."""
    addr4 = VM_ADDR4 if "4" in families else None
    own = work is None and not os.environ.get("SRMIG_DEMO_KEEP_WORK")
    work = work or Path(tempfile.mkdtemp(prefix="srmig-libvirt-demo-"))
    sock_dir = Path("/run/srmig") / f"demo-{os.getpid()}"
    sock_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    sockets = {r: str(sock_dir / f"{r}.sock") for r in ("S", "D", "C")}
    with contextlib.ExitStack() as stack:
        if own:
            stack.callback(shutil.rmtree, work, True)
        stack.callback(shutil.rmtree, sock_dir, True)
        stack.callback(end_fd_keeper, fdstore.keeper_socket(sockets["S"]))  # the agents' (after they stop)
        say("building the namespace testbed")
        tb = stack.enter_context(Testbed(xdp_mode))
        db_env = {"SRMIG_DB": db, "SRMIG_DB_PATH": work / "state.db"}
        tls_env = {r: {} for r in ("S", "D", "C")}     # per agent: its own client certificate
        if db == "etcd":
            from srmig.testbed.etcd import EtcdCluster  # noqa: PLC0415

            # 3 members, each in a namespace of its own behind T, where every agent's traffic meets
            for role, gw in (("S", "2001:db8:a::1"), ("D", "2001:db8:b::1"), ("C", "2001:db8:c::2")):
                tb.topo.route(role, EtcdCluster.ROUTE, gateway=gw)
            say("starting a 3-member etcd cluster")
            etcd = stack.enter_context(EtcdCluster(tb.topo, hub="T"))
            tb.etcd = etcd  # for fault injection (etcd's leader killed, or the whole cluster down)
            db_env["SRMIG_ETCD"] = " ".join(etcd.endpoints)  # every agent is given every member
            for role in tls_env:  # TLS with --client-cert-auth, as deployed: a certificate per agent, and
                tls = etcd.tls(role)  # an etcd user whose roles let it write its own keys only
                tls_env[role] = {"SRMIG_ETCD_CA": tls.ca_file, "SRMIG_ETCD_CERT": tls.cert_file,
                                 "SRMIG_ETCD_KEY": tls.key_file, "SRMIG_ETCD_USER": role,
                                 "SRMIG_ETCD_PASSWORD_FILE": etcd.password_file(
                                     role, ("ingress",) if role == "C" else ("host",))}
        hooks = {r: {"qemu.d/srmig": hook_mod.script(sockets[r], 3.0, "proceed")} for r in ("S", "D")}
        say("starting libvirtd in S and D")
        ds = stack.enter_context(lv.daemons(tb.topo, hooks=hooks))
        for role in ("S", "D"):
            h = HOSTS[role]
            provision("host.sh", tb.ns(role), {
                **db_env, **tls_env[role], "SRMIG_NAME": role, "SRMIG_FABRIC": h["fabric"],
                "SRMIG_LOCATOR": h["locator"],
                "SRMIG_ADDRESS": h["address"], "SRMIG_TRANSIT": T_END, "SRMIG_DOMAIN": SR_DOMAIN,
                "SRMIG_XDP_MODE": xdp_mode, "SRMIG_SOCKET": sockets[role], "SRMIG_LIBVIRT_URI": ds[role].uri,
                "SRMIG_QEMU_RUN_DIR": ds[role].host_path("/run/libvirt/qemu"), "SRMIG_METRICS": METRICS,
                "SRMIG_GRACE_S": str(GRACE_S), "SRMIG_CONFIG": work / f"{role}.toml", "SRMIG_TAP": lv.TAP,
                "SRMIG_VM_ADDR": VM_ADDR, "SRMIG_VM_ADDR4": addr4 or "", "SRMIG_VM_MAC": GUEST_MAC,
                "SRMIG_FENCE": fence})
        provision("ingress.sh", tb.ns("C"), {
            **db_env, **tls_env["C"], "SRMIG_NAME": "C", "SRMIG_INTERFACE": "c0", "SRMIG_GATEWAY": "2001:db8:c::2",
            "SRMIG_SOCKET": sockets["C"], "SRMIG_METRICS": METRICS, "SRMIG_CONFIG": work / "C.toml"})
        agents = Agents(work)
        stack.callback(agents.close)
        say("starting the agents")
        for role in ("S", "D", "C"):
            agents.start(role, tb.ns(role), work / f"{role}.toml", sockets[role])
        for role in ("S", "D"):
            agents.wait(role, lambda s: s["db"]["state"] == "connected" and s["libvirt"]
                        and s["libvirt"]["state"] == "connected", 60, "database and libvirt connected")
        agents.wait("C", lambda s: s["db"]["state"] == "connected" and s["ingress"], 30, "ingress up")
        say("booting the guest on S")
        conn = ds["S"].connect()
        stack.callback(conn.close)
        addresses = (VM_ADDR, addr4) if addr4 else (VM_ADDR,)
        conn.createXML(lv.domain_xml(DOMAIN, metadata=metadata_xml(*addresses),
                                     addr4=addr4 and f"{addr4}/{VM_PREFIXLEN4}"), 0)
        for role in ("S", "D"):
            stack.callback(_destroy, ds[role], DOMAIN)
        lv.wait_console(ds["S"], DOMAIN, "SRMIG-GUEST-READY", 60)
        agents.wait("C", lambda s: s["ingress"]["applied"].get(VM_ADDR), 10, "the VM's route programmed")
        yield tb, ds, agents, work


def _destroy(daemon: lv.Libvirtd, name: str) -> None:
    import libvirt  # noqa: PLC0415

    with contextlib.suppress(libvirt.libvirtError):
        conn = daemon.connect()
        try:
            conn.lookupByName(name).destroy()
        finally:
            conn.close()


def run(rate: int = 2000, count: int | None = None, db: str = "embedded", xdp_mode: str = "generic",
        say=lambda m: None, warmup_s: float = 0.8, before=None, during=None, after=None, stop=None,
        show=print, families: tuple[str, ...] = ("6",)) -> Result:
    """One live migration under probe traffic, `rate` probes/s and `count` probes per family in `families`
    ("6", "4"; with "4" the guest is dual-stack, see setup()). `before(tb, daemons, agents)` runs once the
    guest answers on S, before the probe starts (fault injection: restart an agent, ...); `during(tb, daemons,
    agents, dom)`
    in a thread once the migration has started (e.g. kill_dest_at_pause), joined once the probe is over;
    `after(tb, daemons, agents)` then, before the agents' final status is taken (e.g. wait for a recovery).
    `stop` (a threading.Event, e.g. set by `during`): the probe ends once it is set and the migration is
    over, `count` probes at most: it outlasts what the run waits for, however long the migration took.
    `show`: what receives the run's diagnosis (Result.diagnosis: where lost probes went), None for nobody;
    res.diagnosis_text keeps it."""
    count = count or rate * DEFAULT_DURATION_S
    with setup(db, xdp_mode, say, families=families) as env:
        return migrate(env, "S", "D", rate, count, db, say, warmup_s, before, during, after, stop, show,
                       families=families)


def migrate(env, src: str, dst: str, rate: int, count: int, db: str, say=lambda m: None, warmup_s: float = 0.8,
            before=None, during=None, after=None, stop=None, show=print,
            families: tuple[str, ...] = ("6",)) -> Result:
    """One live migration of the guest from `src` to `dst` ("S" or "D") on a testbed setup() made (with "4"
    in its `families` if they have it), under probe traffic; run()'s hooks and Result."""
    tb, ds, agents, _work = env
    if before is not None:
        before(tb, ds, agents)
    # IPv6 must answer; an IPv4 that does not is a note (srmig.testbed.demo.ready_check), as in `srmig demo`
    notes = demo.ready_check(tb, tuple(dict.fromkeys(("6", *families))), src,
                             lambda: lv.tail(ds[src].host_path(lv.console_path(DOMAIN))))
    notes = {f: n for f, n in notes.items() if f in families}
    guest_before = _guest_counters(ds, _domain_states(ds))
    p = probe_mod.Probe([VM_ADDRS[f] for f in families], rate, count, timeout_s=2.0, netns=tb.ns("C"),
                        rtt_window=demo.RTT_WINDOW).start()
    conn = ds[src].connect()
    try:
        time.sleep(warmup_s)
        say(f"virsh migrate --live --p2p {src} -> {dst} under {rate} probes/s")
        p.mark("migrate")
        mig = lv.MigrationThread(conn.lookupByName(DOMAIN), ds[dst], MGMT[dst])
        tb.migration = mig   # for a `during` to know when the migration call returned
        mig.start()
        fault = None
        if during is not None:
            import threading  # noqa: PLC0415

            fault = threading.Thread(target=during, args=(tb, ds, agents, mig.args[0]), daemon=True)
            fault.start()
        error = None
        try:
            migration_s = mig.result(60)
        except Exception as e:  # noqa: BLE001 - reported
            error, migration_s = str(e), mig.t_end - mig.t_start
        p.mark("complete")
        if stop is not None:
            while not stop.wait(0.05) and not p.done():
                pass
            p.stop()
        p.wait(timeout=60)
    except BaseException:
        p.stop()
        raise
    finally:
        conn.close()
    if fault is not None:
        fault.join(30)  # the fault injected and undone (etcd back, agent restarted) before the status
    for family, rep in p.reports.items():
        if (note := demo.coverage_note(rep)) is not None:
            notes[family] = note + (f"; {notes[family]}" if family in notes else "")
    res = Result(dict(p.reports), migration_s, db, error=error, notes=notes)
    try:
        if after is not None:
            after(tb, ds, agents)
        # Cut-over and the grace period: the source forgets the VM.
        with contextlib.suppress(TimeoutError):
            agents.wait(src, lambda s: not any(v["vm"] == VM_ADDR and v["state"] for v in s["vms"]), 5,
                        "the source's grace period over")
        # A restarted agent may still be starting on a busy machine: its status, once it answers.
        res.agents = {r: agents.wait(r, lambda st: True, 10, "a status") for r in ("S", "D", "C")}
        res.metrics = {r: scrape(tb.ns(r)) for r in ("S", "D", "C")}
        res.domains = _domain_states(ds)
        res.downtime_ms = _downtime_ms(ds[dst]) if error is None else None
        after_counters = _guest_counters(ds, res.domains)
        res.guest = {k: after_counters[k] - guest_before.get(k, 0) for k in after_counters}
        if not after_counters:
            res.guest_tail = "\n".join(
                f"{role} {what}: {text[-600:]}" for role in ("S", "D") for what, text in (
                    ("console", lv.tail(ds[role].host_path(lv.console_path(DOMAIN)))),
                    ("qemu log", ds[role].qemu_log(DOMAIN))))
    finally:  # shown if a test fails, `after` included
        t0 = res.report.t0 or time.monotonic()
        res.wall_t0 = time.time() - (time.monotonic() - t0)
        res.faults = {f"{name}.{k}": round((v - t0) * 1000, 1) for name in FAULT_NOTES
                      for k, v in getattr(tb, name, {}).items() if isinstance(v, float)}
        res.diagnosis_text = res.diagnosis({r: agents.log(r, 1 << 20) for r in ("S", "D", "C")})
        if show is not None:
            show(res.diagnosis_text)
    return res


STATE_NAMES = {0: "nostate", 1: "running", 2: "blocked", 3: "paused", 4: "shutdown", 5: "shutoff", 6: "crashed",
               7: "pmsuspended"}   # libvirt's virDomainState
GUEST_COUNTERS = ("Icmp6InEchos", "Icmp6OutEchoReplies", "Icmp6OutErrors", "Icmp6OutMsgs", "Ip6InDiscards",
                  "Ip6OutDiscards", "Ip6OutNoRoutes", "IcmpInEchos", "IcmpOutEchoReps", "IcmpOutErrors",
                  "IpInDiscards", "IpOutDiscards", "IpOutNoRoutes", "eth0_rx_dropped", "eth0_tx_dropped",
                  "eth0_rx_packets", "eth0_tx_packets")
# What the `during` hooks leave on the testbed.
FAULT_NOTES = ("libvirtd_fault", "agent_fault", "agent_stall", "dest_killed", "etcd_fault", "fault")


def _domain_states(ds) -> dict[str, tuple | None]:
    """{role: the domain's (state, reason) on that daemon, None if it has none}."""
    out = {}
    for role in ("S", "D"):
        out[role] = None
        with contextlib.suppress(Exception):
            conn = ds[role].connect()
            try:
                out[role] = tuple(conn.lookupByName(DOMAIN).state())
            finally:
                conn.close()
    return out


def _downtime_ms(daemon: lv.Libvirtd) -> float | None:
    """The downtime libvirt measured, from the statistics of the completed migration job that the source
    handed the destination `daemon` (`virsh domjobinfo --completed`); None if it cannot say."""
    import libvirt  # noqa: PLC0415

    with contextlib.suppress(Exception):
        conn = daemon.connect()
        try:
            stats = conn.lookupByName(DOMAIN).jobStats(libvirt.VIR_DOMAIN_JOB_STATS_COMPLETED)
            return float(stats["downtime"]) if "downtime" in stats else None
        finally:
            conn.close()
    return None


def _guest_counters(ds, states: dict[str, tuple | None]) -> dict[str, int]:
    """GUEST_COUNTERS of the guest wherever it runs (`states`: _domain_states), {} if it cannot say (the run
    stands without)."""
    import libvirt  # noqa: PLC0415

    for role in ("D", "S"):
        if states[role] is None or states[role][0] in (libvirt.VIR_DOMAIN_SHUTOFF, libvirt.VIR_DOMAIN_CRASHED):
            continue
        with contextlib.suppress(Exception):
            stats = lv.guest_stats(ds[role], DOMAIN, timeout=2)
            return {k: stats[k] for k in GUEST_COUNTERS if k in stats}
    return {}


def scrape(ns: str) -> str:
    """The Prometheus text of the agent in namespace `ns`."""
    import urllib.request  # noqa: PLC0415

    from srmig.testbed.netns import inside  # noqa: PLC0415

    with inside(ns):
        with urllib.request.urlopen(f"http://{METRICS}/metrics", timeout=5) as r:
            return r.read().decode()


VM_ON = {None: "no host", "S+D": "both hosts (a split brain)"}


def quiet_libvirt() -> None:
    """Every libvirt error is raised (and handled) where it happens; libvirt's default handler would also
    print each one on stderr, e.g. a lookup of the domain on the host it is not on."""
    import libvirt  # noqa: PLC0415

    libvirt.registerErrorHandler(lambda _ctx, _err: None, None)


def exit_status(d: dict) -> int:
    """`srmig demo --libvirt`'s exit status from a run's to_dict() (its --help says the same): 3 when the
    fault missed its phase in every attempt (the run measured something else); 1 when probes were lost
    (lost_net: less what the guest left unanswered) or duplicated, when the guest runs nowhere or on both
    hosts at the end,
    or when the migration failed without a fault; 0 otherwise. Reordering is not a failure: a fault that
    delays the source's drain delivers its probes late, by design."""
    if d.get("fault") is not None and not d.get("fault_landed"):
        return 3
    if d["lost_net"] or d["duplicated"] or d.get("vm_on") not in ("S", "D"):
        return 1
    if d.get("fault") is None and d.get("error"):
        return 1
    return 0


def write_json(d: dict, json_path: str | None, out) -> None:
    """`--json`: `d` on stdout for '-' (the lines then went to stderr), else into the file, said on `out`."""
    if json_path == "-":
        print(json.dumps(d, indent=2))
    elif json_path:
        Path(json_path).write_text(json.dumps(d, indent=2))
        print(f"wrote {json_path}", file=out)


def main(rate: int, count: int | None, db: str | None, json_path: str | None, xdp_mode: str = "generic",
         fault: str | None = None, attempts: int = 3, families: tuple[str, ...] = DEFAULT_FAMILIES) -> int:
    """`srmig demo --libvirt [--fault NAME[@PHASE]]`: one run, a row per family probed (srmig.testbed.demo's
    table; a fault cell probes IPv6 alone), JSON if asked (`-`: on stdout, the lines then on stderr), the exit
    status of exit_status(); the diagnosis on stderr when it fails."""
    quiet_libvirt()
    out = sys.stderr if json_path == "-" else sys.stdout
    say = demo.Progress(True)
    t0 = time.monotonic()
    if fault:
        from srmig.testbed import faults  # noqa: PLC0415

        f, phase = faults.parse(fault)
        def note(msg: str) -> None:
            say(msg)
            say.done()

        res = faults.run_cell(f, phase, rate, db, xdp_mode, attempts, count, say=say, show=None, note=note)
    else:
        res = run(rate, count or rate * DEFAULT_DURATION_S, db or "embedded", xdp_mode, say=say, show=None,
                  families=families)
    say.done()
    d = res.to_dict()
    title = (f"libvirt live migration driven by the srmig agents ({res.db} state database), {{rate}} probes/s "
             "per family ({what})")
    print(demo.table([res.as_run()], rate, title), file=out)
    if fault:
        how = "landed" if d["fault_landed"] else f"MISSED its phase ({d['fault_missed_why']})"
        injected = d["fault_ms"].get("fault.injected")
        at = f" at {injected:.0f} ms" if injected is not None else ""
        print(f"  fault {d['fault']}@{d['phase']}{at}: {how}, run {d['fault_attempts']} of {attempts} at most; "
              f"the VM ends on {VM_ON.get(d['vm_on'], d['vm_on'])}", file=out)
    print(f"  migration {d['migration_s']:.2f} s", file=out)
    for role, e in d["event_to_map_ms"].items():
        print(f"  {role}: libvirt event -> map update p50 {e['p50']:.3f} ms, max {e['max']:.3f} ms ({e['n']})",
              file=out)
    if res.error:
        print(f"  migration error: {res.error}", file=out)
    print(f"({time.monotonic() - t0:.0f} s; {demo.TABLE_LEGEND})", file=out)
    write_json(d, json_path, out)
    status = exit_status(d)
    if status:
        print(res.diagnosis_text, file=sys.stderr)
    return status
