r"""The two-host migration testbed, built from network namespaces:

        C (client, ingress: srmig's H.Encaps, tc egress on c0)
        |
        T (transit router: srmig's End at T_END, XDP on each of its interfaces)
       / \
      S   D        srmig XDP on each fabric interface; the VM's tap behind each, with the same anycast
       \ /         gateway (link-local fe80::1 and one MAC) on both
       mgmt        a separate S-D link that carries the migration stream

Locators: S fc00:0:1::/48, D fc00:0:2::/48, T fc00:0:3::/48. The VM is 2001:db8:100::10/64.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

from srmig.ctl.maps import Dataplane
from srmig.ctl.phases import HostSids
from srmig.bpf.abi import Behaviour
from srmig.testbed.lab import encap_on, steer, xdp_on
from srmig.testbed.netns import Topology
from srmig.testbed.qemu import GATEWAY_LL, GATEWAY_MAC, configure_host_tap

VM_ADDR = "2001:db8:100::10"
VM_PREFIXLEN = 64
CLIENT_ADDR = "2001:db8:c::1"
CLIENT_GW = "2001:db8:c::2"
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

    def __post_init__(self):
        self.topo = Topology()
        self._stack = contextlib.ExitStack()
        self.dp: dict[str, Dataplane] = {}

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

    def attach_vm_link(self, role: str, ifname: str, guest_mac: str, txqueuelen: int = 1000) -> None:
        """Make `ifname` (the VM's tap on host `role`) the VM-facing link, with the anycast gateway. The
        queue keeps the kernel's default length; srmig raises it for the migration window only."""
        configure_host_tap(self.ns(role), ifname, VM_ADDR, guest_mac, GATEWAY_LL, GATEWAY_MAC, txqueuelen)

    def steer(self, segments: list[str] | None) -> None:
        """The client's route to the VM: H.Encaps with `segments`, or withdrawn (None)."""
        steer(self.topo, "C", self.encap, VM_ADDR, segments, CLIENT_GW, "c0")

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
