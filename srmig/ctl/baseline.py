"""The source's count of frames QEMU read from the tap but did not give the guest (the swallowed frame,
docs/drain.md) needs a baseline taken in a quiet moment: taken now and then while a VM runs here outside a
migration, a few VMs per tick, on a timer's thread (each try costs a QMP round trip through libvirt)."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

from srmig.bpf.abi import VmState
from srmig.ctl.swallow import SwallowCheck

log = logging.getLogger("srmig.agent")
BASELINE_EVERY_S = 2.0
BASELINE_PER_TICK = 8
BASELINE_TRIES = 5  # few tries: under traffic, try again at a later tick


class Baselines:
    def __init__(self, host, libvirt, migrating: Callable[[str], bool], stopping: threading.Event):
        self.host = host            # srmig.ctl.executor.Executor: its VmLocal.check is what we set
        self.libvirt = libvirt      # srmig.ctl.libvirt_link.LibvirtLink
        self.migrating = migrating
        self.stopping = stopping
        self._timer: threading.Timer | None = None

    def start(self, first_s: float = BASELINE_EVERY_S) -> None:
        if self._timer is not None or self.stopping.is_set():
            return

        def tick():
            self._timer = None
            if not self.stopping.is_set():
                self.tick()
                self.start()
        self._timer = threading.Timer(first_s, tick)
        self._timer.daemon = True
        self._timer.start()

    def tick(self) -> None:
        """Those without a baseline first, none in a migration."""
        local = dict(self.host.vms)
        for vm in sorted(local, key=lambda v: local[v].check is not None)[:BASELINE_PER_TICK]:
            if (e := self.host.dp.get_vm(vm)) and e.state is VmState.RUNNING and not e.shadow:
                self.try_vm(vm)

    def try_vm(self, vm: str) -> bool:
        loc = self.host.vms.get(vm)
        if loc is None or loc.tap is None or self.migrating(vm) or self.libvirt.conn is None:
            return False
        try:
            check = SwallowCheck(loc.tap, self.libvirt.rx_used(loc.domain))
            if check.baseline(tries=BASELINE_TRIES):
                loc.check = check
                return True
        except Exception as e:  # noqa: BLE001 - best effort
            log.debug("%s: no swallow baseline: %s", vm, e)
        return False
