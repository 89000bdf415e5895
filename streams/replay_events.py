"""What a replay plays, on the session clock: a segment's spikes, ground-truth behaviour and trial events.

Everything here is pure (arrays in, arrays out) and in SESSION seconds; :mod:`streams.replay` maps the times
onto the replay clock and paces them out.

- Spikes: the session's spikes with ``start <= t < end``; unit index = row of the session's units table.
- Behaviour: one sample per ``1 / rate_hz`` bin of the segment (bin ``k`` covers
  ``[start + k / rate_hz, start + (k + 1) / rate_hz)``), stamped at the bin END like every neds-rt
  ``Behavior`` stream. Values are the raw (unscaled) targets training uses: mean wheel speed in the
  bin (rad/s, IBL's 1 kHz low-passed recipe from :mod:`training.behaviour`) and left-camera whisker motion
  energy at the bin centre (camera units).
- Trial events: stimOn, firstMovement and feedback of every trial, as JSON strings
  ``{"event", "trial", "t_session", "choice", "block", "feedback_type"}`` (``block`` is probabilityLeft;
  NaN becomes null).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Final

import numpy as np
import pandas as pd

from neds_rt.errors import DataError, invalid
from streams.session import Session

BEHAVIOUR_CHANNELS: Final = (("wheel_speed", "rad/s"), ("whisker_motion_energy", "a.u."))
MARKER_EVENTS: Final = (
    ("stimOn", "stimOn_times"),
    ("firstMovement", "firstMovement_times"),
    ("feedback", "feedback_times"),
)


@dataclass(frozen=True)
class SpikeTimeline:
    """The spikes of one segment, sorted by time."""

    times: np.ndarray  # (S,) float64 session seconds
    units: np.ndarray  # (S,) int32 row of the session's units table


@dataclass(frozen=True)
class BehaviourTimeline:
    """Ground-truth behaviour on a regular grid of the segment, one sample per bin, due at the bin end."""

    times: np.ndarray  # (B,) float64 session seconds, bin ENDS
    values: np.ndarray  # (B, 2) float32 wheel speed (rad/s), whisker motion energy (a.u.)
    rate_hz: float


@dataclass(frozen=True)
class MarkerTimeline:
    """Trial events of a segment, sorted by time (events at the same time keep stimOn < move < feedback)."""

    times: np.ndarray  # (M,) float64 session seconds
    labels: tuple[str, ...]  # (M,) JSON strings


def session_end(session: Session) -> float:
    """The end of the session's recorded span: past its last spike and its last trial's end (s)."""
    last = float(session.spike_times[-1]) if session.spike_times.size else 0.0
    if "intervals_1" in session.trials.columns:
        ends = pd.to_numeric(session.trials["intervals_1"], errors="coerce").to_numpy(dtype=np.float64)
        if np.isfinite(ends).any():
            last = max(last, float(np.nanmax(ends)))
    return math.nextafter(last, math.inf)  # half-open segments [start, end) then hold the last spike


def segment_spikes(session: Session, start: float, end: float) -> SpikeTimeline:
    """The session's spikes with ``start <= t < end`` (views into the session's arrays, no copy)."""
    times = np.asarray(session.spike_times, dtype=np.float64)
    i, j = np.searchsorted(times, [start, end], side="left")
    units = np.asarray(session.spike_units, dtype=np.int32)
    return SpikeTimeline(times[i:j], units[i:j])


def behaviour_timeline(
    session: Session, start: float, end: float, rate_hz: float = 50.0
) -> BehaviourTimeline:
    """Wheel speed and whisker motion energy per ``1 / rate_hz`` bin of ``[start, end)`` (whole bins only).

    The wheel trace is built from the WHOLE session (as training does) so edge filtering matches training.
    Imports :mod:`training.behaviour` lazily (it pulls in torch through the ``training`` package).
    """
    from training.behaviour import (
        left_motion_energy,
        motion_energy_on_bins,
        wheel_on_bins,
        wheel_speed_trace,
    )

    if not (math.isfinite(rate_hz) and rate_hz > 0):
        raise invalid("behaviour rate_hz", "must be a finite number > 0 Hz", rate_hz, "use 50")
    bin_size = 1.0 / rate_hz
    n_bins = int(np.floor((end - start) * rate_hz + 1e-9))
    if n_bins <= 0:
        empty = np.zeros((0, len(BEHAVIOUR_CHANNELS)), np.float32)
        return BehaviourTimeline(np.zeros(0), empty, rate_hz)
    starts = np.array([start], dtype=np.float64)
    wheel = wheel_on_bins(wheel_speed_trace(session.wheel_times, session.wheel_position), starts, n_bins,
                          bin_size)[0]  # (B,) rad/s
    whisker = motion_energy_on_bins(left_motion_energy(session.motion_energy, session.eid), starts, n_bins,
                                    bin_size)[0]  # (B,) a.u.
    values = np.stack([wheel, whisker], axis=1).astype(np.float32)  # (B, 2) float32
    ends = start + (np.arange(n_bins, dtype=np.float64) + 1.0) * bin_size  # (B,) session s, bin ends
    return BehaviourTimeline(ends, values, float(rate_hz))


def _json_value(x: object) -> object:
    """A table value as JSON: ints stay ints, NaN -> None."""
    if x is None:
        return None
    try:
        f = float(x)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return str(x)
    if not math.isfinite(f):
        return None
    return int(f) if f == int(f) else f


def trial_markers(session: Session, start: float, end: float) -> MarkerTimeline:
    """stimOn / firstMovement / feedback events of every trial with ``start <= t < end``."""
    trials = session.trials
    missing = [col for _, col in MARKER_EVENTS if col not in trials.columns]
    if missing:
        raise invalid(f"session {session.eid}: trials table", f"lacks event columns {missing}",
                      sorted(trials.columns), "re-extract the trials table", kind=DataError)
    rows: list[tuple[float, int, int, str]] = []  # (t, trial, event order, JSON)
    for order, (event, col) in enumerate(MARKER_EVENTS):
        times = pd.to_numeric(trials[col], errors="coerce").to_numpy(dtype=np.float64)  # (K,) s
        for k in np.flatnonzero(np.isfinite(times) & (times >= start) & (times < end)):
            row = trials.iloc[int(k)]
            payload = {
                "event": event,
                "trial": int(k),
                "t_session": float(times[k]),
                "choice": _json_value(row.get("choice")),
                "block": _json_value(row.get("probabilityLeft")),
                "feedback_type": _json_value(row.get("feedbackType")),
            }
            rows.append((float(times[k]), int(k), order, json.dumps(payload, allow_nan=False)))
    rows.sort(key=lambda r: (r[0], r[1], r[2]))
    return MarkerTimeline(np.array([r[0] for r in rows], dtype=np.float64), tuple(r[3] for r in rows))
