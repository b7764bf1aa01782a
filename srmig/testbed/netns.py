"""Network namespaces as test hosts: create, wire with veth, run commands inside, always clean up.

Every netlink call goes through pyroute2: srmig.netlink's where the product has the same call (namespaces,
`inside`, ifindex), the lab's own here otherwise. Names carry a per-run prefix so that concurrent or crashed runs
never collide, and `sweep()` removes whatever a previous crashed run left behind.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import subprocess
from dataclasses import dataclass, field

from pyroute2 import NetNS, netns

from srmig import netlink
from srmig.netlink import inside  # here too: the lab's modules import it from srmig.testbed.netns

PREFIX = "srmig-"
_link_ids = itertools.count()


def sysctl(ns: str | None, key: str, value: str | int) -> None:
    """Set a sysctl inside namespace `ns` (None: the current one) by writing /proc/sys directly."""
    path = "/proc/sys/" + key.replace(".", "/")
    with inside(ns):
        with open(path, "w") as f:
            f.write(str(value))


def run(ns: str | None, *argv: str, check: bool = True, timeout: float = 30, **kw) -> subprocess.CompletedProcess:
    """Run a command inside a namespace with `ip netns exec` (private /sys, same /run and /var)."""
    cmd = list(argv) if ns is None else ["ip", "netns", "exec", ns, *argv]
    return subprocess.run(cmd, check=check, timeout=timeout, capture_output=True, text=True, **kw)


def _owner_alive(name: str, prefix: str) -> bool:
    """Names are PREFIX<pid>-<role>: a namespace whose creating process still runs is not ours to remove."""
    pid = name[len(prefix):].split("-", 1)[0]
    if not pid.isdigit():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def sweep(prefix: str = PREFIX) -> list[str]:
    """Remove namespaces left by crashed runs (their creator is gone). Returns the names removed."""
    gone = []
    for name in netns.listnetns():
        if name.startswith(prefix) and not _owner_alive(name, prefix):
            with contextlib.suppress(OSError):
                netlink.remove_ns(name)
                gone.append(name)
    return gone


@dataclass
class Topology:
    """A set of namespaces and the links between them, torn down as a whole.

    Use as a context manager; `close()` runs even when the body raises.
    """

    tag: str = field(default_factory=lambda: str(os.getpid()))
    hosts: list[str] = field(default_factory=list)

    def ns(self, role: str) -> str:
        """The full namespace name of a role, e.g. ns("S") -> "srmig-1234-S"."""
        return f"{PREFIX}{self.tag}-{role}"

    def add_host(self, role: str, forwarding: bool = True, seg6: bool = True) -> str:
        name = self.ns(role)
        netlink.create_ns(name)
        self.hosts.append(name)
        if forwarding:
            sysctl(name, "net.ipv6.conf.all.forwarding", 1)
        if seg6:
            sysctl(name, "net.ipv6.conf.all.seg6_enabled", 1)
            sysctl(name, "net.ipv6.conf.default.seg6_enabled", 1)
        # No DAD: test addresses are unique by construction and DAD would delay every test by ~1-2 s.
        sysctl(name, "net.ipv6.conf.all.accept_dad", 0)
        sysctl(name, "net.ipv6.conf.default.accept_dad", 0)
        return name

    def link(self, a: str, a_if: str, b: str, b_if: str, a_addr: str | None = None,
             b_addr: str | None = None, a_mac: str | None = None, b_mac: str | None = None,
             static_neigh: bool = False) -> None:
        """A veth pair between roles a and b, both ends up, with optional addresses ("2001:db8::1/64").
        `static_neigh`: each end gets a permanent neighbour entry for the other, so a first burst towards
        a peer never waits (and overflows) in the neighbour resolution queue."""
        na, nb = self.ns(a), self.ns(b)
        tmp = f"srmigtmp{next(_link_ids)}"[:15]  # peer's name until it is renamed inside b
        with NetNS(na) as ipr:
            ipr.link("add", ifname=a_if, kind="veth", peer={"ifname": tmp, "net_ns_fd": nb})
        with NetNS(nb) as ipr:
            idx = ipr.link_lookup(ifname=tmp)[0]
            ipr.link("set", index=idx, ifname=b_if)
        for ns, ifname, addr, mac in ((na, a_if, a_addr, a_mac), (nb, b_if, b_addr, b_mac)):
            sysctl(ns, f"net.ipv6.conf.{ifname}.seg6_enabled", 1)
            with NetNS(ns) as ipr:
                idx = ipr.link_lookup(ifname=ifname)[0]
                if mac:
                    ipr.link("set", index=idx, address=mac)
                ipr.link("set", index=idx, state="up")
                if addr:
                    ip, plen = addr.split("/")
                    ipr.addr("add", index=idx, address=ip, prefixlen=int(plen), flags=0x80)  # IFA_F_NODAD
        if static_neigh and a_addr and b_addr:
            self.neigh(a, a_if, b_addr.split("/")[0], self.mac(b, b_if))
            self.neigh(b, b_if, a_addr.split("/")[0], self.mac(a, a_if))

    def ipr(self, role: str) -> NetNS:
        """A pyroute2 handle inside a role's namespace (close it, or use `with`)."""
        return netlink.handle(self.ns(role))

    def ifindex(self, role: str, ifname: str) -> int:
        with self.ipr(role) as ipr:
            return netlink.ifindex(ifname, ipr)

    def mac(self, role: str, ifname: str) -> str:
        with self.ipr(role) as ipr:
            return netlink.link_mac(netlink.ifindex(ifname, ipr), ipr)

    def route(self, role: str, dst: str, **kw) -> None:
        """`ip route replace` in a role's namespace, IPv6 or IPv4 by `dst`; kw as pyroute2's route(): gateway,
        oif, encap..."""
        kw.setdefault("family", 10 if ":" in dst else 2)
        with self.ipr(role) as ipr:
            if "oif" in kw and isinstance(kw["oif"], str):
                kw["oif"] = ipr.link_lookup(ifname=kw["oif"])[0]
            ipr.route("replace", dst=dst, **kw)

    def neigh(self, role: str, ifname: str, addr: str, mac: str) -> None:
        """A permanent neighbour entry, so the first packet is not parked in the neighbour queue."""
        with self.ipr(role) as ipr:
            idx = ipr.link_lookup(ifname=ifname)[0]
            ipr.neigh("replace", dst=addr, lladdr=mac, ifindex=idx, state=0x80,
                      family=10 if ":" in addr else 2)  # NUD_PERMANENT

    def run(self, role: str, *argv: str, **kw) -> subprocess.CompletedProcess:
        return run(self.ns(role), *argv, **kw)

    def inside(self, role: str):
        return inside(self.ns(role))

    def close(self) -> None:
        for name in reversed(self.hosts):
            with contextlib.suppress(OSError):
                netlink.remove_ns(name)
        self.hosts.clear()

    def __enter__(self) -> Topology:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
