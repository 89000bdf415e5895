"""Shared helpers of the benchmarks: latency percentiles, machine info, JSON results, latency plots, tables.

Every benchmark reports latency as percentiles (p50, p90, p99, p99.9, max; DESIGN.md: never a mean alone),
writes one JSON file with the machine it ran on, and, where it has latency samples, a PNG of their
distributions. matplotlib runs on the Agg backend (no display needed).
"""

from __future__ import annotations

import json
import math
import os
import platform
from collections.abc import Mapping, Sequence
from importlib import metadata
from pathlib import Path
from typing import Any, Final

import numpy as np

from neds_rt.errors import DataError, invalid

PERCENTILES: Final = (("p50", 50.0), ("p90", 90.0), ("p99", 99.0), ("p99.9", 99.9))
LATENCY_KEYS: Final = (*(name for name, _ in PERCENTILES), "max")


def latency_percentiles(samples: np.ndarray | Sequence[float]) -> dict[str, float]:
    """p50, p90, p99, p99.9 and max of latency samples (any unit; the result keeps it), plus min, mean, n."""
    x = np.asarray(samples, dtype=np.float64).ravel()
    if x.size == 0:
        raise invalid("latency samples", "must not be empty", 0, "run at least one step", kind=DataError)
    if not np.isfinite(x).all():
        raise invalid("latency samples", "must be finite", "NaN/inf present", kind=DataError)
    out = {name: float(np.percentile(x, q)) for name, q in PERCENTILES}
    out["max"] = float(x.max())
    out["min"] = float(x.min())  # the best case: what a quiet machine gives
    out["mean"] = float(x.mean())
    out["n"] = int(x.size)
    return out


def machine_info(packages: Sequence[str] = ("numpy",)) -> dict[str, object]:
    """Platform, cores available to this process, 1-minute load average and versions of ``packages``."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:
        cores = os.cpu_count() or 0
    info: dict[str, object] = {
        "platform": platform.platform(), "machine": platform.machine(), "processor": platform.processor(),
        "cpu_count": os.cpu_count(), "cores_available": cores, "loadavg_1m_at_start": os.getloadavg()[0],
        "python": platform.python_version(),
    }
    for name in packages:
        try:
            info[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            info[name] = None
    return info


def _plain(value: Any) -> Any:
    """numpy scalars/arrays and Paths -> JSON types; non-finite floats -> None (strict JSON)."""
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    if isinstance(value, np.ndarray):
        return _plain(value.tolist())
    if isinstance(value, np.generic):
        return _plain(value.item())
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def write_json(path: Path, result: Mapping[str, Any]) -> Path:
    """Write ``result`` as strict JSON (no NaN/Infinity; those become null), atomically; return the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(_plain(result), indent=2, allow_nan=False))
    tmp.replace(path)
    return path


def plot_latency(
    path: Path, series: Mapping[str, np.ndarray], title: str, unit: str = "ms",
    budget: float | None = None,
) -> Path:
    """PNG of latency distributions: log-binned histograms (left) and tail 1 - CDF on log axes (right).

    ``series`` maps a row label to its (n,) latency samples in ``unit``; ``budget`` draws a vertical line.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    data = {k: np.asarray(v, dtype=np.float64) for k, v in series.items() if np.asarray(v).size}
    if not data:
        raise invalid("plot_latency series", "needs at least one non-empty series", list(series),
                      kind=DataError)
    lo = max(min(float(v[v > 0].min()) if (v > 0).any() else 1e-6 for v in data.values()), 1e-6)
    hi = max(float(v.max()) for v in data.values())
    edges = np.geomspace(lo * 0.9, hi * 1.1 + 1e-12, 80)  # log-spaced bin edges
    fig, (ax_hist, ax_tail) = plt.subplots(1, 2, figsize=(14, 5.5))
    for label, v in data.items():
        ax_hist.hist(v, bins=edges, histtype="step", linewidth=1.4, label=f"{label} (n={v.size})")
        s = np.sort(v)
        tail = 1.0 - np.arange(s.size) / s.size  # P(latency >= s[i])
        ax_tail.step(s, tail, where="post", linewidth=1.4, label=label)
    for ax in (ax_hist, ax_tail):
        ax.set_xscale("log")
        ax.set_xlabel(f"latency ({unit})")
        ax.grid(True, which="both", alpha=0.3)
        if budget is not None:
            ax.axvline(budget, color="k", linestyle="--", linewidth=1.0, label=f"budget {budget:g} {unit}")
    ax_hist.set_ylabel("steps")
    ax_hist.set_title("distribution")
    ax_tail.set_yscale("log")
    ax_tail.set_ylabel("P(latency >= x)")
    ax_tail.set_title("tail (p99 at 1e-2, p99.9 at 1e-3)")
    for level in (1e-2, 1e-3):
        ax_tail.axhline(level, color="grey", linestyle=":", linewidth=0.8)
    ax_hist.legend(fontsize=7, loc="upper right")
    fig.suptitle(title)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def console() -> Any:
    """A rich Console; when output is a pipe or log file, wide enough to keep table rows on one line."""
    from rich.console import Console

    con = Console()
    return con if con.is_terminal else Console(width=190)
