"""The agent's host role: a hypervisor's VMs through their migrations. libvirt's events (srmig.ctl.libvirt_link)
and the other end's records (migrations/<host>/<vm>, srmig.ctl.vmdb) become the state machine's events
(srmig.ctl.machine); the actions for this host go to the executor (srmig.ctl.executor), Publish and the
grace period to the database. After a restart or a libvirt reconnect, reconciliation rebuilds the maps
from the domains' states and the database.

The two ends of a migration run their own state machine over the same events: each end applies the actions
for its own host (plus the idempotent Publish) and writes the events it saw to migrations/<host>/<vm> only
after applying them; the other end feeds those to its machine.

Every method runs on the agent's one worker (srmig.ctl.agent), except where a docstring says otherwise.
"""

from __future__ import annotations

import collections
import contextlib
import ipaddress
import logging
import os
import threading
import time
import uuid
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path

from srmig.bpf.abi import VmState
from srmig.ctl import reconcile, records, work
from srmig.ctl.baseline import Baselines
from srmig.ctl.config import Config
from srmig.ctl.dblink import LEASE_TTL_S, DbLink
from srmig.ctl.drain import sid_delivered
from srmig.ctl.executor import Executor, Owner, VmLocal
from srmig.ctl.fdstore import FdStore, NoStore
from srmig.ctl.libvirt_events import translate
from srmig.ctl.libvirt_link import Domain, LibvirtLink
from srmig.ctl.machine import Drain, Ev, Machine, Migration, Publish, SetVm, StartGrace
from srmig.ctl.maps import vm_spelling
from srmig.ctl.phases import Phase
from srmig.ctl.records import Rejected
from srmig.ctl.statedb import PermissionDenied
from srmig.ctl.swallow import MAX_SWALLOWED, Arrival, ArrivedCheck, SwallowCheck
from srmig.ctl.tap import tap_mcast_sent, tap_tx_packets

log = logging.getLogger("srmig.agent")
SOURCE_SILENT_S = 0.05  # the destination resumed and the source has not reported its pause for this long
FENCE_POLL_S = 0.5      # a copy to fence, not running yet (or libvirt down): looked at again this often
FENCE_WATCH_S = 30.0    # and for this long after the source's record said the migration failed
RX_USED_WAIT_S = 0.3    # the longest the destination's cut-over for a silent source waits for QMP's answer


@dataclass
class Track:
    """What the agent knows of one VM's migration (its resources on this host: executor.VmLocal)."""

    migration: str | None = None   # the id of the migration the machine runs
    seen: set = field(default_factory=set)        # events this host saw (not its peer)
    fed: dict = field(default_factory=dict)       # (migration id, host) -> events of its record fed
    pending: list = field(default_factory=list)   # local events seen before the migration record
    deferred: list = field(default_factory=list)  # actions waiting for the other end (abort on D)
    phase: tuple[str, float] | None = None        # the phase and since when (metrics)
    source_failed: bool = False  # the source's record says the migration failed (its copy runs again)
    fence_until: float | None = None  # until when a copy not (yet) running here is looked at again (fence)
    fence_polling: bool = False       # a look again is scheduled
    started: bool = False  # destination: libvirt started the incoming QEMU (STARTED/MIGRATED heard)


class HostRole:
    def __init__(self, cfg: Config, dbl: DbLink, enqueue: Callable[[work.Item], None],
                 later: Callable[[float, work.Item], None], stopping: threading.Event, libvirt_factory=None):
        self.cfg = cfg
        self.name = cfg.name
        self.dbl = dbl
        self.enqueue = enqueue
        self.later = later
        self.stopping = stopping
        self._libvirt_factory = libvirt_factory
        self.machine = Machine(grace_s=cfg.host.grace_s, drain=cfg.host.drain)
        self.sids = cfg.host.sids
        self.executor: Executor | None = None       # once the maps are loaded
        self.domains: dict[str, Domain] = {}       # name -> Domain
        self.vm_addresses: dict[str, tuple[str, ...]] = {}  # vm -> all its addresses, the vm first
        self._address_vm: dict[str, str] = {}        # address -> the vm whose it is now (set_addresses)
        self.rejected_domains: dict[str, str] = {}  # domain name -> why srmig does not manage it (status)
        self.tracks: dict[str, Track] = {}          # vm -> Track
        self.libvirt: LibvirtLink | None = None
        self.baselines: Baselines | None = None      # the swallowed-frame baselines (with libvirt)
        self.metrics = None                          # srmig.ctl.metrics, when served
        self._watches = []
        self._last_event_ns = 0                      # the event the next map write answers (0: none)
        self.latencies_ms: list[float] = []          # event -> first map write, last 1000
        self._hosts: dict[str, tuple] = {}            # host records (they change only with a host's config)
        self.fenced: dict[str, dict] = {}             # vm -> the copy we paused, and why (fence(); status)

    @property
    def dp(self):
        """This host's maps (srmig.ctl.maps.Dataplane), None before they are loaded."""
        return self.executor.dp if self.executor else None

    @property
    def db(self):
        return self.dbl.db

    def done_with_item(self) -> None:
        self._last_event_ns = 0  # a later map write belongs to a later item

    def track(self, vm: str) -> Track:
        return self.tracks.setdefault(vm, Track())

    def _local(self, vm: str) -> VmLocal | None:
        return self.executor.vm(vm) if self.executor else None

    def _host(self, name: str):
        """`name`'s SIDs and record, None when it has no well-formed one (VmDb.host logged and counted)."""
        if name not in self._hosts:
            h = self.db.host(name)
            if h is None:
                return None
            self._hosts[name] = h
        return self._hosts[name]

    def load_dataplane(self, fds: FdStore) -> None:
        """Load (or find pinned) the XDP program and its maps; `fds`: where kept tap fds outlive us."""
        from srmig.bpf import loader  # noqa: PLC0415
        from srmig.bpf.abi import Behaviour  # noqa: PLC0415
        from srmig.ctl.maps import Dataplane  # noqa: PLC0415

        h = self.cfg.host
        loaded = loader.load(h.fabric, h.xdp_mode, loader.Limits(hold_ring_pages=h.hold_ring_pages))
        os.close(loaded.prog_fd)
        dp = self.use_dataplane(Dataplane(loaded.pin_dir), fds)
        dp.add_sid(h.sids.dx6, Behaviour.END_DX6_MAP)
        dp.add_sid(h.sids.end_s, Behaviour.END_S)
        dp.add_sid(h.sids.sbuf, Behaviour.END_SBUF)
        # The SR domain as configured: add first, then remove what is no longer listed (never a gap).
        for prefix in h.sr_domain:
            dp.add_domain(prefix)
        for prefix in set(dp.list_domains()) - {str(ipaddress.IPv6Network(p)) for p in h.sr_domain}:
            dp.del_domain(prefix)

    def use_dataplane(self, dp, fds: FdStore | None = None):
        """This host's maps: the executor of the host's actions works on them (`fds`: none by default, the
        kept tap fds then die with us)."""
        h = self.cfg.host
        self.executor = Executor(Owner(
            name=self.name, dp=dp, address=h.address, drain=h.drain, tap_queue=h.tap_queue,
            qemu_pid=self._qemu_pid, later=lambda s, fn, *args: self.later(s, work.Call(fn, args)),
            qemu_stopped_ns=self._qemu_stopped_ns, on_map_write=self._mark_map_write,
            on_returned=self._put_record, addresses=self.addresses_of, fds=fds or NoStore(),
            arrived_check=self._arrived_check))
        return dp

    def _arrived_check(self, loc: VmLocal) -> ArrivedCheck | None:
        """The swallowed-frame count of a VM that arrived here by migration (swallow.ArrivedCheck)."""
        if self.libvirt is None or not loc.domain or not loc.tap or loc.arrival is None:
            return None
        return ArrivedCheck(loc.tap, self.libvirt.rx_used(loc.domain), loc.arrival)

    def _qemu_pid(self, loc: VmLocal) -> int | None:
        if not loc.domain:
            return None
        try:
            return int((Path(self.cfg.host.qemu_run_dir) / f"{loc.domain}.pid").read_text().strip())
        except (OSError, ValueError):
            return None

    def _qemu_stopped_ns(self, loc: VmLocal) -> int | None:
        """QEMU's own STOP time when libvirt passed it on (else the drain uses when we heard SUSPENDED)."""
        return self.libvirt.qemu_stopped_ns(loc.domain, loc.stopped_ns) if self.libvirt else None

    def db_up(self, kv) -> None:
        """The database answers: our host record, the peers', the migrations in flight (replayed), their
        watch, then libvirt (its reconciliation needs the records)."""
        h = self.cfg.host
        self.db.put_host(h.sids, h.address, h.transit, lease=None)
        for e in kv.range("hosts/")[0]:  # the peers' SIDs, read once: no round trip at migration time
            self._host(e.key[len("hosts/"):])
        migs, rev = self.db.migrations()
        for vm, recs in migs.items():
            self._migration_records(vm, recs, replay=True)
        self._watches.append(kv.watch("migrations/", lambda evs: self.enqueue(work.DbMigrations(evs)),
                                      start_revision=rev + 1))
        if self.libvirt is None:
            self.libvirt = LibvirtLink(h.libvirt_uri, self.enqueue, factory=self._libvirt_factory)
            self.libvirt.start()
            if h.drain:
                self.baselines = Baselines(self.executor, self.libvirt, self.takes_part, self.stopping)

    def close(self) -> None:
        """Release what we hold; the maps stay (the program keeps forwarding while no agent runs)."""
        if self.libvirt:
            self.libvirt.close()
        for w in self._watches:
            with contextlib.suppress(Exception):
                w.cancel()
        if self.executor:
            self.executor.close()
            self.executor.owner.fds.close()

    def _put_record(self, vm: str) -> None:
        rec = self._record(vm)
        self.dbl.write(lambda: self.db.put_migration(vm, self.name, rec))

    # --- libvirt -------------------------------------------------------------------------------------

    def on_libvirt_up(self, item: work.LibvirtUp) -> None:
        reconcile.reconcile(self, item.conn)

    def on_libvirt_down(self, item: work.LibvirtDown) -> None:
        log.warning("libvirt connection lost: %s", item.reason)

    def _domain(self, name: str, refresh: bool = False) -> Domain | None:
        if (refresh or name not in self.domains) and self.libvirt:
            d = self.libvirt.domain(name, on_reject=self.domain_rejected)
            if d is not None and d is not False and not self.admit(d):
                d = None
            if d is None:
                self.domains.pop(name, None)
            elif d is not False:
                self.domains[name] = d
        return self.domains.get(name)

    def takes_part(self, vm: str) -> bool:
        """A migration of the VM still needs this host: the destination's part ends once the VM runs here
        (the cut-over and the grace period are the source's, whose GRACE_OVER only the source hears). Until
        then no swallow baseline is taken: without this, a VM that arrived here never had one, and lost the
        frame its QEMU swallows when it migrated on (measured: 1 probe in every migration back; and after a
        restart of this agent, whose replay may not reach the cut-over, in the next migration back)."""
        m = self.machine.migrations.get(vm)
        if m is None or m.done:
            return False
        return not (m.dst.name == self.name and m.phase in (Phase.RESUMED, Phase.CUT_OVER))

    # --- a VM's addresses ----------------------------------------------------------------------------

    def addresses_of(self, vm: str) -> tuple[str, ...]:
        """All of `vm`'s addresses, `vm` first, as learnt from its domain's metadata (admit()) or, for a
        migration started before libvirt answered, its vms/ record (_learn_from_record); else `vm` alone.
        The executor writes the map for each: a lookup, never a database read (the drain calls it in HOLD)."""
        return self.vm_addresses.get(vm, (vm,))

    def _learn_from_record(self, vm: str) -> None:
        """`vm`'s addresses from its vms/ record when its domain has not told them (a migration replayed
        after a restart, before libvirt answered; a source whose domain is gone)."""
        if vm in self.vm_addresses or self.db is None:
            return
        # A malformed record, or the database down: the id alone for now (counted where it is read).
        with contextlib.suppress(Exception):
            e = self.db.kv.get(f"vms/{vm}")
            if e is not None:
                self.set_addresses(vm, records.vm_record(e.key, e.value)["addresses"])

    def domain_rejected(self, name: str | None, why: str) -> None:
        """A domain srmig does not manage because of its XML or metadata (already logged and counted): its
        status entry until it is read well-formed or goes."""
        if name:
            self.rejected_domains[name] = records.line(why, 300)
            if len(self.rejected_domains) > 1000:  # bounded: the oldest go
                self.rejected_domains.pop(next(iter(self.rejected_domains)))

    @staticmethod
    def domain_owners(domains) -> dict[str, tuple[str, str]]:
        """address -> (the VM claiming it, where) of `domains` (Domain objects)."""
        out = records.Owners()
        for d in domains:
            for a in d.addresses:
                out.setdefault(a, (d.vm, f"domain {d.name!r}"))
        return out

    def record_owners(self, entries=None) -> dict[str, tuple[str, str]]:
        """address -> (the VM claiming it, where) of the vms/ records the other hosts wrote (`entries`: a
        range of vms/ already read, else read now). Records of this host are not counted: its domains say
        what runs here, and a record left by a VM gone from here must not keep its addresses from a new one.
        Read leniently: a record malformed otherwise still claims its addresses (and is rejected where it
        is used)."""
        out = records.Owners()
        if self.db is None:
            return out
        if entries is None:
            try:
                entries = self.db.kv.range("vms/")[0]
            except Exception as e:  # noqa: BLE001 - the database down: what this host knows decides
                log.warning("addresses not checked against the other hosts' records: %s", e)
                entries = []
        for e in entries:
            if isinstance(e.value, dict) and e.value.get("host") == self.name:
                continue
            addrs = records.lenient_addresses(e.key, e.value)
            for a in addrs:
                out.setdefault(a, (addrs[0], e.key))
        return out

    def _new_addresses(self, d: Domain) -> bool:
        """Whether `d` lists an address its VM's own vms/ record does not: only those need the other hosts'
        records read (the ones it lists were checked by whoever published them, and while they are listed
        there no other VM is given them). Saves reading every record at a migration's begin and start."""
        if self.db is None:
            return False
        try:
            e = self.db.kv.get(f"vms/{d.vm}")
        except Exception:  # noqa: BLE001 - the database down: record_owners() says so
            return True
        return e is None or not set(d.addresses) <= set(records.lenient_addresses(e.key, e.value))

    def admit(self, d: Domain, owners=None) -> bool:
        """Whether srmig manages `d`: none of its addresses is another VM's (`owners`: address -> (VM,
        where)). A domain that claims one is rejected whole (one line, counted as domain_xml, a status
        entry): moving the VM without that address would lose its traffic silently, moving it would take the
        other VM's. Its addresses are learnt when admitted, and a map entry of an address it no longer lists
        is removed (no migration in flight: one in flight keeps what it moves). A prefix is taken where it
        overlaps another VM's address or prefix."""
        if owners is None:  # the other domains here first, then the other hosts' records
            owners = collections.ChainMap(self.domain_owners(v for k, v in self.domains.items() if k != d.name),
                                          self.record_owners() if self._new_addresses(d) else {})
        why = records.taken(d.vm, d.addresses, owners)
        if why is not None:
            why = f"domain {records.show(d.name)}: {why}"
            records.reject("domain_xml", f"domain {d.name}", why)
            self.domain_rejected(d.name, why)
            return False
        self.rejected_domains.pop(d.name, None)
        old = self.vm_addresses.get(d.vm, ())
        self.set_addresses(d.vm, d.addresses)
        if self.dp is not None and self.role_of(d.vm) is None:
            for a in set(old) - set(d.addresses):
                if a not in self._address_vm:  # (one another VM took meanwhile is that VM's now)
                    self.dp.dp.del_vm(a)  # that address alone (VmAddressSet.dp: the maps themselves)
        return True

    def set_addresses(self, vm: str, addresses: tuple[str, ...] | None) -> None:
        """`vm`'s addresses are now `addresses` (None: forgotten). One another VM listed is this one's now:
        that VM, gone from here (admit() let this one have it), no longer writes its entry (a late Forget or
        grace period of it would remove the new owner's)."""
        for a in self.vm_addresses.pop(vm, ()):
            if self._address_vm.get(a) == vm:
                del self._address_vm[a]
        if addresses is None:
            return
        self.vm_addresses[vm] = addresses
        for a in addresses:
            prev = self._address_vm.get(a)
            if prev is not None and prev != vm and a != prev:  # (an id stays its VM's: its key)
                self.vm_addresses[prev] = tuple(x for x in self.vm_addresses[prev] if x != a)
            self._address_vm[a] = vm

    def role_of(self, vm: str) -> str | None:
        m = self.machine.migrations.get(vm)
        if m is None or m.done:
            return None
        return "S" if m.src.name == self.name else "D" if m.dst.name == self.name else None

    def on_lifecycle(self, item: work.Lifecycle) -> None:
        typ, detail, t_ns = item.type, item.detail, item.t_ns
        d = self._domain(item.domain, refresh=typ in ("STARTED", "DEFINED"))
        log.debug("event %s %s/%s (%s)", item.domain, typ, detail, "managed" if d else "not managed")
        if d is None:
            return
        self._last_event_ns = t_ns
        if self.executor:
            loc = self.executor.vm(d.vm)
            loc.domain, loc.tap = d.name, d.tap
        role = self.role_of(d.vm)
        if role is None:
            # No migration in flight that we know of. A source's pause may beat the destination's record.
            if (typ, detail) in (("SUSPENDED", "MIGRATED"), ("SUSPENDED", "POSTCOPY"), ("STOPPED", "MIGRATED")):
                self.track(d.vm).pending.append((typ, detail, t_ns))
            elif typ in ("STARTED", "RESUMED") and detail not in ("MIGRATED", "POSTCOPY"):
                if typ == "STARTED" and d.vm in self.executor.vms:  # a new QEMU (booted): its own counts
                    self.executor.vms[d.vm].check = self.executor.vms[d.vm].arrival = None
                if not self.fence(d.vm):
                    self.vm_running_here(d)
            self._forget_stopped(item)
            return
        if role == "D" and typ == "STARTED":
            self.track(d.vm).started = True
            self.executor.keep_tap(d.vm)
            loc = self.executor.vm(d.vm)
            if loc.tx_at_start is None and d.tap:  # the incoming QEMU reads nothing from it until it resumes
                with contextlib.suppress(Exception):
                    counts = self.executor.incoming_counts(d.vm)
                    if counts is not None:
                        loc.mcast_at_start, loc.tx_at_start, taken = counts
                    else:  # (no fds: the begin hook's multicast count, if we were up then; the count may be low)
                        loc.tx_at_start, taken = tap_tx_packets(d.tap), None
                    loc.delivered_at_start = self._delivered()
                    log.debug("%s: incoming QEMU started: tap tx %d, IPv6 multicast sent on it %s, %s of it "
                              "taken out of the queue", d.vm, loc.tx_at_start, loc.mcast_at_start, taken)
        ev = translate(role, {"event": "lifecycle", "type": typ, "detail": detail})
        if ev is not None:
            self.local_event(d.vm, ev, t_ns, f"{typ}/{detail}")
        self._forget_stopped(item)

    def _forget_stopped(self, item: work.Lifecycle) -> None:
        """A domain that stopped or was undefined no longer claims its addresses here (admit()); read again
        when it starts."""
        if item.type in ("STOPPED", "UNDEFINED"):
            self.domains.pop(item.domain, None)

    def on_iteration(self, item: work.Iteration) -> None:
        log.debug("%s: migration iteration %d", item.domain, item.iteration)

    def on_job_completed(self, item: work.JobCompleted) -> None:
        """Only for success (libvirt emits nothing for a failed job); STOPPED/MIGRATED already cut over."""
        log.info("%s: migration job completed (%s)", item.domain, ", ".join(
            f"{k} {item.params[k]} ms" for k in ("time_elapsed", "downtime", "setup_time") if k in item.params))

    _UNKNOWN = object()

    def vm_running_here(self, d: Domain, entries=_UNKNOWN, rec=_UNKNOWN) -> bool:
        """A VM runs here outside any migration: deliver it (its id's entry, every other address and prefix
        pointed at it) and tell the ingresses.
        `entries`/`rec`: the map's entries by address and its database record when the caller already has
        them (reconciliation of many VMs). Returns whether anything had to change."""
        if self.dp is None:
            return False
        if d.vm not in self.vm_addresses:  # (admit() learnt them; a benchmark's Domain not)
            self.set_addresses(d.vm, d.addresses)
        changed = False
        for a in d.addresses:
            cur = self.dp.get_vm(a) if entries is self._UNKNOWN else entries.get(vm_spelling(a))
            if cur is None or cur.state is not VmState.RUNNING or cur.shadow:
                self.dp.set_vm(d.vm, VmState.RUNNING)  # all its addresses (VmAddressSet)
                self._mark_map_write()
                changed = True
                break
        if self.db is not None:
            if rec is self._UNKNOWN:
                rec = self.db.vm(d.vm)
            if rec is None or rec.host != self.name or rec.segments != (self.sids.dx6,) or \
                    rec.addresses != d.addresses:
                self.dbl.write(lambda: self.db.publish(d.vm, self.name, [self.sids.dx6], Phase.STEADY.value,
                                                       addresses=d.addresses))
                changed = True
        return changed

    # --- migrations ----------------------------------------------------------------------------------

    def _record(self, vm: str) -> dict:
        m, t, loc = self.machine.migrations[vm], self.track(vm), self._local(vm)
        return {"id": t.migration, "vm": vm, "domain": loc.domain if loc else None,
                "src": m.src.name, "dst": m.dst.name, "transit": list(m.transit),
                "events": [ev.value for ev, _ in m.history if ev in t.seen],
                # (the newest: the source QEMU keeps the last it read, records.MAX_RESENT at most)
                "resent": [f.hex() for f in (loc.drain.resent_swallowed if loc and loc.drain else [])
                           ][-records.MAX_RESENT:],
                "returned": loc.returned if loc else None,
                "swallow_base": loc.swallow_base if loc else None, "rx_used": loc.rx_used if loc else None,
                "swallow_mcast": loc.swallow_mcast if loc else None,
                # The destination's counts when its incoming QEMU started (swallow.Arrival): in the record,
                # they outlive an agent killed before the VM leaves here again.
                "at_start": None if loc is None or None in (loc.tx_at_start, loc.mcast_at_start,
                                                            loc.delivered_at_start) else
                {"tx": loc.tx_at_start, "mcast": loc.mcast_at_start, "delivered": loc.delivered_at_start}}

    def local_event(self, vm: str, ev: Ev, t_ns: int, what: str) -> None:
        """`what` this host saw (a libvirt event, a reconciliation finding) that means `ev`."""
        log.debug("%s: %s -> %s", vm, what, ev.value)
        self._last_event_ns = t_ns
        t = self.track(vm)
        t.seen.add(ev)
        m = self.machine.migrations[vm]
        role = self.role_of(vm)
        if ev is Ev.SUSPENDED and self.executor and vm in self.executor.vms:
            self.executor.vms[vm].stopped_ns = t_ns
        before = m.phase
        actions = self.machine.handle(vm, ev)
        # In pre-copy the source runs the VM throughout and has sent us nothing: no need to wait for it
        # (which it may never say: libvirt tells a source nothing of a pre-copy that failed).
        if ev is Ev.FAILED and role == "D" and before is not Phase.PROVISION:
            # Abort on the destination: say so at once, but return what D held only once the source runs
            # the VM again (the source writes "failed" after it did), or it would bounce back here.
            t.deferred = actions
            self._put_record(vm)
            self._maybe_return(vm)
            return
        self._execute(m, actions)
        self._observe_phase(m)
        self._put_record(vm)
        if ev is Ev.RESUMED and role == "D":
            self.later(SOURCE_SILENT_S, work.SourceCheck(vm, t.migration))

    def on_source_check(self, item: work.SourceCheck) -> None:
        """The VM runs here but the source never said it paused: its agent is down (or far behind), so nobody
        drains it and its map still delivers to a paused QEMU. Cut the ingresses over to us now instead of
        at the source's STOPPED: what is lost is bounded by pause -> resume, not by the source's restart."""
        vm, mid = item.vm, item.migration
        m = self.machine.migrations.get(vm)
        if self.track(vm).migration != mid or m is None or m.done or m.phase is not Phase.RESUMED:
            return
        if any(ev is Ev.SUSPENDED and ev not in self.track(vm).seen for ev, _ in m.history):
            return  # the source reported its pause: it is alive, STOPPED will cut over
        log.warning("%s: source %s silent since the pause; cutting the ingresses over to %s", vm, m.src.name,
                    self.name)
        self._note_rx_used(vm)
        step = m.version + 1  # the step the cut-over will have: written once, whoever gets there first
        addrs = self.vm_addresses.get(vm)
        self.dbl.write(lambda: self.db.publish(vm, self.name, [m.dst.dx6], Phase.CUT_OVER.value, mid, step,
                                               addresses=addrs))

    def _delivered(self) -> int:
        """Packets this host's program delivered to its VMs' taps so far (End.DX6-map, End.SBUF, End.S)."""
        return sum(sid_delivered(self.dp.dp, sid) for sid in (self.sids.dx6, self.sids.sbuf, self.sids.end_s))

    def _note_rx_used(self, vm: str) -> None:
        """Write in our record the RX used index our QEMU resumed with: the source's at its pause (the device's
        state migrated). The source's agent, restarted after the pause, counts with it the frames its QEMU
        swallowed (swallow.RecordedCheck). Asked before the cut-over: until then our tap is quiet, so the
        tap's count and QMP's answer make a consistent pair; bounded, the cut-over waits no longer."""
        loc = self._local(vm)
        if loc is None or loc.tx_at_start is None or not loc.tap or not loc.domain or self.libvirt is None:
            return
        check, out = SwallowCheck(loc.tap, self.libvirt.rx_used(loc.domain)), []
        asker = threading.Thread(target=lambda: out.append(check.difference(tries=20)), daemon=True,
                                 name="rx-used")
        asker.start()
        asker.join(RX_USED_WAIT_S)
        if not out or out[0] is None:
            log.warning("%s: RX used index at the resume unknown: the source cannot count what its QEMU "
                        "swallowed", vm)
            return
        # used - (tx - tx_at_start): what QEMU read since it resumed, all given to the guest; but for what this
        # host's own stack put in the tap when QEMU opened it (MLD reports, DAD: multicast the guest's
        # filter drops; measured: 1 such frame in 7 of 8 runs), which the program did not deliver. Counted as
        # the arrival counts them (swallow.ArrivedCheck): the tap's own multicast counter since its QEMU
        # started, read after the pair (a report sent in between makes the index high: the source's count
        # low, never high); else the frames read less those the program delivered, which are the host's,
        # not the tap's (another VM's count in them).
        tx_read = (check.tx - loc.tx_at_start) & 0xFFFF if check.tx is not None else None
        delivered = self._delivered() - loc.delivered_at_start if loc.delivered_at_start is not None else None
        if loc.mcast_at_start is not None:
            not_ours = tap_mcast_sent(loc.tap) - loc.mcast_at_start
        else:
            not_ours = tx_read - delivered if tx_read is not None and delivered is not None else 0
        if not 0 <= not_ours <= MAX_SWALLOWED:  # (measured once: 74, a delivery these counters missed)
            log.debug("%s: %d frames read and not delivered by the program: not a stack's few; RX used "
                      "index not written", vm, not_ours)
            return
        loc.rx_used = (loc.tx_at_start - out[0] + not_ours) & 0xFFFF
        log.debug("%s: RX used index at the resume %d (tap tx %d at QEMU's start, tx - used now %d, read since "
                  "%s, delivered by the program %s)", vm, loc.rx_used, loc.tx_at_start, out[0], tx_read, delivered)
        self._put_record(vm)
        self._note_arrival(vm)

    def _note_arrival(self, vm: str) -> None:
        """The VM came here by the migration we track: once we know what our tap had counted when the
        incoming QEMU started and the RX used index it resumed with (the source's record, written after its
        drain; or ours, for a silent source), the drain of its next migration away can count what its QEMU
        swallows without a baseline (swallow.ArrivedCheck), which under continuous traffic never comes."""
        m, t, loc = self.machine.migrations.get(vm), self.track(vm), self._local(vm)
        if m is None or m.dst.name != self.name or loc is None or loc.tx_at_start is None or \
                loc.mcast_at_start is None or not t.migration:
            return
        used = loc.peer_rx_used if loc.peer_rx_used is not None else loc.rx_used
        if used is None or (loc.arrival is not None and loc.arrival.migration == t.migration):
            return
        loc.arrival = Arrival(t.migration, loc.tx_at_start, loc.mcast_at_start, used)
        log.debug("%s: arrival counts %s", vm, loc.arrival)

    def on_db_migrations(self, item: work.DbMigrations) -> None:
        touched: dict[str, dict] = {}
        for ev in item.events:
            if ev.kind != "put":
                continue
            try:
                vm, host, rec = records.migration_record(ev.key, ev.value)
            except Rejected as e:
                records.reject("migration_record", ev.key, e)
                continue
            touched.setdefault(vm, {})[host] = rec
        for vm, recs in touched.items():
            self._migration_records(vm, recs)

    def _migration_records(self, vm: str, recs: dict[str, dict], replay: bool = False) -> None:
        """Records of the ends of one migration, well-formed (srmig.ctl.records.migration_record): start it
        here if it involves us, feed the other end's events. `replay`: after a restart, our own records too
        (their actions were applied once already)."""
        for host, rec in sorted(recs.items(), key=lambda kv: kv[0] != self.name):
            if self.name not in (rec["src"], rec["dst"]):
                continue
            mid = rec["id"]
            if self.track(vm).migration != mid:
                if not self._start_migration(vm, rec, records.migration_key(vm, host)):
                    continue
                loc = self._local(vm)
                if not replay and rec["src"] == self.name and loc is not None:
                    # The baseline outlives us in our record: killed at the pause, the agent after us counts
                    # with it (swallow.RecordedCheck). A VM that arrived here and had no quiet moment since
                    # has its arrival's instead: tx_packets less the RX used index at the resume.
                    if loc.check is not None and loc.check.base is not None:
                        loc.swallow_base, loc.swallow_mcast = loc.check.base, loc.check.mcast
                    elif loc.arrival is not None:
                        a = loc.arrival
                        loc.swallow_base, loc.swallow_mcast = (a.tx - a.used) & 0xFFFF, a.mcast
                    if loc.swallow_base is not None:
                        self._put_record(vm)
            loc = self._local(vm)
            if loc is not None and host == self.name and replay and rec.get("swallow_base") is not None:
                loc.swallow_base = rec["swallow_base"]  # (the agent before us took it)
                loc.swallow_mcast = rec.get("swallow_mcast")
            if loc is not None and host == self.name and replay and rec.get("at_start") and \
                    loc.tx_at_start is None:
                a = rec["at_start"]  # (the agent before us took them)
                loc.tx_at_start, loc.mcast_at_start, loc.delivered_at_start = a["tx"], a["mcast"], a["delivered"]
            if loc is not None and host == self.name and rec["dst"] == self.name and rec.get("rx_used") is not None:
                loc.rx_used = rec["rx_used"]  # (ours, written at a cut-over for a silent source)
            if loc is not None and host != self.name and rec.get("rx_used") is not None:
                loc.peer_rx_used = rec["rx_used"]
            if loc is not None and host == self.name and replay:  # our drain may need the peer's, fed later
                peer = recs.get(rec["dst"] if rec["src"] == self.name else rec["src"])
                if peer is not None and peer.get("id") == mid and peer.get("rx_used") is not None:
                    loc.peer_rx_used = peer["rx_used"]
            if host == self.name and not replay:
                continue
            t = self.track(vm)
            done = t.fed.get((mid, host), 0)
            new = rec["events"][done:]
            t.fed[(mid, host)] = len(rec["events"])
            m = self.machine.migrations[vm]
            last_write = None
            for name in new:
                ev = Ev(name)
                if host == self.name:
                    t.seen.add(ev)
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
            loc = self._local(vm)
            if host != self.name and rec.get("resent") and loc is not None:
                loc.peer_resent = [bytes.fromhex(h) for h in rec["resent"]]
            if host != self.name and "failed" in rec["events"] and rec["src"] == host:
                self._maybe_return(vm, source_failed=True)
                self.track(vm).source_failed = True
                self.fence(vm)
            if host != self.name and rec.get("returned") is not None and rec["dst"] == host and self.executor:
                self.executor.unpark(m, mid, rec["returned"])
        self._note_arrival(vm)
        # Events seen here before the record existed (the source's pause can beat the watch).
        for typ, detail, t_ns in self.track(vm).pending:
            if self.role_of(vm):
                ev = translate(self.role_of(vm), {"event": "lifecycle", "type": typ, "detail": detail})
                if ev:
                    self.local_event(vm, ev, t_ns, f"{typ}/{detail}")
        self.track(vm).pending = []

    def fence(self, vm: str, running: bool | None = None) -> bool:
        """The migration of `vm` to us was aborted, per the source's record (libvirt resumed the source's
        copy: its record says "failed"), yet our copy runs (it resumed here first; libvirt lost track of it
        when our libvirtd restarted). Two copies of one VM answer the same packets and write the same disks:
        end that: the source's copy is the one libvirt kept, so ours goes (host.fence). By default it is
        paused, not destroyed: the operator decides which copy lives, and ours may hold what the guest did
        after it resumed here, which a destroy loses for good, also if the source's copy failed later. But
        a paused copy keeps the domain's name here, and the next migration to this host fails until the
        operator ends it: "destroy" does what libvirt does with an incoming migration that failed. Once per
        migration (a copy the operator resumes stays running). `running`: the domain's state
        if the caller read it (reconciliation). Returns whether the VM is fenced here (it must not be
        published as running here)."""
        m, t, loc = self.machine.migrations.get(vm), self.track(vm), self._local(vm)
        if m is None or m.dst.name != self.name or m.phase is not Phase.ABORT or not t.source_failed \
                or loc is None or not loc.domain:
            if m is not None and m.dst.name == self.name and t.source_failed:
                log.debug("%s: not fenced (phase %s, source failed %s, domain %s)", vm, m.phase.value,
                          t.source_failed, loc.domain if loc else None)
            return False
        done = self.fenced.get(vm)
        if done is not None and done["migration"] == t.migration:
            return True
        if running is None:
            running = self.libvirt.running(loc.domain) if self.libvirt else None
        if not running:
            # libvirt down (reconciliation asks again), or a restarted libvirtd that recovers our incoming
            # copy may say paused and later let it run without an event: look again, for a while.
            if t.fence_until is None:
                log.debug("%s: not fenced yet: domain %s %s", vm, loc.domain, "not running" if running is False
                          else "state unknown")
            self._fence_later(vm, t)
            return False
        action = self.cfg.host.fence
        entry = {"domain": loc.domain, "migration": t.migration, "source": m.src.name, "action": action,
                 "done": False, "at": time.time(), "error": None, "returned": 0}
        queue = self.executor.fenced_tap(vm) if self.executor else None
        try:
            (self.libvirt.destroy if action == "destroy" else self.libvirt.suspend)(loc.domain)
            entry["done"] = True
        except Exception as e:  # noqa: BLE001 - libvirt refused or went: said, and asked again
            if queue is not None:
                queue.close()
            entry["error"] = records.line(str(e), 200)
            log.error("%s: split brain: domain %s runs here and on %s (migration %s aborted); %s failed: %s",
                      vm, loc.domain, m.src.name, t.migration, action, entry["error"])
            self._fence_later(vm, t)
            return True
        self.fenced[vm] = entry
        if self.metrics:
            self.metrics.fenced.labels(action).inc()
        entry["returned"] = self.executor.return_fenced(m, vm, queue) if self.executor else 0
        log.warning("%s: fenced: %s domain %s here, the migration %s was aborted and %s runs the VM (%d "
                    "packets its tap still held returned to %s)", vm, "destroyed" if action == "destroy" else
                    "paused", loc.domain, t.migration, m.src.name, entry["returned"], m.src.name)
        return True

    def _fence_later(self, vm: str, t: Track) -> None:
        if t.fence_until is None:
            t.fence_until = time.monotonic() + FENCE_WATCH_S
        if not t.fence_polling and time.monotonic() < t.fence_until:
            t.fence_polling = True
            self.later(FENCE_POLL_S, work.Call(self._fence_again, (vm, t.migration)))

    def _fence_again(self, vm: str, mid: str) -> None:
        t = self.track(vm)
        t.fence_polling = False
        if t.migration == mid:
            self.fence(vm)

    def _start_migration(self, vm: str, rec: dict, where: str) -> bool:
        src, dst = self._host(rec["src"]), self._host(rec["dst"])
        if src is None or dst is None:
            records.reject("migration_record", where, f"migration {rec['id']}: host "
                           f"{rec['src'] if src is None else rec['dst']!r} has no well-formed hosts/ record")
            return False
        old = self.machine.migrations.get(vm)
        if old is not None and not old.done:
            old.done = True  # superseded by a newer migration of the same VM
        self.machine.migrations.pop(vm, None)
        self.machine.start(vm, src[0], dst[0], tuple(rec.get("transit", ())))
        self._learn_from_record(vm)
        t = self.track(vm)
        t.migration, t.seen, t.source_failed, t.fence_until = rec["id"], set(), False, None
        loc = self._local(vm)
        if loc is not None:  # an earlier migration's counts say nothing of this one
            loc.swallow_base = loc.peer_rx_used = loc.rx_used = loc.tx_at_start = loc.delivered_at_start = None
            loc.mcast_at_start = loc.swallow_mcast = None
            if rec["dst"] == self.name:  # a new QEMU here: what was counted of an earlier one is not its
                loc.check = loc.arrival = None
        if rec.get("domain") and loc is not None:
            loc.domain = rec["domain"]
            d = self.domains.get(rec["domain"])
            if d:
                loc.tap = d.tap
        return True

    def _maybe_return(self, vm: str, source_failed: bool = False) -> None:
        t = self.track(vm)
        if not t.deferred:
            return
        m = self.machine.migrations.get(vm)
        src_rec = self.db.migration(vm, m.src.name) if m else None
        if not source_failed and not (src_rec and "failed" in src_rec["events"]):
            return
        actions, t.deferred = t.deferred, []
        self._execute(m, actions)

    def on_hook_begin(self, item: work.HookBegin) -> None:
        """`migrate begin` on this (destination) host: provision before QEMU even starts."""
        fut = item.result
        try:
            d = Domain.parse(item.domain_xml)
        except Rejected as e:
            records.reject("domain_xml", "migrate-begin hook", e)
            fut.set_exception(e)  # answered as rejected (srmig.ctl.hooksrv), not logged again
            return
        if d is None:
            fut.set_result({"managed": False})
            return
        if self.db is None:
            raise RuntimeError("state database not connected")
        if not self.admit(d):
            fut.set_exception(Rejected(self.rejected_domains[d.name]))  # answered as rejected, logged once
            return
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
        self._start_migration(d.vm, rec, f"migrate-begin hook for {d.vm}")
        loc = self.executor.vm(d.vm)
        loc.domain, loc.tap = d.name, d.tap
        if d.tap:  # before QEMU opens the tap: counted at STARTED, unless its fds cannot be held (Arrival)
            with contextlib.suppress(OSError):
                loc.mcast_at_start = tap_mcast_sent(d.tap)
        self._last_event_ns = time.monotonic_ns()
        self.track(d.vm).seen.add(Ev.BEGIN)
        m = self.machine.migrations[d.vm]
        pub = self._execute(m, self.machine.handle(d.vm, Ev.BEGIN))
        self._observe_phase(m)
        self._put_record(d.vm)
        # Answered by the writer once the new segment list is in the database (FIFO: `pub` is done then), or
        # refused: etcd's roles do not let this host write it (no retry would land it)
        def answer():
            try:
                version = pub.result() if pub else 0
            except PermissionDenied as e:
                fut.set_exception(e)
                return
            fut.set_result({"managed": True, "vm": d.vm, "addresses": list(d.addresses), "migration": mid,
                            "version": version})
        self.dbl.write(answer)

    def on_grace_over(self, item: work.GraceOver) -> None:
        if self.track(item.vm).migration != item.migration:
            return
        m = self.machine.migrations[item.vm]
        self._execute(m, self.machine.handle(item.vm, Ev.GRACE_OVER))
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
        t, now = self.track(m.vm), time.monotonic()
        if t.phase and t.phase[0] != m.phase.value and self.metrics:
            self.metrics.phase_seconds.labels(t.phase[0]).observe(now - t.phase[1])
        if not t.phase or t.phase[0] != m.phase.value:
            t.phase = (m.phase.value, now)

    def _execute(self, m: Migration, actions, replay: bool = False) -> Future | None:
        """Publish (on the writer thread) and StartGrace here; the rest, this host's, by the executor, in
        order. Returns the future of the last published version."""
        version = None
        mid = self.track(m.vm).migration or ""
        for a in actions:
            if isinstance(a, Publish):
                phase = m.phase.value
                host = m.dst.name if m.phase in (Phase.CUT_OVER,) else m.src.name
                addrs = self.vm_addresses.get(a.vm)  # unknown: the record's stay
                version = self.dbl.write(lambda a=a, host=host, phase=phase, addrs=addrs:
                                         self.db.publish(a.vm, host, a.segments, phase, mid, a.version, addrs))
            elif isinstance(a, StartGrace):
                if m.src.name == self.name:
                    self._start_grace(a, mid, version or self.dbl.write(lambda: None))
            elif self.executor:
                self.executor.execute(m, [a], mid, replay=replay)
        return version

    def _start_grace(self, a: StartGrace, mid: str, published: Future) -> None:
        """From the moment the cut-over is in the database and every ingress applied it (not before: while
        the database is down, or an ingress agent restarts, the ingresses still send here and we must keep
        forwarding). A dead ingress stays registered for its lease's TTL at most: wait no longer for its ack."""
        def wait(f):
            with contextlib.suppress(Exception):  # no version, database down: no ack wait
                if (v := f.result()) and (late := self.db.wait_acks(a.vm, v, LEASE_TTL_S)):
                    log.warning("%s: ingresses %s never applied version %d", a.vm, late, v)
            if not self.stopping.wait(a.seconds):
                self.enqueue(work.GraceOver(a.vm, mid))
        published.add_done_callback(lambda f: threading.Thread(target=wait, args=(f,), name="grace",
                                                                daemon=True).start())
