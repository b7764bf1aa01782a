"""`srmig demo`: registered through the `srmig.commands` entry point (pyproject.toml), so that the product's
CLI (srmig/cli.py) never imports the lab. Parses only; the demos are demo.py and libvirt_demo.py."""

from __future__ import annotations

import argparse


def cmd_demo(args) -> int:
    if args.libvirt:
        from srmig.testbed import libvirt_demo

        rate = args.rate or libvirt_demo.DEFAULT_RATE
        return libvirt_demo.main(rate, args.count or int(rate * args.duration), args.db, args.json,
                                 xdp_mode=args.mode)
    from srmig.testbed import demo

    names = [n for item in args.strategy for n in item.split(",") if n] or list(demo.DEFAULT_STRATEGIES)
    if args.no_drain and "srmig-no-drain" not in names:
        names.append("srmig-no-drain")
    rate = args.rate or 10000
    count = args.count or int(rate * args.duration)
    return demo.main(names, rate, count, args.json, args.plot, keep=args.keep, xdp_mode=args.mode,
                     event_delay_ms=args.event_delay_ms)


def register(sub) -> None:
    """Add `srmig demo` to the srmig command's subparsers."""
    sp = sub.add_parser(
        "demo", help="migrate a real QEMU guest once per strategy under probe traffic, compare the losses",
        description="Builds the namespace testbed (client, transit, hosts S and D with srmig's XDP), boots a "
                    "QEMU guest on S and live-migrates it to D once per strategy while the client probes it; "
                    "prints sent/lost/duplicated/reordered/blackout and the downtime QEMU reports, and "
                    "writes a per-millisecond timeline plot. Removes everything it made, also on Ctrl-C.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="strategies: reactive (EVPN-like: switch after resume), withdraw (switch at pause), bicast "
               "(duplicate to S and D), srmig, srmig-no-drain (srmig without the source tap drain)")
    sp.add_argument("--strategy", action="append", default=[], metavar="NAME[,NAME]",
                    help="run only these (repeatable or comma-separated; default: all four)")
    sp.add_argument("--rate", type=int, help="probes per second (default: 10000; 2000 with --libvirt, where the "
                                             "guest runs under libvirt's QEMU settings)")
    sp.add_argument("--duration", type=float, default=3.0, help="seconds of probing per run (default: 3)")
    sp.add_argument("--count", type=int, help="probes per run (default: rate x duration)")
    sp.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    sp.add_argument("--plot", metavar="PNG", default="srmig-demo.png",
                    help="timeline plot (default: srmig-demo.png; '' for none)")
    sp.add_argument("--keep", action="store_true", help="keep the last testbed up until Enter is pressed")
    sp.add_argument("--no-drain", action="store_true", help="also run srmig without the source tap drain")
    sp.add_argument("--mode", choices=["generic", "native"], default="generic", help="XDP mode on S and D")
    sp.add_argument("--event-delay-ms", type=float, default=0, metavar="MS",
                    help="react to every QEMU event MS later, as a slow agent would (default: 0)")
    sp.add_argument("--libvirt", action="store_true",
                    help="instead: two libvirtd daemons and the srmig agents (hook, events, state database) "
                         "migrate the guest with libvirt; prints lost/duplicated/reordered")
    sp.add_argument("--db", choices=["embedded", "etcd"], default="embedded",
                    help="--libvirt: the agents' VM state database (default: embedded)")
    sp.set_defaults(func=cmd_demo, json_out=None)
