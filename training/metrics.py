"""The paper's metrics: bits per spike, single-trial R², accuracy and balanced accuracy (numpy only).

Conventions, as NEDS (and the Neural Latents Benchmark it follows) define them:

- **Bits per spike** of neuron ``n``: ``(LL_model[n] - LL_null[n]) / (S[n] * ln 2)`` where ``LL`` is the
  Poisson log-likelihood summed over every (trial, bin) sample of that neuron, ``S[n]`` its total spike
  count, and the null model predicts the neuron's mean count per bin in every bin. The ``log k!`` terms
  cancel in the difference and are left out. The reported figure is the mean over neurons. A neuron with
  no spike in the evaluated data has an undefined ratio (0 / 0 spikes): it is left out of the mean (NaN
  in the per-neuron array) and logged. Predictions are expected counts per bin (``rate * bin_size``),
  never Hz.
- **R²** is single-trial: ``1 - SS_res / SS_tot`` over all (trial, bin) samples pooled, i.e. sklearn's
  ``r2_score`` on the flattened arrays.
- **Balanced accuracy** is the mean per-class recall over the classes present in ``true``.
"""

from __future__ import annotations

import logging
import math
from typing import Final

import numpy as np

from neds_rt.errors import DataError, invalid

log = logging.getLogger(__name__)

# smallest expected count per bin a null model may predict (a neuron silent in training data)
MIN_RATE: Final = 1e-9


def _as_float(name: str, x: np.ndarray) -> np.ndarray:
    arr = np.asarray(x, dtype=np.float64)
    if not np.all(np.isfinite(arr)):
        raise invalid(name, "must be finite", f"{int(np.sum(~np.isfinite(arr)))} non-finite values",
                      "check the model outputs for NaN/inf", kind=DataError)
    return arr


def _check_counts(counts: np.ndarray) -> np.ndarray:
    y = np.asarray(counts)
    if y.ndim != 3:
        raise invalid("counts", "must be (K, T, N) spike counts", y.shape, "pass trials x bins x neurons",
                      kind=DataError)
    y = _as_float("counts", y)
    if np.any(y < 0):
        raise invalid("counts", "must be >= 0", float(y.min()), "pass spike counts, not z-scores",
                      kind=DataError)
    return y


def _null_log_rates(y: np.ndarray, null_rates: np.ndarray | None) -> np.ndarray:
    """(N,) log of the null model's expected count per bin."""
    n = y.shape[2]
    if null_rates is None:
        mean = y.mean(axis=(0, 1))  # (N,) mean count per bin of the evaluated data
    else:
        mean = _as_float("null_rates", null_rates).reshape(-1)
        if mean.shape != (n,):
            raise invalid("null_rates", f"must be (N,) = ({n},) mean counts per bin", mean.shape,
                          "pass counts[train].mean(axis=(0, 1))", kind=DataError)
        if np.any(mean < 0):
            raise invalid("null_rates", "must be >= 0", float(mean.min()), kind=DataError)
    return np.log(np.maximum(mean, MIN_RATE))


def _poisson_ll(log_rates: np.ndarray, y: np.ndarray) -> np.ndarray:
    """(N,) Poisson log-likelihood per neuron summed over trials and bins, without the log k! term."""
    return np.sum(y * log_rates - np.exp(log_rates), axis=(0, 1))


def bits_per_spike_per_neuron_from_log(
    log_rates: np.ndarray, counts: np.ndarray, *, null_rates: np.ndarray | None = None
) -> np.ndarray:
    """(N,) bits per spike of each neuron; NaN for a neuron with no spike in ``counts``.

    ``log_rates`` (K, T, N): natural log of the predicted expected count per bin. ``null_rates`` (N,): the
    null model's mean count per bin (from the training trials); by default the mean of ``counts`` itself.
    """
    y = _check_counts(counts)
    lr = _as_float("log_rates", log_rates)
    if lr.shape != y.shape:
        raise invalid("log_rates", f"must have the shape of counts {y.shape}", lr.shape, kind=DataError)
    null_lr = _null_log_rates(y, null_rates)
    ll_model = _poisson_ll(lr, y)  # (N,)
    ll_null = np.sum(y * null_lr - np.exp(null_lr), axis=(0, 1))  # (N,) same bins, constant rate
    spikes = y.sum(axis=(0, 1))  # (N,)
    out = np.full(y.shape[2], np.nan)
    has = spikes > 0
    out[has] = (ll_model[has] - ll_null[has]) / (spikes[has] * math.log(2.0))
    if not np.all(has):
        log.debug("bits/spike: %s of %s neurons have no spikes and are left out", int((~has).sum()), has.size)
    return out


def bits_per_spike_per_neuron(
    rates: np.ndarray, counts: np.ndarray, *, null_rates: np.ndarray | None = None
) -> np.ndarray:
    """(N,) bits per spike of each neuron from predicted expected counts per bin (``rate * bin_size``).

    A predicted rate of 0 where a spike happened is floored at :data:`MIN_RATE` (a very bad but finite score).
    """
    r = _as_float("rates", rates)
    if np.any(r < 0):
        raise invalid("rates", "must be >= 0 expected counts per bin", float(r.min()),
                      "pass exp(log_rates) or use bits_per_spike_from_log", kind=DataError)
    return bits_per_spike_per_neuron_from_log(np.log(np.maximum(r, MIN_RATE)), counts, null_rates=null_rates)


def _summarise(
    log_rates: np.ndarray, counts: np.ndarray, null_rates: np.ndarray | None, per_neuron: bool
) -> float:
    if per_neuron:
        bps = bits_per_spike_per_neuron_from_log(log_rates, counts, null_rates=null_rates)
        if not np.any(np.isfinite(bps)):
            raise invalid("counts", "must hold at least one spike for bits/spike", 0,
                          "evaluate on trials with spikes", kind=DataError)
        return float(np.nanmean(bps))
    # pooled: one ratio over all neurons (the Neural Latents Benchmark's variant)
    y = _check_counts(counts)
    lr = _as_float("log_rates", log_rates)
    if lr.shape != y.shape:
        raise invalid("log_rates", f"must have the shape of counts {y.shape}", lr.shape, kind=DataError)
    total = float(y.sum())
    if total <= 0:
        raise invalid("counts", "must hold at least one spike for bits/spike", 0,
                      "evaluate on trials with spikes", kind=DataError)
    null_lr = _null_log_rates(y, null_rates)
    gain = float(_poisson_ll(lr, y).sum() - np.sum(y * null_lr - np.exp(null_lr)))
    return gain / (total * math.log(2.0))


def bits_per_spike_from_log(
    log_rates: np.ndarray,
    counts: np.ndarray,
    *,
    null_rates: np.ndarray | None = None,
    per_neuron: bool = True,
) -> float:
    """Bits per spike of log expected counts per bin (K, T, N) against spike counts (K, T, N).

    ``per_neuron=True`` (NEDS): per-neuron ratios averaged over neurons with at least one spike.
    ``per_neuron=False``: one pooled ratio (total log-likelihood gain / total spikes / ln 2).
    """
    return _summarise(log_rates, counts, null_rates, per_neuron)


def bits_per_spike(
    rates: np.ndarray,
    counts: np.ndarray,
    *,
    null_rates: np.ndarray | None = None,
    per_neuron: bool = True,
) -> float:
    """Bits per spike of predicted expected counts per bin (K, T, N) (``rate * bin_size``, not Hz).

    See :func:`bits_per_spike_from_log` for ``null_rates`` and ``per_neuron``.
    """
    r = _as_float("rates", rates)
    if np.any(r < 0):
        raise invalid("rates", "must be >= 0 expected counts per bin", float(r.min()),
                      "pass exp(log_rates) or use bits_per_spike_from_log", kind=DataError)
    return _summarise(np.log(np.maximum(r, MIN_RATE)), counts, null_rates, per_neuron)


def r2(pred: np.ndarray, true: np.ndarray) -> float:
    """Single-trial R² = 1 - SS_res / SS_tot over all samples pooled (any shape, flattened)."""
    p = _as_float("pred", pred)
    t = _as_float("true", true)
    if p.shape != t.shape:
        raise invalid("pred", f"must have the shape of true {t.shape}", p.shape, kind=DataError)
    if t.size < 2:
        raise invalid("true", "needs at least 2 samples for R²", t.size, kind=DataError)
    ss_tot = float(np.sum((t - t.mean()) ** 2))
    if ss_tot <= 0.0:
        raise invalid("true", "is constant, so R² is undefined", float(t.flat[0]),
                      "evaluate on data where the target varies", kind=DataError)
    ss_res = float(np.sum((t - p) ** 2))
    return 1.0 - ss_res / ss_tot


def _labels(pred: np.ndarray, true: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    p = np.asarray(pred).reshape(-1)
    t = np.asarray(true).reshape(-1)
    if p.shape != t.shape:
        raise invalid("pred", f"must have as many labels as true ({t.size})", p.size, kind=DataError)
    if t.size == 0:
        raise invalid("true", "must hold at least one label", 0, kind=DataError)
    return p, t


def accuracy(pred: np.ndarray, true: np.ndarray) -> float:
    """Fraction of labels predicted exactly."""
    p, t = _labels(pred, true)
    return float(np.mean(p == t))


def balanced_accuracy(pred: np.ndarray, true: np.ndarray) -> float:
    """Mean per-class recall over the classes present in ``true`` (chance = 1 / n_classes present)."""
    p, t = _labels(pred, true)
    recalls = [float(np.mean(p[t == c] == c)) for c in np.unique(t)]
    return float(np.mean(recalls))


def confusion_matrix(pred: np.ndarray, true: np.ndarray, n_classes: int) -> np.ndarray:
    """(C, C) int64 counts: row = true class, column = predicted class; labels are ints in [0, C)."""
    p, t = _labels(pred, true)
    p, t = p.astype(np.int64), t.astype(np.int64)
    for name, x in (("pred", p), ("true", t)):
        if x.min() < 0 or x.max() >= n_classes:
            raise invalid(name, f"labels must be in [0, {n_classes})", (int(x.min()), int(x.max())),
                          kind=DataError)
    cm = np.zeros((n_classes, n_classes), dtype=np.int64)
    np.add.at(cm, (t, p), 1)
    return cm
