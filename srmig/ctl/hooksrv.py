"""The agent's unix socket: JSON requests, one per line, one JSON answer each.

    {"op": "migrate-begin", "xml": "<domain>..."}  -> {"ok": true, "managed": true, "vm", "version",
                                                       "acked": true, "missing": [], "waited_ms"}
    {"op": "status"}                               -> the agent's status (srmig status)

`migrate-begin` comes from the libvirt hook (srmig.ctl.hook) on the destination, before its QEMU starts:
the agent provisions the migration path, then this thread (not the worker) waits, bounded, for every
ingress to acknowledge the new segment list.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socketserver
import tempfile
import threading
import time
from pathlib import Path

from srmig.ctl import work

log = logging.getLogger("srmig.hook")


class _Handler(socketserver.StreamRequestHandler):
    def handle(self) -> None:
        agent = self.server.agent
        for line in self.rfile:
            try:
                req = json.loads(line)
                op = req.get("op")
                if op == "migrate-begin":
                    out = self._begin(agent, req)
                elif op == "status":
                    out = {"ok": True, **agent.call(work.Status())}
                else:
                    out = {"ok": False, "error": f"unknown op {op!r}"}
            except Exception as e:  # noqa: BLE001 - answered, never fatal
                log.warning("request failed: %s", e)
                out = {"ok": False, "error": str(e)}
            self.wfile.write((json.dumps(out, default=str) + "\n").encode())
            self.wfile.flush()

    @staticmethod
    def _begin(agent, req) -> dict:
        t0 = time.monotonic()
        res = agent.call(work.HookBegin(req["xml"]), timeout=agent.cfg.hook.ack_timeout_s + 5)
        if not res.get("managed"):
            return {"ok": True, "managed": False}
        left = max(0.0, agent.cfg.hook.ack_timeout_s - (time.monotonic() - t0))
        missing = agent.db.wait_acks(res["vm"], res["version"], left) if res["version"] else []
        return {"ok": True, **res, "acked": not missing, "missing": missing,
                "waited_ms": round((time.monotonic() - t0) * 1000, 1),
                "on_timeout": agent.cfg.hook.on_timeout}


class _Server(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    daemon_threads = True


class HookServer:
    def __init__(self, agent, path: str):
        p = Path(path)
        p.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        with contextlib.suppress(FileNotFoundError):
            p.unlink()
        self.path = p
        self.server = _bind_private(p)
        self.server.agent = agent
        self.thread = threading.Thread(target=self.server.serve_forever, name="hook-server", daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()


def _bind_private(p: Path) -> _Server:
    """Root only from the first moment (whoever connects provisions migrations and reads every VM's status):
    bound inside a fresh 0700 directory beside `p`, made 0600, then renamed to `p`. A bind at `p` followed
    by chmod would leave a window in which the umask's mode lets others connect."""
    tmp = Path(tempfile.mkdtemp(prefix=f".{p.name}-", dir=p.parent))
    try:
        server = _Server(str(tmp / "sock"), _Handler)
        try:
            os.chmod(tmp / "sock", 0o600)
            os.rename(tmp / "sock", p)
        except BaseException:
            server.server_close()
            raise
    finally:
        with contextlib.suppress(OSError):
            (tmp / "sock").unlink()
        os.rmdir(tmp)
    return server


def serve(agent, path: str) -> HookServer:
    return HookServer(agent, path)


def request(path: str, req: dict, timeout: float) -> dict:
    """One request to an agent's socket (srmig status, the hook)."""
    import socket  # noqa: PLC0415

    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sk:
        sk.settimeout(timeout)
        sk.connect(path)
        sk.sendall((json.dumps(req) + "\n").encode())
        buf = b""
        while not buf.endswith(b"\n"):
            chunk = sk.recv(65536)
            if not chunk:
                break
            buf += chunk
    if not buf:
        raise ConnectionError(f"{path}: the agent closed the connection without an answer")
    return json.loads(buf)
