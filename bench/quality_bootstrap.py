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

It measures the sampling of the evaluated trials only. The spread between training seeds is another
source of error that it does not see.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Final

import numpy as np

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


def trial_intervals(helds: Mapping[str, HeldOut], comparisons: Sequence[tuple[str, str, str, str]],
                    n_boot: int = N_BOOT, seed: int = 0) -> dict[str, dict[str, Any]]:
    """``{check name: interval}`` for each ``(name, model, baseline, metric)`` that both models scored on
    every session."""
    rng = np.random.default_rng(seed)
    weights = {e: rng.multinomial(h.test.size, np.full(h.test.size, 1.0 / h.test.size), size=n_boot)
               .astype(np.float64) for e, h in helds.items()}  # (B, K_test) draws of each trial
    out: dict[str, dict[str, Any]] = {}
    for name, model, base, metric in comparisons:
        diffs, observed = [], []
        for eid, held in helds.items():
            # row 0: the observed TEST trials, each once; then the resamples
            w = np.vstack([np.ones((1, held.test.size)), weights[eid]])  # (1 + B, K_test)
            a, b = _metric_w(held, model, metric, w), _metric_w(held, base, metric, w)
            if a is None or b is None:
                break
            observed.append(float(a[0] - b[0]))
            diffs.append(a[1:] - b[1:])
        else:
            summary = _summary(float(np.mean(observed)), np.mean(diffs, axis=0), "TEST trials")
            if summary is not None:
                out[name] = summary
    return out


def region_intervals(neds_hit: np.ndarray, psth_hit: np.ndarray, chance: float, names: tuple[str, str],
                     n_boot: int = N_BOOT, seed: int = 0) -> dict[str, dict[str, Any]]:
    """Intervals of the two region checks, resampling neurons: NEDS accuracy minus ``chance`` (the majority
    share, held fixed) and minus the PSTH baseline's accuracy. ``*_hit`` (N,) bool: the cross-validated
    prediction of that neuron was right (same neurons, same order)."""
    n = neds_hit.size
    w = np.random.default_rng(seed).multinomial(n, np.full(n, 1.0 / n), size=n_boot) / n  # (B, N)
    a, b = w @ neds_hit.astype(np.float64), w @ psth_hit.astype(np.float64)  # (B,) accuracies
    out = {names[0]: _summary(float(neds_hit.mean() - chance), a - chance, "neurons"),
           names[1]: _summary(float(neds_hit.mean() - psth_hit.mean()), a - b, "neurons")}
    return {k: v for k, v in out.items() if v is not None}
