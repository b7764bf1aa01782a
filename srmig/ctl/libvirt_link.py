"""The agent's libvirt connection: event loop registered first, keepalive, close callback, reconnect with
backoff. Callbacks only enqueue (the agent's one worker applies, srmig.ctl.work); after every (re)connect the
worker reconciles, so whatever happened while we were away is caught up from the domains' states.

Also what the agent reads of a domain: its srmig metadata and tap (Domain), and QEMU's virtio-net RX ring
through the monitor passthrough (rx_used: the swallowed-frame baseline).

One callback does not enqueue: QEMU's own STOP event (libvirt_qemu's monitor events), which carries QEMU's
timestamp. libvirt's lifecycle events carry none, and an agent starved of CPU heard SUSPENDED up to 186 ms
after QEMU had stopped reading its tap; the source's drain needs the real moment (qemu_stopped_ns)."""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from srmig.ctl import records
from srmig.ctl.libvirt_events import ensure_event_loop, lifecycle_names
from srmig.ctl.work import Iteration, JobCompleted, Lifecycle, LibvirtDown, LibvirtUp

log = logging.getLogger("srmig.libvirt")
KEEPALIVE = (5, 3)          # interval (s), missed replies before the connection is declared dead
QEMU_STOP_MAX_AGE_NS = 10_000_000_000  # a QEMU STOP this much older than the SUSPENDED heard is another pause
BACKOFF = (0.2, 10.0)       # first and longest retry delay (s)
XMLNS = records.XMLNS


@dataclass
class Domain:
    """What the agent needs from a libvirt domain's XML. A VM is a set of addresses (docs/design.md, "A VM is
    a set of addresses"): its id, the key of everything srmig does (map entry, vms/<vm>, migrations/<host>/<vm>),
    is the first address its metadata lists; `addresses` are all of them, the id first."""

    name: str
    vm: str            # the VM's id: its first address
    tap: str | None
    addresses: tuple[str, ...] = ()  # all of them, the id first (empty: just the id)

    def __post_init__(self):
        if not self.addresses:
            self.addresses = (self.vm,)

    @classmethod
    def parse(cls, xml: str) -> Domain | None:
        """None when the domain is not managed by srmig (no <srmig:vm><address> in its metadata);
        srmig.ctl.records.Rejected (one line) when the XML or its srmig metadata is malformed."""
        parsed = records.domain(xml)
        return None if parsed is None else cls(*parsed)

    @classmethod
    def from_xml(cls, xml: str, name: str | None = None,
                 on_reject: Callable[[str | None, str], None] | None = None) -> Domain | None:
        """As parse(), but a malformed document is logged (one line, with the domain's name when it has one),
        counted, and read as not managed: one bad domain must not stop the others being read (reconciliation
        read none after an address it could not parse; lifecycle events). `on_reject(name, why)`: the
        domain's status entry (`name`: libvirt's name of it, when the caller has it)."""
        try:
            return cls.parse(xml)
        except records.Rejected as e:
            records.reject("domain_xml", "domain XML" if name is None else f"domain {name}", e)
            if on_reject is not None:
                on_reject(name, str(e))
            return None


def metadata_xml(*addresses: str) -> str:
    """The metadata element that makes srmig manage a domain (goes inside <metadata>): one <srmig:address>
    per address of the VM, IPv6 or IPv4, the first its id."""
    return (f"<srmig:vm xmlns:srmig='{XMLNS}'>"
            + "".join(f"<srmig:address>{a}</srmig:address>" for a in addresses) + "</srmig:vm>")


def _qmp(dom, cmd: str, **args):
    """One QMP command through libvirt's QEMU monitor passthrough."""
    import libvirt_qemu  # noqa: PLC0415

    req = {"execute": cmd, "arguments": args} if args else {"execute": cmd}
    return json.loads(libvirt_qemu.qemuMonitorCommand(dom, json.dumps(req), 0))["return"]


def _virtio_net_path(dom) -> str:
    return next(d["path"] for d in _qmp(dom, "x-query-virtio") if d.get("name") == "virtio-net")


def _rx_used_idx(dom, path: str) -> int:
    """The virtio-net RX used index (QMP x-query-virtio-queue-status)."""
    return _qmp(dom, "x-query-virtio-queue-status", path=path, queue=0)["used-idx"]


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
        self.qemu_stops: dict[str, int] = {}  # domain name -> its QEMU's last STOP, time.monotonic_ns() clock
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
            self.enqueue(LibvirtUp(conn))
            while not self._closed.wait(0.5):
                if self._stop.is_set():
                    break
                if not conn.isAlive():
                    break
            self.conn = None
            for deregister in ids:
                try:
                    deregister()
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
                self.enqueue(LibvirtDown("connection closed"))
                self._stop.wait(delay)

    def domain(self, name: str, on_reject=None) -> Domain | None | bool:
        """`name`'s Domain read now; None: not managed by srmig (`on_reject(name, why)` when that is because
        its XML or metadata is malformed); False: cannot tell (not connected, or the domain went)."""
        conn = self.conn
        if conn is None:
            return False
        try:
            xml = conn.lookupByName(name).XMLDesc(0)
        except Exception as e:  # noqa: BLE001 - gone already
            log.debug("%s: no XML (%s)", name, e)
            return False
        return Domain.from_xml(xml, name, on_reject)

    def running(self, domain: str) -> bool | None:
        """Whether `domain` runs here (libvirt's RUNNING); None: cannot tell (not connected, gone)."""
        import libvirt  # noqa: PLC0415

        conn = self.conn
        if conn is None:
            return None
        try:
            return conn.lookupByName(domain).state()[0] == libvirt.VIR_DOMAIN_RUNNING
        except Exception as e:  # noqa: BLE001 - gone, or libvirtd going
            log.debug("%s: no state (%s)", domain, e)
            return None

    def suspend(self, domain: str) -> None:
        """Pause `domain` (virDomainSuspend); raises if libvirt refuses or is not connected."""
        self._dom(domain).suspend()

    def destroy(self, domain: str) -> None:
        """End `domain`'s QEMU (virDomainDestroy); raises if libvirt refuses or is not connected."""
        self._dom(domain).destroy()

    def _dom(self, domain: str):
        conn = self.conn
        if conn is None:
            raise RuntimeError("libvirt not connected")
        return conn.lookupByName(domain)

    def rx_used(self, domain: str) -> Callable[[], int]:
        """A counter of the frames `domain`'s QEMU took from its tap into the guest's RX ring (QMP), read
        on the connection of the moment: libvirtd may restart between two reads."""
        cache = {}

        def read() -> int:
            c = self.conn
            if c is None:
                raise RuntimeError("libvirt not connected")
            if cache.get("conn") is not c:
                dom = c.lookupByName(domain)
                cache.update(conn=c, dom=dom, path=_virtio_net_path(dom))
            return _rx_used_idx(cache["dom"], cache["path"])
        return read

    def qemu_stopped_ns(self, domain: str, heard_ns: int) -> int | None:
        """When `domain`'s QEMU stopped (time.monotonic_ns), for the SUSPENDED event heard at `heard_ns`;
        None if QEMU's STOP of that pause did not reach us (no monitor events: another driver, or a STOP
        from an earlier pause)."""
        t = self.qemu_stops.get(domain)
        if t is None or not heard_ns - QEMU_STOP_MAX_AGE_NS <= t <= heard_ns:
            return None
        return t

    def _register_qemu_stop(self, conn) -> list:
        """QEMU's STOP events with QEMU's timestamp (wall clock, microseconds), kept on the monotonic clock.
        libvirt passes a monitor event on before the lifecycle event it causes, so the STOP is recorded by
        the time SUSPENDED is heard (tests/test_libvirt_events.py checks it)."""
        import libvirt  # noqa: PLC0415

        def stop(_c, dom, _event, seconds, micros, _details, _o):
            wall_ns = seconds * 1_000_000_000 + micros * 1000
            self.qemu_stops[dom.name()] = wall_ns - (time.time_ns() - time.monotonic_ns())

        try:
            import libvirt_qemu  # noqa: PLC0415

            cb = libvirt_qemu.qemuMonitorEventRegister(conn, None, "STOP", stop, None, 0)
        except (ImportError, libvirt.libvirtError) as e:  # not the QEMU driver (test:///)
            log.debug("no QEMU monitor events: %s", e)
            return []
        return [lambda: libvirt_qemu.qemuMonitorEventDeregister(conn, cb)]

    def _register(self, conn) -> list:
        """Registers the callbacks; returns how to deregister each."""
        import libvirt  # noqa: PLC0415

        def lifecycle(_c, dom, typ, detail, _o):
            t, d = lifecycle_names(typ, detail)
            self.enqueue(Lifecycle(dom.name(), t, d, time.monotonic_ns()))

        def job(_c, dom, params, _o):
            self.enqueue(JobCompleted(dom.name(), dict(params), time.monotonic_ns()))

        def iteration(_c, dom, it, _o):
            self.enqueue(Iteration(dom.name(), it, time.monotonic_ns()))

        def closed(_c, reason, _o):
            self._closed.set()

        try:
            conn.setKeepAlive(*KEEPALIVE)
        except libvirt.libvirtError as e:  # local drivers (test:///) have no keepalive
            log.debug("no keepalive: %s", e)
        conn.registerCloseCallback(closed, None)
        ids = [conn.domainEventRegisterAny(None, libvirt.VIR_DOMAIN_EVENT_ID_LIFECYCLE, lifecycle, None),
               conn.domainEventRegisterAny(None, libvirt.VIR_DOMAIN_EVENT_ID_JOB_COMPLETED, job, None),
               conn.domainEventRegisterAny(None, libvirt.VIR_DOMAIN_EVENT_ID_MIGRATION_ITERATION, iteration,
                                           None)]
        return [*self._register_qemu_stop(conn),
                *[lambda cb=cb: conn.domainEventDeregisterAny(cb) for cb in ids]]

    def close(self) -> None:
        self._stop.set()
        self._closed.set()
        self._thread.join(5)
