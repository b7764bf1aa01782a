"""libvirt's hook (no root): the client libvirt runs, with no agent to answer it, and `srmig install-hook`,
which installs it and writes the agent's systemd unit."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from test_agent_config import GOOD  # tests/ is on sys.path (rootdir conftest, no package)


def _hook(args, stdin="<domain/>", **kw):
    return subprocess.run([sys.executable, "-m", "srmig.ctl.hook", *args], input=stdin, capture_output=True,
                          text=True, timeout=30, **kw)


def test_hook_without_agent(tmp_path):
    sock = str(tmp_path / "none.sock")
    # Not a migration: returns at once, prints nothing (libvirt would take stdout as a new XML).
    out = _hook(["--socket", sock, "vm1", "start", "begin", "-"])
    assert out.returncode == 0 and out.stdout == "" and out.stderr == ""
    out = _hook(["--socket", sock, "vm1", "migrate", "begin", "-"])
    assert out.returncode == 0 and out.stdout == "" and "not answering" in out.stderr
    out = _hook(["--socket", sock, "--on-timeout", "refuse", "vm1", "migrate", "begin", "-"])
    assert out.returncode == 1 and "refusing" in out.stderr


def test_install_hook(tmp_path):
    from srmig.ctl import hook

    path = hook.install(str(tmp_path), "/run/srmig/x.sock", 2.0, "proceed")
    assert path == tmp_path / "qemu.d" / "srmig" and os.access(path, os.X_OK)
    assert hook.install(str(tmp_path), "/run/srmig/x.sock", 2.0, "proceed") == path  # idempotent
    with pytest.raises(FileExistsError):
        hook.install(str(tmp_path), "/run/srmig/other.sock", 2.0, "proceed")
    out = subprocess.run([str(path), "vm1", "migrate", "begin", "-"], input="<domain/>", capture_output=True,
                         text=True, timeout=30)
    assert out.returncode == 0 and "not answering" in out.stderr  # the installed script runs the hook


def test_install_hook_writes_a_valid_systemd_unit(tmp_path):
    """`srmig install-hook --unit PATH`: the hook, and a unit systemd accepts (systemd-analyze verify when the
    machine has it; the unit's sections and ExecStart otherwise)."""
    import configparser
    import shutil

    cfg = tmp_path / "agent.toml"
    cfg.write_text(GOOD)
    unit = tmp_path / "srmig-agent.service"
    out = subprocess.run([sys.executable, "-m", "srmig", "install-hook", "--config", str(cfg), "--hooks-dir",
                          str(tmp_path / "hooks"), "--unit", str(unit)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert (tmp_path / "hooks" / "qemu.d" / "srmig").exists() and "restart libvirtd" in out.stdout
    parsed = configparser.ConfigParser()
    parsed.read_string(unit.read_text())
    exec_start = parsed["Service"]["ExecStart"]
    assert exec_start.endswith(f"agent --config {cfg}") and parsed["Service"]["Restart"] == "always"
    # systemd keeps the taps' fds the agent hands it (sd_notify FDSTORE=1) across its restarts
    assert parsed["Service"]["NotifyAccess"] == "main" and int(parsed["Service"]["FileDescriptorStoreMax"]) > 0
    exe = exec_start.split()[0]
    assert os.access(exe, os.X_OK), exe
    if shutil.which("systemd-analyze"):
        v = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True, text=True, timeout=60)
        assert v.returncode == 0, v.stderr
