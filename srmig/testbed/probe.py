"""Loss probe for live migrations: ICMPv6 and ICMP (IPv4) echo at a fixed rate, every reply accounted for.

Three layers, usable on their own:

* `analyse(sent, received)` — pure accounting, no I/O: sent/received/lost/duplicated/reordered, the longest
  blackout, RTTs and a per-bucket timeline. Definitions are in its docstring.
* `Probe` / `run_probe` — a paced sender and a receiver thread per destination on raw ICMPv6 / ICMP sockets
  (optionally opened inside a network namespace). Each Echo Request carries, after the 16-bit sequence
  number, a magic, a 32-bit sequence number and the monotonic send time; replies are matched on the echo
  identifier, the magic and the 32-bit sequence number, so sequence numbers never wrap ambiguously. A
  dual-stack probe sends each probe to an IPv6 and an IPv4 address back to back (one schedule) and counts
  each family on its own (`Probe.reports`). Callers may record named marks ("stop", "resume", ...) while a
  probe runs; they come back in the report, relative to the first send.
* `plot_timelines(reports, path)` — per strategy (and family): received and lost probes per bucket and, under
  it, the round trip of the probes by send time; marks drawn as vertical lines (matplotlib, Agg, imported
  lazily).

CLI: `python -m srmig.testbed.probe DST [DST4] --rate R --count N [--netns NS] [--json] [--plot PATH]`.

All times given to or returned by this module are seconds on `time.monotonic()`'s clock unless the name says
`_ms` (milliseconds, relative to the first send) or `_ns`.
"""

from __future__ import annotations

import argparse
import ctypes
import errno
import ipaddress
import json
import math
import random
import socket
import struct
import sys
import threading
import time
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field
from typing import NamedTuple

# ---------------------------------------------------------------------------------------------------------
# Accounting
# ---------------------------------------------------------------------------------------------------------


LOST_SEQS_KEPT = 20  # lost and duplicated sequence numbers named in a report: which packets, for a diagnosis


class Bucket(NamedTuple):
    """One timeline bucket: [t_ms, t_ms + bucket_ms) relative to the first send."""

    t_ms: float
    received: int  # first copies of replies whose *receive* time falls in the bucket
    lost: int  # probes never answered whose *send* time falls in the bucket
    rtt_max_ms: float | None = None  # the longest round trip of the probes *sent* in the bucket (None: none answered)


@dataclass
class ProbeReport:
    sent: int = 0
    received: int = 0  # unique sequence numbers answered
    lost: int = 0
    duplicated: int = 0  # extra copies: total matching replies - unique ones
    reordered: int = 0  # RFC 4737 (see analyse)
    blackout_ms: float = 0.0  # longest run of lost probes, on send times (see analyse)
    # --- extras -------------------------------------------------------------------------------------------
    blackout_start_ms: float | None = None  # send time of the first probe of the longest lost run
    blackout_probes: int = 0  # length of the longest lost run, in probes
    loss_runs: int = 0  # number of maximal runs of consecutive lost probes
    lost_seqs: list[int] = field(default_factory=list)  # the first LOST_SEQS_KEPT lost sequence numbers
    duplicated_seqs: list[int] = field(default_factory=list)  # the first LOST_SEQS_KEPT duplicated ones
    reordered_seqs: list[int] = field(default_factory=list)  # the first LOST_SEQS_KEPT reordered ones
    max_rx_gap_ms: float | None = None  # longest gap between consecutive first-copy arrivals (receive times)
    max_send_gap_ms: float = 0.0  # longest gap between consecutive sends: a sender stall, not a network loss
    unexpected: int = 0  # replies carrying a sequence number that was never sent
    interval_ms: float = 0.0  # inter-send interval used for a run that reaches the last probe (median)
    duration_ms: float = 0.0  # first send to last send
    rtt_ms: dict[str, float] = field(default_factory=dict)  # min, p50, p99, max over first copies
    # With a window (analyse's rtt_window): the same over the probes sent before it (the steady state) and over
    # those sent in it (what a migration costs in delay: a held probe is not lost but late); rtt_window_probes:
    # probes sent in the window (answered or not).
    rtt_steady_ms: dict[str, float] = field(default_factory=dict)
    rtt_window_ms: dict[str, float] = field(default_factory=dict)
    rtt_window_probes: int = 0
    bucket_ms: float = 1.0
    timeline: list[Bucket] = field(default_factory=list)
    marks: dict[str, float] = field(default_factory=dict)  # name -> ms relative to the first send
    t0: float | None = None  # monotonic time of the first send, seconds
    # --- filled by run_probe --------------------------------------------------------------------------
    dst: str | None = None
    family: str | None = None  # "6" (ICMPv6 echo) or "4" (ICMP echo)
    rate_pps: float | None = None  # requested
    send_rate_pps: float | None = None  # achieved: (sent - 1) / (last send - first send)
    send_errors: int = 0  # sendto() failures (counted as sent, and lost)
    slipped_ms: float = 0.0  # how far the sender fell behind its schedule and gave up catching up
    rx_socket_drops: int = 0  # replies dropped by the receive socket (SO_RXQ_OVFL): loss the network did not cause
    truncated: bool = False  # sending stopped before `count` (stop requested or time bound hit)

    def to_dict(self, timeline: bool = True) -> dict:
        d = asdict(self)
        d["timeline"] = [list(b) for b in self.timeline] if timeline else None
        return d

    @classmethod
    def from_dict(cls, d: Mapping) -> ProbeReport:
        known = {k: v for k, v in d.items() if k in cls.__dataclass_fields__}
        known["timeline"] = [Bucket(*b) for b in (d.get("timeline") or [])]
        return cls(**known)

    def summary(self) -> str:
        s = (f"sent {self.sent} received {self.received} lost {self.lost} duplicated {self.duplicated} "
             f"reordered {self.reordered} blackout {self.blackout_ms:.1f} ms")
        if self.blackout_start_ms is not None and self.lost:
            s += f" (from {self.blackout_start_ms:.1f} ms, {self.blackout_probes} probes)"
        if self.rtt_ms:
            s += f" rtt p50 {self.rtt_ms['p50']:.3f} ms max {self.rtt_ms['max']:.3f} ms"
        if self.rtt_window_ms:
            s += f" (window p99 {self.rtt_window_ms['p99']:.3f} ms max {self.rtt_window_ms['max']:.3f} ms)"
        if self.send_rate_pps is not None:
            s += f" rate {self.send_rate_pps:.0f} pps"
        if self.send_errors or self.rx_socket_drops or self.truncated:
            s += f" [send_errors {self.send_errors} rx_socket_drops {self.rx_socket_drops}" \
                 f"{' truncated' if self.truncated else ''}]"
        return s


def _percentile(sorted_vals: list[float], q: float) -> float:
    """Nearest-rank percentile of an ascending list (q in [0, 100])."""
    k = max(0, min(len(sorted_vals) - 1, math.ceil(q / 100 * len(sorted_vals)) - 1))
    return sorted_vals[k]


def _rtt_stats(rtts: list[float]) -> dict[str, float]:
    rtts = sorted(rtts)
    if not rtts:
        return {}
    return {"min": rtts[0], "p50": _percentile(rtts, 50), "p99": _percentile(rtts, 99), "max": rtts[-1]}


def analyse(sent: Iterable[tuple[int, float]], received: Iterable[tuple[int, float]], bucket_ms: float = 1,
            marks: Iterable[tuple[str, float]] | Mapping[str, float] | None = None,
            interval_s: float | None = None, rtt_window: tuple[str, str] | None = None) -> ProbeReport:
    """Account for a probe run.

    sent: (seq, send time) per probe, seq unique. received: (seq, receive time) per reply, any order, any
    number of copies. Times in seconds on one clock. marks: (name, time) pairs or {name: time}, same clock;
    a name seen twice becomes "name#2", ...

    Definitions:
    * received: number of distinct sent sequence numbers with at least one reply. lost = sent - received.
    * duplicated: extra copies, i.e. replies for a sequence number already answered (3 copies count 2).
    * reordered (RFC 4737 §3.3, "Type-P-Reordered"): replies are taken in arrival order (receive time, ties in
      list order); duplicates and unknown sequence numbers are ignored; a reply is reordered when its sequence
      number is lower than the highest sequence number already received (RFC 4737: s < NextExp, NextExp =
      highest so far + 1). A late packet counts once; the ones it was overtaken by do not count.
    * blackout_ms: computed from send timestamps. For each maximal run of consecutive lost probes (consecutive
      in sequence order among the sent ones) its length is send_time(first probe answered after the run) -
      send_time(first lost probe of the run); a run reaching the last probe ends one interval after the last
      send (interval: `interval_s`, else the median inter-send interval). At a steady rate this is
      (number of consecutive lost probes) x interval. blackout_ms is the longest such run, 0 without loss.
      `max_rx_gap_ms` gives the receiver-side view (longest gap between consecutive arrivals).
    * timeline: buckets of `bucket_ms` from the first send to the last send or receive; in each, replies
      received (first copies, by receive time), probes lost and the longest round trip (both by send time).
    * rtt_window (FROM, TO): two mark names (e.g. ("migrate", "complete")). rtt_steady_ms are the RTTs of the
      probes sent before the first mark FROM, rtt_window_ms those of the probes sent from FROM to the first TO
      after it (to the end without one), first copies only: a lost probe has no RTT, a held one a long one.
      Nothing when FROM was not marked.
    """
    sent_t: dict[int, float] = {}
    for seq, t in sent:
        sent_t[int(seq)] = float(t)
    rx = sorted(((float(t), i, int(s)) for i, (s, t) in enumerate(received)))
    mark_list = list(marks.items()) if isinstance(marks, Mapping) else list(marks or [])

    rep = ProbeReport(sent=len(sent_t), bucket_ms=float(bucket_ms))
    first: dict[int, float] = {}
    highest = -1
    for t, _, seq in rx:
        if seq not in sent_t:
            rep.unexpected += 1
        elif seq in first:
            rep.duplicated += 1
            if len(rep.duplicated_seqs) < LOST_SEQS_KEPT:
                rep.duplicated_seqs.append(seq)
        else:
            first[seq] = t
            if seq < highest:
                rep.reordered += 1
                if len(rep.reordered_seqs) < LOST_SEQS_KEPT:
                    rep.reordered_seqs.append(seq)
            else:
                highest = seq
    rep.received = len(first)
    rep.lost = rep.sent - rep.received
    rep.lost_seqs = [s for s in sorted(sent_t) if s not in first][:LOST_SEQS_KEPT]
    if not sent_t:
        rep.marks = _marks_rel(mark_list, None)
        return rep

    order = sorted(sent_t)
    times = [sent_t[s] for s in order]
    t0 = min(times)
    rep.t0 = t0
    rep.duration_ms = (max(times) - t0) * 1e3
    diffs = sorted(b - a for a, b in zip(times, times[1:]))
    rep.max_send_gap_ms = diffs[-1] * 1e3 if diffs else 0.0
    if interval_s is None:
        interval_s = diffs[len(diffs) // 2] if diffs else 0.0
    rep.interval_ms = interval_s * 1e3

    # Runs of consecutive lost probes, measured on send times.
    i, n = 0, len(order)
    while i < n:
        if order[i] in first:
            i += 1
            continue
        j = i
        while j + 1 < n and order[j + 1] not in first:
            j += 1
        end = times[j + 1] if j + 1 < n else times[j] + interval_s
        length = (end - times[i]) * 1e3
        rep.loss_runs += 1
        if length > rep.blackout_ms or rep.blackout_start_ms is None:
            rep.blackout_ms = length
            rep.blackout_start_ms = (times[i] - t0) * 1e3
            rep.blackout_probes = j - i + 1
        i = j + 1

    arrivals = sorted(first.values())
    if len(arrivals) >= 2:
        rep.max_rx_gap_ms = max(b - a for a, b in zip(arrivals, arrivals[1:])) * 1e3
    rtt_of = {s: (first[s] - sent_t[s]) * 1e3 for s in first}
    rep.rtt_ms = _rtt_stats(list(rtt_of.values()))
    if rtt_window is not None:
        begin = next((t for name, t in mark_list if name == rtt_window[0]), None)
        if begin is not None:
            end = next((t for name, t in mark_list if name == rtt_window[1] and t >= begin), math.inf)
            window = [s for s in order if begin <= sent_t[s] <= end]
            rep.rtt_window_probes = len(window)
            rep.rtt_steady_ms = _rtt_stats([rtt_of[s] for s in order if sent_t[s] < begin and s in rtt_of])
            rep.rtt_window_ms = _rtt_stats([rtt_of[s] for s in window if s in rtt_of])

    # Timeline.
    last = max(max(times), arrivals[-1] if arrivals else t0)
    nb = int((last - t0) * 1e3 // bucket_ms) + 1
    rx_b, lost_b = [0] * nb, [0] * nb
    rtt_b: list[float | None] = [None] * nb

    def idx(t: float) -> int:
        return max(0, min(nb - 1, int((t - t0) * 1e3 // bucket_ms)))

    for t in arrivals:
        rx_b[idx(t)] += 1
    for s, t in zip(order, times):
        k = idx(t)
        if s not in first:
            lost_b[k] += 1
        elif rtt_b[k] is None or rtt_of[s] > rtt_b[k]:
            rtt_b[k] = rtt_of[s]
    rep.timeline = [Bucket(k * bucket_ms, rx_b[k], lost_b[k], rtt_b[k]) for k in range(nb)]
    rep.marks = _marks_rel(mark_list, t0)
    return rep


def _marks_rel(marks: list[tuple[str, float]], t0: float | None) -> dict[str, float]:
    out: dict[str, float] = {}
    for name, t in marks:
        key, k = name, 1
        while key in out:
            k += 1
            key = f"{name}#{k}"
        out[key] = (t - t0) * 1e3 if t0 is not None else 0.0
    return out


# ---------------------------------------------------------------------------------------------------------
# Sender / receiver
# ---------------------------------------------------------------------------------------------------------

ICMP6_ECHO_REQUEST = 128
ICMP6_ECHO_REPLY = 129
ICMP_ECHO_REQUEST = 8  # RFC 792
ICMP_ECHO_REPLY = 0
ICMP6_FILTER = 1  # linux/icmpv6.h, level IPPROTO_ICMPV6
ICMP_FILTER = 1  # linux/icmp.h, level SOL_RAW: a 32-bit mask of the types to block
SOL_RAW = 255
SO_TIMESTAMPNS = 35  # asm-generic/socket.h (SO_TIMESTAMPNS_OLD: struct timespec)
SO_RXQ_OVFL = 40
SO_RCVBUFFORCE = 33
SO_SNDBUFFORCE = 32
PR_SET_TIMERSLACK = 29

MAGIC = b"SRMP"
# type, code, checksum, identifier, 16-bit seq | magic, 32-bit seq, send time (ns, monotonic). ICMPv6: the
# kernel fills the checksum (RFC 3542 3.1); ICMP over a raw IPv4 socket: we do (RFC 792).
_HDR = struct.Struct("!BBHHH4sIQ")
HEADER_LEN = _HDR.size  # 24 bytes of ICMP(v6) message before any padding
_WORDS = struct.Struct(f"!{HEADER_LEN // 2}H")
_CKSUM = struct.Struct("!H")
_RX = struct.Struct("!BBHHH4sI")
_TS = struct.Struct("@qq")
_OVFL = struct.Struct("@I")


def family_of(addr: str) -> str:
    """"4" or "6": the address family of an IP address, as the demo names them."""
    return "4" if ipaddress.ip_address(addr).version == 4 else "6"


def _fold(total: int) -> int:
    """One's complement of the end-around-carry sum of 16-bit words (RFC 1071 4.1)."""
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def icmp_checksum(msg: bytes | bytearray) -> int:
    """The Internet checksum (RFC 1071) of an ICMP message whose checksum field is zero."""
    if len(msg) % 2:
        msg = bytes(msg) + b"\0"
    return _fold(sum(struct.unpack(f"!{len(msg) // 2}H", msg)))


def _icmp6_filter(pass_types: Iterable[int]) -> bytes:
    """struct icmp6_filter that blocks every type but `pass_types` (Linux: a set bit blocks)."""
    words = [0xFFFFFFFF] * 8
    for t in pass_types:
        words[t >> 5] &= ~(1 << (t & 31)) & 0xFFFFFFFF
    return struct.pack("8I", *words)


def _icmp_filter(pass_types: Iterable[int]) -> bytes:
    """struct icmp_filter (IPv4 raw sockets) that blocks every type below 32 but `pass_types`."""
    mask = 0xFFFFFFFF
    for t in pass_types:
        mask &= ~(1 << t) & 0xFFFFFFFF
    return struct.pack("I", mask)


def _set_timerslack(ns: int) -> None:
    """Per-thread timer slack (default 50 us) so short sleeps wake when asked. Best effort."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_TIMERSLACK, ctypes.c_ulong(ns), 0, 0, 0)
    except (OSError, AttributeError):
        pass


def _raw_socket(family: str, pass_types: Iterable[int]) -> socket.socket:
    """A raw ICMPv6 or ICMP socket that queues only `pass_types` (none: a sender that never reads)."""
    if family == "6":
        s = socket.socket(socket.AF_INET6, socket.SOCK_RAW, socket.IPPROTO_ICMPV6)
        try:
            s.setsockopt(socket.IPPROTO_ICMPV6, ICMP6_FILTER, _icmp6_filter(pass_types))
        except BaseException:
            s.close()
            raise
        return s
    s = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)
    try:
        s.setsockopt(SOL_RAW, ICMP_FILTER, _icmp_filter(pass_types))
    except BaseException:
        s.close()
        raise
    return s


def _open_sockets(dst: str, src: str | None, rcvbuf: int) -> tuple[socket.socket, socket.socket, tuple]:
    family = family_of(dst)
    af, proto = (socket.AF_INET6, socket.IPPROTO_ICMPV6) if family == "6" else (socket.AF_INET, socket.IPPROTO_ICMP)
    addr = socket.getaddrinfo(dst, None, af, socket.SOCK_RAW, proto)[0][4]
    tx = _raw_socket(family, [])
    try:
        rx = _raw_socket(family, [ICMP6_ECHO_REPLY if family == "6" else ICMP_ECHO_REPLY])
    except BaseException:
        tx.close()
        raise
    try:
        for opt in (SO_RCVBUFFORCE, socket.SO_RCVBUF):
            try:
                rx.setsockopt(socket.SOL_SOCKET, opt, rcvbuf)
                break
            except OSError:
                continue
        rx.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMPNS, 1)
        rx.setsockopt(socket.SOL_SOCKET, SO_RXQ_OVFL, 1)
        rx.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, struct.pack("@ll", 0, 20000))  # 20 ms
        if src:
            tx.bind((src, 0))
            rx.bind((src, 0))
    except BaseException:
        tx.close()
        rx.close()
        raise
    return tx, rx, addr


def _clock_offset_ns() -> int:
    """CLOCK_REALTIME - CLOCK_MONOTONIC, best of a few tight samples (kernel rx stamps are realtime)."""
    best = None
    for _ in range(5):
        a = time.monotonic_ns()
        r = time.time_ns()
        b = time.monotonic_ns()
        if best is None or b - a < best[0]:
            best = (b - a, r - (a + b) // 2)
    return best[1]


class _Flow:
    """One destination of a probe: its sockets, what was sent to it and what came back."""

    def __init__(self, dst: str, count: int):
        self.dst = dst
        self.family = family_of(dst)
        self.request = ICMP6_ECHO_REQUEST if self.family == "6" else ICMP_ECHO_REQUEST
        self.reply = ICMP6_ECHO_REPLY if self.family == "6" else ICMP_ECHO_REPLY
        self.tx: socket.socket | None = None
        self.rx_sock: socket.socket | None = None
        self.tx_copy: socket.socket | None = None
        self.addr: tuple = ()
        self.send_ns: list[int] = []
        self.rx: list[tuple[int, int]] = []  # (seq32, receive time ns monotonic)
        self.seen = bytearray(count)
        self.unique = 0
        self.send_errors = 0
        self.drops = 0

    def close(self) -> None:
        for s in (self.tx, self.rx_sock, self.tx_copy):
            if s is not None:
                s.close()


class Probe:
    """A probe running in the background.

        p = Probe("2001:db8::2", rate_pps=10000, count=50000, netns="srmig-1-A").start()
        ... p.mark("stop") ... p.mark("resume") ...
        report = p.wait()

    or `with Probe(...) as p: ...` (leaving the block waits for the run; an exception stops it first).
    `dst` is an IPv6 address (ICMPv6 echo), an IPv4 one (ICMP echo), or a list of addresses: each probe goes
    to every one of them back to back (one sender, one schedule: `rate_pps` and `count` per destination),
    each destination with its own sockets, receiver thread and report; wait() returns the first one's,
    `reports` (after wait) all of them, by family ("6", "4": one destination per family).
    Sockets are opened in `netns` (if given) by start(), in the caller's thread; the sender and receiver
    threads use them from wherever they run. Bounded: at most `count` probes, sending stops after
    `max_duration_s` (default: twice the nominal duration + 2 s) or when stop() / `stop_event` say so;
    receiving stops `timeout_s` after the last send, or as soon as every probe is answered.
    """

    def __init__(self, dst: str | list[str] | tuple[str, ...], rate_pps: float, count: int, timeout_s: float = 1.0,
                 netns: str | None = None, ident: int | None = None, start_event: threading.Event | None = None,
                 stop_event: threading.Event | None = None, size: int = 0, src: str | None = None,
                 burst: int = 4, bucket_ms: float = 1, max_duration_s: float | None = None,
                 start_timeout_s: float = 60.0, rcvbuf: int = 8 << 20, copy_tclass: int | None = None,
                 copy_mark: int | None = None, rtt_window: tuple[str, str] | None = None):
        if rate_pps <= 0 or count < 0 or timeout_s < 0:
            raise ValueError("rate_pps must be > 0, count and timeout_s >= 0")
        if count >= 1 << 32:
            raise ValueError("count must fit the 32-bit sequence number")
        dsts = [dst] if isinstance(dst, str) else list(dst)
        if not dsts:
            raise ValueError("no destination")
        families = [family_of(d) for d in dsts]
        if len(set(families)) != len(families):
            raise ValueError(f"one destination per address family: {dsts}")
        if src and len(dsts) > 1:
            raise ValueError("src: one destination only")
        self.dst, self.rate_pps, self.count, self.timeout_s = dsts[0], float(rate_pps), int(count), timeout_s
        self._flows = [_Flow(d, self.count) for d in dsts]
        # Bicast: every probe is sent a second time with this IPv6 traffic class (IPv4: TOS) and/or this
        # firewall mark (SO_MARK), which the ingress's policy routing steers along the second path.
        self.copy_tclass, self.copy_mark = copy_tclass, copy_mark
        self.netns, self.src, self.size = netns, src, max(size, HEADER_LEN)
        self.ident = random.randrange(1, 0xFFFF) if ident is None else ident & 0xFFFF
        self.start_event, self.stop_event = start_event, stop_event
        self.burst = max(1, burst)
        self.bucket_ms = bucket_ms
        self.rtt_window = rtt_window
        self.max_duration_s = (2 * count / rate_pps + 2) if max_duration_s is None else max_duration_s
        self.start_timeout_s = start_timeout_s
        self.rcvbuf = rcvbuf
        self._marks: list[tuple[str, float]] = []
        self._stop = threading.Event()
        self._sent_seq = 0  # probes sent so far, per destination (progress)
        self._slipped_ns = 0
        self._truncated = False
        self._sender_done = threading.Event()
        self._last_send_ns = 0
        self._threads: list[threading.Thread] = []
        self._error: BaseException | None = None
        self.reports: dict[str, ProbeReport] = {}

    @property
    def families(self) -> list[str]:
        return [f.family for f in self._flows]

    # -- control --------------------------------------------------------------------------------------
    def start(self) -> Probe:
        from srmig.testbed.netns import inside

        try:
            with inside(self.netns):
                for f in self._flows:
                    f.tx, f.rx_sock, f.addr = _open_sockets(f.dst, self.src, self.rcvbuf)
                    if self.copy_tclass is not None or self.copy_mark is not None:
                        f.tx_copy = _raw_socket(f.family, [])
                        if self.copy_tclass is not None:
                            if f.family == "6":
                                f.tx_copy.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_TCLASS, self.copy_tclass)
                            else:
                                f.tx_copy.setsockopt(socket.IPPROTO_IP, socket.IP_TOS, self.copy_tclass)
                        if self.copy_mark is not None:
                            f.tx_copy.setsockopt(socket.SOL_SOCKET, socket.SO_MARK, self.copy_mark)
        except BaseException:
            for f in self._flows:
                f.close()
            raise
        self._offset_ns = _clock_offset_ns()
        self._threads = [threading.Thread(target=self._guard, args=(self._receiver, f), name=f"probe-rx{f.family}",
                                          daemon=True) for f in self._flows]
        self._threads.append(threading.Thread(target=self._guard, args=(self._sender,), name="probe-tx",
                                              daemon=True))
        for t in self._threads:
            t.start()
        return self

    def mark(self, name: str, t: float | None = None) -> None:
        """Record a named instant (now, or `t` on time.monotonic()'s clock); it appears in report.marks."""
        self._marks.append((name, time.monotonic() if t is None else t))

    def stop(self) -> None:
        """Stop sending now (the receiver still waits up to timeout_s for outstanding replies)."""
        self._stop.set()

    def done(self) -> bool:
        return all(not t.is_alive() for t in self._threads)

    def progress(self) -> tuple[int, int]:
        """(probes sent, distinct replies received) so far, over every destination."""
        return self._sent_seq * len(self._flows), sum(f.unique for f in self._flows)

    def wait(self, timeout: float | None = None) -> ProbeReport:
        """Join the threads and return the (first destination's) report; every destination's is in `reports`
        then. Raises TimeoutError if `timeout` expires first."""
        if self.reports:
            return self.reports[self._flows[0].family]
        deadline = None if timeout is None else time.monotonic() + timeout
        for t in self._threads:
            t.join(None if deadline is None else max(0.0, deadline - time.monotonic()))
            if t.is_alive():
                raise TimeoutError("probe still running")
        for f in self._flows:
            f.close()
        if self._error is not None:
            raise self._error
        self.reports = {f.family: self._build_report(f) for f in self._flows}
        return self.reports[self._flows[0].family]

    def __enter__(self) -> Probe:
        return self.start()

    def __exit__(self, *exc) -> None:
        """Leaving the block waits for the run to finish (bounded by count); an exception stops it first."""
        if exc[0] is not None:
            self.stop()
        if self._threads:
            try:
                self.wait()
            except Exception:
                if exc[0] is None:
                    raise

    # -- threads --------------------------------------------------------------------------------------
    def _guard(self, fn, *args) -> None:
        try:
            fn(*args)
        except BaseException as e:  # surfaced by wait()
            self._error = self._error or e
            self._stop.set()
            self._sender_done.set()

    def _sender(self) -> None:
        _set_timerslack(1000)
        try:
            if self.start_event is not None and not self.start_event.wait(self.start_timeout_s):
                raise TimeoutError(f"start_event not set within {self.start_timeout_s} s")
            self._send_loop()
        finally:
            self._last_send_ns = time.monotonic_ns()
            self._sender_done.set()

    def _send_loop(self) -> None:
        buf = bytearray(self.size)
        pack_into, mono = _HDR.pack_into, time.monotonic_ns
        words, fold, pack_ck = _WORDS.unpack_from, _fold, _CKSUM.pack_into
        # Per destination: (request type, IPv4 (we checksum), sendto, copy's sendto, address, send times).
        flows = [(f.request, f.family == "4", f.tx.sendto, f.tx_copy.sendto if f.tx_copy is not None else None,
                  f.addr, f.send_ns.append, f) for f in self._flows]
        errors = [0] * len(flows)
        ident, count, burst = self.ident, self.count, self.burst
        interval = 1e9 / self.rate_pps
        stop, stop_ev = self._stop, self.stop_event
        t_start = mono()
        deadline = t_start + int(self.max_duration_s * 1e9)
        nxt = float(t_start)
        seq = 0
        while seq < count:
            now = mono()
            if now < nxt:
                wait = nxt - now
                if wait > 30_000:
                    time.sleep((wait - 20_000) / 1e9)
                elif wait > 5_000:
                    time.sleep(0)  # let the receiver have the GIL, no timer
                continue
            if stop.is_set() or (stop_ev is not None and stop_ev.is_set()) or now > deadline:
                self._truncated = True
                break
            behind = now - nxt
            if behind > (burst - 1) * interval:  # more than a burst overdue: slip the schedule, never flood
                self._slipped_ns += int(behind - (burst - 1) * interval)
                nxt = now - (burst - 1) * interval
            n = 0
            while seq < count and n < burst and nxt <= now:
                for i, (typ, v4, sendto, copy, addr, append, _f) in enumerate(flows):
                    ts = mono()
                    pack_into(buf, 0, typ, 0, 0, ident, seq & 0xFFFF, MAGIC, seq, ts)
                    if v4:  # RFC 1071 over the header: the zero padding after it adds nothing
                        pack_ck(buf, 2, fold(sum(words(buf))))
                    try:
                        sendto(buf, addr)
                        if copy is not None:
                            copy(buf, addr)
                    except OSError:
                        errors[i] += 1
                    append(ts)
                seq += 1
                n += 1
                nxt += interval
            self._sent_seq = seq
        for (*_, f), e in zip(flows, errors):
            f.send_errors = e
        self._sent_seq = seq

    def _receiver(self, flow: _Flow) -> None:
        sock = flow.rx_sock
        recvmsg = sock.recvmsg
        unpack_from = _RX.unpack_from
        ident, count, reply = self.ident, self.count, flow.reply
        v4 = flow.family == "4"
        seen = flow.seen
        append = flow.rx.append
        offset = self._offset_ns
        mono = time.monotonic_ns
        ancbuf = socket.CMSG_SPACE(_TS.size) + socket.CMSG_SPACE(_OVFL.size)
        unique = 0
        drops = 0
        while True:
            try:
                data, anc, _flags, _addr = recvmsg(2048, ancbuf)
            except (BlockingIOError, TimeoutError, InterruptedError):
                data = None
            except OSError as e:
                if e.errno not in (errno.EAGAIN, errno.EINTR):
                    raise
                data = None
            if data is not None:
                t = 0
                for level, typ, cdata in anc:
                    if level == socket.SOL_SOCKET:
                        if typ == SO_TIMESTAMPNS and len(cdata) >= _TS.size:
                            s, ns = _TS.unpack_from(cdata)
                            t = s * 1_000_000_000 + ns - offset
                        elif typ == SO_RXQ_OVFL and len(cdata) >= _OVFL.size:
                            drops = _OVFL.unpack_from(cdata)[0]
                if not t:
                    t = mono()
                # A raw IPv4 socket hands over the IPv4 header too (IHL words); a raw IPv6 one does not.
                at = (data[0] & 0x0F) * 4 if v4 and data else 0
                if len(data) >= at + _RX.size:
                    typ, _code, _ck, rid, _s16, magic, seq = unpack_from(data, at)
                    if typ == reply and rid == ident and magic == MAGIC:
                        append((seq, t))
                        if seq < count and not seen[seq]:
                            seen[seq] = 1
                            unique += 1
                            flow.unique = unique
                continue  # drain whatever is queued before checking the end condition
            if self._sender_done.is_set():
                if unique >= self._sent_seq or self._error is not None:
                    break
                if mono() - self._last_send_ns > self.timeout_s * 1e9:
                    break
        flow.drops = drops

    def _build_report(self, flow: _Flow) -> ProbeReport:
        sent = [(i, t / 1e9) for i, t in enumerate(flow.send_ns)]
        received = [(s, t / 1e9) for s, t in flow.rx]
        rep = analyse(sent, received, bucket_ms=self.bucket_ms, marks=self._marks,
                      interval_s=1 / self.rate_pps, rtt_window=self.rtt_window)
        rep.dst = flow.dst
        rep.family = flow.family
        rep.rate_pps = self.rate_pps
        if len(flow.send_ns) >= 2:
            rep.send_rate_pps = (len(flow.send_ns) - 1) / ((flow.send_ns[-1] - flow.send_ns[0]) / 1e9)
        rep.send_errors = flow.send_errors
        rep.slipped_ms = self._slipped_ns / 1e6
        rep.rx_socket_drops = flow.drops
        rep.truncated = self._truncated or len(flow.send_ns) < self.count
        return rep


def run_probe(dst: str | list[str], rate_pps: float, count: int, timeout_s: float = 1.0, netns: str | None = None,
              ident: int | None = None, start_event: threading.Event | None = None, **kw) -> ProbeReport:
    """Send `count` ICMPv6 (IPv6 `dst`) or ICMP (IPv4 `dst`) Echo Requests to `dst` at `rate_pps`, wait for
    replies, return the report (of the first destination, with a list).

    `start_event`: if given, sending starts once it is set. Other keywords as `Probe`.
    """
    return Probe(dst, rate_pps, count, timeout_s=timeout_s, netns=netns, ident=ident, start_event=start_event,
                 **kw).start().wait()


def run_probes(dsts: list[str], rate_pps: float, count: int, timeout_s: float = 1.0, netns: str | None = None,
               **kw) -> dict[str, ProbeReport]:
    """As run_probe, to several destinations (one per family) at once: {family: report}."""
    p = Probe(dsts, rate_pps, count, timeout_s=timeout_s, netns=netns, **kw).start()
    p.wait()
    return p.reports


# ---------------------------------------------------------------------------------------------------------
# Plot
# ---------------------------------------------------------------------------------------------------------

FAMILY_NAMES = {"6": "IPv6", "4": "IPv4"}


def plot_timelines(reports: Mapping[str, ProbeReport | Mapping[str, ProbeReport]], path,
                   window_ms: tuple[float, float] | float | None = None, title: str | None = None,
                   latency: bool = True) -> None:
    """Per strategy: replies received per bucket (blue) and probes lost (red, by send time), x in ms since the
    first send, marks as dashed vertical lines; under it (`latency`) the longest round trip of the probes sent
    in each bucket (log scale) and the steady state's median, so a held probe shows as late, not lost. A
    strategy's value is one report or {family: report} ("6", "4"): one column per family. `window_ms`: (lo, hi)
    to zoom, or a margin in ms around each panel's marks and longest blackout. Written with the Agg backend, no
    pyplot state."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    grid = {name: (dict(v) if isinstance(v, Mapping) else {v.family or "": v}) for name, v in reports.items()}
    cols = max([len(v) for v in grid.values()] + [1])
    per = 2 if latency else 1
    n = max(1, len(grid))
    fig = Figure(figsize=(11 if cols == 1 else 8 * cols, (2.4 + 1.6 * (per - 1)) * n + 0.6), layout="constrained")
    FigureCanvasAgg(fig)
    ratios = ([3, 2] if latency else [1]) * n
    axes = fig.subplots(n * per, cols, squeeze=False, gridspec_kw={"height_ratios": ratios})
    if title:
        fig.suptitle(title)
    for row, (name, fams) in enumerate(grid.items()):
        for col, (fam, rep) in enumerate(fams.items()):
            ax = axes[row * per, col]
            lat = axes[row * per + 1, col] if latency else None
            label = f"{name} {FAMILY_NAMES.get(fam, fam)}".strip()
            _plot_counts(ax, rep, label)
            if lat is not None:
                lat.sharex(ax)
                _plot_latency(lat, rep)
            lo_hi = None
            if isinstance(window_ms, tuple):
                lo_hi = window_ms
            elif window_ms is not None:
                pts = list(rep.marks.values())
                if rep.lost and rep.blackout_start_ms is not None:
                    pts += [rep.blackout_start_ms, rep.blackout_start_ms + rep.blackout_ms]
                if pts:
                    lo_hi = (min(pts) - window_ms, max(pts) + window_ms)
            if lo_hi is not None:
                ax.set_xlim(*lo_hi)
        for col in range(len(fams), cols):  # a strategy probed over fewer families
            axes[row * per, col].set_axis_off()
            if latency:
                axes[row * per + 1, col].set_axis_off()
    for col in range(cols):
        axes[-1, col].set_xlabel("ms since first probe")
    fig.savefig(path, dpi=110)


def _plot_counts(ax, rep: ProbeReport, label: str) -> None:
    xs = [b.t_ms for b in rep.timeline]
    if xs:
        xs.append(xs[-1] + rep.bucket_ms)
        rx = [b.received for b in rep.timeline] + [0]
        lost = [b.lost for b in rep.timeline] + [0]
        ax.fill_between(xs, rx, step="post", color="tab:blue", alpha=0.8, linewidth=0, label="received")
        ax.fill_between(xs, lost, step="post", color="tab:red", alpha=0.8, linewidth=0, label="lost (by send time)")
    ymax = max([b.received for b in rep.timeline] + [b.lost for b in rep.timeline] + [1])
    ax.set_ylim(0, ymax * 1.3)
    _marks(ax, rep)
    ax.set_title(f"{label}: sent {rep.sent}, lost {rep.lost}, duplicated {rep.duplicated}, "
                 f"reordered {rep.reordered}, blackout {rep.blackout_ms:.1f} ms", fontsize=10, loc="left")
    ax.set_ylabel(f"probes / {rep.bucket_ms:g} ms")
    ax.legend(loc="upper right", fontsize=8)


def _plot_latency(ax, rep: ProbeReport) -> None:
    pts = [(b.t_ms, b.rtt_max_ms) for b in rep.timeline if b.rtt_max_ms is not None]
    if pts:
        ys = [max(p[1], 1e-3) for p in pts]
        ax.plot([p[0] for p in pts], ys, ".", color="tab:purple", markersize=2, label="longest RTT of the probes sent")
        # Log: the steady state's fraction of a ms and a hold's tens of ms on one axis; at least two decades,
        # so a flat line is not zoomed into noise.
        ax.set_yscale("log")
        ax.set_ylim(min(ys) / 2, max(max(ys) * 3, min(ys) * 100))
    steady = rep.rtt_steady_ms or rep.rtt_ms
    if steady:
        ax.axhline(steady["p50"], color="tab:green", linestyle=":", linewidth=1,
                   label=f"steady p50 {steady['p50']:.2f} ms")
    _marks(ax, rep, names=False)
    win = rep.rtt_window_ms
    ax.set_title("round trip by send time" + (f"; migration window p99 {win['p99']:.1f} ms, max {win['max']:.1f} ms"
                                              if win else ""), fontsize=9, loc="left")
    ax.set_ylabel("RTT ms")
    if pts or steady:
        ax.legend(loc="upper left", fontsize=7)


def _marks(ax, rep: ProbeReport, names: bool = True) -> None:
    for k, (mname, t) in enumerate(sorted(rep.marks.items(), key=lambda kv: kv[1])):
        ax.axvline(t, color="k", linestyle="--", linewidth=0.8)
        if names:
            ax.annotate(mname, (t, 1.0 - 0.1 * (k % 3)), xycoords=("data", "axes fraction"), xytext=(2, -2),
                        textcoords="offset points", fontsize=8, va="top")


# ---------------------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m srmig.testbed.probe",
                                 description="Measure loss with ICMPv6 / ICMP echo at a fixed rate.")
    ap.add_argument("dst", nargs="+", help="an IPv6 and/or an IPv4 address (both: probed together)")
    ap.add_argument("--rate", type=float, default=1000, help="probes per second per destination (default 1000)")
    ap.add_argument("--count", type=int, default=1000, help="probes to send per destination (default 1000)")
    ap.add_argument("--timeout", type=float, default=1.0, help="wait this long after the last send (s)")
    ap.add_argument("--netns", help="open the sockets inside this network namespace")
    ap.add_argument("--size", type=int, default=0, help=f"ICMP(v6) message size (min {HEADER_LEN})")
    ap.add_argument("--ident", type=int, help="echo identifier (default random)")
    ap.add_argument("--bucket-ms", type=float, default=1)
    ap.add_argument("--json", action="store_true", help="print the report as JSON ({family: report})")
    ap.add_argument("--timeline", action="store_true", help="include the timeline in the JSON")
    ap.add_argument("--plot", help="write a timeline plot (PNG) here")
    a = ap.parse_args(argv)

    try:
        p = Probe(a.dst, a.rate, a.count, timeout_s=a.timeout, netns=a.netns, size=a.size, ident=a.ident,
                  bucket_ms=a.bucket_ms)
    except ValueError as e:
        ap.error(str(e))
    p.start()
    total = a.count * len(a.dst)
    try:
        while not p.done():
            s, r = p.progress()
            print(f"\rsent {s}/{total} received {r} missing {max(0, s - r)}   ", end="", file=sys.stderr,
                  flush=True)
            time.sleep(0.2)
    except KeyboardInterrupt:
        p.stop()
    p.wait()
    s, r = p.progress()
    print(f"\rsent {s}/{total} received {r} missing {max(0, s - r)}   ", file=sys.stderr, flush=True)
    if a.json:
        print(json.dumps({fam: rep.to_dict(timeline=a.timeline) for fam, rep in p.reports.items()}, indent=1))
    else:
        for rep in p.reports.values():
            d = rep.to_dict(timeline=False)
            for k in ("dst", "sent", "received", "lost", "duplicated", "reordered", "blackout_ms",
                      "blackout_start_ms", "loss_runs", "max_rx_gap_ms", "max_send_gap_ms", "rate_pps",
                      "send_rate_pps", "slipped_ms", "send_errors", "rx_socket_drops", "truncated"):
                v = d[k]
                print(f"{k:18} {v:.3f}" if isinstance(v, float) else f"{k:18} {v}")
            for k, v in rep.rtt_ms.items():
                print(f"{'rtt_' + k + '_ms':18} {v:.3f}")
    if a.plot:
        plot_timelines({" ".join(a.dst): p.reports}, a.plot)
    return 0


if __name__ == "__main__":
    sys.exit(main())
