"""Root-only files and sockets: the embedded state database (its file and the -wal, -shm and -notify files
beside it) is mode 0600, the agent's unix socket (the libvirt hook's and `srmig status`'s: one socket) is
0600 from the moment it is bound, and the directories srmig creates for them are 0700. Checked for real: a
process running as `nobody` (setpriv) tries to read each file and connect to the socket, and reports the
errno. A control file and socket with open modes in the same directory show that only the mode stops it.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import stat
import subprocess
import tempfile
import threading
from pathlib import Path

import pytest

from srmig.ctl import config, statedb

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root: the files are root's, the probe is nobody")

# Runs as nobody with the system python (the venv need not be readable by nobody): "ok", or the errno's name.
PROBE = r"""
import errno, json, socket, sys
out = {}
for kind, path in zip(sys.argv[1::2], sys.argv[2::2]):
    try:
        if kind == "file":
            open(path, "rb").close()
        else:
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
                s.connect(path)
        out[path] = "ok"
    except OSError as e:
        out[path] = errno.errorcode.get(e.errno, str(e.errno))
print(json.dumps(out))
"""


def as_nobody(**targets: str) -> dict[str, str]:
    """{name: "ok" or the errno's name} for name=(kind, path): kind "file" is opened for reading, "socket"
    connected to."""
    args = [x for kind, path in targets.values() for x in (kind, path)]
    out = subprocess.run(["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups", "/usr/bin/python3",
                          "-c", PROBE, *args], capture_output=True, text=True, timeout=30, cwd="/")
    assert out.returncode == 0, out.stderr
    got = json.loads(out.stdout)
    return {name: got[path] for name, (_, path) in targets.items()}


def mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


@pytest.fixture
def open_dir():
    """A directory anyone may enter (pytest's tmp_path is root's 0700: it alone would stop nobody)."""
    d = Path(tempfile.mkdtemp(prefix="srmig-rootonly-"))
    d.chmod(0o755)
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def controls(open_dir):
    """A 0644 file and a 0666 listening socket: nobody reaches both, so the directory does not stop it."""
    f = open_dir / "control.txt"
    f.write_text("x")
    f.chmod(0o644)
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(str(open_dir / "control.sock"))
    os.chmod(open_dir / "control.sock", 0o666)
    s.listen()
    try:
        yield {"control_file": ("file", str(f)), "control_socket": ("socket", str(open_dir / "control.sock"))}
    finally:
        s.close()


def test_embedded_database_files_are_root_only(open_dir, controls):
    path = open_dir / "state.db"
    with statedb.open_db("embedded", path=str(path)) as kv:
        kv.put("vms/2001:db8::10", {"host": "S"})       # the WAL and its index exist once written
        files = {name: path.with_name(path.name + suffix)
                 for name, suffix in (("db", ""), ("wal", "-wal"), ("shm", "-shm"), ("bell", "-notify"))}
        assert {name: mode(f) for name, f in files.items()} == dict.fromkeys(files, 0o600)
        got = as_nobody(**controls, **{name: ("file", str(f)) for name, f in files.items()})
    assert got == {"control_file": "ok", "control_socket": "ok", **dict.fromkeys(files, "EACCES")}


def test_a_database_made_wider_before_is_narrowed_on_open(open_dir):
    """Files an older srmig left at the umask's 0644 are 0600 once the database is opened again."""
    path = open_dir / "state.db"
    with statedb.open_db("embedded", path=str(path)) as kv:
        kv.put("k", {})
    for f in open_dir.glob("state.db*"):
        f.chmod(0o644)
    with statedb.open_db("embedded", path=str(path)) as kv:
        assert kv.get("k").value == {}
        assert {f.name: mode(f) for f in open_dir.glob("state.db*")} == \
            dict.fromkeys((f.name for f in open_dir.glob("state.db*")), 0o600)


def test_the_agent_makes_its_database_directory_0700(open_dir):
    """The agent's database link creates a missing directory for the embedded file, 0700."""
    from srmig.ctl.dblink import DbLink

    cfg = config.parse(f"[ingress]\ninterface = 'lo'\ngateway = '::1'\n[db]\npath = '{open_dir}/lib/state.db'\n")
    kv = DbLink(cfg, lambda item: None, threading.Event())._open_kv()
    try:
        assert mode(open_dir / "lib") == 0o700 and mode(open_dir / "lib" / "state.db") == 0o600
    finally:
        kv.close()
    assert as_nobody(db=("file", f"{open_dir}/lib/state.db")) == {"db": "EACCES"}


def test_agent_socket_is_root_only(open_dir, controls):
    """The hook's and status's socket: 0600 in an open directory, and a missing directory is made 0700.
    Root still connects (the hook and `srmig status` run as root)."""
    from srmig.ctl.hooksrv import HookServer

    servers = [HookServer(None, str(open_dir / "agent.sock")), HookServer(None, str(open_dir / "run" / "agent.sock"))]
    try:
        assert mode(open_dir / "agent.sock") == 0o600 and mode(open_dir / "run" / "agent.sock") == 0o600
        assert mode(open_dir / "run") == 0o700
        assert sorted(p.name for p in open_dir.iterdir()) == ["agent.sock", "control.sock", "control.txt", "run"]
        for s in servers:
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as c:
                c.connect(str(s.path))
        got = as_nobody(**controls, socket=("socket", str(open_dir / "agent.sock")))
        assert got == {"control_file": "ok", "control_socket": "ok", "socket": "EACCES"}
    finally:
        for s in servers:
            s.close()
