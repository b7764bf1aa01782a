"""A one-host lab for BPF_PROG_TEST_RUN: a private namespace with the routes and neighbours the program's
FIB lookups need, the srmig program loaded (pinned) in it, and a VM in every state.

Shared by the behaviour tests (tests/test_dataplane.py) and `srmig bench micro`, so the benchmark measures
exactly the branches the tests prove.
"""

from __future__ import annotations

import contextlib
import os
import shutil

from srmig import netlink
from srmig.ctl import ingress
from srmig.ctl.maps import Dataplane
from srmig.ctl.ingress import BpfEncap
from srmig.bpf import libbpf, loader
from srmig.bpf.abi import Behaviour, VmState
from srmig.testbed import netns
from srmig.testbed.netns import Topology

# This host (H) and the next one (D), each an SRv6 locator /48.
SID_END = "fc00:0:1::e"
SID_DX6 = "fc00:0:1::d6"
SID_S = "fc00:0:1::5"
SID_SBUF = "fc00:0:1::b"
D_SBUF = "fc00:0:2::b"
D_DX6 = "fc00:0:2::d6"
T_END = "fc00:0:3::e"
NOT_OURS = "fc00:0:1::77"

FAB_MAC = "02:00:00:00:0f:01"
FAB_PEER = "2001:db8:f::2"
FAB_PEER_MAC = "02:00:00:00:0f:02"
GW_MAC = "02:00:5e:00:00:01"  # the anycast gateway every host presents to its VMs
VM_MAC = "02:00:00:00:10:10"

VM_RUNNING = "2001:db8:100::10"
VM_AWAY = "2001:db8:100::20"
VM_HOLD = "2001:db8:100::30"
VM_INCOMING = "2001:db8:100::40"
VM_INCOMING_RING = "2001:db8:100::41"
VM_PARKED = "2001:db8:100::42"  # RUNNING, parking (an abort, until the destination returned its hold)
VM_NO_NEIGH = "2001:db8:100::50"
VM_UNREACHABLE = "2001:db8:100::60"
VM_UNKNOWN = "2001:db8:100::99"

# The same VMs with an IPv4 address (inner IPv4: one SID serves both families), each in the state of its IPv6
# twin: the IPv4 rows of tests/test_dataplane.py are generated from the IPv6 ones through this map.
V4_OF = {
    VM_RUNNING: "198.51.100.10",
    VM_AWAY: "198.51.100.20",
    VM_HOLD: "198.51.100.30",
    VM_INCOMING: "198.51.100.40",
    VM_INCOMING_RING: "198.51.100.41",
    VM_PARKED: "198.51.100.42",
    VM_NO_NEIGH: "198.51.100.50",
    VM_UNREACHABLE: "198.51.100.60",
    VM_UNKNOWN: "198.51.100.99",
}
# Prefixes the VMs route (a VM that routes a subnet: vm_prefixes), one of each family per VM in a state, and an
# address inside each: the prefix rows of tests/test_dataplane.py are the VM's rows sent to that address.
# VM_UNKNOWN's prefixes point at it, a VM with no entry. Routed in the lab via the VM's address (its neighbour).
PREFIX_OF = {
    VM_RUNNING: ("2001:db8:110::/64", "10.10.10.0/24"),
    VM_AWAY: ("2001:db8:120::/64", "10.10.20.0/24"),
    VM_HOLD: ("2001:db8:130::/64", "10.10.30.0/24"),
    VM_INCOMING: ("2001:db8:140::/64", "10.10.40.0/24"),
    VM_INCOMING_RING: ("2001:db8:141::/64", "10.10.41.0/24"),
    VM_PARKED: ("2001:db8:142::/64", "10.10.42.0/24"),
    VM_UNKNOWN: ("2001:db8:199::/64", "10.10.99.0/24"),
}
IN_PREFIX = {vm: (p6.replace("::/64", "::5"), p4.replace(".0/24", ".5")) for vm, (p6, p4) in PREFIX_OF.items()}
V4_SRC = "192.0.2.1"  # the inner source of IPv4 test packets (IPv6: 2001:db8:9::1)

RTN_UNREACHABLE = 7
RTNH_F_ONLINK = 4


class NamespaceLab:
    """Namespaces that `_build()` sets up on `self.topo`, with an ExitStack for what is loaded into them; torn
    down by close(), also when building fails. A subclass adds to close() whatever else it holds."""

    def __init__(self, tag: str | None = None):
        self.topo = Topology(tag=tag) if tag else Topology()
        self._stack = contextlib.ExitStack()

    def _build(self) -> None:
        raise NotImplementedError

    def start(self):
        try:
            self._build()
        except BaseException:
            self.close()
            raise
        return self

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self._stack.close()
        self.topo.close()

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()


class TestRunLab(NamespaceLab):
    __test__ = False  # not a pytest class

    def __init__(self, limits: loader.Limits | None = None, tag: str | None = None):
        super().__init__(tag)  # tag: namespaces of their own, next to another TestRunLab's
        self.limits = limits or loader.Limits()
        self.dp: Dataplane | None = None
        self.prog_fd = -1

    def _build(self) -> None:
        t = self.topo
        t.add_host("lab")
        netns.sysctl(t.ns("lab"), "net.ipv4.ip_forward", 1)  # the IPv4 FIB lookup forwards only then
        t.add_host("fab")
        t.add_host("vm")
        t.link("lab", "fab0", "fab", "up0", a_addr="2001:db8:f::1/64", a_mac=FAB_MAC, b_mac=FAB_PEER_MAC)
        t.link("lab", "vm0", "vm", "eth0", a_mac=GW_MAC, b_mac=VM_MAC)
        for locator in ("fc00:0:2::/48", "fc00:0:3::/48"):
            t.route("lab", locator, gateway=FAB_PEER, oif="fab0")
        t.neigh("lab", "fab0", FAB_PEER, FAB_PEER_MAC)
        for vm in (VM_RUNNING, VM_AWAY, VM_HOLD, VM_INCOMING, VM_INCOMING_RING, VM_PARKED, VM_NO_NEIGH):
            t.route("lab", vm + "/128", oif="vm0")
            t.route("lab", V4_OF[vm] + "/32", oif="vm0")
        for vm in (VM_RUNNING, VM_AWAY, VM_HOLD, VM_INCOMING, VM_INCOMING_RING, VM_PARKED):
            t.neigh("lab", "vm0", vm, VM_MAC)
            t.neigh("lab", "vm0", V4_OF[vm], VM_MAC)
        for vm, (p6, p4) in PREFIX_OF.items():
            if vm != VM_UNKNOWN:
                t.route("lab", p6, gateway=vm, oif="vm0", flags=RTNH_F_ONLINK)  # vm0 has no address
                t.route("lab", p4, gateway=V4_OF[vm], oif="vm0", flags=RTNH_F_ONLINK)
        with t.ipr("lab") as ipr:
            ipr.route("replace", dst=VM_UNREACHABLE + "/128", family=10, type=RTN_UNREACHABLE)
            ipr.route("replace", dst=V4_OF[VM_UNREACHABLE] + "/32", family=2, type=RTN_UNREACHABLE)
        self.fab_ifindex = t.ifindex("lab", "fab0")
        self.vm_ifindex = t.ifindex("lab", "vm0")
        with t.inside("lab"):
            loaded = loader.load_pinned_or_compile(self.limits)
            self.prog_fd = loaded.prog_fd
            self.pin_dir = loaded.pin_dir
            self.dp = Dataplane(loaded.pin_dir)
        self._provision()

    def _provision(self) -> None:
        dp = self.dp
        for sid, beh in ((SID_END, Behaviour.END), (SID_DX6, Behaviour.END_DX6_MAP), (SID_S, Behaviour.END_S),
                         (SID_SBUF, Behaviour.END_SBUF)):
            dp.add_sid(sid, beh)
        for vm in (VM_RUNNING, V4_OF[VM_RUNNING]):
            dp.set_vm(vm, VmState.RUNNING)
        for vm in (VM_AWAY, V4_OF[VM_AWAY]):
            dp.set_vm(vm, VmState.AWAY, next_sid=D_DX6)
        for vm in (VM_HOLD, V4_OF[VM_HOLD]):
            dp.set_vm(vm, VmState.HOLD, next_sid=D_DX6)  # the drain records where the VM goes
        for vm in (VM_INCOMING, V4_OF[VM_INCOMING]):
            dp.set_vm(vm, VmState.INCOMING)
        for vm in (VM_INCOMING_RING, V4_OF[VM_INCOMING_RING]):
            dp.set_vm(vm, VmState.INCOMING, hold_ring=True)
        for vm in (VM_PARKED, V4_OF[VM_PARKED]):
            dp.set_vm(vm, VmState.RUNNING, park=True)
        for vm in (VM_NO_NEIGH, V4_OF[VM_NO_NEIGH], VM_UNREACHABLE, V4_OF[VM_UNREACHABLE]):
            dp.set_vm(vm, VmState.RUNNING)
        for vm, prefixes in PREFIX_OF.items():
            for p in prefixes:
                dp.set_vm_prefix(p, vm)

    def run(self, packet: bytes, repeat: int = 1) -> libbpf.TestRun:
        """One BPF_PROG_TEST_RUN in the lab's namespace (its FIB), as if received on fab0."""
        with self.topo.inside("lab"):
            return libbpf.prog_test_run(self.prog_fd, packet, repeat=repeat, ingress_ifindex=self.fab_ifindex)

    def close(self) -> None:
        if self.dp:
            self.dp.close()
            self.dp = None
        if self.prog_fd >= 0:
            os.close(self.prog_fd)
            self.prog_fd = -1
        if getattr(self, "pin_dir", None):
            shutil.rmtree(self.pin_dir, ignore_errors=True)
        super().close()


@contextlib.contextmanager
def xdp_on(topo: Topology, role: str, ifname: str | tuple[str, ...], mode: str = "generic",
           limits: loader.Limits | None = None):
    """Load srmig on one interface (or several) of a topology host; yields its Dataplane. Detached and
    unpinned on exit, also when the body fails or an interrupt lands in the middle of loading."""
    ifnames = (ifname,) if isinstance(ifname, str) else tuple(ifname)
    with topo.inside(role):
        pins = loader.pin_dir()
    try:
        with topo.inside(role):
            for name in ifnames:
                loaded = loader.load(name, mode, limits)
                os.close(loaded.prog_fd)
        with Dataplane(loaded.pin_dir) as dp:
            yield dp
    finally:
        with topo.inside(role):
            for name in ifnames:
                with contextlib.suppress(Exception):
                    loader.detach(name)
        shutil.rmtree(pins, ignore_errors=True)
        shutil.rmtree(loader.staging_dir(pins), ignore_errors=True)


@contextlib.contextmanager
def encap_on(topo: Topology, role: str, ifname: str, source: str | None = None):
    """Load srmig's H.Encaps on `ifname`'s egress in a topology host; yields its BpfEncap. Filter removed and
    maps unpinned on exit, also when the body fails."""
    with topo.inside(role):
        pins = loader.encap_pin_dir()
    try:
        with topo.inside(role):
            loaded = loader.load_encap(ifname)
        os.close(loaded.prog_fd)
        with BpfEncap(loaded.pin_dir, source=source) as encap:
            yield encap
    finally:
        with topo.inside(role), contextlib.suppress(Exception):
            loader.unload_encap(ifname)
        shutil.rmtree(pins, ignore_errors=True)
        shutil.rmtree(loader.staging_dir(pins), ignore_errors=True)


def steer(topo: Topology, role: str, encap: BpfEncap, vm: str, segments: list[str] | None, gateway: str,
          ifname: str) -> None:
    """Host `role`'s H.Encaps towards `vm`: along `segments`, or withdrawn (None). The entry before the
    route, so no packet for the VM leaves unencapsulated."""
    with topo.ipr(role) as ipr:
        if segments is None:
            ingress.clear_route(vm, ipr)
            encap.clear(vm)
        else:
            encap.set(vm, segments)
            ingress.route_vm(vm, gateway, netlink.ifindex(ifname, ipr), ipr)
