"""When serve's throwaway engine run (``Engine.prewarm``) starts: its lead before each bin closes.

The prewarm brings the model's weights and key/value state back into cache for the real step. On a shared
host the cache is lost again within 1-3 ms of other work, so the prewarm should end just before the bin
closes: start it earlier and the step finds part of its memory evicted again; later, and the prewarm
still runs when the bin closes and delays the step. How long a prewarm takes depends on the model, the
machine and the load, so with ``adapt`` the lead follows the prewarm runs themselves:

    lead = (95th percentile of the last ``window`` prewarm durations) + ``margin_s``

bounded to ``[margin_s, max_s]``. Until ``min_runs`` prewarms were timed, the configured ``initial_s`` is
used; without ``adapt`` it is used always. Paced-step sweeps (the int4 default model, one call per 20 ms,
the prewarm run untimed): the step ends p50 / p99 0.92 / 1.36 ms after its deadline with a 3 ms lead and
0.85 / 1.21 ms with 2 ms, where a cold prewarm takes ~1.05 ms (p50); the demo's small model 0.78 / 1.15 ms
at 3 ms and 0.67 / 1.01 ms at 1.2 ms (cold prewarm ~0.86 ms).
"""

from __future__ import annotations

import math
from typing import Final

import numpy as np

from neds_rt.errors import ConfigError, invalid

PREWARM_MARGIN_S: Final = 0.0003  # slack between the prewarm's expected end (p95) and the bin's close
MAX_PREWARM_S: Final = 0.015  # a prewarm must leave part of the 20 ms bin to the I/O thread and the others
_QUANTILE: Final = 0.95


class PrewarmLead:
    """The prewarm lead (seconds), adapted to the measured prewarm durations (module docs).

    Preallocated: :meth:`record` and :meth:`lead` allocate nothing per bin (the percentile is a nearest-rank
    pick by an in-place partition of a scratch copy of the window).
    """

    def __init__(self, initial_s: float, adapt: bool = True, margin_s: float = PREWARM_MARGIN_S,
                 max_s: float = MAX_PREWARM_S, window: int = 64, min_runs: int = 16) -> None:
        if not 0 < initial_s <= max_s:
            raise invalid("prewarm initial lead", f"must be > 0 and at most max_s = {max_s:g} s", initial_s,
                          kind=ConfigError)
        if not 0 <= margin_s < max_s:
            raise invalid("prewarm margin", f"must be >= 0 and below max_s = {max_s:g} s", margin_s,
                          kind=ConfigError)
        if not 1 <= min_runs <= window:
            raise invalid("prewarm min_runs", f"must be in [1, window = {window}]", min_runs,
                          kind=ConfigError)
        self.initial_s, self.adapt, self.margin_s, self.max_s = initial_s, adapt, margin_s, max_s
        self.min_runs = min_runs
        self._runs = np.zeros(window, np.float64)  # (W,) seconds, the last `window` prewarm durations
        self._leads = np.zeros(window, np.float64)  # (W,) seconds, the last `window` leads computed
        self._scratch = np.zeros(window, np.float64)  # (W,) partition workspace
        self.n_runs = 0  # prewarms timed in total
        self._n_leads = 0
        self._lead = initial_s
        self._stale = False

    def record(self, duration_s: float) -> None:
        """Add one prewarm's duration (seconds); the lead is recomputed on the next :meth:`lead` call."""
        if not duration_s >= 0:  # also NaN: a broken clock must not move the lead
            return
        self._runs[self.n_runs % self._runs.size] = duration_s
        self.n_runs += 1
        self._stale = self.adapt

    def lead(self) -> float:
        """The lead to use now (seconds); call it off the critical path (it partitions the window)."""
        if self._stale and self.n_runs >= self.min_runs:
            p95 = _nearest_rank(self._runs[: min(self.n_runs, self._runs.size)], _QUANTILE, self._scratch)
            self._lead = min(p95 + self.margin_s, self.max_s)  # >= margin_s: durations are >= 0
            self._leads[self._n_leads % self._leads.size] = self._lead
            self._n_leads += 1
        self._stale = False
        return self._lead

    def summary_ms(self) -> dict[str, float]:
        """Prewarm durations (p50, p99) and leads (p50, last) over the last window, in ms; {} before a run."""
        if self.n_runs == 0:
            return {}
        runs = self._runs[: min(self.n_runs, self._runs.size)]
        n_leads = min(self._n_leads, self._leads.size)
        leads = self._leads[:n_leads] if n_leads else np.array([self._lead])
        return {"runs": float(self.n_runs), "run_p50": 1e3 * float(np.quantile(runs, 0.5)),
                "run_p99": 1e3 * float(np.quantile(runs, 0.99)),
                "lead_p50": 1e3 * float(np.quantile(leads, 0.5)), "lead_last": 1e3 * self._lead}


def prewarm_text(summary_ms: dict[str, float]) -> str:
    """One line for :meth:`PrewarmLead.summary_ms` (serve's exit summary, ``bench latency``)."""
    p = summary_ms
    return (f"{int(p['runs'])} runs, p50 {p['run_p50']:.3f} ms, p99 {p['run_p99']:.3f} ms; lead p50 "
            f"{p['lead_p50']:.3f} ms, last {p['lead_last']:.3f} ms")


def _nearest_rank(x: np.ndarray, q: float, scratch: np.ndarray) -> float:
    """The nearest-rank ``q`` quantile of ``x`` (1-D), partitioning a copy in ``scratch`` (len >= len(x))."""
    n = x.size
    k = max(math.ceil(q * n) - 1, 0)
    work = scratch[:n]
    work[:] = x
    work.partition(k)
    return float(work[k])
