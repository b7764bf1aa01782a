"""Domain operations on the XDP program's maps: SIDs, VM migration states, the SR domain, counters, the hold
ring.

Works on the pinned maps of the current network namespace, so it needs no compiler and sees the live state
whoever loaded it. Every operation is idempotent (set replaces, delete of an absent entry succeeds).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import ipaddress
import os
import threading
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


def is_prefix(vm: str) -> bool:
    """Whether a VM address spelling is a prefix (ADDRESS/LENGTH): a subnet the VM routes."""
    return isinstance(vm, str) and "/" in vm


def _vm_prefix(text: str) -> tuple[bytes, int]:
    """A VM prefix as the vm_prefixes / encap_prefixes key (srmig_abi.h): (the network address as vm_table
    spells it, its length), an IPv4 prefix a.b.c.d/n as ::ffff:a.b.c.d/(96 + n). Host bits set is an error,
    as for the SR domain: a typo must not silently widen or move what a VM receives."""
    try:
        net = ipaddress.ip_network(str(text).strip())
    except ValueError:
        raise ValueError(f"VM prefix: {text!r} is not an IPv6 or IPv4 prefix (ADDRESS/LENGTH, no host bits "
                         f"set)") from None
    if net.version == 4:
        return bytes(10) + b"\xff\xff" + net.network_address.packed, 96 + net.prefixlen
    return net.network_address.packed, net.prefixlen


def _vm_prefix_str(addr: bytes, prefixlen: int) -> str:
    """A vm_prefixes key as the prefix: IPv4 ones (IPv4-mapped, /96 and longer) as IPv4."""
    a = ipaddress.IPv6Address(bytes(addr))
    if a.ipv4_mapped is not None and prefixlen >= 96:
        return f"{a.ipv4_mapped}/{prefixlen - 96}"
    return f"{a}/{prefixlen}"


def _pointer_str(addr: bytes, prefixlen: int) -> str:
    """A vm_prefixes key as srmig lists it: a full-length one (/128, an IPv4 address's /96 + 32) is one of a
    VM's addresses pointed at its id, spelled as the address; a shorter one is a prefix."""
    return _vm_str(addr) if prefixlen == 128 else _vm_prefix_str(addr, prefixlen)


def vm_spelling(vm: str) -> str:
    """An address or prefix as the VM map's listings spell it (list_vms, list_vm_prefixes): a full-length
    prefix (x/128, a.b.c.d/32) is the address."""
    return _pointer_str(*_vm_prefix(vm)) if is_prefix(vm) else _vm_str(_vm_addr(vm))


def _vm_str(key: bytes) -> str:
    """A vm_table key as the VM's address: IPv4 VMs (IPv4-mapped keys) as IPv4."""
    a = ipaddress.IPv6Address(bytes(key))
    return str(a.ipv4_mapped) if a.ipv4_mapped else str(a)


def _vm_sort(vm: str):
    """Addresses and prefixes of both families in one order: IPv4 first, each family by address, a prefix
    after the address it starts at."""
    n = ipaddress.ip_network(vm)
    return n.version, n.network_address, n.prefixlen


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
    of: str | None = None     # a prefix's entry (vm_prefixes): the VM's id, whose vm_table entry it shows

    def to_dict(self) -> dict:
        out = {"vm": self.vm, "state": self.state.name.lower(), "next_sid": self.next_sid,
               "hold_ring": self.hold_ring, "shadow": self.shadow}
        if self.of is not None:
            out["of"] = self.of
        return out


@dataclass
class HoldRecord:
    vm: str
    timestamp_ns: int
    packet: bytes  # from the IPv6 header on, already advanced towards the next SID


class _Writes(threading.local):
    depth = 0  # the _writing() calls this thread is in


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
        self.vm_prefixes = self._map("vm_prefixes", "struct srmig_vm_prefix_key", "struct srmig_vm_key")
        self._writes = _Writes()

    def prog_fd(self) -> int:
        """A new fd of the pinned program (the caller closes it)."""
        return libbpf.obj_get(str(self.pin_dir / loader.PROG))

    @contextlib.contextmanager
    def _locked(self):
        """An exclusive flock of the pin directory (the lock goes with an open file description: every call
        opens its own), so that two writers, threads or processes, cannot both write the same generation:
        the program trusts a copy made at a generation only while that generation stands, so a value written
        twice could revive an outdated copy."""
        lock = os.open(self.pin_dir, os.O_RDONLY | os.O_DIRECTORY)
        try:
            fcntl.flock(lock, fcntl.LOCK_EX)
            yield
        finally:
            os.close(lock)

    def _bump(self, slot: int, odd: bool | None = None) -> int:
        """meta[slot] to its next value (odd=True: the next odd one, False: the next even one), returning it.
        Under the lock (_locked) unless the caller holds it."""
        with contextlib.nullcontext() if self._writes.depth else self._locked():
            key = ffi.new("uint32_t *", slot)
            gen = ((self.meta.lookup(key) or 0) + 1) & 0xFFFFFFFF
            if odd is not None and gen % 2 != odd:
                gen = (gen + 1) & 0xFFFFFFFF  # (2^32 is even: the wrap keeps the parity)
            self.meta.update(key, ffi.new("uint32_t *", gen))
            return gen

    def flush_nexthops(self) -> int:
        """Expire every cached next hop now (after a route or neighbour change); returns the generation."""
        return self._bump(abi.META_NH_GENERATION)

    @contextlib.contextmanager
    def _writing(self):
        """Around every write to sid_table, vm_table or vm_prefixes (and several of them: nested, the outer
        one counts): the table generation odd before, the next even one after, under the lock throughout.
        While it is odd the program reads the tables and neither uses nor makes a per-CPU copy (cache.h), so
        no packet sees a copy older than the tables once a write has begun, and the copies it makes after
        are of the tables written."""
        w = self._writes
        if w.depth:
            w.depth += 1
            try:
                yield
            finally:
                w.depth -= 1
            return
        with self._locked():
            w.depth = 1
            try:
                self._bump(abi.META_TABLE_GENERATION, odd=True)
                yield
            finally:
                self._bump(abi.META_TABLE_GENERATION, odd=False)
                w.depth = 0

    def _tables_changed(self) -> None:
        """After a write made outside _writing() (a test behind the Dataplane's back, a benchmark's cold
        run): the program's per-CPU copies are stale from now on (the next even generation)."""
        self._bump(abi.META_TABLE_GENERATION, odd=False)

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
        with self._writing():
            self.sids.update(key, value)
        return SidEntry(str(ipaddress.IPv6Address(_addr(sid, "SID"))), beh, slot, self._sid_counters(slot))

    def del_sid(self, sid: str) -> bool:
        with self._writing():
            return self.sids.delete(self._sid_key(sid))

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
        if is_prefix(vm):
            raise ValueError(f"{vm} is a prefix: its packets take the state of the VM it belongs to "
                             f"(set_vm_prefix(prefix, VM), then set the VM's address)")
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
        with self._writing():
            self.vms.update(self._vm_key(vm), value)
        return VmEntry(_vm_str(_vm_addr(vm)), st,
                       str(ipaddress.IPv6Address(next_sid)) if next_sid else None, hold_ring, shadow, ring_first,
                       park)

    def get_vm(self, vm: str) -> VmEntry | None:
        """The entry that applies to an address: its own, else (one of a VM's other addresses, pointed at the
        VM's id in vm_prefixes; an address of a prefix) the entry of the VM's id, `of` naming the id. For a
        prefix: the entry of the VM it belongs to, `of` naming it."""
        if is_prefix(vm):
            return self._via_pointer(vm, self._prefix_str(vm))
        v = self.vms.lookup(self._vm_key(vm))
        if v is None:
            return self._via_pointer(vm, _vm_str(_vm_addr(vm)))
        return self._vm_entry(_vm_addr(vm), v)

    def _via_pointer(self, vm: str, spelling: str) -> VmEntry | None:
        """The id's entry for `vm` by vm_prefixes (the longest match, as the program takes it)."""
        owner = self.vm_prefixes.lookup(self._vm_prefix_key(vm))
        if owner is None:
            return None
        id_key = bytes(ffi.buffer(owner.addr, 16))
        v = self.vms.lookup(self._vm_key(id_key))
        return None if v is None else self._vm_entry(id_key, v, prefix=spelling)

    @staticmethod
    def _vm_entry(addr: bytes, v, prefix: str | None = None) -> VmEntry:
        nxt = bytes(ffi.buffer(v.next_sid, 16))
        return VmEntry(prefix or _vm_str(addr), VmState(v.state),
                       str(ipaddress.IPv6Address(nxt)) if any(nxt) else None,
                       bool(v.flags & abi.VM_F_HOLD_RING), bool(v.flags & abi.VM_F_SHADOW),
                       bool(v.flags & abi.VM_F_RING_FIRST), bool(v.flags & abi.VM_F_PARK),
                       of=_vm_str(addr) if prefix else None)

    def del_vm(self, vm: str) -> bool:
        """Delete an address's entry, its own and its pointer at a VM's id (whichever it has), or a prefix's
        (del_vm_prefix)."""
        if is_prefix(vm):
            return self.del_vm_prefix(vm)
        with self._writing():
            gone = self.vms.delete(self._vm_key(vm))
            return self.vm_prefixes.delete(self._vm_prefix_key(vm)) or gone  # (a full-length key: exact)

    def list_vms(self) -> list[VmEntry]:
        """Every address's entry, and every prefix's (showing its VM's entry; none while its VM has none). A
        VM's address pointed at its id is listed as an address, with the id's entry and `of` naming the id,
        unless it has an entry of its own too (which the program takes: that one is listed)."""
        out = [self._vm_entry(bytes(ffi.buffer(k.addr, 16)), v) for k, v in self.vms.items()]
        own = {e.vm for e in out}
        for prefix, vm in self.list_vm_prefixes():
            v = self.vms.lookup(self._vm_key(vm))
            if v is not None and prefix not in own:
                out.append(self._vm_entry(_vm_addr(vm), v, prefix=prefix))
        return sorted(out, key=lambda e: _vm_sort(e.vm))

    # VM prefixes (vm_prefixes: a VM that routes a subnet) ---------------------------------------------------

    def _vm_prefix_key(self, prefix: str):
        addr, prefixlen = _vm_prefix(prefix)
        key = ffi.new("struct srmig_vm_prefix_key *")
        key.prefixlen = prefixlen
        ffi.memmove(key.addr, addr, 16)
        return key

    @staticmethod
    def _prefix_str(prefix: str) -> str:
        return _vm_prefix_str(*_vm_prefix(prefix))

    def set_vm_prefix(self, prefix: str, vm: str) -> str:
        """Packets to any address of `prefix` that vm_table does not have take `vm`'s entry (`vm`: the VM's id,
        an address). `prefix` may be an address (a full-length prefix): one of the VM's other addresses, which
        then has no entry of its own (VmAddressSet). Returns the prefix as srmig spells it. Idempotent; the
        caller keeps prefixes of different VMs apart (srmig.ctl.records.overlaps): the longest match would
        otherwise decide."""
        if is_prefix(vm):
            raise ValueError(f"a prefix's VM is named by an address, not the prefix {vm}")
        try:
            with self._writing():  # (a copy of "no such VM" for an address of the prefix must go)
                self.vm_prefixes.update(self._vm_prefix_key(prefix), self._vm_key(vm))
        except OSError as e:
            if e.errno not in (errno.ENOSPC, errno.E2BIG):
                raise
            raise ValueError(f"VM prefixes full ({libbpf.map_info(self.vm_prefixes.fd).max_entries}): cannot "
                             f"add {prefix}") from None
        return self._prefix_str(prefix)

    def del_vm_prefix(self, prefix: str) -> bool:
        with self._writing():
            return self.vm_prefixes.delete(self._vm_prefix_key(prefix))

    def list_vm_prefixes(self) -> list[tuple[str, str]]:
        """[(prefix, its VM's id)], in address order; a VM's address pointed at its id spelled as the address."""
        out = [(_pointer_str(bytes(ffi.buffer(k.addr, 16)), k.prefixlen),
                _vm_str(bytes(ffi.buffer(v.addr, 16)))) for k, v in self.vm_prefixes.items()]
        return sorted(out, key=lambda pv: _vm_sort(pv[0]))

    def vm_owners(self, where: str = "this host's VM map") -> dict[str, tuple[str, str]]:
        """Every address and prefix the VM map has -> (its VM's id, `where`), as srmig.ctl.records.taken()
        reads an owner map: an address with an entry of its own is a VM's id (its own VM), every other address
        and prefix belongs to the id it points at, if that id has an entry (a pointer at none finds no VM: left
        behind, it is nobody's). So `srmig vm set` by hand refuses what the agent refuses."""
        out = {}
        for k in self.vms.keys():
            vm = _vm_str(bytes(ffi.buffer(k.addr, 16)))
            out[vm] = (vm, where)
        for prefix, vm in self.list_vm_prefixes():
            if vm in out:  # (an address with both: its own entry is what the program takes)
                out.setdefault(prefix, (vm, where))
        return out

    def set_vms_bulk(self, entries: list[tuple[bytes, VmState]]) -> None:
        """Many VMs at once (benchmarks, reconciliation): one syscall each, no per-entry Python objects."""
        key = ffi.new("struct srmig_vm_key *")
        value = ffi.new("struct srmig_vm_value *")
        with self._writing():
            for addr, state in entries:
                ffi.memmove(key.addr, _vm_addr(addr), 16)
                value.state = int(state)
                self.vms.update(key, value)

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
    """A Dataplane whose VM writes apply to all of a VM's addresses at once: only the VM's id (its first
    address) has a vm_table entry; every other address `addresses(vm)` lists (a full-length key: IPv6 /128,
    IPv4 ::ffff:a.b.c.d/128) and every prefix points at the id in vm_prefixes, whose fallback the program takes
    when the exact lookup misses. So set_vm(vm, ...) is one write of the id's entry, and every address and
    prefix of the VM takes the new entry with the same packet: none is ever seen in a state the others have
    left (as with a write per address, one after the other). Whatever moves a VM through its migration's
    states by its id (the executor, the drain and the unpark, the agent's steady state and reconciliation)
    does so. Reads and everything else are the Dataplane's: get_vm(vm) is the id's entry, list_vms() lists
    every address with the id's entry (`of` naming the id)."""

    def __init__(self, dp: Dataplane, addresses: Callable[[str], tuple[str, ...]]):
        self.dp = dp
        self.addresses = addresses

    def __getattr__(self, name: str):
        return getattr(self.dp, name)

    def _all(self, vm: str) -> list[str]:
        """The id first, then the VM's other addresses (the VM map's key spelling decides what is the same)."""
        out, keys = [vm], {_vm_addr(vm)}
        for a in self.addresses(vm):
            if (k := _vm_prefix(a) if is_prefix(a) else _vm_addr(a)) not in keys:
                keys.add(k)
                out.append(a)
        return out

    def set_vm(self, vm: str, state: VmState | str, **kw) -> VmEntry:
        """The id's entry: one write (then the table generation's bump) that moves every address and prefix of
        the VM. Before it, what is not so yet is made so, in an order no packet can tell: each other address
        and prefix not pointing at the id is pointed at it, then an entry of its own an address still has (an
        older srmig wrote one per address; `srmig vm set` on that address) is deleted, which hands its packets
        to the id's entry (the same, until this write). Idempotent: in the steady state one lookup and one
        delete (of nothing) per other address, and the write."""
        me = _vm_str(_vm_addr(vm))
        with self.dp._writing():  # (one bracket: no copy is made until the id's write is done)
            for a in self._all(vm)[1:]:
                if self._owner(a) != me:
                    self.dp.set_vm_prefix(a, vm)
                if not is_prefix(a):
                    self.dp.vms.delete(self.dp._vm_key(a))
            return self.dp.set_vm(vm, state, **kw)

    def _owner(self, prefix: str) -> str | None:
        """The id `prefix` (or an address) points at: the longest match, as the program finds it (an address
        inside the VM's own prefix already takes the id's entry)."""
        owner = self.dp.vm_prefixes.lookup(self.dp._vm_prefix_key(prefix))
        return None if owner is None else _vm_str(bytes(ffi.buffer(owner.addr, 16)))

    def del_vm(self, vm: str) -> bool:
        """The id's entry first: from that one write on, no address or prefix of the VM finds it (a pointer at
        an id with no entry finds no VM). Then the pointers, those listed and any other at the VM (a VM gone
        from here whose list is not known any more: its grace period's end), and any entry of its own an
        address kept. Returns whether the id had an entry."""
        gone = self.dp.del_vm(vm)
        me = _vm_str(_vm_addr(vm))
        others = {vm_spelling(a) for a in self._all(vm)[1:]}
        for p in sorted(others | {p for p, owner in self.dp.list_vm_prefixes() if owner == me}, key=_vm_sort):
            self.dp.del_vm(p)
        return gone
