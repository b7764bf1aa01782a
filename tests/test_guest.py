"""The real test guest under QEMU (TCG): boot it behind a tap in host S, ping it from a client through S,
live-migrate it over QMP to an `-incoming` QEMU in host D (over a separate management link), move the
client's route to D, ping again. Plain kernel routing, no XDP: this proves the guest and the QEMU driver.

    C ──cs/sc── S ──mg0── D        migration stream over mg0
    └────cd/dc────────────┘        the VM's tap "tapvm" in S and in D: anycast gateway fe80::1, 198.51.100.1
                                   and one MAC

Before them (no QEMU): the guest's kernel command line and counters (pure tables), and the IPv4 anycast gateway
between namespaces: every host answers ARP for it with the same MAC, and a guest moved to another host keeps
its ARP entry and sends no ARP.
"""

from __future__ import annotations

import os
import re
import time

import pytest

from srmig.testbed import echo_xdp, guest, probe, qemu
from srmig.testbed.netns import sysctl

VM = "2001:db8:100::10"
VM4 = "198.51.100.10"
MGMT_D = "fd00:99::2"
URI = f"tcp:[{MGMT_D}]:4444"
VIA_S, VIA_D = "2001:db8:a::2", "2001:db8:b::2"
VIA_S4, VIA_D4 = "192.0.2.2", "192.0.2.6"  # C-S 192.0.2.0/30, C-D 192.0.2.4/30


# --- pure ------------------------------------------------------------------------------------------------

# (id, kernel_cmdline keywords, srmig.* settings expected, settings that must be absent)
CMDLINE_ROWS = [
    ("ipv6-only", dict(addr="2001:db8:100::10/64"),
     ["srmig.addr=2001:db8:100::10/64", "srmig.gw=fe80::1"], ["srmig.addr4=", "srmig.gw4="]),
    ("dual-stack", dict(addr="2001:db8:100::10/64", addr4="198.51.100.10/24", gw4="198.51.100.1"),
     ["srmig.addr=2001:db8:100::10/64", "srmig.gw=fe80::1", "srmig.addr4=198.51.100.10/24",
      "srmig.gw4=198.51.100.1"], []),
    ("ipv4-no-gateway", dict(addr=None, addr4="198.51.100.10/32"),
     ["srmig.addr4=198.51.100.10/32", "srmig.gw=fe80::1"], ["srmig.addr=", "srmig.gw4="]),
    ("stats", dict(addr="2001:db8:100::10/64", stats=2), ["srmig.stats=2"], ["srmig.addr4="]),
    ("echo-xdp", dict(addr="2001:db8:100::10/64", echo="xdp"), ["srmig.echo=xdp"], []),
    ("echo-kernel", dict(addr="2001:db8:100::10/64", echo="kernel"), [], ["srmig.echo="]),
]


@pytest.mark.parametrize("kw,present,absent", [r[1:] for r in CMDLINE_ROWS], ids=[r[0] for r in CMDLINE_ROWS])
def test_kernel_cmdline(kw, present, absent):
    words = guest.kernel_cmdline(**kw).split()
    for p in present:
        assert p in words
    for a in absent:
        assert not any(w.startswith(a) for w in words), words
    assert words[0] == "console=ttyS0"


def test_kernel_cmdline_gateway_needs_address():
    with pytest.raises(ValueError):
        guest.kernel_cmdline("2001:db8:100::10/64", gw4="198.51.100.1")


def test_kernel_cmdline_echo_mode():
    with pytest.raises(ValueError):
        guest.kernel_cmdline("2001:db8:100::10/64", echo="dpdk")


def test_init_reads_every_setting():
    """/init reads every srmig.* setting kernel_cmdline writes, and configures IPv4 from them."""
    for key in ("srmig.addr=", "srmig.gw=", "srmig.addr4=", "srmig.gw4=", "srmig.stats=", "srmig.ctl=", "srmig.echo="):
        assert f"        {key}*)" in guest.INIT, key
    assert 'ip -4 addr add "$ADDR4" dev eth0' in guest.INIT
    assert "net.ipv4.neigh.eth0.base_reachable_time_ms=3600000" in guest.INIT
    assert "cat /proc/net/snmp6 /proc/net/snmp" in guest.INIT
    assert f"xdp obj {guest.ECHO_XDP_OBJECT} sec {echo_xdp.SECTION}" in guest.INIT
    # the responder's RX ring, shortened before the program is attached
    ring = guest.INIT.index(f"{guest.ETHTOOL} -G eth0 rx {guest.XDP_RX_RING}")
    assert ring < guest.INIT.index(f"xdp obj {guest.ECHO_XDP_OBJECT}")


STATS_LINES = """\
Icmp6InEchos 120
Icmp6OutEchoReplies 118
Ip: Forwarding DefaultTTL InReceives OutDiscards
Ip: 2 64 300 3
Icmp: InMsgs InErrors InEchos OutEchoReps
Icmp: 100 0 99 97
IcmpMsg: InType8 OutType0
IcmpMsg: 99 97
Udp: InDatagrams NoPorts
eth0_rx_packets 400
Tcp: RtoAlgorithm
Tcp: 1 2
Udp: 5 6""".splitlines()

# (id, lines, expected subset); a value line that does not follow its own header is ignored
STATS_ROWS = [
    ("mixed", STATS_LINES,
     {"Icmp6InEchos": 120, "Icmp6OutEchoReplies": 118, "IpOutDiscards": 3, "IpInReceives": 300, "IcmpInEchos": 99,
      "IcmpOutEchoReps": 97, "IcmpMsgInType8": 99, "eth0_rx_packets": 400}),
    ("orphans", STATS_LINES, {"UdpInDatagrams": None, "TcpRtoAlgorithm": None}),
    ("negative", ["Ip6Foo -1", "Icmp: InMsgs", "Icmp: -2"], {"Ip6Foo": -1, "IcmpInMsgs": -2}),
]


@pytest.mark.parametrize("lines,expected", [r[1:] for r in STATS_ROWS], ids=[r[0] for r in STATS_ROWS])
def test_parse_stats(lines, expected):
    got = qemu.parse_stats(lines)
    for key, want in expected.items():
        assert got.get(key) == want, key


def test_parse_stats_of_this_kernel():
    """The host's own /proc/net/snmp, as the guest sends it: every counter of every protocol line."""
    text = open("/proc/net/snmp").read().splitlines()
    got = qemu.parse_stats(text)
    for header, values in zip(text[::2], text[1::2]):
        proto = header.split(":")[0]
        for k, v in zip(header.split()[1:], values.split()[1:]):
            assert got[proto + k] == int(v)
    assert {"IcmpInEchos", "IcmpOutEchoReps", "IpOutDiscards"} <= set(got)


# (id, counters, lost, family, unanswered)
UNANSWERED_ROWS = [
    ("v6", {"Icmp6InEchos": 100, "Icmp6OutEchoReplies": 90, "IcmpInEchos": 50, "IcmpOutEchoReps": 50}, 20, "6", 10),
    ("v4", {"Icmp6InEchos": 100, "Icmp6OutEchoReplies": 90, "IcmpInEchos": 50, "IcmpOutEchoReps": 47}, 20, "4", 3),
    ("v4-capped", {"IcmpInEchos": 50, "IcmpOutEchoReps": 40}, 4, "4", 4),
    ("v4-unknown", {"Icmp6InEchos": 100, "Icmp6OutEchoReplies": 90}, 20, "4", 0),
    ("more-replies", {"IcmpInEchos": 5, "IcmpOutEchoReps": 7}, 3, "4", 0),
    # an XDP responder: the device's frames received and not sent back, both families together, capped by the loss
    ("xdp", {"srmig_echo_xdp": 0, "eth0_rx_packets": 1000, "eth0_tx_packets": 990, "Icmp6InEchos": 0}, 20, "6", 10),
    ("xdp-capped", {"srmig_echo_xdp": 0, "eth0_rx_packets": 1000, "eth0_tx_packets": 990}, 4, "4", 4),
    ("xdp-no-device", {"srmig_echo_xdp": 0, "Icmp6InEchos": 100, "Icmp6OutEchoReplies": 90}, 20, "6", 0),
    # the driver's XDP_TX drops, where the image's ethtool gives them: exact, where rx - tx is hidden by the guest's
    # own frames (here 10 more sent than received, 7 dropped)
    ("xdp-tx-drops", {"srmig_echo_xdp": 1, "eth0_rx_packets": 1000, "eth0_tx_packets": 1003,
                      "eth0_tx_queue_0_xdp_tx_drops": 7, "eth0_tx_queue_0_xdp_tx": 1000}, 20, "6", 7),
    ("xdp-tx-drops-queues", {"srmig_echo_xdp": 1, "eth0_tx_queue_0_xdp_tx_drops": 7,
                             "eth0_tx_queue_1_xdp_tx_drops": 5}, 20, "4", 12),
    ("xdp-tx-drops-capped", {"srmig_echo_xdp": 1, "eth0_tx_queue_0_xdp_tx_drops": 70}, 20, "4", 20),
    ("xdp-tx-drops-none", {"srmig_echo_xdp": 1, "eth0_rx_packets": 1000, "eth0_tx_packets": 980,
                           "eth0_tx_queue_0_xdp_tx_drops": 0}, 20, "6", 0),
]


@pytest.mark.parametrize("counters,lost,family,want", [r[1:] for r in UNANSWERED_ROWS],
                         ids=[r[0] for r in UNANSWERED_ROWS])
def test_unanswered(counters, lost, family, want):
    assert guest.unanswered(counters, lost, family) == want


# --- the IPv4 anycast gateway between namespaces ----------------------------------------------------------

def _gateway_entry(topo) -> tuple[str | None, int]:
    """The guest namespace's ARP entry for the gateway: (its MAC, ARP probes it sent for it)."""
    out = topo.run("G", "ip", "-s", "-4", "neigh", "show", qemu.GATEWAY_V4, "dev", "eth0").stdout
    mac = re.search(r"lladdr (\S+)", out)
    probes = re.search(r"probes (\d+)", out)
    return (mac.group(1) if mac else None), (int(probes.group(1)) if probes else 0)


def _ping_gateway(topo, count: int = 3) -> int:
    r = topo.run("G", "ping", "-4", "-n", "-q", "-c", str(count), "-i", "0.05", "-W", "1", qemu.GATEWAY_V4,
                 check=False, timeout=20)
    m = re.search(r"(\d+) received", r.stdout)
    return int(m.group(1)) if m else 0


@pytest.mark.netns
def test_ipv4_anycast_gateway_moves_with_the_guest(topology):
    """A guest namespace G behind host H1's "tap" (a veth) resolves its IPv4 gateway to the shared gateway MAC;
    the host end then moves to H2 (as a migration moves the VM: G's link and caches stay) and is configured as
    every host's is. G reaches the gateway through H2 at once with the ARP entry it had, sends no ARP, and H2
    sees only G's echo requests. Asked afresh, each host answers ARP with the same MAC."""
    t = topology
    for role in ("G", "H1", "H2"):
        t.add_host(role)
    t.link("G", "eth0", "H1", "vmtap", a_mac=qemu.GUEST_MAC)
    # QEMU's virtio link never loses carrier across a migration; a veth moved between namespaces does, and
    # the kernel would then evict G's ARP cache (arp_evict_nocarrier): keep it, as the guest does.
    sysctl(t.ns("G"), "net.ipv4.conf.eth0.arp_evict_nocarrier", 0)
    # IPv4 only: G's IPv6 (a link-local's MLD, router solicitations after the carrier returns) would blur the
    # count of frames H2 receives from it.
    sysctl(t.ns("G"), "net.ipv6.conf.eth0.disable_ipv6", 1)
    with t.ipr("G") as ipr:
        idx = ipr.link_lookup(ifname="eth0")[0]
        ipr.addr("add", index=idx, address=VM4, prefixlen=24, family=2)
        ipr.route("add", dst="0.0.0.0/0", gateway=qemu.GATEWAY_V4, oif=idx, family=2)
    qemu.configure_host_tap(t.ns("H1"), "vmtap", VM, qemu.GUEST_MAC, guest_addr4=f"{VM4}/24")
    assert _ping_gateway(t) == 3
    mac, probes = _gateway_entry(t)
    assert mac == qemu.GATEWAY_MAC

    with t.ipr("H1") as ipr:  # the move
        ipr.link("set", index=ipr.link_lookup(ifname="vmtap")[0], net_ns_fd=t.ns("H2"))
    qemu.configure_host_tap(t.ns("H2"), "vmtap", VM, qemu.GUEST_MAC, guest_addr4=f"{VM4}/24")
    rx0 = qemu.link_stats(t.ns("H2"), "vmtap")["rx_packets"]
    h2_0 = qemu.parse_stats(t.run("H2", "cat", "/proc/net/snmp").stdout.splitlines())
    assert _ping_gateway(t, 5) == 5
    h2_1 = qemu.parse_stats(t.run("H2", "cat", "/proc/net/snmp").stdout.splitlines())
    assert h2_1["IcmpInEchos"] - h2_0["IcmpInEchos"] == 5  # H2 answered, not a leftover of H1
    assert qemu.link_stats(t.ns("H2"), "vmtap")["rx_packets"] - rx0 == 5  # the echoes only: no ARP from G
    assert _gateway_entry(t) == (mac, probes)

    for host in ("H2",):  # a forgotten entry: H2 answers ARP with the gateway MAC too
        t.run("G", "ip", "-4", "neigh", "flush", "dev", "eth0")
        assert _gateway_entry(t)[0] is None
        assert _ping_gateway(t) == 3, host
        assert _gateway_entry(t)[0] == qemu.GATEWAY_MAC, host
    # and H2 keeps its permanent entry for the guest: it never ARPs towards it
    neigh = t.run("H2", "ip", "-4", "neigh", "show", VM4, "dev", "vmtap").stdout
    assert qemu.GUEST_MAC in neigh and "PERMANENT" in neigh, neigh


# --- QEMU ------------------------------------------------------------------------------------------------

def three_hosts(t) -> None:
    """C, S, D; dual-stack C-S and C-D links (IPv4 for a dual-stack guest), S and D forward both families."""
    for role in ("C", "S", "D"):
        t.add_host(role)
    t.link("C", "cs", "S", "sc", "2001:db8:a::1/64", f"{VIA_S}/64")
    t.link("C", "cd", "D", "dc", "2001:db8:b::1/64", f"{VIA_D}/64")
    t.link("S", "mg0", "D", "mg0", "fd00:99::1/64", f"{MGMT_D}/64")
    for role, ifname, addr in (("C", "cs", "192.0.2.1"), ("S", "sc", VIA_S4), ("C", "cd", "192.0.2.5"),
                               ("D", "dc", VIA_D4)):
        with t.ipr(role) as ipr:
            ipr.addr("add", index=ipr.link_lookup(ifname=ifname)[0], address=addr, prefixlen=30, family=2)
    for role in ("S", "D"):
        sysctl(t.ns(role), "net.ipv4.ip_forward", 1)
    t.route("C", f"{VM}/128", gateway=VIA_S)
    t.route("C", f"{VM4}/32", gateway=VIA_S4)


def ping(topo, count: int, interval: float = 0.1, wait: float = 1.0, timeout: float = 20,
         dst: str = VM) -> tuple[int, int]:
    """(transmitted, received) of an iputils ping from the client to `dst` (IPv6 or IPv4); bounded."""
    r = topo.run("C", "ping", "-n", "-q", "-c", str(count), "-i", str(interval), "-W", str(wait), dst,
                 check=False, timeout=timeout)
    m = re.search(r"(\d+) packets transmitted, (\d+) received", r.stdout)
    assert m, f"ping output: {r.stdout} {r.stderr}"
    return int(m.group(1)), int(m.group(2))


def first_reply(topo, timeout: float) -> float:
    """Seconds until the VM answers one echo request (one probe every ~0.2 s), bounded."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if ping(topo, 1, wait=0.2, timeout=5)[1] == 1:
            return time.monotonic() - t0
    raise AssertionError(f"no echo reply from the guest in {timeout} s")


def boot(vm: qemu.Qemu, topo, role: str) -> float:
    """Configure the host side of the VM's tap, wait for the guest; returns seconds to its first reply."""
    qemu.configure_host_tap(topo.ns(role), vm.tap, VM, vm.mac, guest_addr4=vm.addr4)
    try:
        return vm.wait_ready(30) + first_reply(topo, 15)
    except BaseException:
        print(f"{vm.name} console:\n{vm.console()}")
        raise


def guest_gateway_entry(vm: qemu.Qemu) -> tuple[str | None, int]:
    """The guest's ARP entry for its IPv4 gateway: (MAC, ARP probes sent for it), by iproute2's ip in the guest."""
    out = vm.guest_shell(f"{guest.IPROUTE2_IP} -s -4 neigh show {qemu.GATEWAY_V4} dev eth0")
    mac = re.search(r"lladdr (\S+)", out)
    probes = re.search(r"probes (\d+)", out)
    return (mac.group(1) if mac else None), (int(probes.group(1)) if probes else 0)


@pytest.mark.vm
def test_second_build_is_a_stamp_check():
    t0 = time.monotonic()
    img = guest.build(quiet=True)
    assert time.monotonic() - t0 < 0.5
    assert img.kernel.is_file() and img.initrd.is_file()
    assert guest.is_built()


@pytest.mark.vm
def test_boot_ping_migrate_ping(topology, capsys):
    t = topology
    three_hosts(t)
    facts = {}
    with qemu.Qemu("src", ns=t.ns("S"), tap="tapvm", addr4=f"{VM4}/24") as src:
        facts["first_reply_s"] = boot(src, t, "S")
        assert ping(t, 10, interval=0.05) == (10, 10)
        assert ping(t, 10, interval=0.05, dst=VM4) == (10, 10)
        before = src.guest_stats()
        assert before["Icmp6InEchos"] >= 10 and before["Icmp6OutEchoReplies"] >= 10
        assert before["IcmpInEchos"] >= 10 and before["IcmpOutEchoReps"] >= 10
        gw_before = guest_gateway_entry(src)
        assert gw_before[0] == qemu.GATEWAY_MAC, gw_before

        with qemu.Qemu("dst", ns=t.ns("D"), tap="tapvm", incoming=URI, addr4=f"{VM4}/24") as dst:
            qemu.configure_host_tap(t.ns("D"), "tapvm", VM, dst.mac, guest_addr4=dst.addr4)
            assert dst.status() == "inmigrate"
            t0 = time.monotonic()
            info = src.migrate(URI, timeout=30)
            facts["migrate_wall_s"] = time.monotonic() - t0
            resumed = dst.qmp.wait_event("RESUME", 10)
            stopped = src.qmp.wait_event("STOP", 5)
            assert src.qmp.wait_event("MIGRATION", 5, match={"status": "completed"})
            assert info["status"] == "completed"
            assert isinstance(info.get("downtime"), int) and info["downtime"] >= 0
            facts["downtime_ms"] = info["downtime"]
            facts["total_ms"] = info["total-time"]
            facts["stop_to_resume_ms"] = (resumed.host_time - stopped.host_time) * 1000
            assert src.status() == "postmigrate" and dst.status() == "running"

            t.route("C", f"{VM}/128", gateway=VIA_D)
            t.route("C", f"{VM4}/32", gateway=VIA_D4)
            assert ping(t, 10, interval=0.05) == (10, 10)
            assert ping(t, 10, interval=0.05, dst=VM4) == (10, 10)
            # Same IPv4 anycast gateway (198.51.100.1, same MAC) on D: the guest's ARP entry is the one it had
            # on S, and it sent no ARP probe for it since.
            assert guest_gateway_entry(dst) == gw_before

            after = dst.guest_stats()  # the migrated guest's counters continue from the source's
            assert after["IcmpInEchos"] >= before["IcmpInEchos"] + 10
            assert after["IcmpOutEchoReps"] >= before["IcmpOutEchoReps"] + 10
            assert after["Icmp6InEchos"] >= before["Icmp6InEchos"] + 10
            assert after["Icmp6OutEchoReplies"] >= before["Icmp6OutEchoReplies"] + 10
            assert after["Icmp6OutRateLimitHost"] == 0
            # Same anycast gateway (fe80::1, same MAC) on D: the guest needed no neighbour discovery.
            assert after["Icmp6OutNeighborSolicits"] == before["Icmp6OutNeighborSolicits"]
            pids = (src.pid, dst.pid)

    for pid in pids:  # both QEMUs are gone and reaped
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
    with capsys.disabled():
        print("\n[guest facts] " + " ".join(f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}"
                                            for k, v in facts.items()))


@pytest.mark.vm
def test_xdp_echo_answers_both_families(topology):
    """srmig.echo=xdp: the guest's iproute2 loads the compiled responder (echo_xdp.c) on eth0, and its
    kernel's verifier takes it. Both families are answered, by XDP: the kernel's echo counters stay still
    while eth0 sends a frame back for each request."""
    t = topology
    three_hosts(t)
    with qemu.Qemu("src", ns=t.ns("S"), tap="tapvm", addr4=f"{VM4}/24", echo="xdp") as src:
        boot(src, t, "S")
        # /init says echo=kernel when the load failed (and answers in the kernel)
        assert re.search(r"SRMIG-GUEST-READY .* echo=xdp", src.console()), src.console()
        before = src.guest_stats()
        assert before.get("srmig_echo_xdp") == 1
        assert ping(t, 20, interval=0.02) == (20, 20)
        assert ping(t, 20, interval=0.02, dst=VM4) == (20, 20)
        after = src.guest_stats()
    for counter in ("Icmp6InEchos", "Icmp6OutEchoReplies", "IcmpInEchos", "IcmpOutEchoReps"):
        assert after[counter] == before[counter], counter
    assert after["eth0_rx_packets"] - before["eth0_rx_packets"] >= 40
    assert after["eth0_tx_packets"] - before["eth0_tx_packets"] >= 40


@pytest.mark.vm
def test_frame_held_by_paused_qemu_is_not_migrated(topology):
    """The swallowed frame (docs/platform.md), measured. After `stop`, QEMU reads exactly one more frame from its tap
    (it sits in QEMU's own net queue, delivered on `cont`) and leaves the rest in the tap queue. That frame
    is not part of the migration stream: the guest on D never sees it, it dies with the source QEMU.
    If this fails, QEMU's behaviour changed and srmig's drain of the source tap must be revisited."""
    t = topology
    three_hosts(t)
    tap = "tapvm"
    with qemu.Qemu("src", ns=t.ns("S"), tap=tap) as src:
        boot(src, t, "S")
        g0 = src.guest_stats()
        src.stop()
        a0 = qemu.link_stats(t.ns("S"), tap)
        assert ping(t, 20, interval=0.01, wait=0.05) == (20, 0)   # into the paused VM's tap
        a1 = qemu.link_stats(t.ns("S"), tap)
        assert a1["tx_packets"] - a0["tx_packets"] == 1        # QEMU took exactly one frame
        assert a1["tx_dropped"] == a0["tx_dropped"]            # the other 19 wait in the tap queue

        with qemu.Qemu("dst", ns=t.ns("D"), tap=tap, incoming=URI) as dst:
            qemu.configure_host_tap(t.ns("D"), tap, VM, dst.mac)
            assert src.migrate(URI, timeout=30)["status"] == "completed"
            dst.qmp.wait_event("MIGRATION", 10, match={"status": "completed"})
            assert dst.status() == "paused"  # the source was paused, so the destination stays paused
            dst.cont()
            dst.qmp.wait_event("RESUME", 5)
            g1 = dst.guest_stats()
            assert g1["Icmp6InEchos"] == g0["Icmp6InEchos"]    # the held frame was not migrated



@pytest.mark.vm
def test_xdp_echo_answers_a_backlog_on_a_busy_host(topology):
    """srmig.echo=xdp: XDP_TX has no queue, so a reply that finds the guest's TX ring full is lost. QEMU's I/O
    thread fills the RX ring and takes the replies out of the TX ring; the vCPU answers whatever the RX ring
    holds. On a busy host each runs while the other waits: the vCPU then answers a full RX ring on top of the
    replies the I/O thread has not taken yet. Here every QEMU thread shares one CPU, and a 0.3 s pause (as a
    migration's downtime) leaves a backlog of ~3,000 requests in the tap. With the RX ring as long as the TX ring
    (256) the guest lost replies in 4 runs of 4 (33 to 56 of a family's, in blocks: one NAPI poll's replies are
    64); half as long (guest.XDP_RX_RING), it answers every request, and its driver counts no XDP_TX drop."""
    t = topology
    three_hosts(t)
    rate, count = 5000, 10000
    with qemu.Qemu("src", ns=t.ns("S"), tap="tapvm", addr4=f"{VM4}/24", echo="xdp") as src:
        boot(src, t, "S")
        cpu = min(os.sched_getaffinity(0))
        for tid in os.listdir(f"/proc/{src.pid}/task"):
            os.sched_setaffinity(int(tid), {cpu})
        before = src.guest_stats()
        p = probe.Probe([VM, VM4], rate, count, timeout_s=3, netns=t.ns("C")).start()
        try:
            time.sleep(0.5)
            src.stop()
            time.sleep(0.3)
            src.cont()
        finally:
            p.wait(count / rate * 2 + 10)
        after = src.guest_stats()
    for family, rep in p.reports.items():
        assert (rep.sent, rep.lost, rep.duplicated) == (count, 0, 0), (family, rep.summary())
    drops = {k: after[k] - before.get(k, 0) for k in after if guest.XDP_TX_DROPS.fullmatch(k)}
    assert drops and not any(drops.values()), drops  # (an image without ethtool has no such counter)


@pytest.mark.vm
def test_arrival_counts_the_swallowed_frame_under_continuous_traffic(topology):
    """A VM that arrived by migration is counted without a baseline (swallow.ArrivedCheck): a baseline needs
    a moment with no frame for a QMP round trip, and under probes every 2 ms there is none. The counts taken
    while the incoming QEMU could not read (its tap's tx_packets, the host's IPv6 multicast on it, the RX used
    index the source stopped at, migrated) make the count once the destination pauses in the middle of the
    traffic: exactly the one frame QEMU took after the stop, which the ping saw go unanswered and which is
    not in the tap queue. With the used index one off (a wrong arrival) the count is not 1, and with it
    five off it is more than QEMU ever swallows (the drain then re-sends nothing)."""
    from threading import Timer

    from srmig.ctl.swallow import Arrival, ArrivedCheck, incoming_counts
    from srmig.ctl.tap import TapKeeper
    from srmig.testbed.netns import inside

    t = topology
    three_hosts(t)
    tap = "tapvm"
    with qemu.Qemu("src", ns=t.ns("S"), tap=tap) as src:
        boot(src, t, "S")
        src.stop()
        used_at_pause = src.rx_used_idx()  # QEMU stopped: it stays
        with qemu.Qemu("dst", ns=t.ns("D"), tap=tap, incoming=URI) as dst:
            qemu.configure_host_tap(t.ns("D"), tap, VM, dst.mac)
            keeper = TapKeeper(dst.pid, tap)
            try:
                with inside(t.ns("D")):  # the incoming QEMU reads nothing until it resumes
                    mcast0, tx0, _taken = incoming_counts(tap, keeper)
            finally:
                keeper.close()
            assert src.migrate(URI, timeout=30)["status"] == "completed"
            dst.qmp.wait_event("MIGRATION", 10, match={"status": "completed"})
            dst.cont()
            dst.qmp.wait_event("RESUME", 5)
            t.route("C", f"{VM}/128", gateway=VIA_D)  # the VM's traffic now goes to D, into the tap
            pause = Timer(0.5, dst.stop)               # the pause lands in the middle of the probes
            pause.start()
            sent, answered = ping(t, 500, interval=0.002, wait=0.5)
            pause.join()
            assert dst.status() == "paused"
            with inside(t.ns("D")):
                counts = [ArrivedCheck(tap, dst.rx_used_idx, Arrival("m1", tx0, mcast0, (used_at_pause + d) & 0xFFFF))
                          for d in (0, 1, -5)]
                firsts = [c.swallowed() for c in counts]
            keeper = TapKeeper(dst.pid, tap)
            try:
                frames = keeper.frames()
            finally:
                keeper.close()
            swallowed = [c.less_queued(n, frames) for c, n in zip(counts, firsts)]
            queued = len(frames)  # every frame the host routed there was an echo request
            assert swallowed[0] == 1 == sent - answered - queued, (counts[0].parts, sent, answered, queued)
            assert 0 < queued < sent - 100, (queued, sent)  # the pause was mid-traffic
            assert swallowed[1:] == [2, 0xFFFF - 3], [c.parts for c in counts]  # the last: more than QEMU swallows
