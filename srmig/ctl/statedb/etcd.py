"""The etcd backend of the state database: etcd's v3 JSON gateway (grpc-gateway), its clients etcd3gw's
(the requests themselves sent on their sessions here, to tell a refused connection from a lost answer).

`EtcdKv` (requests to the endpoints, failing over between them), `_EtcdLease`, and `_EtcdWatch`, one
streaming HTTP request per watch that reconnects and resumes from the last delivered revision.

Failing over (several endpoints, the members of one cluster): a request goes to the member that answered
last; when that one does not answer, to the next, and the first success names the new one in one log line.
What may be sent again depends on what the failure says: a connection that was never made, or an answer
that etcd did not apply it (no leader, proposal dropped), is sent elsewhere as it is; so is a read. A write
that went out with no answer (the member died under it, or raft timed out: the leader died) may have been
applied, so it is sent again only as a transaction that applies it only if it did not land (`put`,
`put_if`) or with an ID that shows it did (`lease`): every write lands once. During an election the members
answer and cannot serve; the rounds go on for FAILOVER_ROUNDS_S. A watch whose member goes away resumes on
the next one from the revision after the last it delivered; a lease is refreshed through whichever member
answers (a new leader keeps every lease alive: it extends them at its election).

https:// endpoints are mutual TLS: every session verifies the member's certificate against `Tls.ca_file`
and presents `Tls.cert_file`/`key_file`. (etcd3gw's own ca_cert/cert_cert/cert_key arguments apply only to
the session it makes itself; srmig passes sessions of its own, so it sets verify and cert on them.)

With `Auth` (etcd's authentication on), the client logs in (POST auth/authenticate with the user's password:
etcd 3.4's JSON gateway takes no user from a client certificate, and refuses a certificate with a CN once
authentication is on) and sends the token in the Authorization header of every request and watch. etcd
forgets a token after --auth-token-ttl (300 s) unused, or on the member's restart, and refuses one issued
before a change to users or roles: the request is then sent again after a new login (etcd checked the token
before applying anything). A request the user's roles do not permit raises PermissionDenied.
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
import time
from urllib.parse import urlsplit

from srmig.ctl.statedb import (BACKOFF_MAX_S, BACKOFF_MIN_S, DEFAULT_PREFIX, Auth, AuthFailed, DbUnavailable, Entry,
                               Event, Kv, Lease, LeaseExpired, PermissionDenied, Tls, Watch, WatchCallback,
                               _check_key, _Compacted, _encode_value)

log = logging.getLogger(__name__)


ETCD_API_PATH = "/v3/"          # etcd 3.4 serves /v3/ and the deprecated /v3beta/; 3.5 drops /v3beta/
# A watch is a long-lived stream with no read timeout; TCP keepalive finds a member that vanished without a
# FIN (host down, partition) in ~11 s, and the watch then reconnects, to another endpoint if there is one.
KEEPALIVE_OPTIONS = [(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1), (socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, 5),
                     (socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, 2), (socket.IPPROTO_TCP, socket.TCP_KEEPCNT, 3)]


# Failing over: while members answer but cannot serve (an election after the leader died), the endpoints are
# tried again round after round, this long at most (etcd's default election timeout is 1 s; an election
# takes one or two), with this pause between rounds.
FAILOVER_ROUNDS_S = 3.0
FAILOVER_PAUSE_S = 0.05
# What etcd answers when it did not apply a request (raft never took it) ...
NOT_APPLIED_ERRORS = ("etcdserver: no leader", "raft proposal dropped", "etcdserver: too many requests",
                      "etcdserver: not capable")
# ... and when it gave up waiting for raft: the request may still be applied.
MAYBE_APPLIED_ERRORS = ("etcdserver: request timed out", "etcdserver: leader changed", "etcdserver: server stopped")
# A token etcd no longer takes (expired, the member restarted, users or roles changed since the login), or
# none: log in again and resend (etcd refuses these before applying anything).
TOKEN_ERRORS = ("invalid auth token", "revision of auth store is old", "user name is empty")
AUTH_PATH = "auth/authenticate"


class _NotApplied(Exception):
    """etcd did not apply the request: send it elsewhere. `down`: no connection or TLS session at all."""

    def __init__(self, message: str, down: bool = False):
        super().__init__(message)
        self.down = down


class _MaybeApplied(Exception):
    """The request went out and no answer says whether etcd applied it."""


class _TokenRefused(Exception):
    """etcd refused our token (TOKEN_ERRORS): log in again, then send the request again."""


class _Refused(Exception):
    """etcd answered with an error another member would give too (a bad request, a failed precondition)."""


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
    # A TLS member answers plain HTTP with a 400 and closes: the client sees the close, or a reset when it
    # was still sending (both seen here, from one run to the next).
    if tls is None and ("RemoteDisconnected" in text or "ConnectionResetError" in text):
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
                 tls: Tls | None = None, auth: Auth | None = None):
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
            from urllib3 import exceptions as urllib3_exc
        except ImportError as e:
            raise DbUnavailable(f"etcd state db: {e} (pip install 'srmig[etcd]')") from e
        self._requests = requests
        self._not_connected = (urllib3_exc.NewConnectionError, urllib3_exc.ConnectTimeoutError, urllib3_exc.SSLError)
        self.prefix = prefix
        self.timeout_s = timeout_s
        self.endpoints = list(endpoints)
        self.tls = tls
        self.auth = auth
        self.token: str | None = None   # etcd's token for `auth`, once logged in
        self._login_lock = threading.Lock()
        self._clients = []
        for u in urls:
            session = requests.Session()
            session.trust_env = False   # no HTTP proxy between us and etcd
            _use_tls(session, tls)
            self._clients.append(Etcd3Client(
                host=u.hostname, port=u.port or 2379, protocol=u.scheme, timeout=timeout_s,
                api_path=ETCD_API_PATH, session=session))
        self._current = 0               # the endpoint that answered last
        self._revision = 0              # the highest store revision an answer carried (see put)
        self._member_ids: list[str | None] = [None] * len(endpoints)   # etcd's id of each, once it answered
        self._lock = threading.Lock()
        self._watches: set[_EtcdWatch] = set()
        self._closed = False
        try:
            self._call("maintenance/status", {})    # needs no user: it says whether etcd answers at all
            if auth is not None:
                self.login()
        except BaseException:
            for c in self._clients:
                c.session.close()
            raise

    def login(self, stale: str | None = None) -> None:
        """Log in as `auth`: a token for every request after. `stale`: the token a request was refused with;
        when another thread has already replaced it, nothing to do. AuthFailed when etcd refuses the user or
        its password."""
        with self._login_lock:
            if stale is not None and self.token != stale:
                return
            try:
                r = self._call(AUTH_PATH, {"name": self.auth.user, "password": self.auth.password})
            except RuntimeError as e:
                if "authentication is not enabled" in str(e):
                    log.warning("state db: etcd's authentication is off: user %r has no effect, every client may "
                                "write every key (etcdctl auth enable)", self.auth.user)
                    self.token = None
                    return
                if "authentication failed" in str(e):
                    raise AuthFailed(f"etcd refused the login of user {self.auth.user!r}: wrong password or no "
                                     "such user (db.user, db.password_file)") from None
                raise
            self.token = r["token"]

    def deny(self, what: str) -> PermissionDenied:
        """etcd refused `what` as outside our user's roles: one error line, counted (Kv.denied)."""
        message = f"etcd refused {what} to user {self.auth.user if self.auth else '(none)'!r}: permission denied"
        with self._lock:
            self.denied += 1
            self.last_denied = message
        log.error("state db: %s", message)
        return PermissionDenied(message)

    def _key_of(self, payload: dict) -> str:
        """The (first) key a request names, relative to the prefix, for a message."""
        ops = [o.get("request_put") or o.get("request_range") or {} for o in payload.get("success", ())]
        for op in [payload, *ops]:
            if op.get("key"):
                key = base64.b64decode(op["key"]).decode(errors="replace")
                return key[len(self.prefix):] if key.startswith(self.prefix) else key
        return "(no key)"

    def _headers(self, path: str) -> dict | None:
        return {"Authorization": self.token} if self.token and path != AUTH_PATH else None

    def _post(self, idx: int, path: str, payload: dict) -> dict:
        """One POST to endpoint `idx`. Raises _NotApplied when etcd certainly did not apply it (no connection,
        no TLS session, or etcd said so), _MaybeApplied when it may have (the request was sent and no answer
        came, or etcd gave up waiting for raft), LeaseExpired, or RuntimeError for an answer that another
        endpoint would give too."""
        c = self._clients[idx]
        requests = self._requests
        try:
            resp = c.session.post(c.get_url(path), json=payload, timeout=self.timeout_s, headers=self._headers(path))
        except (requests.exceptions.ConnectTimeout, requests.exceptions.SSLError) as e:
            raise _NotApplied(_why(e, self.tls), down=True) from e
        except requests.exceptions.ReadTimeout as e:
            raise _MaybeApplied(f"no answer within {self.timeout_s} s") from e
        except requests.exceptions.ConnectionError as e:
            # urllib3 wraps a failed connect (refused, unreachable) in MaxRetryError; anything else (reset,
            # closed without an answer) came after the request went out
            reason = getattr(e.args[0], "reason", None) if e.args else None
            if isinstance(reason, self._not_connected):
                raise _NotApplied(_why(e, self.tls), down=True) from e
            raise _MaybeApplied(_why(e, self.tls)) from e
        if resp.status_code == 200:
            r = resp.json()
            header = r.get("header", {})
            self._revision = max(self._revision, int(header.get("revision", 0)))
            self._member_ids[idx] = header.get("member_id", self._member_ids[idx])
            return r
        try:
            body = resp.json()
            message = str(body.get("message") or body.get("error") or body)
        except ValueError:
            message = resp.text[:300]
        if any(m in message for m in TOKEN_ERRORS) and self.auth is not None and path != AUTH_PATH:
            raise _TokenRefused(message)
        if "permission denied" in message:
            raise self.deny(f"{path} {self._key_of(payload)}")
        if "lease not found" in message:
            raise LeaseExpired(f"etcd {self.endpoints[idx]}: lease has expired or was revoked "
                               "(requested lease not found)")
        if any(m in message for m in NOT_APPLIED_ERRORS):
            raise _NotApplied(message)
        if resp.status_code in (408, 503, 504) or any(m in message for m in MAYBE_APPLIED_ERRORS):
            raise _MaybeApplied(message)
        raise _Refused(message)

    def _call(self, path: str, payload: dict, finish=None, again=None):
        """POST to the endpoint that answered last, failing over to the others: the answer, through `finish`.

        A request etcd certainly did not apply goes to the next endpoint; so does one that may have been
        applied when it is a read (or repeating it changes nothing). A write that may have landed is sent
        again only as `again()` -> (path, payload, finish): a transaction that applies it only if it did not
        land (see put), so it lands exactly once. While a member answers but cannot serve (no leader yet,
        raft timed out) the endpoints are tried round after round for FAILOVER_ROUNDS_S; when none accepts a
        connection, DbUnavailable at once."""
        errors: dict[int, str] = {}
        down: set[int] = set()          # endpoints where nothing accepted a connection (this round)
        n = len(self._clients)
        first = idx = self._current
        deadline = None
        relogged = False
        while True:
            dead = {self._member_ids[i] for i in down} - {None}
            if dead and idx not in down:
                deadline = deadline or time.monotonic() + FAILOVER_ROUNDS_S
                self._await_leader(idx, dead, deadline)
            try:
                r = self._post(idx, path, payload)
            except _NotApplied as e:
                errors[idx] = str(e)
                (down.add if e.down else down.discard)(idx)
            except _MaybeApplied as e:
                errors[idx] = f"{e} (may have been applied)"
                down.discard(idx)
                if again is not None:
                    path, payload, finish = again()
                    again = None
            except _Refused as e:
                raise RuntimeError(f"etcd {self.endpoints[idx]} {path}: {e}") from None
            except _TokenRefused as e:
                if relogged:    # refused right after a login: not a stale token
                    raise RuntimeError(f"etcd {self.endpoints[idx]} {path}: {e}") from None
                relogged = True
                self.login(stale=self.token)
                continue        # the same endpoint again, with the new token
            else:
                if idx != first:
                    log.warning("state db: failed over from etcd %s (%s) to %s", self.endpoints[first],
                                errors.get(first, "?"), self.endpoints[idx])
                self._current = idx
                return finish(r) if finish else r
            idx = (idx + 1) % n
            if idx != first:
                continue
            # a round over every endpoint failed
            if len(down) == n:
                break       # nothing listens: no election to wait out
            deadline = deadline or time.monotonic() + FAILOVER_ROUNDS_S
            if time.monotonic() >= deadline:
                break
            time.sleep(FAILOVER_PAUSE_S)
        raise DbUnavailable("etcd unreachable: " + "; ".join(f"{self.endpoints[i]}: {errors[i]}"
                                                             for i in sorted(errors)))

    def _await_leader(self, idx: int, dead: set[str], deadline: float) -> None:
        """Before failing over to endpoint `idx` from members that died (`dead`, their etcd ids): while that
        member still names one of them its leader, or none, wait (its status is its own, no raft), until
        `deadline`. A request sent to it meanwhile would be forwarded to the dead leader and wait out our
        timeout (2 s) before it could be retried; this way it goes once the election is over (~0.5 s)."""
        while True:
            try:
                lead = self._post(idx, "maintenance/status", {}).get("leader", "0")
            except (_NotApplied, _MaybeApplied, _Refused):
                return          # the request itself will find out
            if lead not in dead and lead != "0" or time.monotonic() >= deadline:
                return
            time.sleep(FAILOVER_PAUSE_S)

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
        seen = self._revision
        req = self._put_request(key, value, lease)

        def again():
            # Ours landed if the key holds our value and lease, written after the last revision we had seen
            # when we sent it: then read it, else put it now. A write in raft's log before this one is applied
            # first, so an attempt that is still to land lands before this check.
            txn = {"compare": self._ours(key, value, lease, seen), "success": [{"request_range": {"key": req["key"]}}],
                   "failure": [{"request_put": req}]}

            def finish(r: dict) -> int:
                if r.get("succeeded"):
                    return int(r["responses"][0]["response_range"]["kvs"][0]["mod_revision"])
                return int(r["header"]["revision"])
            return "kv/txn", txn, finish

        return self._call("kv/put", req, lambda r: int(r["header"]["revision"]), again)

    def _ours(self, key: str, value: dict, lease: Lease | None, seen: int) -> list[dict]:
        """Compares that hold when `key` has `value` and `lease`, put after revision `seen`."""
        k = _b64(self._full(key))
        return [{"key": k, "result": "EQUAL", "target": "VALUE", "value": _b64(_encode_value(value))},
                {"key": k, "result": "EQUAL", "target": "LEASE", "lease": str(lease.id if lease else 0)},
                {"key": k, "result": "GREATER", "target": "MOD", "mod_revision": str(seen)}]

    def put_if(self, key: str, value: dict, mod_revision: int, lease: Lease | None = None) -> bool:
        _check_key(key)
        seen = self._revision
        # a missing key compares as mod_revision 0, so one comparison covers create-only too
        compare = [{"key": _b64(self._full(key)), "result": "EQUAL", "target": "MOD",
                    "mod_revision": str(mod_revision)}]
        put = [{"request_put": self._put_request(key, value, lease)}]

        def again():
            # the same swap, but when it fails read the key: our first attempt may be why it fails
            txn = {"compare": compare, "success": put, "failure": [{"request_range": {"key": _b64(self._full(key))}}]}

            def finish(r: dict) -> bool:
                if r.get("succeeded"):
                    return True
                kvs = r["responses"][0]["response_range"].get("kvs") or [{}]
                return (kvs[0].get("value") == _b64(_encode_value(value)) and int(kvs[0].get("mod_revision", 0)) > seen
                        and int(kvs[0].get("lease", 0)) == (lease.id if lease else 0))
            return "kv/txn", txn, finish

        txn = {"compare": compare, "success": put, "failure": []}
        return self._call("kv/txn", txn, lambda r: bool(r.get("succeeded", False)), again)  # false is omitted

    def delete(self, key: str) -> bool:
        """After an attempt that may have been applied, True says only that the retry deleted the key (a key
        the first attempt deleted reads as absent: False)."""
        _check_key(key)
        return self._call("kv/deleterange", {"key": _b64(self._full(key))}, lambda r: int(r.get("deleted", 0)) > 0)

    def lease(self, ttl_s: float) -> Lease:
        if ttl_s <= 0:
            raise ValueError(f"lease TTL must be positive, got {ttl_s}")
        # Our own ID (etcd takes one from the client): a grant repeated after an attempt that may have landed
        # then finds it and says so, where an ID of etcd's choosing would leave a second lease behind.
        req = {"TTL": math.ceil(ttl_s), "ID": str(random.getrandbits(62) + 1)}
        repeated = []

        def again():
            repeated.append(True)
            return "lease/grant", req, None
        try:
            r = self._call("lease/grant", req, again=again)
        except RuntimeError as e:
            if not (repeated and "lease already exists" in str(e)):
                raise
            r = self._call("kv/lease/timetolive", {"ID": req["ID"]})
            return _EtcdLease(self, int(req["ID"]), float(r["grantedTTL"]))
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
        self._token: str | None = None      # the token the current stream was opened with
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
        relogged = False            # a login since the last stream etcd accepted: the next refusal waits
        try:
            while not self._cancelled.is_set():
                endpoint = self._kv.endpoints[idx]
                denied = False
                try:
                    if self._stream(idx):
                        backoff, relogged = BACKOFF_MIN_S, False
                    why = "stream ended"
                except _Compacted as c:
                    self._resync(self._kv, c.revision)
                    continue
                except PermissionDenied as e:
                    # outside our roles: said (one line) and counted by deny(); tried again in case they change
                    why, denied = str(e), True
                except Exception as e:
                    why = _why(e, self._kv.tls)
                    if self._kv.auth is not None and any(m in why for m in TOKEN_ERRORS) and not relogged:
                        relogged = True
                        try:
                            self._kv.login(stale=self._token)
                            continue        # at once, with the new token
                        except Exception as le:  # noqa: BLE001 - the loop's backoff and log line
                            why = f"{why}; login again: {le}"
                if self._cancelled.is_set():
                    break
                # the next endpoint: a member that died takes the watch elsewhere; it resumes there from the
                # revision after the last one delivered (revisions are the cluster's, the same on every member)
                idx = (idx + 1) % len(self._kv.endpoints)
                (log.debug if denied else log.warning)(
                    "state db watch %r on %s: %s; reconnecting from revision %d in %.2f s to %s",
                    self.prefix, endpoint, why, self.last_revision + 1, backoff, self._kv.endpoints[idx])
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
        self._token = self._kv.token
        resp = self._session.post(client.get_url("watch"), json=req, stream=True,
                                  timeout=(self._kv.timeout_s, None), headers=self._kv._headers("watch"))
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
            if "permission denied" in res.get("cancel_reason", ""):
                raise self._kv.deny(f"watch {self.prefix}")
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
