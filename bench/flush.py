"""`python -m bench.flush`: how fast a full held buffer goes into a VM's queue, in order, and what arrives.

    H (one namespace)                                S --veth-- H (fabric methods)
    this process --method--> tap "vmtap"             S: this process --method--> s0 ==> h0: srmig End.DX6-map
                             txqueuelen >= buffer                                        (XDP) --> tap "vmtap"
                             read by an fd we hold, only after the flush (a paused or incoming QEMU)

Methods, each given the same held buffer of N packets (UDP, sequence number in the last 8 bytes), timed
from the first send to the last send returning. Delivery into a tap is synchronous: when send returns the
frames are in its queue. The fabric methods' rate includes H's End.DX6-map: srmig's own XDP program on h0
(generic mode, as the testbed runs it; what a host agent installs in front of its VMs), which decapsulates
and FIB-redirects into the tap. It runs in softirq, mostly inline in each send on this one machine. The
kernel's seg6local End.DX6 stood there until 2026-12: srmig needs no SRv6 in the kernel, and this bench
runs where the kernel has none.

- raw_sendto:             IPv6 raw socket, one sendto() per packet (RawSender.send), routed to the tap
- raw_sendmmsg:           the same socket, sendmmsg(2) batches of 1024 (RawSender.send_many)
- packet_sendto:          AF_PACKET bound to the tap, one send() per frame
- packet_sendmmsg:        AF_PACKET bound to the tap, sendmmsg(2) batches (PacketSender)
- packet_sendmmsg_bypass: the same with PACKET_QDISC_BYPASS
- packet_tx_ring:         AF_PACKET PACKET_TX_RING (TPACKET_V2, VNET_HDR), one send() per ring fill
                          (TxRingSender, the chosen path)
- packet_tx_ring_bypass:  the same with PACKET_QDISC_BYPASS (TxRingSender until 2026-11-30: the bypass runs
                          tun's per-frame queue selection, a flow hash, which the qdisc path skips)
- packet_tx_ring_kernel:  the chosen path with only its send() calls timed, each ring fill written before the
                          clock runs: the kernel's own cost per frame, the ceiling of any sender on this path
                          (a fill in C, or a filler thread overlapping the kernel's sends). Not a sender of
                          its own: never the chosen or the fastest method.
- fabric_raw_sendto:      from S: H.Encaps'd towards H's End.DX6-map SID over the veth, one sendto() each (the old
                          drain)
- fabric_raw_sendmmsg:    the same, RawSender.send_many (the drain's and return_held's path now)
- fabric_packet_sendmmsg: from S: the same frames by AF_PACKET on s0 (next hop MAC known), batched

Not methods: write() on the tap fd injects a frame as if the VM had sent it (the host's receive path), the
opposite direction to the VM's queue. An XDP program run by BPF_PROG_TEST_RUN with live frames, copying
each held packet from an array map into the frame and redirecting it into the tap (tun_xdp_xmit: no skb),
was tried and measured no faster (~0.6 Mpps at 128 bytes, plus the map load): every frame held in the tap
queue takes a fresh zeroed page from the test run's page pool. The TX ring without PACKET_VNET_HDR was
slower than sendmmsg (0.58 against 0.69 Mpps at 128 B, same run): its skbs point into the ring's pages,
and tun copies each frame into a fresh page before it queues it (skb_orphan_frags_rx). With the vnet
header (hdr_len = the frame's length) the kernel copies each frame into the skb instead. TxRingSender's
ring is set up before the clock starts, like every sender's socket; that setup took 0.1-30 ms here, which
is why unpark() keeps PacketSender.

After each method the tap queue is read to the end: arrived, lost (N - arrived), the tap's tx_dropped,
and whether the sequence numbers came out 0..N-1 exactly (in order, no duplicate, no corruption).
Two shared cores: numbers vary run to run; compare methods within one run.
"""

from __future__ import annotations

import argparse
import fcntl
import os
import socket
import struct
import sys
import time
from array import array
from typing import Callable

from bench import emit
from bench.tx_ring import TxRingSender
from srmig.ctl.encap import encapsulate_packet
from srmig.ctl.senders import SENDMMSG_BATCH, PacketSender, RawSender
from srmig.bpf.abi import Behaviour, VmState
from srmig.testbed import qemu
from srmig.testbed.lab import NamespaceLab, xdp_on
from srmig.testbed.netns import inside

TAP = "vmtap"
VM = "2001:db8:100::10"
VM_MAC = "02:00:00:00:10:10"
GW_MAC = "02:00:5e:00:00:01"
H_SID = "fc00:0:2::d6"     # H's End.DX6-map (srmig's XDP on h0) in front of the VM's tap
XDP_MODE = "generic"       # srmig's mode on h0, as in the testbed
S_ADDR = "2001:db8:f::1"
H_ADDR = "2001:db8:f::2"
TX_RING_FRAMES = 2048      # TxRingSender's ring: slots of 2 KiB (MTU 1500), one send() per fill

METHODS = ("raw_sendto", "raw_sendmmsg", "packet_sendto", "packet_sendmmsg", "packet_sendmmsg_bypass",
           "packet_tx_ring", "packet_tx_ring_bypass", "packet_tx_ring_kernel", "fabric_raw_sendto",
           "fabric_raw_sendmmsg", "fabric_packet_sendmmsg")
CHOSEN = "packet_tx_ring"  # TxRingSender: the way to put a held buffer into a VM's tap
CEILING = "packet_tx_ring_kernel"  # the kernel's part of CHOSEN alone
BASELINE = "packet_sendmmsg"  # PacketSender as unpark() uses it: the chosen path is compared with it


def held_buffer(n: int, size: int) -> list[bytes]:
    """N inner IPv6/UDP packets to the VM, each `size` bytes as an Ethernet frame (>= 70), sequence
    number as the last 8 bytes."""
    payload_len = max(8, size - 14 - 40 - 8)
    head = struct.pack("!IHBB", 6 << 28, 8 + payload_len, 17, 64) + socket.inet_pton(
        socket.AF_INET6, "2001:db8:9::1") + socket.inet_pton(socket.AF_INET6, VM)
    udp = struct.pack("!HHHH", 4000, 5000, 8 + payload_len, 0)  # checksum 0: nobody checks it here
    pad = b"." * (payload_len - 8)
    return [head + udp + pad + i.to_bytes(8, "big") for i in range(n)]


def ether(packets: list[bytes]) -> list[bytes]:
    eth = bytes.fromhex(VM_MAC.replace(":", "") + GW_MAC.replace(":", "")) + b"\x86\xdd"
    return [eth + p for p in packets]


class FlushLab(NamespaceLab):
    """Namespaces H (the VM's tap, read by an fd we hold) and S (the fabric peer), always cleaned up."""

    def __init__(self, qlen: int):
        super().__init__(f"{os.getpid()}-fl")
        self.qlen = qlen
        self.tap_fd = -1

    def _build(self) -> None:
        t = self.topo
        t.add_host("H")
        t.add_host("S")
        t.link("S", "s0", "H", "h0", S_ADDR + "/64", H_ADDR + "/64", static_neigh=True)
        ns = t.ns("H")
        qemu.create_tap(ns, TAP)
        with inside(ns):  # the reader: a stand-in for the QEMU that does not read yet (no vnet header)
            fd = os.open("/dev/net/tun", os.O_RDWR | os.O_NONBLOCK)
            fcntl.ioctl(fd, qemu.TUNSETIFF, struct.pack("16sH", TAP.encode(), qemu.IFF_TAP | qemu.IFF_NO_PI))
            self.tap_fd = fd
        with t.ipr("H") as ipr:
            idx = ipr.link_lookup(ifname=TAP)[0]
            ipr.link("set", index=idx, flags=0, mask=0x1000)  # no multicast: no MLD of the host's own
            ipr.link("set", index=idx, address=GW_MAC, txqlen=self.qlen, state="up")
        t.route("H", VM + "/128", oif=TAP)
        t.neigh("H", TAP, VM, VM_MAC)
        # srmig's End.DX6-map decapsulates what S sends to H_SID and FIB-redirects it into the tap (the
        # /128 route and the permanent neighbour above): no SRv6 needed in H's kernel.
        self.dp = self._stack.enter_context(xdp_on(t, "H", "h0", XDP_MODE))
        self.dp.add_sid(H_SID, Behaviour.END_DX6_MAP)
        self.dp.set_vm(VM, VmState.RUNNING)
        t.route("S", "fc00:0:2::/48", gateway=H_ADDR)
        self.h0_mac = t.mac("H", "h0")
        self.s0_mac = t.mac("S", "s0")
        self.drain()

    def tap_stats(self) -> dict:
        with self.topo.ipr("H") as ipr:
            st = ipr.get_links(ipr.link_lookup(ifname=TAP)[0])[0].get_attr("IFLA_STATS64")
            return {"tx_packets": st["tx_packets"], "tx_dropped": st["tx_dropped"]}

    def drain(self) -> list[bytes]:
        """Everything in the tap queue, oldest first (what the VM reads once it runs)."""
        out = []
        while True:
            try:
                out.append(os.read(self.tap_fd, 65536))
            except BlockingIOError:
                return out

    def close(self) -> None:
        if self.tap_fd >= 0:
            os.close(self.tap_fd)
            self.tap_fd = -1
        super().close()


# One function per method: given the held buffer (inner IPv6 packets), send it; returns (seconds, dropped
# as counted by the sender). Building what each method sends (Ethernet header, H.Encaps) happens before.

def _timed(send: Callable[[], int | None], close: Callable[[], None]) -> tuple[float, float, int]:
    """(wall seconds, this thread's CPU seconds, dropped): CPU time tells what the flush costs when the
    shared cores also run someone else (the softirq work it triggers is not in it)."""
    try:
        c0, t0 = time.thread_time(), time.perf_counter()
        dropped = send() or 0
        return time.perf_counter() - t0, time.thread_time() - c0, dropped
    finally:
        close()


def raw_sendto(lab: FlushLab, pkts: list[bytes]) -> tuple[float, float, int]:
    with lab.topo.inside("H"):
        s = RawSender()
    return _timed(lambda: [s.send(p) for p in pkts] and 0, s.close)


def raw_sendmmsg(lab: FlushLab, pkts: list[bytes]) -> tuple[float, float, int]:
    with lab.topo.inside("H"):
        s = RawSender()
    return _timed(lambda: len(pkts) - s.send_many(pkts), s.close)


def packet_sendto(lab: FlushLab, frames: list[bytes]) -> tuple[float, float, int]:
    with lab.topo.inside("H"):
        s = PacketSender(TAP)
    return _timed(lambda: [s.send(f) for f in frames] and 0, s.close)


def packet_sendmmsg(lab: FlushLab, frames: list[bytes], bypass: bool = False) -> tuple[float, float, int]:
    with lab.topo.inside("H"):
        s = PacketSender(TAP, qdisc_bypass=bypass)
    return _timed(lambda: len(frames) - s.send_many(frames), s.close)


def packet_tx_ring(lab: FlushLab, frames: list[bytes], bypass: bool = False) -> tuple[float, float, int]:
    with lab.topo.inside("H"):
        s = TxRingSender(TAP, slots=TX_RING_FRAMES, qdisc_bypass=bypass)  # set up here, before the clock starts
    return _timed(lambda: len(frames) - s.send_many(frames), s.close)


def packet_tx_ring_kernel(lab: FlushLab, frames: list[bytes]) -> tuple[float, float, int]:
    """TxRingSender's own steps (a bench of its internals): each ring fill (_put) before the clock, each
    send (_flush) on it."""
    with lab.topo.inside("H"):
        s = TxRingSender(TAP, slots=TX_RING_FRAMES)
    wall = cpu = 0.0
    sent = 0
    try:
        for i in range(0, len(frames), s.slots):  # every fill starts at slot 0: the previous one ended there
            fill = frames[i:i + s.slots]
            s._put(fill, array("I", map(len, fill)), 0)
            c0, t0 = time.thread_time(), time.perf_counter()
            done, _err = s._flush(0, len(fill))
            wall, cpu = wall + time.perf_counter() - t0, cpu + time.thread_time() - c0
            sent += done
            if done < len(fill):
                break
    finally:
        s.close()
    return wall, cpu, len(frames) - sent


def fabric_raw_sendto(lab: FlushLab, encapped: list[bytes]) -> tuple[float, float, int]:
    with lab.topo.inside("S"):
        s = RawSender()
    return _timed(lambda: [s.send(p) for p in encapped] and 0, s.close)


def fabric_raw_sendmmsg(lab: FlushLab, encapped: list[bytes]) -> tuple[float, float, int]:
    with lab.topo.inside("S"):
        s = RawSender()
    return _timed(lambda: len(encapped) - s.send_many(encapped), s.close)


def fabric_packet_sendmmsg(lab: FlushLab, frames: list[bytes]) -> tuple[float, float, int]:
    with lab.topo.inside("S"):
        s = PacketSender("s0")  # the next hop's MAC is already in each frame: no routing, no neighbour
    return _timed(lambda: len(frames) - s.send_many(frames), s.close)


SENDERS: dict[str, Callable[[FlushLab, list[bytes]], tuple[float, float, int]]] = {
    "raw_sendto": raw_sendto, "raw_sendmmsg": raw_sendmmsg, "packet_sendto": packet_sendto,
    "packet_sendmmsg": packet_sendmmsg,
    "packet_sendmmsg_bypass": lambda lab, frames: packet_sendmmsg(lab, frames, bypass=True),
    "packet_tx_ring": packet_tx_ring,
    "packet_tx_ring_bypass": lambda lab, frames: packet_tx_ring(lab, frames, bypass=True),
    "packet_tx_ring_kernel": packet_tx_ring_kernel,
    "fabric_raw_sendto": fabric_raw_sendto,
    "fabric_raw_sendmmsg": fabric_raw_sendmmsg, "fabric_packet_sendmmsg": fabric_packet_sendmmsg}
assert tuple(SENDERS) == METHODS


def _payload_for(method: str, lab: FlushLab, pkts: list[bytes]) -> list[bytes]:
    if method.startswith("fabric_"):
        enc = [encapsulate_packet(p, S_ADDR, [H_SID]) for p in pkts]
        if method == "fabric_packet_sendmmsg":
            eth = (bytes.fromhex(lab.h0_mac.replace(":", "") + lab.s0_mac.replace(":", "")) + b"\x86\xdd")
            return [eth + p for p in enc]
        return enc
    return pkts if method.startswith("raw_") else ether(pkts)


def is_probe(frame: bytes) -> bool:
    """One of ours: IPv6/UDP to the VM's port 5000 (the host may put its own frames on the tap)."""
    return (len(frame) >= 14 + 48 and frame[12:14] == b"\x86\xdd" and frame[20] == 17
            and frame[56:58] == b"\x13\x88")


def check(frames: list[bytes], n: int) -> dict:
    """Sequence numbers as read from the tap: in order means exactly 0..n-1."""
    seqs = [int.from_bytes(f[-8:], "big") for f in frames if is_probe(f)]
    distinct = set(seqs)
    return {"received": len(seqs), "lost": n - len(distinct & set(range(n))),
            "duplicates": len(seqs) - len(distinct), "reordered": sum(1 for a, b in zip(seqs, seqs[1:]) if b <= a),
            "other_frames": len(frames) - len(seqs), "in_order": seqs == list(range(n))}


def measure(lab: FlushLab, method: str, n: int, size: int) -> dict:
    pkts = held_buffer(n, size)
    data = _payload_for(method, lab, pkts)
    fn = SENDERS[method]
    lab.drain()
    before = lab.tap_stats()
    seconds, cpu_s, dropped = fn(lab, data)
    time.sleep(0.01)
    after = lab.tap_stats()
    got = lab.drain()
    res = {"method": method, "packets": n, "frame_bytes": size, "seconds": round(seconds, 6),
           "flush_pps": round(n / seconds, 1) if seconds > 0 else None,
           "cpu_pps": round(n / cpu_s, 1) if cpu_s > 0 else None, "sender_dropped": dropped,
           "tap_tx_dropped": after["tx_dropped"] - before["tx_dropped"]}
    res.update(check(got, n))
    res["ok"] = res["in_order"] and res["lost"] == 0
    return res


def flush_into_tap(lab: FlushLab, packets: list[bytes]) -> dict:
    """The chosen path, for the test: `packets` (inner IPv6) into the VM's tap, then what it holds."""
    with lab.topo.inside("H"):
        s = TxRingSender(TAP, slots=TX_RING_FRAMES)
    try:
        sent = s.send_many(ether(packets))
    finally:
        s.close()
    return {"sent": sent, "dropped": s.dropped, "errors": s.errors, "frames": lab.drain()}


def run(packets: int = 20000, sizes: tuple[int, ...] = (128, 1024), methods: tuple[str, ...] = METHODS,
        repeat: int = 3, progress: Callable[[str], None] | None = None) -> dict:
    """Every method `repeat` times per size, in rounds (each round runs every method once, so a busy
    moment on the shared cores hits all of them alike); per method the best round is reported (the least
    disturbed) with all rounds' rates, and `ok_all_runs` says whether every round was lossless and in order."""
    out: dict = {"packets": packets, "sizes": list(sizes), "batch": SENDMMSG_BATCH, "repeat": repeat,
                 "results": []}
    with FlushLab(qlen=packets + 1024) as lab:
        for size in sizes:
            runs: dict[str, list[dict]] = {m: [] for m in methods}
            for _ in range(repeat):
                for m in methods:
                    runs[m].append(measure(lab, m, packets, size))
            for m in methods:
                best = max(runs[m], key=lambda r: r["flush_pps"] or 0)
                best["ok_all_runs"] = all(r["ok"] for r in runs[m])
                best["pps_runs"] = [r["flush_pps"] for r in runs[m]]
                out["results"].append(best)
                if progress:
                    progress(f"flush: {m:<24} {size:>5} B  {best['flush_pps'] / 1e3:8.1f} kpps  "
                             f"lost {best['lost']}  in order {best['in_order']}")
    ok = [r for r in out["results"] if r["ok_all_runs"] and r["method"] != CEILING]
    chosen = [r for r in out["results"] if r["method"] == CHOSEN]
    out["chosen"] = CHOSEN
    out["flush_pps"] = min((r["flush_pps"] for r in chosen), default=None)  # the slowest size
    out["target_pps"] = 1_000_000
    out["target_met"] = None if out["flush_pps"] is None else out["flush_pps"] >= out["target_pps"]
    out["fastest_lossless"] = max(ok, key=lambda r: r["flush_pps"])["method"] if ok else None
    out["kernel_ceiling_pps"] = min((r["flush_pps"] for r in out["results"] if r["method"] == CEILING),
                                    default=None)  # the slowest size
    # The chosen path against the one it replaced, per size, same run: best round / best round, and the
    # sending thread's CPU time (steadier when the shared cores are busy).
    by = {(r["method"], r["frame_bytes"]): r for r in out["results"]}
    out["chosen_vs_baseline"] = {
        size: {"pps": round(c["flush_pps"] / b["flush_pps"], 3), "cpu_pps": round(c["cpu_pps"] / b["cpu_pps"], 3)}
        for size in sizes if (c := by.get((CHOSEN, size))) and (b := by.get((BASELINE, size)))}
    out["cpus"] = os.cpu_count()
    out["method"] = ("held buffer of N UDP packets with sequence numbers, sent into a tap whose reader waits "
                     "(txqueuelen N + 1024); flush_pps = N / time of the send calls, best of `repeat`; every "
                     "frame then read from the tap and its sequence checked; one Python thread, shared cores")
    return out


def print_table(result: dict) -> None:
    print(f"{'method':<26}{'bytes':>6}{'kpps':>8}{'cpu kpps':>10}{'lost':>6}{'tap drop':>9}  in order  "
          f"every round kpps")
    for r in result["results"]:
        runs = "/".join(f"{p / 1e3:.0f}" for p in r["pps_runs"])
        print(f"{r['method']:<26}{r['frame_bytes']:>6}{r['flush_pps'] / 1e3:>8.1f}"
              f"{(r['cpu_pps'] or 0) / 1e3:>10.1f}{r['lost']:>6}{r['tap_tx_dropped']:>9}  "
              f"{'yes' if r['in_order'] else 'NO ':<8}  {runs}"
              + ("" if r["ok_all_runs"] else "  (not lossless and in order in every round)"))
    print(f"{result['packets']} packets per flush, sendmmsg batches of {result['batch']}, best of "
          f"{result['repeat']}; cpu kpps = packets / the sending thread's CPU time")
    print(f"chosen {result['chosen']}: {(result['flush_pps'] or 0) / 1e3:.1f} kpps at the slowest size (target "
          f"{result['target_pps'] / 1e6:.0f} Mpps: {'met' if result['target_met'] else 'MISSED'}); fastest lossless "
          f"in order: {result['fastest_lossless']}")
    if result.get("kernel_ceiling_pps"):
        print(f"the kernel alone ({CEILING}: its send() calls only): {result['kernel_ceiling_pps'] / 1e3:.1f} kpps at "
              f"the slowest size, the ceiling of any sender on this path")
    for size, r in result.get("chosen_vs_baseline", {}).items():
        print(f"{result['chosen']} / {BASELINE} at {size} B: {r['pps']:.2f}x the rate, "
              f"{r['cpu_pps']:.2f}x per CPU second")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.flush", description=__doc__.split("\n")[0])
    ap.add_argument("--packets", type=int, default=20000)
    ap.add_argument("--sizes", default="128,1024", help="frame sizes in bytes, comma separated")
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args(argv)
    res = run(a.packets, tuple(int(s) for s in a.sizes.split(",")), tuple(a.methods.split(",")), a.repeat,
              progress=lambda m: print(m, file=sys.stderr, flush=True))
    return emit(res, a.json, print_table)


if __name__ == "__main__":
    sys.exit(main())
