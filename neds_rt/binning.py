"""Spike binning: the one binning path shared by training, replay checks and the runtime.

Bin ``k`` of a grid that starts at ``t0`` covers ``[t0 + k * bin_size, t0 + (k + 1) * bin_size)`` where the
edges are computed in float64 exactly as written. A spike exactly on an edge belongs to the bin that starts
there. Two numba kernels implement it:

- :func:`bin_windows`: many windows at once (trial-aligned or continuous), for training;
- :class:`RingBinner`: incremental, events in arrival order into a ring of open bins, for the runtime.

:func:`bin_windows_reference` is the plain numpy reference both are tested against.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Final

import numba
import numpy as np
import numpy.typing as npt

from neds_rt.errors import ConfigError, DataError, invalid

log = logging.getLogger(__name__)

BIN_SIZE_S: Final = 0.02

# event status codes written by the ring kernel
OK: Final = 0
LATE: Final = 1
NAN_TIME: Final = 2
UNKNOWN_UNIT: Final = 3
AHEAD: Final = 4
STATUS_NAMES: Final = ("ok", "late", "nan_time", "unknown_unit", "ahead")


@numba.njit(cache=True, inline="always")
def _bin_index(t: float, t0: float, bin_size: float) -> int:
    """Index k with t0 + k*bin_size <= t < t0 + (k+1)*bin_size, edges computed in float64."""
    k = int(np.floor((t - t0) / bin_size))
    if t < t0 + k * bin_size:
        k -= 1
    elif t >= t0 + (k + 1) * bin_size:
        k += 1
    return k


@numba.njit(cache=True)
def _is_sorted(x: np.ndarray) -> bool:
    for i in range(1, x.shape[0]):
        if x[i] < x[i - 1]:
            return False
    return True


@numba.njit(cache=True)
def _bin_windows_sorted(
    times: np.ndarray, units: np.ndarray, starts: np.ndarray, bin_size: float, cap: int, out: np.ndarray
) -> bool:
    """Add sorted events into out (W, T, N); returns True when a count reached ``cap`` (overflow)."""
    n_windows, n_bins, _ = out.shape
    overflow = False
    for w in range(n_windows):
        s = starts[w]
        lo = np.searchsorted(times, s - bin_size)  # margin: _bin_index decides membership exactly
        hi = np.searchsorted(times, s + (n_bins + 1) * bin_size)
        for i in range(lo, hi):
            k = _bin_index(times[i], s, bin_size)
            if 0 <= k < n_bins:
                u = units[i]
                if out[w, k, u] >= cap:
                    overflow = True
                else:
                    out[w, k, u] += 1
    return overflow


def _check_events(times: np.ndarray, units: np.ndarray, n_units: int) -> None:
    if times.shape != units.shape or times.ndim != 1:
        raise invalid(
            "spike events", "times and units must be 1-D arrays of the same length",
            (times.shape, units.shape), "pass one time and one unit index per spike", kind=DataError,
        )
    if times.size and not np.isfinite(times).all():
        bad = int(np.flatnonzero(~np.isfinite(times))[0])
        raise invalid(
            "spike times", "must be finite", f"{times[bad]} at index {bad}",
            "drop NaN/inf spike times before binning", kind=DataError,
        )
    if units.size:
        lo, hi = int(units.min()), int(units.max())
        if lo < 0 or hi >= n_units:
            bad_val = lo if lo < 0 else hi
            raise invalid(
                "spike unit indices", f"must lie in [0, {n_units})", bad_val,
                "map cluster ids to unit indices of the units table, or raise n_units", kind=DataError,
            )


def bin_windows(
    times: npt.ArrayLike,
    units: npt.ArrayLike,
    starts: npt.ArrayLike,
    n_bins: int,
    n_units: int,
    bin_size: float = BIN_SIZE_S,
    dtype: npt.DTypeLike = np.int32,
) -> np.ndarray:
    """Bin spike events into many windows at once.

    times: (S,) spike times in seconds (any order); units: (S,) unit index in [0, n_units);
    starts: (W,) window starts in seconds. Returns (W, n_bins, n_units) spike counts per ``bin_size`` bin.
    Windows may overlap. Raises :class:`DataError` on out-of-range units or non-finite times, and when a
    count does not fit ``dtype``.
    """
    t = np.ascontiguousarray(times, dtype=np.float64)
    u = np.ascontiguousarray(units, dtype=np.int64)
    s = np.ascontiguousarray(starts, dtype=np.float64).reshape(-1)
    if n_bins <= 0 or n_units <= 0:
        raise invalid("n_bins/n_units", "must be positive", (n_bins, n_units), kind=ConfigError)
    if not bin_size > 0:
        raise invalid("bin_size", "must be > 0 seconds", bin_size, kind=ConfigError)
    if not np.isfinite(s).all():
        raise invalid("window starts", "must be finite", s[~np.isfinite(s)][:3], kind=DataError)
    _check_events(t, u, n_units)
    if not _is_sorted(t):
        order = np.argsort(t, kind="stable")
        t, u = t[order], u[order]
    out = np.zeros((s.size, n_bins, n_units), dtype=dtype)  # (W, T, N) spike counts per bin
    cap = int(np.iinfo(out.dtype).max) if np.issubdtype(out.dtype, np.integer) else 2**53
    if _bin_windows_sorted(t, u, s, float(bin_size), cap, out):
        raise invalid(
            "spike counts", f"a bin holds more spikes than dtype {np.dtype(dtype).name} can count",
            cap, "bin with a wider dtype (e.g. np.int32)", kind=DataError,
        )
    return out


def bin_windows_reference(
    times: npt.ArrayLike,
    units: npt.ArrayLike,
    starts: npt.ArrayLike,
    n_bins: int,
    n_units: int,
    bin_size: float = BIN_SIZE_S,
) -> np.ndarray:
    """Plain numpy reference of :func:`bin_windows` (slow; for tests and benchmarks)."""
    t = np.asarray(times, dtype=np.float64)
    u = np.asarray(units, dtype=np.int64)
    _check_events(t, u, n_units)
    s = np.asarray(starts, dtype=np.float64).reshape(-1)
    out = np.zeros((s.size, n_bins, n_units), dtype=np.int64)
    for w, start in enumerate(s):
        k = np.floor((t - start) / bin_size).astype(np.int64)
        k = np.where(t < start + k * bin_size, k - 1, k)
        k = np.where(t >= start + (k + 1) * bin_size, k + 1, k)
        keep = (k >= 0) & (k < n_bins)
        np.add.at(out[w], (k[keep], u[keep]), 1)
    return out


@numba.njit(cache=True)
def _ring_add(
    ring: np.ndarray,
    next_bin: int,
    t0: float,
    bin_size: float,
    times: np.ndarray,
    units: np.ndarray,
    status: np.ndarray,
    bins: np.ndarray,
) -> int:
    """Add events to the ring of open bins [next_bin, next_bin + R). Returns the number of events not OK."""
    n_ring, n_units = ring.shape
    n_bad = 0
    for i in range(times.shape[0]):
        t = times[i]
        u = units[i]
        bins[i] = -1
        if not np.isfinite(t):
            status[i] = NAN_TIME
            n_bad += 1
            continue
        k = _bin_index(t, t0, bin_size)
        bins[i] = k
        if u < 0 or u >= n_units:
            status[i] = UNKNOWN_UNIT
            n_bad += 1
        elif k < next_bin:
            status[i] = LATE
            n_bad += 1
        elif k >= next_bin + n_ring:
            status[i] = AHEAD
            n_bad += 1
        else:
            ring[k % n_ring, u] += 1
            status[i] = OK
    return n_bad


@dataclass
class RejectedEvents:
    """Events the binner could not place, by reason; ``bins`` is the bin each one hit (-1 for NaN times)."""

    reason: str
    times: np.ndarray
    units: np.ndarray
    bins: np.ndarray


class RingBinner:
    """Incremental binner: events arrive in any order, bins close in order.

    Bins ``[next_bin, next_bin + ring_bins)`` are open. :meth:`add` counts events into them; events for an
    already-closed bin are *late*, NaN times, unknown units and events too far ahead are rejected too, and
    each kind is counted and returned to the caller (never silently dropped). :meth:`pop` closes the oldest
    open bin into a caller-owned row. No allocation per event batch below ``max_batch`` events.
    """

    def __init__(
        self,
        n_units: int,
        t0: float,
        bin_size: float = BIN_SIZE_S,
        grace: float = 0.0,
        ring_bins: int = 256,
        max_batch: int = 65536,
    ) -> None:
        if n_units <= 0:
            raise invalid("n_units", "must be positive", n_units)
        if not bin_size > 0:
            raise invalid("bin_size", "must be > 0 seconds", bin_size)
        if not grace >= 0:
            raise invalid("grace", "must be >= 0 seconds", grace, "pass a grace of 0 or more")
        if not np.isfinite(t0):
            raise invalid("t0", "must be a finite stream time", t0)
        self.n_units = n_units
        self.t0 = float(t0)
        self.bin_size = float(bin_size)
        self.grace = float(grace)
        self.next_bin = 0
        self._ring = np.zeros((ring_bins, n_units), dtype=np.int32)  # (R, N) open-bin counts
        self._status = np.empty(max_batch, dtype=np.int8)
        self._bins = np.empty(max_batch, dtype=np.int64)
        self.counts = dict.fromkeys(STATUS_NAMES, 0)

    def bin_start(self, k: int) -> float:
        return self.t0 + k * self.bin_size

    def bin_end(self, k: int) -> float:
        return self.t0 + (k + 1) * self.bin_size

    def add(self, times: np.ndarray, units: np.ndarray) -> list[RejectedEvents]:
        """Count events (times float64 seconds, units int) into open bins; return the rejected ones."""
        t = np.ascontiguousarray(times, dtype=np.float64)
        u = np.ascontiguousarray(units, dtype=np.int64)
        n = t.shape[0]
        if u.shape[0] != n:
            raise invalid("spike events", "times and units must have the same length", (n, u.shape[0]),
                          kind=DataError)
        if n > self._status.shape[0]:
            self._status = np.empty(n, dtype=np.int8)
            self._bins = np.empty(n, dtype=np.int64)
        status, bins = self._status[:n], self._bins[:n]
        n_bad = _ring_add(self._ring, self.next_bin, self.t0, self.bin_size, t, u, status, bins)
        self.counts["ok"] += n - n_bad
        if n_bad == 0:
            return []
        rejected = []
        for code in (LATE, NAN_TIME, UNKNOWN_UNIT, AHEAD):
            idx = np.flatnonzero(status == code)
            if idx.size:
                name = STATUS_NAMES[code]
                self.counts[name] += int(idx.size)
                rejected.append(RejectedEvents(name, t[idx].copy(), u[idx].copy(), bins[idx].copy()))
        return rejected

    def closable(self, now: float) -> int:
        """How many open bins may close at stream time ``now`` (bin end + grace <= now)."""
        if not np.isfinite(now):
            return 0
        last = _bin_index(now - self.grace, self.t0, self.bin_size)  # bin containing now - grace
        return max(0, last - self.next_bin)

    def pop(self, out: np.ndarray) -> int:
        """Close the oldest open bin: copy its (N,) counts into ``out``, reset it; return its bin index."""
        k = self.next_bin
        row = self._ring[k % self._ring.shape[0]]
        out[:] = row
        row[:] = 0
        self.next_bin = k + 1
        return k

    def skip_to(self, k: int) -> None:
        """Move the open window so that ``k`` is the oldest open bin (k >= next_bin); drop nothing open."""
        if k < self.next_bin:
            raise invalid("skip_to", "cannot move the bin clock backwards", (k, self.next_bin))
        if np.any(self._ring):
            raise invalid("skip_to", "open bins still hold counts; pop them first", k)
        self.next_bin = k
