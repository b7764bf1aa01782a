"""The ingress's dataplane: H.Encaps (RFC 8986 5.1) towards each VM along its segment list.

A VM address is IPv6 or IPv4 (H.Encaps of an IPv4 packet: the SRH's next header is 4), or a prefix the VM
routes (BpfEncap: an entry under the prefix's network address and the prefix in encap_prefixes; the kernel: a
route to the prefix); a VM with several addresses takes one list for all of them (`set_many`).

Two implementations with one interface (`set`, `set_many`, `clear`, `clear_many`, `stats`; BpfEncap also
`entries`):
- BpfEncap (the default): srmig's own tc egress program (srmig/ebpf/encap.c) and its pinned maps. Needs no
  SRv6 in the kernel. One map write switches a VM's list atomically: that write is what an ingress's
  versioned ack stands for.
- KernelEncap: the kernel's `encap seg6 mode encap` routes (srmig.netlink), where the kernel has SRv6 lwtunnels.

Both are idempotent (set replaces; deleting an absent entry is success). With BpfEncap the route to the VM
(`route_vm`: a /128, or for an IPv4 address a /32 via the same IPv6 next hop, RFC 5549 style; a prefix's own)
only steers the packet out of the interface the program runs on, at the next hop towards the SIDs; its MTU
leaves room for the longest list the program can add, so the MTU never changes in the middle of a migration
and the kernel, not the program, tells senders the path MTU (ICMPv6 Packet Too Big or ICMP Fragmentation
Needed, TCP MSS).
"""

from __future__ import annotations

import errno
import ipaddress
import os
import struct
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from srmig import netlink
from srmig.ctl.maps import _addr, _str, _vm_addr, _vm_prefix, _vm_prefix_str, _vm_sort, _vm_str, is_prefix
from srmig.bpf import abi, libbpf, loader

ffi = libbpf.ffi
_consts = abi.ffi.dlopen(None)
MAX_SEGMENTS: int = _consts.SRMIG_ENCAP_MAX_SEGS
SRH_MAX: int = _consts.SRMIG_ENCAP_SRH_MAX
# Outer IPv6 header + the longest SRH: what the route to a VM reserves below the link's MTU.
MAX_OVERHEAD = 40 + SRH_MAX
DEFAULT_HOP_LIMIT = 64
COUNTERS = {v: k[len("SRMIG_ENCAP_"):].lower()
            for k, v in abi.ffi.typeof("enum srmig_encap_counter").relements.items() if not k.endswith("_MAX")}
N_COUNTERS: int = abi.ffi.typeof("enum srmig_encap_counter").relements["SRMIG_ENCAP_MAX"]
SRH_NEXT_IPV6, SRH_NEXT_IPV4, SRH_TYPE = 41, 4, 4


def vm_address(vm: str) -> str:
    """`vm` checked and normalised: an IPv6 or IPv4 address, or a prefix a VM routes (ADDRESS/LENGTH, no host
    bits), as srmig prints it."""
    return _vm_prefix_str(*_vm_prefix(vm)) if is_prefix(vm) else _vm_str(_vm_addr(vm))


def is_ipv4(vm: str) -> bool:
    return ipaddress.ip_network(vm).version == 4


def vm_prefix(vm: str) -> str:
    """The route's destination for a VM address: a.b.c.d/32 or x::y/128; a prefix the VM routes as it is."""
    if is_prefix(vm):
        return vm
    return f"{vm}/32" if is_ipv4(vm) else f"{vm}/128"


def check_addresses(addresses: Iterable[str]) -> list[str]:
    """A VM's addresses, each checked and normalised, duplicates removed (order kept); at least one."""
    out = list(dict.fromkeys(vm_address(a) for a in addresses))
    if not out:
        raise ValueError("a VM needs at least one address")
    return out


def check_segments(segments: list[str]) -> list[str]:
    if not segments:
        raise ValueError("a segment list needs at least one SID")
    if len(segments) > MAX_SEGMENTS:
        raise ValueError(f"{len(segments)} segments: srmig's H.Encaps carries at most {MAX_SEGMENTS}")
    for s in segments:
        _addr(s, "segment")
    return [str(ipaddress.IPv6Address(s)) for s in segments]


def build_srh(segments: list[str], reduced: bool = False, next_header: int = SRH_NEXT_IPV6) -> bytes:
    """The SRH H.Encaps pushes for `segments` (travel order), RFC 8754 2: next header the inner packet's
    (41 IPv6, 4 IPv4: SRH_NEXT_*), type 4,
    Segments Left = Last Entry = n - 1, segments in SRH order (the last one first). Reduced (H.Encaps.Red,
    RFC 8986 5.2): the first SID travels only in the outer destination, so the list holds n - 1 entries
    while Segments Left stays n - 1; a one-SID list then needs no SRH at all (b"")."""
    segments = check_segments(segments)
    carried = segments[1:] if reduced else segments
    if not carried:
        return b""
    entries = len(carried)
    head = struct.pack("!BBBBBBH", next_header, 2 * entries, SRH_TYPE, len(segments) - 1, entries - 1, 0, 0)
    return head + b"".join(_addr(s, "segment") for s in reversed(carried))


@dataclass
class EncapEntry:
    vm: str
    segments: list[str]
    source: str
    reduced: bool
    hop_limit: int
    stats: dict[str, int]

    def to_dict(self) -> dict:
        return {"vm": self.vm, "segments": self.segments, "source": self.source, "reduced": self.reduced,
                "hop_limit": self.hop_limit, "stats": self.stats}


def parse_srh(srh: bytes, first_sid: str) -> tuple[list[str], bool]:
    """(segments in travel order, reduced) from an entry's SRH bytes and outer destination."""
    if not srh:
        return [first_sid], True
    entries = srh[1] // 2
    carried = [str(ipaddress.IPv6Address(srh[8 + 16 * i:24 + 16 * i])) for i in range(entries)][::-1]
    reduced = srh[3] == entries  # SL counts the first SID that is not in the list
    return ([first_sid] + carried if reduced else carried), reduced


def source_towards(sid: str) -> str:
    """The address this namespace's kernel would pick as source towards `sid` (its preferred source)."""
    try:
        src = netlink.preferred_source(sid)
    except netlink.NetlinkError as e:
        raise ValueError(f"no route to the first SID {sid}: {os.strerror(e.code)}; give the outer source "
                         f"explicitly (--src, or [ingress] source)") from None
    if src:
        return src
    raise ValueError(f"the kernel picks no source address towards {sid}: give one (--src, or [ingress] source)")


class NotLoaded(loader.LoaderError):
    pass


class BpfEncap(libbpf.PinnedMaps):
    """The live H.Encaps maps of this network namespace (pinned by `srmig ingress load IFACE`)."""

    kind = "bpf"

    def __init__(self, pin_dir: Path | None = None, source: str | None = None, hop_limit: int = DEFAULT_HOP_LIMIT):
        loader.ensure_bpffs()
        super().__init__(pin_dir or loader.encap_pin_dir())
        if not (self.pin_dir / loader.PROG).exists():
            raise NotLoaded(f"srmig's H.Encaps is not loaded in this network namespace (no {self.pin_dir}): "
                            f"run `srmig ingress load IFACE` first")
        self.source = source
        self.hop_limit = hop_limit
        self.table = self._map("encap_table", "struct srmig_encap_key", "struct srmig_encap_value")
        self.vm_stats = self._map("encap_vm_stats", "struct srmig_encap_key", "struct srmig_encap_vm_stats",
                                  percpu=True)
        self.counters = self._map("encap_stats", "uint32_t", "uint64_t", percpu=True)
        # A program loaded before VM prefixes has no such pin: it steers addresses only (set_many says so).
        self.prefixes = (self._map("encap_prefixes", "struct srmig_vm_prefix_key", "struct srmig_encap_key")
                         if (self.pin_dir / "encap_prefixes").exists() else None)

    @staticmethod
    def _key(vm: str):
        """The encap_table key (srmig_abi.h): an IPv6 address as it is, IPv4 as ::ffff:a.b.c.d; a prefix's entry
        under its network address (the program finds it through encap_prefixes)."""
        key = ffi.new("struct srmig_encap_key *")
        ffi.memmove(key.addr, _vm_prefix(vm)[0] if is_prefix(vm) else _vm_addr(vm), 16)
        return key

    @staticmethod
    def _prefix_key(prefix: str):
        addr, prefixlen = _vm_prefix(prefix)
        key = ffi.new("struct srmig_vm_prefix_key *")
        key.prefixlen = prefixlen
        ffi.memmove(key.addr, addr, 16)
        return key

    def set(self, vm: str, segments: list[str], source: str | None = None, reduced: bool = False) -> None:
        """Steer `vm` (one IPv6 or IPv4 address) along `segments` (travel order): one map write, atomic for
        the packets."""
        self.set_many([vm], segments, source, reduced)

    def set_many(self, addresses: Iterable[str], segments: list[str], source: str | None = None,
                 reduced: bool = False) -> None:
        """Steer every address of one VM (IPv6 and IPv4 alike) along one segment list. Everything is checked
        before anything is written; then one map write per address, each atomic for its packets. The
        addresses switch one after the other, microseconds apart, not at one instant: a packet never mixes
        two lists, and the migration already tolerates two ingresses switching at different moments (the
        old list and the new one both reach the VM), so two addresses of one ingress may too."""
        addresses = check_addresses(addresses)
        segments = check_segments(segments)
        if self.prefixes is None and any(is_prefix(a) for a in addresses):
            raise ValueError("the loaded H.Encaps program predates VM prefixes: `srmig ingress unload`, then load "
                             "it again")
        src = source or self.source or source_towards(segments[0])
        values = {}
        for family, next_header in ((6, SRH_NEXT_IPV6), (4, SRH_NEXT_IPV4)):
            srh = build_srh(segments, reduced, next_header)
            value = ffi.new("struct srmig_encap_value *")
            ffi.memmove(value.src, _addr(src, "outer source"), 16)
            ffi.memmove(value.first_sid, _addr(segments[0], "segment"), 16)
            value.srh_len = len(srh)
            value.hop_limit = self.hop_limit
            ffi.memmove(value.srh, srh, len(srh))
            values[family] = value
        for vm in addresses:
            key = self._key(vm)
            # The VM's counters exist before its first packet (the program only looks them up); kept across
            # list switches, so BPF_NOEXIST.
            try:
                self.vm_stats.update(key, ffi.new("struct srmig_encap_vm_stats *"), libbpf.BPF_NOEXIST)
            except OSError as e:
                if e.errno != errno.EEXIST:
                    raise
            self.table.update(key, values[4 if is_ipv4(vm) else 6])
            if is_prefix(vm):  # after its entry: the trie never points at nothing it has not had
                self.prefixes.update(self._prefix_key(vm), key)

    def clear(self, vm: str) -> bool:
        key = self._key(vm)
        if is_prefix(vm) and self.prefixes is not None:
            self.prefixes.delete(self._prefix_key(vm))  # before its entry, as set_many in reverse
        found = self.table.delete(key)
        self.vm_stats.delete(key)
        return found

    def clear_many(self, addresses: Iterable[str]) -> dict[str, bool]:
        """clear() for every address of one VM: {address: whether it had an entry}."""
        return {vm: self.clear(vm) for vm in check_addresses(addresses)}

    def _vm_stats(self, key) -> dict[str, int]:
        per_cpu = self.vm_stats.lookup(key) or []
        return {f: sum(getattr(v, f) for v in per_cpu) for f in ("packets", "bytes", "dropped")}

    def entries(self) -> list[EncapEntry]:
        """Every entry, a prefix's named by the prefix."""
        prefix_of = {}
        for k, v in (self.prefixes.items() if self.prefixes is not None else ()):
            prefix_of[bytes(ffi.buffer(v.addr, 16))] = _vm_prefix_str(bytes(ffi.buffer(k.addr, 16)), k.prefixlen)
        out = []
        for key, v in self.table.items():
            segments, reduced = parse_srh(bytes(ffi.buffer(v.srh, v.srh_len)), _str(v.first_sid))
            raw = bytes(ffi.buffer(key.addr, 16))
            vm = prefix_of.get(raw) or _vm_str(raw)
            out.append(EncapEntry(vm, segments, _str(v.src), reduced, v.hop_limit, self._vm_stats(key)))
        return sorted(out, key=lambda e: _vm_sort(e.vm))

    def outcomes(self) -> dict[str, int]:
        """{"pass": n, "done": n, "drop_too_big": n, ...}: a few array reads, whatever the number of VMs."""
        out = {}
        for idx in range(N_COUNTERS):
            per_cpu = self.counters.lookup(ffi.new("uint32_t *", idx)) or []
            out[COUNTERS.get(idx, str(idx))] = int(sum(per_cpu))
        return out

    def stats(self) -> dict:
        """{"counters": outcomes(), "vms": {vm: {"packets", "bytes", "dropped"}}, "families": {"6": {...},
        "4": {...}}}: reads every VM's entry; a family's counters are the sums over its VM addresses."""
        vms = {e.vm: e.stats for e in self.entries()}
        families = {f: {k: 0 for k in ("packets", "bytes", "dropped")} for f in ("6", "4")}
        for vm, s in vms.items():
            fam = families["4" if is_ipv4(vm) else "6"]
            for k in fam:
                fam[k] += s[k]
        return {"encap": self.kind, "counters": self.outcomes(), "vms": vms, "families": families}


class KernelEncap:
    """H.Encaps with the kernel's `encap seg6 mode encap` routes, where the kernel has SRv6 lwtunnels."""

    kind = "kernel"

    def __init__(self, gateway: str, oif: int, ipr=None):
        """`ipr`: a netlink.handle() to program the routes with (None: one of its own, closed by close())."""
        self.gateway, self.oif = gateway, oif
        self.ipr = ipr or netlink.handle()
        self._own_ipr = ipr is None

    def close(self) -> None:
        if self._own_ipr:
            self.ipr.close()

    def set(self, vm: str, segments: list[str], source: str | None = None, reduced: bool = False) -> None:
        """The VM's /128 (or IPv4 /32) route with `encap seg6 mode encap` along `segments` (travel order).
        `source` is not used: the kernel takes its outer source from `ip sr tunsrc`."""
        self.set_many([vm], segments, source, reduced)

    def set_many(self, addresses: Iterable[str], segments: list[str], source: str | None = None,
                 reduced: bool = False) -> None:
        """One route per address of one VM, all along `segments`. An IPv4 address gets an IPv4 /32 route with
        the same seg6 encap (the kernel's seg6 encapsulates IPv4 with SRH next header 4, RFC 8986 5.1) and no
        gateway: the lwtunnel routes the packet by its outer destination after encapsulating it, so the
        route only names the device (`ip route add A.B.C.D/32 encap seg6 mode encap segs ... dev IF`)."""
        addresses = check_addresses(addresses)
        segments = check_segments(segments)
        if reduced:
            raise ValueError("reduced encapsulation (H.Encaps.Red) is srmig's BPF encap only: use encap = \"bpf\"")
        for vm in addresses:
            netlink.replace_route(vm_prefix(vm), self.oif, gateway=None if is_ipv4(vm) else self.gateway,
                                  encap=netlink.seg6_encap(segments), ipr=self.ipr)

    def clear(self, vm: str) -> bool:
        return clear_route(vm, self.ipr)

    def clear_many(self, addresses: Iterable[str]) -> dict[str, bool]:
        return {vm: self.clear(vm) for vm in check_addresses(addresses)}

    def outcomes(self) -> dict[str, int]:
        return {}  # the kernel's seg6 routes count nothing per outcome

    def stats(self) -> dict:
        return {"encap": self.kind, "counters": {}, "vms": {}, "families": {}}


def route_vm(vm: str, gateway: str, oif: int, ipr=None) -> None:
    """The route that takes `vm`'s packets to the interface running H.Encaps, at the next hop towards the
    SIDs. Its MTU is the link's minus the longest encapsulation, so no packet grows past the link. For an
    IPv4 address: a /32 via the same IPv6 next hop (`via inet6`, RFC 5549 style): the fabric needs no IPv4,
    the kernel resolves the next hop by ND and the packet is IPv6 once it leaves. `ipr`: a netlink.handle()
    (None: this namespace)."""
    vm = vm_address(vm)
    link_mtu = netlink.link_mtu(oif, ipr)
    mtu = link_mtu - MAX_OVERHEAD
    if mtu < 1280:
        raise ValueError(f"the ingress interface's MTU {link_mtu} leaves {mtu} for VM traffic after srmig's "
                         f"{MAX_OVERHEAD}-byte encapsulation; IPv6 needs 1280: raise the fabric MTU to at least "
                         f"{1280 + MAX_OVERHEAD}")
    netlink.replace_route(vm_prefix(vm), oif, gateway=gateway, mtu=mtu, ipr=ipr)


def clear_route(vm: str, ipr=None) -> bool:
    """Remove `vm`'s /128 (IPv4: /32) route; False when there was none. `ipr`: as route_vm's."""
    return netlink.del_route(vm_prefix(vm_address(vm)), ipr)
