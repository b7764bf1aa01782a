"""`srmig status`: what the agent reports of itself, its links and every VM it knows (hook socket, JSON)."""

from __future__ import annotations

import contextlib
import ipaddress
import os

from srmig.ctl import maps, records
from srmig.ctl.executor import VmLocal


def agent_status(agent) -> dict:
    """On the agent's worker: nothing changes while it is read."""
    link = agent.host.libvirt if agent.host else None
    out = {"agent": agent.name, "pid": os.getpid(),
           "roles": agent.roles(),
           "db": agent.dbl.status(),
           "libvirt": link.status() if link else None,
           "ingress": agent.ingress.status() if agent.ingress else None,
           "rejected": records.REJECTED.counts()}  # malformed inputs refused, by source (srmig.ctl.records)
    if host := agent.host:
        vms = []
        entries = {e.vm: e for e in host.dp.list_vms()} if host.dp else {}
        # One row per VM (its id), not per map entry: a VM's other addresses are listed in its row.
        known = {vm: host.vm_addresses.get(vm, (vm,)) for vm in [*host.vm_addresses, *host.machine.migrations]}
        of = {maps.vm_spelling(a): vm for vm, addrs in known.items() for a in addrs}
        # (a prefix's entry names its VM: `of`)
        rows = {of.get(a, e.of or a) for a, e in entries.items()} | set(host.machine.migrations)
        for vm in sorted(rows, key=_address_order):
            m = host.machine.migrations.get(vm)
            e = entries.get(vm)
            addrs = known.get(vm, (vm,))
            loc = (host.executor.vms.get(vm) if host.executor else None) or VmLocal()
            # Only the id has an entry; every other address and prefix points at it (VmAddressSet), so they
            # cannot differ in state. What can go wrong is a pointer missing, or an address holding an entry
            # of its own (`srmig vm set` on it): its packets do not follow the id's writes.
            # (one inside the VM's own prefix needs no pointer: get_vm finds the prefix's, as the program does)
            detached = [a for a in addrs[1:]
                        if (x := entries.get(maps.vm_spelling(a)) or host.dp.get_vm(a)) is None or x.of != vm
                        ] if e else []
            vms.append({"vm": vm, "addresses": list(addrs), "domain": loc.domain,
                        # the swallowed frame can be counted: a quiet moment's baseline, or the VM's arrival
                        "baseline": loc.check is not None or loc.arrival is not None,
                        # the hold at the destination is the tap's queue: what overflowed it
                        "tap_dropped": _tap_dropped(loc.tap),
                        "state": e.state.name.lower() if e else None,
                        # the VM's addresses whose packets do not take the id's entry (expected never)
                        "detached": detached or None,
                        "phase": m.phase.value if m and not m.done else "steady",
                        "migration": ({"id": host.tracks[vm].migration if vm in host.tracks else None,
                                       "src": m.src.name,
                                       "dst": m.dst.name, "done": m.done} if m else None)})
        out["vms"] = vms
        # Domains srmig does not manage because of their srmig metadata, and why (srmig.ctl.records).
        out["rejected_domains"] = dict(sorted(host.rejected_domains.items()))
        # Copies of a VM this host paused: their migration was aborted while they ran here (a split brain).
        out["fenced"] = dict(sorted(host.fenced.items()))
        out["dataplane"] = host.dp.stats() if host.dp else None
        lat = sorted(host.latencies_ms)
        out["event_to_map_ms"] = ({"n": len(lat), "p50": lat[len(lat) // 2],
                                   "p99": lat[min(len(lat) - 1, int(len(lat) * 0.99))], "max": lat[-1]}
                                  if lat else None)
    if agent.db is not None:
        with contextlib.suppress(Exception):
            recs, _ = agent.db.vms()
            out["locations"] = [r.to_dict() for r in recs]
    return out


def dataplane_lines(stats: dict) -> list[str]:
    """The dataplane's counters as `srmig stats` and `srmig status` print them: verdicts, drops, and the
    verdicts per inner family (IPv6, IPv4) of the packets a per-VM behaviour read."""
    drops = {k: v for k, v in stats["drops"].items() if v}
    lines = ["verdicts: " + "  ".join(f"{k}={v}" for k, v in stats["verdicts"].items()),
             "drops:    " + ("  ".join(f"{k}={v}" for k, v in drops.items()) or "none")]
    for family, counts in stats.get("inner", {}).items():
        lines.append(f"{family + ':':<10}" + ("  ".join(f"{k}={v}" for k, v in counts.items() if v) or "none"))
    return lines


def _address_order(a: str):
    try:
        ip = ipaddress.ip_address(a)
        return ip.version, ip.packed
    except ValueError:
        return 9, a.encode()


def _tap_dropped(tap: str | None) -> int | None:
    """Frames the VM's tap refused because its queue was full (the kernel's tx_dropped), None: no tap here."""
    if not tap:
        return None
    from srmig import netlink  # noqa: PLC0415

    with netlink.handle() as ipr:
        idx = netlink.find_ifindex(tap, ipr)
        return None if idx is None else netlink.link_stats(idx, ipr)["tx_dropped"]


