"""Throw-away etcd (Debian's /usr/bin/etcd, 3.4) for tests, benches and demos: a single member
(`EtcdServer`) and a cluster whose members each run in a network namespace of their own (`EtcdCluster`,
with `kill_etcd_leader_at_pause` for the libvirt run).

The single member listens on 127.0.0.1 only, on free ports, with its own temporary data dir. stop() and start() keep the
data dir and the ports, so a test can take the member down and bring it back with its history intact
(watches must then resume where they were). Everything is removed on exit, pass or fail.

It speaks TLS only, and only to clients with a certificate from its CA (--client-cert-auth), as a
deployment's etcd should: the CA and the member's certificate are made at start in the private (0700)
temporary dir, and `tls(name)` makes one client certificate per agent there.

Its authentication is on (`auth=False` turns it off), with srmig's roles (srmig.ctl.statedb.etcd_auth):
`auth()` is the root user's login (the operator's), `auth(name, parts)` makes user `name` with the roles of
those parts ("host", "ingress") once, and `password_file(name, parts)` writes its password for an agent's
`db.password_file`. `client(name, parts)` is what open_db() takes: endpoints, TLS and login.
"""

from __future__ import annotations

import contextlib
import ctypes
import http.client
import json
import os
import secrets
import shutil
import signal
import socket
import ssl
import subprocess
import tempfile
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from srmig.ctl.statedb import DEFAULT_PREFIX, Auth, Tls

ETCD = "/usr/bin/etcd"
START_TIMEOUT_S = 15.0
STOP_TIMEOUT_S = 5.0
# Fast ticks shorten a restart's self-election; for one member there is no peer to disagree with. They
# also lower etcd's minimum lease TTL (1.5 election timeouts, rounded up to whole seconds) from 2 s to 1 s.
HEARTBEAT_MS = 25
ELECTION_MS = 250


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class _Started:
    """`with X() as x`: start() on entry (and cleanup() if starting fails half-way), cleanup() on exit."""

    def __enter__(self):
        try:
            self.start()
        except BaseException:
            self.cleanup()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.cleanup()


class _Users:
    """etcd's authentication with srmig's roles, for a testbed etcd that has `dir`, `endpoints`, `tls()` and
    `_inside()` (the namespace to reach it from)."""

    auth_on = True
    _auth_enabled = False

    def _init_users(self, auth: bool) -> None:
        self.auth_on = auth
        self._passwords: dict[str, str] = {}
        self._granted: set[tuple] = set()      # (name, parts, prefix) made
        self._root_token: str | None = None     # root's token, for what the testbed asks the members itself

    def _admin(self, prefix: str = DEFAULT_PREFIX):
        """An EtcdKv as root (before authentication is on: as nobody), from where the members are reached."""
        from srmig.ctl.statedb.etcd import EtcdKv  # noqa: PLC0415

        root = Auth("root", self._passwords["root"]) if self._auth_enabled else None
        return EtcdKv(self.endpoints[:1], prefix, tls=self.tls("testbed-admin"), auth=root)

    def _enable_auth(self) -> None:
        """After the first start: the root user, srmig's roles as agents are added, authentication on."""
        if not self.auth_on or self._auth_enabled:
            return
        from srmig.ctl.statedb.etcd_auth import init_auth  # noqa: PLC0415

        self._passwords = {"root": secrets.token_urlsafe(16)}
        with self._inside(), self._admin() as kv:
            init_auth(kv, self._passwords["root"], {})
        self._auth_enabled = True

    def auth(self, name: str = "root", parts: tuple[str, ...] = ("host",), prefix: str = DEFAULT_PREFIX) \
            -> Auth | None:
        """User `name`'s login (made once, with the roles of `parts` over the keys under `prefix`); root: the
        operator's. None when the authentication is off."""
        if not self.auth_on:
            return None
        assert self._auth_enabled, "start() first"
        if name != "root" and (name, tuple(parts), prefix) not in self._granted:
            from srmig.ctl.statedb.etcd_auth import add_user  # noqa: PLC0415

            password = self._passwords.get(name) or secrets.token_urlsafe(16)
            with self._inside(), self._admin(prefix) as kv:
                add_user(kv, name, password, tuple(parts))
            self._passwords[name] = password
            self._granted.add((name, tuple(parts), prefix))
        return Auth(name, self._passwords[name])

    def password_file(self, name: str, parts: tuple[str, ...] = ("host",), prefix: str = DEFAULT_PREFIX) -> str:
        """User `name`'s password in a file of its own (0600), for an agent's db.password_file."""
        path = self.dir / f"password-{name}"
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(self.auth(name, parts, prefix).password + "\n")
        return str(path)

    def client(self, name: str = "root", parts: tuple[str, ...] = ("host",), prefix: str = DEFAULT_PREFIX) -> dict:
        """open_db("etcd", **etcd.client(name, parts, prefix)): the endpoints, `name`'s certificate and login,
        and the prefix its roles are for."""
        return {"endpoints": self.endpoints, "tls": self.tls(name), "auth": self.auth(name, parts, prefix),
                "prefix": prefix}


class EtcdServer(_Started, _Users):
    """`with EtcdServer() as etcd: open_db("etcd", **etcd.client("hv1", ("host",)))`."""

    def __init__(self, name: str = "srmig-test", binary: str = ETCD, netns: str | None = None,
                 host: str = "127.0.0.1", auth: bool = True):
        """`netns`/`host`: run inside that network namespace, listening on `host` (e.g. the address of a
        testbed host that the other namespaces route to). `auth`: etcd's authentication on (see _Users)."""
        self._init_users(auth)
        self.name = name
        self.binary = binary
        self.netns = netns
        self.address = host
        self.host = f"[{host}]" if ":" in host else host
        self.dir: Path | None = None
        self.pki = None                 # srmig.testbed.pki.Pki: the clients' CA, made with the data dir
        self.peer_pki = None            # the peers' CA
        self.proc: subprocess.Popen | None = None
        self.client_port = 0
        self.peer_port = 0

    @property
    def endpoints(self) -> list[str]:
        return [f"https://{self.host}:{self.client_port}"]

    def tls(self, name: str = "srmig-test") -> Tls:
        """A client certificate for `name` (made once), signed by this member's CA."""
        assert self.pki is not None, "start() first"
        cert, key = self.pki.dir / f"client-{name}.pem", self.pki.dir / f"client-{name}-key.pem"
        if not (cert.exists() and key.exists()):
            pair = self.pki.client(name)
            cert, key = pair.cert, pair.key
        return Tls(self.pki.ca_file, str(cert), str(key))

    @property
    def log_path(self) -> Path:
        assert self.dir is not None
        return self.dir / "etcd.log"

    def start(self) -> None:
        """Start the member (again: same data dir and ports) and wait until it reports healthy."""
        if self.proc is not None and self.proc.poll() is None:
            return
        if not os.access(self.binary, os.X_OK):
            raise FileNotFoundError(f"{self.binary} not found (Debian etcd-server)")
        if self.dir is None:
            self.dir = Path(tempfile.mkdtemp(prefix="srmig-etcd-"))     # 0700: the keys live here
            self.client_port, self.peer_port = _free_port(), _free_port()
            from srmig.testbed.pki import Pki  # noqa: PLC0415 - needs `cryptography`, only when started

            self.pki = Pki(self.dir / "pki", name=f"{self.name} CA")
            self._member = self.pki.server(self.name, [self.address])
            # Peers trust a CA of their own: an agent's client certificate must not get into raft.
            self.peer_pki = Pki(self.dir / "peer-pki", name=f"{self.name} peer CA")
            self._peer = self.peer_pki.server(self.name, [self.address])
        client = f"https://{self.host}:{self.client_port}"
        peer = f"https://{self.host}:{self.peer_port}"
        member, ca, peer_cert = self._member, self.pki.ca_file, self._peer
        cmd = [
            self.binary, "--name", self.name, "--data-dir", str(self.dir / "data"),
            "--listen-client-urls", client, "--advertise-client-urls", client,
            "--listen-peer-urls", peer, "--initial-advertise-peer-urls", peer,
            "--initial-cluster", f"{self.name}={peer}", "--initial-cluster-state", "new",
            "--heartbeat-interval", str(HEARTBEAT_MS), "--election-timeout", str(ELECTION_MS),
            # clients and peers: TLS, and a certificate from our CA or no connection
            "--cert-file", member.cert, "--key-file", member.key, "--trusted-ca-file", ca, "--client-cert-auth",
            "--peer-cert-file", peer_cert.cert, "--peer-key-file", peer_cert.key,
            "--peer-trusted-ca-file", self.peer_pki.ca_file, "--peer-client-cert-auth",
            "--logger", "zap", "--log-level", "warn",
        ]
        if self.netns:
            cmd = ["ip", "netns", "exec", self.netns, *cmd]
        log = open(self.log_path, "ab")
        try:
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                         start_new_session=True)
        finally:
            log.close()
        self._wait_healthy(client)
        self._enable_auth()

    def _inside(self):
        if not self.netns:
            return contextlib.nullcontext()
        from srmig.testbed.netns import inside  # noqa: PLC0415

        return inside(self.netns)

    def _wait_healthy(self, client: str) -> None:
        deadline = time.monotonic() + START_TIMEOUT_S
        why = "no answer"
        tls = self.tls("health")
        ctx = ssl.create_default_context(cafile=tls.ca_file)
        ctx.load_cert_chain(tls.cert_file, tls.key_file)
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"etcd exited with {self.proc.returncode}: {self._log_tail()}")
            try:
                with contextlib.ExitStack() as stack:
                    if self.netns:
                        from srmig.testbed.netns import inside  # noqa: PLC0415

                        stack.enter_context(inside(self.netns))
                    with urllib.request.urlopen(f"{client}/health", timeout=1, context=ctx) as r:
                        body = json.loads(r.read())
                if body.get("health") == "true":
                    return
                why = f"/health says {body}"
            except (OSError, ValueError) as e:
                why = str(e)
            time.sleep(0.05)
        raise RuntimeError(f"etcd on {client} not healthy after {START_TIMEOUT_S:.0f} s ({why}): "
                           f"{self._log_tail()}")

    def _log_tail(self, n: int = 5) -> str:
        try:
            return " | ".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return "(no log)"

    def stop(self, kill: bool = False) -> None:
        """Take the member down (SIGTERM, or SIGKILL with kill=True); the data dir stays for start()."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL if kill else signal.SIGTERM)
            try:
                self.proc.wait(STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def cleanup(self) -> None:
        try:
            self.stop()
        finally:
            if self.dir is not None:
                shutil.rmtree(self.dir, ignore_errors=True)
                self.dir = None
                self._auth_enabled, self._passwords, self._root_token, self._granted = False, {}, None, set()
                self.pki = self.peer_pki = None


# --- a cluster: one member per network namespace ----------------------------------------------------------

CLIENT_PORT, PEER_PORT = 2379, 2380     # each member has an address of its own: etcd's standard ports
# A cluster's members must not call an election because one of them was starved of CPU for a moment (2 shared
# cores, a TCG guest): etcd's own defaults are 100/1000 ms. These still elect a new leader within ~1 s.
CLUSTER_HEARTBEAT_MS = 50
CLUSTER_ELECTION_MS = 500
CLONE_NEWNET = 0x40000000
_libc = ctypes.CDLL(None, use_errno=True)


def _setns(fd: int) -> None:
    if _libc.setns(fd, CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"setns: {os.strerror(err)}")


@contextlib.contextmanager
def _thread_in(ns: str):
    """This thread alone in namespace `ns` for the body. (srmig.netlink.inside saves and restores the
    process's namespace through one global stack: not for a `during` thread while the main thread uses it.)"""
    own = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
    try:
        target = os.open(f"/run/netns/{ns}", os.O_RDONLY | os.O_CLOEXEC)
        try:
            _setns(target)
        finally:
            os.close(target)
        try:
            yield
        finally:
            _setns(own)
    finally:
        os.close(own)


@dataclass
class Member:
    """One member of an EtcdCluster: its name, namespace, address and process (None while down)."""
    name: str
    ns: str
    address: str
    dir: Path
    proc: subprocess.Popen | None = None
    id: str | None = None               # etcd's member id (decimal, as the JSON gateway writes it)
    server: object = None               # srmig.testbed.pki.Pair: its certificate for clients...
    peer: object = None                 # ... and for its peers

    @property
    def url(self) -> str:
        return f"https://[{self.address}]:{CLIENT_PORT}"

    @property
    def peer_url(self) -> str:
        return f"https://[{self.address}]:{PEER_PORT}"

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log_tail(self, n: int = 5) -> str:
        try:
            return " | ".join((self.dir / "etcd.log").read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return "(no log)"


class EtcdCluster(_Started, _Users):
    """A `size`-member etcd cluster (3 by default), each member in a network namespace of its own, with an
    address of its own, linked to `hub` (a namespace of `topo` that routes, e.g. the testbed's transit T):

        with EtcdCluster(topo, hub="T") as etcd:
            open_db("etcd", **etcd.client("hv1", ("host",)))    # from a namespace that routes ROUTE
                                                                # via the hub
            etcd.kill_leader()      # -> the Member killed; etcd.restart(member) brings it back

    Member i is namespace E<i> at 2001:db8:e<i>::2/64, its link's hub end 2001:db8:e<i>::1 (all members
    within ROUTE). TLS as EtcdServer: clients and peers each with a CA of their own, client certificates
    required. The namespaces join `topo` (removed with it); cleanup() stops the members and removes the
    data, pass or fail. stop()/start() take every member down and back with its data (a whole-cluster
    outage); kill()/restart() one.
    """

    ROUTE = "2001:db8:e0::/44"

    def __init__(self, topo, hub: str, size: int = 3, name: str = "srmig-etcd", binary: str = ETCD,
                 auth: bool = True):
        if not 1 <= size <= 9:
            raise ValueError(f"an EtcdCluster has 1 to 9 members (their addresses are 2001:db8:e1:: to e9::), "
                             f"not {size}")
        self._init_users(auth)
        self.topo = topo
        self.hub = hub
        self.size = size
        self.name = name
        self.binary = binary
        self.dir: Path | None = None
        self.pki = None
        self.peer_pki = None
        self.members: list[Member] = []
        self._ctx: ssl.SSLContext | None = None         # the testbed's client TLS, to ask the members
        self._peer_ctx: ssl.SSLContext | None = None    # and as a peer, to see one serve its peers

    # -- what clients need

    @property
    def endpoints(self) -> list[str]:
        return [m.url for m in self.members]

    def tls(self, name: str = "srmig-test") -> Tls:
        """A client certificate for `name` (made once), signed by the cluster's client CA."""
        assert self.pki is not None, "start() first"
        cert, key = self.pki.dir / f"client-{name}.pem", self.pki.dir / f"client-{name}-key.pem"
        if not (cert.exists() and key.exists()):
            pair = self.pki.client(name)
            cert, key = pair.cert, pair.key
        return Tls(self.pki.ca_file, str(cert), str(key))

    def member(self, name: str) -> Member:
        return next(m for m in self.members if m.name == name)

    # -- life cycle

    def _build(self) -> None:
        if not os.access(self.binary, os.X_OK):
            raise FileNotFoundError(f"{self.binary} not found (Debian etcd-server)")
        # 0700: the keys live here. On tmpfs when there is one: every commit is an fsync on each member, which
        # a busy test machine's disk makes slow (a start took 2.5 s instead of 0.6) and erratic; a SIGKILLed
        # member loses nothing either way.
        shm = "/dev/shm" if os.path.isdir("/dev/shm") else None
        self.dir = Path(tempfile.mkdtemp(prefix="srmig-etcd-cluster-", dir=shm))
        from srmig.testbed.pki import Pki  # noqa: PLC0415 - needs `cryptography`, only when started

        self.pki = Pki(self.dir / "pki", name=f"{self.name} CA")
        self.peer_pki = Pki(self.dir / "peer-pki", name=f"{self.name} peer CA")
        for i in range(1, self.size + 1):
            role = f"E{i}"
            ns = self.topo.add_host(role, forwarding=False, seg6=False)
            hub_addr, addr = f"2001:db8:e{i}::1", f"2001:db8:e{i}::2"
            self.topo.link(self.hub, f"etcd{i}", role, "e0", f"{hub_addr}/64", f"{addr}/64")
            self.topo.route(role, "::/0", gateway=hub_addr)
            m = Member(f"{self.name}-{i}", ns, addr, self.dir / f"m{i}")
            m.dir.mkdir(mode=0o700)
            self.members.append(m)
        for m in self.members:
            m.server = self.pki.server(m.name, [m.address])
            m.peer = self.peer_pki.server(m.name, [m.address])
        tls = self.tls("testbed")
        self._ctx = ssl.create_default_context(cafile=tls.ca_file)
        self._ctx.load_cert_chain(tls.cert_file, tls.key_file)
        peer = self.peer_pki.client("testbed")
        self._peer_ctx = ssl.create_default_context(cafile=self.peer_pki.ca_file)
        self._peer_ctx.load_cert_chain(peer.cert, peer.key)

    def _spawn(self, m: Member) -> None:
        cluster = ",".join(f"{x.name}={x.peer_url}" for x in self.members)
        cmd = [
            "ip", "netns", "exec", m.ns, self.binary, "--name", m.name, "--data-dir", str(m.dir / "data"),
            "--listen-client-urls", m.url, "--advertise-client-urls", m.url,
            "--listen-peer-urls", m.peer_url, "--initial-advertise-peer-urls", m.peer_url,
            # ignored once the data dir exists: a restarted member rejoins with what it has
            "--initial-cluster", cluster, "--initial-cluster-state", "new",
            "--initial-cluster-token", f"{self.name}-{os.getpid()}",
            "--heartbeat-interval", str(CLUSTER_HEARTBEAT_MS), "--election-timeout", str(CLUSTER_ELECTION_MS),
            "--cert-file", m.server.cert, "--key-file", m.server.key, "--trusted-ca-file", self.pki.ca_file,
            "--client-cert-auth",
            "--peer-cert-file", m.peer.cert, "--peer-key-file", m.peer.key,
            "--peer-trusted-ca-file", self.peer_pki.ca_file, "--peer-client-cert-auth",
            "--logger", "zap", "--log-level", "warn",
        ]
        log = open(m.dir / "etcd.log", "ab")
        try:
            m.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                      start_new_session=True)
        finally:
            log.close()

    def start(self) -> None:
        """Start every member that is down (all of them at first: they elect a leader together) and wait
        until each reports healthy (it has a leader, and a read went through raft). A new cluster's leader is
        then its first member, the first endpoint, which every client talks to until it fails: killing the
        leader takes the clients' member away too (the case that makes them fail over)."""
        new = self.dir is None
        if new:
            self._build()
        down = [m for m in self.members if not m.running]
        for m in down:
            self._spawn(m)
            if new:
                # A new member first asks its peers whether it joined already, 1 s at most each; a peer that
                # listens but does not serve yet (itself asking) holds it that long: started one after the
                # other, each asks only peers that serve or refuse (0.5 s for the cluster, where all at once
                # took 0.5 to 2.8 s).
                self._wait_peer_port(m)
        for m in down:
            self._wait_healthy(m)
        if new:
            self.move_leader(self.members[0])
            self._enable_auth()

    def _inside(self):
        # the first member's namespace, on this thread alone (an EtcdKv connects when it sends)
        return _thread_in(self.members[0].ns)

    def _wait_peer_port(self, m: Member) -> None:
        """Until `m` serves its peers (a TLS handshake on its peer port completes), bounded."""
        deadline = time.monotonic() + START_TIMEOUT_S
        why = "no answer"
        while time.monotonic() < deadline:
            if m.proc.poll() is not None:
                raise RuntimeError(f"etcd member {m.name} exited with {m.proc.returncode}: {m.log_tail()}")
            try:
                with _thread_in(m.ns):
                    sock = socket.create_connection((m.address, PEER_PORT), timeout=deadline - time.monotonic())
                with self._peer_ctx.wrap_socket(sock, server_hostname=m.address):
                    return
            except OSError as e:
                why = str(e) or type(e).__name__
            time.sleep(0.02)
        raise RuntimeError(f"etcd member {m.name} does not serve its peers on {m.peer_url} after "
                           f"{START_TIMEOUT_S:.0f} s ({why}): {m.log_tail()}")

    def _wait_healthy(self, m: Member) -> None:
        deadline = time.monotonic() + START_TIMEOUT_S
        why = "no answer"
        while time.monotonic() < deadline:
            if m.proc.poll() is not None:
                raise RuntimeError(f"etcd member {m.name} exited with {m.proc.returncode}: {m.log_tail()}")
            try:
                # etcd accepts connections before it serves them: the TLS handshake waits until it is ready
                # (joined, a leader known), so one patient request answers as soon as it is
                body = self._request(m, "GET", "/health", None, max(0.1, min(5.0, deadline - time.monotonic())))
                if body.get("health") == "true":
                    m.id = self.status(m)["header"]["member_id"]
                    return
                why = f"/health says {body}"
            except (OSError, ValueError, http.client.HTTPException) as e:
                why = str(e) or type(e).__name__
            time.sleep(0.05)
        raise RuntimeError(f"etcd member {m.name} on {m.url} not healthy after {START_TIMEOUT_S:.0f} s ({why}): "
                           f"{m.log_tail()}")

    def kill(self, m: Member, sig: int = signal.SIGKILL) -> None:
        """Take one member down (SIGKILL, or `sig`); its data stays for restart()."""
        if m.proc is not None and m.proc.poll() is None:
            m.proc.send_signal(sig)
        self._reap(m)

    def _reap(self, m: Member) -> None:
        """Wait for a signalled member to exit, STOP_TIMEOUT_S at most, then SIGKILL it."""
        if m.proc is None:
            return
        try:
            m.proc.wait(STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            m.proc.kill()
            m.proc.wait()
        m.proc = None

    def restart(self, m: Member) -> None:
        """Start a member that is down again (same data dir and address) and wait until it is healthy."""
        if m.running:
            return
        self._spawn(m)
        self._wait_healthy(m)

    def stop(self, kill: bool = False) -> None:
        """Every member down (SIGTERM, or SIGKILL with kill=True); the data stays for start()."""
        for m in self.members:
            if m.running:
                m.proc.send_signal(signal.SIGKILL if kill else signal.SIGTERM)
        for m in self.members:
            self._reap(m)

    def cleanup(self) -> None:
        try:
            self.stop()
        finally:
            if self.dir is not None:
                shutil.rmtree(self.dir, ignore_errors=True)
                self.dir = None
                self._auth_enabled, self._passwords, self._root_token, self._granted = False, {}, None, set()
                self.pki = self.peer_pki = None

    # -- asking the members

    def _request(self, m: Member, method: str, path: str, body: dict | None, timeout: float) -> dict:
        """One HTTPS request to member `m`'s client URL, from inside its namespace, on this thread alone; as
        root once etcd's authentication is on (moving the leader needs it), logged in again when etcd forgot
        the token (a member's restart)."""
        admin = self._auth_enabled and path.startswith("/v3/") and path != "/v3/auth/authenticate"
        if admin and self._root_token is None:
            self._root_token = self._request(m, "POST", "/v3/auth/authenticate",
                                             {"name": "root", "password": self._passwords["root"]}, timeout)["token"]
        try:
            return self._request_once(m, method, path, body, timeout, self._root_token if admin else None)
        except ValueError as e:
            if not (admin and "invalid auth token" in str(e)):
                raise
            self._root_token = None
            return self._request(m, method, path, body, timeout)

    def _request_once(self, m: Member, method: str, path: str, body: dict | None, timeout: float,
                      token: str | None) -> dict:
        with _thread_in(m.ns):
            sock = socket.create_connection((m.address, CLIENT_PORT), timeout=timeout)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)    # headers and body: no delayed ACK between
        conn = http.client.HTTPSConnection(m.address, CLIENT_PORT, timeout=timeout, context=self._ctx)
        try:
            conn.sock = self._ctx.wrap_socket(sock, server_hostname=m.address)
        except BaseException:
            sock.close()
            raise
        try:
            conn.request(method, path, body=None if body is None else json.dumps(body),
                         headers={"Content-Type": "application/json", **({"Authorization": token} if token else {})})
            r = conn.getresponse()
            data = r.read()
            if r.status != 200:
                raise ValueError(f"{m.name} {path}: HTTP {r.status}: {data[:200]!r}")
            return json.loads(data)
        finally:
            conn.close()

    def status(self, m: Member, timeout: float = 1.0) -> dict:
        """etcd's maintenance status of member `m` (its JSON gateway's /v3/maintenance/status): header.member_id,
        leader (0 while it has none), raftTerm..."""
        return self._request(m, "POST", "/v3/maintenance/status", {}, timeout)

    def leader(self, timeout: float = 10.0) -> Member:
        """The member the running members name as their leader, once one of them does (bounded)."""
        deadline = time.monotonic() + timeout
        why = "no member running"
        while True:
            for m in (x for x in self.members if x.running):
                try:
                    lead = self.status(m).get("leader", "0")
                except (OSError, ValueError, http.client.HTTPException) as e:
                    why = f"{m.name}: {e or type(e).__name__}"
                    continue
                found = next((x for x in self.members if x.id == lead and x.running), None)
                if found is not None:
                    return found
                why = f"{m.name} names leader {lead}"
            if time.monotonic() > deadline:
                raise TimeoutError(f"etcd cluster: no leader within {timeout} s ({why})")
            time.sleep(0.05)

    def move_leader(self, m: Member, timeout: float = 10.0) -> None:
        """Make `m` the leader (etcd's leadership transfer, asked of the current leader), bounded."""
        deadline = time.monotonic() + timeout
        while (lead := self.leader(timeout)) is not m:
            if time.monotonic() > deadline:
                raise TimeoutError(f"etcd cluster: {m.name} not the leader within {timeout} s ({lead.name} is)")
            with contextlib.suppress(ValueError):   # "not leader": it changed meanwhile; ask again
                self._request(lead, "POST", "/v3/maintenance/transfer-leadership", {"targetID": m.id}, timeout)

    def kill_leader(self) -> Member:
        """SIGKILL the current leader; returns it (restart(member) brings it back)."""
        m = self.leader()
        self.kill(m)
        return m


def kill_etcd_leader_at_pause(tb, ds, agents, dom, timeout: float = 30, down_s: float = 2.0) -> None:
    """`during` for srmig.testbed.libvirt_demo.run (db="etcd", tb.etcd an EtcdCluster): SIGKILL the etcd
    cluster's leader as soon as the source is paused, start it again `down_s` later. tb.etcd_fault says
    which member and when (monotonic, the probe's clock): killed, restarted (healthy again), and the source
    domain's libvirt state at the kill."""
    from srmig.testbed.faults import _source_state, wait_paused  # noqa: PLC0415 - the libvirt run imports this module

    if not wait_paused(dom, timeout):
        return
    state = _source_state(dom)
    t_kill = time.monotonic()
    m = tb.etcd.kill_leader()
    t_killed = time.monotonic()
    time.sleep(down_s)
    tb.etcd.restart(m)
    tb.etcd_fault = {"leader": m.name, "down": t_kill, "killed": t_killed, "up": time.monotonic(),
                     "source_state": state}
