"""bench/tcp_encap.py: a bulk TCP transfer from an ingress through srmig's BPF H.Encaps into a VM behind
srmig's End.DX6-map arrives whole, every data packet encapsulated and decapsulated by srmig; without the
encap entry the same transfer goes plain. No speed is asserted: the bench reports it."""

from __future__ import annotations

import json

import pytest

from bench import tcp_encap as T


@pytest.fixture(scope="module")
def lab():
    with T.TcpLab() as lab:
        yield lab


@pytest.mark.bpf
@pytest.mark.netns
@pytest.mark.parametrize("encap", [True, False], ids=["encap", "plain"])
def test_a_bulk_transfer_arrives_whole_through_the_encap_or_without(lab, encap):
    r = T.measure(lab, encap, 20_000_000, 10.0)
    assert r["error"] is None and r["received_bytes"] == r["sent_bytes"] == 20_000_000, r
    c = r["encap_counters"]
    assert c["drop_too_big"] == c["drop_room"] == c["drop_store"] == c["drop_bad_entry"] == 0, c
    if encap:
        # TSO super-packets are encapsulated whole (20 MB in far fewer than 20e6 / 1440 packets), every one
        # decapsulated by the host's End.DX6-map.
        assert 0 < c["done"] == r["end_dx6_map_delivered"] and c["pass"] == 0, r
    else:
        assert c["done"] == 0 and c["pass"] > 0 and r["end_dx6_map_delivered"] == 0, r


@pytest.mark.bpf
@pytest.mark.netns
def test_run_reports_both_and_their_ratio():
    res = T.run(max_bytes=5_000_000, max_s=5.0, rounds=1)
    assert res["complete"] and res["gbps"]["plain"] > 0 and res["gbps"]["encap"] > 0
    assert res["encap_vs_plain"] == round(res["gbps"]["encap"] / res["gbps"]["plain"], 3)
    assert len(res["rounds"]["plain"]) == len(res["rounds"]["encap"]) == 1
    json.dumps(res)
