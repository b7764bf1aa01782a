"""The srmig agent: one per hypervisor (host role) and/or ingress (ingress role).

Threads, and who may touch what:
- libvirt's event loop (registered before any connection) runs the callbacks, which only enqueue;
- the libvirt link thread connects, keeps alive and reconnects with backoff (srmig.ctl.libvirt_link);
- the state database's watch threads only enqueue;
- the hook server's threads enqueue a request and wait for its answer (never call libvirt);
- ONE worker (`Agent.run`) applies everything: the state machine (srmig.ctl.machine), the maps, the drain,
  the database writes. So the order of events is the order of effects.

The two ends of a migration run their own state machine over the same events: each end applies the actions
for its own host (plus the idempotent Publish) and writes the events it saw to migrations/<vm>/<host> only
after applying them; the other end feeds those to its machine (srmig.ctl.vmdb).
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import logging
import os
import queue
import threading
import time
import uuid
import xml.etree.ElementTree as ET
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path

from srmig.ctl import ingress as ingress_routes
from srmig.ctl.config import Config
from srmig.ctl.libvirt_events import translate
from srmig.ctl.machine import (DelVm, Drain, Ev, KeepTap, Machine, Migration, Publish, ReturnHeld, SetVm, StartGrace,
                               Unpark)
from srmig.ctl.phases import HostSids, Phase
from srmig.ctl.vmdb import VmDb, VmRecord
from srmig.bpf.abi import VmState

log = logging.getLogger("srmig.agent")
XMLNS = "urn:srmig:vm:1"
LEASE_TTL_S = 10.0
BASELINE_EVERY_S = 2.0
BASELINE_PER_TICK = 8
BASELINE_TRIES = 5
DB_RETRY_MAX_S = 1.0  # failed writes retried at least this often: a cut-over lands <= 1 s after the database returns
RETURN_WAIT_S = 1.0  # abort: the longest the source parks, waiting for the destination to return what it held
SOURCE_SILENT_S = 0.05  # the destination resumed and the source has not reported its pause for this long
RECHECK_S = 0.05  # a source VM found paused by its migration after a reconnect: its state polled this often
QUEUE_RESTORE_MAX_S = 10.0  # a window's end: the longest its tap keeps the long queue while frames wait in it
QUEUE_POLL_S = 0.01  # meanwhile, how often the queue is looked at


@dataclass
class Domain:
    """What the agent needs from a libvirt domain's XML."""

    name: str
    vm: str            # the VM's IPv6 address: the key of everything srmig does
    tap: str | None

    @classmethod
    def from_xml(cls, xml: str) -> Domain | None:
        """None when the domain is not managed by srmig (no <srmig:vm><address> in its metadata)."""
        root = ET.fromstring(xml)
        addr = root.find(f"./metadata/{{{XMLNS}}}vm/{{{XMLNS}}}address")
        if addr is None or not (addr.text or "").strip():
            return None
        import ipaddress  # noqa: PLC0415

        vm = str(ipaddress.IPv6Address(addr.text.strip().split("/")[0]))
        tap = root.find("./devices/interface/target")
        return cls(root.findtext("name"), vm, tap.get("dev") if tap is not None else None)


def metadata_xml(address: str) -> str:
    """The metadata element that makes srmig manage a domain (goes inside <metadata>)."""
    return f"<srmig:vm xmlns:srmig='{XMLNS}'><srmig:address>{address}</srmig:address></srmig:vm>"


@dataclass
class Local:
    """This host's resources for one migration (or one VM)."""

    domain: str | None = None
    tap: str | None = None
    shadow: object | None = None       # ShadowLog
    keeper: object | None = None       # TapKeeper (KeepTap: both ends)
    check: object | None = None        # SwallowCheck (source)
    drain: object | None = None        # SourceDrain
    old_qlen: int | None = None        # the tap's queue length before the window (restored after it)
    window: int = 0                    # migration windows opened on this tap: a late restore gives way
    stopped_ns: int = 0
    deferred: list = field(default_factory=list)   # actions waiting for the other end (abort on D)
    keep_wanted: bool = False
    returned: int | None = None  # destination, abort: packets sent back (None: not yet)
    unpark: str | None = None    # source, abort: the migration whose parked packets wait for D's return
    sbuf_base: int = 0           # source, abort: End.SBUF deliveries when parking began
    peer_resent: list = field(default_factory=list)  # frames the source re-sent for its swallowing QEMU


class Agent:
    def __init__(self, cfg: Config, kv_factory=None, libvirt_factory=None):
        self.cfg = cfg
        self.name = cfg.name
        self.q: queue.Queue = queue.Queue()
        self.stopping = threading.Event()
        self.kv = None
        self.db: VmDb | None = None
        self._kv_factory = kv_factory or self._open_kv
        self._libvirt_factory = libvirt_factory
        self.machine = Machine(grace_s=cfg.host.grace_s, drain=cfg.host.drain) if cfg.host else None
        self.sids: HostSids | None = cfg.host.sids if cfg.host else None
        self.dp = None
        self.domains: dict[str, Domain] = {}       # name -> Domain
        self.local: dict[str, Local] = {}           # vm -> Local
        self.mig_ids: dict[str, str] = {}           # vm -> the id of the migration the machine runs
        self.fed: dict[tuple[str, str, str], int] = {}  # (vm, migration id, host) -> events fed
        self.pending_local: dict[str, list] = {}    # vm -> local events seen before the migration record
        self.libvirt = None                          # LibvirtLink
        self.ingress = None                          # IngressRole
        self.status_db = {"state": "connecting", "error": None}
        self.metrics = None
        self._leases = []
        self._watches = []
        self._last_event_ns = 0
        self._baseline_timer: threading.Timer | None = None
        self.latencies_ms: list[float] = []          # event -> first map write, last 1000
        self.phase_started: dict[str, tuple[str, float]] = {}
        self._local_events: dict[str, set] = {}      # vm -> events seen by this host (not its peer)
        self.dbq: queue.Queue = queue.Queue()          # database writes, in order, off the worker's path
        self.db_backlog_error: str | None = None
        self._hosts: dict[str, tuple] = {}            # host records (they change only with a host's config)
        self.early_cutovers = 0                       # cut-overs done by the destination (source silent)
        self.iterations: dict[str, int] = {}          # domain -> last migration iteration seen
        self.last_job: dict[str, dict] = {}           # domain -> the last completed job's figures

    # --- plumbing ------------------------------------------------------------------------------------

    def _open_kv(self):
        from srmig.ctl import statedb  # noqa: PLC0415

        d = self.cfg.db
        if d.backend == "embedded":
            Path(d.path).parent.mkdir(parents=True, exist_ok=True)
            return statedb.open_db("embedded", path=d.path, prefix=d.prefix)
        return statedb.open_db("etcd", endpoints=list(d.endpoints), prefix=d.prefix)

    def enqueue(self, *item) -> None:
        self.q.put(item)

    def _enqueue_later(self, seconds: float, *item) -> None:
        """Queue `item` for the worker `seconds` from now (a daemon timer: it does not hold the agent up)."""
        t = threading.Timer(seconds, self.enqueue, item)
        t.daemon = True
        t.start()

    def _db_async(self, fn) -> Future:
        """Run `fn` on the database writer thread, after every write queued before it; the worker goes on at
        once (a map update must never wait for a database round trip)."""
        fut: Future = Future()
        self.dbq.put((fn, fut))
        return fut

    def _db_writer(self) -> None:
        """Writes in order; a write that fails (database down) is retried with backoff, and the ones behind it
        wait: nothing is lost or reordered, and `srmig status` shows the backlog."""
        while True:
            fn, fut = self.dbq.get()
            if fn is None:
                return
            delay = 0.1
            while True:
                try:
                    fut.set_result(fn())
                    break
                except Exception as e:  # noqa: BLE001 - retried until it lands or the agent stops
                    self.db_backlog_error = f"{type(e).__name__}: {e}"
                    log.warning("database write failed (%s); retrying in %.1f s", e, delay)
                    if self.stopping.wait(delay):
                        fut.set_exception(e)
                        return
                    delay = min(delay * 2, DB_RETRY_MAX_S)
            self.db_backlog_error = None

    def _put_record(self, vm: str) -> None:
        rec = self._record(vm)
        self._db_async(lambda: self.db.put_migration(vm, self.name, rec))

    def _host(self, name: str):
        if name not in self._hosts:
            h = self.db.host(name)
            if h is None:
                return None
            self._hosts[name] = h
        return self._hosts[name]

    def call(self, kind: str, *args, timeout: float = 10.0):
        """Run `kind` on the worker and wait for its result (hook and status requests)."""
        fut: Future = Future()
        self.q.put((kind, *args, fut))
        return fut.result(timeout)

    def start(self) -> None:
        """Everything but the worker: dataplane, servers, connections (each retried in the background)."""
        if self.cfg.host:
            self._load_dataplane()
        from srmig.ctl import hooksrv  # noqa: PLC0415

        self.hook_server = hooksrv.serve(self, self.cfg.hook.socket)
        if self.cfg.metrics_listen:
            from srmig.ctl import metrics  # noqa: PLC0415

            self.metrics = metrics.serve(self, self.cfg.metrics_listen)
        threading.Thread(target=self._db_connector, name="db-connect", daemon=True).start()

    def _load_dataplane(self) -> None:
        from srmig.ctl.maps import Dataplane  # noqa: PLC0415
        from srmig.bpf import loader  # noqa: PLC0415
        from srmig.bpf.abi import Behaviour  # noqa: PLC0415

        h = self.cfg.host
        loaded = loader.load(h.fabric, h.xdp_mode, loader.Limits(hold_ring_pages=h.hold_ring_pages))
        os.close(loaded.prog_fd)
        self.dp = Dataplane(loaded.pin_dir)
        self.dp.add_sid(h.sids.dx6, Behaviour.END_DX6_MAP)
        self.dp.add_sid(h.sids.end_s, Behaviour.END_S)
        self.dp.add_sid(h.sids.sbuf, Behaviour.END_SBUF)
        # The SR domain as configured: add first, then remove what is no longer listed (never a gap).
        for prefix in h.sr_domain:
            self.dp.add_domain(prefix)
        for prefix in set(self.dp.list_domains()) - {str(ipaddress.IPv6Network(p)) for p in h.sr_domain}:
            self.dp.del_domain(prefix)

    def _db_connector(self) -> None:
        delay = 0.2
        while not self.stopping.is_set():
            try:
                kv = self._kv_factory()
                kv.range("hosts/")  # proves it answers
            except Exception as e:  # noqa: BLE001 - reported in status, retried
                self.status_db = {"state": "unreachable", "error": str(e), "retry_in_s": round(delay, 1)}
                log.warning("state database unreachable (%s); retrying in %.1f s", e, delay)
                self.stopping.wait(delay)
                delay = min(delay * 2, 10.0)
                continue
            self.enqueue("db-up", kv)
            return

    def run(self) -> None:
        """The worker: applies queued items until stop()."""
        while True:
            item = self.q.get()
            kind, args = item[0], item[1:]
            if kind == "stop":
                break
            try:
                getattr(self, "_on_" + kind.replace("-", "_"))(*args)
                self._last_event_ns = 0  # a later map write belongs to a later item
            except Exception as e:  # noqa: BLE001 - one bad item must not stop the agent
                log.exception("handling %s failed", kind)
                if args and isinstance(args[-1], Future) and not args[-1].done():
                    args[-1].set_exception(e)

    def stop(self) -> None:
        self.stopping.set()
        self.enqueue("stop")

    def close(self) -> None:
        """Release resources; the dataplane stays (the program keeps forwarding while no agent runs)."""
        self.stopping.set()
        if self.libvirt:
            self.libvirt.close()
        if self.ingress:
            self.ingress.close()
        for w in self._watches:
            with contextlib.suppress(Exception):
                w.cancel()
        for loc in self.local.values():
            for res in (loc.shadow, loc.keeper):
                if res is not None:
                    with contextlib.suppress(Exception):
                        res.close()
        if getattr(self, "hook_server", None):
            self.hook_server.close()
        if self.metrics:
            self.metrics.close()
        self.dbq.put((None, None))
        if self.kv:
            with contextlib.suppress(Exception):
                self.kv.close()

    # --- the database --------------------------------------------------------------------------------

    def _on_db_up(self, kv) -> None:
        self.kv, self.db = kv, VmDb(kv)
        threading.Thread(target=self._db_writer, name="db-writer", daemon=True).start()
        self.status_db = {"state": "connected", "error": None, "backend": self.cfg.db.backend}
        lease = kv.lease(LEASE_TTL_S)
        self._leases.append(lease)
        threading.Thread(target=self._keepalive, args=(lease,), name="lease", daemon=True).start()
        self._register(lease)
        if self.cfg.host:
            h = self.cfg.host
            self.db.put_host(h.sids, h.address, h.transit, lease=None)
            for e in kv.range("hosts/")[0]:  # the peers' SIDs, read once: no round trip at migration time
                self._host(e.key[len("hosts/"):])
            migs, rev = self.db.migrations()
            for vm, recs in migs.items():
                self._on_migration_records(vm, recs, replay=True)
            self._watches.append(kv.watch("migrations/", lambda evs: self.enqueue("db-migrations", evs),
                                          start_revision=rev + 1))
            from srmig.ctl.libvirt_link import LibvirtLink  # noqa: PLC0415

            if self.libvirt is None:
                self.libvirt = LibvirtLink(h.libvirt_uri, self.enqueue, factory=self._libvirt_factory)
                self.libvirt.start()
        if self.cfg.ingress:
            from srmig.ctl.ingress_role import IngressRole  # noqa: PLC0415

            self.ingress = IngressRole(self.cfg.ingress, kv, lease)
            self.ingress.start()

    def _register(self, lease) -> None:
        """The records that live as long as this agent's lease: agents/<name>, and, for an ingress,
        ingresses/<name> (migrations wait for the acks of the registered ingresses)."""
        roles = [r for r in ("host", "ingress") if getattr(self.cfg, r)]
        self.db.put_agent(self.name, {"name": self.name, "roles": roles, "pid": os.getpid(),
                                      "since": time.time()}, lease=lease)
        if self.ingress is not None:
            self.ingress.lease = lease
            self.db.register_ingress(self.cfg.ingress.name, lease)

    def _keepalive(self, lease) -> None:
        while not self.stopping.wait(LEASE_TTL_S / 3):
            try:
                alive = lease.refresh()
                if not alive:  # expired (the database was out of reach longer than the TTL): records gone
                    log.warning("lease expired: registering again")
                    lease = self.kv.lease(LEASE_TTL_S)
                    self._leases.append(lease)
                    self._register(lease)
                    alive = True
            except Exception as e:  # noqa: BLE001
                log.warning("lease refresh failed: %s", e)
                self.status_db = {"state": "degraded", "error": f"lease refresh: {e}",
                                  "backend": self.cfg.db.backend}
                continue
            if alive and self.status_db.get("state") == "degraded":  # the database is back
                log.info("lease refreshed: state database reachable again")
                self.status_db = {"state": "connected", "error": None, "backend": self.cfg.db.backend}

    # --- libvirt -------------------------------------------------------------------------------------

    def _on_libvirt_up(self, conn) -> None:
        self.reconcile(conn)

    def _on_libvirt_down(self, reason: str) -> None:
        log.warning("libvirt connection lost: %s", reason)

    def _domain(self, name: str, refresh: bool = False) -> Domain | None:
        if refresh or name not in self.domains:
            conn = self.libvirt.conn if self.libvirt else None
            if conn is None:
                return self.domains.get(name)
            try:
                d = Domain.from_xml(conn.lookupByName(name).XMLDesc(0))
            except Exception as e:  # noqa: BLE001 - gone already
                log.debug("%s: no XML (%s)", name, e)
                return self.domains.get(name)
            if d is None:
                self.domains.pop(name, None)
                return None
            self.domains[name] = d
        return self.domains.get(name)

    def _role(self, vm: str) -> str | None:
        m = self.machine.migrations.get(vm)
        if m is None or m.done:
            return None
        return "S" if m.src.name == self.name else "D" if m.dst.name == self.name else None

    def _on_lifecycle(self, name: str, typ: str, detail: str, t_ns: int) -> None:
        d = self._domain(name, refresh=typ in ("STARTED", "DEFINED"))
        log.debug("event %s %s/%s (%s)", name, typ, detail, "managed" if d else "not managed")
        if d is None:
            return
        self._last_event_ns = t_ns
        loc = self.local.setdefault(d.vm, Local())
        loc.domain, loc.tap = d.name, d.tap
        role = self._role(d.vm)
        if role is None:
            # No migration in flight that we know of. A source's pause may beat the destination's record.
            if (typ, detail) in (("SUSPENDED", "MIGRATED"), ("SUSPENDED", "POSTCOPY"), ("STOPPED", "MIGRATED")):
                self.pending_local.setdefault(d.vm, []).append((typ, detail, t_ns))
            elif typ in ("STARTED", "RESUMED") and detail not in ("MIGRATED", "POSTCOPY"):
                self._vm_running_here(d)
            return
        if role == "D" and typ == "STARTED":
            self._keep_tap(d.vm)
        ev = translate(role, {"event": "lifecycle", "type": typ, "detail": detail})
        if ev is not None:
            self._local_event(d.vm, ev, t_ns, f"{typ}/{detail}")

    def _on_iteration(self, name: str, iteration: int, t_ns: int) -> None:
        self.iterations[name] = iteration

    def _on_job_completed(self, name: str, params: dict, t_ns: int) -> None:
        """Only for success (libvirt emits nothing for a failed job); STOPPED/MIGRATED already cut over."""
        self.last_job[name] = {k: params[k] for k in ("time_elapsed", "downtime", "setup_time") if k in params}

    _UNKNOWN = object()

    def _vm_running_here(self, d: Domain, entry=_UNKNOWN, rec=_UNKNOWN) -> bool:
        """A VM runs here outside any migration: deliver it and tell the ingresses. `entry`/`rec`: its map
        entry and database record when the caller already has them (reconciliation of many VMs).
        Returns whether anything had to change."""
        if self.dp is None:
            return False
        changed = False
        cur = self.dp.get_vm(d.vm) if entry is self._UNKNOWN else entry
        if cur is None or cur.state is not VmState.RUNNING or cur.shadow:
            self.dp.set_vm(d.vm, VmState.RUNNING)
            self._mark_map_write()
            changed = True
        if self.db is not None:
            if rec is self._UNKNOWN:
                rec = self.db.vm(d.vm)
            if rec is None or rec.host != self.name or rec.segments != (self.sids.dx6,):
                self._db_async(lambda: self.db.publish(d.vm, self.name, [self.sids.dx6], Phase.STEADY.value))
                changed = True
        return changed

    # --- migrations ----------------------------------------------------------------------------------

    def _record(self, vm: str) -> dict:
        m = self.machine.migrations[vm]
        return {"id": self.mig_ids[vm], "vm": vm, "domain": self.local.get(vm, Local()).domain,
                "src": m.src.name, "dst": m.dst.name, "transit": list(m.transit),
                "events": [ev.value for ev, _ in m.history if self._seen_here(vm, ev)],
                "resent": [f.hex() for f in (self.local[vm].drain.resent_swallowed
                                             if vm in self.local and self.local[vm].drain else [])],
                "returned": self.local[vm].returned if vm in self.local else None}

    def _seen_here(self, vm, ev) -> bool:
        return ev in self._local_events.get(vm, ())

    def _local_event(self, vm: str, ev: Ev, t_ns: int, what: str) -> None:
        """`what` this host saw (a libvirt event, a reconciliation finding) that means `ev`."""
        log.debug("%s: %s -> %s", vm, what, ev.value)
        self._last_event_ns = t_ns
        self._local_events.setdefault(vm, set()).add(ev)
        m = self.machine.migrations[vm]
        role = self._role(vm)
        if ev is Ev.SUSPENDED and vm in self.local:
            self.local[vm].stopped_ns = t_ns
        actions = self.machine.handle(vm, ev)
        if ev is Ev.FAILED and role == "D":
            # Abort on the destination: say so at once, but return what D held only once the source runs
            # the VM again (the source writes "failed" after it did), or it would bounce back here.
            self.local.setdefault(vm, Local()).deferred = actions
            self._put_record(vm)
            self._maybe_return(vm)
            return
        self._execute(m, actions)
        self._observe_phase(m)
        self._put_record(vm)
        if ev is Ev.RESUMED and role == "D":
            self._enqueue_later(SOURCE_SILENT_S, "source-check", vm, self.mig_ids[vm])

    def _on_source_check(self, vm: str, mid: str) -> None:
        """The VM runs here but the source never said it paused: its agent is down (or far behind), so nobody
        drains it and its map still delivers to a paused QEMU. Cut the ingresses over to us now instead of
        at the source's STOPPED: what is lost is bounded by pause -> resume, not by the source's restart."""
        m = self.machine.migrations.get(vm)
        if self.mig_ids.get(vm) != mid or m is None or m.done or m.phase is not Phase.RESUMED:
            return
        if any(ev is Ev.SUSPENDED and ev not in self._local_events.get(vm, ()) for ev, _ in m.history):
            return  # the source reported its pause: it is alive, STOPPED will cut over
        log.warning("%s: source %s silent since the pause; cutting the ingresses over to %s", vm, m.src.name,
                    self.name)
        step = m.version + 1  # the step the cut-over will have: written once, whoever gets there first
        self._db_async(lambda: self.db.publish(vm, self.name, [m.dst.dx6], Phase.CUT_OVER.value, mid, step))
        self.early_cutovers += 1

    def _on_db_migrations(self, events) -> None:
        touched: dict[str, dict] = {}
        for ev in events:
            if ev.kind != "put":
                continue
            vm, _, host = ev.key[len("migrations/"):].rpartition("/")
            touched.setdefault(vm, {})[host] = ev.value
        for vm, recs in touched.items():
            self._on_migration_records(vm, recs)

    def _on_migration_records(self, vm: str, recs: dict[str, dict], replay: bool = False) -> None:
        """Records of the ends of one migration: start it here if it involves us, feed the other end's
        events. `replay`: after a restart, our own records too (their actions were applied once already)."""
        for host, rec in sorted(recs.items(), key=lambda kv: kv[0] != self.name):
            if self.name not in (rec["src"], rec["dst"]):
                continue
            mid = rec["id"]
            if self.mig_ids.get(vm) != mid:
                if not self._start_migration(vm, rec):
                    continue
            if host == self.name and not replay:
                continue
            done = self.fed.get((vm, mid, host), 0)
            new = rec["events"][done:]
            self.fed[(vm, mid, host)] = len(rec["events"])
            m = self.machine.migrations[vm]
            last_write = None
            for name in new:
                ev = Ev(name)
                if host == self.name:
                    self._local_events.setdefault(vm, set()).add(ev)
                actions = self.machine.handle(vm, ev)
                if replay and host == self.name:
                    # We applied these steps before a restart: of their map writes only the last one still
                    # holds. An earlier one would take the map back in time meanwhile (the source's
                    # provision state delivers to a QEMU that is gone).
                    writes = [a for a in actions if isinstance(a, (SetVm, Drain)) and a.host == self.name]
                    last_write = writes[-1] if writes else last_write
                    actions = [a for a in actions if not any(a is w for w in writes)]
                self._execute(m, actions, replay=replay and host == self.name)
            if last_write is not None:
                self._execute(m, [last_write], replay=True)
            self._observe_phase(m)
            if host != self.name and rec.get("resent") and vm in self.local:
                self.local[vm].peer_resent = [bytes.fromhex(h) for h in rec["resent"]]
            if host != self.name and "failed" in rec["events"] and rec["src"] == host:
                self._maybe_return(vm, source_failed=True)
            if host != self.name and rec.get("returned") is not None and rec["dst"] == host:
                self._on_unpark(vm, mid, rec["returned"])
        # Events seen here before the record existed (the source's pause can beat the watch).
        for typ, detail, t_ns in self.pending_local.pop(vm, []):
            if self._role(vm):
                ev = translate(self._role(vm), {"event": "lifecycle", "type": typ, "detail": detail})
                if ev:
                    self._local_event(vm, ev, t_ns, f"{typ}/{detail}")

    def _start_migration(self, vm: str, rec: dict) -> bool:
        src, dst = self._host(rec["src"]), self._host(rec["dst"])
        if src is None or dst is None:
            log.error("migration %s of %s: unknown host %s", rec["id"], vm, rec["src"] if src is None else rec["dst"])
            return False
        old = self.machine.migrations.get(vm)
        if old is not None and not old.done:
            old.done = True  # superseded by a newer migration of the same VM
        self.machine.migrations.pop(vm, None)
        self.machine.start(vm, src[0], dst[0], tuple(rec.get("transit", ())))
        self.mig_ids[vm] = rec["id"]
        self._local_events[vm] = set()
        loc = self.local.setdefault(vm, Local())
        if rec.get("domain"):
            loc.domain = rec["domain"]
            d = self.domains.get(rec["domain"])
            if d:
                loc.tap = d.tap
        return True

    def _maybe_return(self, vm: str, source_failed: bool = False) -> None:
        loc = self.local.get(vm)
        if loc is None or not loc.deferred:
            return
        recs = self.db.migrations()[0].get(vm, {})
        m = self.machine.migrations.get(vm)
        src_rec = recs.get(m.src.name) if m else None
        if not source_failed and not (src_rec and "failed" in src_rec.get("events", [])):
            return
        actions, loc.deferred = loc.deferred, []
        self._execute(m, actions)

    def _on_hook_begin(self, domain_xml: str, fut: Future) -> None:
        """`migrate begin` on this (destination) host: provision before QEMU even starts."""
        d = Domain.from_xml(domain_xml)
        if d is None:
            fut.set_result({"managed": False})
            return
        if self.db is None:
            raise RuntimeError("state database not connected")
        self.domains[d.name] = d
        cur = self.db.vm(d.vm)
        if cur is None or cur.host == self.name:
            raise RuntimeError(f"{d.vm}: no source known in the state database (record: {cur})")
        src = self._host(cur.host)
        if src is None:
            raise RuntimeError(f"{d.vm}: source host {cur.host} has no record in the state database")
        mid = uuid.uuid4().hex[:12]
        rec = {"id": mid, "vm": d.vm, "domain": d.name, "src": cur.host, "dst": self.name,
               "transit": src[1].get("transit", []), "events": []}
        self._start_migration(d.vm, rec)
        loc = self.local[d.vm]
        loc.domain, loc.tap = d.name, d.tap
        self._last_event_ns = time.monotonic_ns()
        self._local_events[d.vm].add(Ev.BEGIN)
        m = self.machine.migrations[d.vm]
        pub = self._execute(m, self.machine.handle(d.vm, Ev.BEGIN))
        self._observe_phase(m)
        self._put_record(d.vm)
        # Answered by the writer once the new segment list is in the database (FIFO: `pub` is done then).
        self._db_async(lambda: fut.set_result({"managed": True, "vm": d.vm, "migration": mid,
                                               "version": pub.result() if pub else 0}))

    def _on_grace_over(self, vm: str, mid: str) -> None:
        if self.mig_ids.get(vm) != mid:
            return
        m = self.machine.migrations[vm]
        self._execute(m, self.machine.handle(vm, Ev.GRACE_OVER))
        self._observe_phase(m)

    # --- actions -------------------------------------------------------------------------------------

    def _mark_map_write(self) -> None:
        if self._last_event_ns:
            ms = (time.monotonic_ns() - self._last_event_ns) / 1e6
            self.latencies_ms = (self.latencies_ms + [ms])[-1000:]
            if self.metrics:
                self.metrics.event_to_map.observe(ms / 1000)
            self._last_event_ns = 0

    def _observe_phase(self, m: Migration) -> None:
        prev = self.phase_started.get(m.vm)
        now = time.monotonic()
        if prev and prev[0] != m.phase.value and self.metrics:
            self.metrics.phase_seconds.labels(prev[0]).observe(now - prev[1])
        if not prev or prev[0] != m.phase.value:
            self.phase_started[m.vm] = (m.phase.value, now)

    def _execute(self, m: Migration, actions, replay: bool = False) -> Future | None:
        """Apply the actions for this host (and every Publish, on the writer thread); returns the future of
        the last published version."""
        version = None
        loc = self.local.setdefault(m.vm, Local())
        for a in actions:
            if isinstance(a, Publish):
                phase = m.phase.value
                host = m.dst.name if m.phase in (Phase.CUT_OVER,) else m.src.name
                mid = self.mig_ids.get(a.vm, "")
                version = self._db_async(lambda a=a, host=host, phase=phase, mid=mid:
                                         self.db.publish(a.vm, host, a.segments, phase, mid, a.version))
                continue
            if isinstance(a, StartGrace):
                if m.src.name == self.name:
                    # From the moment the cut-over is in the database and every ingress applied it (not
                    # before: while the database is down, or an ingress agent restarts, the ingresses still
                    # send here and we must keep forwarding). A dead ingress stays registered for its lease's
                    # TTL at most: wait no longer for its ack.
                    def grace(f, a=a, mid=self.mig_ids[a.vm]):
                        def wait():
                            with contextlib.suppress(Exception):  # no version, database down: no ack wait
                                if (v := f.result()) and (late := self.db.wait_acks(a.vm, v, LEASE_TTL_S)):
                                    log.warning("%s: ingresses %s never applied version %d", a.vm, late, v)
                            if not self.stopping.wait(a.seconds):
                                self.enqueue("grace-over", a.vm, mid)
                        threading.Thread(target=wait, name="grace", daemon=True).start()
                    (version or self._db_async(lambda: None)).add_done_callback(grace)
                continue
            if getattr(a, "host", None) != self.name:
                continue
            if isinstance(a, SetVm):
                if a.state is VmState.INCOMING or a.shadow:
                    self._long_queue(loc)
                if a.park:  # D returns to our End.SBUF: Unpark waits until that many more were delivered
                    from srmig.ctl.drain import sid_delivered  # noqa: PLC0415

                    loc.sbuf_base = sid_delivered(self.dp, m.src.sbuf)
                if a.shadow and self.cfg.host.drain and loc.shadow is None:
                    from srmig.ctl.swallow import ShadowLog  # noqa: PLC0415

                    loc.shadow = ShadowLog(self.dp).start()  # before the flag: miss nothing
                self.dp.set_vm(a.vm, a.state, next_sid=a.next_sid, shadow=a.shadow and self.cfg.host.drain,
                               park=a.park)
                self._mark_map_write()
                if a.park:  # D returns what it held: the window stays open until it and what parks are in
                    self._long_queue(loc)
                elif a.state is VmState.RUNNING and not a.shadow:  # resumed here, or abort before the pause
                    self._end_window(loc)
            elif isinstance(a, DelVm):
                self.dp.del_vm(a.vm)
                self._mark_map_write()
                self._end_window(loc)
            elif isinstance(a, Drain):
                if replay:
                    self.dp.set_vm(a.vm, VmState.AWAY, next_sid=a.next_sid)
                else:
                    self._drain(m, loc, a)
            elif isinstance(a, KeepTap):
                loc.keep_wanted = True
                self._keep_tap(a.vm)
            elif isinstance(a, ReturnHeld):
                self._return_held(m, loc, a)
            elif isinstance(a, Unpark):
                # Once D says how many it returned (its record), or after RETURN_WAIT_S without word from it.
                mid = loc.unpark = self.mig_ids.get(a.vm, "")
                self._enqueue_later(RETURN_WAIT_S, "unpark", a.vm, mid, None)
        return version

    def _on_unpark(self, vm: str, mid: str, returned: int | None) -> None:
        """Abort on the source: D's held packets are back (`returned` of them, to our End.SBUF; None: D
        never said, given up after RETURN_WAIT_S): deliver what we parked meanwhile, in order."""
        from srmig.ctl.drain import unpark, wait_delivered  # noqa: PLC0415

        loc = self.local.get(vm)
        m = self.machine.migrations.get(vm)
        if loc is None or m is None or loc.unpark != mid or not mid:
            return
        loc.unpark = None
        t0 = time.monotonic()
        missing = wait_delivered(self.dp, m.src.sbuf, loc.sbuf_base + returned) if returned else 0
        t_wait = time.monotonic()
        try:
            n = unpark(self.dp, vm, loc.tap)
        except OSError as e:
            log.error("%s: delivering the parked packets failed (%s); delivering directly", vm, e)
            self.dp.set_vm(vm, VmState.RUNNING)
            return
        finally:
            self._end_window(loc)  # its long queue kept until QEMU has read what we just gave it
        log.info("%s: %s (%d not arrived after %.0f ms); delivered %d packets parked meanwhile in %.0f ms", vm,
                 f"{returned} returned by {m.dst.name}" if returned is not None else
                 f"no word from {m.dst.name} in {RETURN_WAIT_S} s", missing, (t_wait - t0) * 1000, n,
                 (time.monotonic() - t_wait) * 1000)

    def _drain(self, m: Migration, loc: Local, a: Drain) -> None:
        from srmig.ctl.drain import SourceDrain  # noqa: PLC0415

        segments = [*m.transit, m.dst.sbuf]
        pid = self._qemu_pid(loc.domain)
        queue = self._tap_queue(loc, pid)
        if queue is None:
            # QEMU is gone (we restarted after libvirt's confirm): its tap queue with it. The hold ring is the
            # program's and outlives us: what it parked while a drain we were killed in held the VM goes
            # first (the drain's steps 3-4), then the rest is forwarded directly.
            rep = SourceDrain(self.dp, a.vm, self.cfg.host.address, segments, a.next_sid).ring_only()
            self._mark_map_write()
            log.warning("%s: no QEMU tap queue; forwarding without a drain (%d from the ring, %d the killed "
                        "drain had sent)", m.vm, rep.from_ring, rep.ring_sent_before)
            return
        drain = loc.drain = SourceDrain(self.dp, a.vm, self.cfg.host.address, segments, a.next_sid)
        self._mark_map_write()  # the drain's first step is the map write (HOLD)
        check = _BoundedCheck(loc.check) if loc.check is not None else None
        stopped_ns, stopped_how = self._stopped_ns(loc)
        try:
            with queue:
                rep = drain.run(queue, check=check, shadow=loc.shadow, stopped_at_ns=stopped_ns)
            log.info("%s: drained %d from the tap%s, %d from the ring, %d swallowed re-sent (swallowed %s, "
                     "baseline %s, shadow %s; %s)%s", m.vm, rep.from_tap, "" if pid else " (QEMU gone)",
                     rep.from_ring, rep.resent_swallowed, rep.swallowed, loc.check is not None,
                     loc.shadow is not None, stopped_how,
                     (f"; not re-sent: {rep.swallow_miss}" if rep.swallow_miss else "")
                     + (f"; {rep.ring_sent_before} from the ring sent before a restart" if rep.ring_sent_before
                        else ""))
        except OSError as e:
            log.error("%s: drain failed (%s); forwarding", m.vm, e)
            self.dp.set_vm(a.vm, VmState.AWAY, next_sid=a.next_sid)

    def _stopped_ns(self, loc: Local) -> tuple[int, str]:
        """When the source QEMU stopped reading its tap, and where that time comes from: QEMU's STOP event
        when libvirt passed it on, else when we heard SUSPENDED (later, by our own latency)."""
        heard = loc.stopped_ns
        qemu = self.libvirt.qemu_stopped_ns(loc.domain, heard) if self.libvirt and heard else None
        if qemu is None:
            return heard, "STOP as heard"
        return qemu, f"SUSPENDED heard {(heard - qemu) / 1e6:.1f} ms after QEMU's STOP"

    def _return_held(self, m: Migration, loc: Local, a: ReturnHeld) -> None:
        from srmig.ctl.drain import return_held  # noqa: PLC0415

        skip = loc.peer_resent[-1:]
        loc.returned = 0 if loc.keeper is None else return_held(loc.keeper, self.cfg.host.address,
                                                                 list(a.segments), skip)
        log.info("%s: returned %d held packets to %s", m.vm, loc.returned, m.src.name)
        self._put_record(m.vm)  # "returned": the source delivers what it parked once those are in

    def _qemu_pid(self, domain: str | None) -> int | None:
        if not domain:
            return None
        try:
            return int((Path(self.cfg.host.qemu_run_dir) / f"{domain}.pid").read_text().strip())
        except (OSError, ValueError):
            return None

    def _keep_tap(self, vm: str) -> None:
        from srmig.ctl.tap import TapKeeper  # noqa: PLC0415

        loc = self.local.get(vm)
        if loc is None or not loc.keep_wanted or loc.keeper is not None or loc.tap is None:
            return
        pid = self._qemu_pid(loc.domain)
        if pid is None:
            return  # QEMU not started yet (the hook runs before it): STARTED/MIGRATED tries again
        try:
            loc.keeper = TapKeeper(pid, loc.tap)
        except OSError as e:
            log.debug("%s: tap not held yet: %s", vm, e)

    @staticmethod
    def _tap_queue(loc: Local, pid: int | None):
        """The tap's queue (a TapKeeper, now the caller's): the fds kept since the migration began (KeepTap),
        or taken from QEMU (`pid`) now; None if there is neither (QEMU gone, or ending as we look)."""
        from srmig.ctl.tap import TapKeeper  # noqa: PLC0415

        queue, loc.keeper = loc.keeper, None
        if queue is None and pid is not None and loc.tap:
            with contextlib.suppress(OSError):
                queue = TapKeeper(pid, loc.tap)
        return queue

    def _long_queue(self, loc: Local) -> None:
        """The migration window opens (or is extended): the tap's queue long, set again even if it is already
        (a restarted libvirtd resets it when it reconnects to QEMU)."""
        if not loc.tap:
            return
        from srmig.ctl.tap import tap_queue_len  # noqa: PLC0415

        loc.window += 1  # a restore still waiting for an earlier window's backlog gives up
        old = tap_queue_len(loc.tap, self.cfg.host.tap_queue)
        if loc.old_qlen is None:
            loc.old_qlen = old

    def _end_window(self, loc: Local) -> None:
        """The window closes: the shadow log and the kept tap fds go; the queue length is restored once what
        the tap holds has been read (QUEUE_RESTORE_MAX_S at most)."""
        if loc.shadow is not None:
            with contextlib.suppress(Exception):
                loc.shadow.close()
            loc.shadow = None
        if loc.old_qlen is not None:
            queue = self._tap_queue(loc, self._qemu_pid(loc.domain))
        else:
            queue, loc.keeper = loc.keeper, None
        self._on_restore_queue(loc, loc.window, queue, time.monotonic() + QUEUE_RESTORE_MAX_S)

    def _on_restore_queue(self, loc: Local, window: int, queue, deadline: float) -> None:
        from srmig.ctl.tap import restore_queue_len  # noqa: PLC0415

        if loc.old_qlen is not None and loc.tap and window == loc.window:
            try:
                if not restore_queue_len(loc.tap, loc.old_qlen, queue) and time.monotonic() < deadline:
                    self._enqueue_later(QUEUE_POLL_S, "restore-queue", loc, window, queue, deadline)
                    return
            except Exception as e:  # noqa: BLE001 - the tap went meanwhile
                log.debug("tap %s: queue length not restored: %s", loc.tap, e)
            loc.old_qlen = None
        if queue is not None:
            queue.close()

    def _try_baseline(self, vm: str) -> bool:
        """The source's count of frames QEMU read but did not deliver needs a quiet moment: try now and
        then while the VM runs here outside a migration (srmig.ctl.drain.SwallowCheck)."""
        loc = self.local.get(vm)
        if loc is None or not self.cfg.host.drain or self._role(vm) or loc.tap is None or self.libvirt is None:
            return False
        from srmig.ctl.swallow import SwallowCheck  # noqa: PLC0415

        conn = self.libvirt.conn
        if conn is None:
            return False
        try:
            link, name, cache = self.libvirt, loc.domain, {}

            def rx_used() -> int:  # on the current connection: libvirtd may have restarted since
                c = link.conn
                if c is None:
                    raise RuntimeError("libvirt not connected")
                if cache.get("conn") is not c:
                    dom = c.lookupByName(name)
                    cache.update(conn=c, dom=dom, path=_virtio_net_path(dom))
                return _rx_used_idx(cache["dom"], cache["path"])
            check = SwallowCheck(loc.tap, rx_used)
            if check.baseline(tries=BASELINE_TRIES):  # few tries: under traffic, try again later
                loc.check = check
                return True
        except Exception as e:  # noqa: BLE001 - best effort
            log.debug("%s: no swallow baseline: %s", vm, e)
        return False

    def _baselines(self) -> None:
        """On the timer's thread, never the worker's (each try costs a QMP round trip through libvirt): a few
        VMs per tick, those without a baseline first, none in a migration."""
        local = dict(self.local)
        vms = sorted(local, key=lambda v: local[v].check is not None)
        for vm in vms[:BASELINE_PER_TICK]:
            if self.dp is not None and (e := self.dp.get_vm(vm)) and e.state is VmState.RUNNING and not e.shadow:
                self._try_baseline(vm)

    # --- reconciliation ------------------------------------------------------------------------------

    def reconcile(self, conn) -> dict:
        """Rebuild the map state from libvirt's domains and the database, after our start or a reconnect."""
        import libvirt  # noqa: PLC0415

        t0 = time.monotonic()
        seen = {}
        for dom in conn.listAllDomains(0):
            try:
                d = Domain.from_xml(dom.XMLDesc(0))
                state, reason = dom.state()
            except libvirt.libvirtError:
                continue
            if d is None:
                continue
            self.domains[d.name] = d
            loc = self.local.setdefault(d.vm, Local())
            loc.domain, loc.tap = d.name, d.tap
            seen[d.vm] = (d, state, reason)
        out = self.reconcile_snapshot(seen, t0)
        for vm, (d, state, reason) in seen.items():
            if self._source_here(vm) and state == libvirt.VIR_DOMAIN_PAUSED and \
                    reason == libvirt.VIR_DOMAIN_PAUSED_MIGRATION:
                self._on_recheck(vm, self.mig_ids.get(vm, ""))
        return out

    def _source_here(self, vm: str) -> bool:
        """We are the source of `vm`'s migration, still going or aborted by the destination's failure, and
        have not seen the VM run here again nor go. After an abort D returns what it held only once our
        record says "failed" (the VM runs here again), so that must be said even if D's failure came first."""
        m = self.machine.migrations.get(vm)
        return m is not None and m.src.name == self.name and (not m.done or m.phase is Phase.ABORT) and \
            not self._local_events.get(vm, set()) & {Ev.FAILED, Ev.STOPPED}

    def _on_recheck(self, vm: str, mid: str) -> None:
        """The source VM is paused by its migration after a reconnect. If libvirtd restarted, it cannot keep
        the outgoing job: it recovers it, resuming the domain without a lifecycle event (or it goes, if the
        migration had completed). Poll its state until it runs (FAILED: we have the VM back) or is gone."""
        import libvirt  # noqa: PLC0415

        conn = self.libvirt.conn if self.libvirt else None
        if self.mig_ids.get(vm) != mid or not self._source_here(vm) or conn is None:
            return
        try:
            state = conn.lookupByName(self.local[vm].domain).state()[0]
        except libvirt.libvirtError as e:
            if e.get_error_code() != libvirt.VIR_ERR_NO_DOMAIN:
                return  # the connection is going: the next reconnect reconciles again
            state = None
        if state is None:
            self._local_event(vm, Ev.STOPPED, time.monotonic_ns(), "recheck: gone")
        elif state == libvirt.VIR_DOMAIN_RUNNING:
            self._local_event(vm, Ev.FAILED, time.monotonic_ns(), "recheck: resumed")
        else:
            self._enqueue_later(RECHECK_S, "recheck", vm, mid)

    def reconcile_snapshot(self, seen: dict, t0: float | None = None) -> dict:
        """`seen`: {vm: (Domain, libvirt state, reason)} of this host. Pure of libvirt: benchmarks call it."""
        import libvirt  # noqa: PLC0415

        t0 = t0 or time.monotonic()
        running = libvirt.VIR_DOMAIN_RUNNING
        paused = libvirt.VIR_DOMAIN_PAUSED
        fixed = 0
        # One read of the map and of the database for all VMs: then only what differs is written.
        entries = {e.vm: e for e in self.dp.list_vms()} if self.dp is not None else {}
        records = {r.vm: r for r in self.db.vms()[0]} if self.db is not None else {}
        for vm, (d, state, reason) in seen.items():
            role = self._role(vm)
            if role is None and state == running:
                fixed += self._vm_running_here(d, entries.get(vm), records.get(vm))
            elif role == "D" and state == running:
                self._local_event(vm, Ev.RESUMED, time.monotonic_ns(), "reconcile: running")
            elif role == "S" and state == paused and reason in (libvirt.VIR_DOMAIN_PAUSED_MIGRATION,
                                                                libvirt.VIR_DOMAIN_PAUSED_POSTCOPY):
                self._local_event(vm, Ev.SUSPENDED, time.monotonic_ns(), "reconcile: paused")
        for vm in list(self.machine.migrations):
            role = self._role(vm)
            if role == "S" and vm not in seen:
                self._local_event(vm, Ev.STOPPED, time.monotonic_ns(), "reconcile: gone")
            elif self._source_here(vm) and vm in seen and seen[vm][1] == running and \
                    Ev.SUSPENDED in self._local_events.get(vm, ()):
                self._local_event(vm, Ev.FAILED, time.monotonic_ns(), "reconcile: resumed")
        # Map entries nothing explains: VMs no longer here and in no migration. AWAY entries forward
        # stragglers: give them a fresh grace period.
        if self.dp is not None:
            for e in entries.values():
                if e.vm in seen or self._role(e.vm):
                    continue
                if e.state is VmState.AWAY:
                    self._enqueue_later(self.cfg.host.grace_s, "forget", e.vm)
                else:
                    self.dp.del_vm(e.vm)
                    fixed += 1
        self._start_baseline_timer(first_s=0.05)  # at once: the VMs may be quiet now, not later
        return {"vms": len(seen), "fixed": fixed, "seconds": round(time.monotonic() - t0, 4)}

    def _on_noop(self, fut: Future) -> None:
        fut.set_result(None)

    def _on_forget(self, vm: str) -> None:
        if not self._role(vm) and self.dp is not None and (e := self.dp.get_vm(vm)) and e.state is VmState.AWAY:
            self.dp.del_vm(vm)

    def _start_baseline_timer(self, first_s: float = BASELINE_EVERY_S) -> None:
        if self._baseline_timer is not None or self.stopping.is_set():
            return

        def tick():
            self._baseline_timer = None
            if not self.stopping.is_set():
                self._baselines()
                self._start_baseline_timer()
        self._baseline_timer = threading.Timer(first_s, tick)
        self._baseline_timer.daemon = True
        self._baseline_timer.start()

    # --- status --------------------------------------------------------------------------------------

    def _on_status(self, fut: Future) -> None:
        out = {"agent": self.name, "pid": os.getpid(),
               "roles": [r for r in ("host", "ingress") if getattr(self.cfg, r)],
               "db": dict(self.status_db, pending_writes=self.dbq.qsize(), write_error=self.db_backlog_error),
               "libvirt": self.libvirt.status() if self.libvirt else None,
               "ingress": self.ingress.status() if self.ingress else None}
        if self.cfg.host:
            vms = []
            entries = {e.vm: e for e in self.dp.list_vms()} if self.dp else {}
            for vm in sorted(set(entries) | set(self.machine.migrations)):
                m = self.machine.migrations.get(vm)
                e = entries.get(vm)
                loc = self.local.get(vm, Local())
                vms.append({"vm": vm, "domain": loc.domain,
                            "baseline": loc.check is not None,
                            # the hold at the destination is the tap's queue: what overflowed it
                            "tap_dropped": _tap_dropped(loc.tap),
                            "state": e.state.name.lower() if e else None,
                            "phase": m.phase.value if m and not m.done else "steady",
                            "migration": ({"id": self.mig_ids.get(vm), "src": m.src.name, "dst": m.dst.name,
                                           "done": m.done} if m else None)})
            out["vms"] = vms
            out["dataplane"] = self.dp.stats() if self.dp else None
            lat = sorted(self.latencies_ms)
            out["event_to_map_ms"] = ({"n": len(lat), "p50": lat[len(lat) // 2],
                                       "p99": lat[min(len(lat) - 1, int(len(lat) * 0.99))], "max": lat[-1]}
                                      if lat else None)
        if self.db is not None:
            with contextlib.suppress(Exception):
                recs, _ = self.db.vms()
                out["locations"] = [r.to_dict() for r in recs]
        fut.set_result(out)


class _BoundedCheck:
    """SwallowCheck.swallowed() through libvirt's monitor passthrough, bounded: during stop-and-copy QEMU may
    answer late (its migration thread holds the big lock while saving devices) or the domain may already be
    gone. Then the count is unknown (None): the drain goes on without re-sending the swallowed frame (at most
    one or two packets, counted as not recovered) rather than hold everything while waiting.

    Waiting loses nothing: the program parks the newer packets in the hold ring meanwhile, sent right after
    (only a drain late enough for the destination to cut over without us reorders them). Under one busy loop
    on 2 cores the count took 10-67 ms, and once 124 ms: 0.1 s timed out there and the swallowed probe was
    lost. 0.3 s leaves room for that."""

    TIMEOUT_S = 0.3

    def __init__(self, check):
        self.check = check

    def swallowed(self) -> int | None:
        fut: Future = Future()

        def ask():
            try:
                fut.set_result(self.check.swallowed())
            except Exception as e:  # noqa: BLE001
                fut.set_exception(e)
        threading.Thread(target=ask, daemon=True, name="swallow-check").start()
        try:
            return fut.result(self.TIMEOUT_S)
        except Exception as e:  # noqa: BLE001 - timeout or libvirt error
            log.warning("swallowed-frame count unknown (%s): not recovered", type(e).__name__)
            return None


def _tap_dropped(tap: str | None) -> int | None:
    """Frames the VM's tap refused because its queue was full (the kernel's tx_dropped), None: no tap here."""
    if not tap:
        return None
    from pyroute2 import IPRoute  # noqa: PLC0415

    with IPRoute() as ipr:
        idx = ipr.link_lookup(ifname=tap)
        if not idx:
            return None
        return ipr.get_links(idx[0])[0].get_attr("IFLA_STATS64")["tx_dropped"]


def _qmp(dom, cmd: str, **args):
    """One QMP command through libvirt's QEMU monitor passthrough."""
    import libvirt_qemu  # noqa: PLC0415

    req = {"execute": cmd, "arguments": args} if args else {"execute": cmd}
    return json.loads(libvirt_qemu.qemuMonitorCommand(dom, json.dumps(req), 0))["return"]


def _virtio_net_path(dom) -> str:
    return next(d["path"] for d in _qmp(dom, "x-query-virtio") if d.get("name") == "virtio-net")


def _rx_used_idx(dom, path: str) -> int:
    """The virtio-net RX used index (QMP x-query-virtio-queue-status)."""
    return _qmp(dom, "x-query-virtio-queue-status", path=path, queue=0)["used-idx"]


def run(cfg: Config) -> int:
    """`srmig agent`: run until SIGTERM/SIGINT."""
    import signal  # noqa: PLC0415

    agent = Agent(cfg)
    agent.start()
    signal.signal(signal.SIGTERM, lambda *_: agent.stop())
    signal.signal(signal.SIGINT, lambda *_: agent.stop())
    log.info("srmig agent %s up (roles: %s)", agent.name,
             ", ".join(r for r in ("host", "ingress") if getattr(cfg, r)))
    try:
        agent.run()
    finally:
        agent.close()
    return 0


__all__ = ["Agent", "Domain", "VmRecord", "metadata_xml", "run"]
