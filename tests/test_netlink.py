"""srmig.netlink, the product's one pyroute2 module, against the real kernel: in namespaces the test creates and
always removes (srmig-<pid>-... names, so netns.sweep() finds what a crashed run leaves). Every change is read
back with iproute2 or tc, not with pyroute2, so a pyroute2 quirk cannot hide behind itself. The test sends
nothing; the kernel's own neighbour discovery stays on the veth between the test's two namespaces."""

from __future__ import annotations

import json
import errno
import os
import socket

import pytest

from srmig import check, netlink
from srmig.bpf import libbpf, loader
from srmig.testbed import netns

pytestmark = pytest.mark.netns

A_ADDR, B_ADDR = "2001:db8:a::1", "2001:db8:a::2"
VM = "2001:db8:100::10"


@pytest.fixture
def pair(topology):
    """Namespace A with veth a0 (2001:db8:a::1/64) towards namespace B's b0 (2001:db8:a::2/64)."""
    topology.add_host("A")
    topology.add_host("B")
    topology.link("A", "a0", "B", "b0", A_ADDR + "/64", B_ADDR + "/64", static_neigh=True)
    with topology.ipr("A") as ipr:
        yield topology, ipr


def _routes(topology, dst: str) -> list[dict]:
    """`ip -6 -j route show` of `dst` in namespace A."""
    return json.loads(topology.run("A", "ip", "-6", "-j", "-d", "route", "show", dst).stdout or "[]")


def test_ifindex_and_link_attributes_of_a_veth(pair):
    topology, ipr = pair
    idx = netlink.ifindex("a0", ipr)
    with topology.inside("A"):
        assert idx == socket.if_nametoindex("a0")
    assert netlink.find_ifindex("a0", ipr) == idx
    assert netlink.link_names(ipr)[idx] == "a0"
    assert netlink.link_mtu(idx, ipr) == 1500
    assert netlink.link_mac(idx, ipr) == topology.run("A", "cat", "/sys/class/net/a0/address").stdout.strip()
    assert A_ADDR in netlink.addresses(idx, ipr)
    assert netlink.neighbour_mac(B_ADDR, idx, ipr) == topology.mac("B", "b0")  # the static entry link() made
    assert netlink.neighbour_mac("2001:db8:a::99", idx, ipr) is None
    # The drain's next hop: the route's gateway (or the DA on a link route) and its MAC, read back with ip.
    a_mac = topology.run("A", "cat", "/sys/class/net/a0/address").stdout.strip()
    topology.route("A", "fc00:0:2::/48", gateway=B_ADDR)
    topology.route("A", "fc00:0:3::/48", gateway="2001:db8:a::99")  # a gateway with no neighbour entry
    assert netlink.next_hop_mac("fc00:0:2::b", ipr) == (idx, a_mac, topology.mac("B", "b0"))
    assert netlink.next_hop_mac(B_ADDR, ipr) == (idx, a_mac, topology.mac("B", "b0"))
    assert netlink.next_hop_mac("fc00:0:3::b", ipr) is None
    assert netlink.next_hop_mac("2001:db8:dead::1", ipr) is None  # no route
    # The kernel's own MLD and router solicitations may be counted meanwhile: ip's reading lies in between.
    before = netlink.link_stats(idx, ipr)["tx_packets"]
    shown = json.loads(topology.run("A", "ip", "-s", "-j", "link", "show", "a0").stdout)[0]
    assert before <= shown["stats64"]["tx"]["packets"] <= netlink.link_stats(idx, ipr)["tx_packets"]
    old = netlink.link_txqlen(idx, ipr)
    netlink.set_link_txqlen(idx, old + 1, ipr)
    assert netlink.link_txqlen(idx, ipr) == old + 1


def test_a_missing_interface_is_a_one_line_error(pair):
    _, ipr = pair
    assert netlink.find_ifindex("srmig-nope0", ipr) is None
    with pytest.raises(netlink.NoSuchInterface) as e:
        netlink.ifindex("srmig-nope0", ipr)
    assert str(e.value) == "no interface 'srmig-nope0' in this network namespace"
    assert isinstance(e.value, ValueError)  # what the CLI prints as one `srmig: error:` line


def test_route_replace_and_del_with_an_mtu_metric(pair):
    """pyroute2 0.9 ignores the RTAX_MTU attrs form: the MTU must reach the kernel (metrics={"mtu": n})."""
    topology, ipr = pair
    idx = netlink.ifindex("a0", ipr)
    dst = f"{VM}/128"
    for mtu in (1400, 1300):  # replace, twice: one route, the latest MTU
        netlink.replace_route(dst, idx, gateway=B_ADDR, mtu=mtu, ipr=ipr)
        routes = _routes(topology, dst)
        assert len(routes) == 1, routes
        assert routes[0]["gateway"] == B_ADDR and routes[0]["dev"] == "a0"
        assert {"mtu": mtu} in routes[0]["metrics"], routes
    assert netlink.del_route(dst, ipr) is True
    assert _routes(topology, dst) == []
    assert netlink.del_route(dst, ipr) is False  # gone already: success, not an error


def test_seg6_encap_takes_the_list_in_travel_order():
    """pyroute2 wants the SRH order (the last segment first): seg6_encap() reverses the travel order."""
    assert netlink.seg6_encap(["fc00::1", "fc00::2", "fc00::3"])["segs"] == ["fc00::3", "fc00::2", "fc00::1"]


def test_seg6_encap_route_reads_back_in_travel_order(pair):
    """Where the kernel has SRv6 lwtunnels the route reads back in travel order; where it has none, the
    kernel refuses it with EOPNOTSUPP, which `srmig check` and `encap = "kernel"` turn into one line."""
    topology, ipr = pair
    segments = ["fc00:0:1::5", "fc00:0:2::d6"]
    add = lambda: netlink.replace_route(f"{VM}/128", netlink.ifindex("a0", ipr), gateway=B_ADDR,  # noqa: E731
                                        encap=netlink.seg6_encap(segments), ipr=ipr)
    if not check.kernel_srv6()[0]:
        with pytest.raises(netlink.NetlinkError) as e:
            add()
        assert netlink.error_code(e.value) == errno.EOPNOTSUPP, e.value
        assert _routes(topology, f"{VM}/128") == []
        return
    add()
    shown = topology.run("A", "ip", "-6", "route", "show", f"{VM}/128").stdout
    assert f"segs 2 [ {segments[0]} {segments[1]} ]" in shown, shown  # iproute2 prints the travel order


@pytest.mark.bpf
def test_clsact_and_bpf_filter_round_trip(pair):
    topology, ipr = pair
    idx = netlink.ifindex("a0", ipr)
    assert netlink.bpf_filter_prios(idx, loader.CLSACT_EGRESS, ipr) == []  # no clsact qdisc yet
    fd = check._prog_load(check.BPF_PROG_TYPE_SCHED_CLS, check._returns(check.TC_ACT_OK))
    try:
        for _ in range(2):  # both idempotent: the qdisc is kept, the filter replaced
            netlink.add_clsact(idx, ipr)
            netlink.add_bpf_filter(idx, fd, "srmig_test", loader.CLSACT_EGRESS, loader.ENCAP_HANDLE,
                                   loader.ENCAP_PRIO, replace=True, ipr=ipr)
    finally:
        os.close(fd)  # the filter keeps the program
    assert netlink.bpf_filter_prios(idx, loader.CLSACT_EGRESS, ipr) == [loader.ENCAP_PRIO]
    shown = topology.run("A", "tc", "filter", "show", "dev", "a0", "egress").stdout
    assert f"pref {loader.ENCAP_PRIO} bpf" in shown and "srmig_test" in shown and "direct-action" in shown, shown
    netlink.del_bpf_filter(idx, loader.ENCAP_HANDLE, loader.ENCAP_PRIO, loader.CLSACT_EGRESS, ipr)
    assert netlink.bpf_filter_prios(idx, loader.CLSACT_EGRESS, ipr) == []
    assert "clsact" in topology.run("A", "tc", "qdisc", "show", "dev", "a0").stdout  # others may use it


@pytest.mark.bpf
def test_xdp_attach_query_detach(pair):
    topology, ipr = pair
    idx = netlink.ifindex("a0", ipr)
    assert netlink.xdp_attached(idx, ipr) == (0, None)
    fd = check._prog_load(check.BPF_PROG_TYPE_XDP, check._returns(check.XDP_PASS))
    try:
        netlink.xdp_attach(idx, fd, loader.MODES["generic"], ipr)
        assert netlink.xdp_attached(idx, ipr) == (libbpf.prog_id(fd), "generic")
        assert "xdpgeneric" in topology.run("A", "ip", "link", "show", "a0").stdout
        netlink.xdp_detach(idx, loader.MODES["generic"], ipr)
    finally:
        os.close(fd)
    assert netlink.xdp_attached(idx, ipr) == (0, None)


def test_create_ns_inside_remove_ns():
    name = f"{netns.PREFIX}{os.getpid()}-netlink"
    netlink.create_ns(name)
    try:
        assert netns.run(name, "ip", "netns", "identify").stdout.strip() == name
        with netlink.inside(name), netlink.handle() as ipr:  # a handle opened inside works in `name`
            lo = netlink.ifindex("lo", ipr)
            assert "UP" in json.loads(netns.run(name, "ip", "-j", "link", "show", "lo").stdout)[0]["flags"]
            assert netlink.link_names(ipr) == {lo: "lo"}
    finally:
        netlink.remove_ns(name)
    assert not os.path.exists(f"/run/netns/{name}")
