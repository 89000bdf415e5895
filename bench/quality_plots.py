"""PNG plots of the quality report (matplotlib's object API, no pyplot, imported inside the functions).

Region projection and confusion-matrix plots are :func:`training.regions.plot_projection` and
:func:`training.regions.plot_confusion`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from bench.quality_report import TASKS
from neds_rt.errors import DataError, invalid


def _save(fig: Any, path: Path | str) -> Path:
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(out, format="png")
    return out


def plot_multi_vs_single(results: Mapping[str, Mapping[str, Mapping[str, float | None]]],
                         path: Path | str) -> Path:
    """One panel per task: single-session NEDS (x) vs multi-session NEDS (y), one point per held-out
    session, with the diagonal (above it: pretraining helped)."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(3.0 * len(TASKS), 3.2), dpi=110)
    for i, (task, metric) in enumerate(TASKS.items()):
        ax = fig.add_subplot(1, len(TASKS), i + 1)
        pts = [(per.get("neds_single", {}).get(metric), per.get("neds_multi", {}).get(metric), eid)
               for eid, per in results.items()]
        pts = [(x, y, e) for x, y, e in pts if x is not None and y is not None]
        if pts:
            xs, ys = np.array([p[0] for p in pts]), np.array([p[1] for p in pts])
            ax.scatter(xs, ys, s=30, color="tab:blue", zorder=3)
            lo, hi = float(min(xs.min(), ys.min())), float(max(xs.max(), ys.max()))
            pad = max(0.05 * (hi - lo), 0.01)
            ax.plot([lo - pad, hi + pad], [lo - pad, hi + pad], color="0.5", lw=1, ls="--")
            ax.set_xlim(lo - pad, hi + pad)
            ax.set_ylim(lo - pad, hi + pad)
        else:
            ax.text(0.5, 0.5, "no scores", ha="center", va="center", transform=ax.transAxes)
        ax.ticklabel_format(useOffset=False)
        ax.set_title(f"{task} ({metric})", fontsize=8)
        ax.set_xlabel("single-session NEDS", fontsize=8)
        if i == 0:
            ax.set_ylabel("multi-session NEDS", fontsize=8)
        ax.tick_params(labelsize=7)
    return _save(fig, path)


def plot_traces(true: np.ndarray, preds: Mapping[str, np.ndarray], path: Path | str, *, target: str,
                trials: Sequence[int] = (0, 1, 2), bin_size: float = 0.02, t_offset: float = -0.5) -> Path:
    """Predicted vs true traces of a continuous target (K, T) for a few trials (one panel each)."""
    from matplotlib.figure import Figure

    y = np.asarray(true)
    if y.ndim != 2:
        raise invalid(f"true {target}", "must be (K, T) per-trial traces", y.shape, kind=DataError)
    for name, p in preds.items():
        if np.shape(p) != y.shape:
            raise invalid(f"{name} {target} predictions", f"must have the shape of the truth {y.shape}",
                          np.shape(p), kind=DataError)
    rows = [t for t in trials if 0 <= t < y.shape[0]]
    if not rows:
        raise invalid("trials", f"must name rows in [0, {y.shape[0]})", list(trials), kind=DataError)
    time = t_offset + bin_size * np.arange(y.shape[1])  # (T,) seconds from stimulus onset
    fig = Figure(figsize=(4.0 * len(rows), 2.8), dpi=110)
    for i, r in enumerate(rows):
        ax = fig.add_subplot(1, len(rows), i + 1)
        ax.plot(time, y[r], color="k", lw=1.6, label="true")
        for name, p in preds.items():
            ax.plot(time, np.asarray(p)[r], lw=1.1, label=name)
        ax.set_title(f"{target}, test trial {r}", fontsize=8)
        ax.set_xlabel("time from stimulus (s)", fontsize=8)
        ax.tick_params(labelsize=7)
        if i == 0:
            ax.set_ylabel(f"{target} (scaled)", fontsize=8)
            ax.legend(fontsize=7)
    return _save(fig, path)


def plot_psths(counts: np.ndarray, rates: Mapping[str, np.ndarray], neurons: Sequence[int], path: Path | str,
               *, bin_size: float = 0.02, t_offset: float = -0.5) -> Path:
    """Trial-averaged PSTH (spikes/s) of a few neurons: observed counts (K, T, N) vs each model's predicted
    expected counts (K, T, N) averaged over the same trials."""
    from matplotlib.figure import Figure

    y = np.asarray(counts, dtype=np.float64)
    if y.ndim != 3:
        raise invalid("counts", "must be (K, T, N) spike counts", y.shape, kind=DataError)
    cols = [n for n in neurons if 0 <= n < y.shape[2]]
    if not cols:
        raise invalid("neurons", f"must name columns in [0, {y.shape[2]})", list(neurons), kind=DataError)
    time = t_offset + bin_size * np.arange(y.shape[1])  # (T,)
    fig = Figure(figsize=(3.2 * len(cols), 2.8), dpi=110)
    for i, n in enumerate(cols):
        ax = fig.add_subplot(1, len(cols), i + 1)
        ax.plot(time, y[:, :, n].mean(axis=0) / bin_size, color="k", lw=1.6, label="observed")
        for name, r in rates.items():
            ax.plot(time, np.asarray(r)[:, :, n].mean(axis=0) / bin_size, lw=1.1, label=name)
        ax.set_title(f"neuron {n}", fontsize=8)
        ax.set_xlabel("time from stimulus (s)", fontsize=8)
        ax.tick_params(labelsize=7)
        if i == 0:
            ax.set_ylabel("rate (spikes/s)", fontsize=8)
            ax.legend(fontsize=7)
    return _save(fig, path)
