"""NDR/PDR search logic (bench/search.py) against fake devices: a table of (device, expected rates)."""

from __future__ import annotations

import pytest

from bench.search import Bound, TrialResult, search


def device(capacity_pps: float, pdr_slack: float = 0.0, floor_loss: float = 0.0):
    """A fake DUT: forwards up to `capacity_pps` without loss; above it loses the excess, except that the
    first `pdr_slack` fraction over capacity costs only a small (0.2 %) loss. `floor_loss` is lost always."""
    calls = []

    def trial(rate, duration):
        calls.append((rate, duration))
        sent = int(rate * duration)
        if rate <= capacity_pps:
            lost = 0
        elif rate <= capacity_pps * (1 + pdr_slack):
            lost = int(sent * 0.002) or 1
        else:
            lost = sent - int(capacity_pps * duration)
        lost = max(lost, int(sent * floor_loss))
        return sent, sent - lost

    trial.calls = calls
    return trial


CASES = [
    # id, device, max_rate, expected NDR (approx), expected PDR (approx)
    ("no-loss-at-max", device(2e6), 1e6, 1e6, 1e6),
    ("capacity-mid", device(300e3), 1e6, 300e3, 300e3),
    ("pdr-above-ndr", device(200e3, pdr_slack=0.25), 1e6, 200e3, 250e3),
    ("always-lossy-below-pdr", device(5e6, floor_loss=0.001), 1e6, 0.0, 1e6),
    ("dead-device", device(0.0), 1e6, 0.0, 0.0),
]


@pytest.mark.parametrize("name,trial,max_rate,ndr,pdr", CASES, ids=[c[0] for c in CASES])
def test_search_finds_rates(name, trial, max_rate, ndr, pdr):
    r = search(trial, max_rate, duration_s=1.0, max_trials=20, resolution=0.02)
    assert r.ndr_pps == pytest.approx(ndr, rel=0.03, abs=1)
    assert r.pdr_pps == pytest.approx(pdr, rel=0.03, abs=1)
    assert r.ndr_pps <= r.pdr_pps
    # Every reported rate was proven by a real trial that met its criterion.
    if r.ndr_trial:
        assert r.ndr_trial.loss_ratio == 0 and r.ndr_trial.rate_pps == r.ndr_pps
    if r.pdr_trial:
        assert r.pdr_trial.loss_ratio <= 0.005 and r.pdr_trial.rate_pps == r.pdr_pps


@pytest.mark.parametrize("max_trials", [1, 3, 7])
def test_trial_budget_is_bounded(max_trials):
    trial = device(123e3)
    r = search(trial, 1e6, duration_s=0.5, max_trials=max_trials, resolution=0.001)
    assert len(trial.calls) == len(r.trials) <= max_trials
    assert all(d == 0.5 for _, d in trial.calls)
    assert all(1e4 <= rate <= 1e6 for rate, _ in trial.calls)  # within [min_rate, max_rate]
    assert not r.settled


def test_first_trial_at_max_then_measured_forwarding_rate():
    trial = device(250e3)
    search(trial, 1e6, max_trials=4)
    rates = [rate for rate, _ in trial.calls]
    assert rates[0] == 1e6
    assert rates[1] == pytest.approx(250e3)  # MLRsearch initial phase: received/duration of the first trial


def test_noise_pass_above_fail_keeps_the_higher_pass():
    # A fail at 600k, then (noise) a pass at 700k: the pass is the lower bound, the fail no longer bounds.
    b = Bound(0.0)
    b.add(TrialResult(600e3, 1.0, 600_000, 590_000))
    b.add(TrialResult(700e3, 1.0, 700_000, 700_000))
    assert b.lower.rate_pps == 700e3 and b.upper is None
    b.add(TrialResult(800e3, 1.0, 800_000, 1))
    b.add(TrialResult(650e3, 1.0, 650_000, 650_000))  # a lower pass does not replace a higher one
    assert b.lower.rate_pps == 700e3 and b.upper.rate_pps == 800e3
    assert b.next_rate(1e3, 1e6) == 750e3


def test_trial_result_ratios():
    t = TrialResult(1000, 2.0, sent=2000, received=1990)
    assert t.loss_ratio == pytest.approx(0.005)
    assert t.offered_pps == 1000 and t.forwarded_pps == 995
    assert TrialResult(1000, 1.0, 0, 0).loss_ratio == 1.0  # nothing sent is never a pass
    assert TrialResult(1000, 1.0, 10, 12).loss_ratio == 0  # duplicates are not negative loss
    d = t.to_dict()
    assert d["loss_ratio"] == 0.005 and d["forwarded_pps"] == 995


@pytest.mark.parametrize("kw", [dict(max_rate=0), dict(max_rate=1e6, duration_s=0), dict(max_rate=1e6, max_trials=0),
                                dict(max_rate=1e6, pdr_loss=1.5), dict(max_rate=1e6, min_rate=2e6)])
def test_rejects_bad_arguments(kw):
    with pytest.raises(ValueError):
        search(device(1e5), **kw)
