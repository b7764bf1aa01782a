"""Mutual TLS to etcd: the testbed's member runs as a deployment's should (https:// only, peers too, and
--client-cert-auth). A client with a certificate from the member's CA works; one without a certificate, or
with one from another CA, is refused, and the error is one line that says so; a client checks the member's
certificate against its own CA. The same for a real `srmig agent` process, which keeps running and shows
the refusal in `srmig status`.
"""

from __future__ import annotations

import contextlib
import re
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import Callable

import pytest

from srmig.ctl import statedb
from srmig.ctl.statedb import DbUnavailable, Tls
from srmig.testbed.etcd import EtcdServer
from srmig.testbed.pki import Pki

pytestmark = pytest.mark.etcd

DEADLINE_S = 30.0


@pytest.fixture(scope="module")
def etcd():
    with EtcdServer() as server:
        yield server


@pytest.fixture(scope="module")
def stranger(tmp_path_factory) -> Pki:
    """Another CA, and a certificate for the member's own address from it."""
    pki = Pki(tmp_path_factory.mktemp("other-ca"), name="another CA")
    pki.server("impostor", ["127.0.0.1"])
    return pki


def test_client_with_a_certificate_from_the_ca_works(etcd):
    """Reads, writes and a watch (its own streaming session) over TLS, as two agents would."""
    got = []
    with statedb.open_db("etcd", **etcd.client("hv1", ("host",), "/tls-ok/")) as a, \
            statedb.open_db("etcd", **etcd.client("edge1", ("ingress",), "/tls-ok/")) as b:
        w = b.watch("vms/", got.extend)
        try:
            rev = a.put("vms/2001:db8::10", {"host": "hv1"})
            assert b.get("vms/2001:db8::10") == statedb.Entry("vms/2001:db8::10", {"host": "hv1"}, rev)
            deadline = time.monotonic() + DEADLINE_S
            while not got and time.monotonic() < deadline:
                time.sleep(0.02)
            assert [(e.kind, e.key, e.mod_revision) for e in got] == [("put", "vms/2001:db8::10", rev)]
        finally:
            w.cancel()


@dataclass
class Refused:
    desc: str
    endpoints: Callable[[EtcdServer], list[str]]
    tls: Callable[[EtcdServer, Pki], Tls | None]
    says: str               # a regex the one-line error must match


REFUSED = [
    Refused("no client certificate", lambda e: e.endpoints, lambda e, o: Tls(e.tls().ca_file),
            r"TLS: etcd refused us: it requires a client certificate \(db\.cert_file, db\.key_file\)$"),
    Refused("client certificate from another CA", lambda e: e.endpoints,
            lambda e, o: Tls(e.tls().ca_file, o.client("hv1").cert, str(o.dir / "client-hv1-key.pem")),
            r"TLS: etcd refused our client certificate: (not signed by a CA in its --trusted-ca-file|it closed the "
            r"handshake \(is the certificate signed by a CA in its --trusted-ca-file\?\))"),
    Refused("the member's certificate is not from our CA", lambda e: e.endpoints,
            lambda e, o: Tls(o.ca_file, e.tls().cert_file, e.tls().key_file),
            r"TLS: etcd's certificate failed verification against db\.ca_file \(certificate verify failed"),
    Refused("plain http:// to the TLS member", lambda e: [e.endpoints[0].replace("https://", "http://")],
            lambda e, o: None, r"closed without an answer \(an etcd with TLS does that to http://: use https://\)"),
]


@pytest.mark.parametrize("case", REFUSED, ids=[c.desc for c in REFUSED])
def test_refused_in_one_line(etcd, stranger, case):
    endpoints = case.endpoints(etcd)
    with pytest.raises(DbUnavailable) as e:
        statedb.open_db("etcd", endpoints=endpoints, tls=case.tls(etcd, stranger), prefix="/tls-refused/")
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith(f"etcd unreachable: {endpoints[0]}: "), msg
    assert re.search(case.says, msg), msg
    # nothing got in: the member is still healthy, and the refused client wrote nothing
    with statedb.open_db("etcd", endpoints=etcd.endpoints, tls=etcd.tls(), auth=etcd.auth(),
                         prefix="/tls-refused/") as kv:
        assert kv.range("")[0] == []


def _peer_get(etcd, cert: str, key: str) -> bytes:
    """The status line of GET /members on the member's peer port, over TLS with this client certificate
    (b"" if the member hangs up)."""
    import socket
    import ssl

    ctx = ssl.create_default_context(cafile=etcd.peer_pki.ca_file)
    ctx.load_cert_chain(cert, key)
    with socket.create_connection(("127.0.0.1", etcd.peer_port), timeout=5) as raw, \
            ctx.wrap_socket(raw, server_hostname="127.0.0.1") as s:
        s.sendall(b"GET /members HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
        out = b""
        while b"\r\n" not in out and (chunk := s.recv(65536)):     # etcd may hold the connection open
            out += chunk
        return out.split(b"\r\n")[0]


def test_peer_port_takes_only_the_peers_ca(etcd):
    """Peers have a CA of their own: an agent's valid client certificate does not get into raft."""
    import ssl

    peer = etcd.peer_pki.client("peer-probe")
    assert _peer_get(etcd, peer.cert, peer.key) == b"HTTP/1.1 200 OK"
    agent = etcd.tls("hv1")
    with pytest.raises((ssl.SSLError, ConnectionError)):
        out = _peer_get(etcd, agent.cert_file, agent.key_file)
        if not out:
            raise ConnectionError("closed by the member")


# --- a real agent -------------------------------------------------------------------------------------------

@contextlib.contextmanager
def _ingress_agent(topo, tmp_path, name: str, db_section: str, metrics: str = ""):
    """An ingress agent (`srmig agent` process) on lo of namespace I, its socket in tmp_path, its metrics on
    `metrics` (HOST:PORT in I; none by default); its H.Encaps program's pins are removed at the end."""
    import shutil

    from srmig.bpf import loader

    with topo.inside("I"):
        pins = loader.encap_pin_dir()
    cfg = tmp_path / f"{name}.toml"
    cfg.write_text(f"[ingress]\nname = '{name}'\ninterface = 'lo'\ngateway = '::1'\n[db]\n{db_section}\n"
                   f"[hook]\nsocket = '{tmp_path / name}.sock'\n[metrics]\nlisten = '{metrics}'\n")
    p = subprocess.Popen([sys.executable, "-m", "srmig", "--netns", topo.ns("I"), "agent", "--config", str(cfg)],
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        yield p, str(tmp_path / f"{name}.sock")
    finally:
        p.terminate()
        try:
            p.wait(10)
        except subprocess.TimeoutExpired:
            # Not what this file tests: the agent's worker waits in queue.get() with no timeout, and a SIGTERM
            # the kernel hands to another thread does not wake it, so the handler waits for the next item.
            p.kill()
            p.wait(10)
        shutil.rmtree(pins, ignore_errors=True)


def _db_status(sock: str, done: Callable[[dict], bool]) -> dict:
    from srmig.ctl.hooksrv import request

    deadline = time.monotonic() + DEADLINE_S
    db = {}
    while time.monotonic() < deadline:
        try:
            db = request(sock, {"op": "status"}, 2)["db"]
        except OSError:
            time.sleep(0.1)
            continue
        if done(db):
            break
        time.sleep(0.1)
    return db


@pytest.mark.bpf
@pytest.mark.netns
def test_agent_with_and_without_a_valid_certificate(tmp_path, stranger):
    """The agent with its certificate from the member's CA connects; one with a certificate from another CA
    keeps running, retries, and status shows the refusal in one line."""
    from srmig.testbed.netns import Topology

    with Topology() as topo:
        topo.add_host("I")
        with EtcdServer(netns=topo.ns("I")) as etcd:
            good = etcd.tls("ing1")
            section = (f"backend = 'etcd'\nendpoints = {etcd.endpoints!r}\nca_file = '{good.ca_file}'\n"
                       f"cert_file = '{{cert}}'\nkey_file = '{{key}}'\nuser = 'ing1'\n"
                       f"password_file = '{etcd.password_file('ing1', ('ingress',))}'\n")
            with _ingress_agent(topo, tmp_path, "ing1", section.format(cert=good.cert_file, key=good.key_file)) \
                    as (p, sock):
                db = _db_status(sock, lambda db: db.get("state") == "connected")
                assert db.get("state") == "connected", db
                assert p.poll() is None
            other = stranger.client("ing2")
            with _ingress_agent(topo, tmp_path, "ing2", section.format(cert=other.cert, key=other.key)) as (p, sock):
                db = _db_status(sock, lambda db: db.get("state") == "unreachable")
                assert p.poll() is None, "refused is retried, not a crash loop"
                assert db.get("state") == "unreachable" and "\n" not in db["error"], db
                assert "TLS: etcd refused our client certificate: " in db["error"], db
