"""The loss probe: accounting (pure, table-driven) and the real sender/receiver between two namespaces.

Accounting rows send one probe per millisecond (seq i at t = i ms) unless a row gives its own send times.
"""

from __future__ import annotations

import json
import threading
import time

import pytest

from srmig.testbed.probe import Bucket, Probe, ProbeReport, analyse, plot_timelines, run_probe

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
    assert rep.timeline == [Bucket(0, 1, 0), Bucket(1, 0, 0), Bucket(2, 0, 1), Bucket(3, 1, 1), Bucket(4, 1, 0)]
    coarse = analyse(every_ms(5), [(0, 0.5 * MS), (1, 3.2 * MS), (4, 4.1 * MS)], bucket_ms=2)
    assert coarse.timeline == [Bucket(0, 1, 0), Bucket(2, 1, 2), Bucket(4, 1, 0)]
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


def test_plot_timelines(tmp_path):
    pytest.importorskip("matplotlib")
    reps = {"reactive": analyse(every_ms(50), replies([*range(10), *range(30, 50)]), marks={"stop": 0.01}),
            "srmig": analyse(every_ms(50), replies(range(50)), marks={"stop": 0.01, "resume": 0.03})}
    out = tmp_path / "timeline.png"
    plot_timelines(reps, out, window_ms=5)
    assert out.stat().st_size > 1000


# ---------------------------------------------------------------------------------------------------------
# Real sockets between two namespaces
# ---------------------------------------------------------------------------------------------------------

A_ADDR, B_ADDR = "2001:db8:1::1", "2001:db8:1::2"


def _pair(topo):
    topo.add_host("A")
    topo.add_host("B")
    topo.link("A", "a0", "B", "b0", a_addr=f"{A_ADDR}/64", b_addr=f"{B_ADDR}/64")


@pytest.mark.netns
def test_probe_no_loss(topology):
    _pair(topology)
    rep = run_probe(B_ADDR, 5000, 2000, timeout_s=0.5, netns=topology.ns("A"))
    assert (rep.sent, rep.received, rep.lost, rep.duplicated, rep.send_errors) == (2000, 2000, 0, 0, 0), \
        rep.summary()
    assert rep.blackout_ms == 0 and rep.rx_socket_drops == 0 and not rep.truncated
    assert rep.send_rate_pps < 5500, rep.summary()  # paced, not flooded (under load it may fall behind)
    assert sum(b.received for b in rep.timeline) == 2000


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
