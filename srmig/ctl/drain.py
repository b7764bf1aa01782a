"""Recover the packets a paused QEMU will never read: its tap queue, and the one frame it swallows.

After QEMU pauses (stop-and-copy), frames already delivered to the VM's tap sit in a queue that QEMU no
longer reads and that dies with the source QEMU. QEMU's tap fd can be taken with pidfd_getfd(2) while it is
paused. Reading it returns those frames in order, each behind a virtio-net header. The VM's (IPv6 or IPv4
packets to one of its addresses) are re-encapsulated towards the destination's End.SBUF, one stream in the
tap's order whatever their family, so they reach the VM after it resumes, ahead of anything newer (see
`SourceDrain`). Also the abort's way back: `return_held`, `wait_delivered`, `unpark`
(docs/drain.md). Its parts: the tap (srmig.ctl.tap), the swallowed frame (srmig.ctl.swallow), the senders
(srmig.ctl.senders), H.Encaps (srmig.ctl.encap).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

from srmig.ctl.encap import ETH_P_IP, ETH_P_IPV6, VmPackets, decapsulate, encapsulate_packet, family
from srmig.ctl import pump as pumps
from srmig.ctl.senders import FabricSender, PacketSender, RawSender, SentLog
from srmig.ctl.swallow import MAX_SWALLOWED, SWALLOW_WINDOW_NS, ShadowLog, SwallowCheck
from srmig.ctl.tap import TapKeeper
from srmig.bpf import libbpf
from srmig.bpf.abi import VmState
from srmig.ctl.maps import VmAddressSet

RETURN_ARRIVAL_S = 0.05         # an abort: how long the source waits for the destination's returned packets
                                 # to arrive (counted at its End.SBUF) while none arrives, before it delivers
RETURN_ARRIVAL_MAX_S = 1.0       # what it parked; and at most, while they keep arriving
UNPARK_MAX_S = 1.0               # an abort: the longest the program parks behind the ring while the agent
                                 # gives the VM what it parked (a starved agent: reordered past this, not lost)
RING_FIRST_MAX_S = 0.25          # the longest the program parks behind the ring after the flip (a ring that
                                 # fills faster than we send never empties: then forward, and count)
RING_FIRST_GAINING_MAX_S = 1.0   # ... while each read of the ring finds fewer records than the one before (the
                                 # drain gains on it: it empties soon, and nothing need be overtaken)


def return_held(keeper: TapKeeper, src_addr: str, segments: list[str], skip: list[bytes] = (),
                addresses: list[str] | None = None) -> int:
    """Send every packet the destination's tap queue held back for the VM along `segments` (the source's
    End.DX6-map), IPv6 and IPv4 alike (next header 41 or 4), in the queue's order, in sendmmsg batches;
    returns how many were sent (the kernel accepted). `addresses`: the VM's, of both families (None: every
    IPv6 or IPv4 packet; ND and ARP are never returned). `skip`: inner packets not to return, once each: the
    frames the drain re-sent because the source QEMU had swallowed them, which that QEMU delivers itself
    when it resumes after an abort."""
    skip = list(skip)
    vm = VmPackets(addresses)
    packets = []
    for frame in keeper.frames():
        inner = vm.packet(frame)
        if inner is None:
            continue
        if inner in skip:
            skip.remove(inner)
            continue
        packets.append(encapsulate_packet(inner, src_addr, segments))
    sender = RawSender()
    try:
        return sender.send_many(packets)
    finally:
        sender.close()


_HOLD_HEAD = libbpf.ffi.sizeof("struct srmig_hold_record")
_HOLD_VM = libbpf.ffi.offsetof("struct srmig_hold_record", "vm")


def hold_ring_reader(dp) -> libbpf.RingReader:
    """A bulk reader of `dp`'s hold ring (its pin), for read_hold_packets()."""
    return libbpf.RingReader(libbpf.obj_get(str(Path(dp.pin_dir) / "hold_ring")), owns_fd=True)


def read_hold_packets(ring: libbpf.RingReader, limit: int = 1 << 30, commit: bool = True,
                      ends: list[int] | None = None) -> list[bytes]:
    """The packets parked in the hold ring, oldest first, consumed (with `commit=False`, once
    `ring.commit()` is called): each record's packet only, cut out of the ring without a callback per record
    (about 7x the rate of Dataplane.hold_ring's consumer). `ends`: RingReader.read's. A record is its header
    and the packet, no more (srmig_abi.h), so the packet is the rest of the record: no length to read."""
    return ring.read(limit, start=_HOLD_HEAD, commit=commit, ends=ends)


def sent_log(ring: libbpf.RingReader) -> SentLog:
    """The ring's sent log: in its consumer page, so it lives as long as the ring (the pin), not the agent.
    Close it before the ring."""
    return SentLog(*ring.spare)


def skip_sent(ring: libbpf.RingReader, log: SentLog, pin_dir=None) -> int:
    """Consume, without sending them again, the records an agent killed while sending them had sent (its
    sent log says exactly which, or for a batch the pump sent, the pump's mark pinned in `pin_dir`: the
    log's start and the mark's count); returns how many. First, before anything is read from `ring`."""
    start, k = log.sent()
    if k == 0 and pin_dir is not None:
        k = pumps.sent_in_mark(pin_dir, start)
    n = ring.skip(start, k)
    log.reset()  # all it says is consumed now; its next batch may start anywhere
    return n


def send_runs(log: SentLog, at: list[int], runs: list[tuple]) -> int:
    """Send `runs`, (sender, packets) one after the other, one packet per record read and not committed, in
    ring order; `at`: the ring position of each record and the one past the last. One send_many per run, so
    what has been sent is always a prefix of the ring, which `log` can say; the order in which each
    destination receives its packets is the ring's. Returns how many the kernel accepted."""
    sent, i = 0, 0
    for sender, packets in runs:
        sent += sender.send_many(packets, log=log, at=at[i:i + len(packets)])
        i += len(packets)
    return sent


def send_in_ring_order(log: SentLog, at: list[int], parts: list[tuple]) -> int:
    """send_runs of `parts`, one (sender, packet) per record: each run of records with the same sender."""
    runs: list[tuple] = []
    for sender, packet in parts:
        if runs and runs[-1][0] is sender:
            runs[-1][1].append(packet)
        else:
            runs.append((sender, [packet]))
    return send_runs(log, at, runs)


def one_step(dp, vm: str, addresses) -> VmAddressSet:
    """`dp` (a Dataplane or a VmAddressSet) writing VM `vm` with all its `addresses` in one write of the id's
    entry (VmAddressSet): the drain's and the unpark's steps move every address at once."""
    return VmAddressSet(getattr(dp, "dp", dp), lambda _: (vm, *(addresses or ())))


def _dst_key(inner: bytes) -> bytes:
    """IP packet `inner`'s destination as the vm_table key (srmig_abi.h: IPv4 as ::ffff:a.b.c.d)."""
    return inner[24:40] if family(inner) == 6 else bytes(10) + b"\xff\xff" + inner[16:20]


def _macs_to(addresses: list[str], tap: str) -> dict[str, bytes]:
    """The MACs the program's delivery puts on a packet for each of `addresses` on `tap`: to the VM's MAC
    (the tap's neighbour entry for that address, IPv6 or ARP), from the tap's; 12 bytes, the Ethernet type
    to follow. An address whose neighbour is unknown is left out."""
    from srmig import netlink  # noqa: PLC0415

    out = {}
    with netlink.handle() as ipr:
        idx = netlink.find_ifindex(tap, ipr)
        if idx is None:
            return out
        src = bytes.fromhex(netlink.link_mac(idx, ipr).replace(":", ""))
        for addr in addresses:
            if (mac := netlink.neighbour_mac(addr, idx, ipr)) is not None:
                out[addr] = bytes.fromhex(mac.replace(":", "")) + src
    return out


def sid_delivered(dp, sid: str) -> int:
    """Packets delivered so far by `sid` (its per-SID counter)."""
    return next((e.stats["delivered"] for e in dp.list_sids() if e.sid == sid), 0)


def wait_delivered(dp, sid: str, at_least: int, stall_s: float = RETURN_ARRIVAL_S,
                   max_s: float = RETURN_ARRIVAL_MAX_S) -> int:
    """An abort: wait until `sid` (the source's End.SBUF) has delivered `at_least` packets, i.e. what the
    destination returned has landed, before the source delivers what it parked. Bounded: gives up after
    `stall_s` without a new delivery (on a busy machine they trickle in), or `max_s` in all. Returns how
    many had not arrived then (0: all)."""
    t0 = last_progress = time.monotonic()
    seen = sid_delivered(dp, sid)
    while seen < at_least:
        now = time.monotonic()
        if now - last_progress > stall_s or now - t0 > max_s:
            break
        time.sleep(0.001)
        if (n := sid_delivered(dp, sid)) != seen:
            seen, last_progress = n, time.monotonic()
    return max(0, at_least - seen)


def unpark(dp, vm: str, tap: str | None, max_s: float = UNPARK_MAX_S, addresses: list[str] | None = None) -> int:
    """An abort, once the destination has returned the older packets it held: give the VM what the program
    parked meanwhile (SRMIG_VM_F_PARK: whole, as it came in), oldest first, straight into its tap queue;
    then plain RUNNING. `addresses`: the VM's, of both families (default: `vm` alone): each step is one write
    of the id's entry, which every address follows (VmAddressSet); their packets park in the same ring, each
    record naming the id, and are given in the ring's order, each with its family's Ethernet type and the
    MACs of its own destination address. While we send, newer packets still park behind them
    (SRMIG_VM_F_RING_FIRST: a batch is consumed only once sent), so none overtakes. Records of other VMs
    (already advanced: a drain's) are sent on as they are. Every record goes out in ring order through the
    ring's sent log, so an agent killed in here and restarted sends each exactly once. Returns how many
    records were sent (the kernel accepted), the VM's and others'."""
    own = VmPackets([vm, *(addresses or ())])
    dp = one_step(dp, vm, addresses)
    macs = _macs_to(own.addresses, tap) if tap else {}
    # vm_table key -> MACs, by the inner packet's destination (a record names the id whichever address the
    # packet is for; an address of a prefix: the id's)
    eth = {key: macs[addr] for key, addr in own.keys.items() if addr in macs}
    ring = hold_ring_reader(dp)
    log = sent_log(ring)
    # Not TxRingSender (bench/tx_ring.py): its ring's setup (0.1-30 ms, an RCU grace period) comes before the
    # first frame and costs more than its faster sends save up to ~10^4 parked packets (measured, 128 B frames).
    to_tap = PacketSender(tap) if eth else None
    raw = RawSender()
    raw4: RawSender | None = None  # opened for the first IPv4 packet with no neighbour entry to go by
    ether_type = {6: ETH_P_IPV6, 4: ETH_P_IP}
    given = 0

    def give() -> int:
        """Read what the ring holds, send it, then consume it; returns how many records were read."""
        nonlocal given, raw4
        at = [ring.position]  # then the end of each record read
        records = ring.read(start=_HOLD_VM, commit=False, ends=at)  # vm, len, orig_len, the packet
        parts = []
        for rec in records:
            packet = rec[_HOLD_HEAD - _HOLD_VM:]
            key = rec[:16]
            inner = decapsulate(packet) if key in own.keys else None
            mac = None
            if inner is not None:  # to one of its addresses: that address's neighbour, else (a prefix's) the id's
                dst = _dst_key(inner)
                mac = eth.get(dst) if dst in own.keys else eth.get(key)
            if inner is None:
                parts.append((raw, packet))
            elif mac is not None:
                parts.append((to_tap, mac + ether_type[family(inner)] + inner))
            else:  # no neighbour entry: the kernel routes it to the tap (and resolves the VM's MAC)
                if family(inner) == 4 and raw4 is None:
                    raw4 = RawSender(4)
                parts.append((raw4 if family(inner) == 4 else raw, inner))
        given += send_in_ring_order(log, at, parts)
        ring.commit()
        return len(records)

    try:
        skip_sent(ring, log, dp.pin_dir)  # what an agent killed while sending from this ring had sent
        dp.set_vm(vm, VmState.RUNNING, ring_first=True)
        deadline = time.monotonic() + max_s
        while time.monotonic() <= deadline:
            if not give() and ring.empty():
                break
        dp.set_vm(vm, VmState.RUNNING)
        # A program run that read the flag just before it was cleared may still be writing its record.
        time.sleep(0.002)
        give()
    finally:
        log.close()
        ring.close()
        raw.close()
        for sender in (to_tap, raw4):
            if sender is not None:
                sender.close()
    return given


@dataclass
class DrainReport:
    from_tap: int = 0          # frames recovered from the paused QEMU's tap queue (IPv6 and IPv4)
    from_tap_ipv4: int = 0     # of those, IPv4 (next header 4)
    from_ring: int = 0         # packets the program parked in the hold ring while we drained
    swallowed: int | None = None  # frames QEMU read but never gave the guest (None: not checked)
    resent_swallowed: int = 0  # of those, re-sent from the shadow log
    ring_sent_before: int = 0  # records an agent killed mid-send had sent (consumed, not sent again)
    swallow_miss: str | None = None  # why they were not (ShadowLog.swallowed_frames)
    not_vm: int = 0            # tap frames not carried: not IP to one of the VM's addresses (ARP, ND, MLD)
    send_dropped: int = 0      # of the packets above, how many the kernel refused to send (by errno below)
    send_errors: dict = field(default_factory=dict)
    hold_ms: float = 0.0       # time spent in HOLD
    # before_flip_ms: HOLD until the flip to AWAY behind the ring (and its parts: hold_ms, setup_ms,
    # tap_read_ms, tap_encap_ms, tap_send_ms); behind_ring_ms: from the flip until the ring was sent empty;
    # ring_emptied: whether it was (False: RING_FIRST_MAX_S, or RING_FIRST_GAINING_MAX_S, ran out first);
    # ring_after_flip: packets found in the ring once the program forwards directly again, the only ones
    # that can arrive behind newer packets (expected 0).
    timings: dict = field(default_factory=dict)


class SourceDrain:
    """Stop-and-copy on the source, in the order that keeps packets in order:

    1. VM state HOLD: the program parks every newer packet in the hold ring (already advanced to D).
    2. Drain QEMU's tap queue (the oldest packets), send them to D's End.SBUF (one sendmmsg list), each
       family with its next header (41, 4) but one stream, in the queue's order.
    3. AWAY behind the ring (SRMIG_VM_F_RING_FIRST): the program parks a packet while the ring holds any
       record we have not consumed, and forwards directly once it holds none. We send the ring's packets
       batch by batch and consume each batch only once it is sent, until the ring is empty.
    4. Plain AWAY, then read the ring once more for a packet parked while the flag was being cleared.

    The VM is `vm` and, if given, its other `addresses` (IPv6 and IPv4, any number, prefixes): each step is
    one write of the id's entry, which all of them follow (VmAddressSet), and the tap's frames to any of them
    are the VM's. The ring's records need no such sorting: they are whole SRv6 packets, already advanced, sent
    as they are whatever their inner family.
    """

    def __init__(self, dataplane, vm: str, src_addr: str, dest_segments: list[str], next_sid: str,
                 addresses: list[str] | None = None, pump: pumps.Pump | None = None):
        self.dp = one_step(dataplane, vm, addresses)
        self.vm = vm
        self.own = VmPackets([vm, *(addresses or ())])
        self.addresses = self.own.addresses
        self.src = src_addr
        self.segments = dest_segments
        self.next_sid = next_sid
        self.resent_swallowed: list[bytes] = []  # inner packets re-sent for the source QEMU
        # The hold ring's records through the pump (srmig.ctl.pump: no Python step per record), made ahead
        # (it compiles); None: from Python, batch by batch (_ring_send)
        self.pump = pump
        self._hop: tuple[bytes, bytes, int] = (bytes(16), bytes(14), 0)  # the pump's DA, Ethernet header, link

    def run(self, queue: TapKeeper, settle_s: float = 0.002, check: SwallowCheck | None = None,
            shadow: ShadowLog | None = None, stopped_at_ns: int = 0, max_swallowed: int = MAX_SWALLOWED,
            window_ns: int | None = SWALLOW_WINDOW_NS) -> DrainReport:
        """`queue`: the paused QEMU's tap fds (taken now, or kept since before the pause: then QEMU may be
        gone already). `check` and `shadow` (both or neither) also recover the frame QEMU swallowed at the
        pause; `stopped_at_ns` (time.monotonic_ns of QEMU's STOP) helps bound how old that frame can be
        (ShadowLog.swallowed_frames). `max_swallowed`, `window_ns`: what guards a count that may be off (the
        default); a count that cannot be high may re-send a longer run (Executor._drain)."""
        rep = DrainReport()
        t0 = time.monotonic()
        sender = ring = None
        try:
            # HOLD first: until it is written the VM's packets still go to its tap queue, which may be full
            # by now (the agent hears of the pause late); the sockets and the ring's mapping can wait.
            self._set(VmState.HOLD)
            t_hold = time.monotonic()
            sender, ring = FabricSender(), hold_ring_reader(self.dp)
            t_setup = time.monotonic()
            if check is not None:
                rep.swallowed = check.swallowed()  # before we read: our reads count as tx too
            frames = queue.frames()
            t_read = time.monotonic()
            queued = [p for p in map(self.own.packet, frames) if p is not None]  # the VM's, either family
            rep.not_vm = len(frames) - len(queued)
            if rep.swallowed is not None and hasattr(check, "less_queued"):  # (ArrivedCheck, RecordedCheck)
                rep.swallowed = check.less_queued(rep.swallowed, frames)
            older: list[bytes] = []  # everything ahead of the ring, oldest first, sent as one list
            if shadow is not None and rep.swallowed and rep.swallowed <= max_swallowed:
                shadow.flush()
                first = queued[0] if queued else None
                # QEMU keeps one frame it read after the pause, and one it could not place in a full RX
                # ring: both reached the tap shortly before it stopped reading, never long before.
                swallowed, rep.swallow_miss = shadow.swallowed_frames(rep.swallowed, first, stopped_at_ns, window_ns)
                for packet in swallowed:  # the inner packet as delivered, IPv6 or IPv4
                    older.append(encapsulate_packet(packet, self.src, self.segments))
                    self.resent_swallowed.append(packet)
                    rep.resent_swallowed += 1
            for packet in queued:
                older.append(encapsulate_packet(packet, self.src, self.segments))
                rep.from_tap_ipv4 += packet[0] >> 4 == 4
            rep.from_tap = len(queued)
            t_encap = time.monotonic()
            sender.send_many(older)
            t_sent = time.monotonic()
            rep.hold_ms = rep.timings["before_flip_ms"] = round((t_sent - t0) * 1000, 3)
            # Where that time went: HOLD; opening the senders and mapping the ring; reading the tap (and the
            # swallow count); picking the VM's frames and H.Encaps; sending them (and finding the next hop).
            for name, a, b in (("hold", t0, t_hold), ("setup", t_hold, t_setup), ("tap_read", t_setup, t_read),
                               ("tap_encap", t_read, t_encap), ("tap_send", t_encap, t_sent)):
                rep.timings[name + "_ms"] = round((b - a) * 1000, 3)
            self.away_behind_ring(sender, rep, ring, settle_s)
        finally:
            if ring is not None:
                ring.close()
            if sender is not None:
                sender.close()
                rep.send_dropped, rep.send_errors = sender.dropped, dict(sender.errors)
        return rep

    def ring_only(self) -> DrainReport:
        """Steps 3-4 alone: what an agent restarted after a drain it was killed in does (QEMU gone with its
        tap queue; the hold ring is the program's and outlives the agent: what it parked goes first)."""
        rep, sender, ring = DrainReport(), FabricSender(), hold_ring_reader(self.dp)
        try:
            self.away_behind_ring(sender, rep, ring)
        finally:
            ring.close()
            sender.close()
            rep.send_dropped, rep.send_errors = sender.dropped, dict(sender.errors)
        return rep

    def away_behind_ring(self, sender: FabricSender, rep: DrainReport, ring: libbpf.RingReader,
                         settle_s: float = 0.002) -> None:
        """Steps 3-4: AWAY behind the ring, send what it holds batch by batch, each consumed once sent, until
        it is empty; then plain AWAY, and send what a program run parked while the flag was being cleared.
        First, what an agent killed while sending from the ring had sent (its sent log) is consumed without
        being sent again."""
        log = sent_log(ring)
        try:
            rep.ring_sent_before = skip_sent(ring, log, self.dp.pin_dir)
            self._set(VmState.AWAY, ring_first=True)
            t_flip = time.monotonic()
            deadline, last = t_flip + RING_FIRST_MAX_S, None
            while not ring.empty() and time.monotonic() < deadline:
                # Sent before consumed, so that newer packets keep parking behind them; written down by the
                # kernel as they go (the log), so that an agent killed before the commit does not send them
                # twice.
                n = self._ring_send(sender, rep, ring, log, rounds=1)
                # Each read takes all the ring holds: what parked while the last batch went out. Fewer than
                # last time, the drain outruns the load and the ring empties soon; waiting for it beats
                # letting newer packets overtake what it still holds. Not fewer: the ring fills as fast as
                # we send, and RING_FIRST_MAX_S holds.
                gaining = last is not None and n < last
                deadline = t_flip + (RING_FIRST_GAINING_MAX_S if gaining else RING_FIRST_MAX_S)
                last = n
            # False: the ring filled faster than we sent it and the time ran out (what is still in it may
            # now be overtaken).
            rep.timings["ring_emptied"] = ring.empty()
            self._set(VmState.AWAY)
            rep.timings["behind_ring_ms"] = round((time.monotonic() - t_flip) * 1000, 3)
            before = rep.from_ring
            deadline = time.monotonic() + settle_s
            while time.monotonic() < deadline:
                self._ring_send(sender, rep, ring, log)
            self._ring_send(sender, rep, ring, log)
            rep.timings["ring_after_flip"] = rep.from_ring - before
        finally:
            log.close()

    def _set(self, state: VmState, ring_first: bool = False) -> None:
        """The VM to `state`: one write of its id's entry, which every address and prefix follows."""
        self.dp.set_vm(self.vm, state, next_sid=self.next_sid, ring_first=ring_first)

    def _ring_send(self, sender: FabricSender, rep: DrainReport, ring: libbpf.RingReader, log: SentLog,
                   rounds: int = 1000) -> int:
        """Send what the ring holds, each batch consumed once sent, and what it received meanwhile, until a
        read finds it empty (or `rounds` reads); returns how many records the last read found."""
        if self.pump is not None:
            return self._pump_send(sender, rep, ring, log, until=ring.produced if rounds == 1 else None)
        packets: list[bytes] = []
        for _ in range(rounds):
            at = [ring.position]  # then the end of each record read
            packets = read_hold_packets(ring, commit=False, ends=at)
            if not packets:
                return 0
            send_runs(log, at, sender.runs(packets))
            ring.commit()  # consumed once sent (behind the ring: only now may newer packets go directly)
            rep.from_ring += len(packets)
        return len(packets)

    def _pump_send(self, sender: FabricSender, rep: DrainReport, ring: libbpf.RingReader, log: SentLog,
                   until: int | None = None, passes: int = 100_000) -> int:
        """The ring's records through the pump, batch after batch, each consumed once sent, until the ring
        is empty (or, `until`, past that ring position: one read's worth); returns how many were sent.
        Records the pump does not take (another next hop's, one without a MAC, one larger than a slot)
        and the rest of a batch the link refused go the old way (_old_way) in their place, so the ring's
        order holds. The sent log begins at each batch with nothing sent, and the pump's mark counts it."""
        pump, sent = self.pump, 0
        for _ in range(passes):  # bounded: each pass sends or consumes at least one record, or returns
            start = ring.position
            if until is not None and start >= until:
                break
            da, eth, ifindex = self._hop
            t0 = time.perf_counter()
            n, walked, why = pump.fill(ring, start, _HOLD_HEAD, da, eth)
            t1 = time.perf_counter()
            if n:
                log.begin(start, 0)  # the batch from `start`, nothing sent: the mark counts it from now
                try:
                    k, err = pump.send(start, n, ifindex)
                except pumps.PumpError as e:  # no way out here: the old way, from this batch on
                    rep.timings["pump"] = f"refused: {e}"
                    self.pump = None
                    return sent

                # where the pump's time goes: copying records into the slots, and the BPF_PROG_RUN
                rep.timings["pump_fill_ms"] = round(rep.timings.get("pump_fill_ms", 0) + (t1 - t0) * 1e3, 3)
                rep.timings["pump_send_ms"] = round(rep.timings.get("pump_send_ms", 0) +
                                                    (time.perf_counter() - t1) * 1e3, 3)
                ring.advance(walked if k == n else pump.end(k - 1) if k else start)
                sent += k
                rep.from_ring += k
                rep.timings["pump_batches"] = rep.timings.get("pump_batches", 0) + 1
                if k < n:  # the link refused slot k (err): from it on, the old way (it retries, or counts)
                    rep.timings["pump_refused"] = rep.timings.get("pump_refused", 0) + 1
                    sent += self._old_way(sender, rep, ring, log, n - k)
                    continue
            elif walked > start:
                ring.advance(walked)  # discarded records only
            if why in (pumps.EMPTY, pumps.BUSY):
                break
            if why == pumps.OTHER_DA:
                to = pump.next_da
                hop, eth = sender.hop(to)
                if eth is None:  # no next hop's MAC: the kernel routes these (RawSender)
                    sent += self._old_way(sender, rep, ring, log, log.batch)
                else:
                    self._hop = (to, eth, hop.ifindex)
            elif why == pumps.OLD_WAY:
                sent += self._old_way(sender, rep, ring, log, 1)
        rep.timings["pump"] = pump.why
        return sent

    @staticmethod
    def _old_way(sender: FabricSender, rep: DrainReport, ring: libbpf.RingReader, log: SentLog,
                 limit: int) -> int:
        """Up to `limit` records from the ring's consumer position sent from Python (FabricSender), then
        consumed; returns how many."""
        at = [ring.position]
        packets = read_hold_packets(ring, limit, commit=False, ends=at)
        if packets:
            send_runs(log, at, sender.runs(packets))
            ring.commit()
            rep.from_ring += len(packets)
        return len(packets)
