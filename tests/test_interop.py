"""Interop with the Linux kernel's own SRv6, both ways, on real veths in namespaces:

    ingress --- S --- T --- D --- VM
    kernel      srmig kernel srmig End.SBUF / kernel End.DX6
    seg6 encap  End.S End

The ingress encapsulates with a kernel `encap seg6` route; S runs srmig's End.S with the VM AWAY and advances
to T, whose kernel seg6local End advances to D; D delivers to the VM namespace, once with srmig's End.SBUF,
once with srmig's End.DX6-map, once with the kernel's seg6local End.DX6. Replies come back by plain routing.
"""

from __future__ import annotations

import subprocess
import sys

import pytest

from srmig.dataplane.abi import Behaviour, VmState
from srmig.testbed.lab import xdp_on

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

    build(topology)
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
