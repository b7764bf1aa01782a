"""Interop with the Linux kernel's own SRv6, both ways, on two kernels.

The host's kernel, where it has SRv6 lwtunnels, on real veths in namespaces (the `test_kernel_*` /
`test_end_s_*` / `test_unknown_sid_*` tests, collected only there):

    ingress --- S --- T --- D --- VM
    kernel      srmig kernel srmig End.SBUF / kernel End.DX6
    seg6 encap  End.S End

The ingress encapsulates with a kernel `encap seg6` route; S runs srmig's End.S with the VM AWAY and advances
to T, whose kernel seg6local End advances to D; D delivers to the VM namespace, once with srmig's End.SBUF,
once with srmig's End.DX6-map, once with the kernel's seg6local End.DX6. Replies come back by plain routing.

The test guest's kernel (Debian's, SRv6 built in; srmig.testbed.srv6_peer), on every host kernel (the
`test_guest_*` tests): one QEMU guest per module on S's tap plays the ingress, T and the kernel End.DX6.

    guest G ═tap═ S ── D ── VM        G: kernel H.Encaps ingress, End (T_END), End.DX6 (G_DX6, nh6 VM)
                  └──────── VM        S: srmig End.S on the tap; D: srmig End.SBUF / End.DX6-map

    G encaps → S End.S (VM AWAY: advance) → back over the tap to G's End → S → D End.SBUF / End.DX6-map → VM
                                                                          → G's End.DX6 → S → VM
The same cases as the host's, in XDP generic and native mode, the kernel End.DX6 also behind srmig's
End.DX6-map (VM AWAY: rewrite to G_DX6). Delivery is proven four ways: echo replies at the guest, the VM
namespace's own ICMPv6 counters, srmig's per-SID counters and the guest's seg6local `count` counters.
Every packet count is exact: a forwarding loop between the guest and srmig fails the test, it does not pass.
"""

from __future__ import annotations

import contextlib
import errno
import os
import subprocess
import sys

import pytest

from srmig import netlink
from srmig.bpf.abi import Behaviour, VmState
from srmig.testbed import netns, qemu
from srmig.testbed.lab import xdp_on
from srmig.testbed.srv6_peer import KernelSrv6Guest


def _kernel_srv6() -> tuple[bool, str]:
    """Whether this host's kernel has SRv6 lwtunnels: srmig.check's probe where that module exists, else the
    same try here: a seg6local End route in a throwaway namespace, refused with EOPNOTSUPP when absent."""
    try:
        from srmig.check import kernel_srv6
    except ImportError:
        pass
    else:
        return kernel_srv6()
    from pyroute2 import NetNS
    from pyroute2 import netns as pr_netns

    if os.geteuid() != 0:
        return False, "unknown: needs root to try"
    name = f"{netns.PREFIX}{os.getpid()}-seg6probe"  # swept like the testbed's own should we die
    pr_netns.create(name)
    try:
        with NetNS(name) as ipr:
            lo = ipr.link_lookup(ifname="lo")[0]
            ipr.link("set", index=lo, state="up")
            ipr.route("add", dst="fc00::e/128", oif=lo, family=10, encap={"type": "seg6local", "action": "End"})
        return True, "present"
    except Exception as e:  # noqa: BLE001 - any refusal means: not usable here
        code = getattr(e, "code", None)
        return False, "absent: kernel built without CONFIG_IPV6_SEG6_LWTUNNEL" if code == errno.EOPNOTSUPP else \
            f"absent: {e}"
    finally:
        with contextlib.suppress(OSError):
            pr_netns.remove(name)


HOST_SRV6 = _kernel_srv6()[0]


def host_kernel(test):
    """Collected only where the host kernel has SRv6 lwtunnels (never a skip: the test_guest_* tests run the
    same cases against the guest's kernel everywhere)."""
    test.__test__ = HOST_SRV6
    return test


pytestmark = [pytest.mark.bpf, pytest.mark.netns]

SRMIG = [sys.executable, "-m", "srmig"]  # this checkout's CLI, whatever `srmig` on PATH points to

VM = "2001:db8:100::10"
S_END_S = "fc00:0:1::5"
T_END = "fc00:0:3::e"
D_SBUF = "fc00:0:2::b"
D_DX6_MAP = "fc00:0:2::d6"
D_KERNEL_DX6 = "fc00:0:2::dd"


def build(topo):
    for role in ("I", "S", "T", "D", "VM"):
        topo.add_host(role)
    topo.link("I", "i0", "S", "s_in", "2001:db8:1::1/64", "2001:db8:1::2/64")
    topo.link("S", "s_t", "T", "t_s", "2001:db8:2::1/64", "2001:db8:2::2/64")
    topo.link("T", "t_d", "D", "d_t", "2001:db8:3::1/64", "2001:db8:3::2/64")
    topo.link("D", "d_vm", "VM", "eth0", "2001:db8:100::1/64", VM + "/64")
    # Native XDP redirects into a veth are dropped unless the receiving peer runs NAPI (GRO on).
    for role, ifname in (("T", "t_s"), ("VM", "eth0"), ("D", "d_vm"), ("S", "s_t")):
        topo.run(role, "ethtool", "-K", ifname, "gro", "on")
    topo.route("VM", "::/0", gateway="2001:db8:100::1")
    topo.route("I", "fc00::/16", gateway="2001:db8:1::2")  # after H.Encaps the DA is the first SID
    topo.route("S", "fc00:0:2::/47", gateway="2001:db8:2::2")  # D's and T's locators
    topo.route("T", "fc00:0:2::/48", gateway="2001:db8:3::2")
    topo.route("T", T_END + "/128", oif="t_s", encap={"type": "seg6local", "action": "End"})
    topo.route("D", D_KERNEL_DX6 + "/128", oif="d_vm", encap={"type": "seg6local", "action": "End.DX6",
                                                               "nh6": VM})
    # Plain return path for replies.
    topo.route("D", "2001:db8:1::/64", gateway="2001:db8:3::1")
    topo.route("T", "2001:db8:1::/64", gateway="2001:db8:2::1")


def steer(topo, segments):
    """The ingress's H.Encaps for the VM; pyroute2 wants the SRH order, i.e. the last segment first."""
    topo.route("I", VM + "/128", oif="i0", gateway="2001:db8:1::2",
               encap={"type": "seg6", "mode": "encap", "segs": list(reversed(segments))})


def ping(topo, count=5) -> int:
    r = topo.run("I", "ping", "-6", "-c", str(count), "-i", "0.05", "-W", "2", VM, check=False, timeout=20)
    for line in r.stdout.splitlines():
        if "received" in line:
            return int(line.split(",")[1].split()[0])
    raise AssertionError(f"ping printed no summary: {r.stdout} {r.stderr}")


def sid_stats(dp, sid):
    return next(s.stats for s in dp.list_sids() if s.sid == sid)


@host_kernel
@pytest.mark.parametrize("mode", ["generic", "native"])
@pytest.mark.parametrize("last", ["srmig End.SBUF", "srmig End.DX6-map", "kernel End.DX6"])
def test_kernel_interop(topology, mode, last):
    build(topology)
    d_sid = {"srmig End.SBUF": D_SBUF, "srmig End.DX6-map": D_DX6_MAP, "kernel End.DX6": D_KERNEL_DX6}[last]
    with xdp_on(topology, "S", "s_in", mode) as s_dp, xdp_on(topology, "D", "d_t", mode) as d_dp:
        s_dp.add_sid(S_END_S, Behaviour.END_S)
        s_dp.set_vm(VM, VmState.AWAY)
        d_dp.add_sid(D_SBUF, Behaviour.END_SBUF)
        d_dp.add_sid(D_DX6_MAP, Behaviour.END_DX6_MAP)
        d_dp.set_vm(VM, VmState.RUNNING)
        steer(topology, [S_END_S, T_END, d_sid])

        assert ping(topology) == 5

        s = sid_stats(s_dp, S_END_S)
        assert s["forwarded"] >= 5 and s["dropped"] == 0
        if last.startswith("srmig"):
            d = sid_stats(d_dp, d_sid)
            assert d["delivered"] >= 5 and d["dropped"] == 0
        else:  # the kernel delivered: our program on D only passed the packets by
            assert all(st.stats["packets"] == 0 for st in d_dp.list_sids())
        assert s_dp.stats()["drops"] == {k: 0 for k in s_dp.stats()["drops"]}


@host_kernel
def test_end_s_running_delivers_locally(topology):
    """The same path while the VM still runs on S: End.S delivers there and ignores the rest of the list."""
    build(topology)
    # Move the VM namespace's link: the VM now hangs off S.
    topology.link("S", "s_vm", "VM", "eth1", "2001:db8:101::1/64", "2001:db8:101::10/64")
    topology.route("S", VM + "/128", oif="s_vm", gateway="2001:db8:101::10")
    topology.route("VM", "2001:db8:1::/64", gateway="2001:db8:101::1")
    with xdp_on(topology, "S", "s_in", "generic") as s_dp:
        s_dp.add_sid(S_END_S, Behaviour.END_S)
        s_dp.set_vm(VM, VmState.RUNNING)
        steer(topology, [S_END_S, T_END, D_SBUF])
        assert ping(topology) == 5
        assert sid_stats(s_dp, S_END_S)["delivered"] >= 5


@host_kernel
def test_unknown_sid_passes_to_kernel(topology):
    """A SID we do not own is untouched: the kernel's own seg6local on S still handles it."""
    build(topology)
    topology.route("S", "fc00:0:1::e/128", oif="s_t", encap={"type": "seg6local", "action": "End"})
    with xdp_on(topology, "S", "s_in", "generic") as s_dp:
        s_dp.add_sid(S_END_S, Behaviour.END_S)
        with xdp_on(topology, "D", "d_t", "generic") as d_dp:
            d_dp.add_sid(D_SBUF, Behaviour.END_SBUF)
            d_dp.set_vm(VM, VmState.RUNNING)
            steer(topology, ["fc00:0:1::e", T_END, D_SBUF])
            assert ping(topology) == 5
            assert s_dp.stats()["verdicts"]["pass"] >= 5
            assert sid_stats(d_dp, D_SBUF)["delivered"] >= 5


def test_cli_end_to_end(topology):
    """The CLI a user types, on a namespace host, with --json output."""
    import json

    # Only S and its interface: the CLI needs no route, so this runs on every kernel.
    for role in ("I", "S"):
        topology.add_host(role)
    topology.link("I", "i0", "S", "s_in", "2001:db8:1::1/64", "2001:db8:1::2/64")
    ns = topology.ns("S")

    def srmig(*args):
        r = subprocess.run([*SRMIG, "--netns", ns, *args], capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, r.stderr
        return json.loads(r.stdout) if "--json" in args else r.stdout

    try:
        assert srmig("load", "s_in", "--mode", "generic", "--json")["interface"] == "s_in"
        srmig("sid", "add", S_END_S, "End.S")
        srmig("vm", "set", VM, "away", "--next-sid", D_DX6_MAP)
        assert srmig("sid", "list", "--json")[0]["behaviour"] == "End.S"
        assert srmig("vm", "list", "--json") == [{"vm": VM, "state": "away", "next_sid": D_DX6_MAP,
                                                  "hold_ring": False, "shadow": False}]
        assert "End.S" in srmig("stats")
        bad = subprocess.run([*SRMIG, "--netns", ns, "sid", "add", "not-an-address", "End.S"],
                             capture_output=True, text=True)
        assert bad.returncode == 1 and bad.stderr.count("\n") == 1 and "not an IPv6 address" in bad.stderr
        bad = subprocess.run([*SRMIG, "--netns", ns, "vm", "set", VM, "flying"], capture_output=True, text=True)
        assert bad.returncode == 1 and "expected one of running, hold, away, incoming" in bad.stderr
        assert srmig("vm", "del", VM, "--json")["deleted"] is True
        assert srmig("vm", "del", VM, "--json")["deleted"] is False  # idempotent
    finally:
        out = srmig("unload", "s_in", "--json")
    assert out["pins_removed"] is True
    r = subprocess.run([*SRMIG, "--netns", ns, "sid", "list"], capture_output=True, text=True)
    assert r.returncode == 1 and "srmig is not loaded" in r.stderr


# --- the guest's kernel: every host kernel ----------------------------------------------------------------

GUEST = "2001:db8:200::10"          # the guest's eth0, behind S's tap
TAP = "tapg"
G_END = "fc00:0:3::e"               # the guest plays T: its locator is T's
G_DX6 = "fc00:0:3::d6"
COUNT = 5


def build_guest_peer(topo) -> None:
    """S (the guest's tap, added by Qemu), D and the VM namespace (behind D, and behind S for End.S RUNNING)."""
    for role in ("S", "D", "VM"):
        topo.add_host(role)
    topo.link("S", "s_d", "D", "d_s", "2001:db8:2::1/64", "2001:db8:2::2/64", static_neigh=True)
    topo.link("D", "d_vm", "VM", "eth0", "2001:db8:100::1/64", VM + "/64", static_neigh=True)
    topo.link("S", "s_vm", "VM", "eth1", "2001:db8:101::1/64", "2001:db8:101::10/64", static_neigh=True)
    # Native XDP redirects into a veth are dropped unless the receiving peer runs NAPI (GRO on); a tap
    # takes them as they are.
    for role, ifname in (("S", "s_d"), ("D", "d_s"), ("VM", "eth0"), ("VM", "eth1")):
        topo.run(role, "ethtool", "-K", ifname, "gro", "on")
    topo.route("VM", "::/0", gateway="2001:db8:100::1")
    topo.route("D", "::/0", gateway="2001:db8:2::1")           # the guest's address and locator, via S
    topo.route("S", "fc00:0:2::/48", gateway="2001:db8:2::2")  # D's locator
    topo.route("S", VM + "/128", gateway="2001:db8:101::10")   # End.S RUNNING and the guest's End.DX6 deliver here


@pytest.fixture(scope="module")
def guest_peer():
    """One guest for the module: booted on S's tap, set up as a kernel SRv6 node (End, End.DX6 towards the
    VM). Guest, tap and namespaces are gone at the end, pass or fail."""
    # Names start with our pid (netns.sweep keeps them while we live) and differ from `topology`'s.
    with netns.Topology(tag=f"{os.getpid()}-g") as topo:
        build_guest_peer(topo)
        with qemu.Qemu("srv6-peer", ns=topo.ns("S"), tap=TAP, addr=f"{GUEST}/64") as vm:
            try:
                qemu.configure_host_tap(topo.ns("S"), TAP, GUEST, vm.mac)
                topo.route("S", "fc00:0:3::/48", gateway=GUEST, oif=TAP)  # T's locator: the guest
                vm.wait_ready(30)
                peer = KernelSrv6Guest(vm)
                peer.start()
                peer.add_end(G_END)
                peer.add_end_dx6(G_DX6, VM)
            except BaseException:
                print(f"{vm.name} console:\n{vm.console()}")
                raise
            yield topo, peer


@pytest.fixture(scope="module", params=["generic", "native"])
def guest_xdp(request, guest_peer):
    """srmig on S's tap (what the guest sends) and on D's link from S, in one XDP mode."""
    topo, peer = guest_peer
    mode = request.param
    with xdp_on(topo, "S", TAP, mode) as s_dp, xdp_on(topo, "D", "d_s", mode) as d_dp:
        for role, ifname in (("S", TAP), ("D", "d_s")):  # native on a tap too: tun has its own XDP path
            with topo.ipr(role) as ipr:
                assert netlink.xdp_attached(netlink.ifindex(ifname, ipr), ipr)[1] == mode
        yield topo, peer, s_dp, d_dp


class Counters:
    """Everything a guest case counts, read before and after it: deltas, so the cases share one guest."""

    def __init__(self, topo, peer, s_dp, d_dp):
        self.topo, self.peer, self.s_dp, self.d_dp = topo, peer, s_dp, d_dp
        self.start = self.read()

    def read(self) -> dict[str, int]:
        vm = qemu.parse_stats(self.topo.run("VM", "cat", "/proc/net/snmp6").stdout.splitlines())
        guest = self.peer.stats()
        out = {"vm_echo_requests": vm["Icmp6InEchos"], "guest_echo_replies": guest["Icmp6InEchoReplies"],
               "guest_end": self.peer.route_packets(G_END), "guest_dx6": self.peer.route_packets(G_DX6)}
        for host, dp in (("s", self.s_dp), ("d", self.d_dp)):
            st = dp.stats()
            out.update({f"{host}_{k}": v for k, v in st["verdicts"].items()})
            out[f"{host}_drops"] = sum(st["drops"].values())
        return out

    def delta(self) -> dict[str, int]:
        now = self.read()
        return {k: now[k] - self.start[k] for k in now}


@pytest.fixture
def guest_lab(guest_xdp):
    """The module's guest and srmig, with srmig's SIDs and VMs emptied before each case (a re-added SID's
    counters start from zero)."""
    topo, peer, s_dp, d_dp = guest_xdp
    for dp in (s_dp, d_dp):
        for sid in dp.list_sids():
            dp.del_sid(sid.sid)
        for vm in dp.list_vms():
            dp.del_vm(vm.vm)
    return topo, peer, s_dp, d_dp


def guest_ping(peer, count=COUNT) -> None:
    assert peer.ping(VM, count) == (count, count)


@pytest.mark.vm
@pytest.mark.parametrize("last", ["srmig End.SBUF", "srmig End.DX6-map", "kernel End.DX6"])
def test_guest_kernel_interop(guest_lab, last):
    """test_kernel_interop with the guest's kernel: its H.Encaps → srmig End.S (VM AWAY) → its End → `last`."""
    topo, peer, s_dp, d_dp = guest_lab
    d_sid = {"srmig End.SBUF": D_SBUF, "srmig End.DX6-map": D_DX6_MAP, "kernel End.DX6": G_DX6}[last]
    s_dp.add_sid(S_END_S, Behaviour.END_S)
    s_dp.set_vm(VM, VmState.AWAY)
    d_dp.add_sid(D_SBUF, Behaviour.END_SBUF)
    d_dp.add_sid(D_DX6_MAP, Behaviour.END_DX6_MAP)
    d_dp.set_vm(VM, VmState.RUNNING)
    peer.steer(VM, [S_END_S, G_END, d_sid])
    c = Counters(topo, peer, s_dp, d_dp)

    guest_ping(peer)

    d = c.delta()
    assert d["vm_echo_requests"] == COUNT and d["guest_echo_replies"] == COUNT
    s = sid_stats(s_dp, S_END_S)
    assert (s["packets"], s["forwarded"], s["delivered"], s["held"], s["dropped"]) == (COUNT, COUNT, 0, 0, 0)
    assert d["guest_end"] == COUNT
    if last.startswith("srmig"):
        assert sid_stats(d_dp, d_sid)["delivered"] == COUNT and sid_stats(d_dp, d_sid)["dropped"] == 0
        assert d["guest_dx6"] == 0
    else:  # the guest's kernel decapsulated: D's program saw nothing
        assert d["guest_dx6"] == COUNT
        assert all(st.stats["packets"] == 0 for st in d_dp.list_sids())
    assert d["s_drops"] == 0 and d["d_drops"] == 0


@pytest.mark.vm
def test_guest_dx6_map_away_to_kernel_dx6(guest_lab):
    """srmig's End.DX6-map with the VM AWAY rewrites the active segment to where it went, here the guest
    kernel's End.DX6, which decapsulates and delivers: the guest's H.Encaps → D End.DX6-map → guest End.DX6."""
    topo, peer, s_dp, d_dp = guest_lab
    d_dp.add_sid(D_DX6_MAP, Behaviour.END_DX6_MAP)
    d_dp.set_vm(VM, VmState.AWAY, next_sid=G_DX6)
    peer.steer(VM, [D_DX6_MAP])
    c = Counters(topo, peer, s_dp, d_dp)

    guest_ping(peer)

    d = c.delta()
    assert d["vm_echo_requests"] == COUNT and d["guest_echo_replies"] == COUNT
    st = sid_stats(d_dp, D_DX6_MAP)
    assert st["forwarded"] == COUNT and st["delivered"] == 0 and st["dropped"] == 0
    assert d["guest_dx6"] == COUNT and d["guest_end"] == 0
    assert d["s_drops"] == 0 and d["d_drops"] == 0


@pytest.mark.vm
def test_guest_end_s_running_delivers_locally(guest_lab):
    """test_end_s_running_delivers_locally with the guest's kernel as the ingress: End.S delivers on S and
    ignores the rest of the list (the guest's End never sees the packets)."""
    topo, peer, s_dp, d_dp = guest_lab
    s_dp.add_sid(S_END_S, Behaviour.END_S)
    s_dp.set_vm(VM, VmState.RUNNING)
    peer.steer(VM, [S_END_S, G_END, D_SBUF])
    c = Counters(topo, peer, s_dp, d_dp)

    guest_ping(peer)

    d = c.delta()
    assert d["vm_echo_requests"] == COUNT and d["guest_echo_replies"] == COUNT
    st = sid_stats(s_dp, S_END_S)
    assert st["delivered"] == COUNT and st["forwarded"] == 0 and st["dropped"] == 0
    assert d["guest_end"] == 0 and d["d_deliver"] == 0


@pytest.mark.vm
def test_guest_unknown_sid_passes_to_kernel(guest_lab):
    """A SID srmig does not own is untouched: S's XDP passes it, S's kernel routes it (back over the tap) to
    the guest kernel's End, which advances it to D's End.SBUF."""
    topo, peer, s_dp, d_dp = guest_lab
    s_dp.add_sid(S_END_S, Behaviour.END_S)
    d_dp.add_sid(D_SBUF, Behaviour.END_SBUF)
    d_dp.set_vm(VM, VmState.RUNNING)
    peer.steer(VM, [G_END, D_SBUF])
    c = Counters(topo, peer, s_dp, d_dp)

    guest_ping(peer)

    d = c.delta()
    assert d["vm_echo_requests"] == COUNT and d["guest_echo_replies"] == COUNT
    assert d["s_pass"] >= 2 * COUNT  # to the guest's End, then (advanced) to D: both just routed on S
    assert sid_stats(s_dp, S_END_S)["packets"] == 0
    assert d["guest_end"] == COUNT
    assert sid_stats(d_dp, D_SBUF)["delivered"] == COUNT
    assert d["s_drops"] == 0 and d["d_drops"] == 0
