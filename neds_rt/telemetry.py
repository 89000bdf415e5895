"""Serve telemetry: per-bin latency stamps, stage budgets and overruns, a status line, an exit summary.

Every decoded bin carries the stamps :data:`neds_rt.wire.STAMP_NAMES` (seconds of the host monotonic clock,
see :mod:`neds_rt.clock`): ``bin_end`` (the bin's end, stream time), ``closed`` (the loop popped the bin),
``infer_start`` / ``infer_end`` (around the engine step) and ``published`` (after the LSL push, right before
the ZMQ send). Stages are differences of two stamps:

=====================  ===========================  ==========================================
stage                  stamps                       budget (DESIGN.md latency budget)
=====================  ===========================  ==========================================
``close``              bin_end -> closed            grace + ``close_slack`` (loop woke late)
``counts``             closed -> infer_start        0.05 ms
``infer``              infer_start -> infer_end     1 ms
``publish``            infer_end -> published       0.1 ms
``close_to_published`` closed -> published          2 ms
=====================  ===========================  ==========================================

A stage over its budget is an overrun: counted per stage and logged (rate-limited). Latency is reported as
percentiles (p50, p90, p99, p99.9, max), never as a mean alone.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final

import numpy as np

from neds_rt.prewarm import prewarm_text
from neds_rt.wire import STAMP_NAMES

log = logging.getLogger(__name__)

STAGES: Final = {
    "close": ("bin_end", "closed"),
    "counts": ("closed", "infer_start"),
    "infer": ("infer_start", "infer_end"),
    "publish": ("infer_end", "published"),
    "close_to_published": ("closed", "published"),
}
BUDGETS_S: Final = {"counts": 0.05e-3, "infer": 1e-3, "publish": 0.1e-3, "close_to_published": 2e-3}
PERCENTILES: Final = (50.0, 90.0, 99.0, 99.9)
_COL: Final = {name: i for i, name in enumerate(STAMP_NAMES)}
_LOG_FIRST: Final = 10  # overruns logged per stage before rate-limiting
_LOG_EVERY: Final = 1000


def stage_budgets(grace_s: float, close_slack_s: float = 2e-3) -> dict[str, float]:
    """Per-stage budgets in seconds; ``close`` allows the grace plus ``close_slack_s`` of wake-up lateness."""
    return {"close": grace_s + close_slack_s, **BUDGETS_S}


def percentiles_ms(x: np.ndarray) -> dict[str, float]:
    """p50/p90/p99/p99.9/max of (n,) durations in seconds, in milliseconds (NaN when empty)."""
    if x.size == 0:
        return {**{f"p{p:g}": float("nan") for p in PERCENTILES}, "max": float("nan")}
    q = np.percentile(x, PERCENTILES) * 1e3
    return {**{f"p{p:g}": float(v) for p, v in zip(PERCENTILES, q, strict=True)}, "max": float(x.max()) * 1e3}


@dataclass
class Summary:
    """What a serve run did: bins, per-stage latency percentiles (ms) and event / problem counts."""

    bins: int
    duration_s: float
    stages: dict[str, dict[str, float]]  # stage -> {"p50": ms, ..., "max": ms}
    counts: dict[str, int] = field(default_factory=dict)
    overruns: dict[str, int] = field(default_factory=dict)
    prewarm_ms: dict[str, float] = field(default_factory=dict)  # PrewarmLead.summary_ms(); {}: no prewarm

    def lines(self) -> list[str]:
        rate = self.bins / self.duration_s if self.duration_s > 0 else 0.0
        out = [f"{self.bins} bins in {self.duration_s:.1f} s ({rate:.1f} bins/s)"]
        cols = [*(f"p{p:g}" for p in PERCENTILES), "max"]
        out.append(f"{'stage (ms)':<20}" + "".join(f"{c:>9}" for c in cols) + f"{'overruns':>10}")
        for name, pct in self.stages.items():
            vals = "".join(f"{pct[c]:>9.3f}" for c in cols)
            out.append(f"{name:<20}{vals}{self.overruns.get(name, 0):>10}")
        nonzero = {k: v for k, v in self.counts.items() if v}
        out.append("counts: " + (", ".join(f"{k} {v}" for k, v in sorted(nonzero.items())) or "none"))
        if self.prewarm_ms:
            out.append("prewarm: " + prewarm_text(self.prewarm_ms))
        return out

    def to_dict(self) -> dict[str, Any]:
        return {"bins": self.bins, "duration_s": self.duration_s, "stages_ms": self.stages,
                "counts": dict(self.counts), "overruns": dict(self.overruns),
                "prewarm_ms": dict(self.prewarm_ms)}


class Telemetry:
    """Records per-bin stamps into a preallocated ring and keeps the serve counters.

    ``capacity`` bins of stamps are kept (the summary covers the last ``capacity`` bins; 2**18 bins is
    87 minutes at 20 ms). ``counts`` is a free-form counter (late spikes, gap-filled bins, ...).
    """

    def __init__(self, budgets_s: Mapping[str, float] | None = None, capacity: int = 1 << 18,
                 status_s: float = 5.0) -> None:
        self.budgets = dict(budgets_s if budgets_s is not None else stage_budgets(0.0))
        self.stamps = np.zeros((capacity, len(STAMP_NAMES)), np.float64)  # (K, 5) host seconds per bin
        self.bin_index = np.zeros(capacity, np.int64)  # (K,) bin index of each stamp row
        self.n = 0  # bins recorded in total
        self.counts: Counter[str] = Counter()
        self.overruns: Counter[str] = Counter()
        self.status_s = status_s
        self.started: float | None = None
        self._status_at = 0.0
        self._status_n = 0

    # -- per bin -----------------------------------------------------------------------------------------
    def over_budget(self, stamps: Mapping[str, float], stages: Sequence[str], bin_index: int) -> bool:
        """Count and log every stage in ``stages`` over its budget for this bin; True when any was."""
        any_over = False
        for stage in stages:
            budget = self.budgets.get(stage)
            if budget is None:
                continue
            a, b = STAGES[stage]
            took = stamps[b] - stamps[a]
            if took > budget:
                any_over = True
                self.overruns[stage] += 1
                n = self.overruns[stage]
                if n <= _LOG_FIRST or n % _LOG_EVERY == 0:
                    log.warning("overrun #%s in stage %s at bin %s: %.3f ms (budget %.3f ms)",
                                n, stage, bin_index, took * 1e3, budget * 1e3)
        return any_over

    def record(self, bin_index: int, stamps: Mapping[str, float]) -> None:
        """Store one bin's stamps (no allocation)."""
        i = self.n % self.stamps.shape[0]
        row = self.stamps[i]
        for name, col in _COL.items():
            row[col] = stamps[name]
        self.bin_index[i] = bin_index
        self.n += 1

    # -- reports -----------------------------------------------------------------------------------------
    def _rows(self, last: int | None = None) -> np.ndarray:
        cap = self.stamps.shape[0]
        n = min(self.n, cap) if last is None else min(self.n, cap, last)
        if n == 0:
            return self.stamps[:0]
        end = self.n % cap
        if end >= n:
            return self.stamps[end - n:end]
        return np.concatenate([self.stamps[cap - (n - end):], self.stamps[:end]])

    def stage_durations(self, stage: str, last: int | None = None) -> np.ndarray:
        """(n,) durations in seconds of ``stage`` over the last ``last`` bins (all kept bins by default)."""
        a, b = STAGES[stage]
        rows = self._rows(last)
        return rows[:, _COL[b]] - rows[:, _COL[a]]

    def start(self, now: float) -> None:
        self.started = now
        self._status_at = now
        self._status_n = self.n

    def status_line(self, now: float) -> str | None:
        """A one-line status when ``status_s`` passed since the last one, else None."""
        if self.started is None or now - self._status_at < self.status_s:
            return None
        new = self.n - self._status_n
        rate = new / (now - self._status_at)
        lat = self.stage_durations("close_to_published", new)
        if lat.size:
            p50, p99 = (float(v) * 1e3 for v in np.percentile(lat, (50, 99)))
            latency = f"close->published p50 {p50:.3f} ms p99 {p99:.3f} ms"
        else:
            latency = "no bins"
        self._status_at, self._status_n = now, self.n
        c = self.counts
        return (f"bin {self.n}: {rate:.1f} bins/s, {latency}, late spikes {c['late']}, "
                f"overruns {sum(self.overruns.values())}, gap-filled bins {c['gap_filled_bins']}, "
                f"dropped batches {c['dropped_batches']}")

    def summary(self, now: float) -> Summary:
        stages = {name: percentiles_ms(self.stage_durations(name)) for name in STAGES}
        duration = now - self.started if self.started is not None else 0.0
        return Summary(self.n, duration, stages, dict(self.counts), dict(self.overruns))
