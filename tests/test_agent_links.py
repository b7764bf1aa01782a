"""The agent's links to its database and to libvirt: when the other end is unreachable, or has lost the
agent's lease, the agent keeps running, retries and reports it (an ingress agent process in a namespace;
libvirt's link alone)."""

from __future__ import annotations

import contextlib
import subprocess
import sys

import pytest


@contextlib.contextmanager
def _ingress_agent(tmp_path, db_section: str):
    """An ingress agent (`srmig agent` process) on lo of a namespace of its own, with this [db] section, its
    socket in tmp_path. Its H.Encaps program lives in that namespace; its pins are removed at the end."""
    import shutil

    from srmig.bpf import loader
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
    from srmig.testbed.pki import Pki

    pki = Pki(tmp_path / "pki")
    me = pki.client("ing1")
    db = (f"backend = 'etcd'\nendpoints = ['https://127.0.0.1:{port}']\nca_file = '{pki.ca_file}'\n"
          f"cert_file = '{me.cert}'\nkey_file = '{me.key}'")
    with _ingress_agent(tmp_path, db) as p:
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
