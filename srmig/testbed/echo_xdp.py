"""The test guest's XDP echo responder: ICMPv6 Echo Request -> Echo Reply and ICMP Echo -> Echo Reply, answered
by an XDP program on the guest's eth0 (XDP_TX) before its network stack sees them.

Why: under TCG the guest's kernel spends most of an echo's cost building the reply (socket buffer, route
lookup, ICMP(v6) send path, qdisc). Measured on 2 shared cores, QEMU 7.2, one vCPU, 10,000 probes/s per
family: the vCPU thread spent ~50-65 us per echo answered by the stack (~19 us of it receiving, ~19 us with
echo_ignore_all), the guest answered ~12,000-17,000 echo/s at most and the queue in front of it held ~1 s
(round trip p50 0.7-1 s, thousands lost in the tap's queue); with this program ~19 us per echo, all
20,000 echo/s answered, round trip p50 0.3 ms (docs/platform.md, "How many echo requests the guest answers").

What it does, per frame (anything else: XDP_PASS, to the stack):
* Ethernet + IPv6 (next header 58, no extension headers) + ICMPv6 type 128: swap the MAC addresses and the
  IPv6 source and destination, type 129, checksum updated incrementally (RFC 1624 eqn. 3: only the type
  changes; swapping the addresses leaves the pseudo-header's sum unchanged).
* Ethernet + IPv4 (IHL 5, protocol 1) + ICMP type 8: the same with the IPv4 addresses, type 0 (RFC 792). The
  IPv4 header checksum is unchanged (the swap keeps its sum); TTL and hop limit are left as they arrived.
The payload (the probe's magic, sequence number and send time) comes back untouched.

The price: the guest's kernel counters (Icmp6InEchos, IcmpOutEchoReps, ...) no longer see these echoes; only
the device counters (eth0 rx_packets / tx_packets) do. srmig.testbed.guest.unanswered() reads those then.

The program is C (echo_xdp.c), compiled by bcc's clang/LLVM when the guest image is built (`./run setup`
runs python -m srmig.testbed.guest build; the host has no clang of its own, bcc embeds one). bcc loads
programs itself and writes no object file, so its instructions (BPF.dump_func) are wrapped here in a minimal
relocatable ELF: no maps, no relocations, no BTF. The guest's one BPF loader is iproute2, and `ip link set
dev eth0 xdp` takes eBPF only as an object file (`obj FILE sec xdp`, through libbpf) or a pinned program
(its `bytecode` option is classic BPF, and tc's). The instructions must need nothing bcc resolved on this
host: instructions() refuses map references and calls.
"""

from __future__ import annotations

import functools
import os
import struct
from pathlib import Path

SOURCE = Path(__file__).with_name("echo_xdp.c")
SECTION = "xdp"
PROG_NAME = "srmig_echo"   # the C function, and the ELF's function symbol
XDP_PASS, XDP_TX = 2, 3

# struct bpf_insn (include/uapi/linux/bpf.h): opcode, dst_reg:4 | src_reg:4, off, imm
_INSN = struct.Struct("<BBhi")
_BPF_LD_IMM64 = 0x18      # BPF_LD | BPF_IMM | BPF_DW: src_reg != 0 means a map, map value, BTF id or function
_BPF_JMP_CALL = 0x85      # BPF_JMP | BPF_CALL: a helper (src_reg 0), a function (1) or a kfunc (2)


class NotStandalone(ValueError):
    """Compiled instructions that refer to something outside themselves (a map, a helper, a function)."""


def check_standalone(insns: bytes) -> bytes:
    """`insns` unchanged if they need nothing outside themselves, else NotStandalone. A map reference would
    carry this host's map fd, a BPF-to-BPF call a function dump_func did not copy; a helper call needs no
    relocation but is refused too: the responder needs none, and the guest's kernel may lack a helper."""
    if len(insns) % _INSN.size:
        raise NotStandalone(f"{len(insns)} bytes is not a whole number of instructions")
    for i in range(0, len(insns), _INSN.size):
        op, regs, _, imm = _INSN.unpack_from(insns, i)
        if op == _BPF_LD_IMM64 and regs >> 4:
            raise NotStandalone(f"instruction {i // _INSN.size}: a 64-bit load of kind {regs >> 4} (a map?)")
        if op == _BPF_JMP_CALL:
            raise NotStandalone(f"instruction {i // _INSN.size}: a call (kind {regs >> 4}, {imm})")
    return insns


@functools.cache
def instructions() -> bytes:
    """The program as struct bpf_insn[], compiled from SOURCE by bcc (once per process: ~1 s of clang)."""
    from srmig.bpf import loader  # noqa: PLC0415  (bcc and kernel headers only when compiling)

    ksrc = loader.kernel_source()
    if ksrc:
        os.environ["BCC_KERNEL_SOURCE"] = ksrc
    try:
        import bcc  # noqa: PLC0415
    except ImportError:
        raise loader.LoaderError("bcc is not importable: apt-get install python3-bpfcc, and use the venv made "
                                 "by ./run setup") from None
    b = bcc.BPF(src_file=str(SOURCE).encode())
    try:
        return check_standalone(bytes(b.dump_func(PROG_NAME.encode())))
    finally:
        b.cleanup()


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
