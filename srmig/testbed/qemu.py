"""A small QEMU driver for the test guest (srmig.testbed.guest): TCG, virtio-net on a tap, QMP, serial logs.

    with Qemu("vm-s", ns=topo.ns("S"), tap="tap-vm") as vm:     # creates the tap in S, boots the guest
        configure_host_tap(topo.ns("S"), "tap-vm", "2001:db8:100::10", vm.mac)
        vm.wait_ready(30)
        with Qemu("vm-d", ns=topo.ns("D"), tap="tap-vm", incoming="tcp:[fd00:99::2]:4444") as dst:
            info = vm.migrate("tcp:[fd00:99::2]:4444")             # info["downtime"] in ms, from QEMU
            dst.qmp.wait_event("RESUME", 10)
            print(dst.guest_stats()["Icmp6InEchos"])

Measured here (QEMU 7.2 TCG, 2 cores, 256 MiB, idle guest): first echo reply ~2.8-3.3 s after QEMU
starts; `migrate` completes in ~0.45-0.5 s, QEMU-reported downtime 1-25 ms, host-observed STOP (source) to
RESUME (destination) 25-40 ms. After `stop`, QEMU reads exactly one more frame from the tap and keeps it in
its own queue (delivered on `cont`); that frame is NOT migrated: the guest on the destination never sees it
(tests/test_guest.py checks this).

Choices:
- The tap is created by us (persistent, TUNSETIFF + TUNSETPERSIST from a thread switched into the namespace)
  *before* QEMU starts, so the host side (anycast gateway MAC, fe80::1 and the IPv4 gateway, routes,
  permanent neighbour entries, txqueuelen) is configured with plain netlink independent of QEMU; QEMU attaches with
  `-netdev tap,ifname=..,script=no,downscript=no,vhost=off`. The tap is deleted on close if we created it.
- QEMU runs inside the namespace through `ip netns exec NS` (which execs, so the pid is QEMU's).
  PR_SET_PDEATHSIG=SIGKILL makes it die with the thread that started it, even if the test is SIGKILLed.
- A destination starts with `-incoming defer`; once QMP is up we enable the `events` migration capability
  and issue `migrate-incoming` with the requested URI (when it returns, the port is listening).
- Serial: ttyS0 is the console, written to `console.log` in the work directory; ttyS1 is the guest's control
  channel (a unix socket, see guest.py) used by `guest_stats()`.
- A migration's timing is in `query_migrate()` (QEMU's downtime / total-time, ms) and in the QMP events,
  each stamped with the host's monotonic clock on arrival (STOP on the source, RESUME on the destination,
  MIGRATION {"status": ...}, MIGRATION_PASS).
- Every wait is bounded; `close()` (also from `__exit__`, also on exceptions) kills QEMU (QMP quit, then
  SIGTERM, then SIGKILL), removes the tap it created and the work directory.
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import json
import os
import re
import shutil
import signal
import socket
import struct
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from pyroute2 import IPRoute

from srmig.testbed import guest as guest_mod
from srmig.testbed.netns import inside

GUEST_MAC = "02:00:00:00:10:10"
GATEWAY_LL = "fe80::1"            # the anycast gateway every host presents to its VMs
GATEWAY_MAC = "02:00:5e:00:00:01"
# The IPv4 anycast gateway of the testbed's VM subnet (198.51.100.0/24, RFC 5737): on every host's tap, with
# GATEWAY_MAC, so the host's kernel answers the guest's ARP for it, and the same answer on every host.
GATEWAY_V4 = "198.51.100.1"
QEMU = "qemu-system-x86_64"

TUNSETIFF = 0x400454CA
TUNSETPERSIST = 0x400454CB
IFF_TAP = 0x0002
IFF_NO_PI = 0x1000
PR_SET_PDEATHSIG = 1


class QMPError(RuntimeError):
    def __init__(self, cmd: str, error: dict):
        super().__init__(f"QMP {cmd}: {error.get('class')}: {error.get('desc')}")
        self.error = error


class QemuError(RuntimeError):
    pass


# --- tap ----------------------------------------------------------------------------------------------

def _in_thread(fn, *args):
    """Run fn in a fresh thread (setns is per thread; we never switch the caller's own thread)."""
    out: dict = {}

    def body():
        try:
            out["v"] = fn(*args)
        except BaseException as e:  # noqa: BLE001 - re-raised in the caller
            out["e"] = e
    t = threading.Thread(target=body, daemon=True)
    t.start()
    t.join(30)
    if t.is_alive():
        raise TimeoutError(f"{fn.__name__} did not finish")
    if "e" in out:
        raise out["e"]
    return out.get("v")


def create_tap(ns: str | None, ifname: str) -> bool:
    """A persistent tap `ifname` in namespace `ns` (None: here), left down; QEMU attaches to it later.
    Returns False (and leaves it alone) if a link of that name already exists."""
    def mk():
        with inside(ns):
            with IPRoute() as ipr:
                if ipr.link_lookup(ifname=ifname):
                    return False
            fd = os.open("/dev/net/tun", os.O_RDWR)
            try:
                fcntl.ioctl(fd, TUNSETIFF, struct.pack("16sH", ifname.encode(), IFF_TAP | IFF_NO_PI))
                fcntl.ioctl(fd, TUNSETPERSIST, 1)
            finally:
                os.close(fd)
            return True
    return _in_thread(mk)


def delete_link(ns: str | None, ifname: str) -> None:
    def rm():
        with inside(ns), IPRoute() as ipr:
            idx = ipr.link_lookup(ifname=ifname)
            if idx:
                ipr.link("del", index=idx[0])
    with contextlib.suppress(Exception):
        _in_thread(rm)


def configure_host_tap(ns: str | None, ifname: str, guest_addr: str, guest_mac: str = GUEST_MAC,
                       gateway_ll: str = GATEWAY_LL, gateway_mac: str = GATEWAY_MAC,
                       txqueuelen: int = 10000, guest_addr4: str | None = None,
                       gateway_v4: str = GATEWAY_V4) -> None:
    """The host side of a VM's tap: anycast gateway MAC + link-local, up, a /128 route to the guest, a
    permanent neighbour entry for it (so the host's neighbour queue never holds its packets) and a long
    queue (what a paused QEMU leaves unread waits there). No multicast: the host's MLD reports would be
    read by QEMU and dropped by the guest's filter, which blurs srmig's count of frames QEMU read but did
    not deliver (srmig.ctl.drain.SwallowCheck).

    A dual-stack guest (`guest_addr4`): the IPv4 anycast gateway `gateway_v4` as a /32 on the tap (no
    connected route: the VM subnet is not this host's), so the host's kernel answers the guest's ARP for it
    with the tap's MAC, the same gateway MAC on every host: a moved guest's ARP entry stays right. And a /32
    route and a permanent neighbour entry for the guest, as for IPv6: the host never ARPs towards it (no
    frame the guest did not ask for, nothing parked in the ARP queue after a move)."""
    def cfg():
        with inside(ns), IPRoute() as ipr:
            idx = ipr.link_lookup(ifname=ifname)[0]
            ipr.link("set", index=idx, address=gateway_mac, txqlen=txqueuelen)
            ipr.link("set", index=idx, flags=0, mask=0x1000)  # IFF_MULTICAST off
            ipr.link("set", index=idx, state="up")
            with open(f"/proc/sys/net/ipv6/conf/{ifname}/accept_dad", "w") as f:
                f.write("0")
            ipr.addr("replace", index=idx, address=gateway_ll, prefixlen=64, flags=0x80)  # IFA_F_NODAD
            ipr.route("replace", dst=f"{guest_addr.split('/')[0]}/128", oif=idx, family=10)
            ipr.neigh("replace", dst=guest_addr.split("/")[0], lladdr=guest_mac, ifindex=idx, state=0x80,
                      family=10)  # NUD_PERMANENT
            if guest_addr4:
                v4 = guest_addr4.split("/")[0]
                ipr.addr("replace", index=idx, address=gateway_v4, prefixlen=32, family=2)
                ipr.route("replace", dst=f"{v4}/32", oif=idx, family=2)
                ipr.neigh("replace", dst=v4, lladdr=guest_mac, ifindex=idx, state=0x80, family=2)
    _in_thread(cfg)


def link_stats(ns: str | None, ifname: str) -> dict[str, int]:
    """The kernel's counters of a link (rx_packets, tx_packets, tx_dropped, ...). For a tap, tx_packets
    counts the frames QEMU has read from it, tx_dropped those refused because its queue was full."""
    def get():
        with inside(ns), IPRoute() as ipr:
            idx = ipr.link_lookup(ifname=ifname)[0]
            link = ipr.get_links(idx)[0]
            st = link.get_attr("IFLA_STATS64") or link.get_attr("IFLA_STATS")
            return {k: int(v) for k, v in dict(st).items()} if st else {}
    return _in_thread(get)


# --- QMP ----------------------------------------------------------------------------------------------

@dataclass
class Event:
    name: str
    data: dict
    host_time: float        # time.monotonic() when the reader thread received it
    wall_time: float        # time.time() at the same moment
    qemu_time: float        # QEMU's own timestamp (seconds since the epoch)


class QMP:
    """Synchronous QMP client over a unix socket; a reader thread queues events with host timestamps."""

    def __init__(self, path: str | Path, timeout: float = 15, alive=None):
        self.path = str(path)
        self.events: list[Event] = []
        self._consumed: set[int] = set()
        self._responses: dict[int, dict] = {}
        self._cond = threading.Condition()
        self._next_id = 0
        self._closed = False
        self._send_lock = threading.Lock()
        deadline = time.monotonic() + timeout
        last: Exception | None = None
        while True:
            if alive is not None and not alive():
                raise QemuError(f"QEMU exited before its QMP socket {self.path} answered")
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                s.settimeout(max(0.1, deadline - time.monotonic()))
                s.connect(self.path)
                break
            except OSError as e:
                s.close()
                last = e
            if time.monotonic() > deadline:
                raise TimeoutError(f"QMP socket {self.path}: {last}")
            time.sleep(0.05)
        self.sock = s
        self.sock.settimeout(None)
        self._rfile = s.makefile("rb")
        greeting = self._readline(deadline)
        if "QMP" not in greeting:
            raise QemuError(f"unexpected QMP greeting: {greeting}")
        self._reader = threading.Thread(target=self._read_loop, name=f"qmp-{self.path}", daemon=True)
        self._reader.start()
        self.execute("qmp_capabilities", timeout=max(1.0, deadline - time.monotonic()))

    def _readline(self, deadline: float) -> dict:
        self.sock.settimeout(max(0.1, deadline - time.monotonic()))
        line = self._rfile.readline()
        self.sock.settimeout(None)
        if not line:
            raise QemuError("QMP connection closed")
        return json.loads(line)

    def _read_loop(self) -> None:
        try:
            for line in self._rfile:
                now, wall = time.monotonic(), time.time()
                try:
                    msg = json.loads(line)
                except ValueError:
                    continue
                with self._cond:
                    if "event" in msg:
                        ts = msg.get("timestamp", {})
                        self.events.append(Event(msg["event"], msg.get("data", {}), now, wall,
                                                 ts.get("seconds", 0) + ts.get("microseconds", 0) / 1e6))
                    elif "id" in msg:
                        self._responses[msg["id"]] = msg
                    self._cond.notify_all()
        except (OSError, ValueError):
            pass
        finally:
            with self._cond:
                self._closed = True
                self._cond.notify_all()

    def execute(self, cmd: str, arguments: dict | None = None, timeout: float = 10, **kw):
        """Run a QMP command; returns its "return" value, raises QMPError / TimeoutError.
        Arguments come as a dict (`arguments={"max-bandwidth": ...}`) and/or keywords."""
        args = dict(arguments or {}, **kw)
        with self._cond:
            self._next_id += 1
            rid = self._next_id
        msg = {"execute": cmd, "id": rid}
        if args:
            msg["arguments"] = args
        with self._send_lock:
            self.sock.sendall(json.dumps(msg).encode() + b"\n")
        deadline = time.monotonic() + timeout
        with self._cond:
            while rid not in self._responses:
                left = deadline - time.monotonic()
                if self._closed:
                    raise QemuError(f"QMP {cmd}: connection closed")
                if left <= 0:
                    raise TimeoutError(f"QMP {cmd}: no answer in {timeout} s")
                self._cond.wait(left)
            resp = self._responses.pop(rid)
        if "error" in resp:
            raise QMPError(cmd, resp["error"])
        return resp.get("return")

    def wait_event(self, name: str, timeout: float, match: dict | None = None,
                   after: float | None = None) -> Event:
        """The oldest not yet waited-for event `name` (received at or after monotonic time `after`) whose
        data contains `match`; waits at most `timeout` s (TimeoutError)."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                for i, ev in enumerate(self.events):
                    if i in self._consumed or ev.name != name:
                        continue
                    if after is not None and ev.host_time < after:
                        continue
                    if match and any(ev.data.get(k) != v for k, v in match.items()):
                        continue
                    self._consumed.add(i)
                    return ev
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"no QMP event {name} {match or ''} in {timeout} s")
                if self._closed:
                    raise QemuError(f"QMP closed while waiting for {name}")
                self._cond.wait(left)

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)
        with contextlib.suppress(OSError):
            self.sock.close()
        if getattr(self, "_reader", None):
            self._reader.join(2)


# --- QEMU ---------------------------------------------------------------------------------------------

def _pdeathsig():
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)


@dataclass
class Qemu:
    """One QEMU process running the test guest in a namespace. Use as a context manager."""

    name: str
    ns: str | None
    tap: str
    addr: str | None = "2001:db8:100::10/64"
    addr4: str | None = None          # "198.51.100.10/24": a dual-stack guest
    gateway4: str = GATEWAY_V4        # its IPv4 default gateway (with addr4)
    mac: str = GUEST_MAC
    incoming: str | None = None      # "tcp:[ADDR]:PORT" (listen via migrate-incoming) or "defer"
    memory: int = 256
    gateway: str = GATEWAY_LL
    stats_interval: int = 0           # >0: the guest prints SRMIG-STATS on its console every N s
    echo: str = "kernel"              # who answers echo requests: the guest's kernel, or "xdp" (guest.py)
    create_tap: bool = True
    image: guest_mod.GuestImage | None = None
    extra_args: list[str] = field(default_factory=list)
    extra_append: str = ""
    workdir: Path | None = None
    keep_workdir: bool = False
    start_timeout: float = 15

    def __post_init__(self):
        self.proc: subprocess.Popen | None = None
        self.qmp: QMP | None = None
        self._made_tap = False
        self._own_workdir = self.workdir is None
        self.start_time = 0.0

    # paths
    @property
    def console_log(self) -> Path:
        return self.workdir / "console.log"

    @property
    def qemu_log(self) -> Path:
        return self.workdir / "qemu.log"

    @property
    def qmp_path(self) -> Path:
        return self.workdir / "qmp.sock"

    @property
    def ctl_path(self) -> Path:
        return self.workdir / "ctl.sock"

    @property
    def pid(self) -> int:
        return self.proc.pid if self.proc else -1

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def argv(self) -> list[str]:
        img = self.image or guest_mod.image()
        append = guest_mod.kernel_cmdline(self.addr, self.gateway, self.stats_interval, self.extra_append,
                                          addr4=self.addr4, gw4=self.gateway4 if self.addr4 else None, echo=self.echo)
        argv = [
            QEMU, "-name", self.name, "-accel", "tcg", "-machine", "pc", "-m", str(self.memory), "-smp", "1",
            "-nodefaults", "-no-user-config", "-display", "none", "-no-reboot",
            "-kernel", str(img.kernel), "-initrd", str(img.initrd), "-append", append,
            "-netdev", f"tap,id=net0,ifname={self.tap},script=no,downscript=no,vhost=off",
            "-device", f"virtio-net-pci,netdev=net0,mac={self.mac},romfile=",
            "-chardev", f"file,id=con0,path={self.console_log}",
            "-serial", "chardev:con0",
            "-chardev", f"socket,id=ctl0,path={self.ctl_path},server=on,wait=off",
            "-serial", "chardev:ctl0",
            "-qmp", f"unix:{self.qmp_path},server=on,wait=off",
        ]
        if self.incoming:
            argv += ["-incoming", "defer"]
        return argv + list(self.extra_args)

    def start(self) -> Qemu:
        try:
            self._start()
        except BaseException:
            self.close()
            raise
        return self

    def _start(self) -> None:
        if not shutil.which(QEMU):
            raise QemuError(f"{QEMU} not found (Debian qemu-system-x86)")
        if self.workdir is None:
            self.workdir = Path(tempfile.mkdtemp(prefix=f"srmig-qemu-{self.name}-"))
        self.workdir.mkdir(parents=True, exist_ok=True)
        if self.create_tap:
            self._made_tap = create_tap(self.ns, self.tap)
        cmd = self.argv() if self.ns is None else ["ip", "netns", "exec", self.ns, *self.argv()]
        self.start_time = time.monotonic()
        with open(self.qemu_log, "wb") as log:
            self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                         preexec_fn=_pdeathsig, close_fds=True)
        try:
            self.qmp = QMP(self.qmp_path, timeout=self.start_timeout, alive=self.alive)
        except (QemuError, TimeoutError) as e:
            raise QemuError(f"{self.name}: {e}; qemu log: {self._tail(self.qemu_log)}") from e
        self.qmp.execute("migrate-set-capabilities",
                         capabilities=[{"capability": "events", "state": True}])
        if self.incoming and self.incoming != "defer":
            self.qmp.execute("migrate-incoming", uri=self.incoming)

    def migrate_incoming(self, uri: str) -> None:
        """For a destination started with incoming="defer"."""
        self.qmp.execute("migrate-incoming", uri=uri)

    # --- guest --------------------------------------------------------------------------------------

    @staticmethod
    def _tail(path: Path, n: int = 2000) -> str:
        try:
            return path.read_text(errors="replace")[-n:]
        except OSError:
            return ""

    def console(self) -> str:
        return self._tail(self.console_log, 1 << 20)

    def wait_console(self, pattern: str, timeout: float) -> re.Match:
        """Wait (bounded) until the console log matches the regex `pattern`."""
        deadline = time.monotonic() + timeout
        rx = re.compile(pattern)
        while True:
            m = rx.search(self.console())
            if m:
                return m
            if not self.alive():
                raise QemuError(f"{self.name} exited; console: {self._tail(self.console_log)}"
                                f" qemu: {self._tail(self.qemu_log)}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"{self.name}: no /{pattern}/ on the console in {timeout} s; console: "
                                   f"{self._tail(self.console_log)}")
            time.sleep(0.05)

    def wait_ready(self, timeout: float = 30) -> float:
        """Wait for the guest's init to report eth0 configured; returns seconds since QEMU started."""
        self.wait_console(r"SRMIG-GUEST-READY", timeout)
        return time.monotonic() - self.start_time

    def guest_command(self, cmd: str, timeout: float = 10, rest: str = "", retry: bool = True) -> list[str]:
        """Send `cmd TOKEN REST` on the guest's control serial port; returns the lines between BEGIN and END
        (or the PONG line). See control_command."""
        def alive() -> None:
            if not self.alive():
                raise QemuError(f"{self.name} exited")
        return control_command(self.ctl_path, cmd, timeout, rest, retry, self.name, alive)

    def guest_shell(self, command: str, timeout: float = 10) -> str:
        """Run a one-line busybox shell command in the guest (control channel); returns its output."""
        if "\n" in command:
            raise ValueError("one line only")
        return "\n".join(self.guest_command("sh", timeout, rest=command, retry=False))

    def guest_stats(self, timeout: float = 10) -> dict[str, int]:
        """The guest's own counters: every /proc/net/snmp6 key (Icmp6InEchos, Icmp6OutEchoReplies, ...),
        every /proc/net/snmp one as nstat names it (IcmpInEchos, IcmpOutEchoReps, IpOutDiscards, ...),
        eth0_<counter> from /sys/class/net/eth0/statistics and, from the image's ethtool on, the driver's per
        queue (eth0_tx_queue_0_xdp_tx_drops, ...)."""
        return parse_stats(self.guest_command("stats", timeout))

    # --- QMP shortcuts ------------------------------------------------------------------------------

    def status(self) -> str:
        return self.qmp.execute("query-status")["status"]

    def stop(self) -> None:
        self.qmp.execute("stop")

    def cont(self) -> None:
        self.qmp.execute("cont")

    def rx_used_idx(self) -> int:
        """The virtio-net RX queue's used index (16 bits): frames QEMU has put in the guest's ring."""
        st = self.qmp.execute("x-query-virtio-queue-status", path=self._virtio_path(), queue=0)
        return st["used-idx"]

    def _virtio_path(self) -> str:
        if not getattr(self, "_vpath", None):
            devs = [d for d in self.qmp.execute("x-query-virtio") if d.get("name") == "virtio-net"]
            if not devs:
                raise QemuError(f"{self.name}: no virtio-net device")
            self._vpath = devs[0]["path"]
        return self._vpath

    def query_migrate(self) -> dict:
        """QEMU's migration info: status, total-time, downtime (ms, set on the source once completed),
        setup-time, ram{...}."""
        return self.qmp.execute("query-migrate")

    def set_migration_parameters(self, **params) -> None:
        """e.g. set_migration_parameters(**{"max-bandwidth": 1 << 30, "downtime-limit": 100})."""
        self.qmp.execute("migrate-set-parameters", arguments=params)

    def migrate(self, uri: str, timeout: float = 60, wait: bool = True, max_bandwidth: int | None = None,
                downtime_limit_ms: int | None = None) -> dict:
        """Start a live migration to `uri` (e.g. "tcp:[fd00:99::2]:4444"). With wait, poll query-migrate
        until completed (returned) or failed/cancelled (QemuError); on timeout the migration is cancelled."""
        params = {}
        if max_bandwidth is not None:
            params["max-bandwidth"] = int(max_bandwidth)
        if downtime_limit_ms is not None:
            params["downtime-limit"] = int(downtime_limit_ms)
        if params:
            self.set_migration_parameters(**params)
        self.qmp.execute("migrate", uri=uri)
        if not wait:
            return self.query_migrate()
        return self.wait_migration(timeout)

    def wait_migration(self, timeout: float = 60) -> dict:
        deadline = time.monotonic() + timeout
        while True:
            info = self.query_migrate()
            st = info.get("status")
            if st == "completed":
                return info
            if st in ("failed", "cancelled"):
                raise QemuError(f"{self.name}: migration {st}: {info.get('error-desc', '')}")
            if time.monotonic() > deadline:
                with contextlib.suppress(Exception):
                    self.qmp.execute("migrate_cancel")
                raise TimeoutError(f"{self.name}: migration not completed in {timeout} s: {info}")
            time.sleep(0.02)

    # --- teardown -----------------------------------------------------------------------------------

    def close(self) -> None:
        """Kill QEMU (QMP quit, SIGTERM, SIGKILL; each bounded), remove the tap we made and the work dir."""
        if self.proc is not None and self.proc.poll() is None:
            if self.qmp is not None:
                with contextlib.suppress(Exception):
                    self.qmp.execute("quit", timeout=2)
            for sig, wait in ((None, 2), (signal.SIGTERM, 2), (signal.SIGKILL, 5)):
                if sig is not None and self.proc.poll() is None:
                    with contextlib.suppress(ProcessLookupError):
                        self.proc.send_signal(sig)
                try:
                    self.proc.wait(wait)
                    break
                except subprocess.TimeoutExpired:
                    continue
        if self.qmp is not None:
            self.qmp.close()
            self.qmp = None
        if self._made_tap:
            delete_link(self.ns, self.tap)
            self._made_tap = False
        if self._own_workdir and not self.keep_workdir and self.workdir is not None:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self) -> Qemu:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()


def control_command(path, cmd: str, timeout: float = 10, rest: str = "", retry: bool = True, name: str = "guest",
                    check=lambda: None) -> list[str]:
    """Send `cmd TOKEN REST` on a guest's control serial port (the unix socket `path`, see guest.py); returns
    the lines between BEGIN and END (or the PONG line). With `retry`, resends every 2 s while the guest does
    not answer (not listening yet); without, one attempt waits for the whole `timeout`. Always bounded by
    `timeout`; `check()` between attempts may raise (the QEMU exited)."""
    deadline = time.monotonic() + timeout
    n = 0
    while True:
        n += 1
        tok = f"{os.getpid()}x{n}x{int(time.monotonic() * 1000) % 100000}"
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
                s.settimeout(max(0.1, min(2.0, deadline - time.monotonic())))
                s.connect(str(path))
                s.sendall(f"\n{cmd} {tok} {rest}\n".encode())
                buf = b""
                left = max(0.1, deadline - time.monotonic())
                attempt_end = time.monotonic() + (min(2.0, left) if retry else left)
                end = f"END {tok}".encode() if cmd != "ping" else f"PONG {tok}".encode()
                while end not in buf and time.monotonic() < attempt_end:
                    s.settimeout(max(0.05, attempt_end - time.monotonic()))
                    try:
                        chunk = s.recv(65536)
                    except socket.timeout:
                        break
                    if not chunk:
                        break
                    buf += chunk
                if end in buf:
                    text = buf.decode(errors="replace").replace("\r", "")
                    if cmd == "ping":
                        return [f"PONG {tok}"]
                    body = text.split(f"BEGIN {tok}\n", 1)[-1].split(f"END {tok}", 1)[0]
                    return [line for line in body.splitlines() if line.strip()]
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise TimeoutError(f"{name}: guest did not answer {cmd!r} in {timeout} s")
        check()
        time.sleep(0.1)


def parse_stats(lines: list[str]) -> dict[str, int]:
    """The `stats` answer as {counter: value}: /proc/net/snmp6 keys ("Icmp6InEchos 12"), eth0_<counter>, and
    /proc/net/snmp's pairs of lines ("Icmp: InMsgs InErrors ..." then "Icmp: 12 0 ...") as nstat names them
    (IcmpInMsgs, IcmpInErrors, ...)."""
    out = {}
    header: list[str] | None = None
    for line in lines:
        parts = line.split()
        if len(parts) == 2 and not parts[0].endswith(":") and parts[1].lstrip("-").isdigit():
            out[parts[0]] = int(parts[1])
            header = None
        elif len(parts) >= 2 and parts[0].endswith(":"):
            if all(p.lstrip("-").isdigit() for p in parts[1:]):
                if header and header[0] == parts[0] and len(header) == len(parts):
                    proto = parts[0][:-1]
                    out.update({proto + k: int(v) for k, v in zip(header[1:], parts[1:])})
                header = None
            else:
                header = parts
        else:
            header = None
    return out
