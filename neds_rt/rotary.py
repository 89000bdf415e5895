"""Rotary position tables for one absolute bin index, computed in float64 (no torch: the runtime uses it)."""

from __future__ import annotations

import numpy as np


def rotary_step_tables(bin_index: int, head_dim: int, base: float) -> tuple[np.ndarray, np.ndarray]:
    """cos, sin (head_dim,) float32 for ``bin_index`` (rotate-half convention), angles in float64.

    Float64 angles keep relative positions exact for streams of any length: at bin 10**7 (55 hours) a
    float32 angle would already be off by ~0.5 rad.
    """
    return RotaryTables(head_dim, base).new(bin_index)


class RotaryTables:
    """The tables of :func:`rotary_step_tables`, written into preallocated buffers: the frequencies are
    computed once, and a bin costs three ufunc calls and no allocation (the step engine fills its bound
    cos/sin inputs this way)."""

    def __init__(self, head_dim: int, base: float) -> None:
        inv_freq = base ** (-np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
        self._freq = np.concatenate([inv_freq, inv_freq])  # (head_dim,) float64
        self._angles = np.empty(head_dim, dtype=np.float64)  # (head_dim,) scratch

    def write(self, bin_index: int, cos: np.ndarray, sin: np.ndarray) -> None:
        """Fill ``cos`` and ``sin`` (head_dim,) float32 with the tables of ``bin_index``."""
        np.multiply(self._freq, float(bin_index), out=self._angles)
        np.cos(self._angles, out=cos, casting="same_kind")  # float64 cos, rounded once to float32
        np.sin(self._angles, out=sin, casting="same_kind")

    def new(self, bin_index: int) -> tuple[np.ndarray, np.ndarray]:
        """New (head_dim,) float32 cos, sin arrays holding the tables of ``bin_index``."""
        cos, sin = (np.empty(self._freq.size, dtype=np.float32) for _ in range(2))
        self.write(bin_index, cos, sin)
        return cos, sin
