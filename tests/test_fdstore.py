"""Tap fds that outlive the agent (srmig/ctl/fdstore.py): the fd keeper holds a tap's queue after the agent
that kept it and the QEMU that owned it are both killed; systemd's store is spoken to as sd_notify(3) says."""

from __future__ import annotations

import array
import contextlib
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

import test_drain  # tests/ is on sys.path (rootdir conftest, no package)
from srmig.ctl import fdstore, tap

paused_tap = test_drain.paused_tap  # host S of `topology`, tap `vmtap` held by a process that never reads it

NAME = fdstore.tap_name("S", "2001:db8:100::10", "m1")

# The agent, as far as the keeper is concerned: takes the paused QEMU's tap fds, hands them to the keeper,
# says so, then waits to be killed.
AGENT = r"""
import sys, time
from srmig.ctl import fdstore, tap
fds = [tap.take_fd(int(sys.argv[1]), fd) for fd in tap.tap_fds_of(int(sys.argv[1]), "vmtap")]
fdstore.KeeperStore(sys.argv[2], start=False).put(sys.argv[3], fds)
print("kept", len(fds), flush=True)
time.sleep(60)
"""


@pytest.fixture
def keeper(tmp_path):
    """A KeeperStore on a private socket; its keeper process is ended at the test's end, pass or fail."""
    store = fdstore.KeeperStore(str(tmp_path / "fdkeeper.sock"), idle_s=30)
    pid = store.keeper_pid()  # starts it
    try:
        yield store
    finally:
        store.close()
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def probes(frames: list[bytes]) -> list[int]:
    return [int(f[f.index(b"probe-") + 6:]) for f in frames if b"probe-" in f]


def tap_exists(topology) -> bool:
    return topology.run("S", "ip", "link", "show", "vmtap", check=False).returncode == 0


@pytest.mark.netns
def test_a_tap_queue_outlives_the_agent_and_qemu(topology, paused_tap, keeper):
    """The agent hands the tap's fds to the keeper and is SIGKILLed; then QEMU goes too (the end of the
    migration). The tap and the frames queued in it live on in the keeper: the restarted agent takes the fds
    back and reads every frame, in order. Dropping them ends the tap."""
    agent = subprocess.Popen([sys.executable, "-c", AGENT, str(paused_tap.pid), keeper.path, NAME],
                             stdout=subprocess.PIPE, text=True)
    try:
        assert agent.stdout.readline().split() == ["kept", "1"]
        test_drain.send_probes(topology, 50)
    finally:
        agent.kill()
        agent.wait()
    paused_tap.kill()
    paused_tap.wait()
    assert tap_exists(topology), "the keeper's fd keeps the tap (and its queue)"
    assert keeper.names() == {NAME: 1}

    fds = keeper.take(NAME)  # the restarted agent
    try:
        assert len(fds) == 1
        assert probes(tap.read_queued(fds[0])) == list(range(50))
    finally:
        for fd in fds:
            os.close(fd)
    keeper.drop(NAME)
    assert keeper.names() == {}
    assert not tap_exists(topology), "the last fd closed: the tap is gone"


def test_keeper_refuses_malformed_requests_and_keeps_serving(keeper):
    s = fdstore._connect(keeper.path)
    with s:
        for raw in (b"{", b"[]", b'{"op": "explode"}', b"\xff" * 100):
            s.send(raw)
            assert b'"ok": false' in s.recv(65536), raw
    r, w = os.pipe()
    try:
        keeper.put("pipe", [w])
        keeper.put("pipe", [w])  # kept again (a restarted agent): replaces, not adds
        assert keeper.names() == {"pipe": 1}
        [got] = keeper.take("pipe")
        os.write(got, b"x")  # the keeper's copy is the pipe's write end
        os.close(got)
        assert os.read(r, 1) == b"x"
    finally:
        os.close(r)
        os.close(w)
        keeper.drop("pipe")


def test_keeper_exits_when_idle_and_the_agent_starts_a_new_one(tmp_path):
    path = str(tmp_path / "idle.sock")
    store = fdstore.KeeperStore(path, idle_s=0.3)
    first = store.keeper_pid()
    r0, w0 = os.pipe()
    store.put("held", [w0])
    os.close(w0)
    store.close()  # no client any more: it goes, with what it held
    deadline = time.monotonic() + 10
    while os.path.exists(path) and time.monotonic() < deadline:
        time.sleep(0.05)
    try:
        assert not os.path.exists(path)
        assert os.read(r0, 1) == b"", "what it held is closed: the pipe's last writer is gone"
        os.close(r0)
        r, w = os.pipe()
        store.put("p", [w])  # a new keeper is started
        os.close(w)
        second = store.keeper_pid()
        assert second != first
        assert os.stat(path).st_mode & 0o077 == 0, "root-only"
        os.close(r)
    finally:
        store.close()
        for pid in (first, locals().get("second")):
            if pid:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)


def test_systemd_store_speaks_sd_notify(tmp_path):
    """FDSTORE=1 with the fds in SCM_RIGHTS and FDNAME; FDSTOREREMOVE=1 to drop (sd_notify(3))."""
    path = str(tmp_path / "notify")
    systemd = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    systemd.bind(path)
    r, w = os.pipe()
    store = fdstore.SystemdStore(path)
    try:
        store.put(NAME, [w])
        msg, anc, _flags, _addr = systemd.recvmsg(4096, socket.CMSG_SPACE(4 * 4))
        assert msg.decode().split("\n") == ["FDSTORE=1", f"FDNAME={NAME}"]
        [(level, typ, data)] = anc
        assert (level, typ) == (socket.SOL_SOCKET, socket.SCM_RIGHTS)
        [got] = array.array("i", data)
        os.write(got, b"y")
        os.close(got)
        assert os.read(r, 1) == b"y"
        store.drop(NAME)
        assert systemd.recv(4096).decode().split("\n") == ["FDSTOREREMOVE=1", f"FDNAME={NAME}"]
    finally:
        store.close()
        systemd.close()
        os.close(r)
        os.close(w)


# The agent started again by systemd: LISTEN_FDS fds from 3 on, named by LISTEN_FDNAMES, for our pid only.
STARTED = r"""
import os, sys
from srmig.ctl import fdstore
got = fdstore.inherited_from_systemd()
print(sorted((k, len(v)) for k, v in got.items()), "LISTEN_FDS" in os.environ)
"""


def test_fds_systemd_passes_back_are_found_by_name():
    r1, w1 = os.pipe()
    r2, w2 = os.pipe()

    def as_systemd():  # in the child: the stored fds at 3 and 4, LISTEN_PID = the agent's own pid
        os.dup2(w1, 3)
        os.dup2(w2, 4)
        os.environ.update(LISTEN_PID=str(os.getpid()), LISTEN_FDS="2", LISTEN_FDNAMES=f"{NAME}:{NAME}")

    try:
        out = subprocess.run([sys.executable, "-c", STARTED], preexec_fn=as_systemd, pass_fds=(3, 4),
                             capture_output=True, text=True, timeout=30, check=True).stdout
        assert out.strip() == f"[('{NAME}', 2)] False"
        out = subprocess.run([sys.executable, "-c", STARTED], capture_output=True, text=True, timeout=30,
                             check=True, env=dict(os.environ, LISTEN_PID="1", LISTEN_FDS="2")).stdout
        assert out.strip() == "[] True", "another process's fds are not ours"
    finally:
        for fd in (r1, w1, r2, w2):
            os.close(fd)


def test_agents_that_start_together_share_one_keeper(tmp_path):
    """Two agents of one machine (or an agent and its restart) start a keeper at the same moment: one keeper
    serves the path and holds what both put, so a restarted agent finds its fds. (Measured before the lock:
    the last keeper to bind took the path, and the fds put in the other were out of reach.)"""
    path = str(tmp_path / "fdkeeper.sock")
    stores = [fdstore.KeeperStore(path, idle_s=30) for _ in range(8)]
    pipes = [os.pipe() for _ in stores]
    pids: set[int] = set()
    together = threading.Barrier(len(stores))

    def put(i):
        together.wait(10)
        stores[i].put(f"agent-{i}", [pipes[i][1]])

    try:
        with ThreadPoolExecutor(len(stores)) as pool:
            list(pool.map(put, range(len(stores))))
        pids = {s.keeper_pid() for s in stores}
        assert len(pids) == 1, f"one keeper, not {len(pids)}"
        restarted = fdstore.KeeperStore(path, start=False)
        assert restarted.names() == {f"agent-{i}": 1 for i in range(len(stores))}
        restarted.close()
    finally:
        for s in stores:
            s.close()
        for r, w in pipes:
            os.close(r)
            os.close(w)
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def test_a_keeper_whose_directory_was_remade_leaves_the_new_keeper_alone(tmp_path):
    """The testbed removes its socket directory after a run while the keeper idles; the next run makes it again
    and starts a keeper of its own. The old keeper's idle exit must not unlink the new one's socket (measured:
    a restarted agent 60 s later then found no keeper and drained nothing)."""
    d = tmp_path / "run"
    d.mkdir()
    path = str(d / "fdkeeper.sock")
    old = fdstore.KeeperStore(path, idle_s=0.5)
    pids = [old.keeper_pid()]
    old.close()
    try:
        for name in os.listdir(d):
            os.unlink(d / name)
        new = fdstore.KeeperStore(path, idle_s=30)
        pids.append(new.keeper_pid())
        assert pids[0] != pids[1]
        deadline = time.monotonic() + 10
        while _alive(pids[0]) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not _alive(pids[0]), "the old keeper exits idle"
        assert os.path.exists(path)
        assert fdstore.KeeperStore(path, start=False).keeper_pid() == pids[1]
        new.close()
    finally:
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split()[2] != "Z"
    except FileNotFoundError:
        return False
