"""SRv6 packets with scapy, in the field's terms: H.Encaps of an inner IPv6 or IPv4 packet with a segment list."""

from __future__ import annotations

from scapy.layers.inet import IP
from scapy.layers.inet6 import IPv6, IPv6ExtHdrHopByHop, IPv6ExtHdrSegmentRouting, UDP
from scapy.layers.l2 import Ether
from scapy.packet import Raw

INGRESS_MAC = "02:00:00:00:00:aa"


def inner(dst: str, src: str = "2001:db8:9::1", payload: bytes = b"srmig-probe", hlim: int = 64) -> IPv6:
    return IPv6(src=src, dst=dst, hlim=hlim) / UDP(sport=4000, dport=5000) / Raw(payload)


def inner4(dst: str, src: str = "192.0.2.1", payload: bytes = b"srmig-probe", ttl: int = 64) -> IP:
    """The IPv4 twin of inner(): an inner IPv4 packet (SRH next header 4, RFC 8986 4.6)."""
    return IP(src=src, dst=dst, ttl=ttl) / UDP(sport=4000, dport=5000) / Raw(payload)


def h_encaps(segments: list[str], inner_pkt, src: str = "2001:db8:9::1", sl: int | None = None,
             hlim: int = 64, dst_mac: str = "02:00:00:00:00:01", last_entry: int | None = None,
             srh: bool = True, hop_by_hop: bool = False):
    """RFC 8986 5.1 H.Encaps: outer IPv6 + SRH around `inner_pkt`.

    `segments` in travel order (first SID visited first); the SRH stores them reversed (RFC 8754 2), and
    SL starts at len-1 with DA = the first segment. `sl`/`last_entry` override for malformed cases.
    """
    sl = len(segments) - 1 if sl is None else sl
    dst = segments[len(segments) - 1 - sl] if 0 <= sl < len(segments) else segments[0]
    outer = Ether(src=INGRESS_MAC, dst=dst_mac) / IPv6(src=src, dst=dst, hlim=hlim)
    if hop_by_hop:
        outer = outer / IPv6ExtHdrHopByHop()
    if srh:
        le = len(segments) - 1 if last_entry is None else last_entry
        outer = outer / IPv6ExtHdrSegmentRouting(addresses=list(reversed(segments)), segleft=sl, lastentry=le)
    return outer / inner_pkt
