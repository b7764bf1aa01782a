"""A throw-away single-member etcd (Debian's /usr/bin/etcd, 3.4) for tests, benches and demos.

Listens on 127.0.0.1 only, on free ports, with its own temporary data dir. stop() and start() keep the
data dir and the ports, so a test can take the member down and bring it back with its history intact
(watches must then resume where they were). Everything is removed on exit, pass or fail.

It speaks TLS only, and only to clients with a certificate from its CA (--client-cert-auth), as a
deployment's etcd should: the CA and the member's certificate are made at start in the private (0700)
temporary dir, and `tls(name)` makes one client certificate per agent there.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import ssl
import subprocess
import tempfile
import time
import urllib.request
from pathlib import Path

from srmig.ctl.statedb import Tls

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


class EtcdServer:
    """`with EtcdServer() as etcd: open_db("etcd", endpoints=etcd.endpoints, tls=etcd.tls("agent1"))`."""

    def __init__(self, name: str = "srmig-test", binary: str = ETCD, netns: str | None = None,
                 host: str = "127.0.0.1"):
        """`netns`/`host`: run inside that network namespace, listening on `host` (e.g. the address of a
        testbed host that the other namespaces route to)."""
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

    def __enter__(self) -> EtcdServer:
        try:
            self.start()
        except BaseException:
            self.cleanup()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.cleanup()

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
                self.pki = self.peer_pki = None
