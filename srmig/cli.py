"""srmig command line: parses arguments, calls the domain layer, prints a table or --json. Nothing else."""

from __future__ import annotations

import argparse
import functools
import json
import sys
from importlib.metadata import entry_points

EPILOG = """\
examples (as root):
  srmig load eth1                          attach the XDP program (compiled and pinned the first time)
  srmig sid add fc00:0:1::5 End.S          instantiate the migration-source SID
  srmig sid add fc00:0:1::d6 End.DX6-map   and the steady-state one
  srmig vm set 2001:db8:100::10 running    a VM that runs on this host
  srmig vm set 2001:db8:100::10 away --next-sid fc00:0:2::d6
  srmig vm set 2001:db8:100::10,10.0.0.10 running   a dual-stack VM: one entry, which 10.0.0.10 takes too
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
    from srmig.ctl.maps import Dataplane

    with Dataplane(loaded.pin_dir) as dp:
        if not dp.list_domains():
            print("srmig: warning: no SR domain prefix: every source reaches this host's SIDs (RFC 8754 5.1); "
                  "`srmig domain add PREFIX` for each SR domain prefix (`srmig domain add ::/0` to mean it)",
                  file=sys.stderr)
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
    from srmig.ctl import records
    from srmig.ctl.maps import VmAddressSet, is_prefix, vm_spelling

    columns = ["vm", "state", "next_sid", "hold_ring", "shadow", "of"]
    # A VM is a set of addresses: ADDR[,ADDR...] sets the entry of the first, an address: the VM's id, and
    # points the others (addresses and prefixes: ADDRESS/LENGTH) at it, whose entry they take, so the one
    # write moves them all (VmAddressSet); del deletes the entry or pointer of each, in that order, then what
    # still points at a listed id.
    addresses = [a.strip() for a in args.vm.split(",")] if args.action != "list" else []
    with _dataplane() as dp:
        if args.action == "set":
            if is_prefix(addresses[0]):
                raise ValueError(f"{addresses[0]} is a prefix: list the VM's address first, then its prefixes")
            # The agent's rules for a VM's addresses (records): each usable by a VM, none twice, none inside
            # another of the list; and none another VM's in the map, nor overlapping one's prefix (taken()).
            addresses = list(records.vm_addresses(addresses, "VM"))
            why = records.taken(addresses[0], tuple(addresses), dp.vm_owners())
            if why is not None:
                raise ValueError(why)
            first = VmAddressSet(dp, lambda _: tuple(addresses)).set_vm(
                addresses[0], args.state, next_sid=args.next_sid, hold_ring=args.hold_ring, shadow=args.shadow)
            entries = [first.to_dict(), *(dp.get_vm(a).to_dict() for a in addresses[1:])]
            if len(entries) == 1:  # one address: one entry, as before
                _emit(args, entries[0])
            else:
                _emit(args, entries, entries, columns)
        elif args.action == "del":
            gone = [{"vm": a, "deleted": dp.del_vm(a)} for a in addresses]
            # A VM forgotten by its id takes its other addresses and prefixes with it, listed or not: a pointer
            # left at an id with no entry finds no VM, but would linger in the map.
            ids = {vm_spelling(a) for a in addresses if not is_prefix(a)}
            listed = {vm_spelling(a) for a in addresses}
            gone += [{"vm": p, "deleted": dp.del_vm(p), "of": vm} for p, vm in dp.list_vm_prefixes()
                     if vm in ids and p not in listed]
            if len(gone) == 1:
                _emit(args, gone[0])
            else:
                _emit(args, gone, gone, ["vm", "deleted", "of"])
        else:
            entries = [e.to_dict() for e in dp.list_vms()]
            _emit(args, entries, entries, columns)
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
    from srmig.ctl.status import dataplane_lines

    print("\n".join(dataplane_lines(stats)))
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


# Commands that are not the product's (`srmig demo`: the lab; `srmig bench`: the benchmarks) come from providers
# declared as entry points in this group (pyproject.toml), so that the product never imports them: each entry
# point is named after the command it adds and names a function register(sub) that adds its parser(s) to the
# srmig subparsers and sets func.
COMMANDS_GROUP = "srmig.commands"


def add_provided_commands(sub) -> None:
    """Register every provider of COMMANDS_GROUP, in name order (a stable --help).

    A provider that fails to import (the lab left out of an install, a dependency missing) does not break the
    other commands: its command stays listed, as unavailable with the reason, and using it prints that reason
    on one line and exits 1. Listed rather than left out, because someone who read `srmig demo` in the README
    and types it should learn what is missing, not get argparse's "invalid choice", which suggests a typo."""
    for ep in sorted(entry_points(group=COMMANDS_GROUP), key=lambda e: e.name):
        try:
            register = ep.load()
        except Exception as e:  # noqa: BLE001 - any import-time failure: one line, on use
            reason = " ".join(f"{type(e).__name__}: {e}".split())
            sp = sub.add_parser(ep.name, help=f"unavailable ({reason})", add_help=False,
                                # NUL never occurs in argv: every argument, --help included, lands in `args`,
                                # so whatever follows the command, the user reads why it is unavailable.
                                prefix_chars="\0")
            sp.add_argument("args", nargs="*")
            sp.set_defaults(func=functools.partial(_unavailable, ep, reason))
            continue
        register(sub)


def _unavailable(ep, reason: str, args) -> int:
    print(f"srmig: error: `srmig {ep.name}` is unavailable: {ep.value} failed to load ({reason})", file=sys.stderr)
    return 1


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
                       "the VM's address, IPv6 or IPv4 (the inner destination), or its addresses "
                       "separated by commas: the first (an address, the VM's id) gets the entry, which the "
                       "others and any prefixes it routes (ADDRESS/LENGTH) take; none may be another VM's "
                       "nor overlap one's prefix",
                       [("set", "set a VM's state on this host"),
                        ("del", "forget a VM (by its first address: its other addresses and prefixes too)"),
                        ("list", "list VMs")])
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

    add_provided_commands(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    from srmig.bpf.loader import LoaderError

    try:
        if args.netns:
            from srmig.netlink import inside

            with inside(args.netns):
                return args.func(args)
        return args.func(args)
    except (LoaderError, ValueError, OSError) as e:  # ConfigError is a ValueError: one line, exit 1
        print(f"srmig: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("srmig: interrupted", file=sys.stderr)
        return 130
