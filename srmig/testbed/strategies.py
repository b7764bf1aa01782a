"""What the network does during a migration, per scheme (docs/design.md, "Baselines"), on one testbed.

Every strategy reacts to the same four moments: the migration begins; the source pauses (stop-and-copy);
the destination resumes; the migration completes. Baselines reuse srmig's dataplane for plain delivery
(End.DX6-map), so they differ only in when and where the ingress sends traffic.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field

from srmig.ctl.drain import DrainReport
from srmig.ctl.executor import Executor, Owner
from srmig.ctl.ingress import BpfEncap
from srmig.ctl.machine import Drain, Ev, Machine, Publish, Unpark
from srmig.ctl.phases import Phase, plan
from srmig.ctl.swallow import SwallowCheck
from srmig.bpf.abi import VmState
from srmig.testbed.lab import encap_on
from srmig.testbed.netns import sysctl
from srmig.testbed.testbed import SIDS, T_END, VM_ADDR, VM_ADDR4, VM_ADDRS, Testbed

log = logging.getLogger("srmig.testbed")
S, D = SIDS["S"], SIDS["D"]
S_ADDR, D_ADDR = "2001:db8:a::2", "2001:db8:b::2"  # the hosts' fabric addresses: the outer source of what they send
BICAST_TCLASS = 0x20
BICAST_TABLE = 100
BICAST_C, BICAST_B = "2001:db8:e1::1", "2001:db8:e1::2"  # C's link to the copy ingress B
BICAST_C4, BICAST_B4 = "203.0.113.9", "203.0.113.10"  # the same link's IPv4 (/30), for the IPv4 copies
BICAST_MARK = 0x20
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
        tb.set_vm("S", VmState.RUNNING)
        tb.del_vm("D")
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

    def family_notes(self, tb: Testbed) -> dict[str, str]:
        """Once the migration completed: family -> why that family's numbers say less about the strategy than
        they seem to (what the strategy left undone for it)."""
        return {}


class Reactive(Strategy):
    """The network learns the new location only after the VM resumes (EVPN MAC mobility, Virtual Subnet):
    the destination announces it, the ingress switches then."""

    def __init__(self):
        super().__init__("reactive", "ingress switches to D when D announces the resumed VM")

    def dest_resumed(self, tb):
        tb.set_vm("D", VmState.RUNNING)
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
        tb.set_vm("D", VmState.RUNNING)
        self._note("D delivers")


class Bicast(Strategy):
    """OVN multi-chassis style: during the migration the ingress duplicates every packet to S and D; D
    delivers only once the VM is active there. The probe sends each packet twice, the copy with its own
    traffic class (IPv6) or firewall mark (IPv4: an IPv4 rule matches only the TOS bits of RFC 1349, not the
    class); C's policy routing sends the copies to a second ingress, B, whose H.Encaps steers them to D (C's
    own H.Encaps has one list per VM). Outside the migration window the copies die at C."""

    def __init__(self):
        super().__init__("bicast", "ingress duplicates to S and D; D delivers once the VM is active")
        self._copier: BpfEncap | None = None
        self._copier_tb: Testbed | None = None  # the testbed B was built in (a strategy may run twice)

    def probe_kwargs(self):
        return {"copy_tclass": BICAST_TCLASS, "copy_mark": BICAST_MARK}

    def _copy_ingress(self, tb: Testbed) -> None:
        """B: C --c1-- B --b_t-- T, with H.Encaps towards D's End.DX6-map on b_t."""
        t = tb.topo
        t.add_host("B")
        t.link("C", "c1", "B", "b_c", BICAST_C + "/64", BICAST_B + "/64", static_neigh=True)
        t.link("B", "b_t", "T", "t_b", "2001:db8:e2::1/64", "2001:db8:e2::2/64", static_neigh=True)
        t.route("B", "fc00::/16", gateway="2001:db8:e2::2")
        if "4" in tb.families:  # IPv4 copies reach B natively; B encapsulates them as C does
            sysctl(t.ns("B"), "net.ipv4.ip_forward", 1)
            sysctl(t.ns("B"), "net.ipv4.conf.all.rp_filter", 0)
            for role, ifname, addr in (("C", "c1", BICAST_C4), ("B", "b_c", BICAST_B4)):
                sysctl(t.ns(role), f"net.ipv4.conf.{ifname}.rp_filter", 0)
                with t.ipr(role) as ipr:
                    ipr.addr("add", index=ipr.link_lookup(ifname=ifname)[0], address=addr, prefixlen=30, family=2)
            t.neigh("C", "c1", BICAST_B4, t.mac("B", "b_c"))
        self._copier = tb._stack.enter_context(encap_on(t, "B", "b_t", source="2001:db8:e2::1"))
        self._copier_tb = tb
        tb.steer_at("B", self._copier, [D.dx6], "2001:db8:e2::2", "b_t")

    def steady(self, tb):
        super().steady(tb)
        if self._copier_tb is not tb:
            self._copy_ingress(tb)
        with tb.topo.ipr("C") as ipr:
            self._copy_route(ipr, tb, on=False)
            ipr.rule("add", family=10, table=BICAST_TABLE, priority=100, tos=BICAST_TCLASS)
            if "4" in tb.families:
                ipr.rule("add", family=2, table=BICAST_TABLE, priority=100, fwmark=BICAST_MARK)

    @staticmethod
    def _copy_route(ipr, tb, on: bool):
        routes = [(f"{VM_ADDR}/128", 10, BICAST_B)]
        if "4" in tb.families:
            routes.append((f"{VM_ADDR4}/32", 2, BICAST_B4))
        for dst, family, gateway in routes:
            if not on:
                ipr.route("replace", dst=dst, family=family, table=BICAST_TABLE, type=RTN_BLACKHOLE)
            else:
                ipr.route("replace", dst=dst, family=family, table=BICAST_TABLE, type=RTN_UNICAST,
                          oif=ipr.link_lookup(ifname="c1")[0], gateway=gateway)

    def begin(self, tb, src):
        with tb.topo.ipr("C") as ipr:
            self._copy_route(ipr, tb, on=True)
        self._note("bicast on")

    def dest_resumed(self, tb):
        tb.set_vm("D", VmState.RUNNING)
        self._note("D delivers")

    def completed(self, tb):
        tb.steer([D.dx6])
        with tb.topo.ipr("C") as ipr:
            self._copy_route(ipr, tb, on=False)
        self._note("ingress -> D, bicast off")


class Srmig(Strategy):
    """srmig, driven by the agent's state machine (srmig.ctl.machine) and applied by the agent's executor
    (srmig.ctl.executor), one per host: the path S -> D is provisioned before stop-and-copy (End.S,
    End.SBUF); at the pause the source tap queue is drained to D ahead of newer packets; cut-over once the
    migration completes. This class only feeds events and publishes the segment lists (one ingress, applied
    synchronously: acknowledged)."""

    MIGRATION = "testbed"  # the migration's id (the agent's are random)

    def __init__(self, drain: bool = True, grace_s: float = 0.5, recover_swallowed: bool = True):
        super().__init__("srmig" if drain else "srmig-no-drain",
                         "End.S on S, End.SBUF on D, provisioned before stop-and-copy"
                         + ("; source tap queue drained at the pause" if drain else ""))
        self.machine = Machine(grace_s=grace_s, drain=drain)
        self.recover_swallowed = drain and recover_swallowed
        self.hosts: dict[str, Executor] = {}
        self._qemu: dict[str, object] = {}  # host -> its Qemu (pid, tap, QMP)
        # The executors are not thread-safe, like the agent's one worker: the STOP and RESUME watchers and the
        # executors' timers take turns.
        self._lock = threading.RLock()
        self._timers: list[threading.Timer] = []
        self._closed = False

    @property
    def drain_report(self) -> DrainReport | None:
        return self.hosts["S"].vm(VM_ADDR).report if "S" in self.hosts else None

    @property
    def returned(self) -> int:
        """Packets D returned to S on abort."""
        return (self.hosts["D"].vm(VM_ADDR).returned or 0) if "D" in self.hosts else 0

    @property
    def unparked(self) -> int:
        """Packets S parked meanwhile, then delivered."""
        return self.hosts["S"].vm(VM_ADDR).unparked if "S" in self.hosts else 0

    def _later(self, seconds: float, fn, *args) -> None:
        def run():
            with self._lock:
                if self._closed:
                    return
                try:
                    fn(*args)
                except Exception as e:  # noqa: BLE001 - as the agent's worker: logged, the run goes on
                    log.warning("testbed executor: deferred %s failed: %s", getattr(fn, "__name__", fn), e)
        t = threading.Timer(seconds, run)
        t.daemon = True
        self._timers.append(t)
        t.start()

    def _executor(self, tb: Testbed, host: str, address: str) -> Executor:
        def qemu_pid(_loc, host=host):
            q = self._qemu.get(host)
            return q.pid if q is not None else None
        # The VM's addresses (its id, VM_ADDR, first), as the agent reads them from the domain's metadata: every
        # map write, the drain and the unpark take all of them.
        vm_addrs = tuple(tb.vm_addrs)
        return Executor(Owner(name=host, dp=tb.dp[host], address=address, drain=self.recover_swallowed,
                              tap_queue=WINDOW_TXQUEUELEN, qemu_pid=qemu_pid, later=self._later,
                              enter=lambda: tb.topo.inside(host), addresses=lambda vm: vm_addrs))

    def _execute(self, actions: list) -> None:
        m = self.machine.migrations[VM_ADDR]
        s, d = self.hosts["S"].vm(VM_ADDR), self.hosts["D"].vm(VM_ADDR)
        for a in actions:
            if isinstance(a, Publish):
                self._tb.steer(list(a.segments))
            elif getattr(a, "host", None) in self.hosts:
                self.hosts[a.host].execute(m, [a], self.MIGRATION)
                if isinstance(a, Unpark) and d.returned is not None:  # D's record, as the agent reads it
                    self.hosts["S"].unpark(m, self.MIGRATION, d.returned)
            if isinstance(a, Drain) and s.drain is not None:
                d.peer_resent = list(s.drain.resent_swallowed)  # the source's record, as D reads it
            # StartGrace: the run outlasts the grace period; finish() ends it.
            self._note(type(a).__name__)

    def _handle(self, ev: Ev) -> None:
        with self._lock:
            self._execute(self.machine.handle(VM_ADDR, ev))

    def steady(self, tb):
        self._tb, self._closed = tb, False
        self.hosts = {"S": self._executor(tb, "S", S_ADDR), "D": self._executor(tb, "D", D_ADDR)}
        tb.del_vm("D")
        p = plan(Phase.STEADY, S, D, [T_END])
        tb.set_vm("S", p.source)  # every address of the VM; the executors move them all from here
        tb.steer(p.segments)
        self.machine.start(VM_ADDR, S, D, (T_END,))

    def prepare(self, tb, src):
        self._qemu["S"] = src
        loc = self.hosts["S"].vm(VM_ADDR)
        loc.tap = src.tap
        if self.recover_swallowed:
            # Frames QEMU read minus frames it gave the guest, while nothing is in flight.
            check = SwallowCheck(src.tap, src.rx_used_idx)
            with tb.topo.inside("S"):
                loc.check = check if check.baseline() else None

    def dest_started(self, tb, dst):
        self._qemu["D"] = dst
        self.hosts["D"].vm(VM_ADDR).tap = dst.tap

    def begin(self, tb, src):
        self._handle(Ev.BEGIN)

    def source_stopped(self, tb, src, stopped_ns):
        self.hosts["S"].vm(VM_ADDR).stopped_ns = stopped_ns
        self._handle(Ev.SUSPENDED)

    def dest_resumed(self, tb):
        self._handle(Ev.RESUMED)

    def completed(self, tb):
        self._handle(Ev.STOPPED)

    def failed(self, tb):
        self._handle(Ev.FAILED)

    def family_notes(self, tb):
        """An address of the VM the executors did not take to D (no entry in D's map once the migration
        completed) is lost there after the cut-over: not srmig's dataplane failing that family, the VM's
        address not being moved."""
        d = tb.dp["D"]
        return {family: f"the executors did not move {vm} (no entry in D's VM map after the migration)"
                for family, vm in VM_ADDRS.items() if vm in tb.vm_addrs and d.get_vm(vm) is None}

    def finish(self, tb):
        self._handle(Ev.GRACE_OVER)
        with self._lock:
            self._closed = True
            for t in self._timers:
                t.cancel()
            self._timers.clear()
            for ex in self.hosts.values():
                ex.close()


STRATEGIES = {"reactive": Reactive, "withdraw": Withdraw, "bicast": Bicast, "srmig": Srmig}


def make(name: str) -> Strategy:
    if name == "srmig-no-drain":
        return Srmig(drain=False)
    try:
        return STRATEGIES[name]()
    except KeyError:
        raise ValueError(f"unknown strategy {name!r}: expected one of {', '.join(STRATEGIES)}, srmig-no-drain") from None
