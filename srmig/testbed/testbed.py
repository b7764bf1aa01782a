r"""The two-host migration testbed, built from network namespaces:

        C (client, ingress: srmig's H.Encaps, tc egress on c0)
        |
        T (transit router: srmig's End at T_END, XDP on each of its interfaces)
       / \
      S   D        srmig XDP on each fabric interface; the VM's tap behind each, with the same anycast
       \ /         gateway (link-local fe80::1, IPv4 198.51.100.1 and one MAC) on both
       mgmt        a separate S-D link that carries the migration stream

Locators: S fc00:0:1::/48, D fc00:0:2::/48, T fc00:0:3::/48. The VM is 2001:db8:100::10/64 and
198.51.100.10/24 (dual-stack). Requests to either reach it only through SRv6 (C's H.Encaps; nobody routes the VM's
prefixes natively). Its replies go back natively: the underlay is dual-stack (C-T 192.0.2.0/24, S-T and D-T
203.0.113.0/30 and .4/30), as a fabric that routes the clients' IPv4 would (docs/operations.md). T has no route to
the VM's IPv4 prefix, so reverse-path filtering is off on the path (the replies' source is reachable only via SRv6).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

from srmig.ctl.maps import Dataplane
from srmig.ctl.phases import HostSids
from srmig.bpf.abi import Behaviour, VmState
from srmig.testbed.lab import encap_on, steer, xdp_on
from srmig.testbed.netns import Topology, sysctl
from srmig.testbed.qemu import GATEWAY_LL, GATEWAY_MAC, GATEWAY_V4, configure_host_tap

VM_ADDR = "2001:db8:100::10"
VM_PREFIXLEN = 64
VM_ADDR4 = "198.51.100.10"
VM_PREFIXLEN4 = 24
VM_ADDRS = {"6": VM_ADDR, "4": VM_ADDR4}  # the VM's address per family ("6", "4")
CLIENT_ADDR = "2001:db8:c::1"
CLIENT_GW = "2001:db8:c::2"
CLIENT_ADDR4 = "192.0.2.1"
# The dual-stack underlay's IPv4 (RFC 5737 documentation prefixes): (this end, T's end) per host's fabric link.
UNDERLAY4 = {"C": ("192.0.2.1", "192.0.2.2", 24), "S": ("203.0.113.2", "203.0.113.1", 30),
             "D": ("203.0.113.6", "203.0.113.5", 30)}
T_END = "fc00:0:3::e"
MGMT = {"S": "fd00:99::1", "D": "fd00:99::2"}
FABRIC = {"S": "s0", "D": "d0"}

SIDS = {
    "S": HostSids("S", dx6="fc00:0:1::d6", end_s="fc00:0:1::5", sbuf="fc00:0:1::b"),
    "D": HostSids("D", dx6="fc00:0:2::d6", end_s="fc00:0:2::5", sbuf="fc00:0:2::b"),
}


@dataclass
class Testbed:
    xdp_mode: str = "generic"
    families: tuple[str, ...] = ("6", "4")  # the VM's addresses the ingress steers and the hosts deliver

    def __post_init__(self):
        self.topo = Topology()
        self._stack = contextlib.ExitStack()
        self.dp: dict[str, Dataplane] = {}

    @property
    def vm_addrs(self) -> list[str]:
        return [VM_ADDRS[f] for f in self.families]

    def build(self) -> Testbed:
        t = self.topo
        try:
            for role in ("C", "T", "S", "D"):
                t.add_host(role)
            # Static neighbours: the first burst of replies from a freshly resumed VM must not overflow the
            # neighbour resolution queue of a host that never talked to its gateway before.
            t.link("C", "c0", "T", "t_c", "2001:db8:c::1/64", "2001:db8:c::2/64", static_neigh=True)
            t.link("S", "s0", "T", "t_s", "2001:db8:a::2/64", "2001:db8:a::1/64", static_neigh=True)
            t.link("D", "d0", "T", "t_d", "2001:db8:b::2/64", "2001:db8:b::1/64", static_neigh=True)
            t.link("S", "mg0", "D", "mg0", MGMT["S"] + "/64", MGMT["D"] + "/64")
            self._underlay4()
            # Native XDP redirect into a veth needs NAPI on the receiving peer.
            for role, ifname in (("T", "t_s"), ("T", "t_d"), ("S", "s0"), ("D", "d0"), ("C", "c0")):
                t.run(role, "ethtool", "-K", ifname, "gro", "on")
            if self.xdp_mode == "native":
                # A native XDP redirect between veths loses CHECKSUM_PARTIAL: TCP from C would never
                # establish while C offloads its checksums (a veth effect; a NIC delivers full checksums).
                t.run("C", "ethtool", "-K", "c0", "tx", "off")
            t.route("C", "fc00::/16", gateway=CLIENT_GW)
            t.route("T", "fc00:0:1::/48", gateway="2001:db8:a::2")
            t.route("T", "fc00:0:2::/48", gateway="2001:db8:b::2")
            for role, gw in (("S", "2001:db8:a::1"), ("D", "2001:db8:b::1")):
                t.route(role, "2001:db8:c::/64", gateway=gw)
                t.route(role, "fc00::/16", gateway=gw)
            # T: End at T_END, whichever side a packet comes from (srmig's XDP; no SRv6 in T's kernel).
            t_dp = self._stack.enter_context(xdp_on(t, "T", ("t_s", "t_d", "t_c"), self.xdp_mode))
            t_dp.add_sid(T_END, Behaviour.END)
            self.dp["T"] = t_dp
            # C: the ingress, srmig's H.Encaps on c0's egress.
            self.encap = self._stack.enter_context(encap_on(t, "C", "c0", source=CLIENT_ADDR))
            for role in ("S", "D"):
                dp = self._stack.enter_context(xdp_on(t, role, FABRIC[role], self.xdp_mode))
                sids = SIDS[role]
                dp.add_sid(sids.dx6, Behaviour.END_DX6_MAP)
                dp.add_sid(sids.end_s, Behaviour.END_S)
                dp.add_sid(sids.sbuf, Behaviour.END_SBUF)
                self.dp[role] = dp
        except BaseException:
            self.close()
            raise
        return self

    def _underlay4(self) -> None:
        """IPv4 on the fabric links, for the VM's IPv4 replies: S and D route the client's prefix via T. IPv4
        forwarding everywhere (srmig's IPv4 delivery, a FIB lookup, needs it too); no reverse-path filter."""
        t = self.topo
        for role in ("C", "T", "S", "D"):
            for key, value in (("net.ipv4.ip_forward", 1), ("net.ipv4.conf.all.rp_filter", 0),
                               ("net.ipv4.conf.default.rp_filter", 0)):
                sysctl(self.ns(role), key, value)
        links = {"C": ("c0", "t_c"), "S": ("s0", "t_s"), "D": ("d0", "t_d")}
        for role, (mine, theirs) in links.items():
            a, b, plen = UNDERLAY4[role]
            for host, ifname, addr in ((role, mine, a), ("T", theirs, b)):
                sysctl(self.ns(host), f"net.ipv4.conf.{ifname}.rp_filter", 0)
                with t.ipr(host) as ipr:
                    ipr.addr("add", index=ipr.link_lookup(ifname=ifname)[0], address=addr, prefixlen=plen, family=2)
            t.neigh(role, mine, b, t.mac("T", theirs))
            t.neigh("T", theirs, a, t.mac(role, mine))
            if role != "C":
                t.route(role, f"{CLIENT_ADDR4}/32", gateway=b)

    def attach_vm_link(self, role: str, ifname: str, guest_mac: str, txqueuelen: int = 1000) -> None:
        """Make `ifname` (the VM's tap on host `role`) the VM-facing link, with the anycast gateway (IPv6 and,
        for a dual-stack VM, IPv4). The queue keeps the kernel's default length; srmig raises it for the
        migration window only."""
        configure_host_tap(self.ns(role), ifname, VM_ADDR, guest_mac, GATEWAY_LL, GATEWAY_MAC, txqueuelen,
                           guest_addr4=VM_ADDR4 if "4" in self.families else None, gateway_v4=GATEWAY_V4)

    def steer(self, segments: list[str] | None) -> None:
        """The client's route to the VM (every address of it, IPv4 too: H.Encaps with next header 4 and a /32
        via the IPv6 next hop): along `segments`, or withdrawn (None)."""
        self.steer_at("C", self.encap, segments, CLIENT_GW, "c0")

    def steer_at(self, role: str, encap, segments: list[str] | None, gateway: str, ifname: str) -> None:
        """As steer(), at another ingress: host `role`, its H.Encaps `encap` on `ifname`, next hop `gateway`."""
        for vm in self.vm_addrs:
            steer(self.topo, role, encap, vm, segments, gateway, ifname)

    def set_vm(self, role: str, state: VmState, **kw) -> None:
        """Host `role`'s VM map entry for every address of the VM."""
        for vm in self.vm_addrs:
            self.dp[role].set_vm(vm, state, **kw)

    def del_vm(self, role: str) -> None:
        for vm in self.vm_addrs:
            self.dp[role].del_vm(vm)

    def ns(self, role: str) -> str:
        return self.topo.ns(role)

    def close(self) -> None:
        self._stack.close()
        self.dp.clear()
        self.topo.close()

    def __enter__(self) -> Testbed:
        return self.build()

    def __exit__(self, *exc) -> None:
        self.close()
