"""Both numba binning paths equal the numpy reference, edges and bad input included."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from neds_rt.binning import BIN_SIZE_S, RingBinner, bin_windows, bin_windows_reference
from neds_rt.errors import ConfigError, DataError

N_UNITS = 7


def _events(draw: st.DrawFn, max_n: int = 300, on_edges: bool = True) -> tuple[np.ndarray, np.ndarray]:
    n = draw(st.integers(0, max_n))
    t = draw(hnp.arrays(np.float64, n, elements=st.floats(-0.5, 3.0, allow_nan=False)))
    if on_edges and n:
        # put some spikes exactly on bin edges of a grid starting at 0
        k = draw(hnp.arrays(np.int64, n, elements=st.integers(-5, 150)))
        edge = draw(hnp.arrays(np.bool_, n))
        t = np.where(edge, 0.0 + k * BIN_SIZE_S, t)
    u = draw(hnp.arrays(np.int64, n, elements=st.integers(0, N_UNITS - 1)))
    return t, u


@st.composite
def event_sets(draw: st.DrawFn) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    t, u = _events(draw)
    starts = draw(hnp.arrays(np.float64, st.integers(1, 6), elements=st.floats(-0.3, 2.0, allow_nan=False)))
    if draw(st.booleans()):
        starts[0] = 0.0
    return t, u, starts


@settings(max_examples=150, deadline=None)
@given(event_sets(), st.integers(1, 60))
def test_bin_windows_equals_reference(events: tuple[np.ndarray, ...], n_bins: int) -> None:
    t, u, starts = events
    got = bin_windows(t, u, starts, n_bins, N_UNITS)
    want = bin_windows_reference(t, u, starts, n_bins, N_UNITS)
    assert got.shape == (starts.size, n_bins, N_UNITS)
    np.testing.assert_array_equal(got, want)


@settings(max_examples=100, deadline=None)
@given(event_sets(), st.integers(1, 40), st.integers(1, 9))
def test_ring_binner_equals_reference(events: tuple[np.ndarray, ...], n_bins: int, n_chunks: int) -> None:
    """Events arriving in arbitrary chunks (unsorted within) close into the reference bins."""
    t, u, _ = events
    t0 = 0.0
    binner = RingBinner(N_UNITS, t0=t0, ring_bins=256)
    # keep only events inside the ring's reach; the rest are covered by the rejection tests below
    inside = (t >= t0) & (t < t0 + n_bins * BIN_SIZE_S)
    t, u = t[inside], u[inside]
    rejected = []
    for chunk in np.array_split(np.arange(t.size), n_chunks):
        rejected += binner.add(t[chunk], u[chunk])
    assert rejected == []
    out = np.zeros((n_bins, N_UNITS), dtype=np.int32)
    for k in range(n_bins):
        assert binner.pop(out[k]) == k
    np.testing.assert_array_equal(out, bin_windows_reference(t, u, [t0], n_bins, N_UNITS)[0])


def test_spike_on_edge_goes_to_the_bin_that_starts_there() -> None:
    t = np.array([0.0, 0.02, 0.04, 0.06, 0.1, 1.98])
    u = np.zeros(6, dtype=np.int64)
    counts = bin_windows(t, u, [0.0], 100, 1)[0, :, 0]
    assert counts[[0, 1, 2, 3, 5, 99]].tolist() == [1, 1, 1, 1, 1, 1]
    assert counts.sum() == 6
    # an edge of a shifted grid: start 0.013
    counts = bin_windows(np.array([0.013 + 3 * 0.02]), np.array([0]), [0.013], 5, 1)[0, :, 0]
    assert counts.tolist() == [0, 0, 0, 1, 0]


def test_empty_input_and_empty_bins() -> None:
    out = bin_windows(np.array([]), np.array([], dtype=np.int64), [0.0, 1.0], 10, 3)
    assert out.shape == (2, 10, 3) and not out.any()


def test_unsorted_input_gives_sorted_result() -> None:
    rng = np.random.default_rng(0)
    t = rng.uniform(0, 2, 1000)
    u = rng.integers(0, 5, 1000)
    perm = rng.permutation(1000)
    np.testing.assert_array_equal(
        bin_windows(t, u, [0.0, 0.5], 100, 5), bin_windows(t[perm], u[perm], [0.0, 0.5], 100, 5)
    )


@pytest.mark.parametrize("bad_unit", [-1, N_UNITS, 10**6])
def test_out_of_range_unit_is_a_clear_error(bad_unit: int) -> None:
    with pytest.raises(DataError, match=r"unit indices: must lie in \[0, 7\).*" + str(bad_unit)):
        bin_windows(np.array([0.1, 0.2]), np.array([0, bad_unit]), [0.0], 10, N_UNITS)


def test_nan_time_is_a_clear_error() -> None:
    with pytest.raises(DataError, match="spike times: must be finite"):
        bin_windows(np.array([0.1, np.nan]), np.array([0, 1]), [0.0], 10, N_UNITS)


def test_bad_arguments() -> None:
    with pytest.raises(ConfigError, match="bin_size"):
        bin_windows(np.array([0.1]), np.array([0]), [0.0], 10, 1, bin_size=0.0)
    with pytest.raises(DataError, match="same length"):
        bin_windows(np.array([0.1, 0.2]), np.array([0]), [0.0], 10, 1)
    with pytest.raises(ConfigError, match="grace"):
        RingBinner(3, t0=0.0, grace=-0.001)


def test_dtype_overflow_is_an_error_not_a_wrap() -> None:
    t = np.full(300, 0.005)
    with pytest.raises(DataError, match="uint8"):
        bin_windows(t, np.zeros(300, dtype=np.int64), [0.0], 1, 1, dtype=np.uint8)
    assert bin_windows(t, np.zeros(300, dtype=np.int64), [0.0], 1, 1, dtype=np.uint16)[0, 0, 0] == 300


def test_ring_binner_rejects_and_reports_each_bad_event() -> None:
    binner = RingBinner(3, t0=10.0, ring_bins=8)
    row = np.zeros(3, dtype=np.int32)
    assert binner.add(np.array([10.001, 10.021]), np.array([0, 1])) == []
    assert binner.closable(10.02) == 1  # bin 0 ends at 10.02
    assert binner.pop(row) == 0 and row.tolist() == [1, 0, 0]
    rejected = binner.add(
        np.array([10.005, np.nan, 10.03, 10.03, 11.0]),  # late, nan, unknown unit, ok, too far ahead
        np.array([2, 0, 5, 2, 1]),
    )
    by_reason = {r.reason: r for r in rejected}
    assert set(by_reason) == {"late", "nan_time", "unknown_unit", "ahead"}
    assert by_reason["late"].bins.tolist() == [0]  # the bin it hit
    assert by_reason["unknown_unit"].units.tolist() == [5]
    assert by_reason["ahead"].bins.tolist() == [50]
    assert binner.counts == {"ok": 3, "late": 1, "nan_time": 1, "unknown_unit": 1, "ahead": 1}
    assert binner.pop(row) == 1 and row.tolist() == [0, 1, 1]


def test_ring_binner_grace_delays_close() -> None:
    binner = RingBinner(1, t0=0.0, grace=0.005)
    assert binner.closable(0.02) == 0
    assert binner.closable(0.0249) == 0
    assert binner.closable(0.025) == 1
    assert binner.closable(0.065) == 3
    assert binner.closable(float("nan")) == 0


def test_ring_binner_skip_to_moves_forward_only() -> None:
    binner = RingBinner(2, t0=0.0)
    binner.skip_to(10)
    assert binner.next_bin == 10
    with pytest.raises(ConfigError, match="backwards"):
        binner.skip_to(3)
    binner.add(np.array([0.21]), np.array([1]))
    with pytest.raises(ConfigError, match="still hold counts"):
        binner.skip_to(20)
