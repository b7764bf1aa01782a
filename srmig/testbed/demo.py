"""`srmig demo`: one live migration of a real QEMU guest per strategy, under the same probe traffic, on the
namespace testbed, and a comparison of what each strategy lost.

Per strategy: build the testbed, boot the guest on S, start the -incoming QEMU on D, start the probe from
the client, begin the migration (the strategy provisions the network first), react to the QEMU events
(source STOP, destination RESUME, migration completed) exactly as the strategy says, then collect the
probe's report, the hypervisor-reported downtime and the guest's own counters. Everything it made is
removed afterwards, also on failure and on Ctrl-C.
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
from srmig.testbed.qemu import GUEST_MAC, Qemu
from srmig.testbed.strategies import Strategy, make
from srmig.testbed.testbed import MGMT, VM_ADDR, Testbed

DEFAULT_STRATEGIES = ["reactive", "withdraw", "bicast", "srmig"]
TAP = "vmtap"
MIGRATION_PORT = 4444


@dataclass
class Run:
    strategy: str
    report: probe_mod.ProbeReport
    downtime_ms: float | None
    total_ms: float | None
    guest: dict = field(default_factory=dict)
    events: list = field(default_factory=list)
    drain: dict | None = None

    def unanswered(self) -> int:
        """Lost probes the guest received and left unanswered (srmig.testbed.guest.unanswered)."""
        return guest_mod.unanswered(self.guest, self.report.lost)

    def to_dict(self) -> dict:
        r = self.report
        out = {"sent": r.sent, "lost": r.lost, "guest_unanswered": self.unanswered(),
               "duplicated": r.duplicated, "reordered": r.reordered,
               "blackout_ms": round(r.blackout_ms, 3), "downtime_ms": self.downtime_ms,
               "migration_ms": self.total_ms, "guest_echo_requests": self.guest.get("Icmp6InEchos"),
               "guest_echo_replies": self.guest.get("Icmp6OutEchoReplies"),
               "guest_out_discards": self.guest.get("Ip6OutDiscards"),
               "probe_socket_drops": getattr(r, "rx_socket_drops", None),
               "marks_ms": {k: round(v, 3) for k, v in r.marks.items()}}
        if self.drain:
            out["drain"] = self.drain
        return out


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


@contextlib.contextmanager
def two_hosts(strategy: Strategy, xdp_mode: str, say=lambda m: None):
    """The testbed with the guest answering on S (in the strategy's steady state) and an incoming QEMU on
    D; yields (testbed, source Qemu, destination Qemu, the guest's counters before the run)."""
    with Testbed(xdp_mode) as tb:
        say(f"{strategy.name}: booting the guest on S")
        with Qemu("vm-s", ns=tb.ns("S"), tap=TAP) as src:
            tb.attach_vm_link("S", TAP, GUEST_MAC)
            src.wait_ready(60)
            strategy.steady(tb)
            # The guest must answer before we measure anything.
            ready = probe_mod.run_probe(VM_ADDR, 50, 20, timeout_s=2, netns=tb.ns("C"))
            if ready.received == 0:
                raise RuntimeError(f"the guest on S does not answer: {src.console()[-500:]}")
            guest_before = src.guest_stats(timeout=10)
            strategy.prepare(tb, src)
            with Qemu("vm-d", ns=tb.ns("D"), tap=TAP, incoming=URI) as dst:
                tb.attach_vm_link("D", TAP, GUEST_MAC)
                strategy.dest_started(tb, dst)
                yield tb, src, dst, guest_before


def _guest_delta(q: Qemu, before: dict) -> dict:
    """What the guest itself saw during the run (its counters migrate with it)."""
    try:
        after = q.guest_stats(timeout=10)
    except Exception as e:  # the report stands without the guest's view
        return {"error": str(e)}
    return {k: v - before.get(k, 0) for k, v in after.items()}


def run_one(strategy: Strategy, rate: int, count: int, xdp_mode: str = "generic", say=lambda m: None,
            warmup_s: float = 0.8, linger=None, event_delay_s: float = 0.0) -> Run:
    """One migration under probe traffic. `linger(testbed)` runs before teardown (--keep).
    `event_delay_s` delays the reaction to every QEMU event, as a slow agent would."""
    errors: list[BaseException] = []

    def guarded(fn, *args):
        try:
            fn(*args)
        except BaseException as e:  # surfaced after the run
            errors.append(e)

    with two_hosts(strategy, xdp_mode, say) as (tb, src, dst, guest_before):
        p = probe_mod.Probe(VM_ADDR, rate, count, timeout_s=2.0, netns=tb.ns("C"),
                            **strategy.probe_kwargs()).start()
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
            while not p.done():
                sent, got = p.progress()
                say(f"{strategy.name}: migrated; probes {sent}/{count} sent, {got} answered")
                time.sleep(0.2)
            report = p.wait(timeout=60)
        except BaseException:
            p.stop()
            raise
        strategy.finish(tb)
        if linger:
            linger(tb)
        guest = _guest_delta(dst, guest_before)
    if errors:
        raise errors[0]
    drain = getattr(strategy, "drain_report", None)
    return Run(strategy.name, report, info.get("downtime"), info.get("total-time"), guest,
               strategy.events, drain.__dict__ if drain else None)


def run_abort(strategy: Strategy, rate: int, count: int, xdp_mode: str = "generic",
              warmup_s: float = 0.8) -> Run:
    """A migration that fails after stop-and-copy: the destination QEMU is killed while the source waits
    at QEMU's pre-switchover pause (capability pause-before-switchover, so the failure is certain), then
    the migration is cancelled and the source resumes. Whatever D held must come back to S."""
    with two_hosts(strategy, xdp_mode) as (tb, src, dst, guest_before):
        src.qmp.execute("migrate-set-capabilities",
                        capabilities=[{"capability": "pause-before-switchover", "state": True}])
        with probe_mod.Probe(VM_ADDR, rate, count, timeout_s=2.0, netns=tb.ns("C")) as p:
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
        report = p.wait()
        strategy.finish(tb)
        guest = _guest_delta(src, guest_before)
        guest["status"] = src.status()
    drain = getattr(strategy, "drain_report", None)
    return Run(strategy.name, report, None, None, guest, strategy.events, drain.__dict__ if drain else None)


def table(runs: list[Run], rate: int) -> str:
    cols = ["strategy", "sent", "lost", "guest_unanswered", "duplicated", "reordered", "blackout_ms", "downtime_ms"]
    rows = [[r.strategy, r.report.sent, r.report.lost, r.unanswered(), r.report.duplicated, r.report.reordered,
             f"{r.report.blackout_ms:.1f}", "" if r.downtime_ms is None else f"{r.downtime_ms:.0f}"] for r in runs]
    widths = [max(len(c), *(len(str(row[i])) for row in rows)) for i, c in enumerate(cols)]
    lines = [f"live migration of a QEMU guest, {rate} probes/s (ICMPv6 echo), one run per strategy",
             "  ".join(c.ljust(w) for c, w in zip(cols, widths)).rstrip()]
    lines += ["  ".join(str(v).ljust(w) for v, w in zip(row, widths)).rstrip() for row in rows]
    return "\n".join(lines)


def main(strategies: list[str], rate: int, count: int, json_path: str | None, plot_path: str | None,
         keep: bool = False, xdp_mode: str = "generic", progress: bool = True, event_delay_ms: float = 0) -> int:
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
                            event_delay_s=event_delay_ms / 1000))
    say.done()
    print(table(runs, rate))
    print(f"({time.monotonic() - t0:.0f} s; blackout = longest run of lost probes; downtime as reported by QEMU; "
          "guest_unanswered = of the lost, requests the guest's own counters say it received but did not answer)")
    doc = {"strategies": {r.strategy: r.to_dict() for r in runs}, "rate_pps": rate, "count": count,
           "event_delay_ms": event_delay_ms}
    if json_path:
        Path(json_path).write_text(json.dumps(doc, indent=2))
        print(f"wrote {json_path}")
    if plot_path:
        probe_mod.plot_timelines({r.strategy: r.report for r in runs}, plot_path, window_ms=300,
                                 title=f"received probes per ms, {rate} probes/s")
        print(f"wrote {plot_path}")
    return 0
