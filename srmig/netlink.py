"""Every netlink call of srmig's product, in one place (the pattern of OpenStack neutron's ip_lib).

The only module outside the lab (srmig/testbed/, bench/) that imports pyroute2: the rest of srmig calls
these small functions, so a pyroute2 quirk is handled, and commented, once. Each function takes an optional
`ipr`, a handle from `handle()`: None opens one for the call in the calling thread's namespace; a caller
making several calls in a row, or working in another namespace, passes its own. Changes are idempotent
where the kernel lets them be (replace, and ENOENT on delete is success), as neutron's are.
"""

from __future__ import annotations

import contextlib
import errno
import socket

from pyroute2 import IPRoute, NetNS, netns
from pyroute2.netlink.exceptions import NetlinkError


class NoSuchInterface(ValueError):
    """No link of that name in the namespace: a one-line reason, e.g. for the CLI's `srmig: error:`."""

    def __init__(self, name: str):
        super().__init__(f"no interface {name!r} in this network namespace")
        self.name = name


def error_code(e: BaseException) -> int | None:
    """errno of an OSError, or of a pyroute2 NetlinkError (which calls it `code`)."""
    return getattr(e, "errno", None) or getattr(e, "code", None)


def handle(ns: str | None = None) -> IPRoute:
    """A netlink handle on namespace `ns` (None: the calling thread's); close it, or use `with`."""
    return IPRoute() if ns is None else NetNS(ns)


@contextlib.contextmanager
def _using(ipr: IPRoute | None):
    """`ipr` as it is (its owner closes it), or a handle of our own for one call."""
    if ipr is not None:
        yield ipr
        return
    with IPRoute() as own:
        yield own


# --- namespaces ----------------------------------------------------------------------------------------

@contextlib.contextmanager
def inside(ns: str | None):
    """Run the body with the calling thread switched into namespace `ns` (None: stay where we are).

    setns() is per thread; pyroute2's pushns/popns keep a stack so nesting works.
    """
    if ns is None:
        yield
        return
    netns.pushns(ns)
    try:
        yield
    finally:
        netns.popns()


def create_ns(name: str) -> None:
    """Create network namespace `name` (/run/netns/<name>) with lo up; removed again if lo cannot come up."""
    netns.create(name)
    try:
        with NetNS(name) as ipr:
            set_link_up(ifindex("lo", ipr), ipr)
    except BaseException:
        with contextlib.suppress(OSError):
            netns.remove(name)
        raise


def remove_ns(name: str) -> None:
    """Remove network namespace `name`; its links, routes, qdiscs and XDP attachments go with it."""
    netns.remove(name)


# --- links ---------------------------------------------------------------------------------------------

def find_ifindex(name: str, ipr: IPRoute | None = None) -> int | None:
    """The ifindex of link `name`, None when there is none."""
    with _using(ipr) as h:
        idx = h.link_lookup(ifname=name)
    return idx[0] if idx else None


def ifindex(name: str, ipr: IPRoute | None = None) -> int:
    """The ifindex of link `name`; NoSuchInterface when there is none."""
    idx = find_ifindex(name, ipr)
    if idx is None:
        raise NoSuchInterface(name)
    return idx


def link_names(ipr: IPRoute | None = None) -> dict[int, str]:
    """Every link of the namespace: {ifindex: name}."""
    with _using(ipr) as h:
        return {link["index"]: link.get_attr("IFLA_IFNAME") for link in h.get_links()}


def _link(index: int, h: IPRoute):
    return h.get_links(index)[0]


def link_mtu(index: int, ipr: IPRoute | None = None) -> int:
    """The MTU of link `index`."""
    with _using(ipr) as h:
        return _link(index, h).get_attr("IFLA_MTU")


def link_mac(index: int, ipr: IPRoute | None = None) -> str:
    """The MAC address of link `index`, "aa:bb:cc:dd:ee:ff"."""
    with _using(ipr) as h:
        return _link(index, h).get_attr("IFLA_ADDRESS")


def link_stats(index: int, ipr: IPRoute | None = None):
    """The kernel's 64-bit counters of link `index` (IFLA_STATS64: stats["tx_packets"], "tx_dropped", ...).
    For a tap, tx_packets counts the frames its reader took, tx_dropped those refused on a full queue."""
    with _using(ipr) as h:
        return _link(index, h).get_attr("IFLA_STATS64")


def link_txqlen(index: int, ipr: IPRoute | None = None) -> int:
    """The transmit queue length of link `index` (for a tap: the ring its frames wait in for the reader)."""
    with _using(ipr) as h:
        return _link(index, h).get_attr("IFLA_TXQLEN")


def set_link_txqlen(index: int, qlen: int, ipr: IPRoute | None = None) -> None:
    """`ip link set txqueuelen`. Shortening the queue frees the frames that no longer fit, uncounted."""
    with _using(ipr) as h:
        h.link("set", index=index, txqlen=qlen)


def set_link_up(index: int, ipr: IPRoute | None = None) -> None:
    """`ip link set up`."""
    with _using(ipr) as h:
        h.link("set", index=index, state="up")


def add_veth(name: str, peer: str, ipr: IPRoute | None = None) -> None:
    """A veth pair `name` - `peer`, both in the handle's namespace, both down."""
    with _using(ipr) as h:
        h.link("add", ifname=name, kind="veth", peer={"ifname": peer})


def addresses(index: int, ipr: IPRoute | None = None) -> list[str]:
    """The IPv6 addresses of link `index`, in the kernel's order."""
    with _using(ipr) as h:
        return [a.get_attr("IFA_ADDRESS") for a in h.get_addr(family=socket.AF_INET6, index=index)]


def neighbour_mac(addr: str, index: int, ipr: IPRoute | None = None) -> str | None:
    """The link-layer address of neighbour `addr` (IPv6, or IPv4: ARP) on link `index`, None when the kernel
    has none."""
    with _using(ipr) as h:
        for n in h.get_neighbours(family=socket.AF_INET if "." in addr and ":" not in addr else socket.AF_INET6,
                                  ifindex=index):
            if n.get_attr("NDA_DST") == addr and n.get_attr("NDA_LLADDR"):
                return n.get_attr("NDA_LLADDR")
    return None


# --- XDP -----------------------------------------------------------------------------------------------

# pyroute2 decodes IFLA_XDP_ATTACHED (XDP_ATTACHED_DRV/SKB/HW/MULTI) into these names.
_XDP_ATTACHED_MODES = {"xdp": "native", "xdpgeneric": "generic", "xdpoffload": "offload", "xdpmulti": "multi"}


def xdp_attached(index: int, ipr: IPRoute | None = None) -> tuple[int, str | None]:
    """(program id, "native"|"generic"|...) attached to link `index`, (0, None) when none."""
    with _using(ipr) as h:
        xdp = _link(index, h).get_attr("IFLA_XDP")
    if not xdp:
        return 0, None
    return xdp.get_attr("IFLA_XDP_PROG_ID") or 0, _XDP_ATTACHED_MODES.get(xdp.get_attr("IFLA_XDP_ATTACHED"))


def xdp_attach(index: int, prog_fd: int, flags: int, ipr: IPRoute | None = None) -> None:
    """Attach XDP program `prog_fd` to link `index`; `flags`: linux/if_link.h XDP_FLAGS_* (the mode, ...)."""
    with _using(ipr) as h:
        h.link("set", index=index, xdp={"attrs": [("IFLA_XDP_FD", prog_fd), ("IFLA_XDP_FLAGS", flags)]})


def xdp_detach(index: int, flags: int, ipr: IPRoute | None = None, expected_fd: int | None = None) -> None:
    """Detach the XDP program of link `index` attached with `flags`' mode. `expected_fd`: only if that
    program is still the one attached (`flags` must then carry XDP_FLAGS_REPLACE; kernel >= 5.7)."""
    attrs = [("IFLA_XDP_FD", -1)]
    if expected_fd is not None:
        attrs.append(("IFLA_XDP_EXPECTED_FD", expected_fd))
    attrs.append(("IFLA_XDP_FLAGS", flags))
    with _using(ipr) as h:
        h.link("set", index=index, xdp={"attrs": attrs})


# --- tc: the clsact qdisc and bpf filters ----------------------------------------------------------------

def add_clsact(index: int, ipr: IPRoute | None = None) -> None:
    """A clsact qdisc on link `index` (its ingress and egress filter hooks); one already there is success."""
    with _using(ipr) as h:
        try:
            h.tc("add", "clsact", index=index)
        except NetlinkError as e:
            if e.code != errno.EEXIST:
                raise


def add_bpf_filter(index: int, prog_fd: int, name: str, parent: str, filter_handle: int | str,
                   prio: int | None = None, replace: bool = False, ipr: IPRoute | None = None) -> None:
    """A direct-action bpf filter running `prog_fd` on link `index`'s hook `parent` (clsact egress:
    "ffff:fff3"). `replace`: the filter with this handle and prio is replaced (`tc filter replace`)."""
    kw = {"handle": filter_handle} | ({"prio": prio} if prio is not None else {})
    with _using(ipr) as h:
        h.tc("replace-filter" if replace else "add-filter", "bpf", index=index, **kw, fd=prog_fd, name=name,
             parent=parent, classid=1, direct_action=True)


def del_bpf_filter(index: int, filter_handle: int, prio: int, parent: str, ipr: IPRoute | None = None) -> None:
    """Remove the bpf filter with `filter_handle` and `prio` from link `index`'s hook `parent`."""
    with _using(ipr) as h:
        h.tc("del-filter", "bpf", index=index, handle=filter_handle, prio=prio, parent=parent)


def bpf_filter_prios(index: int, parent: str, ipr: IPRoute | None = None) -> list[int]:
    """The priorities of the bpf filters on link `index`'s hook `parent`, each once (the kernel reports a
    filter and its priority's head apart); [] when the link has no clsact qdisc."""
    with _using(ipr) as h:
        try:
            filters = h.get_filters(index=index, parent=parent)
        except Exception:  # noqa: BLE001 - no clsact qdisc: no filters
            return []
    # tcm_info holds the priority in its upper 16 bits (and the protocol in the lower ones).
    return sorted({f["info"] >> 16 for f in filters if f.get_attr("TCA_KIND") == "bpf"})


# --- routes (IPv6, and IPv4 towards IPv4 VM addresses) --------------------------------------------------

def seg6_encap(segments: list[str]) -> dict:
    """A route's `encap seg6 mode encap` along `segments` (travel order). pyroute2 takes the SRH order (the
    last segment first), so the list is reversed here."""
    return {"type": "seg6", "mode": "encap", "segs": list(reversed(segments))}


def seg6local(action: str) -> dict:
    """A route's `encap seg6local action <action>` ("End", ...)."""
    return {"type": "seg6local", "action": action}


def _family(addr: str) -> int:
    """AF_INET6 or AF_INET, by the address (or prefix) text."""
    return socket.AF_INET6 if ":" in addr else socket.AF_INET


def _route(command: str, dst: str, oif: int, gateway: str | None, mtu: int | None, encap: dict | None,
           ipr: IPRoute | None) -> None:
    kw: dict = {"oif": oif}
    family = _family(dst)
    if gateway is not None and _family(gateway) != family:
        # An IPv4 route via an IPv6 next hop (RTA_VIA, `ip route ... via inet6 GW`, Linux >= 5.2, RFC 5549
        # style): pyroute2 takes it as via={"family", "addr"}.
        kw["via"] = {"family": _family(gateway), "addr": gateway}
    elif gateway is not None:
        kw["gateway"] = gateway
    if encap is not None:
        kw["encap"] = encap
    if mtu is not None:
        # pyroute2 0.9 takes the route MTU as metrics={"mtu": n} (the RTAX_MTU attrs form is silently ignored).
        kw["metrics"] = {"mtu": mtu}
    with _using(ipr) as h:
        h.route(command, dst=dst, family=family, **kw)


def add_route(dst: str, oif: int, encap: dict | None = None, ipr: IPRoute | None = None) -> None:
    """`ip -6 route add` (`ip -4` for an IPv4 `dst`): EEXIST when there is one (for probing which routes the
    kernel accepts)."""
    _route("add", dst, oif, None, None, encap, ipr)


def replace_route(dst: str, oif: int, gateway: str | None = None, mtu: int | None = None,
                  encap: dict | None = None, ipr: IPRoute | None = None) -> None:
    """`ip -6 route replace` (`ip -4` for an IPv4 `dst`): the route to `dst` out of `oif`, via `gateway` (an
    IPv6 gateway for an IPv4 `dst`: `via inet6`), with MTU metric `mtu` and lightweight tunnel `encap`
    (seg6_encap(), seg6local()) where given."""
    _route("replace", dst, oif, gateway, mtu, encap, ipr)


def del_route(dst: str, ipr: IPRoute | None = None) -> bool:
    """`ip -6 route del` (`ip -4` for an IPv4 `dst`); False when there was no such route (success: the route
    is gone either way)."""
    try:
        with _using(ipr) as h:
            h.route("del", dst=dst, family=_family(dst))
    except NetlinkError as e:
        if e.code not in (errno.ESRCH, errno.ENOENT):
            raise
        return False
    return True


def preferred_source(dst: str, ipr: IPRoute | None = None) -> str | None:
    """The source address the kernel picks towards `dst` (`ip -6 route get`'s src), None when it picks none;
    NetlinkError (e.g. ENETUNREACH) when there is no route."""
    with _using(ipr) as h:
        for r in h.route("get", dst=dst, family=socket.AF_INET6):
            src = r.get_attr("RTA_PREFSRC")
            if src:
                return src
    return None


# NUD states (include/uapi/linux/neighbour.h) whose link-layer address is usable as it is: REACHABLE, STALE,
# DELAY, PROBE (a stale MAC is still the neighbour's until proven otherwise), PERMANENT, NOARP.
_NUD_USABLE = 0x02 | 0x04 | 0x08 | 0x10 | 0x80 | 0x40


def next_hop_mac(dst: str, ipr: IPRoute | None = None) -> tuple[int, str, str] | None:
    """Where the kernel sends an IPv6 packet to `dst`: (the output link's index, that link's MAC, the next
    hop's MAC from the neighbour table), the next hop being the route's gateway, or `dst` itself on a link
    route. None when the route has no output link (unreachable, blackhole, a route of lightweight tunnels)
    or the neighbour table has no usable MAC for the next hop (not resolved yet: the kernel's own send
    resolves it)."""
    with _using(ipr) as h:
        try:
            routes = h.route("get", dst=dst, family=socket.AF_INET6)
        except NetlinkError:
            return None
        for r in routes:
            oif = r.get_attr("RTA_OIF")
            if not oif or r.get("type", 1) != 1 or r.get_attr("RTA_ENCAP") is not None:  # RTN_UNICAST, no lwt
                return None
            hop = r.get_attr("RTA_GATEWAY") or dst
            for n in h.get_neighbours(family=socket.AF_INET6, ifindex=oif):
                mac = n.get_attr("NDA_LLADDR")
                if mac and n["state"] & _NUD_USABLE and n.get_attr("NDA_DST") == hop:
                    return oif, _link(oif, h).get_attr("IFLA_ADDRESS"), mac
            return None
    return None
