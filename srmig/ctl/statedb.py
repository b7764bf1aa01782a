"""The VM state database: where each VM lives, its migration records, ingress acknowledgements.

One interface (`Kv`), two backends with the same semantics, chosen by `open_db()`:
- "embedded": SQLite in WAL mode in one file, shared by several processes on one machine. Every write is a
  transaction that takes the next store revision and appends its events to a change log. One thread per
  open Kv waits on inotify, reads the change log past the revision its watches have reached (one query for
  all of them) and queues each watch its events; every watch delivers from a thread of its own. The write
  that commits rings a doorbell file (`<db>-notify`) *after* COMMIT: inotify on the WAL file itself would
  fire before the commit is visible to readers, and a reader woken then could miss it for good.
- "etcd": etcd's v3 JSON gateway through etcd3gw. Revisions, watches, leases and compare-and-swap are
  etcd's own; a watch is one streaming HTTP request per watch, resumed from the last delivered revision
  after the member goes away.

Keys given to the API are relative ("vms/2001:db8::10"); the store keeps them under `prefix`. Values are
JSON objects. Revisions are store-wide and increase with every change, as in etcd: a put's revision is the
key's new mod_revision, a delete event carries the revision of the delete.
"""

from __future__ import annotations

import base64
import json
import logging
import math
import os
import queue
import random
import re
import select
import socket
import sqlite3
import struct
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable
from urllib.parse import urlsplit

from cffi import FFI

log = logging.getLogger(__name__)

DEFAULT_PATH = "/var/lib/srmig/state.db"
DEFAULT_PREFIX = "/srmig/"
BACKOFF_MIN_S = 0.05            # first reconnect delay of a watch that lost its backend, doubled up to...
BACKOFF_MAX_S = 2.0
CANCEL_GRACE_S = 1.0            # Watch.cancel() waits at most timeout_s + this for the thread
CHANGELOG_KEEP = 10_000         # embedded: revisions kept in the change log for watches that start late
CHANGELOG_TRIM_EVERY = 1_000


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
            prefix: str = DEFAULT_PREFIX, timeout_s: float = 2.0) -> Kv:
    """Open the state database: "embedded" (SQLite file `path`, default /var/lib/srmig/state.db) or
    "etcd" (`endpoints`, e.g. ["http://127.0.0.1:2379"]). Raises DbUnavailable if it cannot be reached."""
    if backend == "embedded":
        return SqliteKv(path or DEFAULT_PATH, prefix, timeout_s)
    if backend == "etcd":
        if not endpoints:
            raise ValueError("the etcd state db needs endpoints, e.g. ['http://127.0.0.1:2379']")
        return EtcdKv(endpoints, prefix, timeout_s)
    raise ValueError(f"unknown state db backend {backend!r}: expected 'embedded' or 'etcd'")


def _encode_value(value: dict) -> str:
    if not isinstance(value, dict):
        raise TypeError(f"state db values are JSON objects (dict), got {type(value).__name__}")
    return json.dumps(value, sort_keys=True, separators=(",", ":"))


def _check_key(key: str) -> None:
    if not isinstance(key, str) or not key:
        raise ValueError(f"state db keys are non-empty strings, got {key!r}")


# ---------------------------------------------------------------------------------------------------------
# embedded: SQLite + inotify

_ffi = FFI()
_ffi.cdef("""
int inotify_init1(int flags);
int inotify_add_watch(int fd, const char *pathname, uint32_t mask);
""")
_libc = _ffi.dlopen(None)
IN_NONBLOCK = os.O_NONBLOCK
IN_CLOEXEC = os.O_CLOEXEC
IN_MODIFY, IN_ATTRIB, IN_CLOSE_WRITE, IN_MOVED_TO, IN_CREATE = 0x2, 0x4, 0x8, 0x80, 0x100
IN_Q_OVERFLOW = 0x4000
INOTIFY_EVENT = struct.Struct("iIII")        # struct inotify_event: wd, mask, cookie, len; then the name

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (k TEXT PRIMARY KEY, v INTEGER NOT NULL);
INSERT OR IGNORE INTO meta VALUES ('revision', 1), ('compacted', 0);
CREATE TABLE IF NOT EXISTS kv (key TEXT PRIMARY KEY, value TEXT NOT NULL, mod_revision INTEGER NOT NULL,
                               lease INTEGER);
CREATE INDEX IF NOT EXISTS kv_lease ON kv (lease) WHERE lease IS NOT NULL;
CREATE TABLE IF NOT EXISTS changes (seq INTEGER PRIMARY KEY AUTOINCREMENT, revision INTEGER NOT NULL,
                                    kind TEXT NOT NULL, key TEXT NOT NULL, value TEXT);
CREATE INDEX IF NOT EXISTS changes_revision ON changes (revision);
CREATE TABLE IF NOT EXISTS leases (id INTEGER PRIMARY KEY AUTOINCREMENT, ttl REAL NOT NULL,
                                   expires REAL NOT NULL);
"""


def _text_end(prefix: str) -> str | None:
    """The smallest string above every string starting with `prefix` (SQLite compares UTF-8 bytes, which
    orders like code points)."""
    if not prefix:
        return None
    return prefix[:-1] + chr(ord(prefix[-1]) + 1)


class _Txn:
    """One write transaction: at most one new store revision, however many keys it changes."""

    def __init__(self, db: sqlite3.Connection):
        self.db = db
        self.revision = db.execute("SELECT v FROM meta WHERE k = 'revision'").fetchone()[0]
        self.changed = False    # anything other processes' watchers should hear about (lease table too)
        self._bumped = False

    def new_revision(self) -> int:
        if not self._bumped:
            self.revision += 1
            self.db.execute("UPDATE meta SET v = ? WHERE k = 'revision'", (self.revision,))
            self._bumped = self.changed = True
        return self.revision

    def seal(self) -> None:
        """What follows gets a revision of its own (a purge, then the write that triggered it)."""
        self._bumped = False

    def record(self, kind: str, key: str, value: str | None) -> None:
        self.db.execute("INSERT INTO changes (revision, kind, key, value) VALUES (?, ?, ?, ?)",
                        (self.new_revision(), kind, key, value))


class SqliteKv(Kv):
    def __init__(self, path: str, prefix: str = DEFAULT_PREFIX, timeout_s: float = 2.0):
        self.path = Path(path)
        self.prefix = prefix
        self.timeout_s = timeout_s
        if not self.path.parent.is_dir():
            raise DbUnavailable(f"embedded state db {self.path}: directory {self.path.parent} does not exist")
        self._lock = threading.RLock()
        self._conn = self._connect()
        try:
            with self._lock:
                self._conn.execute("BEGIN IMMEDIATE")
                try:
                    # executescript() would commit first; run the statements one by one inside the txn
                    for stmt in filter(str.strip, _SCHEMA.split(";")):
                        self._conn.execute(stmt)
                    self._conn.execute("COMMIT")
                except BaseException:
                    self._conn.execute("ROLLBACK")
                    raise
            self.bell = self.path.with_name(self.path.name + "-notify")
            self._bell_fd = os.open(self.bell, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except (sqlite3.Error, OSError) as e:
            self._conn.close()
            raise DbUnavailable(f"embedded state db {self.path}: {e}") from e
        self._notifier: _Notifier | None = None
        self._watches: set[_SqliteWatch] = set()
        self._closed = False

    def _connect(self) -> sqlite3.Connection:
        try:
            conn = sqlite3.connect(self.path, timeout=self.timeout_s, isolation_level=None,
                                   check_same_thread=False)
            conn.execute("PRAGMA journal_mode = WAL")
            # NORMAL in WAL mode: a crash of any process loses nothing; a power cut may lose the last commits
            conn.execute("PRAGMA synchronous = NORMAL")
            return conn
        except sqlite3.Error as e:
            raise DbUnavailable(f"embedded state db {self.path}: {e}") from e

    def _full(self, key: str) -> str:
        return self.prefix + key

    def _rel(self, key: str) -> str:
        return key[len(self.prefix):]

    # -- transactions

    def _write(self, op: Callable[[_Txn], object]) -> object:
        """Run `op` in a write transaction after purging expired leases; ring the doorbell after COMMIT."""
        with self._lock:
            try:
                self._conn.execute("BEGIN IMMEDIATE")   # one writer at a time across processes
                try:
                    txn = _Txn(self._conn)
                    self._purge(txn, time.time())
                    txn.seal()
                    result = op(txn)
                    if txn.changed and txn.revision % CHANGELOG_TRIM_EVERY == 0:
                        self._trim(txn)
                    self._conn.execute("COMMIT")
                except BaseException:
                    self._conn.execute("ROLLBACK")
                    raise
            except sqlite3.Error as e:
                raise DbUnavailable(f"embedded state db {self.path}: {e}") from e
            if txn.changed:
                self._ring()
            return result

    def _read(self, op: Callable[[sqlite3.Connection], object]) -> object:
        with self._lock:
            try:
                due = self._conn.execute("SELECT min(expires) FROM leases").fetchone()[0]
                if due is not None and due <= time.time():
                    self._write(lambda txn: None)   # expired keys go, with their delete events, before we read
                self._conn.execute("BEGIN")
                try:
                    return op(self._conn)
                finally:
                    self._conn.execute("COMMIT")
            except sqlite3.Error as e:
                raise DbUnavailable(f"embedded state db {self.path}: {e}") from e

    def _ring(self) -> None:
        os.pwrite(self._bell_fd, b"\0", 0)      # IN_MODIFY for every watcher of the directory

    @staticmethod
    def _purge(txn: _Txn, now: float) -> None:
        expired = [r[0] for r in txn.db.execute("SELECT id FROM leases WHERE expires <= ?", (now,))]
        for lease_id in expired:
            SqliteKv._drop_lease(txn, lease_id)

    @staticmethod
    def _drop_lease(txn: _Txn, lease_id: int) -> bool:
        """Delete a lease and its keys, all in the transaction's one revision (as etcd does)."""
        keys = [r[0] for r in txn.db.execute("SELECT key FROM kv WHERE lease = ? ORDER BY key", (lease_id,))]
        for key in keys:
            txn.record("delete", key, None)
        txn.db.execute("DELETE FROM kv WHERE lease = ?", (lease_id,))
        gone = txn.db.execute("DELETE FROM leases WHERE id = ?", (lease_id,)).rowcount > 0
        txn.changed |= gone
        return gone

    @staticmethod
    def _trim(txn: _Txn) -> None:
        horizon = txn.revision - CHANGELOG_KEEP
        if horizon > 0:
            txn.db.execute("DELETE FROM changes WHERE revision <= ?", (horizon,))
            txn.db.execute("UPDATE meta SET v = ? WHERE k = 'compacted'", (horizon,))

    def _lease_alive(self, txn: _Txn, lease: Lease | None) -> int | None:
        if lease is None:
            return None
        if txn.db.execute("SELECT 1 FROM leases WHERE id = ?", (lease.id,)).fetchone() is None:
            raise LeaseExpired(f"lease {lease.id} has expired or was revoked")
        return lease.id

    def _put(self, txn: _Txn, key: str, value: str, lease: Lease | None) -> int:
        lease_id = self._lease_alive(txn, lease)
        full = self._full(key)
        txn.record("put", full, value)
        txn.db.execute("INSERT OR REPLACE INTO kv (key, value, mod_revision, lease) VALUES (?, ?, ?, ?)",
                       (full, value, txn.revision, lease_id))
        return txn.revision

    # -- Kv

    def get(self, key: str) -> Entry | None:
        _check_key(key)
        row = self._read(lambda db: db.execute("SELECT value, mod_revision FROM kv WHERE key = ?",
                                               (self._full(key),)).fetchone())
        return Entry(key, json.loads(row[0]), row[1]) if row else None

    def range(self, prefix: str) -> tuple[list[Entry], int]:
        full = self._full(prefix)
        end = _text_end(full)

        def op(db):
            rows = db.execute("SELECT key, value, mod_revision FROM kv WHERE key >= ? AND (? IS NULL OR key < ?)"
                              " ORDER BY key", (full, end, end)).fetchall()
            return rows, db.execute("SELECT v FROM meta WHERE k = 'revision'").fetchone()[0]

        rows, rev = self._read(op)
        return [Entry(self._rel(k), json.loads(v), r) for k, v, r in rows], rev

    def put(self, key: str, value: dict, lease: Lease | None = None) -> int:
        _check_key(key)
        text = _encode_value(value)
        return self._write(lambda txn: self._put(txn, key, text, lease))

    def put_if(self, key: str, value: dict, mod_revision: int, lease: Lease | None = None) -> bool:
        _check_key(key)
        text = _encode_value(value)

        def op(txn: _Txn) -> bool:
            row = txn.db.execute("SELECT mod_revision FROM kv WHERE key = ?", (self._full(key),)).fetchone()
            if (row[0] if row else 0) != mod_revision:
                return False
            self._put(txn, key, text, lease)
            return True

        return self._write(op)

    def delete(self, key: str) -> bool:
        _check_key(key)

        def op(txn: _Txn) -> bool:
            full = self._full(key)
            if txn.db.execute("DELETE FROM kv WHERE key = ?", (full,)).rowcount == 0:
                return False
            txn.record("delete", full, None)
            return True

        return self._write(op)

    def lease(self, ttl_s: float) -> Lease:
        if ttl_s <= 0:
            raise ValueError(f"lease TTL must be positive, got {ttl_s}")

        def op(txn: _Txn) -> int:
            txn.changed = True  # other processes' notifiers re-arm their expiry timers
            return txn.db.execute("INSERT INTO leases (ttl, expires) VALUES (?, ?)",
                                  (ttl_s, time.time() + ttl_s)).lastrowid

        return _SqliteLease(self, self._write(op), ttl_s)

    def watch(self, prefix: str, callback: WatchCallback, start_revision: int | None = None) -> Watch:
        if self._closed:
            raise RuntimeError("state db is closed")
        if start_revision is None:
            last = self._read(lambda db: db.execute("SELECT v FROM meta WHERE k = 'revision'").fetchone()[0])
        else:
            last = start_revision - 1
        with self._lock:
            if self._notifier is None:
                self._notifier = _Notifier(self)
            w = _SqliteWatch(self, prefix, callback, last)
            self._watches.add(w)
        w._start()
        self._notifier.poke()   # replays history from start_revision (or just sets the watch's place)
        return w

    def close(self) -> None:
        if not self._close_watches():
            return
        if self._notifier is not None:
            self._notifier.stop()
        with self._lock:
            self._conn.close()
            os.close(self._bell_fd)


class _SqliteLease(Lease):
    def __init__(self, kv: SqliteKv, id: int, ttl_s: float):
        super().__init__(id, ttl_s)
        self._kv = kv

    def refresh(self) -> bool:
        # the write purges first, so an expired lease is gone (keys and all) by the time we look
        return self._kv._write(lambda txn: txn.db.execute("UPDATE leases SET expires = ? WHERE id = ?",
                                                          (time.time() + self.ttl_s, self.id)).rowcount > 0)

    def revoke(self) -> None:
        self._kv._write(lambda txn: SqliteKv._drop_lease(txn, self.id))


class _SqliteWatch(Watch):
    """Delivers what the notifier hands it; the notifier reads the change log once for all watches."""

    def __init__(self, kv: SqliteKv, prefix: str, callback: WatchCallback, last: int):
        super().__init__(prefix, callback, last, kv.timeout_s)
        self._kv = kv
        self.full = kv._full(prefix)
        self.end = _text_end(self.full)
        self.fetched = last     # the notifier's progress for this watch; only the notifier thread moves it
        self.queue: queue.SimpleQueue = queue.SimpleQueue()

    def _interrupt(self) -> None:
        self.queue.put(None)
        with self._kv._lock:
            self._kv._watches.discard(self)

    def _run(self) -> None:
        while not self._cancelled.is_set():
            item = self.queue.get()
            if item is None or self._cancelled.is_set():
                break
            if isinstance(item, _Compacted):
                try:
                    self._resync(self._kv, item.revision)
                except DbUnavailable:
                    log.exception("state db watch %r: resync failed", self.prefix)
            else:
                self._deliver(item)


class _Notifier:
    """One thread per SqliteKv: inotify on the database's directory, the lease expiry timer, and the one
    change-log read per wake-up whose events it fans out to this Kv's watches.

    Only the doorbell file counts as a change: our own reads touch no file, and the WAL file changes before
    a commit is visible. Spurious wake-ups cost one revision read.
    """

    def __init__(self, kv: SqliteKv):
        self._kv = kv
        self._fd = _libc.inotify_init1(IN_NONBLOCK | IN_CLOEXEC)
        if self._fd < 0:
            err = _ffi.errno
            raise DbUnavailable(f"embedded state db {kv.path}: inotify_init1: {os.strerror(err)}"
                                + (" (fs.inotify.max_user_instances reached?)" if err == 24 else ""))
        mask = IN_MODIFY | IN_ATTRIB | IN_CLOSE_WRITE | IN_MOVED_TO | IN_CREATE
        if _libc.inotify_add_watch(self._fd, str(kv.path.parent).encode(), mask) < 0:
            err = _ffi.errno
            os.close(self._fd)
            raise DbUnavailable(f"embedded state db {kv.path}: inotify_add_watch({kv.path.parent}): "
                                f"{os.strerror(err)}")
        self._bell = kv.bell.name.encode()
        # b"p": a watch was added (replay its history), b"x": stop
        self._ctl_r, self._ctl_w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
        self._thread = threading.Thread(target=self._run, name=f"statedb-inotify {kv.path}", daemon=True)
        self._thread.start()

    def poke(self) -> None:
        os.write(self._ctl_w, b"p")

    def stop(self) -> None:
        os.write(self._ctl_w, b"x")
        self._thread.join(self._kv.timeout_s + CANCEL_GRACE_S)
        for fd in (self._fd, self._ctl_r, self._ctl_w):
            os.close(fd)

    def _bell_rang(self) -> bool:
        rang = False
        while True:
            try:
                buf = os.read(self._fd, 65536)
            except BlockingIOError:
                return rang
            off = 0
            while off < len(buf):
                _wd, mask, _cookie, n = INOTIFY_EVENT.unpack_from(buf, off)
                name = buf[off + INOTIFY_EVENT.size:off + INOTIFY_EVENT.size + n].rstrip(b"\0")
                off += INOTIFY_EVENT.size + n
                rang |= name == self._bell or bool(mask & IN_Q_OVERFLOW)

    def _run(self) -> None:
        kv = self._kv
        poller = select.poll()
        poller.register(self._fd, select.POLLIN)
        poller.register(self._ctl_r, select.POLLIN)
        try:
            db = kv._connect()
        except DbUnavailable:
            log.exception("state db notifier: cannot open the database")
            return
        try:
            while True:
                try:
                    due = db.execute("SELECT min(expires) FROM leases").fetchone()[0]
                except sqlite3.Error:
                    log.exception("state db notifier: lease query failed")
                    due = time.time() + BACKOFF_MAX_S
                timeout_ms = None if due is None else max(0, math.ceil((due - time.time()) * 1000))
                ready = {fd for fd, _ in poller.poll(timeout_ms)}
                wake = False
                if self._ctl_r in ready:
                    try:
                        if b"x" in os.read(self._ctl_r, 4096):
                            return
                    except BlockingIOError:
                        pass
                    wake = True
                if self._fd in ready:
                    wake |= self._bell_rang()
                if due is not None and due <= time.time():
                    try:
                        kv._write(lambda txn: None)     # purges, rings the bell if a lease went
                    except DbUnavailable:
                        log.exception("state db notifier: lease purge failed; retrying")
                        poller.poll(BACKOFF_MAX_S * 1000)
                if wake:
                    try:
                        self._fan_out(db)
                    except sqlite3.Error:
                        log.exception("state db notifier: change log read failed; retrying")
                        poller.poll(BACKOFF_MAX_S * 1000)
                        os.write(self._ctl_w, b"p")
        finally:
            db.close()

    def _fan_out(self, db: sqlite3.Connection) -> None:
        """Read the change log once, from the least advanced watch on, and queue each watch its part."""
        kv = self._kv
        with kv._lock:
            watches = list(kv._watches)
        if not watches:
            return
        floor = min(w.fetched for w in watches)
        db.execute("BEGIN")
        try:
            rev = db.execute("SELECT v FROM meta WHERE k = 'revision'").fetchone()[0]
            if rev <= floor:
                return
            compacted = db.execute("SELECT v FROM meta WHERE k = 'compacted'").fetchone()[0]
            rows = db.execute("SELECT revision, kind, key, value FROM changes WHERE revision > ? ORDER BY seq",
                              (floor,)).fetchall()
        finally:
            db.execute("COMMIT")
        # decoded once, shared by every watch (events are immutable)
        events = [(key, Event(kind, kv._rel(key), json.loads(value) if value is not None else None, r))
                  for r, kind, key, value in rows]
        for w in watches:
            if w.fetched < compacted:
                w.queue.put(_Compacted(compacted))
            else:
                batch = [e for key, e in events
                         if e.mod_revision > w.fetched and key >= w.full and (w.end is None or key < w.end)]
                if batch:
                    w.queue.put(batch)
            w.fetched = rev


# ---------------------------------------------------------------------------------------------------------
# etcd: v3 JSON gateway (grpc-gateway) through etcd3gw

ETCD_API_PATH = "/v3/"          # etcd 3.4 serves /v3/ and the deprecated /v3beta/; 3.5 drops /v3beta/
# A watch is a long-lived stream with no read timeout; TCP keepalive finds a member that vanished without a
# FIN (host down, partition) in ~11 s, and the watch then reconnects, to another endpoint if there is one.
KEEPALIVE_OPTIONS = [(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1), (socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, 5),
                     (socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, 2), (socket.IPPROTO_TCP, socket.TCP_KEEPCNT, 3)]


def _b64(data: bytes | str) -> str:
    # etcd3gw's own _encode() takes str as latin-1: keys are UTF-8 here
    return base64.b64encode(data.encode() if isinstance(data, str) else data).decode()


def _bytes_end(prefix: bytes) -> bytes:
    """etcd's range_end for "every key starting with prefix": the prefix with its last byte incremented."""
    p = bytearray(prefix)
    while p and p[-1] == 0xFF:
        p.pop()
    if not p:
        return b"\0"            # no upper bound
    p[-1] += 1
    return bytes(p)


def _why(e: Exception) -> str:
    """The useful part of an etcd3gw/requests error: etcd3gw keeps the text in detail_text, str() is empty."""
    text = getattr(e, "detail_text", None) or str(e) or type(e).__name__
    m = re.search(r"\[Errno -?\d+\][^'\")]*", text)
    return m.group(0) if m else text[:300]


class EtcdKv(Kv):
    def __init__(self, endpoints: list[str], prefix: str = DEFAULT_PREFIX, timeout_s: float = 2.0):
        urls = [urlsplit(ep) for ep in endpoints]
        for ep, u in zip(endpoints, urls):
            if u.scheme not in ("http", "https") or not u.hostname:
                raise ValueError(f"etcd endpoint {ep!r}: expected http://HOST:PORT or https://HOST:PORT")
        try:
            import requests
            from etcd3gw.client import Etcd3Client
            from etcd3gw import exceptions as etcd_exc
        except ImportError as e:
            raise DbUnavailable(f"etcd state db: {e} (pip install 'srmig[etcd]')") from e
        self._exc = etcd_exc
        self._requests = requests
        self.prefix = prefix
        self.timeout_s = timeout_s
        self.endpoints = list(endpoints)
        self._clients = []
        for u in urls:
            session = requests.Session()
            session.trust_env = False   # no HTTP proxy between us and etcd
            self._clients.append(Etcd3Client(
                host=u.hostname, port=u.port or 2379, protocol=u.scheme, timeout=timeout_s,
                api_path=ETCD_API_PATH, session=session))
        self._current = 0               # the endpoint that answered last
        self._lock = threading.Lock()
        self._watches: set[_EtcdWatch] = set()
        self._closed = False
        try:
            self._call("maintenance/status", {})
        except BaseException:
            for c in self._clients:
                c.session.close()
            raise

    def _call(self, path: str, payload: dict) -> dict:
        """POST to the current endpoint; on a refused connection (or 503: member without leader) try the
        others once each. A timeout is not retried: the request may have been applied."""
        errors = []
        n = len(self._clients)
        start = self._current
        for i in range(n):
            idx = (start + i) % n
            c = self._clients[idx]
            try:
                result = c.post(c.get_url(path), json=payload)
                self._current = idx
                return result
            except self._exc.ConnectionFailedError as e:
                errors.append(f"{self.endpoints[idx]}: {_why(e)}")
            except self._exc.ConnectionTimeoutError as e:
                raise DbUnavailable(f"etcd {self.endpoints[idx]}: timed out after {self.timeout_s} s "
                                    f"({_why(e)})") from e
            except self._exc.Etcd3Exception as e:
                if "lease not found" in (e.detail_text or ""):
                    raise LeaseExpired(f"etcd {self.endpoints[idx]}: lease has expired or was revoked "
                                       "(requested lease not found)") from e
                raise RuntimeError(f"etcd {self.endpoints[idx]} {path}: {_why(e)}") from e
        raise DbUnavailable("etcd unreachable: " + "; ".join(errors))

    def _full(self, key: str) -> bytes:
        return (self.prefix + key).encode()

    def _decode_kv(self, kv: dict) -> tuple[str, dict | None]:
        key = base64.b64decode(kv["key"]).decode()[len(self.prefix):]
        value = json.loads(base64.b64decode(kv["value"])) if kv.get("value") else None
        return key, value

    # -- Kv

    def get(self, key: str) -> Entry | None:
        _check_key(key)
        kvs = self._call("kv/range", {"key": _b64(self._full(key))}).get("kvs")
        if not kvs:
            return None
        k, v = self._decode_kv(kvs[0])
        return Entry(k, v, int(kvs[0]["mod_revision"]))

    def range(self, prefix: str) -> tuple[list[Entry], int]:
        full = self._full(prefix)
        r = self._call("kv/range", {"key": _b64(full), "range_end": _b64(_bytes_end(full)),
                                    "sort_order": "ASCEND", "sort_target": "KEY"})
        entries = []
        for kv in r.get("kvs", []):
            k, v = self._decode_kv(kv)
            entries.append(Entry(k, v, int(kv["mod_revision"])))
        return entries, int(r["header"]["revision"])

    def _put_request(self, key: str, value: dict, lease: Lease | None) -> dict:
        req = {"key": _b64(self._full(key)), "value": _b64(_encode_value(value))}
        if lease is not None:
            req["lease"] = str(lease.id)
        return req

    def put(self, key: str, value: dict, lease: Lease | None = None) -> int:
        _check_key(key)
        return int(self._call("kv/put", self._put_request(key, value, lease))["header"]["revision"])

    def put_if(self, key: str, value: dict, mod_revision: int, lease: Lease | None = None) -> bool:
        _check_key(key)
        # a missing key compares as mod_revision 0, so one comparison covers create-only too
        txn = {"compare": [{"key": _b64(self._full(key)), "result": "EQUAL", "target": "MOD",
                            "mod_revision": str(mod_revision)}],
               "success": [{"request_put": self._put_request(key, value, lease)}],
               "failure": []}
        return bool(self._call("kv/txn", txn).get("succeeded", False))  # false is omitted from the JSON

    def delete(self, key: str) -> bool:
        _check_key(key)
        return int(self._call("kv/deleterange", {"key": _b64(self._full(key))}).get("deleted", 0)) > 0

    def lease(self, ttl_s: float) -> Lease:
        if ttl_s <= 0:
            raise ValueError(f"lease TTL must be positive, got {ttl_s}")
        r = self._call("lease/grant", {"TTL": math.ceil(ttl_s), "ID": 0})
        return _EtcdLease(self, int(r["ID"]), float(r["TTL"]))

    def watch(self, prefix: str, callback: WatchCallback, start_revision: int | None = None) -> Watch:
        if self._closed:
            raise RuntimeError("state db is closed")
        if start_revision is None:
            full = self._full(prefix)
            r = self._call("kv/range", {"key": _b64(full), "range_end": _b64(_bytes_end(full)),
                                        "count_only": True})
            last = int(r["header"]["revision"])
        else:
            last = start_revision - 1
        w = _EtcdWatch(self, prefix, callback, last)
        with self._lock:
            self._watches.add(w)
        return w._start()

    def close(self) -> None:
        if not self._close_watches():
            return
        for c in self._clients:
            c.session.close()


class _EtcdLease(Lease):
    def __init__(self, kv: EtcdKv, id: int, ttl_s: float):
        super().__init__(id, ttl_s)
        self._kv = kv

    def refresh(self) -> bool:
        # an expired lease still answers, without a TTL
        return int(self._kv._call("lease/keepalive", {"ID": str(self.id)})["result"].get("TTL", -1)) > 0

    def revoke(self) -> None:
        try:
            self._kv._call("kv/lease/revoke", {"ID": str(self.id)})
        except LeaseExpired:
            pass


class _EtcdWatch(Watch):
    """One streaming POST /v3/watch; after the stream ends or fails, reconnect with backoff from
    last_revision + 1, so nothing is lost and nothing repeats (etcd keeps history until compacted)."""

    def __init__(self, kv: EtcdKv, prefix: str, callback: WatchCallback, last: int):
        super().__init__(prefix, callback, last, kv.timeout_s)
        self._kv = kv
        self._resp = None
        self._resp_lock = threading.Lock()
        # one session (one TCP connection) per watch: a pooled connection is busy for the stream's life
        self._session = kv._requests.Session()
        self._session.trust_env = False
        self._session.mount("http://", _keepalive_adapter(kv._requests))
        self._session.mount("https://", _keepalive_adapter(kv._requests))

    def _interrupt(self) -> None:
        with self._resp_lock:
            resp = self._resp
        if resp is not None:
            _shutdown(resp)
        with self._kv._lock:
            self._kv._watches.discard(self)

    def _run(self) -> None:
        backoff = BACKOFF_MIN_S
        idx = self._kv._current
        try:
            while not self._cancelled.is_set():
                endpoint = self._kv.endpoints[idx]
                try:
                    if self._stream(idx):
                        backoff = BACKOFF_MIN_S
                    why = "stream ended"
                except _Compacted as c:
                    self._resync(self._kv, c.revision)
                    continue
                except Exception as e:
                    why = _why(e)
                if self._cancelled.is_set():
                    break
                log.warning("state db watch %r on %s: %s; reconnecting from revision %d in %.2f s",
                            self.prefix, endpoint, why, self.last_revision + 1, backoff)
                idx = (idx + 1) % len(self._kv.endpoints)
                self._cancelled.wait(backoff * random.uniform(0.8, 1.2))
                backoff = min(backoff * 2, BACKOFF_MAX_S)
        finally:
            self._session.close()

    def _stream(self, idx: int) -> bool:
        """Run one watch stream until it ends; True if etcd accepted it (the backoff then starts over)."""
        client = self._kv._clients[idx]
        full = self._kv._full(self.prefix)
        req = {"create_request": {"key": _b64(full), "range_end": _b64(_bytes_end(full)),
                                  "start_revision": str(self.last_revision + 1)}}
        resp = self._session.post(client.get_url("watch"), json=req, stream=True,
                                  timeout=(self._kv.timeout_s, None))
        with self._resp_lock:
            self._resp = resp
        accepted = False
        try:
            if self._cancelled.is_set():
                return accepted
            if resp.status_code != 200:
                raise RuntimeError(f"HTTP {resp.status_code}: {resp.text[:200]}")
            buf = b""
            # grpc-gateway writes one JSON object per line, flushed; the final error object has no newline
            for chunk in resp.iter_content(chunk_size=None):
                buf += chunk
                while (nl := buf.find(b"\n")) >= 0:
                    line, buf = buf[:nl], buf[nl + 1:]
                    accepted |= self._handle(line)
            if buf.strip():
                accepted |= self._handle(buf)
            return accepted
        finally:
            with self._resp_lock:
                self._resp = None
            resp.close()

    def _handle(self, line: bytes) -> bool:
        if not line.strip() or self._cancelled.is_set():
            return False
        msg = json.loads(line)
        if "error" in msg:
            err = msg["error"]
            raise RuntimeError(err.get("message", str(err)) if isinstance(err, dict) else str(err))
        res = msg["result"]
        if res.get("canceled"):
            if int(res.get("compact_revision", 0)) > 0:
                raise _Compacted(int(res["compact_revision"]))
            raise RuntimeError(f"watch canceled by etcd: {res.get('cancel_reason', 'no reason given')}")
        events = []
        for ev in res.get("events", ()):
            kv = ev["kv"]
            try:
                key, value = self._kv._decode_kv(kv)
            except ValueError:
                log.warning("state db watch %r: skipping a value that is not JSON at revision %s", self.prefix,
                            kv.get("mod_revision"))
                continue
            kind = "delete" if ev.get("type") == "DELETE" else "put"   # PUT is the default, omitted
            events.append(Event(kind, key, value if kind == "put" else None, int(kv["mod_revision"])))
        self._deliver(events)
        return True


def _keepalive_adapter(requests):
    from urllib3.connection import HTTPConnection

    class KeepaliveAdapter(requests.adapters.HTTPAdapter):
        def init_poolmanager(self, *args, **kwargs):
            kwargs["socket_options"] = HTTPConnection.default_socket_options + KEEPALIVE_OPTIONS
            super().init_poolmanager(*args, **kwargs)

    return KeepaliveAdapter(pool_connections=1, pool_maxsize=1)


def _shutdown(resp) -> None:
    """Unblock the thread reading a streaming response: shut its socket down under it (etcd3gw's Watcher
    does the same; requests has no other way to interrupt a blocking read)."""
    try:
        sock = socket.socket(fileno=os.dup(resp.raw._fp.fileno()))
    except (AttributeError, OSError, ValueError):
        return
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    finally:
        sock.close()
