"""`srmig demo`: one live migration of a real QEMU guest per strategy, under the same probe traffic, on the
namespace testbed, and a comparison of what each strategy lost.

Per strategy: build the testbed, boot the guest on S, start the -incoming QEMU on D, start the probe from
the client, begin the migration (the strategy provisions the network first), react to the QEMU events
(source STOP, destination RESUME, migration completed) exactly as the strategy says, then collect the
probe's report, the hypervisor-reported downtime and the guest's own counters. Everything it made is
removed afterwards, also on failure and on Ctrl-C.

The guest is dual-stack (2001:db8:100::10 and 198.51.100.10); the probe sends ICMPv6 echo, ICMP echo or both
(`families`, "6" and "4"), one schedule, counted per family. Each family's report has, next to what was lost,
the round trip of the probes: the steady state's median (probes sent before the migration began) and the 99th
percentile and maximum over the migration window (sent from its beginning to its completion): a held probe is
not lost but late, and this is how late. A family whose numbers say less than they seem (the guest did not
answer it before the migration; the strategy left it undone) has a note (Run.notes), printed under the table.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from srmig.testbed import guest as guest_mod
from srmig.testbed import probe as probe_mod
from srmig.testbed.qemu import GATEWAY_V4, GUEST_MAC, Qemu
from srmig.testbed.strategies import Strategy, make
from srmig.testbed.testbed import MGMT, VM_ADDR, VM_ADDR4, VM_ADDRS, VM_PREFIXLEN, VM_PREFIXLEN4, Testbed

DEFAULT_STRATEGIES = ["reactive", "withdraw", "bicast", "srmig"]
DEFAULT_FAMILIES = ("6", "4")
FAMILY_NAMES = probe_mod.FAMILY_NAMES
RTT_WINDOW = ("migrate", "complete")  # the marks run_one sets: the migration window of the RTT statistics
TAP = "vmtap"
MIGRATION_PORT = 4444
# Who answers the probes in the demo's guest: its XDP responder (srmig.testbed.echo_xdp). The guest's kernel
# answers ~12,500 echo/s under TCG on 2 cores; the demo probes 10,000/s per family (docs/platform.md).
DEMO_ECHO = "xdp"


def _ms(v: float | None) -> float | None:
    return None if v is None else round(v, 3)


@dataclass
class Run:
    strategy: str
    reports: dict[str, probe_mod.ProbeReport]  # per family probed ("6", "4"), in the order probed
    downtime_ms: float | None
    total_ms: float | None
    guest: dict = field(default_factory=dict)
    events: list = field(default_factory=list)
    drain: dict | None = None
    notes: dict[str, str] = field(default_factory=dict)  # family -> why its numbers mean less than they say

    @property
    def report(self) -> probe_mod.ProbeReport:
        """The IPv6 report (the first family's without IPv6)."""
        return self.reports.get("6") or next(iter(self.reports.values()))

    def unanswered(self, family: str | None = None) -> int:
        """Lost probes the guest received and left unanswered (srmig.testbed.guest.unanswered), of `family`
        (default: the one `report` is)."""
        family = family or self.report.family or "6"
        return guest_mod.unanswered(self.guest, self.reports[family].lost, family)

    def family_dict(self, family: str) -> dict:
        """One family's numbers (family_dict())."""
        return family_dict(self.reports[family], self.guest, family, self.notes.get(family))

    def to_dict(self) -> dict:
        """Today's keys, over every family probed (across_families()), and `families`: {family:
        family_dict(family)}."""
        fams = {f: self.family_dict(f) for f in self.reports}
        out = across_families(fams)
        out.update({"downtime_ms": self.downtime_ms, "migration_ms": self.total_ms,
                    "marks_ms": {k: round(v, 3) for k, v in self.report.marks.items()}, "families": fams})
        if self.drain:
            out["drain"] = self.drain
        return out


def family_dict(r: probe_mod.ProbeReport, guest: dict, family: str, note: str | None = None) -> dict:
    """One family's numbers: today's keys for that family, and its round trips (ms): the steady state's
    median, the migration window's 99th percentile and maximum (None: no probe answered there). `guest`: the
    guest's counters over the run; `note`: why the numbers mean less than they say."""
    requests, replies = guest_mod.ECHO_COUNTERS[family]
    out = {"dst": r.dst, "sent": r.sent, "lost": r.lost,
           "guest_unanswered": guest_mod.unanswered(guest, r.lost, family),
           "duplicated": r.duplicated, "reordered": r.reordered, "blackout_ms": round(r.blackout_ms, 3),
           "rtt_p50_ms": _ms(r.rtt_steady_ms.get("p50")), "rtt_p99_ms": _ms(r.rtt_window_ms.get("p99")),
           "rtt_max_ms": _ms(r.rtt_window_ms.get("max")), "rtt_window_probes": r.rtt_window_probes,
           "guest_echo_requests": guest.get(requests), "guest_echo_replies": guest.get(replies),
           "guest_out_discards": guest.get(guest_mod.OUT_DISCARDS[family]),
           "probe_socket_drops": r.rx_socket_drops, "send_errors": r.send_errors,
           # what the probe achieved, of the rate asked: its sender slips its schedule rather than flood when it
           # falls behind (a busy machine: ~8,000-9,300/s of 10,000 per family on 2 shared cores)
           "send_rate_pps": None if r.send_rate_pps is None else round(r.send_rate_pps)}
    if note:
        out["note"] = note
    return out


SUMMED = ("sent", "lost", "guest_unanswered", "duplicated", "reordered", "guest_echo_requests",
          "guest_echo_replies", "guest_out_discards", "probe_socket_drops")
WORST = ("blackout_ms", "rtt_p50_ms", "rtt_p99_ms", "rtt_max_ms")


def across_families(fams: dict[str, dict]) -> dict:
    """Today's keys over the families' family_dict()s: counts summed, blackout_ms and the round trips the
    worst family's (None where no family has a value)."""
    def over(key, fn):
        vals = [d[key] for d in fams.values() if d[key] is not None]
        return fn(vals) if vals else None

    return {**{k: over(k, sum) for k in SUMMED}, **{k: over(k, max) for k in WORST}}


class Progress:
    """One status line on stderr, rewritten in place."""

    def __init__(self, enabled: bool):
        self.enabled = enabled

    def __call__(self, msg: str) -> None:
        if self.enabled:
            print(f"\r\033[K{msg}", end="", file=sys.stderr, flush=True)

    def done(self) -> None:
        if self.enabled:
            print(file=sys.stderr)


def _watch(fn, *args) -> threading.Thread:
    t = threading.Thread(target=fn, args=args, daemon=True)
    t.start()
    return t


URI = f"tcp:[{MGMT['D']}]:{MIGRATION_PORT}"


def _guest(name: str, ns: str, incoming: str | None = None, echo: str = "kernel") -> Qemu:
    """The dual-stack test guest, its IPv4 default gateway the anycast one every host's tap presents. `echo`:
    "xdp" answers echo requests in XDP (srmig.testbed.echo_xdp), not in the guest's kernel."""
    return Qemu(name, ns=ns, tap=TAP, incoming=incoming, addr=f"{VM_ADDR}/{VM_PREFIXLEN}",
                addr4=f"{VM_ADDR4}/{VM_PREFIXLEN4}", gateway4=GATEWAY_V4, echo=echo)


def coverage_note(rep: probe_mod.ProbeReport) -> str | None:
    """Why a report says nothing about the migration: its probes stopped before the migration completed (a
    count too small for the rate), so the pause may have seen none."""
    complete = rep.marks.get("complete")
    if complete is not None and rep.duration_ms < complete:
        return (f"the probes stopped {complete - rep.duration_ms:.0f} ms before the migration completed: "
                f"nothing after that was measured (raise --count or --duration)")
    return None


def ready_check(tb: Testbed, families: tuple[str, ...], host: str = "S", console=lambda: "") -> dict[str, str]:
    """Probe the guest (on `host`) briefly over each family before measuring anything. IPv6 must answer
    (RuntimeError, with the tail of `console()`); an IPv4 that does not is a note (family -> why), not a
    failure: the run goes on and its table says so."""
    reports = probe_mod.run_probes([VM_ADDRS[f] for f in families], 50, 20, timeout_s=2, netns=tb.ns("C"))
    notes = {}
    for family, rep in reports.items():
        if rep.received:
            continue
        if family == "6":
            raise RuntimeError(f"the guest on {host} does not answer over IPv6: {console()[-500:]}")
        notes[family] = (f"the guest did not answer over {FAMILY_NAMES[family]} before the migration "
                         f"(0 of {rep.sent} echo requests, {rep.send_errors} not sent)")
    return notes


@contextlib.contextmanager
def two_hosts(strategy: Strategy, xdp_mode: str, say=lambda m: None, families: tuple[str, ...] = ("6",),
              echo: str = "kernel"):
    """The testbed with the guest answering on S (in the strategy's steady state; `echo`: who answers in
    the guest, see _guest) and an incoming QEMU on D; yields (testbed, source Qemu, destination Qemu, the guest's counters before the run, notes: family ->
    why a family's numbers mean less, see ready_check)."""
    with Testbed(xdp_mode) as tb:
        say(f"{strategy.name}: booting the guest on S")
        with _guest("vm-s", tb.ns("S"), echo=echo) as src:
            tb.attach_vm_link("S", TAP, GUEST_MAC)
            src.wait_ready(60)
            strategy.steady(tb)
            notes = ready_check(tb, tuple(dict.fromkeys(("6", *families))), console=src.console)
            notes = {f: n for f, n in notes.items() if f in families}
            guest_before = src.guest_stats(timeout=10)
            strategy.prepare(tb, src)
            with _guest("vm-d", tb.ns("D"), incoming=URI, echo=echo) as dst:
                tb.attach_vm_link("D", TAP, GUEST_MAC)
                strategy.dest_started(tb, dst)
                yield tb, src, dst, guest_before, notes


def _guest_delta(q: Qemu, before: dict) -> dict:
    """What the guest itself saw during the run (its counters migrate with it)."""
    try:
        after = q.guest_stats(timeout=10)
    except Exception as e:  # the report stands without the guest's view
        return {"error": str(e)}
    return {k: v - before.get(k, 0) for k, v in after.items()}


def run_one(strategy: Strategy, rate: int, count: int, xdp_mode: str = "generic", say=lambda m: None,
            warmup_s: float = 0.8, linger=None, event_delay_s: float = 0.0,
            families: tuple[str, ...] = ("6",), echo: str = "kernel") -> Run:
    """One migration under probe traffic, `rate` probes/s and `count` probes per family in `families` ("6",
    "4": `srmig demo` probes both). `linger(testbed)` runs before teardown (--keep). `event_delay_s` delays
    the reaction to every QEMU event, as a slow agent would. `echo`: "xdp" has the guest answer in XDP
    (what `srmig demo` does: its rate is beyond what the TCG guest's kernel answers, docs/platform.md)."""
    errors: list[BaseException] = []

    def guarded(fn, *args):
        try:
            fn(*args)
        except BaseException as e:  # surfaced after the run
            errors.append(e)

    with two_hosts(strategy, xdp_mode, say, families, echo) as (tb, src, dst, guest_before, notes):
        p = probe_mod.Probe([VM_ADDRS[f] for f in families], rate, count, timeout_s=2.0, netns=tb.ns("C"),
                            rtt_window=RTT_WINDOW, **strategy.probe_kwargs()).start()
        try:
            time.sleep(warmup_s)
            strategy.begin(tb, src)
            t_begin = time.monotonic()
            p.mark("migrate")

            def on_stop():
                ev = src.qmp.wait_event("STOP", 60, after=t_begin)
                p.mark("stop", ev.host_time)
                time.sleep(event_delay_s)
                strategy.source_stopped(tb, src, int(ev.host_time * 1e9))

            def on_resume():
                ev = dst.qmp.wait_event("RESUME", 60, after=t_begin)
                p.mark("resume", ev.host_time)
                time.sleep(event_delay_s)
                strategy.dest_resumed(tb)

            watchers = [_watch(guarded, on_stop), _watch(guarded, on_resume)]
            say(f"{strategy.name}: migrating under {rate} probes/s")
            info = src.migrate(URI, timeout=60)
            for w in watchers:
                w.join(10)
            p.mark("complete")
            time.sleep(event_delay_s)
            strategy.completed(tb)
            notes.update({f: n for f, n in strategy.family_notes(tb).items() if f in families and f not in notes})
            while not p.done():
                sent, got = p.progress()
                say(f"{strategy.name}: migrated; probes {sent}/{count * len(families)} sent, {got} answered")
                time.sleep(0.2)
            p.wait(timeout=60)
        except BaseException:
            p.stop()
            raise
        strategy.finish(tb)
        if linger:
            linger(tb)
        guest = _guest_delta(dst, guest_before)
    if errors:
        raise errors[0]
    for family, rep in p.reports.items():
        if (note := coverage_note(rep)) is not None:
            notes[family] = note + (f"; {notes[family]}" if family in notes else "")
    drain = getattr(strategy, "drain_report", None)
    return Run(strategy.name, dict(p.reports), info.get("downtime"), info.get("total-time"), guest,
               strategy.events, drain.__dict__ if drain else None, notes)


def run_abort(strategy: Strategy, rate: int, count: int, xdp_mode: str = "generic",
              warmup_s: float = 0.8, families: tuple[str, ...] = ("6",)) -> Run:
    """A migration that fails after stop-and-copy: the destination QEMU is killed while the source waits
    at QEMU's pre-switchover pause (capability pause-before-switchover, so the failure is certain), then
    the migration is cancelled and the source resumes. Whatever D held must come back to S."""
    with two_hosts(strategy, xdp_mode, families=families) as (tb, src, dst, guest_before, notes):
        src.qmp.execute("migrate-set-capabilities",
                        capabilities=[{"capability": "pause-before-switchover", "state": True}])
        with probe_mod.Probe([VM_ADDRS[f] for f in families], rate, count, timeout_s=2.0, netns=tb.ns("C")) as p:
            time.sleep(warmup_s)
            strategy.begin(tb, src)
            t_begin = time.monotonic()
            p.mark("migrate")
            src.migrate(URI, wait=False)
            ev = src.qmp.wait_event("STOP", 60, after=t_begin)
            p.mark("stop", ev.host_time)
            strategy.source_stopped(tb, src, int(ev.host_time * 1e9))
            src.qmp.wait_event("MIGRATION", 30, match={"status": "pre-switchover"}, after=t_begin)
            time.sleep(0.05)  # D holds what arrives meanwhile
            dst.proc.kill()   # the destination dies...
            dst.proc.wait(10)
            p.mark("dest killed")
            src.qmp.execute("migrate_cancel")  # ...and the source takes the VM back
            ev = src.qmp.wait_event("RESUME", 30, after=t_begin)
            p.mark("source resumed", ev.host_time)
            strategy.failed(tb)
        p.wait()
        strategy.finish(tb)
        guest = _guest_delta(src, guest_before)
        guest["status"] = src.status()
    drain = getattr(strategy, "drain_report", None)
    return Run(strategy.name, dict(p.reports), None, None, guest, strategy.events,
               drain.__dict__ if drain else None, notes)


TABLE_COLS = ["strategy", "family", "sent", "lost", "guest_unanswered", "duplicated", "reordered", "blackout_ms",
              "rtt_p50_ms", "rtt_p99_ms", "rtt_max_ms", "downtime_ms"]


def _cell(v, fmt: str) -> str:
    return "" if v is None else format(v, fmt)


TABLE_LEGEND = ("blackout = longest run of lost probes; guest_unanswered = of the lost, requests the guest's own "
                "counters say it received but did not answer; rtt_p50_ms = steady state before the migration, "
                "rtt_p99_ms / rtt_max_ms = probes sent from its beginning to its completion")
TABLE_TITLE = "live migration of a QEMU guest, {rate} probes/s per family ({what}), one run per strategy"


def table(runs: list[Run], rate: int, title: str = TABLE_TITLE) -> str:
    """One row per strategy and family probed; notes (a family the ingress did not steer, ...) under it.
    `title`: the first line, its {rate} and {what} (the echo requests probed) filled in."""
    rows, notes = [], []
    for r in runs:
        for family in r.reports:
            d = r.family_dict(family)
            rows.append([r.strategy, FAMILY_NAMES[family], d["sent"], d["lost"], d["guest_unanswered"],
                         d["duplicated"], d["reordered"], f"{d['blackout_ms']:.1f}", _cell(d["rtt_p50_ms"], ".2f"),
                         _cell(d["rtt_p99_ms"], ".1f"), _cell(d["rtt_max_ms"], ".1f"), _cell(r.downtime_ms, ".0f")])
            if "note" in d:
                notes.append(f"  {r.strategy} {FAMILY_NAMES[family]}: {d['note']}")
    widths = [max(len(c), *(len(str(row[i])) for row in rows)) for i, c in enumerate(TABLE_COLS)]
    fams = sorted({f for r in runs for f in r.reports}, reverse=True)
    what = " and ".join({"6": "ICMPv6 echo", "4": "ICMP echo"}[f] for f in fams)
    lines = [title.format(rate=rate, what=what),
             "  ".join(c.ljust(w) for c, w in zip(TABLE_COLS, widths)).rstrip()]
    lines += ["  ".join(str(v).ljust(w) for v, w in zip(row, widths)).rstrip() for row in rows]
    if notes:
        lines += ["notes:", *notes]
    return "\n".join(lines)


def main(strategies: list[str], rate: int, count: int, json_path: str | None, plot_path: str | None,
         keep: bool = False, xdp_mode: str = "generic", progress: bool = True, event_delay_ms: float = 0,
         families: tuple[str, ...] = DEFAULT_FAMILIES, echo: str = DEMO_ECHO) -> int:
    chosen = [make(name) for name in strategies]  # validates names before anything is built
    say = Progress(progress)
    # SIGTERM cleans up like Ctrl-C does: every context manager above unwinds. Only in this process:
    # helpers forked from it (pyroute2 creates namespaces in a child it ends with SIGTERM) just exit.
    main_pid = os.getpid()

    def on_term(*_):
        if os.getpid() != main_pid:
            os._exit(143)
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGINT, signal.default_int_handler)  # even if started with SIGINT ignored
    runs: list[Run] = []
    t0 = time.monotonic()
    def linger(tb):
        say.done()
        print(f"--keep: testbed up, namespaces {', '.join(tb.topo.hosts)}; "
              f"e.g. `srmig --netns {tb.ns('S')} stats`. Press Enter (or Ctrl-C) to tear down.")
        try:
            input()
        except EOFError:
            pass

    for i, strategy in enumerate(chosen, 1):
        say(f"[{i}/{len(chosen)}] {strategy.name}")
        runs.append(run_one(strategy, rate, count, xdp_mode,
                            say=lambda m, i=i: say(f"[{i}/{len(chosen)}] {m}"),
                            linger=linger if keep and i == len(chosen) else None,
                            event_delay_s=event_delay_ms / 1000, families=families, echo=echo))
    say.done()
    print(table(runs, rate))
    print(f"({time.monotonic() - t0:.0f} s; downtime as reported by QEMU; {TABLE_LEGEND})")
    doc = {"strategies": {r.strategy: r.to_dict() for r in runs}, "rate_pps": rate, "count": count,
           "families": list(families), "event_delay_ms": event_delay_ms, "guest_echo": echo}
    if json_path:
        Path(json_path).write_text(json.dumps(doc, indent=2))
        print(f"wrote {json_path}")
    if plot_path:
        probe_mod.plot_timelines({r.strategy: r.reports for r in runs}, plot_path, window_ms=300,
                                 title=f"received probes per ms and their round trip, {rate} probes/s per family")
        print(f"wrote {plot_path}")
    return 0
