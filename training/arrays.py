"""The binned arrays NEDS trains on: the contract between ``training.data`` and the model/trainer."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Final

import numpy as np

SPLITS: Final = ("train", "val", "test")
TRAIN, VAL, TEST = 0, 1, 2
N_CHOICE: Final = 2  # choice -1/+1 -> 0/1
N_BLOCK: Final = 3  # probabilityLeft 0.2/0.5/0.8 -> 0/1/2


@dataclass
class Normalisation:
    """Per-session min-max scaling of the continuous behaviour, fit on training trials only."""

    wheel_min: float
    wheel_max: float
    whisker_min: float
    whisker_max: float

    def scale(self, name: str, x: np.ndarray) -> np.ndarray:
        lo, hi = getattr(self, f"{name}_min"), getattr(self, f"{name}_max")
        return ((x - lo) / max(hi - lo, 1e-12)).astype(np.float32)

    def unscale(self, name: str, x: np.ndarray) -> np.ndarray:
        lo, hi = getattr(self, f"{name}_min"), getattr(self, f"{name}_max")
        return (x * (hi - lo) + lo).astype(np.float32)


@dataclass
class TrialArrays:
    """Trial-aligned windows of one session (stimOn -0.5 s .. +1.5 s, 100 bins of 20 ms)."""

    eid: str  # the session key everywhere in training
    probe: str
    unit_ids: np.ndarray  # (N,) int64 cluster ids kept (the unit vocabulary, in column order)
    regions: np.ndarray  # (N,) str Beryl acronym per unit
    spikes: np.ndarray  # (K, T, N) uint16 spike counts per 20 ms bin
    wheel: np.ndarray  # (K, T) float32 wheel speed, min-max scaled (train trials), ~[0, 1]
    whisker: np.ndarray  # (K, T) float32 whisker motion energy, min-max scaled (train trials)
    choice: np.ndarray  # (K,) int64 in {0, 1}
    block: np.ndarray  # (K,) int64 in {0, 1, 2}
    trial_index: np.ndarray  # (K,) int64 row of the session's trials table
    window_start: np.ndarray  # (K,) float64 seconds, start of bin 0
    split: np.ndarray  # (K,) int8 TRAIN / VAL / TEST
    norm: Normalisation
    bin_size: float = 0.02
    meta: dict[str, object] = field(default_factory=dict)

    @property
    def n_units(self) -> int:
        return int(self.unit_ids.shape[0])

    @property
    def n_bins(self) -> int:
        return int(self.spikes.shape[1])

    @property
    def labels_per_trial(self) -> bool:
        """Whether choice and block are one label per trial window ((K,)), not per bin (continuous windows
        built as trial arrays carry (K, T))."""
        return np.asarray(self.choice).ndim == 1

    def subset(self, split: int) -> np.ndarray:
        """Trial rows (K_split,) of one split."""
        return np.flatnonzero(self.split == split)


@dataclass
class ContinuousArrays:
    """The whole session binned on one 20 ms grid (for streaming training and replay checks)."""

    eid: str
    probe: str
    unit_ids: np.ndarray  # (N,) int64 cluster ids, same vocabulary and order as TrialArrays
    regions: np.ndarray  # (N,) str
    t0: float  # seconds, start of bin 0
    spikes: np.ndarray  # (T_total, N) uint16 spike counts per bin
    wheel: np.ndarray  # (T_total,) float32 scaled wheel speed
    whisker: np.ndarray  # (T_total,) float32 scaled whisker motion energy
    choice: np.ndarray  # (T_total,) int64 choice of the trial the bin belongs to, -1 outside usable trials
    block: np.ndarray  # (T_total,) int64 block of the trial the bin belongs to, -1 outside trials
    split: np.ndarray  # (T_total,) int8 split of the trial each bin belongs to (ITI bins: next trial's)
    norm: Normalisation
    bin_size: float = 0.02
