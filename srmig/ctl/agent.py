"""The srmig agent: one per hypervisor (host role, srmig.ctl.host_role) and/or ingress (ingress role,
srmig.ctl.ingress_role).

Threads, and who may touch what:
- libvirt's event loop (registered before any connection) runs the callbacks, which only enqueue;
- the libvirt link thread connects, keeps alive and reconnects with backoff (srmig.ctl.libvirt_link);
- the state database's watch threads only enqueue; its writer thread and lease (srmig.ctl.dblink);
- the hook server's threads enqueue a request and wait for its answer (never call libvirt);
- ONE worker (`Agent.run`) applies everything: the state machine (srmig.ctl.machine), the host's actions
  (srmig.ctl.executor), the database writes. So the order of events is the order of effects. What it is
  asked is typed (srmig.ctl.work); `handlers` says which method applies each type.
"""

from __future__ import annotations

import logging
import queue
import threading

from srmig.ctl import fdstore, reconcile, work
from srmig.ctl.config import Config
from srmig.ctl.dblink import DbLink
from srmig.ctl.host_role import HostRole
from srmig.ctl.libvirt_link import Domain, metadata_xml
from srmig.ctl.statedb import PermissionDenied
from srmig.ctl.status import agent_status

log = logging.getLogger("srmig.agent")


class Agent:
    def __init__(self, cfg: Config, kv_factory=None, libvirt_factory=None):
        self.cfg = cfg
        self.name = cfg.name
        self.q: queue.Queue = queue.Queue()
        self.stopping = threading.Event()
        self.dbl = DbLink(cfg, self.enqueue, self.stopping, kv_factory)
        self.dbl.on_lease = self._on_lease
        self.host = HostRole(cfg, self.dbl, self.enqueue, self.later, self.stopping, libvirt_factory) \
            if cfg.host else None
        self.ingress = None                          # IngressRole, once the database answers
        self.metrics = None
        self.hook_server = None
        self.handlers = {work.DbUp: self._on_db_up, work.Status: self._on_status, work.Call: self._on_call,
                         work.Noop: lambda item: item.result.set_result(None)}
        if h := self.host:
            self.handlers |= {
                work.DbMigrations: h.on_db_migrations, work.LibvirtUp: h.on_libvirt_up,
                work.LibvirtDown: h.on_libvirt_down, work.Lifecycle: h.on_lifecycle,
                work.Iteration: h.on_iteration, work.JobCompleted: h.on_job_completed,
                work.SourceCheck: h.on_source_check, work.GraceOver: h.on_grace_over,
                work.HookBegin: h.on_hook_begin,
                work.Recheck: lambda item: reconcile.recheck(h, item),
                work.Forget: lambda item: reconcile.forget(h, item)}

    @property
    def dp(self):
        """This host's maps (srmig.ctl.maps.Dataplane); None without a host role or before they are loaded."""
        return self.host.dp if self.host else None

    @property
    def db(self):
        return self.dbl.db

    def enqueue(self, item: work.Item) -> None:
        self.q.put(item)

    def later(self, seconds: float, item: work.Item) -> None:
        """Queue `item` for the worker `seconds` from now (a daemon timer: it does not hold the agent up)."""
        t = threading.Timer(seconds, self.enqueue, (item,))
        t.daemon = True
        t.start()

    def call(self, item: work.HookBegin | work.Status | work.Noop, timeout: float = 10.0):
        """Apply `item` on the worker and wait for its result (hook and status requests)."""
        self.q.put(item)
        return item.result.result(timeout)

    def start(self) -> None:
        """Everything but the worker: dataplane, servers, connections (each retried in the background)."""
        if self.host:
            self.host.load_dataplane(self._fd_store())
        from srmig.ctl import hooksrv  # noqa: PLC0415

        self.hook_server = hooksrv.serve(self, self.cfg.hook.socket)
        if self.cfg.metrics_listen:
            from srmig.ctl import metrics  # noqa: PLC0415

            self.metrics = metrics.serve(self, self.cfg.metrics_listen)
            if self.host:
                self.host.metrics = self.metrics
        self.dbl.start()

    def _fd_store(self) -> fdstore.FdStore:
        """Where the taps' kept fds outlive us: systemd's store, else a keeper next to the hook socket,
        started now (not on the hook's path) and asked what it still holds of a previous life."""
        store = fdstore.for_agent(fdstore.keeper_socket(self.cfg.hook.socket))
        if isinstance(store, fdstore.KeeperStore):
            try:
                if held := store.names():
                    log.info("fd keeper (pid %d) still holds %s", store.keeper_pid(), ", ".join(held))
            except OSError as e:
                log.warning("no fd keeper (%s): a paused QEMU's tap queue dies with this agent", e)
                return fdstore.NoStore()
        return store

    def run(self) -> None:
        """The worker: applies queued items until stop()."""
        while True:
            try:
                # Bounded: a SIGTERM the kernel hands to another thread only sets CPython's flag, which the
                # main thread acts on once it runs again; a wait without timeout would never.
                item = self.q.get(timeout=0.5)
            except queue.Empty:
                continue
            if isinstance(item, work.Stop):
                break
            handler = self.handlers.get(type(item))
            try:
                if handler is None:
                    raise TypeError(f"no handler for {type(item).__name__} (roles: {', '.join(self.roles())})")
                handler(item)
            except Exception as e:  # noqa: BLE001 - one bad item must not stop the agent
                if isinstance(e, PermissionDenied):  # said in one line where etcd refused it, and counted
                    log.debug("handling %s stopped: %s", type(item).__name__, e)
                else:
                    log.exception("handling %s failed", type(item).__name__)
                fut = getattr(item, "result", None)
                if fut is not None and not fut.done():
                    fut.set_exception(e)
            if self.host:
                self.host.done_with_item()

    def stop(self) -> None:
        self.stopping.set()
        self.enqueue(work.Stop())

    def close(self) -> None:
        """Release resources; the dataplane stays (the program keeps forwarding while no agent runs)."""
        self.stopping.set()
        if self.host:
            self.host.close()
        if self.ingress:
            self.ingress.close()
        if self.hook_server:
            self.hook_server.close()
        if self.metrics:
            self.metrics.close()
        self.dbl.close()

    def roles(self) -> list[str]:
        return [r for r in ("host", "ingress") if getattr(self.cfg, r)]

    def _on_db_up(self, item: work.DbUp) -> None:
        self.dbl.up(item.kv)
        if self.host:
            self.host.db_up(item.kv)
        if self.cfg.ingress:
            from srmig.ctl.ingress_role import IngressRole  # noqa: PLC0415

            self.ingress = IngressRole(self.cfg.ingress, item.kv, self.dbl.lease)
            self.ingress.start()

    def _on_lease(self, lease) -> None:
        """A new lease after the old one expired: an ingress registers again with it (migrations wait for the
        acks of the registered ingresses). On a thread of the database link."""
        if self.ingress is not None:
            self.ingress.lease = lease
            self.db.register_ingress(self.cfg.ingress.name, lease)

    def _on_call(self, item: work.Call) -> None:
        item.fn(*item.args)

    def _on_status(self, item: work.Status) -> None:
        item.result.set_result(agent_status(self))


def run(cfg: Config) -> int:
    """`srmig agent`: run until SIGTERM/SIGINT."""
    import signal  # noqa: PLC0415

    agent = Agent(cfg)
    agent.start()
    signal.signal(signal.SIGTERM, lambda *_: agent.stop())
    signal.signal(signal.SIGINT, lambda *_: agent.stop())
    log.info("srmig agent %s up (roles: %s)", agent.name, ", ".join(agent.roles()))
    try:
        agent.run()
    finally:
        agent.close()
    return 0


__all__ = ["Agent", "Domain", "metadata_xml", "run"]
