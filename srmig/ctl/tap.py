"""A VM's tap, from the host: the fds a QEMU holds on it (taken with pidfd_getfd(2), even while QEMU is
paused), the frames queued on them, the tap's queue length and what its owner read (docs/drain.md)."""

from __future__ import annotations

import errno
import fcntl
import os
import select
import struct
import time
from pathlib import Path

from cffi import FFI

from srmig.ctl import tapread

_ffi = FFI()
_ffi.cdef("""
    long syscall(long number, ...);
""")
_libc = _ffi.dlopen(None)
SYS_pidfd_open = 434
SYS_pidfd_getfd = 438
TUNGETIFF = 0x800454D2
TUNGETVNETHDRSZ = 0x800454D7
IFF_VNET_HDR = 0x4000


def _syscall(nr: int, *args: int) -> int:
    rc = _libc.syscall(nr, *[_ffi.cast("long", a) for a in args])
    if rc < 0:
        err = _ffi.errno
        raise OSError(err, f"syscall {nr}: {os.strerror(err)}")
    return rc


def tap_fds_of(pid: int, ifname: str) -> list[int]:
    """The fd numbers, in process `pid`, attached to tap `ifname` (fdinfo says `iff: NAME`)."""
    out = []
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            if os.readlink(f"/proc/{pid}/fd/{fd}") != "/dev/net/tun":
                continue
            info = Path(f"/proc/{pid}/fdinfo/{fd}").read_text()
        except OSError:
            continue
        for line in info.splitlines():
            if line.startswith("iff:") and line.split(None, 1)[1].strip() == ifname:
                out.append(int(fd))
    return sorted(out)


def take_fd(pid: int, fd: int) -> int:
    """A duplicate, in this process, of process `pid`'s file descriptor `fd` (needs ptrace rights: root)."""
    pidfd = _syscall(SYS_pidfd_open, pid, 0)
    try:
        return _syscall(SYS_pidfd_getfd, pidfd, fd, 0)
    finally:
        os.close(pidfd)


def vnet_hdr_len(fd: int) -> int:
    flags = struct.unpack("16sH", fcntl.ioctl(fd, TUNGETIFF, b"\0" * 18)[:18])[1]
    if not flags & IFF_VNET_HDR:
        return 0
    return struct.unpack("i", fcntl.ioctl(fd, TUNGETVNETHDRSZ, b"\0" * 4))[0]


def read_queued(fd: int, limit: int = 100_000) -> list[bytes]:
    """Every frame queued on the tap, oldest first, without their virtio-net headers. QEMU's fd is
    non-blocking (QEMU sets it so), so an empty queue answers EAGAIN; we never change the shared flags.
    In bulk (srmig.ctl.tapread: a read loop in C) once a TapKeeper has built it, else frame by frame."""
    skip = vnet_hdr_len(fd)
    if (bulk := tapread.built()) is not None:
        return tapread.read_frames(bulk, fd, skip, limit)
    return read_queued_each(fd, skip, limit)


def read_queued_each(fd: int, skip: int, limit: int = 100_000) -> list[bytes]:
    """read_queued() one os.read() per frame: where the bulk reader cannot be built, and for comparison."""
    frames = []
    while len(frames) < limit:
        try:
            buf = os.read(fd, 65536)
        except BlockingIOError:
            break
        except OSError as e:
            if e.errno == errno.EAGAIN:
                break
            raise
        if not buf:
            break
        frames.append(buf[skip:])
    return frames


def tap_tx_packets(ifname: str) -> int:
    """Frames read from the tap by its owner (tun counts a frame as transmitted when the reader takes it)."""
    return tap_stats(ifname)["tx_packets"]


def tap_stats(ifname: str):
    """The tap's 64-bit counters: tx_packets (frames its reader took), tx_dropped (frames refused on a full
    queue, the program's redirects included), ..."""
    from srmig import netlink  # noqa: PLC0415

    with netlink.handle() as ipr:
        return netlink.link_stats(netlink.ifindex(ifname, ipr), ipr)


def tap_mcast_sent(ifname: str) -> int:
    """IPv6 multicast packets this host's stack sent on the tap (its MLD reports, neighbour discovery): the
    device's Ip6OutMcastPkts (/proc/net/dev_snmp6, of the calling thread's namespace); 0 without IPv6 on it."""
    try:
        text = Path(f"/proc/thread-self/net/dev_snmp6/{ifname}").read_text()
    except FileNotFoundError:
        return 0
    return next((int(line.split()[1]) for line in text.splitlines() if line.startswith("Ip6OutMcastPkts")), 0)


TUNGETIFF = 0x800454D2  # _IOR('T', 210, unsigned int): the struct ifreq of the tap an fd is attached to


def tap_name(fd: int) -> str:
    """The name of the tap `fd` is attached to (a restarted agent holding the fds may not know it)."""
    ifr = fcntl.ioctl(fd, TUNGETIFF, bytes(40))
    return ifr[:16].split(b"\0", 1)[0].decode()


class TapKeeper:
    """A duplicate of a QEMU's tap fds, taken while QEMU lives. The tap queue then survives QEMU's death
    (the kernel purges it only when the last fd closes): what the destination held can be returned to the
    source when a migration aborts, and the source's drain finds its queue even if QEMU is gone by then."""

    taken: tuple[float, int] | None = None  # (time.monotonic(), frames read or dropped): restore_queue_len's

    def __init__(self, qemu_pid: int, tap: str):
        tapread.reader()  # built (or loaded) now, long before a drain reads the queue
        self.tap = tap
        self.fds = [take_fd(qemu_pid, fd) for fd in tap_fds_of(qemu_pid, tap)]
        if not self.fds:
            raise OSError(errno.ENOENT, f"process {qemu_pid} has no fd on tap {tap}")

    @classmethod
    def of_fds(cls, tap: str, fds: list[int]) -> TapKeeper:
        """Fds already ours (taken back from the fd store, srmig.ctl.fdstore): closed with the keeper."""
        tapread.reader()
        keeper = cls.__new__(cls)
        keeper.tap, keeper.fds = tap, list(fds)
        return keeper

    def frames(self) -> list[bytes]:
        return [frame for fd in self.fds for frame in read_queued(fd)]

    def close(self) -> None:
        for fd in self.fds:
            os.close(fd)
        self.fds = []

    def empty(self) -> bool:
        """Whether the tap's queue holds no frame now (the tap polls readable while it holds one)."""
        poller = select.poll()
        for fd in self.fds:
            poller.register(fd, select.POLLIN)
        return not any(ev & select.POLLIN for _, ev in poller.poll(0))

    def __enter__(self) -> TapKeeper:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def tap_queue_len(tap: str, qlen: int | None = None) -> int | None:
    """The tap's queue length (the ring its frames wait in for QEMU), set to `qlen` if given; returns the
    length it had, None if there is no such tap."""
    from srmig import netlink  # noqa: PLC0415

    with netlink.handle() as ipr:
        idx = netlink.find_ifindex(tap, ipr)
        if idx is None:
            return None
        old = netlink.link_txqlen(idx, ipr)
        if qlen is not None and qlen != old:
            netlink.set_link_txqlen(idx, qlen, ipr)
        return old


# The longest a busy host may keep the agent, and QEMU with it, off the CPU between the tap's last poll and the
# write of its queue length (restore_queue_len): above the ~200 ms round trips of the demo's probes on a loaded
# 2-core machine, when the write once landed in such a stall (docs/drain.md).
RESTORE_GAP_S = 0.25
# restore_queue_len's rate: over this long at least. Between two looks it only polls the tap (no netlink): a
# look costs ~1.5 ms of CPU, at the executor's 100 polls a second 15 % of a core for a busy VM's 10 s.
RATE_WINDOW_S = 0.1


def restore_queue_len(tap: str, qlen: int, queue: TapKeeper | None) -> bool:
    """End of a migration window: the tap's queue length back to `qlen`, once that loses nothing (`queue`: its
    fds; None: cannot tell, restore now). The kernel shortens the ring by keeping its oldest `qlen` frames and
    freeing the others, without counting them: a backlog the resumed QEMU has not read yet would be lost. So:
    - the queue must poll empty, right before the write: the netlink socket and the ifindex are ready before
      the poll, so the two are two system calls apart;
    - and the frames arriving while nobody reads them, RESTORE_GAP_S long, must fit in `qlen`: a thread of a
      busy host can stay off the CPU longer than a short queue lasts (1000 frames at 20,000/s: 50 ms), and QEMU
      with it; of what the tap then holds at the write, all but `qlen` frames are lost. The rate is what the
      tap's reader took (and the tap dropped) since the previous look, RATE_WINDOW_S ago or more: while the
      queue ends empty, no less than what arrived. The first look only takes that count.
    Returns False while either does not hold (try again later)."""
    from srmig import netlink  # noqa: PLC0415

    if queue is not None and queue.fds:
        if not queue.empty():
            return False
        if queue.taken is not None and time.monotonic() - queue.taken[0] < RATE_WINDOW_S:
            return False
    with netlink.handle() as ipr:
        idx = netlink.find_ifindex(tap, ipr)
        if idx is None:
            return True  # no tap, nothing to restore
        if queue is not None and queue.fds:
            stats = netlink.link_stats(idx, ipr)
            now, taken = time.monotonic(), stats["tx_packets"] + stats["tx_dropped"]
            last, queue.taken = queue.taken, (now, taken)
            if last is None or (taken - last[1]) * RESTORE_GAP_S > qlen * (now - last[0]):
                return False
            if not queue.empty():
                return False
        netlink.set_link_txqlen(idx, qlen, ipr)
    return True
