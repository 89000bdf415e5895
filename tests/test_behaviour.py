"""Wheel speed and whisker motion energy onto the bin grid (training.behaviour)."""

from __future__ import annotations

import numpy as np
import pytest

from neds_rt.errors import DataError
from training.behaviour import (
    MotionEnergyTrace,
    left_motion_energy,
    motion_energy_on_bins,
    wheel_on_bins,
    wheel_speed_trace,
)


def _irregular_ticks(rng: np.random.Generator, t_end: float, mean_dt: float) -> np.ndarray:
    return np.cumsum(rng.uniform(0.2 * mean_dt, 1.8 * mean_dt, size=int(t_end / mean_dt)))


@pytest.mark.parametrize("velocity", [2.5, -1.2])
def test_constant_velocity_wheel_gives_its_speed(velocity: float) -> None:
    rng = np.random.default_rng(1)
    t = _irregular_ticks(rng, 20.0, 0.003)  # irregular encoder ticks, ~333 Hz
    trace = wheel_speed_trace(t, 0.3 + velocity * t)
    assert trace.fs == 1000.0
    inner = (trace.times() > t[0] + 1.0) & (trace.times() < t[-1] - 1.0)
    np.testing.assert_allclose(trace.speed[inner], abs(velocity), rtol=1e-3)
    starts = np.array([t[0] + 2.0, t[0] + 10.0])
    bins = wheel_on_bins(trace, starts, 100, 0.02)  # (2, 100) rad/s
    assert bins.shape == (2, 100)
    np.testing.assert_allclose(bins, abs(velocity), rtol=1e-3)


def test_wheel_speed_is_low_passed_and_rectified() -> None:
    t = np.arange(0.0, 10.0, 0.001)
    slow = np.sin(2 * np.pi * 1.0 * t)  # 1 Hz: passes, speed up to 2*pi rad/s
    fast = 0.01 * np.sin(2 * np.pi * 200.0 * t)  # 200 Hz: removed by the 20 Hz low-pass
    trace = wheel_speed_trace(t, slow + fast)
    inner = (trace.times() > 1.0) & (trace.times() < 9.0)
    expected = np.abs(2 * np.pi * np.cos(2 * np.pi * trace.times()[inner]))
    assert np.all(trace.speed >= 0)
    np.testing.assert_allclose(trace.speed[inner], expected, atol=0.02)


def test_wheel_bin_means_follow_the_grid() -> None:
    t = np.arange(0.0, 4.0, 0.001)
    trace = wheel_speed_trace(t, 0.5 * t**2)  # speed = t
    bins = wheel_on_bins(trace, np.array([1.0]), 50, 0.02)[0]  # (50,)
    centres = 1.0 + (np.arange(50) + 0.5) * 0.02
    np.testing.assert_allclose(bins, centres, atol=2e-3)


def test_wheel_bins_outside_recording_hold_edge_value() -> None:
    t = np.arange(0.0, 2.0, 0.001)
    trace = wheel_speed_trace(t, 1.5 * t)
    bins = wheel_on_bins(trace, np.array([5.0, -3.0]), 10, 0.02)
    np.testing.assert_allclose(bins, 1.5, rtol=1e-3)


@pytest.mark.parametrize(
    ("times", "pos", "match"),
    [
        (np.array([0.0]), np.array([0.0]), "at least 2"),
        (np.array([0.0, 1.0, 0.5]), np.zeros(3), "non-decreasing"),
        (np.array([0.0, np.nan, 1.0]), np.zeros(3), "finite"),
        (np.array([0.0, 1.0]), np.array([0.0, np.nan]), "wheel.position"),
        (np.array([0.0, 1.0]), np.zeros(3), "same length"),
    ],
)
def test_bad_wheel_input_raises(times: np.ndarray, pos: np.ndarray, match: str) -> None:
    with pytest.raises(DataError, match=match):
        wheel_speed_trace(times, pos)


def test_motion_energy_interpolates_over_nans_and_counts_them() -> None:
    t = np.arange(0.0, 10.0, 1 / 60)
    me = 3.0 * t + 1.0
    me[[5, 6, 100]] = np.nan
    trace = left_motion_energy({"left": (t, me), "right": (t, np.zeros_like(t))}, "eid-x")
    assert trace.n_nan == 3
    assert trace.times.size == t.size - 3
    bins = motion_energy_on_bins(trace, np.array([0.0, 1.0]), 100, 0.02)  # (2, 100)
    centres = np.array([0.0, 1.0])[:, None] + (np.arange(100) + 0.5) * 0.02
    np.testing.assert_allclose(bins, 3.0 * centres + 1.0, rtol=1e-9)


def test_motion_energy_accepts_leftcamera_key() -> None:
    t = np.arange(0.0, 1.0, 0.1)
    trace = left_motion_energy({"leftCamera": (t, t)}, "e")
    assert isinstance(trace, MotionEnergyTrace)
    assert trace.n_nan == 0


def test_missing_left_camera_names_the_dataset_and_session() -> None:
    t = np.arange(0.0, 1.0, 0.1)
    with pytest.raises(DataError, match=r"session eid-y: leftCamera\.ROIMotionEnergy.*right"):
        left_motion_energy({"right": (t, t)}, "eid-y")


def test_all_nan_motion_energy_raises() -> None:
    t = np.arange(0.0, 1.0, 0.1)
    with pytest.raises(DataError, match="finite frames"):
        left_motion_energy({"left": (t, np.full_like(t, np.nan))}, "e")
