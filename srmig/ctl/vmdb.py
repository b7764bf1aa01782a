"""The VM state database's schema, over any srmig.ctl.statedb backend (embedded or etcd).

Keys (under the backend's prefix, e.g. /srmig/):
    hosts/<name>              {"name", "dx6", "end_s", "sbuf", "address", "transit": [...]}   (agent's lease)
    agents/<name>             {"name", "roles", "libvirt", "pid", "since"}                      (agent's lease)
    ingresses/<name>          {"name"}                        (the ingress's lease: it is expected to ack)
    vms/<vm>                  {"vm", "host", "segments", "version", "migration", "step", "phase", "addresses"}
    migrations/<host>/<vm>    {"id", "vm", "domain", "src", "dst", "transit", "events": [...], "resent": [...]}
    acks/<vm>/<ingress>       {"version"}

<vm> is the VM's id, its first address (IPv6 or IPv4); `addresses` lists all of them, the id first, and the
prefixes the VM routes (10.1.0.0/24, 2001:db8:99::/64): the ingresses encapsulate towards each, the hosts' maps
hold an entry for each address and point each prefix at the id (a record without it, written by an agent that
knew one address per VM, means [vm]; an older agent reading a record with a prefix rejects it, counted).
Agents of that kind ignore the field: the format stays 1.

`vms/` is what ingresses program; `version` grows by one per change over the VM's life (compare-and-swap),
so an ingress applies a record only when it is newer than what it has. `migration`/`step` identify the
machine action that wrote it: two agents executing the same Publish write it once.
`migrations/<host>/<vm>` carries the events each end of a migration saw, written by that end only after it
applied them; the other end feeds them to its own state machine. The writer's name comes first so that
what one host writes is one key range (format 2: records.migration_key, MIGRATION_FORMAT).

Who may write and read which keys when etcd's authentication is on: srmig.ctl.statedb.etcd_auth.

Every record carries `format` (srmig.ctl.records.FORMAT). What is read is checked first (srmig.ctl.records):
a malformed record, or one of a later format, is logged, counted and read as absent.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

from srmig.ctl import records
from srmig.ctl.phases import HostSids
from srmig.ctl.records import Rejected


@dataclass(frozen=True)
class VmRecord:
    vm: str
    host: str
    segments: tuple[str, ...]
    version: int
    migration: str = ""
    step: int = 0
    phase: str = "steady"
    addresses: tuple[str, ...] = ()  # all the VM's addresses, `vm` first (empty: just `vm`)

    def __post_init__(self):
        if not self.addresses:
            object.__setattr__(self, "addresses", (self.vm,))

    @classmethod
    def parse(cls, key: str, value) -> VmRecord:
        """The record stored under `key` (vms/<vm>); Rejected (one line) when malformed."""
        return cls(**records.vm_record(key, value))

    def to_dict(self) -> dict:
        return {"vm": self.vm, "host": self.host, "segments": list(self.segments), "version": self.version,
                "migration": self.migration, "step": self.step, "phase": self.phase,
                "addresses": list(self.addresses), "format": records.FORMAT}


def _checked(source: str, key: str, parse, value):
    """parse(key, value), or None after logging and counting why it is refused."""
    try:
        return parse(key, value)
    except Rejected as e:
        records.reject(source, key, e)
        return None


class VmDb:
    def __init__(self, kv):
        self.kv = kv

    # --- hosts and agents ----------------------------------------------------------------------------

    def put_host(self, sids: HostSids, address: str, transit: tuple[str, ...], lease=None) -> None:
        self.kv.put(f"hosts/{sids.name}", {"name": sids.name, "dx6": sids.dx6, "end_s": sids.end_s,
                                            "sbuf": sids.sbuf, "address": address, "transit": list(transit),
                                            "format": records.FORMAT}, lease=lease)

    def host(self, name: str) -> tuple[HostSids, dict] | None:
        """The host's SIDs and record; None when it has none, or a malformed one (logged and counted)."""
        e = self.kv.get(f"hosts/{name}")
        return None if e is None else _checked("host_record", e.key, records.host_record, e.value)

    def put_agent(self, name: str, info: dict, lease=None) -> None:
        self.kv.put(f"agents/{name}", info, lease=lease)

    # --- VM records ----------------------------------------------------------------------------------

    def vm(self, addr: str) -> VmRecord | None:
        """None when the VM has no record, or a malformed one (logged and counted)."""
        e = self.kv.get(f"vms/{addr}")
        return None if e is None else _checked("vm_record", e.key, VmRecord.parse, e.value)

    def vms(self) -> tuple[list[VmRecord], int]:
        """The well-formed records (the others logged and counted) and the revision of the snapshot."""
        entries, rev = self.kv.range("vms/")
        recs = [_checked("vm_record", e.key, VmRecord.parse, e.value) for e in entries]
        return [r for r in recs if r is not None], rev

    def publish(self, vm: str, host: str, segments, phase: str, migration: str = "", step: int = 0,
                addresses=None) -> int:
        """Write the VM's segment list unless this (migration, step) or a later one is already there;
        returns the version that holds it. Compare-and-swap, retried on a concurrent writer. `addresses`:
        all the VM's, `vm` first (None: those of the record there, else just `vm`); the list and its segment
        list change in one version."""
        key = f"vms/{vm}"
        for _ in range(100):
            e = self.kv.get(key)
            cur, base = None, 0
            if e is not None:
                try:
                    cur = VmRecord.parse(key, e.value)
                    base = cur.version
                except Rejected as err:
                    # Nobody can apply it: written over (it must not hold up the writes behind this one),
                    # with a later version than its own when it has one.
                    records.reject("vm_record", key, f"{err} (written over)")
                    base = records.lenient_version(e.value)
            if cur is not None and migration and cur.migration == migration and cur.step >= step:
                return cur.version
            addrs = tuple(addresses) if addresses else cur.addresses if cur is not None else (vm,)
            rec = VmRecord(vm, host, tuple(segments), base + 1, migration, step, phase, addrs)
            if cur is not None and cur.to_dict() | {"version": rec.version} == rec.to_dict():
                return cur.version  # nothing changes
            if self.kv.put_if(key, rec.to_dict(), 0 if e is None else e.mod_revision):
                return rec.version
        raise RuntimeError(f"{key}: too many concurrent writers")

    # --- migrations ----------------------------------------------------------------------------------

    def put_migration(self, vm: str, host: str, record: dict) -> None:
        self.kv.put(records.migration_key(vm, host), record | {"format": records.MIGRATION_FORMAT})

    def migrations(self) -> tuple[dict[str, dict[str, dict]], int]:
        """{vm: {host: record}} of the well-formed records (the others logged and counted), and the revision
        of the snapshot."""
        entries, rev = self.kv.range("migrations/")
        out: dict[str, dict[str, dict]] = {}
        for e in entries:
            if (parsed := _checked("migration_record", e.key, records.migration_record, e.value)) is not None:
                vm, host, rec = parsed
                out.setdefault(vm, {})[host] = rec
        return out, rev

    def migration(self, vm: str, host: str) -> dict | None:
        """What `host` wrote of `vm`'s migration; None when nothing, or something malformed (logged, counted)."""
        e = self.kv.get(records.migration_key(vm, host))
        parsed = None if e is None else _checked("migration_record", e.key, records.migration_record, e.value)
        return None if parsed is None else parsed[2]

    # --- ingresses and acks --------------------------------------------------------------------------

    def register_ingress(self, name: str, lease) -> None:
        self.kv.put(f"ingresses/{name}", {"name": name}, lease=lease)

    def ingresses(self) -> list[str]:
        return [e.key[len("ingresses/"):] for e in self.kv.range("ingresses/")[0]]

    def ack(self, vm: str, ingress: str, version: int) -> None:
        self.kv.put(f"acks/{vm}/{ingress}", {"version": version})

    def wait_acks(self, vm: str, version: int, timeout_s: float) -> list[str]:
        """Wait (bounded) until every registered ingress acknowledged `version` of the VM's record or a later
        one; returns the ingresses still missing (empty: all acked). Watch-driven, no polling."""
        done = threading.Event()
        lock = threading.Lock()
        acked: dict[str, int] = {}
        prefix = f"acks/{vm}/"

        def missing() -> list[str]:
            return sorted(i for i in self.ingresses() if acked.get(i, 0) < version)

        def on_events(events) -> None:
            with lock:
                for ev in events:
                    if ev.kind == "put":
                        acked[ev.key[len(prefix):]] = _ack_version(ev.value)
            if not missing():
                done.set()

        entries, rev = self.kv.range(prefix)
        for e in entries:
            acked[e.key[len(prefix):]] = _ack_version(e.value)
        if not missing():
            return []
        w = self.kv.watch(prefix, on_events, start_revision=rev + 1)
        try:
            done.wait(timeout_s)
            with lock:
                return missing()
        finally:
            w.cancel()


def _ack_version(value) -> int:
    """The version an ack says; 0 (nothing acknowledged) when it says none that is usable."""
    v = value.get("version") if isinstance(value, dict) else None
    return v if isinstance(v, int) and not isinstance(v, bool) else 0
