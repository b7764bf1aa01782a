"""The local benchmark's plumbing (bench/local.py, bench/report.py, `srmig bench` parsing): every DUT path
forwards a short low-rate trial, the hold-ring flush returns every parked packet, the report renders."""

from __future__ import annotations

import json

import pytest

from bench import local, report
from srmig.cli import build_parser, cmd_bench, cmd_bench_all


def test_cli_bench_without_name_runs_everything_and_micro_is_unchanged():
    p = build_parser()
    a = p.parse_args(["bench", "--json", "--quick"])
    assert a.func is cmd_bench_all and a.json and a.quick
    a = p.parse_args(["bench", "micro", "--json", "--vms", "10"])
    assert a.func is cmd_bench and a.json and a.vms == 10 and a.runs == 3000


def test_trafgen_config_varies_the_inner_source():
    frame = local.packet("end_s_forward")
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


@pytest.mark.bpf
@pytest.mark.netns
def test_every_path_forwards_and_the_hold_ring_flushes():
    with local.LocalBench(flows=4) as b:
        for path in local.PATHS:
            b.configure(path)
            sent, received = b.trial(200, 1.0)  # 200 frames: one burst that fits every ring
            assert sent == 200 and received >= 190, (path, sent, received)
        assert b.max_forwarding_rate(0.2)["forwarded_pps"] > 0
        h = b.hold_flush(packets=300, rate_pps=10000)
        assert h["held"] == 300 and h["leaked_while_holding"] == 0 and h["resent_arrived"] == 300
        assert h["flush_pps"] > 0
