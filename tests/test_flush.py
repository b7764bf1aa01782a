"""A full held buffer into a VM's tap queue: every packet arrives, in order, none twice (bench/flush.py has
the rates). The tap's reader waits until the flush is over, like a paused or incoming QEMU."""

from __future__ import annotations

import contextlib
import errno
import mmap
import socket

import pytest

from bench import flush as F
from bench import tx_ring
from bench.tx_ring import TxRingSender
from srmig.ctl import senders
from srmig.ctl.senders import SENDMMSG_BATCH, FabricSender, PacketSender, RawSender

N = 10_000


@pytest.fixture(scope="module")
def lab():
    with F.FlushLab(qlen=N + 1024) as lab:
        yield lab


def _seqs(frames: list[bytes]) -> list[int]:
    return [int.from_bytes(f[-8:], "big") for f in frames if F.is_probe(f)]


@pytest.mark.netns
@pytest.mark.parametrize("size", [70, 1514])
def test_chosen_path_delivers_a_full_buffer_in_order(lab, size):
    lab.drain()
    out = F.flush_into_tap(lab, F.held_buffer(N, size))
    assert out["sent"] == N and out["dropped"] == 0 and out["errors"] == {}
    seqs = _seqs(out["frames"])
    assert len(seqs) == N, f"{N - len(seqs)} lost"
    assert seqs == list(range(N)), "out of order or duplicated"
    assert all(len(f) == size for f in out["frames"] if F.is_probe(f))


@pytest.mark.netns
def test_routed_send_many_keeps_order_across_batches(lab):
    """RawSender.send_many, the drain's and return_held's sender: routed by each packet's DA, batch
    boundaries (and a last partial batch) invisible at the receiver."""
    n = 3 * SENDMMSG_BATCH + 17
    lab.drain()
    with lab.topo.inside("H"):
        s = RawSender()
    try:
        assert s.send_many(F.held_buffer(n, 128)) == n and s.dropped == 0
    finally:
        s.close()
    assert _seqs(lab.drain()) == list(range(n))


@pytest.mark.netns
def test_fabric_sender_frames_each_packet_to_its_next_hops_mac_in_order(lab):
    """FabricSender, the drain's sender: the route to the DA (the VM's /128 out of the tap) and the neighbour
    table (the VM's MAC) give the frame's link and MACs; AF_PACKET sends it, batch boundaries invisible."""
    n = 3 * SENDMMSG_BATCH + 17
    packets = F.held_buffer(n, 128)
    lab.drain()
    with lab.topo.inside("H"):
        s = FabricSender()
    try:
        runs = s.runs(packets)
        assert [(sender is s.raw, chunk) for sender, chunk in runs] == [(False, F.ether(packets))]
        assert s.send_many(packets) == n and s.dropped == 0 and s.errors == {}
    finally:
        s.close()
    got = lab.drain()
    assert _seqs(got) == list(range(n))
    assert {f[:14] for f in got if F.is_probe(f)} == {F.ether([b""])[0]}


@pytest.mark.netns
def test_fabric_sender_leaves_a_next_hop_without_a_mac_to_the_kernel(lab):
    """A DA with no route, or whose next hop the neighbour table has no MAC for, goes through the RawSender
    (the kernel routes it and resolves the MAC, or refuses and is counted); the runs keep the packets' order."""
    vm = F.held_buffer(4, 128)
    elsewhere = vm[0][:24] + socket.inet_pton(socket.AF_INET6, "2001:db8:dead::1") + vm[0][40:]
    with lab.topo.inside("H"):
        s = FabricSender()
    try:
        runs = s.runs([vm[0], vm[1], elsewhere, vm[2]])
        assert [(sender is s.raw, chunk) for sender, chunk in runs] == [
            (False, F.ether(vm[:2])), (True, [elsewhere]), (False, F.ether(vm[2:3]))]
        assert runs[0][0] is runs[2][0]
    finally:
        s.close()


@pytest.mark.netns
@pytest.mark.parametrize("sender", [PacketSender, TxRingSender])
def test_an_unsendable_packet_is_counted_and_skipped_in_place(lab, sender):
    """Frames the kernel refuses (longer than the tap's MTU, within a TX ring slot or not; shorter than an
    Ethernet header) are dropped, counted by errno, and the packets around them still arrive in order."""
    frames = F.ether(F.held_buffer(100, 128))
    frames[10] = frames[10][:-8] + bytes(1400) + frames[10][-8:]   # 1528 B: fits a 2 KiB slot, not the MTU
    frames[50] = frames[50][:-8] + bytes(9000) + frames[50][-8:]
    frames[70] = b"\x02short"
    lab.drain()
    with lab.topo.inside("H"):
        s = sender(F.TAP)
    try:
        assert s.send_many(frames) == 97
        assert s.dropped == 3 and s.errors == {"EMSGSIZE": 2, "EINVAL": 1}
    finally:
        s.close()
    assert _seqs(lab.drain()) == [i for i in range(100) if i not in (10, 50, 70)]


def _mixed(n: int, start: int = 0) -> list[bytes]:
    """n frames of varying length (70..1514 B), sequence numbers from `start`: a longer frame's bytes left
    in a slot must not show behind a shorter one."""
    sizes = [70, 1514, 128, 1000, 71, 600]
    return [F.ether([F.held_buffer(1, sizes[i % len(sizes)])[0][:-8] + i.to_bytes(8, "big")])[0]
            for i in range(start, start + n)]


@pytest.mark.netns
def test_tx_ring_wraps_in_order_across_calls(lab):
    """TxRingSender on a small ring (64 slots): calls of every size (one frame, less than a ring, more than
    a ring, a ring exactly) start where the last one stopped, so fills wrap around the ring's end; every
    frame arrives whole (byte for byte, lengths mixed), in order, none twice."""
    lab.drain()
    with lab.topo.inside("H"):
        s = TxRingSender(F.TAP, slots=64)
    sent_frames, seq = [], 0
    try:
        assert s.slots == 64
        for n in (1, 50, 100, 17, 64, 200, 3):
            frames = _mixed(n, seq)
            seq += n
            assert s.send_many(frames) == n
            sent_frames += frames
        assert s.dropped == 0 and s.errors == {}
    finally:
        s.close()
    got = [f for f in lab.drain() if F.is_probe(f)]
    assert _seqs(got) == list(range(seq))
    assert got == sent_frames


class _Refusing:
    """A TX ring socket whose send() fails `times` times with `err` without the kernel seeing the ring,
    then sends."""

    def __init__(self, sock, err: int, times: int):
        self.sock, self.err, self.times = sock, err, times

    def send(self, data: bytes) -> int:
        if self.times:
            self.times -= 1
            raise OSError(self.err, "refused")
        return self.sock.send(data)

    def fileno(self) -> int:
        return self.sock.fileno()

    def setsockopt(self, *a):
        return self.sock.setsockopt(*a)

    def close(self) -> None:
        self.sock.close()


@pytest.mark.netns
@pytest.mark.parametrize("times, sent, dropped", [(3, 200, 0), (1000, 0, 200)], ids=["retried", "given-up"])
def test_tx_ring_full_queue_retried_or_given_up_counted(lab, monkeypatch, times, sent, dropped):
    """ENOBUFS from send(): retried with a doubling wait; past RETRIES the rest is given up, counted, and
    its slots taken back (here a fill that wraps the ring's end), so the next call still starts where the
    kernel's head is and arrives in order."""
    monkeypatch.setattr(tx_ring, "RETRY_FIRST_S", 1e-6)
    frames = F.ether(F.held_buffer(400, 128))
    lab.drain()
    with lab.topo.inside("H"):
        s = TxRingSender(F.TAP, slots=256)
    real = s.sock
    try:
        assert s.send_many(frames[:100]) == 100
        s.sock = _Refusing(real, errno.ENOBUFS, times)
        assert s.send_many(frames[100:300]) == sent  # slots 100..255, then 0..43
        assert s.dropped == dropped and s.errors == ({"ENOBUFS": dropped} if dropped else {})
        s.sock = real
        assert s.send_many(frames[300:]) == 100
    finally:
        s.sock = real
        s.close()
    assert _seqs(lab.drain()) == [i for i in range(400) if not (dropped and 100 <= i < 300)]


@pytest.mark.netns
def test_tx_ring_frame_the_kernel_refuses_is_skipped_on_a_new_ring(lab, monkeypatch):
    """A frame refused by the kernel itself (TP_STATUS_WRONG_FORMAT; here a short one let past the check)
    stops the kernel's ring there: it is counted, skipped, and the frames behind it follow on a new ring."""
    monkeypatch.setattr(TxRingSender, "_valid", lambda self, frames: frames)
    reopened = []
    reopen = TxRingSender._reopen
    monkeypatch.setattr(TxRingSender, "_reopen", lambda self: reopened.append(1) or reopen(self))
    frames = F.ether(F.held_buffer(300, 128))
    frames[100] = b"\x02short"
    lab.drain()
    with lab.topo.inside("H"):
        s = TxRingSender(F.TAP, slots=256)
    try:
        assert s.send_many(frames) == 299
        assert s.dropped == 1 and s.errors == {"EINVAL": 1} and reopened == [1]
        assert s.send_many(F.ether(F.held_buffer(310, 128)[300:])) == 10
    finally:
        s.close()
    assert _seqs(lab.drain()) == [i for i in range(310) if i != 100]


class _FakeLibc:
    """sendmmsg(2) that answers from a script: a positive count sends that many (and writes their msg_len, as
    the kernel does), an errno fails."""

    def __init__(self, script):
        self.script = list(script)
        self.calls = 0

    def sendmmsg(self, fd, msgs, vlen, flags):
        self.calls += 1
        step = self.script.pop(0) if self.script else vlen
        if step > 0:
            for j in range(min(step, vlen)):
                msgs[j].msg_len = 1
            return min(step, vlen)
        senders._ffi.errno = -step
        return -1


class _PairSender(senders._BatchSender):
    def __init__(self):
        super().__init__()
        self.sock, self._peer = socket.socketpair()


@pytest.mark.parametrize("script, sent, dropped, errors", [
    ([3, -errno.ENOBUFS, -errno.ENOBUFS], 10, 0, {}),                       # partial, full queue, retried
    ([-errno.EMSGSIZE, -errno.EMSGSIZE], 9, 1, {"EMSGSIZE": 1}),             # twice: that one is skipped
    ([-errno.EHOSTUNREACH], 10, 0, {}),                                      # once: a stale error, resent
    ([4] + [-errno.ENOBUFS] * 100, 4, 6, {"ENOBUFS": 6}),                    # never drains: rest given up
], ids=["enobufs-retried", "emsgsize-skipped", "stale-error-retried", "retries-bounded"])
def test_send_many_retries_and_counts(monkeypatch, script, sent, dropped, errors):
    fake = _FakeLibc(script)
    monkeypatch.setattr(senders, "_libc", fake)
    monkeypatch.setattr(senders, "RETRY_FIRST_S", 1e-6)
    s = _PairSender()
    try:
        assert s.send_many([b"x"] * 10) == sent
        assert (s.dropped, s.errors) == (dropped, errors)
        assert fake.calls <= 4 + senders.RETRIES
    finally:
        s.sock.close()
        s._peer.close()


@contextlib.contextmanager
def _log_in_memory(size: int = 4088):
    """A SentLog in anonymous memory of the size the hold ring's consumer page leaves it."""
    mem = mmap.mmap(-1, size)
    with senders._ffi.from_buffer(mem) as p:
        log = senders.SentLog(int(senders._ffi.cast("uintptr_t", p)), size)
    try:
        yield log
    finally:
        log.close()
        mem.close()


def test_sent_log_says_what_sendmmsg_sent():
    """The kernel writes each sent message's msg_len into the log's vector: the log says where the last
    batch began and how many of it are done, in batches of what the room holds (one entry ends the count)."""
    at = [1000 + 8 * i for i in range(150)]
    with _log_in_memory() as log:
        assert log.batch == 62
        s = _PairSender()
        try:
            assert s.send_many([b"x"] * 150, log=log, at=at) == 150
        finally:
            s.sock.close()
            s._peer.close()
        assert log.sent() == (at[124], 26)  # batches from 0, 62, 124
        log.reset()
        assert log.sent() == (at[124], 0)
        log.begin(at[0], 5)  # a batch begun and nothing sent: none counts, the tags of old ones differ
        assert log.sent() == (at[0], 0)


def test_sent_log_counts_a_skipped_message_as_done(monkeypatch):
    """A message the kernel refuses twice is given up: it counts as done, so the ones sent after it do too."""
    monkeypatch.setattr(senders, "_libc", _FakeLibc([-errno.EMSGSIZE, -errno.EMSGSIZE, 4, -errno.ENOBUFS]))
    monkeypatch.setattr(senders, "RETRY_FIRST_S", 1e-6)
    with _log_in_memory() as log:
        s = _PairSender()
        try:
            assert s.send_many([b"x"] * 10, log=log, at=list(range(8, 88, 8))) == 9
        finally:
            s.sock.close()
            s._peer.close()
        assert log.sent() == (8, 10)


@pytest.mark.bpf
@pytest.mark.netns
def test_a_drain_killed_mid_send_is_not_sent_twice():
    """The source's drain sends what the hold ring holds before consuming it (newer packets park behind it
    meanwhile). Killed in between (as the source agent was once in CI, after the VM resumed on D: the
    restarted agent sent 109 probes twice), the records it had sent stay in the ring; the ring's sent log,
    which the kernel wrote as it sent them, says so, and the next drain consumes them without sending them
    again. (tests/test_sent_log.py kills the drain and unpark at every send.)"""
    from srmig.ctl.drain import SourceDrain, hold_ring_reader, read_hold_packets, sent_log, skip_sent
    from srmig.bpf import libbpf
    from srmig.testbed import lab as L
    from srmig.testbed.packets import h_encaps, inner

    def park_40_and_kill_after_25(lab, tag: str) -> None:
        """40 packets parked; a drain reads them, sends 25, and is killed before its commit."""
        with lab.topo.inside("lab"):
            for i in range(40):
                libbpf.prog_test_run(lab.prog_fd, bytes(h_encaps(
                    [L.SID_S, L.D_SBUF], inner(L.VM_HOLD, payload=f"{tag}-{i}".encode()), dst_mac=L.FAB_MAC)),
                    ingress_ifindex=lab.fab_ifindex)
            killed = hold_ring_reader(lab.dp)
            log = sent_log(killed)
            sender = RawSender()
        try:
            at = [killed.position]
            packets = read_hold_packets(killed, commit=False, ends=at)
            assert len(packets) == 40 and len(at) == 41
            assert sender.send_many(packets[:25], log=log, at=at) == 25
        finally:
            sender.close()
            log.close()
            killed.close()

    with L.TestRunLab() as lab:
        with lab.dp.hold_ring(lambda rec: None) as ring:
            ring.poll(0)  # what earlier users of this pinned program left behind
        park_40_and_kill_after_25(lab, "a")
        reader = hold_ring_reader(lab.dp)
        log = sent_log(reader)
        try:
            assert skip_sent(reader, log) == 25
            assert skip_sent(reader, log) == 0  # consumed: the log is behind the consumer now
            left = read_hold_packets(reader)
            assert [p[-4:] for p in left] == [f"a-{i}".encode() for i in range(25, 40)]
        finally:
            log.close()
            reader.close()
        # The restarted agent's path (QEMU gone: the ring alone): the 15 sent, the 25 not again.
        park_40_and_kill_after_25(lab, "b")
        with lab.topo.inside("lab"):
            rep = SourceDrain(lab.dp, L.VM_HOLD, "fc00:0:1::1", [L.D_SBUF], L.D_SBUF).ring_only()
        assert (rep.ring_sent_before, rep.from_ring) == (25, 15)


@pytest.mark.bpf
@pytest.mark.netns
def test_hold_ring_bulk_read_keeps_order_across_the_wrap():
    """read_hold_packets (the drain's bulk reader) returns exactly the held packets, in order, also when
    records wrap around the end of the ring (two fills of 5000 in a ring of ~8000 records)."""
    from srmig.ctl.drain import hold_ring_reader, read_hold_packets
    from srmig.bpf import libbpf
    from srmig.testbed import lab as L
    from srmig.testbed.packets import h_encaps, inner

    with L.TestRunLab() as lab:
        with lab.dp.hold_ring(lambda rec: None) as ring:
            ring.poll(0)  # what earlier users of this pinned program left behind
        reader = hold_ring_reader(lab.dp)
        try:
            for round_ in range(2):
                frames = [bytes(h_encaps([L.SID_S, L.D_SBUF], inner(L.VM_HOLD, payload=f"{round_}-{i}".encode()),
                                         dst_mac=L.FAB_MAC))
                          for i in range(5000)]
                with lab.topo.inside("lab"):
                    for f in frames:
                        libbpf.prog_test_run(lab.prog_fd, f, ingress_ifindex=lab.fab_ifindex)
                got = read_hold_packets(reader)
                # Each record: the packet from its IPv6 header on (advanced to D), whole, in arrival order.
                assert [len(p) for p in got] == [len(f) - 14 for f in frames]
                assert [p[-len(f"{round_}-{i}"):] for i, p in enumerate(got)] == \
                    [f"{round_}-{i}".encode() for i in range(5000)]
                assert read_hold_packets(reader) == []
        finally:
            reader.close()


@pytest.mark.netns
def test_the_kernel_ceiling_method_is_a_real_flush(lab):
    """bench/flush.py's packet_tx_ring_kernel times only the kernel's sends, but sends for real: what it
    reports is a flush that delivered every frame, in order, like the chosen method's (several ring fills)."""
    for method in (F.CHOSEN, F.CEILING):
        r = F.measure(lab, method, N, 128)
        assert r["ok"] and r["received"] == N and r["sender_dropped"] == 0, r


@pytest.mark.bpf
@pytest.mark.netns
@pytest.mark.parametrize("method", ["fabric_raw_sendmmsg", "fabric_packet_sendmmsg"])
def test_fabric_methods_deliver_through_srmigs_end_dx6_map(lab, method):
    """The fabric methods go S -> h0 -> tap through srmig's own End.DX6-map (XDP on h0), not the kernel's
    seg6local: every packet decapsulated and in the tap, in order, counted as delivered by that SID."""
    def delivered() -> int:
        return next(s["stats"]["delivered"] for s in lab.dp.stats()["sids"] if s["sid"] == F.H_SID)

    before = delivered()
    r = F.measure(lab, method, 2000, 128)
    assert r["ok"] and r["received"] == 2000 and r["duplicates"] == 0, r
    assert delivered() - before == 2000
