"""`srmig bench` with no sub-benchmark: everything, as ONE JSON document (or a table), plus a plot.

- local: NDR/PDR per path through one DUT core with trafgen (bench/local.py), hold-ring flush rate
- scale: per-packet cost at 10, 10^3, 10^6 VMs (bench/scale.py, bench/micro.py's method)
- ratios: end_s_vs_kernel_dx6, end_s_vs_redirect_stub (local, same run), scale_1e6_vs_10 (scale)
- targets: End.S >= 2x the kernel's End.DX6, >= 0.8x the redirect stub; 10^6 VMs within 20 % of 10
"""

from __future__ import annotations

import os
import platform
import sys
import time

from bench import local, scale

TARGET_VS_KERNEL_DX6 = 2.0
TARGET_VS_REDIRECT_STUB = 0.8
TARGET_SCALE = 1.2
PARTS = ("local", "scale")


def run(quick: bool = False, parts: tuple[str, ...] = PARTS, max_rate: float = 1_500_000,
        duration_s: float | None = None, max_trials: int | None = None, mode: str = "native",
        progress: bool = True) -> dict:
    say = (lambda m: print(m, file=sys.stderr, flush=True)) if progress else None
    t0 = time.monotonic()
    out: dict = {"machine": {"kernel": platform.release(), "cpus": os.cpu_count()},
                 "quick": quick}
    ratios: dict = {}
    if "local" in parts:
        loc = local.run(max_rate=max_rate, duration_s=duration_s or (1.0 if quick else 2.0),
                        max_trials=max_trials or (5 if quick else 10), resolution=0.05 if quick else 0.02,
                        mode=mode, hold_packets=2000 if quick else 6000, progress=say)
        out["hold_ring_flush"] = loc.pop("hold_ring_flush", None)
        out["local"] = loc
        ratios.update(local.ratios(loc))
    if "scale" in parts:
        if say:
            say("scale: per-packet cost at 10, 10^3, 10^6 VMs")
        sc = scale.run(counts=scale.COUNTS, runs=300 if quick else 1500, progress=progress)
        out["scale"] = sc
        ratios["scale_1e6_vs_10"] = sc["scale_1e6_vs_10"]
    out["ratios"] = {"end_s_vs_kernel_dx6": ratios.pop("end_s_vs_kernel_dx6", None),
                     "end_s_vs_redirect_stub": ratios.pop("end_s_vs_redirect_stub", None),
                     "scale_1e6_vs_10": ratios.pop("scale_1e6_vs_10", None), **ratios}
    r = out["ratios"]

    def met(v, ok):
        return None if v is None else ok(v)

    out["targets"] = {
        "end_s_vs_kernel_dx6_min": TARGET_VS_KERNEL_DX6,
        "end_s_vs_kernel_dx6_met": met(r["end_s_vs_kernel_dx6"], lambda v: v >= TARGET_VS_KERNEL_DX6),
        "end_s_vs_redirect_stub_min": TARGET_VS_REDIRECT_STUB,
        "end_s_vs_redirect_stub_met": met(r["end_s_vs_redirect_stub"], lambda v: v >= TARGET_VS_REDIRECT_STUB),
        "scale_1e6_vs_10_max": TARGET_SCALE,
        "scale_1e6_vs_10_met": met(r["scale_1e6_vs_10"], lambda v: v <= TARGET_SCALE),
    }
    out["elapsed_s"] = round(time.monotonic() - t0, 1)
    return out


def _fmt(v, spec=".2f"):
    return "-" if v is None else format(v, spec)


def print_table(result: dict) -> None:
    if "local" in result:
        loc = result["local"]
        print(f"local generator: {loc['method']}")
        for note in loc.get("notes", []):
            print(f"  note: {note}")
        print(f"{'path':<16}{'MFR kpps':>10}{'offered':>10}{'NDR kpps':>10}{'PDR kpps':>10}{'trials':>8}  settled")
        for name, p in loc["paths"].items():
            m = p.get("max_forwarding_rate", {})
            print(f"{name:<16}{m.get('forwarded_pps', 0) / 1e3:>10.1f}{m.get('offered_pps', 0) / 1e3:>10.1f}"
                  f"{p['ndr_pps'] / 1e3:>10.1f}{p['pdr_pps'] / 1e3:>10.1f}{len(p['trials']):>8}  "
                  f"{'yes' if p['settled'] else 'no'}")
        print(f"  (one DUT core: MFR = forwarded kpps per core at maximum load; NDR/PDR with 1-s bursts; "
              f"frame {loc['frame_bytes']} bytes)")
    if result.get("hold_ring_flush"):
        h = result["hold_ring_flush"]
        print(f"hold-ring flush: {h['held']} packets in {h['drain_ring_s'] + h['resend_s']:.3f} s "
              f"= {h['flush_pps'] / 1e3:.1f} kpps (arrived {h['resent_arrived']})")
    if "scale" in result:
        sc = result["scale"]
        names = list(sc["steps"][0]["branches"])
        print(f"{'ns/packet':<18}" + "".join(f"{s['vms_in_map']:>12,}" for s in sc["steps"]))
        print(f"{'XDP_PASS stub':<18}" + "".join(f"{s['stub_ns']:>12.0f}" for s in sc["steps"]))
        for n in names:
            print(f"{n:<18}" + "".join(f"{s['branches'][n]:>12.0f}" for s in sc["steps"]))
    r, t = result["ratios"], result["targets"]

    def verdict(k):
        return {None: "not measured", True: "met", False: "MISSED"}[t[k]]

    print(f"ratios: End.S / kernel End.DX6 = {_fmt(r['end_s_vs_kernel_dx6'])} (target >= "
          f"{t['end_s_vs_kernel_dx6_min']}: {verdict('end_s_vs_kernel_dx6_met')}); End.S / redirect stub = "
          f"{_fmt(r['end_s_vs_redirect_stub'])} (>= {t['end_s_vs_redirect_stub_min']}: "
          f"{verdict('end_s_vs_redirect_stub_met')}); 10^6 / 10 VMs = {_fmt(r['scale_1e6_vs_10'], '.3f')} "
          f"(<= {t['scale_1e6_vs_10_max']}: {verdict('scale_1e6_vs_10_met')})")


def plot(result: dict, png: str) -> str | None:
    """Loss vs offered rate per path, and NDR/PDR per path. Returns the file written (None: nothing to plot)."""
    if "local" not in result:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = result["local"]["paths"]
    fig, (a, b) = plt.subplots(1, 2, figsize=(13, 4.8))
    for name, p in paths.items():
        pts = sorted((t["rate_pps"] / 1e3, t["loss_ratio"] * 100) for t in p["trials"])
        a.plot([x for x, _ in pts], [y for _, y in pts], "o-", label=name, markersize=4)
    a.axhline(0.5, color="grey", linestyle=":", linewidth=1, label="PDR threshold 0.5 %")
    a.set_xlabel("offered load (kpps)")
    a.set_ylabel("loss (%)")
    a.set_yscale("symlog", linthresh=0.1)
    a.set_ylim(bottom=0)
    a.set_title("loss vs offered load (every search trial)")
    a.legend(fontsize=8)
    names = list(paths)
    x = range(len(names))
    w = 0.27
    b.bar([i - w for i in x], [paths[n].get("max_forwarding_rate", {}).get("forwarded_pps", 0) / 1e3
                               for n in names], w, label="max forwarding rate")
    b.bar(list(x), [paths[n]["ndr_pps"] / 1e3 for n in names], w, label="NDR")
    b.bar([i + w for i in x], [paths[n]["pdr_pps"] / 1e3 for n in names], w, label="PDR")
    b.set_xticks(list(x))
    b.set_xticklabels(names, rotation=20, fontsize=8)
    b.set_ylabel("forwarded kpps (one DUT core)")
    b.set_title(f"{result['local']['frame_bytes']}-byte frames")
    b.legend()
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)
    return png
