"""State database fan-out: how long until every ingress sees a VM's new record.

n simulated ingresses in one process, each with its own watch on "vms/"; a writer changes one VM's record
`changes` times, one change at a time. Latency is taken from just before put() to the moment each
watcher's callback holds the new value; reported over all (watcher, change) pairs. etcd runs as a local
single member (EtcdServer: TLS with client certificates, as deployed); the embedded backend runs on a
temporary SQLite file.

    python -m bench.watchers [--watchers N] [--changes N] [--embedded-watchers N] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import threading
import time
from pathlib import Path

from srmig.ctl import statedb
from srmig.testbed.etcd import EtcdServer

VM_KEY = "vms/2001:db8::10"
SETUP_TIMEOUT_S = 30.0
CHANGE_TIMEOUT_S = 5.0


def _open_fds() -> dict[str, int]:
    kinds: dict[str, int] = {}
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        kind = target.split(":", 1)[0] if ":" in target else "file"
        kinds[kind] = kinds.get(kind, 0) + 1
    return kinds


def _cpu_s(pid: int) -> float:
    """User + system CPU seconds of a process so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _measure(writer: statedb.Kv, watcher_kv: statedb.Kv, n_watchers: int, changes: int,
             server_pid: int | None = None) -> dict:
    """n watches on watcher_kv, `changes` puts through writer; latency of each watcher's delivery."""
    arrivals: dict[int, list[float]] = {}
    complete: dict[int, threading.Event] = {}
    for seq in range(-1, changes):
        arrivals[seq], complete[seq] = [], threading.Event()

    def on_events(events: list[statedb.Event]) -> None:
        t = time.perf_counter()
        for e in events:
            if e.kind == "put" and e.key == VM_KEY:
                got = arrivals[e.value["seq"]]
                got.append(t)       # list.append is atomic under the GIL
                if len(got) >= n_watchers:
                    complete[e.value["seq"]].set()

    threads_before = threading.active_count()
    t_setup = time.perf_counter()
    _, rev = writer.range("vms/")
    # a start revision for all: no per-watch round trip, and a watch still connecting replays what it missed
    watches = [watcher_kv.watch("vms/", on_events, start_revision=rev + 1) for _ in range(n_watchers)]
    try:
        # warm-up change: once every watcher has it, every stream is up
        writer.put(VM_KEY, {"host": "S", "seq": -1})
        if not complete[-1].wait(SETUP_TIMEOUT_S):
            raise RuntimeError(f"only {len(arrivals[-1])}/{n_watchers} watchers up after {SETUP_TIMEOUT_S:.0f} s")
        setup_s = time.perf_counter() - t_setup
        threads, fds = threading.active_count() - threads_before, _open_fds()
        samples, lost, last = [], 0, []
        cpu0 = {"bench": _cpu_s(os.getpid())} | ({"etcd": _cpu_s(server_pid)} if server_pid else {})
        for seq in range(changes):
            t0 = time.perf_counter()
            writer.put(VM_KEY, {"host": "SD"[seq % 2], "seq": seq})
            complete[seq].wait(CHANGE_TIMEOUT_S)
            got = list(arrivals[seq])
            lost += n_watchers - len(got)
            samples += [(t - t0) * 1000 for t in got]
            if got:
                last.append((max(got) - t0) * 1000)
        # where the time goes: CPU per change of this process (all watchers) and of etcd
        cpu_ms = {k: round((_cpu_s(server_pid if k == "etcd" else os.getpid()) - v) * 1000 / changes, 1)
                  for k, v in cpu0.items()}
    finally:
        t_cancel = time.perf_counter()
        for w in watches:
            w.cancel()
        cancel_s = time.perf_counter() - t_cancel
    samples.sort()
    return {
        "watchers": n_watchers, "changes": changes, "samples": len(samples), "lost": lost,
        "p50_ms": round(statistics.median(samples), 2),
        "p99_ms": round(samples[min(len(samples) - 1, int(len(samples) * 0.99))], 2),
        "max_ms": round(samples[-1], 2),
        "last_watcher_p50_ms": round(statistics.median(last), 2),
        "setup_s": round(setup_s, 2), "cancel_all_s": round(cancel_s, 2),
        "watch_threads": threads, "open_fds": fds, "cpu_ms_per_change": cpu_ms,
    }


def run(n_watchers: int = 1000, changes: int = 20, backend: str = "etcd", embedded_watchers: int = 100) -> dict:
    """`backend` "etcd", "embedded" or "both"; the embedded run uses `embedded_watchers` (0: skip)."""
    out: dict = {"changes": changes}
    if backend in ("etcd", "both"):
        with EtcdServer(name="srmig-bench") as server:
            with statedb.open_db("etcd", endpoints=server.endpoints, tls=server.tls("writer"),
                                 auth=server.auth()) as writer, \
                    statedb.open_db("etcd", endpoints=server.endpoints, tls=server.tls("watchers"),
                                    auth=server.auth()) as watchers:
                out["etcd"] = _measure(writer, watchers, n_watchers, changes, server.proc.pid)
    if backend in ("embedded", "both") and embedded_watchers:
        with tempfile.TemporaryDirectory(prefix="srmig-bench-") as d:
            path = str(Path(d) / "state.db")
            with statedb.open_db("embedded", path=path) as writer, \
                    statedb.open_db("embedded", path=path) as watchers:
                out["embedded"] = _measure(writer, watchers, embedded_watchers, changes)
    return out


def table(result: dict) -> str:
    cols = ("watchers", "samples", "lost", "p50_ms", "p99_ms", "max_ms", "last_watcher_p50_ms", "setup_s")
    rows = [("backend",) + cols + ("cpu_ms/change",)]
    for backend in ("etcd", "embedded"):
        if backend in result:
            r = result[backend]
            cpu = " ".join(f"{k}={v}" for k, v in r["cpu_ms_per_change"].items())
            rows.append((backend,) + tuple(str(r[c]) for c in cols) + (cpu,))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.rjust(w) for c, w in zip(r, widths)) for r in rows)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.watchers", description=__doc__.split("\n\n")[0])
    p.add_argument("--watchers", type=int, default=1000, help="etcd watchers (default 1000)")
    p.add_argument("--embedded-watchers", type=int, default=100, help="embedded watchers (default 100; 0: skip)")
    p.add_argument("--changes", type=int, default=20)
    p.add_argument("--backend", choices=("etcd", "embedded", "both"), default="both")
    p.add_argument("--json", metavar="FILE", help="also write the result as JSON")
    args = p.parse_args(argv)
    result = run(args.watchers, args.changes, args.backend, args.embedded_watchers)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    print(table(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
