"""libvirt domain events -> srmig.ctl.machine events.

`translate(role, event)` is pure: it reads one recorded event (a dict, as below) seen on the daemon of
`role` ("S": the migration's source, "D": its destination) and returns the machine event it means, or None.

    {"daemon": "S"|"D", "t": 1.234, "event": "lifecycle", "type": "SUSPENDED", "detail": "MIGRATED"}
    {"daemon": "S", "t": ..., "event": "job-completed", "type": "COMPLETED", "detail": "MIGRATION_OUT",
     "params": {...}}                      # libvirt only emits it for a successful job
    {"daemon": "S", "t": ..., "event": "migration-iteration", "type": "ITERATION", "detail": "2"}
    {"daemon": "S", "t": ..., "event": "job-failed", "type": "FAILED"|"CANCELLED", "detail": "..."}
        # not a libvirt event: what an agent concludes when the migration call fails (see below)

Mapping (docs/design.md, "Phases"):
| role | event | -> |
|---|---|---|
| D | STARTED/MIGRATED (the incoming QEMU is up)                    | BEGIN |
| S | SUSPENDED/MIGRATED (pre-copy stop-and-copy), SUSPENDED/POSTCOPY | SUSPENDED |
| D | RESUMED/MIGRATED, RESUMED/POSTCOPY                               | RESUMED |
| S | STOPPED/MIGRATED                                                | STOPPED |
| S | RESUMED with any detail: the source runs again, the migration is over without it moving | FAILED |
| D | STOPPED with any detail but MIGRATED (FAILED, DESTROYED, ...): the incoming side died | FAILED |
| S/D | job-failed (FAILED / CANCELLED)                               | FAILED |
| any | everything else (iterations, job-completed, DEFINED, SUSPENDED/PAUSED, ...) | None |

What libvirt 9.0 (Debian 12, QEMU 7.2 TCG, peer-to-peer) really emits, recorded in
tests/fixtures/libvirt/*.json (python -m srmig.testbed.libvirtd record), times from the migrate call:
- pre-copy:  D STARTED/MIGRATED 0.31, S iterations 1, 2, S SUSPENDED/MIGRATED 0.55, S iteration 3,
  D RESUMED/MIGRATED 0.58, S STOPPED/MIGRATED 0.80, S job-completed (downtime 29-74 ms) 0.80.
- post-copy: D STARTED/MIGRATED, S SUSPENDED/MIGRATED *then* S SUSPENDED/POSTCOPY (5 ms apart),
  D RESUMED/POSTCOPY, later D RESUMED/MIGRATED (at the end of post-copy), S STOPPED/MIGRATED, job-completed.
  Both pairs are duplicates for the machine (a phase never goes backwards).
- abortJob during pre-copy (source never paused): *nothing* on the source (no lifecycle event, no
  job-completed: libvirt emits that event only for success); only D STOPPED/FAILED, 0.2-0.5 s after the
  abort. That is why D's STOPPED maps to FAILED; an agent that starts the migration itself should also turn
  the error of its migrate call into a "job-failed" record (EventRecorder.note), which maps to FAILED too.
- the destination QEMU killed during stop-and-copy: S SUSPENDED/MIGRATED, S RESUMED/UNPAUSED (~10 ms later),
  D STOPPED/FAILED (~0.2 s later). On S every RESUMED means "back on S", whatever the detail.
- the destination never emits job-completed; migration-iteration comes from the source only.

`EventRecorder` (needs libvirt-python) registers lifecycle, job-completed and migration-iteration callbacks on
any number of connections; callbacks only enqueue, stamped with time.monotonic().
"""

from __future__ import annotations

import queue
import threading
import time

from srmig.ctl.machine import Ev

LIFECYCLE_TYPES = ["DEFINED", "UNDEFINED", "STARTED", "SUSPENDED", "RESUMED", "STOPPED", "SHUTDOWN",
                   "PMSUSPENDED", "CRASHED"]
JOB_TYPES = ["NONE", "BOUNDED", "UNBOUNDED", "COMPLETED", "FAILED", "CANCELLED"]


def translate(role: str, event: dict) -> Ev | None:
    """The machine event that one libvirt event on the daemon of `role` ("S" or "D") means, or None."""
    kind, typ, detail = event.get("event"), event.get("type"), event.get("detail")
    if kind == "job-failed":
        return Ev.FAILED
    if kind != "lifecycle":
        return None
    if role == "S":
        if typ == "SUSPENDED" and detail in ("MIGRATED", "POSTCOPY"):
            return Ev.SUSPENDED
        if typ == "STOPPED" and detail == "MIGRATED":
            return Ev.STOPPED
        if typ == "RESUMED":
            return Ev.FAILED
        return None
    if role == "D":
        if typ == "STARTED" and detail == "MIGRATED":
            return Ev.BEGIN
        if typ == "RESUMED" and detail in ("MIGRATED", "POSTCOPY"):
            return Ev.RESUMED
        if typ == "STOPPED" and detail != "MIGRATED":
            return Ev.FAILED
        return None
    raise ValueError(f"role must be 'S' or 'D', not {role!r}")


# --- recording (libvirt-python) -----------------------------------------------------------------------

_loop_lock = threading.Lock()
_loop_thread: threading.Thread | None = None


def ensure_event_loop() -> None:
    """Register libvirt's default event loop implementation and run it in a daemon thread, once per process.
    Must happen BEFORE the connections whose events are wanted are opened."""
    global _loop_thread
    import libvirt  # noqa: PLC0415

    with _loop_lock:
        if _loop_thread is not None:
            return
        libvirt.virEventRegisterDefaultImpl()

        def run():
            while True:
                libvirt.virEventRunDefaultImpl()
        _loop_thread = threading.Thread(target=run, daemon=True, name="libvirt-event-loop")
        _loop_thread.start()


def _names(prefix: str) -> dict[int, str]:
    """{value: suffix} of libvirt's constants PREFIX<SUFFIX>, e.g. VIR_DOMAIN_EVENT_SUSPENDED_<...>."""
    import libvirt  # noqa: PLC0415

    out = {}
    for n in dir(libvirt):
        if n.startswith(prefix) and n[len(prefix):].isupper():
            v = getattr(libvirt, n)
            if isinstance(v, int) and not n.endswith("_LAST"):
                out.setdefault(v, n[len(prefix):])
    return out


def lifecycle_names(typ: int, detail: int) -> tuple[str, str]:
    """(type, detail) names of a lifecycle event, e.g. (3, 1) -> ("SUSPENDED", "MIGRATED")."""
    t = LIFECYCLE_TYPES[typ] if 0 <= typ < len(LIFECYCLE_TYPES) else str(typ)
    d = _names(f"VIR_DOMAIN_EVENT_{t}_").get(detail, str(detail))
    return t, d


class EventRecorder:
    """Records domain events of several daemons into one queue: lifecycle, job-completed and
    migration-iteration, each stamped with time.monotonic() on arrival. Use as a context manager, or call
    close(); the event loop must be registered (ensure_event_loop) before the connections were opened."""

    def __init__(self, t0: float | None = None):
        self.t0 = time.monotonic() if t0 is None else t0
        self.queue: queue.Queue = queue.Queue()
        self.events: list[dict] = []      # drained from the queue by poll()/wait()
        self._registered: list[tuple[object, int]] = []

    def watch(self, role: str, conn) -> None:
        import libvirt  # noqa: PLC0415

        def lifecycle(_conn, dom, typ, detail, _opaque):
            self.queue.put((time.monotonic(), role, dom.name(), "lifecycle", typ, detail, None))

        def job(_conn, dom, params, _opaque):
            self.queue.put((time.monotonic(), role, dom.name(), "job-completed", None, None, dict(params)))

        def iteration(_conn, dom, it, _opaque):
            self.queue.put((time.monotonic(), role, dom.name(), "migration-iteration", None, it, None))

        for ev_id, cb in ((libvirt.VIR_DOMAIN_EVENT_ID_LIFECYCLE, lifecycle),
                          (libvirt.VIR_DOMAIN_EVENT_ID_JOB_COMPLETED, job),
                          (libvirt.VIR_DOMAIN_EVENT_ID_MIGRATION_ITERATION, iteration)):
            self._registered.append((conn, conn.domainEventRegisterAny(None, ev_id, cb, None)))

    def _decode(self, item) -> dict:
        t, role, dom, kind, typ, detail, params = item
        ev = {"daemon": role, "t": round(t - self.t0, 4), "event": kind}
        if kind == "lifecycle":
            ev["type"], ev["detail"] = lifecycle_names(typ, detail)
        elif kind == "job-completed":
            ops = _names("VIR_DOMAIN_JOB_OPERATION_")
            ev["type"] = "COMPLETED"
            ev["detail"] = ops.get(params.get("operation", -1), str(params.get("operation")))
            keep = ("time_elapsed", "downtime", "downtime_net", "setup_time", "memory_iteration",
                    "memory_total", "memory_processed", "memory_postcopy_requests")
            ev["params"] = {k: params[k] for k in keep if k in params}
        else:
            ev["type"], ev["detail"] = "ITERATION", str(detail)
        ev["domain"] = dom
        return ev

    def note(self, role: str, kind: str, typ: str, detail: str = "") -> dict:
        """Add a record of our own (e.g. kind "job-failed" when the migration call failed)."""
        ev = {"daemon": role, "t": round(time.monotonic() - self.t0, 4), "event": kind, "type": typ,
              "detail": detail}
        self.poll()
        self.events.append(ev)
        return ev

    def poll(self) -> list[dict]:
        """Decode everything queued so far; returns the new records."""
        new = []
        while True:
            try:
                new.append(self._decode(self.queue.get_nowait()))
            except queue.Empty:
                break
        self.events += new
        return new

    def wait(self, pred, timeout: float) -> dict:
        """The first record (already seen or arriving within `timeout` s) for which pred(record) is true."""
        deadline = time.monotonic() + timeout
        idx = 0
        while True:
            self.poll()
            while idx < len(self.events):
                if pred(self.events[idx]):
                    return self.events[idx]
                idx += 1
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"no matching event in {timeout} s; got {self.events}")
            try:
                self.events.append(self._decode(self.queue.get(timeout=min(left, 0.2))))
            except queue.Empty:
                pass

    def close(self) -> None:
        for conn, cb_id in self._registered:
            try:
                conn.domainEventDeregisterAny(cb_id)
            except Exception:  # noqa: BLE001 - connection may already be gone
                pass
        self._registered.clear()
        self.poll()

    def __enter__(self) -> EventRecorder:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
