"""Brain-region classification from per-neuron embeddings, as in the NEDS paper, plus its PSTH baseline.

:func:`classify_regions` runs stratified k-fold logistic regression (features z-scored inside each
training fold) on any (N, D) per-neuron features: learned embeddings (a neuron's column of the spike
stitching, or its row of the spike output head) or :func:`psth_features`. Every neuron is predicted once,
by the fold that held it out; accuracy, balanced accuracy and the confusion matrix are computed on those
predictions. Regions with fewer neurons than folds cannot be stratified and are left out (listed in the
result). Plots use matplotlib's object API (no pyplot, no display), imported inside the functions.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from neds_rt.errors import ConfigError, DataError, invalid
from training.metrics import accuracy, balanced_accuracy, confusion_matrix

log = logging.getLogger(__name__)


@dataclass
class RegionResult:
    """Cross-validated region predictions of the neurons kept, and their scores."""

    classes: np.ndarray  # (C,) str region names, the confusion matrix's order
    accuracy: float
    balanced_accuracy: float
    chance_majority: float  # accuracy of always answering the most common region
    chance_uniform: float  # 1 / C, the balanced accuracy of any constant answer
    confusion: np.ndarray  # (C, C) int64, row = true region, column = predicted region
    pred: np.ndarray  # (N_kept,) str predicted region
    true: np.ndarray  # (N_kept,) str true region
    kept: np.ndarray  # (N_kept,) int64 indices of the neurons used
    n_splits: int
    dropped: dict[str, int] = field(default_factory=dict)  # region -> neurons, left out (too few)

    def metrics(self, prefix: str = "region") -> dict[str, float]:
        return {
            f"{prefix}_accuracy": self.accuracy,
            f"{prefix}_balanced_accuracy": self.balanced_accuracy,
            f"{prefix}_chance_majority": self.chance_majority,
            f"{prefix}_chance_uniform": self.chance_uniform,
        }


def classify_regions(
    features: np.ndarray,
    regions: Sequence[str] | np.ndarray,
    *,
    n_splits: int = 5,
    C: float = 1.0,
    seed: int = 0,
    max_iter: int = 2000,
) -> RegionResult:
    """Stratified ``n_splits``-fold logistic regression from per-neuron features (N, D) to regions (N,)."""
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold, cross_val_predict
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    x = np.asarray(features, dtype=np.float64)
    y_all = np.asarray(regions).astype(str)
    if x.ndim != 2:
        raise invalid("features", "must be (N, D): one row per neuron", x.shape, kind=DataError)
    if y_all.shape != (x.shape[0],):
        raise invalid("regions", f"must have one region per neuron ({x.shape[0]})", y_all.shape,
                      kind=DataError)
    if not np.all(np.isfinite(x)):
        raise invalid("features", "must be finite", int(np.sum(~np.isfinite(x))), kind=DataError)
    if n_splits < 2:
        raise invalid("n_splits", "must be >= 2", n_splits, kind=ConfigError)
    if not C > 0:
        raise invalid("C", "must be > 0", C, kind=ConfigError)
    names, counts = np.unique(y_all, return_counts=True)
    dropped = {str(r): int(c) for r, c in zip(names, counts, strict=True) if c < n_splits}
    if dropped:
        log.info("regions with fewer than %s neurons left out: %s", n_splits, dropped)
    kept = np.flatnonzero(~np.isin(y_all, list(dropped)))
    classes = np.array([r for r in names if r not in dropped])
    if classes.size < 2:
        raise invalid("regions", f"need at least 2 regions with >= {n_splits} neurons each",
                      dict(zip(names.tolist(), counts.tolist(), strict=True)),
                      "pool more sessions, or lower n_splits", kind=DataError)
    y = np.searchsorted(classes, y_all[kept])  # (N_kept,) class index
    model = make_pipeline(StandardScaler(), LogisticRegression(C=C, max_iter=max_iter))
    cv = StratifiedKFold(n_splits=n_splits, shuffle=True, random_state=seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        pred = np.asarray(cross_val_predict(model, x[kept], y, cv=cv), dtype=np.int64)
    _, class_counts = np.unique(y, return_counts=True)
    res = RegionResult(
        classes=classes, accuracy=accuracy(pred, y), balanced_accuracy=balanced_accuracy(pred, y),
        chance_majority=float(class_counts.max() / class_counts.sum()), chance_uniform=1.0 / classes.size,
        confusion=confusion_matrix(pred, y, classes.size), pred=classes[pred], true=classes[y],
        kept=kept, n_splits=n_splits, dropped=dropped,
    )
    log.info("region classification: %s neurons, %s regions, accuracy %.3f (chance %.3f), balanced %.3f",
             kept.size, classes.size, res.accuracy, res.chance_majority, res.balanced_accuracy)
    return res


def psth_features(
    spikes: np.ndarray,
    *,
    rows: np.ndarray | None = None,
    choice: np.ndarray | None = None,
    smooth_bins: float = 0.0,
    zscore_per_neuron: bool = False,
) -> np.ndarray:
    """(N, F) features per neuron: its trial-averaged PSTH (mean count per bin) over ``rows`` of (K, T, N).

    With ``choice`` (K,) in {0, 1} the PSTHs of the two choices are concatenated (F = 2T), else F = T.
    ``smooth_bins`` > 0 smooths over time with a Gaussian of that sigma. ``zscore_per_neuron`` removes each
    neuron's mean and scale (keeping only the PSTH's shape); :func:`classify_regions` always z-scores each
    feature across neurons.
    """
    s = np.asarray(spikes, dtype=np.float64)
    if s.ndim != 3:
        raise invalid("spikes", "must be (K, T, N) counts", s.shape, kind=DataError)
    sel = np.arange(s.shape[0]) if rows is None else np.asarray(rows)
    if sel.size == 0:
        raise invalid("rows", "must select at least one trial", 0, kind=DataError)
    groups: list[np.ndarray]
    if choice is None:
        groups = [sel]
    else:
        c = np.asarray(choice).reshape(-1)
        if c.shape[0] != s.shape[0]:
            raise invalid("choice", f"must have one label per trial ({s.shape[0]})", c.shape[0],
                          kind=DataError)
        groups = [sel[c[sel] == v] for v in (0, 1)]
        if any(g.size == 0 for g in groups):
            raise invalid("choice", "needs trials of both choices among the rows", np.unique(c[sel]).tolist(),
                          "pass choice=None to use one PSTH over all trials", kind=DataError)
    psths = [s[g].mean(axis=0) for g in groups]  # each (T, N)
    if smooth_bins > 0:
        t = np.arange(s.shape[1])
        kern = np.exp(-0.5 * ((t[:, None] - t[None, :]) / smooth_bins) ** 2)  # (T, T)
        kern /= kern.sum(axis=1, keepdims=True)
        psths = [kern @ p for p in psths]
    feats = np.concatenate(psths, axis=0).T  # (N, F)
    if zscore_per_neuron:
        sd = feats.std(axis=1, keepdims=True)
        feats = (feats - feats.mean(axis=1, keepdims=True)) / np.where(sd > 0, sd, 1.0)
    return feats


def _region_colours(names: np.ndarray) -> dict[str, tuple[float, float, float, float]]:
    from matplotlib import colormaps

    cmap = colormaps["tab20" if names.size > 10 else "tab10"]
    return {str(r): cmap(i % cmap.N) for i, r in enumerate(names)}


def project_2d(features: np.ndarray, *, method: str = "pca", seed: int = 0) -> np.ndarray:
    """(N, D) -> (N, 2): PCA of the z-scored features, or t-SNE (``method="tsne"``)."""
    x = np.asarray(features, dtype=np.float64)
    if x.ndim != 2 or x.shape[0] < 3:
        raise invalid("features", "must be (N >= 3, D)", x.shape, kind=DataError)
    sd = x.std(axis=0)
    z = (x - x.mean(axis=0)) / np.where(sd > 0, sd, 1.0)
    if method == "pca":
        u, sv, _ = np.linalg.svd(z, full_matrices=False)
        out = u[:, :2] * sv[:2]
        return np.pad(out, ((0, 0), (0, 2 - out.shape[1])))
    if method == "tsne":
        from sklearn.manifold import TSNE

        perplexity = float(min(30.0, (x.shape[0] - 1) / 3))
        return np.asarray(TSNE(n_components=2, perplexity=perplexity, random_state=seed, init="pca")
                          .fit_transform(z))
    raise invalid("method", "must be 'pca' or 'tsne'", method, kind=ConfigError)


def plot_projection(
    features: np.ndarray,
    regions: Sequence[str] | np.ndarray,
    path: str | Path,
    *,
    method: str = "pca",
    title: str = "",
    seed: int = 0,
) -> Path:
    """Scatter of the 2-D projection of per-neuron features, coloured by region, saved as PNG."""
    from matplotlib.figure import Figure

    reg = np.asarray(regions).astype(str)
    xy = project_2d(features, method=method, seed=seed)  # (N, 2)
    if reg.shape != (xy.shape[0],):
        raise invalid("regions", f"must have one region per neuron ({xy.shape[0]})", reg.shape,
                      kind=DataError)
    names = np.unique(reg)
    colours = _region_colours(names)
    fig = Figure(figsize=(6, 5), dpi=120)
    ax = fig.add_subplot()
    for r in names:
        m = reg == r
        ax.scatter(xy[m, 0], xy[m, 1], s=10, color=colours[str(r)], label=f"{r} ({int(m.sum())})", alpha=0.8)
    ax.set_xlabel(f"{method.upper()} 1")
    ax.set_ylabel(f"{method.upper()} 2")
    ax.set_title(title or f"neurons by region ({method})")
    ax.legend(fontsize=7, markerscale=1.5, loc="best")
    fig.tight_layout()
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, format="png")
    return out


def plot_confusion(
    result: RegionResult, path: str | Path, *, title: str = "", normalise: bool = True
) -> Path:
    """The confusion matrix (rows = true region; row-normalised to recall when ``normalise``) as PNG."""
    from matplotlib.figure import Figure

    cm = result.confusion.astype(np.float64)
    if normalise:
        cm = cm / np.maximum(cm.sum(axis=1, keepdims=True), 1.0)
    c = result.classes.size
    fig = Figure(figsize=(1.0 + 0.55 * c, 0.8 + 0.5 * c), dpi=120)
    ax = fig.add_subplot()
    im = ax.imshow(cm, cmap="Blues", vmin=0.0, vmax=1.0 if normalise else None)
    ax.set_xticks(range(c), [str(r) for r in result.classes], rotation=45, ha="right")
    ax.set_yticks(range(c), [str(r) for r in result.classes])
    ax.set_xlabel("predicted region")
    ax.set_ylabel("true region")
    for i in range(c):
        for j in range(c):
            txt = f"{cm[i, j]:.2f}" if normalise else f"{int(cm[i, j])}"
            ax.text(j, i, txt, ha="center", va="center", fontsize=7,
                    color="white" if cm[i, j] > 0.5 * max(cm.max(), 1e-12) else "black")
    fig.colorbar(im, ax=ax, fraction=0.046)
    ax.set_title(title or f"acc {result.accuracy:.2f} (chance {result.chance_majority:.2f}), "
                 f"bal {result.balanced_accuracy:.2f}", fontsize=9)
    fig.tight_layout()
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, format="png")
    return out
