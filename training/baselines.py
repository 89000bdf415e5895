"""Linear baselines on the NEDS splits: train on TRAIN, choose hyper-parameters on VAL, report on TEST.

- Decoders (spikes -> behaviour): ridge on time-lagged binned spikes for wheel speed and whisker motion
  energy (one regression per bin using the bins ``t - L .. t + L`` of the same trial, zero outside it);
  logistic regression on per-trial spike counts summed over a few time chunks for choice and block.
  Spikes are variance-stabilised (``sqrt``) and z-scored on TRAIN; for the ridge, when there are many
  neurons, they are reduced by a PCA fit on TRAIN (the logistic decoders see every neuron).
- Encoder (behaviour -> spikes): a reduced-rank Poisson GLM. Each neuron's log expected count per bin is
  its smoothed TRAIN PSTH (a fixed offset) + a per-neuron gain + a rank-``r`` map of the behaviour in that
  bin (time-lagged wheel and whisker, choice x smooth time bases, block one-hot). Each rank starts from a
  closed-form weighted reduced-rank Fisher step, the rank is chosen on VAL by bits/spike, and the chosen
  one is refined by L-BFGS on the Poisson likelihood with an L2 penalty.

:func:`decode_from_features` takes any (K, T, D) features, so the oracle ceiling reuses it on true latents.
"""

from __future__ import annotations

import itertools
import logging
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Final

import numpy as np

from neds_rt.errors import ConfigError, DataError, invalid
from training.arrays import N_BLOCK, N_CHOICE, TEST, TRAIN, VAL, TrialArrays
from training.metrics import (
    accuracy,
    balanced_accuracy,
    bits_per_spike,
    bits_per_spike_per_neuron,
    r2,
)

log = logging.getLogger(__name__)


@dataclass
class LinearConfig:
    """Hyper-parameters of the linear decoders (the grids are searched on VAL)."""

    lags: int = 5  # bins either side of the decoded bin
    alphas: tuple[float, ...] = (1e-1, 1.0, 1e1, 1e2, 1e3, 1e4, 1e5)  # ridge penalties
    max_components: int = 64  # PCA of the (sqrt) spikes before lagging when N is larger (ridge only)
    n_chunks: int = 4  # time chunks whose spike counts feed the logistic decoders
    Cs: tuple[float, ...] = (1e-3, 1e-2, 1e-1, 1.0, 1e1)  # inverse L2 strengths of the logistic decoders
    sqrt_spikes: bool = True  # variance-stabilise counts before z-scoring
    max_iter: int = 2000  # logistic regression solver iterations


@dataclass
class RRRConfig:
    """Hyper-parameters of the reduced-rank Poisson encoder (``ranks`` is searched on VAL)."""

    ranks: tuple[int, ...] = (1, 2, 4, 8)
    lags: int = 5  # bins either side of wheel / whisker fed to each bin
    n_time_bases: int = 6  # smooth bumps over the trial that choice is multiplied by
    l2: float = 1e-4  # penalty on the low-rank factors, per sample and neuron
    psth_smooth_bins: float = 2.0  # Gaussian sigma (bins) of the PSTH offset
    psth_prior_trials: float = 1.0  # shrink each PSTH bin towards the neuron's mean, in trials
    ridge: float = 1e-3  # of the closed-form start, relative to the mean eigenvalue of x'x
    max_iter: int = 60  # L-BFGS refinement of the chosen rank (0: keep the closed-form start)


@dataclass
class RegressionResult:
    """A continuous target decoded per bin; ``pred`` / ``true`` on TEST in the arrays' (scaled) units."""

    target: str
    r2: float  # TEST
    val_r2: float  # VAL, at the chosen alpha
    alpha: float
    pred: np.ndarray  # (K_test, T) float32
    true: np.ndarray  # (K_test, T) float32
    rows: np.ndarray  # (K_test,) trial rows of TEST


@dataclass
class ClassificationResult:
    """A per-trial label decoded from the whole window; metrics on TEST."""

    target: str
    accuracy: float
    balanced_accuracy: float
    val_balanced_accuracy: float
    C: float
    pred: np.ndarray  # (K_test,) int64
    proba: np.ndarray  # (K_test, n_classes) float64
    true: np.ndarray  # (K_test,) int64
    rows: np.ndarray  # (K_test,) trial rows of TEST


@dataclass
class DecodingResults:
    """Every decoder of one session; :meth:`metrics` is the flat table row."""

    regression: dict[str, RegressionResult] = field(default_factory=dict)
    classification: dict[str, ClassificationResult] = field(default_factory=dict)

    def metrics(self) -> dict[str, float]:
        out: dict[str, float] = {}
        for name, res in self.regression.items():
            out[f"{name}_r2"] = res.r2
        for name, cls in self.classification.items():
            out[f"{name}_accuracy"] = cls.accuracy
            out[f"{name}_balanced_accuracy"] = cls.balanced_accuracy
        return out


@dataclass
class EncoderResult:
    """The reduced-rank Poisson encoder on TEST (bits/spike as NEDS: null = TEST mean per neuron)."""

    bits_per_spike: float
    bits_per_spike_per_neuron: np.ndarray  # (N,) NaN for neurons silent on TEST
    psth_bits_per_spike: float  # the smoothed TRAIN PSTH alone, for reference
    rank: int
    val_bits_per_spike: dict[int, float]  # rank -> VAL bits/spike of the closed-form start
    rates: np.ndarray  # (K_test, T, N) float32 predicted expected counts per bin
    rows: np.ndarray  # (K_test,) trial rows of TEST

    def metrics(self) -> dict[str, float]:
        return {"rrr_bits_per_spike": self.bits_per_spike, "psth_bits_per_spike": self.psth_bits_per_spike}


# ---------------------------------------------------------------------------------------------- splits


def _split_rows(split: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    s = np.asarray(split).reshape(-1)
    if s.shape[0] != k:
        raise invalid("split", f"must have one entry per trial ({k})", s.shape[0], kind=DataError)
    rows = tuple(np.flatnonzero(s == v) for v in (TRAIN, VAL, TEST))
    for name, r in zip(("TRAIN", "VAL", "TEST"), rows, strict=True):
        if r.size == 0:
            raise invalid("split", f"has no {name} trials", np.unique(s).tolist(),
                          "rebuild the arrays with train/val/test fractions that leave trials in each split",
                          kind=DataError)
    return rows[0], rows[1], rows[2]


def _check_grid(name: str, grid: Sequence[float]) -> None:
    if len(grid) == 0 or any(not np.isfinite(g) or g <= 0 for g in grid):
        raise invalid(name, "must be a non-empty list of positive numbers", tuple(grid), kind=ConfigError)


# ------------------------------------------------------------------------------------- feature building


def lagged(x: np.ndarray, lags: int) -> np.ndarray:
    """(K, T, D) -> (K, T, (2L+1) * D): copies shifted by -L..+L bins within each trial, zero outside it.

    Block ``j`` of the last axis holds ``x[:, t + j - L]``.
    """
    if lags < 0:
        raise invalid("lags", "must be >= 0", lags, kind=ConfigError)
    k, t, d = x.shape
    out = np.zeros((k, t, (2 * lags + 1) * d), dtype=x.dtype)
    for j, shift in enumerate(range(-lags, lags + 1)):
        dst = out[:, :, j * d : (j + 1) * d]
        if shift < 0:
            dst[:, -shift:] = x[:, : t + shift]
        elif shift > 0:
            dst[:, : t - shift] = x[:, shift:]
        else:
            dst[:] = x
    return out


def spike_features(
    spikes: np.ndarray, train_rows: np.ndarray, *, max_components: int | None, sqrt: bool = True
) -> np.ndarray:
    """(K, T, N) counts -> (K, T, D) float32: sqrt, z-scored on TRAIN, PCA (TRAIN) to <= max_components.

    ``max_components=None`` keeps every neuron that varies on TRAIN (no PCA).
    """
    k, t, n = spikes.shape
    x = np.sqrt(spikes.astype(np.float64)) if sqrt else spikes.astype(np.float64)  # (K, T, N)
    flat_tr = x[train_rows].reshape(-1, n)
    mu, sd = flat_tr.mean(axis=0), flat_tr.std(axis=0)
    keep = sd > 0  # neurons silent on TRAIN carry nothing a linear model can learn
    if not np.any(keep):
        raise invalid("spikes", "has no neuron that varies over the TRAIN trials", n,
                      "check the session's spikes and the unit filter", kind=DataError)
    z = (x[..., keep] - mu[keep]) / sd[keep]  # (K, T, N_kept)
    if max_components is None or z.shape[2] <= max_components:
        return z.astype(np.float32)
    cov = np.cov(z[train_rows].reshape(-1, z.shape[2]), rowvar=False)  # (N_kept, N_kept)
    evals, evecs = np.linalg.eigh(cov)
    top = evecs[:, np.argsort(evals)[::-1][:max_components]]  # (N_kept, D)
    proj = (z.reshape(-1, z.shape[2]) @ top).reshape(k, t, -1)  # (K, T, D) principal components
    proj /= np.maximum(proj[train_rows].std(axis=(0, 1)), 1e-12)
    return proj.astype(np.float32)


def chunk_means(x: np.ndarray, n_chunks: int) -> np.ndarray:
    """(K, T, D) -> (K, n_chunks * D): means over ``n_chunks`` consecutive stretches of the window."""
    t = x.shape[1]
    if not 1 <= n_chunks <= t:
        raise invalid("n_chunks", f"must be in [1, T={t}]", n_chunks, kind=ConfigError)
    edges = np.linspace(0, t, n_chunks + 1).round().astype(int)
    return np.concatenate([x[:, a:b].mean(axis=1) for a, b in itertools.pairwise(edges)], axis=1)


# -------------------------------------------------------------------------------------------- ridge


def ridge_path(x: np.ndarray, y: np.ndarray, alphas: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    """Ridge for several penalties at once (one eigendecomposition; intercept unpenalised).

    x (n, D), y (n, P) -> weights (A, D, P), intercepts (A, P); minimises ``|y - xW - b|² + alpha |W|²``
    (sklearn's ``Ridge(alpha)`` objective).
    """
    xm, ym = x.mean(axis=0), y.mean(axis=0)
    xc = (x - xm).astype(np.float64)
    yc = (y - ym).astype(np.float64)
    gram = xc.T @ xc  # (D, D)
    evals, evecs = np.linalg.eigh(gram)
    proj = evecs.T @ (xc.T @ yc)  # (D, P)
    w = np.stack([evecs @ (proj / (evals + a)[:, None]) for a in alphas])  # (A, D, P)
    b = ym[None, :] - np.einsum("d,adp->ap", xm, w)  # (A, P)
    return w, b


def fit_lagged_ridge(
    features: np.ndarray,
    targets: dict[str, np.ndarray],
    split: np.ndarray,
    *,
    lags: int = 5,
    alphas: Sequence[float] = LinearConfig.alphas,
) -> dict[str, RegressionResult]:
    """Per-bin ridge from lagged ``features`` (K, T, D) to each target (K, T); alpha per target on VAL."""
    _check_grid("alphas", alphas)
    k, t, _ = features.shape
    tr, va, te = _split_rows(split, k)
    names = list(targets)
    y = np.stack([np.asarray(targets[n], dtype=np.float64) for n in names], axis=-1)  # (K, T, P)
    if y.shape[:2] != (k, t):
        raise invalid("targets", f"must be (K, T) = ({k}, {t}) per target", y.shape[:2], kind=DataError)
    x = {r: lagged(features[rows], lags) for r, rows in (("tr", tr), ("va", va), ("te", te))}
    w, b = ridge_path(x["tr"].reshape(-1, x["tr"].shape[2]), y[tr].reshape(-1, len(names)), alphas)
    out: dict[str, RegressionResult] = {}
    for p, name in enumerate(names):
        pred_va = [x["va"] @ w[a, :, p] + b[a, p] for a in range(len(alphas))]  # A x (K_val, T)
        scores = [r2(pv, y[va, :, p]) for pv in pred_va]
        best = int(np.argmax(scores))
        pred_te = x["te"] @ w[best, :, p] + b[best, p]  # (K_test, T)
        out[name] = RegressionResult(
            target=name, r2=r2(pred_te, y[te, :, p]), val_r2=float(scores[best]), alpha=float(alphas[best]),
            pred=pred_te.astype(np.float32), true=y[te, :, p].astype(np.float32), rows=te,
        )
        log.debug("ridge %s: alpha=%s val R2=%.3f test R2=%.3f", name, alphas[best], scores[best],
                  out[name].r2)
    return out


# ------------------------------------------------------------------------------------------ logistic


def fit_logistic(x: np.ndarray, y: np.ndarray, c: float, max_iter: int) -> Any:
    """An L2 logistic regression (inverse strength ``c``) fitted on (n, F) ``x``, (n,) ``y``; an unconverged
    solver is kept quietly (``max_iter`` bounds it)."""
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        return LogisticRegression(C=c, max_iter=max_iter).fit(x, y)


def fit_trial_logistic(
    features: np.ndarray,
    labels: dict[str, tuple[np.ndarray, int]],
    split: np.ndarray,
    *,
    Cs: Sequence[float] = LinearConfig.Cs,
    max_iter: int = 2000,
) -> dict[str, ClassificationResult]:
    """Logistic regression from per-trial ``features`` (K, F) to each ``labels[name] = (y (K,), n_classes)``.

    Features are z-scored on TRAIN; when F exceeds the number of TRAIN trials they are rotated onto the
    span of the centred TRAIN rows (an orthonormal basis, so the L2-penalised fit is unchanged, only
    faster). C is chosen on VAL by balanced accuracy (ties go to the stronger penalty).
    """
    _check_grid("Cs", Cs)
    k = features.shape[0]
    tr, va, te = _split_rows(split, k)
    f = np.asarray(features, dtype=np.float64)
    mu, sd = f[tr].mean(axis=0), f[tr].std(axis=0)
    keep = sd > 0
    z = (f[:, keep] - mu[keep]) / sd[keep]  # (K, F_kept)
    if z.shape[1] > tr.size:
        _, sv, vt = np.linalg.svd(z[tr], full_matrices=False)  # z[tr] is centred: its span is vt's rows
        z = z @ vt[sv > 1e-9 * sv[0]].T  # (K, D <= K_train) same L2 geometry, fewer columns
    out: dict[str, ClassificationResult] = {}
    for name, (y_all, n_classes) in labels.items():
        y = np.asarray(y_all).astype(np.int64).reshape(-1)
        if y.shape[0] != k or y.min() < 0 or y.max() >= n_classes:
            raise invalid(name, f"must be (K={k},) labels in [0, {n_classes})", (y.shape, y.min(), y.max()),
                          kind=DataError)
        if np.unique(y[tr]).size < 2:
            raise invalid(name, "needs at least 2 classes among TRAIN trials", np.unique(y[tr]).tolist(),
                          "use a session with both outcomes, or a larger TRAIN split", kind=DataError)
        best: tuple[float, float, object] | None = None
        for c in sorted(Cs):
            model = fit_logistic(z[tr], y[tr], c, max_iter)
            score = balanced_accuracy(model.predict(z[va]), y[va])
            if best is None or score > best[0]:
                best = (score, c, model)
        assert best is not None
        val_score, c_best, model = best
        proba = np.zeros((te.size, n_classes))  # (K_test, n_classes)
        proba[:, model.classes_] = model.predict_proba(z[te])  # type: ignore[attr-defined]
        pred = np.asarray(model.predict(z[te]), dtype=np.int64)  # type: ignore[attr-defined]
        out[name] = ClassificationResult(
            target=name, accuracy=accuracy(pred, y[te]), balanced_accuracy=balanced_accuracy(pred, y[te]),
            val_balanced_accuracy=float(val_score), C=float(c_best), pred=pred, proba=proba, true=y[te],
            rows=te,
        )
    return out


# ------------------------------------------------------------------------------------------ decoders


def decode_from_features(
    features: np.ndarray,
    *,
    wheel: np.ndarray,
    whisker: np.ndarray,
    choice: np.ndarray,
    block: np.ndarray,
    split: np.ndarray,
    config: LinearConfig | None = None,
    trial_features: np.ndarray | None = None,
) -> DecodingResults:
    """The four linear decoders from any per-bin features (K, T, D) (spikes, or true latents).

    Choice and block are decoded from ``trial_features`` (K, T, D2) when given (e.g. every neuron rather
    than the principal components the ridge uses), else from ``features``, averaged over time chunks.
    """
    cfg = config or LinearConfig()
    feats = np.asarray(features, dtype=np.float32)
    if feats.ndim != 3:
        raise invalid("features", "must be (K, T, D)", feats.shape, kind=DataError)
    reg = fit_lagged_ridge(
        feats, {"wheel": wheel, "whisker": whisker}, split, lags=cfg.lags, alphas=cfg.alphas
    )
    cls = fit_trial_logistic(
        chunk_means(feats if trial_features is None else np.asarray(trial_features), cfg.n_chunks),
        {"choice": (choice, N_CHOICE), "block": (block, N_BLOCK)},
        split, Cs=cfg.Cs, max_iter=cfg.max_iter,
    )
    return DecodingResults(regression=reg, classification=cls)


def fit_linear_decoders(arrays: TrialArrays, config: LinearConfig | None = None) -> DecodingResults:
    """Ridge (wheel, whisker) and logistic (choice, block) decoders from the session's binned spikes."""
    cfg = config or LinearConfig()
    tr, _, _ = _split_rows(arrays.split, arrays.spikes.shape[0])
    feats = spike_features(arrays.spikes, tr, max_components=cfg.max_components, sqrt=cfg.sqrt_spikes)
    every = spike_features(arrays.spikes, tr, max_components=None, sqrt=cfg.sqrt_spikes)  # (K, T, N')
    res = decode_from_features(
        feats, wheel=arrays.wheel, whisker=arrays.whisker, choice=arrays.choice, block=arrays.block,
        split=arrays.split, config=cfg, trial_features=every,
    )
    log.info("linear decoders %s: %s", arrays.eid, {k: round(v, 3) for k, v in res.metrics().items()})
    return res


# ------------------------------------------------------------------------------------------- encoder


def _time_bases(n_bins: int, n_bases: int) -> np.ndarray:
    """(T, B) Gaussian bumps evenly spread over the window, normalised to sum to 1 in every bin."""
    if n_bases < 1:
        raise invalid("n_time_bases", "must be >= 1", n_bases, kind=ConfigError)
    t = np.arange(n_bins)[:, None]
    centres = np.linspace(0, n_bins - 1, n_bases)[None, :]
    width = max((n_bins - 1) / max(n_bases - 1, 1), 1.0)
    g = np.exp(-0.5 * ((t - centres) / width) ** 2)
    return g / g.sum(axis=1, keepdims=True)


def behaviour_design(
    wheel: np.ndarray,
    whisker: np.ndarray,
    choice: np.ndarray,
    block: np.ndarray,
    train_rows: np.ndarray,
    *,
    lags: int,
    n_time_bases: int,
) -> np.ndarray:
    """(K, T, D) float64 behaviour features per bin, centred and scaled on TRAIN.

    Lagged wheel and whisker (2 * (2L+1)), choice (+-1) x time bases (B), block one-hot (3).
    """
    k, t = wheel.shape
    cont = lagged(np.stack([wheel, whisker], axis=-1).astype(np.float64), lags)  # (K, T, 2(2L+1))
    sign = (2.0 * np.asarray(choice, dtype=np.float64) - 1.0)[:, None, None]  # (K, 1, 1)
    ch = sign * _time_bases(t, n_time_bases)[None]  # (K, T, B)
    blk = np.broadcast_to(np.eye(N_BLOCK)[np.asarray(block, dtype=np.int64)][:, None, :], (k, t, N_BLOCK))
    x = np.concatenate([cont, ch, blk], axis=-1)  # (K, T, D)
    mu = x[train_rows].mean(axis=(0, 1))
    sd = x[train_rows].std(axis=(0, 1))
    return (x - mu) / np.where(sd > 0, sd, 1.0)


def psth_offset(counts: np.ndarray, *, smooth_bins: float, prior_trials: float) -> np.ndarray:
    """(T, N) log expected count per bin: TRAIN PSTH, Gaussian-smoothed over time, shrunk to the mean."""
    k, t, _ = counts.shape
    mean_t = counts.mean(axis=0)  # (T, N)
    if smooth_bins > 0:
        lag = np.arange(t)
        kern = np.exp(-0.5 * ((lag[:, None] - lag[None, :]) / smooth_bins) ** 2)  # (T, T)
        kern /= kern.sum(axis=1, keepdims=True)
        mean_t = kern @ mean_t
    overall = counts.mean(axis=(0, 1))[None, :]  # (1, N)
    psth = (k * mean_t + prior_trials * overall) / (k + prior_trials)
    return np.log(np.maximum(psth, 1e-6))


_STEP_SCALES: Final = (1.0, 0.7, 0.5, 0.35, 0.25, 0.0)  # damping of the closed-form step, chosen on VAL


def _rrr_newton_step(
    x: np.ndarray, y: np.ndarray, offset: np.ndarray, ranks: Sequence[int], ridge: float
) -> dict[int, tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Closed-form start: per-neuron gains, then one weighted Fisher-scoring step solved at every rank.

    x (S, D) centred, y (S, N), offset (S, N) -> {rank: (c (N,), U (D, r), V (r, N))}. The gain ``c`` is the
    exact Poisson MLE given the offset. Linearising ``exp`` around it, the Fisher step for ``B = U V``
    is a least-squares fit of the working residual ``(y - mu) / mu`` weighted by ``mu``; with each neuron's
    weight taken as its mean ``m`` this is a weighted reduced-rank regression, solved exactly: ridge fit
    ``B``, then keep the top ``r`` right singular vectors of ``L' B diag(sqrt m)`` (``x'x = L L'``).
    """
    mu = np.exp(offset)  # (S, N) expected counts of the offset alone
    c = np.log(np.maximum(y.sum(axis=0), 1e-3) / mu.sum(axis=0))  # (N,) Poisson MLE of each gain
    mu *= np.exp(c)
    m = mu.mean(axis=0)  # (N,) per-neuron weight
    resid = (y - mu) / m  # (S, N) working residual
    gram = x.T @ x  # (D, D)
    reg = ridge * np.trace(gram) / max(gram.shape[0], 1)
    b = np.linalg.solve(gram + reg * np.eye(gram.shape[0]), x.T @ resid)  # (D, N) full-rank step
    chol = np.linalg.cholesky(gram + 1e-9 * np.trace(gram) * np.eye(gram.shape[0]))  # (D, D)
    sq = np.sqrt(m)
    _, _, vt = np.linalg.svd(chol.T @ b * sq, full_matrices=False)  # vt (min(D, N), N)
    out: dict[int, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}
    for r in ranks:
        vr = vt[: min(r, vt.shape[0])].T  # (N, r') top right singular vectors in the weighted metric
        out[r] = (c, (b * sq) @ vr, vr.T / sq)
    return out


def _polish_rrr_poisson(
    x: np.ndarray,
    y: np.ndarray,
    offset: np.ndarray,
    start: tuple[np.ndarray, np.ndarray, np.ndarray],
    l2: float,
    max_iter: int,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Poisson GLM ``log rate = offset + c + x U V`` refined by L-BFGS from ``start`` (float32 inner loop).

    x (S, D), y (S, N), offset (S, N) -> c (N,), U (D, r), V (r, N). Minimises the mean Poisson NLL per
    (sample, neuron) + ``l2 / 2 * (|U|² + |V|²)``.
    """
    from scipy.optimize import minimize

    c0, u0, v0 = start
    if max_iter <= 0:
        return start
    s, d = x.shape
    n, rank = y.shape[1], u0.shape[1]
    scale = np.float32(1.0 / (s * n))
    x32, y32, off32 = (a.astype(np.float32) for a in (x, y, offset))
    sizes = (n, d * rank)

    def unpack(theta: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        c = theta[: sizes[0]]
        u = theta[sizes[0] : sizes[0] + sizes[1]].reshape(d, rank)
        v = theta[sizes[0] + sizes[1] :].reshape(rank, n)
        return c, u, v

    def loss(theta: np.ndarray) -> tuple[float, np.ndarray]:
        c, u, v = (a.astype(np.float32) for a in unpack(theta))
        xu = x32 @ u  # (S, r)
        eta = xu @ v  # (S, N) log expected counts, built in place
        eta += off32
        eta += c
        lam = np.exp(np.minimum(eta, 20.0))
        nll = float(scale * (lam.sum(dtype=np.float64) - np.vdot(y32, eta)))
        nll += 0.5 * l2 * float(np.sum(u * u) + np.sum(v * v))
        lam -= y32
        lam *= scale  # (S, N) gradient of the NLL w.r.t. eta
        gc = lam.sum(axis=0)
        gw = x32.T @ lam  # (D, N)
        gu = gw @ v.T + l2 * u
        gv = xu.T @ lam + l2 * v
        return nll, np.concatenate([gc, gu.ravel(), gv.ravel()]).astype(np.float64)

    theta0 = np.concatenate([c0, u0.ravel(), v0.ravel()]).astype(np.float64)
    res = minimize(loss, theta0, jac=True, method="L-BFGS-B", options={"maxiter": max_iter})
    log.debug("rrr rank %s: %s iterations, loss %.6f (%s)", rank, res.nit, res.fun, res.message)
    return unpack(np.asarray(res.x))


def fit_rrr_encoder(
    arrays: TrialArrays, config: RRRConfig | None = None, *, rank: int | None = None
) -> EncoderResult:
    """Reduced-rank Poisson encoder from behaviour to spikes; ``rank`` overrides the VAL search.

    Every rank of the grid gets the closed-form start (:func:`_rrr_newton_step`, damped by the factor of
    ``_STEP_SCALES`` that scores best on VAL) and is scored on VAL; the best rank is then refined by L-BFGS
    on the Poisson likelihood (``max_iter`` iterations). ``val_bits_per_spike`` holds the starts' scores.
    """
    cfg = config or RRRConfig()
    ranks = (rank,) if rank is not None else cfg.ranks
    if len(ranks) == 0 or any(r < 1 for r in ranks):
        raise invalid("rank", "must be a positive integer (or a non-empty list of them)", ranks,
                      kind=ConfigError)
    y = arrays.spikes.astype(np.float64)  # (K, T, N) counts per bin
    k, t, n = y.shape
    tr, va, te = _split_rows(arrays.split, k)
    x = behaviour_design(arrays.wheel, arrays.whisker, arrays.choice, arrays.block, tr,
                         lags=cfg.lags, n_time_bases=cfg.n_time_bases)  # (K, T, D)
    off = psth_offset(y[tr], smooth_bins=cfg.psth_smooth_bins, prior_trials=cfg.psth_prior_trials)  # (T, N)
    d = x.shape[2]

    def predict(rows: np.ndarray, c: np.ndarray, u: np.ndarray, v: np.ndarray) -> np.ndarray:
        eta = off[None] + c + (x[rows].reshape(-1, d) @ u @ v).reshape(rows.size, t, n)
        return np.exp(np.minimum(eta, 20.0))  # (K_rows, T, N) expected counts per bin

    x_tr = x[tr].reshape(-1, d)
    y_tr = y[tr].reshape(-1, n)
    off_tr = np.broadcast_to(off[None], (tr.size, t, n)).reshape(-1, n)
    starts = _rrr_newton_step(x_tr, y_tr, off_tr, ranks, cfg.ridge)
    val_scores: dict[int, float] = {}
    damped: dict[int, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}
    for r in ranks:  # the undamped step overshoots where exp is far from linear: damp it, choose on VAL
        c, u, v = starts[r]
        scored = [(bits_per_spike(predict(va, c, a * u, v), y[va]), a) for a in _STEP_SCALES]
        val_scores[r], a_best = max(scored)
        damped[r] = (c, a_best * u, v)
    best = max(ranks, key=lambda r: val_scores[r])
    fit = _polish_rrr_poisson(x_tr, y_tr, off_tr, damped[best], cfg.l2, cfg.max_iter)
    rates = predict(te, *fit)
    psth_rates = np.broadcast_to(np.exp(off)[None], rates.shape)  # (K_test, T, N) TRAIN PSTH alone
    res = EncoderResult(
        bits_per_spike=bits_per_spike(rates, y[te]),
        bits_per_spike_per_neuron=bits_per_spike_per_neuron(rates, y[te]),
        psth_bits_per_spike=bits_per_spike(psth_rates, y[te]),
        rank=best, val_bits_per_spike=val_scores, rates=rates.astype(np.float32), rows=te,
    )
    log.info("rrr encoder %s: rank %s, test %.4f bits/spike (psth %.4f)", arrays.eid, best,
             res.bits_per_spike, res.psth_bits_per_spike)
    return res
