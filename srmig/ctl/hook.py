"""The libvirt qemu hook: `srmig install-hook` writes /etc/libvirt/hooks/qemu.d/srmig, which runs

    python -m srmig.ctl.hook --socket SOCK --timeout S --on-timeout proceed|refuse  <domain> <op> <subop> <extra>

libvirt runs it synchronously for every QEMU domain operation, with the domain XML on stdin. Only
`migrate begin` (on the destination, before its QEMU starts) matters: it asks the local agent to provision
the migration path and waits, bounded, until every ingress acknowledged the new segment list. It never calls
libvirt (libvirtd is waiting for it). Anything else returns at once. Exit 0 lets the migration go on; a
non-zero exit makes libvirt refuse it (only with --on-timeout refuse). Standard library only: it runs in
libvirtd's path on every domain operation, so it must start fast.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

HOOK_NAME = "srmig"
DEFAULT_HOOKS_DIR = "/etc/libvirt/hooks"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="srmig-hook", description=__doc__.split("\n\n")[0])
    p.add_argument("--socket", required=True)
    p.add_argument("--timeout", type=float, default=2.0)
    p.add_argument("--on-timeout", choices=["proceed", "refuse"], default="proceed")
    p.add_argument("args", nargs="*")
    a = p.parse_args(argv)
    if len(a.args) < 3 or (a.args[1], a.args[2]) != ("migrate", "begin"):
        return 0
    xml = sys.stdin.read()
    from srmig.ctl.hooksrv import request  # noqa: PLC0415

    refuse = a.on_timeout == "refuse"
    try:
        res = request(a.socket, {"op": "migrate-begin", "xml": xml}, timeout=a.timeout + 5)
    except (OSError, ValueError) as e:
        print(f"srmig hook: agent at {a.socket} not answering ({e}); "
              f"{'refusing' if refuse else 'migrating without srmig provisioning'}", file=sys.stderr)
        return 1 if refuse else 0
    if not res.get("ok"):
        print(f"srmig hook: {a.args[0]}: {res.get('error')}", file=sys.stderr)
        return 1 if refuse else 0
    if res.get("managed") and not res.get("acked"):
        print(f"srmig hook: {a.args[0]}: ingresses {', '.join(res.get('missing', []))} did not acknowledge "
              f"version {res.get('version')} in {a.timeout} s", file=sys.stderr)
        return 1 if refuse else 0
    return 0


def script(socket_path: str, timeout_s: float, on_timeout: str, python: str | None = None) -> str:
    py = python or sys.executable
    pkg = Path(__file__).resolve().parents[2]
    return (f"#!/bin/sh\n# installed by `srmig install-hook`: see {__file__}\n"
            f"PYTHONPATH={pkg}${{PYTHONPATH:+:$PYTHONPATH}} exec {py} -m srmig.ctl.hook "
            f"--socket {socket_path} --timeout {timeout_s} --on-timeout {on_timeout} \"$@\"\n")


def install(hooks_dir: str, socket_path: str, timeout_s: float, on_timeout: str, force: bool = False) -> Path:
    """Write <hooks_dir>/qemu.d/srmig (libvirt >= 6.5 runs every script there). libvirtd reads its hooks when
    it starts: restart it afterwards. An existing different file is kept unless `force`."""
    path = Path(hooks_dir) / "qemu.d" / HOOK_NAME
    text = script(socket_path, timeout_s, on_timeout)
    if path.exists() and path.read_text() != text and not force:
        raise FileExistsError(f"{path} exists with other content (use --force to replace it)")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(text)
    os.chmod(tmp, 0o755)
    tmp.replace(path)
    return path


if __name__ == "__main__":
    sys.exit(main())
