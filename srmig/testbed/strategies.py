"""What the network does during a migration, per scheme (docs/design.md, "Baselines"), on one testbed.

Every strategy reacts to the same four moments: the migration begins; the source pauses (stop-and-copy);
the destination resumes; the migration completes. Baselines reuse srmig's dataplane for plain delivery
(End.DX6-map), so they differ only in when and where the ingress sends traffic.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field

from srmig.ctl.drain import DrainReport, SourceDrain, return_held, sid_delivered, unpark, wait_delivered
from srmig.ctl.machine import DelVm, Drain, Ev, KeepTap, Machine, Publish, ReturnHeld, SetVm, Unpark
from srmig.ctl.phases import Phase, plan
from srmig.ctl.ingress import BpfEncap
from srmig.ctl.swallow import ShadowLog, SwallowCheck
from srmig.ctl.tap import TapKeeper
from srmig.bpf.abi import VmState
from srmig.testbed.lab import encap_on, steer
from srmig.testbed.testbed import SIDS, T_END, VM_ADDR, Testbed

S, D = SIDS["S"], SIDS["D"]
BICAST_TCLASS = 0x20
BICAST_TABLE = 100
BICAST_C, BICAST_B = "2001:db8:e1::1", "2001:db8:e1::2"  # C's link to the copy ingress B
WINDOW_TXQUEUELEN = 10000  # measured: an incoming QEMU's tap holds 10000 frames without loss
RTN_UNICAST, RTN_BLACKHOLE = 1, 6


@dataclass
class Strategy:
    name: str = "base"
    description: str = ""
    events: list[tuple[str, float]] = field(default_factory=list)

    def probe_kwargs(self) -> dict:
        return {}

    def _note(self, what: str) -> None:
        self.events.append((what, time.monotonic()))

    def steady(self, tb: Testbed) -> None:
        tb.dp["S"].set_vm(VM_ADDR, VmState.RUNNING)
        tb.dp["D"].del_vm(VM_ADDR)
        tb.steer([S.dx6])

    def prepare(self, tb: Testbed, src) -> None:
        """Before the probe starts (a quiet moment). `src`: the source's Qemu (pid, tap, QMP)."""

    def dest_started(self, tb: Testbed, dst) -> None:
        """The destination's incoming QEMU exists (`dst`: its Qemu)."""

    def begin(self, tb: Testbed, src) -> None:
        """The migration begins."""

    def source_stopped(self, tb: Testbed, src, stopped_ns: int) -> None:
        """`stopped_ns`: time.monotonic_ns() when the STOP event arrived."""

    def dest_resumed(self, tb: Testbed) -> None:
        pass

    def completed(self, tb: Testbed) -> None:
        pass

    def failed(self, tb: Testbed) -> None:
        """The migration failed or was cancelled; the source runs the VM again."""

    def finish(self, tb: Testbed) -> None:
        """After the probe run: nothing left in flight."""


class Reactive(Strategy):
    """The network learns the new location only after the VM resumes (EVPN MAC mobility, Virtual Subnet):
    the destination announces it, the ingress switches then."""

    def __init__(self):
        super().__init__("reactive", "ingress switches to D when D announces the resumed VM")

    def dest_resumed(self, tb):
        tb.dp["D"].set_vm(VM_ADDR, VmState.RUNNING)
        tb.steer([D.dx6])
        self._note("ingress -> D")


class Withdraw(Strategy):
    """Proactive withdraw at stop-and-copy (seed 002): the ingress switches to D at the pause; D delivers
    only once the VM has resumed there."""

    def __init__(self):
        super().__init__("withdraw", "ingress switches to D at the pause; D delivers once resumed")

    def source_stopped(self, tb, src, stopped_ns):
        tb.steer([D.dx6])
        self._note("ingress -> D")

    def dest_resumed(self, tb):
        tb.dp["D"].set_vm(VM_ADDR, VmState.RUNNING)
        self._note("D delivers")


class Bicast(Strategy):
    """OVN multi-chassis style: during the migration the ingress duplicates every packet to S and D; D
    delivers only once the VM is active there. The probe sends each packet twice, the copy with its own
    traffic class; C's policy routing sends the copies to a second ingress, B, whose H.Encaps steers them to
    D (C's own H.Encaps has one list per VM). Outside the migration window the copies die at C."""

    def __init__(self):
        super().__init__("bicast", "ingress duplicates to S and D; D delivers once the VM is active")
        self._copier: BpfEncap | None = None
        self._copier_tb: Testbed | None = None  # the testbed B was built in (a strategy may run twice)

    def probe_kwargs(self):
        return {"copy_tclass": BICAST_TCLASS}

    def _copy_ingress(self, tb: Testbed) -> None:
        """B: C --c1-- B --b_t-- T, with H.Encaps towards D's End.DX6-map on b_t."""
        t = tb.topo
        t.add_host("B")
        t.link("C", "c1", "B", "b_c", BICAST_C + "/64", BICAST_B + "/64", static_neigh=True)
        t.link("B", "b_t", "T", "t_b", "2001:db8:e2::1/64", "2001:db8:e2::2/64", static_neigh=True)
        t.route("B", "fc00::/16", gateway="2001:db8:e2::2")
        self._copier = tb._stack.enter_context(encap_on(t, "B", "b_t", source="2001:db8:e2::1"))
        self._copier_tb = tb
        steer(t, "B", self._copier, VM_ADDR, [D.dx6], "2001:db8:e2::2", "b_t")

    def steady(self, tb):
        super().steady(tb)
        if self._copier_tb is not tb:
            self._copy_ingress(tb)
        with tb.topo.ipr("C") as ipr:
            self._copy_route(ipr, on=False)
            ipr.rule("add", family=10, table=BICAST_TABLE, priority=100, tos=BICAST_TCLASS)

    @staticmethod
    def _copy_route(ipr, on: bool):
        if not on:
            ipr.route("replace", dst=f"{VM_ADDR}/128", family=10, table=BICAST_TABLE, type=RTN_BLACKHOLE)
            return
        ipr.route("replace", dst=f"{VM_ADDR}/128", family=10, table=BICAST_TABLE, type=RTN_UNICAST,
                  oif=ipr.link_lookup(ifname="c1")[0], gateway=BICAST_B)

    def begin(self, tb, src):
        with tb.topo.ipr("C") as ipr:
            self._copy_route(ipr, on=True)
        self._note("bicast on")

    def dest_resumed(self, tb):
        tb.dp["D"].set_vm(VM_ADDR, VmState.RUNNING)
        self._note("D delivers")

    def completed(self, tb):
        tb.steer([D.dx6])
        with tb.topo.ipr("C") as ipr:
            self._copy_route(ipr, on=False)
        self._note("ingress -> D, bicast off")


class Srmig(Strategy):
    """srmig, driven by the agent's state machine (srmig.ctl.machine): the path S -> D is provisioned before
    stop-and-copy (End.S, End.SBUF); at the pause the source tap queue is drained to D ahead of newer
    packets; cut-over once the migration completes. This class only executes the machine's actions."""

    def __init__(self, drain: bool = True, grace_s: float = 0.5, recover_swallowed: bool = True):
        super().__init__("srmig" if drain else "srmig-no-drain",
                         "End.S on S, End.SBUF on D, provisioned before stop-and-copy"
                         + ("; source tap queue drained at the pause" if drain else ""))
        self.machine = Machine(grace_s=grace_s, drain=drain)
        self.recover_swallowed = drain and recover_swallowed
        self.drain_report: DrainReport | None = None
        self._shadow: ShadowLog | None = None
        self._check: SwallowCheck | None = None
        self._src = None
        self._dst = None
        self._keeper: TapKeeper | None = None
        self.returned = 0  # packets D returned to S on abort
        self.unparked = 0  # packets S parked meanwhile, then delivered
        self._sbuf_base = 0
        self._drain: SourceDrain | None = None
        self._queues: dict[str, int] = {}  # host -> the tap queue length to restore after the window
        self._stopped_ns = 0

    def _long_queue(self, tb: Testbed, host: str, tap: str) -> None:
        """The migration window: a paused or incoming QEMU's tap queue holds what it cannot read yet."""
        if host not in self._queues:
            self._queues[host] = tb.set_txqueuelen(host, tap, WINDOW_TXQUEUELEN)

    def _restore_queues(self, tb: Testbed) -> None:
        for host, qlen in self._queues.items():
            with contextlib.suppress(Exception):  # the tap may be gone with its QEMU
                tb.set_txqueuelen(host, self._src.tap, qlen)
        self._queues.clear()

    def _execute(self, tb: Testbed, actions: list) -> None:
        for a in actions:
            if isinstance(a, SetVm) and (a.state is VmState.INCOMING or a.shadow):  # the window opens
                self._long_queue(tb, a.host, self._src.tap)
            if isinstance(a, SetVm):
                if a.shadow and self.recover_swallowed and self._shadow is None:
                    self._shadow = ShadowLog(tb.dp[a.host]).start()  # before the flag: miss nothing
                if a.park:  # D's returned packets are counted at this End.SBUF: Unpark waits for them
                    self._sbuf_base = sid_delivered(tb.dp[a.host], S.sbuf)
                tb.dp[a.host].set_vm(VM_ADDR, a.state, next_sid=a.next_sid,
                                     shadow=a.shadow and self.recover_swallowed, park=a.park)
            elif isinstance(a, DelVm):
                tb.dp[a.host].del_vm(VM_ADDR)
            elif isinstance(a, Publish):
                tb.steer(list(a.segments))  # one ingress, applied synchronously: acknowledged
            elif isinstance(a, Drain):
                drain = self._drain = SourceDrain(tb.dp[a.host], VM_ADDR, "2001:db8:a::2", [T_END, D.sbuf],
                                                  a.next_sid)
                with tb.topo.inside(a.host), TapKeeper(self._src.pid, self._src.tap) as queue:
                    self.drain_report = drain.run(queue, check=self._check, shadow=self._shadow,
                                                  stopped_at_ns=self._stopped_ns)
            elif isinstance(a, KeepTap) and a.host == "D" and self._dst is not None:
                # The source's QEMU is ours: it outlives the drain, which takes its tap queue then.
                self._keeper = TapKeeper(self._dst.pid, self._dst.tap)
            elif isinstance(a, ReturnHeld) and self._keeper is not None:
                with tb.topo.inside(a.host):
                    # The source QEMU delivers, when it resumes, the one frame it keeps in its own net queue:
                    # the newest of those the drain re-sent. The others it had dropped: return them.
                    skip = self._drain.resent_swallowed[-1:] if self._drain else []
                    self.returned += return_held(self._keeper, "2001:db8:b::2", list(a.segments), skip)
            elif isinstance(a, Unpark):
                wait_delivered(tb.dp[a.host], S.sbuf, self._sbuf_base + self.returned)  # D's, on their way
                with tb.topo.inside(a.host):
                    self.unparked = unpark(tb.dp[a.host], VM_ADDR, self._src.tap)
            # StartGrace: the run outlasts the grace period; finish() ends it.
            self._note(type(a).__name__)

    def steady(self, tb):
        tb.dp["D"].del_vm(VM_ADDR)
        p = plan(Phase.STEADY, S, D, [T_END])
        tb.dp["S"].set_vm(VM_ADDR, p.source)
        tb.steer(p.segments)
        self.machine.start(VM_ADDR, S, D, (T_END,))

    def prepare(self, tb, src):
        self._src = src
        if self.recover_swallowed:
            # Frames QEMU read minus frames it gave the guest, while nothing is in flight.
            self._check = SwallowCheck(src.tap, src.rx_used_idx)
            with tb.topo.inside("S"):
                if not self._check.baseline():
                    self._check = None

    def dest_started(self, tb, dst):
        self._dst = dst

    def begin(self, tb, src):
        self._execute(tb, self.machine.handle(VM_ADDR, Ev.BEGIN))

    def source_stopped(self, tb, src, stopped_ns):
        self._stopped_ns = stopped_ns
        self._execute(tb, self.machine.handle(VM_ADDR, Ev.SUSPENDED))

    def dest_resumed(self, tb):
        self._execute(tb, self.machine.handle(VM_ADDR, Ev.RESUMED))

    def completed(self, tb):
        self._execute(tb, self.machine.handle(VM_ADDR, Ev.STOPPED))

    def failed(self, tb):
        self._execute(tb, self.machine.handle(VM_ADDR, Ev.FAILED))

    def finish(self, tb):
        self._execute(tb, self.machine.handle(VM_ADDR, Ev.GRACE_OVER))
        self._restore_queues(tb)
        for res in (self._shadow, self._keeper):
            if res is not None:
                res.close()
        self._shadow = self._keeper = None


STRATEGIES = {"reactive": Reactive, "withdraw": Withdraw, "bicast": Bicast, "srmig": Srmig}


def make(name: str) -> Strategy:
    if name == "srmig-no-drain":
        return Srmig(drain=False)
    try:
        return STRATEGIES[name]()
    except KeyError:
        raise ValueError(f"unknown strategy {name!r}: expected one of {', '.join(STRATEGIES)}, srmig-no-drain") from None
