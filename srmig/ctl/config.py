"""The agent's configuration: one TOML file, validated in full before anything is installed.

    # /etc/srmig/agent.toml
    [host]                                  # the hypervisor role (omit on an ingress-only machine)
    name = "hv1"                            # unique among hosts (default: the hostname)
    fabric = "eth1"                         # where the XDP program is attached
    xdp_mode = "native"                     # native | generic
    locator = "fc00:0:1::/48"
    address = "2001:db8:a::2"               # source address of the packets the agent sends (drain, abort)
    sids = { dx6 = "fc00:0:1::d6", end_s = "fc00:0:1::5", sbuf = "fc00:0:1::b" }  # default: locator + these
    transit = []                            # SIDs between hosts on the migration path
    sr_domain = ["fc00::/16"]               # required: the only sources that reach our SIDs (RFC 8754 5.1);
                                            # ["::/0"] opens them to every source, and says so
    libvirt_uri = "qemu:///system"
    qemu_run_dir = "/run/libvirt/qemu"      # where libvirt writes <domain>.pid
    grace_s = 2.0                           # the source forwards stragglers this long after cut-over
    tap_queue = 10000                       # tap queue length during the migration window
    hold_ring_pages = 4096                  # hold ring, 4 KiB pages (power of two), first load only
    drain = true                            # drain the paused source's tap queue
    fence = "pause"                         # our copy of a VM whose migration here was aborted, still
                                            # running (a split brain): pause | destroy

    [ingress]                               # the ingress role: H.Encaps towards every VM
    name = "edge1"
    interface = "eth0"                      # where packets towards the VMs leave
    gateway = "2001:db8:c::2"
    encap = "bpf"                           # bpf: H.Encaps by a tc program on interface's egress (any kernel
                                            # with clsact + cls_bpf); kernel: `encap seg6` routes, which need
                                            # a kernel with SRv6 lwtunnels (`srmig check` says)
    source = "2001:db8:c::1"                # outer IPv6 source of H.Encaps (default: interface's first global
                                            # IPv6 address)

    [db]
    backend = "embedded"                    # embedded | etcd
    path = "/var/lib/srmig/state.db"        # embedded (made mode 0600, its directory 0700)
    endpoints = ["https://127.0.0.1:2379"]  # etcd: https:// only (mutual TLS), unless insecure = true
    ca_file = "/etc/srmig/pki/ca.pem"       # etcd: the CA that signed the members' certificates (verified)
    cert_file = "/etc/srmig/pki/hv1.pem"    # etcd: this agent's client certificate (--client-cert-auth)
    key_file = "/etc/srmig/pki/hv1-key.pem" # etcd: its key, mode 0600
    user = "hv1"                            # etcd: this agent's etcd user (its roles: what it may write)
    password_file = "/etc/srmig/etcd-password"  # etcd: that user's password, alone in a file owned by root,
                                            # mode 0600 or 0400 (never in this file)
    insecure = false                        # true: allow http:// endpoints, no TLS; --check warns
    prefix = "/srmig/"

    [hook]
    socket = "/run/srmig/agent.sock"        # `srmig status` and the libvirt hook talk to the agent here
                                            # (mode 0600: root only; its directory made 0700)
    ack_timeout_s = 2.0                     # `migrate begin` waits at most this long for the ingresses
    on_timeout = "proceed"                  # proceed | refuse (refuse fails the migration)

    [metrics]
    listen = "127.0.0.1:9477"               # Prometheus; "" turns it off

A VM is managed when its domain XML lists its addresses: the first, an address, is its id; then any others, of
either family, and any prefixes it routes (ADDRESS/LENGTH):
    <metadata><srmig:vm xmlns:srmig="urn:srmig:vm:1">
      <srmig:address>2001:db8:100::10</srmig:address><srmig:address>198.51.100.10</srmig:address>
    </srmig:vm></metadata>
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import socket
import stat
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

from srmig.ctl.phases import HostSids


class ConfigError(ValueError):
    """One line: the file, the key and the expected form."""

    def __init__(self, path: str | Path, key: str, expected: str, got=None):
        self.path, self.key, self.expected = str(path), key, expected
        shown = "" if got is None else f", got {got!r}"
        super().__init__(f"{path}: {key}: expected {expected}{shown}")


@dataclass(frozen=True)
class HostConfig:
    name: str
    fabric: str
    sids: HostSids
    address: str
    locator: str | None = None
    xdp_mode: str = "native"
    transit: tuple[str, ...] = ()
    sr_domain: tuple[str, ...] = ()
    libvirt_uri: str = "qemu:///system"
    qemu_run_dir: str = "/run/libvirt/qemu"
    grace_s: float = 2.0
    tap_queue: int = 10000
    hold_ring_pages: int = 4096
    drain: bool = True
    fence: str = "pause"


@dataclass(frozen=True)
class IngressConfig:
    name: str
    interface: str
    gateway: str
    encap: str = "bpf"          # "bpf" (tc egress program) | "kernel" (seg6 routes: needs SRv6 lwtunnels)
    source: str | None = None   # outer IPv6 source of H.Encaps; None: interface's first global IPv6 address


@dataclass(frozen=True)
class DbConfig:
    backend: str = "embedded"
    path: str = "/var/lib/srmig/state.db"
    endpoints: tuple[str, ...] = ("https://127.0.0.1:2379",)
    prefix: str = "/srmig/"
    ca_file: str | None = None      # etcd over https://: the CA the members' certificates are verified with
    cert_file: str | None = None    # this agent's client certificate and key (etcd's --client-cert-auth)
    key_file: str | None = None
    insecure: bool = False          # http:// endpoints allowed: no TLS, no client authentication
    user: str | None = None         # etcd's user this agent logs in as (etcd's authentication and roles)
    password_file: str | None = None    # its password: a root-only file (read_password)


@dataclass(frozen=True)
class HookConfig:
    socket: str = "/run/srmig/agent.sock"
    ack_timeout_s: float = 2.0
    on_timeout: str = "proceed"


@dataclass(frozen=True)
class Config:
    path: str
    host: HostConfig | None = None
    ingress: IngressConfig | None = None
    db: DbConfig = field(default_factory=DbConfig)
    hook: HookConfig = field(default_factory=HookConfig)
    metrics_listen: str = "127.0.0.1:9477"
    warnings: tuple[str, ...] = ()  # one line each: valid, but unsafe (`srmig agent` prints them)

    @property
    def name(self) -> str:
        return self.host.name if self.host else self.ingress.name


class _Section:
    """Typed reads of one TOML table; every error names the file and the dotted key."""

    def __init__(self, path: str, name: str, table):
        if not isinstance(table, dict):
            raise ConfigError(path, name, "a table ([" + name + "])", table)
        self.path, self.name, self.table = path, name, dict(table)
        self.read: set[str] = set()

    def key(self, k: str) -> str:
        return f"{self.name}.{k}"

    def _get(self, k, default, required):
        self.read.add(k)
        if k not in self.table:
            if required:
                raise ConfigError(self.path, self.key(k), "a value (required)")
            return default
        return self.table.pop(k)

    def str(self, k, default=None, required=False, choices=None) -> str | None:
        v = self._get(k, default, required)
        if v is None:
            return None
        if not isinstance(v, str) or (not v and required):
            raise ConfigError(self.path, self.key(k), "a non-empty string", v)
        if choices and v not in choices:
            raise ConfigError(self.path, self.key(k), "one of " + ", ".join(choices), v)
        return v

    def ipv6(self, k, default=None, required=False) -> str | None:
        v = self.str(k, default, required)
        if v is None:
            return None
        try:
            return str(ipaddress.IPv6Address(v))
        except ValueError:
            raise ConfigError(self.path, self.key(k), "an IPv6 address", v) from None

    def number(self, k, default, lo=0.0, integer=False):
        v = self._get(k, default, False)
        ok = isinstance(v, int) if integer else isinstance(v, (int, float))
        if isinstance(v, bool) or not ok or v < lo:
            kind = "an integer" if integer else "a number"
            raise ConfigError(self.path, self.key(k), f"{kind} >= {lo:g}", v)
        return v

    def list_of(self, k, parse, expected: str) -> list:
        """A list whose every item `parse` accepts; errors name the item (key[i])."""
        v = self._get(k, [], False)
        if not isinstance(v, list):
            raise ConfigError(self.path, self.key(k), f"a list, each item {expected}", v)
        for i, x in enumerate(v):
            try:
                parse(x if isinstance(x, str) else None)
            except (ValueError, TypeError):
                raise ConfigError(self.path, f"{self.key(k)}[{i}]", expected, x) from None
        return v

    def bool(self, k, default):
        v = self._get(k, default, False)
        if not isinstance(v, bool):
            raise ConfigError(self.path, self.key(k), "true or false", v)
        return v

    def done(self) -> None:
        if self.table:
            k = sorted(self.table)[0]
            raise ConfigError(self.path, self.key(k), "one of the known keys: " + ", ".join(sorted(self.read)))


def _host(path: str, t) -> HostConfig:
    s = _Section(path, "host", t)
    name = s.str("name", socket.gethostname())
    fabric = s.str("fabric", required=True)
    locator = s.str("locator")
    net = None
    if locator is not None:
        try:
            net = ipaddress.IPv6Network(locator)
        except ValueError:
            raise ConfigError(path, "host.locator", "an IPv6 prefix such as fc00:0:1::/48", locator) from None
    sids_t = s._get("sids", {}, False)
    sids = _Section(path, "host.sids", sids_t)
    values = {}
    for k, func in (("dx6", 0xD6), ("end_s", 0x5), ("sbuf", 0xB)):
        v = sids.ipv6(k)
        if v is None:
            if net is None:
                raise ConfigError(path, f"host.sids.{k}", "an IPv6 address (or set host.locator)")
            v = str(net.network_address + func)
        elif net is not None and ipaddress.IPv6Address(v) not in net:
            raise ConfigError(path, f"host.sids.{k}", f"an address inside host.locator {locator}", v)
        values[k] = v
    sids.done()
    if len(set(values.values())) != 3:
        raise ConfigError(path, "host.sids", "three different SIDs", values)
    transit = s.list_of("transit", ipaddress.IPv6Address, "an IPv6 address")
    # RFC 8754 5.1: closed by default. Whoever reaches an End.S or End.SBUF SID from outside steers a VM's
    # traffic, so the domain is never implied; opening it to everyone is an explicit ["::/0"].
    if not s.table.get("sr_domain", None):
        raise ConfigError(path, "host.sr_domain", 'the SR domain\'s source prefixes, e.g. ["2001:db8::/32"] (RFC '
                          '8754 5.1: only they reach our SIDs); sr_domain = ["::/0"] accepts every source',
                          s.table.get("sr_domain"))
    domain = s.list_of("sr_domain", ipaddress.IPv6Network, "an IPv6 prefix such as fc00::/16 (no host bits)")
    pages = s.number("hold_ring_pages", 4096, lo=1, integer=True)
    if pages & (pages - 1):
        raise ConfigError(path, "host.hold_ring_pages", "a power of two", pages)
    cfg = HostConfig(
        name=name, fabric=fabric, locator=locator,
        sids=HostSids(name, values["dx6"], values["end_s"], values["sbuf"]),
        address=s.ipv6("address", required=True),
        xdp_mode=s.str("xdp_mode", "native", choices=("native", "generic")),
        transit=tuple(transit),
        sr_domain=tuple(domain),
        libvirt_uri=s.str("libvirt_uri", "qemu:///system"),
        qemu_run_dir=s.str("qemu_run_dir", "/run/libvirt/qemu"),
        grace_s=float(s.number("grace_s", 2.0)),
        tap_queue=s.number("tap_queue", 10000, lo=1, integer=True),
        hold_ring_pages=pages,
        drain=s.bool("drain", True),
        fence=s.str("fence", "pause", choices=("pause", "destroy")))
    s.done()
    return cfg


def _ingress(path: str, t) -> IngressConfig:
    s = _Section(path, "ingress", t)
    cfg = IngressConfig(name=s.str("name", socket.gethostname()), interface=s.str("interface", required=True),
                        gateway=s.ipv6("gateway", required=True),
                        encap=s.str("encap", "bpf", choices=("bpf", "kernel")),
                        source=s.ipv6("source"))
    s.done()
    return cfg


def _pem_file(path: str, key: str, v: str | None, what: str) -> str:
    if v is None:
        raise ConfigError(path, key, f"a PEM file, {what} (https:// endpoints need db.ca_file, db.cert_file and "
                                     "db.key_file)")
    try:
        with open(v, "rb"):
            pass
    except (OSError, ValueError) as e:  # ValueError: a NUL in the path
        raise ConfigError(path, key, f"a readable PEM file, {what} ({getattr(e, 'strerror', None) or e})",
                          v) from None
    return v


def read_password(file: str) -> str:
    """The password in `file`: its first line. The file must be root's and no one else's to read (0600 or
    0400): ValueError (one line, the fix) when it is not, missing or empty."""
    try:
        fd = os.open(file, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
    except (OSError, ValueError) as e:  # ValueError: a NUL in the path
        raise ValueError(f"cannot read {file} ({getattr(e, 'strerror', None) or e})") from None
    with os.fdopen(fd, "rb") as f:
        st = os.fstat(f.fileno())
        if not stat.S_ISREG(st.st_mode):
            raise ValueError(f"{file} is not a regular file")
        if st.st_uid != 0:
            raise ValueError(f"{file} is owned by uid {st.st_uid}, not root (chown root {file})")
        if st.st_mode & 0o077:
            raise ValueError(f"{file} is mode {stat.S_IMODE(st.st_mode):04o}, readable by "
                             f"others (chmod 600 {file})")
        data = f.read(4096)
    password = data.decode(errors="replace").split("\n", 1)[0].rstrip("\r")
    if not password:
        raise ValueError(f"{file} is empty (the etcd user's password on its first line)")
    return password


def _db(path: str, t) -> DbConfig:
    s = _Section(path, "db", t)
    backend = s.str("backend", "embedded", choices=("embedded", "etcd"))
    dbpath = s.str("path", DbConfig.path)
    endpoints = s._get("endpoints", list(DbConfig.endpoints), False)
    if (not isinstance(endpoints, list) or not endpoints
            or not all(isinstance(e, str) and e.startswith(("http://", "https://")) for e in endpoints)):
        raise ConfigError(path, "db.endpoints", 'a list of URLs such as ["https://127.0.0.1:2379"]', endpoints)
    prefix = s.str("prefix", "/srmig/")
    if not prefix.startswith("/") or not prefix.endswith("/"):
        raise ConfigError(path, "db.prefix", "a key prefix starting and ending with '/'", prefix)
    ca, cert, key = s.str("ca_file"), s.str("cert_file"), s.str("key_file")
    insecure = s.bool("insecure", False)
    user, password_file = s.str("user"), s.str("password_file")
    s.done()
    if (user is None) != (password_file is None):
        raise ConfigError(path, "db.password_file" if user else "db.user",
                          "db.user and db.password_file together (etcd's user and its password)")
    if user is not None and backend == "etcd":     # the embedded backend has no users: ignored, as ca_file
        if not user or "/" in user or not user.isprintable():
            raise ConfigError(path, "db.user", "an etcd user name", user)
        try:
            read_password(password_file)
        except ValueError as e:
            raise ConfigError(path, "db.password_file", f"a root-only file holding the etcd user's password: {e}") \
                from None
    if backend == "etcd":
        schemes = {e.split(":", 1)[0] for e in endpoints}
        if len(schemes) > 1:
            raise ConfigError(path, "db.endpoints", "URLs of one scheme: all https:// (or all http:// with "
                                                    "db.insecure = true)", endpoints)
        if schemes == {"http"}:
            if not insecure:
                raise ConfigError(path, "db.endpoints", "https:// URLs (etcd with TLS; set db.ca_file, "
                                                        "db.cert_file, db.key_file): plain http:// only with "
                                                        "db.insecure = true", endpoints[0])
        else:
            ca = _pem_file(path, "db.ca_file", ca, "the CA certificate that signed etcd's")
            cert = _pem_file(path, "db.cert_file", cert, "this agent's client certificate")
            key = _pem_file(path, "db.key_file", key, "the key of db.cert_file")
    return DbConfig(backend, dbpath, tuple(endpoints), prefix, ca, cert, key, insecure, user, password_file)


def _warnings(path: str, host: HostConfig | None, db: DbConfig) -> tuple[str, ...]:
    """Valid but unsafe choices, one line each, naming the key and the fix."""
    out = []
    if db.backend == "etcd" and db.insecure and any(e.startswith("http://") for e in db.endpoints):
        out.append(f"{path}: db.insecure: etcd over plain http://, no client certificates: whoever reaches "
                   f"{db.endpoints[0]} steers every VM's traffic (use https:// with db.ca_file, db.cert_file, "
                   "db.key_file)")
    if db.backend == "etcd" and db.key_file:
        with contextlib.suppress(OSError, ValueError):
            mode = stat.S_IMODE(os.stat(db.key_file).st_mode)
            if mode & 0o077:
                out.append(f"{path}: db.key_file: {db.key_file} is mode {mode:04o}, readable by others "
                           f"(chmod 600 {db.key_file})")
    if host and "::/0" in (str(ipaddress.IPv6Network(p)) for p in host.sr_domain):
        out.append(f'{path}: host.sr_domain: "::/0" accepts packets to our SIDs from every source (list the '
                   "SR domain's prefixes instead)")
    return tuple(out)


def _hook(path: str, t) -> HookConfig:
    s = _Section(path, "hook", t)
    cfg = HookConfig(socket=s.str("socket", HookConfig.socket),
                     ack_timeout_s=float(s.number("ack_timeout_s", 2.0)),
                     on_timeout=s.str("on_timeout", "proceed", choices=("proceed", "refuse")))
    s.done()
    return cfg


def parse(text: str, path: str = "<config>") -> Config:
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(path, "(syntax)", f"valid TOML ({e})") from None
    except RecursionError:  # tomllib recurses into nested arrays and inline tables
        raise ConfigError(path, "(syntax)", "TOML nested less deeply (arrays or inline tables)") from None
    doc = dict(doc)
    host = _host(path, doc.pop("host")) if "host" in doc else None
    ingress = _ingress(path, doc.pop("ingress")) if "ingress" in doc else None
    if host is None and ingress is None:
        raise ConfigError(path, "host", "a [host] or an [ingress] table (the agent's role)")
    db = _db(path, doc.pop("db", {}))
    hook = _hook(path, doc.pop("hook", {}))
    m = _Section(path, "metrics", doc.pop("metrics", {}))
    listen = m.str("listen", "127.0.0.1:9477")
    if listen:
        hostpart, _, port = listen.rpartition(":")
        # isascii: str.isdigit() also takes digits int() refuses ('²') or that take it seconds (5000 of them)
        if not hostpart or not (port.isascii() and port.isdigit() and len(port) <= 5) or not int(port) < 65536:
            raise ConfigError(path, "metrics.listen", 'HOST:PORT such as "127.0.0.1:9477", or ""', listen)
    m.done()
    if doc:
        raise ConfigError(path, sorted(doc)[0], "no such table or key (known: host, ingress, db, hook, metrics)")
    return Config(path, host, ingress, db, hook, listen or "", _warnings(path, host, db))


def load(path: str | Path) -> Config:
    try:
        text = Path(path).read_text()
    except OSError as e:
        raise ConfigError(path, "(file)", f"a readable file ({e.strerror})") from None
    return parse(text, str(path))
