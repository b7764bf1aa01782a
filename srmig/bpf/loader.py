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
import os
import platform
import shutil
import socket
import subprocess
from dataclasses import dataclass
from pathlib import Path

from srmig import netlink
from srmig.bpf import abi, libbpf

BPFFS = Path("/sys/fs/bpf")
PIN_ROOT = Path(os.environ.get("SRMIG_PIN_ROOT", BPFFS / "srmig"))
MERGED_HEADERS = Path(os.environ.get("SRMIG_STATE", "/var/lib/srmig")) / "kernel-headers"

PROG = "prog"
MAPS = ("sid_table", "vm_table", "sid_stats", "drop_stats", "verdict_stats", "meta", "hold_ring", "shadow_ring",
        "sr_domain", "inner_stats", "vm_prefixes")

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
    hold_ring_pages: int = 4096  # 16 MiB of 4 KiB pages (~90,000 held 144-byte packets); a power of two
    max_domain_prefixes: int = 256  # SR domain source prefixes (RFC 8754 5.1)
    # vm_prefixes (and encap_prefixes): the prefixes VMs route and, in vm_prefixes, every VM address other than
    # its VM's id (pointed at the id: srmig.ctl.maps.VmAddressSet). None: max_vms + 16384, room for one other
    # address per VM besides the prefixes. An LPM trie is never preallocated: memory follows the entries.
    max_vm_prefixes: int | None = None

    def cflags(self) -> list[str]:
        if self.hold_ring_pages & (self.hold_ring_pages - 1):
            raise LoaderError(f"hold ring pages must be a power of two, got {self.hold_ring_pages}")
        return [f"-DSRMIG_MAX_SIDS={self.max_sids}", f"-DSRMIG_MAX_VMS={self.max_vms}",
                f"-DSRMIG_HOLD_RING_PAGES={self.hold_ring_pages}",
                f"-DSRMIG_MAX_DOMAIN_PREFIXES={self.max_domain_prefixes}",
                f"-DSRMIG_MAX_VM_PREFIXES={self.max_vm_prefixes or self.max_vms + 16384}"]


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


def compile_program(source: Path, func: str, limits: Limits | None = None, prog_type: str = "XDP",
                    defines: tuple[str, ...] = ()):
    """Compile and verify one function (`prog_type`: a bcc.BPF program type name, XDP or SCHED_CLS);
    returns (bcc.BPF, program fd). `defines`: more -D flags ("NAME=value"). Errors are one line."""
    bcc = _bcc()
    ksrc = kernel_source()
    if ksrc:
        os.environ["BCC_KERNEL_SOURCE"] = ksrc
    cflags = ([f"-I{abi.EBPF_DIR}", "-Wno-unused-function"] + (limits.cflags() if limits else [])
              + [f"-D{d}" for d in defines])
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


def attach(ifname: str, prog_fd: int, mode: str = "native") -> None:
    if mode not in MODES:
        raise LoaderError(f"unknown XDP mode {mode!r}: expected native or generic")
    with netlink.handle() as ipr:
        idx = netlink.ifindex(ifname, ipr)
        try:
            netlink.xdp_attach(idx, prog_fd, MODES[mode], ipr)
        except Exception as e:
            raise LoaderError(f"attaching XDP ({mode}) to {ifname} failed: {e}") from e


def detach(ifname: str) -> bool:
    """Detach whatever XDP program is on `ifname`; False when there was none."""
    with netlink.handle() as ipr:
        idx = netlink.ifindex(ifname, ipr)
        _, mode = netlink.xdp_attached(idx, ipr)
        if mode is None:
            return False
        netlink.xdp_detach(idx, MODES.get(mode, 0), ipr)
        return True


def interfaces_running(prog_id: int) -> list[str]:
    """The interfaces of this namespace that run program `prog_id`."""
    with netlink.handle() as ipr:
        return [name for idx, name in netlink.link_names(ipr).items() if netlink.xdp_attached(idx, ipr)[0] == prog_id]


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

ENCAP_MAPS = ("encap_table", "encap_vm_stats", "encap_stats", "encap_prefixes")
CLSACT_EGRESS = "ffff:fff3"  # the clsact qdisc's egress hook (TC_H_MIN_EGRESS under TC_H_CLSACT)
ENCAP_PRIO = 0x5e6   # our filter's priority and handle on clsact egress, so we find and remove just ours
ENCAP_HANDLE = 0x5e6
ENCAP_NAME = "srmig_encap"


def encap_pin_dir() -> Path:
    return PIN_ROOT / "encap" / netns_key()


def load_encap_pinned_or_compile(limits: Limits | None = None) -> Loaded:
    return _pinned_or_compile(encap_pin_dir(), "encap.c", "srmig_encap", "SCHED_CLS", ENCAP_MAPS,
                              limits or Limits())


def _runs_encap(idx: int, ipr) -> bool:
    """Whether `idx`'s clsact egress holds our bpf filter (False when it has no clsact qdisc)."""
    return ENCAP_PRIO in netlink.bpf_filter_prios(idx, CLSACT_EGRESS, ipr)


def load_encap(ifname: str, limits: Limits | None = None) -> Loaded:
    """`srmig ingress load IFACE`: run the namespace's H.Encaps program on `ifname`'s egress (compiling and
    pinning it the first time). Idempotent: the filter is replaced, other clsact filters are left alone."""
    loaded = load_encap_pinned_or_compile(limits)
    with netlink.handle() as ipr:
        idx = netlink.ifindex(ifname, ipr)
        try:
            netlink.add_clsact(idx, ipr)
        except Exception as e:  # noqa: BLE001
            raise LoaderError(f"adding a clsact qdisc to {ifname} failed: {e} (srmig check: clsact)") from e
        try:
            netlink.add_bpf_filter(idx, loaded.prog_fd, ENCAP_NAME, CLSACT_EGRESS, ENCAP_HANDLE, ENCAP_PRIO,
                                   replace=True, ipr=ipr)
        except Exception as e:  # noqa: BLE001
            raise LoaderError(f"attaching H.Encaps (tc bpf, egress) to {ifname} failed: {e} "
                              f"(srmig check: cls_bpf)") from e
    return loaded


def encap_interfaces() -> list[str]:
    """The interfaces of this namespace whose egress runs our H.Encaps filter."""
    with netlink.handle() as ipr:
        return [name for idx, name in netlink.link_names(ipr).items() if _runs_encap(idx, ipr)]


def unload_encap(ifname: str) -> dict:
    """`srmig ingress unload IFACE`: remove our filter (the clsact qdisc stays: others may use it); when no
    interface of the namespace runs it any more, remove the pins too (which frees the maps)."""
    ensure_bpffs()
    detached = False
    with netlink.handle() as ipr:
        idx = netlink.ifindex(ifname, ipr)
        if _runs_encap(idx, ipr):
            netlink.del_bpf_filter(idx, ENCAP_HANDLE, ENCAP_PRIO, CLSACT_EGRESS, ipr)
            detached = True
    removed = False
    pins = encap_pin_dir()
    if pins.exists() and not encap_interfaces():
        shutil.rmtree(pins, ignore_errors=True)
        removed = True
    return {"interface": ifname, "detached": detached, "pins_removed": removed}
