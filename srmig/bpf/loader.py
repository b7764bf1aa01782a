"""Thin BPF loader: compile srmig's C with bcc, pin the programs and their maps, attach to interfaces.

Two programs: the endpoint behaviours (srmig/ebpf/srmig.c, XDP on a host's fabric interface) and the
ingress's H.Encaps (srmig/ebpf/encap.c, tc clsact egress on an ingress's fabric interface).
Pins live in /sys/fs/bpf/srmig/<netns>/ and /sys/fs/bpf/srmig/encap/<netns>/ (one program and one set of
maps per network namespace, shared by every interface of that namespace it is attached to), so a restarted
agent or a later CLI call finds the live state without compiling anything. <netns> is "host" for PID 1's
namespace, "netns-<cookie>" otherwise.
"""

from __future__ import annotations

import contextlib
import errno
import os
import platform
import shutil
import socket
import subprocess
from dataclasses import dataclass
from pathlib import Path

from pyroute2 import IPRoute

from srmig.bpf import abi, libbpf

BPFFS = Path("/sys/fs/bpf")
PIN_ROOT = Path(os.environ.get("SRMIG_PIN_ROOT", BPFFS / "srmig"))
MERGED_HEADERS = Path(os.environ.get("SRMIG_STATE", "/var/lib/srmig")) / "kernel-headers"

PROG = "prog"
MAPS = ("sid_table", "vm_table", "sid_stats", "drop_stats", "verdict_stats", "meta", "hold_ring", "shadow_ring",
        "sr_domain")

# linux/if_link.h XDP_FLAGS_*
XDP_FLAGS_UPDATE_IF_NOEXIST = 1
XDP_FLAGS_SKB_MODE = 2
XDP_FLAGS_DRV_MODE = 4
MODES = {"generic": XDP_FLAGS_SKB_MODE, "native": XDP_FLAGS_DRV_MODE}


class LoaderError(RuntimeError):
    """A one-line, actionable reason why the dataplane cannot be loaded or found."""


@dataclass
class Limits:
    """Map sizes: userspace owns them and passes them to the C as defines."""

    max_sids: int = 256
    max_vms: int = 65536
    hold_ring_pages: int = 4096  # 16 MiB of 4 KiB pages (~8000 held packets); a power of two
    max_domain_prefixes: int = 256  # SR domain source prefixes (RFC 8754 5.1)

    def cflags(self) -> list[str]:
        if self.hold_ring_pages & (self.hold_ring_pages - 1):
            raise LoaderError(f"hold ring pages must be a power of two, got {self.hold_ring_pages}")
        return [f"-DSRMIG_MAX_SIDS={self.max_sids}", f"-DSRMIG_MAX_VMS={self.max_vms}",
                f"-DSRMIG_HOLD_RING_PAGES={self.hold_ring_pages}",
                f"-DSRMIG_MAX_DOMAIN_PREFIXES={self.max_domain_prefixes}"]


SO_NETNS_COOKIE = 71  # linux/socket.h, kernel >= 5.14


def netns_key() -> str:
    """"host" for PID 1's namespace; else the namespace's cookie, which unlike its inode number is never
    reused during a boot, so pins left by a namespace that died can never be mistaken for a new one's."""
    ours = os.stat("/proc/self/ns/net").st_ino
    with contextlib.suppress(OSError):
        if os.stat("/proc/1/ns/net").st_ino == ours:
            return "host"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
        cookie = int.from_bytes(s.getsockopt(socket.SOL_SOCKET, SO_NETNS_COOKIE, 8), "little")
    return f"netns-{cookie}"


def pin_dir() -> Path:
    return PIN_ROOT / netns_key()


def staging_dir(pins: Path) -> Path:
    """Where a load builds its pins before renaming them into place (bpffs refuses names with a dot)."""
    return pins.with_name(pins.name + "-new")


def ensure_bpffs() -> None:
    """Mount bpffs on /sys/fs/bpf when nothing is (machines without systemd do not mount it)."""
    with open("/proc/self/mounts") as f:
        for line in f:
            fields = line.split()
            if len(fields) > 2 and fields[1] == str(BPFFS) and fields[2] == "bpf":
                return
    if not str(PIN_ROOT).startswith(str(BPFFS)):
        return  # a custom pin root: the caller mounted it
    BPFFS.mkdir(parents=True, exist_ok=True)
    r = subprocess.run(["mount", "-t", "bpf", "bpf", str(BPFFS)], capture_output=True, text=True)
    if r.returncode != 0:
        raise LoaderError(f"cannot mount bpffs on {BPFFS}: {r.stderr.strip()} (are you root?)")


def kernel_source() -> str | None:
    """Where bcc finds kernel headers: its own default when the running kernel has them, else the tree
    that ./run setup merged from Debian's -common and -<arch> packages."""
    if os.environ.get("BCC_KERNEL_SOURCE"):
        return os.environ["BCC_KERNEL_SOURCE"]
    if Path(f"/lib/modules/{platform.release()}/build/include").is_dir():
        return None
    if (MERGED_HEADERS / "include").is_dir():
        return str(MERGED_HEADERS)
    raise LoaderError(f"no kernel headers for bcc: neither /lib/modules/{platform.release()}/build nor "
                      f"{MERGED_HEADERS} exists (apt-get install linux-headers-amd64, then ./run setup)")


def _bcc():
    try:
        import bcc
    except ImportError:
        raise LoaderError("bcc is not importable: apt-get install python3-bpfcc, and use the venv made by "
                          "./run setup (PyPI's 'bcc' is an unrelated project)") from None
    return bcc


def compile_program(source: Path, func: str, limits: Limits | None = None, prog_type: str = "XDP"):
    """Compile and verify one function (`prog_type`: a bcc.BPF program type name, XDP or SCHED_CLS);
    returns (bcc.BPF, program fd). Errors are one line."""
    bcc = _bcc()
    ksrc = kernel_source()
    if ksrc:
        os.environ["BCC_KERNEL_SOURCE"] = ksrc
    cflags = [f"-I{abi.EBPF_DIR}", "-Wno-unused-function"] + (limits.cflags() if limits else [])
    try:
        b = bcc.BPF(src_file=str(source).encode(), cflags=cflags)
        fn = b.load_func(func.encode(), getattr(bcc.BPF, prog_type))
    except Exception as e:  # bcc raises bare Exception; clang's diagnostics are already on stderr
        raise LoaderError(f"compiling {source.name} failed: {str(e).splitlines()[0]}") from e
    return b, fn.fd


@dataclass
class Loaded:
    pin_dir: Path
    prog_fd: int
    prog_id: int
    compiled: bool  # False when an already pinned program was reused


def _pinned_or_compile(pins: Path, source: str, func: str, prog_type: str, maps: tuple[str, ...],
                       limits: Limits, before_pin=None) -> Loaded:
    """The program pinned in `pins` if any, else compile it, pin it and its maps (all at once)."""
    ensure_bpffs()
    if (pins / PROG).exists():
        fd = libbpf.obj_get(str(pins / PROG))
        return Loaded(pins, fd, libbpf.prog_id(fd), compiled=False)
    b, fd = compile_program(abi.EBPF_DIR / source, func, limits, prog_type)
    tmp = staging_dir(pins)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        if before_pin:
            before_pin(b)
        for name in maps:
            libbpf.obj_pin(b[name.encode()].map_fd, str(tmp / name))
        libbpf.obj_pin(fd, str(tmp / PROG))
        tmp.rename(pins)  # all pins appear at once: a reader never sees half a set
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    prog_fd = libbpf.obj_get(str(pins / PROG))  # outlives the bcc object
    return Loaded(pins, prog_fd, libbpf.prog_id(prog_fd), compiled=True)


def load_pinned_or_compile(limits: Limits | None = None) -> Loaded:
    """The namespace's XDP program: the pinned one if any, else compile, pin program and maps."""
    def write_abi_version(b):
        meta = b[b"meta"]
        meta[meta.Key(abi.META_ABI_VERSION)] = meta.Leaf(abi.ABI_VERSION)

    return _pinned_or_compile(pin_dir(), "srmig.c", "srmig_xdp", "XDP", MAPS, limits or Limits(), write_abi_version)


def _ifindex(ipr: IPRoute, ifname: str) -> int:
    idx = ipr.link_lookup(ifname=ifname)
    if not idx:
        raise LoaderError(f"no interface {ifname!r} in this network namespace")
    return idx[0]


def attached_prog_id(ipr: IPRoute, ifindex: int) -> tuple[int, str | None]:
    """(program id, "native"|"generic"|...) attached to an interface, (0, None) when none."""
    link = ipr.get_links(ifindex)[0]
    xdp = link.get_attr("IFLA_XDP")
    if not xdp:
        return 0, None
    # pyroute2 decodes IFLA_XDP_ATTACHED (XDP_ATTACHED_DRV/SKB/HW/MULTI) into these names.
    mode = {"xdp": "native", "xdpgeneric": "generic", "xdpoffload": "offload", "xdpmulti": "multi"}.get(
        xdp.get_attr("IFLA_XDP_ATTACHED"))
    return xdp.get_attr("IFLA_XDP_PROG_ID") or 0, mode


def attach(ifname: str, prog_fd: int, mode: str = "native") -> None:
    if mode not in MODES:
        raise LoaderError(f"unknown XDP mode {mode!r}: expected native or generic")
    with IPRoute() as ipr:
        idx = _ifindex(ipr, ifname)
        try:
            ipr.link("set", index=idx, xdp={"attrs": [("IFLA_XDP_FD", prog_fd), ("IFLA_XDP_FLAGS", MODES[mode])]})
        except Exception as e:
            raise LoaderError(f"attaching XDP ({mode}) to {ifname} failed: {e}") from e


def detach(ifname: str) -> bool:
    """Detach whatever XDP program is on `ifname`; False when there was none."""
    with IPRoute() as ipr:
        idx = _ifindex(ipr, ifname)
        _, mode = attached_prog_id(ipr, idx)
        if mode is None:
            return False
        flags = MODES.get(mode, 0)
        ipr.link("set", index=idx, xdp={"attrs": [("IFLA_XDP_FD", -1), ("IFLA_XDP_FLAGS", flags)]})
        return True


def interfaces_running(prog_id: int) -> list[str]:
    """The interfaces of this namespace that run program `prog_id`."""
    out = []
    with IPRoute() as ipr:
        for link in ipr.get_links():
            if attached_prog_id(ipr, link["index"])[0] == prog_id:
                out.append(link.get_attr("IFLA_IFNAME"))
    return out


def load(ifname: str, mode: str = "native", limits: Limits | None = None) -> Loaded:
    """`srmig load IFACE`: attach the namespace's program (compiling and pinning it the first time)."""
    loaded = load_pinned_or_compile(limits)
    attach(ifname, loaded.prog_fd, mode)
    return loaded


def unload(ifname: str) -> dict:
    """`srmig unload IFACE`: detach; when no interface of the namespace runs the program any more, remove
    the pins too (which frees the maps)."""
    ensure_bpffs()
    detached = detach(ifname)
    pins = pin_dir()
    removed = False
    if (pins / PROG).exists():
        fd = libbpf.obj_get(str(pins / PROG))
        try:
            still = interfaces_running(libbpf.prog_id(fd))
        finally:
            os.close(fd)
        if not still:
            shutil.rmtree(pins, ignore_errors=True)
            removed = True
    return {"interface": ifname, "detached": detached, "pins_removed": removed}


# -- the ingress's H.Encaps: tc clsact egress ----------------------------------------------------------------

ENCAP_MAPS = ("encap_table", "encap_vm_stats", "encap_stats")
CLSACT_EGRESS = "ffff:fff3"  # the clsact qdisc's egress hook (TC_H_MIN_EGRESS under TC_H_CLSACT)
ENCAP_PRIO = 0x5e6   # our filter's priority and handle on clsact egress, so we find and remove just ours
ENCAP_HANDLE = 0x5e6
ENCAP_NAME = "srmig_encap"


def encap_pin_dir() -> Path:
    return PIN_ROOT / "encap" / netns_key()


def load_encap_pinned_or_compile(limits: Limits | None = None) -> Loaded:
    return _pinned_or_compile(encap_pin_dir(), "encap.c", "srmig_encap", "SCHED_CLS", ENCAP_MAPS,
                              limits or Limits())


def _encap_filters(ipr: IPRoute, idx: int) -> list:
    """Our bpf filters on `idx`'s clsact egress ([] when it has no clsact qdisc)."""
    try:
        filters = ipr.get_filters(index=idx, parent=CLSACT_EGRESS)
    except Exception:  # noqa: BLE001 - no clsact qdisc: nothing of ours
        return []
    return [f for f in filters if f.get_attr("TCA_KIND") == "bpf" and (f["info"] >> 16) == ENCAP_PRIO]


def load_encap(ifname: str, limits: Limits | None = None) -> Loaded:
    """`srmig ingress load IFACE`: run the namespace's H.Encaps program on `ifname`'s egress (compiling and
    pinning it the first time). Idempotent: the filter is replaced, other clsact filters are left alone."""
    loaded = load_encap_pinned_or_compile(limits)
    with IPRoute() as ipr:
        idx = _ifindex(ipr, ifname)
        try:
            ipr.tc("add", "clsact", index=idx)
        except Exception as e:  # noqa: BLE001
            if getattr(e, "code", None) != errno.EEXIST:
                raise LoaderError(f"adding a clsact qdisc to {ifname} failed: {e} (srmig check: clsact)") from e
        try:
            ipr.tc("replace-filter", "bpf", index=idx, handle=ENCAP_HANDLE, prio=ENCAP_PRIO, fd=loaded.prog_fd,
                   name=ENCAP_NAME, parent=CLSACT_EGRESS, classid=1, direct_action=True)
        except Exception as e:  # noqa: BLE001
            raise LoaderError(f"attaching H.Encaps (tc bpf, egress) to {ifname} failed: {e} "
                              f"(srmig check: cls_bpf)") from e
    return loaded


def encap_interfaces() -> list[str]:
    """The interfaces of this namespace whose egress runs our H.Encaps filter."""
    out = []
    with IPRoute() as ipr:
        for link in ipr.get_links():
            if _encap_filters(ipr, link["index"]):
                out.append(link.get_attr("IFLA_IFNAME"))
    return out


def unload_encap(ifname: str) -> dict:
    """`srmig ingress unload IFACE`: remove our filter (the clsact qdisc stays: others may use it); when no
    interface of the namespace runs it any more, remove the pins too (which frees the maps)."""
    ensure_bpffs()
    detached = False
    with IPRoute() as ipr:
        idx = _ifindex(ipr, ifname)
        if _encap_filters(ipr, idx):
            ipr.tc("del-filter", "bpf", index=idx, handle=ENCAP_HANDLE, prio=ENCAP_PRIO, parent=CLSACT_EGRESS)
            detached = True
    removed = False
    pins = encap_pin_dir()
    if pins.exists() and not encap_interfaces():
        shutil.rmtree(pins, ignore_errors=True)
        removed = True
    return {"interface": ifname, "detached": detached, "pins_removed": removed}
