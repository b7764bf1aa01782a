"""Reconciliation: after the agent's start or a libvirt reconnect, the maps, the database and the migrations
in flight are brought back in line with the domains' states (a pause or a resume heard by nobody, a VM
gone, map entries nothing explains). On the agent's worker, for its host host."""

from __future__ import annotations

import collections
import logging
import time

from srmig.bpf.abi import VmState
from srmig.ctl import maps, records, work
from srmig.ctl.libvirt_link import Domain
from srmig.ctl.machine import Ev
from srmig.ctl.phases import Phase

log = logging.getLogger("srmig.agent")
RECHECK_S = 0.05  # a source VM found paused by its migration after a reconnect: its state polled this often


def reconcile(host, conn) -> dict:
    """Rebuild the map state from libvirt's domains and the database, after our start or a reconnect."""
    import libvirt  # noqa: PLC0415

    t0 = time.monotonic()
    read = []
    host.rejected_domains = {}  # filled again by what this reading rejects (a domain gone has no entry)
    for dom in conn.listAllDomains(0):
        try:
            name = dom.name()
            d = Domain.from_xml(dom.XMLDesc(0), name, host.domain_rejected)
            state, reason = dom.state()
        except libvirt.libvirtError:
            continue
        read.append((name, d, state, reason))
    # Who owns an address: the domains known before first (an address claimed by two domains stays with
    # the one that had it), then in libvirt's order; the other hosts' records, read once for all.
    known = [r for r in read if r[1] is not None and r[0] in host.domains]
    new = [r for r in read if r[1] is not None and r[0] not in host.domains]
    claimed, by_records = records.Owners(), host.record_owners()
    admitted: dict = {}
    seen = {}
    for name, d, state, reason in known + new:
        if not host.admit(d, collections.ChainMap(claimed, by_records)):
            continue
        admitted[name] = d
        for a, owner in host.domain_owners([d]).items():
            claimed.setdefault(a, owner)
        if host.executor:
            loc = host.executor.vm(d.vm)
            loc.domain, loc.tap = d.name, d.tap
        seen[d.vm] = (d, state, reason)
    # The domains here now (a domain gone no longer claims its addresses), and an incoming migration's,
    # known from the hook before its QEMU exists.
    host.domains = {**{n: d for n, d in host.domains.items() if host.role_of(d.vm) == "D"}, **admitted}
    out = snapshot(host, seen, t0)
    for vm, (d, state, reason) in seen.items():
        if source_here(host, vm) and state == libvirt.VIR_DOMAIN_PAUSED and \
                reason == libvirt.VIR_DOMAIN_PAUSED_MIGRATION:
            recheck(host, work.Recheck(vm, host.track(vm).migration or ""))
    return out


def source_here(host, vm: str) -> bool:
    """We are the source of `vm`'s migration, still going or aborted by the destination's failure, and
    have not seen the VM run here again nor go. After an abort D returns what it held only once our
    record says "failed" (the VM runs here again), so that must be said even if D's failure came first."""
    m = host.machine.migrations.get(vm)
    return m is not None and m.src.name == host.name and (not m.done or m.phase is Phase.ABORT) and \
        not host.track(vm).seen & {Ev.FAILED, Ev.STOPPED}


def recheck(host, item: work.Recheck) -> None:
    """The source VM is paused by its migration after a reconnect. If libvirtd restarted, it cannot keep
    the outgoing job: it recovers it, resuming the domain without a lifecycle event (or it goes, if the
    migration had completed). Poll its state until it runs (FAILED: we have the VM back) or is gone."""
    import libvirt  # noqa: PLC0415

    vm = item.vm
    conn = host.libvirt.conn if host.libvirt else None
    if host.track(vm).migration != item.migration or not source_here(host, vm) or conn is None:
        return
    try:
        state = conn.lookupByName(host.executor.vm(vm).domain).state()[0]
    except libvirt.libvirtError as e:
        if e.get_error_code() != libvirt.VIR_ERR_NO_DOMAIN:
            return  # the connection is going: the next reconnect reconciles again
        state = None
    if state is None:
        host.local_event(vm, Ev.STOPPED, time.monotonic_ns(), "recheck: gone")
    elif state == libvirt.VIR_DOMAIN_RUNNING:
        host.local_event(vm, Ev.FAILED, time.monotonic_ns(), "recheck: resumed")
    else:
        host.later(RECHECK_S, item)


def snapshot(host, seen: dict, t0: float | None = None) -> dict:
    """`seen`: {vm: (Domain, libvirt state, reason)} of this host. Pure of libvirt: benchmarks call it."""
    import libvirt  # noqa: PLC0415

    t0 = t0 or time.monotonic()
    running = libvirt.VIR_DOMAIN_RUNNING
    paused = libvirt.VIR_DOMAIN_PAUSED
    fixed = 0
    # One read of the map and of the database for all VMs: then only what differs is written.
    entries = {e.vm: e for e in host.dp.list_vms()} if host.dp is not None else {}
    records = {r.vm: r for r in host.db.vms()[0]} if host.db is not None else {}
    for vm, (d, state, reason) in seen.items():
        role = host.role_of(vm)
        log.debug("%s: reconcile: domain %s state %s/%s, role %s", vm, d.name, state, reason, role)
        if role is None and state == running:
            if not host.fence(vm, running=True):  # (a split brain's copy is paused, not published)
                fixed += host.vm_running_here(d, entries, records.get(vm))
        elif role == "D" and state == running:
            host.local_event(vm, Ev.RESUMED, time.monotonic_ns(), "reconcile: running")
        elif role == "S" and state == paused and reason in (libvirt.VIR_DOMAIN_PAUSED_MIGRATION,
                                                            libvirt.VIR_DOMAIN_PAUSED_POSTCOPY):
            host.local_event(vm, Ev.SUSPENDED, time.monotonic_ns(), "reconcile: paused")
    for vm in list(host.machine.migrations):
        role = host.role_of(vm)
        if role == "S" and vm not in seen:
            host.local_event(vm, Ev.STOPPED, time.monotonic_ns(), "reconcile: gone")
        elif role == "D" and vm not in seen and host.track(vm).started and \
                host.machine.migrations[vm].phase is Phase.PROVISION:
            # The incoming QEMU went in pre-copy without an event (our libvirtd killed, the new one ended
            # it): the migration failed. Else our window stays open and our kept tap fds keep the next
            # QEMU from opening the tap (measured: "Unable to create tap device vmtap: Device or resource
            # busy" for every later migration here).
            host.local_event(vm, Ev.FAILED, time.monotonic_ns(), "reconcile: incoming gone")
        elif source_here(host, vm) and vm in seen and seen[vm][1] == running and \
                Ev.SUSPENDED in host.track(vm).seen:
            host.local_event(vm, Ev.FAILED, time.monotonic_ns(), "reconcile: resumed")
    # Map entries nothing explains: VMs no longer here and in no migration. AWAY entries forward
    # stragglers: give them a fresh grace period. An entry is a VM's address: its id's, or one of the
    # other addresses of a VM known here (its domain's, or its migration's record), which points at the id
    # (`of`, VmAddressSet); spelled as the map lists them.
    if host.dp is not None:
        vm_of = {maps.vm_spelling(a): vm for vm in [*host.vm_addresses, *seen, *host.machine.migrations]
                 for a in host.addresses_of(vm)}
        unexplained: dict[str, list] = {}
        for e in entries.values():
            vm = vm_of.get(e.vm, e.of or e.vm)  # (a prefix's entry: the VM it points at)
            if vm in seen or host.role_of(vm):
                continue
            unexplained.setdefault(vm, []).append(e)
        away = set()
        for vm, es in unexplained.items():
            if any(e.state is VmState.AWAY for e in es):
                host.later(host.cfg.host.grace_s, work.Forget(vm))
                away.add(vm)
            else:
                # The entries found, one by one (the maps themselves), the id's first: its write alone takes
                # every address pointing at it out of the dataplane, the pointers then go.
                for e in sorted(es, key=lambda e: e.of is not None):
                    host.dp.dp.del_vm(e.vm)
                fixed += 1
        # Prefixes and addresses pointing at a VM with no entry (list_vms() does not show them: their packets
        # find no VM) and no VM here lists: left by an agent stopped between a VM's id and its pointers (they
        # are deleted after it, VmAddressSet.del_vm); a trie slot each.
        for prefix, vm in host.dp.list_vm_prefixes():
            if prefix not in vm_of and vm not in entries:
                host.dp.dp.del_vm_prefix(prefix)
                fixed += 1
        # The addresses of VMs that are here, migrating, or still forwarding stragglers: the others are
        # forgotten with their entries.
        for vm in [vm for vm in host.vm_addresses if vm not in seen and vm not in host.machine.migrations
                   and vm not in away]:
            host.set_addresses(vm, None)
    if host.baselines:
        host.baselines.start(first_s=0.05)  # at once: the VMs may be quiet now, not later
    return {"vms": len(seen), "fixed": fixed, "seconds": round(time.monotonic() - t0, 4)}


def forget(host, item: work.Forget) -> None:
    vm = item.vm
    if not host.role_of(vm) and host.dp is not None and (e := host.dp.get_vm(vm)) and e.state is VmState.AWAY:
        host.dp.del_vm(vm)  # all its addresses (srmig.ctl.maps.VmAddressSet)
