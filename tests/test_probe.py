"""The loss probe: accounting (pure, table-driven) and the real sender/receiver between two namespaces, over
IPv6 (ICMPv6 echo), IPv4 (ICMP echo: B's kernel answers only a request whose checksum we got right) and both.

Accounting rows send one probe per millisecond (seq i at t = i ms) unless a row gives its own send times.
"""

from __future__ import annotations

import json
import threading
import time

import pytest

from srmig.testbed.probe import (Bucket, Probe, ProbeReport, analyse, family_of, icmp_checksum, plot_timelines,
                                 run_probe, run_probes)

MS = 1e-3


def every_ms(n: int) -> list[tuple[int, float]]:
    """n probes, seq i sent at i ms."""
    return [(i, i * MS) for i in range(n)]


def replies(seqs, rtt_ms: float = 0.25, sent=None) -> list[tuple[int, float]]:
    """A reply per seq, in the given order, each arriving rtt after its send (or, for seqs never sent,
    0.25 ms apart) -- arrival order follows receive time, so the list order is realised by spacing."""
    out = []
    t_prev = -1.0
    send_t = dict(sent) if sent is not None else None
    for s in seqs:
        t = (send_t[s] if send_t and s in send_t else s * MS) + rtt_ms * MS
        t = max(t, t_prev + 1e-6)  # keep the listed order as arrival order
        out.append((s, t))
        t_prev = t
    return out


# (id, sent, received, expected subset of ProbeReport fields)
ROWS = [
    ("no-loss", every_ms(10), replies(range(10)),
     dict(sent=10, received=10, lost=0, duplicated=0, reordered=0, blackout_ms=0.0, loss_runs=0,
          blackout_start_ms=None)),
    # seq 3, 4, 5 lost: first lost sent at 3 ms, next answered (6) sent at 6 ms -> 3 ms
    ("gap-middle", every_ms(10), replies([0, 1, 2, 6, 7, 8, 9]),
     dict(sent=10, received=7, lost=3, blackout_ms=3.0, blackout_start_ms=3.0, blackout_probes=3,
          loss_runs=1, reordered=0)),
    # two runs (2) and (5, 6, 7): the longest wins
    ("two-gaps", every_ms(10), replies([0, 1, 3, 4, 8, 9]),
     dict(lost=4, loss_runs=2, blackout_ms=3.0, blackout_start_ms=5.0, blackout_probes=3, lost_seqs=[2, 5, 6, 7])),
    # seq 2 answered three times, seq 5 twice: 3 extra copies, nothing lost, no reordering
    ("duplicates", every_ms(10), replies([0, 1, 2, 2, 2, 3, 4, 5, 5, 6, 7, 8, 9]),
     dict(received=10, lost=0, duplicated=3, reordered=0, blackout_ms=0.0, duplicated_seqs=[2, 2, 5],
          lost_seqs=[])),
    # 2 arrives after 3 and 4: only 2 is reordered (RFC 4737: 2 < NextExp = 5)
    ("reorder-one-late", every_ms(6), replies([0, 1, 3, 4, 2, 5], rtt_ms=3),
     dict(received=6, lost=0, reordered=1, duplicated=0)),
    # 5 overtakes 1..4: each of 1..4 arrives below the highest seen (5) -> 4 reordered
    ("reorder-one-early", every_ms(6), replies([0, 5, 1, 2, 3, 4], rtt_ms=6),
     dict(received=6, reordered=4)),
    # a late duplicate of an old seq is a duplicate, not a reordering
    ("dup-not-reorder", every_ms(3), replies([0, 1, 2, 1], rtt_ms=1),
     dict(received=3, duplicated=1, reordered=0)),
    # 7, 8, 9 lost, none answered after: the run ends one interval after the last send (9 + 1 - 7 = 3 ms)
    ("loss-at-end", every_ms(10), replies(range(7)),
     dict(received=7, lost=3, blackout_ms=3.0, blackout_start_ms=7.0, loss_runs=1)),
    ("loss-at-start", every_ms(10), replies(range(2, 10)),
     dict(received=8, lost=2, blackout_ms=2.0, blackout_start_ms=0.0)),
    ("all-lost", every_ms(5), [],
     dict(sent=5, received=0, lost=5, blackout_ms=5.0, blackout_start_ms=0.0, blackout_probes=5,
          max_rx_gap_ms=None)),
    ("empty", [], [],
     dict(sent=0, received=0, lost=0, duplicated=0, reordered=0, blackout_ms=0.0, timeline=[], t0=None)),
    # a reply for a seq never sent is counted apart and changes nothing else
    ("unexpected-seq", every_ms(3), replies([0, 1, 2, 99]),
     dict(received=3, lost=0, duplicated=0, reordered=0, unexpected=1)),
    # irregular sending (a 7 ms sender stall before seq 3): blackout is taken from send timestamps,
    # seq 2 (sent 2 ms) lost, next answered seq 3 sent at 10 ms -> 8 ms
    ("send-timestamps", [(0, 0.0), (1, 1 * MS), (2, 2 * MS), (3, 10 * MS), (4, 11 * MS)],
     replies([0, 1, 3, 4], sent=[(0, 0.0), (1, 1 * MS), (2, 2 * MS), (3, 10 * MS), (4, 11 * MS)]),
     dict(lost=1, blackout_ms=8.0, blackout_probes=1, max_send_gap_ms=8.0)),
]


@pytest.mark.parametrize("sent,received,expected", [r[1:] for r in ROWS], ids=[r[0] for r in ROWS])
def test_analyse(sent, received, expected):
    rep = analyse(sent, received)
    for key, want in expected.items():
        got = getattr(rep, key)
        if isinstance(want, float):
            assert got == pytest.approx(want, abs=1e-6), key
        else:
            assert got == want, key
    assert rep.lost == rep.sent - rep.received


def test_analyse_timeline_buckets():
    """5 probes at 0..4 ms; 0 answered at 0.5 ms, 1 at 3.2 ms, 4 at 4.1 ms; 2 and 3 lost (by send time)."""
    rep = analyse(every_ms(5), [(0, 0.5 * MS), (1, 3.2 * MS), (4, 4.1 * MS)])
    assert [b[:3] for b in rep.timeline] == [(0, 1, 0), (1, 0, 0), (2, 0, 1), (3, 1, 1), (4, 1, 0)]
    # the longest round trip of the probes *sent* in each bucket (none answered: None)
    assert [b.rtt_max_ms for b in rep.timeline] == [pytest.approx(0.5), pytest.approx(2.2), None, None,
                                                    pytest.approx(0.1)]
    coarse = analyse(every_ms(5), [(0, 0.5 * MS), (1, 3.2 * MS), (4, 4.1 * MS)], bucket_ms=2)
    assert [b[:3] for b in coarse.timeline] == [(0, 1, 0), (2, 1, 2), (4, 1, 0)]
    assert [b.rtt_max_ms for b in coarse.timeline] == [pytest.approx(2.2), None, pytest.approx(0.1)]
    assert rep.max_rx_gap_ms == pytest.approx(2.7)
    assert rep.rtt_ms["min"] == pytest.approx(0.1) and rep.rtt_ms["max"] == pytest.approx(2.2)


def test_analyse_marks_and_dict():
    """Marks come back in ms relative to the first send; repeated names get a suffix; to_dict has the
    reported keys and survives JSON."""
    base = 100.0
    sent = [(i, base + i * MS) for i in range(4)]
    rep = analyse(sent, [(0, base + 0.1 * MS), (3, base + 3.1 * MS)],
                  marks=[("stop", base + 1 * MS), ("resume", base + 2.5 * MS), ("stop", base + 3 * MS)])
    assert rep.marks == pytest.approx({"stop": 1.0, "resume": 2.5, "stop#2": 3.0})
    d = rep.to_dict()
    for key in ("sent", "lost", "duplicated", "reordered", "blackout_ms"):
        assert key in d
    assert (d["sent"], d["lost"], d["blackout_ms"]) == (4, 2, pytest.approx(2.0))
    back = ProbeReport.from_dict(json.loads(json.dumps(d)))
    assert back.timeline == rep.timeline and back.lost == rep.lost and back.marks == pytest.approx(rep.marks)


def test_timeline_from_old_json():
    """A timeline written before buckets had a round trip ([t_ms, received, lost]) still loads."""
    back = ProbeReport.from_dict({"sent": 2, "timeline": [[0, 1, 0], [1, 0, 1]]})
    assert back.timeline == [Bucket(0, 1, 0, None), Bucket(1, 0, 1, None)]


def held(sent, late: dict[int, float], lost=(), rtt_ms: float = 0.25):
    """A reply per sent probe after rtt_ms, or after late[seq] ms; none for `lost`."""
    return [(s, t + late.get(s, rtt_ms) * MS) for s, t in sent if s not in lost]


# (id, probes (one per ms), late {seq: rtt ms}, lost seqs, marks {name: ms}, window, expected)
# steady: RTTs of the probes sent before FROM; window: of those sent from FROM to the first TO after it.
RTT_ROWS = [
    # probes 40..49 held 30 ms to 21 ms (a hold that ends at 70 ms): late, not lost
    ("held", 100, {s: 70 - s for s in range(40, 50)}, (), {"migrate": 30, "complete": 80},
     ("migrate", "complete"),
     dict(rtt_window_probes=51, steady_p50=0.25, window_p99=30.0, window_max=30.0, lost=0)),
    # the same probes lost instead: the window holds only on-time replies
    ("lost", 100, {}, range(40, 50), {"migrate": 30, "complete": 80}, ("migrate", "complete"),
     dict(rtt_window_probes=51, steady_p50=0.25, window_p99=0.25, window_max=0.25, lost=10)),
    # no TO mark: the window runs to the last probe
    ("open-window", 20, {15: 5.0}, (), {"migrate": 10}, ("migrate", "complete"),
     dict(rtt_window_probes=10, steady_p50=0.25, window_max=5.0)),
    # a TO before FROM does not close the window; the first TO after it does
    ("to-after-from", 20, {5: 9.0, 15: 7.0}, (), {"complete": 2, "migrate": 10, "complete#": 12},
     ("migrate", "complete"), dict(rtt_window_probes=3, window_max=0.25, steady_p50=0.25)),
    # FROM never marked: no window, no steady state
    ("no-mark", 10, {}, (), {"stop": 3}, ("migrate", "complete"),
     dict(rtt_window_probes=0, rtt_window_ms={}, rtt_steady_ms={})),
    # everything in the window lost: no window RTTs
    ("window-all-lost", 10, {}, range(5, 10), {"migrate": 5}, ("migrate", "complete"),
     dict(rtt_window_probes=5, rtt_window_ms={}, steady_p50=0.25)),
]


@pytest.mark.parametrize("n,late,lost,marks,window,expected", [r[1:] for r in RTT_ROWS],
                         ids=[r[0] for r in RTT_ROWS])
def test_analyse_rtt_window(n, late, lost, marks, window, expected):
    sent = every_ms(n)
    # "name#" is the same name marked again (analyse numbers repeats itself)
    rep = analyse(sent, held(sent, late, lost), marks=[(k.rstrip("#"), v * MS) for k, v in marks.items()],
                  rtt_window=window)
    for key, want in expected.items():
        if key == "steady_p50":
            assert rep.rtt_steady_ms["p50"] == pytest.approx(want), rep.rtt_steady_ms
        elif key.startswith("window_"):
            assert rep.rtt_window_ms[key[len("window_"):]] == pytest.approx(want), rep.rtt_window_ms
        else:
            assert getattr(rep, key) == want, key


# RFC 1071 4.1's example (the sum of 00 01 f2 03 f4 f5 f6 f7 is ddf2, its complement 220d); an echo request
# with its checksum in place sums to ffff, so its checksum computed again is 0.
CHECKSUM_ROWS = [
    ("rfc1071", bytes.fromhex("0001f203f4f5f6f7"), 0x220D),
    ("odd-length", bytes.fromhex("0001f203f4f5f6"), 0x220D + 0xF7),
    ("zeros", bytes(8), 0xFFFF),
    ("echo-with-checksum", bytes.fromhex("0800f7ff00000000"), 0),
]


@pytest.mark.parametrize("msg,want", [r[1:] for r in CHECKSUM_ROWS], ids=[r[0] for r in CHECKSUM_ROWS])
def test_icmp_checksum(msg, want):
    assert icmp_checksum(msg) == want


FAMILY_ROWS = [("2001:db8::1", "6"), ("::ffff:192.0.2.1", "6"), ("192.0.2.1", "4"), ("fe80::1", "6")]


@pytest.mark.parametrize("addr,want", FAMILY_ROWS, ids=[r[0] for r in FAMILY_ROWS])
def test_family_of(addr, want):
    assert family_of(addr) == want


@pytest.mark.parametrize("dst", [[], ["2001:db8::1", "2001:db8::2"], ["192.0.2.1", "192.0.2.2"], ["not-an-ip"]],
                         ids=["none", "two-ipv6", "two-ipv4", "not-an-address"])
def test_probe_destinations_rejected(dst):
    """One destination per family: the reports are keyed by family."""
    with pytest.raises(ValueError):
        Probe(dst, 1000, 10)


def test_plot_timelines(tmp_path):
    pytest.importorskip("matplotlib")
    reps = {"reactive": analyse(every_ms(50), replies([*range(10), *range(30, 50)]), marks={"stop": 0.01}),
            "srmig": analyse(every_ms(50), replies(range(50)), marks={"stop": 0.01, "resume": 0.03})}
    out = tmp_path / "timeline.png"
    plot_timelines(reps, out, window_ms=5)
    assert out.stat().st_size > 1000


def test_plot_timelines_families_and_latency(tmp_path):
    """Per strategy a column per family, a latency panel under the counts; a strategy probed over one family
    only leaves the other column empty."""
    pytest.importorskip("matplotlib")
    sent = every_ms(100)
    marks = [("migrate", 30 * MS), ("complete", 80 * MS)]

    def rep(late=None, lost=()):
        return analyse(sent, held(sent, late or {}, lost), marks=marks, rtt_window=("migrate", "complete"))
    reps = {"reactive": {"6": rep(lost=range(40, 50)), "4": rep(lost=range(40, 50))},
            "srmig": {"6": rep({s: 70 - s for s in range(40, 50)}), "4": rep({s: 70 - s for s in range(40, 50)})},
            "v6-only": rep()}
    out = tmp_path / "timeline.png"
    plot_timelines(reps, out, window_ms=20, title="t")
    with_latency = out.stat().st_size
    plot_timelines(reps, tmp_path / "counts.png", window_ms=20, latency=False)
    assert with_latency > (tmp_path / "counts.png").stat().st_size > 1000


# ---------------------------------------------------------------------------------------------------------
# Real sockets between two namespaces
# ---------------------------------------------------------------------------------------------------------

A_ADDR, B_ADDR = "2001:db8:1::1", "2001:db8:1::2"
A_ADDR4, B_ADDR4 = "192.0.2.1", "192.0.2.2"
B_OF = {"6": B_ADDR, "4": B_ADDR4}


def _pair(topo):
    """A and B, dual-stack; B's kernel answers both echoes (the IPv4 one only with a right checksum)."""
    topo.add_host("A")
    topo.add_host("B")
    topo.link("A", "a0", "B", "b0", a_addr=f"{A_ADDR}/64", b_addr=f"{B_ADDR}/64")
    for role, ifname, addr in (("A", "a0", A_ADDR4), ("B", "b0", B_ADDR4)):
        with topo.ipr(role) as ipr:
            ipr.addr("add", index=ipr.link_lookup(ifname=ifname)[0], address=addr, prefixlen=24, family=2)


@pytest.mark.netns
@pytest.mark.parametrize("family", ["6", "4"])
def test_probe_no_loss(topology, family):
    _pair(topology)
    rep = run_probe(B_OF[family], 5000, 2000, timeout_s=0.5, netns=topology.ns("A"))
    assert (rep.sent, rep.received, rep.lost, rep.duplicated, rep.send_errors) == (2000, 2000, 0, 0, 0), \
        rep.summary()
    assert rep.family == family and rep.dst == B_OF[family]
    assert rep.blackout_ms == 0 and rep.rx_socket_drops == 0 and not rep.truncated
    assert rep.send_rate_pps < 5500, rep.summary()  # paced, not flooded (under load it may fall behind)
    assert sum(b.received for b in rep.timeline) == 2000


@pytest.mark.netns
def test_probe_counts_each_family_apart(topology):
    """Both families through one schedule; B's IPv4 replies are blackholed for ~150 ms: IPv4 loses that window,
    IPv6 nothing, and each report names its family."""
    _pair(topology)
    with topology.ipr("B") as ipr:
        with Probe([B_ADDR, B_ADDR4], 2000, 1600, timeout_s=0.5, netns=topology.ns("A"),
                   rtt_window=("drop_on", "drop_off")) as p:
            time.sleep(0.2)
            ipr.route("add", dst=f"{A_ADDR4}/32", type="blackhole", family=2)
            p.mark("drop_on")
            time.sleep(0.15)
            ipr.route("del", dst=f"{A_ADDR4}/32", type="blackhole", family=2)
            p.mark("drop_off")
        p.wait()
    v6, v4 = p.reports["6"], p.reports["4"]
    assert list(p.reports) == ["6", "4"] and (v6.family, v4.family) == ("6", "4")
    assert v6.sent == v4.sent == 1600
    assert (v6.lost, v6.duplicated) == (0, 0), v6.summary()
    assert v4.lost > 0 and v4.loss_runs == 1 and v4.duplicated == 0, v4.summary()
    assert v4.rtt_window_probes > 0 and v6.rtt_window_ms and v6.rtt_steady_ms, v6.summary()
    assert p.wait() is v6  # wait() stays the first destination's report


@pytest.mark.netns
def test_run_probes_dual_stack(topology):
    _pair(topology)
    reps = run_probes([B_ADDR4, B_ADDR], 3000, 900, timeout_s=0.5, netns=topology.ns("A"))
    assert list(reps) == ["4", "6"]
    assert [(r.sent, r.lost, r.duplicated, r.reordered) for r in reps.values()] == [(900, 0, 0, 0)] * 2, \
        [r.summary() for r in reps.values()]


@pytest.mark.netns
def test_probe_sees_a_blackhole_window(topology):
    """B's replies towards A are blackholed for ~200 ms: the probe must report that window as lost, at the
    right time and with about the right length (tolerances are generous: this machine is noisy)."""
    _pair(topology)
    rate, window = 5000, 0.2
    with topology.ipr("B") as ipr:  # opened before the run: the window edges are one netlink call each
        with Probe(B_ADDR, rate, 4000, timeout_s=0.5, netns=topology.ns("A")) as p:
            time.sleep(0.25)
            p.mark("drop_on_req")
            ipr.route("add", dst=f"{A_ADDR}/128", type="blackhole", family=10)
            p.mark("drop_on")
            time.sleep(window)
            p.mark("drop_off_req")
            ipr.route("del", dst=f"{A_ADDR}/128", type="blackhole", family=10)
            p.mark("drop_off")
        rep = p.wait()
    m = rep.marks
    assert rep.sent == 4000 and rep.rx_socket_drops == 0, rep.summary()
    assert rep.lost > 0, rep.summary()
    assert rep.loss_runs == 1, rep.summary()
    shortest, longest = m["drop_off_req"] - m["drop_on"], m["drop_off"] - m["drop_on_req"]
    assert shortest - 20 <= rep.blackout_ms <= longest + 20, (rep.summary(), m)
    assert m["drop_on_req"] - 20 <= rep.blackout_start_ms <= m["drop_on"] + 20, (rep.summary(), m)
    # pacing never exceeds the rate (plus one burst); a loaded machine may send fewer
    assert 0.5 * rep.blackout_ms * rate / 1000 <= rep.lost <= rep.blackout_ms * rate / 1000 + 4, rep.summary()
    lost_t = [b.t_ms for b in rep.timeline if b.lost]
    assert m["drop_on_req"] - 20 <= lost_t[0] and lost_t[-1] <= m["drop_off"] + 20


@pytest.mark.netns
def test_probe_start_event_and_stop(topology):
    """Sending waits for start_event; stop() ends sending early and the report says so."""
    _pair(topology)
    go = threading.Event()
    p = Probe(B_ADDR, 2000, 100_000, timeout_s=0.3, netns=topology.ns("A"), start_event=go).start()
    time.sleep(0.1)
    assert p.progress() == (0, 0)
    go.set()
    time.sleep(0.2)
    p.stop()
    rep = p.wait(timeout=5)
    assert rep.truncated and 0 < rep.sent < 100_000 and rep.lost == 0, rep.summary()


# ---------------------------------------------------------------------------------------------------------
# What the demo makes of the reports (srmig.testbed.demo: table and JSON; pure)
# ---------------------------------------------------------------------------------------------------------

def _demo_run(notes=None):
    from srmig.testbed import demo

    sent = every_ms(100)
    marks = [("migrate", 30 * MS), ("complete", 80 * MS)]
    v6 = analyse(sent, held(sent, {s: 70 - s for s in range(40, 50)}), marks=marks, rtt_window=demo.RTT_WINDOW)
    v4 = analyse(sent, held(sent, {}, lost=range(40, 50)), marks=marks, rtt_window=demo.RTT_WINDOW)
    v6.family, v4.family = "6", "4"
    v6.send_rate_pps = 999.6  # run_probe's, from the send times (analyse leaves it None)
    guest = {"Icmp6InEchos": 100, "Icmp6OutEchoReplies": 100, "IcmpInEchos": 95, "IcmpOutEchoReps": 92,
             "Ip6OutDiscards": 0, "IpOutDiscards": 3}
    return demo.Run("srmig", {"6": v6, "4": v4}, 12.0, 480.0, guest, notes=notes or {})


def test_demo_json_keeps_todays_keys_and_adds_families():
    """Today's keys per strategy (counts summed over the families, blackout and round trips the worse one's),
    and `families` with each family's own numbers, its round trips and the guest's counters of that family."""
    run = _demo_run()
    d = json.loads(json.dumps(run.to_dict()))
    for key in ("sent", "lost", "guest_unanswered", "duplicated", "reordered", "blackout_ms", "downtime_ms",
                "migration_ms", "guest_echo_requests", "guest_echo_replies", "guest_out_discards",
                "probe_socket_drops", "marks_ms"):
        assert key in d, key
    v6, v4 = d["families"]["6"], d["families"]["4"]
    assert (d["sent"], d["lost"], d["guest_unanswered"]) == (200, 10, 3)
    assert (v6["lost"], v4["lost"], v4["guest_unanswered"], v4["guest_out_discards"]) == (0, 10, 3, 3)
    assert (v6["guest_echo_requests"], v4["guest_echo_requests"], d["guest_echo_requests"]) == (100, 95, 195)
    assert v6["rtt_p50_ms"] == pytest.approx(0.25) and v6["rtt_p99_ms"] == pytest.approx(30.0)
    assert v6["rtt_max_ms"] == pytest.approx(30.0) and v4["rtt_max_ms"] == pytest.approx(0.25)
    assert d["rtt_max_ms"] == pytest.approx(30.0) and d["blackout_ms"] == pytest.approx(10.0)
    assert run.report is run.reports["6"] and run.unanswered() == 0 and run.unanswered("4") == 3
    assert (v6["send_rate_pps"], v4["send_rate_pps"]) == (1000, None)  # what the probe achieved, rounded


def test_demo_table_one_row_per_strategy_and_family():
    from srmig.testbed import demo

    run = _demo_run(notes={"4": "the strategy left IPv4 undone: why"})
    lines = demo.table([run], 1000).splitlines()
    header = lines[1].split()
    assert header == demo.TABLE_COLS
    rows = [dict(zip(header, line.split())) for line in lines[2:4]]
    assert [(r["strategy"], r["family"], r["lost"]) for r in rows] == [("srmig", "IPv6", "0"), ("srmig", "IPv4", "10")]
    assert rows[0]["rtt_max_ms"] == "30.0" and rows[1]["guest_unanswered"] == "3"
    assert lines[4:] == ["notes:", "  srmig IPv4: the strategy left IPv4 undone: why"]
    assert run.to_dict()["families"]["4"]["note"] == "the strategy left IPv4 undone: why"


def test_libvirt_demo_json_has_the_families_and_lost_net_per_family():
    """`srmig demo --libvirt`'s JSON: today's keys over the families (lost_net too: lost but for what the guest
    left unanswered), `families` as `srmig demo`'s with each family's lost_net; its exit status fails on a loss
    in either family; its table has a row per family."""
    from srmig.testbed import demo, libvirt_demo

    run = _demo_run()
    res = libvirt_demo.Result(run.reports, 1.5, "embedded", guest=run.guest, downtime_ms=42.0)
    d = json.loads(json.dumps(res.to_dict()))
    assert (d["sent"], d["lost"], d["guest_unanswered"], d["lost_net"]) == (200, 10, 3, 7)
    assert (d["migration_s"], d["downtime_ms"]) == (1.5, 42.0)
    assert (d["families"]["6"]["lost_net"], d["families"]["4"]["lost_net"]) == (0, 7)
    assert d["families"]["4"]["dst"] == run.reports["4"].dst and d["rtt_max_ms"] == pytest.approx(30.0)
    assert res.report is run.reports["6"] and res.unanswered("4") == 3
    assert libvirt_demo.exit_status({**d, "vm_on": "D"}) == 1
    lines = demo.table([res.as_run()], 1000, "libvirt, {rate} probes/s per family ({what})").splitlines()
    assert lines[0] == "libvirt, 1000 probes/s per family (ICMPv6 echo and ICMP echo)"
    assert [ln.split()[:4] for ln in lines[2:4]] == [["srmig", "IPv6", "100", "0"], ["srmig", "IPv4", "100", "10"]]
    assert [ln.split()[-1] for ln in lines[2:4]] == ["42", "42"]   # libvirt's downtime, the table's last column
    v6_only = libvirt_demo.Result({"6": run.reports["6"]}, 1.5, "embedded", guest=run.guest).to_dict()
    assert (v6_only["sent"], v6_only["lost_net"], list(v6_only["families"])) == (100, 0, ["6"])
    assert libvirt_demo.exit_status({**v6_only, "vm_on": "D"}) == 0


COVERAGE_ROWS = [
    # probes 0..99 ms, the migration completes at 80 ms: covered
    ("covered", 100, [("migrate", 30), ("complete", 80)], None),
    # completes at 150 ms, the last probe left at 99 ms: 51 ms not measured
    ("ended-early", 100, [("migrate", 30), ("complete", 150)], "the probes stopped 51 ms before"),
    ("no-complete", 100, [("migrate", 30)], None),  # a run_abort: no completion to cover
]


@pytest.mark.parametrize("n,marks,want", [r[1:] for r in COVERAGE_ROWS], ids=[r[0] for r in COVERAGE_ROWS])
def test_demo_coverage_note(n, marks, want):
    """A run whose probes stopped before the migration completed says so: its zero loss means nothing."""
    from srmig.testbed import demo

    sent = every_ms(n)
    rep = analyse(sent, held(sent, {}), marks=[(k, v * MS) for k, v in marks])
    note = demo.coverage_note(rep)
    assert (note is None) if want is None else note.startswith(want), note
