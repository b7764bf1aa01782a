"""Privileged test tiers: each marker skips with a stated reason when its capability is missing.

In CI (CI=true) a missing capability is an error, not a skip: CI must provide everything.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from srmig.testbed import netns

# tests/agent_runs.py holds asserts for test_agent_faults.py: rewritten as a test module's are, so that a
# failure there shows its values.
pytest.register_assert_rewrite("agent_runs")


def _missing_bpf() -> str | None:
    if os.geteuid() != 0:
        return "needs root to load XDP programs"
    try:
        import bcc  # noqa: F401
    except ImportError:
        return "bcc not importable (Debian python3-bpfcc; run ./run setup)"
    return None


def _missing_netns() -> str | None:
    if os.geteuid() != 0:
        return "needs root to create network namespaces"
    if not shutil.which("ip"):
        return "iproute2 'ip' not found"
    return None


def _missing_vm() -> str | None:
    if reason := _missing_netns():
        return reason
    if not shutil.which("qemu-system-x86_64"):
        return "qemu-system-x86_64 not found (Debian qemu-system-x86)"
    try:
        from srmig.testbed import guest
    except ImportError as e:
        return f"guest builder not importable: {e}"
    if not guest.is_built():
        return "guest image not built (./run setup builds it)"
    return None


def _missing_libvirt() -> str | None:
    if reason := _missing_vm():
        return reason
    if not shutil.which("libvirtd"):
        return "libvirtd not found (Debian libvirt-daemon-system)"
    return None


def _missing_etcd() -> str | None:
    if not os.access("/usr/bin/etcd", os.X_OK):
        return "/usr/bin/etcd not found (Debian etcd-server)"
    try:
        import etcd3gw  # noqa: F401
    except ImportError:
        return "etcd3gw not importable (pip install -e .[etcd]; run ./run setup)"
    return None


def _missing_vagrant() -> str | None:
    if not shutil.which("vagrant"):
        return "vagrant not found (Debian vagrant; run ./run setup)"
    return None


CHECKS = {"bpf": _missing_bpf, "netns": _missing_netns, "vm": _missing_vm, "libvirt": _missing_libvirt,
          "etcd": _missing_etcd, "vagrant": _missing_vagrant}


# A libvirt run drives two libvirtd daemons, QEMU and three agent processes on 2 shared cores, and when an
# event arrives varies from run to run with what else the machine does. Such a test runs once more when it
# fails (pytest-rerunfailures), and the summary names it: a regression fails both runs, a flake shows.
LIBVIRT_RERUNS = 1


def pytest_collection_modifyitems(config, items):
    reasons = {}
    for item in items:
        for marker, check in CHECKS.items():
            if marker in item.keywords:
                if marker not in reasons:
                    reasons[marker] = check()
                if reasons[marker]:
                    if not os.environ.get("CI"):  # in CI the test runs and fails loudly instead
                        item.add_marker(pytest.mark.skip(reason=f"[{marker}] {reasons[marker]}"))
                    break
        if "libvirt" in item.keywords and config.pluginmanager.hasplugin("rerunfailures"):
            item.add_marker(pytest.mark.flaky(reruns=LIBVIRT_RERUNS, reruns_delay=1))


def pytest_sessionstart(session):
    if os.geteuid() == 0:
        netns.sweep()


def pytest_terminal_summary(terminalreporter):
    reruns = terminalreporter.stats.get("rerun", [])
    if reruns:
        terminalreporter.write_sep("-", "rerun summary")
        for rep in reruns:
            # why, in a few lines: the next session can tell a flake's cause without running it again
            crash = getattr(rep.longrepr, "reprcrash", None)
            why = (crash.message if crash else str(rep.longrepr)).strip().splitlines()
            shown = " | ".join(line.strip() for line in why[:3])[:600]
            terminalreporter.write_line(f"failed once, run again: {rep.nodeid}: {shown}")
    skipped = terminalreporter.stats.get("skipped", [])
    if not skipped:
        terminalreporter.write_line("skip summary: nothing skipped")
        return
    by_reason: dict[str, int] = {}
    for rep in skipped:
        reason = rep.longrepr[2] if isinstance(rep.longrepr, tuple) else str(rep.longrepr)
        by_reason[reason] = by_reason.get(reason, 0) + 1
    terminalreporter.write_sep("-", "skip summary")
    for reason, n in sorted(by_reason.items()):
        terminalreporter.write_line(f"{n:4d} skipped: {reason}")


@pytest.fixture
def topology():
    """A namespace topology removed at the end of the test, pass or fail."""
    with netns.Topology() as topo:
        yield topo


REPO = Path(__file__).resolve().parent.parent
