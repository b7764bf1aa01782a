"""`srmig agent`, `srmig status`, `srmig install-hook`, `srmig check-config`: the agent's commands."""

from __future__ import annotations

import json
import logging
import sys

from srmig.ctl import config as config_mod

UNIT = """\
[Unit]
Description=srmig agent: zero-loss VM live migration over SRv6
Documentation=https://example.invalid/srmig
After=network-online.target libvirtd.service etcd.service
Wants=network-online.target

[Service]
Type=simple
ExecStart={exe} agent --config {config}
Restart=always
RestartSec=1
# The XDP program and its maps stay when the agent stops: traffic keeps flowing across restarts.
KillMode=mixed
# The VM taps' fds the agent keeps during a migration are also kept by systemd (sd_notify FDSTORE=1) and
# given back when it restarts the agent: a paused QEMU's queue outlives a crashed agent.
NotifyAccess=main
FileDescriptorStoreMax=4096

[Install]
WantedBy=multi-user.target
"""


def kernel_fit(cfg: config_mod.Config) -> None:
    """What the config asks of this kernel, tried on this kernel (config.py only checks the file): one line
    naming the fix when it is missing."""
    if cfg.ingress and cfg.ingress.encap == "kernel":
        from srmig.check import kernel_srv6  # noqa: PLC0415

        ok, reason = kernel_srv6()
        if not ok:
            raise ValueError(f'{cfg.path}: ingress.encap: "kernel" needs SRv6 lwtunnels, which this kernel lacks '
                             f'({reason.removeprefix("absent: ")}): use encap = "bpf" (the default)')


def _sysctl(key: str) -> str | None:
    """A sysctl of this network namespace ("net.ipv4.conf.eth1.forwarding"), None when it has none."""
    try:
        with open("/proc/sys/" + key.replace(".", "/")) as f:
            return f.read().strip()
    except OSError:
        return None


def forwarding_warnings(cfg: config_mod.Config) -> list[str]:
    """The host role delivers to a VM's tap by a FIB lookup from the fabric interface (bpf_fib_lookup), which
    the kernel refuses (BPF_FIB_LKUP_RET_FWD_DISABLED: dropped, counted as no_route) unless forwarding is on
    for that family on that interface: one line per family that is off, naming the fix. IPv4's is often off
    where IPv6's was turned on, and then only a dual-stack VM's IPv4 addresses get nothing. Nothing is said
    of an interface that is not there (yet): attaching to it will fail first."""
    if cfg.host is None:
        return []
    dev, out = cfg.host.fabric, []
    for key, what, fix in (
            (f"net.ipv6.conf.{dev}.forwarding", "nothing reaches the VMs' IPv6 addresses nor another host's SID",
             "net.ipv6.conf.all.forwarding=1"),
            (f"net.ipv4.conf.{dev}.forwarding", "nothing reaches the VMs' IPv4 addresses", "net.ipv4.ip_forward=1")):
        if _sysctl(key) == "0":
            out.append(f"{cfg.path}: host.fabric: {key} is 0: {what} (the kernel refuses the dataplane's FIB "
                       f"lookup: dropped as no_route); sysctl -w {fix}")
    return out


def db_login(cfg: config_mod.Config) -> None:
    """With an etcd user: log in once, to say now (one line) that etcd refuses it. An etcd that does not
    answer is only a warning: the agent waits for it."""
    if cfg.db.backend != "etcd" or not cfg.db.user:
        return
    from srmig.ctl import statedb  # noqa: PLC0415
    from srmig.ctl.dblink import open_etcd  # noqa: PLC0415

    try:
        open_etcd(cfg.db).close()
    except statedb.AuthFailed as e:
        raise ValueError(f"{cfg.path}: db.user: {e}") from None
    except (statedb.DbUnavailable, RuntimeError) as e:
        print(f"srmig: warning: {cfg.path}: db: cannot check the login of etcd user {cfg.db.user!r}: {e}",
              file=sys.stderr)


def cmd_agent(args) -> int:
    cfg = config_mod.load(args.config)  # every error before anything is installed
    kernel_fit(cfg)
    # valid but unsafe (plain-HTTP etcd, an open SR domain), or this machine not ready: said at every start
    for warning in (*cfg.warnings, *forwarding_warnings(cfg)):
        print(f"srmig: warning: {warning}", file=sys.stderr)
    if args.check:
        db_login(cfg)
        print(f"{args.config}: ok ({', '.join(r for r in ('host', 'ingress') if getattr(cfg, r))})")
        return 0
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s",
                        stream=sys.stderr)
    if args.verbose:
        logging.getLogger("srmig").setLevel(logging.DEBUG)
    from srmig.ctl import agent  # noqa: PLC0415

    return agent.run(cfg)


def _socket(args) -> str:
    if args.config:
        return config_mod.load(args.config).hook.socket
    return args.socket


def cmd_status(args) -> int:
    from srmig.ctl.hooksrv import request  # noqa: PLC0415

    path = _socket(args)
    try:
        st = request(path, {"op": "status"}, timeout=args.timeout)
    except OSError as e:
        raise ValueError(f"no agent answers on {path} ({e.strerror or e}): is `srmig agent` running?") from None
    if not st.pop("ok", False):
        raise ValueError(f"agent error: {st.get('error')}")
    if args.json:
        json.dump(st, sys.stdout, indent=2, default=str)
        print()
        return 0
    print(f"agent {st['agent']} (pid {st['pid']}), roles: {', '.join(st['roles'])}")
    db = st["db"]
    print(f"  state db: {db.get('state')}" + (f" ({db['error']}; retry in {db.get('retry_in_s')} s)"
                                              if db.get("error") else "")
          + (f"; {db['pending_writes']} writes waiting ({db.get('write_error')})"
             if db.get("pending_writes") or db.get("write_error") else ""))
    if db.get("denied"):
        print(f"  state db: {db['denied']} requests refused by etcd as outside this agent's roles "
              f"(last: {db.get('last_denied')})")
    if st.get("libvirt"):
        lv = st["libvirt"]
        print(f"  libvirt:  {lv['state']} {lv['uri']}" + (f" ({lv['error']}; retry in {lv['retry_in_s']} s)"
                                                          if lv.get("error") else ""))
    if st.get("ingress"):
        ing = st["ingress"]
        c = ing.get("counters") or {}
        drops = sum(n for k, n in c.items() if k.startswith("drop"))
        print(f"  ingress:  {ing['routes']} VM routes ({ing.get('addresses', ing['routes'])} addresses), "
              f"{ing['errors']} errors"
              + (f" (last: {ing['last_error']})" if ing.get("last_error") else "")
              + (f"; H.Encaps ({ing.get('encap')}): {c.get('done', 0)} encapsulated, {drops} dropped" if c else ""))
        for family, n in (ing.get("families") or {}).items():  # summed over the VMs' addresses of that family
            if n["packets"] or n["dropped"]:
                print(f"    IPv{family}: {n['packets']} packets encapsulated, {n['dropped']} dropped")
    if st.get("event_to_map_ms"):
        e = st["event_to_map_ms"]
        print(f"  event -> map: p50 {e['p50']:.3f} ms, p99 {e['p99']:.3f} ms over {e['n']}")
    if st.get("vms") is not None:
        print(f"  {'VM':<28} {'domain':<16} {'map':<9} {'phase':<14} {'tap drops':<10} migration")
        for v in st["vms"]:
            m = v.get("migration")
            mig = f"{m['src']} -> {m['dst']} ({m['id']})" if m and not m["done"] else "-"
            drops = "-" if v.get("tap_dropped") is None else str(v["tap_dropped"])
            print(f"  {v['vm']:<28} {v['domain'] or '-':<16} {v['state'] or '-':<9} {v['phase']:<14} {drops:<10} "
                  f"{mig}")
            detached = v.get("detached") or ()
            for a in v.get("addresses", [v["vm"]])[1:]:  # the VM's other addresses, under its id
                print(f"    + {a}" + ("  (a prefix it routes)" if "/" in a else "")
                      + ("  (map: not following the id)" if a in detached else ""))
    for name, why in (st.get("rejected_domains") or {}).items():
        print(f"  not managed: domain {name}: {why}")
    if st.get("locations"):
        print("  locations (state db):")
        for r in st["locations"]:
            others = r.get("addresses", [r["vm"]])[1:]
            print(f"    {r['vm']:<28} on {r['host']:<10} v{r['version']:<4} {' '.join(r['segments'])}"
                  + (f"  (also {', '.join(others)})" if others else ""))
    dp = st.get("dataplane")
    if dp:
        from srmig.ctl.status import dataplane_lines  # noqa: PLC0415

        print("\n".join("  " + line for line in dataplane_lines(dp)))
    return 0


def cmd_install_hook(args) -> int:
    from srmig.ctl import hook  # noqa: PLC0415

    cfg = config_mod.load(args.config)
    path = hook.install(args.hooks_dir, cfg.hook.socket, cfg.hook.ack_timeout_s, cfg.hook.on_timeout,
                        force=args.force)
    print(f"installed {path}; restart libvirtd so it reads its hooks")
    if args.unit:
        import shutil  # noqa: PLC0415
        from pathlib import Path  # noqa: PLC0415

        exe = shutil.which("srmig") or f"{sys.executable} -m srmig"
        unit = Path(args.unit)
        unit.write_text(UNIT.format(exe=exe, config=args.config))
        print(f"installed {unit}; systemctl daemon-reload && systemctl enable --now {unit.name}")
    return 0


def cmd_db_roles(args) -> int:
    """The etcdctl commands that make the root user, one user per agent and their roles, and turn etcd's
    authentication on (srmig.ctl.statedb.etcd_auth)."""
    from srmig.ctl.statedb.etcd_auth import etcdctl_commands  # noqa: PLC0415

    agents: dict[str, tuple[str, ...]] = {}
    for part, names in (("host", args.host), ("ingress", args.ingress)):
        for name in names:
            agents[name] = (*agents.get(name, ()), part)
    if not agents:
        raise ValueError("db-roles: name the agents (--host NAME, --ingress NAME)")
    print("\n".join(etcdctl_commands(args.prefix, agents)))
    return 0


def add_parsers(sub) -> None:
    sp = sub.add_parser(
        "agent", help="run the agent (hypervisor and/or ingress role) from a TOML config",
        description="Runs until SIGTERM. Host role: attaches the XDP program to the fabric interface, follows "
                    "libvirt's migration events (and the `migrate begin` hook) and drives the VM-state map "
                    "through the migration's phases. Ingress role: programs H.Encaps routes from the VM "
                    "state database and acknowledges them. A bad config is reported (file, key, expected "
                    "form) before anything is installed. Config format: python -m pydoc srmig.ctl.config")
    sp.add_argument("--config", required=True, metavar="FILE", help="TOML configuration (see above)")
    sp.add_argument("--check", action="store_true", help="only validate the configuration and exit")
    sp.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sp.set_defaults(func=cmd_agent)

    sp = sub.add_parser(
        "db-roles", help="print the etcdctl commands that give each agent an etcd user with its own keys",
        description="etcd's users and roles for srmig: root (the operator), and per agent a user of its name "
                    "whose roles let it write only its own keys (docs/operations.md, 'Least privilege in "
                    "etcd'). etcdctl asks for each password; put each agent's in its db.password_file.")
    sp.add_argument("--host", action="append", default=[], metavar="NAME", help="a host agent ([host] name)")
    sp.add_argument("--ingress", action="append", default=[], metavar="NAME",
                    help="an ingress agent ([ingress] name)")
    sp.add_argument("--prefix", default="/srmig/", help="the database's prefix (db.prefix)")
    sp.set_defaults(func=cmd_db_roles)

    sp = sub.add_parser("status", help="what the local agent knows: VMs, phases, connections, counters",
                        description="Asks the running agent over its unix socket.")
    g = sp.add_mutually_exclusive_group()
    g.add_argument("--config", metavar="FILE", help="the agent's config (to find its socket)")
    g.add_argument("--socket", default=config_mod.HookConfig.socket, help="the agent's socket")
    sp.add_argument("--timeout", type=float, default=5.0)
    sp.add_argument("--json", action="store_true")
    sp.set_defaults(func=cmd_status)

    sp = sub.add_parser("install-hook", help="install the libvirt qemu hook (and optionally a systemd unit)",
                        description="Writes HOOKS_DIR/qemu.d/srmig, which makes libvirt ask the local agent to "
                                    "provision a migration (and wait for the ingresses) at `migrate begin`. "
                                    "libvirtd reads hooks when it starts: restart it afterwards.")
    sp.add_argument("--config", required=True, metavar="FILE", help="the agent's config (socket, timeouts)")
    sp.add_argument("--hooks-dir", default="/etc/libvirt/hooks")
    sp.add_argument("--force", action="store_true", help="replace a different existing srmig hook")
    sp.add_argument("--unit", metavar="PATH", nargs="?", const="/etc/systemd/system/srmig-agent.service",
                    help="also write the systemd unit (default path /etc/systemd/system/srmig-agent.service)")
    sp.set_defaults(func=cmd_install_hook)
