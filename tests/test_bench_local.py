"""The local benchmark's plumbing (bench/local.py, bench/report.py, `srmig bench` parsing): every DUT path
forwards a short low-rate trial, the hold-ring flush returns every parked packet, the generator that runs
(live frames, or the clone generator where the kernel refuses them; trafgen on request) delivers exactly the
frames it is asked for, the
encap path's frames are SRv6 at the sink, the size sweep and its repetitions have the documented layout
with and without the kernel's SRv6, the report renders. No speed is asserted here: speed lives in bench/."""

from __future__ import annotations

import contextlib
import json
import os
import socket
import struct
import time

import pytest

from bench import local, report
from bench.cli import cmd_bench, cmd_bench_all
from srmig import check
from srmig.cli import build_parser

ABSENT = (False, "absent: kernel built without CONFIG_IPV6_SEG6_LWTUNNEL")
PRESENT = (True, "present")
REFUSED = "refused (EPERM: Operation not permitted)"
SO_RCVBUFFORCE = 33  # <asm-generic/socket.h>; Python's socket module does not name it


def test_cli_bench_without_name_runs_everything_and_micro_is_unchanged():
    p = build_parser()
    a = p.parse_args(["bench", "--json", "--quick"])
    assert a.func is cmd_bench_all and a.json and a.quick
    a = p.parse_args(["bench", "micro", "--json", "--vms", "10"])
    assert a.func is cmd_bench and a.json and a.vms == 10 and a.runs == 3000


def test_cli_bench_generator_sizes_repeat():
    p = build_parser()
    a = p.parse_args(["bench"])
    assert a.generator == "live" and a.sizes == [] and a.repeat is None and a.max_rate is None
    a = p.parse_args(["bench", "--generator", "trafgen", "--sizes", "78,1500", "--sizes", "imix", "--repeat", "1"])
    assert a.generator == "trafgen" and a.sizes == ["78,1500", "imix"] and a.repeat == 1
    assert p.parse_args(["bench", "--generator", "clone"]).generator == "clone"


def _ip6_payload_len(frame: bytes, at: int) -> int:
    return struct.unpack_from("!H", frame, at + 4)[0]


@pytest.mark.parametrize("path", local.PATHS)
def test_frame_sizes_follow_bench_trex(path):
    # The encap paths are fed the inner packet alone (plain IPv6): their encapsulation adds outer IPv6 + SRH.
    grows = 40 + 8 + 16 * len(local.ENC_SEGS) if path in local.PLAIN_PATHS else 0
    # 78: a 64-byte inner IPv6 packet (a 78-byte inner frame) behind outer IPv6 + SRH.
    (f78,) = local.frames(path, "78")
    inner_at = local.inner_offset(f78)
    assert inner_at == (14 if grows else 14 + 40 + (f78[14 + 40 + 1] + 1) * 8)
    assert len(f78) - inner_at == 64 and _ip6_payload_len(f78, inner_at) == 64 - 40
    assert _ip6_payload_len(f78, 14) == len(f78) - 14 - 40
    # A number: the outer IPv6 packet's length (once encapsulated, for the encap paths).
    for size in ("512", "1500"):
        (f,) = local.frames(path, size)
        assert len(f) + grows == int(size) + 14 and _ip6_payload_len(f, 14) + grows == int(size) - 40
    # IMIX: 7:4:1, interleaved, the large one filling the MTU.
    mix = local.frames(path, "imix")
    lens = sorted({len(f) for f in mix})
    assert len(mix) == 12 and [sum(len(f) == n for f in mix) for n in lens] == [7, 4, 1]
    assert lens[0] == len(f78) and lens[-1] + grows == 1514 and mix[0] != mix[1]
    assert local.frame_bytes(path, "imix") == round(sum(map(len, mix)) / 12, 1)


def test_bad_sizes_are_refused():
    for size in ("9000", "tiny", "60"):
        with pytest.raises(ValueError):
            local.frames("end_s_forward", size)


def test_trafgen_config_sends_the_imix_in_order():
    mix = local.frames("end_s_forward", "imix")
    cfg = "".join(local.trafgen_config(f, 4) for f in mix)
    assert cfg.count("{") == 12 and cfg.count("dinc(0, 3, 1)") == 12


@pytest.mark.parametrize("path", ["end_s_forward", "bpf_encap"])
def test_trafgen_config_varies_the_inner_source(path):
    frame = local.packet(path)
    cfg = local.trafgen_config(frame, flows=16)
    assert cfg.count("dinc(0, 15, 1)") == 1
    body = cfg.replace("dinc(0, 15, 1)", "DINC").strip()[1:-1].split(", ")
    assert len(body) == len(frame)
    off = body.index("DINC")
    assert frame[off - 15:off - 7] == bytes.fromhex("20010db800090000")  # inside the inner source 2001:db8:9::1


def _fake_result():
    trials = [{"rate_pps": r, "duration_s": 1.0, "sent": r, "received": r - lost, "loss_ratio": lost / r,
               "offered_pps": r, "forwarded_pps": r - lost} for r, lost in ((1000, 0), (2000, 100))]
    path = {"ndr_pps": 1000, "pdr_pps": 1000, "ndr_forwarded_pps": 1000.0, "pdr_forwarded_pps": 1000.0,
            "settled": True, "trials": trials}
    loc = {"paths": {p: dict(path, max_forwarding_rate={"forwarded_pps": 1000.0, "offered_pps": 2000.0})
                     for p in local.PATHS}, "frame_bytes": 150, "notes": ["n"], "method": "m"}
    loc["paths"]["end_s_forward"]["max_forwarding_rate"] = {"forwarded_pps": 2500.0, "offered_pps": 3000.0}
    return {"local": loc, "hold_ring_flush": {"held": 5, "drain_ring_s": 0.1, "resend_s": 0.1,
                                              "flush_pps": 25.0, "resent_arrived": 5},
            "ratios": {"end_s_vs_kernel_dx6": 1.0, "end_s_vs_redirect_stub": 1.0, "scale_1e6_vs_10": 1.05},
            "targets": {"end_s_vs_kernel_dx6_min": 2, "end_s_vs_kernel_dx6_met": False,
                        "end_s_vs_redirect_stub_min": 0.8, "end_s_vs_redirect_stub_met": True,
                        "scale_1e6_vs_10_max": 1.2, "scale_1e6_vs_10_met": True}}


class FakeBench:
    """LocalBench's interface without a kernel: every path forwards `capacity[path]` pps, times a factor per
    run (so the repetitions differ), and loses what is offered above it."""

    capacity = {"generator": 8e6, "redirect_stub": 4e6, "redirect_stub_mac": 3.6e6, "end_s_forward": 2e6,
                "end_s_deliver": 1.8e6, "kernel_end_dx6": 4e5, "kernel_end": 5e5, "forward_plain": 3e5,
                "bpf_encap": 2.4e5, "kernel_encap": 2e5}
    runs_per_size: dict = {}
    configured: list = []
    live_frames = "available"  # what live frames do on the fake's kernel; a refusal runs the clone generator

    def __init__(self, **kw):
        self.kw, self.notes = kw, ["fake"]
        FakeBench.configured = []
        refused = kw["generator"] == "live" and FakeBench.live_frames != "available"
        self.generator = local.pick_generator(kw["generator"])[0] if refused else kw["generator"]
        self.live_frames = FakeBench.live_frames if kw["generator"] == "live" else "not tried"
        self.kernel_srv6 = kw["kernel_srv6"]

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        pass

    def configure(self, path, size=None):
        self.path, self.size = path, size
        self.configured.append((path, size))
        if path == local.PATHS[0]:  # a pass over the paths begins (interleaved rounds skip the generator)
            FakeBench.runs_per_size[size] = FakeBench.runs_per_size.get(size, 0) + 1
        # Each size's first pass over the paths is run 1; the next, run 2: 10 % faster.
        self.factor = 1.0 + 0.1 * (FakeBench.runs_per_size[size] - 1)

    def _cap(self):  # nothing forwards more than the generator offers
        cap = min(self.capacity[self.path], self.capacity["generator"])
        return cap * self.factor * (0.5 if self.size == "1500" else 1.0)

    def trial(self, rate, duration):
        n = int(rate * duration)
        return n, min(n, int(self._cap() * duration))

    def max_forwarding_rate(self, duration_s=1.0):
        return {"forwarded_pps": self._cap(), "offered_pps": 8e6, "window_s": duration_s}

    def hold_flush(self, packets):
        return {"held": packets, "drain_ring_s": 0.1, "resend_s": 0.1, "flush_pps": packets / 0.2,
                "resent_arrived": packets}

    def encap_stats(self):
        return {"pass": 0, "done": 10, "drop_too_big": 0}


def test_sweep_and_repeat_layout(monkeypatch):
    FakeBench.runs_per_size = {}
    monkeypatch.setattr(local, "LocalBench", FakeBench)
    loc = local.run(max_rate=8e6, duration_s=0.1, max_trials=6, hold_packets=0, generator="live",
                    sizes=("78", "1500"), repeat=2, kernel_srv6=PRESENT)
    assert loc["generator"]["name"] == "live" and loc["sizes"] == ["78", "1500"] and loc["repeat"] == 2
    assert loc["kernel_srv6"] == "present" and loc["skipped_paths"] == {} and loc["encap_stats"]["done"] == 10
    # `paths`: the first size, the single-run layout with medians, every trial of every run.
    fwd = loc["paths"]["end_s_forward"]
    assert fwd["max_forwarding_rate"]["forwarded_pps"] == pytest.approx(2.1e6)
    assert fwd["spread"]["max_forwarding_rate_pps"]["runs"] == [2e6, pytest.approx(2.2e6)]
    assert {t["run"] for t in fwd["trials"]} == {0, 1}
    assert loc["frame_bytes"] == len(local.frames("end_s_forward", "78")[0])
    # `sweep`: every size, every path, median and range; ratios per size.
    for size, half in (("78", 1.0), ("1500", 0.5)):
        sz = loc["sweep"][size]
        assert set(sz["paths"]) == set(local.PATHS)
        m = sz["paths"]["redirect_stub"]["max_forwarding_rate_pps"]
        assert (m["min"], m["max"]) == (4e6 * half, pytest.approx(4.4e6 * half))
        g = sz["paths"]["redirect_stub"]["max_forwarding_rate_gbps"]
        assert g["median"] == pytest.approx(4.2e6 * half * sz["frame_bytes"]["redirect_stub"] * 8 / 1e9, rel=1e-3)
        r = sz["ratios"]["end_s_vs_kernel_dx6"]
        assert r["median"] == pytest.approx(4.5) and r["min"] == r["max"] == pytest.approx(4.5)
    # The headline ratios: the median of the runs' ratios (the slower End.S branch), inside its range.
    r = local.ratios(loc)
    assert r["end_s_vs_redirect_stub"] == pytest.approx(0.45) and loc["ratios_spread"]["end_s_vs_redirect_stub"]
    json.dumps(loc)


def test_interleaved_rounds_give_the_headline_ratios(monkeypatch):
    """With rounds, every run also measures the ratio paths in short windows taken in turn; the headline
    ratios are then each run's median round (the runs' median, inside their range), the MFR ratios stay in
    the sweep. Here End.S deliver (1.8 Mpps) is the slower branch: 0.45 of the stub, 4.5x End.DX6."""
    FakeBench.runs_per_size = {}
    monkeypatch.setattr(local, "LocalBench", FakeBench)
    loc = local.run(max_rate=8e6, duration_s=0.1, max_trials=6, hold_packets=0, generator="live",
                    sizes=("78",), repeat=2, rounds=3, kernel_srv6=PRESENT)
    it = loc["sweep"]["78"]["interleaved"]
    assert it["paths"] == list(local.RATIO_PATHS) and it["window_s"] == 0.05
    assert len(it["rounds"]) == 2 and all(len(run) == 3 for run in it["rounds"])
    assert it["rounds"][1][0]["end_s_forward"] == pytest.approx(2.2e6)  # run 2 of the fake: 10 % faster
    r = local.ratios(loc)
    assert r["end_s_vs_redirect_stub"] == pytest.approx(0.45) and r["end_s_vs_kernel_dx6"] == pytest.approx(4.5)
    assert r["end_s_vs_redirect_stub_mac"] == pytest.approx(0.5) and r["redirect_stub_mac_vs_redirect_stub"] == 0.9
    assert loc["ratios_spread"]["end_s_vs_redirect_stub"] is it["ratios"]["end_s_vs_redirect_stub"]
    assert r["end_s_forward_vs_kernel_end"] == pytest.approx(4.0)  # not interleaved: from the runs' MFR
    assert r["bpf_encap_vs_forward_plain"] == pytest.approx(0.8) and r["bpf_encap_vs_kernel_encap"] == 1.2
    assert "interleaved" in loc["method"]
    assert loc["generator"]["bound_paths"] == [] and loc["ratio_notes"] == {}  # 8 Mpps: nothing is bound
    json.dumps(loc)


def test_report_table_and_plot_with_a_sweep(monkeypatch, tmp_path, capsys):
    FakeBench.runs_per_size = {}
    monkeypatch.setattr(local, "LocalBench", FakeBench)
    monkeypatch.setattr(local, "live_frames", lambda: (True, "available"))
    result = report.run(quick=True, parts=("local",), duration_s=0.1, sizes=("78", "512", "imix"), repeat=2,
                        progress=False, kernel_srv6=PRESENT)
    assert result["ratios"]["end_s_vs_kernel_dx6"] == pytest.approx(4.5)
    assert result["targets"]["end_s_vs_kernel_dx6_met_every_run"] is True
    assert result["targets"]["end_s_vs_redirect_stub_met_every_run"] is False
    assert set(result["ratios_spread"]) >= {"end_s_vs_kernel_dx6", "end_s_vs_redirect_stub"}
    report.print_table(result)
    out = capsys.readouterr().out
    assert "by frame size" in out and "imix" in out and "(1800-1980)" in out
    assert "swaps the MAC addresses (reads the frame) = 0.50" in out
    report.plot(result, str(tmp_path / "s.png"))
    assert (tmp_path / "s.png").stat().st_size > 1000


def test_ratios_take_the_slower_end_s_branch():
    r = local.ratios(_fake_result()["local"])
    assert r["end_s_forward_vs_kernel_dx6"] == 2.5 and r["end_s_deliver_vs_kernel_dx6"] == 1.0
    assert r["end_s_vs_kernel_dx6"] == 1.0


def test_table_and_plot(tmp_path, capsys):
    result = _fake_result()
    report.print_table(result)
    out = capsys.readouterr().out
    assert "end_s_forward" in out and "MISSED" in out and "kernel_end_dx6" in out
    png = report.plot(result, str(tmp_path / "b.png"))
    assert (tmp_path / "b.png").stat().st_size > 1000 and png.endswith("b.png")
    json.dumps(result)


def test_without_kernel_srv6_the_kernel_paths_are_absent_with_the_reason(monkeypatch, capsys):
    """A kernel without SRv6 lwtunnels: every srmig path and both stubs still run, the kernel paths never
    (not even configured), their ratios are null and say why, and `srmig bench` says it at the top."""
    FakeBench.runs_per_size = {}
    monkeypatch.setattr(local, "LocalBench", FakeBench)
    monkeypatch.setattr(local, "live_frames", lambda: (True, "available"))
    result = report.run(quick=True, parts=("local",), duration_s=0.1, sizes=("78",), repeat=2, progress=False,
                        kernel_srv6=ABSENT)
    loc = result["local"]
    assert result["kernel_srv6"] == loc["kernel_srv6"] == ABSENT[1]
    assert set(loc["paths"]) == set(local.PATHS) - set(local.KERNEL_PATHS)
    assert not {p for p, _ in FakeBench.configured} & set(local.KERNEL_PATHS)
    assert set(loc["skipped_paths"]) == set(local.KERNEL_PATHS)
    assert all(ABSENT[1] in why for why in loc["skipped_paths"].values())
    r = result["ratios"]
    for k in ("end_s_vs_kernel_dx6", "end_s_forward_vs_kernel_end", "bpf_encap_vs_kernel_encap"):
        assert r[k] is None and ABSENT[1] in result["ratio_notes"][k], k
    assert r["end_s_vs_redirect_stub"] == pytest.approx(0.45) and r["bpf_encap_vs_forward_plain"] == 0.8
    assert result["targets"]["end_s_vs_kernel_dx6_met"] is None
    assert result["targets"]["end_s_vs_redirect_stub_met"] is False
    report.print_table(result)
    out = capsys.readouterr().out
    assert f"kernel SRv6 lwtunnels: {ABSENT[1]}" in out and "not measured" in out
    assert f"kernel_end_dx6    not measured: kernel SRv6 lwtunnels {ABSENT[1]}" in out
    json.dumps(result)


def test_refused_live_frames_run_the_clone_generator_and_say_which_ratios_it_bounds(monkeypatch, capsys):
    """Live frames refused (EPERM): the clone generator runs, with its ceiling (the generator path) next to
    every ratio; paths at >= 90 % of it are generator-bound, and so are the ratios between them."""
    FakeBench.runs_per_size = {}
    monkeypatch.setattr(local, "LocalBench", FakeBench)
    monkeypatch.setattr(local, "live_frames", lambda: (False, REFUSED))
    monkeypatch.setattr(FakeBench, "live_frames", REFUSED)
    monkeypatch.setattr(FakeBench, "capacity", dict(FakeBench.capacity, generator=7e5))
    loc = local.run(max_rate=2e6, duration_s=0.1, max_trials=6, hold_packets=0, generator="live",
                    sizes=("78",), repeat=1, rounds=2, kernel_srv6=PRESENT)
    gen = loc["generator"]
    assert (gen["name"], gen["requested"], gen["live_frames"]) == ("clone", "live", REFUSED)
    assert gen["ceiling_pps"] == 7e5 and loc["sweep"]["78"]["generator_ceiling_pps"]["median"] == 7e5
    # Next to every ratio: the ceiling, the faster side, and how far above it the ceiling sits.
    assert set(loc["ratio_ceilings"]) == set(local.RATIOS)
    c = loc["ratio_ceilings"]["bpf_encap_vs_forward_plain"]
    assert (c["generator"], c["generator_ceiling_pps"], c["fastest_side_pps"]) == ("clone", 7e5, 3e5)
    assert c["ceiling_over_fastest"] == pytest.approx(2.33)
    assert set(gen["bound_paths"]) == {"redirect_stub", "redirect_stub_mac", "end_s_forward", "end_s_deliver"}
    assert "bounded by the generator" in gen["note"] and "in place of live" in loc["method"]
    notes = loc["ratio_notes"]
    assert notes["end_s_vs_redirect_stub"].startswith("generator-bound")
    assert notes["end_s_vs_kernel_dx6"].startswith("a lower bound")
    assert "bpf_encap_vs_forward_plain" not in notes  # 240 and 300 kpps: both below the ceiling
    assert local.ratios(loc)["bpf_encap_vs_forward_plain"] == 0.8
    json.dumps(loc)


def test_the_automatic_choice(monkeypatch):
    """--generator live: live frames where the kernel runs them, the clone generator where it refuses them
    (trafgen is never chosen by itself: it sits below every XDP path); clone and trafgen on request."""
    monkeypatch.setattr(local, "live_frames", lambda: (True, "available"))
    assert local.pick_generator("live") == ("live", "available")
    monkeypatch.setattr(local, "live_frames", lambda: (False, REFUSED))
    assert local.pick_generator("live") == ("clone", REFUSED)
    assert local.pick_generator("clone") == ("clone", "not tried: --generator clone")
    with pytest.raises(local.BenchError):
        local.pick_generator("pktgen")
    assert report.MAX_RATE["clone"] == report.MAX_RATE["live"] and report.default_sizes("clone") == local.SIZES


def test_report_puts_the_generators_ceiling_next_to_every_ratio(monkeypatch, capsys):
    FakeBench.runs_per_size = {}
    monkeypatch.setattr(local, "LocalBench", FakeBench)
    monkeypatch.setattr(local, "live_frames", lambda: (False, REFUSED))
    monkeypatch.setattr(FakeBench, "live_frames", REFUSED)
    result = report.run(quick=True, parts=("local",), duration_s=0.1, sizes=("78", "1500"), repeat=2,
                        progress=False, kernel_srv6=ABSENT)
    assert result["generator"]["name"] == "clone"
    c = result["ratio_ceilings"]["end_s_vs_redirect_stub"]
    assert c["generator_ceiling_pps"] == pytest.approx(8.4e6) and c["fastest_side_pps"] == pytest.approx(4.2e6)
    report.print_table(result)
    out = capsys.readouterr().out
    assert "end_s_vs_redirect_stub = 0.45: generator clone: ceiling 8400 kpps, faster side 4200 kpps (2.00x)" in out
    assert "generator ceiling kpps" in out and "4200(4000-4400)" in out  # 1500: half the fake's rate, per run
    json.dumps(result)


@pytest.mark.bpf
@pytest.mark.netns
def test_every_path_forwards_and_the_hold_ring_flushes():
    with local.LocalBench(flows=4) as b:
        # The kernel paths run where the kernel has SRv6 lwtunnels; every other path runs everywhere.
        assert b.kernel_srv6 == check.kernel_srv6()
        assert set(local.PATHS) - set(b.paths) == (set() if b.kernel_srv6[0] else set(local.KERNEL_PATHS))
        for path in b.paths:
            b.configure(path)
            sent, received = b.trial(200, 1.0)  # 200 frames: one burst that fits every ring
            assert sent == 200 and received >= 190, (path, sent, received)
        assert b.max_forwarding_rate(0.2)["forwarded_pps"] > 0
        h = b.hold_flush(packets=300, rate_pps=10000)
        assert h["held"] == 300 and h["leaked_while_holding"] == 0 and h["resent_arrived"] == 300
        assert h["flush_pps"] > 0


@pytest.mark.bpf
@pytest.mark.netns
def test_the_encap_paths_frames_are_srv6_at_the_sink():
    """bpf_encap: srmig's H.Encaps on the DUT's egress encapsulates every frame (done = N, no drop, SRv6 at
    the sink); forward_plain: the same route without the filter, nothing encapsulated; kernel_encap (where
    the kernel has SRv6): SRv6 at the sink, srmig's program not involved."""
    n = 300
    with local.LocalBench(flows=4) as b:
        b.classify_sink(True)
        for path, srv6, done in (("forward_plain", 0, 0), ("bpf_encap", n, n), ("kernel_encap", n, 0)):
            if path not in b.paths:
                assert not b.kernel_srv6[0] and path in local.KERNEL_PATHS
                continue
            for size in ("78", "1500"):  # 1500: the encapsulated packet fills the VM's route MTU exactly
                b.configure(path, size)
                s0, e0 = b.sink_srv6_count(), b.encap_stats()
                arrived, _ = _delivered(b, lambda: b.send_exactly(n, 10000), n)
                e1 = b.encap_stats()
                # Every frame that reached the sink is SRv6 (or none is), and was encapsulated by srmig (or not).
                assert b.sink_srv6_count() - s0 == (arrived if srv6 else 0), (path, size)
                assert e1["done"] - e0["done"] == (arrived if done else 0), (path, size)
                assert sum(e1.values()) - sum(e0.values()) == e1["done"] - e0["done"], (path, size)  # no drop


@pytest.mark.bpf
@pytest.mark.netns
def test_live_generator_delivers_exactly_n_frames():
    """Where the kernel permits live frames, the live generator sends exactly what it is asked for, on every
    path; where it refuses them (EPERM on some kernels), LocalBench runs the clone generator instead and says
    why, and that delivers exactly n. Either way the answer agrees with `srmig check`."""
    ok = check.run()["checks"]["prog_run_live_frames"]["ok"]
    with local.LocalBench(flows=4, generator="live") as b:
        assert (b.generator == "live") == local.live_frames()[0] == ok
        if b.generator != "live":
            assert b.generator == "clone" and b.live_frames.startswith("refused (E"), b.live_frames
            assert any(b.live_frames in note for note in b.notes)
        else:
            assert b.live_frames == "available" and isinstance(b.fast, local.LiveGenerator)
        _fast_delivers_exactly(b, b.paths)


def _fast_delivers_exactly(b, paths) -> None:
    """The live or clone generator, unpaced and paced, makes exactly n frames on every path and size, and every
    one is at the sink or counted refused by a full ring."""
    for path in paths:
        for size in ("78", "imix"):
            b.configure(path, size)

            def send():
                assert b.fast.send(200) == 200  # unpaced: fewer than a veth ring
                # paced: 500 frames over 0.1 s; send() allows 1.2 s, so a busy machine cannot cut it
                # short (bench trials count late frames as lost, by design: that is not what this checks)
                assert b.fast.send(500, 5000) == 500 and b.fast.generated() == 500, (path, size)
            _delivered(b, send, 700)
    assert b.max_forwarding_rate(0.1)["forwarded_pps"] > 0


def _delivered(b, send, n: int) -> tuple[int, int]:
    """Run `send` (n frames) and account for every frame: at the sink, or refused by a full veth ring (the
    DUT's receive side starved by a neighbour on the shared cores: counted by the kernel, and rare). The
    generator made exactly n: none missing, none extra. Returns (arrived, refused)."""
    c0, d0 = b.sink_count(), b.ring_drops()
    send()
    deadline = time.monotonic() + 1.0
    while b.sink_count() - c0 + b.ring_drops() - d0 < n and time.monotonic() < deadline:
        time.sleep(0.01)
    time.sleep(0.02)  # nothing more may come
    arrived, refused = b.sink_count() - c0, b.ring_drops() - d0
    assert arrived + refused == n and arrived >= n // 2, (b.path, b.size, arrived, refused)
    return arrived, refused


def _trafgen_delivers_exactly(b) -> None:
    for path in ("end_s_forward", "end_s_deliver", "forward_plain", "bpf_encap"):
        for size in ("78", "imix"):
            b.configure(path, size)
            _delivered(b, lambda: b.send_exactly(300, 10000), 300)


@pytest.mark.bpf
@pytest.mark.netns
def test_refused_live_frames_fall_back_to_the_clone_generator_which_delivers_exactly_n(monkeypatch):
    """The fallback itself, on every kernel: live frames refused as some kernels refuse them (EPERM) -> the
    clone generator runs (not trafgen), the refusal is in the notes, and it delivers exactly the frames
    asked for through srmig's End.S and the kernel's forwarding (XDP frames into an XDP and a non-XDP d_in)."""
    monkeypatch.setattr(local, "live_frames", lambda: (False, REFUSED))
    with local.LocalBench(flows=4, generator="live") as b:
        assert (b.generator, b.live_frames) == ("clone", REFUSED) and isinstance(b.fast, local.CloneGenerator)
        assert any(REFUSED in note for note in b.notes)
        _fast_delivers_exactly(b, ("end_s_forward", "forward_plain"))


@pytest.mark.bpf
@pytest.mark.netns
def test_trafgen_on_request_delivers_exactly_n():
    with local.LocalBench(flows=4, generator="trafgen") as b:
        assert (b.generator, b.fast) == ("trafgen", None)
        _trafgen_delivers_exactly(b)


@pytest.mark.bpf
@pytest.mark.netns
@pytest.mark.parametrize("rate, rounds", [(None, 7 / 12), (10_000, 2)], ids=["unpaced", "paced"])
def test_the_clone_generator_sends_its_sequence_in_groups(rate, rounds):
    """bench/xdp_clone_gen.c through a real veth, every frame read back by a packet socket: exactly n, each
    a template of the IMIX sequence, CLONE_GROUP_MAX of each in a row in the sequence's order (paced too,
    where seeds pass without sending), the last frames in smaller groups, the flow number constant in a
    group and counting up group by group; the loop is empty afterwards (every seed retired, or send()
    raises). Unpaced, n stays below a veth ring (256): the receiver cannot fall behind and drop."""
    from srmig.testbed.netns import Topology

    group = local.CLONE_GROUP_MAX
    mix = local.frames("end_s_forward", "imix")
    full = round(rounds * len(mix)) * group  # whole groups (unpaced: 7 of the 12 seeds; paced: two rounds)
    n = full + group // 2 + 3  # then 19 frames: groups of 16, 2 and 1
    with Topology(tag=f"{os.getpid()}-cg") as t:
        t.add_host("a")
        t.add_host("b")
        t.link("a", "g0", "b", "x0")
        t.run("b", "ethtool", "-K", "x0", "gro", "on")  # NAPI on x0: veth takes XDP frames only then
        with t.inside("b"):
            rx = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(0x86DD))
        try:
            rx.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, 64 << 20)  # every frame fits: none dropped here
            rx.bind(("x0", 0))
            rx.settimeout(1.0)
            gen = local.CloneGenerator(t, "a", "g0", cpu=None)
            try:
                gen.load(mix, flows=3)
                assert gen.send(n, rate) == n and gen.generated() == n
                got = []
                with contextlib.suppress(TimeoutError):
                    while len(got) < n + 1:  # one more would be one too many
                        f = rx.recv(2048)
                        if f[6:12] == mix[0][6:12]:  # ours, not the namespace's own ND and MLD
                            got.append(f)
            finally:
                gen.close()
        finally:
            rx.close()
    assert len(got) == n
    at = local.inner_offset(mix[0]) + 8 + 14
    for i, f in enumerate(got):
        # Groups of 32 for two rounds; then the last 19 frames as groups of 16, 2 and 1 (the fan maps).
        g = i // group if i < full else full // group + (0 if i < n - 3 else 1 if i < n - 1 else 2)
        want = bytearray(mix[g % len(mix)])
        want[at:at + 2] = (g % 3).to_bytes(2, "big")
        assert f == bytes(want), (i, g)


@pytest.mark.bpf
@pytest.mark.netns
@pytest.mark.parametrize("path", ["end_s_forward", "bpf_encap"])
def test_the_live_generators_program_makes_each_template(path):
    """bench/xdp_live_gen.c, run by plain BPF_PROG_TEST_RUN (every kernel): each frame it makes has its
    template's length and headers (the program copies the first hdr_bytes, every byte a path rewrites; the
    rest is the longest frame's payload), also below the header copy (a plain 78-byte frame, whole, for the
    encap paths), with the flow number in the inner source's last 2 bytes."""
    from srmig.testbed.netns import Topology

    with Topology(tag=f"{os.getpid()}-lg") as t:
        t.add_host("a")
        t.add_host("b")
        t.link("a", "g0", "b", "x0")
        gen = local.LiveGenerator(t, "a", "g0", cpu=None)
        try:
            mix = local.frames(path, "imix")
            gen.load(mix, flows=3)
            made = gen.made(24)
        finally:
            gen.close()
    for i, f in enumerate(made):
        want = bytearray(mix[i % len(mix)])
        at = local.inner_offset(bytes(want)) + 8 + 14
        want[at:at + 2] = (i % 3).to_bytes(2, "big")
        assert len(f) == len(want) and f[:gen.hdr_bytes] == bytes(want[:gen.hdr_bytes]), i
    if path in local.PLAIN_PATHS:
        assert min(map(len, made)) == 78 < gen.hdr_bytes
