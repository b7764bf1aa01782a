"""Prometheus metrics (prometheus_client): dataplane counters read at scrape time, phase durations, the
event -> map-update latency of the agent and the inputs it rejected (srmig.ctl.records)."""

from __future__ import annotations

import contextlib

from prometheus_client import CollectorRegistry, Counter, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from srmig.ctl import records

LATENCY_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0)


class _Dataplane:
    def __init__(self, agent):
        self.agent = agent

    def collect(self):
        dp = self.agent.dp
        if dp is None:
            return
        with contextlib.suppress(Exception):
            st = dp.stats()
            v = CounterMetricFamily("srmig_verdicts", "Packets by XDP verdict", labels=["verdict"])
            for k, n in st["verdicts"].items():
                v.add_metric([k], n)
            yield v
            d = CounterMetricFamily("srmig_drops", "Packets dropped, by reason", labels=["reason"])
            for k, n in st["drops"].items():
                d.add_metric([k], n)
            yield d
            s = CounterMetricFamily("srmig_sid_packets", "Packets per SID and outcome",
                                    labels=["sid", "behaviour", "outcome"])
            for sid in st["sids"]:
                for k, n in sid["stats"].items():
                    s.add_metric([sid["sid"], sid["behaviour"], k], n)
            yield s
            g = GaugeMetricFamily("srmig_vms", "VM entries in the map, by state", labels=["state"])
            counts: dict[str, int] = {}
            for e in dp.list_vms():
                counts[e.state.name.lower()] = counts.get(e.state.name.lower(), 0) + 1
            for k, n in counts.items():
                g.add_metric([k], n)
            yield g
            f = CounterMetricFamily("srmig_inner_packets", "Packets whose inner packet a per-VM behaviour read, by "
                                    "inner family and verdict", labels=["family", "verdict"])
            for family, verdicts in st["inner"].items():
                for k, n in verdicts.items():
                    f.add_metric([family, k], n)
            yield f


class _Encap:
    """The ingress role's H.Encaps counters (BPF encap only; the kernel's seg6 routes count nothing)."""

    def __init__(self, agent):
        self.agent = agent

    def collect(self):
        role = self.agent.ingress
        if role is None or role.encap is None:
            return
        with contextlib.suppress(Exception):
            st = role.encap.stats()
            c = CounterMetricFamily("srmig_encap_packets", "Ingress H.Encaps outcomes (pass, done, drop_*)",
                                    labels=["outcome"])
            for k, n in st["counters"].items():
                c.add_metric([k], n)
            yield c
            v = CounterMetricFamily("srmig_encap_vm_packets", "Packets encapsulated or dropped per VM",
                                    labels=["vm", "outcome"])
            for vm, stats in st["vms"].items():
                v.add_metric([vm, "encapsulated"], stats["packets"])
                v.add_metric([vm, "dropped"], stats["dropped"])
            yield v
            f = CounterMetricFamily("srmig_encap_family_packets", "Packets encapsulated or dropped, by the VM "
                                    "address's family", labels=["family", "outcome"])
            for family, stats in st["families"].items():
                f.add_metric([f"ipv{family}", "encapsulated"], stats["packets"])
                f.add_metric([f"ipv{family}", "dropped"], stats["dropped"])
            yield f


class _Rejected:
    """srmig_rejected_input_total{source}: every source, zero included (a rate needs the series first)."""

    def collect(self):
        c = CounterMetricFamily("srmig_rejected_input", "Inputs rejected as malformed, by source",
                                labels=["source"])
        for source, n in records.REJECTED.counts().items():
            c.add_metric([source], n)
        yield c


class _Denied:
    """srmig_db_denied_total: requests the state database refused as outside this agent's etcd roles."""

    def __init__(self, agent):
        self.agent = agent

    def collect(self):
        kv = self.agent.dbl.kv
        c = CounterMetricFamily("srmig_db_denied", "State database requests refused as outside the agent's "
                                "etcd roles (permission denied)")
        c.add_metric([], kv.denied if kv is not None else 0)
        yield c


class Metrics:
    def __init__(self, agent, listen: str):
        self.registry = CollectorRegistry()
        self.event_to_map = Histogram("srmig_event_to_map_seconds", "libvirt event to VM-state map update",
                                      buckets=LATENCY_BUCKETS, registry=self.registry)
        self.phase_seconds = Histogram("srmig_phase_seconds", "Time spent in each migration phase",
                                       ["phase"], registry=self.registry)
        self.fenced = Counter("srmig_fenced", "Domains this host paused because their migration was aborted "
                              "while they ran here (the source resumed its copy: a split brain), by action",
                              ["action"], registry=self.registry)
        self.registry.register(_Dataplane(agent))
        self.registry.register(_Encap(agent))
        self.registry.register(_Rejected())
        self.registry.register(_Denied(agent))
        host, _, port = listen.rpartition(":")
        self.server, self.thread = start_http_server(int(port), addr=host.strip("[]"), registry=self.registry)

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def serve(agent, listen: str) -> Metrics:
    return Metrics(agent, listen)
