"""`srmig check`: the real command on this machine. Every key is reported, kernel_srv6 agrees with a seg6local
route tried here by hand, the exit code follows the required features, and nothing is left behind."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest
from pyroute2 import netns
from pyroute2.netlink.exceptions import NetlinkError

pytestmark = [pytest.mark.bpf, pytest.mark.netns]

SRMIG = [sys.executable, "-m", "srmig"]  # this checkout's CLI, whatever `srmig` on PATH points to

# Stable: the bench, the docs and users' scripts read these. Written out here so a rename fails this test.
KEYS = ["kernel_headers", "btf", "xdp_native", "xdp_generic", "bpf_ringbuf", "ringbuf_query", "clsact", "cls_bpf",
        "pidfd_getfd", "prog_run_live_frames", "kernel_srv6"]
REQUIRED = {"kernel_headers", "xdp_generic", "bpf_ringbuf", "ringbuf_query", "clsact", "cls_bpf"}
ITEM = {"ok": bool, "required": bool, "detail": str, "needed_by": str, "degrades": str, "fix": str}


def _check(*args: str) -> tuple[subprocess.CompletedProcess, int]:
    """Run `srmig check ARGS`; returns its result and its pid (its namespaces are named after it)."""
    proc = subprocess.Popen([*SRMIG, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    out, err = proc.communicate(timeout=60)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err), proc.pid


def _seg6local_by_hand(topology) -> bool:
    """The reference: does this kernel take a seg6local End route? (EOPNOTSUPP when built without SRv6.)"""
    topology.add_host("R", seg6=False)
    try:
        topology.route("R", "fc00::e/128", oif="lo",
                       encap={"type": "seg6local", "action": "End"})
    except NetlinkError as e:
        assert e.code == 95, e  # EOPNOTSUPP: anything else is a broken test, not an answer
        return False
    return True


def test_json_reports_every_key_and_kernel_srv6_matches_a_route_tried_by_hand(topology):
    t0 = time.monotonic()
    out, pid = _check("check", "--json")
    elapsed = time.monotonic() - t0
    doc = json.loads(out.stdout)
    assert list(doc["checks"]) == KEYS
    for key, item in doc["checks"].items():
        assert {k: type(item[k]) for k in ITEM} == ITEM, key
        assert item["detail"] and item["needed_by"] and item["degrades"] and item["fix"], key
    assert {k for k, v in doc["checks"].items() if v["required"]} == REQUIRED
    assert doc["kernel_srv6"] is doc["checks"]["kernel_srv6"]["ok"]
    assert doc["kernel_srv6"] == _seg6local_by_hand(topology)
    if not doc["kernel_srv6"]:
        assert doc["checks"]["kernel_srv6"]["detail"].startswith("absent: ")
    missing = [k for k, v in doc["checks"].items() if v["required"] and not v["ok"]]
    assert doc["missing_required"] == missing and doc["ok"] is (not missing)
    assert out.returncode == (0 if doc["ok"] else 1), out.stderr
    assert doc["uses"]["xdp_mode"] in ("native", "generic") and doc["uses"]["ingress_encap"] == "bpf"
    # Cleans up after itself: none of its throwaway namespaces survives it.
    assert not [n for n in netns.listnetns() if n.startswith(f"srmig-{pid}-")]
    assert elapsed < 10, f"srmig check took {elapsed:.1f} s (about 1 s expected; 2 shared cores)"


def test_kernel_srv6_in_process_agrees_with_the_command():
    from srmig.check import kernel_srv6

    ok, reason = kernel_srv6()
    doc = json.loads(_check("check", "--json")[0].stdout)
    assert (ok, reason) == (doc["kernel_srv6"], doc["checks"]["kernel_srv6"]["detail"])
    assert reason == "present" if ok else reason.startswith("absent: ")


def test_human_output_one_line_per_feature():
    out, _ = _check("check")
    lines = out.stdout.splitlines()
    for key, line in zip(KEYS, lines):
        status, name = line.split()[:2]
        assert name == key and status in ("ok", "no", "FAIL"), line
        if status != "ok":  # what is missing says what degrades and the fix, on its one line
            assert "; degrades: " in line and "; fix: " in line, line
            assert ("required" if status == "FAIL" else "optional") in line, line
    assert lines[len(KEYS)].startswith("srmig uses: XDP ")
    assert out.returncode == (0 if "everything srmig requires is here" in lines[-1] else 1)


def test_interface_xdp_on_a_given_veth_leaves_it_as_it_was(topology):
    """--interface: XDP tried on that interface (here a veth in a namespace, via --netns), detached after."""
    topology.add_host("A")
    topology.add_host("B")
    topology.link("A", "a0", "B", "b0")
    out, _ = _check("--netns", topology.ns("A"), "check", "--json", "--interface", "a0")
    doc = json.loads(out.stdout)
    assert doc["interface"] == "a0"
    for mode in ("native", "generic"):
        item = doc["checks"][f"xdp_{mode}"]
        assert item["ok"] and item["detail"] == "attached and detached on a0", item
    with topology.ipr("A") as ipr:
        assert not ipr.get_links(topology.ifindex("A", "a0"))[0].get_attr("IFLA_XDP_PROG_ID")
    missing, _ = _check("check", "--interface", "srmig-nope0")
    assert missing.returncode == 1 and missing.stdout == ""
    assert missing.stderr.strip() == "srmig: error: no interface 'srmig-nope0' in this network namespace"
