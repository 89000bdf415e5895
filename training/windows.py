"""Continuous training windows for the streaming model, cut anywhere in the session (not only at stimOn).

Windows come from :class:`ContinuousArrays` (the whole session on one 20 ms grid) and are packed into the
same :class:`TrialArrays` container the trainer already batches, with two differences: choice and block are
per-bin labels (K, T) of the trial each bin belongs to, ``-1`` where the bin lies outside a usable trial
(inter-trial gaps, dropped trials); and ``trial_index`` holds the window's start bin.
"""

from __future__ import annotations

import logging

import numpy as np

from neds_rt.errors import DataError, invalid
from training.arrays import SPLITS, ContinuousArrays, TrialArrays
from training.data import continuous_windows

log = logging.getLogger(__name__)


def build_window_arrays(
    cont: ContinuousArrays, window_bins: int = 100, stride: int | None = None, seed: int = 0
) -> TrialArrays:
    """Windows of ``window_bins`` bins lying wholly inside one split, each split cut at a random phase."""
    rng = np.random.default_rng(seed)
    starts, splits = [], []
    for split in range(len(SPLITS)):
        s = continuous_windows(cont, window_bins, stride, split, rng)  # (W_split,) start bins
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
        meta={"kind": "continuous windows", "window_bins": window_bins, "stride": stride or window_bins},
    )
    log.info("session %s: %s continuous windows (train/val/test %s)", cont.eid, start.size,
             "/".join(str(int((split_of == s).sum())) for s in range(len(SPLITS))))
    return arrays
