"""The embedded backend of the state database: SQLite in WAL mode in one file, inotify on a doorbell file
for watches.

`SqliteKv` (the store, its transactions and lease expiry), `_SqliteLease`, `_SqliteWatch`, and `_Notifier`,
the one thread per open SqliteKv that reads the change log and fans it out to the watches.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import queue
import select
import sqlite3
import struct
import threading
import time
from pathlib import Path
from typing import Callable

from cffi import FFI

from srmig.ctl.statedb import (BACKOFF_MAX_S, CANCEL_GRACE_S, DEFAULT_PREFIX, DbUnavailable, Entry, Event, Kv, Lease,
                               LeaseExpired, Watch, WatchCallback, _check_key, _Compacted, _encode_value)

log = logging.getLogger(__name__)

CHANGELOG_KEEP = 10_000         # revisions kept in the change log for watches that start late
CHANGELOG_TRIM_EVERY = 1_000

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
        self.bell = self.path.with_name(self.path.name + "-notify")
        self._private()
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
            self._bell_fd = os.open(self.bell, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except (sqlite3.Error, OSError) as e:
            self._conn.close()
            raise DbUnavailable(f"embedded state db {self.path}: {e}") from e
        self._notifier: _Notifier | None = None
        self._watches: set[_SqliteWatch] = set()
        self._closed = False

    def _private(self) -> None:
        """Root only (the owner only): the database says where every VM's traffic goes. The file is made mode
        0600 before SQLite opens it, and SQLite gives the -wal and -shm files it creates the database file's
        mode. Files an older version made wider are narrowed."""
        try:
            os.close(os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600))
            for f in (self.path, *(self.path.with_name(self.path.name + x) for x in ("-wal", "-shm", "-notify"))):
                with contextlib.suppress(FileNotFoundError):
                    st = os.stat(f)
                    if st.st_mode & 0o077 and st.st_uid == os.geteuid():
                        os.chmod(f, 0o600)
        except OSError as e:
            raise DbUnavailable(f"embedded state db {self.path}: {e.strerror}") from e

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

