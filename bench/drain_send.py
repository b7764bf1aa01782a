"""Issue 20 part 1, measured only: how fast one thread can send what the source drain sends, each way the
kernel offers, in the drain benchmark's lab (bench/drain.py's DrainLab, no load running).

The packets: the VM's 64-byte packets H.Encaps'd to D's End.SBUF (srmig.ctl.encap, as the drain makes
them), numbered, so the sink behind End.SBUF counts every one (lost, duplicated, reordered). Every send also
carries the packet through D's End.SBUF and the sink: a veth runs its receiver inside the send, on the
sender's core; across real hosts that part is the receiver's. Methods:
- raw_sendto, raw_sendmmsg: an IPv6 raw socket, the kernel routing each packet (the drain's RawSender),
  one sendto() each or sendmmsg(2) batches of 1024 (the drain's until issue 20 part 1)
- packet_sendmmsg: AF_PACKET on S's fabric veth, the next hop's MAC known, sendmmsg(2) (PacketSender);
  packet_bypass_sendmmsg: the same with PACKET_QDISC_BYPASS
- fabric_sender: the drain's now (srmig.ctl.senders.FabricSender): AF_PACKET out of the link the route to
  each DA leaves by, to the next hop's MAC from the neighbour table, the Ethernet header added per packet
- packet_tx_ring: AF_PACKET PACKET_TX_RING (bench/tx_ring.py), one send() per ring fill
- afxdp_copy_tx: a TX-only AF_XDP socket in copy mode (bench/afxdp_tx.py)
- pump_tc, pump_live: the drain's pump (srmig.ctl.pump), one batch of its slots (SLOTS frames, written
  before the clock starts) sent by one BPF_PROG_RUN: the tc program's bpf_clone_redirect (every kernel),
  and live frames' XDP_TX where the kernel runs them
- live_frames_inject, where the kernel runs BPF_PROG_RUN with live frames: the frames written into an
  mmap'd BPF array, then one BPF_PROG_RUN of bench/xdp_drain_inject.c, XDP_TX out of S's fabric veth (no
  skb on S); the write is timed with it (load_s: the write alone; run_pps: the BPF_PROG_RUN alone)
Everything is built before the clock starts; one thread, on S's core.
"""

from __future__ import annotations

import ctypes
import mmap
import os
import struct
import time

from scapy.layers.inet import UDP
from scapy.layers.inet6 import IPv6
from scapy.packet import Raw

from bench import local
from bench.afxdp_tx import AfXdpTxSender
from bench.drain import D_SBUF, INNER_LEN, S_ADDR, SEQ_PORT, VM, DrainLab, account
from bench.local import BENCH_DIR
from bench.tx_ring import TxRingSender
from srmig.bpf import libbpf, loader
from srmig.ctl.encap import encapsulate_packet
from srmig.ctl.pump import SLOT_BYTES, SLOTS
from srmig.ctl.senders import FabricSender, PacketSender, RawSender

INJECT_SLOTS = 65536         # xdp_drain_inject.c's INJECT_SLOTS
NOT_A_RING_POSITION = (1 << 64) - 1


class LiveInjector:
    """live_frames_inject: `send(frames)` writes the frames into xdp_drain_inject.c's slots (its array,
    mmap'd), then one live-frames BPF_PROG_RUN sends each with XDP_TX out of `ifname`, in order."""

    def __init__(self, lab: DrainLab, ifname: str = "s_fab"):
        self.lab, self.ifindex = lab, lab.topo.ifindex("S", ifname)
        self.bpf, self.fd = loader.compile_program(BENCH_DIR / "xdp_drain_inject.c", "xdp_drain_inject")
        slots = self.bpf[b"slots"]
        self.slot_bytes = (ctypes.sizeof(slots.Leaf) + 7) // 8 * 8  # an array's values lie 8 bytes apart
        self.slots = mmap.mmap(slots.map_fd, INJECT_SLOTS * self.slot_bytes, mmap.MAP_SHARED,
                               mmap.PROT_READ | mmap.PROT_WRITE)
        self.load_s: list[float] = []
        self.run_pps: list[float] = []

    def send(self, frames: list[bytes]) -> None:
        if len(frames) > INJECT_SLOTS:
            raise ValueError(f"at most {INJECT_SLOTS} frames a run")
        t0 = time.perf_counter()
        pad = self.slot_bytes - 4  # struct slot: u32 len, then the frame
        blob = b"".join(struct.pack("<I", len(f)) + f.ljust(pad, b"\0") for f in frames)
        self.slots[:len(blob)] = blob
        nxt = self.bpf[b"inject_next"]
        nxt[nxt.Key(0)] = nxt.Leaf(0)
        t1 = time.perf_counter()
        with self.lab.topo.inside("S"):
            libbpf.prog_test_run_live(self.fd, max(frames, key=len), len(frames), self.ifindex)
        self.load_s.append(t1 - t0)
        self.run_pps.append(len(frames) / (time.perf_counter() - t1))

    def close(self) -> None:
        self.slots.close()
        self.bpf.cleanup()


def send_cost(lab: DrainLab, packets: int = 20000, rounds: int = 3) -> dict:
    """Packets/s of each method (module docstring), best and median of `rounds`, and what the sink counted
    amiss (None: every packet once, in order)."""
    inner = bytes(IPv6(src="2001:db8:9::1", dst=VM) / UDP(sport=4000, dport=SEQ_PORT) / Raw(bytes(INNER_LEN - 48)))
    pkts = [encapsulate_packet(inner[:48] + i.to_bytes(8, "big") + inner[56:], S_ADDR, [D_SBUF])
            for i in range(packets)]
    eth = bytes.fromhex(lab.topo.mac("D", "d_fab").replace(":", "") +
                        lab.topo.mac("S", "s_fab").replace(":", "")) + b"\x86\xdd"
    frames = [eth + p for p in pkts]

    def raw_sendto(snd):
        for p in pkts:
            snd.send(p)

    methods = {  # name: (make a sender, in S's namespace; send everything with it)
        "raw_sendto": (RawSender, raw_sendto),
        "raw_sendmmsg": (RawSender, lambda snd: snd.send_many(pkts)),  # the drain's before issue 20 part 1
        "packet_sendmmsg": (lambda: PacketSender("s_fab"), lambda snd: snd.send_many(frames)),
        "packet_bypass_sendmmsg": (lambda: PacketSender("s_fab", qdisc_bypass=True),
                                   lambda snd: snd.send_many(frames)),
        "fabric_sender": (FabricSender, lambda snd: snd.send_many(pkts)),  # the drain's
        "packet_tx_ring": (lambda: TxRingSender("s_fab", slots=4096), lambda snd: snd.send_many(frames)),
        "afxdp_copy_tx": (lambda: AfXdpTxSender("s_fab"), lambda snd: snd.send_many(frames)),
    }
    # The drain's pump (srmig.ctl.pump), each way: the frames written into its slots before the clock starts
    # (its C walk of the ring is timed in the drain runs: timings.pump_fill_ms), then one BPF_PROG_RUN.
    ifindex = lab.topo.ifindex("S", "s_fab")

    def pump_send(p):
        off = 0
        for f in frames[:SLOTS]:
            p._slots[off:off + 8 + len(f)] = len(f).to_bytes(4, "little") + bytes(4) + f
            off += SLOT_BYTES
        with lab.topo.inside("S"):  # the link's ifindex is S's
            t0 = time.perf_counter()
            # A batch position no ring reaches: the mark is the ring's (pinned next to it), and a mark that
            # named a real position would tell the next drain those records were sent.
            p.send(NOT_A_RING_POSITION, min(len(frames), SLOTS), ifindex)
            return time.perf_counter() - t0

    live_ok, live_why = local.live_frames()
    pump_modes = ["tc"] + (["live"] if live_ok else [])
    inject = LiveInjector(lab) if live_ok and packets <= INJECT_SLOTS else None
    if inject:
        methods["live_frames_inject"] = (lambda: None, lambda _: inject.send(frames))
    for mode in pump_modes:
        methods[f"pump_{mode}"] = (lambda mode=mode: lab.pump(mode), pump_send)
    per: dict = {m: [] for m in methods}
    amiss: dict = {m: {} for m in methods}
    cpus = os.sched_getaffinity(0)
    if lab.napi_pinned:
        os.sched_setaffinity(0, {1})  # S's core, as the drain runs (DrainLab.drain_run)
    try:
        for _ in range(rounds):
            for name, (make, send) in methods.items():
                with lab.topo.inside("S"):
                    snd = make()
                count = min(packets, SLOTS) if name.startswith("pump_") else packets
                try:
                    lab.reset_sink()
                    t0 = time.perf_counter()
                    timed = send(snd)  # the pump times its send alone
                    dt = timed if name.startswith("pump_") else time.perf_counter() - t0
                finally:
                    if snd is not None and not name.startswith("pump_"):  # the lab keeps its pumps
                        snd.close()
                time.sleep(0.05)
                acc = account(lab.sink_log(), count, 0)
                per[name].append(count / dt)
                for k in ("lost", "duplicated", "reordered"):
                    if acc[k]:
                        amiss[name][k] = amiss[name].get(k, 0) + acc[k]
    finally:
        os.sched_setaffinity(0, cpus)
        if inject:
            inject.close()
    return {
        "packets": packets, "frame_bytes": len(frames[0]),
        "methods": {name: {"best_pps": round(max(v), 1), "median_pps": round(sorted(v)[len(v) // 2], 1),
                           "errors": amiss[name] or None} for name, v in per.items()},
        "live_frames": live_why,
        "live_frames_inject_load_s": round(min(inject.load_s), 6) if inject else None,
        "live_frames_inject_run_pps": round(max(inject.run_pps), 1) if inject else None,
        "method": "see bench/drain_send.py: one thread on S's core sends the drain's packets to D's End.SBUF "
                  "each way; each send carries them through End.SBUF and the sink too (veth)",
    }
