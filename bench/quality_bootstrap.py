"""How much each done-when check's margin could move with another draw of the evaluated trials or neurons.

A paired bootstrap. Each of ``n_boot`` resamples draws, per held-out session, its TEST trials with
replacement. Both models of a comparison are scored on the same draw (paired). The difference of their
metrics is averaged over sessions, as the checks compare session means. The region checks resample the
neurons of the pooled cross-validated predictions instead. Each check gets the observed difference, its
95 % percentile interval and the share of resamples in which the model beats its baseline.

Every metric is recomputed from per-trial sums weighted by how often each trial was drawn, so a resample
costs one matrix product, not a pass over the (K, T, N) predictions:

- bits/spike: per trial and neuron, the Poisson log-likelihood (without log k!) and the spike count; the
  null model is each neuron's mean count in the resample, as :func:`training.metrics.bits_per_spike`;
- R²: per trial, the sample count and the sums of ``y``, ``y²`` and squared residuals (pooled over bins);
- balanced accuracy: per trial, the true class and whether it was predicted.

On one training run it measures the sampling of the evaluated trials only; the spread between training
seeds is another source of error. With ``--seeds N`` every seed's predictions are scored on the same draws
and the difference is averaged over seeds, so the interval is that of the seed-mean difference (how far the
seeds themselves disagree is reported beside it, :mod:`bench.quality_seeds`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Final

import numpy as np

from neds_rt.errors import DataError, invalid
from training.metrics import MIN_RATE

if TYPE_CHECKING:
    from training.arrays import TrialArrays

N_BOOT: Final = 2000
LEVEL: Final = 0.95


@dataclass
class HeldOut:
    """One held-out session's TEST predictions, per model (what the plots and the intervals need)."""

    arr: TrialArrays
    test: np.ndarray  # (K_test,) rows
    wheel: dict[str, np.ndarray] = field(default_factory=dict)  # model -> (K_test, T)
    whisker: dict[str, np.ndarray] = field(default_factory=dict)
    rates: dict[str, np.ndarray] = field(default_factory=dict)  # model -> (K_test, T, N) expected counts
    choice: dict[str, np.ndarray] = field(default_factory=dict)  # model -> (K_test,) predicted class
    block: dict[str, np.ndarray] = field(default_factory=dict)


# ---- per-trial sums and the metrics they give under resampling weights w (B, K) -------------------------
def encoding_sums(rates: np.ndarray, counts: np.ndarray) -> tuple[np.ndarray, np.ndarray, int]:
    """(K, N) log-likelihood and (K, N) spike count of each trial and neuron, and the bins per trial."""
    y = np.asarray(counts, dtype=np.float64)  # (K, T, N)
    r = np.maximum(np.asarray(rates, dtype=np.float64), MIN_RATE)
    ll = np.sum(y * np.log(r) - r, axis=1)  # (K, N)
    return ll, y.sum(axis=1), y.shape[1]


def bits_per_spike_w(sums: tuple[np.ndarray, np.ndarray, int], w: np.ndarray) -> np.ndarray:
    """(B,) bits/spike (mean over neurons with spikes) of each resample."""
    ll_k, y_k, n_bins = sums
    ll, y = w @ ll_k, w @ y_k  # (B, N)
    samples = w.sum(axis=1, keepdims=True) * n_bins  # (B, 1) bins in the resample
    null = np.maximum(y / samples, MIN_RATE)  # (B, N) each neuron's mean count per bin
    ll_null = y * np.log(null) - samples * null
    with np.errstate(divide="ignore", invalid="ignore"):
        bps = np.where(y > 0, (ll - ll_null) / (y * math.log(2.0)), np.nan)
        kept = np.isfinite(bps)  # neurons with spikes in the resample (and finite predictions)
        return np.where(kept, bps, 0.0).sum(axis=1) / kept.sum(axis=1)  # NaN when none is


def regression_sums(pred: np.ndarray, true: np.ndarray) -> np.ndarray:
    """(K, 4) per trial: samples, sum of y, sum of y², sum of squared residuals."""
    p, t = np.asarray(pred, dtype=np.float64), np.asarray(true, dtype=np.float64)
    p, t = p.reshape(p.shape[0], -1), t.reshape(t.shape[0], -1)
    return np.stack([np.full(t.shape[0], t.shape[1], dtype=np.float64), t.sum(1), (t * t).sum(1),
                     ((t - p) ** 2).sum(1)], axis=1)


def r2_w(sums: np.ndarray, w: np.ndarray) -> np.ndarray:
    """(B,) single-trial R² of each resample."""
    n, sy, syy, res = (w @ sums).T  # (B,) each
    with np.errstate(divide="ignore", invalid="ignore"):
        return 1.0 - res / (syy - sy * sy / n)  # not finite for a resample of one flat trace


def balanced_accuracy_w(guess: np.ndarray, true: np.ndarray, w: np.ndarray) -> np.ndarray:
    """(B,) mean per-class recall over the classes drawn in each resample."""
    t = np.asarray(true).astype(np.int64)
    hit = np.asarray(guess).astype(np.int64) == t  # (K,)
    recalls = []
    for c in np.unique(t):
        drawn = w @ (t == c).astype(np.float64)  # (B,)
        with np.errstate(divide="ignore", invalid="ignore"):
            recalls.append(np.where(drawn > 0, (w @ (hit & (t == c)).astype(np.float64)) / drawn, np.nan))
    return np.nanmean(np.stack(recalls), axis=0)


# ---- the checks -------------------------------------------------------------------------------------------
def _metric_w(held: HeldOut, model: str, metric: str, w: np.ndarray) -> np.ndarray | None:
    """(B,) ``metric`` of ``model`` on the resamples of ``held``'s TEST trials; None without predictions."""
    arr, rows = held.arr, held.test
    if metric == "bits_per_spike":
        rates = held.rates.get(model)
        return None if rates is None else bits_per_spike_w(encoding_sums(rates, arr.spikes[rows]), w)
    if metric in ("wheel_r2", "whisker_r2"):
        target = metric.removesuffix("_r2")
        pred = getattr(held, target).get(model)
        return None if pred is None else r2_w(regression_sums(pred, getattr(arr, target)[rows]), w)
    target = metric.removesuffix("_balanced_accuracy")
    guess = getattr(held, target).get(model)
    return None if guess is None else balanced_accuracy_w(guess, np.asarray(getattr(arr, target))[rows], w)


def _summary(observed: float, diffs: np.ndarray, unit: str) -> dict[str, Any] | None:
    """The interval; None when the observed difference is not finite. A resample whose metric is undefined
    (e.g. R² of draws that all repeat one flat trace) is left out, and ``n_boot`` counts the rest."""
    diffs = diffs[np.isfinite(diffs)]
    if not math.isfinite(observed) or diffs.size == 0:
        return None
    tail = (1.0 - LEVEL) / 2.0
    lo, hi = np.quantile(diffs, [tail, 1.0 - tail])
    return {"difference": float(observed), "interval": [float(lo), float(hi)], "level": LEVEL,
            "share_better": float(np.mean(diffs > 0)), "resampled": unit, "n_boot": int(diffs.size)}


def _seed_mean_difference(runs: Sequence[Mapping[str, HeldOut]], eid: str, model: str, base: str, metric: str,
                          w: np.ndarray) -> np.ndarray | None:
    """(R,) ``model`` minus ``base`` on the resamples ``w`` (R, K_test) of session ``eid``, averaged over the
    training seeds' predictions ``runs``; None when a seed lacks either model's predictions."""
    diffs = []
    for run in runs:
        a, b = _metric_w(run[eid], model, metric, w), _metric_w(run[eid], base, metric, w)
        if a is None or b is None:
            return None
        diffs.append(a - b)
    return np.mean(diffs, axis=0)


def _same_trials(runs: Sequence[Mapping[str, HeldOut]]) -> None:
    first = runs[0]
    for i, run in enumerate(runs[1:], start=1):
        if set(run) != set(first) or any(not np.array_equal(run[e].test, first[e].test) for e in first):
            raise invalid(f"held-out predictions of seed run {i}", "must cover the sessions and TEST trials "
                          "of the first run", sorted(run), "score every seed on one data set", kind=DataError)


def trial_intervals(helds: Mapping[str, HeldOut] | Sequence[Mapping[str, HeldOut]],
                    comparisons: Sequence[tuple[str, str, str, str]], n_boot: int = N_BOOT, seed: int = 0
                    ) -> dict[str, dict[str, Any]]:
    """``{check name: interval}`` for each ``(name, model, baseline, metric)`` that both models scored on
    every session.

    ``helds`` is ``{eid: HeldOut}``, or a sequence of them, one per training seed, over the same sessions and
    TEST trials (``--seeds``): a resample then draws each session's trials once, every seed's predictions are
    scored on that draw, and the difference is averaged over seeds as well as sessions."""
    runs = [helds] if isinstance(helds, Mapping) else list(helds)
    if not runs:
        raise invalid("held-out predictions", "must hold at least one run", 0, kind=DataError)
    _same_trials(runs)
    rng = np.random.default_rng(seed)
    weights = {e: rng.multinomial(h.test.size, np.full(h.test.size, 1.0 / h.test.size), size=n_boot)
               .astype(np.float64) for e, h in runs[0].items()}  # (B, K_test) draws of each trial
    out: dict[str, dict[str, Any]] = {}
    for name, model, base, metric in comparisons:
        per_session: list[np.ndarray] = []
        for eid, w in weights.items():
            # row 0: the observed TEST trials, each once; then the resamples
            rows = np.vstack([np.ones((1, w.shape[1])), w])  # (1 + B, K_test)
            d = _seed_mean_difference(runs, eid, model, base, metric, rows)
            if d is None:
                break
            per_session.append(d)
        else:
            diff = np.mean(per_session, axis=0)  # (1 + B,) averaged over sessions
            summary = _summary(float(diff[0]), diff[1:], "TEST trials")
            if summary is not None:
                out[name] = summary
    return out


def region_intervals(neds_hit: np.ndarray, psth_hit: np.ndarray, chance: float, names: tuple[str, str],
                     n_boot: int = N_BOOT, seed: int = 0) -> dict[str, dict[str, Any]]:
    """Intervals of the two region checks, resampling neurons: NEDS accuracy minus ``chance`` (the majority
    share, held fixed) and minus the PSTH baseline's accuracy. ``*_hit`` (N,) bool: the cross-validated
    prediction of that neuron was right (same neurons, same order); or (S, N), one row per training seed,
    whose accuracies are averaged over seeds on each draw of neurons."""
    neds, psth = np.atleast_2d(neds_hit).astype(np.float64), np.atleast_2d(psth_hit).astype(np.float64)
    if neds.shape != psth.shape:
        raise invalid("region hits of the PSTH baseline", f"must have the NEDS hits' shape {neds.shape}",
                      psth.shape, kind=DataError)
    n = neds.shape[1]
    w = np.random.default_rng(seed).multinomial(n, np.full(n, 1.0 / n), size=n_boot) / n  # (B, N)
    a, b = (w @ neds.T).mean(axis=1), (w @ psth.T).mean(axis=1)  # (B,) accuracies, averaged over seeds
    out = {names[0]: _summary(float(neds.mean() - chance), a - chance, "neurons"),
           names[1]: _summary(float(neds.mean() - psth.mean()), a - b, "neurons")}
    return {k: v for k, v in out.items() if v is not None}
