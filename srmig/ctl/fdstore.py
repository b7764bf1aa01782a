"""File descriptors that outlive the agent: the VM taps' fds the agent keeps through a migration (KeepTap).

A tap's queue lives as long as one fd on it: QEMU's, or the agent's duplicate. Were the duplicate to die with
the agent (SIGKILL at the pause), a paused source QEMU's queue would go with QEMU at the end of the
migration, and what waited in it with it. So every kept fd is also handed to a holder that is not the
agent, and a restarted agent takes it back from there (docs/faults.md):

- under systemd, systemd itself: `FDSTORE=1` on $NOTIFY_SOCKET (sd_notify(3)), given back at the next start
  in LISTEN_FDS / LISTEN_FDNAMES (the unit needs FileDescriptorStoreMax, which `srmig install-hook --unit`
  writes);
- otherwise the fd keeper (`python -m srmig.ctl.fdstore`), a small process that only holds fds and hands
  them over SCM_RIGHTS on a root-only unix socket (no logic to crash in). The agent starts it when it is
  not running; it exits once no agent has been connected for KEEPER_IDLE_S, with what it held: an agent
  that stays down that long has nothing left worth draining, and no keeper outlives its agent for good.

Names are `tap/<host>/<vm, ':' as '-'>/<migration id>`: a restarted agent takes only what belongs to the
migration it resumes.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import socket
import subprocess
import sys
import time
from array import array
from pathlib import Path

log = logging.getLogger("srmig.fdstore")
KEEPER_SOCKET = "/run/srmig/fdkeeper.sock"
KEEPER_IDLE_S = 60.0     # the keeper exits after this long without a client (systemd restarts an agent in 1 s)
KEEPER_START_S = 5.0     # the longest the agent waits for a keeper it started to answer
MAX_FDS = 64             # fds in one message (a VM's tap has one per queue)
SD_LISTEN_FDS_START = 3


def keeper_socket(hook_socket: str) -> str:
    """The keeper's socket of an agent whose hook socket is `hook_socket`: next to it, root-only like it."""
    return str(Path(hook_socket).parent / Path(KEEPER_SOCKET).name)


def tap_name(host: str, vm: str, migration: str) -> str:
    """The host too: two agents on one machine (the testbed) may share a keeper. systemd's LISTEN_FDNAMES
    separates names with ':', which sd_notify(3) therefore forbids in them."""
    return f"tap/{host}/{vm.replace(':', '-')}/{migration}"


class FdStore:
    """Where kept fds also live. `put` hands duplicates over (the caller keeps its own), `take` returns
    duplicates the caller owns (the store keeps its copies until `drop`)."""

    def put(self, name: str, fds: list[int]) -> None:
        raise NotImplementedError

    def take(self, name: str) -> list[int]:
        raise NotImplementedError

    def drop(self, name: str) -> None:
        raise NotImplementedError

    def close(self) -> None:
        pass


class NoStore(FdStore):
    """Nowhere: the fds die with the agent (the testbed's executor, or a store that failed to start)."""

    def put(self, name, fds):
        pass

    def take(self, name):
        return []

    def drop(self, name):
        pass


class SystemdStore(FdStore):
    """systemd's file descriptor store (sd_notify FDSTORE=1); what it kept comes back in LISTEN_FDS."""

    def __init__(self, notify_socket: str, inherited: dict[str, list[int]] | None = None):
        self.address = "\0" + notify_socket[1:] if notify_socket.startswith("@") else notify_socket
        self.inherited = inherited or {}
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)

    def _notify(self, text: str, fds: list[int] = ()) -> None:
        anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array("i", fds).tobytes())] if fds else []
        self.sock.sendmsg([text.encode()], anc, 0, self.address)

    def put(self, name, fds):
        for i in range(0, len(fds), MAX_FDS):
            self._notify(f"FDSTORE=1\nFDNAME={name}", fds[i:i + MAX_FDS])

    def take(self, name):
        return [os.dup(fd) for fd in self.inherited.get(name, [])]

    def drop(self, name):
        self._notify(f"FDSTOREREMOVE=1\nFDNAME={name}")
        for fd in self.inherited.pop(name, []):
            os.close(fd)

    def close(self):
        self.sock.close()


def inherited_from_systemd(environ=os.environ) -> dict[str, list[int]]:
    """The fds systemd passed us (sd_listen_fds_with_names(3)), by name; the variables are then unset so
    that no child takes them for its own."""
    if environ.get("LISTEN_PID") != str(os.getpid()):
        return {}
    n = int(environ.get("LISTEN_FDS", "0") or 0)
    names = (environ.get("LISTEN_FDNAMES") or "").split(":")
    out: dict[str, list[int]] = {}
    for i in range(n):
        fd = SD_LISTEN_FDS_START + i
        os.set_inheritable(fd, False)
        out.setdefault(names[i] if i < len(names) else "unknown", []).append(fd)
    for k in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
        environ.pop(k, None)
    return out


class KeeperStore(FdStore):
    """The `srmig fd-keeper` process on `path`, started if it does not answer."""

    def __init__(self, path: str = KEEPER_SOCKET, start: bool = True, idle_s: float = KEEPER_IDLE_S):
        self.path = path
        self.sock: socket.socket | None = None
        self._start = start
        self._idle_s = idle_s

    def _conn(self) -> socket.socket:
        if self.sock is None:
            try:
                self.sock = _connect(self.path)
            except OSError:
                if not self._start:
                    raise
                start_keeper(self.path, self._idle_s)
                self.sock = _connect(self.path)
        return self.sock

    def _ask(self, req: dict, fds: list[int] = ()) -> tuple[dict, list[int]]:
        for attempt in (1, 2):  # a keeper that exited idle between two calls: once more, with a new one
            try:
                s = self._conn()
                socket.send_fds(s, [json.dumps(req).encode()], list(fds))
                msg, got, _flags, _addr = socket.recv_fds(s, 65536, MAX_FDS)
                if not msg:
                    raise ConnectionResetError("the fd keeper closed the connection")
                return json.loads(msg), got
            except (ConnectionError, BrokenPipeError) as e:
                self.close()
                if attempt == 2:
                    raise OSError(f"fd keeper on {self.path}: {e}") from e
        raise AssertionError("unreachable")

    def put(self, name, fds):
        for i in range(0, len(fds), MAX_FDS):
            self._ask({"op": "put", "name": name, "add": i > 0}, fds[i:i + MAX_FDS])

    def take(self, name):
        return self._ask({"op": "take", "name": name})[1]

    def drop(self, name):
        self._ask({"op": "drop", "name": name})

    def names(self) -> dict[str, int]:
        return self._ask({"op": "list"})[0]["names"]

    def keeper_pid(self) -> int:
        """The keeper's pid (SO_PEERCRED): `srmig status` shows it, tests end it."""
        import struct  # noqa: PLC0415

        cred = self._conn().getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
        return struct.unpack("3i", cred)[0]

    def close(self):
        if self.sock is not None:
            self.sock.close()
            self.sock = None


def _connect(path: str) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
    try:
        s.connect(path)
    except OSError:
        s.close()
        raise
    return s


def start_keeper(path: str, idle_s: float = KEEPER_IDLE_S) -> None:
    """The fd keeper on `path`, in a session of its own (a signal to the agent's group spares it)."""
    subprocess.Popen([sys.executable, "-m", "srmig.ctl.fdstore", path, str(idle_s)], stdin=subprocess.DEVNULL,
                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
                     close_fds=True)
    deadline = time.monotonic() + KEEPER_START_S
    while True:
        with contextlib.suppress(OSError):
            _connect(path).close()
            return
        if time.monotonic() > deadline:
            raise OSError(f"the fd keeper did not answer on {path} within {KEEPER_START_S:.0f} s")
        time.sleep(0.02)


def for_agent(keeper_socket: str = KEEPER_SOCKET) -> FdStore:
    """systemd's store when systemd runs us with one, else the fd keeper."""
    notify = os.environ.get("NOTIFY_SOCKET")
    if notify:
        return SystemdStore(notify, inherited_from_systemd())
    return KeeperStore(keeper_socket)


def serve(path: str, idle_s: float = KEEPER_IDLE_S) -> None:
    """The keeper: holds what it is given, by name, until told to drop it. One connection at a time is
    enough (one agent per host); requests are one message each, answered in order."""
    import select  # noqa: PLC0415

    held: dict[str, list[int]] = {}
    p = Path(path)
    p.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    if not _sole_keeper(path):
        return  # another keeper serves this path: whoever started us connects to it
    with contextlib.suppress(FileNotFoundError):
        p.unlink()  # a dead keeper's socket
    old = os.umask(0o077)  # root-only from its first instant
    try:
        srv = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
        srv.bind(path)
    finally:
        os.umask(old)
    srv.listen(4)
    ours = os.stat(path).st_ino
    clients: list[socket.socket] = []
    idle_since = time.monotonic()
    while True:
        ready, _, _ = select.select([srv, *clients], [], [], 1.0)
        for s in ready:
            if s is srv:
                clients.append(srv.accept()[0])
                continue
            try:
                msg, fds, _flags, _addr = socket.recv_fds(s, 65536, MAX_FDS)
            except OSError:
                msg, fds = b"", []
            if not msg:
                clients.remove(s)
                s.close()
                continue
            reply, out = _keeper_answer(held, msg, fds)
            with contextlib.suppress(OSError):
                socket.send_fds(s, [json.dumps(reply).encode()], out)
            for fd in out if reply.get("dups") else ():
                os.close(fd)
        if clients:
            idle_since = time.monotonic()
        elif time.monotonic() - idle_since > idle_s:
            with contextlib.suppress(FileNotFoundError):
                if os.stat(path).st_ino == ours:  # (our directory may have been removed and made again,
                    p.unlink()                   # the path now another keeper's)
            srv.close()  # first the path: a new client then starts a keeper, which waits for our lock
            for fds in held.values():
                for fd in fds:
                    os.close(fd)
            return


def _sole_keeper(path: str) -> bool:
    """Hold `path`.lock for the rest of our life; False if another keeper holds it for KEEPER_START_S. Agents
    that start together (two hosts of the testbed on one machine, an agent and its restart) may each start a
    keeper: without the lock, the last one to bind would take the path from the one holding the fds."""
    lock = os.open(path + ".lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    deadline = time.monotonic() + KEEPER_START_S  # (a keeper exiting idle lets go within that)
    while True:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True  # the fd stays open, unreferenced: the lock is ours until we exit
        except BlockingIOError:
            if time.monotonic() > deadline:
                os.close(lock)
                return False
            time.sleep(0.02)


def _keeper_answer(held: dict[str, list[int]], msg: bytes, fds: list[int]) -> tuple[dict, list[int]]:
    try:
        req = json.loads(msg)
        op, name = req["op"], req.get("name", "")
    except (ValueError, KeyError, TypeError):
        for fd in fds:
            os.close(fd)
        return {"ok": False, "error": "malformed request"}, []
    if op == "put":  # a second put of a name (a restarted agent kept the tap again) replaces the first
        old = held.pop(name, []) if not req.get("add") else []
        for fd in old:
            os.close(fd)
        held.setdefault(name, []).extend(fds)
        return {"ok": True}, []
    for fd in fds:  # only a put carries fds
        os.close(fd)
    if op == "take":
        return {"ok": True, "dups": True}, [os.dup(fd) for fd in held.get(name, [])]
    if op == "drop":
        for fd in held.pop(name, []):
            os.close(fd)
        return {"ok": True}, []
    if op == "list":
        return {"ok": True, "names": {k: len(v) for k, v in held.items()}}, []
    return {"ok": False, "error": f"unknown op {op!r}"}, []


if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING)
    serve(sys.argv[1] if len(sys.argv) > 1 else KEEPER_SOCKET,
          float(sys.argv[2]) if len(sys.argv) > 2 else KEEPER_IDLE_S)
