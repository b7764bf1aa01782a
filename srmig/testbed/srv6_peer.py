"""The Linux kernel's SRv6 as a peer to interoperate with, on any host kernel: the test guest's.

Where the host kernel was built without CONFIG_IPV6_SEG6_LWTUNNEL, no namespace can hold an `encap seg6` or
`encap seg6local` route. The test guest (srmig.testbed.guest) boots Debian's kernel, which has SRv6 built in,
and carries iproute2's `ip`; `KernelSrv6Guest` drives it over the control line (Qemu.guest_shell) as a
kernel SRv6 node reached over its tap:

    guest (Debian kernel SRv6)             host namespace (srmig XDP on the tap, generic or native)
    H.Encaps ingress   ──── eth0 ═ tap ────  End.S / End.DX6-map / End.SBUF ── ...
    End, End.DX6

The guest's own traffic is its ingress: `steer(dst, segments)` puts `dst/128 encap seg6 mode encap segs
...` in a table that only the guest's own packets look up (rules `iif lo`), and `ping(dst)` sends through
it. Only its own: a packet the guest forwards to `dst` (what its End.DX6 decapsulated) must not be
encapsulated again, or it circles between the guest and srmig until the route changes (seen: ~13 k
packets/s; End.DX6's decapsulation and the seg6 encapsulation of a forwarded packet leave the inner hop
limit alone, so nothing ends the loop). The guest's own packets towards SIDs
(fc00::/16) take the same table's plain default route: they leave on eth0 even when the SID is one of the
guest's seg6local routes, so an H.Encaps may start with a SID that srmig's host routes back to the guest's
own End.

The kernel's End.DX6 forwards what it decapsulates to its nh6 through the FIB and refuses a local route
there (only End.DT6 may deliver locally, since Linux 5.5; seen here: End.DX6 counted the packets, nothing
arrived): its nh6 is an address beyond the tap (a VM namespace of the host), never one of the guest's own.

    with Qemu("peer", ns=topo.ns("S"), tap="tapg", addr=f"{GUEST}/64") as vm:
        configure_host_tap(topo.ns("S"), "tapg", GUEST, vm.mac)
        peer = KernelSrv6Guest(vm)
        peer.start()                                  # forwarding, seg6_enabled, the rule for SIDs
        peer.add_end("fc00:0:3::e")
        peer.add_end_dx6("fc00:0:3::d6", VM)
        peer.steer(VM, ["fc00:0:1::5", "fc00:0:3::e", "fc00:0:3::d6"])
        sent, received = peer.ping(VM, 5)
        peer.route_packets("fc00:0:3::d6")            # the End.DX6 route's own counter (seg6local `count`)
"""

from __future__ import annotations

import ipaddress
import re
import shlex

from srmig.testbed import guest as guest_mod
from srmig.testbed.qemu import Qemu

IP = guest_mod.IPROUTE2_IP          # iproute2 inside the guest, by path (busybox's `ip` has no seg6)
INGRESS_TABLE = 100                 # the guest's own packets: steered destinations, and SIDs out on eth0
SID_SPACE = "fc00::/16"             # where the testbeds' locators live
RULE_PREF = 100


class GuestCommandError(RuntimeError):
    pass


class KernelSrv6Guest:
    """A booted test guest (a Qemu whose console said SRMIG-GUEST-READY) used as a kernel SRv6 node."""

    def __init__(self, vm: Qemu, ifname: str = "eth0", gateway: str = "fe80::1"):
        self.vm = vm
        self.ifname = ifname
        self.gateway = gateway

    def sh(self, command: str, timeout: float = 10) -> str:
        """Run one shell line in the guest; its output. Raises GuestCommandError when it exits non-zero."""
        out = self.vm.guest_shell(f"{command}; echo srmig-rc=$?", timeout=timeout)
        m = re.search(r"srmig-rc=(\d+)\s*$", out)
        if not m:
            raise GuestCommandError(f"{self.vm.name}: no exit status from {command!r}: {out!r}")
        body = out[:m.start()].rstrip("\n")
        if m.group(1) != "0":
            raise GuestCommandError(f"{self.vm.name}: {command!r} exited {m.group(1)}: {body}")
        return body

    def ip(self, *args: str, timeout: float = 10) -> str:
        return self.sh(" ".join([IP, *map(shlex.quote, args)]), timeout)

    def start(self) -> None:
        """Forwarding and SRH processing on, the ingress table and its rule for SIDs. The
        control line answers once its loop listens (ping, retried); after that every command gets one
        attempt."""
        self.vm.guest_command("ping", timeout=15)
        has = self.sh("ls /proc/sys/net/ipv6/conf/all/")
        if "seg6_enabled" not in has.split():
            raise GuestCommandError(f"{self.vm.name}: the guest kernel has no seg6_enabled sysctl (no SRv6)")
        sysctls = [f"net.ipv6.conf.{dev}.{key}=1" for dev in ("all", "default", self.ifname)
                   for key in ("forwarding", "seg6_enabled")]
        self.sh("sysctl -qw " + " ".join(sysctls))
        self.ip("-6", "route", "replace", "default", "via", self.gateway, "dev", self.ifname,
                "table", str(INGRESS_TABLE))
        self._own_rule(SID_SPACE)

    def _own_rule(self, prefix: str) -> None:
        """The guest's own packets to `prefix` look up the ingress table (once: `ip rule` has no replace)."""
        net = ipaddress.IPv6Network(prefix)
        shown = str(net.network_address) if net.prefixlen == 128 else str(net)  # as iproute2 prints it
        if f"to {shown} iif lo lookup {INGRESS_TABLE}" not in self.ip("-6", "rule", "show"):
            self.ip("-6", "rule", "add", "pref", str(RULE_PREF), "iif", "lo", "to", prefix,
                    "lookup", str(INGRESS_TABLE))

    # SRv6 endpoints and the ingress --------------------------------------------------------------------

    def add_end(self, sid: str) -> None:
        """A kernel End (RFC 8986 4.1) with a packet counter."""
        self.ip("-6", "route", "replace", f"{sid}/128", "encap", "seg6local", "action", "End", "count",
                "dev", self.ifname)

    def add_end_dx6(self, sid: str, nh6: str) -> None:
        """A kernel End.DX6 (RFC 8986 4.5) decapsulating and forwarding to `nh6` (not a local address)."""
        self.ip("-6", "route", "replace", f"{sid}/128", "encap", "seg6local", "action", "End.DX6",
                "nh6", nh6, "count", "dev", self.ifname)

    def steer(self, dst: str, segments: list[str]) -> None:
        """H.Encaps (RFC 8986 5.1) of the guest's own packets to `dst` along `segments` (travel order, as
        `ip route ... segs A,B` takes them); what the guest forwards to `dst` is left alone."""
        self._own_rule(f"{dst}/128")
        self.ip("-6", "route", "replace", f"{dst}/128", "encap", "seg6", "mode", "encap", "segs",
                ",".join(segments), "via", self.gateway, "dev", self.ifname, "table", str(INGRESS_TABLE))

    def route_packets(self, sid: str) -> int:
        """Packets a seg6local route with `count` has processed (iproute2 prints `packets N`)."""
        out = self.ip("-6", "-s", "route", "show", f"{sid}/128")
        m = re.search(r"\bpackets (\d+)", out)
        if not m:
            raise GuestCommandError(f"{self.vm.name}: no packet counter on {sid}: {out!r}")
        return int(m.group(1))

    # Traffic --------------------------------------------------------------------------------------------

    def ping(self, dst: str, count: int = 5, interval: float = 0.1, deadline: float = 5) -> tuple[int, int]:
        """(transmitted, received) of busybox ping from the guest; bounded by `deadline` seconds."""
        args = ["ping", "-6", "-q", "-c", str(count), "-i", str(interval), "-w", str(int(deadline))]
        out = self.vm.guest_shell(" ".join([*args, dst]), timeout=deadline + 10)
        m = re.search(r"(\d+) packets transmitted, (\d+) packets received", out)
        if not m:
            raise GuestCommandError(f"{self.vm.name}: ping printed no summary: {out!r}")
        return int(m.group(1)), int(m.group(2))

    def stats(self) -> dict[str, int]:
        """The guest's /proc/net/snmp6 and eth0 counters (Qemu.guest_stats)."""
        return self.vm.guest_stats()
