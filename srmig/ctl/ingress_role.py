"""The ingress role: watches vms/ in the state database and programs H.Encaps towards each VM (kernel seg6
encap routes, srmig.ctl.ingress), then acknowledges the version it applied (acks/<vm>/<ingress>). It
registers itself under ingresses/<name> with the agent's lease, so migrations wait for it while it lives."""

from __future__ import annotations

import logging
import threading
import time

from pyroute2 import IPRoute

from srmig.ctl import ingress
from srmig.ctl.config import IngressConfig
from srmig.ctl.vmdb import VmDb, VmRecord

log = logging.getLogger("srmig.ingress")


class IngressRole:
    def __init__(self, cfg: IngressConfig, kv, lease):
        self.cfg = cfg
        self.kv = kv
        self.db = VmDb(kv)
        self.lease = lease
        self.applied: dict[str, int] = {}   # vm -> version
        self.errors = 0
        self.last_error: str | None = None
        self.apply_ms: list[float] = []
        self._lock = threading.Lock()
        self._watch = None
        self.ipr = IPRoute()

    def start(self) -> None:
        self.oif = self._oif()
        records, rev = self.db.vms()
        self._apply(records)
        self.db.register_ingress(self.cfg.name, self.lease)
        self._watch = self.kv.watch("vms/", self._on_events, start_revision=rev + 1)

    def _oif(self) -> int:
        idx = self.ipr.link_lookup(ifname=self.cfg.interface)
        if not idx:
            raise ValueError(f"ingress.interface: no interface {self.cfg.interface!r} here")
        return idx[0]

    def _on_events(self, events) -> None:
        self._apply([VmRecord.from_dict(e.value) for e in events if e.kind == "put"])
        for e in events:
            if e.kind == "delete":
                vm = e.key[len("vms/"):]
                with self._lock:
                    ingress.clear(self.ipr, vm)
                    self.applied.pop(vm, None)

    def _apply(self, records: list[VmRecord]) -> None:
        with self._lock:
            for rec in records:
                if self.applied.get(rec.vm, 0) >= rec.version:
                    continue  # older than what we have (a replayed or reordered event)
                t0 = time.monotonic()
                try:
                    ingress.set_segment_list(self.ipr, rec.vm, list(rec.segments), self.cfg.gateway, self.oif)
                except Exception as e:  # noqa: BLE001 - counted and reported; no ack
                    self.errors += 1
                    self.last_error = f"{rec.vm} v{rec.version}: {e}"
                    log.error("cannot program %s: %s", rec.vm, e)
                    continue
                self.applied[rec.vm] = rec.version
                self.db.ack(rec.vm, self.cfg.name, rec.version)
                self.apply_ms = (self.apply_ms + [(time.monotonic() - t0) * 1000])[-1000:]

    def status(self) -> dict:
        with self._lock:
            return {"name": self.cfg.name, "routes": len(self.applied), "errors": self.errors,
                    "last_error": self.last_error,
                    "applied": dict(sorted(self.applied.items()))}

    def close(self) -> None:
        if self._watch is not None:
            self._watch.cancel()
        self.ipr.close()
