"""`srmig bench local`: packets/s through one forwarding core, on veths in namespaces, per SRv6 path.

    gen (g0) ---- (d_in) DUT (d_out) ---- (s0) sink
    trafgen       XDP or kernel            XDP counter (drop)
    CPU 0         NAPI kthread, CPU 1      (runs in the DUT's softirq, CPU 1)

In ONE run, on the SAME path and packets, each of these DUT configurations is searched for its NDR and PDR
(bench/search.py):

- end_s_forward:  srmig End.S, VM AWAY (advance SL, DA = next SID, FIB step, redirect)
- end_s_deliver:  srmig End.S, VM RUNNING (decapsulate, FIB step, redirect)
- kernel_end_dx6: the kernel's seg6local End.DX6 (no XDP on d_in)
- kernel_end:     the kernel's seg6local End (no XDP on d_in)
- redirect_stub:  bench/xdp_redirect_stub.c, redirects every frame to d_out (the floor of an XDP forwarder)
- generator:      bench/xdp_sink.c on d_in itself (drop at the DUT): what the generator can offer at all

Where the cores go: trafgen (one process, paced with sendto, pinned to CPU 0 by itself) on CPU 0. d_in uses
threaded NAPI (GRO on, /sys/class/net/d_in/threaded = 1) and its kthread is pinned to CPU 1, so the DUT's
whole receive path (XDP, or the kernel's IPv6 + seg6local + forwarding) runs on CPU 1, together with the
sink's XDP counter (d_out -> s0 is processed in the same softirq). One DUT core: "pps per core" = NDR.

Two measurements per path:
- NDR/PDR search: a trial (rate R, whole seconds T) has trafgen send N = R x T frames with its shaper, which
  spends each second's budget as ONE burst at full speed and then sleeps (measured: 5000 pps = 5000 frames
  in the first ms of every second; trafgen's `-t` gap pacing is smooth but tops out near 40 kpps). Loss =
  N - frames at the sink when trafgen is done or by T + 0.1 s. A veth drops when its peer's ring
  (XDP paths) is full and pushes back on the sender (skb paths), so bursts hurt XDP paths more: NDR/PDR
  here are burst-tolerance rates, conservative for every path, not a smooth-load throughput.
- max_forwarding_rate (RFC 2285 forwarding rate at maximum offered load): trafgen unpaced, the sink counted
  over a window while the DUT core is saturated. This is the DUT core's capacity; the headline ratios use it.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from bench import search as S
from srmig.dataplane import libbpf, loader
from srmig.dataplane.abi import Behaviour, VmState
from srmig.testbed.lab import xdp_on
from srmig.testbed.netns import Topology
from srmig.testbed.packets import h_encaps, inner

BENCH_DIR = Path(__file__).resolve().parent

SID_S = "fc00:0:1::5"
SID_K_DX6 = "fc00:0:1::dd"
SID_K_END = "fc00:0:1::e"
NEXT_SID = "fc00:0:2::b"      # the sink's locator: where End / End.S forward to
VM_RUN = "2001:db8:100::10"   # behind the sink: where End.S deliver and End.DX6 send the inner packet
VM_AWAY = "2001:db8:100::20"
VM_HOLD = "2001:db8:100::30"
SINK_ADDR = "2001:db8:b::2"

PATHS = ("generator", "redirect_stub", "end_s_forward", "end_s_deliver", "kernel_end_dx6", "kernel_end")
WARMUP_S = 0.05
UNREACHABLE_PPS = 50_000_000
START_GRACE_S = 0.1
START_TIMEOUT_S = 2.0


class BenchError(RuntimeError):
    """A one-line reason the local benchmark cannot run here."""


def packet(path: str, size: int | None = None, dst_mac: str = "02:00:00:00:00:01") -> bytes:
    """The frame each path is fed; `size` pads the inner payload up to that frame length."""
    if path in ("kernel_end_dx6",):
        segs, vm = [SID_K_DX6], VM_RUN
    elif path == "kernel_end":
        segs, vm = [SID_K_END, NEXT_SID], VM_RUN
    elif path == "end_s_deliver":
        segs, vm = [SID_S, NEXT_SID], VM_RUN
    elif path == "hold":
        segs, vm = [SID_S, NEXT_SID], VM_HOLD
    else:  # end_s_forward, redirect_stub, generator
        segs, vm = [SID_S, NEXT_SID], VM_AWAY
    frame = bytes(h_encaps(segs, inner(vm, payload=b"srmig-bench"), dst_mac=dst_mac))
    if size and size > len(frame):
        frame = bytes(h_encaps(segs, inner(vm, payload=b"srmig-bench".ljust(size - len(frame) + 11, b".")),
                               dst_mac=dst_mac))
    return frame


def trafgen_config(frame: bytes, flows: int = 1) -> str:
    """A trafgen packet: the frame's bytes; with flows > 1 the inner source's last byte counts up (dinc)."""
    body = [f"0x{b:02x}" for b in frame]
    if flows > 1:
        # Inner IPv6 source: Ethernet 14 + outer IPv6 40 + SRH (8 + 16n) + 8 (offset of src in IPv6) + 15.
        srh_len = (frame[14 + 40 + 1] + 1) * 8
        off = 14 + 40 + srh_len + 8 + 15
        body[off] = f"dinc(0, {min(flows, 256) - 1}, 1)"
    return "{ " + ", ".join(body) + " }\n"


@dataclass
class Trial:
    rate_pps: float
    duration_s: float
    sent: int
    received: int
    wall_s: float


def _stop_group(proc: subprocess.Popen) -> None:
    """Stop trafgen and every process it forked (SIGINT, then SIGKILL), and reap it."""
    for sig, wait in ((signal.SIGINT, 3), (signal.SIGKILL, 3)):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, sig)
        try:
            proc.wait(timeout=wait)
        except subprocess.TimeoutExpired:
            continue
        # The parent is gone; make sure no forked sender outlives it.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        return


class LocalBench:
    """The gen -> DUT -> sink topology; `configure(path)` then `trial(rate, duration)`. Always cleaned up."""

    def __init__(self, mode: str = "native", flows: int = 16, frame_size: int | None = None):
        if not shutil.which("trafgen"):
            raise BenchError("trafgen not found: apt-get install netsniff-ng (./run setup installs it)")
        self.mode = mode
        self.flows = flows
        self.frame_size = frame_size
        self.topo = Topology(tag=f"{os.getpid()}-bl")
        self._stack = contextlib.ExitStack()
        self._tmp = Path(tempfile.mkdtemp(prefix="srmig-bench-"))
        self.path: str | None = None
        self.notes: list[str] = []

    # setup ----------------------------------------------------------------------------------------------

    def start(self) -> LocalBench:
        try:
            self._build()
        except BaseException:
            self.close()
            raise
        return self

    def _build(self) -> None:
        t = self.topo
        for role in ("gen", "dut", "sink"):
            t.add_host(role)
        t.link("gen", "g0", "dut", "d_in", "2001:db8:a::1/64", "2001:db8:a::2/64")
        t.link("dut", "d_out", "sink", "s0", "2001:db8:b::1/64", SINK_ADDR + "/64")
        for role, ifname in (("dut", "d_in"), ("dut", "d_out"), ("sink", "s0")):
            t.run(role, "ethtool", "-K", ifname, "gro", "on")  # NAPI on veth rx (needed by native redirect)
        self.d_in_mac = t.mac("dut", "d_in")
        self.d_out_ifindex = t.ifindex("dut", "d_out")
        t.route("dut", "fc00:0:2::/48", gateway=SINK_ADDR)
        t.route("dut", "2001:db8:100::/64", gateway=SINK_ADDR)
        t.neigh("dut", "d_out", SINK_ADDR, t.mac("sink", "s0"))
        t.route("dut", SID_K_DX6 + "/128", oif="d_out",
                encap={"type": "seg6local", "action": "End.DX6", "nh6": SINK_ADDR})
        t.route("dut", SID_K_END + "/128", oif="d_out", encap={"type": "seg6local", "action": "End"})
        self._pin_napi()
        # The sink: count and drop, native XDP on s0.
        self.sink_bpf, sink_fd = loader.compile_program(BENCH_DIR / "xdp_sink.c", "xdp_sink")
        self._stack.callback(self.sink_bpf.cleanup)
        with t.inside("sink"):
            loader.attach("s0", sink_fd, self.mode)
        self.sink_fd = sink_fd
        # The redirect stub, egress = d_out.
        self.stub_bpf, self.stub_fd = loader.compile_program(BENCH_DIR / "xdp_redirect_stub.c",
                                                             "xdp_redirect_stub")
        self._stack.callback(self.stub_bpf.cleanup)
        egress = self.stub_bpf[b"egress"]
        egress[egress.Key(0)] = egress.Leaf(self.d_out_ifindex)
        # srmig, loaded once on d_in (detached and unpinned by xdp_on on close).
        self.dp = self._stack.enter_context(xdp_on(t, "dut", "d_in", self.mode))
        self.srmig_fd = self.dp.prog_fd()
        self._stack.callback(os.close, self.srmig_fd)
        self.dp.add_sid(SID_S, Behaviour.END_S)
        self.dp.set_vm(VM_RUN, VmState.RUNNING)
        self.dp.set_vm(VM_AWAY, VmState.AWAY, next_sid=NEXT_SID)
        self.dp.set_vm(VM_HOLD, VmState.HOLD)

    def _pin_napi(self) -> None:
        r = self.topo.run("dut", "sh", "-c", "echo 1 > /sys/class/net/d_in/threaded", check=False)
        if r.returncode != 0:
            self.notes.append("threaded NAPI unavailable: DUT shares the generator's core")
            return
        ncpu = os.cpu_count() or 1
        if ncpu < 2:
            self.notes.append("one CPU: generator and DUT share it")
            return
        self._napi_cpu = 1
        pid = self._repin()
        self.notes.append(f"trafgen on CPU 0; d_in NAPI kthread ({pid or 'not found'}) on CPU 1 with the "
                          f"DUT's forwarding and the sink's XDP")

    def _repin(self) -> str | None:
        """Pin d_in's NAPI kthread to CPU 1 (again: attaching or detaching XDP may recreate it)."""
        if getattr(self, "_napi_cpu", None) is None:
            return None
        pids = subprocess.run(["pgrep", "^napi/d_in-"], capture_output=True, text=True).stdout.split()
        # kthread names carry no namespace; take the newest (ours, made last).
        for pid in pids[-1:]:
            subprocess.run(["taskset", "-pc", str(self._napi_cpu), pid], capture_output=True)
        return pids[-1] if pids else None

    def configure(self, path: str) -> None:
        """What d_in runs for `path`."""
        with self.topo.inside("dut"):
            if path == "generator":
                loader.attach("d_in", self.sink_fd, self.mode)
            elif path == "redirect_stub":
                loader.attach("d_in", self.stub_fd, self.mode)
            elif path.startswith("end_s"):
                loader.attach("d_in", self.srmig_fd, self.mode)
            else:
                loader.detach("d_in")
        self._repin()
        self.path = path
        self._cfg = self._tmp / f"{path}.cfg"
        self._cfg.write_text(trafgen_config(packet(path, self.frame_size, self.d_in_mac), self.flows))
        self._warm()

    def _warm(self) -> None:
        """A few frames first: next-hop cache, neighbour state; not counted."""
        proc = self._trafgen(200, 20000)
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            pass
        finally:
            _stop_group(proc)

    def sink_count(self) -> int:
        t = self.sink_bpf[b"rx"]
        return sum(t.getvalue(t.Key(0)))

    # one trial ------------------------------------------------------------------------------------------

    def _gen_tx(self) -> int:
        with self.topo.ipr("gen") as ipr:
            st = ipr.get_links(ipr.link_lookup(ifname="g0")[0])[0].get_attr("IFLA_STATS64")
            return st["tx_packets"] + st["tx_dropped"]

    def _trafgen(self, n: int, rate_pps: float | None) -> subprocess.Popen:
        argv = ["ip", "netns", "exec", self.topo.ns("gen"), "trafgen", "-o", "g0", "-i", str(self._cfg),
                "-n", str(n), "-P", "1", "-C"] + (["-b", f"{max(1, int(rate_pps))}pps"] if rate_pps else [])
        # Its own process group: trafgen forks its sender, and SIGINT to the parent alone leaves it running.
        return subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                                start_new_session=True)

    def trial(self, rate_pps: float, duration_s: float) -> tuple[int, int]:
        """Offer N = rate x duration frames paced at `rate_pps`; returns (N, frames at the sink).

        trafgen's shaper spends each second's budget as one burst at full speed, then sleeps: a trial lasts
        whole seconds so every second is a full one. Frames not at the sink once trafgen is done, or by the
        deadline duration + 0.1 s (trafgen's start-up, measured ~10 ms; trafgen is stopped there), are lost: dropped by a full veth ring, or
        never sent because the veth pushed back on the generator (txq stop) for longer than the trial."""
        duration_s = max(1.0, round(duration_s))
        n = max(1, int(rate_pps * duration_s))
        c0 = self.sink_count()
        t0 = time.monotonic()
        proc = self._trafgen(n, rate_pps)
        try:
            proc.wait(timeout=duration_s + START_GRACE_S)
        except subprocess.TimeoutExpired:
            pass
        finally:
            _stop_group(proc)
        wall = time.monotonic() - t0
        if proc.returncode not in (0, -signal.SIGINT, -signal.SIGKILL, 130):
            raise BenchError(f"trafgen failed ({proc.returncode}): "
                             f"{(proc.stderr.read().strip().splitlines() or ['?'])[-1]}")
        time.sleep(0.02)  # frames in flight reach the sink
        received = self.sink_count() - c0
        self.last = Trial(rate_pps, duration_s, n, received, wall)
        return n, received

    def max_forwarding_rate(self, duration_s: float = 1.0) -> dict:
        """RFC 2285 forwarding rate at maximum offered load: trafgen as fast as it can (a rate it never
        reaches) for about `duration_s`; the sink is counted over a window that starts after the warm-up.
        The DUT core is saturated the whole window, so this is its capacity."""
        tx0 = self._gen_tx()
        # A rate trafgen can never reach: its shaper never sleeps (per-packet sendto). Its unpaced mmap mode
        # gives up as soon as a native-XDP veth peer drops a frame, so it cannot be used here.
        proc = self._trafgen(10**9, UNREACHABLE_PPS)
        try:
            t_end = time.monotonic() + START_TIMEOUT_S
            while self._gen_tx() == tx0:
                if proc.poll() is not None or time.monotonic() > t_end:
                    raise BenchError(f"trafgen sent nothing within {START_TIMEOUT_S} s")
                time.sleep(0.002)
            time.sleep(WARMUP_S)
            c0, g0, t0 = self.sink_count(), self._gen_tx(), time.monotonic()
            time.sleep(duration_s)
            c1, g1, t1 = self.sink_count(), self._gen_tx(), time.monotonic()
        finally:
            _stop_group(proc)
        return {"forwarded_pps": round((c1 - c0) / (t1 - t0), 1),
                "offered_pps": round((g1 - g0) / (t1 - t0), 1), "window_s": round(t1 - t0, 3)}

    def _send_exactly(self, n: int, rate_pps: float) -> None:
        argv = ["ip", "netns", "exec", self.topo.ns("gen"), "trafgen", "-o", "g0", "-i", str(self._cfg),
                "-n", str(n), "-P", "1", "-b", f"{int(rate_pps)}pps", "-C"]
        subprocess.run(argv, capture_output=True, timeout=n / rate_pps * 3 + 5, check=True)

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self._stack.close()
        self.topo.close()
        shutil.rmtree(self._tmp, ignore_errors=True)

    def __enter__(self) -> LocalBench:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()

    # hold-ring flush ------------------------------------------------------------------------------------

    def hold_flush(self, packets: int = 4000, rate_pps: float = 20000) -> dict:
        """Park `packets` frames via End.S HOLD, then time draining the hold ring and re-sending every
        packet with the drain's RawSender (what SourceDrain does at the pause)."""
        from srmig.ctl.drain import RawSender

        self.configure("end_s_forward")
        self._cfg.write_text(trafgen_config(packet("hold", self.frame_size, self.d_in_mac), 1))
        before_sink = self.sink_count()
        self._send_exactly(packets, rate_pps)
        parked = self.sink_count() - before_sink  # should be 0: held, not forwarded
        records: list[bytes] = []
        with self.topo.inside("dut"):
            sender = RawSender()
            try:
                ring = self.dp.hold_ring(lambda rec: records.append(rec.packet))
                try:
                    before = self.sink_count()
                    t0 = time.perf_counter()
                    while ring.poll(0) > 0:
                        pass
                    t1 = time.perf_counter()
                    for p in records:
                        sender.send(p)
                    t2 = time.perf_counter()
                finally:
                    ring.close()
            finally:
                sender.close()
        time.sleep(0.05)
        arrived = self.sink_count() - before
        total = t2 - t0
        return {
            "held": len(records), "leaked_while_holding": parked, "resent_arrived": arrived,
            "drain_ring_s": round(t1 - t0, 6), "resend_s": round(t2 - t1, 6),
            "flush_pps": round(len(records) / total, 1) if total > 0 and records else 0.0,
            "method": "trafgen parks frames via End.S (VM HOLD) in the hold ring; Dataplane.hold_ring() "
                      "consumes it and srmig.ctl.drain.RawSender re-sends each packet (kernel routes it to "
                      "the sink); flush_pps = held / (drain + resend time), one Python thread",
        }


def search_path(bench: LocalBench, path: str, max_rate: float, duration_s: float, max_trials: int,
                resolution: float, on_trial: Callable | None = None) -> dict:
    bench.configure(path)
    r = S.search(bench.trial, max_rate, min_rate=max_rate / 50, duration_s=duration_s, max_trials=max_trials,
                 resolution=resolution, on_trial=on_trial)
    return r.to_dict()


def run(paths: tuple[str, ...] = PATHS, max_rate: float = 600_000, duration_s: float = 1.0,
        max_trials: int = 8, resolution: float = 0.05, mode: str = "native", flows: int = 16,
        frame_size: int | None = None, hold_packets: int = 4000, progress: Callable[[str], None] | None = None
        ) -> dict:
    out: dict = {"paths": {}}
    with LocalBench(mode=mode, flows=flows, frame_size=frame_size) as b:
        for path in paths:
            if progress:
                progress(f"local: searching {path}")
            cb = (lambda t, p=path: progress(f"  {p}: {t.rate_pps / 1e3:8.1f} kpps offered, loss "
                                             f"{t.loss_ratio * 100:6.2f} %")) if progress else None
            out["paths"][path] = search_path(b, path, max_rate, duration_s, max_trials, resolution, cb)
            out["paths"][path]["max_forwarding_rate"] = b.max_forwarding_rate(duration_s)
            if progress:
                m = out["paths"][path]["max_forwarding_rate"]
                progress(f"  {path}: forwarding rate at maximum load {m['forwarded_pps'] / 1e3:.1f} kpps "
                         f"(generator offered {m['offered_pps'] / 1e3:.1f} kpps)")
        if hold_packets:
            if progress:
                progress("local: hold-ring flush")
            out["hold_ring_flush"] = b.hold_flush(hold_packets)
        out["frame_bytes"] = len(packet("end_s_forward", frame_size))
        out["notes"] = b.notes
    out["method"] = (f"trafgen {mode} XDP veth gen->DUT->sink; NDR/PDR (loss <= {S.DEFAULT_PDR_LOSS * 100} %) "
                     f"search, <= {max_trials} trials of {duration_s} s per path, {flows} flows (inner source "
                     f"varies); trafgen's shaper sends each second's budget as one burst, so NDR/PDR measure "
                     f"burst tolerance; max_forwarding_rate = sink rate under unpaced (maximum) load = the "
                     f"DUT core's capacity, used for the ratios")
    out["cpus"] = os.cpu_count()
    return out


def ratios(local: dict) -> dict:
    p = local["paths"]

    def rate(name):  # the DUT core's capacity: forwarding rate at maximum offered load
        return p[name]["max_forwarding_rate"]["forwarded_pps"] if name in p else 0.0

    def ndr(name):
        return p[name]["ndr_pps"] if name in p else 0.0

    def ratio(a, b, f=rate):
        return round(f(a) / f(b), 3) if f(b) and f(a) else None

    def worst(*rs):
        rs = [r for r in rs if r is not None]
        return min(rs) if rs else None

    fwd_dx6, dlv_dx6 = ratio("end_s_forward", "kernel_end_dx6"), ratio("end_s_deliver", "kernel_end_dx6")
    fwd_stub, dlv_stub = ratio("end_s_forward", "redirect_stub"), ratio("end_s_deliver", "redirect_stub")
    # The headline ratios take the slower End.S branch (forward or deliver): a target met by both.
    return {"end_s_vs_kernel_dx6": worst(fwd_dx6, dlv_dx6),
            "end_s_vs_redirect_stub": worst(fwd_stub, dlv_stub),
            "end_s_forward_vs_kernel_dx6": fwd_dx6, "end_s_deliver_vs_kernel_dx6": dlv_dx6,
            "end_s_forward_vs_redirect_stub": fwd_stub, "end_s_deliver_vs_redirect_stub": dlv_stub,
            "end_s_forward_vs_kernel_end": ratio("end_s_forward", "kernel_end"),
            "redirect_stub_vs_generator": ratio("redirect_stub", "generator"),
            "ndr_end_s_forward_vs_kernel_dx6": ratio("end_s_forward", "kernel_end_dx6", ndr),
            "ndr_end_s_deliver_vs_kernel_dx6": ratio("end_s_deliver", "kernel_end_dx6", ndr),
            "ndr_end_s_forward_vs_redirect_stub": ratio("end_s_forward", "redirect_stub", ndr)}
