"""The test guest: a Debian kernel and a busybox-static initramfs, built from Debian packages, idempotently.

    python -m srmig.testbed.guest build [--quiet] [--force]

Output, in /var/lib/srmig/guest/ (override with SRMIG_GUEST_DIR):
    vmlinuz      the kernel of the newest `linux-image-<v>-amd64` apt knows (depends of linux-image-amd64)
    vmlinux      the same kernel decompressed (ELF, PVH entry): what QEMU boots, ~2.5 s faster under TCG
                 (only when the kernel has CONFIG_PVH; otherwise vmlinuz is booted)
    initrd.gz    busybox-static, the virtio/virtio_net modules of that same kernel .deb, the host's iproute2
                 `ip` and ethtool with the shared libraries they link (busybox's `ip` knows no seg6/seg6local;
                 busybox has no ethtool), and /init
    stamp.json   what was built; `is_built()` only checks it, so a second `build` returns at once

The guest's /init (see INIT below) mounts proc/sys/dev, loads the modules in the order that works
(docs/platform.md), disables DAD, autoconfiguration and every ICMPv6 rate limit, gives eth0 a pfifo_fast
qdisc of 10000 (Debian's default fq_codel drops echo replies once they queue > 5 ms), keeps the
gateway's neighbour entry reachable for an hour (no ND around a migration), configures eth0 from the kernel
command line and idles. Measured under TCG on 2 cores: ~12,500 echo requests/s answered by the kernel without
loss for 2 s; beyond (~15 k/s) the guest drops replies itself (Ip6OutDiscards / Icmp6OutErrors count them).
With srmig.echo=xdp an XDP program on eth0 answers them instead (srmig/testbed/echo_xdp.c): 20,000/s (10,000
per family) with a round trip of ~0.3 ms, where the kernel queued them for ~1 s (docs/platform.md).

    srmig.addr=2001:db8:100::10/64   IPv6 address and prefix of eth0 (required for IPv6 networking)
    srmig.gw=fe80::1                 IPv6 default gateway on eth0 (the anycast gateway; default fe80::1)
    srmig.addr4=198.51.100.10/24     optional: IPv4 address and prefix of eth0 (a dual-stack guest)
    srmig.gw4=198.51.100.1           IPv4 default gateway on eth0 (the anycast gateway every host presents:
                                     the same address and MAC on every host's tap, docs/operations.md)
    srmig.stats=N                    optional: print a counters line on the console every N seconds
    srmig.ctl=ttyS1                  the control serial port (default ttyS1)
    srmig.echo=xdp                   optional: answer ICMPv6 / ICMP echo requests in XDP on eth0 (XDP_TX), not in
                                     the kernel's stack, with an RX ring of XDP_RX_RING slots, half the TX ring (a
                                     reply that finds the TX ring full is lost); the `stats` answer then carries
                                     `srmig_echo_xdp 1`

Reading the guest's own counters from the host: the second serial port (ttyS1, a unix socket on the host)
is a tiny line protocol, raw mode, no echo, spoken by srmig.testbed.qemu.Qemu.guest_stats(). The host
writes `stats TOKEN\\n`; the guest answers `BEGIN TOKEN`, every line of /proc/net/snmp6
(`Icmp6InEchos 123`), every line of /proc/net/snmp (IPv4: header and value lines, `Icmp: InMsgs ...` then
`Icmp: 12 ...`, which srmig.testbed.qemu.parse_stats turns into `IcmpInEchos 12`, as nstat names them), the eth0
device counters as `eth0_<name> <value>` (/sys/class/net/eth0/statistics) and the driver's per queue
(`ethtool -S eth0`: `eth0_tx_queue_0_xdp_tx_drops 0`, ...), then `END TOKEN`. `ping TOKEN` answers
`PONG TOKEN`; `sh TOKEN COMMAND...` runs a shell command and answers its output between BEGIN and END (a
debugging aid: Qemu.guest_shell()). The console (ttyS0) shows `SRMIG-GUEST-READY addr=...` once eth0 is
configured and, with srmig.stats=N, periodic `SRMIG-STATS Icmp6InEchos=.. Icmp6OutEchoReplies=..` lines.

The guest as an SRv6 peer: Debian's kernel has SRv6 built in (CONFIG_IPV6_SEG6_LWTUNNEL=y, checked at build
time, recorded as "kernel_srv6" in stamp.json) and `ip` in the guest is iproute2's, so `ip -6 route add ...
encap seg6 ...` / `encap seg6local action End.DX6 ...` work over the control line (Qemu.guest_shell();
srmig.testbed.srv6_peer sets a guest up as a kernel SRv6 node). Call it as /usr/sbin/ip: Debian's busybox
shell runs its own applets (busybox `ip`, which /init uses) before it looks at PATH. iproute2 and its
libraries grow the initrd from ~1.1 to ~2.7 MiB (gzip): the kernel unpacks it ~0.1-0.25 s longer under TCG
(guest clock, 4 boots each); the time to SRMIG-GUEST-READY stayed within run-to-run noise (median 3.8 vs
3.9 s wall, 6 boots each, on 2 busy cores).
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import io
import json
import lzma
import os
import re
import shutil
import stat
import subprocess
import sys
import tarfile
import tempfile
import time
import zlib
from dataclasses import dataclass
from pathlib import Path

from srmig.testbed import echo_xdp

DEFAULT_DIR = "/var/lib/srmig/guest"
KERNEL_META = "linux-image-amd64"
BUSYBOX_PKG = "busybox-static"
IPROUTE2_PKG = "iproute2"
# Debian's iproute2 `ip` (a symlink to /bin/ip on the host); in the guest a plain file at the same path. Call it
# by that path: Debian's busybox shell runs its own applets (busybox `ip` in /sbin) before any PATH lookup.
IPROUTE2_IP = "/usr/sbin/ip"
# insmod order that works for a Debian kernel (docs/platform.md); a module built into the kernel is skipped.
MODULES = ["virtio_ring", "virtio", "virtio_pci_legacy_dev", "virtio_pci_modern_dev", "virtio_pci",
           "failover", "net_failover", "virtio_net"]
RECIPE_VERSION = 6  # bump when the layout of the image changes
ETHTOOL_PKG = "ethtool"
ETHTOOL = "/usr/sbin/ethtool"  # in the guest: its virtio-net RX ring (srmig.echo=xdp) and per-queue counters
XDP_RX_RING = 128  # srmig.echo=xdp: the guest's RX ring, half its TX ring (/init says why)
ECHO_XDP_OBJECT = "/lib/srmig/echo-xdp.o"  # srmig.echo=xdp: /init loads it on eth0 (srmig.testbed.echo_xdp)
ECHO_MODES = ("kernel", "xdp")

INIT = r"""#!/bin/sh
# srmig test guest /init (busybox). See srmig/testbed/guest.py for the kernel command line it reads.
export PATH=/bin:/sbin:/usr/bin:/usr/sbin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev 2>/dev/null
mkdir -p /dev/pts /tmp /run
log() { echo "srmig-guest: $*" >/dev/console; }

ADDR=; GW=fe80::1; ADDR4=; GW4=; STATS=0; CTL=/dev/ttyS1; ECHO=kernel
for arg in $(cat /proc/cmdline); do
    case "$arg" in
        srmig.addr=*) ADDR=${arg#srmig.addr=} ;;
        srmig.gw=*) GW=${arg#srmig.gw=} ;;
        srmig.addr4=*) ADDR4=${arg#srmig.addr4=} ;;
        srmig.gw4=*) GW4=${arg#srmig.gw4=} ;;
        srmig.stats=*) STATS=${arg#srmig.stats=} ;;
        srmig.ctl=*) CTL=/dev/${arg#srmig.ctl=} ;;
        srmig.echo=*) ECHO=${arg#srmig.echo=} ;;
    esac
done

# Before any interface exists: no DAD, no autoconfiguration, no ICMPv6 rate limiting of any kind.
for k in all default; do
    sysctl -qw net.ipv6.conf.$k.accept_dad=0 net.ipv6.conf.$k.dad_transmits=0 \
        net.ipv6.conf.$k.accept_ra=0 net.ipv6.conf.$k.autoconf=0 net.ipv6.conf.$k.forwarding=0 \
        net.ipv6.conf.$k.router_solicitations=0 net.ipv6.conf.$k.disable_ipv6=0
done
sysctl -qw net.ipv6.icmp.ratelimit=0 net.ipv4.icmp_ratelimit=0 \
    net.ipv4.icmp_msgs_per_sec=100000000 net.ipv4.icmp_msgs_burst=100000000 \
    net.ipv6.icmp.echo_ignore_all=0 net.core.netdev_max_backlog=10000 \
    net.core.rmem_max=16777216 net.core.wmem_max=16777216 2>/dev/null
# Before eth0 exists: a plain FIFO (Debian's default fq_codel drops replies once they queue > 5 ms).
sysctl -qw net.core.default_qdisc=pfifo_fast 2>/dev/null
# Kernels >= 6.2 only: errors here are harmless on 6.1.
sysctl -qw net.ipv6.icmp.ratemask=0 2>/dev/null

for m in $(cat /lib/modules/srmig-order); do
    args=
    # Without TX NAPI the driver orphans a reply once it is in the TX ring: the ICMPv6 socket's fixed
    # sndbuf (2 x 64 KiB) then bounds only what waits in the qdisc, not what QEMU has yet to transmit.
    [ "$m" = virtio_net ] && args=napi_tx=0
    insmod /lib/modules/$m.ko $args || log "insmod $m failed"
done
i=0
while [ ! -e /sys/class/net/eth0 ] && [ $i -lt 100 ]; do sleep 0.05; i=$((i+1)); done
[ -e /sys/class/net/eth0 ] || log "no eth0"
sysctl -qw net.ipv6.conf.eth0.accept_dad=0 net.ipv6.conf.eth0.dad_transmits=0 \
    net.ipv6.conf.eth0.accept_ra=0 net.ipv6.conf.eth0.autoconf=0 2>/dev/null
ip link set lo up
ip link set eth0 qlen 10000
# Keep the gateway's neighbour entry REACHABLE for long: no ND probes (IPv4: no ARP) around a migration. The
# entry stays right after a move: every host answers for the gateway with the same MAC.
sysctl -qw net.ipv6.neigh.eth0.base_reachable_time_ms=3600000 2>/dev/null
sysctl -qw net.ipv4.neigh.eth0.base_reachable_time_ms=3600000 2>/dev/null
ip link set eth0 up
if [ -n "$ADDR" ]; then
    ip -6 addr add "$ADDR" dev eth0 || log "address $ADDR failed"
fi
ip -6 route add default via "$GW" dev eth0 || log "default route via $GW failed"
if [ -n "$ADDR4" ]; then
    ip -4 addr add "$ADDR4" dev eth0 || log "address $ADDR4 failed"
    # onlink: the gateway need not be inside the guest's prefix (a /32 guest works too).
    # (iproute2's ip: busybox's does not know onlink everywhere.)
    [ -n "$GW4" ] && { /usr/sbin/ip -4 route add default via "$GW4" dev eth0 onlink \
        || log "default route via $GW4 failed"; }
fi

# srmig.echo=xdp: echo requests are answered by an XDP program on eth0 (srmig/testbed/echo_xdp.c), before
# the stack: ~3x less of the vCPU per echo under TCG. The kernel's ICMP counters then no longer see them.
# XDP_TX has no queue: a reply that finds the TX ring full is dropped (QEMU gives a tap's TX ring 256 slots,
# no more). While QEMU's I/O thread is off the CPU the vCPU still answers every frame the RX ring holds, on top
# of the replies QEMU has not taken yet: with RX as long as TX, a full RX ring and one NAPI poll's replies (64)
# waiting lose those 64. An RX ring half the TX ring leaves room for 128 replies waiting (docs/platform.md).
if [ "$ECHO" = xdp ]; then
    /usr/sbin/ethtool -G eth0 rx 128 || log "RX ring not shortened"
    /usr/sbin/ip link set dev eth0 xdp obj /lib/srmig/echo-xdp.o sec xdp \
        || { log "XDP echo responder failed"; ECHO=kernel; }
fi

counters() {
    while read -r k v; do
        case "$k" in Icmp6InEchos|Icmp6OutEchoReplies|Ip6InReceives|Ip6OutRequests|Ip6InDiscards|Ip6OutDiscards)
            printf '%s=%s ' "$k" "$v" ;;
        esac
    done </proc/net/snmp6
    printf 'eth0_rx_packets=%s eth0_tx_packets=%s\n' "$(cat /sys/class/net/eth0/statistics/rx_packets)" \
        "$(cat /sys/class/net/eth0/statistics/tx_packets)"
}

control() {
    while :; do
        stty -F "$CTL" raw -echo 2>/dev/null
        while read -r cmd tok rest; do
            case "$cmd" in
                stats)
                    echo "BEGIN $tok"
                    cat /proc/net/snmp6 /proc/net/snmp
                    for f in /sys/class/net/eth0/statistics/*; do echo "eth0_${f##*/} $(cat "$f")"; done
                    # the driver's own, per queue (tx_queue_0_xdp_tx_drops: replies XDP_TX found no room for)
                    /usr/sbin/ethtool -S eth0 2>/dev/null | while read -r k v; do
                        case "$k" in *:) echo "eth0_${k%:} $v" ;; esac
                    done
                    [ "$ECHO" = xdp ] && echo "srmig_echo_xdp 1"
                    echo "END $tok" ;;
                ping) echo "PONG $tok" ;;
                sh)
                    echo "BEGIN $tok"
                    sh -c "$rest" 2>&1 </dev/null
                    echo "END $tok" ;;
                "") ;;
                *) echo "ERR $tok" ;;
            esac
        done <"$CTL" >"$CTL"
        sleep 0.2
    done
}

[ -e "$CTL" ] && control &
if [ "$STATS" -gt 0 ] 2>/dev/null; then
    (while :; do sleep "$STATS"; echo "SRMIG-STATS $(counters)" >/dev/console; done) &
fi
echo "SRMIG-GUEST-READY addr=$ADDR addr4=$ADDR4 echo=$ECHO" >/dev/console
while :; do sleep 3600; done
"""


@dataclass(frozen=True)
class GuestImage:
    kernel: Path
    initrd: Path
    kernel_version: str = ""
    kernel_package: str = ""
    kernel_srv6: bool | None = None   # CONFIG_IPV6_SEG6_LWTUNNEL=y in the guest kernel's config (None: unknown)


class MissingPackage(RuntimeError):
    """A Debian package the guest needs is not available (named in the message)."""


XDP_TX_DROPS = re.compile(r"eth0_tx_queue_\d+_xdp_tx_drops")  # per TX queue (ethtool -S eth0, virtio_net)
# The guest's echo counters per address family: (requests received, replies sent), as parse_stats names them
# (/proc/net/snmp6 for IPv6; /proc/net/snmp's Icmp line for IPv4).
ECHO_COUNTERS = {"6": ("Icmp6InEchos", "Icmp6OutEchoReplies"), "4": ("IcmpInEchos", "IcmpOutEchoReps")}
OUT_DISCARDS = {"6": "Ip6OutDiscards", "4": "IpOutDiscards"}


def unanswered(counters: dict, lost: int, family: str = "6") -> int:
    """Of `lost` probes, the requests the guest received and left unanswered, by its own counters (their
    difference over a run; 0 if it could not say). After a burst (a resume, an abort's return) a TCG guest
    makes replies faster than QEMU transmits them, and its kernel's ICMPv6 socket holds at most 2 x 64 KiB
    of replies not yet sent (a fixed sndbuf): it drops the rest (Icmp6OutErrors, Ip6OutDiscards). The probe
    counts them lost; nothing on the network lost them. `family`: "6" (ICMPv6 echo) or "4" (ICMP echo).

    A guest answering in XDP (srmig.echo=xdp; its counters carry `srmig_echo_xdp`) has no per-family echo
    counters: its driver's XDP_TX drops (a reply that found the TX ring full), summed over its queues, are
    the unanswered ones of both families together, so each family's figure is that total, capped by its loss.
    An image without ethtool has no per-queue counters: then the frames eth0 received and did not send, which
    the guest's own frames (a gratuitous ARP and NA after a move, MLD) understate by about 20."""
    if "srmig_echo_xdp" in counters:
        drops = [v for k, v in counters.items() if XDP_TX_DROPS.fullmatch(k)]
        if drops:
            return min(lost, max(0, sum(drops)))
        if "eth0_rx_packets" not in counters or "eth0_tx_packets" not in counters:
            return 0
        return min(lost, max(0, counters["eth0_rx_packets"] - counters["eth0_tx_packets"]))
    requests, replies = ECHO_COUNTERS[family]
    if requests not in counters or replies not in counters:
        return 0
    return min(lost, max(0, counters[requests] - counters[replies]))


def guest_dir() -> Path:
    return Path(os.environ.get("SRMIG_GUEST_DIR", DEFAULT_DIR))


def _recipe() -> str:
    h = hashlib.sha256()
    h.update(f"{RECIPE_VERSION}\n{' '.join(MODULES)}\n".encode())
    h.update(INIT.encode())
    h.update(echo_xdp.SOURCE.read_bytes())  # the source, not the object: is_built() stays cheap (no compiler)
    return h.hexdigest()[:16]


def _stamp_path(d: Path) -> Path:
    return d / "stamp.json"


def _read_stamp(d: Path) -> dict | None:
    try:
        st = json.loads(_stamp_path(d).read_text())
    except (OSError, ValueError):
        return None
    if st.get("recipe") != _recipe():
        return None
    if not (d / st.get("kernel", "vmlinuz")).is_file() or not (d / st.get("initrd", "initrd.gz")).is_file():
        return None
    return st


def is_built() -> bool:
    """Cheap: the stamp matches this recipe and both files exist (no apt, no subprocess)."""
    return _read_stamp(guest_dir()) is not None


def image() -> GuestImage:
    """The built image; raises FileNotFoundError if `build()` has not run."""
    d = guest_dir()
    st = _read_stamp(d)
    if st is None:
        raise FileNotFoundError(f"guest image not built in {d}: python -m srmig.testbed.guest build")
    return GuestImage(d / st["kernel"], d / st["initrd"], st.get("kernel_version", ""), st.get("kernel_package", ""),
                      st.get("kernel_srv6"))


# --- apt helpers --------------------------------------------------------------------------------------

def _run(argv: list[str], timeout: float = 600, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(argv, capture_output=True, text=True, timeout=timeout, **kw)


def _version_gt(a: str, b: str) -> bool:
    return _run(["dpkg", "--compare-versions", a, "gt", b], timeout=30).returncode == 0


def newest_kernel_package() -> tuple[str, str]:
    """(package, version) of the newest linux-image-<v>-amd64 that some version of linux-image-amd64
    apt knows depends on. Raises MissingPackage if apt knows none."""
    if not shutil.which("apt-cache"):
        raise MissingPackage(f"{KERNEL_META}: apt-cache not found (not a Debian system?)")
    out = _run(["apt-cache", "show", KERNEL_META], timeout=60)
    best: tuple[str, str] | None = None
    for block in out.stdout.split("\n\n"):
        fields = {}
        for line in block.splitlines():
            if ":" in line and not line.startswith(" "):
                k, v = line.split(":", 1)
                fields[k.strip()] = v.strip()
        version, depends = fields.get("Version"), fields.get("Depends", "")
        if not version:
            continue
        for dep in depends.split(","):
            name = dep.strip().split(" ")[0].split("|")[0]
            if name.startswith("linux-image-") and name != KERNEL_META:
                if best is None or _version_gt(version, best[1]):
                    best = (name, version)
    if best is None:
        raise MissingPackage(f"{KERNEL_META}: apt knows no version of it (run apt-get update)")
    # The version of the image package itself (the meta package's version string usually matches).
    pol = _run(["apt-cache", "policy", best[0]], timeout=60)
    for line in pol.stdout.splitlines():
        if line.strip().startswith("Candidate:"):
            cand = line.split(":", 1)[1].strip()
            if cand and cand != "(none)":
                return best[0], cand
    raise MissingPackage(f"{best[0]}: no installable candidate (run apt-get update)")


def fetch_deb(pkg: str, version: str | None, cache: Path, log) -> Path:
    """The .deb of `pkg` (=version): from our cache, apt's archive cache, or `apt-get download`."""
    cache.mkdir(parents=True, exist_ok=True)
    pattern = f"{pkg}_*.deb"
    want_ver = version.replace(":", "%3a") if version else None
    for d in (cache, Path("/var/cache/apt/archives")):
        for p in sorted(d.glob(pattern)):
            if want_ver is None or p.name.startswith(f"{pkg}_{want_ver}_"):
                return p
    log(f"downloading {pkg}{'=' + version if version else ''}")
    spec = f"{pkg}={version}" if version else pkg
    r = _run(["apt-get", "download", "-q", spec], cwd=str(cache))
    if r.returncode != 0:
        msg = (r.stderr.strip().splitlines() or ["apt-get download failed"])[-1]
        raise MissingPackage(f"{pkg}: {msg}")
    found = sorted(cache.glob(pattern))
    if not found:
        raise MissingPackage(f"{pkg}: apt-get download produced no .deb")
    return found[-1]


def _norm(name: str) -> str:
    """A tar member name as an absolute path: "./boot/x" -> "/boot/x"."""
    return os.path.normpath("/" + name).replace("//", "/")


def _deb_members(deb: Path, want) -> dict[str, bytes]:
    """Stream the data tar of a .deb (like `dpkg -x`, but only the members `want(name)` selects)."""
    proc = subprocess.Popen(["dpkg-deb", "--fsys-tarfile", str(deb)], stdout=subprocess.PIPE)
    got: dict[str, bytes] = {}
    links: dict[str, str] = {}
    try:
        with tarfile.open(fileobj=proc.stdout, mode="r|") as tf:
            for m in tf:
                name = _norm(m.name)
                if not want(name):
                    continue
                if m.isfile():
                    got[name] = tf.extractfile(m).read()
                elif m.issym() or m.islnk():
                    links[name] = m.linkname
    finally:
        if proc.stdout:
            proc.stdout.close()
        rc = proc.wait(timeout=120)
    if rc != 0:
        raise RuntimeError(f"dpkg-deb --fsys-tarfile {deb} failed ({rc})")
    for name, target in links.items():  # resolve symlinks inside the package (e.g. a merged-/usr layout)
        t = _norm(target if target.startswith("/") else os.path.join(os.path.dirname(name), target))
        if t in got:
            got[name] = got[t]
    return got


def _decompress_module(name: str, data: bytes) -> bytes:
    if name.endswith(".ko"):
        return data
    if name.endswith(".ko.xz"):
        return lzma.decompress(data)
    if name.endswith(".ko.gz"):
        return gzip.decompress(data)
    if name.endswith(".ko.zst"):
        try:
            import zstandard  # type: ignore
            return zstandard.ZstdDecompressor().decompressobj().decompress(data)
        except ImportError:
            pass
        if not shutil.which("zstd"):
            raise MissingPackage(f"zstd: needed to decompress {name} (apt-get install zstd)")
        return subprocess.run(["zstd", "-dc"], input=data, capture_output=True, check=True, timeout=60).stdout
    raise ValueError(f"unknown module format: {name}")


# --- cpio (newc) --------------------------------------------------------------------------------------

class Cpio:
    """A minimal `cpio -H newc` writer, so ownership and device nodes need no root or fakeroot."""

    def __init__(self):
        self.buf = io.BytesIO()
        self.ino = 1
        self.names: set[str] = set()

    def _entry(self, name: str, mode: int, data: bytes = b"", rdev: tuple[int, int] = (0, 0)) -> None:
        name = name.lstrip("/")
        if name in self.names:
            return
        self.names.add(name)
        nameb = name.encode() + b"\0"
        hdr = "070701" + "".join(f"{v:08X}" for v in (
            self.ino, mode, 0, 0, 1, 0, len(data), 0, 0, rdev[0], rdev[1], len(nameb), 0))
        self.ino += 1
        self.buf.write(hdr.encode() + nameb)
        self.buf.write(b"\0" * (-(110 + len(nameb)) % 4))
        self.buf.write(data)
        self.buf.write(b"\0" * (-len(data) % 4))

    def dir(self, name: str) -> None:
        parts = [p for p in name.strip("/").split("/") if p not in ("", ".")]
        for i in range(1, len(parts) + 1):
            self._entry("/".join(parts[:i]), stat.S_IFDIR | 0o755)

    def file(self, name: str, data: bytes, mode: int = 0o644) -> None:
        self.dir(os.path.dirname(name.strip("/")))
        self._entry(name, stat.S_IFREG | mode, data)

    def symlink(self, name: str, target: str) -> None:
        self._entry(name, stat.S_IFLNK | 0o777, target.encode())

    def chardev(self, name: str, major: int, minor: int, mode: int = 0o600) -> None:
        self._entry(name, stat.S_IFCHR | mode, rdev=(major, minor))

    def finish(self) -> bytes:
        self._entry("TRAILER!!!", 0)
        return self.buf.getvalue()


# --- build --------------------------------------------------------------------------------------------

def _extract_vmlinux(bzimage: bytes) -> bytes | None:
    """The ELF vmlinux inside a bzImage (like scripts/extract-vmlinux), or None. QEMU boots an ELF kernel
    with a PVH entry note directly, which saves the ~2-3 s the bzImage spends decompressing itself under
    TCG."""
    def xz(b):
        return lzma.LZMADecompressor(format=lzma.FORMAT_XZ).decompress(b)

    def gz(b):
        return zlib.decompressobj(16 + zlib.MAX_WBITS).decompress(b)

    def zst(b):
        if not shutil.which("zstd"):
            return b""
        r = subprocess.run(["zstd", "-dc"], input=b, capture_output=True, timeout=120)
        return r.stdout
    for magic, fn in ((b"\xfd7zXZ\x00", xz), (b"\x28\xb5\x2f\xfd", zst), (b"\x1f\x8b\x08\x00", gz)):
        start = 0
        while (i := bzimage.find(magic, start)) >= 0:
            start = i + 1
            try:
                out = fn(bzimage[i:])
            except (lzma.LZMAError, zlib.error, OSError, subprocess.SubprocessError):
                continue
            if out[:4] == b"\x7fELF":
                return out
    return None


def _busybox_binary(cache: Path, log) -> tuple[bytes, str]:
    """busybox-static's binary: from the installed package if there is one, else from its .deb."""
    q = _run(["dpkg-query", "-W", "-f=${Status} ${Version}", BUSYBOX_PKG], timeout=30)
    if q.returncode == 0 and q.stdout.startswith("install ok installed"):
        files = _run(["dpkg-query", "-L", BUSYBOX_PKG], timeout=30).stdout.split()
        for f in files:
            if f.endswith("/busybox") and os.path.isfile(f) and not os.path.islink(f):
                return Path(f).read_bytes(), q.stdout.split()[-1]
    deb = fetch_deb(BUSYBOX_PKG, None, cache, log)
    got = _deb_members(deb, lambda n: n.endswith("/bin/busybox"))
    for name in sorted(got):
        return got[name], deb.name
    raise MissingPackage(f"{BUSYBOX_PKG}: no bin/busybox in {deb.name}")


def _host_program_files(pkg: str, program: str) -> tuple[dict[str, bytes], str]:
    """The host's `program` (of Debian package `pkg`) and what it needs to run, as {path in the image: bytes},
    and the package version. The libraries are the ones `ldd` resolves, stored at the paths ldd names
    (glibc's built-in search path on Debian covers /lib/x86_64-linux-gnu, so no ld.so.cache is needed) and
    the dynamic loader at the path the binary asks for (PT_INTERP, e.g. /lib64/ld-linux-x86-64.so.2), all as
    plain files: the host's symlinks (merged /usr) mean nothing in the initramfs."""
    q = _run(["dpkg-query", "-W", "-f=${Status} ${Version}", pkg], timeout=30)
    real = os.path.realpath(program)
    if not (q.returncode == 0 and q.stdout.startswith("install ok installed")) or not os.path.isfile(real):
        raise MissingPackage(f"{pkg}: {program} not installed (apt-get install {pkg})")
    if not shutil.which("ldd"):
        raise MissingPackage("libc-bin: ldd not found")
    out = _run(["ldd", real], timeout=30)
    if out.returncode != 0:
        raise RuntimeError(f"ldd {real} failed: {out.stderr.strip() or out.stdout.strip()}")
    files = {program.lstrip("/"): Path(real).read_bytes()}
    for line in out.stdout.splitlines():
        # "libbpf.so.1 => /lib/x86_64-linux-gnu/libbpf.so.1 (0x...)", "/lib64/ld-linux-x86-64.so.2 (0x...)",
        # "linux-vdso.so.1 (0x...)" (in the kernel, no file).
        parts = line.split()
        path = parts[2] if len(parts) >= 3 and parts[1] == "=>" else parts[0] if parts else ""
        if path == "not":
            raise MissingPackage(f"{pkg}: {real} needs a library that is not installed: {line.strip()}")
        if path.startswith("/"):
            files[path.lstrip("/")] = Path(os.path.realpath(path)).read_bytes()
    if not any("ld-linux" in name for name in files):
        raise RuntimeError(f"ldd {real} named no dynamic loader: {out.stdout.strip()}")
    return files, q.stdout.split()[-1]


def _applets(busybox: bytes) -> list[str]:
    with tempfile.NamedTemporaryFile(prefix="srmig-busybox-", delete=False) as f:
        f.write(busybox)
        path = f.name
    try:
        os.chmod(path, 0o755)
        out = subprocess.run(["busybox", "--list-full"], executable=path, capture_output=True, text=True,
                             timeout=30, check=True).stdout
    finally:
        os.unlink(path)
    return [line.strip() for line in out.splitlines() if line.strip()]


def build(quiet: bool = False, force: bool = False) -> GuestImage:
    """Build (or reuse) the guest image. Idempotent: returns at once when the stamp says it is built."""
    d = guest_dir()
    if not force and _read_stamp(d) is not None:
        return image()
    log = (lambda msg: None) if quiet else (lambda msg: print(f"[srmig guest] {msg}", flush=True))
    t0 = time.monotonic()
    for tool in ("dpkg-deb", "apt-get"):
        if not shutil.which(tool):
            raise MissingPackage(f"{'dpkg' if tool == 'dpkg-deb' else 'apt'}: {tool} not found")
    cache = d / "cache"
    d.mkdir(parents=True, exist_ok=True)
    log(f"compiling {echo_xdp.SOURCE.name} with bcc")
    echo_object = echo_xdp.elf_object()  # first: a missing compiler or header fails before any download

    pkg, version = newest_kernel_package()
    log(f"kernel package {pkg} {version}")
    deb = fetch_deb(pkg, version, cache, log)
    log(f"extracting kernel and modules from {deb.name}")

    def want(name: str) -> bool:
        if name.startswith("/boot/vmlinuz-") or name.startswith("/boot/config-"):
            return True
        if "/lib/modules/" not in name:
            return False
        base = os.path.basename(name)
        if base in ("modules.builtin",):
            return True
        for suffix in (".ko", ".ko.xz", ".ko.zst", ".ko.gz"):
            if base.endswith(suffix) and base[: -len(suffix)] in MODULES:
                return True
        return False

    files = _deb_members(deb, want)
    kernels = [n for n in files if n.startswith("/boot/vmlinuz-")]
    if not kernels:
        raise MissingPackage(f"{pkg}: no /boot/vmlinuz-* in {deb.name}")
    kver = kernels[0][len("/boot/vmlinuz-"):]
    builtin = set()
    for n, data in files.items():
        if n.endswith("/modules.builtin"):
            builtin |= {os.path.basename(line).split(".ko")[0] for line in data.decode().split()}
    modules: dict[str, bytes] = {}
    for n, data in files.items():
        base = os.path.basename(n)
        if ".ko" in base and f"/{kver}/" in n:
            modules[base.split(".ko")[0]] = _decompress_module(base, data)
    order = []
    for m in MODULES:
        if m in modules:
            order.append(m)
        elif m not in builtin and m.replace("_", "-") not in builtin:
            raise MissingPackage(f"{pkg}: module {m} neither in the package nor built in")

    busybox, bb_version = _busybox_binary(cache, log)
    iproute2, ip_version = _host_program_files(IPROUTE2_PKG, IPROUTE2_IP)
    ethtool, ethtool_version = _host_program_files(ETHTOOL_PKG, ETHTOOL)
    log(f"busybox-static {bb_version}, iproute2 {ip_version}, ethtool {ethtool_version}; writing initramfs")
    cpio = Cpio()
    for dname in ("bin", "sbin", "usr/bin", "usr/sbin", "proc", "sys", "dev", "tmp", "run", "etc", "root",
                  "lib/modules", "var"):
        cpio.dir(dname)
    cpio.chardev("dev/console", 5, 1)
    cpio.chardev("dev/null", 1, 3, 0o666)
    cpio.chardev("dev/ttyS0", 4, 64)
    cpio.chardev("dev/ttyS1", 4, 65)
    cpio.file("bin/busybox", busybox, 0o755)
    for name, data in sorted({**iproute2, **ethtool}.items()):  # before the applets: the first entry of a name wins
        cpio.file(name, data, 0o755)
    for applet in _applets(busybox):
        path = applet.lstrip("/")
        if path != "bin/busybox":
            cpio.dir(os.path.dirname(path))
            cpio.symlink(path, "/bin/busybox")
    cpio.file("init", INIT.encode(), 0o755)
    cpio.file("etc/passwd", b"root:x:0:0:root:/root:/bin/sh\n")
    cpio.file(ECHO_XDP_OBJECT.lstrip("/"), echo_object)
    cpio.file("lib/modules/srmig-order", ("\n".join(order) + "\n").encode())
    for m in order:
        cpio.file(f"lib/modules/{m}.ko", modules[m])
    initrd = gzip.compress(cpio.finish(), compresslevel=6, mtime=0)

    bzimage = files[kernels[0]]
    config = files.get(f"/boot/config-{kver}", b"").decode(errors="replace")
    kernel_srv6 = "CONFIG_IPV6_SEG6_LWTUNNEL=y" in config.splitlines()
    if not kernel_srv6:
        log(f"warning: {kver} has no CONFIG_IPV6_SEG6_LWTUNNEL=y: the guest cannot be a kernel SRv6 peer")
    vmlinux = _extract_vmlinux(bzimage) if "CONFIG_PVH=y" in config.splitlines() else None
    if vmlinux is not None:
        log("kernel has PVH: booting the decompressed ELF vmlinux (skips decompression under TCG)")
    out = {"vmlinuz": bzimage, "initrd.gz": initrd}
    if vmlinux is not None:
        out["vmlinux"] = vmlinux
    _stamp_path(d).unlink(missing_ok=True)
    for fname, data in out.items():
        tmp = d / f"{fname}.tmp"
        tmp.write_bytes(data)
        os.replace(tmp, d / fname)
    if vmlinux is None:
        (d / "vmlinux").unlink(missing_ok=True)
    kernel = "vmlinux" if vmlinux is not None else "vmlinuz"
    stamp = {"recipe": _recipe(), "kernel": kernel, "initrd": "initrd.gz", "kernel_version": kver,
             "kernel_package": f"{pkg}={version}", "kernel_srv6": kernel_srv6, "busybox": bb_version,
             "iproute2": ip_version, "ethtool": ethtool_version, "modules": order,
             "built": time.strftime("%Y-%m-%dT%H:%M:%S")}
    tmp = _stamp_path(d).with_suffix(".tmp")
    tmp.write_text(json.dumps(stamp, indent=1) + "\n")
    os.replace(tmp, _stamp_path(d))
    log(f"built {d}/{kernel} ({kver}) and initrd.gz ({len(initrd) // 1024} KiB) in {time.monotonic() - t0:.1f} s")
    return image()


def kernel_cmdline(addr: str | None, gw: str = "fe80::1", stats: int = 0, extra: str = "",
                   addr4: str | None = None, gw4: str | None = None, echo: str = "kernel") -> str:
    """The -append line for this guest: serial console, quiet boot, and the srmig.* settings. `addr4`
    ("198.51.100.10/24") makes the guest dual-stack, `gw4` its IPv4 default gateway (needs `addr4`). `echo`:
    who answers echo requests, the guest's kernel ("kernel") or the XDP responder on eth0 ("xdp")."""
    if gw4 and not addr4:
        raise ValueError("an IPv4 gateway (srmig.gw4) needs an IPv4 address (srmig.addr4)")
    if echo not in ECHO_MODES:
        raise ValueError(f"echo: one of {', '.join(ECHO_MODES)}, not {echo!r}")
    parts = ["console=ttyS0", "quiet", "loglevel=3", "panic=-1", "mitigations=off", "tsc=reliable",
             "no_timer_check", "nokaslr"]
    if addr:
        parts.append(f"srmig.addr={addr}")
    parts.append(f"srmig.gw={gw}")
    if addr4:
        parts.append(f"srmig.addr4={addr4}")
    if gw4:
        parts.append(f"srmig.gw4={gw4}")
    if stats:
        parts.append(f"srmig.stats={int(stats)}")
    if echo != "kernel":
        parts.append(f"srmig.echo={echo}")
    if extra:
        parts.append(extra)
    return " ".join(parts)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m srmig.testbed.guest", description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build", help="build the guest kernel + initramfs (idempotent)")
    b.add_argument("--quiet", action="store_true")
    b.add_argument("--force", action="store_true", help="rebuild even if the stamp says it is built")
    sub.add_parser("status", help="print the built image, exit 1 if not built")
    args = ap.parse_args(argv)
    if args.cmd == "status":
        if not is_built():
            print(f"not built ({guest_dir()})")
            return 1
        img = image()
        print(f"kernel {img.kernel} ({img.kernel_version}), initrd {img.initrd}")
        return 0
    try:
        img = build(quiet=args.quiet, force=args.force)
    except MissingPackage as e:
        print(f"srmig guest: error: missing package {e}", file=sys.stderr)
        return 1
    except (subprocess.SubprocessError, OSError, RuntimeError) as e:
        print(f"srmig guest: error: {e}", file=sys.stderr)
        return 1
    if not args.quiet:
        print(f"[srmig guest] ready: kernel {img.kernel} initrd {img.initrd}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
