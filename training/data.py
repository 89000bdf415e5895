"""Session -> binned arrays NEDS trains on: trial-aligned windows and the continuous session grid.

Follows the NEDS recipe (see /work/shared/IBL-DATA.md): windows ``stimOn - 0.5 s .. + 1.5 s`` in 100 bins of
20 ms; trials with NaN in a required column, a reaction time outside ``rt_range`` or ``choice == 0`` are
dropped; neurons with a mean session firing rate above ``min_rate_hz`` are kept (all quality labels); wheel
speed and left-camera whisker motion energy are min-max scaled per session on training trials only;
trials split 70/10/20 at random with a seed per (seed, session). Spikes are binned by
:func:`neds_rt.binning.bin_windows`, the one binning path of the project.
"""

from __future__ import annotations

import logging
import zlib
from dataclasses import asdict, dataclass
from typing import Final

import numpy as np
import pandas as pd

from neds_rt.binning import bin_windows
from neds_rt.errors import ConfigError, DataError, invalid
from streams.session import Session
from training.arrays import SPLITS, TRAIN, ContinuousArrays, Normalisation, TrialArrays
from training.behaviour import (
    MotionEnergyTrace,
    WheelTrace,
    left_motion_energy,
    motion_energy_on_bins,
    wheel_on_bins,
    wheel_speed_trace,
)

log = logging.getLogger(__name__)

REQUIRED_TRIAL_COLUMNS: Final = (
    "stimOn_times", "choice", "feedback_times", "probabilityLeft", "firstMovement_times", "feedbackType",
)
BLOCK_VALUES: Final = (0.2, 0.5, 0.8)  # probabilityLeft -> block label 0 / 1 / 2
BLOCK_ATOL: Final = 1e-3
TRIALS_DATASET: Final = "alf/_ibl_trials.table.pqt"


@dataclass
class DataConfig:
    """How a session becomes arrays. Defaults follow the NEDS paper.

    ``rt_range``: accepted reaction time ``firstMovement_times - stimOn_times`` in seconds, closed
    interval; the default (0.08, 2.0) keeps IBL's usual range (faster = anticipation, slower = disengaged).
    ``min_rate_hz``: a unit is kept when its mean firing rate over the session's spike range is strictly
    above this. ``split``: train/val/test fractions; the permutation is seeded by ``(seed, crc32(eid))``.
    """

    bin_size: float = 0.02  # seconds
    pre: float = 0.5  # seconds before stimOn
    post: float = 1.5  # seconds after stimOn
    min_rate_hz: float = 2.0
    rt_range: tuple[float, float] = (0.08, 2.0)
    split: tuple[float, float, float] = (0.7, 0.1, 0.2)
    seed: int = 0

    @property
    def n_bins(self) -> int:
        return round((self.pre + self.post) / self.bin_size)

    def check(self) -> None:
        """Raise :class:`ConfigError` on a value that breaks a rule."""
        if not self.bin_size > 0:
            raise invalid("DataConfig.bin_size", "must be > 0 seconds", self.bin_size)
        if not (self.pre >= 0 and self.post >= 0 and self.pre + self.post > 0):
            raise invalid("DataConfig.pre/post", "must be >= 0 with a positive sum", (self.pre, self.post))
        if abs(self.n_bins * self.bin_size - (self.pre + self.post)) > 1e-9:
            raise invalid("DataConfig.pre+post", "must be a whole number of bins",
                          (self.pre + self.post, self.bin_size), "pick pre/post as multiples of bin_size")
        lo, hi = self.rt_range
        if not lo < hi:
            raise invalid("DataConfig.rt_range", "needs low < high (seconds)", self.rt_range)
        fr = np.asarray(self.split, dtype=np.float64)
        if fr.shape != (3,) or np.any(fr < 0) or abs(fr.sum() - 1.0) > 1e-6:
            raise invalid("DataConfig.split", "must be three fractions >= 0 summing to 1", self.split,
                          "e.g. split=(0.7, 0.1, 0.2)")
        if not self.min_rate_hz >= 0:
            raise invalid("DataConfig.min_rate_hz", "must be >= 0 Hz", self.min_rate_hz)

    def as_dict(self) -> dict[str, object]:
        """Fields as JSON-ready values (tuples become lists)."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}


# ----------------------------------------------------------------------------------------------------------
# trials: filters, labels, split


def _trials_name(session: Session) -> str:
    return f"session {session.eid} ({TRIALS_DATASET})"


def _column(trials: pd.DataFrame, name: str, session: Session) -> np.ndarray:
    if name not in trials.columns:
        raise invalid(
            f"{_trials_name(session)}: column {name!r}", "is required", sorted(map(str, trials.columns)),
            "re-extract the trials table with this column", kind=DataError,
        )
    return np.asarray(pd.to_numeric(trials[name], errors="coerce"), dtype=np.float64)  # (K_all,)


def usable_trials(session: Session, cfg: DataConfig) -> tuple[np.ndarray, dict[str, int]]:
    """Rows of ``session.trials`` that pass every filter, and how many trials each filter dropped.

    A trial can fail several filters; each reason counts it (``"dropped"`` counts each trial once).
    """
    trials = session.trials
    cols = {name: _column(trials, name, session) for name in REQUIRED_TRIAL_COLUMNS}
    keep = np.ones(len(trials), dtype=bool)
    reasons: dict[str, int] = {}
    for name, values in cols.items():
        bad = ~np.isfinite(values)
        reasons[f"nan_{name}"] = int(bad.sum())
        keep &= ~bad
    rt = cols["firstMovement_times"] - cols["stimOn_times"]  # (K_all,) seconds
    lo, hi = cfg.rt_range
    with np.errstate(invalid="ignore"):
        bad_rt = np.isfinite(rt) & ((rt < lo) | (rt > hi))
    reasons["reaction_time"] = int(bad_rt.sum())
    keep &= ~bad_rt
    no_choice = cols["choice"] == 0
    reasons["choice_0"] = int(no_choice.sum())
    keep &= ~no_choice
    rows = np.flatnonzero(keep).astype(np.int64)  # (K,) rows of the trials table
    reasons["dropped"] = int(len(trials) - rows.size)
    log.info("session %s: %s of %s trials usable; dropped by reason %s",
             session.eid, rows.size, len(trials), {k: v for k, v in reasons.items() if v})
    if rows.size == 0:
        counts = ", ".join(f"{k}={v}" for k, v in reasons.items() if v and k != "dropped")
        raise invalid(
            _trials_name(session),
            f"no usable trial remains after the NEDS trial filters (trials dropped per reason: {counts})",
            len(trials),
            f"check the trials table, or widen DataConfig.rt_range (now {cfg.rt_range})", kind=DataError,
        )
    return rows, reasons


def choice_labels(choice: np.ndarray, session: Session) -> np.ndarray:
    """choice -1/+1 -> 0/1 (K,) int64; anything else raises :class:`DataError`."""
    bad = ~np.isin(choice, (-1.0, 1.0))
    if bad.any():
        raise invalid(f"{_trials_name(session)}: choice", "must be -1 or +1 on usable trials",
                      float(choice[bad][0]), "fix the trials table", kind=DataError)
    return (choice > 0).astype(np.int64)


def block_labels(p_left: np.ndarray, session: Session) -> np.ndarray:
    """probabilityLeft 0.2/0.5/0.8 -> 0/1/2 (K,) int64 (tolerance 1e-3); others raise :class:`DataError`."""
    ref = np.asarray(BLOCK_VALUES)
    dist = np.abs(p_left[:, None] - ref[None, :])  # (K, 3)
    label = dist.argmin(axis=1).astype(np.int64)
    bad = dist.min(axis=1) > BLOCK_ATOL
    if bad.any():
        raise invalid(f"{_trials_name(session)}: probabilityLeft", f"must be one of {BLOCK_VALUES}",
                      float(p_left[bad][0]), "fix the trials table or drop the session", kind=DataError)
    return label


def split_trials(n: int, cfg: DataConfig, eid: str) -> np.ndarray:
    """Seeded random train/val/test assignment (n,) int8 of ``n`` usable trials of session ``eid``."""
    rng = np.random.default_rng([cfg.seed, zlib.crc32(eid.encode())])
    n_train = round(cfg.split[0] * n)
    n_val = round(cfg.split[1] * n)
    n_test = n - n_train - n_val
    counts = {"train": n_train, "val": n_val, "test": n_test}
    for name, count in counts.items():
        if count <= 0:
            raise invalid(
                f"session {eid}: {name} split", "is empty", counts,
                f"need more usable trials than {n}, or change DataConfig.split {cfg.split}", kind=DataError,
            )
    split = np.empty(n, dtype=np.int8)  # (K,) TRAIN / VAL / TEST
    perm = rng.permutation(n)
    split[perm[:n_train]] = 0
    split[perm[n_train:n_train + n_val]] = 1
    split[perm[n_train + n_val:]] = 2
    return split


# ----------------------------------------------------------------------------------------------------------
# units and spikes


def select_units(session: Session, cfg: DataConfig) -> np.ndarray:
    """Rows of ``session.units`` (N_kept,) int64 whose mean firing rate over the spike range > threshold."""
    n = session.n_units
    counts = np.bincount(np.asarray(session.spike_units, dtype=np.int64), minlength=n)[:n]
    span = float(session.spike_times[-1] - session.spike_times[0]) if session.spike_times.size > 1 else 0.0
    rate = counts / span if span > 0 else np.zeros(n)  # (N,) Hz
    rows = np.flatnonzero(rate > cfg.min_rate_hz).astype(np.int64)
    log.info("session %s/%s: %s of %s units above %s Hz", session.eid, session.probe, rows.size, n,
             cfg.min_rate_hz)
    if rows.size == 0:
        raise invalid(
            f"session {session.eid}/{session.probe}: units", f"no unit fires above {cfg.min_rate_hz} Hz",
            {"n_units": n, "max_rate_hz": float(rate.max()) if n else None},
            "lower DataConfig.min_rate_hz or check the spike sorting", kind=DataError,
        )
    return rows


@dataclass
class _Prepared:
    """What both builders share: kept units, their spikes re-indexed, and behaviour traces."""

    unit_rows: np.ndarray  # (N,) int64 rows of session.units
    unit_ids: np.ndarray  # (N,) int64 cluster ids
    regions: np.ndarray  # (N,) str
    times: np.ndarray  # (S',) float64 seconds, spikes of kept units
    units: np.ndarray  # (S',) int64 column index into unit_rows
    wheel: WheelTrace
    whisker: MotionEnergyTrace

    def bin(self, starts: np.ndarray, n_bins: int, bin_size: float) -> np.ndarray:
        return bin_windows(self.times, self.units, starts, n_bins, self.unit_rows.size, bin_size,
                           dtype=np.uint16)  # (W, T, N) uint16 spike counts per bin


def _prepare(session: Session, cfg: DataConfig) -> _Prepared:
    rows = select_units(session, cfg)
    lut = np.full(session.n_units, -1, dtype=np.int64)
    lut[rows] = np.arange(rows.size)
    mapped = lut[np.asarray(session.spike_units, dtype=np.int64)]
    keep = mapped >= 0
    units_tab = session.units
    if "cluster_id" in units_tab.columns:
        ids = np.asarray(units_tab["cluster_id"], dtype=np.int64)[rows]
    else:
        ids = rows.copy()
    if "region" in units_tab.columns:
        regions = np.asarray(units_tab["region"].astype(str), dtype=np.str_)[rows]
    else:
        regions = np.full(rows.size, "", dtype=np.str_)
    return _Prepared(
        unit_rows=rows, unit_ids=ids, regions=regions,
        times=np.asarray(session.spike_times, dtype=np.float64)[keep], units=mapped[keep],
        wheel=wheel_speed_trace(session.wheel_times, session.wheel_position),
        whisker=left_motion_energy(session.motion_energy, session.eid),
    )


# ----------------------------------------------------------------------------------------------------------
# builders


def _fit_norm(wheel: np.ndarray, whisker: np.ndarray) -> Normalisation:
    return Normalisation(
        wheel_min=float(wheel.min()), wheel_max=float(wheel.max()),
        whisker_min=float(whisker.min()), whisker_max=float(whisker.max()),
    )


def _build_trials(session: Session, cfg: DataConfig, prep: _Prepared) -> TrialArrays:
    rows, reasons = usable_trials(session, cfg)
    trials = session.trials
    stim_on = _column(trials, "stimOn_times", session)[rows]  # (K,) seconds
    choice = choice_labels(_column(trials, "choice", session)[rows], session)
    block = block_labels(_column(trials, "probabilityLeft", session)[rows], session)
    split = split_trials(rows.size, cfg, session.eid)
    starts = stim_on - cfg.pre  # (K,) seconds, start of bin 0
    n_bins = cfg.n_bins
    spikes = prep.bin(starts, n_bins, cfg.bin_size)  # (K, T, N) uint16
    wheel_raw = wheel_on_bins(prep.wheel, starts, n_bins, cfg.bin_size)  # (K, T) rad/s
    whisker_raw = motion_energy_on_bins(prep.whisker, starts, n_bins, cfg.bin_size)  # (K, T)
    train = split == TRAIN
    norm = _fit_norm(wheel_raw[train], whisker_raw[train])
    counts = {name: int((split == i).sum()) for i, name in enumerate(SPLITS)}
    log.info("session %s/%s: %s trials x %s bins x %s units; split %s", session.eid, session.probe,
             rows.size, n_bins, prep.unit_rows.size, counts)
    return TrialArrays(
        eid=session.eid, probe=session.probe, unit_ids=prep.unit_ids, regions=prep.regions,
        spikes=spikes,
        wheel=norm.scale("wheel", wheel_raw),  # (K, T) float32
        whisker=norm.scale("whisker", whisker_raw),  # (K, T) float32
        choice=choice, block=block, trial_index=rows, window_start=starts, split=split, norm=norm,
        bin_size=cfg.bin_size,
        meta={"n_trials_total": len(trials), "dropped": reasons, "split_counts": counts,
              "whisker_nan_frames": prep.whisker.n_nan, "config": cfg.as_dict()},
    )


def build_trial_arrays(session: Session, cfg: DataConfig | None = None) -> TrialArrays:
    """Trial-aligned windows of one session: (K, T, N) uint16 spikes, scaled behaviour, labels, split."""
    cfg = cfg or DataConfig()
    cfg.check()
    return _build_trials(session, cfg, _prepare(session, cfg))


def _session_range(session: Session) -> tuple[float, float]:
    """[start, end) of the continuous grid: first trial start .. last trial end, else the spike range."""
    trials = session.trials
    if {"intervals_0", "intervals_1"} <= set(trials.columns):
        lo = pd.to_numeric(trials["intervals_0"], errors="coerce").to_numpy(dtype=np.float64)
        hi = pd.to_numeric(trials["intervals_1"], errors="coerce").to_numpy(dtype=np.float64)
        if np.isfinite(lo).any() and np.isfinite(hi).any():
            return float(np.nanmin(lo)), float(np.nanmax(hi))
    if session.spike_times.size < 2:
        raise invalid(f"session {session.eid}", "needs trial intervals or spikes to place a grid",
                      session.spike_times.size, kind=DataError)
    return float(session.spike_times[0]), float(session.spike_times[-1])


def _trial_bounds(session: Session, ta: TrialArrays, cfg: DataConfig) -> tuple[np.ndarray, np.ndarray]:
    """(start, end) seconds of each usable trial: trial intervals, else the trial window."""
    trials = session.trials
    if {"intervals_0", "intervals_1"} <= set(trials.columns):
        lo = _column(trials, "intervals_0", session)[ta.trial_index]
        hi = _column(trials, "intervals_1", session)[ta.trial_index]
        ok = np.isfinite(lo) & np.isfinite(hi) & (hi > lo)
        if ok.all():
            return lo, hi
        log.warning("session %s: %s usable trials lack intervals; using their windows", session.eid,
                    int((~ok).sum()))
        win_lo, win_hi = ta.window_start, ta.window_start + cfg.n_bins * cfg.bin_size
        return np.where(ok, lo, win_lo), np.where(ok, hi, win_hi)
    log.warning("session %s: trials table has no intervals_0/1; trial bounds are the trial windows",
                session.eid)
    return ta.window_start.copy(), ta.window_start + cfg.n_bins * cfg.bin_size


def _build_continuous(
    session: Session, cfg: DataConfig, prep: _Prepared, ta: TrialArrays
) -> ContinuousArrays:
    t_start, t_end = _session_range(session)
    n_total = int(np.floor((t_end - t_start) / cfg.bin_size))
    if n_total <= 0:
        raise invalid(f"session {session.eid}: trial intervals", "span less than one bin",
                      (t_start, t_end), kind=DataError)
    start = np.array([t_start])
    spikes = prep.bin(start, n_total, cfg.bin_size)[0]  # (T_total, N) uint16
    wheel_raw = wheel_on_bins(prep.wheel, start, n_total, cfg.bin_size)[0]  # (T_total,) rad/s
    whisker_raw = motion_energy_on_bins(prep.whisker, start, n_total, cfg.bin_size)[0]  # (T_total,)
    # per-bin trial: the first usable trial (in time order) ending after the bin centre
    lo, hi = _trial_bounds(session, ta, cfg)
    order = np.argsort(lo, kind="stable")
    lo, hi = lo[order], hi[order]
    centre = t_start + (np.arange(n_total) + 0.5) * cfg.bin_size  # (T_total,) seconds
    j = np.minimum(np.searchsorted(hi, centre, side="right"), order.size - 1)  # (T_total,) trial rank
    inside = (centre >= lo[j]) & (centre < hi[j])
    choice = np.where(inside, ta.choice[order][j], -1).astype(np.int64)  # (T_total,)
    block = np.where(inside, ta.block[order][j], -1).astype(np.int64)
    split = ta.split[order][j].astype(np.int8)  # (T_total,) ITI bins: the following trial's split
    return ContinuousArrays(
        eid=session.eid, probe=session.probe, unit_ids=ta.unit_ids, regions=ta.regions, t0=t_start,
        spikes=spikes,
        wheel=ta.norm.scale("wheel", wheel_raw),  # (T_total,) float32
        whisker=ta.norm.scale("whisker", whisker_raw),
        choice=choice, block=block, split=split, norm=ta.norm, bin_size=cfg.bin_size,
    )


def build_continuous_arrays(
    session: Session, cfg: DataConfig | None = None, trial_arrays: TrialArrays | None = None
) -> ContinuousArrays:
    """The whole session on one grid, with the units, normalisation and splits of the trial arrays.

    Pass the session's ``trial_arrays`` (built with the same ``cfg``) to reuse them; otherwise they are built.
    """
    cfg = cfg or DataConfig()
    cfg.check()
    prep = _prepare(session, cfg)
    ta = trial_arrays if trial_arrays is not None else _build_trials(session, cfg, prep)
    if not np.array_equal(ta.unit_ids, prep.unit_ids):
        raise invalid("trial_arrays", "must come from the same session and DataConfig (unit vocabularies "
                      "differ)", (ta.eid, ta.n_units, prep.unit_ids.size), kind=ConfigError)
    return _build_continuous(session, cfg, prep, ta)


def build_arrays(session: Session, cfg: DataConfig | None = None) -> tuple[TrialArrays, ContinuousArrays]:
    """Both array sets of one session, sharing one unit selection, wheel trace and normalisation."""
    cfg = cfg or DataConfig()
    cfg.check()
    prep = _prepare(session, cfg)
    ta = _build_trials(session, cfg, prep)
    return ta, _build_continuous(session, cfg, prep, ta)


def continuous_windows(
    arrays: ContinuousArrays,
    window_bins: int = 100,
    stride: int | None = None,
    split: int = TRAIN,
    rng: np.random.Generator | None = None,
) -> np.ndarray:
    """Start bins (W,) int64 of windows lying wholly inside contiguous stretches of one split.

    Windows step by ``stride`` bins (default ``window_bins``) from the start of each stretch; with ``rng``
    each stretch gets a random phase in ``[0, stride)`` so repeated epochs see different cuts.
    """
    if window_bins <= 0:
        raise invalid("window_bins", "must be positive", window_bins)
    step = window_bins if stride is None else stride
    if step <= 0:
        raise invalid("stride", "must be positive", stride)
    if split not in (0, 1, 2):
        raise invalid("split", "must be TRAIN (0), VAL (1) or TEST (2)", split)
    mask = np.concatenate([[False], arrays.split == split, [False]])
    edges = np.flatnonzero(np.diff(mask.astype(np.int8)))
    run_lo, run_hi = edges[0::2], edges[1::2]  # (R,) [start, end) bins of each stretch
    out: list[np.ndarray] = []
    for a, b in zip(run_lo, run_hi, strict=True):
        room = int(b - a - window_bins)
        if room < 0:
            continue
        phase = int(rng.integers(0, min(step, room + 1))) if rng is not None else 0
        out.append(np.arange(a + phase, b - window_bins + 1, step, dtype=np.int64))
    return np.concatenate(out) if out else np.zeros(0, dtype=np.int64)
