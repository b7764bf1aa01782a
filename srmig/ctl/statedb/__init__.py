"""The VM state database: where each VM lives, its migration records, ingress acknowledgements.

This module is the interface callers use (`Kv`, `Lease`, `Watch`, `Entry`, `Event`, the errors) and
`open_db()`, which chooses one of two backends with the same semantics, each a module of its own:
- "embedded" (`sqlite.py`): SQLite in WAL mode in one file, shared by several processes on one machine.
  Every write is a transaction that takes the next store revision and appends its events to a change log.
  One thread per open Kv waits on inotify, reads the change log past the revision its watches have reached
  (one query for all of them) and queues each watch its events; every watch delivers from a thread of its
  own. The write that commits rings a doorbell file (`<db>-notify`) *after* COMMIT: inotify on the WAL
  file itself would fire before the commit is visible to readers, and a reader woken then could miss it
  for good.
- "etcd" (`etcd.py`): etcd's v3 JSON gateway through etcd3gw. Revisions, watches, leases and
  compare-and-swap are etcd's own; a watch is one streaming HTTP request per watch, resumed from the last
  delivered revision after the member goes away. https:// endpoints take `Tls`: the members' certificates
  are verified against its CA, and the client certificate is what etcd's --client-cert-auth asks for.
  `Auth` is the etcd user the agent acts as (etcd's authentication on): what its roles do not permit, etcd
  refuses, and the call raises PermissionDenied.

Keys given to the API are relative ("vms/2001:db8::10"); the store keeps them under `prefix`. Values are
JSON objects. Revisions are store-wide and increase with every change, as in etcd: a put's revision is the
key's new mod_revision, a delete event carries the revision of the delete.
"""

from __future__ import annotations

import importlib
import json
import logging
import threading
from dataclasses import dataclass, field
from typing import Callable

log = logging.getLogger(__name__)

DEFAULT_PATH = "/var/lib/srmig/state.db"
DEFAULT_PREFIX = "/srmig/"
BACKOFF_MIN_S = 0.05            # first reconnect delay of a watch that lost its backend, doubled up to...
BACKOFF_MAX_S = 2.0
CANCEL_GRACE_S = 1.0            # Watch.cancel() waits at most timeout_s + this for the thread


@dataclass(frozen=True)
class Tls:
    """Mutual TLS to etcd: the CA the members' certificates are verified against, and this client's
    certificate and key (PEM files). Without a client certificate a member started with --client-cert-auth
    refuses the connection."""
    ca_file: str
    cert_file: str | None = None
    key_file: str | None = None


@dataclass(frozen=True)
class Auth:
    """An etcd user and its password (etcd's authentication and roles: srmig.ctl.statedb.etcd_auth). etcd 3.4's
    JSON gateway takes no user from a client certificate, so a user logs in with its password and sends the
    token etcd returns with every request."""
    user: str
    password: str = field(repr=False)


@dataclass(frozen=True)
class Entry:
    key: str
    value: dict
    mod_revision: int


@dataclass(frozen=True)
class Event:
    kind: str                   # "put" | "delete"
    key: str
    value: dict | None          # None for "delete"
    mod_revision: int


class DbUnavailable(RuntimeError):
    """The backend cannot be reached or opened; the message names the endpoint or path and why."""


class AuthFailed(DbUnavailable):
    """etcd refused the user's login (unknown user or wrong password): no retry helps until the
    configuration changes."""


class PermissionDenied(RuntimeError):
    """etcd refused a request that the user's roles do not permit (a key outside them)."""


class LeaseExpired(RuntimeError):
    """A put named a lease that has expired or was revoked (its keys are already gone)."""


WatchCallback = Callable[[list[Event]], None]


class _Compacted(Exception):
    """History a watch still needs is gone, up to `revision`."""

    def __init__(self, revision: int):
        super().__init__(revision)
        self.revision = revision


class Lease:
    """Keys put with a lease are deleted (with delete events) once it expires or is revoked."""

    def __init__(self, id: int, ttl_s: float):
        self.id = id
        self.ttl_s = ttl_s      # as granted: etcd rounds up to whole seconds, with a floor of its own

    def refresh(self) -> bool:
        """Restart the TTL; False if the lease had already expired (its keys are gone)."""
        raise NotImplementedError

    def revoke(self) -> None:
        """Delete the lease and its keys now; revoking a lease that is gone is not an error."""
        raise NotImplementedError


class Watch:
    """Delivery of the changes under one prefix to a callback, from a thread of its own.

    The callback gets lists of events in revision order, each revision exactly once. An exception in the
    callback is logged and the events count as delivered (re-delivering would only raise again).
    """

    def __init__(self, prefix: str, callback: WatchCallback, last_revision: int, timeout_s: float):
        self.prefix = prefix
        self.last_revision = last_revision      # the last revision delivered (or skipped as "before start")
        self._callback = callback
        self._timeout_s = timeout_s
        self._cancelled = threading.Event()
        self._live: set[str] = set()            # keys seen put and not deleted: for resync after compaction
        self._thread = threading.Thread(target=self._run, name=f"statedb-watch {prefix}", daemon=True)

    @property
    def running(self) -> bool:
        return self._thread.is_alive()

    def cancel(self) -> None:
        """Stop delivery; returns once the thread has stopped, or after timeout_s + 1 s at most."""
        if self._cancelled.is_set():
            return
        self._cancelled.set()
        self._interrupt()
        if threading.current_thread() is not self._thread and self._thread.ident is not None:
            self._thread.join(self._timeout_s + CANCEL_GRACE_S)

    def _start(self) -> Watch:
        self._thread.start()
        return self

    def _interrupt(self) -> None:
        raise NotImplementedError

    def _run(self) -> None:
        raise NotImplementedError

    def _deliver(self, events: list[Event]) -> None:
        events = [e for e in events if e.mod_revision > self.last_revision]
        if not events or self._cancelled.is_set():
            return
        for e in events:
            (self._live.add if e.kind == "put" else self._live.discard)(e.key)
        try:
            self._callback(events)
        except Exception:
            log.exception("state db watch %r: callback failed on revisions %d..%d", self.prefix,
                          events[0].mod_revision, events[-1].mod_revision)
        self.last_revision = events[-1].mod_revision

    def _resync(self, kv: Kv, compacted: int) -> None:
        """History up to `compacted` is gone: converge on the current state instead of replaying it.

        Puts for every key changed since the last delivered revision, deletes for keys this watch saw alive
        that are gone. Deletes of keys this watch never saw (alive before its start revision, untouched
        since) cannot be reconstructed; the error log says so.
        """
        log.error("state db watch %r: history compacted up to revision %d, past the last delivered %d; "
                  "resynchronising from a snapshot (deletes of keys this watch never saw are lost)",
                  self.prefix, compacted, self.last_revision)
        entries, rev = kv.range(self.prefix)
        events = [Event("put", e.key, e.value, e.mod_revision)
                  for e in sorted(entries, key=lambda e: e.mod_revision) if e.mod_revision > self.last_revision]
        present = {e.key for e in entries}
        events += [Event("delete", k, None, rev) for k in sorted(self._live - present)]
        self._deliver(events)
        self.last_revision = max(self.last_revision, rev)


class Kv:
    """The state database. Thread-safe; watches call back from their own threads."""

    # Requests the database refused as outside the user's roles (etcd with authentication: each logged in one
    # line when refused), and the last one's message. The embedded backend has no users: always 0.
    denied = 0
    last_denied: str | None = None

    def get(self, key: str) -> Entry | None:
        raise NotImplementedError

    def range(self, prefix: str) -> tuple[list[Entry], int]:
        """Entries under `prefix`, sorted by key, and the store revision of that snapshot."""
        raise NotImplementedError

    def put(self, key: str, value: dict, lease: Lease | None = None) -> int:
        """Store `value`; returns the new store revision (the key's mod_revision)."""
        raise NotImplementedError

    def put_if(self, key: str, value: dict, mod_revision: int, lease: Lease | None = None) -> bool:
        """Compare-and-swap: put only if the key's mod_revision is `mod_revision` (0: key must not exist)."""
        raise NotImplementedError

    def delete(self, key: str) -> bool:
        """True if the key existed (and a delete event was emitted)."""
        raise NotImplementedError

    def lease(self, ttl_s: float) -> Lease:
        raise NotImplementedError

    def watch(self, prefix: str, callback: WatchCallback, start_revision: int | None = None) -> Watch:
        """Call `callback(events)` for every change under `prefix` with revision >= start_revision (None:
        changes after this call). Events before the call are replayed first, from history."""
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError

    def _close_watches(self) -> bool:
        """Mark closed and cancel every watch; False when it was closed already. Subclasses have _lock,
        _closed and _watches."""
        with self._lock:
            if self._closed:
                return False
            self._closed = True
            watches, self._watches = list(self._watches), set()
        for w in watches:
            w.cancel()
        return True

    def __enter__(self) -> Kv:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def open_db(backend: str, *, path: str | None = None, endpoints: list[str] | None = None,
            prefix: str = DEFAULT_PREFIX, timeout_s: float = 2.0, tls: Tls | None = None,
            auth: Auth | None = None) -> Kv:
    """Open the state database: "embedded" (SQLite file `path`, default /var/lib/srmig/state.db, made mode
    0600) or "etcd" (`endpoints`, e.g. ["https://127.0.0.1:2379"], with `tls` for https://, `auth` to log in
    as an etcd user). Raises DbUnavailable if it cannot be reached, AuthFailed if etcd refuses the login."""
    # each backend is imported when chosen: it imports this module
    if backend == "embedded":
        from srmig.ctl.statedb.sqlite import SqliteKv  # noqa: PLC0415
        return SqliteKv(path or DEFAULT_PATH, prefix, timeout_s)
    if backend == "etcd":
        if not endpoints:
            raise ValueError("the etcd state db needs endpoints, e.g. ['https://127.0.0.1:2379']")
        from srmig.ctl.statedb.etcd import EtcdKv  # noqa: PLC0415
        return EtcdKv(endpoints, prefix, timeout_s, tls, auth)
    raise ValueError(f"unknown state db backend {backend!r}: expected 'embedded' or 'etcd'")


def _encode_value(value: dict) -> str:
    if not isinstance(value, dict):
        raise TypeError(f"state db values are JSON objects (dict), got {type(value).__name__}")
    return json.dumps(value, sort_keys=True, separators=(",", ":"))


def _check_key(key: str) -> None:
    if not isinstance(key, str) or not key:
        raise ValueError(f"state db keys are non-empty strings, got {key!r}")


# The backends' classes stay importable from here (`from srmig.ctl.statedb import SqliteKv`), loaded on
# first use: importing them now would be a cycle, as each backend imports this module.
_BACKEND_NAMES = {"SqliteKv": "sqlite", "_SqliteLease": "sqlite", "EtcdKv": "etcd"}


def __getattr__(name: str):
    module = _BACKEND_NAMES.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{module}"), name)
