"""Continuous behaviour onto the 20 ms bin grid: wheel speed and whisker motion energy.

Wheel speed follows IBL's recipe: the encoder's irregular ticks are linearly interpolated to a regular
1 kHz position trace, low-passed with a zero-phase Butterworth filter (8th order, 20 Hz), differentiated
and rectified (rad/s). Bin values are the mean of the 1 kHz speed samples inside each bin. Whisker motion
energy is one value per camera frame; NaN frames are interpolated over (and counted) and the trace is
linearly interpolated at bin centres.

Grids are given as window starts ``(W,)`` plus ``n_bins``; bin ``k`` of window ``w`` covers
``[s_w + k * bin_size, s_w + (k + 1) * bin_size)``, the same float64 edges as :mod:`neds_rt.binning`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Final

import numpy as np
import numpy.typing as npt

from neds_rt.errors import DataError, invalid

log = logging.getLogger(__name__)

WHEEL_FS_HZ: Final = 1000.0
WHEEL_CUTOFF_HZ: Final = 20.0
WHEEL_ORDER: Final = 8
LEFT_CAMERA_KEYS: Final = ("left", "leftCamera")


@dataclass
class WheelTrace:
    """Wheel speed on a regular grid: sample ``i`` is at ``t0 + i / fs``."""

    t0: float  # seconds, time of sample 0
    fs: float  # Hz
    speed: np.ndarray  # (M,) float64 absolute wheel velocity, rad/s
    _cum: np.ndarray | None = None  # (M + 1,) running sum of speed, for bin means

    def times(self) -> np.ndarray:
        return self.t0 + np.arange(self.speed.size) / self.fs  # (M,) seconds


def _check_trace(what: str, times: np.ndarray, values: np.ndarray, min_len: int = 2) -> None:
    if times.ndim != 1 or times.shape != values.shape:
        raise invalid(what, "times and values must be 1-D arrays of the same length",
                      (times.shape, values.shape), "check the session's ALF files", kind=DataError)
    if times.size < min_len:
        raise invalid(what, f"needs at least {min_len} samples", times.size,
                      "use a session with this dataset recorded", kind=DataError)
    if not np.isfinite(times).all():
        raise invalid(what, "timestamps must be finite", int((~np.isfinite(times)).sum()),
                      "drop or re-extract the bad timestamps", kind=DataError)
    if np.any(np.diff(times) < 0):
        bad = int(np.flatnonzero(np.diff(times) < 0)[0])
        raise invalid(what, "timestamps must be non-decreasing", f"{times[bad + 1]} after {times[bad]}",
                      "sort the samples by time", kind=DataError)


def wheel_speed_trace(
    times: npt.ArrayLike,
    position: npt.ArrayLike,
    fs: float = WHEEL_FS_HZ,
    cutoff_hz: float = WHEEL_CUTOFF_HZ,
    order: int = WHEEL_ORDER,
) -> WheelTrace:
    """Absolute wheel velocity (rad/s) at ``fs`` from irregular encoder ticks (times s, position rad)."""
    from scipy.signal import butter, sosfiltfilt

    t = np.asarray(times, dtype=np.float64)
    x = np.asarray(position, dtype=np.float64)
    _check_trace("wheel.timestamps / wheel.position", t, x)
    if not np.isfinite(x).all():
        raise invalid("wheel.position", "must be finite", int((~np.isfinite(x)).sum()),
                      "re-extract the wheel position", kind=DataError)
    n = int(np.floor((t[-1] - t[0]) * fs)) + 1
    grid = t[0] + np.arange(n) / fs  # (M,) seconds, regular 1 kHz grid
    pos = np.interp(grid, t, x)  # (M,) radians
    sos = butter(order, cutoff_hz, btype="low", fs=fs, output="sos")
    if n > 3 * (2 * sos.shape[0] + 1):
        # odd padding of ~0.5 s extends trends linearly, so the filter's edge transients die in the pad
        pos = sosfiltfilt(sos, pos, padtype="odd", padlen=min(n - 1, int(0.5 * fs)))
    else:
        log.warning("wheel trace has only %s samples at %s Hz; not low-passed", n, fs)
    speed = np.abs(np.gradient(pos, 1.0 / fs)) if n > 1 else np.zeros(n)  # (M,) rad/s
    return WheelTrace(t0=float(t[0]), fs=float(fs), speed=speed)


def _bin_edges(starts: np.ndarray, n_bins: int, bin_size: float) -> tuple[np.ndarray, np.ndarray]:
    k = np.arange(n_bins, dtype=np.float64)
    lo = starts[:, None] + k * bin_size  # (W, T) bin starts, seconds
    hi = starts[:, None] + (k + 1) * bin_size  # (W, T) bin ends
    return lo, hi


def wheel_on_bins(trace: WheelTrace, starts: npt.ArrayLike, n_bins: int, bin_size: float) -> np.ndarray:
    """Mean wheel speed per bin: (W, n_bins) float64 rad/s for windows starting at ``starts`` (W,).

    Bins with no 1 kHz sample inside (outside the wheel recording) take the nearest sample's value.
    """
    s = np.asarray(starts, dtype=np.float64).reshape(-1)
    lo, hi = _bin_edges(s, n_bins, bin_size)
    if trace._cum is None:
        trace._cum = np.concatenate([[0.0], np.cumsum(trace.speed)])  # (M + 1,)
    m = trace.speed.size
    # first sample index >= edge, on the regular grid t0 + i/fs
    i_lo = np.clip(np.ceil((lo - trace.t0) * trace.fs - 1e-9), 0, m).astype(np.int64)
    i_hi = np.clip(np.ceil((hi - trace.t0) * trace.fs - 1e-9), 0, m).astype(np.int64)
    count = i_hi - i_lo
    total = trace._cum[i_hi] - trace._cum[i_lo]
    out = np.empty(lo.shape, dtype=np.float64)  # (W, T) rad/s
    has = count > 0
    out[has] = total[has] / count[has]
    if not has.all():
        centre = 0.5 * (lo[~has] + hi[~has])
        out[~has] = np.interp(centre, trace.times(), trace.speed)
    return out


@dataclass
class MotionEnergyTrace:
    """One camera's ROI motion energy with NaN frames removed (interpolated over)."""

    times: np.ndarray  # (F,) float64 seconds
    values: np.ndarray  # (F,) float64 motion energy (camera units)
    n_nan: int  # NaN frames dropped from the raw trace


def left_motion_energy(
    motion_energy: dict[str, tuple[np.ndarray, np.ndarray]], eid: str
) -> MotionEnergyTrace:
    """The LEFT camera's ROIMotionEnergy of a session, NaN frames dropped and counted."""
    for key in LEFT_CAMERA_KEYS:
        if key in motion_energy:
            times, values = motion_energy[key]
            break
    else:
        raise invalid(
            f"session {eid}: leftCamera.ROIMotionEnergy", "the left camera's motion energy is required",
            sorted(motion_energy), "use a session with left-camera video (times + ROIMotionEnergy)",
            kind=DataError,
        )
    t = np.asarray(times, dtype=np.float64)
    v = np.asarray(values, dtype=np.float64)
    _check_trace("leftCamera.times / leftCamera.ROIMotionEnergy", t, v, min_len=1)
    good = np.isfinite(v)
    n_nan = int(v.size - good.sum())
    if good.sum() < 2:
        raise invalid("leftCamera.ROIMotionEnergy", "needs at least 2 finite frames", int(good.sum()),
                      "use a session with usable left-camera video", kind=DataError)
    if n_nan:
        log.info("session %s: %s of %s left-camera motion-energy frames are NaN; interpolated over",
                 eid, n_nan, v.size)
    return MotionEnergyTrace(times=t[good], values=v[good], n_nan=n_nan)


def motion_energy_on_bins(
    trace: MotionEnergyTrace, starts: npt.ArrayLike, n_bins: int, bin_size: float
) -> np.ndarray:
    """Motion energy linearly interpolated at bin centres: (W, n_bins) float64 (edge values held outside)."""
    s = np.asarray(starts, dtype=np.float64).reshape(-1)
    lo, hi = _bin_edges(s, n_bins, bin_size)
    return np.interp(0.5 * (lo + hi), trace.times, trace.values)  # (W, T)
