"""`srmig bench local`: packets/s through one forwarding core, on veths in namespaces, per SRv6 path.

    gen (g0) ---- (d_in) DUT (d_out) ---- (s0) sink
    generator     XDP or kernel            XDP counter (drop)
    CPU 0         NAPI kthread, CPU 1      (runs in the DUT's softirq, CPU 1)

In ONE run, on the SAME path and packets, each of these DUT configurations is searched for its NDR and PDR
(bench/search.py):

- end_s_forward:  srmig End.S, VM AWAY (advance SL, DA = next SID, FIB step, redirect)
- end_s_deliver:  srmig End.S, VM RUNNING (decapsulate, FIB step, redirect)
- kernel_end_dx6: the kernel's seg6local End.DX6 (no XDP on d_in)
- kernel_end:     the kernel's seg6local End (no XDP on d_in)
- forward_plain:  the kernel's IPv6 forwarding of a plain packet (no SRH) to a VM: the ingress without encap
- bpf_encap:      the same packet, route and forwarding, with srmig's H.Encaps (srmig/ebpf/encap.c, tc clsact
                  egress on d_out) pushing outer IPv6 + an SRH of ENC_SEGS: what an ingress router does per packet
- kernel_encap:   the same with the kernel's `encap seg6 mode encap` route instead (no tc program)
- redirect_stub:  bench/xdp_redirect_stub.c, redirects every frame to d_out (the floor of an XDP forwarder)
- redirect_stub_mac: bench/xdp_redirect_stub_mac.c, the same after swapping the Ethernet addresses (the
                  kernel sample xdp_redirect_map): the floor of a forwarder that reads the frame at all
- generator:      bench/xdp_sink.c on d_in itself (drop at the DUT): what the generator can offer at all

The kernel paths (kernel_end_dx6, kernel_end, kernel_encap) need SRv6 lwtunnels in the kernel
(CONFIG_IPV6_SEG6_LWTUNNEL): srmig.check.kernel_srv6() tries it at run time; where they are absent the
kernel paths are not measured, the JSON says why ("kernel_srv6", "skipped_paths") and the ratios against
them are null ("ratio_notes"). Every srmig path, both stubs and the encap paths run everywhere.

The encap paths are fed the plain inner packet of the other paths' frames (Ethernet + IPv6 + UDP): after
H.Encaps with two SIDs, what reaches the sink is exactly the frame End.S is fed. The DUT -> sink link has
MTU 1500 + 144 (srmig.ctl.ingress.MAX_OVERHEAD), so the VM's /128 route that steers packets into the encap
has MTU 1500, as a fabric with room for the encapsulation gives a VM. forward_plain and bpf_encap use that
same route to the same VM; only the filter on d_out differs (attached for bpf_encap alone, so no other
path pays for it).

Where the cores go: the generator on CPU 0 (trafgen, one process paced with sendto and pinned by itself; the
live generator's BPF_PROG_RUN, from a thread pinned there; the clone generator's loop, a NAPI kthread pinned
there). d_in uses
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

Three generators (`generator=`); "live" (the default) falls back to "clone" by itself where the kernel refuses
live frames (EPERM on some kernels; live_frames() tries it once), and the JSON's "generator" says which ran,
why, and its ceiling (the `generator` path's rate, same run): a path forwarding >= GEN_BOUND of it is
generator-bound and its ratios say so ("ratio_notes"); "ratio_ceilings" puts the ceiling next to every ratio.
- trafgen: as above; sendto per frame, about 700 kpps on this machine, below what XDP paths forward. Still
  selectable; the hold-ring flush parks its frames with it.
- live: BPF_PROG_RUN with BPF_F_TEST_XDP_LIVE_FRAMES (kernel >= 5.18) runs bench/xdp_live_gen.c on CPU 0
  with ingress = g0; its XDP_TX sends each frame out of g0 with ndo_xdp_xmit, so d_in receives XDP frames
  (no skb on the generator side) at several Mpps. One BPF_PROG_RUN per trial; the program paces itself
  against the clock in groups of LIVE_GROUP frames (like a NIC's interrupt coalescing: one DUT wake-up per
  group, not per frame; bursts of at most 128 frames only to catch up after a preemption), so a trial is a
  smooth load at the scale of a veth ring, not a burst per second, and may be shorter than a second.
  Unpaced for the forwarding rate at maximum load.
- clone: no live frames needed (native XDP on veth and a devmap broadcast, kernel >= 5.13). One seed frame
  per frame of the sequence is written once (packet socket) into a veth pair of the generator's namespace
  (LOOP_IFS); bench/xdp_clone_gen.c on its far end broadcasts each seed into a devmap holding g0 N times and
  the loop veth last: N XDP clones leave out of g0 (d_in receives XDP frames, as with live frames) and the
  seed comes round again. The loop runs in that veth's threaded NAPI, pinned to CPU 0. Pacing is the live
  generator's, per group: a group of CLONE_GROUP_MAX frames leaves when the clock says it is due, a seed that
  comes round early only loops; a run sends exactly N (the program counts, and drops its seeds at the
  limit, at the deadline, or when told to stop: the loop always ends by itself).

Frame sizes (`sizes=`, as bench/trex): "78" (an inner 78-byte frame, i.e. a 64-byte inner IPv6 packet, plus
outer IPv6 and SRH: the minimum), a number N (an N-byte outer IPv6 packet, frame N + 14; 1500 fills the
veth MTU), "imix" (inner IPv6 packets of 64 and 570 bytes and 1500-byte outer packets, 7:4:1, interleaved).
Each size is measured for every path, `repeat` times over (sizes and paths inside each repetition, so slow
drifts of a shared machine land on every path alike); the JSON reports the median and the range.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import functools
import os
import shutil
import signal
import socket
import statistics
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from scapy.layers.l2 import Ether

from bench import search as S
from srmig import check, netlink
from srmig.ctl import ingress
from srmig.bpf import libbpf, loader
from srmig.bpf.abi import Behaviour, VmState
from srmig.testbed.lab import NamespaceLab, encap_on, xdp_on
from srmig.testbed.netns import Topology, inside
from srmig.testbed.packets import INGRESS_MAC, h_encaps, inner

BENCH_DIR = Path(__file__).resolve().parent

SID_S = "fc00:0:1::5"
SID_K_DX6 = "fc00:0:1::dd"
SID_K_END = "fc00:0:1::e"
NEXT_SID = "fc00:0:2::b"      # the sink's locator: where End / End.S forward to
VM_RUN = "2001:db8:100::10"   # behind the sink: where End.S deliver and End.DX6 send the inner packet
VM_AWAY = "2001:db8:100::20"
VM_HOLD = "2001:db8:100::30"
VM_ENC = "2001:db8:100::70"   # forward_plain and bpf_encap: one /128 route (MTU 1500), with or without H.Encaps
VM_KENC = "2001:db8:100::71"  # kernel_encap: an `encap seg6` route
ENC_SEGS = ["fc00:0:2::e1", NEXT_SID]  # what the ingress pushes: two SIDs (End.S's input), routed to the sink
DUT_ADDR = "2001:db8:b::1"    # d_out: the encap's outer source
SINK_ADDR = "2001:db8:b::2"

PATHS = ("generator", "redirect_stub", "redirect_stub_mac", "end_s_forward", "end_s_deliver", "kernel_end_dx6",
         "kernel_end", "forward_plain", "bpf_encap", "kernel_encap")
RATIO_PATHS = ("redirect_stub", "redirect_stub_mac", "end_s_forward", "end_s_deliver",
               "kernel_end_dx6", "forward_plain", "bpf_encap", "kernel_encap")  # what the ratios compare
KERNEL_PATHS = ("kernel_end_dx6", "kernel_end", "kernel_encap")  # need SRv6 lwtunnels in the kernel
PLAIN_PATHS = ("forward_plain", "bpf_encap", "kernel_encap")  # fed plain IPv6 (no SRH): the ingress's input
GEN_BOUND = 0.9  # a path forwarding >= 90 % of what the generator can offer at all is generator-bound
STUBS = {"redirect_stub": "xdp_redirect_stub", "redirect_stub_mac": "xdp_redirect_stub_mac"}  # path: C function
GENERATORS = ("trafgen", "live", "clone")
SIZES = ("78", "512", "1500", "imix")
IMIX = ((64, 7), (570, 4), (None, 1))  # inner IPv6 bytes (None: a 1500-byte outer packet), weight: bench/trex's
IMIX_ORDER = (0, 1, 0, 1, 0, 2, 0, 1, 0, 1, 0, 0)  # 7:4:1, interleaved so no size comes in a run
MTU = 1500
GEN_CPU = 0                  # where trafgen (its own -P 1 pinning) and the live generator run
LIVE_BATCH = 64              # frames per live-mode batch (the kernel's default; sent at the end of each)
LIVE_GROUP = 32              # paced frames leave in groups of 32, like a NIC coalescing interrupts
LIVE_REPEAT_MAX = 2**31 - 1  # BPF_PROG_RUN's repeat is an int; a paced run is interrupted long before
LIVE_GRACE = 0.05            # a paced live trial may overrun its duration by 5 % (+20 ms) before it stops
WARMUP_S = 0.05
UNREACHABLE_PPS = 50_000_000
START_GRACE_S = 0.1
START_TIMEOUT_S = 2.0
LOOP_IFS = ("lp0", "lp1")    # the clone generator's seed loop, a veth pair in the generator's namespace
CLONE_GROUP_MAX = 32         # clones per pass of a seed (bench/xdp_clone_gen.c's GROUP_MAX): paced groups too
CLONE_SEEDS_MAX = 16         # seeds in the loop at once (IMIX: 12)
CLONE_RETIRE_S = 1.0         # after its deadline, a run's seeds leave the loop within this (a pass takes µs)
BPF_XDP_DEVMAP = 33           # enum bpf_attach_type: a devmap entry's egress program (the clone generator's stamp)
CLONE_FLAT_OUT_S = 60.0      # an unpaced window ends by itself after this, whatever userspace does


class BenchError(RuntimeError):
    """A one-line reason the local benchmark cannot run here."""


def _route(path: str) -> tuple[list[str], str]:
    """The segment list (travel order) and inner destination of the packets fed to `path` (the encap paths:
    the list the DUT pushes)."""
    if path in ("forward_plain", "bpf_encap"):
        return ENC_SEGS, VM_ENC
    if path == "kernel_encap":
        return ENC_SEGS, VM_KENC
    if path in ("kernel_end_dx6",):
        return [SID_K_DX6], VM_RUN
    if path == "kernel_end":
        return [SID_K_END, NEXT_SID], VM_RUN
    if path == "end_s_deliver":
        return [SID_S, NEXT_SID], VM_RUN
    if path == "hold":
        return [SID_S, NEXT_SID], VM_HOLD
    return [SID_S, NEXT_SID], VM_AWAY  # end_s_forward, the redirect stubs, generator


def _frame(path: str, payload: bytes, dst_mac: str) -> bytes:
    """`path`'s frame around an inner UDP `payload`: H.Encaps'd, or plain IPv6 for the encap paths."""
    segs, vm = _route(path)
    if path in PLAIN_PATHS:
        return bytes(Ether(src=INGRESS_MAC, dst=dst_mac) / inner(vm, payload=payload))
    return bytes(h_encaps(segs, inner(vm, payload=payload), dst_mac=dst_mac))


def inner_offset(frame: bytes) -> int:
    """Where the inner IPv6 header starts: behind outer IPv6 + SRH, or at 14 in a plain IPv6 frame."""
    if frame[14 + 6] == 43:  # outer next header: routing (the SRH)
        return 14 + 40 + (frame[14 + 40 + 1] + 1) * 8
    return 14


def packet(path: str, size: int | None = None, dst_mac: str = "02:00:00:00:00:01") -> bytes:
    """The frame each path is fed; `size` pads the inner payload up to that frame length."""
    frame = _frame(path, b"srmig-bench", dst_mac)
    if size and size > len(frame):
        frame = _frame(path, b"srmig-bench".ljust(size - len(frame) + 11, b"."), dst_mac)
    return frame


def _sized(path: str, dst_mac: str, inner_ip_len: int | None = None, outer_ip_len: int | None = None) -> bytes:
    """`path`'s frame with an inner IPv6 packet of `inner_ip_len` bytes, or an outer one of `outer_ip_len`
    (the encap paths: the inner packet of that outer one, which their encapsulation makes)."""
    segs, vm = _route(path)
    if inner_ip_len is None:
        inner_ip_len = outer_ip_len - 40 - 8 - 16 * len(segs)
    payload = inner_ip_len - 40 - 8  # inner IPv6 + UDP headers
    if payload < 2:
        raise ValueError(f"{path}: an inner IPv6 packet of {inner_ip_len} bytes is too short")
    return _frame(path, b"srmig-bench".ljust(payload, b".")[:payload], dst_mac)


def frames(path: str, size: str, dst_mac: str = "02:00:00:00:00:01") -> list[bytes]:
    """The frames of one size (see the module doc: "78", "imix", or an outer IPv6 length), in sending order."""
    size = str(size)
    if size == "78":
        return [_sized(path, dst_mac, inner_ip_len=64)]
    if size == "imix":
        mix = [_sized(path, dst_mac, inner_ip_len=n) if n else _sized(path, dst_mac, outer_ip_len=MTU)
               for n, _ in IMIX]
        return [mix[i] for i in IMIX_ORDER]
    if not size.isdigit():
        raise ValueError(f"frame size {size!r}: expected 78, imix or an outer IPv6 packet length in bytes")
    if int(size) > MTU:
        raise ValueError(f"frame size {size}: an outer IPv6 packet above the veth MTU ({MTU})")
    return [_sized(path, dst_mac, outer_ip_len=int(size))]


def frame_bytes(path: str, size: str) -> float:
    """Mean Ethernet frame length (no FCS) of `path` at `size`: what throughput in bits is computed from."""
    fs = frames(path, size)
    return round(sum(map(len, fs)) / len(fs), 1)


def trafgen_config(frame: bytes, flows: int = 1) -> str:
    """A trafgen packet: the frame's bytes; with flows > 1 the inner source's last byte counts up (dinc)."""
    body = [f"0x{b:02x}" for b in frame]
    if flows > 1:
        # The inner IPv6 source's last byte: the source is at +8 in an IPv6 header, 16 bytes long.
        off = inner_offset(frame) + 8 + 15
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


@contextlib.contextmanager
def _on_cpu(cpu: int | None):
    """Pin the calling thread (not the process) to `cpu` for the body."""
    if cpu is None:
        yield
        return
    old = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {cpu})
    try:
        yield
    finally:
        os.sched_setaffinity(0, old)


def _refusal(e: OSError) -> str:
    """'refused (EPERM: Operation not permitted)' for an OSError from BPF_PROG_RUN."""
    code = e.errno if isinstance(e.errno, int) else 0
    name = errno.errorcode.get(code, str(code))
    return f"refused ({name}: {os.strerror(code)})"


@functools.cache
def live_frames() -> tuple[bool, str]:
    """Whether this kernel runs BPF_PROG_RUN with BPF_F_TEST_XDP_LIVE_FRAMES: (True, "available") or (False,
    "refused (EPERM: ...)"). Tried once per process with a few frames that an XDP_DROP program drops, in a
    throwaway namespace with a veth (the generator's setting); some kernels refuse it even to root."""
    with check.scratch_netns() as ns:
        with netlink.handle(ns) as ipr:
            netlink.add_veth("lf0", "lf1", ipr)
            for name in ("lf0", "lf1"):
                netlink.set_link_up(netlink.ifindex(name, ipr), ipr)
        bpf, fd = loader.compile_program(BENCH_DIR / "xdp_sink.c", "xdp_sink")
        try:
            with inside(ns):
                libbpf.prog_test_run_live(fd, bytes(64), 64, socket.if_nametoindex("lf0"))
        except OSError as e:
            return False, _refusal(e)
        finally:
            bpf.cleanup()
    return True, "available"


def pick_generator(requested: str) -> tuple[str, str]:
    """The generator to run for `requested` and what became of live frames: ("live", "available"), or
    ("clone", "refused (EPERM: ...)") when live frames are refused here (the automatic fallback: the clone
    generator needs no more than native XDP on veth and a devmap broadcast), or ("trafgen" | "clone",
    "not tried: --generator ...") when one is asked for by name."""
    if requested not in GENERATORS:
        raise BenchError(f"unknown generator {requested!r}: expected {', '.join(GENERATORS)}")
    if requested in ("trafgen", "clone"):
        name, why = requested, f"not tried: --generator {requested}"
    else:
        ok, why = live_frames()
        name = "live" if ok else "clone"
    if name == "trafgen" and not shutil.which("trafgen"):
        raise BenchError("trafgen not found: apt-get install netsniff-ng (./run setup installs it)")
    return name, why


def once_sending(gen, during: Callable[[], None]) -> Callable[[], None]:
    """A generator's flat_out() watch: `during()` once `gen` made its first frame; nothing if it made none
    within START_TIMEOUT_S (nothing measured: the caller finds no window)."""
    def watch():
        give_up = time.monotonic() + START_TIMEOUT_S
        while gen.generated() == 0:
            if time.monotonic() > give_up:
                return
            time.sleep(0.001)
        during()
    return watch


class LiveGenerator:
    """Frames out of one veth with BPF_PROG_RUN live frames (bench/xdp_live_gen.c, XDP_TX). `load(frames)`
    then `send(n, rate)`; the generator counts every frame it made (`generated()`)."""

    def __init__(self, topo: Topology, role: str, ifname: str, cpu: int | None = GEN_CPU):
        self.topo, self.role, self.cpu = topo, role, cpu
        self.ifindex = topo.ifindex(role, ifname)
        self.bpf, self.fd = loader.compile_program(BENCH_DIR / "xdp_live_gen.c", "xdp_live_gen")
        tmpls = self.bpf[b"tmpls"]
        # The C's sizes, from bcc's derived types: no constant copied by hand.
        self.hdr_bytes = ctypes.sizeof(tmpls.Leaf().hdr)
        self.tmpl_max = tmpls.max_entries
        self.seq_max = self.bpf[b"seq"].max_entries
        self._frame = b""

    def load(self, frames_: list[bytes], flows: int = 1) -> None:
        """Send `frames_` in this order, over and over; with flows > 1 the last 2 bytes of the inner IPv6
        source count 0..flows-1 (IPv6 frames, H.Encaps'd or plain: see inner_offset()). Frames shorter than
        the program's header copy are padded for it and cut back to their length by the program."""
        distinct = list(dict.fromkeys(frames_))
        if len(distinct) > self.tmpl_max or len(frames_) > self.seq_max:
            raise BenchError(f"live generator: at most {self.tmpl_max} frames, a sequence of {self.seq_max}")
        if min(map(len, distinct)) < 14 + 40:
            raise BenchError("live generator: frames shorter than Ethernet + IPv6")
        if not 1 <= flows <= 1 << 16:
            raise BenchError("live generator: 1 to 65536 flows")
        tmpls, seq = self.bpf[b"tmpls"], self.bpf[b"seq"]
        for i, f in enumerate(distinct):
            leaf = tmpls.Leaf()
            leaf.len = len(f)
            leaf.flow_off = inner_offset(f) + 8 + 14  # the inner source's last 2 bytes (IPv6 src at +8)
            ctypes.memmove(leaf.hdr, f[:self.hdr_bytes].ljust(self.hdr_bytes, b"\0"), self.hdr_bytes)
            tmpls[tmpls.Key(i)] = leaf
        for i, f in enumerate(frames_):
            seq[seq.Key(i)] = seq.Leaf(distinct.index(f))
        self._seq_len, self._flows = len(frames_), flows
        # The program copies a template's header over it, then trims it to that template's length.
        self._frame = max(distinct, key=len).ljust(self.hdr_bytes, b"\0")

    def generated(self) -> int:
        """Frames sent by the current (or last) run."""
        st = self.bpf[b"state"]
        return st[st.Key(0)].sent

    def _arm(self, limit: int, rate_pps: float | None, until: float | None) -> None:
        """The program's configuration for one run, and its state reset (nothing sent yet)."""
        c = self.bpf[b"cfg"]
        cfg = c.Leaf()
        cfg.seq_len, cfg.flows, cfg.limit = self._seq_len, self._flows, limit
        cfg.interval_ps = round(1e12 / rate_pps) if rate_pps else 0
        cfg.stop_ns = int(until * 1e9) if until else 0
        cfg.group = LIVE_GROUP
        c[c.Key(0)] = cfg
        st = self.bpf[b"state"]
        leaf = st.Leaf()
        leaf.sent, leaf.next_ps, leaf.in_group = 0, time.monotonic_ns() * 1000, 0
        st[st.Key(0)] = leaf

    def made(self, n: int) -> list[bytes]:
        """The first `n` frames a run would send, made by the program without sending them (plain
        BPF_PROG_TEST_RUN, one run each: works where live frames are refused too). Each must be XDP_TX."""
        if not self._frame:
            raise BenchError("live generator: load() frames first")
        self._arm(n, None, None)
        out = []
        for _ in range(n):
            r = libbpf.prog_test_run(self.fd, self._frame)
            if r.retval != 3:  # XDP_TX
                raise BenchError(f"live generator: the program returned {r.retval}, not XDP_TX")
            out.append(r.data)
        return out

    def _go(self, limit: int, rate_pps: float | None, until: float | None,
            watch: Callable[[], None] | None) -> int:
        """One BPF_PROG_RUN: up to `limit` frames at `rate_pps` (None: flat out) until `until`
        (time.monotonic()). `watch` runs in a helper thread while it goes; when it returns, the run is
        interrupted (SIGUSR1 to this thread: BPF_PROG_RUN returns EINTR). Without `watch` the run makes
        exactly `limit` frames, unpaced. Returns the frames sent."""
        if not self._frame:
            raise BenchError("live generator: load() frames first")
        if watch is None and (rate_pps or until):
            raise ValueError("a paced or timed run needs a watch to end it")
        if watch and threading.current_thread() is not threading.main_thread():
            raise BenchError("the live generator runs in the main thread (it is interrupted by a signal)")
        self._arm(limit, rate_pps, until)
        repeat = LIVE_REPEAT_MAX if watch else limit
        done = threading.Event()
        me = threading.get_ident()

        def helper():
            try:
                watch()
            finally:
                while not done.is_set():  # again until it lands inside the syscall
                    signal.pthread_kill(me, signal.SIGUSR1)
                    done.wait(0.01)

        old = signal.signal(signal.SIGUSR1, lambda *_: None) if watch else None
        try:
            with self.topo.inside(self.role), _on_cpu(self.cpu):
                th = threading.Thread(target=helper, daemon=True) if watch else None  # on our CPU too
                if th:
                    th.start()
                try:
                    libbpf.prog_test_run_live(self.fd, self._frame, repeat, self.ifindex, LIVE_BATCH)
                except InterruptedError:
                    pass
                except OSError as e:
                    raise BenchError(f"BPF_PROG_RUN live frames {_refusal(e)}: needs a kernel >= 5.18 that "
                                     f"permits BPF_F_TEST_XDP_LIVE_FRAMES (else --generator trafgen)") from None
                finally:
                    done.set()
                    if th:
                        th.join()
        finally:
            if watch:
                signal.signal(signal.SIGUSR1, old)
        return self.generated()

    def send(self, n: int, rate_pps: float | None = None, until: float | None = None) -> int:
        """Send `n` frames, paced at `rate_pps` (None: as fast as the CPU goes), stopping at `until`
        (time.monotonic(); paced, at the latest twice the time n frames take, plus a second). Returns the
        frames sent."""
        if rate_pps is None and until is None:
            return self._go(n, None, None, None)
        t0 = time.monotonic()
        if rate_pps and until is None:
            until = t0 + 2 * n / rate_pps + 1.0
        end = min(t0 + n / rate_pps, until) if rate_pps else until

        def watch():
            time.sleep(max(0.0, end - time.monotonic()))
            while self.generated() < n and (until is None or time.monotonic() < until):
                time.sleep(0.002)

        return self._go(n, rate_pps, until, watch)

    def flat_out(self, during: Callable[[], None]) -> int:
        """Frames as fast as the CPU goes while `during()` runs (in a helper thread; it measures)."""
        return self._go(2**63, None, None, once_sending(self, during))

    def close(self) -> None:
        self.bpf.cleanup()


class CloneGenerator:
    """Frames out of one veth, cloned in the kernel (bench/xdp_clone_gen.c): a few seed frames loop between
    a veth pair of the generator's namespace (LOOP_IFS) and every pass broadcasts up to CLONE_GROUP_MAX
    clones of the seed out of `ifname`. Needs native XDP on veth and BPF_F_BROADCAST (kernel >= 5.13), not
    live frames. `load(frames)` then `send(n, rate)`; the program counts every frame it sent
    (`generated()`), and a run sends exactly n (the ones a full DUT ring refuses included, as with live
    frames: the kernel counts those as tx_dropped on `ifname`). Same interface as LiveGenerator."""

    FANS = (32, 16, 8, 4, 2, 1)  # the program's fan maps: fanN = N x `ifname`, then the loop veth

    def __init__(self, topo: Topology, role: str, ifname: str, cpu: int | None = GEN_CPU):
        self.topo, self.role, self.cpu = topo, role, cpu
        lp0, lp1 = LOOP_IFS
        with topo.ipr(role) as ipr:
            netlink.add_veth(lp0, lp1, ipr)
        for name in (lp0, lp1):  # no IPv6 there: the kernel's own ND and MLD frames would join the loop
            topo.run(role, "sysctl", "-qw", f"net.ipv6.conf.{name}.disable_ipv6=1")
        with topo.ipr(role) as ipr:
            for name in (lp0, lp1):
                netlink.set_link_up(netlink.ifindex(name, ipr), ipr)
        self.out_ifindex = topo.ifindex(role, ifname)
        self.loop_ifindex = topo.ifindex(role, lp0)
        self.bpf, self.fd = loader.compile_program(BENCH_DIR / "xdp_clone_gen.c", "xdp_clone_gen")
        self.notes: list[str] = []
        self._seeds: list[bytes] = []
        self.threaded = False
        self.stamp_fd: int | None = None
        self._tx: socket.socket | None = None
        try:
            # A devmap resolves ifindexes in the namespace of the writer: fill the fans from inside.
            with topo.inside(role):
                for n in self.FANS:
                    fan = self.bpf[f"fan{n}".encode()]
                    for i in range(n):
                        fan[fan.Key(i)] = fan.Leaf(self.out_ifindex)
                    fan[fan.Key(n)] = fan.Leaf(self.loop_ifindex)  # last: the original frame, round again
                loader.attach(lp1, self.fd, "native")  # always native: the clones leave as XDP frames
                self._tx = socket.socket(socket.AF_PACKET, socket.SOCK_RAW)  # the seeds' way in
            self._tx.bind((lp0, 0))
            self._pin_loop()
        except BaseException:
            self.close()
            raise

    def _pin_loop(self) -> None:
        """lp1's NAPI threaded, its kthread on the generator's CPU: the loop spins there, scheduled like
        any thread, not in whichever task's softirq happens to run."""
        lp1 = LOOP_IFS[1]
        pat = f"^napi/{lp1}-"
        before = set(subprocess.run(["pgrep", pat], capture_output=True, text=True).stdout.split())
        r = self.topo.run(self.role, "sh", "-c", f"echo 1 > /sys/class/net/{lp1}/threaded", check=False)
        own = set(subprocess.run(["pgrep", pat], capture_output=True, text=True).stdout.split()) - before
        self.threaded = r.returncode == 0 and bool(own)
        if not self.threaded:
            self.notes.append(f"clone generator: threaded NAPI on {lp1} unavailable: the loop runs in softirq "
                              f"on the CPU that injects the seeds")
            return
        if self.cpu is not None:
            for pid in own:
                subprocess.run(["taskset", "-pc", str(self.cpu), pid], capture_output=True)
        self.notes.append(f"clone generator: seed loop {LOOP_IFS[0]} <-> {lp1}, NAPI kthread "
                          f"{','.join(sorted(own))} on CPU {self.cpu}")

    def stamp(self, off: int) -> None:
        """From now on, every frame leaves with a sequence number (8 bytes, big-endian) at byte `off`,
        counting from 0 in each run: xdp_clone_stamp as the egress program of the fan maps' `ifname`
        entries (a devmap program, kernel >= 5.8). A number is spent on a frame a full ring on the way
        refuses too (counted as tx_dropped on `ifname`)."""
        if not 0 <= off <= 1023 - 8:
            raise BenchError("clone generator: a sequence number goes within the frame's first 1 KiB")
        if self.stamp_fd is None:
            fn = self.bpf.load_func(b"xdp_clone_stamp", self.bpf.XDP, attach_type=BPF_XDP_DEVMAP)
            self.stamp_fd = fn.fd
        st = self.bpf[b"stamp"]
        st[st.Key(0)] = st.Leaf(0, off, 0)
        with self.topo.inside(self.role):  # a devmap resolves ifindexes in the writer's namespace
            for n in self.FANS:
                fan = self.bpf[f"fan{n}".encode()]
                for i in range(n):
                    fan[fan.Key(i)] = fan.Leaf(self.out_ifindex, self.stamp_fd)

    def stamped(self) -> int:
        """Sequence numbers given out in the current (or last) run: the next one."""
        st = self.bpf[b"stamp"]
        return st[st.Key(0)].next

    def load(self, frames_: list[bytes], flows: int = 1) -> None:
        """Send `frames_` in this order, over and over (each one `group` times in a row: one seed per
        frame); with flows > 1 the last 2 bytes of the inner IPv6 source count 0..flows-1 per group."""
        if not frames_ or len(frames_) > CLONE_SEEDS_MAX:
            raise BenchError(f"clone generator: 1 to {CLONE_SEEDS_MAX} frames")
        if min(map(len, frames_)) < 14 + 40:
            raise BenchError("clone generator: frames shorter than Ethernet + IPv6")
        if not 1 <= flows <= 1 << 16:
            raise BenchError("clone generator: 1 to 65536 flows")
        offs = {inner_offset(f) + 8 + 14 for f in frames_}  # the inner source's last 2 bytes (IPv6 src at +8)
        if len(offs) != 1 or max(offs) + 2 > min(map(len, frames_)) or max(offs) > 255:
            raise BenchError("clone generator: the frames' inner sources must sit at one offset below 256")
        self._seeds, self._flows, self._flow_off = list(frames_), flows, offs.pop()

    def _state(self):
        st = self.bpf[b"state"]
        return st[st.Key(0)]

    def generated(self) -> int:
        """Frames sent by the current (or last) run."""
        return self._state().sent

    def _retired(self) -> int:
        return self._state().retired

    def _arm(self, limit: int, rate_pps: float | None, stop_at: float) -> None:
        c = self.bpf[b"cfg"]
        cfg = c.Leaf()
        cfg.interval_ps = round(1e12 / rate_pps) if rate_pps else 0
        cfg.limit, cfg.stop_ns = limit, int(stop_at * 1e9)
        cfg.group, cfg.flows, cfg.flow_off = CLONE_GROUP_MAX, self._flows, self._flow_off
        cfg.loop_ifindex, cfg.stop, cfg.seeds = self.loop_ifindex, 0, len(self._seeds)
        c[c.Key(0)] = cfg
        st = self.bpf[b"state"]
        st[st.Key(0)] = st.Leaf(0, time.monotonic_ns() * 1000, 0, 0, 0, 0, 0)
        if self.stamp_fd is not None:
            sc = self.bpf[b"stamp"]
            sc[sc.Key(0)] = sc.Leaf(0, sc[sc.Key(0)].off, 0)

    def _stop(self) -> None:
        c = self.bpf[b"cfg"]
        cfg = c[c.Key(0)]
        cfg.stop = 1
        c[c.Key(0)] = cfg

    def _inject(self) -> None:
        """The seeds into the loop: one packet-socket send each. With threaded NAPI the loop's kthread takes
        them wherever we run; without, the loop stays in the softirq of the CPU that sent them: the
        generator's. The socket stays open from one run to the next: closing a packet socket waits for an
        RCU grace period (synchronize_net), which took 0.7-1.4 s here while the loop spins."""
        with _on_cpu(None if self.threaded else self.cpu):
            for f in self._seeds:
                self._tx.send(f)

    def _run(self, limit: int, rate_pps: float | None, stop_at: float,
             during: Callable[[], None] | None = None) -> int:
        """One run: seeds in, until `limit` frames are sent or the clock reaches `stop_at`
        (time.monotonic()); `during` runs meanwhile and ends the run when it returns. Every seed has
        retired when this returns (the loop is empty). Returns the frames sent."""
        if not self._seeds:
            raise BenchError("clone generator: load() frames first")
        self._arm(limit, rate_pps, stop_at)
        self._inject()
        try:
            if during:
                during()
                self._stop()
            while self._retired() < len(self._seeds) and time.monotonic() < stop_at + CLONE_RETIRE_S:
                time.sleep(0.002)
        finally:
            self._stop()
            give_up = time.monotonic() + CLONE_RETIRE_S
            while self._retired() < len(self._seeds) and time.monotonic() < give_up:
                time.sleep(0.002)
        st = self._state()
        if st.retired < len(self._seeds) or st.seen != len(self._seeds):
            raise BenchError(f"clone generator: {st.seen} of {len(self._seeds)} seed(s) in the loop, "
                             f"{st.retired} left it (failed broadcasts: {st.failed})")
        return st.sent

    def send(self, n: int, rate_pps: float | None = None, until: float | None = None,
             during: Callable[[], None] | None = None) -> int:
        """Send `n` frames, paced at `rate_pps` (None: as fast as the CPU goes), stopping at `until`
        (time.monotonic(); by default twice the time n frames take at rate_pps, or at 100 kpps, plus a
        second), or as soon as `during()` (run meanwhile, in this thread) returns. Returns the frames sent."""
        if until is None:
            until = time.monotonic() + 2 * n / (rate_pps or 100_000) + 1.0
        return self._run(n, rate_pps, until, during)

    def flat_out(self, during: Callable[[], None]) -> int:
        """Frames as fast as the CPU goes while `during()` runs (it measures); at most CLONE_FLAT_OUT_S."""
        return self._run(2**62, None, time.monotonic() + CLONE_FLAT_OUT_S, once_sending(self, during))

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self._stop()
        with contextlib.suppress(Exception), self.topo.inside(self.role):
            loader.detach(LOOP_IFS[1])
        if self._tx:
            self._tx.close()
        self.bpf.cleanup()


class LocalBench(NamespaceLab):
    """The gen -> DUT -> sink topology; `configure(path)` then `trial(rate, duration)`. Always cleaned up.

    `generator`: "live" runs live frames where the kernel permits them, else trafgen (pick_generator());
    `self.generator` is the one that runs, `self.live_frames` what became of live frames. `kernel_srv6`:
    (present, reason) as srmig.check.kernel_srv6() returns it (tried here when None); without SRv6
    lwtunnels the kernel paths are not set up and `paths` (the ones that can run) leaves them out."""

    def __init__(self, mode: str = "native", flows: int = 16, frame_size: int | None = None,
                 generator: str = "trafgen", kernel_srv6: tuple[bool, str] | None = None):
        super().__init__(f"{os.getpid()}-bl")
        self.generator, self.live_frames = pick_generator(generator)
        self.kernel_srv6 = kernel_srv6 if kernel_srv6 is not None else check.kernel_srv6()
        self.paths = tuple(p for p in PATHS if self.kernel_srv6[0] or p not in KERNEL_PATHS)
        self.mode = mode
        self.flows = flows
        self.frame_size = frame_size
        self.fast: LiveGenerator | CloneGenerator | None = None  # None: trafgen
        self.size: str | None = None
        self._tmp = Path(tempfile.mkdtemp(prefix="srmig-bench-"))
        self.path: str | None = None
        self.notes: list[str] = []

    # setup ----------------------------------------------------------------------------------------------

    def _build(self) -> None:
        t = self.topo
        for role in ("gen", "dut", "sink"):
            t.add_host(role)
        t.link("gen", "g0", "dut", "d_in", "2001:db8:a::1/64", "2001:db8:a::2/64")
        t.link("dut", "d_out", "sink", "s0", DUT_ADDR + "/64", SINK_ADDR + "/64")
        for role, ifname in (("dut", "d_out"), ("sink", "s0")):  # a fabric with room for the encapsulation
            with t.ipr(role) as ipr:
                ipr.link("set", index=ipr.link_lookup(ifname=ifname)[0], mtu=MTU + ingress.MAX_OVERHEAD)
        for role, ifname in (("dut", "d_in"), ("dut", "d_out"), ("sink", "s0")):
            t.run(role, "ethtool", "-K", ifname, "gro", "on")  # NAPI on veth rx (needed by native redirect)
        self.d_in_mac = t.mac("dut", "d_in")
        self.d_out_ifindex = t.ifindex("dut", "d_out")
        t.route("dut", "fc00:0:2::/48", gateway=SINK_ADDR)
        t.route("dut", "2001:db8:100::/64", gateway=SINK_ADDR)
        t.neigh("dut", "d_out", SINK_ADDR, t.mac("sink", "s0"))
        if self.kernel_srv6[0]:
            t.route("dut", SID_K_DX6 + "/128", oif="d_out",
                    encap={"type": "seg6local", "action": "End.DX6", "nh6": SINK_ADDR})
            t.route("dut", SID_K_END + "/128", oif="d_out", encap={"type": "seg6local", "action": "End"})
            with t.ipr("dut") as ipr:  # the kernel's H.Encaps (its route MTU: the kernel's own business)
                ingress.KernelEncap(SINK_ADDR, self.d_out_ifindex, ipr).set(VM_KENC, ENC_SEGS)
        else:
            self.notes.append(f"kernel SRv6 lwtunnels {self.kernel_srv6[1]}: kernel paths "
                              f"{', '.join(KERNEL_PATHS)} not measured")
        self._pin_napi()
        # The sink: count and drop, native XDP on s0.
        self.sink_bpf, sink_fd = loader.compile_program(BENCH_DIR / "xdp_sink.c", "xdp_sink")
        self._stack.callback(self.sink_bpf.cleanup)
        self.sink_classify_fd = self.sink_bpf.load_func(b"xdp_sink_classify", self.sink_bpf.XDP).fd
        with t.inside("sink"):
            loader.attach("s0", sink_fd, self.mode)
        self.sink_fd = sink_fd
        # The redirect stubs, egress = d_out.
        self.stub_fds = {}
        for path, func in STUBS.items():
            bpf, self.stub_fds[path] = loader.compile_program(BENCH_DIR / f"{func}.c", func)
            self._stack.callback(bpf.cleanup)
            egress = bpf[b"egress"]
            egress[egress.Key(0)] = egress.Leaf(self.d_out_ifindex)
        # srmig, loaded once on d_in (detached and unpinned by xdp_on on close).
        self.dp = self._stack.enter_context(xdp_on(t, "dut", "d_in", self.mode))
        self.srmig_fd = self.dp.prog_fd()
        self._stack.callback(os.close, self.srmig_fd)
        self.dp.add_sid(SID_S, Behaviour.END_S)
        self.dp.set_vm(VM_RUN, VmState.RUNNING)
        self.dp.set_vm(VM_AWAY, VmState.AWAY, next_sid=NEXT_SID)
        self.dp.set_vm(VM_HOLD, VmState.HOLD)
        # srmig's H.Encaps on d_out's egress, towards VM_ENC along ENC_SEGS; its filter is attached only while
        # bpf_encap is configured (configure()), the route (MTU 1500) always: forward_plain takes it too.
        self.encap = self._stack.enter_context(encap_on(t, "dut", "d_out", source=DUT_ADDR))
        self._encap_attached = True
        self.encap.set(VM_ENC, ENC_SEGS)
        with t.ipr("dut") as ipr:
            ingress.route_vm(VM_ENC, SINK_ADDR, self.d_out_ifindex, ipr)
        self._encap_filter(False)
        cpu = GEN_CPU if getattr(self, "_napi_cpu", None) is not None else None
        if self.generator == "live":
            self.fast = LiveGenerator(t, "gen", "g0", cpu)
        elif self.generator == "clone":
            self.fast = CloneGenerator(t, "gen", "g0", cpu)
            self.notes += self.fast.notes
        if self.fast:
            self._stack.callback(self.fast.close)

    @staticmethod
    def _napi_pids() -> set[str]:
        return set(subprocess.run(["pgrep", "^napi/d_in-"], capture_output=True, text=True).stdout.split())

    def _pin_napi(self) -> None:
        # kthread names carry no namespace, and other benches (other processes) have a d_in too: ours are
        # the kthreads that appear when we turn threaded NAPI on (they survive XDP attach and detach).
        self._napi_foreign = self._napi_pids()
        r = self.topo.run("dut", "sh", "-c", "echo 1 > /sys/class/net/d_in/threaded", check=False)
        self._napi_own = self._napi_pids() - self._napi_foreign
        if r.returncode != 0:
            self.notes.append("threaded NAPI unavailable: DUT shares the generator's core")
            return
        ncpu = os.cpu_count() or 1
        if ncpu < 2:
            self.notes.append("one CPU: generator and DUT share it")
            return
        self._napi_cpu = 1
        pid = self._repin()
        gen = {"trafgen": "trafgen", "live": "the live-frames generator (BPF_PROG_RUN)",
               "clone": "the clone generator's seed loop"}[self.generator]
        if self.live_frames.startswith("refused"):
            self.notes.append(f"BPF_PROG_RUN live frames {self.live_frames} on this kernel: the {self.generator} "
                              f"generator runs instead (its ceiling: generator.ceiling_pps)")
        self.notes.append(f"{gen} on CPU 0; d_in NAPI kthread ({pid or 'not found'}) on CPU 1 with the "
                          f"DUT's forwarding and the sink's XDP")

    def _repin(self) -> str | None:
        """Pin d_in's NAPI kthread to CPU 1 (again, in case it was recreated: then ours is one that was not
        there before we started). Never another bench's: a kthread pinned to the generator's CPU would
        leave that bench's DUT next to nothing."""
        if getattr(self, "_napi_cpu", None) is None:
            return None
        now = self._napi_pids()
        if not self._napi_own & now:
            self._napi_own = now - self._napi_foreign
        pids = sorted(self._napi_own & now, key=int)
        for pid in pids:
            subprocess.run(["taskset", "-pc", str(self._napi_cpu), pid], capture_output=True)
        return ",".join(pids) or None

    def configure(self, path: str, size: str | None = None) -> None:
        """What d_in runs for `path`, and the frames the generator sends: `size` (see frames()), or without
        it one frame of `frame_size` bytes (the default frame when that is None)."""
        if path not in self.paths:
            raise BenchError(f"{path} cannot run here: " + (f"kernel SRv6 lwtunnels {self.kernel_srv6[1]}"
                                                           if path in KERNEL_PATHS else "unknown path"))
        with self.topo.inside("dut"):
            if path == "generator":
                loader.attach("d_in", self.sink_fd, self.mode)
            elif path in STUBS:
                loader.attach("d_in", self.stub_fds[path], self.mode)
            elif path.startswith("end_s"):
                loader.attach("d_in", self.srmig_fd, self.mode)
            else:
                loader.detach("d_in")
        self._encap_filter(path == "bpf_encap")
        self._repin()
        self.path = path
        self.size = size
        self.frames = (frames(path, size, self.d_in_mac) if size is not None
                       else [packet(path, self.frame_size, self.d_in_mac)])
        self._cfg = self._tmp / f"{path}.cfg"
        # Several frames (IMIX): trafgen sends the packets of its configuration round robin, in order.
        self._cfg.write_text("".join(trafgen_config(f, self.flows) for f in self.frames))
        if self.fast:
            self.fast.load(self.frames, self.flows)
        self._warm()

    def _warm(self) -> None:
        """A few frames first: next-hop cache, neighbour state; not counted."""
        if self.fast:
            self.fast.send(200, 20000)
            time.sleep(0.02)
            return
        proc = self._trafgen(200, 20000)
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            pass
        finally:
            _stop_group(proc)

    def _encap_filter(self, on: bool) -> None:
        """srmig's H.Encaps filter on d_out's egress, or none (program and maps stay loaded and pinned)."""
        if on == self._encap_attached:
            return
        with self.topo.inside("dut"):
            if on:
                os.close(loader.load_encap("d_out").prog_fd)  # the pinned program: no compile
            else:
                netlink.del_bpf_filter(self.d_out_ifindex, loader.ENCAP_HANDLE, loader.ENCAP_PRIO,
                                       loader.CLSACT_EGRESS)
        self._encap_attached = on

    def encap_stats(self) -> dict:
        """srmig's H.Encaps counters on the DUT (done, pass, drops by reason) since the topology was built."""
        return self.encap.stats()["counters"]

    def sink_count(self) -> int:
        t = self.sink_bpf[b"rx"]
        return sum(t.getvalue(t.Key(0)))

    def sink_srv6_count(self) -> int:
        """SRv6 frames at the sink, counted only while classify_sink(True)."""
        t = self.sink_bpf[b"rx"]
        return sum(t.getvalue(t.Key(1)))

    def classify_sink(self, on: bool) -> None:
        """The sink also counts SRv6 frames (it reads each frame: for checks, not while measuring)."""
        with self.topo.inside("sink"):
            loader.attach("s0", self.sink_classify_fd if on else self.sink_fd, self.mode)

    def send_exactly(self, n: int, rate_pps: float) -> int:
        """`n` frames of the configured path at `rate_pps`, with whichever generator runs; returns the frames
        the generator sent (count arrivals with sink_count())."""
        if self.fast:
            return self.fast.send(n, rate_pps)
        self._send_exactly(n, rate_pps)
        return n

    # one trial ------------------------------------------------------------------------------------------

    def _gen_tx(self) -> int:
        with self.topo.ipr("gen") as ipr:
            st = ipr.get_links(ipr.link_lookup(ifname="g0")[0])[0].get_attr("IFLA_STATS64")
            return st["tx_packets"] + st["tx_dropped"]

    def ring_drops(self) -> int:
        """Frames a full veth ring refused so far: the DUT's (g0 -> d_in, its receive side not keeping up)
        and the sink's (d_out -> s0). Each is counted as tx_dropped on the sending veth."""
        n = 0
        for role, ifname in (("gen", "g0"), ("dut", "d_out")):
            with self.topo.ipr(role) as ipr:
                n += ipr.get_links(ipr.link_lookup(ifname=ifname)[0])[0].get_attr("IFLA_STATS64")["tx_dropped"]
        return n

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
        deadline duration + 0.1 s (trafgen's start-up, measured ~10 ms; trafgen is stopped there), are lost:
        dropped by a full veth ring, or never sent because the veth pushed back on the generator (txq stop)
        for longer than the trial.

        With the live or clone generator the load is smooth (paced in groups of LIVE_GROUP frames), the trial may last
        a fraction of a second, and frames not sent by duration x 1.05 + 20 ms (the generator could not keep
        up) are lost too."""
        if self.fast:
            return self._live_trial(rate_pps, duration_s)
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

    def _live_trial(self, rate_pps: float, duration_s: float) -> tuple[int, int]:
        n = max(1, int(rate_pps * duration_s))
        c0 = self.sink_count()
        t0 = time.monotonic()
        sent = self.fast.send(n, rate_pps, until=t0 + duration_s * (1 + LIVE_GRACE) + 0.02)
        wall = time.monotonic() - t0
        time.sleep(0.02)  # frames in flight reach the sink
        received = self.sink_count() - c0
        self.last = Trial(rate_pps, duration_s, n, received, wall)
        self.last_generated = sent
        return n, received

    def _live_max_forwarding_rate(self, duration_s: float) -> dict:
        """The live generator flat out; the window opens WARMUP_S after its first frame."""
        w: dict = {}

        def measure():
            time.sleep(WARMUP_S)
            w["c0"], w["g0"], w["t0"] = self.sink_count(), self.fast.generated(), time.monotonic()
            time.sleep(duration_s)
            w["c1"], w["g1"], w["t1"] = self.sink_count(), self.fast.generated(), time.monotonic()

        self.fast.flat_out(measure)
        if "t1" not in w:
            raise BenchError(f"the live generator sent nothing within {START_TIMEOUT_S} s")
        dt = w["t1"] - w["t0"]
        return {"forwarded_pps": round((w["c1"] - w["c0"]) / dt, 1),
                "offered_pps": round((w["g1"] - w["g0"]) / dt, 1), "window_s": round(dt, 3)}

    def max_forwarding_rate(self, duration_s: float = 1.0) -> dict:
        """RFC 2285 forwarding rate at maximum offered load: trafgen as fast as it can (a rate it never
        reaches) for about `duration_s`; the sink is counted over a window that starts after the warm-up.
        The DUT core is saturated the whole window, so this is its capacity."""
        if self.fast:
            return self._live_max_forwarding_rate(duration_s)
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
        super().close()
        shutil.rmtree(self._tmp, ignore_errors=True)

    # hold-ring flush ------------------------------------------------------------------------------------

    def hold_flush(self, packets: int = 4000, rate_pps: float = 20000) -> dict:
        """Park `packets` frames via End.S HOLD, then time draining the hold ring and re-sending every
        packet towards the sink, twice: the way SourceDrain does it now (the ring read in bulk from its
        mmap, RawSender.send_many: sendmmsg batches) and, for comparison, the way it did (a libbpf
        callback per record, one sendto per packet)."""
        from srmig.ctl.drain import hold_ring_reader, read_hold_packets
        from srmig.ctl.senders import RawSender

        self.configure("end_s_forward")
        self._cfg.write_text(trafgen_config(packet("hold", self.frame_size, self.d_in_mac), 1))

        def park() -> int:
            before_sink = self.sink_count()
            self._send_exactly(packets, rate_pps)
            return self.sink_count() - before_sink  # should be 0: held, not forwarded

        def flush(bulk: bool) -> dict:
            with self.topo.inside("dut"):
                sender = RawSender()
                ring = hold_ring_reader(self.dp) if bulk else None
                records: list[bytes] = []
                cb = None if bulk else self.dp.hold_ring(lambda rec: records.append(rec.packet))
            try:
                before = self.sink_count()
                t0 = time.perf_counter()
                if bulk:
                    while batch := read_hold_packets(ring):
                        records += batch
                else:
                    while cb.poll(0) > 0:
                        pass
                t1 = time.perf_counter()
                if bulk:
                    sender.send_many(records)
                else:
                    for p in records:
                        sender.send(p)
                t2 = time.perf_counter()
            finally:
                (ring or cb).close()
                sender.close()
            time.sleep(0.05)
            total = t2 - t0
            return {"held": len(records), "resent_arrived": self.sink_count() - before,
                    "send_dropped": sender.dropped, "drain_ring_s": round(t1 - t0, 6),
                    "resend_s": round(t2 - t1, 6),
                    "flush_pps": round(len(records) / total, 1) if total > 0 and records else 0.0}

        parked = park()
        old = flush(bulk=False)
        parked += park()
        out = flush(bulk=True)
        out.update({
            "leaked_while_holding": parked, "per_record": old,
            "speedup": round(out["flush_pps"] / old["flush_pps"], 2) if old["flush_pps"] else None,
            "method": "trafgen parks frames via End.S (VM HOLD) in the hold ring; srmig.ctl.drain reads it in "
                      "bulk (read_hold_packets) and RawSender.send_many re-sends the packets in sendmmsg "
                      "batches (the kernel routes them to the sink); per_record: the same with "
                      "Dataplane.hold_ring()'s callback per record and one sendto per packet; flush_pps = held "
                      "/ (ring drain + resend time), one Python thread"})
        return out


def search_path(bench: LocalBench, path: str, max_rate: float, duration_s: float, max_trials: int,
                resolution: float, on_trial: Callable | None = None, size: str | None = None) -> dict:
    bench.configure(path, size)
    r = S.search(bench.trial, max_rate, min_rate=max_rate / 50, duration_s=duration_s, max_trials=max_trials,
                 resolution=resolution, on_trial=on_trial)
    return r.to_dict()


def spread(values: list) -> dict:
    """Median and range of one figure over the repetitions (None where a run could not compute it)."""
    vs = [v for v in values if v is not None]
    if not vs:
        return {"median": None, "min": None, "max": None, "runs": values}
    return {"median": round(statistics.median(vs), 3), "min": min(vs), "max": max(vs), "runs": values}


def _merge(results: list[dict]) -> dict:
    """One path's search results over the repetitions, in the single-run layout (medians), plus `spread`;
    every trial of every run, each tagged with its run."""
    def med(f):
        return round(statistics.median(f(r) for r in results), 1)

    mfr = [r["max_forwarding_rate"] for r in results]
    return {
        "ndr_pps": med(lambda r: r["ndr_pps"]), "pdr_pps": med(lambda r: r["pdr_pps"]),
        "ndr_forwarded_pps": med(lambda r: r["ndr_forwarded_pps"]),
        "pdr_forwarded_pps": med(lambda r: r["pdr_forwarded_pps"]),
        "settled": all(r["settled"] for r in results),
        "trials": [dict(t, run=i) for i, r in enumerate(results) for t in r["trials"]],
        "max_forwarding_rate": {k: round(statistics.median(m[k] for m in mfr), 3 if k == "window_s" else 1)
                                for k in ("forwarded_pps", "offered_pps", "window_s")},
        "spread": {"ndr_pps": spread([r["ndr_pps"] for r in results]),
                   "pdr_pps": spread([r["pdr_pps"] for r in results]),
                   "max_forwarding_rate_pps": spread([m["forwarded_pps"] for m in mfr])},
    }


def _int_if_whole(x: float) -> float | int:
    return int(x) if float(x).is_integer() else x


def interleave(bench: LocalBench, size: str | None, paths: tuple[str, ...], rounds: int, window_s: float
               ) -> list[dict[str, float]]:
    """The forwarding rate at maximum load of each of `paths` in a short window, path after path, `rounds`
    times over: {path: pps} per round. A tenant that takes the DUT's core for a second slows one round of
    every path, not one path of the run, so the per-round ratios measure the programs, not the neighbours."""
    out = []
    for _ in range(rounds):
        one = {}
        for path in paths:
            bench.configure(path, size)
            one[path] = bench.max_forwarding_rate(window_s)["forwarded_pps"]
        out.append(one)
    return out


def _round_ratios(rates: dict[str, float]) -> dict:
    """_ratios() of one interleaved round (its MFR ratios only)."""
    r = _ratios({path: {"max_forwarding_rate": {"forwarded_pps": pps}, "ndr_pps": 0.0}
                 for path, pps in rates.items()})
    return {k: v for k, v in r.items() if not k.startswith("ndr_")}


def _median_ratios(per_round: list[dict]) -> dict:
    def med(k):
        vs = [r[k] for r in per_round if r[k] is not None]
        return round(statistics.median(vs), 3) if vs else None
    return {k: med(k) for k in per_round[0]}


def run(paths: tuple[str, ...] = PATHS, max_rate: float = 600_000, duration_s: float = 1.0,
        max_trials: int = 8, resolution: float = 0.05, mode: str = "native", flows: int = 16,
        hold_packets: int = 4000, progress: Callable[[str], None] | None = None, generator: str = "trafgen",
        sizes: tuple[str, ...] = ("78",), repeat: int = 1, rounds: int = 0,
        kernel_srv6: tuple[bool, str] | None = None) -> dict:
    """Every path at every size, `repeat` times. `paths` holds the first size's results (medians, every
    trial) in the single-run layout; `sweep` every size's medians and ranges, ratios included. With
    `rounds`, each run also measures the ratio paths interleaved (interleave(), windows of duration_s / 2),
    and the headline ratios (`ratios_spread`) are those: per run the median of its rounds' ratios.

    Where the kernel lacks SRv6 lwtunnels (`kernel_srv6`, srmig.check.kernel_srv6() when None) the kernel
    paths are left out ("skipped_paths", with the reason) and their ratios are null ("ratio_notes" says
    why). "generator" says which generator ran (live frames fall back to the clone generator where
    refused), its ceiling and the paths it bounds; "ratio_ceilings" puts that ceiling next to every ratio."""
    sizes = tuple(str(x) for x in sizes)
    if not sizes or repeat < 1:
        raise BenchError("at least one frame size and one repetition")
    try:
        for size in sizes:
            for path in paths:
                frames(path, size)
    except ValueError as e:
        raise BenchError(str(e)) from None
    ks = kernel_srv6 if kernel_srv6 is not None else check.kernel_srv6()
    skipped = {p: f"kernel SRv6 lwtunnels {ks[1]}" for p in paths if p in KERNEL_PATHS and not ks[0]}
    paths = tuple(p for p in paths if p not in skipped)
    runs: list[dict[str, dict[str, dict]]] = []
    inter: dict[str, list[list[dict[str, float]]]] = {size: [] for size in sizes}  # per size, per run: rounds
    inter_ratios: dict[str, list[dict]] = {size: [] for size in sizes}  # per size, per run: its median round
    inter_paths = tuple(p for p in RATIO_PATHS if p in paths)
    out: dict = {"generator": None, "kernel_srv6": ks[1], "skipped_paths": skipped, "sizes": list(sizes),
                 "repeat": repeat}
    with LocalBench(mode=mode, flows=flows, generator=generator, kernel_srv6=ks) as b:
        gen_name = b.generator
        for r in range(repeat):
            one: dict[str, dict[str, dict]] = {}
            for size in sizes:
                one[size] = {}
                for path in paths:
                    if progress:
                        progress(f"local ({gen_name}, run {r + 1}/{repeat}, size {size}): searching {path}")
                    cb = (lambda t, p=path: progress(f"  {p}: {t.rate_pps / 1e3:8.1f} kpps offered, loss "
                                                     f"{t.loss_ratio * 100:6.2f} %")) if progress else None
                    res = search_path(b, path, max_rate, duration_s, max_trials, resolution, cb, size)
                    res["max_forwarding_rate"] = m = b.max_forwarding_rate(duration_s)
                    one[size][path] = res
                    if progress:
                        progress(f"  {path}: forwarding rate at maximum load {m['forwarded_pps'] / 1e3:.1f} kpps "
                                 f"(generator offered {m['offered_pps'] / 1e3:.1f} kpps)")
                if rounds and inter_paths:
                    if progress:
                        progress(f"local ({gen_name}, run {r + 1}/{repeat}, size {size}): {rounds} rounds of "
                                 f"{', '.join(inter_paths)}, interleaved")
                    rates = interleave(b, size, inter_paths, rounds, duration_s / 2)
                    inter[size].append(rates)
                    inter_ratios[size].append(rr := _median_ratios([_round_ratios(x) for x in rates]))
                    if progress:
                        progress(f"  End.S / redirect stub {rr['end_s_vs_redirect_stub']}, / the stub swapping "
                                 f"MACs {rr['end_s_vs_redirect_stub_mac']}, / kernel End.DX6 "
                                 f"{rr['end_s_vs_kernel_dx6']}; BPF H.Encaps / plain forwarding "
                                 f"{rr['bpf_encap_vs_forward_plain']} (median of the rounds)")
            runs.append(one)
        if hold_packets and shutil.which("trafgen"):  # the hold-ring flush parks its frames with trafgen
            if progress:
                progress("local: hold-ring flush")
            out["hold_ring_flush"] = b.hold_flush(hold_packets)
        out["encap_stats"] = b.encap_stats()
        out["notes"] = b.notes
        live = b.live_frames
    primary = sizes[0]
    out["paths"] = {path: _merge([one[primary][path] for one in runs]) for path in paths}
    out["frame_bytes"] = _int_if_whole(frame_bytes("end_s_forward", primary))
    out["sweep"] = {}
    for size in sizes:
        fb = {path: _int_if_whole(frame_bytes(path, size)) for path in paths}
        per_run = [_ratios(one[size]) for one in runs]
        out["sweep"][size] = {
            "frame_bytes": fb,
            "paths": {path: {
                "ndr_pps": spread([one[size][path]["ndr_pps"] for one in runs]),
                "pdr_pps": spread([one[size][path]["pdr_pps"] for one in runs]),
                "max_forwarding_rate_pps": spread([one[size][path]["max_forwarding_rate"]["forwarded_pps"]
                                                   for one in runs]),
                "max_forwarding_rate_gbps": spread([round(one[size][path]["max_forwarding_rate"]["forwarded_pps"]
                                                          * fb[path] * 8 / 1e9, 3) for one in runs]),
            } for path in paths},
            "ratios": {k: spread([pr[k] for pr in per_run]) for k in per_run[0]},
            "generator_ceiling_pps": spread([one[size]["generator"]["max_forwarding_rate"]["forwarded_pps"]
                                             if "generator" in one[size] else None for one in runs]),
        }
        if inter[size]:
            per_run_i = inter_ratios[size]
            out["sweep"][size]["interleaved"] = {
                "paths": list(inter_paths), "window_s": duration_s / 2, "rounds": inter[size],
                "ratios": {k: spread([pr[k] for pr in per_run_i]) for k in per_run_i[0]}}
    head = out["sweep"][primary]
    out["ratios_spread"] = {**head["ratios"], **{k: v for k, v in head.get("interleaved", {}).get("ratios", {}).items()
                                                 if v["median"] is not None}}  # not interleaved: kernel_end, generator
    out["generator"] = generator_info(out, gen_name, generator, live)
    out["ratio_notes"] = ratio_notes(out)
    out["ratio_ceilings"] = ratio_ceilings(out)
    gen = {"trafgen": "trafgen (sendto; its shaper sends each second's budget as one burst, so NDR/PDR measure "
                      "burst tolerance)",
           "live": f"BPF_PROG_RUN live frames (bench/xdp_live_gen.c, XDP_TX out of g0, paced in groups of "
                   f"{LIVE_GROUP} frames: a smooth load)",
           "clone": f"the clone generator (bench/xdp_clone_gen.c: seed frames loop between two veths, each pass "
                    f"broadcasts up to {CLONE_GROUP_MAX} XDP clones out of g0, paced in groups of "
                    f"{CLONE_GROUP_MAX}: a smooth load)"}[gen_name]
    if gen_name != generator:
        gen += f", in place of {generator}: BPF_PROG_RUN live frames {live} on this kernel"
    out["method"] = (f"{gen}; {mode} XDP veth gen->DUT->sink; NDR/PDR (loss <= {S.DEFAULT_PDR_LOSS * 100} %) "
                     f"search, <= {max_trials} trials of {duration_s} s per path, {flows} flows (inner source "
                     f"varies); max_forwarding_rate = sink rate under unpaced (maximum) load = the DUT core's "
                     f"capacity, used for the ratios; sizes {', '.join(sizes)} (frame_bytes: Ethernet frame "
                     f"without FCS, the IMIX mean; gbps from it); {repeat} run(s), each over every size and "
                     f"path: medians, with min/max in spread/sweep; ratios = median of the runs' ratios"
                     + (f"; headline ratios from {rounds} interleaved rounds per run and size ({', '.join(inter_paths)}"
                        f", {duration_s / 2} s windows): each run's median round" if rounds and inter_paths else ""))
    out["encap_method"] = (
        f"the DUT as an ingress router: the generator sends plain IPv6 (the inner packet of the other paths' "
        f"frames) to a VM; forward_plain = the kernel forwards it out of d_out on the VM's /128 route (MTU "
        f"{MTU}, d_out {MTU + ingress.MAX_OVERHEAD}); bpf_encap = the same with srmig's H.Encaps "
        f"(srmig/ebpf/encap.c, tc clsact egress on d_out, {len(ENC_SEGS)} SIDs: outer IPv6 + SRH, "
        f"{40 + 8 + 16 * len(ENC_SEGS)} bytes) attached; kernel_encap = an `encap seg6 mode encap` route "
        f"(where the kernel has SRv6); all counted at the sink, forwarding rate at maximum load = the DUT "
        f"core's capacity")
    out["cpus"] = os.cpu_count()
    return out


def generator_info(loc: dict, name: str, requested: str, live: str) -> dict:
    """Which generator ran, why, and how much it can offer: `ceiling_pps` is the `generator` path's
    forwarding rate (a sink on the DUT's own receive side: all the generator delivers), per size; paths
    forwarding >= GEN_BOUND of it are `bound_paths` (their rates are the generator's, not the DUT's)."""
    ceiling, bound = {}, {}
    for size, sz in loc["sweep"].items():
        g = sz["paths"].get("generator", {}).get("max_forwarding_rate_pps", {}).get("median")
        ceiling[size] = g
        bound[size] = [p for p, v in sz["paths"].items()
                       if p != "generator" and g and (v["max_forwarding_rate_pps"]["median"] or 0) >= GEN_BOUND * g]
    primary = loc["sizes"][0]
    return {"name": name, "requested": requested, "live_frames": live,
            "ceiling_pps": ceiling[primary], "bound_paths": bound[primary], "bound_at": GEN_BOUND,
            "by_size": {size: {"ceiling_pps": ceiling[size], "bound_paths": bound[size]} for size in ceiling},
            "note": (f"{name} delivers at most {ceiling[primary] / 1e3:.0f} kpps to the DUT here"
                     + (f": {', '.join(bound[primary])} forward(s) >= {GEN_BOUND:.0%} of it, so their rates and "
                        f"ratios are bounded by the generator, not measured against the DUT's core"
                        if bound[primary] else ": every path measured stays below it (DUT-bound)"))
            if ceiling[primary] else "generator path not measured: its ceiling is unknown"}


# Ratio key: (numerator paths, denominator path, figure). With two numerators the slower one counts (the
# End.S headline ratios: a target met by both branches, forward and deliver).
RATIOS: dict[str, tuple[tuple[str, ...], str, str]] = {
    "end_s_vs_kernel_dx6": (("end_s_forward", "end_s_deliver"), "kernel_end_dx6", "mfr"),
    "end_s_vs_redirect_stub": (("end_s_forward", "end_s_deliver"), "redirect_stub", "mfr"),
    "end_s_vs_redirect_stub_mac": (("end_s_forward", "end_s_deliver"), "redirect_stub_mac", "mfr"),
    "redirect_stub_mac_vs_redirect_stub": (("redirect_stub_mac",), "redirect_stub", "mfr"),
    "end_s_forward_vs_kernel_dx6": (("end_s_forward",), "kernel_end_dx6", "mfr"),
    "end_s_deliver_vs_kernel_dx6": (("end_s_deliver",), "kernel_end_dx6", "mfr"),
    "end_s_forward_vs_redirect_stub": (("end_s_forward",), "redirect_stub", "mfr"),
    "end_s_deliver_vs_redirect_stub": (("end_s_deliver",), "redirect_stub", "mfr"),
    "end_s_forward_vs_kernel_end": (("end_s_forward",), "kernel_end", "mfr"),
    "redirect_stub_vs_generator": (("redirect_stub",), "generator", "mfr"),
    "ndr_end_s_forward_vs_kernel_dx6": (("end_s_forward",), "kernel_end_dx6", "ndr"),
    "ndr_end_s_deliver_vs_kernel_dx6": (("end_s_deliver",), "kernel_end_dx6", "ndr"),
    "ndr_end_s_forward_vs_redirect_stub": (("end_s_forward",), "redirect_stub", "ndr"),
    "bpf_encap_vs_forward_plain": (("bpf_encap",), "forward_plain", "mfr"),
    "bpf_encap_vs_kernel_encap": (("bpf_encap",), "kernel_encap", "mfr"),
    "kernel_encap_vs_forward_plain": (("kernel_encap",), "forward_plain", "mfr"),
}


def _ratios(p: dict) -> dict:
    """The ratios of one set of per-path results (one run, one size): RATIOS, None where a path is missing."""

    def fig(name, f):  # mfr: the DUT core's capacity (forwarding rate at maximum offered load)
        if name not in p:
            return 0.0
        return p[name]["max_forwarding_rate"]["forwarded_pps"] if f == "mfr" else p[name]["ndr_pps"]

    def ratio(a, b, f):
        return round(fig(a, f) / fig(b, f), 3) if fig(b, f) and fig(a, f) else None

    out = {}
    for key, (nums, den, f) in RATIOS.items():
        rs = [r for r in (ratio(a, den, f) for a in nums) if r is not None]
        out[key] = min(rs) if rs else None
    return out


def ratio_notes(loc: dict) -> dict[str, str]:
    """Why a headline ratio is null (a path not measured here) or what bounds it (the generator)."""
    skipped = loc.get("skipped_paths", {})
    gen = loc.get("generator") or {}
    bound = set(gen.get("bound_paths", []))
    notes = {}
    for key, (nums, den, _) in RATIOS.items():
        missing = [p for p in (*nums, den) if p in skipped]
        if missing:
            notes[key] = f"not measured: {', '.join(missing)}: {skipped[missing[0]]}"
            continue
        num_bound, den_bound = all(n in bound for n in nums), den in bound
        at = f"{gen['name']}'s ceiling, {gen['ceiling_pps'] / 1e3:.0f} kpps" if bound else ""
        if num_bound and den_bound:
            notes[key] = f"generator-bound: both sides forward what {at} lets through; says nothing of the programs"
        elif num_bound:
            notes[key] = f"a lower bound: {', '.join(nums)} forward(s) >= {GEN_BOUND:.0%} of {at}"
        elif den_bound:
            notes[key] = f"an upper bound: {den} forwards >= {GEN_BOUND:.0%} of {at}"
    return notes


def ratio_ceilings(loc: dict) -> dict[str, dict]:
    """Next to every ratio (RATIOS), what the generator could offer: its ceiling (the `generator` path, a
    plain sink on the DUT's receive side, same run, first size), the faster side's forwarding rate, and the
    ceiling over it: above 1 / GEN_BOUND the ratio measures the programs, not the generator."""
    gen = loc.get("generator") or {}
    ceiling = gen.get("ceiling_pps")
    paths = loc.get("paths", {})
    out = {}
    for key, (nums, den, _) in RATIOS.items():
        rates = [paths[p]["max_forwarding_rate"]["forwarded_pps"] for p in (*nums, den) if p in paths]
        top = max(rates) if rates else None
        out[key] = {"generator": gen.get("name"), "generator_ceiling_pps": ceiling, "fastest_side_pps": top,
                    "ceiling_over_fastest": round(ceiling / top, 2) if ceiling and top else None}
    return out


def ratios(local: dict) -> dict:
    """The headline ratios: with repetitions (`ratios_spread`), the median of each run's ratio, so the
    figure sits inside its reported range; otherwise the ratios of `paths`."""
    if local.get("ratios_spread"):
        return {k: v["median"] for k, v in local["ratios_spread"].items()}
    return _ratios(local["paths"])
