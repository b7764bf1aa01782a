"""The ingress role: watches vms/ in the state database and programs H.Encaps towards each VM (srmig's BPF
encap by default, or the kernel's seg6 routes: srmig.ctl.ingress), then acknowledges the version it applied
(acks/<vm>/<ingress>). A VM's segment list is set for every address its record lists (`addresses`), and an
address the record no longer lists is cleared, in the same application: one version, all of them. It
registers itself under ingresses/<name> with the agent's lease, so migrations wait for it while it lives.
On start it re-applies the database's state and removes what the database no longer has: the BPF program
and its maps outlive the agent, so traffic keeps flowing while it restarts."""

from __future__ import annotations

import logging
import os
import threading
import time

import ipaddress

from srmig import netlink
from srmig.ctl import ingress, records
from srmig.bpf import loader
from srmig.ctl.config import IngressConfig
from srmig.ctl.records import Rejected
from srmig.ctl.vmdb import VmDb, VmRecord

log = logging.getLogger("srmig.ingress")


class IngressRole:
    def __init__(self, cfg: IngressConfig, kv, lease):
        self.cfg = cfg
        self.kv = kv
        self.db = VmDb(kv)
        self.lease = lease
        self.applied: dict[str, int] = {}   # vm -> version
        self.addresses: dict[str, tuple[str, ...]] = {}  # vm -> the addresses programmed for it
        self.owner: dict[str, str] = {}     # address -> its vm (the inverse of `addresses`)
        self.errors = 0
        self.last_error: str | None = None
        self.apply_ms: list[float] = []
        self._lock = threading.Lock()
        self._watch = None
        self.ipr = netlink.handle()  # one netlink socket for every route the role programs
        self.encap = None

    def start(self) -> None:
        self.oif = self._oif()
        if self.cfg.encap == "kernel":
            self.encap = ingress.KernelEncap(self.cfg.gateway, self.oif, self.ipr)
        else:
            loaded = loader.load_encap(self.cfg.interface)  # the pinned program, or compiled the first time
            os.close(loaded.prog_fd)  # the pin and the filter keep it; we only write its maps
            self.encap = ingress.BpfEncap(source=self.cfg.source or self._interface_address())
        entries, rev = self.kv.range("vms/")
        recs, present = self._parse(entries)
        self._apply(recs)
        # A VM whose record is malformed keeps what it had (the addresses it still names): its last good
        # list beats none.
        self._forget_others(present)
        self.db.register_ingress(self.cfg.name, self.lease)
        self._watch = self.kv.watch("vms/", self._on_events, start_revision=rev + 1)

    def _interface_address(self) -> str | None:
        """The interface's first global IPv6 address: the outer source by default. None: the kernel's choice
        towards the first SID."""
        for addr in netlink.addresses(self.oif, self.ipr):
            if addr and not ipaddress.IPv6Address(addr).is_link_local:  # documentation prefixes count too
                return addr
        return None

    def _forget_others(self, addresses: set[str]) -> None:
        """Entries left by an earlier run for addresses no VM of the database has (BPF maps outlive the
        agent)."""
        if not isinstance(self.encap, ingress.BpfEncap):
            return
        for e in self.encap.entries():
            try:
                a = records.vm_address_or_prefix(e.vm, "an encap entry")
            except Rejected:
                a = e.vm
            if a not in addresses:
                self._clear(e.vm)

    def _set(self, vm: str, segments: list[str]) -> None:
        """The entry before the route: no packet for the VM leaves unencapsulated."""
        self.encap.set(vm, segments)
        if isinstance(self.encap, ingress.BpfEncap):
            ingress.route_vm(vm, self.cfg.gateway, self.oif, self.ipr)

    def _clear(self, vm: str) -> None:
        """The route before the entry."""
        ingress.clear_route(vm, self.ipr)
        self.encap.clear(vm)

    def _oif(self) -> int:
        idx = netlink.find_ifindex(self.cfg.interface, self.ipr)
        if idx is None:
            raise ValueError(f"ingress.interface: no interface {self.cfg.interface!r} here")
        return idx

    @staticmethod
    def _parse(entries) -> tuple[list[VmRecord], set[str]]:
        """The well-formed records among `entries` (puts), and the addresses they claim (well-formed or not:
        records.lenient_addresses); what is malformed is logged and counted, never applied."""
        recs, present = [], set()
        for e in entries:
            try:
                present.update(records.lenient_addresses(e.key, e.value))
                recs.append(VmRecord.parse(e.key, e.value))
            except Rejected as err:
                records.reject("vm_record", e.key, err)
        return recs, present

    def _on_events(self, events) -> None:
        """A watch's events, on its thread, in their order (a VM deleted and published again in one batch
        ends published)."""
        for e in events:
            if e.kind == "put":
                self._apply(self._parse([e])[0])
                continue
            try:
                vm = records.vm_address(e.key[len("vms/"):], "the key's VM address")
            except Rejected as err:
                records.reject("vm_record", e.key, err)
                continue
            with self._lock:
                for a in self.addresses.get(vm, (vm,)):
                    if self.owner.get(a, vm) == vm:  # (one another VM's record took is that VM's now)
                        self._clear(a)
                self._own(vm, ())
                self.applied.pop(vm, None)

    def _own(self, vm: str, addresses: tuple[str, ...]) -> None:
        """`vm`'s addresses are now `addresses` (none: it is gone). An address another VM had is this one's
        now: the hosts decide who has an address (srmig.ctl.host_role.HostRole.admit, a VM stopped lets its
        go while its record still lists them), the ingress follows the record it applied last."""
        for a in self.addresses.pop(vm, ()):
            if self.owner.get(a) == vm:
                del self.owner[a]
        for a in addresses:
            prev = self.owner.get(a)
            if prev is not None and prev != vm:
                log.info("%s: now VM %s's, no longer VM %s's", a, vm, prev)
                self.addresses[prev] = tuple(x for x in self.addresses[prev] if x != a)
            self.owner[a] = vm
        if addresses:
            self.addresses[vm] = addresses

    def _apply(self, recs: list[VmRecord]) -> None:
        with self._lock:
            for rec in recs:
                if self.applied.get(rec.vm, 0) >= rec.version:
                    continue  # older than what we have (a replayed or reordered event)
                t0 = time.monotonic()
                old = self.addresses.get(rec.vm, ())
                # Every address programmed now, or remembered as maybe programmed (cleared with the VM).
                self._own(rec.vm, tuple(dict.fromkeys([*rec.addresses, *old])))
                try:
                    for a in rec.addresses:
                        self._set(a, list(rec.segments))
                    for a in old:
                        if a not in rec.addresses:
                            self._clear(a)
                except Exception as e:  # noqa: BLE001 - counted and reported; no ack
                    self.errors += 1
                    self.last_error = f"{rec.vm} v{rec.version}: {e}"
                    log.error("cannot program %s: %s", rec.vm, e)
                    continue
                self._own(rec.vm, rec.addresses)
                self.applied[rec.vm] = rec.version
                self.db.ack(rec.vm, self.cfg.name, rec.version)
                self.apply_ms = (self.apply_ms + [(time.monotonic() - t0) * 1000])[-1000:]

    def status(self) -> dict:
        # The counters outside the lock: reading the maps must not hold up applying a version.
        counters = self.encap.outcomes() if self.encap is not None else {}
        families = self.encap.stats()["families"] if self.encap is not None else {}
        with self._lock:
            return {"name": self.cfg.name, "encap": self.cfg.encap, "routes": len(self.applied),
                    "addresses": len(self.owner),  # the VMs' addresses programmed (routes: the VMs)
                    "errors": self.errors, "last_error": self.last_error,
                    "applied": dict(sorted(self.applied.items())), "counters": counters,
                    "families": families}

    def close(self) -> None:
        """The program, its maps and the routes stay: traffic keeps its lists while no agent runs."""
        if self._watch is not None:
            self._watch.cancel()
        if self.encap is not None:
            self.encap.close()
        self.ipr.close()
