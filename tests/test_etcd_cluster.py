"""etcd as a cluster: three real etcd processes (srmig.testbed.etcd.EtcdCluster), each in a network namespace
of its own with its own address, linked to the clients' namespace A, TLS for clients and peers. The client
(srmig.ctl.statedb's etcd backend, given every endpoint) runs in A.

A member killed under the client: every write lands exactly once (each key's etcd version is 1, each
compare-and-swap counted once), a watch delivers every event once and in order across the move to another
member, a lease stays alive. A write whose answer is lost (etcd applied it; the client cannot know) is not
applied twice. Waits are on conditions with deadlines; nothing sleeps for a fixed time.
"""

from __future__ import annotations

import base64
import contextlib
import logging
import threading
import time

import pytest

from srmig.ctl import statedb
from srmig.ctl.statedb import DbUnavailable, Event
from srmig.testbed import netns
from srmig.testbed.etcd import EtcdCluster
from srmig.testbed.netns import Topology

pytestmark = [pytest.mark.etcd, pytest.mark.netns]

DEADLINE_S = 20.0
LEASE_TTL_S = 3.0       # refreshed every second: it must outlive a refresh that waits out a dead leader (2 s)
WRITES = 25             # before the kill, after it, and after the restart: the kill lands among writes


@pytest.fixture(scope="module")
def cluster():
    with Topology() as topo:
        topo.add_host("A")
        with EtcdCluster(topo, hub="A") as c:
            yield topo, c


@pytest.fixture
def etcd(cluster):
    """The cluster with every member up (a test may have left one down), this thread in namespace A."""
    topo, c = cluster
    c.start()
    with topo.inside("A"):
        yield c


def _open(c: EtcdCluster, first, prefix: str, endpoints=None) -> statedb.Kv:
    """A client with every endpoint, `first` (a Member) first: the one it talks to until that one fails."""
    order = endpoints or [first.url] + [m.url for m in c.members if m is not first]
    return statedb.open_db("etcd", endpoints=order, tls=c.tls("client"), auth=c.auth(), prefix=prefix)


class Collector:
    """A watch callback that records events; wait() blocks until a condition on them holds."""

    def __init__(self):
        self.events: list[Event] = []
        self._cond = threading.Condition()

    def __call__(self, events: list[Event]) -> None:
        with self._cond:
            self.events.extend(events)
            self._cond.notify_all()

    def wait(self, pred, timeout: float = DEADLINE_S) -> list[Event]:
        with self._cond:
            assert self._cond.wait_for(lambda: pred(self.events), timeout), f"timed out; got {self.events}"
            return list(self.events)


class Writer:
    """A thread that puts w/<i> = {"n": i} for i = 0, 1, ... and increments the counter key `cas` by
    compare-and-swap after each, until stopped; records each put's revision and each swap that succeeded.
    Any error ends it (and fails the test): the client must ride through a member's death."""

    def __init__(self, kv: statedb.Kv):
        self.kv = kv
        self.revs: list[int] = []
        self.swaps = 0
        self.error: BaseException | None = None
        self._stop = threading.Event()
        self._cond = threading.Condition()
        self._thread = threading.Thread(target=self._run, name="writer", daemon=True)

    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                rev = self.kv.put(f"w/{len(self.revs)}", {"n": len(self.revs)})
                cur = self.kv.get("cas")
                n = cur.value["n"] if cur else 0
                if self.kv.put_if("cas", {"n": n + 1}, cur.mod_revision if cur else 0):
                    self.swaps += 1
                with self._cond:
                    self.revs.append(rev)
                    self._cond.notify_all()
        except BaseException as e:  # noqa: BLE001 - reported by wait_for() and stop()
            self.error = e
            with self._cond:
                self._cond.notify_all()

    def __enter__(self) -> Writer:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(DEADLINE_S)

    def wait_for(self, n: int) -> None:
        """Until `n` more writes landed (bounded)."""
        with self._cond:
            goal = len(self.revs) + n
            ok = self._cond.wait_for(lambda: len(self.revs) >= goal or self.error is not None, DEADLINE_S)
        assert self.error is None, f"the writer failed: {self.error!r}"
        assert ok, f"{n} more writes not within {DEADLINE_S} s (at {len(self.revs)})"

    def stop(self) -> int:
        """Stop; the number of puts."""
        self._stop.set()
        self._thread.join(DEADLINE_S)
        assert not self._thread.is_alive()
        assert self.error is None, f"the writer failed: {self.error!r}"
        return len(self.revs)


def _versions(kv, prefix: str) -> dict[str, int]:
    """{key: etcd's version of it}: how many times it was put since it was created (1: once)."""
    full = (kv.prefix + prefix).encode()
    r = kv._call("kv/range", {"key": base64.b64encode(full).decode(),
                              "range_end": base64.b64encode(full[:-1] + bytes([full[-1] + 1])).decode()})
    return {base64.b64decode(x["key"]).decode()[len(kv.prefix):]: int(x["version"]) for x in r.get("kvs", [])}


class Refresher:
    """Refreshes a lease every second from a thread of its own; records any refresh that found it gone."""

    def __init__(self, lease):
        self.lease = lease
        self.results: list[bool | str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="lease", daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(LEASE_TTL_S / 3):
            try:
                self.results.append(self.lease.refresh())
            except Exception as e:  # noqa: BLE001 - asserted
                self.results.append(repr(e))

    def __enter__(self) -> Refresher:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(DEADLINE_S)


class FailoverSeen(logging.Handler):
    def __init__(self):
        super().__init__()
        self.lines: list[str] = []

    def emit(self, record):
        if "failed over from" in record.getMessage() or "reconnecting from revision" in record.getMessage():
            self.lines.append(record.getMessage())


@contextlib.contextmanager
def _failover_log():
    seen = FailoverSeen()
    logger = logging.getLogger("srmig.ctl.statedb")
    logger.addHandler(seen)
    try:
        yield seen
    finally:
        logger.removeHandler(seen)


@pytest.mark.parametrize("client_on", ["leader", "follower"])
def test_leader_killed_under_writes_watch_and_lease(etcd, client_on):
    """SIGKILL the leader while a client writes, swaps, watches and refreshes a lease; restart it; the client
    (on the leader itself, or on a follower whose proposals died with the leader) loses and repeats nothing."""
    leader = etcd.leader()
    first = leader if client_on == "leader" else next(m for m in etcd.members if m is not leader)
    with _failover_log() as log_seen, _open(etcd, first, f"/kill-leader-{client_on}/") as kv:
        seen = Collector()
        w = kv.watch("w/", seen, start_revision=1)
        lease = kv.lease(LEASE_TTL_S)
        kv.put("l/held", {}, lease=lease)
        try:
            with Refresher(lease) as refresher, Writer(kv) as writer:
                writer.wait_for(WRITES)
                killed = etcd.kill_leader()
                assert killed is leader
                writer.wait_for(WRITES)
                etcd.restart(killed)
                writer.wait_for(WRITES)
                n = writer.stop()
            # the watch: every put once, in order, with the revision the put returned
            events = seen.wait(lambda ev: ev and ev[-1].mod_revision >= writer.revs[-1])
            assert [(e.kind, e.key, e.value) for e in events] == [("put", f"w/{i}", {"n": i}) for i in range(n)]
            assert [e.mod_revision for e in events] == writer.revs
            assert _versions(kv, "w/") == {f"w/{i}": 1 for i in range(n)}      # each put landed once
            assert kv.get("cas").value == {"n": writer.swaps}                  # each successful swap once
            # the lease: refreshed through the election, its key still there
            assert refresher.results and all(r is True for r in refresher.results), refresher.results
            assert kv.get("l/held") is not None and lease.refresh() is True
            assert w.running
        finally:
            w.cancel()
            lease.revoke()
    if client_on == "leader":  # the client's member died: one line says where it went
        assert any(f"failed over from etcd {leader.url} " in ln for ln in log_seen.lines), log_seen.lines


def test_follower_killed_the_cluster_keeps_working(etcd):
    """The client's member is a follower, and it dies: the client and its watch move on, the two others
    keep serving (a quorum); back, the follower catches up (a client of it alone reads the last write)."""
    leader = etcd.leader()
    follower = next(m for m in etcd.members if m is not leader)
    with _failover_log() as log_seen, _open(etcd, follower, "/kill-follower/") as kv:
        seen = Collector()
        w = kv.watch("w/", seen, start_revision=1)
        try:
            with Writer(kv) as writer:
                writer.wait_for(WRITES)
                etcd.kill(follower)
                writer.wait_for(WRITES)
                assert etcd.leader() is leader, "a follower's death does not move the leadership"
                n = writer.stop()
            events = seen.wait(lambda ev: ev and ev[-1].mod_revision >= writer.revs[-1])
            assert [(e.key, e.mod_revision) for e in events] == [(f"w/{i}", writer.revs[i]) for i in range(n)]
            assert _versions(kv, "w/") == {f"w/{i}": 1 for i in range(n)}
        finally:
            w.cancel()
        assert any(f"failed over from etcd {follower.url} " in ln for ln in log_seen.lines), log_seen.lines
        assert any(f"on {follower.url}:" in ln and "reconnecting from revision" in ln for ln in log_seen.lines)
        etcd.restart(follower)
        with _open(etcd, follower, "/kill-follower/", endpoints=[follower.url]) as alone:
            assert alone.get(f"w/{n - 1}").mod_revision == writer.revs[-1]


def test_no_quorum_is_unavailable_until_a_member_returns(etcd):
    """Two of three members down: no leader can be elected; a write fails (DbUnavailable, bounded) rather
    than hang; once one of them is back the same client writes again."""
    leader = etcd.leader()
    others = [m for m in etcd.members if m is not leader]
    with _open(etcd, leader, "/no-quorum/") as kv:
        kv.put("k", {"n": 0})
        etcd.kill(others[0])
        etcd.kill(others[1])
        t0 = time.monotonic()
        with pytest.raises(DbUnavailable, match="etcd unreachable: "):
            kv.put("k", {"n": 1})
        assert time.monotonic() - t0 < DEADLINE_S
        etcd.restart(others[0])
        rev = kv.put("k", {"n": 2})
        assert kv.get("k").mod_revision == rev
        # the write that failed may or may not have landed (etcd's answer to it was lost with the quorum);
        # what the client reported as done landed once
        assert kv.get("k").value == {"n": 2}


@contextlib.contextmanager
def _answers_lost(member):
    """`member` applies what it is asked but its answers never leave (its client port's replies dropped;
    raft between the peers untouched): the client sees its request go out and no answer come."""
    rule = ["OUTPUT", "-p", "tcp", "--sport", "2379", "-j", "DROP"]
    netns.run(member.ns, "ip6tables", "-A", *rule)
    try:
        yield
    finally:
        netns.run(member.ns, "ip6tables", "-D", *rule)


@pytest.mark.parametrize("op", ["put", "put_if", "lease"])
def test_write_whose_answer_is_lost_lands_once(etcd, op):
    """etcd applies the write, its answer is lost (the client times out: it may have been applied); the
    client fails over and repeats it in a form that applies it only if it did not land: it did, so it is
    not applied again, and the client returns what the first attempt did."""
    m = etcd.members[0]
    prefix = f"/answer-lost-{op}/"
    with _open(etcd, m, prefix) as kv, _open(etcd, etcd.members[1], prefix) as other:
        kv.get("w/k")                       # the client's connection to m exists: the request will go out
        start = other.put("w/before", {})
        leases_before = {x["ID"] for x in other._call("kv/lease/leases", {}).get("leases", [])}
        with _answers_lost(m):
            if op == "put":
                rev = kv.put("w/k", {"n": 1})
            elif op == "put_if":
                assert kv.put_if("w/k", {"n": 1}, 0) is True
                rev = other.get("w/k").mod_revision
            else:
                lease = kv.lease(30)
        assert kv._current != 0, "the client failed over"
        if op == "lease":
            leases = {x["ID"] for x in other._call("kv/lease/leases", {}).get("leases", [])} - leases_before
            assert leases == {str(lease.id)}, "one lease granted, no second one left behind"
            assert lease.refresh() is True
            lease.revoke()
            return
        seen = Collector()
        w = other.watch("w/", seen, start_revision=start)
        try:
            other.put("w/after", {})
            events = seen.wait(lambda ev: any(e.key == "w/after" for e in ev))
        finally:
            w.cancel()
        assert [(e.key, e.mod_revision) for e in events] == [("w/before", start), ("w/k", rev),
                                                             ("w/after", events[-1].mod_revision)]
        assert _versions(other, "w/k") == {"w/k": 1}
