"""`srmig status`: what the agent reports of itself, its links and every VM it knows (hook socket, JSON)."""

from __future__ import annotations

import contextlib
import os

from srmig.ctl import records
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
        for vm in sorted(set(entries) | set(host.machine.migrations)):
            m = host.machine.migrations.get(vm)
            e = entries.get(vm)
            loc = (host.executor.vms.get(vm) if host.executor else None) or VmLocal()
            vms.append({"vm": vm, "domain": loc.domain,
                        "baseline": loc.check is not None,
                        # the hold at the destination is the tap's queue: what overflowed it
                        "tap_dropped": _tap_dropped(loc.tap),
                        "state": e.state.name.lower() if e else None,
                        "phase": m.phase.value if m and not m.done else "steady",
                        "migration": ({"id": host.tracks[vm].migration if vm in host.tracks else None,
                                       "src": m.src.name,
                                       "dst": m.dst.name, "done": m.done} if m else None)})
        out["vms"] = vms
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


def _tap_dropped(tap: str | None) -> int | None:
    """Frames the VM's tap refused because its queue was full (the kernel's tx_dropped), None: no tap here."""
    if not tap:
        return None
    from srmig import netlink  # noqa: PLC0415

    with netlink.handle() as ipr:
        idx = netlink.find_ifindex(tap, ipr)
        return None if idx is None else netlink.link_stats(idx, ipr)["tx_dropped"]


