"""The serve loop's clocks: the host clock every stamp is taken on, and the stream clock that closes bins.

Host clock: :func:`host_now` is ``time.monotonic`` (CLOCK_MONOTONIC). On Linux this is the clock behind
``pylsl.local_clock()`` (both read CLOCK_MONOTONIC), so LSL timestamps after ``time_correction`` and every
telemetry stamp are on one time base, comparable across processes on the same host.

Stream clock (``--clock``), what "now" means when deciding that a bin may close (bin end + grace <= now):

- ``local`` (default): now = the host clock. Right for LSL (timestamps are time-corrected onto the local
  clock) and for a ZMQ publisher on the same host that stamps with ``time.monotonic()``. Bins close on time
  even when the stream stalls (they are then closed empty and flagged), so the decode rate never stalls.
- ``stream``: now = the newest event time received (for binned counts: the newest bin's end). Use it for a
  ZMQ publisher on another host, or a replay faster than real time. Bins close only as data arrives; a stall
  pauses decoding, and a gap the inlet reports is filled and flagged when data resumes.
"""

from __future__ import annotations

import math
import time
from typing import Final

from neds_rt.errors import ConfigError, invalid

CLOCKS: Final = ("local", "stream")


def host_now() -> float:
    """Seconds of the host monotonic clock (= ``pylsl.local_clock()`` on Linux)."""
    return time.monotonic()


def grid_origin(t: float, bin_size: float) -> float:
    """The bin-grid edge at or before ``t``: ``floor(t / bin_size) * bin_size`` (absolute 20 ms grid)."""
    if not math.isfinite(t):
        raise invalid("first event time", "must be finite to place the bin grid", t,
                      "pass --t0 or fix the stream's timestamps", kind=ConfigError)
    return math.floor(t / bin_size) * bin_size


class StreamClock:
    """``now()`` for bin closing: the host clock (``local``) or the newest stream time seen (``stream``)."""

    def __init__(self, mode: str = "local") -> None:
        if mode not in CLOCKS:
            raise invalid("--clock", f"must be one of {CLOCKS}", mode,
                          "use local for LSL and same-host ZMQ, stream otherwise")
        self.mode = mode
        self.newest = -math.inf  # newest stream time seen, s

    def observe(self, t: float) -> None:
        """Tell the clock the newest stream time of a batch (NaN is ignored)."""
        if t > self.newest:
            self.newest = t

    def now(self) -> float:
        return time.monotonic() if self.mode == "local" else self.newest
