"""`srmig bench`: registered through the `srmig.commands` entry point (pyproject.toml), so that the product's
CLI (srmig/cli.py) never imports bench/. Parses and prints; the benchmarks are bench/micro.py and bench/report.py."""

from __future__ import annotations

from srmig.cli import _emit


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



def register(sub) -> None:
    """Add `srmig bench [micro]` to the srmig command's subparsers."""
    sp = sub.add_parser(
        "bench", help="benchmarks (JSON with --json); without BENCH: everything",
        description="Without BENCH: the local generator (BPF_PROG_RUN live frames, XDP clones or trafgen, through one "
                    "DUT core: NDR/PDR and the forwarding rate at maximum load of srmig End.S forward/deliver, "
                    "the kernel's End.DX6 and End where the kernel has SRv6 (else reported absent), an XDP "
                    "redirect stub, and one that also swaps the MAC addresses, srmig's BPF H.Encaps against "
                    "plain forwarding, per frame size, repeated: medians and ranges; live frames fall back to "
                    "the clone generator where the kernel refuses them, and the generator's ceiling is reported "
                    "next to every ratio), a TCP "
                    "bulk transfer with and without the BPF H.Encaps, the hold-ring flush rate, the "
                    "source drain under a load above its old ceiling (drain), the "
                    "per-packet cost at 10, 10^3 and 10^6 VMs, and the ratios against the targets, as one JSON "
                    "document with --json (progress on stderr). The ratios come from short windows of the "
                    "stubs, End.S and End.DX6 taken in turn (5 rounds per run and size, 3 with --quick), so a "
                    "neighbour's burst slows every path alike.")
    sp.add_argument("--json", action="store_true", help="one JSON document on stdout")
    sp.add_argument("--quick", action="store_true",
                    help="5 trials per path (0.25 s live, 1 s trafgen), 2 repetitions, smaller scale runs")
    sp.add_argument("--only", action="append", default=[], metavar="PART[,PART]",
                    help="run only these parts: local, tcp, scale, flush, agent, drain")
    sp.add_argument("--max-rate", type=float, help="highest offered load, pps (default 4e6 live, 1.5e6 trafgen)")
    sp.add_argument("--duration", type=float,
                    help="seconds per trial (live default 0.5, --quick 0.25; trafgen: whole seconds, 2 / 1)")
    sp.add_argument("--generator", choices=["live", "clone", "trafgen"], default="live",
                    help="live: BPF_PROG_RUN live frames (kernel >= 5.18, several Mpps, paced in groups; where "
                         "the kernel refuses them, clone runs instead); clone: seed frames looping between two "
                         "veths, cloned by an XDP devmap broadcast (several Mpps on any kernel with native XDP "
                         "on veth); trafgen: sendto, ~700 kpps here, 1-s bursts (default: live)")
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
