"""Steal time: the CPU time the hypervisor gave to other guests while this VM's CPUs wanted to run.

On a shared virtual machine the neighbours move end-to-end latency more than most settings do (the same
`bench latency` command gave p99 1.94 and 3.03 ms within two hours). Linux counts the time its virtual CPUs
were ready but not running in the ``steal`` column of ``/proc/stat``; `bench latency` samples it once a
second, so a run's figures can be read beside how much of the host it got. Steal does not show neighbours
that only share the caches, so a run can be slow with no steal at all.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

PROC_STAT = Path("/proc/stat")


def read_cpu_times(path: Path = PROC_STAT) -> tuple[int, int] | None:
    """(steal, total) clock ticks of all CPUs since boot from the aggregate ``cpu`` line, or None where the
    file is missing or has no steal column (not Linux, or a kernel without it)."""
    try:
        with open(path) as f:
            first = f.readline().split()
    except OSError:
        return None
    if len(first) < 9 or first[0] != "cpu":
        return None
    ticks = [int(v) for v in first[1:]]
    # user nice system idle iowait irq softirq steal [guest guest_nice]: guest time is already in user/nice
    return ticks[7], sum(ticks[:8])


def steal_pct(before: tuple[int, int], after: tuple[int, int]) -> float:
    """Steal as a percentage of all CPU time between two readings (0 when no time passed)."""
    d_total = after[1] - before[1]
    return 100.0 * (after[0] - before[0]) / d_total if d_total > 0 else 0.0


class StealSampler:
    """Samples steal every ``period_s`` on a daemon thread between :meth:`start` and :meth:`stop`."""

    def __init__(self, period_s: float = 1.0, path: Path = PROC_STAT) -> None:
        self.period_s = period_s
        self.path = path
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._first: tuple[int, int] | None = None
        self._series: list[float] = []  # steal % of each period

    def start(self) -> None:
        self._first = read_cpu_times(self.path)
        if self._first is None:
            return
        self._thread = threading.Thread(target=self._run, name="steal-sampler", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        prev = self._first
        while not self._stop.wait(self.period_s):
            now = read_cpu_times(self.path)
            if now is None or prev is None:
                return
            self._series.append(round(steal_pct(prev, now), 2))
            prev = now

    def stop(self) -> dict[str, Any]:
        """Stop sampling; the run's steal: ``pct`` over the whole run, ``max_pct`` of one period and the
        ``series_pct`` per period (all None where /proc/stat has no steal column)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5.0)
        last = read_cpu_times(self.path)
        if self._first is None or last is None:
            return {"pct": None, "max_pct": None, "period_s": self.period_s, "series_pct": []}
        series = list(self._series)
        return {"pct": round(steal_pct(self._first, last), 3), "max_pct": max(series, default=None),
                "period_s": self.period_s, "series_pct": series}
