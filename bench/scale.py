"""Per-packet cost of each branch at 10, 10^3 and 10^6 VMs in the map, with bench/micro.py's method
(BPF_PROG_TEST_RUN, repeat=1 runs, median of kernel-reported durations, interleaved rounds, XDP_PASS stub
in the same run). The map is grown in place between steps, so one lab serves every step."""

from __future__ import annotations

from bench import micro
from srmig.bpf import loader
from srmig.testbed import lab as L

COUNTS = (10, 1_000, 1_000_000)


def run(counts: tuple[int, ...] = COUNTS, runs: int = 1000, progress: bool = False) -> dict:
    limits = loader.Limits(max_vms=max(max(counts) + 64, 1024))
    steps = []
    with L.TestRunLab(limits) as lab:
        packets = micro.branch_packets()
        for name, pkt in packets.items():
            got = lab.run(pkt).action
            if got != micro.EXPECTED[name]:
                raise RuntimeError(f"bench packet {name} took {got}, expected {micro.EXPECTED[name]}")
        stub, stub_fd = loader.compile_program(micro.STUB_C, "xdp_stub")
        try:
            fds = {name: lab.prog_fd for name in packets} | {"stub": stub_fd}
            timed = packets | {"stub": packets["end_s_deliver"]}
            base = len(lab.dp.list_vms())  # the lab's own VMs, one per state
            for n in sorted(counts):
                if n > base:
                    micro._fill_vms(lab, n - base, progress)
                t = micro._time(lab, fds, timed, runs)
                stub_ns = t.pop("stub")
                steps.append({"vms_in_map": max(n, base), "stub_ns": stub_ns, "branches": t,
                              "extra_over_stub_ns": {k: round(v - stub_ns, 1) for k, v in t.items()}})
        finally:
            stub.cleanup()
    first, last = steps[0], steps[-1]
    ratio = {k: round(last["branches"][k] / first["branches"][k], 3) for k in first["branches"]}
    return {
        "steps": steps,
        "ratio_largest_vs_smallest": ratio,
        # The headline: the slowest End.S branch at the largest map against the smallest, its lookups answered
        # from the program's copies or (cold) from the maps themselves.
        "scale_1e6_vs_10": max(ratio["end_s_deliver"], ratio["end_s_forward"], ratio["end_s_forward_cold"]),
        "target_max": micro.TARGET_SCALE_RATIO,
        "method": f"bench.micro method: BPF_PROG_TEST_RUN repeat=1, median of {runs} runs per branch, "
                  f"map grown to {', '.join(f'{c:,}' for c in sorted(counts))} VMs",
    }
