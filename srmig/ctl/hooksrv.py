"""The agent's unix socket: JSON requests, one per line, one JSON answer each.

    {"op": "migrate-begin", "xml": "<domain>..."}  -> {"ok": true, "managed": true, "vm", "version",
                                                       "acked": true, "missing": [], "waited_ms"}
    {"op": "status"}                               -> the agent's status (srmig status)

`migrate-begin` comes from the libvirt hook (srmig.ctl.hook) on the destination, before its QEMU starts:
the agent provisions the migration path, then this thread (not the worker) waits, bounded, for every
ingress to acknowledge the new segment list.

A request is checked before anything acts on it (srmig.ctl.records.hook_request): at most MAX_REQUEST_BYTES,
a JSON object, a known op, its fields of the right type. A malformed, oversized or truncated one is answered
`{"ok": false, "error", "rejected_input": "hook"}` (a domain XML refused: "domain_xml"), logged, counted, and
the connection closed. No read or write waits longer than `request_timeout_s`: a client that stalls in the
middle of a request does not hold a thread.
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
MAX_REQUEST_BYTES = 4 << 20  # one request line: a domain's XML (records.MAX_DOMAIN_XML characters), JSON-escaped
REQUEST_TIMEOUT_S = 10.0     # the longest one read or write on a connection may wait


class _Handler(socketserver.StreamRequestHandler):
    def setup(self) -> None:
        self.timeout = self.server.request_timeout_s  # StreamRequestHandler sets it on the connection
        super().setup()

    def handle(self) -> None:
        from srmig.ctl import records  # noqa: PLC0415 - the libvirt hook imports this module: it must load fast

        agent = self.server.agent
        where = f"hook socket (pid {self._peer_pid()})"
        while True:  # until the client closes, or a request is rejected
            try:
                line = self.rfile.readline(MAX_REQUEST_BYTES + 1)
            except TimeoutError:
                line, stalled = b"", True
            except OSError:
                return
            else:
                stalled = False
            try:
                if stalled:
                    raise records.Rejected(f"no complete request in {self.timeout:g} s")
                if not line:
                    return
                if not line.endswith(b"\n"):
                    raise records.Rejected(f"more than {MAX_REQUEST_BYTES} bytes" if len(line) > MAX_REQUEST_BYTES
                                           else f"truncated: {len(line)} bytes and no end of line")
                req = records.hook_request(line)
            except records.Rejected as e:
                records.reject("hook", where, e)
                self._answer({"ok": False, "error": f"rejected: {e}", "rejected_input": "hook"})
                return
            try:
                if req["op"] == "migrate-begin":
                    out = self._begin(agent, req)
                else:
                    out = {"ok": True, **agent.call(work.Status())}
            except records.Rejected as e:  # the domain's XML, refused (and logged) by the worker
                out = {"ok": False, "error": f"rejected: {e}", "rejected_input": "domain_xml"}
            except Exception as e:  # noqa: BLE001 - answered, never fatal
                log.warning("request failed: %s", e)
                out = {"ok": False, "error": str(e)}
            if not self._answer(out):
                return

    def _answer(self, out: dict) -> bool:
        """One answer line; False when the client is gone or does not read it."""
        try:
            self.wfile.write((json.dumps(out, default=str) + "\n").encode())
            self.wfile.flush()
        except OSError:
            return False
        return True

    def _peer_pid(self) -> int | None:
        import socket  # noqa: PLC0415
        import struct  # noqa: PLC0415

        try:
            return struct.unpack("3i", self.request.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12))[0]
        except OSError:
            return None

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
    request_timeout_s = REQUEST_TIMEOUT_S


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
