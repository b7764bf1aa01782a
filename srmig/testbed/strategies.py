"""What the network does during a migration, per scheme (DESIGN.md "Baselines"), on one testbed.

Every strategy reacts to the same four moments: the migration begins; the source pauses (stop-and-copy);
the destination resumes; the migration completes. Baselines reuse srmig's dataplane for plain delivery
(End.DX6-map), so they differ only in when and where the ingress sends traffic.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from srmig.ctl.drain import DrainReport, ShadowLog, SourceDrain, SwallowCheck
from srmig.ctl.phases import Phase, Plan, plan
from srmig.dataplane.abi import VmState
from srmig.testbed.testbed import SIDS, T_END, VM_ADDR, Testbed

S, D = SIDS["S"], SIDS["D"]
BICAST_TCLASS = 0x20
BICAST_TABLE = 100
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

    def begin(self, tb: Testbed, src) -> None:
        """The migration begins."""

    def source_stopped(self, tb: Testbed, src, stopped_ns: int) -> None:
        """`stopped_ns`: time.monotonic_ns() when the STOP event arrived."""

    def dest_resumed(self, tb: Testbed) -> None:
        pass

    def completed(self, tb: Testbed) -> None:
        pass

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
    delivers only once the VM is active there. The copy is steered by its traffic class (policy routing)."""

    def __init__(self):
        super().__init__("bicast", "ingress duplicates to S and D; D delivers once the VM is active")

    def probe_kwargs(self):
        return {"copy_tclass": BICAST_TCLASS}

    def steady(self, tb):
        super().steady(tb)
        with tb.topo.ipr("C") as ipr:
            # Outside the migration window there is no second copy: the copies die at the ingress.
            self._copy_route(ipr, None)
            ipr.rule("add", family=10, table=BICAST_TABLE, priority=100, tos=BICAST_TCLASS)

    @staticmethod
    def _copy_route(ipr, segments):
        if segments is None:
            ipr.route("replace", dst=f"{VM_ADDR}/128", family=10, table=BICAST_TABLE, type=RTN_BLACKHOLE)
            return
        ipr.route("replace", dst=f"{VM_ADDR}/128", family=10, table=BICAST_TABLE, type=RTN_UNICAST,
                  oif=ipr.link_lookup(ifname="c0")[0], gateway="2001:db8:c::2",
                  encap={"type": "seg6", "mode": "encap", "segs": list(reversed(segments))})

    def begin(self, tb, src):
        with tb.topo.ipr("C") as ipr:
            self._copy_route(ipr, [D.dx6])
        self._note("bicast on")

    def dest_resumed(self, tb):
        tb.dp["D"].set_vm(VM_ADDR, VmState.RUNNING)
        self._note("D delivers")

    def completed(self, tb):
        tb.steer([D.dx6])
        with tb.topo.ipr("C") as ipr:
            self._copy_route(ipr, None)
        self._note("ingress -> D, bicast off")


class Srmig(Strategy):
    """srmig: the path S -> D is provisioned before stop-and-copy (End.S, End.SBUF); at the pause the
    source tap queue is drained to D ahead of newer packets; cut-over once the migration completes."""

    def __init__(self, drain: bool = True, grace_s: float = 0.5, recover_swallowed: bool = True):
        super().__init__("srmig" if drain else "srmig-no-drain",
                         "End.S on S, End.SBUF on D, provisioned before stop-and-copy"
                         + ("; source tap queue drained at the pause" if drain else ""))
        self.drain = drain
        self.grace_s = grace_s
        self.recover_swallowed = drain and recover_swallowed
        self.drain_report: DrainReport | None = None
        self._shadow: ShadowLog | None = None
        self._check: SwallowCheck | None = None

    def _apply(self, tb: Testbed, p: Plan) -> None:
        for role, state, nxt in (("D", p.dest, None), ("S", p.source, p.source_next_sid)):
            if state is None:
                tb.dp[role].del_vm(VM_ADDR)
            else:
                tb.dp[role].set_vm(VM_ADDR, state, next_sid=nxt)
        tb.steer(p.segments)

    def steady(self, tb):
        tb.dp["D"].del_vm(VM_ADDR)
        self._apply(tb, plan(Phase.STEADY, S, D, [T_END]))

    def prepare(self, tb, src):
        if self.recover_swallowed:
            # Frames QEMU read minus frames it gave the guest, while nothing is in flight.
            self._check = SwallowCheck(src.tap, src.rx_used_idx)
            with tb.topo.inside("S"):
                if not self._check.baseline():
                    self._check = None

    def begin(self, tb, src):
        self._apply(tb, plan(Phase.PROVISION, S, D, [T_END]))
        if self.recover_swallowed:
            # Shadow what S delivers to the VM from now on: the swallowed frame will be among them.
            self._shadow = ShadowLog(tb.dp["S"]).start()
            tb.dp["S"].set_vm(VM_ADDR, VmState.RUNNING, shadow=True)
        self._note("provisioned")

    def source_stopped(self, tb, src, stopped_ns):
        p = plan(Phase.STOP_AND_COPY, S, D, [T_END])
        if self.drain:
            drain = SourceDrain(tb.dp["S"], VM_ADDR, "2001:db8:a::2", [T_END, D.sbuf], p.source_next_sid)
            with tb.topo.inside("S"):
                self.drain_report = drain.run(src.pid, src.tap, check=self._check, shadow=self._shadow,
                                              stopped_at_ns=stopped_ns)
            self._note("S drained, away")
        else:
            tb.dp["S"].set_vm(VM_ADDR, VmState.AWAY, next_sid=p.source_next_sid)
            self._note("S away")

    def dest_resumed(self, tb):
        tb.dp["D"].set_vm(VM_ADDR, VmState.RUNNING)
        self._note("D running")

    def completed(self, tb):
        self._apply(tb, plan(Phase.CUT_OVER, S, D, [T_END]))
        self._note("cut-over")

    def finish(self, tb):
        tb.dp["S"].del_vm(VM_ADDR)  # after the grace period (the probe run outlasts it)
        if self._shadow is not None:
            self._shadow.close()
            self._shadow = None


STRATEGIES = {"reactive": Reactive, "withdraw": Withdraw, "bicast": Bicast, "srmig": Srmig}


def make(name: str) -> Strategy:
    if name == "srmig-no-drain":
        return Srmig(drain=False)
    try:
        return STRATEGIES[name]()
    except KeyError:
        raise ValueError(f"unknown strategy {name!r}: expected one of {', '.join(STRATEGIES)}, srmig-no-drain") from None
