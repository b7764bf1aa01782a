"""`srmig ingress ...`: srmig's H.Encaps by hand (the ingress role of the agent does the same from the VM
state database)."""

from __future__ import annotations

import argparse
import json
import sys

EPILOG = """\
examples (as root):
  srmig ingress load eth0                       H.Encaps on eth0's egress (compiled and pinned the first time)
  srmig ingress set 2001:db8:100::10 fc00:0:1::5 fc00:0:3::e fc00:0:2::b --via 2001:db8:c::2 --dev eth0
                                                steer a VM along a segment list (travel order), with its route
  srmig ingress set 2001:db8:100::10 fc00:0:2::d6   switch the list: one map write, atomic for the packets
  srmig ingress set 192.0.2.10 fc00:0:2::d6 --via 2001:db8:c::2 --dev eth0
                                                an IPv4 VM: SRH next header 4, a /32 via the IPv6 next hop
  srmig ingress set 10.1.0.0/24 fc00:0:2::d6 --via 2001:db8:c::2 --dev eth0
                                                a subnet a VM routes: every address in it takes this list
  srmig ingress list                            VMs, their lists and counters
  srmig ingress stats --json                    counters per outcome and drop reason, and per VM
  srmig ingress del 2001:db8:100::10 --dev eth0 stop steering (and remove the route)
  srmig ingress unload eth0

The fabric MTU must leave room for the encapsulation: 40 bytes of outer IPv6 + 8 + 16 per segment. The route
`set --via` installs carries mtu = link MTU - {overhead} (room for the longest list srmig carries, {max}
segments), so the MTU never changes in the middle of a migration and the kernel answers senders with ICMPv6
Packet Too Big (IPv4: ICMP Fragmentation Needed, or fragments without DF); a packet that would still not fit is
dropped and counted (drop_too_big).
"""


def _emit(args, obj) -> None:
    from srmig.cli import _emit as emit  # noqa: PLC0415

    if isinstance(obj, list) and not args.json:
        from srmig.cli import _print_table  # noqa: PLC0415

        rows = [{**e, "segments": ",".join(e["segments"]), **e["stats"]} for e in obj]
        _print_table(rows, ["vm", "segments", "source", "reduced", "packets", "bytes", "dropped"])
        return
    emit(args, obj)


def cmd_ingress(args) -> int:
    from srmig import netlink  # noqa: PLC0415
    from srmig.ctl import ingress  # noqa: PLC0415
    from srmig.bpf import loader  # noqa: PLC0415

    if args.action == "load":
        loaded = loader.load_encap(args.iface)
        _emit(args, {"interface": args.iface, "prog_id": loaded.prog_id, "pin_dir": str(loaded.pin_dir),
                     "compiled": loaded.compiled})
        return 0
    if args.action == "unload":
        _emit(args, loader.unload_encap(args.iface))
        return 0
    with ingress.BpfEncap() as encap:
        if args.action == "set":
            if bool(args.via) != bool(args.dev):
                raise ValueError("--via and --dev go together: the route to the VM needs both")
            encap.set(args.vm, args.segments, source=args.src, reduced=args.reduced)
            if args.via:
                with netlink.handle() as ipr:
                    ingress.route_vm(args.vm, args.via, netlink.ifindex(args.dev, ipr), ipr)
            entry = next(e for e in encap.entries() if e.vm == ingress.vm_address(args.vm))
            _emit(args, entry.to_dict())
        elif args.action == "del":
            route = False
            if args.dev:
                route = ingress.clear_route(args.vm)
            _emit(args, {"vm": args.vm, "deleted": encap.clear(args.vm), "route_deleted": route})
        elif args.action == "list":
            _emit(args, [e.to_dict() for e in encap.entries()])
        else:
            stats = encap.stats()
            if args.json:
                json.dump(stats, sys.stdout, indent=2)
                print()
            else:
                c = stats["counters"]
                print("encapsulated: " + str(c.pop("done")) + "   passed: " + str(c.pop("pass")))
                print("drops:        " + ("  ".join(f"{k}={v}" for k, v in c.items() if v) or "none"))
                for vm, s in stats["vms"].items():
                    print(f"{vm}: packets={s['packets']} bytes={s['bytes']} dropped={s['dropped']}")
    return 0


def add_parsers(sub) -> None:
    from srmig.ctl.ingress import MAX_OVERHEAD, MAX_SEGMENTS  # noqa: PLC0415

    help_ = "srmig's H.Encaps (tc egress BPF): steer VMs along segment lists by hand"
    p = sub.add_parser("ingress", help=help_, description=help_ + ". Needs no SRv6 in the kernel.",
                       epilog=EPILOG.format(overhead=MAX_OVERHEAD, max=MAX_SEGMENTS),
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    verbs = p.add_subparsers(dest="action", required=True, metavar="ACTION")

    def verb(name, help_):
        a = verbs.add_parser(name, help=help_, description=help_)
        a.add_argument("--json", action="store_true", help="machine-readable output")
        a.set_defaults(func=cmd_ingress)
        return a

    verb("load", "run H.Encaps on an interface's egress (idempotent)").add_argument("iface")
    verb("unload", "remove it; the last interface removes the pinned maps").add_argument("iface")
    a = verb("set", "steer a VM along a segment list (replaces its list atomically)")
    a.add_argument("vm", help="the VM's IPv6 or IPv4 address (the inner destination), or a prefix it routes "
                              "(ADDRESS/LENGTH); one command per address of a dual-stack VM")
    a.add_argument("segments", nargs="+", metavar="SID",
                   help=f"the segment list in travel order (first SID first), at most {MAX_SEGMENTS}")
    a.add_argument("--src", help="outer source address (default: the kernel's source towards the first SID)")
    a.add_argument("--reduced", action="store_true",
                   help="H.Encaps.Red: the first SID only in the outer destination, not in the SRH")
    a.add_argument("--via", metavar="GATEWAY", help="also route the VM's address via this next hop ...")
    a.add_argument("--dev", metavar="IFACE", help="... out of this interface (the one running H.Encaps)")
    a = verb("del", "stop steering a VM")
    a.add_argument("vm")
    a.add_argument("--dev", metavar="IFACE", help="also remove the VM's route (the one `set --via` installed)")
    verb("list", "VMs, their segment lists and counters")
    verb("stats", "counters per outcome and drop reason, and per VM")
