"""SRv6 encapsulation of the packets the agent sends itself (the drain, the abort's return and unpark):
RFC 8986 H.Encaps, and its reverse. The program's own H.Encaps, at an ingress, is srmig/ebpf/encap.c."""

from __future__ import annotations

import ipaddress
import struct


def encapsulate(frame: bytes, src: str, segments: list[str]) -> bytes | None:
    """H.Encaps of the IPv6 packet inside Ethernet frame `frame` with `segments` (travel order); None for a
    frame that is not IPv6 (ND or ARP for the VM has no place on the path)."""
    if len(frame) < 14 + 40 or frame[12:14] != b"\x86\xdd":
        return None
    return encapsulate_packet(frame[14:], src, segments)


def encapsulate_packet(inner: bytes, src: str, segments: list[str]) -> bytes:
    """RFC 8986 5.1 H.Encaps of IPv6 packet `inner`: outer IPv6 from `src` + SRH with `segments`."""
    segs = [ipaddress.IPv6Address(s).packed for s in reversed(segments)]
    srh = struct.pack("!BBBBBBH", 41, 2 * len(segs), 4, len(segs) - 1, len(segs) - 1, 0, 0) + b"".join(segs)
    payload = srh + inner
    outer = struct.pack("!IHBB", 6 << 28, len(payload), 43, 64)
    outer += ipaddress.IPv6Address(src).packed + ipaddress.IPv6Address(segments[0]).packed
    return outer + payload


def decapsulate(packet: bytes) -> bytes | None:
    """The inner IPv6 packet of an SRv6 encapsulation (outer IPv6, an optional SRH); None without one."""
    if len(packet) < 40 or packet[0] >> 4 != 6:
        return None
    nh, off = packet[6], 40
    if nh == 43 and len(packet) >= off + 8:
        nh, off = packet[off], off + 8 * (packet[off + 1] + 1)
    if nh != 41 or len(packet) < off + 40:
        return None
    return packet[off:]
