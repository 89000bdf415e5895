"""Oracle ceilings on simulated sessions, and scores as a fraction of their ceiling.

- Encoding ceiling: the bits/spike of the simulator's true expected counts per bin on the TEST trials (no
  model fit to the observed spikes can do better on average).
- Decoding ceiling: the same linear decoders as the baselines (:mod:`training.baselines`), fed the true
  latent trajectories instead of spikes (optionally with their pairwise products, for behaviour that is a
  nonlinear function of the latents, such as wheel speed = |velocity|).
- What the spikes carry: the share of the population's log-rate variance that each latent drives
  (:func:`latent_variance_shares`), which says how weak a behaviour's signal in the spikes is.

Everything takes arrays, so it is testable without the simulator; :func:`true_rates_for` is the glue to
``streams.ground_truth``.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from neds_rt.errors import DataError, invalid
from training.arrays import TEST, TRAIN, TrialArrays
from training.baselines import DecodingResults, LinearConfig, decode_from_features
from training.metrics import bits_per_spike, bits_per_spike_per_neuron

log = logging.getLogger(__name__)


def _test_rows(split: np.ndarray, k: int) -> np.ndarray:
    s = np.asarray(split).reshape(-1)
    if s.shape[0] != k:
        raise invalid("split", f"must have one entry per trial ({k})", s.shape[0], kind=DataError)
    rows = np.flatnonzero(s == TEST)
    if rows.size == 0:
        raise invalid("split", "has no TEST trials", np.unique(s).tolist(), kind=DataError)
    return rows


def _check_rates(true_rates: np.ndarray, counts: np.ndarray) -> np.ndarray:
    r = np.asarray(true_rates, dtype=np.float64)
    if r.shape != np.shape(counts):
        raise invalid("true_rates", f"must have the shape of the spike counts {np.shape(counts)}", r.shape,
                      "pass expected counts per bin for the same trials and units, in the same order",
                      kind=DataError)
    return r


def oracle_bits_per_spike(
    true_rates: np.ndarray, counts: np.ndarray, split: np.ndarray, *, per_neuron: bool = True
) -> float:
    """Bits/spike of the true expected counts per bin (K, T, N) on the TEST trials of ``counts`` (K, T, N)."""
    r = _check_rates(true_rates, counts)
    te = _test_rows(split, r.shape[0])
    return bits_per_spike(r[te], np.asarray(counts)[te], per_neuron=per_neuron)


def oracle_bits_per_spike_per_neuron(
    true_rates: np.ndarray, counts: np.ndarray, split: np.ndarray
) -> np.ndarray:
    """(N,) per-neuron oracle bits/spike on TEST (NaN for neurons silent on TEST)."""
    r = _check_rates(true_rates, counts)
    te = _test_rows(split, r.shape[0])
    return bits_per_spike_per_neuron(r[te], np.asarray(counts)[te])


def _expand(latents: np.ndarray, quadratic: bool) -> np.ndarray:
    """(K, T, D) -> (K, T, D') z-scored latents, plus every pairwise product (and square) when quadratic."""
    x = np.asarray(latents, dtype=np.float64)
    if x.ndim != 3:
        raise invalid("latents", "must be (K, T, D) per-bin latent values", x.shape, kind=DataError)
    if not np.all(np.isfinite(x)):
        raise invalid("latents", "must be finite", int(np.sum(~np.isfinite(x))), kind=DataError)
    if quadratic:
        i, j = np.triu_indices(x.shape[2])
        x = np.concatenate([x, x[..., i] * x[..., j]], axis=-1)
    return x


def decoding_ceiling(
    latents: np.ndarray,
    arrays: TrialArrays,
    *,
    quadratic: bool | None = None,
    config: LinearConfig | None = None,
) -> DecodingResults:
    """Linear decoders from the true latents (K, T, D) of ``arrays``' trials to its behaviour targets.

    ``quadratic=None`` fits both feature sets (latents alone; latents + pairwise products) and keeps, per
    target, the one that scores better on VAL; ``True`` / ``False`` force one.
    """
    options = (False, True) if quadratic is None else (bool(quadratic),)
    fits = [_ceiling_fit(latents, arrays, q, config) for q in options]
    best = fits[0]
    for other in fits[1:]:
        for name, reg in other.regression.items():
            if reg.val_r2 > best.regression[name].val_r2:
                best.regression[name] = reg
        for name, cls in other.classification.items():
            if cls.val_balanced_accuracy > best.classification[name].val_balanced_accuracy:
                best.classification[name] = cls
    log.info("decoding ceiling %s: %s", arrays.eid, {k: round(v, 3) for k, v in best.metrics().items()})
    return best


def _ceiling_fit(
    latents: np.ndarray, arrays: TrialArrays, quadratic: bool, config: LinearConfig | None
) -> DecodingResults:
    x = _expand(latents, quadratic)
    if x.shape[:2] != arrays.wheel.shape:
        raise invalid("latents", f"must be (K, T) = {arrays.wheel.shape} over the arrays' trials",
                      x.shape[:2], "pass the latents of the same trials, binned on the same grid",
                      kind=DataError)
    tr = np.flatnonzero(arrays.split == TRAIN)
    sd = x[tr].std(axis=(0, 1))
    z = (x - x[tr].mean(axis=(0, 1))) / np.where(sd > 0, sd, 1.0)  # (K, T, D') z-scored on TRAIN
    return decode_from_features(
        z.astype(np.float32), wheel=arrays.wheel, whisker=arrays.whisker, choice=arrays.choice,
        block=arrays.block, split=arrays.split, config=config,
    )


def latent_variance_shares(
    latents: np.ndarray, loadings: np.ndarray, names: Sequence[str]
) -> dict[str, float]:
    """Share of the population's log-rate variance that each latent carries, over every bin of the trials.

    ``latents`` (K, T, L) per-bin latent values, ``loadings`` (N, L): unit ``n``'s log-rate is ``loadings[n]
    . z`` plus a constant. The share of latent ``j`` is ``sum_n loadings[n, j]**2 var(z_j)`` over ``sum_n
    var(loadings[n] . z)``, the variances taken over all K * T bins. Covariances between latents belong to
    no single latent, so the shares need not sum to 1. It tells how much of the spiking a behaviour's latent
    drives: a small share is a signal that a decoder has to pool over many neurons and bins to find.
    """
    z = _expand(latents, quadratic=False)  # (K, T, L) checked
    w = np.asarray(loadings, dtype=np.float64)
    if w.ndim != 2 or w.shape[1] != z.shape[2]:
        raise invalid("loadings", f"must be (N, L) with L = {z.shape[2]} latents", w.shape, kind=DataError)
    if len(names) != z.shape[2]:
        raise invalid("names", f"must name the {z.shape[2]} latents", len(names), kind=DataError)
    cov = np.atleast_2d(np.cov(z.reshape(-1, z.shape[2]), rowvar=False))  # (L, L) over all bins
    total = float(np.einsum("nl,lm,nm->", w, cov, w))  # sum over units of each unit's log-rate variance
    if not (math.isfinite(total) and total > 0):
        raise invalid("latents and loadings", "give the units no log-rate variance", total, kind=DataError)
    own = np.diag(cov) * (w**2).sum(axis=0)  # (L,) each latent's part, without cross terms
    return {str(name): float(v / total) for name, v in zip(names, own, strict=True)}


def chance_levels(arrays: TrialArrays) -> dict[str, float]:
    """Chance of every metric on TEST: 0 for R² and bits/spike; majority rate and 1 / n_classes present."""
    te = _test_rows(arrays.split, arrays.spikes.shape[0])
    out: dict[str, float] = {"wheel_r2": 0.0, "whisker_r2": 0.0, "bits_per_spike": 0.0}
    for name in ("choice", "block"):
        y = np.asarray(getattr(arrays, name))[te]
        _, counts = np.unique(y, return_counts=True)
        out[f"{name}_accuracy"] = float(counts.max() / counts.sum())
        out[f"{name}_balanced_accuracy"] = 1.0 / counts.size
    return out


def fraction_of_ceiling(value: float, ceiling: float, chance: float = 0.0) -> float:
    """``(value - chance) / (ceiling - chance)``: 0 at chance, 1 at the ceiling (can exceed 1 by noise).

    Raises DataError when the ceiling is not above chance (the fraction is undefined there).
    """
    for name, v in (("value", value), ("ceiling", ceiling), ("chance", chance)):
        if not math.isfinite(v):
            raise invalid(name, "must be finite", v, kind=DataError)
    if ceiling - chance <= 1e-12:
        raise invalid("ceiling", f"must be above chance ({chance})", ceiling,
                      "the oracle is uninformative on this session; report the raw value instead",
                      kind=DataError)
    return (value - chance) / (ceiling - chance)


def _ground_truth_columns(arrays: TrialArrays, cluster_ids: np.ndarray) -> np.ndarray:
    """(N,) columns of the ground truth's units that are ``arrays.unit_ids``, in the arrays' order."""
    col = {int(u): i for i, u in enumerate(np.asarray(cluster_ids).tolist())}
    missing = [int(u) for u in arrays.unit_ids if int(u) not in col]
    if missing:
        raise invalid(f"ground truth of {arrays.eid}/{arrays.probe}",
                      f"has no rates for {len(missing)} units of the arrays", missing[:5],
                      "rebuild the simulated cache and the arrays from the same run", kind=DataError)
    return np.array([col[int(u)] for u in arrays.unit_ids], dtype=np.int64)


def true_rates_for(
    arrays: TrialArrays, root: str | Path, *, marginalise: Sequence[str] = ()
) -> np.ndarray:
    """(K, T, N) true expected counts per bin of ``arrays``' trials and units (simulated caches only).

    Integrates the simulator's rates (``streams.ground_truth``) over each bin of each trial window and picks
    the columns of ``arrays.unit_ids`` (cluster ids). ``marginalise`` names latents (e.g. the private noise
    latents ``noise_fast``, ``noise_mid``, ``noise_slow``) to average out instead of using their sampled
    values: each is replaced by its session mean and, treating it as an independent Gaussian, each unit's
    log rate gains ``0.5 * loading² * variance``, so the result is the best prediction for a model that
    cannot know those latents (a behaviour-only encoder).
    """
    from streams.ground_truth import load_ground_truth

    gt = load_ground_truth(Path(root), arrays.eid, arrays.probe)
    cols = _ground_truth_columns(arrays, gt.cluster_ids)
    if marginalise:
        unknown = [m for m in marginalise if m not in gt.latent_names]
        if unknown:
            raise invalid("marginalise", f"must name latents of the ground truth {gt.latent_names}", unknown,
                          kind=DataError)
        idx = [gt.latent_names.index(m) for m in marginalise]
        lat = gt.latents.copy()  # (G, L)
        mean = lat[:, idx].astype(np.float64).mean(axis=0)
        var = lat[:, idx].astype(np.float64).var(axis=0)
        lat[:, idx] = mean.astype(lat.dtype)
        load = gt.loadings[:, idx].astype(np.float64)  # (N_all, M)
        shift = 0.5 * (load**2 * var).sum(axis=1)  # (N_all,) lognormal mean correction
        offset = (gt.log_offset + shift).astype(gt.log_offset.dtype)
        gt = dataclasses.replace(gt, latents=lat, log_offset=offset)
    rates = gt.rates(arrays.window_start, arrays.n_bins, arrays.bin_size)  # (K, T, N_all) counts per bin
    return np.asarray(rates[:, :, cols], dtype=np.float64)


def true_latents_for(arrays: TrialArrays, root: str | Path) -> np.ndarray:
    """(K, T, L) the simulator's latents averaged over each bin of ``arrays``' trial windows."""
    from streams.ground_truth import load_ground_truth

    gt = load_ground_truth(Path(root), arrays.eid, arrays.probe)
    return np.asarray(gt.latents_at(arrays.window_start, arrays.n_bins, arrays.bin_size), dtype=np.float64)


def true_loadings_for(arrays: TrialArrays, root: str | Path) -> np.ndarray:
    """(N, L) the simulator's loadings of ``arrays``' units, in the arrays' order: each unit's true tuning to
    the latents, the features that region classification from learned embeddings can at best recover."""
    from streams.ground_truth import load_ground_truth

    gt = load_ground_truth(Path(root), arrays.eid, arrays.probe)
    return np.asarray(gt.loadings[_ground_truth_columns(arrays, gt.cluster_ids)], dtype=np.float64)


def latent_shares_for(arrays: TrialArrays, root: str | Path) -> dict[str, float]:
    """:func:`latent_variance_shares` of ``arrays``' units over its trial windows, from the simulator's truth
    (latent name -> share)."""
    from streams.ground_truth import load_ground_truth

    gt = load_ground_truth(Path(root), arrays.eid, arrays.probe)
    latents = gt.latents_at(arrays.window_start, arrays.n_bins, arrays.bin_size)  # (K, T, L)
    return latent_variance_shares(latents, gt.loadings[_ground_truth_columns(arrays, gt.cluster_ids)],
                                  gt.latent_names)
