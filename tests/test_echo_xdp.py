"""The guest's XDP echo responder (srmig/testbed/echo_xdp.c, compiled by bcc in srmig.testbed.echo_xdp): real
frames through the compiled instructions with BPF_PROG_TEST_RUN on the host's kernel (loaded on their own,
as the guest loads them: no map, no relocation), and the ELF object the guest loads with iproute2."""

from __future__ import annotations

import os
import shutil
import struct
import subprocess

import pytest
from scapy.layers.inet import ICMP, IP, UDP
from scapy.layers.inet6 import ICMPv6EchoReply, ICMPv6EchoRequest, IPv6, IPv6ExtHdrDestOpt
from scapy.layers.l2 import ARP, Ether

from srmig.testbed import echo_xdp

GUEST, GW = "02:00:00:00:10:10", "02:00:5e:00:00:01"
PAYLOAD = b"SRMP" + bytes(range(20))  # what the probe carries after the echo header: must come back as sent
V4_MIN, V6_MIN = 14 + 20 + 8, 14 + 40 + 8   # Ethernet, IP, the echo header through its sequence number


def _eth():
    return Ether(src=GW, dst=GUEST)


def _v6(**kw):
    return _eth() / IPv6(src="2001:db8:c::1", dst="2001:db8:100::10", hlim=61, **kw)


def _v4(**kw):
    return _eth() / IP(src="192.0.2.1", dst="198.51.100.10", ttl=61, **kw)


# (id, frame, answered): an answered frame comes back as the echo reply, anything else passes untouched
CASES = [
    ("v6-echo", _v6() / ICMPv6EchoRequest(id=0x1234, seq=7, data=PAYLOAD), True),
    ("v6-echo-empty", _v6() / ICMPv6EchoRequest(id=1, seq=0), True),
    ("v4-echo", _v4() / ICMP(type=8, id=0x1234, seq=7) / PAYLOAD, True),
    ("v4-echo-empty", _v4() / ICMP(type=8, id=1, seq=0), True),
    ("v6-reply", _v6() / ICMPv6EchoReply(id=1, seq=1, data=PAYLOAD), False),
    ("v6-ext-header", _v6() / IPv6ExtHdrDestOpt() / ICMPv6EchoRequest(id=1, seq=1), False),
    ("v4-reply", _v4() / ICMP(type=0, id=1, seq=1) / PAYLOAD, False),
    ("v4-options", _v4(options=[b"\x01\x01\x01\x00"]) / ICMP(type=8, id=1, seq=1), False),
    ("v4-udp", _v4() / UDP(sport=1, dport=7) / PAYLOAD, False),
    ("arp", _eth() / ARP(psrc="198.51.100.1", pdst="198.51.100.10"), False),
    ("v6-truncated", bytes(_v6() / ICMPv6EchoRequest(id=1, seq=1))[:V6_MIN - 1], False),
    ("v4-truncated", bytes(_v4() / ICMP(type=8, id=1, seq=1))[:V4_MIN - 1], False),
]


@pytest.fixture(scope="module")
def prog_fd():
    from srmig import check

    fd = check._prog_load(check.BPF_PROG_TYPE_XDP, echo_xdp.instructions())
    yield fd
    os.close(fd)


def _expected_reply(frame) -> bytes:
    """What the guest's kernel would answer, built independently by scapy (checksums computed afresh)."""
    if IPv6 in frame:
        req = frame[ICMPv6EchoRequest]
        return bytes(Ether(src=GUEST, dst=GW) / IPv6(src=frame[IPv6].dst, dst=frame[IPv6].src, hlim=frame[IPv6].hlim)
                     / ICMPv6EchoReply(id=req.id, seq=req.seq, data=req.data))
    ip = frame[IP]
    return bytes(Ether(src=GUEST, dst=GW) / IP(src=ip.dst, dst=ip.src, ttl=ip.ttl, id=ip.id)
                 / ICMP(type=0, id=frame[ICMP].id, seq=frame[ICMP].seq) / bytes(frame[ICMP].payload))


@pytest.mark.bpf
@pytest.mark.parametrize("frame,answered", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_responder(prog_fd, frame, answered):
    from srmig.bpf import libbpf

    sent = bytes(frame)
    out = libbpf.prog_test_run(prog_fd, sent)
    if answered:
        assert out.retval == echo_xdp.XDP_TX
        assert out.data == _expected_reply(frame)
    else:
        assert (out.retval, out.data) == (echo_xdp.XDP_PASS, sent)


@pytest.mark.bpf
def test_checksum_carries(prog_fd):
    """A sweep of sequence numbers: the incremental update's carries come out as a fresh checksum's."""
    from srmig.bpf import libbpf

    for seq in range(0, 0x10000, 0x0FF1):
        for frame in (_v6() / ICMPv6EchoRequest(id=0x7F7F, seq=seq, data=PAYLOAD),
                      _v4() / ICMP(type=8, id=0x7F7F, seq=seq) / PAYLOAD):
            out = libbpf.prog_test_run(prog_fd, bytes(frame))
            assert out.data == _expected_reply(frame), (seq, frame.summary())


def _request(family: str, seq: int):
    if family == "6":
        return _v6() / ICMPv6EchoRequest(id=0x7F7F, seq=seq, data=PAYLOAD)
    return _v4() / ICMP(type=8, id=0x7F7F, seq=seq) / PAYLOAD


def _checksum(frame: bytes) -> int:
    """The ICMP(v6) checksum field of a frame with an IPv6 or an option-less IPv4 header."""
    at = (V6_MIN if frame[12:14] == b"\x86\xdd" else V4_MIN) - 6
    return int.from_bytes(frame[at:at + 2], "big")


def _seq_for(family: str, want: int, of_reply: bool) -> int:
    """The sequence number that gives the request (or its reply) the checksum `want`. The checksum is the
    complement of the one's complement sum of the words, the sequence number one of them: solved from the
    sum at seq 0 (RFC 1071), then checked by building the frame."""
    def checksum(seq):
        req = _request(family, seq)
        return _checksum(_expected_reply(req) if of_reply else bytes(req))
    base = ~checksum(0) & 0xFFFF                  # the sum of every other word (pseudo-header included)
    seq = ((~want & 0xFFFF) - base) % 0xFFFF      # base +' seq == ~want, in one's complement
    assert checksum(seq) == want, (family, want, of_reply, seq)
    return seq


# (id, family, checksum, of the reply?): the ends of the range a fresh checksum takes (0x0000 .. 0xFFFE)
CHECKSUM_EDGES = [
    (f"v{family}-{'reply' if of_reply else 'request'}-{want:04x}", family, want, of_reply)
    for family in ("6", "4") for of_reply in (False, True) for want in (0x0000, 0x0001, 0xFFFE)
]


@pytest.mark.bpf
@pytest.mark.parametrize("family,want,of_reply", [c[1:] for c in CHECKSUM_EDGES], ids=[c[0] for c in CHECKSUM_EDGES])
def test_checksum_edges(prog_fd, family, want, of_reply):
    """Requests whose checksum, or whose reply's, is at an end of its range: where an incremental update
    that folds its carries wrongly (or leaves a 0xFFFF for a 0x0000, RFC 1624 3) differs from a fresh one."""
    from srmig.bpf import libbpf

    frame = _request(family, _seq_for(family, want, of_reply))
    out = libbpf.prog_test_run(prog_fd, bytes(frame))
    assert out.retval == echo_xdp.XDP_TX
    assert out.data == _expected_reply(frame)


def _insn(op: int, dst: int = 0, src: int = 0, off: int = 0, imm: int = 0) -> bytes:
    return struct.pack("<BBhi", op, dst | src << 4, off, imm)


EXIT = _insn(0x95)
# (id, instructions, standalone?): what check_standalone lets into the guest's object (pure logic)
STANDALONE_CASES = [
    ("return", _insn(0xB7, 0, imm=2) + EXIT, True),
    ("u64-constant", _insn(0x18, 1, imm=-1) + _insn(0, imm=7) + _insn(0xB7, 0, imm=2) + EXIT, True),
    ("map-fd", _insn(0x18, 1, 1, imm=5) + _insn(0) + _insn(0xB7, 0, imm=2) + EXIT, False),
    ("map-value", _insn(0x18, 1, 2, imm=5) + _insn(0) + _insn(0xB7, 0, imm=2) + EXIT, False),
    ("helper-call", _insn(0x85, imm=5) + EXIT, False),
    ("function-call", _insn(0x85, 0, 1, imm=1) + EXIT + _insn(0xB7, 0, imm=2) + EXIT, False),
    ("torn", (_insn(0xB7, 0, imm=2) + EXIT)[:-4], False),
]


@pytest.mark.parametrize("insns,standalone", [c[1:] for c in STANDALONE_CASES], ids=[c[0] for c in STANDALONE_CASES])
def test_check_standalone(insns, standalone):
    if standalone:
        assert echo_xdp.check_standalone(insns) == insns
    else:
        with pytest.raises(echo_xdp.NotStandalone):
            echo_xdp.check_standalone(insns)


@pytest.mark.bpf  # bcc compiles the program
@pytest.mark.skipif(not shutil.which("readelf"), reason="binutils' readelf not installed")
def test_elf_object_names_the_program(tmp_path):
    """The object the guest's iproute2 loads: a BPF relocatable with the program's bytes in SECTION, a global
    function symbol over them and a GPL license (libbpf refuses a program without a function symbol)."""
    path = tmp_path / "echo.o"
    obj = echo_xdp.elf_object()
    path.write_bytes(obj)
    out = subprocess.run(["readelf", "-hSs", str(path)], capture_output=True, text=True, check=True).stdout
    assert "Linux BPF" in out and "REL (Relocatable file)" in out
    sym = next(line.split() for line in out.splitlines() if line.rstrip().endswith(echo_xdp.PROG_NAME))
    assert sym[3:5] == ["FUNC", "GLOBAL"] and int(sym[2]) == len(echo_xdp.instructions())
    assert echo_xdp.instructions() in obj and b"GPL\0" in obj
