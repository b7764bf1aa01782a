"""NDR / PDR search in the RFC 2544 §26.1 / MLRsearch (draft-ietf-bmwg-mlrsearch) manner, as pure logic.

The caller supplies `trial(rate_pps, duration_s) -> (sent, received)`: offer `rate_pps` for `duration_s`
and say how many packets went in and came out. Two load criteria are searched at once, sharing every trial:

- NDR, the non-drop rate: the highest intended load with zero loss;
- PDR, the partial-drop rate: the highest intended load whose loss ratio is <= `pdr_loss` (0.5 % default).

Like MLRsearch, a trial informs both criteria (a zero-loss trial is a lower bound for NDR *and* PDR, a trial
above 0.5 % loss is an upper bound for both), the first trial runs at the maximum load and the next one at
the forwarding rate it measured (received / duration), and then each criterion's interval [lower bound,
upper bound] is halved until it is narrower than `resolution` (relative) or the trial budget is spent.
Trials are bounded in number (`max_trials`) and length (`duration_s`), so a search takes at most
max_trials x duration_s of traffic.

The result per criterion is the highest load that met it (its lower bound) with the trial that proved it;
0 when even `min_rate` failed.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Callable

Trial = Callable[[float, float], "tuple[int, int]"]

DEFAULT_PDR_LOSS = 0.005


@dataclass
class TrialResult:
    rate_pps: float      # intended load
    duration_s: float
    sent: int
    received: int

    @property
    def loss_ratio(self) -> float:
        if self.sent <= 0:
            return 1.0  # nothing offered: treat as a failed trial, never as a pass
        return max(0, self.sent - self.received) / self.sent

    @property
    def offered_pps(self) -> float:
        return self.sent / self.duration_s if self.duration_s > 0 else 0.0

    @property
    def forwarded_pps(self) -> float:
        return self.received / self.duration_s if self.duration_s > 0 else 0.0

    def to_dict(self) -> dict:
        return {**asdict(self), "loss_ratio": round(self.loss_ratio, 6),
                "offered_pps": round(self.offered_pps, 1), "forwarded_pps": round(self.forwarded_pps, 1)}


@dataclass
class Bound:
    """One criterion's state: the highest load known to pass, the lowest known to fail."""

    loss_max: float
    lower: TrialResult | None = None
    upper: TrialResult | None = None

    def passes(self, t: TrialResult) -> bool:
        return t.sent > 0 and t.loss_ratio <= self.loss_max

    def add(self, t: TrialResult) -> None:
        if self.passes(t):
            if self.lower is None or t.rate_pps > self.lower.rate_pps:
                self.lower = t
        elif self.upper is None or t.rate_pps < self.upper.rate_pps:
            self.upper = t
        # A pass above a known fail (noise): the fail no longer bounds the search.
        if self.lower and self.upper and self.lower.rate_pps >= self.upper.rate_pps:
            self.upper = None

    def width(self, min_rate: float, max_rate: float) -> float:
        """Relative width of the interval still to search; 0 when the criterion is settled."""
        lo = self.lower.rate_pps if self.lower else min_rate
        hi = self.upper.rate_pps if self.upper else max_rate
        if self.lower and self.lower.rate_pps >= max_rate:
            return 0.0  # passed at the maximum load: nothing above to find
        if self.upper and self.upper.rate_pps <= min_rate:
            return 0.0  # failed at the minimum load: nothing below to find
        return (hi - lo) / hi if hi > 0 else 0.0

    def next_rate(self, min_rate: float, max_rate: float) -> float:
        lo = self.lower.rate_pps if self.lower else None
        hi = self.upper.rate_pps if self.upper else max_rate
        if lo is None:
            # No pass yet: step down geometrically, not below min_rate.
            return max(min_rate, hi / 2)
        return (lo + hi) / 2


@dataclass
class SearchResult:
    ndr_pps: float
    pdr_pps: float
    ndr_trial: TrialResult | None
    pdr_trial: TrialResult | None
    trials: list[TrialResult] = field(default_factory=list)
    settled: bool = True  # False when the trial budget ran out before both reached `resolution`

    def to_dict(self) -> dict:
        return {
            "ndr_pps": round(self.ndr_pps, 1),
            "pdr_pps": round(self.pdr_pps, 1),
            # What the device forwarded in the trial that proved each rate (the throughput to report).
            "ndr_forwarded_pps": round(self.ndr_trial.forwarded_pps, 1) if self.ndr_trial else 0.0,
            "pdr_forwarded_pps": round(self.pdr_trial.forwarded_pps, 1) if self.pdr_trial else 0.0,
            "settled": self.settled,
            "trials": [t.to_dict() for t in self.trials],
        }


def search(trial: Trial, max_rate: float, min_rate: float | None = None, duration_s: float = 1.0,
           max_trials: int = 12, resolution: float = 0.05, pdr_loss: float = DEFAULT_PDR_LOSS,
           on_trial: Callable[[TrialResult], None] | None = None) -> SearchResult:
    """Search NDR and PDR between `min_rate` (default max_rate/100) and `max_rate` packets/s."""
    if max_rate <= 0 or duration_s <= 0 or max_trials < 1:
        raise ValueError("max_rate, duration_s and max_trials must be positive")
    if not 0 <= pdr_loss < 1:
        raise ValueError("pdr_loss must be in [0, 1)")
    min_rate = max_rate / 100 if min_rate is None else min_rate
    if not 0 < min_rate <= max_rate:
        raise ValueError("min_rate must be in (0, max_rate]")
    ndr, pdr = Bound(0.0), Bound(pdr_loss)
    trials: list[TrialResult] = []
    tried: set[float] = set()

    def run(rate: float) -> TrialResult:
        rate = min(max_rate, max(min_rate, rate))
        sent, received = trial(rate, duration_s)
        t = TrialResult(rate, duration_s, int(sent), int(received))
        trials.append(t)
        tried.add(round(rate, 3))
        ndr.add(t)
        pdr.add(t)
        if on_trial:
            on_trial(t)
        return t

    first = run(max_rate)
    # MLRsearch's initial phase: the forwarding rate measured at the maximum load is a good next guess.
    if len(trials) < max_trials and not pdr.passes(first) and first.forwarded_pps > 0:
        run(max(min_rate, min(first.forwarded_pps, max_rate * 0.999)))

    while len(trials) < max_trials:
        # Narrow whichever criterion is furthest from settled (NDR first on ties: it is the stricter).
        widths = [(b.width(min_rate, max_rate), i, b) for i, b in enumerate((ndr, pdr))]
        width, _, bound = max(widths, key=lambda w: (w[0], -w[1]))
        if width <= resolution:
            break
        rate = bound.next_rate(min_rate, max_rate)
        if round(rate, 3) in tried:  # nothing new to learn (a bound at min_rate): settled as far as we can go
            break
        run(rate)

    settled = all(b.width(min_rate, max_rate) <= resolution for b in (ndr, pdr))
    return SearchResult(
        ndr_pps=ndr.lower.rate_pps if ndr.lower else 0.0,
        pdr_pps=pdr.lower.rate_pps if pdr.lower else 0.0,
        ndr_trial=ndr.lower, pdr_trial=pdr.lower, trials=trials, settled=settled)
