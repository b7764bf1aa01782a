"""The test guest's XDP echo responder: ICMPv6 Echo Request -> Echo Reply and ICMP Echo -> Echo Reply, answered
by an XDP program on the guest's eth0 (XDP_TX) before its network stack sees them.

Why: under TCG the guest's kernel spends most of an echo's cost building the reply (socket buffer, route
lookup, ICMP(v6) send path, qdisc). Measured on 2 shared cores, QEMU 7.2, one vCPU, 10,000 probes/s per
family: the vCPU thread spent ~50-65 us per echo answered by the stack (~19 us of it receiving, ~19 us with
echo_ignore_all), the guest answered ~12,000-17,000 echo/s at most and the queue in front of it held ~1 s
(round trip p50 0.7-1 s, thousands lost in the tap's queue); with this program ~19 us per echo, all
20,000 echo/s answered, round trip p50 0.3 ms (docs/platform.md, "The test guest").

What it does, per frame (anything else: XDP_PASS, to the stack):
* Ethernet + IPv6 (next header 58, no extension headers) + ICMPv6 type 128: swap the MAC addresses and the
  IPv6 source and destination, type 129, checksum updated incrementally (RFC 1624 eqn. 3: only the type
  changes; swapping the addresses leaves the pseudo-header's sum unchanged).
* Ethernet + IPv4 (IHL 5, protocol 1) + ICMP type 8: the same with the IPv4 addresses, type 0 (RFC 792). The
  IPv4 header checksum is unchanged (the swap keeps its sum); TTL and hop limit are left as they arrived.
The payload (the probe's magic, sequence number and send time) comes back untouched.

The price: the guest's kernel counters (Icmp6InEchos, IcmpOutEchoReps, ...) no longer see these echoes; only
the device counters (eth0 rx_packets / tx_packets) do. srmig.testbed.guest.unanswered() reads those then.

The program is assembled here (no compiler: the host has none) and wrapped in a minimal relocatable ELF (no
maps, no relocations, no BTF) that iproute2's `ip link set dev eth0 xdp obj FILE sec xdp` loads with libbpf.
"""

from __future__ import annotations

import struct

SECTION = "xdp"
PROG_NAME = "srmig_echo"
XDP_PASS, XDP_TX = 2, 3

# BPF opcodes (include/uapi/linux/bpf.h): class | size | mode, class | op | source
_LDXW, _LDXH, _LDXB, _LDXDW = 0x61, 0x69, 0x71, 0x79
_STXW, _STXH, _STXDW = 0x63, 0x6B, 0x7B
_STB = 0x72                      # BPF_ST | BPF_MEM | BPF_B: store an immediate byte
_MOV_K, _MOV_X, _ADD_K, _ADD_X = 0xB7, 0xBF, 0x07, 0x0F
_AND_K, _RSH_K, _XOR_K = 0x57, 0x77, 0xA7
_JGT_X, _JNE_K, _JA, _EXIT = 0x2D, 0x55, 0x05, 0x95

# Frame offsets: Ethernet 14, IPv4 20 (IHL 5), IPv6 40, ICMP(v6) type/code/checksum.
ETH_HLEN = 14
V4_PROTO, V4_SRC, V4_DST, V4_ICMP = 23, 26, 30, 34
V6_NEXT, V6_SRC, V6_DST, V6_ICMP = 20, 22, 38, 54
V4_MIN, V6_MIN = V4_ICMP + 8, V6_ICMP + 8   # through the echo's identifier and sequence number


def _insn(op: int, dst: int = 0, src: int = 0, off: int = 0, imm: int = 0) -> list:
    return [op, dst, src, off, imm]


def instructions() -> bytes:
    """The program as struct bpf_insn[] (r1: the xdp_md context; r2 data, r3 data_end)."""
    code: list[list] = []
    labels: dict[str, int] = {}
    jumps: list[tuple[int, str]] = []

    def emit(op, dst=0, src=0, off=0, imm=0, to: str | None = None):
        if to is not None:
            jumps.append((len(code), to))
        code.append(_insn(op, dst, src, off, imm))

    def swap_macs():
        emit(_LDXW, 6, 2, 0), emit(_LDXH, 7, 2, 4), emit(_LDXW, 8, 2, 6), emit(_LDXH, 9, 2, 10)
        emit(_STXW, 2, 8, 0), emit(_STXH, 2, 9, 4), emit(_STXW, 2, 6, 6), emit(_STXH, 2, 7, 10)

    def checksum(at: int, old_word: int, new_word: int):
        # RFC 1624 eqn. 3: HC' = ~(~HC + ~m + m'). The words are loaded in host (little-endian) order: one's
        # complement sums do not depend on byte order, so the old and new words are given byte-swapped too.
        emit(_LDXH, 6, 2, at)
        emit(_XOR_K, 6, imm=0xFFFF)
        emit(_ADD_K, 6, imm=(~old_word & 0xFFFF) + new_word)
        for _ in range(2):  # fold the carries back in (the sum of three 16-bit words fits two folds)
            emit(_MOV_X, 7, 6), emit(_RSH_K, 7, imm=16), emit(_AND_K, 6, imm=0xFFFF), emit(_ADD_X, 6, 7)
        emit(_XOR_K, 6, imm=0xFFFF)
        emit(_STXH, 2, 6, at)

    def le16(first: int, second: int) -> int:
        """Two bytes in frame order as a little-endian load sees them."""
        return first | second << 8

    emit(_LDXW, 2, 1, 0)                # data
    emit(_LDXW, 3, 1, 4)                # data_end
    emit(_MOV_K, 0, imm=XDP_PASS)
    emit(_MOV_X, 4, 2), emit(_ADD_K, 4, imm=V4_MIN), emit(_JGT_X, 4, 3, to="out")
    emit(_LDXH, 5, 2, 12)               # EtherType
    emit(_JNE_K, 5, imm=le16(0x08, 0x00), to="ipv6")
    emit(_LDXB, 5, 2, ETH_HLEN), emit(_JNE_K, 5, imm=0x45, to="out")       # version 4, IHL 5: no options
    emit(_LDXB, 5, 2, V4_PROTO), emit(_JNE_K, 5, imm=1, to="out")          # ICMP
    emit(_LDXB, 5, 2, V4_ICMP), emit(_JNE_K, 5, imm=8, to="out")           # Echo
    swap_macs()
    emit(_LDXW, 6, 2, V4_SRC), emit(_LDXW, 7, 2, V4_DST), emit(_STXW, 2, 7, V4_SRC), emit(_STXW, 2, 6, V4_DST)
    emit(_STB, 2, 0, V4_ICMP, 0)                                            # Echo Reply
    checksum(V4_ICMP + 2, le16(8, 0), le16(0, 0))
    emit(_MOV_K, 0, imm=XDP_TX), emit(_JA, to="out")
    labels["ipv6"] = len(code)
    emit(_JNE_K, 5, imm=le16(0x86, 0xDD), to="out")
    emit(_MOV_X, 4, 2), emit(_ADD_K, 4, imm=V6_MIN), emit(_JGT_X, 4, 3, to="out")
    emit(_LDXB, 5, 2, V6_NEXT), emit(_JNE_K, 5, imm=58, to="out")          # ICMPv6, no extension header
    emit(_LDXB, 5, 2, V6_ICMP), emit(_JNE_K, 5, imm=128, to="out")         # Echo Request
    swap_macs()
    for half in (0, 8):
        emit(_LDXDW, 6, 2, V6_SRC + half), emit(_LDXDW, 7, 2, V6_DST + half)
        emit(_STXDW, 2, 7, V6_SRC + half), emit(_STXDW, 2, 6, V6_DST + half)
    emit(_STB, 2, 0, V6_ICMP, 129)                                          # Echo Reply
    checksum(V6_ICMP + 2, le16(128, 0), le16(129, 0))
    emit(_MOV_K, 0, imm=XDP_TX)
    labels["out"] = len(code)
    emit(_EXIT)
    for at, name in jumps:
        code[at][3] = labels[name] - at - 1
    return b"".join(struct.pack("<BBhi", op, dst | src << 4, off, imm) for op, dst, src, off, imm in code)


def elf_object(insns: bytes | None = None) -> bytes:
    """A relocatable BPF ELF (EM_BPF 247) with the program in section SECTION, a global function symbol
    PROG_NAME over it, and a "license" section ("GPL"): what libbpf needs to open and load it."""
    insns = instructions() if insns is None else insns
    lic = b"GPL\0"
    names = [SECTION.encode(), b"license", b".symtab", b".strtab", b".shstrtab"]
    shstrtab = b"\0" + b"".join(n + b"\0" for n in names)
    strtab = b"\0" + PROG_NAME.encode() + b"\0_license\0"
    sym = struct.Struct("<IBBHQQ")      # Elf64_Sym: name, info, other, shndx, value, size
    symtab = (sym.pack(0, 0, 0, 0, 0, 0)
              + sym.pack(1, 1 << 4 | 2, 0, 1, 0, len(insns))                      # STB_GLOBAL, STT_FUNC
              + sym.pack(2 + len(PROG_NAME), 1 << 4 | 1, 0, 2, 0, len(lic)))      # STB_GLOBAL, STT_OBJECT
    body, pos, offsets = b"", 64, []
    for data, align in ((insns, 8), (lic, 1), (symtab, 8), (strtab, 1), (shstrtab, 1)):
        pad = -pos % align
        body += b"\0" * pad
        pos += pad
        offsets.append(pos)
        body += data
        pos += len(data)
    pad = -pos % 8
    body += b"\0" * pad
    shoff = pos + pad

    def name_at(i: int) -> int:
        return 1 + sum(len(n) + 1 for n in names[:i])
    shdr = struct.Struct("<IIQQQQIIQQ")  # Elf64_Shdr
    sections = shdr.pack(0, 0, 0, 0, 0, 0, 0, 0, 0, 0)
    sections += shdr.pack(name_at(0), 1, 0x6, 0, offsets[0], len(insns), 0, 0, 8, 0)   # PROGBITS, AX
    sections += shdr.pack(name_at(1), 1, 0x3, 0, offsets[1], len(lic), 0, 0, 1, 0)     # PROGBITS, WA
    sections += shdr.pack(name_at(2), 2, 0, 0, offsets[2], len(symtab), 4, 1, 8, 24)   # SYMTAB: link strtab
    sections += shdr.pack(name_at(3), 3, 0, 0, offsets[3], len(strtab), 0, 0, 1, 0)    # STRTAB
    sections += shdr.pack(name_at(4), 3, 0, 0, offsets[4], len(shstrtab), 0, 0, 1, 0)  # STRTAB
    ident = b"\x7fELF" + bytes([2, 1, 1, 0]) + bytes(8)   # ELFCLASS64, little-endian, version 1
    header = ident + struct.pack("<HHIQQQIHHHHHH", 1, 247, 1, 0, 0, shoff, 0, 64, 0, 0, 64, 6, 5)
    return header + body + sections
