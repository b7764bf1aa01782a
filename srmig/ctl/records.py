"""What the agent takes from outside, checked where it comes in, before any of it reaches the state machine,
the maps or the encap: the hook socket's requests, a domain's XML and srmig metadata, the database's
records (written by other agents, other versions of srmig, or someone with etcdctl).

Each check returns the parsed record, normalised (addresses in their canonical spelling), or raises
Rejected, whose message is one line. `reject()` logs a rejection (one warning naming where the input came
from, e.g. `migrations/<vm>/<host>`) and counts it by source: `srmig status` shows the counts (`rejected`),
Prometheus as srmig_rejected_input_total{source}. The counts are the process's: one agent runs per process,
and a configuration is rejected before any agent exists (`srmig agent` then exits with its one line).

Records carry a `format` (FORMAT when absent: the records of agents that wrote none). A record of a later
format is rejected whole: its fields may mean something this agent does not know. Migration records are
format 2 (MIGRATION_FORMAT): they moved from migrations/<vm>/<host> to migrations/<host>/<vm>, so that what
one host writes is one key range (etcd's roles grant ranges: srmig.ctl.statedb.etcd_auth).
"""

from __future__ import annotations

import functools
import ipaddress
import json
import logging
import threading
import xml.etree.ElementTree as ET

from srmig.ctl.ingress import MAX_SEGMENTS
from srmig.ctl.machine import Ev
from srmig.ctl.phases import HostSids, Phase

log = logging.getLogger("srmig.records")

FORMAT = 1                         # the record format this agent writes and reads
MIGRATION_FORMAT = 2               # migration records: 2 since their key starts with the writer's host
# Where an input comes from (the counter's label) and what it is called in the log.
SOURCES = {"hook": "hook request", "domain_xml": "domain XML", "migration_record": "migration record",
           "vm_record": "VM record", "host_record": "host record", "config": "configuration"}
MAX_DOMAIN_XML = 1 << 20           # characters of a domain's XML (libvirt's are tens of KiB)
MAX_NAME = 253                     # a host's name (a DNS name's length), a migration id, a domain's name
MAX_EVENTS = 64                    # events in one migration record (a migration has five kinds)
MAX_RESENT = 64                    # frames in one record's `resent` (QEMU swallows one per pause)
MAX_FRAME = 65535                  # bytes of one of those frames
MAX_TRANSIT = MAX_SEGMENTS - 2     # the migration list is [S::5, transit..., D::b]: it must fit the encap
MAX_ADDRESSES = 64                 # addresses of one VM (one map entry and one encap entry each)
INT_MAX = 2 ** 63 - 1
IFNAMSIZ = 16                      # Linux's interface names: at most 15 bytes (dev_valid_name)
# What a host writes in its migration record: what it saw (grace-over is the source's own timer, never written).
RECORD_EVENTS = {e.value for e in (Ev.BEGIN, Ev.SUSPENDED, Ev.RESUMED, Ev.STOPPED, Ev.FAILED)}
PHASES = {p.value for p in Phase}
HOOK_OPS = ("migrate-begin", "status")
XMLNS = "urn:srmig:vm:1"


class Rejected(ValueError):
    """Why an input was refused: one line, bounded."""

    def __init__(self, why: str):
        super().__init__(line(why, 300))


def line(text: str, limit: int = 120) -> str:
    """`text` as one printable line of at most `limit` characters (hostile keys and values are logged)."""
    text = "".join(c if c.isprintable() else repr(c)[1:-1] for c in str(text)[:limit + 1])
    return text if len(text) <= limit else text[:limit] + "..."


def show(value) -> str:
    """A value quoted for a message, cut short."""
    return line(repr(value), 60)


class Rejections:
    """Rejections per source. The worker, the database's watch threads and the hook server's threads count."""

    def __init__(self):
        self._lock = threading.Lock()
        self._n = dict.fromkeys(SOURCES, 0)

    def add(self, source: str) -> None:
        with self._lock:
            self._n[source] += 1

    def counts(self) -> dict[str, int]:
        with self._lock:
            return dict(self._n)


REJECTED = Rejections()


def reject(source: str, where: str, why) -> None:
    """One warning line naming where the input came from, and one count."""
    REJECTED.add(source)
    log.warning("%s: rejected %s: %s", line(where), SOURCES[source], line(str(why), 300))


# --- fields --------------------------------------------------------------------------------------------

def _obj(value, what: str = "record") -> dict:
    if not isinstance(value, dict):
        raise Rejected(f"{what} is not a JSON object ({type(value).__name__})")
    return value


def _format(d: dict, latest: int = FORMAT) -> None:
    f = d.get("format", FORMAT)
    if not isinstance(f, int) or isinstance(f, bool) or f < 1:
        raise Rejected(f"format: expected an integer >= 1, got {show(f)}")
    if f > latest:
        raise Rejected(f"format {f} is newer than this agent's {latest}: upgrade it")


def _get(d: dict, k: str, required: bool = True, default=None):
    if k not in d:
        if required:
            raise Rejected(f"{k}: missing")
        return default
    return d[k]


def _int(d: dict, k: str, lo: int = 0, required: bool = True, default: int = 0) -> int:
    v = _get(d, k, required, default)
    if not _is_int(v, lo):
        raise Rejected(f"{k}: expected an integer in {lo}..2^63-1, got {show(v)}")
    return v


def _is_int(v, lo: int) -> bool:
    """An integer as etcd, SQLite and other languages' JSON keep them (int64), at least `lo`."""
    return isinstance(v, int) and not isinstance(v, bool) and lo <= v <= INT_MAX


def _name(v, what: str, limit: int = MAX_NAME, spaces: bool = False) -> str:
    """A name that becomes part of a key or a path: printable, no '/' (and no white space unless `spaces`:
    a domain's name may have some)."""
    if not isinstance(v, str) or not 0 < len(v) <= limit or "/" in v or not v.isprintable() or \
            (not spaces and any(c.isspace() for c in v)):
        raise Rejected(f"{what}: expected a name (1..{limit} printable characters, no '/'"
                       f"{'' if spaces else ' or space'}), got {show(v)}")
    return v


def address(v, what: str) -> str:
    """An IPv6 address in its canonical spelling."""
    if not isinstance(v, str) or len(v) > 64 or "%" in v:  # the longest spelling is 45 characters; no zone
        raise Rejected(f"{what}: expected an IPv6 address, got {show(v)}")
    try:
        return str(ipaddress.IPv6Address(v))
    except ValueError:
        raise Rejected(f"{what}: {show(v)} is not an IPv6 address") from None


def vm_address(v, what: str) -> str:
    """A VM's address, IPv6 or IPv4 (the VM map keys IPv4 as ::ffff:a.b.c.d, srmig_abi.h), in its canonical
    spelling: IPv4 dotted, IPv6 compressed, an IPv4-mapped IPv6 address as the IPv4 address it maps (one
    address, one spelling: the map could not tell them apart). Not one no VM can have: unspecified,
    loopback, multicast, link-local (fe80::1 and 169.254.0.0/16 are the anycast gateway's, every host's)."""
    if not isinstance(v, str) or len(v) > 64 or "%" in v:
        raise Rejected(f"{what}: expected an IPv6 or IPv4 address, got {show(v)}")
    parsed = _vm_ip(v)
    if parsed is None:
        raise Rejected(f"{what}: {show(v)} is not an IPv6 or IPv4 address")
    canonical, usable = parsed
    if not usable:
        raise Rejected(f"{what}: {canonical} cannot be a VM's (unspecified, loopback, multicast, broadcast or "
                       f"link-local)")
    return canonical


@functools.lru_cache(maxsize=1 << 16)
def _vm_ip(text: str) -> tuple[str, bool] | None:
    """(canonical spelling, usable by a VM), None: not an address. Cached: a record names its VM three times
    (key, `vm`, `addresses`), and reconciling 10^5 VMs parsed each of them (ipaddress is ~10 us a parse)."""
    try:  # the family by its separator: ip_address() tries IPv4 first and pays an exception for IPv6
        a = ipaddress.IPv6Address(text) if ":" in text else ipaddress.IPv4Address(text)
    except ValueError:
        return None
    if a.version == 6 and a.ipv4_mapped is not None:
        a = a.ipv4_mapped
    usable = not (a.is_unspecified or a.is_loopback or a.is_multicast or a.is_link_local
                  or (a.version == 4 and a == ipaddress.IPv4Address("255.255.255.255")))
    return str(a), usable


# Where no VM's prefix may reach: the addresses vm_address() refuses, and the IPv4-mapped block (the VM map's
# IPv4 keys: an IPv4 prefix is spelled as IPv4, and no IPv6 prefix may cover one, srmig_abi.h).
_NOT_VMS = tuple(ipaddress.ip_network(n) for n in (
    "::/128", "::1/128", "fe80::/10", "ff00::/8", "::ffff:0:0/96",
    "0.0.0.0/32", "127.0.0.0/8", "169.254.0.0/16", "224.0.0.0/4", "255.255.255.255/32"))


def vm_prefix(v, what: str) -> str:
    """A prefix a VM routes (a subnet behind it), in its canonical spelling (2001:db8:5::/64, 10.1.0.0/24): no
    host bits set, more than one address (a /128 or /32 is an address: list it as one), not reaching an
    address no VM can have (vm_address) nor, for IPv6, the IPv4-mapped ::ffff:0:0/96."""
    if not isinstance(v, str) or len(v) > 64 or "%" in v or "/" not in v:
        raise Rejected(f"{what}: expected an IPv6 or IPv4 prefix (ADDRESS/LENGTH), got {show(v)}")
    try:
        net = _net(v)
    except ValueError:
        raise Rejected(f"{what}: {show(v)} is not a prefix (ADDRESS/LENGTH, no host bits set)") from None
    if net.num_addresses == 1:
        raise Rejected(f"{what}: {net} is one address: list it as {net.network_address}")
    bad = next((n for n in _NOT_VMS if n.version == net.version and net.overlaps(n)), None)
    if bad is not None:
        raise Rejected(f"{what}: {net} reaches {bad}, where no VM's address can be")
    return str(net)


@functools.lru_cache(maxsize=1 << 12)
def _net(text: str) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
    return ipaddress.ip_network(text)


def vm_address_or_prefix(v, what: str) -> str:
    """vm_prefix() for ADDRESS/LENGTH, else vm_address()."""
    return vm_prefix(v, what) if isinstance(v, str) and "/" in v else vm_address(v, what)


def overlaps(a: str, b: str) -> bool:
    """Whether two of a VM's addresses or prefixes (canonical spellings) share an address: the VM map could not
    tell their VMs apart (an address inside another VM's prefix would be the exact entry's, the rest the
    prefix's: a VM moved without part of its traffic)."""
    if a == b:
        return True
    if "/" not in a and "/" not in b:
        return False
    x, y = _net(a), _net(b)
    return x.version == y.version and x.overlaps(y)


class Owners(dict):
    """address or prefix -> (the VM claiming it, where), filled by setdefault(), with its prefixes also apart
    (`prefixes`): checking a VM's addresses against another VM's prefixes (taken()) then reads those few, not
    every address of every VM (reconciling 10^5 VMs checks each against all the others)."""

    def __init__(self):
        super().__init__()
        self.prefixes: dict[str, tuple[str, str]] = {}

    def setdefault(self, key, default=None):
        if "/" in key and key not in self:
            self.prefixes[key] = default
        return super().setdefault(key, default)


def taken(vm: str, addresses: tuple[str, ...], owners) -> str | None:
    """Why VM `vm` cannot have `addresses`, None when it can: one is another VM's in `owners` (address ->
    (VM, where): a dict, an Owners, or a ChainMap of them, the first map's claim winning), overlaps one of
    another VM's prefixes, or is a prefix holding another VM's address or prefix (overlaps())."""
    for a in addresses:
        other_vm, where = owners.get(a, (vm, ""))
        if other_vm != vm:
            return f"address {a} is already VM {other_vm}'s ({where})"
    mine_prefixes = [a for a in addresses if "/" in a]
    maps = owners.maps if hasattr(owners, "maps") else [owners]
    for m in maps:  # other VMs' prefixes against all of ours
        for other in (m.prefixes if isinstance(m, Owners) else [k for k in m if "/" in k]):
            other_vm, where = owners[other]
            if other_vm != vm:
                for a in addresses:
                    if overlaps(a, other):
                        return f"{a} overlaps {other}, VM {other_vm}'s ({where})"
    if mine_prefixes:  # our prefixes against every address of the others (a VM that routes one is rare)
        for other, (other_vm, where) in owners.items():
            if other_vm != vm and "/" not in other:
                for a in mine_prefixes:
                    if overlaps(a, other):
                        return f"{a} overlaps {other}, VM {other_vm}'s ({where})"
    return None


def _disjoint(out, what: str) -> None:
    """No two of one VM's addresses and prefixes overlap: each of its addresses has one entry (the ingress keys a
    prefix's entry by its network address, and deleting one must not take another's)."""
    prefixes = [a for a in out if "/" in a]
    for i, p in enumerate(prefixes):
        for a in out:
            if a != p and overlaps(a, p) and (a not in prefixes or prefixes.index(a) > i):
                raise Rejected(f"{what}: {a} and {p} overlap (list the prefix alone, or the addresses)")


def vm_addresses(v, what: str, first: str | None = None) -> tuple[str, ...]:
    """A VM's addresses: 1..MAX_ADDRESSES VM addresses (vm_address) or prefixes it routes (vm_prefix), no two the
    same, the first an address (the VM's id: `first` when given)."""
    if not isinstance(v, list) or not 1 <= len(v) <= MAX_ADDRESSES:
        raise Rejected(f"{what}: expected a list of 1..{MAX_ADDRESSES} VM addresses, got {show(v)}")
    out = tuple(vm_address(x, f"{what}[{i}]") if i == 0 else vm_address_or_prefix(x, f"{what}[{i}]")
                for i, x in enumerate(v))
    if len(set(out)) != len(out):
        dup = next(a for i, a in enumerate(out) if a in out[:i])
        raise Rejected(f"{what}: {dup} listed twice")
    if first is not None and out[0] != first:
        raise Rejected(f"{what}: the first address must be the VM's {first}, got {out[0]}")
    _disjoint(out, what)
    return out


def _addresses(v, what: str, lo: int, hi: int) -> list[str]:
    if not isinstance(v, list) or not lo <= len(v) <= hi:
        raise Rejected(f"{what}: expected a list of {lo}..{hi} IPv6 addresses, got {show(v)}")
    return [address(x, f"{what}[{i}]") for i, x in enumerate(v)]


# --- the database's records (srmig.ctl.vmdb) -------------------------------------------------------------

def vm_record(key: str, value) -> dict:
    """vms/<vm>: the fields of a VmRecord. The segment list must fit srmig's H.Encaps. `addresses`: all of
    the VM's, its id first (absent: a record of an agent that knew one address per VM, [vm])."""
    vm = vm_address(key[len("vms/"):], "the key's VM address")
    d = _obj(value)
    _format(d)
    if vm_address(_get(d, "vm"), "vm") != vm:
        raise Rejected(f"vm {show(d['vm'])} is not the key's {vm}")
    out = {"vm": vm, "host": _name(_get(d, "host"), "host"),
           "segments": tuple(_addresses(_get(d, "segments"), "segments", 1, MAX_SEGMENTS)),
           "version": _int(d, "version", lo=1),
           "migration": _get(d, "migration", False, ""), "step": _int(d, "step", required=False),
           "phase": _get(d, "phase", False, Phase.STEADY.value),
           "addresses": vm_addresses(_get(d, "addresses", False, [vm]), "addresses", first=vm)}
    if out["migration"] != "":
        _name(out["migration"], "migration", 64)
    if not isinstance(out["phase"], str) or out["phase"] not in PHASES:
        raise Rejected(f"phase: expected one of {', '.join(sorted(PHASES))}, got {show(out['phase'])}")
    return out


def lenient_version(value) -> int:
    """The version of a vms/ record that was rejected, when it has a usable one (0: none): a record written
    over it must have a later version, or an ingress that applied an earlier valid one would ignore it."""
    v = value.get("version") if isinstance(value, dict) else None
    return v if _is_int(v, 1) and v < INT_MAX else 0


def lenient_addresses(key: str, value) -> tuple[str, ...]:
    """The addresses a vms/ record claims, read without judging the rest of it (nothing logged or counted):
    its key's and those of its `addresses` that are VM addresses. Who owns an address (srmig.ctl.host_role,
    the ingress role keeping what a malformed record's VM had) must not depend on the record being usable."""
    out = []
    raw = value.get("addresses") if isinstance(value, dict) else None
    for a in [key[len("vms/"):], *(raw[:MAX_ADDRESSES] if isinstance(raw, list) else [])]:
        try:
            a = vm_address_or_prefix(a, "address")
        except Rejected:
            continue
        if a not in out:
            out.append(a)
    return tuple(out)


def host_record(key: str, value) -> tuple[HostSids, dict]:
    """hosts/<name>: the host's SIDs (End.DX6-map, End.S, End.SBUF), address and transit SIDs."""
    name = _name(key[len("hosts/"):], "the key's host name")
    d = _obj(value)
    _format(d)
    if _get(d, "name") != name:
        raise Rejected(f"name {show(d['name'])} is not the key's {name!r}")
    sids = HostSids(name, address(_get(d, "dx6"), "dx6"), address(_get(d, "end_s"), "end_s"),
                    address(_get(d, "sbuf"), "sbuf"))
    if len({sids.dx6, sids.end_s, sids.sbuf}) != 3:
        raise Rejected("dx6, end_s, sbuf: expected three different SIDs")
    out = {"name": name, "dx6": sids.dx6, "end_s": sids.end_s, "sbuf": sids.sbuf,
           "address": address(_get(d, "address"), "address"),
           "transit": _addresses(_get(d, "transit", False, []), "transit", 0, MAX_TRANSIT)}
    return sids, out


def migration_key(vm: str, host: str) -> str:
    """Where `host` writes what it saw of `vm`'s migration: under its own name (one key range per host)."""
    return f"migrations/{host}/{vm}"


def migration_record(key: str, value) -> tuple[str, str, dict]:
    """migrations/<host>/<vm>: (vm, host, record). The host that wrote it must be one of its ends; its
    events are those a host writes (srmig.ctl.host_role.HostRole._record)."""
    host, _, vm_text = key[len("migrations/"):].partition("/")
    _name(host, "the key's host")
    vm = vm_address(vm_text, "the key's VM address")
    d = _obj(value)
    _format(d, MIGRATION_FORMAT)
    if vm_address(_get(d, "vm"), "vm") != vm:
        raise Rejected(f"vm {show(d['vm'])} is not the key's {vm}")
    src, dst = _name(_get(d, "src"), "src"), _name(_get(d, "dst"), "dst")
    if src == dst:
        raise Rejected(f"src and dst are both {src!r}")
    if host not in (src, dst):
        raise Rejected(f"written by {host!r}, which is neither its src {src!r} nor its dst {dst!r}")
    events = _get(d, "events")
    if not isinstance(events, list) or len(events) > MAX_EVENTS:
        raise Rejected(f"events: expected a list of at most {MAX_EVENTS} events, got {show(events)}")
    for i, e in enumerate(events):
        if not isinstance(e, str) or e not in RECORD_EVENTS:
            raise Rejected(f"events[{i}]: expected one of {', '.join(sorted(RECORD_EVENTS))}, got {show(e)}")
    domain = _get(d, "domain", False)
    resent = _get(d, "resent", False, [])
    if not isinstance(resent, list) or len(resent) > MAX_RESENT:
        raise Rejected(f"resent: expected a list of at most {MAX_RESENT} frames, got {show(resent)}")
    for i, f in enumerate(resent):
        if not isinstance(f, str) or len(f) > 2 * MAX_FRAME or len(f) % 2:
            raise Rejected(f"resent[{i}]: expected a frame in hex, got {show(f)}")
        try:
            bytes.fromhex(f)
        except ValueError:
            raise Rejected(f"resent[{i}]: expected a frame in hex, got {show(f)}") from None
    returned = _get(d, "returned", False)
    if returned is not None and not _is_int(returned, 0):
        raise Rejected(f"returned: expected null or a count, got {show(returned)}")
    counters = {}
    for k in ("swallow_base", "rx_used"):  # 16-bit counters (the virtio ring's index arithmetic)
        v = counters[k] = _get(d, k, False)
        if v is not None and not (_is_int(v, 0) and v <= 0xFFFF):
            raise Rejected(f"{k}: expected null or a 16-bit count, got {show(v)}")
    mcast = _get(d, "swallow_mcast", False)
    if mcast is not None and not _is_int(mcast, 0):
        raise Rejected(f"swallow_mcast: expected null or a count, got {show(mcast)}")
    at_start = _get(d, "at_start", False)  # the destination's tap and program counts at its QEMU's start
    if at_start is not None and not (isinstance(at_start, dict) and set(at_start) == {"tx", "mcast", "delivered"}
                                     and all(_is_int(v, 0) for v in at_start.values())):
        raise Rejected(f"at_start: expected null or {{tx, mcast, delivered}} counts, got {show(at_start)}")
    return vm, host, {
        **counters, "at_start": at_start, "swallow_mcast": mcast,
        "id": _name(_get(d, "id"), "id", 64), "vm": vm,
        # The domain's name is also a path: <qemu_run_dir>/<domain>.pid, whose pid the drain takes fds from.
        "domain": None if domain is None else _name(domain, "domain", 1024, spaces=True),
        "src": src, "dst": dst, "transit": _addresses(_get(d, "transit", False, []), "transit", 0, MAX_TRANSIT),
        "events": list(events), "resent": list(resent), "returned": returned}


# --- the hook socket (srmig.ctl.hooksrv) -----------------------------------------------------------------

def hook_request(raw: bytes) -> dict:
    """One request line: a JSON object with a known `op` and its fields of the right type."""
    try:
        req = json.loads(raw)
    except RecursionError:
        raise Rejected("nested too deep") from None
    except ValueError as e:  # JSONDecodeError, UnicodeDecodeError, an integer too long
        raise Rejected(f"not JSON: {e}") from None
    _obj(req, "request")
    op = req.get("op")
    if not isinstance(op, str) or op not in HOOK_OPS:
        raise Rejected(f"op: expected one of {', '.join(HOOK_OPS)}, got {show(op)}")
    if op == "migrate-begin" and not isinstance(req.get("xml"), str):
        raise Rejected(f"xml: expected the domain's XML as a string, got {show(req.get('xml'))}")
    return req


# --- a domain's XML (srmig.ctl.libvirt_link.Domain) -------------------------------------------------------

def domain(xml) -> tuple[str, str, str | None, tuple[str, ...]] | None:
    """(name, VM id, tap, addresses) of a domain srmig manages; None when its metadata has no srmig address
    (not ours). Rejected: the document is not a domain's XML, or its name, tap or any of its srmig addresses
    is malformed (metadata_addresses): the whole domain, so that a VM is moved with all its addresses or
    not at all."""
    if not isinstance(xml, str):
        raise Rejected(f"expected XML text, got {type(xml).__name__}")
    if len(xml) > MAX_DOMAIN_XML:
        raise Rejected(f"{len(xml)} characters, more than the {MAX_DOMAIN_XML} a domain's XML may have")
    if "<!DOCTYPE" in xml or "<!ENTITY" in xml:  # libvirt writes neither; entities can expand without bound
        raise Rejected("a DOCTYPE or ENTITY declaration (libvirt's XML has none)")
    try:
        root = ET.fromstring(xml)
    except ET.ParseError as e:
        raise Rejected(f"not XML: {e}") from None
    if root.tag != "domain":
        raise Rejected(f"root element {show(root.tag)}, not <domain>")
    texts = [(a.text or "").strip() for a in root.findall(f"./metadata/{{{XMLNS}}}vm/{{{XMLNS}}}address")]
    if not any(texts):
        return None
    try:
        addresses = metadata_addresses(texts)
        name = _name(root.findtext("name"), "name", 1024, spaces=True)
        target = root.find("./devices/interface/target")
        tap = None if target is None else target.get("dev")
        if tap is not None and (not tap or len(tap.encode()) >= IFNAMSIZ or tap in (".", "..") or "/" in tap
                                or ":" in tap or any(c.isspace() for c in tap) or not tap.isprintable()):
            raise Rejected(f"interface target {show(tap)} is not an interface name")
    except Rejected as e:
        raise Rejected(f"domain {show(root.findtext('name'))}: {e}") from None
    return name, addresses[0], tap, addresses


def metadata_addresses(texts: list[str]) -> tuple[str, ...]:
    """The VM's addresses from its <srmig:address> elements, in their order (the first is the VM's id):
    each an IPv6 or IPv4 address (vm_address), optionally with the length of its interface's prefix
    (2001:db8::10/64, 10.0.0.5/24: the address, as before), or a prefix the VM routes (no host bits:
    10.1.0.0/24, 2001:db8:5::/64; vm_prefix), whose every address moves with the VM. The first must be an
    address: the VM's id, which the VM map and the database key it by. Empty elements are ignored; none of
    the others may be malformed or listed twice."""
    texts = [t for t in texts if t]
    if len(texts) > MAX_ADDRESSES:
        raise Rejected(f"srmig metadata: {len(texts)} addresses, more than the {MAX_ADDRESSES} a VM may have")
    out: list[str] = []
    for i, text in enumerate(texts):
        what = f"srmig metadata's address {show(text)}"
        if len(text) > 64:
            raise Rejected(f"{what}: expected an IPv6 or IPv4 address")
        addr, slash, length = text.partition("/")
        if slash:
            try:
                iface = ipaddress.ip_interface(text)
            except ValueError:
                raise Rejected(f"{what}: expected ADDRESS or ADDRESS/LENGTH") from None
            if iface.ip == iface.network.network_address and iface.network.num_addresses > 1:
                if not out:
                    raise Rejected(f"{what} is a prefix: the first address is the VM's id, an address of its "
                                   f"own; list that first, then the prefixes it routes")
                p = vm_prefix(text, "srmig metadata's prefix")
                if p in out:
                    raise Rejected(f"srmig metadata: {p} listed twice")
                out.append(p)
                continue
        a = vm_address(addr, "srmig metadata's address")
        if a in out:
            raise Rejected(f"srmig metadata: {a} listed twice")
        out.append(a)
    _disjoint(out, "srmig metadata")
    return tuple(out)
