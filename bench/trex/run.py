"""NDR/PDR against a TRex server, with bench/search.py, for one profile variant:

    python -m bench.trex.run --server 10.0.0.5 --branch end_s_forward --size 78 --flows 1000 [--json]

Port `--tx` sends into the DUT, port `--rx` receives what it forwards. A trial resets the port counters,
starts the profile at the trial's rate for the trial's duration, waits, and reads opackets / ipackets.
With no TRex server reachable it says so in one line and exits 2 (nothing is started locally: a TRex server
cannot be installed on the development machines). Runs in its own process (TRex's bundled scapy 2.4.3).
"""

from __future__ import annotations

import argparse
import json
import socket
import sys
from pathlib import Path

from bench import search as S

PROFILE = Path(__file__).resolve().parent / "srv6_stl.py"
SYNC_PORT = 4501  # TRex's RPC (ZMQ REQ/REP) port


def reachable(server: str, port: int = SYNC_PORT, timeout: float = 2.0) -> str | None:
    """None when a TCP connection to the TRex RPC port succeeds, else the reason."""
    try:
        with socket.create_connection((server, port), timeout=timeout):
            return None
    except OSError as e:
        return e.strerror or str(e)


def make_trial(client, profile, tx: int, rx: int):
    def trial(rate_pps: float, duration_s: float) -> tuple[int, int]:
        client.reset(ports=[tx, rx])
        client.add_streams(profile.get_streams(), ports=[tx])
        client.clear_stats()
        client.start(ports=[tx], mult=f"{rate_pps}pps", duration=duration_s, force=True)
        client.wait_on_traffic(ports=[tx], rx_delay_ms=100)
        stats = client.get_stats()
        return stats[tx]["opackets"], stats[rx]["ipackets"]

    return trial


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="NDR/PDR search against a TRex server with the srmig profiles")
    ap.add_argument("--server", default="127.0.0.1", help="TRex server address (default 127.0.0.1)")
    ap.add_argument("--branch", default="end_s_forward",
                    choices=["end_s_deliver", "end_s_forward", "end_sbuf", "end_dx6_map"])
    ap.add_argument("--size", default="78", choices=["78", "imix", "1500"])
    ap.add_argument("--flows", type=int, default=1000)
    ap.add_argument("--tx", type=int, default=0)
    ap.add_argument("--rx", type=int, default=1)
    ap.add_argument("--max-rate", type=float, default=14_880_000, help="pps (default: 10GbE line rate, 64 B)")
    ap.add_argument("--duration", type=float, default=10.0, help="seconds per trial")
    ap.add_argument("--trials", type=int, default=14, help="at most this many trials")
    ap.add_argument("--resolution", type=float, default=0.01)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)

    why = reachable(args.server)
    if why:
        print(f"srmig-trex: no TRex server reachable at {args.server}:{SYNC_PORT} ({why})", file=sys.stderr)
        return 2

    import lbr_trex_client  # noqa: F401  (before trex.*)
    from trex.stl.api import STLClient, STLProfile

    profile = STLProfile.load_py(str(PROFILE), branch=args.branch, size=args.size, flows=args.flows)
    client = STLClient(server=args.server)
    try:
        client.connect()
        client.acquire(ports=[args.tx, args.rx], force=True)
        result = S.search(make_trial(client, profile, args.tx, args.rx), args.max_rate,
                          duration_s=args.duration, max_trials=args.trials, resolution=args.resolution,
                          on_trial=None if args.json else lambda t: print(
                              f"{t.rate_pps / 1e6:8.3f} Mpps offered, loss {t.loss_ratio * 100:7.3f} %",
                              file=sys.stderr))
    finally:
        client.disconnect()
    doc = {"server": args.server, "branch": args.branch, "size": args.size, "flows": args.flows,
           **result.to_dict()}
    if args.json:
        json.dump(doc, sys.stdout, indent=2)
        print()
    else:
        print(f"{args.branch} {args.size}: NDR {result.ndr_pps / 1e6:.3f} Mpps, PDR {result.pdr_pps / 1e6:.3f} Mpps")
    return 0


if __name__ == "__main__":
    sys.exit(main())
