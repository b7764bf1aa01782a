"""`srmig bench --only tcp`: a bulk TCP transfer through srmig's BPF H.Encaps into a VM behind srmig's
End.DX6-map, against the same transfer without the encapsulation, in the same run.

    ing (i0) ----------------------- (h0) host (hv) ---------- (v0) vm
    TCP sender                        srmig XDP, generic mode      TCP receiver
    srmig H.Encaps on i0's egress     End.DX6-map SID H_SID:       VM_ADDR
    (tc clsact), route VM/128 via     decapsulate, FIB-redirect
    host, MTU = i0's MTU - 144        to hv

- encap: the ingress steers VM_ADDR along [H_SID] (srmig.testbed.lab.steer: the encap entry, then the /128
  route with MTU = link MTU - 144). Every data packet leaves i0 as outer IPv6 + SRH + the inner TCP/IPv6
  packet (TSO super-packets are encapsulated whole and segmented in software after, see srmig/ebpf/encap.c);
  host's End.DX6-map decapsulates and redirects into hv.
- plain: the same route (same MTU, same program on i0) without the VM's encap entry: the program passes the
  packets as they are (counted "pass"), host's XDP passes them to the kernel, which forwards them to hv.
- The fabric link (i0-h0) has MTU 1500 + 144 so the VM's route MTU is 1500, the VM link 1500.
- host runs srmig in generic XDP: a native redirect on a veth loses the sender's CHECKSUM_PARTIAL and TCP never
  connects (docs/platform.md: a veth-testbed effect, the sender's checksum offload); the testbed runs generic too.

Each transfer: one connection, the sender writes MiB chunks until `max_bytes` or `max_s`, then closes;
the receiver counts bytes until EOF. Gbit/s = bytes received x 8 / (the receiver's last byte - the sender's
first write). Plain and encap alternate `rounds` times (a busy neighbour on the shared cores slows both);
the JSON has every round and the medians; the encap's counters (done, drops) and the End.DX6-map SID's
delivered count show the data really went through both programs.
"""

from __future__ import annotations

import argparse
import itertools
import os
import socket
import statistics
import sys
import threading
import time
from typing import Callable

from bench import emit
from srmig import netlink
from srmig.ctl import ingress
from srmig.bpf.abi import Behaviour, VmState
from srmig.testbed.lab import NamespaceLab, encap_on, steer, xdp_on

ING_ADDR = "2001:db8:f::1"
HOST_ADDR = "2001:db8:f::2"
HOST_VM_GW = "2001:db8:100::1"
VM_ADDR = "2001:db8:100::10"
H_SID = "fc00:0:2::d6"  # host's End.DX6-map
PORT = 5001
CHUNK = 1 << 20
VM_MTU = 1500
XDP_MODE = "generic"
_labs = itertools.count()


class TcpLab(NamespaceLab):
    """ing -> host -> vm with srmig's H.Encaps on ing and srmig's End.DX6-map on host; always cleaned up."""

    def __init__(self):
        super().__init__(f"{os.getpid()}-tcp{next(_labs)}")  # two labs may live at once

    def _build(self) -> None:
        t = self.topo
        for role in ("ing", "host", "vm"):
            t.add_host(role)
        t.link("ing", "i0", "host", "h0", ING_ADDR + "/64", HOST_ADDR + "/64", static_neigh=True)
        t.link("host", "hv", "vm", "v0", HOST_VM_GW + "/64", VM_ADDR + "/64", static_neigh=True)
        for role, ifname in (("ing", "i0"), ("host", "h0")):  # a fabric with room for the encapsulation
            with t.ipr(role) as ipr:
                ipr.link("set", index=ipr.link_lookup(ifname=ifname)[0], mtu=VM_MTU + ingress.MAX_OVERHEAD)
        t.route("ing", "fc00:0:2::/48", gateway=HOST_ADDR)
        t.route("vm", "::/0", gateway=HOST_VM_GW)
        self.dp = self._stack.enter_context(xdp_on(t, "host", "h0", XDP_MODE))
        self.dp.add_sid(H_SID, Behaviour.END_DX6_MAP)
        self.dp.set_vm(VM_ADDR, VmState.RUNNING)
        self.encap = self._stack.enter_context(encap_on(t, "ing", "i0", source=ING_ADDR))
        self.set_encap(False)

    def set_encap(self, on: bool) -> None:
        """The VM's /128 route on ing (MTU 1500 either way), with or without its encap entry."""
        if on:
            steer(self.topo, "ing", self.encap, VM_ADDR, [H_SID], HOST_ADDR, "i0")
        else:
            self.encap.clear(VM_ADDR)
            with self.topo.ipr("ing") as ipr:
                ingress.route_vm(VM_ADDR, HOST_ADDR, netlink.ifindex("i0", ipr), ipr)

    def delivered(self) -> int:
        """Packets host's End.DX6-map SID delivered (decapsulated and redirected towards the VM)."""
        return next(s["stats"]["delivered"] for s in self.dp.stats()["sids"] if s["sid"] == H_SID)

    def counters(self) -> dict[str, int]:
        return self.encap.stats()["counters"]

    def transfer(self, max_bytes: int, max_s: float) -> dict:
        """One TCP connection ing -> vm: the sender writes until max_bytes or max_s; what the receiver got."""
        with self.topo.inside("vm"):
            lsock = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
        with self.topo.inside("ing"):
            csock = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
        got: dict = {"bytes": 0, "t_last": None, "error": None}

        def receive():
            try:
                conn, _ = lsock.accept()
                with conn:
                    conn.settimeout(max_s + 5)
                    buf = bytearray(CHUNK)
                    while n := conn.recv_into(buf):
                        got["bytes"] += n
                        got["t_last"] = time.perf_counter()
            except OSError as e:
                got["error"] = f"{type(e).__name__}: {e}"

        try:
            lsock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            lsock.bind((VM_ADDR, PORT))
            lsock.listen(1)
            lsock.settimeout(5)
            rx = threading.Thread(target=receive, daemon=True)
            rx.start()
            csock.settimeout(5)
            csock.connect((VM_ADDR, PORT))
            chunk = b"\x5a" * CHUNK
            sent = 0
            t0 = time.perf_counter()
            deadline = t0 + max_s
            while sent < max_bytes and time.perf_counter() < deadline:
                csock.sendall(chunk[:min(CHUNK, max_bytes - sent)])
                sent += min(CHUNK, max_bytes - sent)
            csock.shutdown(socket.SHUT_WR)
            rx.join(timeout=max_s + 10)
        finally:
            csock.close()
            lsock.close()
        secs = (got["t_last"] - t0) if got["t_last"] else None
        return {"sent_bytes": sent, "received_bytes": got["bytes"], "seconds": round(secs, 4) if secs else None,
                "gbps": round(got["bytes"] * 8 / secs / 1e9, 3) if secs else None, "error": got["error"]}



def measure(lab: TcpLab, encap: bool, max_bytes: int, max_s: float) -> dict:
    """One transfer with or without the encap entry, with the programs' counters around it."""
    lab.set_encap(encap)
    c0, d0 = lab.counters(), lab.delivered()
    r = lab.transfer(max_bytes, max_s)
    c1, d1 = lab.counters(), lab.delivered()
    r["encap_counters"] = {k: c1[k] - c0[k] for k in c1}
    r["end_dx6_map_delivered"] = d1 - d0
    return r


def run(max_bytes: int = 200_000_000, max_s: float = 10.0, rounds: int = 3,
        progress: Callable[[str], None] | None = None) -> dict:
    """`rounds` x (plain, encap), alternating; medians and every round."""
    per: dict[str, list[dict]] = {"plain": [], "encap": []}
    with TcpLab() as lab:
        for i in range(rounds):
            for mode in ("plain", "encap"):
                r = measure(lab, mode == "encap", max_bytes, max_s)
                per[mode].append(r)
                if progress:
                    progress(f"tcp ({i + 1}/{rounds}) {mode:<5}: {r['received_bytes'] / 1e6:.0f} MB in "
                             f"{r['seconds']} s = {r['gbps']} Gbit/s; encap done {r['encap_counters']['done']}, "
                             f"End.DX6-map delivered {r['end_dx6_map_delivered']}")

    def med(mode):
        vs = [r["gbps"] for r in per[mode] if r["gbps"] is not None]
        return round(statistics.median(vs), 3) if vs else None

    out = {"gbps": {"plain": med("plain"), "encap": med("encap")},
           "rounds": per, "max_bytes": max_bytes, "max_s": max_s,
           "complete": all(r["received_bytes"] == r["sent_bytes"] and r["error"] is None
                           for rs in per.values() for r in rs)}
    out["encap_vs_plain"] = (round(out["gbps"]["encap"] / out["gbps"]["plain"], 3)
                             if out["gbps"]["encap"] and out["gbps"]["plain"] else None)
    out["method"] = (f"one TCP connection (Python sockets, {CHUNK >> 20} MiB writes) from an ingress namespace to "
                     f"a VM namespace behind srmig's End.DX6-map (XDP {XDP_MODE} on the host's fabric veth), up "
                     f"to {max_bytes / 1e6:.0f} MB or {max_s} s; encap: srmig's BPF H.Encaps (tc clsact egress, "
                     f"1 SID) on the ingress, plain: the same route without the encap entry; fabric MTU "
                     f"{VM_MTU + ingress.MAX_OVERHEAD}, VM route MTU {VM_MTU}; {rounds} alternating rounds, "
                     f"medians; Gbit/s = bytes received x 8 / (last byte received - first write)")
    out["cpus"] = os.cpu_count()
    return out


def print_table(result: dict) -> None:
    g = result["gbps"]

    def fmt(v):
        return "-" if v is None else f"{v:.2f}"

    rounds = {m: "/".join(fmt(r["gbps"]) for r in rs) for m, rs in result["rounds"].items()}
    print(f"TCP bulk into a VM behind End.DX6-map: plain {fmt(g['plain'])} Gbit/s ({rounds['plain']}), through "
          f"srmig's BPF H.Encaps {fmt(g['encap'])} Gbit/s ({rounds['encap']}): {fmt(result['encap_vs_plain'])}x"
          + ("" if result["complete"] else "  (a transfer did not arrive whole)"))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.tcp_encap", description=__doc__.split("\n")[0])
    ap.add_argument("--bytes", type=int, default=200_000_000)
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args(argv)
    res = run(a.bytes, a.seconds, a.rounds, progress=lambda m: print(m, file=sys.stderr, flush=True))
    return emit(res, a.json, print_table)


if __name__ == "__main__":
    sys.exit(main())
