"""The SR domain is closed by default (RFC 8754 5.1): the config refuses a host without `sr_domain`
(tests/test_agent_config.py); opening it to everyone takes an explicit ["::/0"], which the real XDP program
then honours for every source (an LPM prefix of length 0 matches every address); `srmig load` by hand says
in one line when no prefix is configured.
"""

from __future__ import annotations

import contextlib
import shutil
import subprocess
import sys

import pytest
from test_dataplane import delivered, encaps  # tests/ is on sys.path (rootdir conftest, no package)

from srmig.bpf.libbpf import XDP_DROP, XDP_REDIRECT
from srmig.testbed import lab as L

pytestmark = [pytest.mark.bpf, pytest.mark.netns]

# Sources far apart: every one is outside any SR domain an operator would write, and inside ::/0.
SOURCES = ["2001:db8:8::1", "2001:db8:9::1", "fc00:0:3::e", "fe80::1", "2a00:1450::1", "ffff:ffff:ffff::1"]


@pytest.fixture(scope="module")
def lab():
    with L.TestRunLab() as lab:
        yield lab


@contextlib.contextmanager
def domain(dp, *prefixes):
    for p in prefixes:
        dp.add_domain(p)
    try:
        yield
    finally:
        for p in dp.list_domains():
            dp.del_domain(p)


def _run(lab, src: str):
    before = lab.dp.stats()["drops"]["outside_domain"]
    result = lab.run(encaps([L.SID_DX6], L.VM_RUNNING, src=src)())
    return result, lab.dp.stats()["drops"]["outside_domain"] - before


@pytest.mark.parametrize("src", SOURCES)
def test_open_domain_accepts_every_source(lab, src):
    """sr_domain = ["::/0"]: the check is on (one prefix counted) and every source passes it."""
    with domain(lab.dp, "::/0"):
        assert lab.dp.list_domains() == ["::/0"]
        result, dropped = _run(lab, src)
    assert result.retval == XDP_REDIRECT and dropped == 0
    assert result.data == delivered(L.VM_RUNNING)()


@pytest.mark.parametrize("src", SOURCES)
def test_a_closed_domain_drops_the_same_sources(lab, src):
    """The control: with a domain that holds none of them, the same packets are dropped as outside."""
    with domain(lab.dp, "2001:db8:a::/64"):
        result, dropped = _run(lab, src)
    assert result.retval == XDP_DROP and dropped == 1


def test_load_by_hand_warns_without_a_domain(tmp_path):
    """`srmig load` says in one line on stderr that no prefix is configured; once one is, it says nothing."""
    from srmig.bpf import loader
    from srmig.testbed.netns import Topology

    with Topology() as topo:
        topo.add_host("X")
        ns = topo.ns("X")
        with topo.inside("X"):
            pins = loader.pin_dir()

        def srmig(*args) -> subprocess.CompletedProcess:
            return subprocess.run([sys.executable, "-m", "srmig", "--netns", ns, *args], capture_output=True,
                                  text=True, timeout=300)

        try:
            out = srmig("load", "lo", "--mode", "generic")
            assert out.returncode == 0, out.stderr
            assert out.stderr == ("srmig: warning: no SR domain prefix: every source reaches this host's SIDs (RFC "
                                  "8754 5.1); `srmig domain add PREFIX` for each SR domain prefix (`srmig domain "
                                  "add ::/0` to mean it)\n")
            assert srmig("domain", "add", "fc00::/16").returncode == 0
            out = srmig("load", "lo", "--mode", "generic", "--json")
            assert out.returncode == 0 and out.stderr == "", out.stderr
        finally:
            srmig("unload", "lo")
            shutil.rmtree(pins, ignore_errors=True)
