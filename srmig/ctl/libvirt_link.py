"""The agent's libvirt connection: event loop registered first, keepalive, close callback, reconnect with
backoff. Callbacks only enqueue (the agent's one worker applies); after every (re)connect the worker
reconciles, so whatever happened while we were away is caught up from the domains' states."""

from __future__ import annotations

import logging
import threading
import time

from srmig.ctl.libvirt_events import ensure_event_loop, lifecycle_names

log = logging.getLogger("srmig.libvirt")
KEEPALIVE = (5, 3)          # interval (s), missed replies before the connection is declared dead
BACKOFF = (0.2, 10.0)       # first and longest retry delay (s)


class LibvirtLink:
    def __init__(self, uri: str, enqueue, factory=None):
        self.uri = uri
        self.enqueue = enqueue
        self.factory = factory
        self.conn = None
        self.state = "connecting"
        self.error: str | None = None
        self.retry_in: float | None = None
        self.connects = 0
        self._closed = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="libvirt-link", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def status(self) -> dict:
        return {"uri": self.uri, "state": self.state, "error": self.error, "retry_in_s": self.retry_in,
                "connects": self.connects}

    def _open(self):
        import libvirt  # noqa: PLC0415

        if self.factory is not None:
            return self.factory(self.uri)
        ensure_event_loop()  # before the connection: its events are dispatched by this loop
        libvirt.registerErrorHandler(lambda _ctx, _err: None, None)  # errors are raised; no stderr noise
        return libvirt.open(self.uri)

    def _run(self) -> None:
        import libvirt  # noqa: PLC0415

        delay = BACKOFF[0]
        while not self._stop.is_set():
            try:
                conn = self._open()
            except libvirt.libvirtError as e:
                self.state, self.error, self.retry_in = "unreachable", str(e).strip(), round(delay, 1)
                log.warning("libvirt %s unreachable: %s; retrying in %.1f s", self.uri, self.error, delay)
                self._stop.wait(delay)
                delay = min(delay * 2, BACKOFF[1])
                continue
            delay = BACKOFF[0]
            self._closed.clear()
            ids = self._register(conn)
            self.conn = conn
            self.connects += 1
            self.state, self.error, self.retry_in = "connected", None, None
            self.enqueue("libvirt-up", conn)
            while not self._closed.wait(0.5):
                if self._stop.is_set():
                    break
                if not conn.isAlive():
                    break
            self.conn = None
            for cb in ids:
                try:
                    conn.domainEventDeregisterAny(cb)
                except libvirt.libvirtError:
                    pass
            try:
                conn.unregisterCloseCallback()
            except libvirt.libvirtError:
                pass
            try:
                conn.close()
            except libvirt.libvirtError:
                pass
            if not self._stop.is_set():
                self.state, self.error = "reconnecting", "connection closed"
                self.enqueue("libvirt-down", "connection closed")
                self._stop.wait(delay)

    def _register(self, conn) -> list[int]:
        import libvirt  # noqa: PLC0415

        def lifecycle(_c, dom, typ, detail, _o):
            t, d = lifecycle_names(typ, detail)
            self.enqueue("lifecycle", dom.name(), t, d, time.monotonic_ns())

        def job(_c, dom, params, _o):
            self.enqueue("job-completed", dom.name(), dict(params), time.monotonic_ns())

        def iteration(_c, dom, it, _o):
            self.enqueue("iteration", dom.name(), it, time.monotonic_ns())

        def closed(_c, reason, _o):
            self._closed.set()

        try:
            conn.setKeepAlive(*KEEPALIVE)
        except libvirt.libvirtError as e:  # local drivers (test:///) have no keepalive
            log.debug("no keepalive: %s", e)
        conn.registerCloseCallback(closed, None)
        return [conn.domainEventRegisterAny(None, libvirt.VIR_DOMAIN_EVENT_ID_LIFECYCLE, lifecycle, None),
                conn.domainEventRegisterAny(None, libvirt.VIR_DOMAIN_EVENT_ID_JOB_COMPLETED, job, None),
                conn.domainEventRegisterAny(None, libvirt.VIR_DOMAIN_EVENT_ID_MIGRATION_ITERATION, iteration,
                                            None)]

    def close(self) -> None:
        self._stop.set()
        self._closed.set()
        self._thread.join(5)
