"""`srmig check`: what this machine's kernel and setup offer, and what srmig will use.

Every feature is tried, never assumed from the kernel version: a tiny BPF program is loaded, a route is
added, a qdisc is attached, in a throwaway network namespace that is removed even when a probe fails (named
like the testbed's namespaces, srmig-<pid>-check<n>, so netns.sweep() removes it should this process die).
The programs are a few raw BPF instructions loaded through libbpf, so missing headers cannot hide a kernel
feature; bcc itself is tried once, by `kernel_headers`. /proc/config.gz, when present, only explains a
failure ("kernel built without CONFIG_X").

Pure probing: the CLI (srmig/cli.py, cmd_check) parses and prints. Other code imports `kernel_srv6()`.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import functools
import gzip
import itertools
import mmap
import os
import platform
import socket
import struct
import subprocess
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

from cffi import FFI


@dataclass(frozen=True)
class Feature:
    required: bool   # srmig's default setup (host and ingress roles, the testbed) cannot run without it
    needed_by: str   # which part of srmig uses it
    degrades: str    # what is lost when it is missing
    fix: str         # how to get it, or how to do without


# The JSON keys of `srmig check --json` ("checks"), in the order they print. Stable: append only.
FEATURES = {
    "kernel_headers": Feature(
        True, "compiling srmig's XDP and tc programs with bcc",
        "srmig cannot compile its programs: nothing loads",
        "apt-get install linux-headers-amd64 python3-bpfcc, then ./run setup (it merges Debian's header trees)"),
    "btf": Feature(
        False, "nothing in srmig (its programs use no CO-RE and no kfuncs)",
        "tools that need the kernel's BTF (bpftrace, CO-RE programs) do not work",
        "a kernel built with CONFIG_DEBUG_INFO_BTF=y"),
    "xdp_native": Feature(
        False, "srmig's XDP program with xdp_mode = \"native\" (the driver's receive path, the fastest)",
        "xdp_mode = \"native\" fails on this device: use xdp_mode = \"generic\" (the skb path, slower)",
        "a NIC driver with native XDP (veth, virtio_net, mlx5, i40e, ...)"),
    "xdp_generic": Feature(
        True, "srmig's XDP program with xdp_mode = \"generic\" (any device) and the testbed's veths",
        "no XDP at all: srmig's End, End.S, End.SBUF and End.DX6-map cannot run",
        "a kernel built with CONFIG_BPF_SYSCALL and CONFIG_NET (XDP is in every kernel >= 4.12)"),
    "bpf_ringbuf": Feature(
        True, "srmig's XDP program: the hold ring and the shadow ring (End.SBUF, the tap drain)",
        "srmig's XDP program does not load", "a kernel >= 5.8"),
    "ringbuf_query": Feature(
        True, "srmig's XDP program: bpf_ringbuf_query tells whether the hold ring is empty",
        "srmig's XDP program does not load", "a kernel >= 5.8"),
    "clsact": Feature(
        True, "H.Encaps in BPF at tc clsact egress: the ingress role (encap = \"bpf\") and the testbed's client",
        "no H.Encaps in BPF: an ingress needs [ingress] encap = \"kernel\" (SRv6 lwtunnels) instead",
        "a kernel built with CONFIG_NET_SCH_INGRESS (clsact)"),
    "cls_bpf": Feature(
        True, "H.Encaps in BPF: a direct-action bpf filter on clsact egress",
        "no H.Encaps in BPF: an ingress needs [ingress] encap = \"kernel\" (SRv6 lwtunnels) instead",
        "a kernel built with CONFIG_NET_CLS_BPF"),
    "pidfd_getfd": Feature(
        False, "the source agent's tap drain (host.drain = true) takes QEMU's tap fd while QEMU is paused",
        "the paused source's tap queue is not drained: frames queued there when QEMU stops are lost",
        "a kernel >= 5.6, the agent as root, no seccomp filter blocking syscalls 434/438; or host.drain = false"),
    "prog_run_live_frames": Feature(
        False, "srmig bench's default generator (--generator live: several Mpps from BPF_PROG_RUN)",
        "srmig bench's live generator is unavailable; --generator trafgen (~0.7 Mpps) sits below every XDP "
        "path, so no NDR/PDR ratio can be measured with it",
        "a kernel >= 5.18 that permits BPF_F_TEST_XDP_LIVE_FRAMES; else srmig bench --generator trafgen"),
    "kernel_srv6": Feature(
        False, "only [ingress] encap = \"kernel\", srmig bench's kernel End/End.DX6 baselines and the interop "
               "tests against this kernel: srmig itself does H.Encaps and End in BPF",
        "encap = \"kernel\" fails `srmig agent --check`; srmig bench reports the kernel baselines as absent",
        "keep [ingress] encap = \"bpf\" (the default); for the kernel paths, a kernel built with "
        "CONFIG_IPV6_SEG6_LWTUNNEL=y"),
}
KEYS = tuple(FEATURES)

Result = tuple[bool, str]  # (ok, what was found or why not)
_ns_ids = itertools.count()


# --- helpers -------------------------------------------------------------------------------------------

@functools.cache
def _kconfig() -> dict[str, str] | None:
    """The running kernel's build config (CONFIG_X -> "y", "m" or a value; unset options are absent), or
    None when the kernel does not expose it."""
    try:
        with gzip.open("/proc/config.gz", "rt") as f:
            lines = f.read().splitlines()
    except OSError:
        return None
    return dict(line.split("=", 1) for line in lines if line.startswith("CONFIG_") and "=" in line)


def _without(option: str) -> str:
    """' (kernel built without CONFIG_X)' when /proc/config.gz says so, else ''."""
    cfg = _kconfig()
    return f" (kernel built without {option})" if cfg is not None and option not in cfg else ""


def _err(e: BaseException) -> str:
    """'EOPNOTSUPP: Operation not supported' for an errno, else the exception's first line."""
    from srmig.netlink import error_code  # noqa: PLC0415 (pyroute2's import cost only when probing)

    code = error_code(e)
    if isinstance(code, int) and code in errno.errorcode:
        name = "EOPNOTSUPP" if code == errno.EOPNOTSUPP else errno.errorcode[code]  # not Python's ENOTSUP alias
        return f"{name}: {os.strerror(code)}"
    return (str(e).splitlines() or [type(e).__name__])[0]


@contextlib.contextmanager
def scratch_netns():
    """A throwaway network namespace with lo up; removed on exit, whatever happened inside (its veths,
    qdiscs, filters, routes and XDP attachments go with it)."""
    from srmig import netlink  # noqa: PLC0415 (pyroute2's import cost only when probing)

    name = f"srmig-{os.getpid()}-check{next(_ns_ids)}"  # srmig.testbed.netns naming: PREFIX<pid>-<role>
    netlink.create_ns(name)
    try:
        yield name
    finally:
        with contextlib.suppress(Exception):
            netlink.remove_ns(name)


@contextlib.contextmanager
def _fds():
    """A list to put fds in; all closed on exit."""
    fds: list[int] = []
    try:
        yield fds
    finally:
        for fd in fds:
            with contextlib.suppress(OSError):
                os.close(fd)


# --- raw BPF programs through libbpf 1.x (every call returns -errno) -----------------------------------

_ffi = FFI()
_ffi.cdef("""
    int bpf_prog_load(int prog_type, const char *prog_name, const char *license, const void *insns,
                      size_t insn_cnt, const void *opts);
    int bpf_map_create(int map_type, const char *map_name, uint32_t key_size, uint32_t value_size,
                       uint32_t max_entries, const void *opts);
""")

# include/uapi/linux/bpf.h, pkt_cls.h, if_link.h
BPF_PROG_TYPE_SCHED_CLS = 3
BPF_PROG_TYPE_XDP = 6
BPF_MAP_TYPE_RINGBUF = 27
BPF_FUNC_ringbuf_query = 134
XDP_DROP, XDP_PASS = 1, 2
TC_ACT_OK = 0
XDP_FLAGS_REPLACE = 16  # the other XDP_FLAGS_* are in srmig.bpf.loader


def _insn(code: int, dst: int = 0, src: int = 0, off: int = 0, imm: int = 0) -> bytes:
    """struct bpf_insn: opcode; dst_reg in the low nibble, src_reg in the high one; s16 off; s32 imm."""
    return struct.pack("<BBhi", code, dst | (src << 4), off, imm)


def _mov(reg: int, imm: int) -> bytes:
    return _insn(0xB7, dst=reg, imm=imm)  # BPF_ALU64 | BPF_MOV | BPF_K


def _returns(value: int) -> bytes:
    return _mov(0, value) + _insn(0x95)  # r0 = value; BPF_JMP | BPF_EXIT


def _ld_map(reg: int, map_fd: int) -> bytes:
    # BPF_LD | BPF_DW | BPF_IMM, src_reg BPF_PSEUDO_MAP_FD: the one 16-byte instruction (two slots).
    return _insn(0x18, dst=reg, src=1, imm=map_fd) + _insn(0)


@functools.cache
def _libbpf():
    return _ffi.dlopen("libbpf.so.1")


def _prog_load(prog_type: int, insns: bytes) -> int:
    fd = _libbpf().bpf_prog_load(prog_type, b"srmig_check", b"GPL", _ffi.from_buffer(insns), len(insns) // 8,
                                 _ffi.NULL)
    if fd < 0:
        raise OSError(-fd, os.strerror(-fd))
    return fd


def _ringbuf_create() -> int:
    fd = _libbpf().bpf_map_create(BPF_MAP_TYPE_RINGBUF, b"srmig_check", 0, 0, mmap.PAGESIZE, _ffi.NULL)
    if fd < 0:
        raise OSError(-fd, os.strerror(-fd))
    return fd


# --- kernel SRv6 (imported by the bench, the tests and `srmig agent --check`) ---------------------------

@functools.cache
def kernel_srv6() -> tuple[bool, str]:
    """Whether the kernel has SRv6 lwtunnels (`encap seg6` and `encap seg6local` routes): (True, "present")
    or (False, "absent: kernel built without CONFIG_IPV6_SEG6_LWTUNNEL"), or another "absent: ..." reason.
    Tried by adding both kinds of route in a throwaway namespace; cached for the life of the process."""
    try:
        with scratch_netns() as ns:
            return _try_srv6(ns)
    except Exception as e:  # no namespace (not root): all that is left is the build config
        cfg = _kconfig()
        if cfg is None:
            return False, f"unknown: cannot try it ({_err(e)}) and there is no /proc/config.gz"
        if "CONFIG_IPV6_SEG6_LWTUNNEL" not in cfg:
            return False, "absent: kernel built without CONFIG_IPV6_SEG6_LWTUNNEL"
        return True, f"present (CONFIG_IPV6_SEG6_LWTUNNEL={cfg['CONFIG_IPV6_SEG6_LWTUNNEL']}; not tried: {_err(e)})"


def _try_srv6(ns: str) -> tuple[bool, str]:
    from srmig import netlink  # noqa: PLC0415

    # seg6local serves End / End.DX6 (transit, the bench's baselines); seg6 encap serves H.Encaps (ingress).
    routes = (("seg6local End", "fc00::e/128", netlink.seg6local("End")),
              ("seg6 encap", "2001:db8::10/128", netlink.seg6_encap(["fc00::e"])))
    with netlink.handle(ns) as ipr:
        lo = netlink.ifindex("lo", ipr)
        for what, dst, encap in routes:
            try:
                netlink.add_route(dst, lo, encap, ipr)
            except Exception as e:
                if netlink.error_code(e) == errno.EOPNOTSUPP and _without("CONFIG_IPV6_SEG6_LWTUNNEL"):
                    return False, "absent: kernel built without CONFIG_IPV6_SEG6_LWTUNNEL"
                return False, f"absent: an `encap {what}` route fails ({_err(e)})"
    return True, "present"


# --- the probes: each returns {key: (ok, detail)} ---------------------------------------------------------

def _kernel_headers() -> dict[str, Result]:
    from srmig.bpf import loader  # noqa: PLC0415

    try:
        src = loader.kernel_source()  # None: the running kernel's own headers, bcc's default
    except loader.LoaderError as e:
        return {"kernel_headers": (False, f"missing: {e}")}
    if src:
        os.environ["BCC_KERNEL_SOURCE"] = src
    try:
        import bcc  # noqa: PLC0415
    except ImportError:
        return {"kernel_headers": (False, "bcc is not importable: apt-get install python3-bpfcc and use the venv "
                                          "./run setup makes (PyPI's 'bcc' is an unrelated project)")}

    # Compiling once is the only real test that a header tree suits bcc ("kconfig.h not found" and such).
    try:
        b = bcc.BPF(text=b"int srmig_check(struct xdp_md *ctx) { return XDP_PASS; }")
        b.cleanup()
    except Exception as e:  # bcc raises bare Exception
        return {"kernel_headers": (False, f"bcc cannot compile with {src or 'the default headers'}: {_err(e)}")}
    return {"kernel_headers": (True, f"{src or f'/lib/modules/{platform.release()}/build'} (bcc compiles)")}


def _btf() -> dict[str, Result]:
    ok = Path("/sys/kernel/btf/vmlinux").exists()
    return {"btf": (ok, "/sys/kernel/btf/vmlinux" if ok else "absent" + _without("CONFIG_DEBUG_INFO_BTF"))}


def _xdp(ns: str, veth: str, interface: str | None) -> dict[str, Result]:
    """XDP_PASS attached and detached in each mode, on `interface` (this namespace) if given, else on a veth
    of the scratch namespace. A program already attached is never replaced: it proves its own mode only."""
    from srmig import netlink  # noqa: PLC0415
    from srmig.bpf import loader  # noqa: PLC0415

    where = interface or "a veth"
    out = {}
    with _fds() as fds, netlink.handle(None if interface else ns) as ipr:
        fds.append(_prog_load(BPF_PROG_TYPE_XDP, _returns(XDP_PASS)))
        idx = netlink.find_ifindex(interface or veth, ipr)
        if idx is None:
            return {f"xdp_{m}": (False, f"not tried: {where} vanished") for m in loader.MODES}
        prog, attached = netlink.xdp_attached(idx, ipr)
        for mode, flags in loader.MODES.items():
            if prog:
                out[f"xdp_{mode}"] = (attached == mode, f"in use on {where}: program {prog} is attached in "
                                      f"{attached} mode" + ("" if attached == mode else f" ({mode} not tried)"))
                continue
            try:
                netlink.xdp_attach(idx, fds[0], flags | loader.XDP_FLAGS_UPDATE_IF_NOEXIST, ipr)
            except Exception as e:
                out[f"xdp_{mode}"] = (False, f"attaching to {where} refused ({_err(e)})")
                continue
            # Detach ours and only ours: REPLACE with EXPECTED_FD leaves a program attached meanwhile alone.
            try:
                netlink.xdp_detach(idx, flags | XDP_FLAGS_REPLACE, ipr, expected_fd=fds[0])
            except Exception:  # a kernel < 5.7 knows no REPLACE; NOEXIST above made the attached one ours
                netlink.xdp_detach(idx, flags, ipr)
            out[f"xdp_{mode}"] = (True, f"attached and detached on {where}")
    return out


def _ringbuf() -> dict[str, Result]:
    with _fds() as fds:
        try:
            fds.append(_ringbuf_create())
            mmap.mmap(fds[0], mmap.PAGESIZE, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE).close()
        except OSError as e:
            return {"bpf_ringbuf": (False, f"a ring buffer map fails ({_err(e)})"),
                    "ringbuf_query": (False, "not tried: no ring buffer")}
        try:
            # r1 = the ring, r2 = 0, call bpf_ringbuf_query: the verifier refuses a helper it does not know.
            fds.append(_prog_load(BPF_PROG_TYPE_XDP, _ld_map(1, fds[0]) + _mov(2, 0)
                                  + _insn(0x85, imm=BPF_FUNC_ringbuf_query) + _returns(XDP_PASS)))
            query = (True, "an XDP program calling bpf_ringbuf_query loads")
        except OSError as e:
            query = (False, f"the verifier refuses bpf_ringbuf_query ({_err(e)})")
    return {"bpf_ringbuf": (True, "a BPF_MAP_TYPE_RINGBUF map was created and mapped"), "ringbuf_query": query}


def _tc(ns: str, veth: str) -> dict[str, Result]:
    from srmig import netlink  # noqa: PLC0415

    with _fds() as fds, netlink.handle(ns) as ipr:
        idx = netlink.ifindex(veth, ipr)
        try:
            netlink.add_clsact(idx, ipr)
        except Exception as e:
            return {"clsact": (False, f"refused ({_err(e)}){_without('CONFIG_NET_SCH_INGRESS')}"),
                    "cls_bpf": (False, "not tried: no clsact")}
        out = {"clsact": (True, "a clsact qdisc was added on a veth")}
        try:
            fds.append(_prog_load(BPF_PROG_TYPE_SCHED_CLS, _returns(TC_ACT_OK)))
            # ffff:fff3: clsact's egress hook
            netlink.add_bpf_filter(idx, fds[0], "srmig_check", parent="ffff:fff3", filter_handle=":1", ipr=ipr)
            out["cls_bpf"] = (True, "a direct-action bpf filter was attached at clsact egress")
        except Exception as e:
            out["cls_bpf"] = (False, f"refused ({_err(e)}){_without('CONFIG_NET_CLS_BPF')}")
    return out


SYS_pidfd_open = 434
SYS_pidfd_getfd = 438


def _pidfd_getfd() -> dict[str, Result]:
    libc = ctypes.CDLL(None, use_errno=True)

    def refused(name: str) -> dict[str, Result]:
        return {"pidfd_getfd": (False, f"{name} refused ({_err(OSError(ctypes.get_errno(), ''))})")}

    child = subprocess.Popen(["sleep", "10"], stdin=subprocess.DEVNULL)  # stands in for QEMU: take its fd 0
    pidfd = fd = -1
    try:
        pidfd = libc.syscall(SYS_pidfd_open, child.pid, 0)
        if pidfd < 0:
            return refused("pidfd_open")
        fd = libc.syscall(SYS_pidfd_getfd, pidfd, 0, 0)
        if fd < 0:
            return refused("pidfd_getfd")
        return {"pidfd_getfd": (True, "took a child's fd with pidfd_open (434) and pidfd_getfd (438)")}
    finally:
        for x in (fd, pidfd):
            if x >= 0:
                os.close(x)
        child.kill()
        child.wait()


def _live_frames(ns: str, veth: str) -> dict[str, Result]:
    from srmig import netlink  # noqa: PLC0415
    from srmig.bpf import libbpf  # noqa: PLC0415

    with _fds() as fds:
        fds.append(_prog_load(BPF_PROG_TYPE_XDP, _returns(XDP_DROP)))
        # As the bench does it: a batch of frames "received" on a veth of the calling thread's namespace
        # (setns); the program drops them all, so nothing is sent anywhere.
        with netlink.inside(ns):
            try:
                libbpf.prog_test_run_live(fds[0], bytes(64), repeat=64,
                                          ingress_ifindex=socket.if_nametoindex(veth))
            except OSError as e:
                return {"prog_run_live_frames": (False, f"refused ({_err(e)})")}
    return {"prog_run_live_frames": (True, "BPF_PROG_RUN with BPF_F_TEST_XDP_LIVE_FRAMES ran 64 frames")}


def _probe(keys: tuple[str, ...], probe: Callable[[], dict[str, Result]]) -> dict[str, Result]:
    """A probe that crashes reports its exception on each of its keys instead of ending the check."""
    try:
        return probe()
    except Exception as e:
        return {k: (False, f"probe failed ({type(e).__name__}: {_err(e)})") for k in keys}


def run(interface: str | None = None) -> dict:
    """Every probe (about 1 s, most of it bcc's compile); the JSON document of `srmig check --json`."""
    if os.geteuid() != 0:  # else every BPF and netlink probe fails with EPERM and blames the kernel
        raise ValueError("srmig check loads BPF programs and creates a network namespace: run it as root")
    if interface is not None:
        try:
            socket.if_nametoindex(interface)
        except OSError:
            raise ValueError(f"no interface {interface!r} in this network namespace") from None
    found: dict[str, Result] = {}
    found |= _probe(("kernel_headers",), _kernel_headers)
    found |= _probe(("btf",), _btf)
    in_ns = ("xdp_native", "xdp_generic", "clsact", "cls_bpf", "prog_run_live_frames")
    try:
        from srmig import netlink  # noqa: PLC0415

        with scratch_netns() as ns:
            with netlink.handle(ns) as ipr:
                netlink.add_veth("check0", "check1", ipr)
                netlink.set_link_up(netlink.ifindex("check0", ipr), ipr)
            found |= _probe(in_ns[:2], lambda: _xdp(ns, "check0", interface))
            found |= _probe(in_ns[2:4], lambda: _tc(ns, "check0"))
            found |= _probe(in_ns[4:], lambda: _live_frames(ns, "check0"))
    except Exception as e:
        for k in in_ns:
            found.setdefault(k, (False, f"not tried: no scratch namespace with a veth ({_err(e)}; root?)"))
    found |= _probe(("bpf_ringbuf", "ringbuf_query"), _ringbuf)
    found |= _probe(("pidfd_getfd",), _pidfd_getfd)
    found["kernel_srv6"] = kernel_srv6()
    checks = {k: {"ok": found[k][0], "detail": found[k][1], **asdict(f)}
              for k, f in FEATURES.items()}
    missing = [k for k, c in checks.items() if c["required"] and not c["ok"]]
    return {
        "kernel": platform.release(),
        "interface": interface,
        "kernel_srv6": found["kernel_srv6"][0],
        "ok": not missing,  # every required feature is there: `srmig check` exits 0
        "missing_required": missing,
        # What srmig will use on this machine: its defaults where they work, else the fallback.
        "uses": {
            "xdp_mode": "native" if found["xdp_native"][0] else "generic",
            "ingress_encap": "bpf",
            "transit_end": "xdp",
            "bench_generator": "live" if found["prog_run_live_frames"][0] else "clone",
            "tap_drain": found["pidfd_getfd"][0],
        },
        "checks": checks,
    }
