"""srmig's benchmarks: each part measures against a baseline run in the same process (bench/report.py)."""

from __future__ import annotations

import json
import sys


def emit(result: dict, as_json: bool, print_table) -> int:
    """A part run on its own (`python -m bench.<part>`): its JSON document, or its table."""
    if as_json:
        json.dump(result, sys.stdout, indent=1)
        print()
    else:
        print_table(result)
    return 0
