"""Draw docs/figures/packet_path.png: where a VM's packets go in each phase of one srmig migration.

    .venv/bin/python docs/figures/packet_path.py [OUT.png]

One row per phase (steady, provision, stop-and-copy, resumed, cut-over). Each row shows the ingress, the
source host S, the destination host D, the VM on each host, the segment list the ingress uses, the state
of the VM's entry on each host and the path the packets take. The phases are those of docs/design.md.
"""

from __future__ import annotations

import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.patches import FancyArrowPatch, FancyBboxPatch  # noqa: E402

OUT = Path(__file__).with_suffix(".png")

PATH = "#1f5fbf"     # packets delivered or forwarded
HELD = "#d9771e"     # packets drained, held or parked
IDLE = "#9a9a9a"     # nothing passes
BOX = "#f3f6fb"
OFF = "#f4f4f4"

# Positions (data coordinates of one row: x 0..13, y 0..3.4).
INGRESS = (3.85, 2.4)
S = (6.65, 2.4)
D = (11.15, 2.4)
VM_S = (6.65, 0.6)
VM_D = (11.15, 0.6)
INGRESS_W = 1.6
HOST_W, HOST_H = 2.7, 1.0
VM_W, VM_H = 2.5, 0.75

# One row per phase: the left column, the boxes' texts and which are active, then the arrows.
# An arrow: (from, to, colour, label, style) with style "-" solid or "--" dashed; "arc" bends it over S.
PHASES = [
    {
        "name": "steady",
        "trigger": "no migration",
        "list": "[S::d6]",
        "S": ("End.DX6-map", "RUNNING", True),
        "D": ("", "no entry", False),
        "vm_s": ("VM runs on S", True),
        "vm_d": ("", False),
        "arrows": [(INGRESS, S, PATH, "", "-"), (S, VM_S, PATH, "decapsulate, deliver", "-")],
    },
    {
        "name": "provision",
        "trigger": "D: hook migrate begin",
        "list": "[S::5, D::b]\nacked before\nstop-and-copy",
        "S": ("End.S", "RUNNING", True),
        "D": ("End.SBUF", "INCOMING", True),
        "vm_s": ("VM runs on S", True),
        "vm_d": ("incoming QEMU", False),
        "arrows": [(INGRESS, S, PATH, "", "-"), (S, VM_S, PATH, "deliver locally", "-")],
    },
    {
        "name": "stop-and-copy",
        "trigger": "S: SUSPENDED",
        "list": "[S::5, D::b]",
        "S": ("End.S", "HOLD \u2192 AWAY", True),
        "D": ("End.SBUF", "INCOMING", True),
        "vm_s": ("paused: tap queue\ndrained by the agent", True),
        "vm_d": ("incoming: does not\nread its tap", True),
        "arrows": [(INGRESS, S, PATH, "", "-"),
                   (VM_S, S, HELD, "drain", "-"),
                   (S, D, HELD, "tap queue, hold ring,\nthen advance", "-"),
                   (D, VM_D, HELD, "held in the\ntap queue", "-")],
    },
    {
        "name": "resumed",
        "trigger": "D: RESUMED",
        "list": "[S::5, D::b]",
        "S": ("End.S", "AWAY", True),
        "D": ("End.SBUF", "RUNNING", True),
        "vm_s": ("stopping", False),
        "vm_d": ("VM runs on D", True),
        "arrows": [(INGRESS, S, PATH, "", "-"),
                   (S, D, PATH, "advance (SL\u22121)", "-"),
                   (D, VM_D, PATH, "held ones first,\nthen deliver", "-")],
    },
    {
        "name": "cut-over",
        "trigger": "S: STOPPED",
        "list": "[D::d6]",
        "S": ("End.S", "AWAY (grace period)", True),
        "D": ("End.DX6-map", "RUNNING", True),
        "vm_s": ("", False),
        "vm_d": ("VM runs on D", True),
        "arrows": [(INGRESS, D, PATH, "", "arc"),
                   (INGRESS, S, IDLE, "", "--"),
                   (S, D, IDLE, "stragglers on the\nold list: advance", "--"),
                   (D, VM_D, PATH, "decapsulate, deliver", "-")],
    },
]


def box(ax, centre, w, h, title, lines, active, fontsize=11):
    x, y = centre
    ax.add_patch(FancyBboxPatch((x - w / 2, y - h / 2), w, h, boxstyle="round,pad=0.02,rounding_size=0.12",
                                facecolor=BOX if active else OFF, edgecolor="#333333" if active else "#bbbbbb",
                                linewidth=1.4 if active else 1.0, linestyle="-" if active else "--"))
    colour = "#111111" if active else "#999999"
    if lines:
        ax.text(x, y + h * 0.2, title, ha="center", va="center", fontsize=fontsize, fontweight="bold",
                color=colour)
        ax.text(x, y - h * 0.2, lines, ha="center", va="center", fontsize=fontsize - 1, color=colour)
    else:
        ax.text(x, y, title, ha="center", va="center", fontsize=fontsize, fontweight="bold", color=colour)


def edge(centre, w, h, towards):
    """The point where the line from `centre` to `towards` leaves a w x h box around `centre`."""
    (x, y), (tx, ty) = centre, towards
    dx, dy = tx - x, ty - y
    sx = (w / 2) / abs(dx) if dx else float("inf")
    sy = (h / 2) / abs(dy) if dy else float("inf")
    s = min(sx, sy)
    return x + dx * s, y + dy * s


def size_of(p):
    return (VM_W, VM_H) if p in (VM_S, VM_D) else ((INGRESS_W, HOST_H) if p == INGRESS else (HOST_W, HOST_H))


def arrow(ax, a, b, colour, label, style):
    if style == "arc":
        start = (a[0], a[1] + HOST_H / 2)
        end = (b[0] - 0.3, b[1] + HOST_H / 2)
        conn = "arc3,rad=-0.09"
    else:
        start = edge(a, *size_of(a), b)
        end = edge(b, *size_of(b), a)
        conn = "arc3,rad=0"
    ax.add_patch(FancyArrowPatch(start, end, connectionstyle=conn, arrowstyle="-|>", mutation_scale=18,
                                 linewidth=2.6 if colour != IDLE else 1.8, color=colour,
                                 linestyle="--" if style == "--" else "-", shrinkA=2, shrinkB=2))
    if not label:
        return
    mx, my = (start[0] + end[0]) / 2, (start[1] + end[1]) / 2
    if abs(start[0] - end[0]) < 0.01:          # vertical: label to the right
        ax.text(mx + 0.12, my, label, ha="left", va="center", fontsize=9.5, color=colour)
    else:                                       # horizontal: label above or below
        ax.text(mx, my + 0.3, label, ha="center", va="center", fontsize=9.5,
                color=colour)


def draw(out: Path) -> None:
    fig, axes = plt.subplots(len(PHASES), 1, figsize=(12.5, 13.5))
    for ax, ph in zip(axes, PHASES):
        ax.set_xlim(0, 13)
        ax.set_ylim(-0.05, 3.55)
        ax.axis("off")
        ax.add_patch(FancyBboxPatch((0.05, 0.0), 12.9, 3.45, boxstyle="round,pad=0,rounding_size=0.1",
                                    facecolor="none", edgecolor="#dddddd"))
        ax.text(0.25, 2.95, ph["name"], fontsize=15, fontweight="bold", va="center")
        ax.text(0.25, 2.45, ph["trigger"], fontsize=10, va="center", color="#444444")
        ax.text(0.25, 1.95, "ingress list:", fontsize=10, va="center", color="#444444")
        ax.text(0.25, 1.65, ph["list"], fontsize=10.5, va="top", family="monospace")
        box(ax, INGRESS, INGRESS_W, HOST_H, "ingress", "H.Encaps", True)
        for name, centre in (("S", S), ("D", D)):
            beh, state, active = ph[name]
            box(ax, centre, HOST_W, HOST_H, f"host {name}" + (f": {beh}" if beh else ""), state, active)
        for key, centre in (("vm_s", VM_S), ("vm_d", VM_D)):
            text, active = ph[key]
            if text:
                box(ax, centre, VM_W, VM_H, text, "", active, fontsize=10)
        for a, b, colour, label, style in ph["arrows"]:
            arrow(ax, a, b, colour, label, style)
    fig.suptitle("srmig: a VM's packets through one live migration from S to D", fontsize=16,
                 fontweight="bold", y=0.995)
    fig.text(0.5, 0.004, "blue: delivered or forwarded   orange: drained and held until the VM resumes on D"
             "   grey dashed: stragglers still using the old list", ha="center", fontsize=10.5)
    fig.tight_layout(rect=(0, 0.015, 1, 0.985))
    fig.savefig(out, dpi=100)


if __name__ == "__main__":
    draw(Path(sys.argv[1]) if len(sys.argv) > 1 else OUT)
