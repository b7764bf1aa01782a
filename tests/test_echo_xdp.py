"""The guest's XDP echo responder (srmig.testbed.echo_xdp): real frames through the real program with
BPF_PROG_TEST_RUN on the host's kernel, and the ELF object the guest loads with iproute2."""

from __future__ import annotations

import os
import shutil
import subprocess

import pytest
from scapy.layers.inet import ICMP, IP, UDP
from scapy.layers.inet6 import ICMPv6EchoReply, ICMPv6EchoRequest, IPv6, IPv6ExtHdrDestOpt
from scapy.layers.l2 import ARP, Ether

from srmig.testbed import echo_xdp

GUEST, GW = "02:00:00:00:10:10", "02:00:5e:00:00:01"
PAYLOAD = b"SRMP" + bytes(range(20))  # what the probe carries after the echo header: must come back as sent


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
    ("v6-truncated", bytes(_v6() / ICMPv6EchoRequest(id=1, seq=1))[:echo_xdp.V6_MIN - 1], False),
    ("v4-truncated", bytes(_v4() / ICMP(type=8, id=1, seq=1))[:echo_xdp.V4_MIN - 1], False),
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
    """Requests whose checksum field makes the incremental update wrap around (0x0000, 0xFFFF, ...)."""
    from srmig.bpf import libbpf

    for seq in range(0, 0x10000, 0x0FF1):
        for frame in (_v6() / ICMPv6EchoRequest(id=0x7F7F, seq=seq, data=PAYLOAD),
                      _v4() / ICMP(type=8, id=0x7F7F, seq=seq) / PAYLOAD):
            out = libbpf.prog_test_run(prog_fd, bytes(frame))
            assert out.data == _expected_reply(frame), (seq, frame.summary())


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
