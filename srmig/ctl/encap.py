"""SRv6 encapsulation of the packets the agent sends itself (the drain, the abort's return and unpark):
RFC 8986 H.Encaps of an inner IPv6 or IPv4 packet, and its reverse; and which frames of a VM's tap are the
VM's (`VmPackets`). The program's own H.Encaps, at an ingress, is srmig/ebpf/encap.c."""

from __future__ import annotations

import functools
import ipaddress
import struct
from collections.abc import Iterable

ETH_P_IPV6 = b"\x86\xdd"
ETH_P_IP = b"\x08\x00"
NH_IPV4 = 4    # the SRH's next header for an inner IPv4 packet (IP-in-IPv6, RFC 8986 4.6, End.DX4)
NH_IPV6 = 41   # ... for an inner IPv6 packet (RFC 8986 4.5, End.DX6)
NH_ICMPV6 = 58
ND_TYPES = range(133, 138)  # ICMPv6 RS, RA, NS, NA, Redirect (RFC 4861 4): link-local business, never carried
_NH_OF = {6: NH_IPV6, 4: NH_IPV4}
_MIN_LEN = {6: 40, 4: 20}   # the fixed header of each family


def family(packet: bytes) -> int | None:
    """6 or 4: the IP version of `packet` (its first nibble), None for anything else."""
    v = packet[0] >> 4 if packet else 0
    return v if v in _MIN_LEN and len(packet) >= _MIN_LEN[v] else None


def encapsulate(frame: bytes, src: str, segments: list[str]) -> bytes | None:
    """H.Encaps of the IPv6 or IPv4 packet inside Ethernet frame `frame` with `segments` (travel order); None
    for any other frame (ARP has no place on the path)."""
    inner = frame[14:]
    et = frame[12:14]
    if (et == ETH_P_IPV6 and family(inner) == 6) or (et == ETH_P_IP and family(inner) == 4):
        return encapsulate_packet(inner, src, segments)
    return None


def encapsulate_packet(inner: bytes, src: str, segments: list[str]) -> bytes:
    """RFC 8986 5.1 H.Encaps of IPv6 or IPv4 packet `inner` (its version says which): outer IPv6 from `src`
    + SRH with `segments`, next header 41 or 4. The inner packet is not touched (nor its TTL, hop limit or
    checksum: the VM's business)."""
    v = family(inner)
    if v is None:
        raise ValueError(f"not an IPv6 or IPv4 packet (version {inner[0] >> 4 if inner else None})")
    addrs, srh = _headers(src, tuple(segments))
    return _FIXED.pack(6 << 28, 1 + len(srh) + len(inner), 43, 64) + addrs + _NH_BYTE[v] + srh + inner


_FIXED = struct.Struct("!IHBB")  # version, payload length, next header (the SRH), hop limit
_NH_BYTE = {6: bytes((NH_IPV6,)), 4: bytes((NH_IPV4,))}


@functools.lru_cache(maxsize=64)
def _headers(src: str, segments: tuple[str, ...]) -> tuple[bytes, bytes]:
    """What H.Encaps writes the same for every packet along `segments` from `src`: the outer addresses, and
    the SRH after its next header (segments reversed, RFC 8754 2; SL and last entry at the end). Parsed once
    per list, not per packet: a drain sends thousands along one."""
    segs = [ipaddress.IPv6Address(s).packed for s in reversed(segments)]
    srh = struct.pack("!BBBBBH", 2 * len(segs), 4, len(segs) - 1, len(segs) - 1, 0, 0) + b"".join(segs)
    return ipaddress.IPv6Address(src).packed + ipaddress.IPv6Address(segments[0]).packed, srh


def decapsulate(packet: bytes) -> bytes | None:
    """The inner packet, IPv6 or IPv4, of an SRv6 encapsulation (outer IPv6, an optional SRH); None without
    one, or when the inner version disagrees with the next header. `family()` of it says which."""
    if len(packet) < 40 or packet[0] >> 4 != 6:
        return None
    nh, off = packet[6], 40
    if nh == 43 and len(packet) >= off + 8:
        nh, off = packet[off], off + 8 * (packet[off + 1] + 1)
    inner = packet[off:]
    if nh not in (NH_IPV6, NH_IPV4) or family(inner) != (6 if nh == NH_IPV6 else 4):
        return None
    return inner


def vm_key(address: str) -> bytes:
    """A VM address as the program keys it (vm_table, hold and shadow records; srmig_abi.h): IPv6 as it is,
    IPv4 as its IPv4-mapped IPv6 address ::ffff:a.b.c.d."""
    a = ipaddress.ip_address(address)
    return a.packed if a.version == 6 else bytes(10) + b"\xff\xff" + a.packed


class VmPackets:
    """Which packets are a VM's: IPv6 or IPv4 packets to one of its `addresses` (any number, both
    families) or to any address of a prefix it routes (ADDRESS/LENGTH among them), ND aside (each host answers
    its own). None: every IPv6 or IPv4 packet but ND (a caller that does not know the VM's addresses).
    `addresses` keeps the addresses alone, `prefixes` the prefixes; the packets of all of them take the entry of
    the VM's id (srmig.ctl.maps.VmAddressSet), and the hold and shadow records name the id (`keys`: any of the
    VM's addresses as the vm_table key, to the address)."""

    def __init__(self, addresses: Iterable[str] | None):
        self.addresses: list[str] | None = None
        self.prefixes: list[str] = []
        self._to: dict[int, set[bytes]] = {6: set(), 4: set()}
        self._nets: dict[int, list[tuple[int, int]]] = {6: [], 4: []}  # (network, mask) as integers
        if addresses is not None:
            addresses = list(addresses)
            nets = list(dict.fromkeys(ipaddress.ip_network(a) for a in addresses if "/" in a))
            parsed = list(dict.fromkeys(ipaddress.ip_address(a) for a in addresses if "/" not in a))
            self.addresses = [str(a) for a in parsed]
            self.prefixes = [str(n) for n in nets]
            for a in parsed:
                self._to[a.version].add(a.packed)
            for n in nets:
                self._nets[n.version].append((int(n.network_address), int(n.netmask)))
        self.keys: dict[bytes, str] = {vm_key(a): a for a in self.addresses or ()}  # vm_table key -> address

    def packet(self, frame: bytes) -> bytes | None:
        """The IP packet in Ethernet frame `frame` (from a VM's tap) if it is the VM's, else None."""
        inner, et = frame[14:], frame[12:14]
        if et == ETH_P_IPV6 or et == ETH_P_IP:
            v = family(inner)
            if v == (6 if et == ETH_P_IPV6 else 4) and self._owns(inner, v):
                return inner
        return None

    def owns(self, packet: bytes) -> bool:
        """Whether IP packet `packet` is the VM's."""
        v = family(packet)
        return v is not None and self._owns(packet, v)

    def _owns(self, packet: bytes, v: int) -> bool:
        if v == 6:
            if packet[6] == NH_ICMPV6 and len(packet) > 40 and packet[40] in ND_TYPES:
                return False
            da = packet[24:40]
        else:
            da = packet[16:20]
        if self.addresses is None or da in self._to[v]:
            return True
        n = int.from_bytes(da, "big")
        return any(n & mask == net for net, mask in self._nets[v])
