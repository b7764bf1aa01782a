"""The VM records the agents share: the schema over the embedded backend (no root), and 100 concurrent
migrations through two agent workers that exchange them through a watch on the database."""

from __future__ import annotations

import pytest


@pytest.fixture
def vmdb(tmp_path):
    from srmig.ctl import statedb
    from srmig.ctl.vmdb import VmDb

    kv = statedb.open_db("embedded", path=str(tmp_path / "state.db"))
    yield VmDb(kv)
    kv.close()


def test_publish_versions_and_dedupe(vmdb):
    assert vmdb.publish("2001:db8::10", "S", ["fc00:0:1::d6"], "steady") == 1
    assert vmdb.publish("2001:db8::10", "S", ["fc00:0:1::d6"], "steady") == 1  # nothing changed
    v = vmdb.publish("2001:db8::10", "S", ["fc00:0:1::5", "fc00:0:2::b"], "provision", "m1", 1)
    assert v == 2
    # The other end executes the same Publish: written once.
    assert vmdb.publish("2001:db8::10", "S", ["fc00:0:1::5", "fc00:0:2::b"], "provision", "m1", 1) == 2
    assert vmdb.publish("2001:db8::10", "D", ["fc00:0:2::d6"], "cut-over", "m1", 2) == 3
    # A late duplicate of an older step never overwrites a newer one.
    assert vmdb.publish("2001:db8::10", "S", ["fc00:0:1::5", "fc00:0:2::b"], "provision", "m1", 1) == 3
    rec = vmdb.vm("2001:db8::10")
    assert rec.host == "D" and rec.segments == ("fc00:0:2::d6",) and rec.version == 3


def test_wait_acks(vmdb):
    import threading

    lease = vmdb.kv.lease(30)
    vmdb.register_ingress("C1", lease)
    vmdb.register_ingress("C2", lease)
    v = vmdb.publish("2001:db8::10", "S", ["fc00:0:1::d6"], "steady")
    vmdb.ack("2001:db8::10", "C1", v)
    assert vmdb.wait_acks("2001:db8::10", v, 0.2) == ["C2"]
    threading.Timer(0.1, vmdb.ack, ("2001:db8::10", "C2", v)).start()
    assert vmdb.wait_acks("2001:db8::10", v, 5) == []
    lease.revoke()
    assert vmdb.wait_acks("2001:db8::10", v + 1, 0.1) == []  # no ingress registered: nobody to wait for


@pytest.mark.bpf
def test_hundred_concurrent_migrations(tmp_path):
    """100 VMs migrate S -> D at once through two agent workers (each with its own namespace, program and
    maps) exchanging events through a watch on the database: every VM ends running on D, in D's map and in
    the database, and gone from S's map after the grace period (bench.agent.load, without the timing)."""
    from bench import agent as bench_agent

    out = bench_agent.load(tmp_path, 100, None, grace_s=0.1)
    assert out["wrong_end_state"] == 0 and out["left_on_source"] == 0, out


# --- a VM is a set of addresses (docs/design.md) ------------------------------------------------------------

def _domain(*texts: str) -> str:
    from srmig.ctl.records import XMLNS

    addrs = "".join(f"<srmig:address>{t}</srmig:address>" for t in texts)
    return f"<domain><name>vm1</name><metadata><srmig:vm xmlns:srmig='{XMLNS}'>{addrs}</srmig:vm></metadata></domain>"


METADATA_GOOD = [
    # <srmig:address> texts -> the VM's addresses, its id first
    (["2001:db8:100::10"], ("2001:db8:100::10",)),
    (["2001:db8:100:0::10/64"], ("2001:db8:100::10",)),                 # interface notation, as before
    (["2001:db8:100::10", "10.0.0.10", "2001:db8:200::10"], ("2001:db8:100::10", "10.0.0.10", "2001:db8:200::10")),
    (["10.0.0.10", "2001:db8:100::10"], ("10.0.0.10", "2001:db8:100::10")),  # an IPv4 id
    ([" 10.0.0.10/24 ", "", "::ffff:10.0.0.11"], ("10.0.0.10", "10.0.0.11")),  # IPv4-mapped: the IPv4 address
    (["2001:DB8::1/128", "192.0.2.1/32"], ("2001:db8::1", "192.0.2.1")),   # a host prefix is the address
    # prefixes the VM routes, after its id: canonical spelling, both families
    (["2001:db8::1", "10.1.0.0/24", "2001:DB8:99:0::/64"], ("2001:db8::1", "10.1.0.0/24", "2001:db8:99::/64")),
]

METADATA_BAD = [
    # texts -> what the one line says
    (["2001:db8::1", "2001:db8:0::1"], "2001:db8::1 listed twice"),
    (["10.0.0.1", "::ffff:10.0.0.1"], "10.0.0.1 listed twice"),
    (["2001:db8:5::/64"], "is a prefix: the first address is the VM's id"),
    (["2001:db8::1", "10.1.0.0/24", "10.1.0.0/24"], "10.1.0.0/24 listed twice"),
    (["10.0.0.10", "10.0.0.0/24"], "10.0.0.10 and 10.0.0.0/24 overlap"),  # one entry per address, its own too
    (["2001:db8::1", "10.0.0.0/16", "10.0.0.0/24"], "10.0.0.0/24 and 10.0.0.0/16 overlap"),
    (["2001:db8::1", "fe80::/64"], "reaches fe80::/10, where no VM's address can be"),
    (["2001:db8::1", "::/64"], "reaches ::/128"),
    (["2001:db8::1", "::ffff:0:0/104"], "reaches ::ffff:0:0/96"),
    (["2001:db8::1", "224.0.0.0/8"], "reaches 224.0.0.0/4"),
    (["2001:db8::1", "0.0.0.0/0"], "reaches 0.0.0.0/32"),
    (["2001:db8::1", "10.0.0.256"], "is not an IPv6 or IPv4 address"),
    (["2001:db8::1", "nope"], "is not an IPv6 or IPv4 address"),
    (["2001:db8::1/129"], "expected ADDRESS or ADDRESS/LENGTH"),
    (["10.0.0.1/x"], "expected ADDRESS or ADDRESS/LENGTH"),
    (["2001:db8::1", "fe80::1"], "cannot be a VM's"),
    (["169.254.1.1"], "cannot be a VM's"),
    (["127.0.0.1"], "cannot be a VM's"),
    (["224.0.0.5"], "cannot be a VM's"),
    (["0.0.0.0"], "cannot be a VM's"),
    (["255.255.255.255"], "cannot be a VM's"),
    (["2001:db8::1%eth0"], "expected an IPv6 or IPv4 address, got '2001:db8::1%eth0'"),
    (["2001:db8::1", "x" * 65], "expected an IPv6 or IPv4 address"),
    ([f"2001:db8::{i + 1:x}" for i in range(65)], "65 addresses, more than the 64"),
]


@pytest.mark.parametrize("texts, addresses", METADATA_GOOD)
def test_metadata_addresses(texts, addresses):
    from srmig.ctl.libvirt_link import Domain

    d = Domain.parse(_domain(*texts))
    assert (d.vm, d.addresses) == (addresses[0], addresses)


@pytest.mark.parametrize("texts, why", METADATA_BAD)
def test_metadata_malformed_is_one_line(texts, why):
    """The domain is rejected whole: one line naming the domain and the address."""
    from srmig.ctl.libvirt_link import Domain
    from srmig.ctl.records import Rejected

    with pytest.raises(Rejected) as e:
        Domain.parse(_domain(*texts))
    assert why in str(e.value) and str(e.value).startswith("domain 'vm1': ") and "\n" not in str(e.value)


def test_metadata_without_an_address_is_not_ours():
    from srmig.ctl.libvirt_link import Domain, metadata_xml

    assert Domain.parse(_domain()) is None and Domain.parse(_domain("", "  ")) is None
    # what metadata_xml writes reads back, in its order
    xml = f"<domain><name>v</name><metadata>{metadata_xml('10.0.0.1', '2001:db8::1')}</metadata></domain>"
    assert Domain.parse(xml).addresses == ("10.0.0.1", "2001:db8::1")


VM = "2001:db8::10"
RECORD = {"vm": VM, "host": "S", "segments": ["fc00:0:1::d6"], "version": 3}

RECORD_GOOD = [
    # the record's `addresses` (absent: not in it) -> the VmRecord's
    (None, (VM,)),                                   # an older agent's record: the id alone
    ([VM], (VM,)),
    ([VM, "10.0.0.10", "2001:db8::11"], (VM, "10.0.0.10", "2001:db8::11")),
    ([VM, "::ffff:10.0.0.10"], (VM, "10.0.0.10")),
    (["2001:DB8::10", "2001:db8:0::11"], (VM, "2001:db8::11")),
    ([VM, "10.1.0.0/24", "2001:DB8:99::/64"], (VM, "10.1.0.0/24", "2001:db8:99::/64")),
]

RECORD_BAD = [
    ([], "expected a list of 1..64 VM addresses"),
    (VM, "expected a list of 1..64 VM addresses"),
    ({"a": VM}, "expected a list of 1..64 VM addresses"),
    ([VM] + [f"2001:db8:1::{i + 1:x}" for i in range(64)], "expected a list of 1..64 VM addresses"),
    (["2001:db8::11", VM], "the first address must be the VM's 2001:db8::10"),
    ([VM, "2001:db8:0::10"], "2001:db8::10 listed twice"),
    ([VM, "10.0.0.1", "::ffff:10.0.0.1"], "10.0.0.1 listed twice"),
    ([VM, "nope"], "addresses[1]: 'nope' is not an IPv6 or IPv4 address"),
    ([VM, 7], "addresses[1]: expected an IPv6 or IPv4 address"),
    ([VM, None], "addresses[1]: expected an IPv6 or IPv4 address"),
    ([VM, "10.0.0.1/24"], "is not a prefix (ADDRESS/LENGTH, no host bits set)"),
    ([VM, "10.0.0.1/32"], "is one address: list it as 10.0.0.1"),
    (["10.0.0.0/24", VM], "addresses[0]: '10.0.0.0/24' is not an IPv6 or IPv4 address"),  # the id: an address
    ([VM, "ff02::1"], "cannot be a VM's"),
    ([VM, "ff02::/16"], "reaches ff00::/8"),
    ([VM, "2001:db8::/64"], "2001:db8::10 and 2001:db8::/64 overlap"),
]


@pytest.mark.parametrize("addresses, want", RECORD_GOOD)
def test_vm_record_addresses(addresses, want):
    from srmig.ctl.vmdb import VmRecord

    value = RECORD | ({} if addresses is None else {"addresses": addresses})
    rec = VmRecord.parse(f"vms/{VM}", value)
    assert rec.addresses == want
    assert VmRecord.parse(f"vms/{VM}", rec.to_dict()) == rec  # what it writes reads back


@pytest.mark.parametrize("addresses, why", RECORD_BAD)
def test_vm_record_malformed_addresses(addresses, why):
    from srmig.ctl.records import Rejected
    from srmig.ctl.vmdb import VmRecord

    with pytest.raises(Rejected) as e:
        VmRecord.parse(f"vms/{VM}", RECORD | {"addresses": addresses})
    assert why in str(e.value), str(e.value)


def test_ipv4_vm_id():
    """A VM whose first address is IPv4 has it as its key."""
    from srmig.ctl import records

    rec = records.vm_record("vms/10.0.0.10", {"vm": "10.0.0.10", "host": "S", "segments": ["fc00::1"],
                                              "version": 1, "addresses": ["10.0.0.10", "2001:db8::10"]})
    assert rec["addresses"] == ("10.0.0.10", "2001:db8::10")
    vm, host, _ = records.migration_record("migrations/S/10.0.0.10", {
        "id": "m1", "vm": "10.0.0.10", "src": "S", "dst": "D", "events": ["begin"]})
    assert (vm, host) == ("10.0.0.10", "S")
    with pytest.raises(records.Rejected, match="not the key's"):
        records.vm_record("vms/10.0.0.10", {"vm": "10.0.0.11", "host": "S", "segments": ["fc00::1"], "version": 1})


def test_publish_carries_the_addresses(vmdb):
    """The list and the segment list change in one version; a publish that does not know the addresses keeps
    the record's; an older agent's record (no list) reads as the id alone; a malformed list in the database is
    read as no record, counted."""
    from srmig.ctl import records

    assert vmdb.publish(VM, "S", ["fc00:0:1::d6"], "steady") == 1
    assert vmdb.vm(VM).addresses == (VM,)
    assert vmdb.publish(VM, "S", ["fc00:0:1::d6"], "steady", addresses=[VM, "10.0.0.10"]) == 2
    assert vmdb.publish(VM, "S", ["fc00:0:1::d6"], "steady", addresses=[VM, "10.0.0.10"]) == 2  # no change
    assert vmdb.publish(VM, "D", ["fc00:0:2::d6"], "cut-over", "m1", 1) == 3
    rec = vmdb.vm(VM)
    assert (rec.host, rec.addresses, rec.version) == ("D", (VM, "10.0.0.10"), 3)
    assert vmdb.kv.get(f"vms/{VM}").value["addresses"] == [VM, "10.0.0.10"]
    vmdb.kv.put("vms/2001:db8::20", {"vm": "2001:db8::20", "host": "S", "segments": ["fc00::1"], "version": 1})
    assert vmdb.vm("2001:db8::20").addresses == ("2001:db8::20",)
    before = records.REJECTED.counts()["vm_record"]
    vmdb.kv.put("vms/2001:db8::30", {"vm": "2001:db8::30", "host": "S", "segments": ["fc00::1"], "version": 1,
                                     "addresses": ["2001:db8::30", "2001:db8::30"]})
    assert vmdb.vm("2001:db8::30") is None
    assert records.REJECTED.counts()["vm_record"] == before + 1
    # written over with a later version than its own (as for any malformed record)
    assert vmdb.publish("2001:db8::30", "S", ["fc00::1"], "steady") == 2


OWNED = {"2001:db8::20": ("2001:db8::20", "domain 'b'"), "10.2.0.0/16": ("2001:db8::20", "domain 'b'"),
         "2001:db8:77::/48": ("2001:db8::30", "vms/2001:db8::30"), "10.0.0.7": ("2001:db8::30", "vms/2001:db8::30")}


@pytest.mark.parametrize("addresses, why", [
    ((VM, "10.1.0.0/24", "2001:db8:99::/64"), None),
    ((VM, "2001:db8::20"), "address 2001:db8::20 is already VM 2001:db8::20's (domain 'b')"),
    ((VM, "10.2.3.4"), "10.2.3.4 overlaps 10.2.0.0/16, VM 2001:db8::20's (domain 'b')"),
    ((VM, "10.2.3.0/24"), "10.2.3.0/24 overlaps 10.2.0.0/16, VM 2001:db8::20's"),
    ((VM, "10.0.0.0/8"), "10.0.0.0/8 overlaps"),  # holds another VM's prefix (and address)
    ((VM, "10.0.0.0/24"), "10.0.0.0/24 overlaps 10.0.0.7, VM 2001:db8::30's (vms/2001:db8::30)"),
    ((VM, "2001:db8:77:1::/64"), "2001:db8:77:1::/64 overlaps 2001:db8:77::/48, VM 2001:db8::30's"),
    (("2001:db8:77::5",), "2001:db8:77::5 overlaps 2001:db8:77::/48"),  # its id inside another's prefix
    ((VM, "2001:db8:78::/48", "10.3.0.0/16"), None),  # next to theirs, not overlapping
])
def test_prefix_overlap_is_taken(addresses, why):
    """An address or prefix that shares an address with another VM's is taken, whichever is the prefix; the
    other family's space never overlaps; the checked VM's own entries never count against it."""
    from collections import ChainMap

    from srmig.ctl import records

    owners = records.Owners()
    for a, owner in OWNED.items():
        owners.setdefault(a, owner)
    assert set(owners.prefixes) == {"10.2.0.0/16", "2001:db8:77::/48"}
    got = records.taken(VM if addresses[0] == VM else addresses[0], addresses, owners)
    assert (got is None) == (why is None) and (why is None or why in got), got
    # the same through a ChainMap (the agent's: this host's domains, then the records), and a plain dict
    assert records.taken(addresses[0], addresses, ChainMap(records.Owners(), owners)) == got
    assert records.taken(addresses[0], addresses, dict(OWNED)) == got
    # its own prefixes do not count against it
    assert records.taken("2001:db8::20", ("2001:db8::20", "10.2.0.0/16", "10.2.5.0/24"), owners) is None


AT_START = [  # (the destination's counts at its QEMU's start, as in a migration record; what is refused)
    (None, None),
    ({"tx": 0, "mcast": 0, "delivered": 0}, None),
    ({"tx": 2**63 - 1, "mcast": 7, "delivered": 12}, None),
    ({"tx": 1, "mcast": 2}, "at_start: expected null or {tx, mcast, delivered} counts"),
    ({"tx": 1, "mcast": 2, "delivered": 3, "used": 4}, "at_start: expected null or {tx, mcast, delivered}"),
    ({"tx": -1, "mcast": 2, "delivered": 3}, "at_start: expected null or {tx, mcast, delivered}"),
    ({"tx": 1, "mcast": True, "delivered": 3}, "at_start: expected null or {tx, mcast, delivered}"),
    ({"tx": "1", "mcast": 2, "delivered": 3}, "at_start: expected null or {tx, mcast, delivered}"),
    ([1, 2, 3], "at_start: expected null or {tx, mcast, delivered}"),
]


@pytest.mark.parametrize("mcast, why", [(None, None), (0, None), (9, None), (-1, "swallow_mcast: expected null or a"),
                                        ("3", "swallow_mcast: expected null or a"), (True, "swallow_mcast")])
def test_migration_record_swallow_mcast(mcast, why):
    """The source's multicast count that goes with its swallow_base (swallow.RecordedCheck)."""
    from srmig.ctl import records

    value = {"id": "m1", "vm": VM, "src": "S", "dst": "D", "events": ["begin"], "swallow_mcast": mcast}
    if why is None:
        assert records.migration_record(f"migrations/S/{VM}", value)[2]["swallow_mcast"] == mcast
    else:
        with pytest.raises(records.Rejected, match=why):
            records.migration_record(f"migrations/S/{VM}", value)


@pytest.mark.parametrize("at_start, why", AT_START)
def test_migration_record_at_start(at_start, why):
    """The destination's tap and program counts at its incoming QEMU's start (swallow.Arrival) outlive its
    agent in its migration record: read back as written, or the record refused whole."""
    from srmig.ctl import records

    value = {"id": "m1", "vm": VM, "src": "S", "dst": "D", "events": ["begin"], "at_start": at_start}
    if why is None:
        assert records.migration_record(f"migrations/D/{VM}", value)[2]["at_start"] == at_start
    else:
        with pytest.raises(records.Rejected, match=why.replace("{", r"\{").replace("}", r"\}")):
            records.migration_record(f"migrations/D/{VM}", value)
