"""Differential fuzzing: the real XDP program (BPF_PROG_TEST_RUN in srmig/testbed/lab.py's namespace) against
the pure-Python reference model (srmig/testbed/refmodel.py), over mutations of tests/test_dataplane.py's
CASES (their IPv4 and prefix twins included) and random IPv6/SRH packets around inner IPv6 or IPv4 packets, to
the VMs' addresses and to addresses inside (and next to) the prefixes they route.

Every other batch runs with an SR domain configured (RFC 8754 5.1), in the program and in the model alike.
Per packet: XDP action, and the output frame unless dropped. Per batch of K packets: drop-reason and verdict
counter deltas against the model's sums, and the hold-ring records against the model's. Invariants: never
REDIRECT/TX a packet the model calls malformed; every drop counted under exactly one reason.

SRMIG_FUZZ_N (default 20000) packets, SRMIG_FUZZ_SEED (default 8) seeds the mutator.
"""

from __future__ import annotations

import contextlib
import ipaddress
import itertools
import os
import random
import struct
import time
from collections import Counter

import pytest

from srmig.bpf import libbpf
from srmig.testbed import lab as L
from srmig.testbed import refmodel as M
from srmig.testbed.packets import h_encaps, inner

from test_dataplane import ALL_CASES, CASES  # tests/ is on sys.path (rootdir conftest, no package)

pytestmark = [pytest.mark.bpf, pytest.mark.netns]

N = int(os.environ.get("SRMIG_FUZZ_N", "20000"))
SEED = int(os.environ.get("SRMIG_FUZZ_SEED", "8"))
K = 500  # packets between two reads of the counters and the hold ring
MALFORMED = {"truncated", "srh_type", "srh_len", "sl_range"}
MAX_FRAME = 3000  # BPF_PROG_TEST_RUN takes at most a page minus head- and tailroom

A = M._a
SIDS = [A(s) for s in (L.SID_END, L.SID_DX6, L.SID_S, L.SID_SBUF)]
VMS = [A(v) for v in (L.VM_RUNNING, L.VM_AWAY, L.VM_HOLD, L.VM_INCOMING, L.VM_INCOMING_RING, L.VM_PARKED,
                      L.VM_NO_NEIGH, L.VM_UNREACHABLE, L.VM_UNKNOWN, "::ffff:" + L.V4_OF[L.VM_RUNNING])]
VMS4 = [ipaddress.IPv4Address(L.V4_OF[v]).packed for v in (
    L.VM_RUNNING, L.VM_AWAY, L.VM_HOLD, L.VM_INCOMING, L.VM_INCOMING_RING, L.VM_PARKED, L.VM_NO_NEIGH,
    L.VM_UNREACHABLE, L.VM_UNKNOWN)] + [bytes((192, 0, 2, 1)), bytes((127, 0, 0, 1))]
# Addresses inside the VMs' prefixes (vm_prefixes), their network addresses, and addresses next to them.
VMS += [A(p6) for p6, _ in L.IN_PREFIX.values()] + [A("2001:db8:110::"), A("2001:db8:110:1::5"),
                                                      A("2001:db8:130:ffff:ffff:ffff:ffff:ffff")]
VMS4 += [ipaddress.IPv4Address(p4).packed for _, p4 in L.IN_PREFIX.values()] + [
    bytes((10, 10, 10, 0)), bytes((10, 10, 10, 255)), bytes((10, 10, 11, 5))]
OTHERS = [A(x) for x in (L.D_SBUF, L.D_DX6, L.T_END, L.NOT_OURS, L.FAB_PEER, "2001:db8:f::1", "2001:db8:f::9",
                         "ff02::1", "fd00::1", "2001:db8:9::1")]
POOL = SIDS + VMS + OTHERS
SRCS = ([A("2001:db8:9::1"), A("2001:db8:f::2"), A("fc00:0:9::1"), A("2001:db8:9::2")] * 5
        + [A("ff02::1"), A("fe80::1"), A("::1")])
# Nested and host prefixes; of SRCS, 2001:db8:9::2 (next to the host prefix), ff02::1 and ::1 are outside.
DOMAIN = ("2001:db8:9::1/128", "2001:db8:f::/64", "fc00::/16", "fc00:0:9::/48", "fe80::/10")


@pytest.fixture(scope="module")
def lab():
    with L.TestRunLab() as lab:
        yield lab


# Packet generation --------------------------------------------------------------------------------------

def ipv6(nh: int, payload_len: int, src: bytes, dst: bytes, hlim: int, tc_fl: int = 0) -> bytes:
    return struct.pack("!IHBB", (6 << 28) | tc_fl, payload_len, nh, hlim) + src + dst


def random_packet(r: random.Random) -> bytes:
    # Innermost first.
    kind = r.random()
    if kind < 0.6:
        udp = struct.pack("!HHHH", 4000, 5000, 8 + 11, 0) + b"srmig-probe" + bytes(r.randrange(0, 64))
        body = ipv6(17, len(udp), r.choice(SRCS), r.choice(VMS), r.choice((64, 1, 2, 255)), 0) + udp
        nh = M.NH_IPV6
    elif kind < 0.93:  # inner IPv4, sometimes with options (IHL > 5), sometimes padded past its total length
        udp = struct.pack("!HHHH", 4000, 5000, 8 + 11, 0) + b"srmig-probe" + bytes(r.randrange(0, 64))
        opts = bytes(4 * r.choice((0, 0, 0, 1, 3)))
        ihl = 5 + len(opts) // 4
        hdr = struct.pack("!BBHHHBBH4s4s", 0x40 | ihl, 0, 4 * ihl + len(udp), 0, 0, r.choice((64, 1, 0, 255)), 17,
                          r.getrandbits(16), bytes((192, 0, 2, 1)), r.choice(VMS4))
        body = hdr + opts + udp + bytes(r.choice((0, 0, 0, 6)))
        nh = M.NH_IPV4
    else:
        body = bytes(r.randrange(0, 48))
        nh = r.choice((17, 6, 59, 58))
    if r.random() < 0.85:  # SRH
        nseg = r.randint(1, 4)
        segs = [r.choice(POOL) for _ in range(nseg)]
        le = nseg - 1
        sl = r.randint(0, nseg - 1) if r.random() < 0.9 else r.randint(0, 6)
        tlv = bytes(8 * r.choice((0, 0, 0, 1, 2)))
        hlen = (len(segs) * 16 + len(tlv)) // 8
        srh = struct.pack("!BBBBBBH", nh, hlen, 4, sl, le, 0, 0) + b"".join(segs) + tlv
        body, nh = srh + body, M.NH_ROUTING
        da = segs[sl] if sl < nseg and r.random() < 0.7 else r.choice(SIDS)
    else:
        da = r.choice(SIDS) if r.random() < 0.9 else r.choice(POOL)
    for _ in range(r.choice((0, 0, 0, 1, 1, 2, 3))):  # HBH / DestOpts (PadN), sometimes longer
        ext = r.choice((M.NH_HOPOPTS, M.NH_DSTOPTS))
        units = r.choice((0, 0, 1))
        opt = struct.pack("!BBBB", nh, units, 1, 2 + 8 * units) + bytes(4 + 8 * units)
        body, nh = opt[:8 * (units + 1)] + body, ext
    if r.random() < 0.02:  # jumbo-ish: hold ring refuses >= 2048
        body += bytes(r.randrange(1900, 2300))
    outer = ipv6(nh, len(body), r.choice(SRCS), da, r.choice((64, 64, 64, 1, 2, 0, 255)), r.getrandbits(20))
    return bytes.fromhex("02000000" "0f01" "0200000000aa" "86dd") + outer + body


def _walk(f: bytearray):
    """Best-effort offsets of (SRH or None, inner IPv6 header or None, inner IPv4 header or None) in an
    arbitrary frame."""
    n, pos, nh, srh = len(f), 54, f[20] if len(f) > 20 else 255, None
    for _ in range(3):
        if nh in (0, 60) and pos + 2 <= n:
            nh, pos = f[pos], pos + (f[pos + 1] + 1) * 8
    if nh == 43 and pos + 8 <= n:
        srh, nh, pos = pos, f[pos], pos + 8 + f[pos + 1] * 8
    return srh, (pos if nh == 41 and pos + 40 <= n else None), (pos if nh == 4 and pos + 20 <= n else None)


def mutate(pkt: bytes, r: random.Random) -> bytes:
    f = bytearray(pkt)
    for _ in range(r.choice((0, 1, 1, 1, 2, 2, 3))):
        if len(f) < 54:
            break
        srh, inner, inner4 = _walk(f)
        m = r.randrange(15)
        if m == 0:  # flip bytes
            for _ in range(r.randint(1, 3)):
                i = r.randrange(len(f)) if r.random() < 0.5 else r.randrange(12, min(len(f), 14 + 40 + 80))
                f[i] ^= 1 << r.randrange(8) if r.random() < 0.6 else r.randrange(1, 256)
        elif m == 1:  # truncate
            del f[r.randint(14, len(f)):]
        elif m == 2:  # outer next header
            f[20] = r.choice((0, 60, 43, 41, 4, 17, 59, r.randrange(256)))
        elif m == 3:  # hop limit
            f[21] = r.choice((0, 1, 2, 255))
        elif m == 4:  # DA to a SID
            f[38:54] = r.choice(SIDS)
        elif m == 5 and inner is not None:  # inner DA to a VM
            f[inner + 24:inner + 40] = r.choice(VMS)
        elif m == 6 and srh is not None and srh + 8 <= len(f):  # SL
            f[srh + 3] = r.choice((0, 1, 2, f[srh + 4], f[srh + 4] + 1, f[srh + 4] + 2, 255)) & 0xFF
        elif m == 7 and srh is not None and srh + 8 <= len(f):  # LastEntry
            f[srh + 4] = r.choice((0, 1, 2, 3, 127, 255))
        elif m == 8 and srh is not None and srh + 8 <= len(f):  # HdrExtLen
            f[srh + 1] = min(255, max(0, f[srh + 1] + r.choice((-2, -1, 1, 2, 100))))
        elif m == 9 and srh is not None and srh + 8 <= len(f):  # routing type
            f[srh + 2] = r.choice((0, 1, 2, 3, 5, 255))
        elif m == 10:  # outer or inner payload length (FIB MTU check uses it)
            off = 18 if inner is None or r.random() < 0.5 else inner + 4
            f[off:off + 2] = struct.pack("!H", r.choice((0, 1, 1460, 1461, 1500, 9000, 65495, 65496, 65535,
                                                         r.randrange(65536))))
        elif m == 11 and srh is not None:  # a segment to a pool address
            le = f[srh + 4]
            i = srh + 8 + 16 * r.randint(0, le)
            if i + 16 <= len(f):
                f[i:i + 16] = r.choice(POOL)
        elif m == 12:  # outer source (the SR domain check)
            f[22:38] = r.choice(SRCS)
        elif m == 13 and inner4 is not None:  # inner IPv4 DA to a VM, or its version / IHL
            if r.random() < 0.5:
                f[inner4 + 16:inner4 + 20] = r.choice(VMS4)
            else:
                f[inner4] = r.choice((0x45, 0x46, 0x44, 0x40, 0x65, 0x55, 0x4F, r.randrange(256)))
        elif m == 14 and inner4 is not None:  # inner IPv4 total length
            n = len(f) - inner4
            f[inner4 + 2:inner4 + 4] = struct.pack("!H", r.choice((0, 19, 20, 28, n - 1, n, n + 1, 1500, 1501,
                                                                   65535, r.randrange(65536))) & 0xFFFF)
    return bytes(f[:MAX_FRAME])


def packets(n: int, seed: int):
    r = random.Random(seed)
    seeds = [c.packet() for c in ALL_CASES]
    for _ in range(n):
        base = r.choice(seeds) if r.random() < 0.4 else random_packet(r)
        yield mutate(base, r)


# The test -----------------------------------------------------------------------------------------------

def _delta(after: dict, before: dict) -> Counter:
    return Counter({k: after[k] - before[k] for k in after if after[k] != before[k]})


def _set_domain(dp, prefixes) -> None:
    for p in set(dp.list_domains()) - set(prefixes):
        dp.del_domain(p)
    for p in prefixes:
        dp.add_domain(p)


@contextlib.contextmanager
def _domain_cleared(dp):
    try:
        yield
    finally:
        _set_domain(dp, [])


def test_fuzz_against_model(lab):
    configs = (M.lab_config(), M.lab_config(list(DOMAIN)))
    records: list[bytes] = []
    mismatches: list[str] = []
    ran = skipped = 0
    t0 = time.monotonic()

    def report(pkt: bytes, what: str, want, got) -> None:
        if len(mismatches) < 30:
            what += " (SR domain on)" if cfg.domain else ""
            mismatches.append(f"{what}\n  packet {pkt.hex()}\n  model  {want}\n  C      {got}")
        else:
            mismatches.append("")

    def run(pkt: bytes) -> libbpf.TestRun:
        return libbpf.prog_test_run(lab.prog_fd, pkt, ingress_ifindex=lab.fab_ifindex)

    gen = packets(N, SEED)
    with lab.dp.hold_ring(lambda rec: records.append(rec.packet)) as ring, lab.topo.inside("lab"), \
            _domain_cleared(lab.dp):
        while ring.poll(0):
            pass
        records.clear()
        for n_batch in itertools.count():
            cfg = configs[n_batch % 2]
            batch = []
            for pkt in gen:
                try:
                    batch.append((pkt, *M.model_ex(pkt, cfg)))
                except ValueError:  # the model cannot predict it (link-local neighbour): not run
                    skipped += 1
                    continue
                if len(batch) == K:
                    break
            if not batch:
                break
            _set_domain(lab.dp, [str(p) for p in cfg.domain])
            before = lab.dp.stats()
            for pkt, want, _ in batch:
                got = run(pkt)
                ran += 1
                if got.action in ("XDP_REDIRECT", "XDP_TX") and want.reason in MALFORMED:
                    report(pkt, "INVARIANT: malformed packet forwarded", want, got)
                if got.action != want.action:
                    report(pkt, "action differs", want, (got.action, got.data.hex()))
                elif want.action != "XDP_DROP" and got.data != want.output:
                    report(pkt, "output differs", (want, want.output.hex()), (got.action, got.data.hex()))
            after = lab.dp.stats()
            while ring.poll(0):
                pass
            drops = _delta(after["drops"], before["drops"])
            verdicts = _delta(after["verdicts"], before["verdicts"])
            want_drops = Counter(w.reason for _, w, _ in batch if w.reason)
            want_verdicts = Counter(w.verdict for _, w, _ in batch)
            want_ring = [rec for _, _, rec in batch if rec is not None]
            if records != want_ring:
                mismatches.append(f"hold ring: model {len(want_ring)} records, C {len(records)}; first differing: "
                                  + next((f"model {a.hex()} C {b.hex()}" for a, b in zip(want_ring, records)
                                          if a != b), "(lengths)"))
            records.clear()
            if sum(verdicts.values()) != len(batch) or sum(drops.values()) != verdicts["drop"]:
                mismatches.append(f"INVARIANT: counters {dict(verdicts)} / drops {dict(drops)} for {len(batch)}")
            if drops != want_drops or verdicts != want_verdicts:
                _bisect(lab, cfg, batch, run, report)
                while ring.poll(0):
                    pass
                records.clear()
                mismatches.append(f"counters over a batch: model {dict(want_drops)} {dict(want_verdicts)}, "
                                  f"C {dict(drops)} {dict(verdicts)}")
            records.clear()
    elapsed = time.monotonic() - t0
    print(f"\nfuzz: {ran} packets run ({skipped} skipped), seed {SEED}, {elapsed:.1f} s, "
          f"{len(mismatches)} mismatches")
    shown = [m for m in mismatches if m]
    assert not mismatches, f"{len(mismatches)} mismatches, first {len(shown)}:\n" + "\n".join(shown)


def _bisect(lab, cfg, batch, run, report) -> None:
    """A batch's counters disagree: find the packets, one stats read around each."""
    for pkt, want, _ in batch:
        before = lab.dp.stats()
        run(pkt)
        after = lab.dp.stats()
        drops = _delta(after["drops"], before["drops"])
        verdicts = _delta(after["verdicts"], before["verdicts"])
        if drops != Counter({want.reason: 1} if want.reason else {}) or verdicts != Counter({want.verdict: 1}):
            report(pkt, "counters differ", (want.verdict, want.reason), (dict(verdicts), dict(drops)))


def test_nh_cache_keeps_mtu_check(lab):
    """Found by this fuzzer (fixed): one packet whose payload length claimed more than the frame held wrapped
    the FIB's 16-bit length, and the next-hop cache then skipped the MTU check for that DA. Such packets are
    now malformed (dropped, counted as truncated), and a small packet warming the cache never lets a frame
    too big for the egress MTU through: that one still goes to the kernel (ICMP Packet Too Big)."""
    cfg = M.lab_config()
    base = bytearray(CASES[4].packet())  # End.S, VM away: forwarded towards D::b
    wraps = bytearray(base)
    wraps[18:20] = struct.pack("!H", 65500)
    payload = b"x" * 1600
    big = bytearray(bytes(h_encaps([L.SID_S, L.D_SBUF], inner(L.VM_AWAY, payload=payload), dst_mac=L.FAB_MAC)))
    lab.dp.flush_nexthops()
    with lab.topo.inside("lab"):
        for pkt in (wraps, base, big):  # the small one warms the cache before the big one
            want = M.model(bytes(pkt), cfg)
            got = libbpf.prog_test_run(lab.prog_fd, bytes(pkt), ingress_ifindex=lab.fab_ifindex)
            assert got.action == want.action, (pkt.hex(), want)
    assert M.model(bytes(wraps), cfg).reason == "truncated"
    assert M.model(bytes(big), cfg).action == "XDP_PASS"
    lab.dp.flush_nexthops()


def test_nh_cache_keeps_source_check(lab):
    from srmig.testbed.packets import h_encaps, inner

    good = bytes(h_encaps([L.SID_DX6], inner(L.VM_RUNNING), dst_mac=L.FAB_MAC))
    bad = bytes(h_encaps([L.SID_DX6], inner(L.VM_RUNNING, src="fe80::1"), dst_mac=L.FAB_MAC))
    assert M.model(bad, M.lab_config()).action == "XDP_PASS"
    lab.dp.flush_nexthops()
    with lab.topo.inside("lab"):
        cold = libbpf.prog_test_run(lab.prog_fd, bad, ingress_ifindex=lab.fab_ifindex).action
        libbpf.prog_test_run(lab.prog_fd, good, ingress_ifindex=lab.fab_ifindex)
        warm = libbpf.prog_test_run(lab.prog_fd, bad, ingress_ifindex=lab.fab_ifindex).action
    lab.dp.flush_nexthops()
    assert cold == "XDP_PASS"
    assert warm == "XDP_PASS"
