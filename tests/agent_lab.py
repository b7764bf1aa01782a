"""A real agent around a private namespace's srmig maps, without QEMU or its servers (as bench/agent.py builds
it): the fixtures and helpers the agent's reconciliation and control-input tests share. The libvirt side is
libvirt's test driver (test:///default, inside this process)."""

from __future__ import annotations

import contextlib
import queue
import threading
from concurrent.futures import Future

import pytest
from pyroute2 import netns

from srmig.ctl import config, statedb, work
from srmig.ctl.agent import Agent
from srmig.ctl.drain import hold_ring_reader, read_hold_packets
from srmig.ctl.libvirt_events import ensure_event_loop
from srmig.testbed import lab as L

libvirt = pytest.importorskip("libvirt", reason="libvirt-python not installed")


def unreachable(uri: str):
    raise libvirt.libvirtError(f"{uri}: not reachable in this test")


def make_agent(lab, tmp_path, libvirt_factory, cfg: str, source: str) -> Agent:
    """An agent of config `cfg` ({tmp}: tmp_path) on `lab`'s maps and an embedded database in tmp_path."""
    a = Agent(config.parse(cfg.format(tmp=tmp_path), source),
              kv_factory=lambda: statedb.open_db("embedded", path=str(tmp_path / "state.db")),
              libvirt_factory=libvirt_factory)
    a.host.use_dataplane(lab.dp)
    return a


def applied(a: Agent, typ, before=lambda item: None, after=lambda item: None) -> queue.Queue:
    """(item, before(item), after(item)) for every `typ` item the worker applies, as it finishes each: the
    real handler still does the work."""
    out, real = queue.Queue(), a.handlers[typ]

    def handler(item):
        b = before(item)
        try:
            real(item)
        finally:
            out.put((item, b, after(item)))
    a.handlers[typ] = handler
    return out


def on_worker(a: Agent, fn, *args):
    """fn(*args) on the agent's worker (the one thread that may touch its state); its result."""
    fut: Future = Future()

    def call():
        try:
            fut.set_result(fn(*args))
        except Exception as e:  # noqa: BLE001 - raised in the test
            fut.set_exception(e)
    a.enqueue(work.Call(call))
    return fut.result(10)


def _work_in(a: Agent, ns: str) -> None:
    netns.setns(ns, flags=0)  # this thread only: whatever the executor sends stays in the lab's namespace
    a.run()


@contextlib.contextmanager
def running(a: Agent, lab):
    """The worker started, then the database link: stopped and closed at the end, pass or fail."""
    worker = threading.Thread(target=_work_in, args=(a, lab.topo.ns("lab")), daemon=True)
    worker.start()
    try:
        a.dbl.start()
        yield a
    finally:
        a.stop()
        worker.join(10)
        a.close()


@pytest.fixture(scope="module")
def lab():
    with L.TestRunLab() as lab:
        yield lab


@pytest.fixture
def maps(lab):
    """The lab's maps with no VM entry and an empty hold ring, before and after the test."""
    def clean():
        for e in lab.dp.list_vms():
            lab.dp.del_vm(e.vm)
        for prefix, _ in lab.dp.list_vm_prefixes():  # the lab's, of VMs with no entry among them
            lab.dp.del_vm_prefix(prefix)
        with hold_ring_reader(lab.dp) as ring:
            read_hold_packets(ring)
    clean()
    yield lab.dp
    clean()


@pytest.fixture
def conn():
    """The test driver; the domains the test creates are destroyed (and undefined) at the end."""
    ensure_event_loop()  # before any connection: the agent's link registers for events
    c = libvirt.open("test:///default")
    before = {d.name() for d in c.listAllDomains(0)}
    yield c
    for d in c.listAllDomains(0):
        if d.name() not in before:
            with contextlib.suppress(libvirt.libvirtError):
                persistent = d.isPersistent()
                if d.isActive():
                    d.destroy()
                if persistent:
                    d.undefine()
    c.close()
