"""`srmig bench --only drain`: the source drain (srmig.ctl.drain.SourceDrain, the product's own) under a load
that goes on while it runs, and what reaches the VM's new host, counted exactly.

    gen (g0) ------ (d_in) S (s_fab) ------ (d_fab) D (d_vm) ------ (k0) sink
    clone generator        srmig XDP: End.S        srmig XDP: End.SBUF       xdp_seq_sink.c: logs each
    numbered frames        tap "vmtap": its owner  (VM RUNNING: delivered)   frame's sequence number
    CPU 0                  never reads it (a       routed to the sink
                           paused QEMU); d_in's
                           NAPI on CPU 1

One run per offered load: the VM is RUNNING on S, so End.S delivers its packets into the tap, which nobody
reads: to the host, a paused QEMU. The load starts; after `pause_s` (the time an agent takes to hear of the
pause) SourceDrain.run() takes the tap's queue, HOLD -> tap queue -> hold ring -> AWAY, while the generator
keeps sending; after the drain the load goes on for `tail_s` (End.S forwarding directly), then stops.

Every frame carries a sequence number: the clone generator writes it into each clone as it leaves
(bench/xdp_clone_gen.c, xdp_clone_stamp), first 8 bytes of the inner UDP payload. The sink behind D's
End.SBUF logs the number of every frame in arrival order (an mmap'd BPF array); afterwards:
- lost: numbered frames that entered S and never reached the sink, exactly: numbers given out, less the
  frames the generator's own veth refused before S (g0's tx_dropped: not the drain's), less the distinct
  numbers that arrived. `losses` says where S and D counted drops (tap queue full, hold ring full, ...).
- duplicated: arrivals of a number seen before; reordered: arrivals of a number lower than one already seen.
- arrival_pps: frames entering S per second while the drain ran (the offered load as achieved: the
  generator may not reach what was asked, and shares two cores with everything else); drain_pps: the
  packets the drain sent (tap queue and ring) per second of SourceDrain.run(); drain_ms: that time;
  converged: the ring was sent empty within RING_FIRST_MAX_S (RING_FIRST_GAINING_MAX_S while the drain
  gains on it) and the VM went AWAY.

Offered loads: 0.5, 1 and 2 Mpps and End.S's forwarding rate measured first in the same run (the
generator flat out, the VM AWAY, counted at the same sink: End.S then End.SBUF, the path the VM's
packets take once drained); ratio_drain_vs_end_s is the best drain_pps of the pump's runs over that rate.
Each load runs twice in turn, the tap read in bulk (srmig.ctl.tapread) both times: the hold ring sent
through the drain's pump (srmig.ctl.pump, the way it picks at run time; `ring` and `pump` in each run) and
from Python with FabricSender (as before the pump). DrainLab.drain_run also takes the per-frame tap read
and either pump way forced.

Also measured in the same lab, no load running:
- tap_read: microseconds per frame to read the unread tap, bulk and per frame (issue 20 part 2).
- send_paths: packets/s one thread sends the drain's packets to D's End.SBUF, each way the kernel offers
  here (bench/drain_send.py: issue 20 part 1, measured only); every packet counted at the sink.

The clone generator runs on every kernel (live frames are refused on some); its rate into this topology is
reported with every load. Two shared cores: the generator's loop on one (a paced loop spins: it keeps that
core busy, which a NIC would not), S's forwarding and the drain (one Python thread, pinned there while it
runs) on the other; D and the sink run where the packets take them (the drain's sends carry them through
D's End.SBUF and the sink inside the send). Numbers vary run to run.
"""

from __future__ import annotations

import fcntl
import mmap
import os
import struct
import subprocess
import time
from array import array

from scapy.layers.inet import UDP
from scapy.layers.inet6 import IPv6
from scapy.packet import Raw

from bench.local import BENCH_DIR, GEN_CPU, BenchError, CloneGenerator
from srmig import netlink
from srmig.bpf import loader
from srmig.bpf.abi import Behaviour, VmState
from srmig.ctl import config, tapread
from srmig.ctl.drain import RING_FIRST_GAINING_MAX_S, RING_FIRST_MAX_S, SourceDrain
from srmig.ctl.pump import Pump
from srmig.ctl.tap import IFF_VNET_HDR, TapKeeper, read_queued_each, vnet_hdr_len
from srmig.testbed import qemu
from srmig.testbed.lab import NamespaceLab, xdp_on
from srmig.testbed.netns import inside
from srmig.testbed.packets import h_encaps

TAP = "vmtap"
VM = "2001:db8:100::10"
VM_MAC = "02:00:00:00:10:10"
SID_S = "fc00:0:1::5"        # S's End.S: the ingress's first segment while the VM migrates
D_SBUF = "fc00:0:2::b"       # D's End.SBUF
D_DX6 = "fc00:0:2::d6"       # D's End.DX6-map: the VM's SID once it runs on D (the drain's next_sid)
S_ADDR = "2001:db8:b::1"     # S's fabric address: the outer source of what the drain sends
D_ADDR = "2001:db8:b::2"
D_VM_ADDR = "2001:db8:c::1"
SINK_ADDR = "2001:db8:c::2"
SEQ_PORT = 12345             # xdp_seq_sink.c's SEQ_PORT_BE
SEGMENTS = [SID_S, D_SBUF]
INNER_LEN = 64               # bytes of the inner IPv6 packet (40 + UDP 8 + sequence number 8 + 8 more)
SEQ_OFF = 14 + 40 + 8 + 16 * len(SEGMENTS) + 40 + 8  # the number in the generator's frame: first UDP bytes
LOADS = (500_000, 1_000_000, 2_000_000)
PAUSE_S = 0.02               # load into the unread tap before the drain starts (the agent hears of it late)
TAIL_S = 0.1                 # load after the drain returns (End.S forwards directly)
SETTLE_S = 0.1               # for the last frames to reach the sink
LOG_ENTRIES = 1 << 22        # xdp_seq_sink.c's SEQ_LOG_ENTRIES


def seq_frame(dst_mac: str) -> bytes:
    """The generator's frame: H.Encaps'd along SEGMENTS to the VM, UDP to SEQ_PORT, 16 bytes of payload
    whose first 8 the generator overwrites with the frame's number."""
    pkt = IPv6(src="2001:db8:9::1", dst=VM) / UDP(sport=4000, dport=SEQ_PORT) / Raw(bytes(INNER_LEN - 48))
    frame = bytes(h_encaps(SEGMENTS, pkt, dst_mac=dst_mac))
    if len(frame) < SEQ_OFF + 8:
        raise BenchError("drain bench: frame shorter than its sequence number's place")
    return frame


def account(log: array, numbered: int, refused_before: int) -> dict:
    """Exact counts from the sink's log (numbers in arrival order): `numbered` frames were given numbers
    0..numbered-1, `refused_before` of them never entered S (the generator's veth was full)."""
    seen = bytearray(numbered)
    dup = reordered = stray = 0
    top = -1
    for n in log:
        if n >= numbered:
            stray += 1
            continue
        if seen[n]:
            dup += 1
        seen[n] = 1
        if n < top:
            reordered += 1
        else:
            top = n
    distinct = numbered - seen.count(0)
    return {"numbered": numbered, "refused_before_source": refused_before, "arrived": len(log),
            "distinct": distinct, "lost": numbered - refused_before - distinct, "duplicated": dup,
            "reordered": reordered, "stray": stray}


class _PerFrameKeeper(TapKeeper):
    """The tap read one os.read() a frame (srmig.ctl.tap.read_queued_each): the drain's read before the
    bulk reader, for comparison in the same run."""

    def frames(self) -> list[bytes]:
        return [f for fd in self.fds for f in read_queued_each(fd, vnet_hdr_len(fd))]


class DrainLab(NamespaceLab):
    """The gen -> S -> D -> sink topology above, with the clone generator stamping numbers; always cleaned
    up. `tap_queue`: the tap's queue length (the agent's migration-window default); `hold_ring_pages`: S's
    hold ring (the agent's default)."""

    def __init__(self, mode: str = "native", tap_queue: int | None = None, hold_ring_pages: int | None = None):
        super().__init__(f"{os.getpid()}-dr")
        self.mode = mode
        self.tap_queue = tap_queue or config.HostConfig.tap_queue
        self.hold_ring_pages = hold_ring_pages or config.HostConfig.hold_ring_pages
        self.tap_fd = -1
        self.notes: list[str] = []

    def _build(self) -> None:
        t = self.topo
        for role in ("gen", "S", "D", "sink"):
            t.add_host(role)
        t.link("gen", "g0", "S", "d_in", "2001:db8:a::1/64", "2001:db8:a::2/64")
        t.link("S", "s_fab", "D", "d_fab", S_ADDR + "/64", D_ADDR + "/64", static_neigh=True)
        t.link("D", "d_vm", "sink", "k0", D_VM_ADDR + "/64", SINK_ADDR + "/64", static_neigh=True)
        for role, ifname in (("S", "d_in"), ("S", "s_fab"), ("D", "d_fab"), ("D", "d_vm"), ("sink", "k0")):
            t.run(role, "ethtool", "-K", ifname, "gro", "on")  # NAPI on veth rx (native redirect needs it)
        # The VM's tap on S, opened the way QEMU opens it (vnet header, non-blocking) and never read.
        ns = t.ns("S")
        qemu.create_tap(ns, TAP)
        with inside(ns):
            fd = os.open("/dev/net/tun", os.O_RDWR | os.O_NONBLOCK)
            fcntl.ioctl(fd, qemu.TUNSETIFF, struct.pack("16sH", TAP.encode(),
                                                        qemu.IFF_TAP | qemu.IFF_NO_PI | IFF_VNET_HDR))
            self.tap_fd = fd
        with t.ipr("S") as ipr:
            idx = ipr.link_lookup(ifname=TAP)[0]
            ipr.link("set", index=idx, flags=0, mask=0x1000)  # no multicast: no MLD of the host's own
            ipr.link("set", index=idx, txqlen=self.tap_queue, state="up")
        t.route("S", VM + "/128", oif=TAP)
        t.neigh("S", TAP, VM, VM_MAC)
        t.route("S", "fc00:0:2::/48", gateway=D_ADDR)
        t.route("D", VM + "/128", gateway=SINK_ADDR)
        self.d_in_mac = t.mac("S", "d_in")
        self._pin_napi()
        # The sink first (nothing else may count), then D's and S's srmig.
        self.sink_bpf, sink_fd = loader.compile_program(BENCH_DIR / "xdp_seq_sink.c", "xdp_seq_sink")
        self._stack.callback(self.sink_bpf.cleanup)
        with t.inside("sink"):
            loader.attach("k0", sink_fd, self.mode)
        self._stack.callback(self._detach, "sink", "k0")
        size = LOG_ENTRIES * 8
        self.log_map = mmap.mmap(self.sink_bpf[b"seq_log"].map_fd, size, mmap.MAP_SHARED, mmap.PROT_READ)
        self._stack.callback(self.log_map.close)
        self.dp_d = self._stack.enter_context(xdp_on(t, "D", "d_fab", self.mode))
        self.dp_d.add_sid(D_SBUF, Behaviour.END_SBUF)
        self.dp_d.add_sid(D_DX6, Behaviour.END_DX6_MAP)
        self.dp_d.set_vm(VM, VmState.RUNNING)
        self.dp = self._stack.enter_context(xdp_on(t, "S", "d_in", self.mode,
                                                   loader.Limits(hold_ring_pages=self.hold_ring_pages)))
        self.dp.add_sid(SID_S, Behaviour.END_S)
        self.dp.set_vm(VM, VmState.RUNNING)
        self.gen = CloneGenerator(t, "gen", "g0", GEN_CPU if self.napi_pinned else None)
        self._stack.callback(self.gen.close)
        self.notes += self.gen.notes
        self.gen.load([seq_frame(self.d_in_mac)])
        self.gen.stamp(SEQ_OFF)

    def _detach(self, role: str, ifname: str) -> None:
        with self.topo.inside(role):
            loader.detach(ifname)

    def _pin_napi(self) -> None:
        """S's d_in in threaded NAPI, its kthread (the one that appears now) on CPU 1: End.S on its own
        core, as in bench/local.py. Without it, S forwards in whichever softirq runs."""
        def pids() -> set[str]:
            return set(subprocess.run(["pgrep", "^napi/d_in-"], capture_output=True, text=True).stdout.split())
        before = pids()
        r = self.topo.run("S", "sh", "-c", "echo 1 > /sys/class/net/d_in/threaded", check=False)
        own = pids() - before
        self.napi_pinned = r.returncode == 0 and bool(own) and (os.cpu_count() or 1) >= 2
        if not self.napi_pinned:
            self.notes.append("threaded NAPI unavailable (or one CPU): S forwards in softirq")
            return
        for pid in own:
            subprocess.run(["taskset", "-pc", "1", pid], capture_output=True)
        self.notes.append(f"clone generator on CPU {GEN_CPU}; S's d_in NAPI kthread {','.join(sorted(own))} on "
                          f"CPU 1 and the drain (this process, while it runs) too; D and the sink where the "
                          f"packets take them")

    # counters -------------------------------------------------------------------------------------------

    def _stats(self, role: str, ifname: str) -> dict:
        with self.topo.ipr(role) as ipr:
            return netlink.link_stats(netlink.ifindex(ifname, ipr), ipr)

    def refused_before(self) -> int:
        """Frames the generator's veth refused (the DUT's ring full), so far: never reached S."""
        return self._stats("gen", "g0")["tx_dropped"]

    def drops(self) -> dict:
        """Where S and D dropped so far: the tap's queue full, each dataplane's drop reasons, the fabric
        veth's ring full."""
        out = {"s_tap_queue_full": self._stats("S", TAP)["tx_dropped"],
               "s_fabric_ring_full": self._stats("S", "s_fab")["tx_dropped"],
               "d_sink_ring_full": self._stats("D", "d_vm")["tx_dropped"]}
        for name, dp in (("s", self.dp), ("d", self.dp_d)):
            for reason, n in dp.stats()["drops"].items():
                out[f"{name}_{reason}"] = n
        return out

    def entered_source(self) -> int:
        """SRv6 packets srmig's program on S has taken so far (its verdict counters, but `pass`: the
        generator namespace's own ND and MLD): every numbered frame that entered S."""
        return sum(n for v, n in self.dp.stats()["verdicts"].items() if v != "pass")

    def sink_counts(self):
        c = self.sink_bpf[b"seq_count"]
        return c[c.Key(0)]

    def reset_sink(self) -> None:
        c = self.sink_bpf[b"seq_count"]
        c[c.Key(0)] = c.Leaf(0, 0, 0)

    def sink_log(self) -> array:
        n = min(self.sink_counts().logged, LOG_ENTRIES)
        out = array("Q")
        out.frombytes(self.log_map[:8 * n])
        return out

    def read_tap(self) -> int:
        """Empty the tap's queue (a resumed QEMU): what an earlier run left there."""
        n = 0
        while True:
            try:
                os.read(self.tap_fd, 65536)
                n += 1
            except BlockingIOError:
                return n

    # runs -----------------------------------------------------------------------------------------------

    def tap_read_cost(self, frames: int = 6000, rounds: int = 5) -> dict:
        """What reading the unread tap costs per frame, in turn: srmig.ctl.tap.read_queued_each (one os.read()
        a frame, the drain's read until issue 20) and the bulk reader (srmig.ctl.tapread, a read loop in C)
        that read_queued() uses now. `frames` queued by End.S each round (what the generator's veth lets
        through); microseconds per frame, best and median of `rounds`."""
        bulk = tapread.reader()
        methods = {"per_frame": lambda fd, skip: read_queued_each(fd, skip)}
        if bulk is not None:
            methods["bulk"] = lambda fd, skip: tapread.read_frames(bulk, fd, skip, 1 << 30)
        per: dict = {m: [] for m in methods}
        self.dp.set_vm(VM, VmState.RUNNING)
        cpus = os.sched_getaffinity(0)
        if self.napi_pinned:
            os.sched_setaffinity(0, {1})
        try:
            for _ in range(rounds):
                for name, read in methods.items():
                    self.read_tap()
                    self.gen.send(frames, 200_000)
                    time.sleep(0.02)
                    fd = os.dup(self.tap_fd)
                    try:
                        skip = vnet_hdr_len(fd)
                        t0 = time.perf_counter()
                        got = read(fd, skip)
                        dt = time.perf_counter() - t0
                    finally:
                        os.close(fd)
                    if got:
                        per[name].append(dt * 1e6 / len(got))
        finally:
            os.sched_setaffinity(0, cpus)
        out = {name: {"best_us": round(min(v), 3), "median_us": round(sorted(v)[len(v) // 2], 3), "rounds": len(v)}
               for name, v in per.items() if v}
        if "bulk" not in out:
            out["bulk"] = None  # not built here (no C compiler): the drain reads frame by frame
        return out

    def forwarding_rate(self, window_s: float = 0.3) -> dict:
        """End.S's forwarding rate (VM AWAY) into D's End.SBUF and the sink: the generator flat out."""
        self.dp.set_vm(VM, VmState.AWAY, next_sid=D_DX6)
        self.reset_sink()
        w: dict = {}

        def measure():
            time.sleep(0.05)
            w["c0"], w["g0"], w["t0"] = self.sink_counts().logged, self.gen.generated(), time.monotonic()
            time.sleep(window_s)
            w["c1"], w["g1"], w["t1"] = self.sink_counts().logged, self.gen.generated(), time.monotonic()

        try:
            self.gen.flat_out(measure)
        finally:
            self.dp.set_vm(VM, VmState.RUNNING)
        if "t1" not in w:
            raise BenchError("drain bench: the generator sent nothing")
        dt = w["t1"] - w["t0"]
        return {"forwarded_pps": round((w["c1"] - w["c0"]) / dt, 1),
                "offered_pps": round((w["g1"] - w["g0"]) / dt, 1), "window_s": round(dt, 3)}

    def pump(self, mode: str | None = None) -> Pump:
        """The drain's pump (srmig.ctl.pump) on S, made once per mode (it compiles): `mode` None picks live
        frames where the kernel runs them, else tc; "live" or "tc" forces one."""
        pumps = self.__dict__.setdefault("_pumps", {})
        if mode not in pumps:
            with self.topo.inside("S"):
                pumps[mode] = Pump(self.dp.pin_dir, mode)
            self._stack.callback(pumps[mode].close)
        return pumps[mode]

    def drain_run(self, rate_pps: float, pause_s: float = PAUSE_S, tail_s: float = TAIL_S,
                  tap_read: str = "bulk", ring: str = "pump") -> dict:
        """One load at `rate_pps`, the drain in the middle of it (module docstring); the counts. `tap_read`:
        "bulk" (the product's read_queued()) or "per_frame" (one os.read() a frame, as before issue 20).
        `ring`: how the hold ring is sent: "pump" (srmig.ctl.pump, its mode chosen at run time), "pump-live"
        or "pump-tc" (forced), or "python" (FabricSender from Python, as before)."""
        pump = None if ring == "python" else self.pump({"pump": None, "pump-live": "live", "pump-tc": "tc"}[ring])
        # Frames of an earlier load can still sit on the way to the sink until new traffic takes that way:
        # after the flat-out forwarding_rate(), a few hundred numbered ~900,000 once reached the sink ahead of
        # the next drain's first packets (counted as its duplicates and reorderings). A short burst through
        # End.S to the sink pushes them out before the sink is reset.
        self.dp.set_vm(VM, VmState.AWAY, next_sid=D_DX6)
        self.gen.send(256, 100_000)
        time.sleep(0.05)
        self.dp.set_vm(VM, VmState.RUNNING)
        self.read_tap()
        self.reset_sink()
        refused0, drops0, entered0 = self.refused_before(), self.drops(), self.entered_source()
        w: dict = {}

        def scenario():
            give_up = time.monotonic() + 2.0
            while self.gen.generated() == 0 and time.monotonic() < give_up:
                time.sleep(0.0005)
            w["start"], w["g_start"] = time.monotonic(), self.gen.generated()
            time.sleep(pause_s)
            keeper = TapKeeper if tap_read == "bulk" else _PerFrameKeeper
            queue = keeper.of_fds(TAP, [os.dup(self.tap_fd)])
            try:
                w["g0"], w["t0"] = self.gen.generated(), time.monotonic()
                with self.topo.inside("S"):
                    w["rep"] = SourceDrain(self.dp, VM, S_ADDR, [D_SBUF], D_DX6, pump=pump).run(queue)
                w["t1"], w["g1"] = time.monotonic(), self.gen.generated()
            finally:
                queue.close()
            time.sleep(tail_s)
            w["end"], w["g_end"] = time.monotonic(), self.gen.generated()

        total_s = pause_s + tail_s + 2 * RING_FIRST_GAINING_MAX_S + 1.0
        cpus = os.sched_getaffinity(0)
        if self.napi_pinned:
            # Away from the generator's CPU, which its loop keeps busy (a NIC would not): the drain shares
            # S's forwarding core, as an agent shares its host's cores with the dataplane.
            os.sched_setaffinity(0, {1})
        try:
            self.gen.send(int(rate_pps * total_s), rate_pps, until=time.monotonic() + total_s, during=scenario)
        finally:
            os.sched_setaffinity(0, cpus)
        time.sleep(SETTLE_S)
        if "rep" not in w:
            raise BenchError("drain bench: the drain did not run")
        rep, drain_s = w["rep"], w["t1"] - w["t0"]
        numbered = self.gen.stamped()
        counts = self.sink_counts()
        acc = account(self.sink_log(), numbered, self.refused_before() - refused0)
        drops1 = self.drops()
        sent = rep.from_tap + rep.from_ring
        state = self.dp.get_vm(VM)
        return {
            "offered_pps": rate_pps, "tap_read": tap_read, "ring": ring,
            "pump": rep.timings.get("pump") if pump else None,
            "generated_pps": round((w["g_end"] - w["g_start"]) / (w["end"] - w["start"]), 1),
            "arrival_pps": round((w["g1"] - w["g0"]) / drain_s, 1) if drain_s > 0 else None,
            "drain_pps": round(sent / drain_s, 1) if drain_s > 0 else None,
            "drain_ms": round(drain_s * 1000, 3),
            "converged": bool(rep.timings.get("ring_emptied")) and state.state == VmState.AWAY,
            "lost": acc["lost"], "duplicated": acc["duplicated"], "reordered": acc["reordered"],
            "from_tap": rep.from_tap, "from_ring": rep.from_ring, "send_dropped": rep.send_dropped,
            "timings": rep.timings, "pause_ms": round(pause_s * 1000, 1),
            "accounting": {**acc, "entered_source": self.entered_source() - entered0,
                           "sink_other": counts.other, "sink_log_overflow": counts.overflow},
            "losses": {k: v - drops0.get(k, 0) for k, v in drops1.items() if v - drops0.get(k, 0)},
        }

    def close(self) -> None:
        if self.tap_fd >= 0:
            os.close(self.tap_fd)
            self.tap_fd = -1
        super().close()


DRAINS = (("bulk", "pump"), ("bulk", "python"))


def run(loads: tuple[float, ...] = LOADS, with_end_s_rate: bool = True, pause_s: float = PAUSE_S,
        tail_s: float = TAIL_S, mode: str = "native", progress=None,
        drains: tuple[tuple[str, str], ...] = DRAINS) -> dict:
    """The drain at each offered load (pps), and at End.S's forwarding rate measured first in the same run
    when `with_end_s_rate`, once per (tap read, ring path) in `drains` (DrainLab.drain_run's: by default the
    product's bulk tap read with the pump, and with the ring sent from Python as before); JSON-ready.
    ratio_drain_vs_end_s: the first kind's (the pump's)."""
    from bench import drain_send  # noqa: PLC0415 (it builds on this module)

    say = progress or (lambda m: None)
    with DrainLab(mode) as lab:
        out: dict = {"tap_queue": lab.tap_queue, "ring_first_max_ms": RING_FIRST_MAX_S * 1000,
                     "ring_first_gaining_max_ms": RING_FIRST_GAINING_MAX_S * 1000,
                     "hold_ring_bytes": lab.hold_ring_pages * mmap.PAGESIZE,
                     "generator": "clone (numbered clones: bench/xdp_clone_gen.c xdp_clone_stamp)"}
        out["send_paths"] = sp = drain_send.send_cost(lab)
        say("drain: sending the drain's packets, kpps (best): " + ", ".join(
            f"{k} {v['best_pps'] / 1e3:.0f}" for k, v in sp["methods"].items()))
        out["tap_read"] = tr = lab.tap_read_cost()
        say("drain: reading the unread tap, us a frame (best): " + ", ".join(
            f"{k} {v['best_us']:.2f}" for k, v in tr.items() if v))
        end_s = lab.forwarding_rate() if with_end_s_rate else None
        out["end_s"] = end_s
        if end_s:
            say(f"drain: End.S forwards {end_s['forwarded_pps'] / 1e6:.2f} Mpps into End.SBUF and the sink "
                f"(generator offered {end_s['offered_pps'] / 1e6:.2f} Mpps)")
        todo = list(loads) + ([end_s["forwarded_pps"]] if end_s else [])
        runs = []
        for i, rate in enumerate(todo):
            for tap_read, ring in drains:
                r = lab.drain_run(rate, pause_s, tail_s, tap_read, ring)
                r["load"] = "end_s_rate" if end_s and i == len(loads) else f"{rate / 1e6:g} Mpps"
                say(f"drain ({tap_read} tap read, ring: {r['pump'] or ring}): offered {rate / 1e6:.2f} Mpps, arrived "
                    f"{(r['arrival_pps'] or 0) / 1e6:.2f} Mpps, drained {(r['drain_pps'] or 0) / 1e6:.3f} Mpps in "
                    f"{r['drain_ms']:.0f} ms, converged {r['converged']}, lost {r['lost']} dup {r['duplicated']} "
                    f"reordered {r['reordered']}")
                runs.append(r)
        out["runs"] = runs
        out["notes"] = lab.notes + [
            "lost: numbered frames that entered S and never reached the sink (exact: sequence numbers); "
            "accounting.refused_before_source: frames the generator's own veth refused, not counted as lost",
            "two shared cores: the generator's loop, S's NAPI, the drain's Python thread, D and the sink "
            "compete; numbers are noisy"]
    best = max((r["drain_pps"] or 0 for r in runs if (r["tap_read"], r["ring"]) == drains[0]), default=0)
    out["ratio_of"] = "/".join(drains[0])
    out["ratio_drain_vs_end_s"] = round(best / end_s["forwarded_pps"], 3) if end_s and end_s["forwarded_pps"] else None
    return out


def print_table(res: dict) -> None:
    e = res.get("end_s") or {}
    print(f"drain (tap queue {res['tap_queue']}; End.S into End.SBUF: {e.get('forwarded_pps', 0) / 1e3:.0f} kpps)")
    print(f"{'load':<12}{'tap/ring':<16}{'arrival kpps':>13}{'drain kpps':>11}{'drain ms':>9}  converged{'lost':>9}{'dup':>6}"
          f"{'reord':>7}  where lost")
    for r in res["runs"]:
        print(f"{r['load']:<12}{r['tap_read'] + '/' + r['ring']:<16}{(r['arrival_pps'] or 0) / 1e3:>13.0f}{(r['drain_pps'] or 0) / 1e3:>11.1f}"
              f"{r['drain_ms']:>9.0f}  {str(r['converged']):<9}{r['lost']:>9}{r['duplicated']:>6}{r['reordered']:>7}"
              f"  {', '.join(f'{k} {v}' for k, v in r['losses'].items()) or '-'}")
    sp = res.get("send_paths")
    if sp:
        print("  sending the drain's packets, kpps (best, median): " + ", ".join(
            f"{k} {v['best_pps'] / 1e3:.0f}, {v['median_pps'] / 1e3:.0f}" for k, v in sp["methods"].items()))
    print(f"  drain / End.S = {_fmt(res['ratio_drain_vs_end_s'])}; reading the unread tap, us a frame (best, "
          f"median): " + ", ".join(f"{k} {v['best_us']:.2f}, {v['median_us']:.2f}"
                                   for k, v in res.get("tap_read", {}).items() if v))


def _fmt(v) -> str:
    return "-" if v is None else f"{v:.3f}"


def main() -> None:
    import json
    import sys

    res = run(progress=lambda m: print(m, file=sys.stderr, flush=True))
    print(json.dumps(res, indent=2, default=str))


if __name__ == "__main__":
    main()
