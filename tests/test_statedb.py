"""The VM state database, one suite over both backends: embedded (SQLite file) and etcd (a real etcd 3.4,
TLS with client certificates, as srmig.testbed.etcd starts it).

Waits are on conditions with deadlines; nothing sleeps for a fixed time.
"""

from __future__ import annotations

import json
import logging
import re
import socket
import subprocess
import sys
import threading
import time
import uuid
from dataclasses import dataclass

import pytest

from srmig.ctl import statedb
from srmig.ctl.statedb import DbUnavailable, Event, LeaseExpired
from srmig.ctl.statedb import sqlite as embedded
from srmig.testbed.etcd import EtcdServer

DEADLINE_S = 5.0
LEASE_TTL_S = 1.0   # etcd's floor with EtcdServer's tick settings


@pytest.fixture(scope="module")
def etcd_server():
    with EtcdServer() as server:
        yield server


@dataclass
class Store:
    """How to open one store: each open() is a separate client of the same data."""
    backend: str
    path: str | None
    endpoints: list[str] | None
    prefix: str
    tls: statedb.Tls | None = None
    auth: statedb.Auth | None = None    # etcd's root: these tests are about the store, not the roles

    def open(self) -> statedb.Kv:
        return statedb.open_db(self.backend, path=self.path, endpoints=self.endpoints, prefix=self.prefix,
                               tls=self.tls, auth=self.auth)

    def args(self) -> list[str]:
        where = self.path or json.dumps({"endpoints": self.endpoints, "tls": list(vars(self.tls).values()),
                                         "auth": [self.auth.user, self.auth.password]})
        return [self.backend, where, self.prefix]


@pytest.fixture(params=["embedded", pytest.param("etcd", marks=pytest.mark.etcd)])
def store(request, tmp_path) -> Store:
    prefix = f"/t-{uuid.uuid4().hex[:8]}/"      # tests share the module's etcd: each its own key space
    if request.param == "etcd":
        server = request.getfixturevalue("etcd_server")
        return Store("etcd", None, server.endpoints, prefix, server.tls(), server.auth())
    return Store("embedded", str(tmp_path / "state.db"), None, prefix)


@pytest.fixture
def kv(store):
    with store.open() as kv:
        yield kv


class Collector:
    """A watch callback that records events; wait() blocks until a condition on them holds."""

    def __init__(self):
        self.events: list[Event] = []
        self.calls = 0
        self._cond = threading.Condition()

    def __call__(self, events: list[Event]) -> None:
        with self._cond:
            self.events.extend(events)
            self.calls += 1
            self._cond.notify_all()

    def wait(self, pred, timeout: float = DEADLINE_S) -> list[Event]:
        with self._cond:
            assert self._cond.wait_for(lambda: pred(self.events), timeout), f"timed out; got {self.events}"
            return list(self.events)

    def wait_count(self, n: int, timeout: float = DEADLINE_S) -> list[Event]:
        return self.wait(lambda ev: len(ev) >= n, timeout)


def brief(events: list[Event]) -> list[tuple]:
    return [(e.kind, e.key, e.value) for e in events]


def test_put_get_range_delete(kv):
    r1 = kv.put("vms/2001:db8::20", {"host": "S"})
    r2 = kv.put("vms/2001:db8::10", {"host": "S"})
    r3 = kv.put("acks/ingress1", {"seq": 1})
    r4 = kv.put("vms/2001:db8::20", {"host": "D"})
    assert r1 < r2 < r3 < r4
    assert kv.get("vms/2001:db8::20") == statedb.Entry("vms/2001:db8::20", {"host": "D"}, r4)
    assert kv.get("vms/2001:db8::30") is None

    entries, rev = kv.range("vms/")
    assert [(e.key, e.value, e.mod_revision) for e in entries] == [
        ("vms/2001:db8::10", {"host": "S"}, r2), ("vms/2001:db8::20", {"host": "D"}, r4)]
    assert rev >= r4

    assert kv.delete("vms/2001:db8::10") is True
    assert kv.delete("vms/2001:db8::10") is False
    assert kv.get("vms/2001:db8::10") is None
    entries, rev2 = kv.range("vms/")
    assert [e.key for e in entries] == ["vms/2001:db8::20"]
    assert rev2 > rev
    assert kv.put("vms/x", {}) > rev2


@pytest.mark.parametrize("case", [
    # (description, what the key holds when put_if compares, expected result)
    ("create-only on a missing key", "absent", True),
    ("create-only on an existing key", "exists", False),
    ("the key's current revision", "current", True),
    ("a stale revision", "stale", False),
], ids=lambda c: c[0])
def test_put_if(kv, case):
    _, situation, expected = case
    key = "vms/2001:db8::10"
    if situation == "absent":
        assert kv.put_if(key, {"v": "new"}, 0) is expected
    else:
        old = kv.put(key, {"v": "old"})
        cur = kv.put(key, {"v": "cur"})
        compare = {"exists": 0, "current": cur, "stale": old}[situation]
        assert kv.put_if(key, {"v": "new"}, compare) is expected
    got = kv.get(key)
    assert got.value == ({"v": "new"} if expected else {"v": "cur"})


def test_watch_replays_history_then_follows(kv):
    first = kv.put("vms/a", {"n": 1})
    kv.put("vms/b", {"n": 2})
    kv.put("other/z", {"n": 0})                     # outside the prefix: never delivered
    kv.delete("vms/a")
    seen = Collector()
    w = kv.watch("vms/", seen, start_revision=first)
    try:
        kv.put("vms/c", {"n": 3})
        kv.delete("vms/b")
        events = seen.wait_count(5)
        assert brief(events) == [("put", "vms/a", {"n": 1}), ("put", "vms/b", {"n": 2}), ("delete", "vms/a", None),
                                 ("put", "vms/c", {"n": 3}), ("delete", "vms/b", None)]
        revs = [e.mod_revision for e in events]
        assert revs == sorted(set(revs)) and revs[0] == first
    finally:
        w.cancel()


def test_watch_from_now_skips_the_past(kv):
    kv.put("vms/old", {})
    seen = Collector()
    w = kv.watch("vms/", seen)
    try:
        rev = kv.put("vms/new", {})
        assert brief(seen.wait_count(1)) == [("put", "vms/new", {})]
        assert seen.events[0].mod_revision == rev
    finally:
        w.cancel()


PEER = r"""
import json, sys, threading
from srmig.ctl import statedb
backend, where, prefix = sys.argv[1:4]
etcd = json.loads(where) if backend == "etcd" else {}
kv = statedb.open_db(backend, path=where if backend == "embedded" else None, endpoints=etcd.get("endpoints"),
                     prefix=prefix, tls=statedb.Tls(*etcd["tls"]) if etcd else None,
                     auth=statedb.Auth(*etcd["auth"]) if etcd else None)
done = threading.Event()
def on_events(events):
    for e in events:
        if e.key == "peer/parent" and e.kind == "put":
            kv.put("peer/child", {"saw": e.value["n"]})
            done.set()
w = kv.watch("peer/", on_events)
print("ready", flush=True)
ok = done.wait(10)
kv.close()
sys.exit(0 if ok else 1)
"""


def test_two_clients_see_each_other_through_watch(store, kv):
    """Another process (for embedded: another SQLite connection and inotify instance) writes and watches."""
    seen = Collector()
    w = kv.watch("peer/", seen)
    child = subprocess.Popen([sys.executable, "-c", PEER, *store.args()], stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "ready"   # its watch exists: our put must reach it live
        kv.put("peer/parent", {"n": 42})
        events = seen.wait(lambda ev: any(e.key == "peer/child" for e in ev))
        assert brief(events) == [("put", "peer/parent", {"n": 42}), ("put", "peer/child", {"saw": 42})]
        assert child.wait(DEADLINE_S) == 0
    finally:
        w.cancel()
        if child.poll() is None:
            child.kill()
        child.wait()


def test_watch_from_compacted_history_converges(store, kv, monkeypatch):
    """Past the retained history a watch cannot replay; it resynchronises from a snapshot instead."""
    if store.backend == "embedded":
        monkeypatch.setattr(embedded, "CHANGELOG_KEEP", 1)         # every write trims all but its own
        monkeypatch.setattr(embedded, "CHANGELOG_TRIM_EVERY", 1)
    first = kv.put("vms/a", {"n": 1})
    kv.put("vms/a", {"n": 2})
    kv.put("vms/b", {"n": 1})
    last = kv.put("other/x", {})
    if store.backend == "etcd":
        kv._call("kv/compaction", {"revision": str(last)})
    seen = Collector()
    w = kv.watch("vms/", seen, start_revision=first)
    try:
        events = seen.wait_count(2)
        assert brief(events) == [("put", "vms/a", {"n": 2}), ("put", "vms/b", {"n": 1})]
        kv.delete("vms/a")
        assert brief(seen.wait_count(3))[2:] == [("delete", "vms/a", None)]
    finally:
        w.cancel()


def test_lease_expiry_deletes_keys_with_events(kv):
    seen = Collector()
    w = kv.watch("vms/", seen)
    try:
        lease = kv.lease(LEASE_TTL_S)
        kv.put("vms/a", {}, lease=lease)
        kv.put("vms/b", {}, lease=lease)
        kv.put("vms/kept", {})
        t0 = time.monotonic()
        events = seen.wait(lambda ev: sum(e.kind == "delete" for e in ev) == 2, LEASE_TTL_S + 3)
        assert time.monotonic() - t0 >= LEASE_TTL_S * 0.9
        deletes = [e for e in events if e.kind == "delete"]
        assert {e.key for e in deletes} == {"vms/a", "vms/b"}
        assert deletes[0].mod_revision == deletes[1].mod_revision     # one revision, as etcd does it
        assert kv.get("vms/a") is None and kv.get("vms/kept") is not None
        assert lease.refresh() is False
        with pytest.raises(LeaseExpired):
            kv.put("vms/a", {}, lease=lease)
    finally:
        w.cancel()


def test_lease_refresh_and_revoke(kv):
    seen = Collector()
    w = kv.watch("vms/", seen)
    try:
        lease = kv.lease(30)
        kv.put("vms/a", {}, lease=lease)
        assert lease.refresh() is True
        lease.revoke()
        assert brief(seen.wait_count(2)) == [("put", "vms/a", {}), ("delete", "vms/a", None)]
        assert kv.get("vms/a") is None
        lease.revoke()                                  # gone already: not an error
    finally:
        w.cancel()


def test_watch_cancel_is_bounded(kv):
    seen, barrier = Collector(), Collector()
    w = kv.watch("vms/", seen)
    kv.put("vms/a", {})
    seen.wait_count(1)
    t0 = time.monotonic()
    w.cancel()
    assert time.monotonic() - t0 < 1.0
    assert not w.running
    w2 = kv.watch("vms/", barrier)
    try:
        kv.put("vms/b", {})
        barrier.wait_count(1)                           # delivered elsewhere, so not to the cancelled watch
        assert seen.calls == 1
    finally:
        w2.cancel()


class BackoffSeen(logging.Handler):
    """Set once a watch logs that it will wait at least `min_s` before reconnecting."""

    def __init__(self, min_s: float):
        super().__init__()
        self.min_s = min_s
        self.event = threading.Event()

    def emit(self, record):
        m = re.search(r"reconnecting from revision \d+ in ([\d.]+) s", record.getMessage())
        if m and float(m.group(1)) >= self.min_s:
            self.event.set()


@pytest.mark.etcd
@pytest.mark.parametrize("kill", [False, True], ids=["sigterm", "sigkill"])
def test_etcd_watch_resumes_after_restart(kill):
    backoff = BackoffSeen(0.8)     # 0.05, 0.1, 0.2, 0.4, 0.8 s: ~0.75 s down, then >= 0.64 s more asleep
    logger = logging.getLogger("srmig.ctl.statedb")
    logger.addHandler(backoff)
    with EtcdServer() as server, statedb.open_db("etcd", endpoints=server.endpoints, tls=server.tls(),
                                                 auth=server.auth()) as kv:
        try:
            seen = Collector()
            w = kv.watch("vms/", seen)
            kv.put("vms/a", {"n": 1})
            seen.wait_count(1)
            server.stop(kill=kill)
            with pytest.raises(DbUnavailable, match=server.endpoints[0]):
                kv.put("vms/a", {"n": 0})
            assert backoff.event.wait(DEADLINE_S)
            # restart and write while the watch sleeps (etcd starts in ~0.3 s): it must replay these on
            # reconnecting, from the revision after the last one it delivered
            server.start()
            for n in range(2, 6):
                kv.put("vms/a", {"n": n})
            events = seen.wait_count(5, timeout=10)
            assert [e.value["n"] for e in events] == [1, 2, 3, 4, 5]
            revs = [e.mod_revision for e in events]
            assert revs == sorted(set(revs))
            kv.put("vms/a", {"n": 6})
            assert [e.value["n"] for e in seen.wait_count(6)] == [1, 2, 3, 4, 5, 6]
            assert w.running
            w.cancel()
        finally:
            logger.removeHandler(backoff)


def _dead_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]       # closed again: nothing listens there


@pytest.mark.etcd
def test_etcd_dead_endpoint_is_unavailable(etcd_server):
    dead = f"https://127.0.0.1:{_dead_port()}"
    t0 = time.monotonic()
    with pytest.raises(DbUnavailable, match=f"{dead}.*refused"):
        statedb.open_db("etcd", endpoints=[dead], timeout_s=1.0, tls=etcd_server.tls(), auth=etcd_server.auth())
    assert time.monotonic() - t0 < 1.5
    # a dead endpoint among live ones is skipped
    with statedb.open_db("etcd", endpoints=[dead, *etcd_server.endpoints], prefix="/t-failover/",
                         tls=etcd_server.tls(), auth=etcd_server.auth()) as kv:
        assert kv.put("k", {}) > 0


@pytest.mark.parametrize("kwargs, error, match", [
    ({"backend": "zookeeper"}, ValueError, "unknown state db backend 'zookeeper'"),
    ({"backend": "embedded", "path": "/nonexistent-srmig/state.db"}, DbUnavailable,
     "/nonexistent-srmig does not exist"),
    ({"backend": "etcd"}, ValueError, "needs endpoints"),
    ({"backend": "etcd", "endpoints": ["127.0.0.1:2379"]}, ValueError, "expected https://HOST:PORT"),
    ({"backend": "etcd", "endpoints": ["https://127.0.0.1:2379"]}, ValueError, "https:// needs tls"),
    ({"backend": "etcd", "endpoints": ["http://127.0.0.1:2379"], "tls": statedb.Tls("/dev/null")}, ValueError,
     "TLS is configured but the endpoint is http://"),
    ({"backend": "etcd", "endpoints": ["https://127.0.0.1:2379"], "tls": statedb.Tls("/nonexistent/ca.pem")},
     DbUnavailable, r"etcd TLS: cannot load the CA file /nonexistent/ca.pem \(No such file or directory\)$"),
], ids=["unknown-backend", "missing-dir", "no-endpoints", "endpoint-without-scheme", "https-without-tls",
        "http-with-tls", "missing-ca-file"])
def test_open_errors(kwargs, error, match):
    backend = kwargs.pop("backend")
    with pytest.raises(error, match=match):
        statedb.open_db(backend, **kwargs)


def test_values_are_json_objects(kv):
    with pytest.raises(TypeError):
        kv.put("vms/a", ["not", "a", "dict"])
