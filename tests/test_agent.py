"""The agent: configuration errors, the hook client, the VM database schema (no root), and the real thing:
two libvirtd daemons, three agent processes, libvirt's live migration under probe traffic (libvirt tier)."""

from __future__ import annotations

import contextlib
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from srmig.ctl import config
from srmig.ctl.agent import Domain, metadata_xml
from srmig.ctl.phases import HostSids

GOOD = """
[host]
name = "hv1"
fabric = "eth1"
locator = "fc00:0:1::/48"
address = "2001:db8:a::2"
transit = ["fc00:0:3::e"]
sr_domain = ["2001:db8::/32"]

[ingress]
interface = "eth0"
gateway = "2001:db8:c::2"

[db]
backend = "etcd"
endpoints = ["http://[2001:db8:c::1]:2379"]

[hook]
ack_timeout_s = 1.5
on_timeout = "refuse"
"""


def test_good_config_and_defaults():
    cfg = config.parse(GOOD, "agent.toml")
    assert cfg.host.sids == HostSids("hv1", "fc00:0:1::d6", "fc00:0:1::5", "fc00:0:1::b")
    assert cfg.host.transit == ("fc00:0:3::e",) and cfg.host.sr_domain == ("2001:db8::/32",)
    assert cfg.host.xdp_mode == "native" and cfg.host.tap_queue == 10000 and cfg.host.drain is True
    assert cfg.ingress.gateway == "2001:db8:c::2"
    assert cfg.db.backend == "etcd" and cfg.db.endpoints == ("http://[2001:db8:c::1]:2379",)
    assert cfg.hook.on_timeout == "refuse" and cfg.hook.ack_timeout_s == 1.5
    assert cfg.metrics_listen == "127.0.0.1:9477"


def test_config_docstring_example_parses():
    """The example at the top of srmig/ctl/config.py is the reference: it must stay valid."""
    text = config.__doc__.split("\n\n", 1)[1].split("\nA VM is managed")[0]
    example = "\n".join(line[4:] for line in text.splitlines())
    cfg = config.parse(example, "example")
    assert cfg.host.fabric == "eth1" and cfg.ingress.name == "edge1"


BAD = [
    ("[host]\nfabric = 'eth1'\naddress = '2001:db8::1'\n", "host.sids.dx6", "IPv6 address"),
    ("[host]\nfabric = 'eth1'\nlocator = 'fc00:0:1::/48'\naddress = 'nope'\n", "host.address", "IPv6 address"),
    ("[host]\nfabric = 'eth1'\nlocator = 'fc00::1::/48'\naddress = '2001:db8::1'\n", "host.locator", "prefix"),
    ("[host]\nfabric = 'eth1'\nlocator = 'fc00:0:1::/48'\naddress = '2001:db8::1'\nsids = {dx6 = 'fc00:9::d6'}\n",
     "host.sids.dx6", "inside host.locator"),
    ("[host]\nfabric = 'eth1'\nlocator = 'fc00:0:1::/48'\naddress = '2001:db8::1'\nxdp_mode = 'fast'\n",
     "host.xdp_mode", "native, generic"),
    ("[host]\nfabric = 'eth1'\nlocator = 'fc00:0:1::/48'\naddress = '2001:db8::1'\nhold_ring_pages = 1000\n",
     "host.hold_ring_pages", "power of two"),
    ("[host]\nfabric = 'eth1'\nlocator = 'fc00:0:1::/48'\naddress = '2001:db8::1'\ngrace_s = -1\n",
     "host.grace_s", "number >= 0"),
    ("[host]\nfabric = 'eth1'\nlocator = 'fc00:0:1::/48'\naddress = '2001:db8::1'\nsr_domain = ['fc00::1/16']\n",
     "host.sr_domain[0]", "IPv6 prefix"),
    ("[host]\nfabric = 'eth1'\nlocator = 'fc00:0:1::/48'\naddress = '2001:db8::1'\nfabrik = 'x'\n",
     "host.fabrik", "known keys"),
    ("[ingress]\ninterface = 'eth0'\n", "ingress.gateway", "required"),
    ("[ingress]\ninterface = 'eth0'\ngateway = '2001:db8::1'\nencap = 'seg6'\n", "ingress.encap", "bpf, kernel"),
    ("[ingress]\ninterface = 'eth0'\ngateway = '2001:db8::1'\nsource = 'eth0'\n", "ingress.source", "IPv6 address"),
    ("[ingress]\ninterface = 'eth0'\ngateway = '2001:db8::1'\n[db]\nbackend = 'redis'\n", "db.backend",
     "embedded, etcd"),
    ("[ingress]\ninterface = 'eth0'\ngateway = '2001:db8::1'\n[db]\nendpoints = ['127.0.0.1:2379']\n",
     "db.endpoints", "list of URLs"),
    ("[ingress]\ninterface = 'eth0'\ngateway = '2001:db8::1'\n[metrics]\nlisten = '9477'\n", "metrics.listen",
     "HOST:PORT"),
    ("[ingress]\ninterface = 'eth0'\ngateway = '2001:db8::1'\n[hooks]\n", "hooks", "no such table"),
    ("[db]\nbackend = 'embedded'\n", "host", "[host] or an [ingress]"),
    ("[host\nfabric = 1\n", "(syntax)", "valid TOML"),
]


@pytest.mark.parametrize("text,key,expected", BAD, ids=[b[1] for b in BAD])
def test_bad_config_names_file_key_and_form(text, key, expected):
    with pytest.raises(config.ConfigError) as e:
        config.parse(text, "/etc/srmig/agent.toml")
    msg = str(e.value)
    assert msg.startswith(f"/etc/srmig/agent.toml: {key}: expected "), msg
    assert expected in msg and "\n" not in msg


def test_bad_config_exits_nonzero_and_installs_nothing(tmp_path):
    sock = tmp_path / "agent.sock"
    cfg = tmp_path / "agent.toml"
    cfg.write_text(f"[host]\nfabric = 'eth1'\nlocator = 'fc00:0:1::/48'\naddress = 'x'\n"
                   f"[hook]\nsocket = '{sock}'\n")
    out = subprocess.run([sys.executable, "-m", "srmig", "agent", "--config", str(cfg)], capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 1
    assert out.stderr.strip() == f"srmig: error: {cfg}: host.address: expected an IPv6 address, got 'x'"
    assert not sock.exists()
    missing = subprocess.run([sys.executable, "-m", "srmig", "agent", "--config", str(tmp_path / "nope.toml")],
                             capture_output=True, text=True, timeout=60)
    assert missing.returncode == 1 and "nope.toml: (file): expected a readable file" in missing.stderr


def test_ingress_encap_and_source():
    cfg = config.parse("[ingress]\ninterface = 'eth0'\ngateway = '2001:db8:c::2'\n", "agent.toml")
    assert cfg.ingress.encap == "bpf" and cfg.ingress.source is None  # defaults: BPF, interface's address
    cfg = config.parse("[ingress]\ninterface = 'eth0'\ngateway = '2001:db8:c::2'\nencap = 'kernel'\n"
                       "source = '2001:db8:c:0::1'\n", "agent.toml")
    assert cfg.ingress.encap == "kernel" and cfg.ingress.source == "2001:db8:c::1"


def test_check_refuses_kernel_encap_without_kernel_srv6(tmp_path):
    """encap = "kernel" passes --check where the kernel has SRv6 lwtunnels, and fails it with one line naming
    the fix where it has not: the expected outcome comes from this kernel, tried the same way."""
    from srmig.check import kernel_srv6

    cfg = tmp_path / "agent.toml"
    cfg.write_text("[ingress]\ninterface = 'eth0'\ngateway = '2001:db8:c::2'\nencap = 'kernel'\n")
    out = subprocess.run([sys.executable, "-m", "srmig", "agent", "--config", str(cfg), "--check"],
                         capture_output=True, text=True, timeout=60)
    has_srv6, reason = kernel_srv6()
    if has_srv6:
        assert out.returncode == 0 and out.stdout.strip() == f"{cfg}: ok (ingress)", out.stderr
    else:
        assert out.returncode == 1 and out.stdout == ""
        assert out.stderr.strip() == (f'srmig: error: {cfg}: ingress.encap: "kernel" needs SRv6 lwtunnels, which '
                                      f'this kernel lacks ({reason.removeprefix("absent: ")}): use encap = "bpf" '
                                      f'(the default)')


def test_domain_metadata_round_trip():
    xml = (f"<domain><name>vm1</name><metadata>{metadata_xml('2001:db8:100:0::10')}</metadata>"
           "<devices><interface type='ethernet'><target dev='tap7'/></interface></devices></domain>")
    assert Domain.from_xml(xml) == Domain("vm1", "2001:db8:100::10", "tap7")
    assert Domain.from_xml("<domain><name>other</name></domain>") is None


def _hook(args, stdin="<domain/>", **kw):
    return subprocess.run([sys.executable, "-m", "srmig.ctl.hook", *args], input=stdin, capture_output=True,
                          text=True, timeout=30, **kw)


def test_hook_without_agent(tmp_path):
    sock = str(tmp_path / "none.sock")
    # Not a migration: returns at once, prints nothing (libvirt would take stdout as a new XML).
    out = _hook(["--socket", sock, "vm1", "start", "begin", "-"])
    assert out.returncode == 0 and out.stdout == "" and out.stderr == ""
    out = _hook(["--socket", sock, "vm1", "migrate", "begin", "-"])
    assert out.returncode == 0 and out.stdout == "" and "not answering" in out.stderr
    out = _hook(["--socket", sock, "--on-timeout", "refuse", "vm1", "migrate", "begin", "-"])
    assert out.returncode == 1 and "refusing" in out.stderr


def test_install_hook(tmp_path):
    from srmig.ctl import hook

    path = hook.install(str(tmp_path), "/run/srmig/x.sock", 2.0, "proceed")
    assert path == tmp_path / "qemu.d" / "srmig" and os.access(path, os.X_OK)
    assert hook.install(str(tmp_path), "/run/srmig/x.sock", 2.0, "proceed") == path  # idempotent
    with pytest.raises(FileExistsError):
        hook.install(str(tmp_path), "/run/srmig/other.sock", 2.0, "proceed")
    out = subprocess.run([str(path), "vm1", "migrate", "begin", "-"], input="<domain/>", capture_output=True,
                         text=True, timeout=30)
    assert out.returncode == 0 and "not answering" in out.stderr  # the installed script runs the hook


# --- the VM database schema over the embedded backend (no root) ---------------------------------------

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


# --- the real thing -----------------------------------------------------------------------------------
# Loss is asserted as `lost_net`: probes lost but for the requests the guest's own counters say it received
# and left unanswered (after a burst its kernel drops replies it cannot send yet: Result.unanswered). Every
# failure prints where the lost probes went (Result.diagnosis).

@pytest.mark.libvirt
def test_libvirt_migration_driven_by_agents():
    """libvirt's live migration under 2000 probes/s; only libvirt's hook and events drive srmig: 0 lost,
    0 duplicated, 0 reordered. The destination's hook waited for the ingress's ack; every agent reports."""
    from srmig.testbed import libvirt_demo

    res = libvirt_demo.run(rate=2000, count=6000)
    d = res.to_dict()
    assert res.error is None
    assert (d["sent"], d["lost_net"], d["duplicated"], d["reordered"]) == (6000, 0, 0, 0), d
    s, dst, c = res.agents["S"], res.agents["D"], res.agents["C"]
    # The ingress applied the cut-over version (one route, to D's End.DX6-map) and acknowledged it.
    loc = {r["vm"]: r for r in c["locations"]}[libvirt_demo.VM_ADDR]
    assert loc["host"] == "D" and loc["segments"] == ["fc00:0:2::d6"]
    assert c["ingress"]["applied"][libvirt_demo.VM_ADDR] == loc["version"] and c["ingress"]["errors"] == 0
    # srmig's BPF H.Encaps carried every probe (and whatever else went to the VM), and dropped nothing.
    enc = c["ingress"]["counters"]
    assert c["ingress"]["encap"] == "bpf" and enc["done"] >= 6000, enc
    assert all(n == 0 for k, n in enc.items() if k.startswith("drop")), enc
    assert 'srmig_encap_packets_total{outcome="done"}' in res.metrics["C"]
    vm_d = {v["vm"]: v for v in dst["vms"]}[libvirt_demo.VM_ADDR]
    # Reported (the hold at D is its tap queue); it also counts what the host sent the tap before QEMU had it.
    assert vm_d["state"] == "running" and isinstance(vm_d["tap_dropped"], int)
    assert all(v["state"] is None for v in s["vms"] if v["vm"] == libvirt_demo.VM_ADDR)  # grace over
    assert s["event_to_map_ms"]["n"] >= 1 and dst["event_to_map_ms"]["n"] >= 1
    assert s["dataplane"]["drops"]["outside_domain"] == 0
    # Prometheus: dataplane counters, event -> map latency, phase durations.
    prom = res.metrics["S"]
    assert 'srmig_verdicts_total{verdict="delivered"}' in prom or "srmig_verdicts_total{" in prom
    count = [line for line in prom.splitlines() if line.startswith("srmig_event_to_map_seconds_count")]
    assert count and float(count[0].split()[-1]) >= 1
    assert 'srmig_phase_seconds_count{phase="stop-and-copy"}' in prom


@pytest.mark.libvirt
def test_agents_restarted_before_migration():
    """Both host agents SIGKILLed and restarted while the VM runs: they rebuild their state from libvirt and
    the database (reconciliation), and the migration that follows is still lossless."""
    from srmig.testbed import libvirt_demo

    def restart(tb, ds, agents):
        for role in ("S", "D"):
            agents.kill(role)
            agents.start(role, *agents.args[role])
        for role in ("S", "D"):
            agents.wait(role, lambda st: st["libvirt"] and st["libvirt"]["state"] == "connected"
                        and st["db"]["state"] == "connected", 60, "reconnected")
        # Running again in the map, and the swallowed-frame baseline retaken while the VM is quiet (an agent
        # restarted under traffic waits for a quiet moment; until then a frame QEMU swallows can be lost).
        st = agents.wait("S", lambda st: any(v["vm"] == libvirt_demo.VM_ADDR and v["state"] == "running"
                                             and v["baseline"] for v in st["vms"]), 10, "VM running after reconcile")
        assert st["agent"] == "S"

    res = libvirt_demo.run(rate=2000, count=6000, before=restart)
    d = res.to_dict()
    assert res.error is None
    assert (d["lost_net"], d["duplicated"]) == (0, 0), d


@pytest.mark.libvirt
def test_abort_after_pause_returns_held_packets():
    """The destination's QEMU is killed once the source paused: libvirt fails the migration and resumes the
    source. The agents roll back: the source delivers again, the destination returns what its tap queue held
    (kept alive by the agent's duplicate of QEMU's tap fd) once the source runs the VM.

    The source's QEMU is frozen from the pause until D holds something (kill_dest_at_pause): without that,
    libvirt resumed the source 10-15 ms after the pause, and under load before the source's agent had sent D
    anything.

    0 duplicated, and at most 1 lost: the frame the source QEMU's tap backend read just after the stop, which
    in about half the runs QEMU 7.2 dropped at the resume (measured with a capture on the source's tap: the
    guest never answers the probe between the last one before the pause and the first after it; the same
    with the drain off, so it is not srmig's doing). Without the return, what D held is lost: ~600 probes here.

    Order: D returns to S's End.SBUF while S parks what arrives (SRMIG_VM_F_PARK) until D's record says how
    many it returned, then delivers those in order: 0 reordered (before, the ~50 returned probes all arrived
    behind newer ones). At most 1 when QEMU swallowed two frames at the pause and keeps the newer."""
    import threading
    import time

    from srmig.testbed import libvirt_demo

    stop = threading.Event()

    def during(tb, ds, agents, dom):
        """The probe runs until 1.5 s after the abort: under load the pause came 3.2 s into the run, after
        a fixed 6000 probes at 2000/s had all been sent, and there was nothing left to hold."""
        try:
            libvirt_demo.kill_dest_at_pause(tb, ds, agents, dom)
            time.sleep(1.5)
        finally:
            stop.set()

    res = _run_until(lambda r: r.error is not None and r.agents["D"]["dataplane"]["verdicts"]["hold"] > 0,
                     rate=2000, count=60000, before=lambda tb, ds, agents: stop.clear(), during=during,
                     stop=stop)
    d = res.to_dict()
    assert res.error is not None, "the migration should have failed"
    assert d["duplicated"] == 0 and d["lost_net"] <= 1, (d, res.report.lost_seqs)
    assert d["reordered"] <= 1, (d, res.report.reordered_seqs)
    assert res.agents["D"]["dataplane"]["verdicts"]["hold"] > 0, "D must have held something, or this proves nothing"
    loc = {r["vm"]: r for r in res.agents["C"]["locations"]}[libvirt_demo.VM_ADDR]
    assert loc["host"] == "S" and loc["segments"] == ["fc00:0:1::d6"]
    assert {v["vm"]: v["state"] for v in res.agents["S"]["vms"]}[libvirt_demo.VM_ADDR] == "running"


@pytest.mark.libvirt
@pytest.mark.etcd
def test_libvirt_migration_with_etcd():
    """The same, with the agents sharing an etcd (in the client's namespace, reached across the fabric)."""
    from srmig.testbed import libvirt_demo

    res = libvirt_demo.run(rate=2000, count=6000, db="etcd")
    d = res.to_dict()
    assert res.error is None
    assert (d["lost_net"], d["duplicated"]) == (0, 0), d
    loc = {r["vm"]: r for r in res.agents["C"]["locations"]}[libvirt_demo.VM_ADDR]
    assert loc["host"] == "D" and res.agents["C"]["db"]["backend"] == "etcd"


@pytest.mark.libvirt
@pytest.mark.etcd
def test_etcd_down_at_the_pause():
    """The agents' etcd is SIGKILLed as soon as the source pauses and comes back 2 s later (same data). Nothing
    on the packets' path waits for it: the destination learned about the migration at the begin hook (before
    QEMU started), the source drains and forwards to it, and keeps forwarding until its cut-over is in the
    database (writes are retried in order; the grace period starts only once the publish lands). So 0 lost,
    0 duplicated, through the outage and the cut-over after it; once etcd is back the ingress learns that the
    VM is on D, and every agent reports the database connected again, with no write left behind.

    The probe runs until the ingress learnt the cut-over, and 1.5 s more (the source's 1 s grace period):
    it outlasts the outage and what follows it however long the migration took (a fixed 8 s of probes
    ended before etcd had been back for 1 s under a busy loop, where the migration took 5.3 s)."""
    import threading
    import time

    from srmig.testbed import libvirt_demo

    seen = {}
    stop, outage = threading.Event(), libvirt_demo.etcd_down_at_pause(2.0)

    def on_d(st) -> bool:
        return {r["vm"]: r["host"] for r in st.get("locations", [])}.get(libvirt_demo.VM_ADDR) == "D"

    def during(tb, ds, agents, dom):
        try:
            outage(tb, ds, agents, dom)
            if getattr(tb, "etcd_outage", None) is not None:
                with contextlib.suppress(TimeoutError):  # asserted in after()
                    agents.wait("C", on_d, 20, "the ingress learns that the VM is on D")
                time.sleep(1.5)
        finally:
            stop.set()

    def after(tb, ds, agents):
        seen["outage"] = getattr(tb, "etcd_outage", None)  # none: the pause was missed, nothing injected
        if seen["outage"] is None:
            return
        for role in ("S", "D", "C"):  # the lease is refreshed every LEASE_TTL_S / 3
            agents.wait(role, lambda s: s["db"]["state"] == "connected" and not s["db"]["pending_writes"], 10,
                        "the database connected again, nothing pending")
        agents.wait("C", on_d, 10, "the ingress learns that the VM is on D")
        seen["S log"] = agents.log("S", 100000)

    res = _run_until(lambda r: seen["outage"] is not None and
                     seen["outage"][0] < r.report.t0 + r.report.marks["complete"] / 1e3,
                     rate=2000, count=60000, db="etcd", before=lambda tb, ds, agents: stop.clear(), during=during,
                     stop=stop, after=after)
    d = res.to_dict()
    assert res.error is None, res.error
    down, up = seen["outage"]
    rep = res.report
    assert down < rep.t0 + rep.marks["complete"] / 1e3, "etcd should go down while the migration runs"
    assert rep.t0 + rep.duration_ms / 1e3 > up + 1.0, "the probe should outlast the outage"
    print(f"[etcd down at the pause] lost_net {d['lost_net']} sent {d['sent']} migration {d['migration_s']} s; "
          f"probe ends {rep.t0 + rep.duration_ms / 1e3 - up:.2f} s after etcd is back")
    assert "database write failed" in seen["S log"], "the outage should have hit the source's writes"
    # Nothing lost to the outage: what may be missing is only what the source's drain says it could not
    # re-send of the frames its pausing QEMU swallowed (under a busy loop, before the count's bound was raised
    # and its window stopped following a late pause event: 1 and 2, in 2 runs of 6).
    unrecovered = _unrecovered_swallowed(seen["S log"])
    assert d["duplicated"] == 0 and d["lost_net"] <= unrecovered, (d, unrecovered, rep.lost_seqs)
    _ingress_on(res, "D")
    assert all(res.agents[role]["db"]["state"] == "connected" for role in ("S", "D", "C"))


def _unrecovered_swallowed(log: str) -> int:
    """Frames the source's drain log says its QEMU swallowed at the pause and it did not re-send: swallowed
    minus re-sent, and 2 (the most a pausing QEMU holds) where the count was unknown (its query timed out)."""
    n = 0
    for resent, swallowed in re.findall(r"(\d+) swallowed re-sent \(swallowed (\d+|None)", log):
        n += 2 if swallowed == "None" else max(0, int(swallowed) - int(resent))
    return n


@contextlib.contextmanager
def _ingress_agent(tmp_path, db_section: str):
    """An ingress agent (`srmig agent` process) on lo of a namespace of its own, with this [db] section, its
    socket in tmp_path. Its H.Encaps program lives in that namespace; its pins are removed at the end."""
    import shutil

    from srmig.dataplane import loader
    from srmig.testbed.netns import Topology

    with Topology() as topo:
        topo.add_host("I")
        with topo.inside("I"):
            pins = loader.encap_pin_dir()
        cfg = tmp_path / "agent.toml"
        cfg.write_text(f"[ingress]\nname = 'ing1'\ninterface = 'lo'\ngateway = '::1'\n[db]\n{db_section}\n"
                       f"[hook]\nsocket = '{tmp_path / 'agent.sock'}'\n[metrics]\nlisten = ''\n")
        p = subprocess.Popen([sys.executable, "-m", "srmig", "--netns", topo.ns("I"), "agent", "--config", str(cfg)],
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        try:
            yield p
        finally:
            p.terminate()
            p.wait(10)
            shutil.rmtree(pins, ignore_errors=True)


@pytest.mark.bpf
@pytest.mark.netns
def test_unreachable_database_is_retried_and_reported(tmp_path):
    """An ingress agent whose etcd is down: it keeps running, retries with backoff and says so in status."""
    import socket as socket_mod
    import time

    from srmig.ctl.hooksrv import request

    with socket_mod.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    sock = tmp_path / "agent.sock"
    with _ingress_agent(tmp_path, f"backend = 'etcd'\nendpoints = ['http://127.0.0.1:{port}']") as p:
        deadline = time.monotonic() + 30
        seen = []
        while time.monotonic() < deadline:
            try:
                st = request(str(sock), {"op": "status"}, 2)
            except OSError:
                time.sleep(0.1)
                continue
            seen.append(st["db"])
            if len(seen) >= 2 and st["db"].get("retry_in_s", 0) >= 0.8:
                break
            time.sleep(0.3)
        assert p.poll() is None, "the agent must not exit (no crash loop)"
        assert seen and seen[-1]["state"] == "unreachable" and str(port) in seen[-1]["error"], seen
        assert seen[-1]["retry_in_s"] >= 0.8  # backing off
        out = subprocess.run([sys.executable, "-m", "srmig", "status", "--socket", str(sock)], capture_output=True,
                             text=True, timeout=30)
        assert out.returncode == 0 and "state db: unreachable" in out.stdout and "retry in" in out.stdout


@pytest.mark.bpf
@pytest.mark.netns
def test_expired_lease_registers_again(tmp_path):
    """The database lost the agent's lease (unreachable longer than the TTL, or a restored etcd): its records
    under it are gone, agents/<name> and, for an ingress, ingresses/<name> (which migrations wait for). The
    agent notices at its next refresh and registers again under a new lease, without a restart."""
    import sqlite3
    import time

    from srmig.ctl.statedb import SqliteKv, _SqliteLease

    db = tmp_path / "state.db"
    with _ingress_agent(tmp_path, f"backend = 'embedded'\npath = '{db}'") as p:
        kv = SqliteKv(str(db))

        def registered() -> set[str]:
            return {e.key for e in kv.range("agents/")[0] + kv.range("ingresses/")[0]}

        deadline = time.monotonic() + 20
        while len(registered()) < 2 and time.monotonic() < deadline:
            time.sleep(0.1)
        names = registered()
        assert {k.split("/")[0] for k in names} == {"agents", "ingresses"}, names
        with sqlite3.connect(db) as c:
            (lease_id,) = c.execute("SELECT DISTINCT lease FROM kv WHERE lease IS NOT NULL").fetchone()
        _SqliteLease(kv, lease_id, 10.0).revoke()
        assert registered() == set(), "revoking the lease deletes its keys"
        deadline = time.monotonic() + 10  # the agent refreshes every LEASE_TTL_S / 3
        while registered() != names and time.monotonic() < deadline:
            time.sleep(0.1)
        assert registered() == names
        assert p.poll() is None


def test_unreachable_libvirt_is_retried_and_reported():
    import time

    from srmig.ctl.libvirt_link import LibvirtLink

    items = []
    link = LibvirtLink("qemu+unix:///system?socket=/nonexistent/libvirt-sock", lambda *i: items.append(i))
    link.start()
    try:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and (link.retry_in or 0) < 0.8:
            time.sleep(0.05)
        st = link.status()
        assert st["state"] == "unreachable" and "nonexistent" in st["error"] and st["retry_in_s"] >= 0.8, st
        assert st["connects"] == 0 and not items
    finally:
        link.close()


@pytest.mark.libvirt
def test_ingress_late_to_apply():
    """The ingress agent is frozen through the whole migration: the destination's hook waits its bounded
    time for the ack, then lets the migration go on. The ingress keeps sending to the source's End.DX6-map;
    the source forwards those packets to the destination (AWAY + next SID) and the destination holds them until
    the VM resumes: still 0 lost. Once thawed, the ingress catches up with the latest version."""
    from srmig.testbed import libvirt_demo

    res = libvirt_demo.run(rate=2000, count=8000, before=libvirt_demo.freeze_ingress,
                           during=libvirt_demo.thaw_ingress_after_migration)
    d = res.to_dict()
    assert res.error is None
    assert (d["lost_net"], d["duplicated"]) == (0, 0), d
    c = res.agents["C"]
    loc = {r["vm"]: r for r in c["locations"]}[libvirt_demo.VM_ADDR]
    assert loc["host"] == "D" and c["ingress"]["applied"][libvirt_demo.VM_ADDR] == loc["version"]


@pytest.mark.libvirt
def test_source_agent_killed_at_the_pause():
    """The source's agent dies at the pause (SIGKILL) and comes back 1 s later. Nobody drains the source, so
    what reached its tap between the pause and the cut-over is lost: physics. The destination notices that
    the source never reported its pause and cuts the ingresses over itself when the VM resumes, so the loss
    is bounded by pause -> resume (+50 ms), not by the restart. The restarted agent converges (cut over,
    the source's entry forgotten after the grace period).

    The bound is this run's pause -> resume (libvirt's events) + 200 ms: D's 50 ms wait for the source's
    report (SOURCE_SILENT_S), and 150 ms for a starved D to hear the resume and the cut-over to reach the
    ingress (under a busy loop the loss once ended 131 ms after the resume, 263 probes against the 237 that
    +100 ms allowed). Still far below the restart (1 s: 2000 probes), which the check after it tells apart.
    Measured (10 runs, 4 quiet, 6 under a busy loop): pause -> resume 40-113 ms; lost 0-303; when the kill
    beat the source's drain the loss ended 51-63 ms after the resume. A fixed 400 ms bound failed under a busy
    loop (832 lost): pause -> resume is what a loaded machine stretches."""
    from srmig.testbed import libvirt_demo

    rate = 2000
    res = _agent_killed_at_pause("S", rate)
    d, f, rep = res.to_dict(), res.faults, res.report
    assert "agent_fault.paused" in f and "agent_fault.resumed" in f, f"libvirt's pause and resume not heard: {f}"
    window_ms = f["agent_fault.resumed"] - f["agent_fault.paused"]
    bound = rate * (window_ms + 200) / 1e3
    assert d["duplicated"] == 0 and d["lost_net"] <= bound, (d, f"pause -> resume {window_ms:.1f} ms", bound)
    if rep.lost:  # ... and not by the restart (the loss would run until the restarted agent drained)
        assert rep.blackout_start_ms + rep.blackout_ms < f["agent_fault.started"], (d, f)
    print(f"[source agent killed at the pause] lost_net {d['lost_net']} bound {bound:.0f} (pause -> resume "
          f"{window_ms:.1f} ms) migration {d['migration_s']} s")
    loc = {r["vm"]: r for r in res.agents["C"]["locations"]}[libvirt_demo.VM_ADDR]
    assert loc["host"] == "D" and loc["segments"] == ["fc00:0:2::d6"]


@pytest.mark.libvirt
def test_source_agent_stalled_over_the_pause():
    """The source's agent is stopped (SIGSTOP) from pre-copy until libvirt has ended the source's QEMU: it
    hears of the pause only after the QEMU whose tap queue holds every packet sent to it since. That queue
    outlives QEMU because the agent holds the tap's fds from the moment it provisioned the migration (KeepTap
    on the source): the late drain still sends it to D. Meanwhile D, not hearing of the pause, cut the
    ingresses over itself once the VM resumed and delivered newer packets first: the drained ones arrive
    reordered (at most as many as were drained), none lost but the frame QEMU may swallow at the stop (its
    count asked of a QEMU gone by then). Without the kept queue, everything from the pause to D's cut-over
    was lost with QEMU (84 in a CI run of the libvirtd restart below, where the same race happens)."""
    import re

    from srmig.testbed import libvirt_demo

    seen = {}

    def after(tb, ds, agents):
        seen.update(stall=tb.agent_stall, log=agents.log("S", 1 << 20))

    res = libvirt_demo.run(rate=2000, count=8000, during=libvirt_demo.stall_source_agent_over_pause, after=after)
    d = res.to_dict()
    assert res.error is None
    drained = re.search(r"drained (\d+) from the tap \(QEMU gone\)", seen["log"])
    assert drained and int(drained.group(1)) > 0, seen["log"][-3000:]
    assert d["duplicated"] == 0 and d["lost_net"] <= 2, (d, res.report.lost_seqs)
    assert d["reordered"] <= int(drained.group(1)), (d, drained.group(0))
    _converged(res)


@pytest.mark.libvirt
def test_destination_agent_killed_at_the_pause():
    """The destination's agent dies at the pause and comes back 1 s later: its map stays INCOMING, so the
    VM's tap queue holds what arrives and the resumed QEMU reads it; the restarted agent reconciles
    (the VM runs here: RESUMED). Nothing is lost but what the source's swallowed-frame recovery can miss."""
    from srmig.testbed import libvirt_demo

    res = _agent_killed_at_pause("D")
    d = res.to_dict()
    assert d["duplicated"] == 0 and d["lost_net"] <= 2, d
    assert {v["vm"]: v["state"] for v in res.agents["D"]["vms"]}[libvirt_demo.VM_ADDR] == "running"


def _run_until(landed, attempts: int = 3, **kw):
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


def _agent_killed_at_pause(role: str, rate: int = 2000):
    """One libvirt run under `rate` probes/s in which the agent of `role` is SIGKILLed at the pause and
    started again 1 s later (_run_until: again while the kill missed the pause); checks that the migration
    completed and that the kill hit the source paused. res.faults also has "agent_fault.paused" and
    "agent_fault.resumed": libvirt's SUSPENDED on S and RESUMED on D, as this process heard them (ms on the
    probe's clock; both events take the same way here, so their difference is pause -> resume)."""
    import libvirt

    from srmig.ctl.libvirt_events import EventRecorder, ensure_event_loop
    from srmig.testbed import libvirt_demo

    ensure_event_loop()  # before the connections whose events we want
    seen, watch = {}, {}

    def before(tb, ds, agents):
        watch["rec"] = EventRecorder(t0=0.0)  # t: time.monotonic(), the probe's clock
        watch["conns"] = [ds[r].connect() for r in ("S", "D")]
        for r, conn in zip(("S", "D"), watch["conns"]):
            watch["rec"].watch(r, conn)

    def after(tb, ds, agents):
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

    def landed(res) -> bool:
        return seen.get("source_state") == libvirt.VIR_DOMAIN_PAUSED

    res = _run_until(landed, rate=rate, count=8000, before=before, during=libvirt_demo.restart_agent_at_pause(role),
                     after=after)
    assert res.error is None, res.error
    assert landed(res), "the kill should hit the source paused"
    return res


def _ingress_on(res, host: str) -> None:
    """The ingress's location for the VM is `host` (its End.DX6-map SID alone), and that version is applied."""
    from srmig.testbed import libvirt_demo

    c = res.agents["C"]
    loc = {r["vm"]: r for r in c["locations"]}[libvirt_demo.VM_ADDR]
    assert loc["host"] == host and loc["segments"] == [{"S": "fc00:0:1::d6", "D": "fc00:0:2::d6"}[host]], loc
    assert c["ingress"]["applied"].get(libvirt_demo.VM_ADDR) == loc["version"], c["ingress"]


def _converged(res) -> None:
    """The ingress ends on D with that version applied; the source forgot the VM after its grace period."""
    from srmig.testbed import libvirt_demo

    _ingress_on(res, "D")
    assert all(v["state"] is None for v in res.agents["S"]["vms"] if v["vm"] == libvirt_demo.VM_ADDR), res.agents["S"]
    assert {v["vm"]: v["state"] for v in res.agents["D"]["vms"]}[libvirt_demo.VM_ADDR] == "running"


@pytest.mark.libvirt
def test_destination_agent_killed_in_precopy():
    """The destination's agent dies once its begin hook answered (the incoming domain exists on D: pre-copy)
    and comes back 1 s later, after the pause here. Everything D had to do before the resume was done at the
    hook (map INCOMING: its tap queue holds); the restarted agent finds the VM running (RESUMED). Measured
    (7 runs): 0 lost in 6, 2 in 1, and 1 duplicated in 1: both the source's swallowed-frame recovery, not
    this fault (QEMU answered the count late: not re-sent; or one frame counted swallowed was delivered)."""
    from srmig.testbed import libvirt_demo

    seen = {}
    res = libvirt_demo.run(rate=2000, count=8000, during=libvirt_demo.restart_dest_agent_in_precopy(1.0),
                           after=lambda tb, ds, agents: seen.update(tb.agent_fault))
    d = res.to_dict()
    assert res.error is None, res.error
    assert seen["source_state"] == 1, "the source should still run at the kill (pre-copy)"  # VIR_DOMAIN_RUNNING
    assert d["lost_net"] <= 2 and d["duplicated"] <= 1, (d, res.report.lost_seqs, res.report.duplicated_seqs)
    _converged(res)


@pytest.mark.libvirt
def test_source_agent_killed_after_resume():
    """The source's agent dies as soon as the VM runs on D (cut-over and grace to come) and comes back 1 s
    later. Usually its drain was over: the map forwards to D (AWAY) while no agent runs, the restarted agent
    replays its steps (only their last map write: re-applying the provision state would deliver to the gone
    QEMU) and cuts over: 0 lost. When libvirt resumes D fast (20 ms after the pause) the kill hits the
    drain: D sees no pause report and cuts the ingress over itself; what the program parked in the hold ring
    meanwhile is sent by the restarted agent (late: reordered, not lost); what the drain had read from, or
    left in, the source QEMU's tap queue is gone with the process and QEMU (physics: 0-60 frames, the guest's
    backlog at the pause). Without the ring recovery and the replay fix: up to 150 lost."""
    from srmig.testbed import libvirt_demo

    rate = 2000
    seen = {}
    res = libvirt_demo.run(rate=rate, count=8000, during=libvirt_demo.restart_source_agent_after_resume(1.0),
                           after=lambda tb, ds, agents: seen.update(tb.agent_fault))
    d = res.to_dict()
    assert res.error is None, res.error
    assert seen["source_state"] != 1, "the kill should come after the pause"
    assert d["duplicated"] == 0 and d["lost_net"] <= rate * 0.05, (d, res.report.lost_seqs)  # < 50 ms of traffic
    _converged(res)


@pytest.mark.libvirt
def test_ingress_agent_killed_at_the_pause():
    """The ingress agent dies at the pause and comes back 1 s later, often after the source cut over. Its
    routes stay in the kernel, to the source's End.S SID: the source keeps forwarding to D until the restarted
    ingress applied the cut-over, because its grace period starts only once every registered ingress acked
    it (bounded by the lease TTL). Before that fix, the grace ran out first in 1 run of 3: 126 lost. At most
    1 lost, as without the fault, under a busy loop: the frame QEMU swallows at the stop, when its count came
    too late to re-send it."""
    res = _agent_killed_at_pause("C")
    d = res.to_dict()
    assert d["lost_net"] <= 1 and d["duplicated"] == 0, (d, res.report.lost_seqs)
    _converged(res)


@pytest.mark.bpf
def test_hundred_concurrent_migrations(tmp_path):
    """100 VMs migrate S -> D at once through two agent workers (each with its own namespace, program and
    maps) exchanging events through a watch on the database: every VM ends running on D, in D's map and in
    the database, and gone from S's map after the grace period (bench.agent.load, without the timing)."""
    from bench import agent as bench_agent

    out = bench_agent.load(tmp_path, 100, None, grace_s=0.1)
    assert out["wrong_end_state"] == 0 and out["left_on_source"] == 0, out


@pytest.mark.libvirt
def test_libvirtd_restarted_before_migration():
    """The source's libvirtd restarts while the VM runs (its QEMU keeps running): the agent sees the
    connection close, reconnects, reconciles, and the migration that follows is lossless."""
    from srmig.testbed import libvirt_demo

    def restart(tb, ds, agents):
        before = agents.status("S")["libvirt"]["connects"]
        ds["S"].restart()
        st = agents.wait("S", lambda s: s["libvirt"]["connects"] > before and s["libvirt"]["state"] == "connected",
                         30, "reconnected to the new libvirtd")
        assert any(v["vm"] == libvirt_demo.VM_ADDR and v["state"] == "running" for v in st["vms"])

    res = libvirt_demo.run(rate=2000, count=6000, before=restart)
    d = res.to_dict()
    assert res.error is None
    assert (d["lost_net"], d["duplicated"]) == (0, 0), d


def _domains(ds) -> dict:
    """{role: {domain name: libvirt state}} on each daemon."""
    out = {}
    for role, daemon in ds.items():
        conn = daemon.connect()
        try:
            out[role] = {d.name(): d.state()[0] for d in conn.listAllDomains(0)}
        finally:
            conn.close()
    return out


@pytest.mark.libvirt
@pytest.mark.parametrize("phase", ["precopy", "pause", "pause-slow-recovery"])
def test_source_libvirtd_killed_during_migration(phase):
    """The source's libvirtd crashes (SIGKILL) in pre-copy, or as soon as the source is paused, and is started
    again at once (systemd's Restart=on-failure). libvirt cannot keep an outgoing job across its restart: the
    new daemon recovers it by cancelling the migration and resuming the source (RUNNING/MIGRATION_CANCELED,
    with no lifecycle event); the destination's libvirtd kills its incoming QEMU when the source's connection
    drops (STOPPED on D). srmig takes its abort path from those: the reconnected agent's reconciliation finds
    the VM running here after its pause (FAILED), D returns what its tap queue held and S delivers what it
    parked meanwhile, in order. "pause-slow-recovery": the source's QEMU is stopped for 1 s, so the recovery
    is not over when the agent reconnects: it finds the VM still paused and polls until libvirt resumed it.

    Measured: 0 duplicated, 0 reordered in every run; lost 0 in pre-copy (3 runs); at the pause (14 runs) 0
    in 8, 1 in 5, 17 in 1 (8.5 ms of traffic), sent 10-15 ms before the kill: frames QEMU's tap backend read
    at the stop, whose count is asked through libvirt, down then: they are not re-sent. Before
    the agent said "failed" for a VM it finds running (or, polling, resumed) after D's failure reached it
    first, D never returned what it held: 1195 lost in the 1 run at the pause, 610 with the slow recovery.
    With the slow recovery (5 runs measured: 0, 0, 1, 1, 8): the 1 s QEMU stop queues ~2400 probes, which S
    delivers in one burst once QEMU runs; the 8 were lost in that burst, not at the stop."""
    import signal

    import libvirt

    from srmig.testbed import libvirt_demo

    rate = 2000
    hook = {"precopy": libvirt_demo.restart_source_libvirtd_in_precopy(signal.SIGKILL),
            "pause": libvirt_demo.restart_source_libvirtd_at_pause(signal.SIGKILL),
            "pause-slow-recovery": libvirt_demo.restart_source_libvirtd_at_pause(signal.SIGKILL, 1.0)}[phase]
    seen = {}

    def after(tb, ds, agents):
        seen.clear()
        seen.update(getattr(tb, "libvirtd_fault", {}), domains=_domains(ds))
        if seen["domains"]["D"]:
            return  # the kill came after the point of no return: libvirt's recovery completes the migration
        with contextlib.suppress(TimeoutError):  # asserted below, with the run's diagnosis
            agents.wait("C", lambda s: {r["vm"]: r["host"] for r in s["locations"]}.get(libvirt_demo.VM_ADDR)
                        == "S", 10, "the ingress back on S")

    res = _run_until(lambda r: "source_state" in seen and not seen["domains"]["D"], rate=rate, count=8000,
                     during=hook, after=after)
    d = res.to_dict()
    hit = libvirt.VIR_DOMAIN_RUNNING if phase == "precopy" else libvirt.VIR_DOMAIN_PAUSED
    assert seen.get("source_state") == hit, f"the fault should hit {phase}: {seen}"
    assert res.error is not None, "the client's connection to the source's libvirtd should have dropped"
    assert seen["domains"] == {"S": {libvirt_demo.DOMAIN: libvirt.VIR_DOMAIN_RUNNING}, "D": {}}, seen["domains"]
    assert d["duplicated"] == 0 and d["reordered"] <= 1, (d, res.report.reordered_seqs)
    rep = res.report
    assert d["lost_net"] <= rate * 0.02, (d, rep.lost_seqs)  # 20 ms of traffic
    if d["lost_net"] and not d["guest_unanswered"] and phase != "pause-slow-recovery":
        # at the stop: sent within the 50 ms before the kill
        assert -50 < rep.blackout_start_ms - (seen["down"] - rep.t0) * 1e3 <= 0, (d, rep.lost_seqs, seen)
    _ingress_on(res, "S")
    assert {v["vm"]: v["state"] for v in res.agents["S"]["vms"]}[libvirt_demo.VM_ADDR] == "running"


@pytest.mark.libvirt
@pytest.mark.parametrize("phase", ["precopy", "pause"])
def test_source_libvirtd_restarted_during_migration(phase):
    """`systemctl restart libvirtd` on the source in pre-copy, or as soon as the source is paused: SIGTERM.
    libvirtd 9.0 closes its clients' connections at once but finishes the API calls in flight, the migration
    included, before it exits: the VM ends on D (the caller of migrateToURI3 gets an I/O error nonetheless).
    The source's agent loses its connection (in pre-copy before the pause: D notices the silent source and
    cuts the ingresses over itself), reconnects to the new daemon and finds the VM gone (STOPPED).

    Measured (4 runs each): 0 duplicated, 0 reordered; lost 1-2 at the pause and in pre-copy: the frames
    QEMU's tap backend read at the stop, whose count is asked through libvirt, going away then: not re-sent.
    Bounded as in the crash below, where the same frames were 17 once."""
    import libvirt

    from srmig.testbed import libvirt_demo

    hook = {"precopy": libvirt_demo.restart_source_libvirtd_in_precopy,
            "pause": libvirt_demo.restart_source_libvirtd_at_pause}[phase]()
    seen = {}

    hit = libvirt.VIR_DOMAIN_RUNNING if phase == "precopy" else libvirt.VIR_DOMAIN_PAUSED

    def after(tb, ds, agents):
        seen.clear()
        seen.update(getattr(tb, "libvirtd_fault", {}), domains=_domains(ds))

    res = _run_until(lambda r: seen.get("source_state") == hit, rate=2000, count=8000, during=hook, after=after)
    d = res.to_dict()
    assert seen.get("source_state") == hit, f"the fault should hit {phase}: {seen}"
    assert seen["domains"] == {"S": {}, "D": {libvirt_demo.DOMAIN: libvirt.VIR_DOMAIN_RUNNING}}, seen["domains"]
    assert d["duplicated"] == 0 and d["lost_net"] <= 2000 * 0.02, (d, res.report.lost_seqs)
    _converged(res)


def test_install_hook_writes_a_valid_systemd_unit(tmp_path):
    """`srmig install-hook --unit PATH`: the hook, and a unit systemd accepts (systemd-analyze verify when the
    machine has it; the unit's sections and ExecStart otherwise)."""
    import configparser
    import shutil

    cfg = tmp_path / "agent.toml"
    cfg.write_text(GOOD)
    unit = tmp_path / "srmig-agent.service"
    out = subprocess.run([sys.executable, "-m", "srmig", "install-hook", "--config", str(cfg), "--hooks-dir",
                          str(tmp_path / "hooks"), "--unit", str(unit)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert (tmp_path / "hooks" / "qemu.d" / "srmig").exists() and "restart libvirtd" in out.stdout
    parsed = configparser.ConfigParser()
    parsed.read_string(unit.read_text())
    exec_start = parsed["Service"]["ExecStart"]
    assert exec_start.endswith(f"agent --config {cfg}") and parsed["Service"]["Restart"] == "always"
    exe = exec_start.split()[0]
    assert os.access(exe, os.X_OK), exe
    if shutil.which("systemd-analyze"):
        v = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True, text=True, timeout=60)
        assert v.returncode == 0, v.stderr
