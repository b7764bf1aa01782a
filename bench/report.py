"""`srmig bench` with no sub-benchmark: everything, as ONE JSON document (or a table), plus a plot.

- local: NDR/PDR per path through one DUT core (bench/local.py), with the live-frames generator (BPF_PROG_RUN,
  default; the clone generator by itself where the kernel refuses live frames), the clone generator or trafgen,
  at every frame size, repeated:
  medians and ranges; srmig's BPF H.Encaps against plain forwarding (and the kernel's encap seg6 where the
  kernel has it); hold-ring flush rate
- tcp: a bulk TCP transfer into a VM behind srmig's End.DX6-map, with and without srmig's BPF H.Encaps
  (bench/tcp_encap.py): Gbit/s of each, same run
- kernel_srv6: "present", or why the kernel's SRv6 baselines (End.DX6, End, encap seg6) are not measured
  (srmig.check.kernel_srv6()); generator: which generator ran, its ceiling, the paths it bounds; ratio_notes:
  why a ratio is null or what bounds it; ratio_ceilings: next to every ratio, the generator's ceiling (its
  rate into a plain sink, same run) and the faster side's rate
- flush: a full held buffer into a VM's tap queue, per sending method, in order (bench/flush.py): "hold_flush"
- drain: the product's source drain (srmig.ctl.drain.SourceDrain) under 0.5, 1 and 2 Mpps and End.S's forwarding
  rate, counted by sequence number at a sink behind the destination's End.SBUF (bench/drain.py): "drain", with
  ratio_drain_vs_end_s in it and in "ratios"
- agent: libvirt event -> VM-state map latency, reconciliation after a restart with 10^4 VMs (bench/agent.py)
- scale: per-packet cost at 10, 10^3, 10^6 VMs (bench/scale.py, bench/micro.py's method)
- ratios: end_s_vs_kernel_dx6, end_s_vs_redirect_stub (local, same run; the median over the repetitions, range in
  ratios_spread), scale_1e6_vs_10 (scale), bpf_encap_vs_forward_plain (local), tcp_encap_vs_plain (tcp)
- targets: End.S >= 2x the kernel's End.DX6, >= 0.8x the redirect stub; 10^6 VMs within 20 % of 10
- for reference, no target: end_s_vs_redirect_stub_mac, End.S against a stub that swaps the Ethernet addresses
  (reads and writes the frame, as every real forwarder must; the bare stub never touches it)
"""

from __future__ import annotations

import os
import platform
import sys
import time

from bench import agent, drain, flush, local, scale, tcp_encap
from srmig import check

TARGET_VS_KERNEL_DX6 = 2.0
TARGET_VS_REDIRECT_STUB = 0.8
TARGET_SCALE = 1.2
PARTS = ("local", "tcp", "scale", "flush", "agent", "drain")
HEADLINE_RATIOS = ("end_s_vs_kernel_dx6", "end_s_vs_redirect_stub", "end_s_vs_redirect_stub_mac",
                   "bpf_encap_vs_forward_plain", "bpf_encap_vs_kernel_encap")  # the table says why one is null


# Per generator: highest offered load (pps) and seconds per trial (quick, full). trafgen's trials are whole
# seconds (its shaper works per second); the live and clone generators pace 32 frames at a time: short trials
# suffice.
MAX_RATE = {"trafgen": 1_500_000, "live": 4_000_000, "clone": 4_000_000}
DURATION = {"trafgen": (1.0, 2.0), "live": (0.25, 0.5), "clone": (0.25, 0.5)}


def default_sizes(generator: str) -> tuple[str, ...]:
    """Every size with the live or clone generator; trafgen's whole-second trials make a sweep slow: the
    minimum."""
    return ("78",) if generator == "trafgen" else local.SIZES


def run(quick: bool = False, parts: tuple[str, ...] = PARTS, max_rate: float | None = None,
        duration_s: float | None = None, max_trials: int | None = None, mode: str = "native",
        progress: bool = True, generator: str = "live", sizes: tuple[str, ...] | None = None,
        repeat: int | None = None, kernel_srv6: tuple[bool, str] | None = None) -> dict:
    """`kernel_srv6`: (present, reason) as srmig.check.kernel_srv6() returns it (tried when None)."""
    say = (lambda m: print(m, file=sys.stderr, flush=True)) if progress else None
    t0 = time.monotonic()
    ks = kernel_srv6 if kernel_srv6 is not None else check.kernel_srv6()
    out: dict = {"machine": {"kernel": platform.release(), "cpus": os.cpu_count()},
                 "quick": quick, "kernel_srv6": ks[1]}
    ratios: dict = {}
    if "local" in parts:
        # The generator that will run (live frames fall back to the clone generator where refused) sets the
        # defaults.
        gen, live = local.pick_generator(generator)
        if say and gen != generator:
            say(f"local: BPF_PROG_RUN live frames {live} on this kernel: the {gen} generator runs instead")
        loc = local.run(max_rate=max_rate or MAX_RATE[gen],
                        duration_s=duration_s or DURATION[gen][0 if quick else 1],
                        max_trials=max_trials or (5 if quick else 10), resolution=0.05 if quick else 0.02,
                        mode=mode, hold_packets=2000 if quick else 6000, progress=say, generator=generator,
                        sizes=tuple(sizes or default_sizes(gen)),
                        repeat=repeat or (2 if quick else 3), rounds=3 if quick else 5, kernel_srv6=ks)
        out["hold_ring_flush"] = loc.pop("hold_ring_flush", None)
        out["local"] = loc
        ratios.update(local.ratios(loc))
        out["ratios_spread"] = loc.get("ratios_spread")
        out["generator"] = loc["generator"]
        out["ratio_notes"] = loc["ratio_notes"]
        out["ratio_ceilings"] = loc["ratio_ceilings"]
    if "tcp" in parts:
        if say:
            say("tcp: a bulk TCP transfer into a VM behind End.DX6-map, with and without srmig's BPF H.Encaps")
        out["tcp_encap"] = tcp_encap.run(max_bytes=200_000_000, max_s=10.0, rounds=3 if quick else 5, progress=say)
        ratios["tcp_encap_vs_plain"] = out["tcp_encap"]["encap_vs_plain"]
    if "flush" in parts:
        if say:
            say("flush: a held buffer into a VM's tap queue, per method")
        out["hold_flush"] = flush.run(packets=10000 if quick else 20000, repeat=2 if quick else 3, progress=say)
    if "drain" in parts:
        if say:
            say("drain: the source drain while End.S traffic goes on, counted at a sink behind End.SBUF")
        out["drain"] = drain.run(mode=mode, progress=say)
        ratios["drain_vs_end_s"] = out["drain"]["ratio_drain_vs_end_s"]
    if "agent" in parts:
        if say:
            say("agent: libvirt event -> map latency, reconciliation of 10^4 VMs")
        out["agent"] = agent.run(events=150 if quick else 500, vms=10_000)
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
    spread = out.get("ratios_spread") or {}
    for key, target in (("end_s_vs_kernel_dx6", TARGET_VS_KERNEL_DX6), ("end_s_vs_redirect_stub",
                                                                         TARGET_VS_REDIRECT_STUB)):
        # Met by the worst repetition too (the median alone can hide a run that missed).
        lo = (spread.get(key) or {}).get("min")
        out["targets"][f"{key}_met_every_run"] = met(lo, lambda v, t=target: v >= t)
    out["elapsed_s"] = round(time.monotonic() - t0, 1)
    return out


def _fmt(v, spec=".2f"):
    return "-" if v is None else format(v, spec)


def print_table(result: dict) -> None:
    if result.get("agent"):
        agent.print_table(result["agent"])
    if result.get("kernel_srv6"):
        print(f"kernel SRv6 lwtunnels: {result['kernel_srv6']}"
              + ("" if result["kernel_srv6"].startswith("present") else
                 " (the kernel's End.DX6, End and encap seg6 baselines are not measured: ratios against them are "
                 "null)"))
    if "local" in result:
        loc = result["local"]
        gen = loc.get("generator")
        if isinstance(gen, dict):
            print(f"generator: {gen['name']} (requested {gen['requested']}; live frames: {gen['live_frames']}); "
                  f"{gen['note']}")
        print(f"local generator: {loc['method']}")
        for note in loc.get("notes", []):
            print(f"  note: {note}")
        print(f"{'path':<16}{'MFR kpps':>10}{'(min-max)':>16}{'offered':>10}{'NDR kpps':>10}{'(min-max)':>16}"
              f"{'PDR kpps':>10}{'trials':>8}  settled")
        for name, p in loc["paths"].items():
            m = p.get("max_forwarding_rate", {})
            sp = p.get("spread", {})
            print(f"{name:<16}{m.get('forwarded_pps', 0) / 1e3:>10.1f}{_range(sp.get('max_forwarding_rate_pps')):>16}"
                  f"{m.get('offered_pps', 0) / 1e3:>10.1f}{p['ndr_pps'] / 1e3:>10.1f}{_range(sp.get('ndr_pps')):>16}"
                  f"{p['pdr_pps'] / 1e3:>10.1f}{len(p['trials']):>8}  {'yes' if p['settled'] else 'no'}")
        for name, why in loc.get("skipped_paths", {}).items():
            print(f"{name:<16}  not measured: {why}")
        burst = "1-s bursts" if _gen_name(loc) == "trafgen" else "a smooth load"  # live, clone: paced groups
        print(f"  (one DUT core: MFR = forwarded kpps per core at maximum load; NDR/PDR with {burst}; "
              f"frame {loc['frame_bytes']} bytes; median of {loc.get('repeat', 1)} run(s))")
        if len(loc.get("sweep", {})) > 1:
            print_sweep(loc)
    if result.get("tcp_encap"):
        tcp_encap.print_table(result["tcp_encap"])
    if result.get("hold_ring_flush"):
        h = result["hold_ring_flush"]
        print(f"hold-ring flush: {h['held']} packets in {h['drain_ring_s'] + h['resend_s']:.3f} s "
              f"= {h['flush_pps'] / 1e3:.1f} kpps (arrived {h['resent_arrived']})"
              + (f"; a callback per record and a sendto per packet: {h['per_record']['flush_pps'] / 1e3:.1f} kpps"
                 if h.get("per_record") else ""))
    if result.get("hold_flush"):
        flush.print_table(result["hold_flush"])
    if result.get("drain"):
        drain.print_table(result["drain"])
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

    sp = result.get("ratios_spread") or {}

    def rng(k):
        v = sp.get(k)
        return (f" [{_fmt(v['min'])}-{_fmt(v['max'])}]" if v and v.get("min") is not None and len(v["runs"]) > 1
                else "")

    print(f"ratios: End.S / kernel End.DX6 = {_fmt(r['end_s_vs_kernel_dx6'])}{rng('end_s_vs_kernel_dx6')} (target >= "
          f"{t['end_s_vs_kernel_dx6_min']}: {verdict('end_s_vs_kernel_dx6_met')}); End.S / redirect stub = "
          f"{_fmt(r['end_s_vs_redirect_stub'])}{rng('end_s_vs_redirect_stub')} (>= {t['end_s_vs_redirect_stub_min']}: "
          f"{verdict('end_s_vs_redirect_stub_met')}); 10^6 / 10 VMs = {_fmt(r['scale_1e6_vs_10'], '.3f')} "
          f"(<= {t['scale_1e6_vs_10_max']}: {verdict('scale_1e6_vs_10_met')})")
    if r.get("end_s_vs_redirect_stub_mac") is not None:
        print(f"  for reference: End.S / a redirect stub that swaps the MAC addresses (reads the frame) = "
              f"{_fmt(r['end_s_vs_redirect_stub_mac'])}{rng('end_s_vs_redirect_stub_mac')}; that stub / the bare "
              f"one = {_fmt(r.get('redirect_stub_mac_vs_redirect_stub'))}")
    if "bpf_encap_vs_forward_plain" in r or "tcp_encap_vs_plain" in r:
        print(f"  ingress: srmig's BPF H.Encaps / plain forwarding = {_fmt(r.get('bpf_encap_vs_forward_plain'))}"
              f"{rng('bpf_encap_vs_forward_plain')} (pps); / the kernel's encap seg6 = "
              f"{_fmt(r.get('bpf_encap_vs_kernel_encap'))}; TCP through it / without = "
              f"{_fmt(r.get('tcp_encap_vs_plain'))} (Gbit/s)")
    ceilings = result.get("ratio_ceilings") or {}
    for k in HEADLINE_RATIOS:
        c = ceilings.get(k) or {}
        if r.get(k) is not None and c.get("generator_ceiling_pps"):
            print(f"  {k} = {_fmt(r[k])}: {ceiling_text(c)}")
        if (result.get("ratio_notes") or {}).get(k):
            print(f"  {k}: {result['ratio_notes'][k]}")


def ceiling_text(c: dict) -> str:
    """'generator clone: ceiling 5200 kpps, faster side 4300 kpps (1.21x)' for one ratio's ceiling entry."""
    top = c.get("fastest_side_pps")
    return (f"generator {c['generator']}: ceiling {c['generator_ceiling_pps'] / 1e3:.0f} kpps"
            + (f", faster side {top / 1e3:.0f} kpps ({_fmt(c['ceiling_over_fastest'])}x)" if top else ""))


def _gen_name(loc: dict) -> str:
    """The generator that ran: `generator` is a dict since 2026-12 (name, ceiling...), a name before."""
    gen = loc.get("generator") or "trafgen"
    return gen["name"] if isinstance(gen, dict) else gen


def _range(sp: dict | None, scale: float = 1e3, spec: str = ".0f") -> str:
    """ "(min-max)" of a spread in thousands; "" with a single run or none."""
    if not sp or sp.get("min") is None or len(sp.get("runs", [])) < 2:
        return ""
    return f"({sp['min'] / scale:{spec}}-{sp['max'] / scale:{spec}})"


def print_sweep(loc: dict) -> None:
    """Forwarding rate at maximum load per frame size and path: median kpps (range), and Gbit/s."""
    sweep = loc["sweep"]
    paths = list(next(iter(sweep.values()))["paths"])
    print("forwarding rate at maximum load by frame size, kpps median (min-max) / Gbit/s (frames without FCS):")
    print(f"{'size':<7}" + "".join(f"{p:>24}" for p in paths))
    for size, sz in sweep.items():
        cells = []
        for p in paths:
            m, g = sz["paths"][p]["max_forwarding_rate_pps"], sz["paths"][p]["max_forwarding_rate_gbps"]
            cells.append(f"{_fmt(m['median'] / 1e3 if m['median'] is not None else None, '.0f')}"
                         f"{_range(m)} / {_fmt(g['median'])}")
        print(f"{size:<7}" + "".join(f"{c:>24}" for c in cells))
    inter = any("interleaved" in sz for sz in sweep.values())
    print(f"{'size':<7}{'End.S/kernel End.DX6':>24}{'End.S/redirect stub':>24}{'/stub swapping MACs':>24}"
          + (f"{'interleaved: /End.DX6':>24}{'/redirect stub':>24}{'/stub swapping MACs':>24}" if inter else "")
          + f"{'generator ceiling kpps':>26}")
    for size, sz in sweep.items():
        g = sz.get("generator_ceiling_pps") or {}
        ceiling = (_fmt(g["median"] / 1e3, ".0f") + _range(g)) if g.get("median") is not None else "-"
        cells = []
        for ratios in [sz["ratios"]] + ([sz.get("interleaved", {}).get("ratios", {})] if inter else []):
            for k in ("end_s_vs_kernel_dx6", "end_s_vs_redirect_stub", "end_s_vs_redirect_stub_mac"):
                v = ratios.get(k) or {"median": None, "min": None, "runs": []}
                cells.append(f"{_fmt(v['median'])}" + (f" ({_fmt(v['min'])}-{_fmt(v['max'])})"
                                                       if v["min"] is not None and len(v["runs"]) > 1 else ""))
        print(f"{size:<7}" + "".join(f"{c:>24}" for c in cells) + f"{ceiling:>26}")


def plot(result: dict, png: str) -> str | None:
    """Loss vs offered rate per path, NDR/PDR per path, and (with a size sweep) throughput vs frame size in
    kpps and Gbit/s, min-max as error bars. Returns the file written (None: nothing to plot)."""
    if "local" not in result:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    loc = result["local"]
    paths = loc["paths"]
    sweep = loc.get("sweep") or {}
    rows = 2 if sweep else 1
    fig, axes = plt.subplots(rows, 2, figsize=(13, 4.8 * rows), squeeze=False)
    (a, b) = axes[0]
    for name, p in paths.items():
        color = None
        for run in sorted({t.get("run", 0) for t in p["trials"]}):  # one line per repetition, one colour per path
            pts = sorted((t["rate_pps"] / 1e3, t["loss_ratio"] * 100) for t in p["trials"] if t.get("run", 0) == run)
            line, = a.plot([x for x, _ in pts], [y for _, y in pts], "o-", color=color, markersize=4,
                           linewidth=1, label=None if color else name)
            color = line.get_color()
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

    def yerr(key):  # min-max around the median, from each path's spread (none with one run)
        lo, hi = [], []
        for n in names:
            sp = paths[n].get("spread", {}).get(key) or {}
            med = sp.get("median")
            lo.append((med - sp["min"]) / 1e3 if med is not None and sp.get("min") is not None else 0)
            hi.append((sp["max"] - med) / 1e3 if med is not None and sp.get("max") is not None else 0)
        return [lo, hi]

    b.bar([i - w for i in x], [paths[n].get("max_forwarding_rate", {}).get("forwarded_pps", 0) / 1e3
                               for n in names], w, yerr=yerr("max_forwarding_rate_pps"), capsize=2,
          label="max forwarding rate")
    b.bar(list(x), [paths[n]["ndr_pps"] / 1e3 for n in names], w, yerr=yerr("ndr_pps"), capsize=2, label="NDR")
    b.bar([i + w for i in x], [paths[n]["pdr_pps"] / 1e3 for n in names], w, yerr=yerr("pdr_pps"), capsize=2,
          label="PDR")
    b.set_xticks(list(x))
    b.set_xticklabels(names, rotation=20, fontsize=8)
    b.set_ylabel("forwarded kpps (one DUT core)")
    b.set_title(f"{loc['frame_bytes']}-byte frames, {_gen_name(loc)} generator, "
                f"median of {loc.get('repeat', 1)}")
    b.legend()
    if sweep:
        c, d = axes[1]
        for name in names:
            pts = []
            for size, sz in sweep.items():
                fb = sz["frame_bytes"][name]
                m, g = sz["paths"][name]["max_forwarding_rate_pps"], sz["paths"][name]["max_forwarding_rate_gbps"]
                if m["median"] is not None:
                    pts.append((fb, size, m, g))
            pts.sort(key=lambda t: t[0])
            xs = [t[0] for t in pts]
            for ax, k, scale in ((c, 2, 1e3), (d, 3, 1)):
                ys = [t[k]["median"] / scale for t in pts]
                err = [[(t[k]["median"] - t[k]["min"]) / scale for t in pts],
                       [(t[k]["max"] - t[k]["median"]) / scale for t in pts]]
                ax.errorbar(xs, ys, yerr=err, fmt="o-", capsize=3, markersize=4, label=name)
        for size, sz in sweep.items():  # name the sizes on the x axis (IMIX sits at its mean frame)
            c.annotate(size, (sz["frame_bytes"][names[0]], 0), textcoords="offset points", xytext=(0, 4),
                       fontsize=7, color="grey", ha="center")
        c.set_ylabel("forwarded kpps at maximum load (one DUT core)")
        c.set_title("throughput vs frame size (median, min-max)")
        d.set_ylabel("forwarded Gbit/s (frames without FCS)")
        d.set_title("throughput vs frame size, bits")
        for ax in (c, d):
            ax.set_xlabel("frame bytes (IMIX: mean)")
            ax.set_ylim(bottom=0)
            ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)
    return png
