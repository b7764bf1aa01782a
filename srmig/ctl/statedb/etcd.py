"""The etcd backend of the state database: etcd's v3 JSON gateway (grpc-gateway) through etcd3gw.

`EtcdKv` (requests to the endpoints, failing over between them), `_EtcdLease`, and `_EtcdWatch`, one
streaming HTTP request per watch that reconnects and resumes from the last delivered revision.

https:// endpoints are mutual TLS: every session verifies the member's certificate against `Tls.ca_file`
and presents `Tls.cert_file`/`key_file`. (etcd3gw's own ca_cert/cert_cert/cert_key arguments apply only to
the session it makes itself; srmig passes sessions of its own, so it sets verify and cert on them.)
"""

from __future__ import annotations

import base64
import json
import logging
import math
import os
import random
import re
import socket
import ssl
import threading
from urllib.parse import urlsplit

from srmig.ctl.statedb import (BACKOFF_MAX_S, BACKOFF_MIN_S, DEFAULT_PREFIX, DbUnavailable, Entry, Event, Kv, Lease,
                               LeaseExpired, Tls, Watch, WatchCallback, _check_key, _Compacted, _encode_value)

log = logging.getLogger(__name__)


ETCD_API_PATH = "/v3/"          # etcd 3.4 serves /v3/ and the deprecated /v3beta/; 3.5 drops /v3beta/
# A watch is a long-lived stream with no read timeout; TCP keepalive finds a member that vanished without a
# FIN (host down, partition) in ~11 s, and the watch then reconnects, to another endpoint if there is one.
KEEPALIVE_OPTIONS = [(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1), (socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, 5),
                     (socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, 2), (socket.IPPROTO_TCP, socket.TCP_KEEPCNT, 3)]


def _b64(data: bytes | str) -> str:
    # etcd3gw's own _encode() takes str as latin-1: keys are UTF-8 here
    return base64.b64encode(data.encode() if isinstance(data, str) else data).decode()


def _bytes_end(prefix: bytes) -> bytes:
    """etcd's range_end for "every key starting with prefix": the prefix with its last byte incremented."""
    p = bytearray(prefix)
    while p and p[-1] == 0xFF:
        p.pop()
    if not p:
        return b"\0"            # no upper bound
    p[-1] += 1
    return bytes(p)


# What a failed TLS handshake means, by OpenSSL's reason code (the client's view).
TLS_REASONS = {
    "SSLV3_ALERT_BAD_CERTIFICATE": "etcd refused our client certificate: not signed by a CA in its "
                                   "--trusted-ca-file",
    "TLSV1_ALERT_UNKNOWN_CA": "etcd refused our client certificate: not signed by a CA in its --trusted-ca-file",
    "SSLV3_ALERT_UNSUPPORTED_CERTIFICATE": "etcd refused our client certificate: not for client "
                                           "authentication (extendedKeyUsage clientAuth)",
    "CERTIFICATE_VERIFY_FAILED": "etcd's certificate failed verification against db.ca_file",
    "WRONG_VERSION_NUMBER": "the endpoint does not speak TLS (plain http:// etcd?)",
}
# How etcd (Go) turns a client away over its client certificate: an alert, or, as often, a closed
# connection with none (the handshake then ends in EOF on our side).
CLIENT_CERT_ALERTS = {"SSLV3_ALERT_BAD_CERTIFICATE", "TLSV1_ALERT_UNKNOWN_CA", "TLSV13_ALERT_CERTIFICATE_REQUIRED",
                      "SSLV3_ALERT_CERTIFICATE_UNKNOWN", "SSLV3_ALERT_UNSUPPORTED_CERTIFICATE"}
NO_CLIENT_CERT = "TLS: etcd refused us: it requires a client certificate (db.cert_file, db.key_file)"


def _why(e: Exception, tls: Tls | None = None) -> str:
    """The useful part of an etcd3gw/requests error: etcd3gw keeps the text in detail_text, str() is empty.
    `tls`: what we presented, to explain a handshake etcd cut short."""
    text = getattr(e, "detail_text", None) or str(e) or type(e).__name__
    m = re.search(r"\[SSL: ([A-Z0-9_]+)\]([^'\"]*)", text)
    reason = m.group(1) if m else None
    eof = bool(re.search(r"SSLEOFError|EOF occurred in violation of protocol", text))
    if tls is not None and not tls.cert_file and (eof or reason in CLIENT_CERT_ALERTS):
        return NO_CLIENT_CERT
    if m:
        detail = re.sub(r"\s*\(_ssl\.c:\d+\)?$", "", m.group(2).strip())
        meaning = TLS_REASONS.get(reason)
        return f"TLS: {meaning} ({detail})" if meaning else f"TLS: {reason.lower()}: {detail}"
    if tls is not None and eof:
        return ("TLS: etcd refused our client certificate: it closed the handshake (is the certificate signed by "
                "a CA in its --trusted-ca-file?)")
    if tls is None and "RemoteDisconnected" in text:
        return "closed without an answer (an etcd with TLS does that to http://: use https://)"
    m = re.search(r"\[Errno -?\d+\][^'\")]*", text)
    return m.group(0) if m else text[:300]


def _use_tls(session, tls: Tls | None) -> None:
    if tls is not None:
        session.verify = tls.ca_file
        if tls.cert_file:
            session.cert = (tls.cert_file, tls.key_file)


def _check_tls(tls: Tls) -> None:
    """Load the CA and the client's pair once, here: requests would fail on every request with an OSError
    that is no etcd3gw error."""
    ctx = ssl.create_default_context()
    try:
        ctx.load_verify_locations(cafile=tls.ca_file)
    except (OSError, ssl.SSLError) as e:
        raise DbUnavailable(f"etcd TLS: cannot load the CA file {tls.ca_file} ({e.strerror or e})") from None
    if tls.cert_file:
        try:
            ctx.load_cert_chain(tls.cert_file, tls.key_file)
        except (OSError, ssl.SSLError) as e:
            raise DbUnavailable(f"etcd TLS: cannot load the client certificate {tls.cert_file} with key "
                                f"{tls.key_file} ({e.strerror or e})") from None


class EtcdKv(Kv):
    def __init__(self, endpoints: list[str], prefix: str = DEFAULT_PREFIX, timeout_s: float = 2.0,
                 tls: Tls | None = None):
        urls = [urlsplit(ep) for ep in endpoints]
        for ep, u in zip(endpoints, urls):
            if u.scheme not in ("http", "https") or not u.hostname:
                raise ValueError(f"etcd endpoint {ep!r}: expected https://HOST:PORT (or http://HOST:PORT)")
            if u.scheme == "https" and tls is None:
                raise ValueError(f"etcd endpoint {ep!r}: https:// needs tls (the CA file, a client certificate "
                                 "and its key)")
            if u.scheme == "http" and tls is not None:
                raise ValueError(f"etcd endpoint {ep!r}: TLS is configured but the endpoint is http://: "
                                 "use https://")
        if tls is not None:
            _check_tls(tls)
        try:
            import requests
            from etcd3gw.client import Etcd3Client
            from etcd3gw import exceptions as etcd_exc
        except ImportError as e:
            raise DbUnavailable(f"etcd state db: {e} (pip install 'srmig[etcd]')") from e
        self._exc = etcd_exc
        self._requests = requests
        self.prefix = prefix
        self.timeout_s = timeout_s
        self.endpoints = list(endpoints)
        self.tls = tls
        self._clients = []
        for u in urls:
            session = requests.Session()
            session.trust_env = False   # no HTTP proxy between us and etcd
            _use_tls(session, tls)
            self._clients.append(Etcd3Client(
                host=u.hostname, port=u.port or 2379, protocol=u.scheme, timeout=timeout_s,
                api_path=ETCD_API_PATH, session=session))
        self._current = 0               # the endpoint that answered last
        self._lock = threading.Lock()
        self._watches: set[_EtcdWatch] = set()
        self._closed = False
        try:
            self._call("maintenance/status", {})
        except BaseException:
            for c in self._clients:
                c.session.close()
            raise

    def _call(self, path: str, payload: dict) -> dict:
        """POST to the current endpoint; on a refused connection (or 503: member without leader) try the
        others once each. A timeout is not retried: the request may have been applied."""
        errors = []
        n = len(self._clients)
        start = self._current
        for i in range(n):
            idx = (start + i) % n
            c = self._clients[idx]
            try:
                result = c.post(c.get_url(path), json=payload)
                self._current = idx
                return result
            except self._exc.ConnectionFailedError as e:
                errors.append(f"{self.endpoints[idx]}: {_why(e, self.tls)}")
            except self._exc.ConnectionTimeoutError as e:
                raise DbUnavailable(f"etcd {self.endpoints[idx]}: timed out after {self.timeout_s} s "
                                    f"({_why(e, self.tls)})") from e
            except self._exc.Etcd3Exception as e:
                if "lease not found" in (e.detail_text or ""):
                    raise LeaseExpired(f"etcd {self.endpoints[idx]}: lease has expired or was revoked "
                                       "(requested lease not found)") from e
                raise RuntimeError(f"etcd {self.endpoints[idx]} {path}: {_why(e, self.tls)}") from e
        raise DbUnavailable("etcd unreachable: " + "; ".join(errors))

    def _full(self, key: str) -> bytes:
        return (self.prefix + key).encode()

    def _decode_kv(self, kv: dict) -> tuple[str, dict | None]:
        key = base64.b64decode(kv["key"]).decode()[len(self.prefix):]
        value = json.loads(base64.b64decode(kv["value"])) if kv.get("value") else None
        return key, value

    # -- Kv

    def get(self, key: str) -> Entry | None:
        _check_key(key)
        kvs = self._call("kv/range", {"key": _b64(self._full(key))}).get("kvs")
        if not kvs:
            return None
        k, v = self._decode_kv(kvs[0])
        return Entry(k, v, int(kvs[0]["mod_revision"]))

    def range(self, prefix: str) -> tuple[list[Entry], int]:
        full = self._full(prefix)
        r = self._call("kv/range", {"key": _b64(full), "range_end": _b64(_bytes_end(full)),
                                    "sort_order": "ASCEND", "sort_target": "KEY"})
        entries = []
        for kv in r.get("kvs", []):
            k, v = self._decode_kv(kv)
            entries.append(Entry(k, v, int(kv["mod_revision"])))
        return entries, int(r["header"]["revision"])

    def _put_request(self, key: str, value: dict, lease: Lease | None) -> dict:
        req = {"key": _b64(self._full(key)), "value": _b64(_encode_value(value))}
        if lease is not None:
            req["lease"] = str(lease.id)
        return req

    def put(self, key: str, value: dict, lease: Lease | None = None) -> int:
        _check_key(key)
        return int(self._call("kv/put", self._put_request(key, value, lease))["header"]["revision"])

    def put_if(self, key: str, value: dict, mod_revision: int, lease: Lease | None = None) -> bool:
        _check_key(key)
        # a missing key compares as mod_revision 0, so one comparison covers create-only too
        txn = {"compare": [{"key": _b64(self._full(key)), "result": "EQUAL", "target": "MOD",
                            "mod_revision": str(mod_revision)}],
               "success": [{"request_put": self._put_request(key, value, lease)}],
               "failure": []}
        return bool(self._call("kv/txn", txn).get("succeeded", False))  # false is omitted from the JSON

    def delete(self, key: str) -> bool:
        _check_key(key)
        return int(self._call("kv/deleterange", {"key": _b64(self._full(key))}).get("deleted", 0)) > 0

    def lease(self, ttl_s: float) -> Lease:
        if ttl_s <= 0:
            raise ValueError(f"lease TTL must be positive, got {ttl_s}")
        r = self._call("lease/grant", {"TTL": math.ceil(ttl_s), "ID": 0})
        return _EtcdLease(self, int(r["ID"]), float(r["TTL"]))

    def watch(self, prefix: str, callback: WatchCallback, start_revision: int | None = None) -> Watch:
        if self._closed:
            raise RuntimeError("state db is closed")
        if start_revision is None:
            full = self._full(prefix)
            r = self._call("kv/range", {"key": _b64(full), "range_end": _b64(_bytes_end(full)),
                                        "count_only": True})
            last = int(r["header"]["revision"])
        else:
            last = start_revision - 1
        w = _EtcdWatch(self, prefix, callback, last)
        with self._lock:
            self._watches.add(w)
        return w._start()

    def close(self) -> None:
        if not self._close_watches():
            return
        for c in self._clients:
            c.session.close()


class _EtcdLease(Lease):
    def __init__(self, kv: EtcdKv, id: int, ttl_s: float):
        super().__init__(id, ttl_s)
        self._kv = kv

    def refresh(self) -> bool:
        # an expired lease still answers, without a TTL
        return int(self._kv._call("lease/keepalive", {"ID": str(self.id)})["result"].get("TTL", -1)) > 0

    def revoke(self) -> None:
        try:
            self._kv._call("kv/lease/revoke", {"ID": str(self.id)})
        except LeaseExpired:
            pass


class _EtcdWatch(Watch):
    """One streaming POST /v3/watch; after the stream ends or fails, reconnect with backoff from
    last_revision + 1, so nothing is lost and nothing repeats (etcd keeps history until compacted)."""

    def __init__(self, kv: EtcdKv, prefix: str, callback: WatchCallback, last: int):
        super().__init__(prefix, callback, last, kv.timeout_s)
        self._kv = kv
        self._resp = None
        self._resp_lock = threading.Lock()
        # one session (one TCP connection) per watch: a pooled connection is busy for the stream's life
        self._session = kv._requests.Session()
        self._session.trust_env = False
        _use_tls(self._session, kv.tls)
        self._session.mount("http://", _keepalive_adapter(kv._requests))
        self._session.mount("https://", _keepalive_adapter(kv._requests))

    def _interrupt(self) -> None:
        with self._resp_lock:
            resp = self._resp
        if resp is not None:
            _shutdown(resp)
        with self._kv._lock:
            self._kv._watches.discard(self)

    def _run(self) -> None:
        backoff = BACKOFF_MIN_S
        idx = self._kv._current
        try:
            while not self._cancelled.is_set():
                endpoint = self._kv.endpoints[idx]
                try:
                    if self._stream(idx):
                        backoff = BACKOFF_MIN_S
                    why = "stream ended"
                except _Compacted as c:
                    self._resync(self._kv, c.revision)
                    continue
                except Exception as e:
                    why = _why(e, self._kv.tls)
                if self._cancelled.is_set():
                    break
                log.warning("state db watch %r on %s: %s; reconnecting from revision %d in %.2f s",
                            self.prefix, endpoint, why, self.last_revision + 1, backoff)
                idx = (idx + 1) % len(self._kv.endpoints)
                self._cancelled.wait(backoff * random.uniform(0.8, 1.2))
                backoff = min(backoff * 2, BACKOFF_MAX_S)
        finally:
            self._session.close()

    def _stream(self, idx: int) -> bool:
        """Run one watch stream until it ends; True if etcd accepted it (the backoff then starts over)."""
        client = self._kv._clients[idx]
        full = self._kv._full(self.prefix)
        req = {"create_request": {"key": _b64(full), "range_end": _b64(_bytes_end(full)),
                                  "start_revision": str(self.last_revision + 1)}}
        resp = self._session.post(client.get_url("watch"), json=req, stream=True,
                                  timeout=(self._kv.timeout_s, None))
        with self._resp_lock:
            self._resp = resp
        accepted = False
        try:
            if self._cancelled.is_set():
                return accepted
            if resp.status_code != 200:
                raise RuntimeError(f"HTTP {resp.status_code}: {resp.text[:200]}")
            buf = b""
            # grpc-gateway writes one JSON object per line, flushed; the final error object has no newline
            for chunk in resp.iter_content(chunk_size=None):
                buf += chunk
                while (nl := buf.find(b"\n")) >= 0:
                    line, buf = buf[:nl], buf[nl + 1:]
                    accepted |= self._handle(line)
            if buf.strip():
                accepted |= self._handle(buf)
            return accepted
        finally:
            with self._resp_lock:
                self._resp = None
            resp.close()

    def _handle(self, line: bytes) -> bool:
        if not line.strip() or self._cancelled.is_set():
            return False
        msg = json.loads(line)
        if "error" in msg:
            err = msg["error"]
            raise RuntimeError(err.get("message", str(err)) if isinstance(err, dict) else str(err))
        res = msg["result"]
        if res.get("canceled"):
            if int(res.get("compact_revision", 0)) > 0:
                raise _Compacted(int(res["compact_revision"]))
            raise RuntimeError(f"watch canceled by etcd: {res.get('cancel_reason', 'no reason given')}")
        events = []
        for ev in res.get("events", ()):
            kv = ev["kv"]
            try:
                key, value = self._kv._decode_kv(kv)
            except ValueError:
                log.warning("state db watch %r: skipping a value that is not JSON at revision %s", self.prefix,
                            kv.get("mod_revision"))
                continue
            kind = "delete" if ev.get("type") == "DELETE" else "put"   # PUT is the default, omitted
            events.append(Event(kind, key, value if kind == "put" else None, int(kv["mod_revision"])))
        self._deliver(events)
        return True


def _keepalive_adapter(requests):
    from urllib3.connection import HTTPConnection

    class KeepaliveAdapter(requests.adapters.HTTPAdapter):
        def init_poolmanager(self, *args, **kwargs):
            kwargs["socket_options"] = HTTPConnection.default_socket_options + KEEPALIVE_OPTIONS
            super().init_poolmanager(*args, **kwargs)

    return KeepaliveAdapter(pool_connections=1, pool_maxsize=1)


def _shutdown(resp) -> None:
    """Unblock the thread reading a streaming response: shut its socket down under it (etcd3gw's Watcher
    does the same; requests has no other way to interrupt a blocking read)."""
    try:
        sock = socket.socket(fileno=os.dup(resp.raw._fp.fileno()))
    except (AttributeError, OSError, ValueError):
        return
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    finally:
        sock.close()
