"""srmig command line: parses arguments, calls the domain layer, prints a table or --json. Nothing else."""

from __future__ import annotations

import argparse
import json
import sys

EPILOG = """\
examples (as root):
  srmig load eth1                          attach the XDP program (compiled and pinned the first time)
  srmig sid add fc00:0:1::5 End.S          instantiate the migration-source SID
  srmig sid add fc00:0:1::d6 End.DX6-map   and the steady-state one
  srmig vm set 2001:db8:100::10 running    a VM that runs on this host
  srmig vm set 2001:db8:100::10 away --next-sid fc00:0:2::d6
  srmig domain add fc00::/16               accept packets to our SIDs only from the SR domain (RFC 8754 5.1)
  srmig stats --json                       counters per SID, per verdict, per drop reason
  srmig ingress load eth0                  H.Encaps in BPF on an ingress (srmig ingress --help)
  srmig check                              what this kernel offers and what srmig will use
  srmig agent --config /etc/srmig/agent.toml   the agent (hypervisor and/or ingress role)
  srmig install-hook --config FILE --unit  the libvirt hook and a systemd unit
  srmig status                             VMs, phases, connections and counters of the local agent
  srmig --netns hostS sid list             operate on the dataplane of namespace hostS
  srmig bench micro                        ns/packet per branch against an XDP_PASS stub
  srmig bench --quick --json               NDR/PDR vs the kernel's SRv6, scale, ratios: one JSON document

behaviours: End, End.DX6-map, End.S, End.SBUF   VM states: running, hold, away, incoming
"""


def _print_table(rows: list[dict], columns: list[str]) -> None:
    if not rows:
        print("(none)")
        return
    cells = [[str(r.get(c, "")) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    print("  ".join(c.upper().ljust(w) for c, w in zip(columns, widths)))
    for row in cells:
        print("  ".join(v.ljust(w) for v, w in zip(row, widths)))


def _emit(args, obj, rows=None, columns=None) -> None:
    if args.json:
        json.dump(obj, sys.stdout, indent=2)
        print()
    elif rows is not None:
        _print_table(rows, columns)
    else:
        for k, v in obj.items():
            print(f"{k}: {v}")


def _dataplane():
    from srmig.ctl.maps import Dataplane

    return Dataplane()


def cmd_load(args) -> int:
    from srmig.bpf import loader

    limits = loader.Limits(max_sids=args.max_sids, max_vms=args.max_vms, hold_ring_pages=args.hold_ring_pages)
    loaded = loader.load(args.iface, args.mode, limits)
    _emit(args, {"interface": args.iface, "mode": args.mode, "prog_id": loaded.prog_id,
                 "pin_dir": str(loaded.pin_dir), "compiled": loaded.compiled})
    return 0


def cmd_unload(args) -> int:
    from srmig.bpf import loader

    _emit(args, loader.unload(args.iface))
    return 0


def cmd_sid(args) -> int:
    with _dataplane() as dp:
        if args.action == "add":
            entry = dp.add_sid(args.sid, args.behaviour)
            _emit(args, entry.to_dict())
        elif args.action == "del":
            _emit(args, {"sid": args.sid, "deleted": dp.del_sid(args.sid)})
        else:
            entries = [e.to_dict() for e in dp.list_sids()]
            rows = [{"sid": e["sid"], "behaviour": e["behaviour"], **e["stats"]} for e in entries]
            _emit(args, entries, rows,
                  ["sid", "behaviour", "packets", "delivered", "forwarded", "held", "dropped"])
    return 0


def cmd_vm(args) -> int:
    with _dataplane() as dp:
        if args.action == "set":
            entry = dp.set_vm(args.vm, args.state, next_sid=args.next_sid, hold_ring=args.hold_ring,
                              shadow=args.shadow)
            _emit(args, entry.to_dict())
        elif args.action == "del":
            _emit(args, {"vm": args.vm, "deleted": dp.del_vm(args.vm)})
        else:
            entries = [e.to_dict() for e in dp.list_vms()]
            _emit(args, entries, entries, ["vm", "state", "next_sid", "hold_ring", "shadow"])
    return 0


def cmd_domain(args) -> int:
    with _dataplane() as dp:
        if args.action == "add":
            prefix = dp.add_domain(args.domain)
            _emit(args, {"prefix": prefix, "prefixes": len(dp.list_domains())})
        elif args.action == "del":
            _emit(args, {"prefix": args.domain, "deleted": dp.del_domain(args.domain)})
        else:
            rows = [{"prefix": p} for p in dp.list_domains()]
            if rows or args.json:
                _emit(args, rows, rows, ["prefix"])
            else:
                print("(none: the SR domain check is off, every source is accepted)")
    return 0


def cmd_stats(args) -> int:
    with _dataplane() as dp:
        stats = dp.stats()
    if args.json:
        _emit(args, stats)
        return 0
    print("verdicts: " + "  ".join(f"{k}={v}" for k, v in stats["verdicts"].items()))
    drops = {k: v for k, v in stats["drops"].items() if v}
    print("drops:    " + ("  ".join(f"{k}={v}" for k, v in drops.items()) or "none"))
    rows = [{"sid": s["sid"], "behaviour": s["behaviour"], **s["stats"]} for s in stats["sids"]]
    _print_table(rows, ["sid", "behaviour", "packets", "bytes", "delivered", "forwarded", "held", "dropped"])
    return 0


def cmd_check(args) -> int:
    from srmig import check

    report = check.run(args.interface)
    if args.json:
        _emit(args, report)
        return 0 if report["ok"] else 1
    width = max(map(len, report["checks"]))
    for key, c in report["checks"].items():
        status = "ok" if c["ok"] else ("FAIL" if c["required"] else "no")
        line = f"{status:<5} {key:<{width}}  {c['detail']}"
        if not c["ok"]:
            line += (f" — {'required' if c['required'] else 'optional'}; degrades: {c['degrades']}; "
                     f"fix: {c['fix']}")
        print(line)
    u = report["uses"]
    print(f"srmig uses: XDP {u['xdp_mode']}, H.Encaps in BPF (tc clsact egress), End in XDP, bench generator "
          f"{u['bench_generator']}, tap drain {'on' if u['tap_drain'] else 'unavailable'}")
    absent = [k for k, c in report["checks"].items() if not c["ok"] and not c["required"]]
    if report["ok"]:
        print(f"kernel {report['kernel']}: everything srmig requires is here"
              + (f" (optional, absent: {', '.join(absent)})" if absent else ""))
        return 0
    print(f"kernel {report['kernel']}: missing what srmig requires: {', '.join(report['missing_required'])}")
    return 1


def cmd_bench(args) -> int:
    from bench import micro

    result = micro.run(vms=args.vms, runs=args.runs, progress=not args.json)
    if args.json:
        _emit(args, result)
    else:
        micro.print_table(result)
    return 0


def cmd_bench_all(args) -> int:
    """`srmig bench` without a sub-benchmark: everything, one JSON document (bench/report.py)."""
    from bench import local, report

    parts = tuple(p for item in args.only for p in item.split(",") if p) or report.PARTS
    unknown = set(parts) - set(report.PARTS)
    if unknown:
        raise ValueError(f"unknown benchmark part(s) {', '.join(sorted(unknown))}: expected "
                         f"{', '.join(report.PARTS)}")
    try:
        sizes = tuple(x.strip() for item in args.sizes for x in item.split(",") if x.strip()) or None
        result = report.run(quick=args.quick, parts=parts, max_rate=args.max_rate, duration_s=args.duration,
                            max_trials=args.trials, mode=args.mode, progress=True, generator=args.generator,
                            sizes=sizes, repeat=args.repeat)
    except local.BenchError as e:
        raise ValueError(str(e)) from None
    if args.plot:
        report.plot(result, args.plot)
    if args.json:
        _emit(args, result)
    else:
        report.print_table(result)
        if args.plot and "local" in result:
            print(f"plot: {args.plot}")
    return 0


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


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="srmig", description="Zero-loss VM live migration over IPv6 Segment Routing (XDP dataplane).",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--netns", metavar="NAME",
                   help="act inside the named network namespace (keeps this mount namespace, so the pins "
                        "under /sys/fs/bpf stay visible; prefer it to `ip netns exec`)")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", required=True)

    def cmd(name, func, help_):
        sp = sub.add_parser(name, help=help_, description=help_)
        sp.add_argument("--json", action="store_true", help="machine-readable output")
        sp.set_defaults(func=func)
        return sp

    sp = cmd("load", cmd_load, "attach the srmig XDP program to an interface")
    sp.add_argument("iface")
    sp.add_argument("--mode", choices=["native", "generic"], default="native",
                    help="native (driver) XDP, or generic (skb) XDP for any device (default: native)")
    sp.add_argument("--max-vms", type=int, default=65536, help="VM state map size (first load only)")
    sp.add_argument("--max-sids", type=int, default=256, help="SID table size (first load only)")
    sp.add_argument("--hold-ring-pages", type=int, default=4096,
                    help="hold ring size in 4 KiB pages, a power of two (first load only)")

    sp = cmd("unload", cmd_unload, "detach from an interface; the last detach removes the pinned state")
    sp.add_argument("iface")

    def table_command(name, help_, func, key_help, verbs):
        """`srmig NAME VERB [KEY]` for a map of entries: each verb with --json, all but `list` take KEY."""
        tsub = sub.add_parser(name, help=help_).add_subparsers(dest="action", required=True, metavar="ACTION")
        parsers = {}
        for verb, verb_help in verbs:
            a = parsers[verb] = tsub.add_parser(verb, help=verb_help, description=verb_help)
            a.add_argument("--json", action="store_true")
            a.set_defaults(func=func)
            if verb != "list":
                a.add_argument(name, help=key_help)
        return parsers

    sid = table_command("sid", "add, delete or list local SIDs", cmd_sid,
                        "the SID, an IPv6 address in this host's locator",
                        [("add", "instantiate a SID"), ("del", "remove a SID"), ("list", "list SIDs")])
    sid["add"].add_argument("behaviour", help="End, End.DX6-map, End.S or End.SBUF")

    vm = table_command("vm", "set, delete or list VM migration states", cmd_vm,
                       "the VM's IPv6 address (the inner destination)",
                       [("set", "set a VM's state on this host"), ("del", "forget a VM"), ("list", "list VMs")])
    a = vm["set"]
    a.add_argument("state", help="running, hold, away or incoming")
    a.add_argument("--next-sid", help="away: the SID stragglers are sent to (the new host's End.DX6-map)")
    a.add_argument("--hold-ring", action="store_true",
                   help="incoming: hold packets in the hold ring instead of the VM's tap queue")
    a.add_argument("--shadow", action="store_true",
                   help="copy what is delivered to the VM into the shadow ring (migration window)")

    table_command("domain", "add, delete or list the SR domain's source prefixes (RFC 8754 5.1)", cmd_domain,
                  "an IPv6 prefix (ADDRESS/LENGTH; an address alone is a /128)",
                  [("add", "accept packets to our SIDs from this prefix (the first one turns the check on)"),
                   ("del", "remove a prefix (removing the last one turns the check off)"),
                   ("list", "list the prefixes")])

    cmd("stats", cmd_stats, "counters per verdict, per drop reason and per SID")

    sp = cmd("check", cmd_check, "what this machine's kernel offers and what srmig will use (exit 1: "
                                 "something required is missing)")
    sp.description = ("Tries every kernel feature srmig uses or can use, in a throwaway network namespace "
                      "removed afterwards: XDP native and generic, BPF ring buffers and bpf_ringbuf_query, "
                      "tc clsact with a bpf filter, pidfd_getfd, BPF_PROG_RUN live frames, kernel SRv6 "
                      "lwtunnels, BTF, and kernel headers for bcc. One line each; what is missing says what "
                      "degrades and the fix. Exit 0 when everything required is there.")
    sp.add_argument("--interface", metavar="IFACE",
                    help="try XDP on this interface (attached and detached at once, never replacing a program "
                         "already there; some NIC drivers reset their rings on a native attach) instead of a veth")

    from srmig.ctl import cli_agent, cli_ingress

    cli_agent.add_parsers(sub)
    cli_ingress.add_parsers(sub)

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

    sp = sub.add_parser(
        "bench", help="benchmarks (JSON with --json); without BENCH: everything",
        description="Without BENCH: the local generator (BPF_PROG_RUN live frames or trafgen, through one "
                    "DUT core: NDR/PDR and the forwarding rate at maximum load of srmig End.S forward/deliver, "
                    "the kernel's End.DX6 and End where the kernel has SRv6 (else reported absent), an XDP "
                    "redirect stub, and one that also swaps the MAC addresses, srmig's BPF H.Encaps against "
                    "plain forwarding, per frame size, repeated: medians and ranges; live frames fall back to "
                    "trafgen where the kernel refuses them, and the generator's ceiling is reported), a TCP "
                    "bulk transfer with and without the BPF H.Encaps, the hold-ring flush rate, the "
                    "per-packet cost at 10, 10^3 and 10^6 VMs, and the ratios against the targets, as one JSON "
                    "document with --json (progress on stderr). The ratios come from short windows of the "
                    "stubs, End.S and End.DX6 taken in turn (5 rounds per run and size, 3 with --quick), so a "
                    "neighbour's burst slows every path alike.")
    sp.add_argument("--json", action="store_true", help="one JSON document on stdout")
    sp.add_argument("--quick", action="store_true",
                    help="5 trials per path (0.25 s live, 1 s trafgen), 2 repetitions, smaller scale runs")
    sp.add_argument("--only", action="append", default=[], metavar="PART[,PART]",
                    help="run only these parts: local, tcp, scale, flush, agent")
    sp.add_argument("--max-rate", type=float, help="highest offered load, pps (default 4e6 live, 1.5e6 trafgen)")
    sp.add_argument("--duration", type=float,
                    help="seconds per trial (live default 0.5, --quick 0.25; trafgen: whole seconds, 2 / 1)")
    sp.add_argument("--generator", choices=["live", "trafgen"], default="live",
                    help="live: BPF_PROG_RUN live frames (kernel >= 5.18, several Mpps, paced per frame); "
                         "trafgen: sendto, ~700 kpps here, 1-s bursts (default: live)")
    sp.add_argument("--sizes", action="append", default=[], metavar="SIZE[,SIZE]",
                    help="frame sizes: 78 (64-byte inner IPv6 packet + outer IPv6 + SRH), an outer IPv6 "
                         "length such as 512 or 1500, imix (default: 78,512,1500,imix live; 78 trafgen)")
    sp.add_argument("--repeat", type=int, help="runs of every path and size; median and range (default 3, --quick 2)")
    sp.add_argument("--trials", type=int, help="trials per path (default 10, --quick 5)")
    sp.add_argument("--mode", choices=["native", "generic"], default="native", help="XDP mode on the DUT")
    sp.add_argument("--plot", metavar="PNG", default="srmig-bench.png",
                    help="plot: loss vs offered load, NDR/PDR, throughput vs frame size "
                         "(default: srmig-bench.png; '' for none)")
    sp.set_defaults(func=cmd_bench_all, bench=None)
    bsub = sp.add_subparsers(dest="bench", required=False, metavar="BENCH")
    b = bsub.add_parser("micro", help="BPF_PROG_TEST_RUN ns/packet per branch vs an XDP_PASS stub",
                        description="Runs every branch of the program on a packet that takes that branch, "
                                    "in a private network namespace, against an XDP_PASS stub measured "
                                    "in the same run; then again with --vms VMs in the map.")
    b.add_argument("--json", action="store_true")
    b.add_argument("--vms", type=int, default=1_000_000, help="VMs in the map for the scale run")
    b.add_argument("--runs", type=int, default=3000, help="test runs per branch (repeat=1 each)")
    b.set_defaults(func=cmd_bench)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    from srmig.bpf.loader import LoaderError

    try:
        if args.netns:
            from srmig.testbed.netns import inside

            with inside(args.netns):
                return args.func(args)
        return args.func(args)
    except (LoaderError, ValueError, OSError) as e:  # ConfigError is a ValueError: one line, exit 1
        print(f"srmig: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("srmig: interrupted", file=sys.stderr)
        return 130
