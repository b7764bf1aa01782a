"""The ingress role's dataplane: H.Encaps towards a VM with the kernel's `encap seg6 mode encap` routes
(pyroute2), idempotent (`replace`; deleting an absent route is success)."""

from __future__ import annotations

import errno

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError


def set_segment_list(ipr: IPRoute, vm: str, segments: list[str], gateway: str, oif: int) -> None:
    """Steer traffic for `vm` along `segments` (travel order). pyroute2 takes the SRH order, reversed."""
    if not segments:
        raise ValueError("a segment list needs at least one SID")
    ipr.route("replace", dst=f"{vm}/128", family=10, oif=oif, gateway=gateway,
              encap={"type": "seg6", "mode": "encap", "segs": list(reversed(segments))})


def clear(ipr: IPRoute, vm: str) -> None:
    try:
        ipr.route("del", dst=f"{vm}/128", family=10)
    except NetlinkError as e:
        if e.code not in (errno.ESRCH, errno.ENOENT):
            raise
