r"""Private libvirtd daemons inside network namespaces, the test guest as a libvirt domain, live migration
between two such daemons, and recording of their domain events.

    with Topology() as topo:                        # namespaces S and D, a management link fd00:99::1 - ::2
        ...
        with daemons(topo) as ds:                   # {"S": Libvirtd, "D": Libvirtd}, tap "vmtap" in both
            ensure_event_loop()                     # srmig.ctl.libvirt_events, before any connection
            sconn = ds["S"].connect()
            dom = sconn.createXML(domain_xml("srmig-vm"), 0)   # transient, TCG, virtio-net on the tap
            migrate(dom, ds["D"], dest_addr="fd00:99::2")       # p2p, QEMU stream over the management link
        rec = record("precopy", topo, ds)           # or all of that plus the events of both daemons

How one daemon is made private (docs/platform.md, "Two libvirtd daemons"): `ip netns exec NS` gives the daemon the
namespace's network stack and a private mount namespace (/ is made a recursive slave, so nothing mounted in it
leaks out). In it a shell bind-mounts <root>/{etc,run,lib,cache,log} onto /etc/libvirt, /run/libvirt and
/var/{lib,cache,log}/libvirt, then execs the monolithic `libvirtd` with its pid file under <root>. Every path
the daemon uses is therefore per daemon, while the host still reaches them under <root> (e.g. the socket
<root>/run/libvirt-sock, the URI `qemu+unix:///system?socket=<root>/run/libvirt-sock`). Settings:
- libvirtd.conf: a distinct host_uuid per daemon (measured: the same UUID fails with "Attempt to migrate
  guest to the same host"; the shared hostname does not matter), auth "none" on the unix sockets, a log file
  under <root>/log.
- qemu.conf: user/group root, security_driver "none", dynamic_ownership 0, remember_owner 0,
  stdio_handler "file" (no virtlogd needed: QEMU's stdout/stderr go to <root>/log/qemu/NAME.log),
  cgroup_controllers [ ], and namespaces [ ]: QEMU stays in the daemon's mount namespace, so the daemon
  (libvirtd and the QEMUs it daemonized) is exactly the set of processes in that mount namespace; teardown
  kills them all by that. When the last one exits, the mount namespace and its bind mounts disappear; then
  <root> is removed.
- The daemon's parent is a small child-subreaper (REAPER, below): without it a dead QEMU stays a zombie for
  ~2 s here, and libvirt waits for it before its STOPPED events and in its QEMU capability probe.
- `hooks={"qemu": script}` installs /etc/libvirt/hooks/qemu. Measured: on the destination it is called with
  `NAME migrate begin -` (domain XML on stdin) synchronously, before the destination QEMU starts: a hook that
  sleeps 1.5 s delayed D's STARTED/MIGRATED and the whole migration by 1.5 s (the gate of docs/design.md, window 1).
  Then `prepare begin`, `start begin`, `started begin` on D; `stopped end`, `release end` on S at the end.

Migration (measured, libvirt 9.0 / QEMU 7.2 TCG, 256 MiB idle guest): `migrate()` = migrateToURI3 with
VIR_MIGRATE_LIVE | VIR_MIGRATE_PEER2PEER (| VIR_MIGRATE_POSTCOPY), destination connection URI = the
destination daemon's unix-socket URI (reachable from the source daemon's mount namespace: <root> is under
/tmp, which is not bind-mounted), params URI `tcp://[DEST_ADDR]` (the QEMU stream over the management link)
and LISTEN_ADDRESS DEST_ADDR (not required: libvirt 9.0 listens on [::] by default). ~0.75-0.9 s per call,
downtime 29-74 ms (post-copy 3-6 ms). Also working: direct managed migration `dom.migrate3(dconn, same params,
VIR_MIGRATE_LIVE)`, and p2p + VIR_MIGRATE_TUNNELLED (stream through the daemons, no URI). Without a URI
param libvirt uses the destination's hostname (here the shared hostname) and fails.

    python -m srmig.testbed.libvirtd record [--out tests/fixtures/libvirt]   # re-record the event fixtures
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from xml.sax.saxutils import escape, quoteattr

from srmig.testbed import guest as guest_mod
from srmig.testbed.qemu import GATEWAY_LL, GATEWAY_V4, GUEST_MAC, control_command, parse_stats

LIBVIRTD = "libvirtd"
QEMU_BIN = "/usr/bin/qemu-system-x86_64"

GUEST_ADDR = "2001:db8:100::10/64"
TAP = "vmtap"
PR_SET_PDEATHSIG = 1

# <root>/<key> is bind-mounted on the daemon's <path>
STATE_DIRS = {"etc": "/etc/libvirt", "run": "/run/libvirt", "lib": "/var/lib/libvirt",
              "cache": "/var/cache/libvirt", "log": "/var/log/libvirt"}

QEMU_CONF = """\
user = "root"
group = "root"
security_driver = "none"
dynamic_ownership = 0
remember_owner = 0
stdio_handler = "file"
cgroup_controllers = [ ]
namespaces = [ ]
"""


# The daemon's parent: a child subreaper that reaps every orphan below it. libvirtd daemonizes each QEMU
# (double fork), so a QEMU's parent is whoever reaps orphans. Here PID 1 is not systemd and reaps them only
# every ~2 s: libvirt waits for the dead QEMU to disappear (qemuProcessKill) before it emits STOPPED, which
# delayed the source's STOPPED/MIGRATED by 1.2-2 s and the destination's STOPPED/FAILED by ~2 s. With this
# reaper they come within milliseconds, as on a systemd host. It also forwards SIGTERM to libvirtd and gives
# it PDEATHSIG, so libvirtd dies with it.
REAPER = r"""
import ctypes, os, signal, sys
libc = ctypes.CDLL(None)
libc.prctl(36, 1, 0, 0, 0)  # PR_SET_CHILD_SUBREAPER
child = os.fork()
if child == 0:
    libc.prctl(1, signal.SIGKILL, 0, 0, 0)  # PR_SET_PDEATHSIG
    os.execvp(sys.argv[1], sys.argv[1:])
signal.signal(signal.SIGTERM, lambda *a: os.kill(child, signal.SIGTERM))
code = 0
while True:
    try:
        pid, status = os.wait()
    except ChildProcessError:
        break
    if pid == child:
        code = os.waitstatus_to_exitcode(status)
sys.exit(code if code >= 0 else 128 - code)
"""


class LibvirtdError(RuntimeError):
    pass


def _pdeathsig():
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)


def _mnt_ns(pid: int) -> str | None:
    try:
        return os.readlink(f"/proc/{pid}/ns/mnt")
    except OSError:
        return None


def _pids_in_mnt_ns(ns: str) -> list[int]:
    pids = []
    for p in os.listdir("/proc"):
        if p.isdigit() and int(p) != os.getpid() and _mnt_ns(int(p)) == ns:
            pids.append(int(p))
    return pids


@dataclass
class Libvirtd:
    """One private libvirtd in network namespace `netns` (None: the current one). A context manager."""

    name: str
    netns: str | None
    workdir: Path | None = None       # <root>; a fresh temp dir by default
    keep_workdir: bool = False
    start_timeout: float = 60
    log_filters: str = "3:*"          # libvirt log filter, e.g. "1:qemu 3:*" for debugging
    host_uuid: str = field(default_factory=lambda: str(uuid.uuid4()))
    hooks: dict[str, str] = field(default_factory=dict)  # {"qemu": script}: /etc/libvirt/hooks/<name>

    def __post_init__(self):
        self.proc: subprocess.Popen | None = None
        self.mnt_ns: str | None = None
        self._previous: list[tuple[str, subprocess.Popen]] = []  # (mount ns, reaper) of restarted daemons
        self._own_workdir = self.workdir is None
        self.start_time = 0.0
        self.ready_s = 0.0

    # --- paths --------------------------------------------------------------------------------------

    @property
    def root(self) -> Path:
        return self.workdir

    @property
    def socket(self) -> Path:
        return self.root / "run" / "libvirt-sock"

    @property
    def uri(self) -> str:
        return f"qemu+unix:///system?socket={self.socket}"

    @property
    def log_path(self) -> Path:
        return self.root / "log" / "libvirtd.log"

    def host_path(self, path: str | Path) -> Path:
        """Where the host sees a path of the daemon's (e.g. /var/log/libvirt/qemu/vm.log)."""
        p = str(path)
        for key, mnt in STATE_DIRS.items():
            if p == mnt or p.startswith(mnt + "/"):
                return self.root / key / p[len(mnt):].lstrip("/")
        return Path(p)

    def qemu_log(self, domain: str) -> str:
        return tail(self.host_path(f"/var/log/libvirt/qemu/{domain}.log"))

    # --- lifecycle ----------------------------------------------------------------------------------

    def start(self) -> Libvirtd:
        """Spawn the daemon and wait (bounded) until it answers. Spawn from a thread that outlives the daemon:
        it is SIGKILLed when the spawning thread exits (PR_SET_PDEATHSIG); see start_all()."""
        try:
            self.spawn()
            self.wait_ready()
        except BaseException:
            self.close()
            raise
        return self

    def _write_config(self) -> None:
        etc = self.root / "etc"
        (etc / "qemu").mkdir(parents=True, exist_ok=True)
        (etc / "libvirtd.conf").write_text(
            f'host_uuid = "{self.host_uuid}"\n'
            'auth_unix_ro = "none"\nauth_unix_rw = "none"\n'
            'unix_sock_rw_perms = "0700"\nunix_sock_ro_perms = "0700"\nunix_sock_admin_perms = "0700"\n'
            f'log_filters = "{self.log_filters}"\n'
            f'log_outputs = "1:file:{STATE_DIRS["log"]}/libvirtd.log"\n')
        (etc / "qemu.conf").write_text(QEMU_CONF)
        (etc / "libvirt.conf").write_text("")
        for name, script in self.hooks.items():  # read once, when the daemon starts; e.g. "qemu.d/srmig"
            (etc / "hooks" / name).parent.mkdir(parents=True, exist_ok=True)
            (etc / "hooks" / name).write_text(script)
            (etc / "hooks" / name).chmod(0o755)

    def spawn(self) -> None:
        """Start the daemon (returns at once; wait_ready() waits)."""
        if not shutil.which(LIBVIRTD):
            raise LibvirtdError("libvirtd not found (Debian libvirt-daemon-system)")
        if self.workdir is None:
            self.workdir = Path(tempfile.mkdtemp(prefix=f"srmig-libvirtd-{os.getpid()}-{self.name}-"))
        for key in STATE_DIRS:
            (self.root / key).mkdir(parents=True, exist_ok=True)
        for sub in ("log/qemu", "lib/qemu"):  # the guest's console file and control socket live there
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        self._write_config()
        mounts = " && ".join(
            f"mkdir -p {mnt} && mount --bind {shlex.quote(str(self.root / key))} {mnt}"
            for key, mnt in STATE_DIRS.items())
        script = (f"set -e; mount --make-rprivate / ; {mounts}; "
                  f"exec {LIBVIRTD} --pid-file {shlex.quote(str(self.pid_file))}")
        argv = ["sh", "-c", script]
        if self.netns is not None:
            argv = ["ip", "netns", "exec", self.netns, *argv]
        else:  # still a private mount namespace
            argv = ["unshare", "--mount", "--propagation", "private", *argv]
        self.start_time = time.monotonic()
        with open(self.root / "daemon.out", "wb") as out:
            self.proc = subprocess.Popen([sys.executable, "-c", REAPER, *argv], stdin=subprocess.DEVNULL,
                                         stdout=out, stderr=subprocess.STDOUT, preexec_fn=_pdeathsig,
                                         close_fds=True)

    @property
    def pid_file(self) -> Path:
        return self.root / "libvirtd.pid"

    @property
    def pid(self) -> int | None:
        """libvirtd's pid (the child of the reaper), once it wrote its pid file."""
        try:
            pid = int(self.pid_file.read_text().strip())
        except (OSError, ValueError):
            return None
        return pid if self.mnt_ns is None or _mnt_ns(pid) == self.mnt_ns else None

    def wait_ready(self) -> None:
        """Until a connection answers getCapabilities: the QEMU driver has probed the QEMU binaries (x86_64
        and i386), ~1.4 s here (~8 s without the REAPER)."""
        import libvirt  # noqa: PLC0415 - optional dependency

        deadline = time.monotonic() + self.start_timeout
        last = ""
        host_ns = _mnt_ns(os.getpid())
        while True:
            if self.proc.poll() is not None:
                raise LibvirtdError(f"libvirtd {self.name} exited ({self.proc.returncode}): "
                                    f"{tail(self.root / 'daemon.out')} {tail(self.log_path)}")
            if self.mnt_ns is None and (pid := self.pid) is not None:
                ns = _mnt_ns(pid)
                if ns and ns != host_ns:
                    self.mnt_ns = ns
            if self.mnt_ns is not None and self.socket.exists():
                try:
                    conn = libvirt.open(self.uri)
                    try:
                        conn.getCapabilities()  # the QEMU driver answers (capabilities probed)
                        self.ready_s = time.monotonic() - self.start_time
                        return
                    finally:
                        conn.close()
                except libvirt.libvirtError as e:
                    last = str(e)
            if time.monotonic() > deadline:
                raise TimeoutError(f"libvirtd {self.name} did not answer in {self.start_timeout} s: {last} "
                                   f"{tail(self.log_path)}")
            time.sleep(0.05)

    def restart(self, timeout: float = 10, sig: int = signal.SIGTERM) -> None:
        """Restart the daemon alone, as `systemctl restart libvirtd` does (SIGTERM: libvirtd finishes the API
        calls in flight, a migration included, before it exits; SIGKILL: a crash, then systemd's restart):
        its QEMUs keep running (in the old mount namespace, which they keep alive) and the new daemon
        reconnects to them. Callable from any
        thread, e.g. a short-lived fault injection's: the new daemon is spawned by a thread of its own that
        waits for it (PR_SET_PDEATHSIG would kill it with the calling thread)."""
        pid = self.pid
        if pid is None:
            raise LibvirtdError(f"libvirtd {self.name} is not running")
        os.kill(pid, sig)
        deadline = time.monotonic() + timeout
        while _alive(pid) and _mnt_ns(pid) == self.mnt_ns:
            if time.monotonic() > deadline:
                raise LibvirtdError(f"libvirtd {self.name} ({pid}) ignores SIGTERM")
            time.sleep(0.05)
        self._previous.append((self.mnt_ns, self.proc))
        self.mnt_ns, self.proc = None, None
        with contextlib.suppress(FileNotFoundError):
            self.pid_file.unlink()
        spawned: list = []  # the reaper, or what spawn() raised

        def keep():
            try:
                self.spawn()
                spawned.append(self.proc)
            except BaseException as e:  # noqa: BLE001 - re-raised by the caller
                spawned.append(e)
                return
            spawned[0].wait()  # the spawning thread outlives the daemon

        threading.Thread(target=keep, daemon=True, name=f"libvirtd-{self.name}").start()
        deadline = time.monotonic() + timeout
        while not spawned and time.monotonic() < deadline:
            time.sleep(0.01)
        if not spawned:
            raise LibvirtdError(f"libvirtd {self.name} not spawned in {timeout} s")
        if isinstance(spawned[0], BaseException):
            raise spawned[0]
        self.wait_ready()

    def connect(self):
        """A new libvirt connection to this daemon (register the event loop first if you want events)."""
        import libvirt  # noqa: PLC0415

        return libvirt.open(self.uri)

    def pids(self) -> list[int]:
        """libvirtd and every QEMU it started: all processes in the daemon's mount namespace."""
        return _pids_in_mnt_ns(self.mnt_ns) if self.mnt_ns else []

    def close(self) -> None:
        """SIGTERM libvirtd, then SIGKILL everything left in its mount namespace (the QEMUs), each bounded;
        the namespace and its bind mounts go with the last process; then remove <root>."""
        try:
            if self.mnt_ns is None and self.proc is not None and self.proc.poll() is None:
                self.proc.terminate()  # not up yet: the reaper forwards SIGTERM to the shell or libvirtd
            if self.mnt_ns and (pid := self.pid) is not None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGTERM)
                deadline = time.monotonic() + 5
                while _mnt_ns(pid) == self.mnt_ns and time.monotonic() < deadline:
                    time.sleep(0.05)
            deadline = time.monotonic() + 10
            for ns in [self.mnt_ns, *(ns for ns, _ in self._previous)]:
                while ns:
                    left = _pids_in_mnt_ns(ns)
                    if not left:
                        break
                    if time.monotonic() > deadline:
                        raise LibvirtdError(f"libvirtd {self.name}: processes {left} survive SIGKILL")
                    for pid in left:
                        with contextlib.suppress(ProcessLookupError):
                            os.kill(pid, signal.SIGKILL)
                    time.sleep(0.05)
        finally:
            for _ns, proc in self._previous:
                if proc is not None:
                    with contextlib.suppress(subprocess.TimeoutExpired):
                        proc.wait(5)
            self._previous.clear()
            if self.proc is not None:  # the reaper exits once it has no child left
                try:
                    self.proc.wait(5)
                except subprocess.TimeoutExpired:
                    self.proc.kill()
                    with contextlib.suppress(subprocess.TimeoutExpired):
                        self.proc.wait(5)
                self.proc = None
            if self._own_workdir and not self.keep_workdir and self.workdir is not None:
                shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self) -> Libvirtd:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()


def _alive(pid: int) -> bool:
    """Running, and not a zombie (PID 1 here reaps slowly)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[-1].split()[0] != "Z"


def sweep() -> list[int]:
    """Kill what a crashed run left (its test process SIGKILLed: libvirtd dies with it, the QEMUs it
    daemonized do not) and remove its <root>: for every /tmp/srmig-libvirtd-<pid>-* whose <pid> is gone, the
    processes named by its pid files that are still libvirtd or QEMU in a private mount namespace.
    Returns the pids killed."""
    killed = []
    host_ns = _mnt_ns(os.getpid())
    for root in Path(tempfile.gettempdir()).glob("srmig-libvirtd-*-*"):
        owner = root.name.split("-")[2]
        if not owner.isdigit() or _alive(int(owner)):
            continue
        for pidfile in [root / "libvirtd.pid", *(root / "run" / "qemu").glob("*.pid")]:
            with contextlib.suppress(OSError, ValueError):
                pid = int(pidfile.read_text().strip())
                exe = os.path.basename(os.readlink(f"/proc/{pid}/exe"))
                if (exe == "libvirtd" or exe.startswith("qemu-system")) and _mnt_ns(pid) not in (None, host_ns):
                    os.kill(pid, signal.SIGKILL)
                    killed.append(pid)
        shutil.rmtree(root, ignore_errors=True)
    return killed


def start_all(*daemons: Libvirtd) -> None:
    """Spawn every daemon from the calling thread, then wait for each: they probe QEMU concurrently. On
    failure every daemon is closed."""
    try:
        for d in daemons:
            d.spawn()
        for d in daemons:
            d.wait_ready()
    except BaseException:
        for d in daemons:
            with contextlib.suppress(Exception):
                d.close()
        raise


def tail(path: Path, n: int = 2000) -> str:
    try:
        return Path(path).read_text(errors="replace")[-n:]
    except OSError:
        return ""


# --- the test guest as a domain -----------------------------------------------------------------------

def console_path(domain: str) -> str:
    """The guest console file, as the daemon sees it (per daemon: /var/log/libvirt is bind-mounted)."""
    return f"/var/log/libvirt/qemu/{domain}-console.log"


def ctl_path(domain: str) -> str:
    """The guest control channel (ttyS1, a unix socket; see guest.py), as the daemon sees it."""
    return f"/var/lib/libvirt/qemu/{domain}-ctl.sock"


def domain_xml(name: str = "srmig-vm", tap: str = TAP, mac: str = GUEST_MAC, addr: str | None = GUEST_ADDR,
               gateway: str = GATEWAY_LL, memory_mib: int = 256, stats_interval: int = 0,
               image: guest_mod.GuestImage | None = None, ctl: bool = True, metadata: str = "",
               addr4: str | None = None, gateway4: str = GATEWAY_V4) -> str:
    """The test guest (srmig.testbed.guest) as a libvirt domain: TCG, 1 vCPU, `memory_mib`, direct kernel
    boot, virtio-net on the pre-created tap `tap` (managed='no': libvirt neither creates nor configures it;
    driver qemu: no vhost), console (ttyS0) to a file, control channel (ttyS1) on a unix socket, no other
    devices. The paths are the daemon's (per-daemon state dirs), so the same XML works on both ends.
    `addr4` ("198.51.100.10/24") makes the guest dual-stack, its IPv4 default gateway `gateway4`."""
    img = image or guest_mod.image()
    cmdline = guest_mod.kernel_cmdline(addr, gateway, stats_interval, addr4=addr4,
                                       gw4=gateway4 if addr4 else None)
    ctl_xml = (f"""
    <serial type='unix'><source mode='bind' path={quoteattr(ctl_path(name))}/><target port='1'/></serial>"""
               if ctl else "")
    meta_xml = f"\n  <metadata>{metadata}</metadata>" if metadata else ""
    return f"""<domain type='qemu'>
  <name>{escape(name)}</name>{meta_xml}
  <memory unit='MiB'>{int(memory_mib)}</memory>
  <vcpu>1</vcpu>
  <os>
    <type arch='x86_64' machine='pc'>hvm</type>
    <kernel>{escape(str(img.kernel))}</kernel>
    <initrd>{escape(str(img.initrd))}</initrd>
    <cmdline>{escape(cmdline)}</cmdline>
  </os>
  <clock offset='utc'/>
  <on_poweroff>destroy</on_poweroff>
  <on_reboot>destroy</on_reboot>
  <on_crash>destroy</on_crash>
  <devices>
    <emulator>{QEMU_BIN}</emulator>
    <controller type='usb' model='none'/>
    <interface type='ethernet'>
      <mac address={quoteattr(mac)}/>
      <target dev={quoteattr(tap)} managed='no'/>
      <model type='virtio'/>
      <driver name='qemu'/>
      <rom enabled='no'/>
    </interface>
    <serial type='file'><source path={quoteattr(console_path(name))}/><target port='0'/></serial>{ctl_xml}
    <memballoon model='none'/>
  </devices>
</domain>
"""


def wait_console(daemon: Libvirtd, domain: str, pattern: str, timeout: float) -> float:
    """Wait (bounded) for `pattern` (a plain substring) on the guest console; returns the seconds waited."""
    path = daemon.host_path(console_path(domain))
    t0 = time.monotonic()
    while True:
        if pattern in tail(path, 1 << 20):
            return time.monotonic() - t0
        if time.monotonic() - t0 > timeout:
            raise TimeoutError(f"{domain} on {daemon.name}: no {pattern!r} in {timeout} s; console: "
                               f"{tail(path)} qemu: {daemon.qemu_log(domain)}")
        time.sleep(0.05)


def guest_ping(daemon: Libvirtd, domain: str, timeout: float = 10) -> float:
    """Seconds until the guest answered `ping TOKEN` on its control channel (ttyS1, see guest.py): proves the
    guest runs under this daemon. Bounded (TimeoutError)."""
    t0 = time.monotonic()
    control_command(daemon.host_path(ctl_path(domain)), "ping", timeout, name=f"{domain} on {daemon.name}")
    return time.monotonic() - t0


def guest_stats(daemon: Libvirtd, domain: str, timeout: float = 5) -> dict[str, int]:
    """The guest's own counters (/proc/net/snmp6 keys, /proc/net/snmp's as nstat names them, eth0_<counter>),
    through its control channel."""
    return parse_stats(control_command(daemon.host_path(ctl_path(domain)), "stats", timeout,
                                       name=f"{domain} on {daemon.name}"))


# --- migration ----------------------------------------------------------------------------------------

def migration_flags(postcopy: bool = False) -> int:
    import libvirt  # noqa: PLC0415

    flags = libvirt.VIR_MIGRATE_LIVE | libvirt.VIR_MIGRATE_PEER2PEER
    if postcopy:
        flags |= libvirt.VIR_MIGRATE_POSTCOPY
    return flags


def migration_params(dest_addr: str, bandwidth_mib: int | None = None, port: int | None = None) -> dict:
    import libvirt  # noqa: PLC0415

    host = f"[{dest_addr}]" if ":" in dest_addr else dest_addr
    params = {libvirt.VIR_MIGRATE_PARAM_URI: f"tcp://{host}" + (f":{port}" if port else ""),
              libvirt.VIR_MIGRATE_PARAM_LISTEN_ADDRESS: dest_addr}
    if bandwidth_mib is not None:
        params[libvirt.VIR_MIGRATE_PARAM_BANDWIDTH] = int(bandwidth_mib)
    return params


def migrate(dom, dest: Libvirtd, dest_addr: str, postcopy: bool = False, bandwidth_mib: int | None = None,
            flags: int | None = None) -> None:
    """Live-migrate `dom` (on the source daemon) to `dest`, peer-to-peer: blocks until done (libvirtError
    on failure or abort). The QEMU stream goes to tcp://[dest_addr]; the daemons talk over dest's socket."""
    f = migration_flags(postcopy) if flags is None else flags
    dom.migrateToURI3(dest.uri, migration_params(dest_addr, bandwidth_mib), f)


class MigrationThread(threading.Thread):
    """`migrate()` in a thread, so the caller can watch events, start post-copy or abort meanwhile."""

    def __init__(self, dom, dest: Libvirtd, dest_addr: str, **kw):
        super().__init__(daemon=True, name="srmig-migrate")
        self.args = (dom, dest, dest_addr)
        self.kw = kw
        self.error: Exception | None = None
        self.t_start = self.t_end = 0.0

    def run(self) -> None:
        self.t_start = time.monotonic()
        try:
            migrate(*self.args, **self.kw)
        except Exception as e:  # noqa: BLE001 - handed to the caller
            self.error = e
        finally:
            self.t_end = time.monotonic()

    def result(self, timeout: float) -> float:
        """Wait (bounded); re-raise the migration's error; return its duration in seconds."""
        self.join(timeout)
        if self.is_alive():
            raise TimeoutError(f"migration not finished in {timeout} s")
        if self.error is not None:
            raise self.error
        return self.t_end - self.t_start


# --- two daemons, one migration, its events -----------------------------------------------------------

@contextlib.contextmanager
def daemons(topo, roles: tuple[str, ...] = ("S", "D"), tap: str | None = TAP, hooks: dict | None = None):
    """A private libvirtd in each role's namespace of `topo` (srmig.testbed.netns.Topology), and the guest's
    tap pre-created in each (libvirt's managed='no' needs it on both ends of a migration). Yields {role:
    Libvirtd}; `hooks`: {role: {name: script}} (Libvirtd.hooks). On exit every daemon, its QEMUs and the taps we created are gone, pass or fail."""
    from srmig.testbed.qemu import create_tap, delete_link  # noqa: PLC0415

    sweep()
    with contextlib.ExitStack() as stack:
        if tap:
            for role in roles:
                if create_tap(topo.ns(role), tap):
                    stack.callback(delete_link, topo.ns(role), tap)
        ds = {role: Libvirtd(role, topo.ns(role), hooks=(hooks or {}).get(role, {})) for role in roles}
        for d in ds.values():
            stack.callback(d.close)
        start_all(*ds.values())
        yield ds


def qemu_pid(daemon: Libvirtd, domain: str) -> int:
    return int(daemon.host_path(f"/run/libvirt/qemu/{domain}.pid").read_text().strip())


SCENARIOS = ("precopy", "postcopy", "abort", "abort-kill-dest")


@dataclass
class Recording:
    scenario: str
    events: list[dict]
    error: str = ""                  # the migration call's error, if any
    migration_s: float = 0.0         # duration of the migrateToURI3 call
    boot_s: float = 0.0
    running_on: str = ""             # where the domain runs afterwards: "S", "D" or "" (nowhere)

    def fixture(self) -> list[dict]:
        """The events as stored in tests/fixtures/libvirt/<scenario>.json."""
        return [{k: v for k, v in e.items() if k != "domain"} for e in self.events]


def record(scenario: str, topo=None, ds: dict | None = None, domain: str = "srmig-vm",
           mgmt: tuple[str, str] = ("fd00:99::1", "fd00:99::2"), timeout: float = 60,
           keep=None) -> Recording:
    """Boot the guest on S, migrate it to D according to `scenario` and record both daemons' events:
    - precopy: live pre-copy, unlimited bandwidth;
    - postcopy: VIR_MIGRATE_POSTCOPY at 20 MiB/s, migrateStartPostCopy after the first iteration event;
    - abort: 20 MiB/s, domainJobAbort (dom.abortJob) on S 0.5 s after the first iteration event;
    - abort-kill-dest: pre-copy; D's QEMU is SIGKILLed as soon as S reports SUSPENDED (the pause).
    Without `topo`/`ds`, builds its own namespaces (S, D, a management veth) and daemons. `keep(recording,
    sconn, dconn)`, if given, runs while the domain still exists (checks on the migrated guest); afterwards
    the domain is destroyed on both daemons."""
    import libvirt  # noqa: PLC0415

    from srmig.ctl.libvirt_events import EventRecorder, ensure_event_loop  # noqa: PLC0415

    if scenario not in SCENARIOS:
        raise ValueError(f"scenario must be one of {SCENARIOS}")
    ensure_event_loop()
    with contextlib.ExitStack() as stack:
        if topo is None:
            from srmig.testbed.netns import Topology  # noqa: PLC0415
            topo = stack.enter_context(Topology())
            topo.add_host("S")
            topo.add_host("D")
            topo.link("S", "mg0", "D", "mg0", mgmt[0] + "/64", mgmt[1] + "/64")
        if ds is None:
            ds = stack.enter_context(daemons(topo))
        s, d = ds["S"], ds["D"]
        sconn, dconn = s.connect(), d.connect()
        stack.callback(dconn.close)
        stack.callback(sconn.close)
        rec = stack.enter_context(EventRecorder())
        rec.watch("S", sconn)
        rec.watch("D", dconn)
        dom = sconn.createXML(domain_xml(domain), 0)
        out = Recording(scenario, [])
        out.boot_s = wait_console(s, domain, "SRMIG-GUEST-READY", timeout)
        rec.poll()
        rec.events.clear()
        rec.t0 = time.monotonic()
        kw: dict = {}
        if scenario == "postcopy":
            kw = {"postcopy": True, "bandwidth_mib": 20}
        elif scenario == "abort":
            kw = {"bandwidth_mib": 20}
        mig = MigrationThread(dom, d, mgmt[1], **kw)
        mig.start()
        try:
            if scenario == "postcopy":
                rec.wait(lambda e: e["event"] == "migration-iteration", timeout)
                dom.migrateStartPostCopy(0)
            elif scenario == "abort":
                rec.wait(lambda e: e["event"] == "migration-iteration", timeout)
                time.sleep(0.5)
                dom.abortJob()
            elif scenario == "abort-kill-dest":
                rec.wait(lambda e: e["daemon"] == "S" and e["type"] == "SUSPENDED", timeout)
                os.kill(qemu_pid(d, domain), signal.SIGKILL)
            try:
                out.migration_s = mig.result(timeout)
            except libvirt.libvirtError as e:
                out.error = str(e)
                out.migration_s = mig.t_end - mig.t_start
        finally:
            if mig.is_alive():  # never leave a migration running behind us
                with contextlib.suppress(libvirt.libvirtError):
                    dom.abortJob()
                mig.join(timeout)
        # The last events come after the call returns (the source's STOPPED ~0.2 s after the destination
        # resumed; a failed destination's STOPPED): wait for the end, bounded, then a little longer.
        def over(e):
            if out.error:
                return e["daemon"] == "D" and e["type"] == "STOPPED"
            return e["daemon"] == "S" and e["event"] == "job-completed"
        with contextlib.suppress(TimeoutError):
            rec.wait(over, 10)
        time.sleep(0.5)
        rec.poll()
        for role, conn in (("S", sconn), ("D", dconn)):
            for dm in conn.listAllDomains(libvirt.VIR_CONNECT_LIST_DOMAINS_RUNNING):
                if dm.name() == domain:
                    out.running_on = role
        rec.close()
        out.events = list(rec.events)
        if keep is not None:
            keep(out, sconn, dconn)
        for conn in (sconn, dconn):  # leave both daemons without the domain, for the next recording
            for dm in conn.listAllDomains():
                if dm.name() == domain:
                    with contextlib.suppress(libvirt.libvirtError):
                        dm.destroy()
        return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m srmig.testbed.libvirtd", description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("record", help="record libvirt events of migrations into JSON fixtures")
    r.add_argument("--out", default="tests/fixtures/libvirt")
    r.add_argument("scenarios", nargs="*", default=list(SCENARIOS))
    args = ap.parse_args(argv)
    import libvirt  # noqa: PLC0415

    from srmig.testbed.netns import Topology  # noqa: PLC0415

    libvirt.registerErrorHandler(lambda *a: None, None)  # errors are reported by the recording itself

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with Topology() as topo:
        topo.add_host("S")
        topo.add_host("D")
        topo.link("S", "mg0", "D", "mg0", "fd00:99::1/64", "fd00:99::2/64")
        with daemons(topo) as ds:
            for sc in args.scenarios:
                rec = record(sc, topo, ds)
                path = out / f"{sc}.json"
                path.write_text("[\n" + ",\n".join(json.dumps(e) for e in rec.fixture()) + "\n]\n")
                print(f"{sc}: migration {rec.migration_s:.3f} s, error {rec.error!r}, running on "
                      f"{rec.running_on or 'nowhere'}, {len(rec.events)} events -> {path}")
                for e in rec.events:
                    print(f"  {e['t']:7.3f} {e['daemon']} {e['event']:20s} {e['type']}/{e['detail']}"
                          + (f" {e['params']}" if 'params' in e else ""))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
