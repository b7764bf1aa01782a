"""Least privilege in etcd (srmig.ctl.statedb.etcd_auth), against a real etcd 3.4 with its authentication on:
each agent's etcd user writes its own keys only, whatever the layout of the records it writes (a table of
writes through srmig's own VmDb, each allowed or refused by etcd); a refusal is counted and logged in one
line; the token is renewed when etcd forgets it; a bad password is refused in one line, by open_db and by
`srmig agent --check`, as are password files that are missing or readable by others; and the etcdctl
commands `srmig db-roles` prints make the same roles.
"""

from __future__ import annotations

import logging
import os
import re
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from typing import Callable

import pytest

from srmig.ctl import records, statedb
from srmig.ctl.phases import HostSids
from srmig.ctl.statedb import AuthFailed, PermissionDenied
from srmig.ctl.vmdb import VmDb
from srmig.testbed.etcd import EtcdServer

pytestmark = pytest.mark.etcd

VM = "2001:db8:100::10"
S_SIDS = HostSids("S", "fc00:0:1::d6", "fc00:0:1::5", "fc00:0:1::b")
D_SIDS = HostSids("D", "fc00:0:2::d6", "fc00:0:2::5", "fc00:0:2::b")


def migration(src: str, dst: str) -> dict:
    return {"id": "m1", "vm": VM, "domain": "vm1", "src": src, "dst": dst, "transit": [], "events": ["begin"],
            "resent": [], "returned": None}


@pytest.fixture(scope="module")
def etcd():
    with EtcdServer() as server:
        yield server


@pytest.fixture(scope="module")
def dbs(etcd):
    """srmig's VmDb as host S, host D, ingress C, and root (the operator), each its own etcd user."""
    kvs = {"S": statedb.open_db("etcd", **etcd.client("S", ("host",))),
           "D": statedb.open_db("etcd", **etcd.client("D", ("host",))),
           "C": statedb.open_db("etcd", **etcd.client("C", ("ingress",))),
           "root": statedb.open_db("etcd", **etcd.client("root"))}
    try:
        yield {who: VmDb(kv) for who, kv in kvs.items()}
    finally:
        for kv in kvs.values():
            kv.close()


@dataclass
class Write:
    name: str
    who: str                        # S, D (hosts), C (the ingress), root
    do: Callable[[VmDb], object]
    allowed: bool


WRITES = [
    # a host: its own records, and the segment lists (which host may move a VM is the migration's call)
    Write("S its host record", "S", lambda db: db.put_host(S_SIDS, "2001:db8::1", ()), True),
    Write("S D's host record", "S", lambda db: db.put_host(D_SIDS, "2001:db8::2", ()), False),
    Write("S its presence", "S", lambda db: db.put_agent("S", {"name": "S"}), True),
    Write("S D's presence", "S", lambda db: db.put_agent("D", {"name": "D"}), False),
    Write("S its migration record", "S", lambda db: db.put_migration(VM, "S", migration("S", "D")), True),
    Write("S D's migration record", "S", lambda db: db.put_migration(VM, "D", migration("S", "D")), False),
    Write("D its migration record", "D", lambda db: db.put_migration(VM, "D", migration("S", "D")), True),
    Write("D S's migration record", "D", lambda db: db.put_migration(VM, "S", migration("S", "D")), False),
    Write("S a segment list", "S", lambda db: db.publish(VM, "S", ["fc00:0:1::d6"], "steady"), True),
    Write("S an ingress's ack", "S", lambda db: db.ack(VM, "C", 1), False),
    Write("S an ingress's registration", "S", lambda db: db.kv.put("ingresses/S", {"name": "S"}), False),
    # the ingress: its acks and its own registration, no segment list, no host's record
    Write("C a segment list", "C", lambda db: db.publish(VM, "C", ["fc00:0:9::d6"], "steady"), False),
    Write("C deletes a segment list", "C", lambda db: db.kv.delete(f"vms/{VM}"), False),
    Write("C its ack", "C", lambda db: db.ack(VM, "C", 1), True),
    Write("C its registration", "C", lambda db: db.kv.put("ingresses/C", {"name": "C"}), True),
    Write("C another ingress's registration", "C", lambda db: db.kv.put("ingresses/E", {"name": "E"}), False),
    Write("C its presence", "C", lambda db: db.put_agent("C", {"name": "C"}), True),
    Write("C a migration record", "C", lambda db: db.put_migration(VM, "S", migration("S", "D")), False),
    Write("C a host record", "C", lambda db: db.put_host(S_SIDS, "2001:db8::1", ()), False),
    # outside every prefix srmig uses
    Write("S a key outside srmig's", "S", lambda db: db.kv.put("x", {}), False),
    Write("root anything", "root", lambda db: db.put_migration(VM, "D", migration("S", "D")), True),
]


@pytest.mark.parametrize("w", WRITES, ids=[w.name for w in WRITES])
def test_who_writes_what(dbs, w, caplog):
    db = dbs[w.who]
    before = db.kv.denied
    caplog.set_level(logging.ERROR, "srmig.ctl.statedb")
    if w.allowed:
        w.do(db)
        assert db.kv.denied == before
        return
    with pytest.raises(PermissionDenied, match="permission denied"):
        w.do(db)
    assert db.kv.denied == before + 1
    lines = [r.getMessage() for r in caplog.records if "permission denied" in r.getMessage()]
    assert len(lines) == 1 and "\n" not in lines[0] and f"to user '{w.who}'" in lines[0], lines


def test_refused_write_changes_nothing(dbs):
    """What S was refused is not in the database: D's records hold what D wrote."""
    dbs["D"].put_migration(VM, "D", migration("S", "D"))
    with pytest.raises(PermissionDenied):
        dbs["S"].put_migration(VM, "D", migration("S", "D") | {"events": ["begin", "failed"]})
    assert dbs["root"].migration(VM, "D")["events"] == ["begin"]


READS = [
    ("S", "vms/", True), ("S", "migrations/", True), ("S", "hosts/", True), ("S", "acks/", True),
    ("S", "ingresses/", True), ("S", "agents/", False),
    ("C", "vms/", True), ("C", "hosts/", True), ("C", "acks/", True), ("C", "migrations/", False),
    ("C", "agents/", False),
]


@pytest.mark.parametrize("who, prefix, allowed", READS, ids=[f"{w} {p}" for w, p, _ in READS])
def test_who_reads_what(dbs, who, prefix, allowed):
    kv = dbs[who].kv
    if allowed:
        kv.range(prefix)
    else:
        with pytest.raises(PermissionDenied):
            kv.range(prefix)


def test_a_watch_outside_the_roles_is_refused_and_counted(dbs):
    """The ingress may not follow the migration records: etcd cancels its watch, the refusal is counted (the
    watch keeps retrying, with its backoff, in case the roles change)."""
    kv = dbs["C"].kv
    before = kv.denied
    w = kv.watch("migrations/", lambda events: None, start_revision=1)
    try:
        deadline = time.monotonic() + 10
        while kv.denied == before and time.monotonic() < deadline:
            time.sleep(0.02)
        assert kv.denied > before and kv.last_denied.startswith("etcd refused watch migrations/ to user 'C'")
    finally:
        w.cancel()


def test_the_host_sees_the_other_ends_record_through_its_watch(dbs):
    """What a host needs still works under its roles: D's migration record reaches S's watch."""
    got, seen = [], threading.Event()

    def on(events):
        got.extend(events)
        seen.set()

    w = dbs["S"].kv.watch("migrations/", on)
    try:
        dbs["D"].put_migration(VM, "D", migration("S", "D") | {"events": ["begin", "resumed"]})
        assert seen.wait(10)
        assert [records.migration_record(e.key, e.value)[:2] for e in got] == [(VM, "D")]
    finally:
        w.cancel()


def test_token_renewed_after_etcd_forgets_it(tmp_path):
    """etcd keeps tokens in memory: after its restart a client logs in again and the write goes through, and
    its watch resumes; after its roles change (an older token is refused) too."""
    with EtcdServer() as etcd, statedb.open_db("etcd", **etcd.client("S", ("host",))) as kv, \
            statedb.open_db("etcd", **etcd.client("D", ("host",))) as peer:
        db = VmDb(kv)
        db.put_host(S_SIDS, "2001:db8::1", ())
        first = kv.token
        got, seen = [], threading.Event()
        w = kv.watch("migrations/", lambda events: (got.extend(events), seen.set()))
        etcd.stop()
        etcd.start()
        db.put_host(S_SIDS, "2001:db8::1", ("fc00:0:9::1",))
        assert kv.token != first
        # the watch, its stream cut by the restart, comes back with a new token too
        VmDb(peer).put_migration(VM, "D", migration("S", "D"))
        assert seen.wait(10), "the watch did not resume"
        assert [e.key for e in got] == [records.migration_key(VM, "D")]
        w.cancel()
        second = kv.token
        etcd.auth("S", ("ingress",))       # a role more: etcd's auth revision moves on
        db.put_host(S_SIDS, "2001:db8::1", ())
        assert db.host("S")[1]["transit"] == []
        assert kv.token != second


def test_bad_password_is_refused_in_one_line(etcd):
    etcd.auth("S", ("host",))
    with pytest.raises(AuthFailed) as e:
        statedb.open_db("etcd", endpoints=etcd.endpoints, tls=etcd.tls("S"), auth=statedb.Auth("S", "wrong"))
    assert str(e.value) == ("etcd refused the login of user 'S': wrong password or no such user (db.user, "
                            "db.password_file)")
    with pytest.raises(AuthFailed):
        statedb.open_db("etcd", endpoints=etcd.endpoints, tls=etcd.tls("S"), auth=statedb.Auth("nobody", "x"))


# --- srmig agent --check --------------------------------------------------------------------------------------

def _check(etcd, tmp_path, password_file: str, user: str = "hv1") -> subprocess.CompletedProcess:
    tls = etcd.tls(user)
    cfg = tmp_path / "agent.toml"
    cfg.write_text(f"[ingress]\nname = '{user}'\ninterface = 'lo'\ngateway = '::1'\n[db]\nbackend = 'etcd'\n"
                   f"endpoints = {etcd.endpoints!r}\nca_file = '{tls.ca_file}'\ncert_file = '{tls.cert_file}'\n"
                   f"key_file = '{tls.key_file}'\nuser = '{user}'\npassword_file = '{password_file}'\n")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (os.getcwd(), os.environ.get("PYTHONPATH")) if p))
    return subprocess.run([sys.executable, "-m", "srmig", "agent", "--config", str(cfg), "--check"],
                          capture_output=True, text=True, timeout=60, env=env)


def _file(path, text: str, mode: int, uid: int = 0) -> str:
    path.write_text(text)
    os.chmod(path, mode)
    os.chown(path, uid, -1)
    return str(path)


CHECKS = [
    ("good", lambda e, t: e.password_file("hv1", ("ingress",)), None),
    ("missing", lambda e, t: str(t / "nope"),
     r"db\.password_file: .*cannot read .*/nope \(No such file or directory\)"),
    ("readable by others", lambda e, t: _file(t / "pw", e.auth("hv1", ("ingress",)).password, 0o644),
     r"db\.password_file: .*/pw is mode 0644, readable by others \(chmod 600 .*/pw\)"),
    ("not root's", lambda e, t: _file(t / "pw", e.auth("hv1", ("ingress",)).password, 0o600, uid=65534),
     r"db\.password_file: .*/pw is owned by uid 65534, not root"),
    ("empty", lambda e, t: _file(t / "pw", "\n", 0o600), r"db\.password_file: .*/pw is empty"),
    ("wrong password", lambda e, t: _file(t / "pw", "wrong\n", 0o600),
     r"db\.user: etcd refused the login of user 'hv1': wrong password or no such user"),
]


@pytest.mark.parametrize("name, password_file, says", CHECKS, ids=[c[0] for c in CHECKS])
def test_agent_check(etcd, tmp_path, name, password_file, says):
    r = _check(etcd, tmp_path, password_file(etcd, tmp_path))
    if says is None:
        assert r.returncode == 0 and r.stdout.strip().endswith(": ok (ingress)"), r.stdout + r.stderr
        return
    assert r.returncode == 1, r.stdout + r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("srmig: error: ") and re.search(says, lines[0]), r.stderr


# --- a real agent ---------------------------------------------------------------------------------------------

@pytest.mark.bpf
@pytest.mark.netns
def test_agent_refused_write_and_bad_password(tmp_path):
    """An ingress agent named ing2 that logs in as etcd user ing1 (a misconfiguration): its presence and
    registration (agents/ing2, ingresses/ing2) are outside ing1's roles. etcd refuses them, the agent logs
    each refusal in one line, counts it (srmig_db_denied_total), `srmig status` shows it, and it keeps
    running. With a wrong password it keeps running and says in one line that etcd refused the login."""
    import urllib.request

    from srmig.testbed.netns import Topology
    from test_etcd_tls import _db_status, _ingress_agent  # tests/ is on sys.path (rootdir conftest)

    with Topology() as topo:
        topo.add_host("I")
        with EtcdServer(netns=topo.ns("I")) as etcd:
            tls = etcd.tls("ing1")
            section = (f"backend = 'etcd'\nendpoints = {etcd.endpoints!r}\nca_file = '{tls.ca_file}'\n"
                       f"cert_file = '{tls.cert_file}'\nkey_file = '{tls.key_file}'\nuser = 'ing1'\n"
                       "password_file = '{pw}'\n")
            good = etcd.password_file("ing1", ("ingress",))
            with _ingress_agent(topo, tmp_path, "ing2", section.format(pw=good), metrics="127.0.0.1:19477") \
                    as (p, sock):
                db = _db_status(sock, lambda db: db.get("denied"))
                assert db.get("state") == "connected" and db.get("denied", 0) >= 1, db
                assert db["last_denied"] == "etcd refused kv/put agents/ing2 to user 'ing1': permission denied", db
                assert p.poll() is None
                status = subprocess.run([sys.executable, "-m", "srmig", "status", "--socket", sock],
                                        capture_output=True, text=True, timeout=30, check=True).stdout
                assert f"state db: {db['denied']} requests refused by etcd as outside this agent's roles (last: " \
                       "etcd refused kv/put agents/ing2 to user 'ing1': permission denied)" in status, status
                with topo.inside("I"):
                    metrics = urllib.request.urlopen("http://127.0.0.1:19477/metrics", timeout=10).read().decode()
                assert re.search(r"^srmig_db_denied_total [1-9]", metrics, re.M), metrics
            out = p.stdout.read()
            refused = [line for line in out.splitlines() if "permission denied" in line]
            assert refused and all(line.count("etcd refused") == 1 for line in refused), out
            assert len(refused) == len([line for line in out.splitlines() if "ERROR" in line and "state db" in line])

            # the log says it once per attempt, in one line
            wrong = tmp_path / "wrong"
            wrong.write_text("not-the-password\n")
            wrong.chmod(0o600)
            with _ingress_agent(topo, tmp_path, "ing1", section.format(pw=wrong)) as (p, sock):
                db = _db_status(sock, lambda db: db.get("state") == "refused")
                assert p.poll() is None, "refused is retried, not a crash loop"
                assert db.get("state") == "refused" and "\n" not in db["error"], db
                assert db["error"] == ("etcd refused the login of user 'ing1': wrong password or no such user "
                                       "(db.user, db.password_file)"), db


# --- the etcdctl commands for operators -----------------------------------------------------------------------

def test_db_roles_commands_make_the_same_roles(tmp_path):
    """`srmig db-roles` prints etcdctl commands; run (passwords given inline) on an etcd whose authentication
    is off, they give host S the same rights as init_auth: its records yes, D's no."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (os.getcwd(), os.environ.get("PYTHONPATH")) if p))
    out = subprocess.run([sys.executable, "-m", "srmig", "db-roles", "--host", "S", "--host", "D", "--ingress", "C"],
                         capture_output=True, text=True, timeout=60, env=env, check=True).stdout.splitlines()
    assert out[-1] == "etcdctl auth enable"
    with EtcdServer(auth=False) as etcd:
        tls = etcd.tls("operator")
        base = ["--endpoints", etcd.endpoints[0], "--cacert", tls.ca_file, "--cert", tls.cert_file,
                "--key", tls.key_file]
        for line in out:
            args = line.split()[1:]
            if args[:2] == ["user", "add"]:
                args[2] += ":pw-" + args[2]       # etcdctl would ask
            subprocess.run(["etcdctl", *base, *args], check=True, capture_output=True, timeout=30,
                           env={"ETCDCTL_API": "3", "PATH": os.environ["PATH"]})
        with statedb.open_db("etcd", endpoints=etcd.endpoints, tls=etcd.tls("S"), auth=statedb.Auth("S", "pw-S")) \
                as kv:
            VmDb(kv).put_migration(VM, "S", migration("S", "D"))
            with pytest.raises(PermissionDenied):
                VmDb(kv).put_migration(VM, "D", migration("S", "D"))
        with statedb.open_db("etcd", endpoints=etcd.endpoints, tls=etcd.tls("C"), auth=statedb.Auth("C", "pw-C")) \
                as kv:
            VmDb(kv).ack(VM, "C", 1)
            with pytest.raises(PermissionDenied):
                VmDb(kv).publish(VM, "C", ["fc00::1"], "steady")
