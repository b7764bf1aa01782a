"""Domain operations on the XDP program's maps: SIDs, VM migration states, the SR domain, counters, the hold
ring.

Works on the pinned maps of the current network namespace, so it needs no compiler and sees the live state
whoever loaded it. Every operation is idempotent (set replaces, delete of an absent entry succeeds).
"""

from __future__ import annotations

import errno
import fcntl
import ipaddress
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from srmig.bpf import abi, libbpf, loader
from srmig.bpf.abi import Behaviour, DropReason, Verdict, VmState

ffi = libbpf.ffi
META_DOMAIN_PREFIXES: int = abi.ffi.typeof("enum srmig_meta").relements["SRMIG_META_DOMAIN_PREFIXES"]


def _addr(text: str | bytes, what: str) -> bytes:
    if isinstance(text, bytes) and len(text) == 16:
        return text
    try:
        return ipaddress.IPv6Address(text).packed
    except ValueError:
        raise ValueError(f"{what}: {text!r} is not an IPv6 address") from None


def _str(raw) -> str:
    return str(ipaddress.IPv6Address(bytes(ffi.buffer(raw, 16))))


def _vm_addr(text: str | bytes) -> bytes:
    """A VM address as the vm_table key (srmig_abi.h): IPv6 as it is, IPv4 as ::ffff:a.b.c.d."""
    if isinstance(text, bytes) and len(text) == 16:
        return text
    if isinstance(text, bytes) and len(text) == 4:
        return bytes(10) + b"\xff\xff" + text
    try:
        a = ipaddress.ip_address(text)
    except ValueError:
        raise ValueError(f"VM address: {text!r} is not an IPv6 or IPv4 address") from None
    return a.packed if a.version == 6 else bytes(10) + b"\xff\xff" + a.packed


def _vm_str(key: bytes) -> str:
    """A vm_table key as the VM's address: IPv4 VMs (IPv4-mapped keys) as IPv4."""
    a = ipaddress.IPv6Address(bytes(key))
    return str(a.ipv4_mapped) if a.ipv4_mapped else str(a)


def _vm_sort(vm: str):
    a = ipaddress.ip_address(vm)
    return a.version, a


@dataclass
class SidEntry:
    sid: str
    behaviour: Behaviour
    slot: int
    stats: dict[str, int]

    def to_dict(self) -> dict:
        return {"sid": self.sid, "behaviour": abi.BEHAVIOUR_NAMES[self.behaviour], "stats": self.stats}


@dataclass
class VmEntry:
    vm: str
    state: VmState
    next_sid: str | None
    hold_ring: bool
    shadow: bool = False
    ring_first: bool = False  # behind the hold ring (the drain's flip, an abort's unpark: SRMIG_VM_F_RING_FIRST)
    park: bool = False        # RUNNING, parking in the hold ring (an abort: SRMIG_VM_F_PARK)

    def to_dict(self) -> dict:
        return {"vm": self.vm, "state": self.state.name.lower(), "next_sid": self.next_sid,
                "hold_ring": self.hold_ring, "shadow": self.shadow}


@dataclass
class HoldRecord:
    vm: str
    timestamp_ns: int
    packet: bytes  # from the IPv6 header on, already advanced towards the next SID


class NotLoaded(loader.LoaderError):
    pass


class Dataplane(libbpf.PinnedMaps):
    """The live dataplane of this network namespace."""

    def __init__(self, pin_dir: Path | None = None):
        loader.ensure_bpffs()
        super().__init__(pin_dir or loader.pin_dir())
        if not (self.pin_dir / loader.PROG).exists():
            raise NotLoaded(f"srmig is not loaded in this network namespace (no {self.pin_dir}): "
                            f"run `srmig load IFACE` first")
        self.sids = self._map("sid_table", "struct srmig_sid_key", "struct srmig_sid_value")
        self.vms = self._map("vm_table", "struct srmig_vm_key", "struct srmig_vm_value")
        self.sid_stats = self._map("sid_stats", "uint32_t", "struct srmig_sid_stats", percpu=True)
        self.drop_stats = self._map("drop_stats", "uint32_t", "uint64_t", percpu=True)
        self.verdict_stats = self._map("verdict_stats", "uint32_t", "uint64_t", percpu=True)
        self.meta = meta = self._map("meta", "uint32_t", "uint32_t")
        version = meta.lookup(ffi.new("uint32_t *", abi.META_ABI_VERSION))
        if version != abi.ABI_VERSION:
            raise loader.LoaderError(f"the loaded program speaks ABI {version}, this srmig speaks "
                                     f"{abi.ABI_VERSION}: `srmig unload` every interface, then load again")
        self.max_sids = libbpf.map_info(self.sid_stats.fd).max_entries
        # After the version check: an older program has no such pin.
        self.domain = self._map("sr_domain", "struct srmig_domain_key", "uint32_t")
        self.inner_stats = self._map("inner_stats", "uint32_t", "uint64_t", percpu=True)

    def prog_fd(self) -> int:
        """A new fd of the pinned program (the caller closes it)."""
        return libbpf.obj_get(str(self.pin_dir / loader.PROG))

    def _bump(self, slot: int) -> int:
        """meta[slot] += 1, returning the new value. Under an exclusive flock of the pin directory (the lock
        goes with an open file description: every call opens its own), so that two writers, threads or
        processes, cannot both write the same value: the program trusts a copy made at a generation only
        while that generation stands, so a value written twice could revive an outdated copy."""
        lock = os.open(self.pin_dir, os.O_RDONLY | os.O_DIRECTORY)
        try:
            fcntl.flock(lock, fcntl.LOCK_EX)
            key = ffi.new("uint32_t *", slot)
            gen = ((self.meta.lookup(key) or 0) + 1) & 0xFFFFFFFF
            self.meta.update(key, ffi.new("uint32_t *", gen))
            return gen
        finally:
            os.close(lock)

    def flush_nexthops(self) -> int:
        """Expire every cached next hop now (after a route or neighbour change); returns the generation."""
        return self._bump(abi.META_NH_GENERATION)

    def _tables_changed(self) -> None:
        """After every write to sid_table or vm_table: the program's per-CPU copies of their entries are
        stale from now on (see struct table_copy in srmig.c)."""
        self._bump(abi.META_TABLE_GENERATION)

    # SIDs -----------------------------------------------------------------------------------------------

    def _sid_key(self, sid: str | bytes):
        key = ffi.new("struct srmig_sid_key *")
        ffi.memmove(key.addr, _addr(sid, "SID"), 16)
        return key

    def add_sid(self, sid: str, behaviour: Behaviour | str) -> SidEntry:
        """Instantiate a SID (or change its behaviour, keeping its counters)."""
        beh = behaviour if isinstance(behaviour, Behaviour) else abi.parse_behaviour(behaviour)
        key = self._sid_key(sid)
        old = self.sids.lookup(key)
        if old is not None:
            slot = old.stats_slot
        else:
            used = {v.stats_slot for _, v in self.sids.items()}
            free = [s for s in range(self.max_sids) if s not in used]
            if not free:
                raise ValueError(f"SID table full ({self.max_sids} SIDs)")
            slot = free[0]
            # A reused slot starts from zero.
            self.sid_stats.update(ffi.new("uint32_t *", slot), ffi.new("struct srmig_sid_stats *"))
        value = ffi.new("struct srmig_sid_value *", {"behaviour": int(beh), "stats_slot": slot})
        self.sids.update(key, value)
        self._tables_changed()
        return SidEntry(str(ipaddress.IPv6Address(_addr(sid, "SID"))), beh, slot, self._sid_counters(slot))

    def del_sid(self, sid: str) -> bool:
        gone = self.sids.delete(self._sid_key(sid))
        self._tables_changed()
        return gone

    def _sid_counters(self, slot: int) -> dict[str, int]:
        per_cpu = self.sid_stats.lookup(ffi.new("uint32_t *", slot)) or []
        fields = ("packets", "bytes", "delivered", "forwarded", "held", "dropped")
        return {f: sum(getattr(v, f) for v in per_cpu) for f in fields}

    def list_sids(self) -> list[SidEntry]:
        out = [SidEntry(_str(k.addr), Behaviour(v.behaviour), v.stats_slot, self._sid_counters(v.stats_slot))
               for k, v in self.sids.items()]
        return sorted(out, key=lambda e: ipaddress.IPv6Address(e.sid))

    # VMs ------------------------------------------------------------------------------------------------

    def _vm_key(self, vm: str | bytes):
        key = ffi.new("struct srmig_vm_key *")
        ffi.memmove(key.addr, _vm_addr(vm), 16)
        return key

    def set_vm(self, vm: str, state: VmState | str, next_sid: str | None = None,
               hold_ring: bool = False, shadow: bool = False, ring_first: bool = False,
               park: bool = False) -> VmEntry:
        st = state if isinstance(state, VmState) else abi.parse_state(state)
        if st == VmState.AWAY and next_sid is None:
            # End.S finds the next SID in the SRH; End.DX6-map needs it recorded to forward stragglers.
            existing = self.get_vm(vm)
            next_sid = existing.next_sid if existing else None
        value = ffi.new("struct srmig_vm_value *")
        value.state = int(st)
        value.flags = ((abi.VM_F_HOLD_RING if hold_ring else 0) | (abi.VM_F_SHADOW if shadow else 0)
                       | (abi.VM_F_RING_FIRST if ring_first else 0) | (abi.VM_F_PARK if park else 0))
        if next_sid:
            ffi.memmove(value.next_sid, _addr(next_sid, "next SID"), 16)
        self.vms.update(self._vm_key(vm), value)
        self._tables_changed()
        return VmEntry(_vm_str(_vm_addr(vm)), st,
                       str(ipaddress.IPv6Address(next_sid)) if next_sid else None, hold_ring, shadow, ring_first,
                       park)

    def get_vm(self, vm: str) -> VmEntry | None:
        v = self.vms.lookup(self._vm_key(vm))
        return None if v is None else self._vm_entry(_vm_addr(vm), v)

    @staticmethod
    def _vm_entry(addr: bytes, v) -> VmEntry:
        nxt = bytes(ffi.buffer(v.next_sid, 16))
        return VmEntry(_vm_str(addr), VmState(v.state),
                       str(ipaddress.IPv6Address(nxt)) if any(nxt) else None,
                       bool(v.flags & abi.VM_F_HOLD_RING), bool(v.flags & abi.VM_F_SHADOW),
                       bool(v.flags & abi.VM_F_RING_FIRST), bool(v.flags & abi.VM_F_PARK))

    def del_vm(self, vm: str) -> bool:
        gone = self.vms.delete(self._vm_key(vm))
        self._tables_changed()
        return gone

    def list_vms(self) -> list[VmEntry]:
        out = [self._vm_entry(bytes(ffi.buffer(k.addr, 16)), v) for k, v in self.vms.items()]
        return sorted(out, key=lambda e: _vm_sort(e.vm))

    def set_vms_bulk(self, entries: list[tuple[bytes, VmState]]) -> None:
        """Many VMs at once (benchmarks, reconciliation): one syscall each, no per-entry Python objects."""
        key = ffi.new("struct srmig_vm_key *")
        value = ffi.new("struct srmig_vm_value *")
        for addr, state in entries:
            ffi.memmove(key.addr, _vm_addr(addr), 16)
            value.state = int(state)
            self.vms.update(key, value)
        self._tables_changed()

    # SR domain (RFC 8754 5.1) ---------------------------------------------------------------------------

    @staticmethod
    def _prefix(prefix: str) -> ipaddress.IPv6Network:
        """'fc00::/16' -> the network; a bare address is a /128. Host bits set is an error, not rounded: a
        typo must not silently widen or move the domain."""
        try:
            iface = ipaddress.ip_interface(str(prefix).strip())
        except ValueError:
            raise ValueError(f"SR domain prefix: {prefix!r} is not an IPv6 prefix (ADDRESS/LENGTH)") from None
        if iface.version != 6:
            raise ValueError(f"SR domain prefix: {prefix!r} is IPv4; the SR domain is IPv6 prefixes")
        if iface.ip != iface.network.network_address:
            raise ValueError(f"SR domain prefix: {prefix!r} has host bits set (did you mean {iface.network}?)")
        return iface.network

    def _domain_key(self, net: ipaddress.IPv6Network):
        key = ffi.new("struct srmig_domain_key *")
        key.prefixlen = net.prefixlen
        ffi.memmove(key.addr, net.network_address.packed, 16)
        return key

    def _set_domain_count(self, n: int) -> None:
        self.meta.update(ffi.new("uint32_t *", META_DOMAIN_PREFIXES), ffi.new("uint32_t *", n))

    def add_domain(self, prefix: str) -> str:
        """Accept packets to our SIDs from `prefix` (and turn the SR domain check on with the first one)."""
        net = self._prefix(prefix)
        try:
            self.domain.update(self._domain_key(net), ffi.new("uint32_t *", 1))
        except OSError as e:
            if e.errno not in (errno.ENOSPC, errno.E2BIG):
                raise
            max_prefixes = libbpf.map_info(self.domain.fd).max_entries
            raise ValueError(f"SR domain full ({max_prefixes} prefixes): cannot add {net}") from None
        self._set_domain_count(len(self.list_domains()))  # the prefix is in before the check can see it
        return str(net)

    def del_domain(self, prefix: str) -> bool:
        """Stop accepting `prefix`; False when it was not there. Deleting the last prefix turns the check off
        first, so there is no moment at which an empty domain drops everything."""
        net = self._prefix(prefix)
        key = self._domain_key(net)
        rest = [p for p in self.list_domains() if p != str(net)]
        if not rest:
            self._set_domain_count(0)
        deleted = self.domain.delete(key)
        self._set_domain_count(len(self.list_domains()))
        return deleted

    def list_domains(self) -> list[str]:
        nets = [ipaddress.IPv6Network((bytes(ffi.buffer(k.addr, 16)), k.prefixlen)) for k in self.domain.keys()]
        return [str(n) for n in sorted(nets)]

    # Counters -------------------------------------------------------------------------------------------

    def _array_sums(self, m: libbpf.Map, n: int) -> list[int]:
        return [sum(m.lookup(ffi.new("uint32_t *", i)) or []) for i in range(n)]

    def stats(self) -> dict:
        verdicts = self._array_sums(self.verdict_stats, abi.VERDICT_MAX)
        drops = self._array_sums(self.drop_stats, abi.DROP_MAX)
        inner = self._array_sums(self.inner_stats, abi.INNER_MAX * abi.VERDICT_MAX)
        return {
            "verdicts": {v.name.lower(): verdicts[v] for v in Verdict},
            "drops": {r.name.lower(): drops[r] for r in DropReason if r != DropReason.NONE},
            "sids": [e.to_dict() for e in self.list_sids()],
            # Verdicts per inner family, of the packets whose inner packet a per-VM behaviour read.
            "inner": {family: {v.name.lower(): inner[base + v] for v in Verdict}
                      for family, base in (("ipv6", abi.INNER_IPV6 * abi.VERDICT_MAX),
                                           ("ipv4", abi.INNER_IPV4 * abi.VERDICT_MAX))},
        }

    # Hold ring ------------------------------------------------------------------------------------------

    def hold_ring(self, on_record: Callable[[HoldRecord], None]) -> libbpf.RingBuffer:
        """A consumer of the hold ring; records arrive in the order the program held them."""
        return self._ring("hold_ring", on_record)

    def shadow_ring(self, on_record: Callable[[HoldRecord], None]) -> libbpf.RingBuffer:
        """A consumer of the shadow ring: copies of what was delivered to VMs flagged `shadow`, in order."""
        return self._ring("shadow_ring", on_record)

    def shadow_reader(self) -> libbpf.RingReader:
        """A bulk reader of the shadow ring (srmig.ctl.swallow.ShadowLog reads it, consuming late)."""
        return libbpf.RingReader(libbpf.obj_get(str(self.pin_dir / "shadow_ring")), owns_fd=True)

    def _ring(self, name: str, on_record: Callable[[HoldRecord], None]) -> libbpf.RingBuffer:
        head = ffi.sizeof("struct srmig_hold_record")

        def decode(raw: bytes) -> None:
            rec = ffi.cast("struct srmig_hold_record *", ffi.from_buffer(raw))
            on_record(HoldRecord(_vm_str(bytes(ffi.buffer(rec.vm, 16))), rec.timestamp_ns,
                                 raw[head:head + rec.len]))

        return libbpf.RingBuffer(libbpf.obj_get(str(self.pin_dir / name)), decode, owns_fd=True)


class VmAddressSet:
    """A Dataplane whose VM writes apply to all of a VM's addresses: set_vm(vm, ...) and del_vm(vm) write the
    entry of every address `addresses(vm)` lists (the VM's id, its first address, included), so whatever
    moves a VM through its migration's states by its id (the executor, the agent's steady state and
    reconciliation) moves all of its addresses in the same step, in the same order. Reads and everything
    else are the Dataplane's: get_vm(vm) is the id's entry, list_vms() every address's."""

    def __init__(self, dp: Dataplane, addresses: Callable[[str], tuple[str, ...]]):
        self.dp = dp
        self.addresses = addresses

    def __getattr__(self, name: str):
        return getattr(self.dp, name)

    def _all(self, vm: str) -> list[str]:
        """The id first, then the VM's other addresses (the VM map's key spelling decides what is the same)."""
        out, keys = [vm], {_vm_addr(vm)}
        for a in self.addresses(vm):
            if (k := _vm_addr(a)) not in keys:
                keys.add(k)
                out.append(a)
        return out

    def set_vm(self, vm: str, state: VmState | str, **kw) -> VmEntry:
        entries = [self.dp.set_vm(a, state, **kw) for a in self._all(vm)]
        return entries[0]

    def del_vm(self, vm: str) -> bool:
        return [self.dp.del_vm(a) for a in self._all(vm)][0]
