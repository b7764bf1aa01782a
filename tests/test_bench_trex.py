"""TRex STL profiles (bench/trex/): every branch x frame size builds in its own process (the TRex client
brings scapy 2.4.3), its packets are valid SRv6 with many flows, and the real XDP program takes each
packet down the branch the profile is named after (BPF_PROG_TEST_RUN in the test lab)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.conftest import REPO

BRANCHES = ("end_s_deliver", "end_s_forward", "end_sbuf", "end_dx6_map")
SIZES = ("78", "imix", "1500")
# branch -> (SID the packets address, the SID counter that must move)
EXPECT = {"end_s_deliver": ("fc00:0:1::5", "delivered"), "end_s_forward": ("fc00:0:1::5", "forwarded"),
          "end_sbuf": ("fc00:0:1::b", "held"), "end_dx6_map": ("fc00:0:1::d6", "delivered")}


@pytest.fixture(scope="module")
def dumped():
    pytest.importorskip("lbr_trex_client")
    r = subprocess.run([sys.executable, "-m", "bench.trex.dump", "--count", "4", "--flows", "1000"],
                       cwd=REPO, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    return json.loads(r.stdout)


def test_every_branch_and_size_has_streams(dumped):
    seen = {(d["branch"], d["size"]) for d in dumped}
    assert seen == {(b, s) for b in BRANCHES for s in SIZES}
    for d in dumped:
        lens = {len(p) // 2 for p in d["packets"]}
        assert len(lens) == 1
        n = lens.pop()
        if d["size"] == "1500":
            assert n == 14 + 1500
        if d["size"] == "78":  # inner frame of 78 bytes behind outer IPv6 + SRH (8 + 16 per segment)
            segs = 1 if d["branch"] == "end_dx6_map" else 2
            assert n == 78 + 40 + 8 + 16 * segs
    imix = [d for d in dumped if d["branch"] == "end_s_forward" and d["size"] == "imix"]
    assert len(imix) == 3 and sorted(round(d["pps"]) for d in imix) == [83, 333, 583]


def test_packets_are_valid_srv6_with_many_flows(dumped):
    from scapy.layers.inet6 import UDP, IPv6, IPv6ExtHdrSegmentRouting
    from scapy.layers.l2 import Ether

    for d in dumped:
        sources = set()
        for hx in d["packets"]:
            raw = bytes.fromhex(hx)
            p = Ether(raw)
            assert p[IPv6ExtHdrSegmentRouting].segleft <= p[IPv6ExtHdrSegmentRouting].lastentry
            inner = p[IPv6ExtHdrSegmentRouting].payload
            assert isinstance(inner, IPv6) and UDP in inner
            sources.add(inner.src)
            # The field engine keeps the inner UDP checksum valid: recompute and compare.
            got = inner[UDP].chksum
            fresh = inner.copy()
            fresh[UDP].chksum = None
            assert IPv6(bytes(fresh))[UDP].chksum == got, d["stream"]
        assert len(sources) == len(d["packets"])  # every packet another flow


@pytest.mark.bpf
@pytest.mark.netns
def test_profiles_take_their_branch_in_the_real_program(dumped):
    from srmig.testbed.lab import TestRunLab

    with TestRunLab() as lab:
        for d in dumped:
            sid, counter = EXPECT[d["branch"]]
            before = next(s.stats for s in lab.dp.list_sids() if s.sid == sid)
            for hx in d["packets"]:
                got = lab.run(bytes.fromhex(hx)).action
                assert got == "XDP_REDIRECT", (d["stream"], got)
            after = next(s.stats for s in lab.dp.list_sids() if s.sid == sid)
            assert after[counter] - before[counter] == len(d["packets"]), (d["stream"], before, after)
            assert after["dropped"] == before["dropped"]


def test_runner_without_server_says_so_in_one_line():
    r = subprocess.run([sys.executable, "-m", "bench.trex.run", "--server", "127.0.0.1"], cwd=REPO,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2
    assert r.stderr.count("\n") == 1 and "no TRex server reachable at 127.0.0.1" in r.stderr
