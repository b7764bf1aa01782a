"""The real thing: two libvirtd daemons, three agent processes, libvirt's live migration under probe traffic,
driven by libvirt's hook and events alone, with either database (what `srmig demo --libvirt` runs).

Loss is asserted as `lost_net`: probes lost but for the requests the guest's own counters say it received
and left unanswered (after a burst its kernel drops replies it cannot send yet: Result.unanswered). Every
failure prints where the lost probes went (Result.diagnosis)."""

from __future__ import annotations

import pytest


def prom_value(text: str, sample: str) -> float | None:
    """The value of one Prometheus sample (`name{labels}` exactly as exposed) in `text`, None if absent."""
    for line in text.splitlines():
        if line.startswith(sample + " "):
            return float(line.split()[-1])
    return None


@pytest.mark.libvirt
def test_libvirt_migration_driven_by_agents():
    """libvirt's live migration of a dual-stack guest under 2000 probes/s per family (ICMPv6 and ICMP echo)
    for 5 s; only libvirt's hook and events drive srmig: 0 lost, 0 duplicated, 0 reordered on each family.
    The destination's hook waited for the ingress's ack; every agent reports."""
    from srmig.testbed import libvirt_demo

    res = libvirt_demo.run(rate=2000, count=10000, families=("6", "4"))  # 5 s: it outlasts the migration
    d = res.to_dict()
    assert res.error is None
    for family in ("6", "4"):
        f = d["families"][family]
        assert (f["sent"], f["lost_net"], f["duplicated"], f["reordered"]) == (10000, 0, 0, 0), (family, d)
        assert "note" not in f, f["note"]  # e.g. the probes stopped before the migration completed
    assert res.reports["4"].received > 0, d  # the guest answered IPv4 (not just an empty family)
    s, dst, c = res.agents["S"], res.agents["D"], res.agents["C"]
    # The ingress applied the cut-over version (one route, to D's End.DX6-map) to both of the VM's addresses
    # (the record lists them, the IPv6 one first: the VM's id) and acknowledged it.
    loc = {r["vm"]: r for r in c["locations"]}[libvirt_demo.VM_ADDR]
    assert loc["host"] == "D" and loc["segments"] == ["fc00:0:2::d6"]
    assert loc["addresses"] == [libvirt_demo.VM_ADDR, libvirt_demo.VM_ADDR4]
    assert c["ingress"]["applied"][libvirt_demo.VM_ADDR] == loc["version"] and c["ingress"]["errors"] == 0
    # srmig's BPF H.Encaps carried every probe of both families (and whatever else went to the VM), and
    # dropped nothing.
    enc = c["ingress"]["counters"]
    assert c["ingress"]["encap"] == "bpf" and enc["done"] >= 20000, enc
    assert all(n == 0 for k, n in enc.items() if k.startswith("drop")), enc
    assert prom_value(res.metrics["C"], 'srmig_encap_packets_total{outcome="done"}') >= 20000
    for family in ("ipv6", "ipv4"):
        sample = f'srmig_encap_family_packets_total{{family="{family}",outcome="encapsulated"}}'
        assert prom_value(res.metrics["C"], sample) >= 10000, sample
    vm_d = {v["vm"]: v for v in dst["vms"]}[libvirt_demo.VM_ADDR]
    # Reported (the hold at D is its tap queue); it also counts what the host sent the tap before QEMU had it.
    assert vm_d["state"] == "running" and isinstance(vm_d["tap_dropped"], int)
    assert all(v["state"] is None for v in s["vms"] if v["vm"] == libvirt_demo.VM_ADDR)  # grace over
    assert s["event_to_map_ms"]["n"] >= 1 and dst["event_to_map_ms"]["n"] >= 1
    assert s["dataplane"]["drops"]["outside_domain"] == 0
    # Prometheus: dataplane counters (S delivered the probes before the migration), event -> map latency,
    # phase durations.
    prom = res.metrics["S"]
    delivered = prom_value(prom, 'srmig_verdicts_total{verdict="deliver"}')
    assert delivered is not None and delivered > 0, "S delivered the VM's packets before the migration"
    count = prom_value(prom, "srmig_event_to_map_seconds_count")
    assert count is not None and count >= 1
    assert 'srmig_phase_seconds_count{phase="stop-and-copy"}' in prom
    # D delivered both families after the migration (the dataplane's inner-family counters).
    for family in ("ipv6", "ipv4"):
        sample = f'srmig_inner_packets_total{{family="{family}",verdict="deliver"}}'
        delivered = prom_value(res.metrics["D"], sample)
        assert delivered is not None and delivered > 0, f"D delivered the VM's {family} packets"


@pytest.mark.libvirt
@pytest.mark.etcd
def test_libvirt_migration_with_etcd():
    """The same, with the agents sharing an etcd (in the client's namespace, reached across the fabric)."""
    from srmig.testbed import libvirt_demo

    res = libvirt_demo.run(rate=2000, count=6000, db="etcd")
    d = res.to_dict()
    assert res.error is None
    assert (d["lost_net"], d["duplicated"]) == (0, 0), d
    loc = {r["vm"]: r for r in res.agents["C"]["locations"]}[libvirt_demo.VM_ADDR]
    assert loc["host"] == "D" and res.agents["C"]["db"]["backend"] == "etcd"
