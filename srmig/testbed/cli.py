"""`srmig demo`: registered through the `srmig.commands` entry point (pyproject.toml), so that the product's
CLI (srmig/cli.py) never imports the lab. Parses only; the demos are demo.py and libvirt_demo.py."""

from __future__ import annotations

import argparse
import sys


GUEST_PROBES_PER_S = 10000  # the demo's default probe rate at the guest, shared by the families probed
FAMILIES = {"4": ("4",), "6": ("6",), "both": ("6", "4")}  # --family


def _usage(msg: str) -> int:
    print(f"srmig demo: error: {msg}", file=sys.stderr)
    return 2


def cmd_demo(args) -> int:
    if args.fault == "list":
        from srmig.testbed import faults

        print(faults.listing())
        return 0
    matrix_only = {"--runs": args.runs is not None, "--only": bool(args.only) and args.soak is None,
                   "--fresh": args.fresh}
    if not args.fault_matrix and any(matrix_only.values()):
        return _usage(f"{', '.join(k for k, v in matrix_only.items() if v)}: only with --fault-matrix OUT.md")
    if args.seed is not None and args.soak is None:
        return _usage("--seed: only with --soak N")
    if args.fault and args.fault_matrix:
        return _usage("--fault runs one cell, --fault-matrix all of them: one or the other")
    families = FAMILIES[args.family or "both"]
    if args.fault or args.fault_matrix or args.libvirt or args.soak is not None:
        if args.family and (args.fault or args.fault_matrix or args.soak is not None):
            return _usage("--family: not with --fault, --fault-matrix or --soak (they probe IPv6 alone)")
        if args.guest_echo:
            return _usage("--guest-echo: the namespace demo only (the libvirt guest's kernel answers, at 2000/s)")
        return _libvirt(args, families)
    from srmig.testbed import demo

    names = [n for item in args.strategy for n in item.split(",") if n] or list(demo.DEFAULT_STRATEGIES)
    if args.no_drain and "srmig-no-drain" not in names:
        names.append("srmig-no-drain")
    # 10,000 probes/s at the guest in all. With the kernel answering, this TCG guest on 2 cores queues beyond
    # that: at 10,000 per family its steady-state round trip was 87 ms, and every strategy, srmig too, lost
    # thousands in its tap queue. The XDP responder answers 10,000 per family, but on a busy 2-core machine
    # srmig still lost probes in 1 run of 3 (docs/platform.md), so the default stays shared.
    rate = args.rate or GUEST_PROBES_PER_S // len(families)
    count = args.count or int(rate * (args.duration or 3.0))
    return demo.main(names, rate, count, args.json, args.plot, keep=args.keep, xdp_mode=args.mode,
                     event_delay_ms=args.event_delay_ms, families=families,
                     echo=args.guest_echo or demo.DEMO_ECHO)


def _libvirt(args, families: tuple[str, ...]) -> int:
    from srmig.testbed import faults, libvirt_demo

    rate = args.rate or libvirt_demo.DEFAULT_RATE
    if args.fault_matrix:
        only = [n for item in args.only for n in item.split(",") if n]
        try:
            faults.cells(only)
        except ValueError as e:
            return _usage(str(e))
        if args.db:
            return _usage("--fault-matrix picks the database per fault (etcd for etcd-leader-kill): no --db")
        if args.runs is not None and args.runs < 1:
            return _usage("--runs: at least 1")
        from srmig.testbed.demo import Progress

        libvirt_demo.quiet_libvirt()
        say = Progress(True)

        def note(msg: str) -> None:
            say(msg)
            say.done()

        made, failed = faults.matrix(args.fault_matrix, args.runs or 1, only, args.fresh, rate, args.mode,
                                     args.attempts, say=say, note=note)
        print(f"{made} run(s) recorded; wrote {args.fault_matrix} and "
              f"{faults.Path(args.fault_matrix).with_suffix('.json')}" + (f"; {failed} run(s) whose testbed "
                                                                          f"failed (not recorded)" if failed else ""))
        return 1 if failed else 0
    if args.soak is not None:
        if args.fault or args.fault_matrix:
            return _usage("--soak draws its own faults: no --fault or --fault-matrix")
        if args.soak < 1:
            return _usage("--soak: at least 1 migration")
        only = [n for item in args.only for n in item.split(",") if n]
        try:
            faults.cells(only)
        except ValueError as e:
            return _usage(str(e))
        from srmig.testbed import soak

        return soak.main(args.soak, rate, args.db, args.json, args.mode, args.seed, only or None)
    count = args.count or (int(rate * args.duration) if args.duration else None)
    if args.fault:
        try:
            fault, _phase = faults.parse(args.fault)
        except ValueError as e:
            return _usage(str(e))
        if fault.db and args.db not in (None, fault.db):
            return _usage(f"{fault.name} needs --db {fault.db}")
    if args.attempts < 1:
        return _usage("--attempts: at least 1")
    return libvirt_demo.main(rate, count, args.db, args.json, xdp_mode=args.mode, fault=args.fault,
                             attempts=args.attempts, families=families)


EPILOG_FAULTS = """\
faults (--libvirt):
  --fault NAME[@PHASE] injects one fault in one phase of the migration (list them: --fault list) and
  recovers from it as a host would (an agent back 1 s later, libvirtd started again at once, etcd back
  2 s later); the probe runs until the fault is over and the ingress settled (30 s at most). It tells
  whether the fault landed in its phase, from libvirt's events as this process heard them, and runs
  again (--attempts, default 3) while it did not. --json adds fault, phase, fault_landed (and vm_on).
  --fault-matrix OUT.md runs every meaningful fault x phase cell and writes a table (OUT.md) and every
  run (OUT.json); it is incremental: it runs only cells with fewer than --runs runs in OUT.json.

exit status (--libvirt):
  0  nothing lost (lost_net: less what the guest itself left unanswered), nothing duplicated, the VM runs
     on one host at the end, and the fault (if any) landed in its phase; reordering is not a failure
  1  probes lost or duplicated, the VM runs nowhere or on both hosts, or the migration failed without a
     fault (an abort is what some faults are for); --fault-matrix: some run's testbed failed
  2  bad arguments (one line: what is valid)
  3  --fault: the fault missed its phase in every attempt (the run measured another phase)
"""


def register(sub) -> None:
    """Add `srmig demo` to the srmig command's subparsers."""
    sp = sub.add_parser(
        "demo", help="migrate a real QEMU guest once per strategy under probe traffic, compare the losses",
        description="Builds the namespace testbed (client, transit, hosts S and D with srmig's XDP), boots a "
                    "QEMU guest on S and live-migrates it to D once per strategy while the client probes it; "
                    "prints sent/lost/duplicated/reordered/blackout, the probes' round trip (steady state and "
                    "over the migration) and the downtime QEMU reports, per strategy and address family, and "
                    "writes a per-millisecond timeline plot. Removes everything it made, also on Ctrl-C.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="strategies: reactive (EVPN-like: switch after resume), withdraw (switch at pause), bicast "
               "(duplicate to S and D), srmig, srmig-no-drain (srmig without the source tap drain)\n\n"
               + EPILOG_FAULTS)
    sp.add_argument("--strategy", action="append", default=[], metavar="NAME[,NAME]",
                    help="run only these (repeatable or comma-separated; default: all four)")
    sp.add_argument("--rate", type=int, help="probes per second, per family (default: 10000 shared by the families "
                                             "probed: 5000 each with both; 2000 per family with --libvirt, where "
                                             "the guest runs under libvirt's QEMU settings)")
    sp.add_argument("--family", choices=["4", "6", "both"],
                    help="probe the dual-stack guest over IPv4 (ICMP echo), IPv6 (ICMPv6 echo) or both through "
                         "the same migration (default: both; one table row per strategy and family); --libvirt "
                         "too, not --fault, --fault-matrix or --soak (IPv6 alone)")
    sp.add_argument("--duration", type=float,
                    help="seconds of probing per run (default: 3; 5 with --libvirt; with --fault, until the fault "
                         "is over, 30 at most)")
    sp.add_argument("--count", type=int, help="probes per run and family (default: rate x duration)")
    sp.add_argument("--json", metavar="FILE", help="also write the results as JSON (--libvirt: '-' for stdout)")
    sp.add_argument("--plot", metavar="PNG", default="srmig-demo.png",
                    help="timeline plot (default: srmig-demo.png; '' for none)")
    sp.add_argument("--keep", action="store_true", help="keep the last testbed up until Enter is pressed")
    sp.add_argument("--no-drain", action="store_true", help="also run srmig without the source tap drain")
    sp.add_argument("--mode", choices=["generic", "native"], default="generic", help="XDP mode on S and D")
    sp.add_argument("--event-delay-ms", type=float, default=0, metavar="MS",
                    help="react to every QEMU event MS later, as a slow agent would (default: 0)")
    sp.add_argument("--guest-echo", choices=["xdp", "kernel"],
                    help="who answers the probes in the guest: an XDP program on its eth0 (default), or its kernel "
                         "(~3x the guest's CPU per echo under TCG: it queues beyond ~12,500 echo/s); not --libvirt")
    sp.add_argument("--libvirt", action="store_true",
                    help="instead: two libvirtd daemons and the srmig agents (hook, events, state database) "
                         "migrate the guest with libvirt; prints lost/duplicated/reordered per family")
    sp.add_argument("--db", choices=["embedded", "etcd"],
                    help="--libvirt: the agents' VM state database (default: embedded; etcd for a fault that "
                         "needs it)")
    sp.add_argument("--fault", metavar="NAME[@PHASE]",
                    help="--libvirt (implied): inject this fault in this phase (default: the fault's own); "
                         "'list' lists the faults and phases")
    sp.add_argument("--attempts", type=int, default=3, metavar="N",
                    help="--fault, --fault-matrix: runs of a cell at most while its fault misses its phase "
                         "(default: 3)")
    sp.add_argument("--fault-matrix", metavar="OUT.md",
                    help="--libvirt (implied): every meaningful fault x phase, a table in OUT.md and the runs "
                         "in OUT.json next to it (merged into what is there)")
    sp.add_argument("--runs", type=int, metavar="N",
                    help="--fault-matrix: runs per cell (default: 1); cells with N runs recorded are skipped")
    sp.add_argument("--only", action="append", default=[], metavar="NAME[@PHASE][,...]",
                    help="--fault-matrix, --soak: only these rows (NAME) or cells (NAME@PHASE)")
    sp.add_argument("--fresh", action="store_true",
                    help="--fault-matrix: discard the selected cells' recorded runs first")
    sp.add_argument("--soak", type=int, metavar="N",
                    help="--libvirt (implied): migrate the guest back and forth N times on one testbed, a random "
                         "fault in a random phase of about half the migrations from S to D (--only narrows "
                         "the draw); prints each migration, the totals, and the agents' fds, memory and pinned "
                         "objects before and after (a growth is a leak: exit status 1)")
    sp.add_argument("--seed", type=int, help="--soak: the random draw's seed (printed by every soak)")
    sp.set_defaults(func=cmd_demo, json_out=None)
