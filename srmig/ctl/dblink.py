"""The agent's link to the state database: connect (retried with backoff), write in order off the worker's
path (a failed write is retried and the ones behind it wait), and keep the lease that the agent's presence
records live by (registered again if it expired while the database was out of reach)."""

from __future__ import annotations

import logging
import os
import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from pathlib import Path

from srmig.ctl.config import Config, read_password
from srmig.ctl.statedb import AuthFailed, PermissionDenied
from srmig.ctl.vmdb import VmDb
from srmig.ctl.work import DbUp

log = logging.getLogger("srmig.agent")
LEASE_TTL_S = 10.0
DB_RETRY_MAX_S = 1.0  # failed writes retried at least this often: a cut-over lands <= 1 s after the database returns


def open_etcd(d, timeout_s: float = 2.0):
    """The etcd state database as `d` (a DbConfig) says: TLS, and its user logged in, the password read from
    its file now (a changed password is taken at the next connect)."""
    from srmig.ctl import statedb  # noqa: PLC0415

    tls = statedb.Tls(d.ca_file, d.cert_file, d.key_file) if d.endpoints[0].startswith("https://") else None
    auth = statedb.Auth(d.user, read_password(d.password_file)) if d.user else None
    return statedb.open_db("etcd", endpoints=list(d.endpoints), prefix=d.prefix, tls=tls, auth=auth,
                           timeout_s=timeout_s)


class DbLink:
    def __init__(self, cfg: Config, enqueue: Callable, stopping: threading.Event, kv_factory=None):
        self.cfg = cfg
        self.enqueue = enqueue
        self.stopping = stopping
        self._kv_factory = kv_factory or self._open_kv
        self.kv = None
        self.db: VmDb | None = None
        self.lease = None
        self.on_lease: Callable[[object], None] = lambda lease: None  # a new lease (first or after expiry)
        self.state = {"state": "connecting", "error": None}
        self.write_error: str | None = None
        self._writes: queue.Queue = queue.Queue()

    def _open_kv(self):
        from srmig.ctl import statedb  # noqa: PLC0415

        d = self.cfg.db
        if d.backend == "embedded":
            Path(d.path).parent.mkdir(mode=0o700, parents=True, exist_ok=True)  # root only, as the file
            return statedb.open_db("embedded", path=d.path, prefix=d.prefix)
        return open_etcd(d)

    def start(self) -> None:
        """Connect in the background; the worker gets DbUp once the database answers."""
        threading.Thread(target=self._connect, name="db-connect", daemon=True).start()

    def _connect(self) -> None:
        delay = 0.2
        while not self.stopping.is_set():
            try:
                kv = self._kv_factory()
                kv.range("hosts/")  # proves it answers
            except Exception as e:  # noqa: BLE001 - reported in status, retried
                # refused: etcd answers but not to this user and password (retried: the operator may fix it)
                state = "refused" if isinstance(e, AuthFailed) else "unreachable"
                self.state = {"state": state, "error": str(e), "retry_in_s": round(delay, 1)}
                log.warning("state database %s (%s); retrying in %.1f s", state, e, delay)
                self.stopping.wait(delay)
                delay = min(delay * 2, 10.0)
                continue
            self.enqueue(DbUp(kv))
            return

    def up(self, kv) -> None:
        """On the worker, at DbUp: the writer and the lease start."""
        self.use(kv)
        self.state = {"state": "connected", "error": None, "backend": self.cfg.db.backend}
        self._new_lease()
        threading.Thread(target=self._keepalive, name="lease", daemon=True).start()

    def use(self, kv) -> None:
        """Read and write `kv` (the writer starts), without a lease: `up()` without the presence records."""
        self.kv, self.db = kv, VmDb(kv)
        threading.Thread(target=self._writer, name="db-writer", daemon=True).start()

    def _new_lease(self) -> None:
        """The records that live as long as this agent's lease: agents/<name> (and what `on_lease` adds)."""
        self.lease = self.kv.lease(LEASE_TTL_S)
        roles = [r for r in ("host", "ingress") if getattr(self.cfg, r)]
        self.db.put_agent(self.cfg.name, {"name": self.cfg.name, "roles": roles, "pid": os.getpid(),
                                          "since": time.time()}, lease=self.lease)
        self.on_lease(self.lease)

    def _keepalive(self) -> None:
        while not self.stopping.wait(LEASE_TTL_S / 3):
            try:
                alive = self.lease.refresh()
                if not alive:  # expired (the database was out of reach longer than the TTL): records gone
                    log.warning("lease expired: registering again")
                    self._new_lease()
                    alive = True
            except Exception as e:  # noqa: BLE001
                log.warning("lease refresh failed: %s", e)
                self.state = {"state": "degraded", "error": f"lease refresh: {e}", "backend": self.cfg.db.backend}
                continue
            if alive and self.state.get("state") == "degraded":  # the database is back
                log.info("lease refreshed: state database reachable again")
                self.state = {"state": "connected", "error": None, "backend": self.cfg.db.backend}

    def write(self, fn: Callable) -> Future:
        """Run `fn` on the writer thread, after every write queued before it; the caller goes on at once (a
        map update must never wait for a database round trip)."""
        fut: Future = Future()
        self._writes.put((fn, fut))
        return fut

    def _writer(self) -> None:
        """Writes in order; a write that fails (database down) is retried with backoff, and the ones behind it
        wait: nothing is lost or reordered, and `srmig status` shows the backlog."""
        while True:
            fn, fut = self._writes.get()
            if fn is None:
                return
            delay = 0.1
            while True:
                try:
                    fut.set_result(fn())
                    break
                except PermissionDenied as e:
                    # outside this agent's etcd roles: no retry lands it (logged and counted by the Kv, shown in
                    # `srmig status`); the writes behind it go on
                    fut.set_exception(e)
                    break
                except Exception as e:  # noqa: BLE001 - retried until it lands or the agent stops
                    self.write_error = f"{type(e).__name__}: {e}"
                    log.warning("database write failed (%s); retrying in %.1f s", e, delay)
                    if self.stopping.wait(delay):
                        fut.set_exception(e)
                        return
                    delay = min(delay * 2, DB_RETRY_MAX_S)
            self.write_error = None

    def status(self) -> dict:
        kv = self.kv
        return dict(self.state, pending_writes=self._writes.qsize(), write_error=self.write_error,
                    denied=kv.denied if kv else 0, last_denied=kv.last_denied if kv else None)

    def close(self) -> None:
        self._writes.put((None, None))
        if self.kv:
            try:
                self.kv.close()
            except Exception as e:  # noqa: BLE001 - going anyway
                log.debug("closing the database: %s", e)
