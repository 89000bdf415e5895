"""Ground truth of a simulated probe: the latents and the rate model behind its spikes.

Written by the simulator beside (not inside) the ONE datasets, at ``<root>/_groundtruth/<eid>/<probe>.npz``.
Rates are piecewise constant on the fine grid (step ``g`` covers ``[t0 + g * step, t0 + (g + 1) * step)``) and
spikes were drawn as an exact Poisson process of that rate, so :meth:`GroundTruth.rates` (the rate integrated
over each bin) is the expected spike count per bin.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Final

import numpy as np
import numpy.typing as npt

from neds_rt.errors import ConfigError, DataError, invalid
from streams.sim_neurons import unit_rates

GROUND_TRUTH_DIR: Final = "_groundtruth"
_KEYS: Final = (
    "latents",
    "latent_names",
    "t0",
    "step",
    "cluster_ids",
    "base_rate",
    "loadings",
    "log_offset",
    "regions",
)


def ground_truth_path(root: Path, eid: str, probe: str) -> Path:
    return Path(root) / GROUND_TRUTH_DIR / str(eid) / f"{probe}.npz"


@dataclass
class GroundTruth:
    """Latents on the fine grid and the per-unit rate model of one probe of one simulated session."""

    eid: str
    probe: str
    t0: float  # s, start of fine step 0
    step: float  # s, fine-grid step
    latents: np.ndarray  # (G, L) float32 latents per fine step
    latent_names: tuple[str, ...]  # (L,)
    cluster_ids: np.ndarray  # (N,) int64, the column order of rates()
    base_rate: np.ndarray  # (N,) float64 Hz, session-mean rate
    loadings: np.ndarray  # (N, L) float32
    log_offset: np.ndarray  # (N,) float32; rate = exp(log_offset + loadings . z) Hz
    regions: np.ndarray  # (N,) str Beryl acronym per unit

    @property
    def n_units(self) -> int:
        return int(self.cluster_ids.shape[0])

    def fine_rates(self, g0: int, g1: int) -> np.ndarray:
        """(g1 - g0, N) float32 rates in Hz on fine steps g0..g1-1 (the rates spikes were drawn from)."""
        return unit_rates(self.latents[g0:g1], self.loadings, self.log_offset)

    def rates(self, starts: npt.ArrayLike, n_bins: int, bin_size: float = 0.02) -> np.ndarray:
        """(W, T, N) float32 expected spikes per bin of windows starting at ``starts`` (s).

        Bin ``b`` of window ``w`` covers ``[starts[w] + b * bin_size, starts[w] + (b + 1) * bin_size)``; its
        value is the integral of the piecewise-constant rate over it (0 outside the session's grid).
        """

        def values(idx: np.ndarray) -> np.ndarray:
            z = self.latents[idx.reshape(-1)]  # (W * M, L)
            return unit_rates(z, self.loadings, self.log_offset).reshape(*idx.shape, self.n_units)

        return _integrate(values, self.n_units, self._grid(), starts, n_bins, bin_size, mean=False)

    def latents_at(self, starts: npt.ArrayLike, n_bins: int, bin_size: float = 0.02) -> np.ndarray:
        """(W, T, L) float32 latents averaged over each bin (0 outside the session's grid)."""

        def values(idx: np.ndarray) -> np.ndarray:
            return self.latents[idx]

        return _integrate(values, self.latents.shape[1], self._grid(), starts, n_bins, bin_size, mean=True)

    def _grid(self) -> tuple[float, float, int]:
        return self.t0, self.step, int(self.latents.shape[0])


def _integrate(
    values: Callable[[np.ndarray], np.ndarray],
    n_out: int,
    grid: tuple[float, float, int],
    starts: npt.ArrayLike,
    n_bins: int,
    bin_size: float,
    mean: bool,
    max_bins: int = 512,
    windows_per_chunk: int = 16,
) -> np.ndarray:
    """Exact integral (or mean) over bins of a piecewise-constant signal on the fine grid.

    ``values(idx)`` maps (W, M) fine-step indices to (W, M, D) values. Long windows are cut into pieces of at
    most ``max_bins`` bins so memory stays bounded.
    """
    s = np.asarray(starts, dtype=np.float64).reshape(-1)
    if n_bins <= 0:
        raise invalid("n_bins", "must be positive", n_bins, kind=ConfigError)
    if not bin_size > 0:
        raise invalid("bin_size", "must be > 0 seconds", bin_size, kind=ConfigError)
    if not np.isfinite(s).all():
        raise invalid("window starts", "must be finite", s[~np.isfinite(s)][:3], kind=DataError)
    out = np.zeros((s.size, n_bins, n_out), dtype=np.float32)  # (W, T, D)
    for p0 in range(0, n_bins, max_bins):
        nb = min(max_bins, n_bins - p0)
        piece = s + p0 * bin_size
        for w0 in range(0, s.size, windows_per_chunk):
            out[w0 : w0 + windows_per_chunk, p0 : p0 + nb] = _integrate_piece(
                values, grid, piece[w0 : w0 + windows_per_chunk], nb, bin_size, mean
            )
    return out


def _integrate_piece(
    values: Callable[[np.ndarray], np.ndarray],
    grid: tuple[float, float, int],
    starts: np.ndarray,
    n_bins: int,
    bin_size: float,
    mean: bool,
) -> np.ndarray:
    t0, step, n_steps = grid
    edges = starts[:, None] + np.arange(n_bins + 1) * bin_size  # (W, T+1) s
    pos = (edges - t0) / step  # (W, T+1) position on the fine grid, in steps
    g_lo = np.floor(pos[:, 0]).astype(np.int64)  # (W,) first fine step touched
    x = pos - g_lo[:, None]  # (W, T+1) in steps from g_lo
    n_q = int(np.ceil(bin_size / step)) + 1  # fine steps one bin can touch
    m = int(np.floor(x[:, -1]).max()) + n_q + 1  # fine steps per window
    idx = g_lo[:, None] + np.arange(m)  # (W, M)
    inside = (idx >= 0) & (idx < n_steps)
    vals = values(np.clip(idx, 0, n_steps - 1))  # (W, M, D)
    if not inside.all():
        vals = vals * inside[..., None].astype(vals.dtype)
    ratio = bin_size / step
    if abs(ratio - round(ratio)) < 1e-9 and round(ratio) >= 1:  # bins tile whole steps: no gathers needed
        r = round(ratio)
        phase = x[:, :1, None]  # (W, 1, 1) offset of the window start into its first step, in steps
        v = vals[:, : n_bins * r + 1]
        whole = v[:, : n_bins * r].reshape(v.shape[0], n_bins, r, v.shape[2]).sum(axis=2)  # (W, T, D)
        res = (whole - phase * v[:, 0 : n_bins * r : r] + phase * v[:, r : n_bins * r + 1 : r]) * step
        return np.asarray(res / bin_size if mean else res, dtype=np.float32)
    lo, hi = x[:, :-1], x[:, 1:]  # (W, T) bin edges in steps
    m0 = np.floor(lo).astype(np.int64)
    rows = np.arange(vals.shape[0])[:, None]
    res = np.zeros((vals.shape[0], n_bins, vals.shape[2]), dtype=np.float64)  # (W, T, D)
    for q in range(n_q):  # each bin = sum of overlap x value over the few fine steps it touches
        mq = m0 + q
        overlap = np.clip(np.minimum(hi, mq + 1) - np.maximum(lo, mq), 0.0, None) * step  # (W, T) s
        res += overlap[..., None] * vals[rows, np.minimum(mq, m - 1)]
    if mean:
        res /= bin_size
    return res.astype(np.float32)


def save_ground_truth(path: Path, gt: GroundTruth) -> None:
    """Write one probe's ground truth as an uncompressed npz (no pickles)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        np.savez(
            f,
            latents=gt.latents.astype(np.float32),
            latent_names=np.array(gt.latent_names),
            t0=np.float64(gt.t0),
            step=np.float64(gt.step),
            cluster_ids=gt.cluster_ids.astype(np.int64),
            base_rate=gt.base_rate.astype(np.float64),
            loadings=gt.loadings.astype(np.float32),
            log_offset=gt.log_offset.astype(np.float32),
            regions=np.asarray(gt.regions).astype(str),
            eid=np.array(gt.eid),
            probe=np.array(gt.probe),
        )


def load_ground_truth(root: Path, eid: str, probe: str) -> GroundTruth:
    """The ground truth of ``probe`` of session ``eid`` in the simulated cache at ``root``."""
    path = ground_truth_path(root, eid, probe)
    if not path.is_file():
        raise invalid(
            f"ground truth {path}",
            "file not found",
            str(path),
            "only sessions written by `neds-rt simulate` have ground truth; check the eid, probe and root",
            kind=DataError,
        )
    try:
        with np.load(path, allow_pickle=False) as f:
            missing = [k for k in _KEYS if k not in f.files]
            if missing:
                raise invalid(
                    f"ground truth {path}", "lacks arrays", missing, "re-run the simulator", kind=DataError
                )
            arrays = {k: f[k] for k in _KEYS}
    except (OSError, ValueError) as err:
        if isinstance(err, DataError):
            raise
        raise invalid(
            f"ground truth {path}", "cannot be read", str(err), "re-run the simulator", kind=DataError
        ) from err
    return GroundTruth(
        eid=str(eid),
        probe=str(probe),
        t0=float(arrays["t0"]),
        step=float(arrays["step"]),
        latents=arrays["latents"],
        latent_names=tuple(str(n) for n in arrays["latent_names"]),
        cluster_ids=arrays["cluster_ids"],
        base_rate=arrays["base_rate"],
        loadings=arrays["loadings"],
        log_offset=arrays["log_offset"],
        regions=arrays["regions"],
    )
