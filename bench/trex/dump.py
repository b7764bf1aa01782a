"""Build every TRex profile variant and print its packets as JSON (one document on stdout).

Runs in its own process (the TRex client swaps in its own scapy 2.4.3):
    python -m bench.trex.dump [--count N] [--flows F]
The field engine is applied here the way TRex applies it (inc/dec flow variables written big-endian at
their offsets), so the output is the first N packets each stream would send.
"""

from __future__ import annotations

import argparse
import base64
import json
import sys
from pathlib import Path

import lbr_trex_client  # noqa: F401  (must come before trex.*: it puts its bundled libraries on sys.path)
from trex.stl.api import STLProfile

PROFILE = Path(__file__).resolve().parent / "srv6_stl.py"
BRANCHES = ("end_s_deliver", "end_s_forward", "end_sbuf", "end_dx6_map")
SIZES = ("78", "imix", "1500")


def expand(stream_json: dict, count: int) -> list[bytes]:
    """The first `count` packets of a stream: the template with its flow variables written in."""
    base = bytearray(base64.b64decode(stream_json["packet"]["binary"]))
    instr = stream_json["vm"]["instructions"]
    variables = {}
    for ins in instr:
        if ins["type"] == "flow_var":
            lo, hi = ins["min_value"], ins["max_value"]
            init = ins.get("init_value")
            if init is None:
                init = lo if ins["op"] == "inc" else hi
            variables[ins["name"]] = {"lo": lo, "hi": hi, "v": init, "op": ins["op"], "step": ins["step"],
                                      "size": ins["size"]}
        elif ins["type"] not in ("write_flow_var",):
            raise ValueError(f"field engine instruction {ins['type']} not emulated")
    out = []
    for _ in range(count):
        pkt = bytearray(base)
        for ins in instr:
            if ins["type"] == "write_flow_var":
                var = variables[ins["name"]]
                val = (var["v"] + ins.get("add_value", 0)) & ((1 << (8 * var["size"])) - 1)
                off = ins["pkt_offset"]
                pkt[off:off + var["size"]] = val.to_bytes(var["size"], "big" if ins["is_big_endian"] else "little")
        out.append(bytes(pkt))
        for var in variables.values():  # step every variable once per packet, wrapping in its range
            span = var["hi"] - var["lo"] + 1
            delta = var["step"] if var["op"] == "inc" else -var["step"]
            var["v"] = var["lo"] + (var["v"] - var["lo"] + delta) % span
    return out


def dump(count: int = 4, flows: int = 1000) -> list[dict]:
    docs = []
    for branch in BRANCHES:
        for size in SIZES:
            profile = STLProfile.load_py(str(PROFILE), branch=branch, size=size, flows=flows)
            for stream in profile.get_streams():
                js = stream.to_json()
                docs.append({"branch": branch, "size": size, "stream": stream.get_name(),
                             "pps": js["mode"]["rate"]["value"],
                             "packets": [p.hex() for p in expand(js, count)]})
    return docs


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--count", type=int, default=4, help="packets per stream")
    ap.add_argument("--flows", type=int, default=1000)
    args = ap.parse_args(argv)
    json.dump(dump(args.count, args.flows), sys.stdout)
    print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
