"""The in-memory Session: everything NEDS needs from one probe insertion of one IBL session."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd


@dataclass
class Session:
    """One probe insertion of one session, as loaded from a ONE cache.

    ``spike_units`` indexes rows of ``units`` (0..n_units-1), not raw cluster ids; ``units.cluster_id``
    keeps the original ids. Times are seconds on the session clock.
    """

    eid: str
    probe: str  # probe collection name, e.g. "probe00"
    spike_times: np.ndarray  # (S,) float64 seconds, sorted
    spike_units: np.ndarray  # (S,) int32 row index into ``units``
    units: pd.DataFrame  # (N rows) cluster_id, uuid, label, channel, depth, allen_id, region, firing_rate
    trials: pd.DataFrame  # (K rows) IBL trials table columns (intervals_0, stimOn_times, choice, ...)
    wheel_times: np.ndarray  # (W,) float64 seconds, one per encoder tick
    wheel_position: np.ndarray  # (W,) float64 radians
    motion_energy: dict[str, tuple[np.ndarray, np.ndarray]]  # camera -> ((F,) times s, (F,) ROI ME)
    meta: dict[str, object] = field(default_factory=dict)  # subject, lab, date, number, session path

    @property
    def n_units(self) -> int:
        return len(self.units)

    @property
    def duration(self) -> float:
        return float(self.spike_times[-1]) if self.spike_times.size else 0.0

    def summary(self) -> str:
        return (
            f"{self.eid}/{self.probe}: {self.n_units} units, {self.spike_times.size} spikes, "
            f"{len(self.trials)} trials, {self.duration:.0f} s"
        )
