"""Continuous training windows for the streaming model, cut anywhere in the session (not only at stimOn).

Windows come from :class:`ContinuousArrays` (the whole session on one 20 ms grid) and are packed into the
same :class:`TrialArrays` container the trainer already batches, with two differences: choice and block are
per-bin labels (K, T) of the trial each bin belongs to, ``-1`` where the bin lies outside a usable trial
(inter-trial gaps, dropped trials); and ``trial_index`` holds the window's start bin. Time ranges passed as
``exclude`` (e.g. the TEST trial windows a streaming model is later scored on) are kept out of every window.
"""

from __future__ import annotations

import logging
from dataclasses import replace

import numpy as np

from neds_rt.errors import DataError, invalid
from training.arrays import SPLITS, ContinuousArrays, TrialArrays
from training.data import continuous_windows

log = logging.getLogger(__name__)


def excluded_bins(cont: ContinuousArrays, ranges: np.ndarray) -> np.ndarray:
    """(T_total,) bool: bins of the continuous grid that overlap any [start, end) range in ``ranges`` (E, 2)
    seconds (a bin [t0 + k * bin_size, t0 + (k + 1) * bin_size) overlapping a range by any amount)."""
    r = np.asarray(ranges, dtype=np.float64).reshape(-1, 2)  # (E, 2) seconds
    if not np.isfinite(r).all() or (r[:, 1] < r[:, 0]).any():
        raise invalid("exclude", "must be finite [start, end) second ranges with end >= start",
                      r[~(np.isfinite(r).all(axis=1) & (r[:, 1] >= r[:, 0]))][:3].tolist(), kind=DataError)
    n_total = cont.spikes.shape[0]
    lo = np.clip(np.floor((r[:, 0] - cont.t0) / cont.bin_size), 0, n_total).astype(np.int64)  # (E,) first bin
    hi = np.clip(np.ceil((r[:, 1] - cont.t0) / cont.bin_size), 0, n_total).astype(np.int64)  # (E,) past last
    edges = np.zeros(n_total + 1, dtype=np.int64)
    np.add.at(edges, lo, 1)
    np.add.at(edges, hi, -1)
    return np.cumsum(edges)[:n_total] > 0


def build_window_arrays(
    cont: ContinuousArrays, window_bins: int = 100, stride: int | None = None, seed: int = 0,
    exclude: np.ndarray | None = None,
) -> TrialArrays:
    """Windows of ``window_bins`` bins lying wholly inside one split, each split cut at a random phase.

    ``exclude`` (E, 2): [start, end) second ranges no window may touch (in any split); the stretches around
    them are cut as if the ranges were split boundaries."""
    rng = np.random.default_rng(seed)
    source = cont
    if exclude is not None:
        blocked = excluded_bins(cont, exclude)  # (T_total,) bins no window may use
        source = replace(cont, split=np.where(blocked, -1, cont.split).astype(np.int8))
    starts, splits = [], []
    for split in range(len(SPLITS)):
        s = continuous_windows(source, window_bins, stride, split, rng)  # (W_split,) start bins
        starts.append(s)
        splits.append(np.full(s.size, split, dtype=np.int8))
    start = np.concatenate(starts)  # (K,) start bin of each window
    split_of = np.concatenate(splits)  # (K,)
    if start.size == 0:
        raise invalid(
            f"session {cont.eid}", f"has no stretch of {window_bins} bins inside one split",
            cont.spikes.shape[0], "use shorter windows (--n-bins) or a longer session", kind=DataError,
        )
    idx = start[:, None] + np.arange(window_bins)[None, :]  # (K, T) bin indices
    arrays = TrialArrays(
        eid=cont.eid,
        probe=cont.probe,
        unit_ids=cont.unit_ids,
        regions=cont.regions,
        spikes=cont.spikes[idx],  # (K, T, N) uint16 counts
        wheel=cont.wheel[idx],  # (K, T) scaled
        whisker=cont.whisker[idx],  # (K, T) scaled
        choice=cont.choice[idx],  # (K, T) per-bin class, -1 outside usable trials
        block=cont.block[idx],  # (K, T)
        trial_index=start.astype(np.int64),
        window_start=cont.t0 + start * cont.bin_size,
        split=split_of,
        norm=cont.norm,
        bin_size=cont.bin_size,
        meta={"kind": "continuous windows", "window_bins": window_bins, "stride": stride or window_bins,
              "excluded_ranges": 0 if exclude is None else int(np.asarray(exclude).reshape(-1, 2).shape[0])},
    )
    log.info("session %s: %s continuous windows (train/val/test %s)", cont.eid, start.size,
             "/".join(str(int((split_of == s).sum())) for s in range(len(SPLITS))))
    return arrays
